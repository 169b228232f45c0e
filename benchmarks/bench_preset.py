"""Benchmark: which foreground threshold and split depth should the preset hold?

Each network of the generalization benchmark (``bench_generalization.py``,
``<work>/ckpt``, both seeds) predicts 24 images (drawn with seed 0; ``--per-fold`` sets
another number, or every image) of the acquisition group it never saw: as they are,
shrunk to a half and a third (nuclei far smaller than in training; labels resampled with
the image, ``bench_generalization.resize_labels``) (:data:`DEFAULT_SHIFTS`; ``--shifts``
adds a gamma of 2 and of 0.5). Each in-distribution network predicts as many test
images the same way, and each histopathology network its validation split (no groups:
the split it is chosen on). The probability is the preset's (``scale="auto"``,
test-time augmentation) and is kept in ``<work>/preset/``; the labels are then found at
every threshold and split depth of :data:`THRESHOLDS` x :data:`SPLIT_DEPTHS` (the
preset's other settings as they are) and scored, without predicting again.

Usage (after ``bench_generalization.py run``, whose weights it reads)::

    python benchmarks/bench_preset.py --work runs/generalization

A later run reuses every probability and score already in ``--work``: a network is
needed only for the images whose scores are not all kept.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: Thresholds and split depths (the network's pixels) scored.
THRESHOLDS = (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)
SPLIT_DEPTHS = (0.5, 1.0, 2.0)

#: Changes of the fluorescence images that can be scored: name -> (kind, amount) of
#: ``bench_generalization.shift_image``, and the file names' tag.
SHIFTS = {
    "x1": ("identity", 1.0, "x1.0"),
    "x0.5": ("scale", 0.5, "x0.5"),
    "x0.33": ("scale", 0.33, "x0.33"),
    "gamma 2": ("gamma", 2.0, "g2.0"),
    "gamma 0.5": ("gamma", 0.5, "g0.5"),
}

#: The changes scored unless ``--shifts`` names others.
DEFAULT_SHIFTS = ("x1", "x0.5", "x0.33")

#: Images drawn per fold (fluorescence).
PER_FOLD = 24


def cases(
    dataset, work: Path, seeds, scored=frozenset(), shifts=DEFAULT_SHIFTS, per_fold=PER_FOLD
) -> list[tuple[str, int, str, str, Path]]:
    """``(fold, seed, shift, image id, weights)`` of every image to score, with each
    change of ``shifts`` (fluorescence: ``per_fold`` images of each fold, drawn with seed
    0, or every image where ``per_fold`` is 0; histopathology: as it is).

    A case whose network is not in ``<work>/ckpt`` is kept when its probability is (in
    ``<work>/preset``) or when its file name is in ``scored`` (its scores are kept);
    the others are left out, and counted in a message.
    """
    from bench_generalization import IN_DISTRIBUTION, folds

    out, missing = [], 0

    def add(fold, seed, shift, image_id, weights):
        nonlocal missing
        name = kept_name(fold, seed, shift, image_id)
        if weights.is_file() or (work / "preset" / name).is_file() or name in scored:
            out.append((fold, seed, shift, image_id, weights))
        else:
            missing += 1

    for seed in seeds:
        for fold, (_, _, ids) in folds(dataset, "fluorescence").items():
            weights = work / "ckpt" / f"s2l__fluorescence__{fold}__s{seed}.pt"
            drawn = ids
            if 0 < per_fold < len(ids):
                drawn = np.random.default_rng(0).choice(ids, per_fold, replace=False)
            for shift in shifts:
                for image_id in sorted(drawn):
                    add(fold, seed, shift, image_id, weights)
        weights = work / "ckpt" / f"s2l__histopathology__{IN_DISTRIBUTION}__s{seed}.pt"
        for image_id in dataset.ids("histopathology", "val"):
            add("histopathology", seed, "x1", image_id, weights)
    if missing:
        print(f"{missing} images left out: no network, probability or scores", flush=True)
    return out


def kept_name(fold: str, seed: int, shift: str, image_id: str) -> str:
    return f"{fold}_s{seed}_{SHIFTS[shift][2]}_{image_id[:12]}.npz"


def predict_cases(dataset, todo, folder: Path) -> None:
    """Predict and keep the probability, the scale used and the true labels of every
    case not kept yet whose network is there (the others' scores are kept)."""
    from bench_generalization import shift_image

    from s2l_core.augment import normalize_image
    from s2l_core.files import atomic_path
    from s2l_core.predict import AUTO_DIAMETER, load_model, predict_probability

    folder.mkdir(parents=True, exist_ok=True)
    models = {}
    for fold, seed, shift, image_id, weights in todo:
        path = folder / kept_name(fold, seed, shift, image_id)
        if path.is_file() or not weights.is_file():
            continue
        if weights not in models:
            models = {weights: load_model(weights, "cpu")[0]}  # one network held at a time
        raw, truth = dataset.image(image_id), dataset.labels(image_id)
        raw, truth = shift_image(raw, truth, *SHIFTS[shift][:2], seed=0)
        prob, scale = predict_probability(
            models[weights], normalize_image(raw), scale="auto", tta=True, diameter=AUTO_DIAMETER
        )
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, prob=prob.astype(np.float16), scale=scale, truth=truth)


