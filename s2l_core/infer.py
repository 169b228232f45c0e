"""Whole-image inference: any size, padded (never cropped), tiled when large.

Three pieces that compose: :func:`predict_tiled` (one pass of the network over an image
of any size), :func:`predict_dihedral` (test-time augmentation over any predictor) and
:func:`predict_rescaled` (any predictor on a resampled image); :func:`predict_foreground`
puts them together. Used by the training loop (EMA pass, validation) and by
:mod:`s2l_core.predict`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIHEDRAL",
    "TILE",
    "autocast_context",
    "dihedral",
    "predict_batch",
    "predict_dihedral",
    "predict_foreground",
    "predict_rescaled",
    "predict_tiled",
    "undo_dihedral",
]

#: The eight symmetries of the square, as ``(quarter turns, mirrored)``: what
#: ``predict_foreground(tta=True)`` averages over.
DIHEDRAL: tuple[tuple[int, bool], ...] = tuple((r, m) for m in (False, True) for r in range(4))


#: Side of the largest image a network sees whole (:func:`predict_tiled`): larger images
#: are cut into tiles.
TILE = 1024


def dihedral(array: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    """Turn the last two axes of ``array`` by ``turns`` quarter turns (counter-clockwise),
    then mirror them left to right when ``mirrored``; undone by :func:`undo_dihedral`."""
    out = np.rot90(array, turns, axes=(-2, -1))
    return out[..., ::-1] if mirrored else out


def undo_dihedral(array: np.ndarray, turns: int, mirrored: bool) -> np.ndarray:
    """The inverse of :func:`dihedral` with the same ``turns`` and ``mirrored``."""
    if mirrored:
        array = array[..., ::-1]
    return np.rot90(array, -turns, axes=(-2, -1))


def autocast_context(device: torch.device, enabled: bool = True, cpu_bf16: bool = False):
    """Mixed precision: on CUDA when ``enabled`` (bfloat16 where supported, else
    float16); on the CPU bfloat16 when ``cpu_bf16`` (see
    :func:`s2l_core.runtime.cpu_bf16_native`); otherwise nothing."""
    if device.type == "cpu" and cpu_bf16:
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def _forward_padded(model: torch.nn.Module, x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Foreground probability of ``x`` ``(N, C, H, W)``; pads by reflection to ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    logits = model(x)
    return torch.softmax(logits.float(), dim=1)[:, 1, :h, :w]


def _check_scale(scale: float, shape: tuple[int, ...]) -> float:
    """``scale`` as a float; ValueError unless positive, finite and at least one pixel."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating)):
        raise ValueError(f"scale must be a number, got {scale!r}")
    scale = float(scale)
    if not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if min(shape) * scale < 1:
        raise ValueError(f"scale {scale} shrinks an image of shape {tuple(shape)} below a pixel")
    return scale


def _check_tile(tile: int, overlap: int) -> None:
    """Refuse tiles that keep no centre (they used to leave the prediction empty)."""
    whole = (int, np.integer)
    if any(isinstance(v, bool) or not isinstance(v, whole) for v in (tile, overlap)):
        raise ValueError(f"tile and overlap must be whole numbers, got {tile!r} and {overlap!r}")
    if overlap < 0 or tile <= 2 * overlap:
        raise ValueError(
            f"tile must exceed twice the overlap (each tile keeps its centre, tile - 2 * "
            f"overlap pixels), and overlap must be >= 0; got tile={tile}, overlap={overlap}"
        )


