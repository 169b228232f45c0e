"""Benchmark: a training batch of augmented crops, one crop at a time vs all at once.

Times, for a batch of 16 crops of 256×256 (the training loop's), the two renderers of
:mod:`s2l_core.augment` on the same random parameters:

- ``per-crop``: :func:`~s2l_core.augment.random_crops`, today's path in the training
  loop: each crop's sampling grid in numpy, its own ``grid_sample`` (or exact gather),
  its own intensity steps, on the CPU;
- ``batched``: :func:`~s2l_core.augment.draw_crop_params` and
  :func:`~s2l_core.augment.render_crops` from a :class:`~s2l_core.augment.CropSource`
  that holds the images on the device: one ``grid_sample`` for image and EMA map, one for
  the labels, the intensity steps batched.

Images: synthetic BBBC038-like sizes (520×696, 256×256, and a batch mixing the two), or,
with ``--real N``, N training images of the prepared BBBC038 dataset (a random batch of
them each repeat). Augmentations: the training default (``TrainConfig().augment``: zoom,
rotation, flips, brightness/contrast, illumination), plain crops (``augment=False``), and
everything on (plus gamma, blur, noise), all with EMA maps (pseudo-labels on). The two
paths run alternately, each repeat from the same generator state; the medians over the
repeats are reported side by side, with the largest difference between their crops.

On a machine with CUDA it also times the batched renderer on the GPU (source on the GPU,
synchronised) against the per-crop path plus :func:`~s2l_core.augment.crops_to_device`;
without CUDA that part is skipped and the results say so.

Run from the repository root::

    .venv/bin/python benchmarks/bench_augment.py                 # about a minute
    .venv/bin/python benchmarks/bench_augment.py --real 64       # also real images

The figures are written to ``benchmarks/results/speed/augment.json`` and ``.md``. On a
shared machine they are noisy: the load average before and after is recorded with them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from s2l_core.augment import (
    AugmentConfig,
    CropSource,
    crops_to_device,
    draw_crop_params,
    random_crops,
    render_crops,
)
from s2l_core.config import TrainConfig
from s2l_core.files import write_json, write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "speed" / "augment.json"
BATCH, CROP = 16, 256


def _synthetic(shapes: list[tuple[int, int]], seed: int) -> tuple[list, list, list]:
    """Normalised-looking images (blobs on a ramp, with noise), scribbles, EMA maps."""
    gen = np.random.default_rng(seed)
    images, scribbles, emas = [], [], []
    for h, w in shapes:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        blobs = np.zeros((h, w), np.float32)
        for cy, cx in gen.random((40, 2)) * (h, w):
            blobs += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 60.0)
        grey = np.clip(blobs + 0.1 * xx / w + 0.05 * gen.random((h, w), np.float32), 0, 1)
        images.append(np.repeat(grey[None], 3, axis=0).astype(np.float32))
        scribble = np.full((h, w), 250, np.uint8)
        scribble[blobs > 0.8] = 1
        scribble[(blobs < 0.05) & (gen.random((h, w)) < 0.05)] = 0
        scribbles.append(scribble)
        emas.append(np.clip(blobs, 0, 1).astype(np.float32))
    return images, scribbles, emas


def _real(n: int) -> tuple[list, list, list]:
    """The first ``n`` training images of the prepared BBBC038 dataset, normalised, with
    their masks as labels (the timing does not depend on which pixels are labelled)."""
    from s2l_core.augment import normalize_image
    from s2l_core.data import PreparedDataset, default_cache_dir

    dataset = PreparedDataset(default_cache_dir() / "bbbc038")
    ids = dataset.ids(split="train")[:n]
    images = [normalize_image(dataset.image(i)) for i in ids]
    scribbles = [(dataset.labels(i) > 0).astype(np.uint8) for i in ids]
    emas = [np.full(s.shape, 0.5, np.float32) for s in scribbles]
    return images, scribbles, emas


def _compare(reference: dict, batched: dict) -> np.ndarray:
    """Largest image difference, largest EMA difference where both paths call the pixel
    valid (where one does not, its EMA value is zeroed), and the fraction of pixels
    whose scribble or valid flag differ."""
    batched = {k: v.cpu() for k, v in batched.items()}
    image = (reference["image"] - batched["image"]).abs().max().item()
    same = reference["valid"] == batched["valid"]
    ema = (reference["ema"] - batched["ema"]).abs()[same].max().item()
    labels = (reference["scribble"] != batched["scribble"]) | ~same
    return np.array([image, ema, labels.float().mean().item()])


def _executable() -> str:
    """The Python that runs this, relative to the repository where it lies inside it."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(HERE.parent))
    except ValueError:
        return str(exe)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_crop(chosen, seed, cfg, augment, device) -> tuple[float, dict]:
    """Seconds of random_crops (and, on CUDA, the copy to the GPU), and its crops."""
    start = time.perf_counter()
    crops = random_crops(*chosen, np.random.default_rng(seed), cfg, augment=augment)
    if device.type == "cuda":  # what the training loop then does
        crops_to_device(crops, device, channels_last=True, with_ema=True)
        _sync(device)
    return time.perf_counter() - start, crops


