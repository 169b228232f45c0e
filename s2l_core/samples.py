"""Training samples: an image with its scribbles, from the prepared dataset or a folder.

A :class:`TrainSample` holds the normalised image, its scribble image (the encoding of
:mod:`s2l_core.encoding`) and, where known, the full labels, used only for reporting.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s2l_core.augment import normalize_image, select_channel
from s2l_core.encoding import BACKGROUND, FOREGROUND, UNLABELLED, from_napari, validate_scribble
from s2l_core.files import IMAGE_SUFFIXES, read_image

__all__ = ["TrainSample", "check_training_set", "load_folder_samples", "load_samples"]


@dataclass
class TrainSample:
    """One training (or validation) image.

    Attributes
    ----------
    image_id : str
        A unique name.
    image : numpy.ndarray
        ``(3, H, W)`` ``float32`` from :func:`s2l_core.augment.normalize_image`.
    scribble : numpy.ndarray
        ``(H, W)`` ``uint8``: 0 background, 1 foreground, 250 unlabelled.
    labels : numpy.ndarray or None
        ``(H, W)`` full instance labels, if known: used only for reporting (pseudo-label
        accuracy, validation IoU), never for training unless the samples were made with
        ``full_masks=True``.
    """

    image_id: str
    image: np.ndarray
    scribble: np.ndarray
    labels: np.ndarray | None = None

    @classmethod
    def from_arrays(
        cls,
        image_id: str,
        image: np.ndarray,
        scribble: np.ndarray,
        labels: np.ndarray | None = None,
    ) -> TrainSample:
        """Build a sample from a raw image of any supported kind (normalised here).

        Raises
        ------
        ValueError
            If the image is of an unsupported kind, the scribble image is not a valid one
            of the image's ``(H, W)``, or ``labels`` is not an ``(H, W)`` integer or
            boolean image (which would only fail at validation, epochs later).
        """
        x = normalize_image(image)  # first: an unsupported image is the error to report
        scribble = validate_scribble(scribble, shape=x.shape[1:])
        if labels is not None:
            labels = np.asarray(labels)
            integer = labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)
            if labels.shape != x.shape[1:] or not integer:
                raise ValueError(
                    f"{image_id}: labels must be an integer (or boolean) image of the "
                    f"image's shape {x.shape[1:]}, got {labels.dtype} {labels.shape}"
                )
        return cls(image_id, x, scribble, labels)


def load_samples(
    dataset,
    ids: Sequence[str],
    scribble_set=None,
    ratio: float = 0.3,
    *,
    full_masks: bool = False,
    with_labels: bool = True,
) -> list[TrainSample]:
    """Load prepared BBBC038 images with their scribbles as training samples.

    Parameters
    ----------
    dataset : s2l_core.data.PreparedDataset
        The prepared dataset.
    ids : sequence of str
        Image ids (e.g. ``dataset.ids("fluorescence", "train")``).
    scribble_set : s2l_core.scribbles.ScribbleSet, optional
        Where the scribbles come from; required unless ``full_masks``.
    ratio : float, optional
        Scribble ratio.
    full_masks : bool, optional
        Use the full masks as labels on every pixel (the full-supervision baseline).
    with_labels : bool, optional
        Keep the full labels for reporting.

    Returns
    -------
    list of TrainSample
    """
    if scribble_set is None and not full_masks:
        raise ValueError("scribble_set is required unless full_masks=True")
    samples = []
    for image_id in ids:
        labels = dataset.labels(image_id)
        if full_masks:
            scribble = np.where(labels > 0, FOREGROUND, BACKGROUND).astype(np.uint8)
        else:
            scribble = scribble_set.scribble(image_id, ratio)
        samples.append(
            TrainSample(
                image_id,
                normalize_image(dataset.image(image_id)),
                scribble,
                labels if with_labels else None,
            )
        )
    return samples


def load_folder_samples(
    images_dir: str | os.PathLike,
    scribbles_dir: str | os.PathLike,
    *,
    scribble_format: str = "s2l",
    channel: int | None = None,
) -> list[TrainSample]:
    """Load a user's images with their scribbles (same file stem) as training samples.

    Parameters
    ----------
    images_dir : str or os.PathLike
        Images of any supported kind (PNG, TIFF, JPEG; grey, RGB, RGBA; 8/16-bit).
    scribbles_dir : str or os.PathLike
        One scribble image per annotated image, named ``<image stem>.png`` (or
        ``.tif``). Images without a scribble file, and scribble files that mark no
        pixel, are skipped and listed on stderr.
    scribble_format : {"s2l", "napari"}, optional
        ``"s2l"``: 0 background, 1 foreground, 250 unlabelled; ``"napari"``: napari or
        ilastik labels, 0 unlabelled, 1 background, 2 foreground.
    channel : int, optional
        Take this channel of multi-channel images
        (:func:`s2l_core.augment.select_channel`), e.g. the nuclear stain.

    Returns
    -------
    list of TrainSample

    Raises
    ------
    FileNotFoundError, ValueError
        Missing folders, no annotated image, unreadable files or scribbles that do not
        fit their image (the message names the file).
    """

    if scribble_format not in ("s2l", "napari"):
        raise ValueError(f"scribble_format must be 's2l' or 'napari', got {scribble_format!r}")
    images_dir, scribbles_dir = Path(images_dir), Path(scribbles_dir)
    for folder in (images_dir, scribbles_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"folder not found: {folder}")
    samples, unscribbled, blank = [], [], []
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        candidates = [scribbles_dir / f"{path.stem}{s}" for s in (".png", ".tif", ".tiff")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            unscribbled.append(path.name)
            continue
        image = read_image(path)
        raw = read_image(found[0])
        try:
            # from_arrays checks the image's kind before the scribbles' shape.
            scribble = from_napari(raw) if scribble_format == "napari" else raw
            sample = TrainSample.from_arrays(path.stem, select_channel(image, channel), scribble)
        except ValueError as err:  # the image's kind or the scribbles: name both files
            raise ValueError(f"{path} (scribbles {found[0].name}): {err}") from err
        if (sample.scribble == UNLABELLED).all():
            blank.append(found[0].name)
        else:
            samples.append(sample)
    for names, why in (
        (unscribbled, f"have no scribble file in {scribbles_dir}"),
        (blank, "are scribble files that mark no pixel"),
    ):
        if names and samples:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            print(f"skipped {len(names)} image(s) that {why}: {shown}", file=sys.stderr)
    if not samples and blank:
        raise ValueError(
            f"every scribble file in {scribbles_dir} leaves all pixels unlabelled "
            f"({', '.join(blank[:5])}); draw strokes on some nuclei and on the background"
        )
    if not samples:
        raise ValueError(
            f"no image in {images_dir} has a scribble file (same name, .png/.tif) in "
            f"{scribbles_dir}"
        )
    return samples


def check_training_set(samples: Sequence[TrainSample]) -> None:
    """Check a set of training samples before any training.

    Raises
    ------
    ValueError
        No sample; two samples of one id; an image and scribble image whose shapes do
        not fit; or scribbles that cannot teach anything: the loss on scribbles needs
        foreground and background pixels somewhere in the set.
    """
    if not samples:
        raise ValueError("no training samples")
    ids = [s.image_id for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("training sample ids must be unique")
    for s in samples:
        if s.image.ndim != 3 or s.image.shape[1:] != s.scribble.shape:
            raise ValueError(
                f"sample {s.image_id}: image {s.image.shape} and scribble "
                f"{s.scribble.shape} do not fit"
            )
    fg = sum(int(np.count_nonzero(s.scribble == FOREGROUND)) for s in samples)
    bg = sum(int(np.count_nonzero(s.scribble == BACKGROUND)) for s in samples)
    if fg and bg:
        return
    missing = " and ".join(
        name for name, n in (("foreground (1)", fg), ("background (0)", bg)) if not n
    )
    raise ValueError(
        f"the scribbles of the {len(samples)} training image(s) mark no {missing} pixel, "
        "so the network cannot learn to tell nuclei from background; draw strokes on "
        "some nuclei and on the background around them"
    )