def score_cases(todo, folder: Path, kept: Path):
    """Per-image IoU and AP at every threshold and split depth (reusing ``kept``)."""
    import pandas as pd

    from s2l_core.files import atomic_path
    from s2l_core.metrics import evaluate_image
    from s2l_core.predict import Preset, labels_of

    def flush(done, rows: list[dict]):
        """``done`` with ``rows`` added and written to ``kept``, and no rows left."""
        if rows:
            part = pd.DataFrame(rows)
            done = part if done is None else pd.concat([done, part], ignore_index=True)
            with atomic_path(kept) as tmp:
                done.to_csv(tmp, index=False, float_format="%.4f")
        return done, []

    done = pd.read_csv(kept, dtype={"image_id": str}) if kept.is_file() else None
    have = set()
    if done is not None:
        have = set(zip(done.file, done.threshold, done.split_depth, strict=True))
    rows = []
    for n, (fold, seed, shift, image_id, _) in enumerate(todo):
        name = kept_name(fold, seed, shift, image_id)
        grid = [
            (t, d) for t in THRESHOLDS for d in SPLIT_DEPTHS if (name, t, d) not in have
        ]  # fmt: skip
        if not grid:
            continue
        if not (folder / name).is_file():
            raise SystemExit(f"{name}: scores incomplete in {kept}, and no probability kept")
        saved = np.load(folder / name)
        prob, scale = saved["prob"].astype(np.float32), float(saved["scale"])
        for t, d in grid:
            scores = evaluate_image(
                labels_of(prob, Preset(threshold=t, split_depth=d), scale=scale), saved["truth"]
            )
            rows.append(
                {"file": name, "fold": fold, "seed": seed, "shift": shift,
                 "image_id": image_id, "scale": scale, "threshold": t, "split_depth": d,
                 "iou": round(float(scores["iou"]), 4), "ap": round(float(scores["ap"]), 4)}
            )  # fmt: skip
        if n % 50 == 49:
            done, rows = flush(done, rows)
            print(f"{n + 1}/{len(todo)} images scored", flush=True)
    return flush(done, rows)[0]


def group_means(table):
    """Mean IoU and AP of each fold (group), seed, shift, threshold and split depth:
    the held-out mean averages these, so that every group weighs alike."""
    keys = ["fold", "seed", "shift", "threshold", "split_depth"]
    return table.groupby(keys)[["iou", "ap"]].mean().reset_index()