def _batched(source, pick, seed, cfg, augment, device) -> tuple[float, float, dict]:
    """Seconds of draw_crop_params + render_crops, of the drawing alone, and the crops."""
    start = time.perf_counter()
    shapes = [source.shape(i) for i in pick]
    params = draw_crop_params(shapes, np.random.default_rng(seed), cfg, augment=augment)
    drawn = time.perf_counter()
    crops = render_crops(params, source, pick, with_ema=True)
    _sync(device)
    return time.perf_counter() - start, drawn - start, crops


def run_case(
    name: str,
    data: tuple[list, list, list],
    cfg: AugmentConfig,
    augment: bool,
    repeats: int,
    device: torch.device,
) -> dict[str, Any]:
    """Time both paths on ``repeats`` batches (plus one to warm up)."""
    images, scribbles, emas = data
    t = time.perf_counter()
    source = CropSource(images, scribbles, device, emas)
    _sync(device)
    setup_s = time.perf_counter() - t
    pick_rng = np.random.default_rng(0)
    per_crop, batched, draw, worst = [], [], [], np.zeros(3)
    for r in range(repeats + 1):
        pick = pick_rng.choice(len(images), size=BATCH, replace=len(images) < BATCH)
        chosen = ([images[i] for i in pick], [scribbles[i] for i in pick], [emas[i] for i in pick])

        if r % 2:  # alternate which goes first
            a, reference = _per_crop(chosen, r, cfg, augment, device)
            b, d, crops = _batched(source, pick, r, cfg, augment, device)
        else:
            b, d, crops = _batched(source, pick, r, cfg, augment, device)
            a, reference = _per_crop(chosen, r, cfg, augment, device)
        if r == 0:
            continue  # warm-up
        per_crop.append(a)
        batched.append(b)
        draw.append(d)
        worst = np.maximum(worst, _compare(reference, crops))
    a, b = statistics.median(per_crop), statistics.median(batched)
    row = {
        "images": name,
        "augment": cfg_name(cfg, augment),
        "device": str(device),
        "per_crop_ms_median": round(a * 1e3, 2),
        "batched_ms_median": round(b * 1e3, 2),
        "per_crop_crops_per_s": round(BATCH / a, 1),
        "batched_crops_per_s": round(BATCH / b, 1),
        "speed_ratio_batched_over_per_crop": round(a / b, 2),
        "per_crop_ms_best": round(min(per_crop) * 1e3, 2),
        "batched_ms_best": round(min(batched) * 1e3, 2),
        "draw_ms_median": round(statistics.median(draw) * 1e3, 3),
        "source_setup_s": round(setup_s, 3),
        "max_abs_image_difference": float(f"{worst[0]:.3g}"),
        "max_abs_ema_difference_where_valid_agrees": float(f"{worst[1]:.3g}"),
        "max_label_mismatch_fraction": float(f"{worst[2]:.3g}"),
        "repeats": repeats,
    }
    print(
        f"{row['images']:>22} {row['augment']:>10} {row['device']:>6}: per-crop "
        f"{row['per_crop_crops_per_s']:7.1f} crops/s, batched {row['batched_crops_per_s']:7.1f} "
        f"crops/s (x{row['speed_ratio_batched_over_per_crop']}), max |d| image {worst[0]:.1e}, "
        f"EMA {worst[1]:.1e}, labels {worst[2]:.1e}",
        flush=True,
    )
    return row


