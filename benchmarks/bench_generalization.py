"""Benchmark: how well networks segment images of acquisitions they never saw.

Two studies, each on images no training run has seen:

- **Leave one acquisition group out** (fluorescence). BBBC038 fluorescence images come
  from acquisition campaigns that differ in size; the image shape is the group key
  (:func:`acquisition_group`: 256x256, 360x360, 520x696, and the rest merged). For each
  group, a network trains on the *other* groups' training-split images (scribbles,
  validation on their validation split) and is scored on *every* image of the held-out
  group. The ``in-distribution`` fold trains on the whole training split and scores the
  test split, as the rest of the project does.
- **Shift sweep.** The in-distribution network scores the test split again with its
  images changed: rescaled (labels by nearest neighbour), gamma, dimmer (fewer grey
  levels), noisier, blurred. Histopathology has one image shape, so it gets the
  in-distribution fold and the shifts (among them the magnifications x1.5 and x2).

Every run is a *job* (variant, modality, fold, seed) that writes its own results file
under ``--work``; a job whose file exists is skipped, and a job's training saves its
state every epoch, so an interrupted benchmark resumes at the epoch it reached. Each
trained network is scored with several prediction settings (:data:`PRESETS`) from the
same probabilities. ``report`` gathers the jobs into
``benchmarks/results/generalization/`` (Markdown, JSON, per-image CSV and a plot).

Usage (one command on this machine: seed 0, five ``cpu``-profile trainings in bfloat16,
the random forest and the report)::

    python benchmarks/bench_generalization.py all

or step by step (the GPU script ``run_generalization_gpu.sh`` runs ``run`` there)::

    python benchmarks/bench_generalization.py run \\
        benchmarks/results/generalization/generalization.config.json \\
        --device cuda --parallel 14 --work runs/generalization
    python benchmarks/bench_generalization.py rf --work runs/generalization
    python benchmarks/bench_generalization.py report --work runs/generalization
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "generalization"
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
VARIANTS = RESULTS / "generalization.config.json"
sys.path.insert(0, str(HERE))

#: Image shapes that each form an acquisition group of BBBC038 fluorescence; every other
#: shape falls into ``other``.
GROUPS: dict[str, str] = {"256x256": "256x256", "360x360": "360x360", "520x696": "520x696"}
IN_DISTRIBUTION = "in-distribution"
#: Extra settings of histopathology runs: 64 training images, so epochs of 160 crops.
HISTOPATHOLOGY = {"epochs": 51, "samples_per_epoch": 160}
#: Image changes of the shift sweep, per modality: (name, kind, amount).
SHIFTS: dict[str, list[tuple[str, str, float]]] = {
    "fluorescence": [
        ("x1", "identity", 1.0), ("x0.33", "scale", 1 / 3), ("x0.5", "scale", 0.5),
        ("x2", "scale", 2.0), ("x3", "scale", 3.0), ("gamma 0.5", "gamma", 0.5),
        ("gamma 2", "gamma", 2.0), ("dim x0.1", "dim", 0.1), ("noise 5 %", "noise", 0.05),
        ("blur 1 px", "blur", 1.0),
    ],
    "histopathology": [
        ("x1", "identity", 1.0), ("x0.5", "scale", 0.5), ("x1.5", "scale", 1.5),
        ("x2", "scale", 2.0), ("gamma 0.5", "gamma", 0.5), ("gamma 2", "gamma", 2.0),
        ("noise 5 %", "noise", 0.05), ("blur 1 px", "blur", 1.0),
    ],
}  # fmt: skip
SHOWN = ("iou", "ap", "f1", "aji")


def presets(modality: str = "fluorescence", method: str = "s2l") -> dict[str, tuple[str, object]]:
    """Prediction settings scored for a network of a modality trained by a method
    (``s2l``, ``pce`` or ``full``): name -> (probability, preset). The clean-up of all
    but ``plain`` and ``auto_tta_raw`` is that of ``Preset.for_training(method,
    modality)``, the preset ``s2l train`` stores with such a network, so that
    ``default`` is what ``s2l predict`` does with it.

    The probability is one of ``scale1`` (plain, scale 1), ``scale1_tta``, ``up`` (the
    earlier ``scale="auto"``, which only magnified, towards 40 pixels), ``auto``
    (:func:`s2l_core.predict.predict_probability` at ``scale="auto"``) and ``auto_tta``.
    """
    from dataclasses import replace

    from s2l_core.evaluate import PLAIN as raw
    from s2l_core.predict import Preset

    # Threshold, split depth, min_size, min_peak, smooth of the network's preset.
    post = Preset.for_training(method, modality)
    return {
        "plain": ("scale1", raw),
        "post": ("scale1", post),
        "tta": ("scale1_tta", post),
        "up": ("up", post),
        "auto": ("auto", post),
        "default": ("auto_tta", post),
        "auto_tta_raw": ("auto_tta", raw),
        "auto_tta_t0.5": ("auto_tta", replace(post, threshold=0.5, split_depth=2.0)),
    }


def acquisition_group(height: int, width: int) -> str:
    """The acquisition group of a fluorescence image of this shape."""
    return GROUPS.get(f"{height}x{width}", "other")


#: Images whose masks cover less than this fraction of their bright pixels (above Otsu's
#: threshold) are not scored: their masks miss most of their nuclei. In BBBC038
#: ``stage1_train`` one fluorescence image (260x347, ``7b38c9173e…``) carries a single
#: mask of 26 pixels among about a hundred visible nuclei; a perfect segmentation scores
#: IoU 0 on it. The next image by this measure has 12 % of its bright pixels labelled.
MIN_LABEL_COVERAGE = 0.05


def label_coverage(image: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of an image's bright pixels (grey level above Otsu's threshold) that lie
    inside a mask; 1 for an image without bright pixels."""
    from skimage.filters import threshold_otsu

    grey = image[..., :3].mean(axis=-1) if image.ndim == 3 else image.astype(float)
    if grey.min() == grey.max():
        return 1.0
    bright = grey > threshold_otsu(grey)
    return float((bright & (labels > 0)).sum() / max(1, bright.sum()))


