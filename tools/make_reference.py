"""Train the reference checkpoint shipped with the book, and the metrics file beside it.

Scribble2Label on the fluorescence training split with 30 % scribbles, the ``cpu``
profile, seed 0; evaluated on the persisted test split. The weights are stored in
int8 with a scale per output channel to keep the file small (they are turned back into
float32 when loaded), and the metrics are those of the weights as stored.

Usage (the documented command)::

    python tools/make_reference.py            # writes book/reference/s2l_fluorescence_r030.*
    python tools/make_reference.py --resume   # continues an interrupted run
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

from s2l_core import data, scribbles
from s2l_core.evaluate import SCORES, dataset_images, score_images
from s2l_core.files import write_json
from s2l_core.infer import predict_foreground
from s2l_core.predict import load_model
from s2l_core.train import TrainConfig, Trainer, load_samples

ROOT = Path(__file__).resolve().parents[1]
MIRROR = ROOT.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
METRICS = list(SCORES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", default="fluorescence")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", default=str(MIRROR) if MIRROR.is_file() else None)
    parser.add_argument("--cache-dir")
    parser.add_argument("--out", type=Path, default=ROOT / "book" / "reference")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted (or finished) run in runs/reference instead of "
        "starting afresh",
    )
    args = parser.parse_args()

    dataset = data.prepare_dataset(args.source, args.cache_dir, progress=False)
    scribble_set = scribbles.prepare_scribbles(dataset, [args.ratio], progress=False)
    split = {s: dataset.ids(args.modality, s) for s in data.SPLITS}
    train = load_samples(dataset, split["train"], scribble_set, args.ratio)
    val = load_samples(dataset, split["val"], scribble_set, args.ratio)
    config = TrainConfig.profile(args.profile, seed=args.seed)
    name = f"s2l_{args.modality}_r{round(args.ratio * 100):03d}"
    state_path = ROOT / "runs" / "reference" / f"{name}.state.pt"
    if args.resume and state_path.is_file():
        trainer = Trainer.resume(state_path, train, val=val)
        print(f"resuming {state_path} at epoch {trainer.epoch}")
    else:
        trainer = Trainer(train, config, val=val)
    history = trainer.fit(checkpoint=state_path)
    # Summed over the history's epochs, so a resumed run counts every epoch once.
    if "epoch_seconds" in history:
        minutes = float(history["epoch_seconds"].sum()) / 60
    else:  # a training state written before epoch times were recorded
        minutes = float(history["seconds"].sum() + history["ema_seconds"].fillna(0).sum()) / 60

    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    checkpoint = trainer.export(
        args.out / f"{name}.pt",
        precision="int8",
        extra={"profile": args.profile, "command": command, "modality": args.modality,
               "ratio": args.ratio, "train_minutes": round(minutes, 1)},
    )  # fmt: skip
    # Score the weights as stored (int8), not the trainer's float32 ones.
    model, _ = load_model(checkpoint, trainer.device)
    scores = score_images(
        lambda x: predict_foreground(model, x, device=trainer.device),
        dataset_images(dataset, split["test"]),
    )
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
