"""Benchmark: train variants of a training profile side by side and score each one.

Each variant is a method (``s2l``, ``pce`` or ``full``), a profile and overrides of its
:class:`s2l_core.config.TrainConfig` (``model`` and ``augment`` are merged into the
profile's own). Every variant trains on one modality's training split with scribbles at
one ratio, in its own process, and is scored on the validation and the test split
(foreground IoU, DSB average precision, F1, AJI; watershed instances), overall and per
image size. This answers questions such as "does a wider network help at the same number
of iterations?" before a long CPU run is spent on it.

The variants come from a JSON file: a list of objects with ``name``, ``method``,
``profile`` and ``overrides``. For example::

    [{"name": "s2l", "method": "s2l", "profile": "cpu", "overrides": {}},
     {"name": "s2l-wide", "method": "s2l", "profile": "cpu",
      "overrides": {"model": {"base_channels": 32}}}]

Usage::

    python benchmarks/bench_variants.py benchmarks/results/variants/gpu_sweep.config.json \\
        --parallel 4

The figures are written to ``--output`` (JSON) and the same name with ``.md``; by default
beside the variant file, ``NAME.config.json`` giving ``NAME.json`` and ``NAME.md``
(:func:`default_output`), so each configuration lies beside its results; with
``--checkpoints DIR`` each variant's weights are exported there (int8) for later study.
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

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"
METHODS = ("s2l", "pce", "full")
SHOWN = ("iou", "ap", "f1", "aji")


def load_variants(path: Path) -> list[dict]:
    """Read and check the variant list of ``path``."""
    variants = json.loads(path.read_text())
    if not isinstance(variants, list) or not variants:
        raise SystemExit(f"{path}: expected a non-empty JSON list of variants")
    names = set()
    for i, v in enumerate(variants):
        missing = {"name", "method"} - set(v)
        if missing:
            raise SystemExit(f"{path}: variant {i} lacks {sorted(missing)}")
        if v["method"] not in METHODS:
            raise SystemExit(f"{path}: variant {v['name']!r}: method must be one of {METHODS}")
        if v["name"] in names:
            raise SystemExit(f"{path}: variant name {v['name']!r} appears twice")
        names.add(v["name"])
        v.setdefault("profile", "cpu")
        v.setdefault("overrides", {})
    return variants


def make_config(variant: dict, seed: int):
    """The variant's TrainConfig: its profile with the overrides merged in."""
    from dataclasses import replace

    from s2l_core.augment import AugmentConfig
    from s2l_core.config import TrainConfig

    base = TrainConfig.profile(variant["profile"], seed=seed)
    overrides = dict(variant["overrides"])
    if "model" in overrides:
        overrides["model"] = {**base.model, **overrides["model"]}
    if "augment" in overrides:
        overrides["augment"] = AugmentConfig.from_dict(
            {**base.augment.to_dict(), **overrides["augment"]}
        )
    if variant["method"] != "s2l":
        overrides["use_pseudo"] = False
    return replace(base, **overrides)


def summarize(scores) -> dict:
    """Mean scores overall and per image size (:func:`s2l_core.evaluate.summarize_by`)."""
    from s2l_core.evaluate import summarize_by

    def plain(row) -> dict:
        return {k: round(float(row[k]), 4) for k in SHOWN} | {"images": int(row["images"])}

    by_size = summarize_by(scores, "size")
    return {
        "overall": plain(summarize_by(scores).iloc[0]),
        "by_size": {size: plain(row) for size, row in by_size.iterrows()},
    }


def run_variant(job: dict) -> dict:
    """Train and score one variant (runs in a worker process)."""
    import torch

    torch.set_num_threads(job["threads"])
    from s2l_core import data, scribbles
    from s2l_core.evaluate import dataset_images, score_images
    from s2l_core.samples import load_samples
    from s2l_core.train import Trainer

    variant = job["variant"]
    dataset = data.prepare_dataset(job["source"], job["cache_dir"], progress=False)
    scribble_set = scribbles.prepare_scribbles(dataset, [job["ratio"]], progress=False)
    ids = {split: dataset.ids(job["modality"], split) for split in data.SPLITS}
    full = variant["method"] == "full"
    train = load_samples(dataset, ids["train"], scribble_set, job["ratio"], full_masks=full)
    val = load_samples(dataset, ids["val"], scribble_set, job["ratio"])
    config = make_config(variant, job["seed"])

    start = time.perf_counter()
    trainer = Trainer(train, config, val=val, device=job["device"], verbose=False)
    history = trainer.fit(progress=False)
    minutes = (time.perf_counter() - start) / 60
    if job["checkpoints"]:
        folder = Path(job["checkpoints"])
        folder.mkdir(parents=True, exist_ok=True)
        trainer.export(
            folder / f"{variant['name']}.pt",
            extra={"benchmark": "variants", "variant": variant["name"]},
            precision="int8",
        )
    result = {
        "name": variant["name"],
        "method": variant["method"],
        "profile": variant["profile"],
        "overrides": variant["overrides"],
        "config": config.to_dict(),
        "device": str(trainer.device),
        "train_minutes": round(minutes, 2),
        "iterations": int(trainer.iteration),
        "median_crops_per_s": round(float(history["crops_per_s"].median()), 1),
    }
    if "ema_seconds" in history:
        result["median_ema_seconds"] = round(float(history["ema_seconds"].median()), 2)
    for split in ("val", "test"):
        scores = score_images(trainer.predict, dataset_images(dataset, ids[split]))
        result[split] = summarize(scores)
    print(
        f"{variant['name']:28s} val IoU {result['val']['overall']['iou']:.3f} "
        f"test IoU {result['test']['overall']['iou']:.3f} AP {result['test']['overall']['ap']:.3f}"
        f"  ({minutes:.1f} min)",
        flush=True,
    )
    return result


