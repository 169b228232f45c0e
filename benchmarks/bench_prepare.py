"""Benchmark: prepare all 670 BBBC038v1 images and their scribbles at the four ratios.

Times each step of a cold run (copy of the archive into an empty cache, verification,
extraction, preparation of images / labels / modalities / split, scribble synthesis at
10/30/50/100 %) and a warm run that finds everything cached. Prints the figures and writes
them to ``benchmarks/results/speed/prepare.json``.

Usage::

    python benchmarks/bench_prepare.py [--mirror PATH] [--repeats 3] [--workers N]

Targets: cold run under 2 minutes on a 2-core machine, cached run under 10 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from s2l_core import data, scribbles
from s2l_core.files import write_json

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"


def cold_run(mirror: Path, cache: Path, workers: int | None) -> dict[str, float]:
    times = {}
    t0 = time.perf_counter()
    archive = data.fetch_archive(mirror, cache, progress=False)
    times["fetch_and_verify_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    data.extract_archive(archive, cache / "stage1_train", progress=False)
    times["extract_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dataset = data.prepare_dataset(mirror, cache, workers=workers, progress=False)
    times["prepare_images_s"] = time.perf_counter() - t
    t = time.perf_counter()
    scribbles.prepare_scribbles(dataset, scribbles.RATIOS, workers=workers, progress=False)
    times["scribbles_4_ratios_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    return times


def warm_run(mirror: Path, cache: Path, workers: int | None) -> float:
    t = time.perf_counter()
    dataset = data.prepare_dataset(mirror, cache, workers=workers, progress=False)
    scribble_set = scribbles.prepare_scribbles(dataset, scribbles.RATIOS, progress=False)
    # Touch what a chapter would read first, so "cached" means usable.
    first = dataset.ids("fluorescence", "train")[0]
    dataset.image(first), dataset.labels(first), scribble_set.scribble(first, 0.3)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "speed" / "prepare.json")
    args = parser.parse_args()
    runs, warm = [], []
    for k in range(args.repeats):
        cache = Path(tempfile.mkdtemp(prefix="s2l-bench-"))
        try:
            runs.append(cold_run(args.mirror, cache, args.workers))
            warm.append(warm_run(args.mirror, cache, args.workers))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"run {k + 1}: " + ", ".join(f"{n} {v:.1f}" for n, v in runs[-1].items()), end="")
        print(f", cached {warm[-1]:.2f} s")
    median = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    result = {
        "what": "prepare 670 BBBC038v1 images + scribbles at ratios 0.1/0.3/0.5/1.0",
        "median_cold": median,
        "median_cached_s": statistics.median(warm),
        "runs": runs,
        "cached_runs_s": warm,
        "targets": {"cold_total_s": 120, "cached_s": 10},
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "workers": args.workers or min(os.cpu_count() or 1, 8),
        },
    }
    write_json(args.out, result)
    print("median cold run:")
    for name, value in median.items():
        print(f"  {name:24s} {value:7.1f} s")
    print(f"  {'cached run':24s} {result['median_cached_s']:7.2f} s")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
