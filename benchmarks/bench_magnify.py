"""Benchmark: how should an image be magnified for the network, and labelled?

``scale="auto"`` magnifies images of small nuclei up to four times. Three ways are scored
on the same images at the same scale (the one ``scale="auto"`` picks; default preset
without test-time augmentation):

- ``bilinear, image``: the image magnified by bilinear interpolation, its probability
  labelled at the image's pixels with the preset's sizes (``min_size``, smoothing, the
  watershed's split depth) divided by the scale;
- ``bilinear, grid``: the same probability labelled on a grid 3 or 5 times finer (about
  the network's pixels, one fine pixel at the centre of each of the image's), read
  back at those centres, as ``labels_of`` does for scales of 2 and more;
- ``bicubic, grid``: the image magnified by bicubic interpolation (as
  ``predict_rescaled`` does), labelled as ``labels_of`` does.

Cases: each network of the generalization benchmark (``bench_generalization.py``,
``<work>/ckpt``) on the images of the acquisition group it never saw, and each
in-distribution network on the test split shrunk to a half and a third (nuclei of 5 to
15 pixels; labels resampled with the image, ``bench_generalization.resize_labels``).
Images not magnified are predicted and labelled the same all three ways; they count in
the means.

Usage::

    python benchmarks/bench_magnify.py --work runs/generalization --seeds 0 1

A later run reuses the cases already measured in ``--work``; ``--report-only`` writes
the results file from them without measuring more.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: Shrink factors of the in-distribution test split.
SHRINK = (0.5, 1 / 3)


def image_pixels(prob: np.ndarray, preset, scale: float) -> np.ndarray:
    """Labels at the image's own pixels, the preset's sizes divided by the scale."""
    from s2l_core.predict import foreground_to_instances

    return foreground_to_instances(
        prob, threshold=preset.threshold, method=preset.method,
        split_depth=preset.split_depth / scale, min_size=round(preset.min_size / scale**2),
        min_peak=preset.min_peak or None, smooth=preset.smooth / scale,
    )  # fmt: skip


def magnified(model, image: np.ndarray, scale: float, mode: str) -> np.ndarray:
    """Probability of ``image`` magnified by ``scale`` (``mode`` interpolation), back
    at the image's size."""
    from s2l_core.infer import predict_rescaled, predict_tiled

    return predict_rescaled(lambda x: predict_tiled(model, x), image, scale, magnify=mode)


def measure(model, images, preset) -> list[dict]:
    """One row per ``(id, raw image, truth)``: the scale chosen, and IoU and AP of each
    way."""
    from s2l_core.augment import normalize_image
    from s2l_core.metrics import evaluate_image
    from s2l_core.predict import labels_of

    rows = []
    for image_id, raw, truth in images:
        image = normalize_image(raw)
        prob, scale = preset.probability(model, image)
        if scale > 1:
            linear, cubic = (magnified(model, image, scale, m) for m in ("bilinear", "bicubic"))
        else:
            linear = cubic = prob
        row = {"image_id": image_id, "scale": scale}
        for way, labels in (
            ("bilinear_image", image_pixels(linear, preset, scale)),
            ("bilinear_grid", labels_of(linear, preset, scale=scale)),
            ("bicubic_grid", labels_of(cubic, preset, scale=scale)),
        ):
            scores = evaluate_image(labels, truth)
            row |= {f"iou_{way}": scores["iou"], f"ap_{way}": scores["ap"]}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/generalization")
    parser.add_argument("--dataset", help="a prepared dataset folder (default: the cache)")
    parser.add_argument("--source")
    parser.add_argument("--variant", default="s2l")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--output", type=Path, default=HERE / "results" / "generalization")
    parser.add_argument(
        "--report-only", action="store_true", help="measure nothing: report what --work holds"
    )
    args = parser.parse_args(argv)

    import pandas as pd
    from bench_generalization import IN_DISTRIBUTION, folds, open_data, shift_image

    from s2l_core.files import atomic_path, write_text
    from s2l_core.predict import Preset, load_model

    work = Path(args.work)
    dataset, _ = open_data({"dataset": args.dataset, "source": args.source, "ratio": 0.3})
    preset = Preset(tta=False)
    kept = work / f"magnify_{args.variant}.csv"
    done = pd.read_csv(kept, dtype={"image_id": str}) if kept.is_file() else None
    for seed in [] if args.report_only else args.seeds:
        for fold, (_, _, ids) in folds(dataset, "fluorescence").items():
            weights = work / "ckpt" / f"{args.variant}__fluorescence__{fold}__s{seed}.pt"
            if not weights.is_file():
                print(f"{weights.name}: not trained, skipped", flush=True)
                continue
            factors = SHRINK if fold == IN_DISTRIBUTION else (1.0,)
            for factor in factors:
                case = f"test x{factor:.2g}" if fold == IN_DISTRIBUTION else f"held-out {fold}"
                if done is not None and ((done.case == case) & (done.seed == seed)).any():
                    continue
                model, _ = load_model(weights, "cpu")

                def images(factor=factor, ids=ids):
                    for k, i in enumerate(ids):
                        raw, truth = dataset.image(i), dataset.labels(i)
                        if factor != 1.0:
                            raw, truth = shift_image(raw, truth, "scale", factor, seed=k)
                        yield i, raw, truth

                part = pd.DataFrame(measure(model, images(), preset)).assign(case=case, seed=seed)
                done = part if done is None else pd.concat([done, part], ignore_index=True)
                with atomic_path(kept) as tmp:
                    done.to_csv(tmp, index=False)
                print(f"{case}, seed {seed}: {len(part)} images", flush=True)
    if done is None:
        raise SystemExit("nothing measured: train the networks with bench_generalization.py")
    ways = ("bilinear_image", "bilinear_grid", "bicubic_grid")
    table = done.assign(magnified=done.scale > 1).groupby(["case", "seed"]).agg(
        images=("image_id", "size"), magnified=("magnified", "sum"),
        **{f"{m}_{w}": (f"{m}_{w}", "mean") for m in ("iou", "ap") for w in ways},
    )  # fmt: skip
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    text = "\n".join(
        [
            f"# Magnified images: interpolation and labels ({args.variant})",
            "",
            f"Command: `{command}`",
            "",
            "Mean over the images of each case, default preset without TTA, each image "
            'at the scale `scale="auto"` picks; `magnified`: images predicted at a '
            "scale over 1, the only ones that differ. `bilinear`/`bicubic`: how the "
            "image is magnified; `image`: labelled at the image's pixels, the preset's "
            "sizes divided by the scale; `grid`: labelled on a grid 3 or 5 times finer "
            "from a scale of 2, read back at the pixels' centres (`labels_of`).",
            "",
            table.round(4).reset_index().to_markdown(index=False),
            "",
        ]
    )
    args.output.mkdir(parents=True, exist_ok=True)
    write_text(args.output / f"magnify_{args.variant}.md", text)
    print(text)


if __name__ == "__main__":
    main()
