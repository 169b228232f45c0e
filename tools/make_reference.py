"""Train the reference checkpoint shipped with the book, and the metrics file beside it.

Scribble2Label on the fluorescence training split with 30 % scribbles, the ``cpu``
profile, seed 0; evaluated on the persisted test split. The weights are stored in
float16 to keep the file small (they are cast back to float32 when loaded).

Usage (the documented command)::

    python tools/make_reference.py            # writes book/reference/s2l_fluorescence_r030.*
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from s2l_core import data, scribbles
from s2l_core.augment import normalize_image
from s2l_core.files import atomic_path, write_json
from s2l_core.metrics import evaluate_image
from s2l_core.predict import foreground_to_instances
from s2l_core.train import TrainConfig, Trainer, load_checkpoint, load_samples

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
METRICS = ["iou", "dice", "ap", "f1", "aji", "original_mdice", "object_dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", default="fluorescence")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default=str(MIRROR) if MIRROR.is_file() else None)
    parser.add_argument("--cache-dir")
    parser.add_argument("--out", type=Path, default=ROOT / "book" / "reference")
    args = parser.parse_args()

    dataset = data.prepare_dataset(args.source, args.cache_dir, progress=False)
    scribble_set = scribbles.prepare_scribbles(dataset, [args.ratio], progress=False)
    split = {s: dataset.ids(args.modality, s) for s in data.SPLITS}
    train = load_samples(dataset, split["train"], scribble_set, args.ratio)
    val = load_samples(dataset, split["val"], scribble_set, args.ratio)
    config = TrainConfig.profile(args.profile, seed=args.seed)
    name = f"s2l_{args.modality}_r{round(args.ratio * 100):03d}"
    work = ROOT / "runs" / "reference"
    start = time.perf_counter()
    trainer = Trainer(train, config, val=val)
    history = trainer.fit(checkpoint=work / f"{name}.state.pt")
    minutes = (time.perf_counter() - start) / 60

    rows = []
    for image_id in split["test"]:
        prob = trainer.predict(normalize_image(dataset.image(image_id)))
        pred = foreground_to_instances(prob, method="watershed")
        gt = dataset.labels(image_id)
        rows.append({"image_id": image_id, "size": "x".join(map(str, gt.shape))}
                    | {k: evaluate_image(pred, gt)[k] for k in METRICS})  # fmt: skip
    scores = pd.DataFrame(rows)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    checkpoint = trainer.export(
        args.out / f"{name}.pt",
        extra={"profile": args.profile, "command": command, "modality": args.modality,
               "ratio": args.ratio, "train_minutes": round(minutes, 1)},
    )  # fmt: skip
    state = load_checkpoint(checkpoint)
    state["model"] = {
        k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()
    }
    with atomic_path(checkpoint) as tmp:
        torch.save(state, tmp)
    write_json(
        args.out / f"{name}.json",
        {
            "command": command,
            "checkpoint": checkpoint.name,
            "config": config.to_dict(),
            "train_minutes": round(minutes, 1),
            "threads": torch.get_num_threads(),
            "device": str(trainer.device),
            "n_train": len(train),
            "n_test": len(scores),
            "test_mean": scores[METRICS].mean().round(4).to_dict(),
            "test_by_size": scores.groupby("size")[METRICS].mean().round(4).to_dict("index"),
            "final_epoch": json.loads(history.iloc[-1].to_json()),
        },
    )
    print(scores[METRICS].mean().round(3).to_string())
    print(f"written {checkpoint} ({checkpoint.stat().st_size / 1e6:.1f} MB) and its metrics")


if __name__ == "__main__":
    main()
