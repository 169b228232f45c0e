"""Benchmark the training loop in one and in several processes (torchrun, gloo on the CPU).

For each number of processes N, ``python -m torch.distributed.run --nproc_per_node=N``
starts this script's child, which trains :class:`s2l_core.train.Trainer` (the ``cpu``
profile's network and augmentation, ``--batch-size`` crops per process and step) on the
first ``--images`` images of a BBBC038 modality's training split for ``--epochs`` epochs
of ``--samples-per-epoch`` crops, with an EMA pass after every epoch. The machine's
``--threads`` are shared out: each process gets ``threads / N``. The runs alternate
(1, 2, 1, 2, ...) ``--repeats`` times, so that a load that comes and goes on a shared
machine falls on both. Reported: the training loop's crops per second (all processes
together) and seconds per EMA pass, the median and the best over the epochs after each
run's first (which warms up), the last loss, and whether every process ended with the
same EMA maps and the same weights (SHA-256 of each). The load average before and after
each run is recorded with it.

On a 2-core CPU this is a correctness check more than a speed-up: two processes of one
thread do the arithmetic of one process of two threads, plus the exchange of gradients
and EMA maps. The speed-up is for machines with a GPU per process (or many cores).

Run from the repository root::

    .venv/bin/python benchmarks/bench_distributed.py                 # 1 and 2 processes
    .venv/bin/python benchmarks/bench_distributed.py --processes 1 2 4 --threads 8

The figures go to ``benchmarks/results/speed/distributed.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "speed" / "distributed.json"
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"


def make_config(spec: dict[str, Any]) -> Any:
    """The training configuration of a run: the ``cpu`` profile, shortened."""
    from s2l_core.config import TrainConfig

    return TrainConfig.profile(
        "cpu",
        epochs=spec["epochs"],
        samples_per_epoch=spec["samples_per_epoch"],
        batch_size=spec["batch_size"],
        warmup_epochs=1,
        ema_every=1,
        ema_start=0,
        val_every=0,
        seed=spec["seed"],
    )


def _digest(arrays: list[Any]) -> str:
    h = hashlib.sha256()
    for array in arrays:
        h.update(array.tobytes())
    return h.hexdigest()


def run_child(spec: dict[str, Any]) -> None:
    """One process of a run (under torchrun): train, then write this process's figures."""
    import torch

    from s2l_core import data, distributed, scribbles
    from s2l_core.samples import load_samples
    from s2l_core.train import Trainer

    torch.set_num_threads(spec["threads_per_process"])
    distributed.setup("cpu")
    dataset = data.prepare_dataset(spec["source"], spec["cache_dir"], progress=False)
    scribble_set = scribbles.prepare_scribbles(dataset, [spec["ratio"]], progress=False)
    ids = dataset.ids(spec["modality"], "train")[: spec["images"]]
    train = load_samples(dataset, ids, scribble_set, spec["ratio"])
    trainer = Trainer(train, make_config(spec), device="cpu", verbose=False)
    history = trainer.fit(progress=False)
    out = Path(spec["out"])
    rank = distributed.rank()
    held = {
        "ema": _digest([trainer.ema.get(i) for i in trainer.ema.ids]),
        "weights": _digest([t.cpu().numpy() for t in trainer.model.state_dict().values()]),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(held))
    if rank == 0:
        rows = history[["epoch", "loss", "seconds", "crops_per_s", "ema_seconds"]]
        figures = {
            "steps_per_epoch": trainer.iterations_per_epoch(),
            "images": len(train),
            "ema_megapixels": round(sum(s.scribble.size for s in train) / 1e6, 3),
            "epochs": rows.to_dict("records"),
        }
        (out / "result.json").write_text(json.dumps(figures))
    distributed.teardown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_processes(n: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Train once in ``n`` processes under torchrun; the figures of that run."""
    with tempfile.TemporaryDirectory(prefix="s2l-bench-dist-") as tmp:
        spec = {**spec, "out": tmp, "threads_per_process": max(1, spec["threads"] // n)}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__,
            "--child", str(Path(tmp) / "spec.json"),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads_per_process"])}
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"{n} process(es) failed:\n{proc.stderr[-4000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
        held = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(n)]
    return {
        "steps_per_epoch": result["steps_per_epoch"],
        "crops_per_s_epochs": [round(e["crops_per_s"], 2) for e in result["epochs"]],
        "ema_pass_s_epochs": [round(e["ema_seconds"], 2) for e in result["epochs"]],
        "loss_per_epoch": [round(e["loss"], 4) for e in result["epochs"]],
        "same_ema_maps_on_every_process": len({h["ema"] for h in held}) == 1,
        "same_weights_on_every_process": len({h["weights"] for h in held}) == 1,
        "images": result["images"],
        "ema_megapixels": result["ema_megapixels"],
        "wall_s": round(wall, 1),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def summarize(n: int, spec: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of ``n`` processes over their runs (the first epoch of each left out)."""
    crops = [c for run in runs for c in run["crops_per_s_epochs"][1:]]
    ema = [s for run in runs for s in run["ema_pass_s_epochs"][1:]]
    return {
        "processes": n,
        "threads_per_process": max(1, spec["threads"] // n),
        "batch_per_process": spec["batch_size"],
        "effective_batch": n * spec["batch_size"],
        "steps_per_epoch": runs[0]["steps_per_epoch"],
        "crops_per_s_median": round(statistics.median(crops), 2),
        "crops_per_s_best": round(max(crops), 2),
        "ema_pass_s_median": round(statistics.median(ema), 2),
        "ema_pass_s_best": round(min(ema), 2),
        "loss_last": runs[0]["loss_per_epoch"][-1],
        "same_ema_maps_on_every_process": all(r["same_ema_maps_on_every_process"] for r in runs),
        "same_weights_on_every_process": all(r["same_weights_on_every_process"] for r in runs),
        "runs": runs,
    }


def notes(cores: int | None, threads: int, epochs: int, repeats: int) -> str:
    """What the figures are, and what they are not."""
    return (
        "crops/s counts the crops of all processes: the median (and the best) over "
        f"epochs 2 to {epochs} of {repeats} runs each (the first epoch of a run warms up); "
        "the EMA pass is shared between the processes. With "
        f"{cores} CPU cores, N processes of {threads} / N threads share the cores that one "
        "process uses with all its threads: the comparison weighs what working together "
        "costs (the gradient all-reduce every step, the exchange of EMA maps, one thread "
        "per process) against what it shares out besides the network's work (the random "
        "crops, made in each training process, and the EMA pass). It checks that every "
        "process ends with the same EMA maps and weights; on so few cores it is a "
        "correctness check more than a speed-up, which comes with a GPU (or many cores) "
        "per process. The machine is shared: single epochs run up to five times slower "
        "when other work runs, hence the medians over several runs. The losses differ "
        "between rows: N processes take 1/N as many steps of N times the crops."
    )


def to_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page."""
    spec = report["spec"]
    lines = [
        "# Training in several processes (torchrun, gloo on the CPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['cpu_count']} CPU cores, torch {report['machine']['torch']}",
        "",
        f"{spec['images']} {spec['modality']} training images, {round(spec['ratio'] * 100)} % "
        f"scribbles, the `cpu` profile's network, {spec['epochs']} epochs of "
        f"{spec['samples_per_epoch']} crops, an EMA pass after every epoch, "
        f"{spec['threads']} threads shared out between the processes.",
        "",
        "| processes | threads each | batch per process | effective batch | steps per epoch "
        "| crops/s (best) | s per EMA pass (best) | last loss | same EMA maps | same weights |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['processes']} | {r['threads_per_process']} | {r['batch_per_process']} | "
            f"{r['effective_batch']} | {r['steps_per_epoch']} | "
            f"{r['crops_per_s_median']:.1f} ({r['crops_per_s_best']:.1f}) | "
            f"{r['ema_pass_s_median']:.2f} ({r['ema_pass_s_best']:.2f}) | {r['loss_last']:.4f} | "
            f"{'yes' if r['same_ema_maps_on_every_process'] else 'NO'} | "
            f"{'yes' if r['same_weights_on_every_process'] else 'NO'} |"
        )
    loads = [
        f"{r['processes']} process(es), run {k + 1}: {run['load_average_1min'][0]:.1f} to "
        f"{run['load_average_1min'][1]:.1f}"
        for r in report["results"]
        for k, run in enumerate(r["runs"])
    ]
    lines += [
        "",
        report["notes"],
        "",
        f"Load average (1 min) before and after each run: {'; '.join(loads)}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--images", type=int, default=32, help="training images used")
    parser.add_argument("--samples-per-epoch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--batch-size", type=int, default=16, help="crops per process and step")
    parser.add_argument("--modality", default="fluorescence")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--source", default=os.environ.get("S2L_BBBC038_SOURCE", str(DEFAULT_MIRROR))
    )
    parser.add_argument("--cache-dir")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--markdown-only", action="store_true",
        help="run nothing: write the notes and the .md page of the results in --output again",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(json.loads(Path(args.child).read_text()))
        return
    if args.markdown_only:
        from s2l_core.files import read_json, write_json, write_text

        report = read_json(args.output)
        spec = report["spec"]
        report["notes"] = notes(
            report["machine"]["cpu_count"], spec["threads"], spec["epochs"],
            len(report["results"][0]["runs"]),
        )  # fmt: skip
        write_json(args.output, report)
        write_text(args.output.with_suffix(".md"), to_markdown(report))
        return

    import torch

    from s2l_core import data, scribbles
    from s2l_core.files import write_json, write_text

    # Prepared once here, so that the timed runs only read it.
    dataset = data.prepare_dataset(args.source, args.cache_dir, progress=False)
    scribbles.prepare_scribbles(dataset, [args.ratio], progress=False)
    spec = {
        "images": args.images, "samples_per_epoch": args.samples_per_epoch,
        "epochs": args.epochs, "batch_size": args.batch_size, "modality": args.modality,
        "ratio": args.ratio, "seed": args.seed, "source": args.source,
        "cache_dir": args.cache_dir, "threads": args.threads,
    }  # fmt: skip
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in args.processes}
    for repeat in range(args.repeats):
        for n in args.processes:
            run = run_processes(n, spec)
            runs[n].append(run)
            print(
                f"run {repeat + 1}, {n} process(es): crops/s per epoch "
                f"{run['crops_per_s_epochs']}, EMA pass s {run['ema_pass_s_epochs']}, same EMA "
                f"maps {run['same_ema_maps_on_every_process']}, same weights "
                f"{run['same_weights_on_every_process']}",
                flush=True,
            )
    results = [summarize(n, spec, runs[n]) for n in args.processes]
    cores = os.cpu_count()
    report = {
        "benchmark": "training loop in one and several processes (torchrun, gloo, CPU)",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu_count": cores,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "spec": {k: v for k, v in spec.items() if k not in ("source", "cache_dir")},
        "config": make_config(spec).to_dict(),
        "notes": notes(cores, args.threads, args.epochs, args.repeats),
        "results": results,
    }
    write_json(args.output, report)
    markdown = to_markdown(report)
    write_text(args.output.with_suffix(".md"), markdown)
    print(f"\n{markdown}\nwritten to {args.output} and {args.output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
