"""Benchmark the segmentation network: training throughput, peak memory, inference time.

For each configuration, in a fresh subprocess (so that the peak resident memory is that
configuration's own), this script times the training step of Scribble2Label on a CPU:
forward, cross-entropy loss, backward and a RAdam step (encoder/decoder/head learning
rates as in training) on a batch of 16 random 256×256 crops, with 2 threads; the
bfloat16 configuration (``TrainConfig.cpu_bf16``) only on a CPU that computes bfloat16
natively. It reports the median crops per second over the timed steps after warm-up (and
the best step, which is less affected by other processes), the peak RSS of the process,
and the inference time per megapixel in eval mode without gradients on a 512×640 image.

Side by side, in the same run:

- the paper's own network, the ResNet-50 U-Net with scSE attention of
  ``segmentation_models_pytorch`` (:func:`s2l_core.model.build_smp_unet`, no pretrained
  weights), at batch 8 — when that optional package is installed (it is skipped, and
  said so, otherwise);
- how close each training step comes to what this CPU computes: its achieved GFLOP/s
  (two operations per multiply-accumulate of the convolutions, times three for the
  forward and the backward pass) against the fastest of two dense kernels with the same
  threads and precision (float32, bfloat16): a 2048×2048 matrix product and a 3×3
  convolution of 512 channels on 64×64 (channels-last), measured here rather than
  taken from a data sheet.

Run from the repository root::

    .venv/bin/python benchmarks/bench_model.py          # about 3 minutes
    .venv/bin/python benchmarks/bench_model.py --quick  # about 1 minute

The figures are written to ``benchmarks/results/speed/model.json``. On a shared machine they
are noisy: the load average before and after each configuration is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "speed" / "model.json"

# name, model configuration (s2l_core.model.from_config), channels-last, bfloat16
# autocast (TrainConfig.cpu_bf16; measured only on a CPU that computes bfloat16 natively)
CONFIGURATIONS: list[tuple[str, dict[str, Any], bool, bool]] = [
    ("paper's U-Net (ResNet-50, scSE)", {"arch": "smp_unet"}, True, False),
    ("default UNet()", {"arch": "unet"}, True, False),
    ("default UNet(), bfloat16", {"arch": "unet"}, True, True),
    ("default UNet(), contiguous", {"arch": "unet"}, False, False),
    ("small UNet(base_channels=16)", {"arch": "unet", "base_channels": 16}, True, False),
    ("plain U-Net 16", {"arch": "unet", "base_channels": 16, "stem_factor": 1}, True, False),
    (
        "plain U-Net 16, contiguous",
        {"arch": "unet", "base_channels": 16, "stem_factor": 1},
        False,
        False,
    ),
]


def _conv_macs(model: Any, size: tuple[int, int]) -> int:
    """Multiply-accumulates of the convolutions in one forward pass of one image."""
    import torch
    from torch import nn

    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += inputs[0].numel() * module.out_channels // module.groups * k
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * module.in_channels // module.groups * k

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, model.in_channels, *size))
    for handle in handles:
        handle.remove()
    return total


#: Batch of the configurations that would not fit the default batch in a laptop's memory.
BATCH = {"paper's U-Net (ResNet-50, scSE)": 8}
#: Side of the square matrices whose product measures what the CPU computes.
GEMM_SIDE = 2048
#: (batch, channels, side) of the 3×3 convolution that measures it too.
CONV_SHAPE = (8, 512, 64)


def limit_child(spec: dict[str, Any]) -> dict[str, Any]:
    """GFLOP/s of two dense kernels in this process (medians of repeats): a matrix
    product and a 3×3 convolution; the limit is the faster (some BLAS libraries do not
    reach the CPU's rate in float32 where the convolution library does)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else torch.float32
    n = GEMM_SIDE
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    batch, channels, side = CONV_SHAPE
    fmt = torch.channels_last
    x = torch.randn(batch, channels, side, side).to(dtype).contiguous(memory_format=fmt)
    w = torch.randn(channels, channels, 3, 3).to(dtype).contiguous(memory_format=fmt)
    kernels = {
        "matrix_product": (lambda: torch.mm(a, b), 2 * n**3),
        "convolution_3x3": (
            lambda: F.conv2d(x, w, padding=1),
            2 * batch * side * side * channels * channels * 9,
        ),
    }
    out = {}
    with torch.no_grad():
        for name, (kernel, flops) in kernels.items():
            times = []
            for step in range(2 + spec["repeats"]):
                start = time.perf_counter()
                kernel()
                if step >= 2:
                    times.append(time.perf_counter() - start)
            out[f"{name}_gflops_median"] = round(flops / statistics.median(times) / 1e9, 1)
    out["gflops_median"] = max(out.values())
    return out


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one configuration in this process; return the figures."""
    import torch
    import torch.nn.functional as F

    from s2l_core.infer import autocast_context
    from s2l_core.model import count_parameters, from_config, parameter_groups, prepare_model

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = from_config(spec["config"])
    macs = _conv_macs(model, (spec["crop"], spec["crop"]))
    model = prepare_model(model, "cpu", channels_last=spec["channels_last"])
    fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    optimiser = torch.optim.RAdam(
        parameter_groups(model, encoder_lr=3e-4, decoder_lr=3e-3),
        weight_decay=5e-5,
        decoupled_weight_decay=True,
    )
    batch, crop = spec["batch"], spec["crop"]
    x = torch.randn(batch, model.in_channels, crop, crop).contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (batch, crop, crop))

    model.train()
    times = []
    for step in range(spec["warmup"] + spec["steps"]):
        start = time.perf_counter()
        with autocast_context(torch.device("cpu"), cpu_bf16=spec["bf16"]):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    train_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    model.eval()
    h, w = spec["infer_size"]
    image = torch.randn(1, model.in_channels, h, w).contiguous(memory_format=fmt)
    infer_times = []
    with torch.no_grad(), autocast_context(torch.device("cpu"), cpu_bf16=spec["bf16"]):
        for step in range(1 + spec["infer_steps"]):
            start = time.perf_counter()
            model(image)
            if step:
                infer_times.append(time.perf_counter() - start)
    megapixels = h * w / 1e6
    return {
        "parameters": count_parameters(model),
        "size_multiple": model.size_multiple,
        "gmac_per_crop": round(macs / 1e9, 3),
        "train_step_s": [round(t, 4) for t in times],
        "train_crops_per_s_median": round(batch / statistics.median(times), 2),
        "train_crops_per_s_best": round(batch / min(times), 2),
        "train_peak_rss_mb": round(train_rss_mb, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "infer_s_per_megapixel_median": round(statistics.median(infer_times) / megapixels, 4),
        "infer_s_per_megapixel_best": round(min(infer_times) / megapixels, 4),
    }


def _child(spec: dict[str, Any], what: str) -> dict[str, Any]:
    """Run one measurement in a fresh subprocess; its figures."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode:
        sys.exit(f"{what} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (a short run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(limit_child(spec) if "dtype" in spec else run_child(spec)))
        return

    steps, infer_steps = (4, 3) if args.quick else (10, 5)
    rows = []
    import importlib.util

    from s2l_core.runtime import cpu_bf16_native

    limit = {}
    for dtype in ("float32", "bfloat16"):
        spec = {"dtype": dtype, "threads": args.threads, "repeats": 3 if args.quick else 6}
        limit[dtype] = _child(spec, f"dense kernels, {dtype}")
        print(
            f"{'dense kernels, ' + dtype:30s} matrix product "
            f"{limit[dtype]['matrix_product_gflops_median']:7.1f} GFLOP/s, 3x3 convolution "
            f"{limit[dtype]['convolution_3x3_gflops_median']:7.1f} GFLOP/s",
            flush=True,
        )
    skipped = []
    for name, config, channels_last, bf16 in CONFIGURATIONS:
        if bf16 and not cpu_bf16_native():
            print(f"{name:30s} skipped: this CPU has no native bfloat16", flush=True)
            skipped.append({"name": name, "why": "no native bfloat16"})
            continue
        if config["arch"] == "smp_unet" and not importlib.util.find_spec(
            "segmentation_models_pytorch"
        ):
            why = "the optional package segmentation_models_pytorch is not installed"
            print(f"{name:30s} skipped: {why}", flush=True)
            skipped.append({"name": name, "why": why})
            continue
        spec = {
            "config": config,
            "channels_last": channels_last,
            "bf16": bf16,
            "threads": args.threads,
            "batch": BATCH.get(name, args.batch),
            "crop": args.crop,
            "warmup": 2,
            "steps": steps,
            "infer_size": [512, 640],
            "infer_steps": infer_steps,
        }
        load_before = os.getloadavg()[0]
        result = _child(spec, f"configuration {name!r}")
        row = {"name": name, **spec, **result}
        row["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        # Training: 2 operations per multiply-accumulate, forward plus backward (2x).
        achieved = 6 * result["gmac_per_crop"] * result["train_crops_per_s_median"]
        row["train_gflops_median"] = round(achieved, 1)
        reachable = limit["bfloat16" if bf16 else "float32"]["gflops_median"]
        row["train_share_of_limit"] = round(achieved / reachable, 3)
        rows.append(row)
        print(
            f"{name:30s} {result['train_crops_per_s_median']:6.2f} crops/s "
            f"(best {result['train_crops_per_s_best']:5.2f})  "
            f"{achieved:6.1f} GFLOP/s ({row['train_share_of_limit']:.0%} of the dense "
            f"kernels')  peak RSS {result['train_peak_rss_mb']:6.0f} MB  "
            f"inference {result['infer_s_per_megapixel_median']:.3f} s/MP",
            flush=True,
        )

    header = (
        f"{'configuration':32s} {'params':>9s} {'GMAC':>5s} {'batch':>5s} {'crops/s':>8s} "
        f"{'best':>6s} {'GFLOP/s':>7s} {'of max':>6s} {'RSS MB':>7s} {'s/MP':>6s} {'load':>10s}"
    )
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        load = "{:.1f}-{:.1f}".format(*row["load_average_1min"])
        print(
            f"{row['name']:32s} {row['parameters']:9d} {row['gmac_per_crop']:5.2f} "
            f"{row['batch']:5d} {row['train_crops_per_s_median']:8.2f} "
            f"{row['train_crops_per_s_best']:6.2f} {row['train_gflops_median']:7.1f} "
            f"{row['train_share_of_limit']:6.0%} {row['train_peak_rss_mb']:7.0f} "
            f"{row['infer_s_per_megapixel_median']:6.3f} {load:>10s}"
        )

    import torch

    report = {
        "benchmark": "training step (forward, cross-entropy, backward, RAdam step)",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": args.quick,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_bf16_native": cpu_bf16_native(),
        },
        "notes": (
            "Medians over the timed steps after 2 warm-up steps; 'best' is the fastest step. "
            "train_gflops_median counts 6 operations per multiply-accumulate of the "
            "convolutions (forward and backward); train_share_of_limit divides it by the "
            "GFLOP/s of the faster dense kernel (a 2048x2048 matrix product, a 3x3 "
            "convolution of 512 channels on 8x64x64) in the same precision and threads. "
            "Each configuration ran in a fresh subprocess; peak RSS is ru_maxrss of that "
            "process after training. The machine is shared: load_average_1min (before, "
            "after) shows the load under which each figure was measured."
        ),
        "dense_kernels": {
            "matrix_product_side": GEMM_SIDE,
            "convolution_3x3_shape": list(CONV_SHAPE),
            "threads": args.threads,
            **limit,
        },
        "results": rows,
        "skipped": skipped,
    }
    _write_json_atomic(args.output, report)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
