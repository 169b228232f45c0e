"""Benchmark: Scribble2Label against its baselines on the persisted test split.

Trains, under the same budget and through the same API, on one modality's training
split with scribbles at one ratio:

- ``s2l``  Scribble2Label (pCE + confident EMA pseudo-labels),
- ``pce``  the same network on scribbles only,
- ``full`` the same network on the full masks (full supervision),
- ``rf``   a random-forest pixel classifier on the same scribbles (ilastik style),

then predicts every test image whole, splits the foreground into nuclei (distance
watershed) and scores it: foreground IoU and Dice, DSB average precision over IoU
0.5…0.95, F1 at IoU 0.5, AJI, the original's object mDice and a corrected object Dice.
Every table is also given per image-size group. Figures go to
``benchmarks/results/quality/quality_<modality>_r<ratio>.json`` and ``.md``.

Usage::

    python benchmarks/bench_quality.py --modality fluorescence --ratio 0.3 --profile cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from s2l_core import data, scribbles
from s2l_core.baselines import RandomForestSegmenter
from s2l_core.config import TrainConfig
from s2l_core.evaluate import SCORES, score_images
from s2l_core.files import atomic_path, write_json, write_text
from s2l_core.samples import load_samples
from s2l_core.train import Trainer

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
METRICS = list(SCORES)


def evaluate(predict, test, method: str) -> pd.DataFrame:
    """Score ``predict(image) -> prob`` on every test sample; one row per image."""
    triples = ((s.image_id, s.image, s.labels) for s in test)
    return score_images(predict, triples).drop(columns="instances").assign(method=method)


def train_deep(name, train, val, config, runs: Path, seed: int) -> tuple[Trainer, float]:
    start = time.perf_counter()
    trainer = Trainer(train, config, val=val, device="auto")
    trainer.fit(checkpoint=runs / f"{name}.state.pt", progress=True)
    minutes = (time.perf_counter() - start) / 60
    trainer.export(runs / f"{name}.pt", extra={"benchmark": "quality", "method": name})
    trainer.history_frame().to_csv(runs / f"{name}.history.csv", index=False)
    return trainer, minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", default="fluorescence", choices=data.MODALITIES)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "full"])
    parser.add_argument("--epochs", type=int, help="override the profile's epochs")
    parser.add_argument(
        "--samples-per-epoch", type=int, help="crops per epoch (default: one per training image)"
    )
    parser.add_argument("--methods", nargs="+", default=["s2l", "pce", "full", "rf"])
    parser.add_argument("--source", default=str(DEFAULT_MIRROR))
    parser.add_argument("--cache-dir")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "bench")
    parser.add_argument("--max-test", type=int, help="score only the first N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--merge", action="store_true", help="keep the other methods' rows of earlier results"
    )
    parser.add_argument(
        "--s2l-checkpoint",
        help="evaluate this Scribble2Label checkpoint (e.g. the book's reference, trained "
        "with the same profile and split) instead of training s2l again",
    )
    args = parser.parse_args()

    dataset = data.prepare_dataset(args.source, args.cache_dir, progress=False)
    scribble_set = scribbles.prepare_scribbles(dataset, [args.ratio], progress=False)
    ids = {split: dataset.ids(args.modality, split) for split in data.SPLITS}
    if args.max_test:
        ids["test"] = ids["test"][: args.max_test]
    train = load_samples(dataset, ids["train"], scribble_set, args.ratio)
    val = load_samples(dataset, ids["val"], scribble_set, args.ratio)
    test = load_samples(dataset, ids["test"], scribble_set, args.ratio)
    overrides = {"seed": args.seed} | ({"epochs": args.epochs} if args.epochs else {})
    if args.samples_per_epoch:
        overrides["samples_per_epoch"] = args.samples_per_epoch
    config = TrainConfig.profile(args.profile, **overrides)
    runs = args.runs / f"{args.modality}_r{round(args.ratio * 100):03d}"
    runs.mkdir(parents=True, exist_ok=True)

    tables, minutes = [], {}
    for method in args.methods:
        print(f"=== {method}", flush=True)
        if method == "rf":
            start = time.perf_counter()
            rf = RandomForestSegmenter(seed=args.seed).fit(
                [s.image for s in train], [s.scribble for s in train]
            )
            minutes[method] = (time.perf_counter() - start) / 60
            tables.append(evaluate(lambda x, rf=rf: rf.predict_proba(x), test, method))
            continue
        if method == "full":
            samples = load_samples(dataset, ids["train"], full_masks=True)
            cfg = TrainConfig.profile(args.profile, use_pseudo=False, **overrides)
        elif method == "pce":
            samples, cfg = train, TrainConfig.profile(args.profile, use_pseudo=False, **overrides)
        elif method == "s2l" and args.s2l_checkpoint:
            from s2l_core.infer import predict_foreground
            from s2l_core.predict import load_model

            model, state = load_model(args.s2l_checkpoint)
            minutes[method] = state["extra"].get("train_minutes", float("nan"))
            device = next(model.parameters()).device
            predict = lambda x, m=model, d=device: predict_foreground(m, x, device=d)  # noqa: E731
            tables.append(evaluate(predict, test, method))
            continue
        elif method == "s2l":
            samples, cfg = train, config
        else:
            parser.error(f"unknown method {method!r}")
        trainer, minutes[method] = train_deep(method, samples, val, cfg, runs, args.seed)
        tables.append(evaluate(lambda x, t=trainer: t.predict(x), test, method))

    name = f"quality_{args.modality}_r{round(args.ratio * 100):03d}"
    out = HERE / "results" / "quality"
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    commands = {m: command for m in args.methods}
    if args.merge and (out / f"{name}.csv").is_file():
        earlier = pd.read_csv(out / f"{name}.csv", dtype={"image_id": str})
        kept = earlier[~earlier["method"].isin(args.methods)]
        tables.insert(0, kept)
        previous = json.loads((out / f"{name}.json").read_text())
        for method in set(kept["method"]):
            minutes[method] = previous["overall"][method]["train_minutes"]
            commands[method] = previous.get("commands", {}).get(method, previous["command"])
    per_image = pd.concat(tables, ignore_index=True)
    overall = per_image.groupby("method")[METRICS].mean()
    by_size = per_image.groupby(["size", "method"])[METRICS].mean()
    counts = per_image[per_image["method"] == args.methods[0]].groupby("size").size()
    overall["train_minutes"] = pd.Series(minutes)
    result = {
        "command": command,
        "commands": commands,
        "modality": args.modality,
        "ratio": args.ratio,
        "profile": args.profile,
        "config": config.to_dict(),
        "n_train": len(train),
        "n_test": len(test),
        "overall": json.loads(overall.to_json(orient="index")),
        "by_size": {
            size: json.loads(by_size.loc[size].to_json(orient="index")) | {"n": int(counts[size])}
            for size in counts.index
        },
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    write_json(out / f"{name}.json", result)
    with atomic_path(out / f"{name}.csv") as tmp:
        per_image.to_csv(tmp, index=False)
    lines = [
        f"# {args.modality}, {args.ratio:.0%} scribbles, profile {args.profile}",
        "",
        "Commands:",
        "",
        *[f"- {m}: `{c}`" for m, c in sorted(commands.items())],
        "",
        f"Test images: {len(test)}; training images: {len(train)}.",
        "",
        overall.round(3).to_markdown(),
        "",
        "## Per image size",
        "",
    ]
    for size in counts.index:
        table = by_size.loc[size].round(3).to_markdown()
        lines += [f"### {size} ({counts[size]} images)", "", table, ""]
    write_text(out / f"{name}.md", "\n".join(lines) + "\n")
    print(overall.round(3).to_string())
    print(by_size.round(3).to_string())
    print(f"written to {out / name}.json/.md/.csv")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
