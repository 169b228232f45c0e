"""Benchmark: predict at other scales: trained checkpoints scored at each inference scale.

Scores checkpoints on the validation and test splits with the image magnified for the
network by fixed factors, by ``auto`` (:func:`s2l_core.predict.auto_scale`: small
nuclei brought towards 40 pixels across, at most 2x) and by ``auto@D`` (towards ``D``
pixels), with the watershed instances and scores of ``bench_quality.py``, overall and
per image size, with the median time of the prediction per image; ``--min-peaks`` adds
hysteresis levels, ``--min-sizes`` smallest object sizes, ``--thresholds`` foreground
thresholds (with the best threshold of each image, found with its true mask, as a bound),
``--smooths`` Gaussian smoothings of the probability before thresholding, and
``--tta off on`` scores without and with test-time augmentation.
No training: it reads checkpoints, e.g. those the quality benchmark writes.

Usage::

    python benchmarks/bench_scale.py --modality fluorescence \\
        s2l=book/reference/s2l_fluorescence_r030.pt \\
        pce=runs/bench/fluorescence_r030/pce.pt full=runs/bench/fluorescence_r030/full.pt

Figures go to ``benchmarks/results/prediction/scale_<modality>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from s2l_core import data
from s2l_core.cli import (
    probability_argument,
    scale_argument,
    smooth_argument,
    threshold_argument,
)
from s2l_core.evaluate import PLAIN, SCORES, dataset_images, score_images
from s2l_core.files import atomic_path, write_json, write_text
from s2l_core.predict import load_model, predict_probability

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
SHOWN = ["iou", "ap", "f1", "aji"]
#: The settings a row of the tables is scored under, besides the threshold.
SETTINGS = ("method", "scale", "tta", "min_peak", "min_size", "smooth")
#: The keys of a summary row: the split, the settings and the threshold.
KEYS = ("split", *SETTINGS, "threshold")


def parse_scale(text: str) -> float | str:
    """A scale argument: ``s2l predict --scale``'s (a positive number or ``auto``), or
    ``auto@D`` (aim at D pixels)."""
    if text.startswith("auto@"):
        try:
            diameter = float(text[5:])
        except ValueError:
            diameter = float("nan")
        if not 0 < diameter < float("inf"):
            raise argparse.ArgumentTypeError(f"expected auto@<positive pixels>, got {text!r}")
        return text
    return scale_argument(text)


def parse_checkpoint(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` to ``(NAME, PATH)``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def parse_min_peak(text: str) -> float | None:
    """A ``--min-peaks`` value: ``s2l predict --min-peak``'s (a probability in [0, 1]),
    or ``none`` (keep every region)."""
    return None if text == "none" else probability_argument(text)


def parse_min_size(text: str) -> int:
    """A ``--min-sizes`` value: ``s2l predict --min-size``'s (pixels), at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of pixels, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def score_checkpoint(
    model,
    device,
    images,
    scale,
    min_peaks=(None,),
    tta=False,
    min_sizes=(16,),
    thresholds=(0.5,),
    smooths=(0.0,),
) -> pd.DataFrame:
    """Score one checkpoint at one scale, predicting each image once and scoring that
    prediction at every foreground threshold, ``min_peak``, ``min_size`` and ``smooth``
    (:func:`s2l_core.predict.foreground_to_instances`); one row per
    image and combination, with the scale used, the time of the prediction and
    ``area_ratio``, the predicted foreground's area over the true one's. ``tta``:
    test-time augmentation (:func:`s2l_core.predict.predict_probability`). With
    ``scale="auto"`` the nuclei are measured at the threshold of 0.5 whatever the
    thresholds scored."""
    kwargs = {"scale": scale}
    if isinstance(scale, str) and scale.startswith("auto@"):
        kwargs = {"scale": "auto", "diameter": float(scale[5:])}
    tables = []
    for image_id, image, truth in images:
        start = time.perf_counter()
        prob, chosen = predict_probability(model, image, device=device, tta=tta, **kwargs)
        seconds = time.perf_counter() - start
        true_area = max(int((truth > 0).sum()), 1)
        settings = itertools.product(thresholds, min_peaks, min_sizes, smooths)
        for threshold, peak, size, smooth in settings:
            labels = {}
            one = [(image_id, image, truth)]
            post = PLAIN.but(min_peak=peak, min_size=size, threshold=threshold, smooth=smooth)
            row = score_images(lambda _, p=prob: p, one, preset=post, labels_out=labels)
            area = (labels[image_id]["watershed"] > 0).sum() / true_area
            row = row.assign(
                predict_s=seconds, scale=str(scale), min_peak=str(peak), tta=tta,
                min_size=size, threshold=threshold, smooth=smooth, scale_used=chosen,
                area_ratio=area,
            )  # fmt: skip
            tables.append(row)
    return pd.concat(tables, ignore_index=True)