def cfg_name(cfg: AugmentConfig, augment: bool) -> str:
    if not augment:
        return "plain"
    return "everything" if cfg.noise[1] > 0 else "default"


def _markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Augmented crops: one at a time vs one batch",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu_count']} CPU cores, {m['threads']} torch thread(s), torch "
        f"{m['torch']}, {m['platform']}  ",
        f"Date: {result['timestamp']}",
        "",
        result["what"],
        "",
        "| images | augmentation | device | per-crop crops/s | batched crops/s | batched / "
        "per-crop | per-crop ms (best) | batched ms (best) | max abs diff image / EMA | "
        "labels differing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['images']} | {r['augment']} | {r['device']} | {r['per_crop_crops_per_s']} | "
            f"{r['batched_crops_per_s']} | {r['speed_ratio_batched_over_per_crop']} | "
            f"{r['per_crop_ms_median']} ({r['per_crop_ms_best']}) | {r['batched_ms_median']} "
            f"({r['batched_ms_best']}) | {r['max_abs_image_difference']:.2g} / "
            f"{r['max_abs_ema_difference_where_valid_agrees']:.2g} | "
            f"{r['max_label_mismatch_fraction']:.2g} |"
        )
    lines += ["", result["notes"], "", f"CUDA: {result['cuda']}", ""]
    load = result["load_average_1min"]
    lines.append(f"Load average (1 min) before and after: {load[0]} and {load[1]}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed batches per case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--real", type=int, default=0, help="also N real BBBC038 images")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default = TrainConfig().augment
    everything = replace(
        default, gamma=(0.7, 1.4), blur=(0.5, 1.5), noise=(0.01, 0.05), p_gamma=0.5
    )
    sets = {
        "16 x 520x696": _synthetic([(520, 696)] * 4, 1),
        "16 x 256x256": _synthetic([(256, 256)] * 4, 2),
        "8 x 520x696 + 8 x 256x256": _synthetic([(520, 696)] * 2 + [(256, 256)] * 2, 3),
    }
    if args.real:
        sets[f"BBBC038 train ({args.real} images)"] = _real(args.real)
    cases = [(default, True), (default, False), (everything, True)]
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
        cuda = f"timed on {torch.cuda.get_device_name(0)} (rows with device cuda)"
    else:
        cuda = (
            "not available on this machine: the GPU rows are missing. The code path exists "
            "(CropSource on 'cuda', render_crops there; per-crop rows then include "
            "crops_to_device); run this script on a GPU machine to fill them in."
        )
    load_before = os.getloadavg()[0]
    rows = []
    for device in devices:
        for name, data in sets.items():
            for cfg, augment in cases:
                rows.append(run_case(name, data, cfg, augment, args.repeats, device))
    result = {
        "benchmark": "augmented training crops: per-crop (random_crops) vs batched (render_crops)",
        "command": " ".join([_executable(), *sys.argv]),
        "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "what": (
            f"A batch of {BATCH} crops of {CROP}x{CROP} with EMA maps, the same random "
            "parameters for both paths. 'default' is TrainConfig().augment (zoom, rotation, "
            "flips, brightness/contrast, illumination), 'plain' augment=False, 'everything' "
            "adds gamma, blur and noise. Synthetic sets hold 4 images of each size, picked "
            "16 at a time with repeats."
        ),
        "notes": (
            "Medians (and best) of the timed batches after one warm-up, the two paths "
            "alternating from the same generator state. Per-crop: random_crops (drawing "
            "included). Batched: draw_crop_params + render_crops from a CropSource made "
            "once (source_setup_s in the JSON). The last two columns compare the two paths' "
            "crops over all timed batches: the largest difference of the image and of the "
            "EMA map (where both paths call the pixel valid), and the largest fraction of a "
            "batch's pixels whose scribble or valid flag differ (a coordinate within ~1e-4 "
            "pixel of the midpoint between two pixels, rounded the other way)."
        ),
        "cuda": cuda,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "results": rows,
    }
    write_json(args.out, result)
    write_text(args.out.with_suffix(".md"), _markdown(result))
    print(f"written to {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