def to_markdown(table, command: str, per_fold: int = PER_FOLD) -> str:
    """The results page: held-out means, in-distribution, histopathology, per group."""
    from bench_generalization import IN_DISTRIBUTION

    from s2l_core.predict import SPLIT_DEPTH, THRESHOLD

    mean = group_means(table)
    held = mean[~mean.fold.isin([IN_DISTRIBUTION, "histopathology"])]

    def wide(part, by):
        out = part.groupby([*by, "threshold", "split_depth"])[["iou", "ap"]].mean()
        out = out.unstack(by)
        formats = {"shift": "{}", "seed": "seed {}", "fold": "{}"}

        def label(column: tuple) -> str:
            metric, *values = column
            words = [f.format(v) for f, v in zip([formats[b] for b in by], values, strict=True)]
            return " ".join([{"iou": "IoU", "ap": "AP"}[metric], *words])

        out.columns = [label(column) for column in out.columns]
        return out.round(3).reset_index().to_markdown(index=False)

    lines = [
        "# Preset: foreground threshold and split depth (s2l)",
        "",
        f"Command: `{command}`",
        "",
        (
            f"{per_fold} images a fold, drawn with seed 0 (every image of a smaller fold)"
            if per_fold
            else "Every image of each fold"
        )
        + ", each network's probability at "
        '`scale="auto"` with test-time augmentation; labels at every threshold and '
        "split depth (network's pixels), the preset's other settings as they are. "
        f"Changes: {', '.join(sorted(set(table['shift'])))} (x1: as they are; x0.5, x0.33: "
        "shrunk to a half and a third). Chosen: threshold "
        f"{THRESHOLD}, split depth {SPLIT_DEPTH} for fluorescence; histopathology keeps "
        "0.5 and 2 (`Preset.for_training`).",
        "",
    ]
    sections = [
        ("Held-out acquisition groups (mean of the groups), by change and seed", held,
         ["shift", "seed"]),
        ("In-distribution networks on the test split, by change (mean of the seeds)",
         mean[mean.fold == IN_DISTRIBUTION], ["shift"]),
        ("Histopathology networks on the validation split, by seed",
         mean[mean.fold == "histopathology"], ["seed"]),
        ("Each held-out group as it is (mean of the seeds)", held[held["shift"] == "x1"],
         ["fold"]),
    ]  # fmt: skip
    for title, part, by in sections:
        shown = wide(part, by) if len(part) else "None scored in this run."
        lines += [f"## {title}", "", shown, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/generalization"))
    parser.add_argument("--dataset", help="a prepared dataset folder (default: the cache)")
    parser.add_argument("--source")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--shifts", nargs="+", choices=list(SHIFTS), default=list(DEFAULT_SHIFTS),
        help="changes of the fluorescence images to score",
    )  # fmt: skip
    parser.add_argument(
        "--per-fold", type=int, default=PER_FOLD,
        help=f"fluorescence images drawn per fold (default {PER_FOLD}; 0: every image)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=HERE / "results" / "generalization")
    parser.add_argument(
        "--name", default="preset_s2l", help="stem of the files written (default preset_s2l)"
    )
    args = parser.parse_args(argv)
    if args.per_fold < 0:
        parser.error(f"--per-fold must be 0 (every image) or more, got {args.per_fold}")

    import pandas as pd
    from bench_generalization import open_data

    from s2l_core.files import atomic_path, write_text

    dataset, _ = open_data({"dataset": args.dataset, "source": args.source, "ratio": 0.3})
    kept = args.work / "preset_s2l.csv"
    scored = complete = frozenset()
    if kept.is_file():  # files scored, and those scored at every threshold and depth
        grid = pd.read_csv(kept, usecols=["file", "threshold", "split_depth"]).drop_duplicates()
        counts = grid.groupby("file").size()
        scored = frozenset(counts.index)
        complete = frozenset(counts[counts == len(THRESHOLDS) * len(SPLIT_DEPTHS)].index)
    todo = cases(dataset, args.work, args.seeds, scored, args.shifts, args.per_fold)
    if not todo:
        raise SystemExit("nothing to score: train the networks with bench_generalization.py")
    unscored = [case for case in todo if kept_name(*case[:4]) not in complete]
    predict_cases(dataset, unscored, args.work / "preset")
    table = score_cases(todo, args.work / "preset", kept)
    names = {kept_name(*case[:4]) for case in todo}
    table = table[table.file.isin(names)]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    text = to_markdown(table, command, args.per_fold)
    args.output.mkdir(parents=True, exist_ok=True)
    write_text(args.output / f"{args.name}.md", text)
    with atomic_path(args.output / f"{args.name}_per_image.csv.gz") as tmp:
        table.drop(columns="file").to_csv(tmp, index=False, float_format="%.4f")
    print(text)


if __name__ == "__main__":
    main()
