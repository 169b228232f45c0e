"""The scribble encoding: what the values of a scribble image mean, and converters.

A scribble image is ``(H, W)`` ``uint8`` (the convention of the original code):
:data:`BACKGROUND` 0, :data:`FOREGROUND` 1, :data:`UNLABELLED` 250; the training losses
ignore 250. napari and ilastik paint label layers the other way round (0 unlabelled,
1 background, 2 foreground): :func:`to_napari` and :func:`from_napari` convert.
"""

from __future__ import annotations

import os

import numpy as np

from s2l_core.files import read_image, write_image

__all__ = [
    "BACKGROUND",
    "FOREGROUND",
    "NAPARI_BACKGROUND",
    "NAPARI_FOREGROUND",
    "NAPARI_UNLABELLED",
    "UNLABELLED",
    "from_napari",
    "read_scribble",
    "save_scribble",
    "to_napari",
    "validate_scribble",
]

BACKGROUND = 0
FOREGROUND = 1
UNLABELLED = 250
#: napari / ilastik label-layer convention: 0 unlabelled, 1 background, 2 foreground.
NAPARI_UNLABELLED, NAPARI_BACKGROUND, NAPARI_FOREGROUND = 0, 1, 2


def validate_scribble(scribble: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Check a scribble image and return it as ``uint8``.

    Parameters
    ----------
    scribble : numpy.ndarray
        ``(H, W)`` integer array with values in {0, 1, 250}.
    shape : tuple of int, optional
        Required ``(H, W)``, e.g. the shape of the image it annotates.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``uint8``.

    Raises
    ------
    ValueError
        If it is not 2-D, not of integer dtype, of the wrong shape, or holds values other
        than 0 (background), 1 (foreground) and 250 (unlabelled).
    """
    return _validated(scribble, shape, (BACKGROUND, FOREGROUND, UNLABELLED), "scribble image")


def _validated(array, shape, allowed: tuple[int, ...], what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D (H, W), got shape {array.shape}")
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must have an integer dtype, got {array.dtype}")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {array.shape}, expected {tuple(shape)}")
    values = np.unique(array)
    unknown = np.setdiff1d(values, allowed)
    if unknown.size:
        raise ValueError(
            f"{what} holds values {unknown[:5].tolist()} besides the allowed {list(allowed)}"
        )
    return array.astype(np.uint8, copy=False)


def to_napari(scribble: np.ndarray) -> np.ndarray:
    """Convert a scribble image to the napari / ilastik label-layer convention.

    Parameters
    ----------
    scribble : numpy.ndarray
        ``(H, W)`` scribble image (0 background, 1 foreground, 250 unlabelled).

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``uint8``: 0 unlabelled, 1 background, 2 foreground.
    """
    scribble = validate_scribble(scribble)
    out = np.full(scribble.shape, NAPARI_UNLABELLED, dtype=np.uint8)
    out[scribble == BACKGROUND] = NAPARI_BACKGROUND
    out[scribble == FOREGROUND] = NAPARI_FOREGROUND
    return out


def from_napari(labels: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Convert a napari / ilastik label layer into a scribble image.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` integer array: 0 unlabelled, 1 background, 2 foreground.
    shape : tuple of int, optional
        Required ``(H, W)``.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``uint8`` scribble image (0 background, 1 foreground, 250 unlabelled).

    Raises
    ------
    ValueError
        If the layer is not 2-D, not integer, of the wrong shape, or holds a label other
        than 0, 1 and 2 (for example a third class).
    """
    labels = _validated(
        labels,
        shape,
        (NAPARI_UNLABELLED, NAPARI_BACKGROUND, NAPARI_FOREGROUND),
        "napari/ilastik label layer",
    )
    out = np.full(labels.shape, UNLABELLED, dtype=np.uint8)
    out[labels == NAPARI_BACKGROUND] = BACKGROUND
    out[labels == NAPARI_FOREGROUND] = FOREGROUND
    return out


def save_scribble(path: str | os.PathLike, scribble: np.ndarray) -> None:
    """Write a scribble image as an 8-bit PNG, atomically (after validating it)."""
    write_image(path, validate_scribble(scribble))


def read_scribble(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read and validate a scribble PNG written by :func:`save_scribble`."""
    return validate_scribble(read_image(path), shape)
