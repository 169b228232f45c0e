"""Benchmark on a CUDA GPU: training step, inference, and the real training loop.

1. The training step of the default network (forward, Scribble2Label loss, backward,
   RAdam step) on random 256×256 crops at several batch sizes, with mixed precision and
   channels-last as :class:`s2l_core.train.Trainer` runs it: median crops per second over
   CUDA-event-timed steps after warm-up, and peak GPU memory.
2. Whole-image inference (:func:`s2l_core.infer.predict_foreground`) in seconds per
   megapixel, on a 512×640 and a 1024×1024 image.
3. The training loop itself (:class:`s2l_core.train.Trainer`, ``full`` profile) on the
   real fluorescence training split for a few epochs: seconds per epoch (random crops on
   the CPU included), seconds per EMA pass, and the implied time of the ``full`` profile's
   600 epochs.

Usage (on a machine with CUDA)::

    python benchmarks/bench_gpu.py --cache-dir ~/.cache/scribble2label

Figures go to ``benchmarks/results/speed/gpu.json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from s2l_core.files import write_json
from s2l_core.infer import autocast_context, predict_foreground
from s2l_core.losses import scribble2label_loss
from s2l_core.model import from_config, parameter_groups, prepare_model

HERE = Path(__file__).resolve().parent
DEFAULT_MIRROR = HERE.parent.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip"


def time_steps(batch: int, crop: int, steps: int, warmup: int) -> dict:
    """Time the training step at one batch size; CUDA events, medians."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = prepare_model(from_config({"arch": "unet"}), device, channels_last=True)
    optimiser = torch.optim.RAdam(
        parameter_groups(model, encoder_lr=3e-4, decoder_lr=3e-3),
        weight_decay=5e-5,
        decoupled_weight_decay=True,
    )
    x = torch.randn(batch, 3, crop, crop, device=device).contiguous(
        memory_format=torch.channels_last
    )
    scribble = torch.randint(0, 3, (batch, crop, crop), device=device)
    scribble[scribble == 2] = 250
    ema = torch.rand(batch, crop, crop, device=device)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        with autocast_context(device, True):
            logits = model(x)
        loss, _ = scribble2label_loss(logits, scribble, ema, use_pseudo=True)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        end.record()
        end.synchronize()
        if step >= warmup:
            times.append(begin.elapsed_time(end) / 1000)
    return {
        "batch": batch,
        "crop": crop,
        "step_s_median": round(statistics.median(times), 5),
        "crops_per_s_median": round(batch / statistics.median(times), 1),
        "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1),
    }


def time_inference(size: tuple[int, int], repeats: int) -> dict:
    """Seconds per megapixel of whole-image inference (host round trip included)."""
    torch.manual_seed(0)
    model = prepare_model(from_config({"arch": "unet"}), "cuda", channels_last=True).eval()
    image = np.random.default_rng(0).standard_normal((3, *size)).astype(np.float32)
    times = []
    for step in range(repeats + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        predict_foreground(model, image, device="cuda", amp=True, channels_last=True)
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    megapixels = size[0] * size[1] / 1e6
    return {
        "size": list(size),
        "s_median": round(statistics.median(times), 5),
        "s_per_megapixel_median": round(statistics.median(times) / megapixels, 5),
    }


def time_loop(source: str, cache_dir: str | None, epochs: int) -> dict:
    """A few epochs of the ``full`` profile on the real fluorescence training split."""
    from s2l_core import data, scribbles
    from s2l_core.config import TrainConfig
    from s2l_core.samples import load_samples
    from s2l_core.train import Trainer

    dataset = data.prepare_dataset(source, cache_dir, progress=False)
    scribble_set = scribbles.prepare_scribbles(dataset, [0.3], progress=False)
    train = load_samples(dataset, dataset.ids("fluorescence", "train"), scribble_set, 0.3)
    config = TrainConfig.profile("full", epochs=epochs, ema_start=0, ema_every=1, val_every=0)
    trainer = Trainer(train, config, device="cuda", verbose=False)
    history = trainer.fit(progress=False)
    full = TrainConfig.profile("full")
    epoch_s = float(history["seconds"].iloc[1:].median())
    ema_s = float(history["ema_seconds"].iloc[1:].median())
    ema_passes = len(range(full.ema_start, full.epochs, full.ema_every))
    return {
        "epochs_timed": epochs,
        "images": len(train),
        "iterations_per_epoch": trainer.iterations_per_epoch(),
        "batch": config.batch_size,
        "epoch_s_median": round(epoch_s, 3),
        "crops_per_s_median": round(float(history["crops_per_s"].iloc[1:].median()), 1),
        "ema_pass_s_median": round(ema_s, 3),
        "ema_megapixels": round(sum(s.image.shape[1] * s.image.shape[2] for s in train) / 1e6, 2),
        "full_profile_estimate_min": round((full.epochs * epoch_s + ema_passes * ema_s) / 60, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=str(DEFAULT_MIRROR))
    parser.add_argument("--cache-dir")
    parser.add_argument("--loop-epochs", type=int, default=6)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "speed" / "gpu.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; use bench_model.py on a CPU")

    steps = [time_steps(b, 256, steps=30, warmup=5) for b in (16, 30, 64)]
    for row in steps:
        print(
            f"step  batch {row['batch']:3d}: {row['crops_per_s_median']:8.1f} crops/s  "
            f"peak {row['peak_gpu_memory_mb']:.0f} MB",
            flush=True,
        )
    inference = [time_inference(size, repeats=10) for size in ((512, 640), (1024, 1024))]
    for row in inference:
        print(f"infer {row['size']}: {row['s_per_megapixel_median']:.4f} s/MP", flush=True)
    loop = time_loop(args.source, args.cache_dir, args.loop_epochs)
    print(f"loop  {loop}", flush=True)
    report = {
        "benchmark": "gpu",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": torch.cuda.get_device_name(0),
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "notes": (
            "Training step: default UNet, bf16 autocast, channels-last, RAdam; medians of "
            "30 CUDA-event-timed steps after 5 warm-ups. Inference includes the copies to "
            "and from the GPU. The loop figures are Trainer epochs of the full profile "
            "(random crops made on the CPU in the same process), EMA pass every epoch."
        ),
        "train_step": steps,
        "inference": inference,
        "loop": loop,
    }
    write_json(args.output, report)
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