def to_markdown(per_image: pd.DataFrame, command: str, modality: str) -> str:
    """Overall and per-size tables of the mean scores, one row per method and scale."""
    lines = [
        f"# Inference scale: {modality}, 30 % scribbles",
        "",
        f"Command: `{command}`",
        "",
        "Mean scores; `s/img` is the median time of the prediction per image (with "
        "`auto`: both passes and the measuring of the nuclei), `mean scale` the mean "
        "magnification used, `area` the median ratio of predicted to true foreground "
        "area.",
        "",
    ]
    for split, part in per_image.groupby("split", sort=False):
        table = part.groupby(list(KEYS[1:]), sort=False).agg(
            **{k: (k, "mean") for k in SHOWN},
            **{"s/img": ("predict_s", "median"), "mean scale": ("scale_used", "mean")},
            **{"area": ("area_ratio", "median")},
        )
        title = f"## {split} ({part['image_id'].nunique()} images)"
        lines += [title, "", table.round(4).reset_index().to_markdown(index=False), ""]
        sizes = part.pivot_table(
            index=list(KEYS[1:]),
            columns="size",
            values="iou",
            aggfunc="mean",
            sort=False,
        )
        counts = part.drop_duplicates("image_id")["size"].value_counts()
        sizes.columns = [f"{c} ({counts[c]})" for c in sizes.columns]
        sizes = sizes.round(3).reset_index().to_markdown(index=False)
        lines += [f"IoU per image size ({split}):", "", sizes, ""]
        bound = threshold_bound(part)
        if bound is not None:
            lines += [
                f"Best threshold per image ({split}): each image's highest IoU over the "
                "thresholds scored, chosen with its true mask. Not a method: the most any "
                "rule that sets the threshold image by image, among these thresholds, "
                "could reach with this prediction.",
                "",
                bound.round(4).reset_index().to_markdown(index=False),
                "",
            ]
    return "\n".join(lines)