def to_markdown(report: dict) -> str:
    """The results as Markdown tables: overall, then test IoU per image size."""
    rows = report["results"]
    lines = [
        f"# Variants: {report['modality']}, {round(report['ratio'] * 100)} % scribbles",
        "",
        f"Command: `{report['command']}`  ",
        f"Device: {report['device_name']}",
        "",
        "| variant | method | iterations | train min | val IoU | val AP | test IoU | test AP "
        "| test F1 | test AJI |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        v, t = r["val"]["overall"], r["test"]["overall"]
        lines.append(
            f"| {r['name']} | {r['method']} | {r['iterations']} | {r['train_minutes']:.1f} "
            f"| {v['iou']:.3f} | {v['ap']:.3f} | {t['iou']:.3f} | {t['ap']:.3f} "
            f"| {t['f1']:.3f} | {t['aji']:.3f} |"
        )
    sizes = sorted({s for r in rows for s in r["test"]["by_size"]})
    lines += ["", "Test IoU / AP per image size:", ""]
    lines.append("| variant | " + " | ".join(sizes) + " |")
    lines.append("| --- |" + " --- |" * len(sizes))
    for r in rows:
        cells = []
        for s in sizes:
            g = r["test"]["by_size"].get(s)
            cells.append(f"{g['iou']:.3f} / {g['ap']:.3f}" if g else "")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def default_output(variants: Path) -> Path:
    """Where a variant file's results go: ``NAME.config.json`` gives ``NAME.json`` beside
    it; any other file ``benchmarks/results/variants/<stem>.json``."""
    if variants.name.endswith(".config.json"):
        return variants.with_name(variants.name.removesuffix(".config.json") + ".json")
    return HERE / "results" / "variants" / f"{variants.stem}.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", type=Path, help="JSON list of variants")
    parser.add_argument("--modality", default="fluorescence")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    parser.add_argument("--parallel", type=int, default=1, help="variants trained at once")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    parser.add_argument("--source", default=str(DEFAULT_MIRROR))
    parser.add_argument("--cache-dir")
    parser.add_argument("--checkpoints", help="export each variant's weights (int8) here")
    parser.add_argument(
        "--output", type=Path, help="results JSON (default: beside the variant file)"
    )
    args = parser.parse_args(argv)
    args.output = args.output or default_output(args.variants)

    import torch

    from s2l_core.files import write_json, write_text

    variants = load_variants(args.variants)
    for v in variants:
        make_config(v, args.seed)  # fail early on a bad override
    jobs = [
        {
            "variant": v,
            "threads": args.threads,
            "source": args.source,
            "cache_dir": args.cache_dir,
            "modality": args.modality,
            "ratio": args.ratio,
            "seed": args.seed,
            "device": args.device,
            "checkpoints": args.checkpoints,
        }
        for v in variants
    ]
    # Prepare the dataset and scribbles once, before the workers read them.
    from s2l_core import data, scribbles

    dataset = data.prepare_dataset(args.source, args.cache_dir, progress=False)
    scribbles.prepare_scribbles(dataset, [args.ratio], progress=False)

    start = time.perf_counter()
    if args.parallel > 1:
        with mp.get_context("spawn").Pool(min(args.parallel, len(jobs))) as pool:
            results = pool.map(run_variant, jobs, chunksize=1)
    else:
        results = [run_variant(job) for job in jobs]
    cuda = torch.cuda.is_available() and args.device != "cpu"
    report = {
        "benchmark": "variants",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "modality": args.modality,
        "ratio": args.ratio,
        "seed": args.seed,
        "parallel": args.parallel,
        "threads_per_variant": args.threads,
        "wall_minutes": round((time.perf_counter() - start) / 60, 2),
        "device_name": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, report)
    markdown = to_markdown(report)
    write_text(args.output.with_suffix(".md"), markdown)
    print(markdown)


if __name__ == "__main__":
    main()