_UNSCORED: dict[tuple[str, str], frozenset] = {}


def unscored(dataset, modality: str) -> frozenset:
    """Ids of the fluorescence images whose labels fall under :data:`MIN_LABEL_COVERAGE`
    (computed once per dataset folder); none of other modalities, whose nuclei are not
    the bright pixels."""
    key = (str(getattr(dataset, "root", id(dataset))), modality)
    if modality != "fluorescence":
        return frozenset()
    if key not in _UNSCORED:
        table = dataset.manifest[dataset.manifest["modality"] == modality]
        _UNSCORED[key] = frozenset(
            i for i in table.image_id
            if label_coverage(dataset.image(i), dataset.labels(i)) < MIN_LABEL_COVERAGE
        )  # fmt: skip
    return _UNSCORED[key]


def folds(dataset, modality: str) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """``fold -> (train ids, validation ids, scored ids)`` of one modality; the scored ids
    leave out the images whose masks miss most of their nuclei (:func:`unscored`), which
    training still sees (with the scribbles drawn from their masks)."""
    table = dataset.manifest[dataset.manifest["modality"] == modality]
    skip = unscored(dataset, modality)
    table = table.assign(
        group=[acquisition_group(h, w) for h, w in zip(table.height, table.width, strict=True)]
    )
    out = {
        IN_DISTRIBUTION: (
            list(table.image_id[table.split == "train"]),
            list(table.image_id[table.split == "val"]),
            [i for i in table.image_id[table.split == "test"] if i not in skip],
        )
    }
    if modality == "fluorescence":
        for group in sorted(set(table.group)):
            inside = table.group == group
            out[group] = (
                list(table.image_id[~inside & (table.split == "train")]),
                list(table.image_id[~inside & (table.split == "val")]),
                [i for i in table.image_id[inside] if i not in skip],
            )
    return out