def threshold_bound(per_image: pd.DataFrame) -> pd.DataFrame | None:
    """Mean over images of each image's best IoU over the thresholds scored, per method,
    scale, ``tta``, ``min_peak`` and ``min_size``, with the mean IoU at the one
    threshold that is best over all images beside it; ``None`` with one threshold.

    The best threshold of an image is found with its true mask, so this is an upper
    bound for rules that choose one of these thresholds per image, not a score of one."""
    if per_image["threshold"].nunique() < 2:
        return None
    keys = list(SETTINGS)
    fixed = per_image.groupby([*keys, "threshold"], sort=False)["iou"].mean()
    best = per_image.groupby([*keys, "image_id"], sort=False)["iou"].max()
    return pd.DataFrame(
        {
            "best fixed threshold": fixed.groupby(keys, sort=False).idxmax().str[-1],
            "iou at it": fixed.groupby(keys, sort=False).max(),
            "iou, best per image": best.groupby(keys, sort=False).mean(),
        }
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=parse_checkpoint, help="NAME=PATH")
    parser.add_argument("--modality", default="fluorescence", choices=data.MODALITIES)
    parser.add_argument("--scales", nargs="+", type=parse_scale, default=[1.0, 1.5, "auto"])
    parser.add_argument(
        "--min-peaks", nargs="+", type=parse_min_peak, default=[None],
        help="hysteresis levels to score (foreground_to_instances min_peak); 'none' is off",
    )  # fmt: skip
    parser.add_argument(
        "--min-sizes", nargs="+", type=parse_min_size, default=[16],
        help="smallest objects kept, in pixels, to score (foreground_to_instances min_size)",
    )  # fmt: skip
    parser.add_argument(
        "--thresholds", nargs="+", type=threshold_argument, default=[0.5],
        help="foreground thresholds to score (foreground_to_instances threshold)",
    )  # fmt: skip
    parser.add_argument(
        "--smooths", nargs="+", type=smooth_argument, default=[0.0],
        help="Gaussian smoothings (pixels) of the probability to score "
        "(foreground_to_instances smooth); 0 is off",
    )  # fmt: skip
    parser.add_argument(
        "--tta", nargs="+", choices=["off", "on"], default=["off"],
        help="score without ('off') and/or with ('on') test-time augmentation",
    )  # fmt: skip
    parser.add_argument("--splits", nargs="+", default=["val", "test"], choices=data.SPLITS)
    parser.add_argument("--source", default=str(DEFAULT_MIRROR))
    parser.add_argument("--cache-dir")
    parser.add_argument("--max-images", type=int, help="score only the first N per split")
    parser.add_argument(
        "--output", type=Path, help="default: results/prediction/scale_<modality>.json"
    )
    args = parser.parse_args(argv)

    dataset = data.prepare_dataset(args.source, args.cache_dir, progress=False)
    tables = []
    for name, path in args.checkpoints:
        model, _ = load_model(path, "auto")
        device = next(model.parameters()).device
        for split in args.splits:
            ids = dataset.ids(args.modality, split)[: args.max_images]
            for scale, tta in itertools.product(args.scales, args.tta):
                images = dataset_images(dataset, ids)
                scores = score_checkpoint(
                    model, device, images, scale, args.min_peaks, tta=tta == "on",
                    min_sizes=args.min_sizes, thresholds=args.thresholds, smooths=args.smooths,
                )  # fmt: skip
                tables.append(scores.assign(method=name, split=split))
                settings = ["threshold", "min_peak", "min_size", "smooth"]
                for (threshold, peak, size, smooth), part in scores.groupby(settings, sort=False):
                    print(
                        f"{name:6s} {split:5s} scale {scale!s:5s} tta {tta:3s} min_peak {peak:5s} "
                        f"min_size {size:3d} smooth {smooth:.2f} threshold {threshold:.2f} "
                        f"IoU {part['iou'].mean():.4f} AP {part['ap'].mean():.4f}  "
                        f"{part['predict_s'].median():.2f} s/img",
                        flush=True,
                    )
    per_image = pd.concat(tables, ignore_index=True).drop(columns="instances")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    output = args.output or HERE / "results" / "prediction" / f"scale_{args.modality}.json"
    summary = per_image.groupby(list(KEYS), sort=False)[list(SCORES)].mean()
    bounds = []
    for split, part in per_image.groupby("split", sort=False):
        bound = threshold_bound(part)
        if bound is not None:
            bounds += [
                {"split": split} | dict(zip(bound.index.names, index, strict=True))
                | row.round(4).to_dict()
                for index, row in bound.iterrows()
            ]  # fmt: skip
    write_json(
        output,
        {
            "command": command,
            "modality": args.modality,
            "checkpoints": {name: str(path) for name, path in args.checkpoints},
            "overall": [
                dict(zip(KEYS, index, strict=True)) | row.round(4).to_dict()
                for index, row in summary.iterrows()
            ],
            "threshold_bound": bounds,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        },
    )
    with atomic_path(output.with_suffix(".csv")) as tmp:
        per_image.to_csv(tmp, index=False, float_format="%.4f")
    write_text(output.with_suffix(".md"), to_markdown(per_image, command, args.modality))
    print(f"written to {output} (.md, .csv)")


if __name__ == "__main__":
    main()
