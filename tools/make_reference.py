"""Train a reference checkpoint shipped with the book, and the metrics file beside it.

Scribble2Label on one modality's training split with 30 % scribbles, the ``cpu``
profile (histopathology: epochs of 160 crops), seed 0. The weights are stored in int8
with a scale per output channel to keep the file small (they are turned back into
float32 when loaded), with the prediction preset (:class:`s2l_core.predict.Preset`)
that ``s2l predict`` uses for them. The metrics are those of the weights as stored, on
the persisted test split (in-distribution) at the preset and plain (scale 1, no TTA),
and on the same images changed as in the generalization benchmark's shift sweep (IoU and
AP). The file also repeats the generalization benchmark's figures of Scribble2Label at
the default preset (``benchmarks/results/generalization/generalization.json``: networks
trained as this one is, each scored on an acquisition group it never saw).

Usage (the documented commands)::

    python tools/make_reference.py                               # fluorescence
    python tools/make_reference.py --modality histopathology --cpu-bf16
    python tools/make_reference.py --resume     # continues an interrupted run
    python tools/make_reference.py --rescore    # the weights already there, scored again
    python tools/make_reference.py --generalization-only   # the benchmark's figures again
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

import pandas as pd
import torch

import s2l_core.infer
import s2l_core.predict
from s2l_core import data, scribbles
from s2l_core.checkpoint import load_checkpoint
from s2l_core.config import TrainConfig
from s2l_core.evaluate import PLAIN, SCORES
from s2l_core.files import atomic_path, write_json
from s2l_core.predict import Preset, load_model
from s2l_core.samples import load_samples
from s2l_core.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_generalization import (  # noqa: E402
    RESULTS,
    SHIFTS,
    method_figures,
    score_network,
    shift_image,
)

MIRROR = ROOT.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
METRICS = list(SCORES)
#: Settings of the profile that a modality changes: histopathology has 64 training
#: images, so its epochs hold 160 crops (ten batches), and 51 of them end the last cosine
#: cycle with the run.
MODALITY_OVERRIDES = {"histopathology": {"epochs": 51, "samples_per_epoch": 160}}
#: The generalization benchmark's results, whose Scribble2Label figures (its networks
#: trained as the reference is, one per held-out group) the metrics file repeats.
GENERALIZATION = RESULTS / "generalization.json"


def generalization_figures(modality: str, results: Path = GENERALIZATION) -> dict | None:
    """The ``s2l`` variant's figures at the default preset in the benchmark's results
    (:func:`bench_generalization.method_figures`) with the results file's path, or
    ``None`` when there is no such file or it holds no such row for the modality; a
    results file in which a seed lacks a group is an error (``ValueError``)."""
    if not results.is_file():
        return None
    per_fold = pd.DataFrame(json.loads(results.read_text())["per_fold"])
    chosen = (per_fold["variant"] == "s2l") & (per_fold["preset"] == "default")
    if not (chosen & (per_fold["modality"] == modality)).any():
        return None
    path = results.resolve()
    shown = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
    return {"results": shown, **method_figures(per_fold, "s2l", modality)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", default="fluorescence")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu-bf16", action="store_true", help="bfloat16 on a CPU that computes it natively"
    )
    parser.add_argument("--source", default=str(MIRROR) if MIRROR.is_file() else None)
    parser.add_argument("--cache-dir")
    parser.add_argument("--out", type=Path, default=ROOT / "book" / "reference")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted (or finished) run in runs/reference instead of "
        "starting afresh",
    )
    parser.add_argument(
        "--rescore",
        action="store_true",
        help="keep the weights of the checkpoint already in --out (made by this tool with "
        "the same settings) and write it again with the current preset and metrics",
    )
    parser.add_argument(
        "--generalization-only",
        action="store_true",
        help="copy the generalization benchmark's figures into the metrics file already in "
        "--out and change nothing else (after the benchmark's report is written again)",
    )
    parser.add_argument(
        "--shifts",
        nargs="+",
        help="score only these shifts now (runs side by side share "
        "their results); the metrics file is written once every shift is scored",
    )
    args = parser.parse_args()
    name = f"s2l_{args.modality}_r{round(args.ratio * 100):03d}"
    if args.generalization_only:
        metrics = args.out / f"{name}.json"
        if not metrics.is_file():
            raise SystemExit(f"no metrics file {metrics}: make the reference first")
        info = json.loads(metrics.read_text())
        info["generalization"] = generalization_figures(args.modality)
        write_json(metrics, info)
        print(f"{metrics}: generalization {info['generalization']}")
        return

    dataset = data.prepare_dataset(args.source, args.cache_dir, progress=False)
    scribble_set = scribbles.prepare_scribbles(dataset, [args.ratio], progress=False)
    split = {s: dataset.ids(args.modality, s) for s in data.SPLITS}
    overrides = MODALITY_OVERRIDES.get(args.modality, {})
    if args.cpu_bf16:
        overrides = {**overrides, "cpu_bf16": True}
    config = TrainConfig.profile(args.profile, seed=args.seed, **overrides)
    checkpoint = args.out / f"{name}.pt"
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    preset = Preset.for_training("s2l", args.modality)
    if args.rescore:
        load_checkpoint(checkpoint)  # checks the file
        # The file as stored (int8 weights stay int8), to rewrite its metadata only.
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        stored = TrainConfig.from_dict(state["config"])
        if stored != config:
            raise SystemExit(f"{checkpoint} was trained with other settings than {config}")
        extra = dict(state["extra"])
        extra.update(preset=preset.to_dict(), rescored_by=command)
        state["extra"] = extra
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)
        minutes = extra["train_minutes"]
        n_train = len(split["train"])
        final_epoch = json.loads((args.out / f"{name}.json").read_text()).get("final_epoch")
        command = extra["command"]
    else:
        train = load_samples(dataset, split["train"], scribble_set, args.ratio)
        val = load_samples(dataset, split["val"], scribble_set, args.ratio)
        state_path = ROOT / "runs" / "reference" / f"{name}.state.pt"
        if args.resume and state_path.is_file():
            trainer = Trainer.resume(state_path, train, val=val)
            print(f"resuming {state_path} at epoch {trainer.epoch}")
        else:
            trainer = Trainer(train, config, val=val)
        history = trainer.fit(checkpoint=state_path)
        # Summed over the history's epochs, so a resumed run counts every epoch once.
        minutes = round(float(history["epoch_seconds"].sum()) / 60, 1)
        trainer.export(
            checkpoint,
            precision="int8",
            extra={"profile": args.profile, "command": command, "modality": args.modality,
                   "ratio": args.ratio, "train_minutes": minutes,
                   "preset": preset.to_dict()},
        )  # fmt: skip
        n_train = len(train)
        final_epoch = json.loads(history.iloc[-1].to_json())
    # Score the weights as stored (int8), not the trainer's float32 ones.
    model, _ = load_model(checkpoint, "auto")
    device = next(model.parameters()).device
    named = {"preset": ("auto_tta", preset), "plain": ("scale1", PLAIN)}

    def images(shift=None):
        for k, i in enumerate(split["test"]):
            image, truth = dataset.image(i), dataset.labels(i)
            if shift is not None:
                image, truth = shift_image(image, truth, shift[1], shift[2], seed=k)
            yield i, image, truth

    # Each shift's scores are kept in runs/reference/<name>/ under the weights' digest, so
    # that an interrupted run, or runs started side by side with --shifts, share them.
    cache = ROOT / "runs" / "reference" / name
    cache.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(preset.to_dict(), sort_keys=True).encode())
    for module in (s2l_core.predict, s2l_core.infer):  # how the preset is carried out
        digest.update(Path(module.__file__).read_bytes())
    for key, value in sorted(model.state_dict().items()):
        digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    digest = digest.hexdigest()
    shifted = {}
    for shift in SHIFTS[args.modality]:
        kept = cache / f"shift_{shift[0].replace(' ', '_').replace('%', 'pc')}.json"
        if kept.is_file() and json.loads(kept.read_text()).get("digest") == digest:
            shifted[shift[0]] = json.loads(kept.read_text())["scores"]
            continue
        if args.shifts and shift[0] not in args.shifts:
            continue
        rows = pd.DataFrame(
            score_network(model, images(shift), device, {"preset": named["preset"]})
        )
        shifted[shift[0]] = rows[["iou", "ap"]].mean().round(4).to_dict()
        write_json(kept, {"digest": digest, "scores": shifted[shift[0]]})
        print(f"{shift[0]}: IoU {shifted[shift[0]]['iou']:.3f} AP {shifted[shift[0]]['ap']:.3f}")
    missing = [s for s, _, _ in SHIFTS[args.modality] if s not in shifted]
    if missing:
        print(f"shifts not scored yet: {missing}; run again to finish {name}.json")
        return
    scores = pd.DataFrame(score_network(model, images(), device, named))
    by_preset = scores.groupby("preset")
    write_json(
        args.out / f"{name}.json",
        {
            "command": command,
            "checkpoint": checkpoint.name,
            "config": config.to_dict(),
            "preset": preset.to_dict(),
            "train_minutes": minutes,
            "threads": torch.get_num_threads(),
            "n_train": n_train,
            "n_test": len(split["test"]),
            "test_mean": by_preset.get_group("preset")[METRICS].mean().round(4).to_dict(),
            "test_mean_plain": by_preset.get_group("plain")[METRICS].mean().round(4).to_dict(),
            "test_by_size": by_preset.get_group("preset")
            .groupby("size")[METRICS]
            .mean()
            .round(4)
            .to_dict("index"),
            "shifts": shifted,
            "generalization": generalization_figures(args.modality),
            "final_epoch": final_epoch,
        },
    )
    print(by_preset[METRICS].mean().round(3).to_string())
    print(f"written {checkpoint} ({checkpoint.stat().st_size / 1e6:.1f} MB) and its metrics")


if __name__ == "__main__":
    main()
