"""Reading and writing files safely: atomic writes and image input/output.

Every file the package writes goes through :func:`atomic_path`: the content is written
to a temporary file in the destination folder and renamed over the destination only once
it is complete, so a crash or an interrupted run never leaves a half-written file where a
finished one is expected. :func:`atomic_dir` does the same for whole folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "atomic_dir",
    "atomic_path",
    "read_image",
    "read_json",
    "write_image",
    "write_json",
]

PathLike = str | os.PathLike
#: File suffixes read as images (by :func:`read_image`).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` when the block succeeds.

    The temporary file lies in the same folder as ``path`` (so the final rename is
    atomic on POSIX file systems) and keeps the suffix of ``path`` (so libraries that
    choose a format by suffix still work). If the block raises, the temporary file is
    removed and ``path`` is left as it was.

    Parameters
    ----------
    path : str or os.PathLike
        The destination file.

    Yields
    ------
    pathlib.Path
        Where to write the content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder that replaces the folder ``path`` when the block succeeds.

    An existing folder at ``path`` is replaced only after the new one is complete; if the
    block raises, the temporary folder is deleted and ``path`` is left as it was.

    Parameters
    ----------
    path : str or os.PathLike
        The destination folder.

    Yields
    ------
    pathlib.Path
        An empty folder to fill.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_json(path: PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_image(path: PathLike) -> np.ndarray:
    """Read an image file into a numpy array, keeping its bit depth.

    PNG, JPEG, BMP and TIFF are supported. 16-bit images stay ``uint16``; TIFF files are
    read with :mod:`tifffile`, so multi-sample and 16-bit TIFFs keep their values.
    Palette images become RGB (RGBA with transparency), grey with alpha becomes grey, and
    CMYK or other colour spaces become RGB.

    Parameters
    ----------
    path : str or os.PathLike
        The image file.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` for grey or label images, ``(H, W, C)`` for colour images.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be decoded as an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            return np.asarray(tifffile.imread(path))
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L"):
                return np.array(im, dtype=np.uint16)
            if im.mode == "I":
                return np.array(im, dtype=np.int64).astype(np.uint32)
            if im.mode in ("P", "PA"):
                im = im.convert("RGBA" if im.mode == "PA" else "RGB")
            elif im.mode in ("LA", "La"):  # grey with alpha: the grey (alpha dropped)
                im = im.convert("L")
            elif im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):  # a colour image, as RGB
                im = im.convert("RGB")
            return np.array(im)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot read {path} as an image: {err}") from err


def write_image(path: PathLike, array: np.ndarray, *, compress_level: int = 1) -> None:
    """Write a 2-D or RGB(A) array as PNG or TIFF, chosen by suffix, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination; ``.png`` or ``.tif``/``.tiff``.
    array : numpy.ndarray
        ``(H, W)`` of ``uint8``/``uint16`` (PNG) or any integer dtype (TIFF), or
        ``(H, W, 3|4)`` of ``uint8``.
    compress_level : int, optional
        PNG compression (0–9); 1 is fast and still compact for masks.

    Raises
    ------
    ValueError
        If the array's shape or dtype cannot be stored in the requested format.
    """
    path = Path(path)
    array = np.asarray(array)
    suffix = path.suffix.lower()
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"cannot write an array of shape {array.shape} as an image: {path}")
    with atomic_path(path) as tmp:
        if suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, array, compression="zlib")
        elif suffix == ".png":
            if array.dtype == np.uint8 or (array.dtype == np.uint16 and array.ndim == 2):
                Image.fromarray(array).save(tmp, format="PNG", compress_level=compress_level)
            else:
                raise ValueError(
                    f"PNG holds uint8 images or 2-D uint16 images, not {array.dtype} of shape "
                    f"{array.shape}; use a .tif path for other label types: {path}"
                )
        else:
            raise ValueError(f"unsupported image suffix {path.suffix!r} (use .png or .tif): {path}")