@torch.no_grad()
def predict_tiled(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    tile: int = TILE,
    overlap: int = 64,
    amp: bool = True,
    channels_last: bool = True,
    cpu_bf16: bool = False,
) -> np.ndarray:
    """Foreground probability of a normalised image, as it is: one pass of the network.

    The image is padded by reflection to the network's size multiple and the padding is
    cut off again, so border pixels are predicted like any other. Images larger than
    ``tile`` on a side are cut into overlapping tiles whose centres are kept.

    Parameters
    ----------
    model : torch.nn.Module
        A segmentation network with two output classes and ``size_multiple``; put into
        eval mode here (and restored afterwards).
    image : numpy.ndarray
        ``(3, H, W)`` ``float32`` from :func:`s2l_core.augment.normalize_image`.
    device : torch.device or str, optional
        Where to compute.
    tile, overlap : int, optional
        Tile side and overlap for large images: each tile keeps its centre,
        ``tile - 2 * overlap`` pixels on a side, so ``tile`` must exceed ``2 * overlap``.
    amp : bool, optional
        Mixed precision on CUDA.
    channels_last : bool, optional
        Channels-last memory format.
    cpu_bf16 : bool, optional
        bfloat16 autocast on the CPU (worth it only where
        :func:`s2l_core.runtime.cpu_bf16_native`).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``float32`` foreground probability.

    Raises
    ------
    ValueError
        If ``tile`` and ``overlap`` are not whole numbers with ``tile > 2 * overlap >= 0``.
    """
    _check_tile(tile, overlap)
    device = torch.device(device)
    multiple = int(getattr(model, "size_multiple", 32))
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h, w = x.shape[-2:]
        with autocast_context(device, amp, cpu_bf16):
            if h <= tile and w <= tile:
                return _forward_padded(model, x, multiple)[0].cpu().numpy()
            out = torch.zeros((h, w), dtype=torch.float32)
            step = tile - 2 * overlap
            for y in range(0, h, step):
                for x0 in range(0, w, step):
                    ya, xa = max(y - overlap, 0), max(x0 - overlap, 0)
                    yb, xb = min(y + step + overlap, h), min(x0 + step + overlap, w)
                    prob = _forward_padded(model, x[..., ya:yb, xa:xb], multiple)[0].cpu()
                    ye, xe = min(y + step, h), min(x0 + step, w)
                    out[y:ye, x0:xe] = prob[y - ya : ye - ya, x0 - xa : xe - xa]
            return out.numpy()
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_batch(
    model: torch.nn.Module,
    images: list[np.ndarray],
    *,
    device: torch.device | str = "cpu",
    amp: bool = True,
    channels_last: bool = True,
    cpu_bf16: bool = False,
) -> list[np.ndarray]:
    """Foreground probabilities of several normalised images of one size, in one pass.

    What :func:`predict_tiled` gives for each image alone (one tile, no tiling), computed
    as one batch: on a GPU the EMA pass of training predicts the training images this
    way, a batch of equal-sized images at a time. In eval mode the network treats every
    image of a batch on its own, so the results equal the one-by-one ones up to float
    rounding.

    Parameters
    ----------
    model : torch.nn.Module
        As :func:`predict_tiled`.
    images : list of numpy.ndarray
        ``(3, H, W)`` ``float32`` images, all of one shape.
    device, amp, channels_last, cpu_bf16
        As :func:`predict_tiled`.

    Returns
    -------
    list of numpy.ndarray
        ``(H, W)`` ``float32`` foreground probability of each image, in order.

    Raises
    ------
    ValueError
        If ``images`` is empty or its images differ in shape.
    """
    if not images:
        raise ValueError("predict_batch needs at least one image")
    shapes = {tuple(np.shape(image)) for image in images}
    if len(shapes) > 1:
        raise ValueError(f"predict_batch takes images of one shape, got {sorted(shapes)}")
    device = torch.device(device)
    multiple = int(getattr(model, "size_multiple", 32))
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images]))
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp, cpu_bf16):
            probs = _forward_padded(model, x, multiple).cpu().numpy()
        return list(probs)
    finally:
        model.train(was_training)