def _resampling(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of bilinear resampling along one axis, pixel centres
    aligned (``align_corners=False``), the kernel widened to the output's pixel when
    shrinking (antialiased), as the images are resampled."""
    factor = n_out / n_in
    support = max(1.0, 1.0 / factor)  # the triangle's half-width, in input pixels
    centres = (np.arange(n_out) + 0.5) / factor - 0.5
    weights = np.clip(1.0 - np.abs(np.arange(n_in)[None] - centres[:, None]) / support, 0, None)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample a label image as its image is resampled: every output pixel takes the
    label (0 included) that covers most of it under the image's bilinear filter.

    Picking one input pixel per output pixel instead (nearest neighbour) shifts labels
    shrunk to a third by a third of an output pixel against the image's centres.
    """
    from scipy import ndimage as ndi

    rows, cols = _resampling(labels.shape[0], size[0]), _resampling(labels.shape[1], size[1])
    best = rows @ (labels == 0).astype(np.float64) @ cols.T
    out = np.zeros(size, labels.dtype)
    for value, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        r, c = rows[:, box[0]], cols[:, box[1]]
        r_out, c_out = np.flatnonzero(r.any(axis=1)), np.flatnonzero(c.any(axis=1))
        window = slice(r_out[0], r_out[-1] + 1), slice(c_out[0], c_out[-1] + 1)
        mine = (labels[box] == value).astype(np.float64)
        cover = r[window[0]] @ mine @ c[window[1]].T
        more = cover > best[window]
        best[window] = np.where(more, cover, best[window])
        out[window] = np.where(more, value, out[window])
    return out


def shift_image(image: np.ndarray, labels: np.ndarray, kind: str, amount: float, seed: int):
    """Apply one shift to a raw ``(H, W, C)`` 8-bit image and its labels (rescaled by
    :func:`resize_labels`)."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage as ndi

    if image.ndim == 2:
        image = image[..., None]
    x = image.astype(np.float32)
    if kind == "identity":
        return image, labels
    if kind == "scale":
        h, w = labels.shape
        size = (max(1, round(h * amount)), max(1, round(w * amount)))
        t = torch.from_numpy(x.transpose(2, 0, 1).copy())[None]
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=amount < 1)
        out = t[0].numpy().transpose(1, 2, 0)
        return np.clip(np.round(out), 0, 255).astype(np.uint8), resize_labels(labels, size)
    if kind == "gamma":
        top = max(float(x.max()), 1.0)
        out = top * (x / top) ** amount
    elif kind == "dim":
        out = np.floor(x * amount)
    elif kind == "noise":
        rng = np.random.default_rng(seed)
        level = float(np.percentile(x, 99.8)) or 1.0
        out = x + rng.normal(0, amount * level, size=x.shape[:2])[..., None]
    elif kind == "blur":
        out = ndi.gaussian_filter(x, (amount, amount, 0))
    else:
        raise ValueError(f"unknown shift {kind!r}")
    return np.clip(np.round(out), 0, 255).astype(np.uint8), labels


def probabilities(model, image: np.ndarray, device, needed) -> tuple[dict, dict]:
    """The probabilities named in ``needed`` (see :func:`presets`), and the scales used."""
    from functools import partial

    from s2l_core.infer import predict_dihedral, predict_foreground, predict_tiled
    from s2l_core.predict import auto_scale, predict_probability

    p1 = predict_foreground(model, image, device=device)
    one_pass = partial(predict_tiled, model, device=device)
    probs, scales = {"scale1": p1}, {}
    if "scale1_tta" in needed:
        probs["scale1_tta"] = predict_dihedral(one_pass, image, identity=p1)
    if "up" in needed:
        up = scales["up"] = auto_scale(p1, diameter=40.0, min_scale=1.0, magnify_below=40.0)
        probs["up"] = p1 if up == 1 else predict_foreground(model, image, device=device, scale=up)
    if "auto" in needed or "auto_tta" in needed:
        probs["auto"], auto = predict_probability(model, image, scale="auto", device=device)
        scales["auto"] = auto
        if "auto_tta" in needed:
            probs["auto_tta"] = (
                predict_dihedral(one_pass, image, identity=p1)
                if auto == 1.0
                else predict_foreground(model, image, device=device, scale=auto, tta=True)
            )
    return probs, scales


def score_network(model, images, device, named=None) -> list[dict]:
    """Per-image rows: every preset of :func:`presets` on every ``(id, image, truth)``."""
    from s2l_core.augment import normalize_image
    from s2l_core.evaluate import SCORES
    from s2l_core.metrics import evaluate_image
    from s2l_core.predict import labels_of

    named = named or presets()
    needed = {which for which, _ in named.values()}
    rows = []
    for image_id, raw, truth in images:
        probs, scales = probabilities(model, normalize_image(raw), device, needed)
        for name, (which, preset) in named.items():
            scale = scales.get(which.removesuffix("_tta"), 1.0)
            scores = evaluate_image(labels_of(probs[which], preset, scale=scale), truth)
            rows.append(
                {"image_id": image_id, "size": f"{truth.shape[0]}x{truth.shape[1]}",
                 "preset": name, "scale": scale}
                | {k: float(scores[k]) for k in SCORES}
            )  # fmt: skip
    return rows


def job_name(job: dict) -> str:
    return f"{job['variant']['name']}__{job['modality']}__{job['fold']}__s{job['seed']}"


def open_data(args_or_job):
    """The prepared dataset and its scribbles (``--dataset`` or the cache)."""
    from s2l_core import data, scribbles

    root = args_or_job["dataset"]
    if root:
        dataset = data.PreparedDataset(root)
        return dataset, scribbles.ScribbleSet(dataset, 0)
    dataset = data.prepare_dataset(args_or_job["source"], None, progress=False)
    return dataset, scribbles.prepare_scribbles(dataset, [args_or_job["ratio"]], progress=False)


def train_resumably(train, val, config, state: Path, device: str):
    """A :class:`~s2l_core.train.Trainer` trained to ``config.epochs``, its training state
    saved to ``state`` after every epoch; a state left there by an interrupted run is
    resumed (bit for bit as one run), and must hold this configuration."""
    from s2l_core.train import Trainer

    if state.is_file():
        trainer = Trainer.resume(state, train, val=val, device=device, verbose=False)
        if trainer.config.to_dict() != config.to_dict():
            raise SystemExit(
                f"{state} is the training state of another configuration than this job's; "
                "move it away to train this job anew"
            )
    else:
        trainer = Trainer(train, config, val=val, device=device, verbose=False)
    trainer.fit(checkpoint=state, progress=False)
    return trainer


def run_job(job: dict) -> str:
    """Train one network and score it (in a worker process); writes ``<work>/jobs``."""
    import pandas as pd
    import torch

    torch.set_num_threads(job["threads"])
    from bench_variants import make_config

    from s2l_core.files import atomic_path, write_json
    from s2l_core.predict import load_model
    from s2l_core.samples import load_samples

    name = job_name(job)
    out = Path(job["work"]) / "jobs"
    if (out / f"{name}.json").is_file():
        return f"{name}: done before"
    dataset, scribble_set = open_data(job)
    train_ids, val_ids, score_ids = folds(dataset, job["modality"])[job["fold"]]
    full = job["variant"]["method"] == "full"
    ratio = job["ratio"]
    train = load_samples(dataset, train_ids, scribble_set, ratio, full_masks=full)
    val = load_samples(dataset, val_ids, scribble_set, ratio)
    variant = dict(job["variant"])
    if job["modality"] == "histopathology":
        variant["overrides"] = {**HISTOPATHOLOGY, **variant["overrides"]}
    if job.get("cpu_bf16"):  # acts only where the training runs on such a CPU
        variant["overrides"] = {**variant["overrides"], "cpu_bf16": True}
    config = make_config(variant, job["seed"])
    ckpt = Path(job["work"]) / "ckpt" / f"{name}.pt"
    minutes = None
    if not ckpt.is_file():  # a network trained earlier is scored, not trained again
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        state = ckpt.with_name(f"{name}.state.pt")
        trainer = train_resumably(train, val, config, state, job["device"])
        minutes = round(float(trainer.history_frame()["epoch_seconds"].sum()) / 60, 2)
        extra = {"benchmark": "generalization", "job": name, "train_minutes": minutes}
        trainer.export(ckpt, precision="int8", extra=extra)
        state.unlink()  # the network is kept; its training state is no longer needed
    model, state = load_model(ckpt, job["device"])  # the weights as stored
    minutes = minutes if minutes is not None else state["extra"].get("train_minutes")
    device = next(model.parameters()).device

    def images(ids):
        for i in ids:
            yield i, dataset.image(i), dataset.labels(i)

    every = presets(job["modality"], job["variant"]["method"])
    named = {k: v for k, v in every.items() if not job["presets"] or k in job["presets"]}
    rows = [r | {"shift": "none"} for r in score_network(model, images(score_ids), device, named)]
    if job["fold"] == IN_DISTRIBUTION and job.get("shifts", True):
        named = {k: v for k, v in every.items() if k in ("plain", "default")}
        for shift, kind, amount in SHIFTS[job["modality"]]:
            shifted = (
                (i, *shift_image(img, lab, kind, amount, seed=k))
                for k, (i, img, lab) in enumerate(images(score_ids))
            )
            rows += [r | {"shift": shift} for r in score_network(model, shifted, device, named)]
    table = pd.DataFrame(rows)
    for key in ("variant", "modality", "fold", "seed"):
        table[key] = job["variant"]["name"] if key == "variant" else job[key]
    table["method"] = job["variant"]["method"]
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_json(
        out / f"{name}.json",
        {"job": name, "config": config.to_dict(), "train_minutes": minutes,
         "device": str(device), "n_train": len(train), "n_scored": len(score_ids)},
    )  # fmt: skip
    trained = "trained earlier" if minutes is None else f"trained in {minutes} min"
    return f"{name}: {trained}, scored"


def run_rf(args) -> None:
    """The random forest on the same scribbles, every fold (CPU)."""
    import pandas as pd

    from s2l_core.augment import normalize_image
    from s2l_core.baselines import RandomForestSegmenter
    from s2l_core.evaluate import PLAIN, SCORES
    from s2l_core.files import atomic_path, write_json
    from s2l_core.metrics import evaluate_image
    from s2l_core.predict import labels_of

    data_args = {"dataset": args.dataset, "source": args.source, "ratio": args.ratio}
    dataset, scribble_set = open_data(data_args)
    out = Path(args.work) / "jobs"
    out.mkdir(parents=True, exist_ok=True)
    for modality in args.modalities:
        for fold, (train_ids, _, score_ids) in folds(dataset, modality).items():
            name = f"rf__{modality}__{fold}__s0"
            if (out / f"{name}.json").is_file():
                continue
            start = time.perf_counter()
            rf = RandomForestSegmenter(seed=0)
            rf.fit(
                [normalize_image(dataset.image(i)) for i in train_ids],
                [scribble_set.scribble(i, args.ratio) for i in train_ids],
            )
            rows = []
            for i in score_ids:
                truth = dataset.labels(i)
                prob = rf.predict_proba(normalize_image(dataset.image(i)))
                scores = evaluate_image(labels_of(prob, PLAIN), truth)
                rows.append(
                    {"image_id": i, "size": f"{truth.shape[0]}x{truth.shape[1]}",
                     "preset": "plain", "scale": 1.0, "shift": "none"}
                    | {k: float(scores[k]) for k in SCORES}
                )  # fmt: skip
            table = pd.DataFrame(rows).assign(
                variant="rf", modality=modality, fold=fold, seed=0, method="rf"
            )
            with atomic_path(out / f"{name}.csv") as tmp:
                table.to_csv(tmp, index=False)
            minutes = (time.perf_counter() - start) / 60
            write_json(out / f"{name}.json", {"job": name, "minutes": round(minutes, 2)})
            print(f"{name}: IoU {table.iou.mean():.3f} AP {table.ap.mean():.3f}", flush=True)


def run(args) -> None:
    from bench_variants import load_variants, make_config

    variants = load_variants(args.variants)
    for v in variants:
        make_config(v, 0)  # fail early on a bad override
    data_args = {"dataset": args.dataset, "source": args.source, "ratio": args.ratio}
    dataset, _ = open_data(data_args)  # prepared once, before the workers read it
    jobs = []
    # In the file's order, each variant at its own seeds (default --seeds): list the
    # runs that matter most first, so that a run stopped early has them.
    for v in variants:
        if args.only and v["name"] not in args.only:
            continue
        seeds = v.get("seeds", [0, 1])
        for seed in seeds if args.seeds is None else [s for s in seeds if s in args.seeds]:
            for modality in v.get("modalities", args.modalities):
                for fold in folds(dataset, modality):
                    if args.folds and fold not in args.folds:
                        continue
                    jobs.append(
                        data_args
                        | {"variant": v, "modality": modality, "fold": fold, "seed": seed,
                           "device": args.device, "threads": args.threads, "work": args.work,
                           "shifts": not args.no_shifts, "presets": args.presets,
                           "cpu_bf16": args.cpu_bf16}
                    )  # fmt: skip
    # Stable: the file's order within a rank, each rank's first seed before its second.
    jobs.sort(key=lambda j: (j["variant"].get("rank", 0), j["seed"]))
    print(f"{len(jobs)} jobs", flush=True)
    if args.parallel > 1:
        with mp.get_context("spawn").Pool(args.parallel) as pool:
            for message in pool.imap_unordered(run_job, jobs):
                print(message, flush=True)
    else:
        for job in jobs:
            print(run_job(job), flush=True)


def gather(work: Path):
    """Every job's per-image rows, one table."""
    import pandas as pd

    tables = [
        pd.read_csv(p, dtype={"image_id": str}) for p in sorted((work / "jobs").glob("*.csv"))
    ]
    if not tables:
        raise SystemExit(f"no finished job in {work / 'jobs'}")
    return pd.concat(tables, ignore_index=True)


def summarize(rows):
    """Mean scores per (variant, method, modality, preset, seed, fold) of the unshifted
    images."""
    plain = rows[rows["shift"] == "none"]
    keys = ["variant", "method", "modality", "preset", "seed", "fold"]
    return plain.groupby(keys)[list(SHOWN)].mean().reset_index()


def method_figures(per_fold, variant: str, modality: str, preset: str = "default") -> dict:
    """One method's figures in the benchmark, as a reference checkpoint's metrics hold them.

    Parameters
    ----------
    per_fold : pandas.DataFrame
        :func:`summarize`'s table (or the ``per_fold`` records of the report's JSON).
    variant, modality, preset : str
        The rows to take.

    Returns
    -------
    dict
        ``seeds``; ``test_split`` (the in-distribution fold) and, where the modality has
        acquisition groups, ``held_out_mean`` (the mean over groups, then over seeds),
        ``held_out_mean_per_seed`` and ``groups`` (each group's mean over seeds): IoU and
        AP, rounded to 4 places.

    Raises
    ------
    ValueError
        When the table holds no row of that variant, modality and preset, or a seed lacks
        a group that another seed has.
    """
    rows = per_fold[
        (per_fold["variant"] == variant)
        & (per_fold["modality"] == modality)
        & (per_fold["preset"] == preset)
    ]
    if rows.empty:
        raise ValueError(f"no rows of variant {variant!r}, {modality}, preset {preset!r}")
    scores = ["iou", "ap"]
    by_fold = rows.pivot_table(index="seed", columns="fold", values=scores)
    if by_fold.isna().any().any():
        raise ValueError(f"{variant} {modality} {preset}: not every seed has every fold")

    out = {"variant": variant, "preset": preset, "seeds": [int(s) for s in by_fold.index]}
    if IN_DISTRIBUTION in set(rows["fold"]):
        out["test_split"] = {m: round(float(by_fold[m][IN_DISTRIBUTION].mean()), 4) for m in scores}
    groups = sorted(set(rows["fold"]) - {IN_DISTRIBUTION})
    if groups:
        per_seed = {m: by_fold[m][groups].mean(axis=1) for m in scores}
        out["held_out_mean"] = {m: round(float(per_seed[m].mean()), 4) for m in scores}
        out["held_out_mean_per_seed"] = {
            str(seed): {m: round(float(per_seed[m][seed]), 4) for m in scores}
            for seed in by_fold.index
        }
        out["groups"] = {
            g: {m: round(float(by_fold[m][g].mean()), 4) for m in scores} for g in groups
        }
    return out


#: What the presets of the report are (:func:`presets`).
PRESET_NOTES = {
    "plain": "scale 1, no averaging, threshold 0.5, split depth 2, objects of 16 pixels or more",
    "post": "scale 1, no averaging, the preset's threshold and clean-up",
    "tta": "scale 1, averaged over the eight turns and mirror images (TTA)",
    "up": "the earlier automatic scale (magnifies only), the preset's threshold",
    "auto": "the automatic scale, no averaging, the preset's threshold and clean-up",
    "default": "what `s2l predict` does: the preset of the network's method and modality "
    "(`Preset.for_training`)",
    "auto_tta_raw": "the automatic scale and TTA, thresholded plainly",
    "auto_tta_t0.5": "the preset with threshold 0.5 and split depth 2",
}


def to_markdown(rows, command: str, title: str = "Generalization benchmark") -> str:
    per_fold = summarize(rows)
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    shown = [p for p in PRESET_NOTES if p in set(per_fold["preset"])]
    lines += ["Presets: " + "; ".join(f"`{p}`: {PRESET_NOTES[p]}" for p in shown) + ".", ""]
    key = ["variant", "method", "modality", "preset"]
    table = per_fold.pivot_table(index=[*key, "seed"], columns="fold", values="iou")
    ap = per_fold.pivot_table(index=[*key, "seed"], columns="fold", values="ap")
    groups = [c for c in table.columns if c != IN_DISTRIBUTION]
    if groups:  # over every group, or none: a seed that lacks a group has no mean
        table["held-out mean"] = table[groups].mean(axis=1, skipna=False)
        table["held-out min"] = table[groups].min(axis=1, skipna=False)
        ap["held-out mean"] = ap[groups].mean(axis=1, skipna=False)
    cols = [c for c in [IN_DISTRIBUTION, "held-out mean", "held-out min", *groups] if c in table]
    over_seeds = table.groupby(level=key).agg(["mean", "min", "max", "count"])
    ap_seeds = ap.groupby(level=key).mean()
    lines += [
        "Foreground IoU (AP in brackets), mean over seeds; ± half the range between seeds.",
        "Held-out columns: the network never saw an image of that acquisition group.",
        "",
        "| variant | method | modality | preset | seeds | " + " | ".join(cols) + " |",
        "| --- | --- | --- | --- | --- |" + " --- |" * len(cols),
    ]
    for idx, row in over_seeds.iterrows():
        cells = []
        n = int(max(row[(c, "count")] for c in cols)) if cols else 0
        for c in cols:
            m, lo, hi = row[(c, "mean")], row[(c, "min")], row[(c, "max")]
            if np.isnan(m):
                cells.append("")
                continue
            count = int(row[(c, "count")])
            spread = f" ± {(hi - lo) / 2:.3f}" if count > 1 else ""
            fewer = f" [{count} seed]" if count < n else ""
            a = ap_seeds.loc[idx, c] if c in ap_seeds else np.nan
            text = f"{m:.3f}{spread} ({a:.3f})" if np.isfinite(a) else f"{m:.3f}{spread}"
            cells.append(text + fewer)
        lines.append("| " + " | ".join(map(str, idx)) + f" | {n} | " + " | ".join(cells) + " |")
    shifted = rows[(rows["shift"] != "none")]
    if len(shifted):
        lines += ["", "## Shift sweep (in-distribution networks, test split)", ""]
        sw = shifted.groupby(["variant", "modality", "preset", "shift", "seed"])[["iou", "ap"]]
        sw = sw.mean().groupby(level=[0, 1, 2, 3]).mean().reset_index()
        for (variant, modality), part in sw.groupby(["variant", "modality"]):
            order = [s for s, _, _ in SHIFTS[modality] if s in set(part["shift"])]
            lines += [
                f"### {variant}, {modality}",
                "",
                "| preset | " + " | ".join(order) + " |",
                "| --- |" + " --- |" * len(order),
            ]
            for preset, p in part.groupby("preset"):
                p = p.set_index("shift")
                cells = [f"{p.loc[s, 'iou']:.3f} ({p.loc[s, 'ap']:.3f})" for s in order]
                lines.append(f"| {preset} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


REFERENCE = HERE.parent / "book" / "reference"


def reference_shifts() -> dict[str, dict[str, dict]]:
    """``modality -> shift -> mean scores`` of the reference checkpoints
    (``tools/make_reference.py`` scores each on its test split under :data:`SHIFTS`)."""
    out = {}
    for path in sorted(REFERENCE.glob("s2l_*_r030.json")):
        info = json.loads(path.read_text())
        if info.get("shifts"):
            out[path.stem.split("_")[1]] = info["shifts"]
    return out


def shifts_markdown(shifts: dict[str, dict[str, dict]]) -> str:
    """The shift sweep of the reference checkpoints as Markdown tables."""
    lines = [
        "## Shift sweep: the reference checkpoints on changed test images",
        "",
        "Each reference network (`book/reference/`, default preset) on its modality's test",
        "split with every image changed as named (labels rescaled with the image).",
        "",
    ]
    for modality, table in shifts.items():
        order = [s for s, _, _ in SHIFTS[modality] if s in table]
        lines += [
            f"### {modality}",
            "",
            "| | " + " | ".join(order) + " |",
            "| --- |" + " --- |" * len(order),
            "| IoU | " + " | ".join(f"{table[s]['iou']:.3f}" for s in order) + " |",
            "| AP | " + " | ".join(f"{table[s]['ap']:.3f}" for s in order) + " |",
            "",
        ]
    return "\n".join(lines)


def plot_shifts(shifts: dict[str, dict[str, dict]], path: Path) -> None:
    """IoU and AP against the shift, one line per modality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for modality, table in shifts.items():
        order = [s for s, _, _ in SHIFTS[modality] if s in table]
        for ax, metric in zip(axes, ("iou", "ap"), strict=True):
            ax.plot(order, [table[s][metric] for s in order], marker="o", label=modality)
    for ax, metric in zip(axes, ("foreground IoU", "average precision (DSB)"), strict=True):
        ax.set_ylabel(metric)
        ax.set_xlabel("change made to every test image")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Reference checkpoints, default preset: test split under shifts")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args) -> None:
    from s2l_core.files import atomic_path, write_json, write_text

    work = Path(args.work)
    rows = gather(work)
    if args.presets:
        rows = rows[rows.preset.isin(args.presets)]
    # Jobs scored before an image was found to lack most of its masks still list it.
    dataset, _ = open_data({"dataset": args.dataset, "source": args.source, "ratio": 0.3})
    skip = set().union(*(unscored(dataset, m) for m in set(rows["modality"])))
    dropped = rows[rows["image_id"].isin(skip)]
    rows = rows[~rows["image_id"].isin(skip)]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    shifts = reference_shifts() if args.shifts else {}
    markdown = to_markdown(rows, command, args.title)
    if len(dropped):
        ids = ", ".join(f"`{i[:10]}…`" for i in sorted(set(dropped["image_id"])))
        markdown += (
            f"\nNot scored: {ids}: masks that cover under {MIN_LABEL_COVERAGE:.0%} of the "
            "image's bright pixels (above Otsu's threshold) miss most of its nuclei. "
            "Jobs scored before this rule scored it: IoU "
            + ", ".join(
                f"{v} {p} {i:.3f}"
                for (v, p), i in dropped.groupby(["variant", "preset"])["iou"].mean().items()
            )
            + ".\n"
        )
    if shifts:
        markdown += "\n" + shifts_markdown(shifts)
    write_text(out / f"{args.name}.md", markdown)
    with atomic_path(out / f"{args.name}_per_image.csv.gz") as tmp:
        rows.to_csv(tmp, index=False, float_format="%.4f", compression="gzip")
    per_fold = summarize(rows)
    jobs = [json.loads(p.read_text()) for p in sorted((work / "jobs").glob("*.json"))]
    write_json(
        out / f"{args.name}.json",
        {"command": command, "per_fold": per_fold.round(4).to_dict("records"), "jobs": jobs,
         "machine": {"platform": platform.platform(), "python": platform.python_version(),
                     "cpus": os.cpu_count()}},
    )  # fmt: skip
    if shifts and args.shifts:
        plot_shifts(shifts, out / "shifts.png")
    print(markdown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("run", "rf", "report"):
        p = sub.add_parser(name)
        p.add_argument("--work", default="runs/generalization", help="jobs' results and weights")
        p.add_argument("--dataset", help="a prepared dataset folder (default: the cache)")
        p.add_argument("--source", default=str(DEFAULT_MIRROR))
        p.add_argument("--ratio", type=float, default=0.3)
        p.add_argument("--modalities", nargs="+", default=["fluorescence"])
    run_p = sub.choices["run"]
    run_p.add_argument("variants", type=Path, help="JSON list of variants (bench_variants.py)")
    run_p.add_argument(
        "--seeds", type=int, nargs="+",
        help="only these seeds (default: each variant's own, else 0 and 1)",
    )  # fmt: skip
    run_p.add_argument("--only", nargs="+", help="only the variants of these names")
    run_p.add_argument("--folds", nargs="+", help="only these folds")
    run_p.add_argument("--device", default="auto")
    run_p.add_argument("--parallel", type=int, default=1)
    run_p.add_argument("--threads", type=int, default=2)
    run_p.add_argument("--presets", nargs="+", help="score only these presets")
    run_p.add_argument("--no-shifts", action="store_true", help="skip the shift sweep")
    run_p.add_argument(
        "--cpu-bf16", action="store_true",
        help="train in bfloat16 on a CPU that computes it natively (no effect on a GPU)",
    )  # fmt: skip
    rep = sub.choices["report"]
    rep.add_argument("--output", default=str(RESULTS))
    rep.add_argument("--name", default="generalization", help="stem of the files written")
    rep.add_argument("--presets", nargs="+", help="report only these presets")
    rep.add_argument("--title", default="Generalization benchmark", help="the page's title")
    rep.add_argument(
        "--no-shifts", dest="shifts", action="store_false",
        help="leave out the reference checkpoints' shift sweep",
    )  # fmt: skip
    every = sub.add_parser(
        "all",
        help="the whole benchmark on this machine: the Scribble2Label variant of "
        "VARIANTS at seed 0 (bfloat16 where the CPU computes it), the random forest, "
        "the report",
    )
    every.add_argument("variants", type=Path, nargs="?", default=VARIANTS)
    every.add_argument("--work", default="runs/generalization")
    every.add_argument("--dataset")
    every.add_argument("--source", default=str(DEFAULT_MIRROR))
    every.add_argument("--ratio", type=float, default=0.3)
    every.add_argument("--device", default="auto")
    every.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.step == "all":
        common = ["--work", args.work, "--source", args.source, "--ratio", str(args.ratio)]
        common += ["--dataset", args.dataset] if args.dataset else []
        main(["run", str(args.variants), "--only", "s2l", "--seeds", "0", "--device",
              args.device, "--cpu-bf16", "--presets", "plain", "up", "auto", "default",
              "--no-shifts", *common])  # fmt: skip
        main(["rf", *common])
        main(["report", "--output", args.output, "--presets", "plain", "up", "auto",
              "default", *common])  # fmt: skip
        return
    {"run": run, "rf": run_rf, "report": report}[args.step](args)


if __name__ == "__main__":
    main()