def predict_dihedral(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    *,
    identity: np.ndarray | None = None,
) -> np.ndarray:
    """Test-time augmentation: the mean of ``predict`` over the eight turns and mirror
    images of ``image`` (:data:`DIHEDRAL`), each turned back.

    Parameters
    ----------
    predict : callable
        ``(3, H, W)`` image to ``(H, W)`` probability, e.g. :func:`predict_tiled` with
        its model and options bound.
    image : numpy.ndarray
        ``(3, H, W)`` normalised image.
    identity : numpy.ndarray, optional
        ``predict(image)``, already made (e.g. to measure the nuclei): it serves as the
        first view instead of being predicted again.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``float32``.

    Raises
    ------
    ValueError
        If ``identity`` has a shape other than the image's.
    """
    if identity is not None and identity.shape != image.shape[-2:]:
        raise ValueError(f"identity has shape {identity.shape}, the image {image.shape[-2:]}")
    total = np.zeros(image.shape[-2:], dtype=np.float64)
    for turns, mirrored in DIHEDRAL:
        if identity is not None and (turns, mirrored) == (0, False):
            prob = identity
        else:
            prob = predict(dihedral(image, turns, mirrored))
        total += undo_dihedral(prob, turns, mirrored)
    return (total / len(DIHEDRAL)).astype(np.float32)


def predict_rescaled(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    scale: float,
    magnify: str = "bicubic",
) -> np.ndarray:
    """``predict`` of ``image`` magnified by ``scale``, back at the image's own size.

    The image is magnified by bicubic interpolation, which keeps the borders of small
    nuclei sharper than bilinear, or shrunk by antialiased bilinear interpolation; the
    probability is resampled back bilinearly (antialiased when it shrinks).

    Parameters
    ----------
    predict : callable
        ``(3, H, W)`` image to ``(H, W)`` probability.
    image : numpy.ndarray
        ``(3, H, W)`` normalised image.
    scale : float
        The magnification: the network sees nuclei ``scale`` times wider.
    magnify : {"bicubic", "bilinear"}, optional
        The interpolation that magnifies (``scale > 1``).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``float32`` in [0, 1].

    Raises
    ------
    ValueError
        If ``scale`` is not a positive finite number, or shrinks the image below a pixel,
        or ``magnify`` is neither interpolation.
    """
    if magnify not in ("bicubic", "bilinear"):
        raise ValueError(f"magnify must be 'bicubic' or 'bilinear', not {magnify!r}")
    scale = _check_scale(scale, image.shape[-2:])
    if scale == 1.0:
        return predict(image)
    h, w = image.shape[-2:]
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if scale > 1:
        x = F.interpolate(x, size=size, mode=magnify, align_corners=False)
    else:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    prob = predict(x[0].numpy())
    back = F.interpolate(
        torch.from_numpy(prob)[None, None], size=(h, w), mode="bilinear",
        align_corners=False, antialias=scale > 1,
    )  # fmt: skip
    return back[0, 0].clamp_(0.0, 1.0).numpy()  # resampling may step past 1 by a rounding


def predict_foreground(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    tile: int = TILE,
    overlap: int = 64,
    amp: bool = True,
    channels_last: bool = True,
    scale: float = 1.0,
    cpu_bf16: bool = False,
    tta: bool = False,
) -> np.ndarray:
    """Foreground probability of a whole normalised image, at its own size.

    :func:`predict_tiled` (padding, tiles), under :func:`predict_dihedral` with ``tta``
    (the mean over the eight turns and mirror images: eight times the work, a smoother
    and more symmetric prediction), under :func:`predict_rescaled` with ``scale`` other
    than 1 (the views of ``tta`` are taken of the resampled image).

    Parameters
    ----------
    model, image, device, tile, overlap, amp, channels_last, cpu_bf16
        As :func:`predict_tiled`.
    scale : float, optional
        Resampling factor: the network sees the image ``scale`` times larger (nuclei
        ``scale`` times wider). See :func:`s2l_core.predict.auto_scale`.
    tta : bool, optional
        Average over the eight symmetries of the square.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``float32`` foreground probability.

    Raises
    ------
    ValueError
        If ``scale`` is not a positive finite number, or shrinks the image below one
        pixel; if ``tile`` and ``overlap`` are not whole numbers with
        ``tile > 2 * overlap >= 0``.
    """
    _check_tile(tile, overlap)  # before any work; the scale is predict_rescaled's first check
    plain = functools.partial(
        predict_tiled, model, device=device, tile=tile, overlap=overlap, amp=amp,
        channels_last=channels_last, cpu_bf16=cpu_bf16,
    )  # fmt: skip
    view = functools.partial(predict_dihedral, plain) if tta else plain
    return predict_rescaled(view, image, scale)
