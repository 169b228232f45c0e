"""Prediction: checkpoints to label images, one image or a whole folder.

- :func:`load_model` rebuilds a network from a checkpoint (``weights_only`` loading);
- :func:`foreground_to_instances` turns a foreground probability into instance labels:
  connected components, or a distance-transform watershed that splits touching nuclei;
- :func:`predict_probability` predicts at a fixed scale or at the scale that
  :func:`auto_scale` picks from the nuclei's size (small nuclei are magnified, large
  ones shrunk);
- :class:`Preset` holds every setting of prediction; checkpoints store one, and
  :func:`predict_image`, :func:`predict_folder` and ``s2l predict`` use it;
- :func:`predict_folder` predicts every image of a folder (grey, RGB, RGBA, 8- or 16-bit,
  any size) into label images with the same file names, which napari and Fiji open as
  labels. The output folder appears only once every image is written, so a partial
  output is never mistaken for a finished one; a run that stops keeps the images it
  finished, and the same call goes on from there. Under ``torchrun`` the processes share
  the images (:mod:`s2l_core.distributed`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed
from tqdm.auto import tqdm

from s2l_core import distributed
from s2l_core.augment import normalize_image, select_channel
from s2l_core.checkpoint import load_checkpoint
from s2l_core.checks import (
    SCALE_RANGE,
    check_method,
    check_min_peak,
    check_scale,
    check_smooth,
    check_threshold,
    positive_pixels,
    whole_number,
)
from s2l_core.files import (
    IMAGE_SUFFIXES,
    UNFINISHED_RECORD,
    check_writable,
    place_dir,
    read_image,
    remove_stale,
    sha256_of,
    unfinished_dir,
    write_image,
    write_json,
)
from s2l_core.infer import TILE, predict_dihedral, predict_foreground, predict_tiled
from s2l_core.model import from_config
from s2l_core.runtime import pick_device

__all__ = [
    "AUTO_DIAMETER",
    "LOOKS",
    "LOOK_FACTOR",
    "LOOK_VIEW",
    "MAGNIFY_BELOW",
    "MANIFEST",
    "MAX_AUTO_PIXELS",
    "MAX_AUTO_SCALE",
    "MEASURE_SPLIT_DEPTH",
    "MEASURE_THRESHOLD",
    "MIN_AUTO_SCALE",
    "MIN_PEAK",
    "SCALE_RANGE",
    "SMOOTH",
    "SPLIT_DEPTH",
    "THRESHOLD",
    "FolderOutput",
    "Preset",
    "auto_scale",
    "check_min_peak",
    "check_scale",
    "check_smooth",
    "check_threshold",
    "claim_outputs",
    "foreground_to_instances",
    "labels_of",
    "list_images",
    "load_model",
    "measure_nuclei",
    "object_diameter",
    "predict_folder",
    "predict_image",
    "predict_probability",
    "record_outputs",
    "save_labels",
    "uncertainty",
]


def load_model(
    checkpoint: str | os.PathLike, device: str | torch.device = "auto", *, verbose: bool = False
) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network stored in a checkpoint.

    Parameters
    ----------
    checkpoint : str or os.PathLike
        A training or inference checkpoint of this package.
    device : str or torch.device, optional
        Where to put the model.
    verbose : bool, optional
        Say which device was chosen.

    Returns
    -------
    model : torch.nn.Module
        In eval mode, on ``device``.
    state : dict
        The checkpoint (for its configuration and metadata).

    Raises
    ------
    FileNotFoundError, ValueError
        Missing file, not a checkpoint, or weights that do not fit the stored architecture.
    """
    state = load_checkpoint(checkpoint)
    if not isinstance(device, torch.device):
        device = pick_device(device, verbose=verbose)
    try:
        model = from_config(state["model_config"])
    except ValueError as err:
        raise ValueError(f"{checkpoint}: {err}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"{checkpoint}: weights do not fit its architecture: {err}") from err
    model.to(device).eval()
    return model, state


#: Depth, in pixels of distance to the background, of the valley between two touching
#: nuclei that the watershed of :func:`foreground_to_instances` splits them at; the
#: preset's, in the network's pixels, chosen on held-out acquisition groups and their
#: images shrunk (``benchmarks/results/generalization/preset_s2l.md``).
SPLIT_DEPTH: float = 1.0

#: The preset's foreground threshold, chosen with :data:`SPLIT_DEPTH`: on images of
#: acquisitions they never saw, networks trained on scribbles reach a little past the
#: nuclei's borders, and 0.6 finds the borders better than 0.5.
THRESHOLD: float = 0.6

#: How ``scale="auto"`` splits a prediction into nuclei to measure them
#: (:func:`measure_nuclei`): the foreground threshold and split depth its rule was
#: chosen with.
MEASURE_THRESHOLD: float = 0.5
MEASURE_SPLIT_DEPTH: float = 2.0


def _drop_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Set labels with fewer than ``min_size`` pixels to 0."""
    sizes = np.bincount(labels.ravel())
    small = sizes < min_size
    small[0] = False
    return np.where(small[labels], 0, labels)


def _above(prob: np.ndarray, threshold: float, smooth: float) -> np.ndarray:
    """``(H, W)`` bool: where ``prob``, smoothed by a Gaussian of ``smooth`` pixels (none
    at 0), exceeds ``threshold``; the one rule for both instances and semantic masks."""
    level = ndi.gaussian_filter(prob.astype(np.float32), smooth) if smooth else prob
    return level > threshold


def foreground_to_instances(
    prob: np.ndarray,
    *,
    threshold: float = 0.5,
    method: str = "watershed",
    min_size: int = 16,
    split_depth: float = SPLIT_DEPTH,
    min_peak: float | None = None,
    smooth: float = 0.0,
) -> np.ndarray:
    """Instance labels from a foreground probability map.

    Parameters
    ----------
    prob : numpy.ndarray
        ``(H, W)`` foreground probability (or a binary mask).
    threshold : float, optional
        Foreground where ``prob > threshold``; in (0, 1) (:func:`check_threshold`).
    method : {"watershed", "components"}, optional
        ``"components"``: 8-connected components. ``"watershed"``: a watershed on the
        distance transform of the foreground, seeded at its maxima that stand at least
        ``split_depth`` pixels above their surroundings, which splits touching nuclei.
    min_size : int, optional
        Objects smaller than this many pixels are removed (0 or 1: none).
    split_depth : float, optional
        Depth (pixels of distance) of the valley needed between two nuclei to split them;
        positive and finite (``method="components"`` never splits).
    min_peak : float, optional
        Hysteresis: a connected foreground region is kept only where its highest
        probability exceeds ``min_peak``, and then with its whole extent down to
        ``threshold``. Faint detections (out-of-focus cytoplasm, haze) go; the borders of
        confident nuclei stay where they were. ``None`` (default) keeps every region.
        See :data:`MIN_PEAK`.
    smooth : float, optional
        Standard deviation, in pixels, of a Gaussian that smooths ``prob`` before it is
        thresholded, so that borders follow the local mean rather than single pixels;
        ``min_peak`` is still tested on ``prob`` itself. ``0`` (default) thresholds
        ``prob`` as it is. See :data:`SMOOTH`.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``uint16`` labels (``uint32`` beyond 65,535 objects), 0 background.
    """
    prob = np.asarray(prob)
    if prob.ndim != 2:
        raise ValueError(f"prob must be a 2-D (H, W) map, got shape {prob.shape}")
    check_method(method)
    threshold = check_threshold(threshold)
    check_min_peak(min_peak)
    smooth = check_smooth(smooth)
    min_size = whole_number("min_size", min_size, 0, unit="pixels")  # 0 and 1 keep all
    split_depth = positive_pixels("split_depth", split_depth)  # NaN crashed h_maxima
    fg = ndi.binary_fill_holes(_above(prob, threshold, smooth))
    regions = None  # 8-connected components of fg, once computed
    if min_size > 1 or min_peak is not None:
        regions, n = ndi.label(fg, structure=np.ones((3, 3), bool))
        if min_size > 1:
            regions = _drop_small(regions, min_size)
        if min_peak is not None and n:
            peaks = ndi.maximum(prob, labels=regions, index=np.arange(1, n + 1))
            faint = np.concatenate([[False], np.asarray(peaks) <= min_peak])
            regions = np.where(faint[regions], 0, regions)
        fg = regions > 0
    if method == "components":
        # Dropping whole components leaves the others as they were: no second labelling.
        labels = regions if regions is not None else ndi.label(fg, np.ones((3, 3), bool))[0]
    else:
        distance = ndi.distance_transform_edt(fg)
        peaks = h_maxima(ndi.gaussian_filter(distance, 1.0), split_depth)
        markers, _ = ndi.label(peaks & fg, structure=np.ones((3, 3), bool))
        labels = watershed(-distance, markers, mask=fg)
        # A component without a marker (too flat) keeps its own label.
        missing = fg & (labels == 0)
        if missing.any():
            extra, _ = ndi.label(missing, structure=np.ones((3, 3), bool))
            labels[missing] = extra[missing] + labels.max()
        if min_size > 1:
            labels = _drop_small(labels, min_size)
    labels = relabel_sequential(labels)[0]
    dtype = np.uint16 if labels.max() <= np.iinfo(np.uint16).max else np.uint32
    return labels.astype(dtype)


#: A suggested ``min_peak`` for :func:`foreground_to_instances` with networks trained on
#: scribbles: regions whose probability never exceeds 0.99 are dropped. Networks trained
#: on full masks are less confident and lose real nuclei at 0.99; 0.9 suits them
#: (``benchmarks/results/prediction/scale_fluorescence_min_peak*.md``).
MIN_PEAK: float = 0.99

#: A suggested ``smooth`` for :func:`foreground_to_instances` with networks trained on
#: scribbles: the probability is smoothed by a Gaussian of 0.75 pixels before it is
#: thresholded (``benchmarks/results/prediction/scale_fluorescence_smooth*.md``).
SMOOTH: float = 0.75

#: Nucleus diameter (pixels) that ``scale="auto"`` brings nuclei to, magnifying small
#: ones and shrinking large ones; chosen on held-out acquisition groups, their images
#: shrunk, and magnified test images (``benchmarks/results/generalization/autoscale_s2l_s0.md``).
AUTO_DIAMETER: float = 30.0

#: ``scale="auto"`` magnifies only nuclei smaller than this (pixels across): nuclei
#: between it and :data:`AUTO_DIAMETER` are left as they are, since a network trained
#: without their acquisition can lose much of them when they are magnified a little
#: (``benchmarks/results/generalization/generalization.md``, group 520x696).
MAGNIFY_BELOW: float = 20.0

#: Largest magnification that ``scale="auto"`` uses: nuclei of 7.5 pixels are brought
#: to 30.
MAX_AUTO_SCALE: float = 4.0

#: ``scale="auto"`` never magnifies an image beyond this many pixels (16.8 million, 4096
#: a side), which bounds its time and memory: a 2048 x 2048 image is magnified at most
#: twice.
MAX_AUTO_PIXELS: int = 4096 * 4096

#: Smallest scale that ``scale="auto"`` uses: nuclei up to four times ``diameter``
#: across are brought to ``diameter``.
MIN_AUTO_SCALE: float = 0.25

#: Smaller scales at which ``scale="auto"`` looks at every image again before it picks a
#: scale. A network sees only parts of nuclei far larger than those it was trained on,
#: which look like small nuclei (and would be magnified further); shrunk, it finds them
#: whole. A look counts where its nuclei, as the network saw them (diameter times
#: scale), are of a size it was trained on (:data:`LOOK_VIEW`) and measure at least
#: :data:`LOOK_FACTOR` times the diameter found so far, in the image's pixels.
LOOKS: tuple[float, ...] = (0.5, 0.25)

#: Smallest and largest diameter (pixels, as the network saw them) of the nuclei of a
#: look that counts (:data:`LOOKS`): a larger "nucleus" is a clump of small nuclei that
#: the shrinking merged.
LOOK_VIEW: tuple[float, float] = (15.0, 60.0)

#: See :data:`LOOKS`.
LOOK_FACTOR: float = 2.0

#: ``scale="auto"`` leaves an image as it is when it would resample it by less than this
#: fraction.
_NEAR_ONE = 0.1


def object_diameter(labels: np.ndarray) -> float:
    """Median equivalent diameter of the objects of a label image.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` integer labels, 0 background.

    Returns
    -------
    float
        The median over objects of ``2 sqrt(area / pi)``, in pixels; NaN when there is
        no object.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative")
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    if areas.size == 0:
        return float("nan")
    return float(np.median(2.0 * np.sqrt(areas / np.pi)))


def measure_nuclei(prob: np.ndarray, threshold: float = MEASURE_THRESHOLD) -> float:
    """Median diameter, in pixels, of the nuclei of a foreground probability, as
    ``scale="auto"`` measures them.

    The foreground above ``threshold`` is split by a distance watershed of split depth
    :data:`MEASURE_SPLIT_DEPTH` and measured by :func:`object_diameter`.

    Parameters
    ----------
    prob : numpy.ndarray
        ``(H, W)`` foreground probability.
    threshold : float, optional
        Foreground threshold, in (0, 1).

    Returns
    -------
    float
        The median equivalent diameter; NaN when there is no nucleus.
    """
    labels = foreground_to_instances(prob, threshold=threshold, split_depth=MEASURE_SPLIT_DEPTH)
    return object_diameter(labels)


def auto_scale(
    prob: np.ndarray,
    *,
    threshold: float = MEASURE_THRESHOLD,
    diameter: float = AUTO_DIAMETER,
    max_scale: float = MAX_AUTO_SCALE,
    min_scale: float = MIN_AUTO_SCALE,
    looks: Mapping[float, np.ndarray] | None = None,
    magnify_below: float = MAGNIFY_BELOW,
) -> float:
    """The scale that brings the nuclei of a prediction to ``diameter`` pixels.

    The nuclei of ``prob`` are measured (:func:`measure_nuclei`), and so are those of
    each prediction in ``looks`` (see
    :data:`LOOKS`). Nuclei under ``magnify_below`` pixels across are magnified and
    nuclei over ``diameter`` shrunk, to ``diameter`` (held between ``min_scale`` and
    ``max_scale``); nuclei between the two are left as they are, and so is a scale
    within a tenth of 1 (resampling would only blur) and an image without a nucleus.

    Parameters
    ----------
    prob : numpy.ndarray
        ``(H, W)`` foreground probability of the image (at scale 1).
    threshold : float, optional
        Foreground threshold.
    diameter : float, optional
        Nucleus diameter, in pixels, to bring the nuclei to.
    max_scale, min_scale : float, optional
        Bounds of the scale returned (``min_scale <= 1 <= max_scale``).
    looks : mapping of float to numpy.ndarray, optional
        Predictions of the same image made at smaller scales (the keys, in (0, 1)),
        resampled back to ``(H, W)``, looked at from the largest scale down. One whose
        nuclei, as the network saw them (their diameter times the scale), are of a size
        it was trained on (within :data:`LOOK_VIEW`) and measure at least
        :data:`LOOK_FACTOR` times the diameter found so far shows large nuclei that
        ``prob`` only saw in parts: its diameter counts.
    magnify_below : float, optional
        Nuclei measured smaller than this are magnified (at most to ``diameter``).

    Returns
    -------
    float
        A scale in ``[min_scale, max_scale]``.
    """
    if not (np.isfinite(diameter) and diameter > 0):
        raise ValueError(f"diameter must be a positive number of pixels, got {diameter}")
    if not (np.isfinite(max_scale) and max_scale >= 1):
        raise ValueError(f"max_scale must be at least 1, got {max_scale}")
    if not (np.isfinite(min_scale) and 0 < min_scale <= 1):
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    looks = dict(looks or {})
    for s, view in looks.items():
        if not 0 < s < 1:
            raise ValueError(f"looks must be made at scales in (0, 1), got {s}")
        if np.shape(view) != prob.shape:
            raise ValueError(f"the look at scale {s} has shape {np.shape(view)}, prob {prob.shape}")

    measured = measure_nuclei(prob, threshold)
    if not np.isfinite(measured):
        return 1.0
    for s in sorted(looks, reverse=True):
        d = measure_nuclei(looks[s], threshold)
        seen = LOOK_VIEW[0] <= d * s <= LOOK_VIEW[1]  # False for NaN
        if seen and d >= LOOK_FACTOR * measured:
            measured = d
    if min(magnify_below, diameter) <= measured <= diameter:
        return 1.0
    scale = float(np.clip(diameter / measured, min_scale, max_scale))
    return 1.0 if abs(np.log(scale)) < np.log(1 + _NEAR_ONE) else scale


@dataclass(frozen=True)
class Preset:
    """How a network's prediction becomes labels: every setting of prediction but the
    network itself.

    A checkpoint may store one (``extra["preset"]``, written by ``s2l train`` and
    ``tools/make_reference.py``); :func:`predict_image`, :func:`predict_folder`,
    ``s2l predict`` and :class:`s2l_core.annotation.AnnotationLoop` use the checkpoint's
    preset, or these defaults, for every setting they are not given. The defaults are
    the settings that score best on images of acquisitions the network never saw
    (``benchmarks/results/generalization/``). Its sizes (``split_depth``, ``min_size``,
    ``smooth``) are in the network's pixels: on an image that ``scale`` magnifies or
    shrinks they scale with it (:func:`labels_of`).

    Attributes
    ----------
    threshold : float
        Foreground threshold, in (0, 1).
    method : {"watershed", "components"}
        How the foreground is split into nuclei (:func:`foreground_to_instances`).
    split_depth : float
        Depth (pixels of distance) of the valley at which the watershed splits touching
        nuclei (:func:`foreground_to_instances`).
    min_size : int
        Smallest object kept, in pixels.
    min_peak : float
        Hysteresis level (:func:`foreground_to_instances`); 0 keeps every region.
    smooth : float
        Gaussian smoothing (pixels) of the probability before thresholding.
    scale : float or "auto"
        Magnification for the network; ``"auto"`` brings the nuclei to ``diameter``.
    diameter : float
        Nucleus diameter (pixels) that ``scale="auto"`` brings nuclei to.
    tta : bool
        Test-time augmentation (eight turns and mirror images): eight times the work.
    """

    threshold: float = THRESHOLD
    method: str = "watershed"
    split_depth: float = SPLIT_DEPTH
    min_size: int = 24
    min_peak: float = MIN_PEAK
    smooth: float = SMOOTH
    scale: float | str = "auto"
    diameter: float = AUTO_DIAMETER
    tta: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "threshold", check_threshold(self.threshold))
        check_method(self.method)
        set_(self, "split_depth", positive_pixels("split_depth", self.split_depth))
        set_(self, "min_size", whole_number("min_size", self.min_size, 0, unit="pixels"))
        if self.min_peak is None:  # None and 0 both keep every region
            set_(self, "min_peak", 0.0)
        set_(self, "min_peak", float(check_min_peak(self.min_peak)))
        set_(self, "smooth", check_smooth(self.smooth))
        set_(self, "scale", check_scale(self.scale))
        set_(self, "diameter", positive_pixels("diameter", self.diameter))
        if not isinstance(self.tta, (bool, np.bool_)):
            raise ValueError(f"tta must be True or False, got {self.tta!r}")
        set_(self, "tta", bool(self.tta))

    def to_dict(self) -> dict:
        """Plain-type dict (for checkpoints and JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """Inverse of :meth:`to_dict`; missing keys take the defaults, unknown keys are an
        error."""
        return cls(**cls._known(d))

    @classmethod
    def of_checkpoint(cls, state: dict | str | os.PathLike) -> Preset:
        """The preset a checkpoint stores (``state["extra"]["preset"]``), else the
        defaults; ``state`` is a loaded checkpoint or the path of one. A stored preset
        without ``split_depth`` (written before it was a setting) splits at 2."""
        if not isinstance(state, dict):
            state = load_checkpoint(state)
        stored = (state.get("extra") or {}).get("preset")
        if stored is None:
            return cls()
        if not isinstance(stored, dict):
            raise ValueError(f"the checkpoint's preset is not a dict of settings: {stored!r}")
        # Presets stored before the split depth was one of their settings split at 2.
        return cls.from_dict({"split_depth": 2.0, **stored})

    @classmethod
    def for_training(cls, baseline: str = "s2l", modality: str | None = None) -> Preset:
        """The preset stored with a network trained as ``baseline`` (``"s2l"``,
        ``"pce"`` or ``"full"``) on ``modality`` (a BBBC038 modality, or ``None`` for
        one's own images): the defaults, except that a network trained on full masks is
        less confident and keeps regions that peak above 0.9 (``min_peak``), and that
        networks trained on histopathology keep the threshold of 0.5 and split depth of
        2 that score best on its validation split (the defaults cost it 0.01 IoU there;
        ``benchmarks/results/generalization/preset_s2l.md``)."""
        if baseline not in ("s2l", "pce", "full"):
            raise ValueError(f"baseline must be 's2l', 'pce' or 'full', got {baseline!r}")
        settings: dict[str, Any] = {"min_peak": 0.9} if baseline == "full" else {}
        if modality == "histopathology":
            settings.update(threshold=0.5, split_depth=2.0)
        return cls(**settings)

    def but(self, **settings: Any) -> Preset:
        """A copy with the settings that are not ``None`` replaced; an unknown setting
        is an error."""
        settings = self._known(settings)
        return replace(self, **{k: v for k, v in settings.items() if v is not None})

    @classmethod
    def _known(cls, settings: Mapping[str, Any]) -> Mapping[str, Any]:
        """``settings``, after checking that each names a setting of a preset."""
        unknown = set(settings) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown preset settings {sorted(unknown)}")
        return settings

    def probability(
        self,
        model: torch.nn.Module,
        image: np.ndarray,
        *,
        device: torch.device | str = "cpu",
        tile: int = TILE,
    ) -> tuple[np.ndarray, float]:
        """Foreground probability of a normalised ``(3, H, W)`` image at this preset's
        scale, diameter and TTA, and the scale used (:func:`predict_probability`)."""
        return predict_probability(
            model, image, scale=self.scale, device=device, tile=tile,
            diameter=self.diameter, tta=self.tta,
        )  # fmt: skip

    def labels(
        self, prob: np.ndarray, scale: float = 1.0, instances: str | None = "preset"
    ) -> np.ndarray:
        """Labels of a probability that the network made at ``scale``
        (:func:`labels_of`)."""
        return labels_of(prob, self, instances, scale=scale)


def predict_probability(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    scale: float | str = 1.0,
    device: torch.device | str = "cpu",
    threshold: float = MEASURE_THRESHOLD,
    tile: int = TILE,
    diameter: float = AUTO_DIAMETER,
    tta: bool = False,
) -> tuple[np.ndarray, float]:
    """Foreground probability of a normalised image at a fixed or automatic scale.

    Parameters
    ----------
    model : torch.nn.Module
        From :func:`load_model`.
    image : numpy.ndarray
        ``(3, H, W)`` ``float32`` from :func:`s2l_core.augment.normalize_image`.
    scale : float or "auto", optional
        Magnification at which the network sees the image
        (:func:`s2l_core.infer.predict_foreground`). ``"auto"`` predicts at scale 1 and
        at the smaller scales of :data:`LOOKS` (where the image keeps 16 pixels a side)
        and measures the nuclei (:func:`auto_scale`: parts of very large nuclei look
        like small nuclei at scale 1, and whole at a smaller scale). Images of nuclei
        under :data:`MAGNIFY_BELOW` or over ``diameter`` pixels are then predicted at
        ``diameter`` over the diameter measured, between :data:`MIN_AUTO_SCALE` (or 16
        pixels a side) and :data:`MAX_AUTO_SCALE` (or :data:`MAX_AUTO_PIXELS`): small
        nuclei are magnified, large ones shrunk, and the network sees whole nuclei in
        every tile. The looks cost a third of a pass more than the prediction.
    device : torch.device or str, optional
        The model's device.
    threshold : float, optional
        Foreground threshold used to measure the nuclei (``"auto"`` only).
    tile : int, optional
        Tile side for large images, over 128 pixels (twice the tiles' overlap; see
        :func:`s2l_core.infer.predict_foreground`).
    diameter : float, optional
        Nucleus diameter (pixels) that ``"auto"`` brings nuclei to.
    tta : bool, optional
        Test-time augmentation: the mean over the eight turns and mirror images
        (:func:`s2l_core.infer.predict_foreground`), eight times the work. With
        ``"auto"`` the nuclei are measured on plain predictions; where the scale stays 1
        that prediction serves as the first of the eight views.

    Returns
    -------
    prob : numpy.ndarray
        ``(H, W)`` ``float32``.
    scale : float
        The scale used.

    Raises
    ------
    ValueError
        If ``scale`` is neither ``"auto"`` nor a positive finite number
        (:func:`check_scale`), or shrinks the image below one pixel, or if ``threshold``
        is not in (0, 1) (:func:`check_threshold`).
    """
    check_threshold(threshold)
    options = dict(device=device, tile=tile)
    if check_scale(scale) != "auto":
        prob = predict_foreground(model, image, scale=scale, tta=tta, **options)
        return prob, float(scale)
    plain = predict_foreground(model, image, **options)
    height, width = image.shape[-2:]
    # Never shrink an image below 16 pixels a side, nor magnify it past MAX_AUTO_PIXELS.
    low = min(1.0, max(MIN_AUTO_SCALE, 16 / max(1, min(height, width))))
    high = float(np.clip(np.sqrt(MAX_AUTO_PIXELS / (height * width)), 1.0, MAX_AUTO_SCALE))
    looks = {
        s: predict_foreground(model, image, scale=s, **options)
        for s in LOOKS
        if min(height, width) * s >= 16
    }
    chosen = auto_scale(
        plain, threshold=threshold, diameter=diameter, min_scale=low, max_scale=high,
        looks=looks,
    )  # fmt: skip
    if chosen != 1.0:
        return predict_foreground(model, image, scale=chosen, tta=tta, **options), chosen
    if tta:  # the plain pass is the first of the eight views
        plain_pass = functools.partial(predict_tiled, model, **options)
        return predict_dihedral(plain_pass, image, identity=plain), chosen
    return plain, chosen


def predict_image(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    device: torch.device | str = "cpu",
    preset: Preset | None = None,
    instances: str | None = "preset",
    tile: int = TILE,
    channel: int | None = None,
    **settings: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict one raw image: foreground probability and labels.

    Parameters
    ----------
    model : torch.nn.Module
        From :func:`load_model`.
    image : numpy.ndarray
        ``(H, W)``, ``(H, W, 1|3|4)``; 8-bit, 16-bit or float.
    device : torch.device or str, optional
        The model's device.
    preset : Preset, optional
        Threshold, instance method, ``min_size``, ``min_peak``, smoothing, scale and TTA
        (default: :class:`Preset`'s defaults; pass ``Preset.of_checkpoint(state)`` for a
        checkpoint's own).
    instances : {"preset", "watershed", "components", None}, optional
        How to split the foreground into nuclei: the preset's ``method``, another, or
        ``None`` for the semantic mask (0/1).
    tile : int, optional
        Tile side for large images, over 128 pixels (twice the tiles' overlap; see
        :func:`s2l_core.infer.predict_foreground`).
    channel : int, optional
        Take this channel of a multi-channel image (:func:`s2l_core.augment.select_channel`).
    **settings
        Settings of :class:`Preset` that replace the preset's (``None`` keeps it), e.g.
        ``scale=1.0, tta=False``. ``min_peak`` and ``smooth`` apply to the semantic mask
        too; the returned ``prob`` is never smoothed.

    Returns
    -------
    prob : numpy.ndarray
        ``(H, W)`` ``float32``.
    labels : numpy.ndarray
        ``(H, W)`` ``uint16`` instance labels, or ``uint8`` 0/1 when ``instances=None``.
    """
    preset = (preset or Preset()).but(**settings)
    if instances == "preset":
        instances = preset.method
    image = select_channel(image, channel)
    prob, used = preset.probability(model, normalize_image(image), device=device, tile=tile)
    return prob, preset.labels(prob, used, instances)


def labels_of(
    prob: np.ndarray, preset: Preset, instances: str | None = "preset", *, scale: float = 1.0
) -> np.ndarray:
    """Labels of a foreground probability under a preset.

    Parameters
    ----------
    prob : numpy.ndarray
        ``(H, W)`` foreground probability.
    preset : Preset
        Threshold, method, ``min_size``, ``min_peak`` and smoothing.
    instances : {"preset", "watershed", "components", None}, optional
        The preset's method, another, or ``None`` for the semantic mask (0/1, ``uint8``).
    scale : float, optional
        The magnification at which the network saw the image (as
        :func:`predict_probability` returns it). The preset's sizes are in the network's
        pixels. An image magnified at least twice (small nuclei) is labelled on a grid
        about as fine as the network's pixels (an odd number of times finer than the
        image's, within one of the scale: 3 for scales from 2 to 4; its probability
        resampled bilinearly), and each of its pixels takes the label found at its
        centre; otherwise it is labelled at its own pixels with
        ``min_size`` divided by the scale's square, ``smooth`` and the watershed's
        split depth by the scale. Either way an image magnified to find its small
        nuclei keeps them, and touching small nuclei are split as the network saw them.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` instance labels (:func:`foreground_to_instances`) or the mask.
    """
    scale = check_scale(scale)
    if scale == "auto":
        raise ValueError("labels_of needs the scale used, a number, not 'auto'")
    if instances == "preset":
        instances = preset.method
    min_peak = preset.min_peak or None
    smooth = preset.smooth / scale
    if instances is None:
        mask = _above(prob, preset.threshold, smooth)
        if min_peak is not None:  # the regions kept, holes left as they are
            kept = foreground_to_instances(
                prob, threshold=preset.threshold, method="components", min_size=1,
                min_peak=min_peak, smooth=smooth,
            )  # fmt: skip
            mask &= kept > 0
        return mask.astype(np.uint8)
    if scale >= 2:  # magnified: labelled on a finer grid, near the network's pixels
        return _labels_magnified(prob, preset, instances, scale)
    return foreground_to_instances(
        prob, threshold=preset.threshold, method=instances, min_peak=min_peak,
        **_sizes_in_pixels(preset, 1 / scale),
    )  # fmt: skip


def _sizes_in_pixels(preset: Preset, per_network_pixel: float) -> dict[str, float | int]:
    """The preset's sizes, given in the network's pixels, in pixels of which
    ``per_network_pixel`` span one of the network's (per side): ``split_depth``,
    ``min_size`` (an area; 0 and 1 keep every object at any scale) and ``smooth``."""
    area = per_network_pixel**2
    return {
        "split_depth": preset.split_depth * per_network_pixel,
        "min_size": preset.min_size if preset.min_size <= 1 else round(preset.min_size * area),
        "smooth": preset.smooth * per_network_pixel,
    }


def _labels_magnified(prob: np.ndarray, preset: Preset, method: str, scale: float) -> np.ndarray:
    """Labels of ``prob`` (``scale >= 2``) found on a grid ``k`` times finer and read
    back at the centres of the image's pixels (see :func:`labels_of`).

    ``k``, the odd whole number within 1 of ``scale`` (3 for scales from 2 to 4, 5 from
    4 to 6), puts a fine pixel at the centre of each of the image's; the preset's sizes,
    in the network's pixels, are scaled to the fine ones.
    """
    k = 2 * int(scale // 2) + 1
    h, w = prob.shape
    fine = torch.nn.functional.interpolate(
        torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None],
        size=(k * h, k * w), mode="bilinear", align_corners=False,
    )[0, 0].numpy()  # fmt: skip
    labels = foreground_to_instances(
        fine, threshold=preset.threshold, method=method, min_peak=preset.min_peak or None,
        **_sizes_in_pixels(preset, k / scale),
    )  # fmt: skip
    labels = relabel_sequential(labels[k // 2 :: k, k // 2 :: k])[0]  # objects under a pixel go
    return labels.astype(np.uint16 if labels.max() <= np.iinfo(np.uint16).max else np.uint32)


def uncertainty(prob: np.ndarray) -> np.ndarray:
    """How unsure a foreground probability is: ``1 - |2 p - 1|``.

    Parameters
    ----------
    prob : numpy.ndarray
        Foreground probability in [0, 1], any shape.

    Returns
    -------
    numpy.ndarray
        ``float32``, same shape, in [0, 1]: 1 where ``p = 0.5`` (least certain), 0 where
        ``p`` is 0 or 1.
    """
    p = np.asarray(prob, dtype=np.float32)
    return np.clip(1 - np.abs(2 * p - 1), 0, 1).astype(np.float32)


def save_labels(path: str | os.PathLike, labels: np.ndarray) -> None:
    """Write a label image that napari and Fiji open as labels (TIFF or PNG), atomically.

    TIFF keeps ``uint16``/``uint32``; PNG holds up to 65,535 labels as 16-bit.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer image, got {labels.dtype} {labels.shape}")
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        if labels.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError(f"{path}: more than 65,535 labels do not fit a PNG; use .tif")
        labels = labels.astype(np.uint16 if labels.max(initial=0) > 255 else np.uint8)
    write_image(path, labels)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files of a folder (sorted), by suffix; hidden files are skipped.

    Raises
    ------
    FileNotFoundError
        If the folder does not exist.
    ValueError
        If it holds no image file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"input folder not found: {folder}")
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )  # fmt: skip
    if not files:
        raise ValueError(f"{folder} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


#: The record ``predict_folder`` writes into its output folder, last.
MANIFEST = "s2l_predict.json"

#: Images each process predicts between two agreements of :func:`predict_folder`'s
#: processes (several processes only; alone, a round is just the next images).
_PREDICT_ROUND = 8


def _output_plan(
    files: list[Path], suffix: str | None, save_probability: bool
) -> list[tuple[Path, str, str | None]]:
    """``(input, label file name, probability file name or None)`` of every input;
    refuses names that two inputs would share (compared ignoring case, as some file
    systems do)."""
    plan = []
    for path in files:
        own = path.suffix.lower()
        label = path.stem + (suffix or (own if own in (".png", ".tif", ".tiff") else ".tif"))
        plan.append((path, label, f"{path.stem}_prob.tif" if save_probability else None))
    seen: dict[str, Path] = {}
    clashes = []
    for path, *names in plan:
        for name in filter(None, names):
            other = seen.setdefault(name.casefold(), path)
            if other != path:
                clashes.append(f"{name} (from {other.name} and {path.name})")
    if clashes:
        raise ValueError(
            f"{len(clashes)} output file names would be written twice: "
            f"{', '.join(clashes[:5])}{' ...' if len(clashes) > 5 else ''}. Outputs take "
            "the input's name (with .tif or .png, and _prob.tif for the probability); "
            "rename the inputs so that their names differ"
        )
    return plan


def _fingerprint(path: Path) -> list[int]:
    """Size and modification time (ns) of an input: what tells that it changed."""
    info = path.stat()
    return [info.st_size, info.st_mtime_ns]


def _keep_or_remove(folder: Path, plan: list[tuple[Path, str, str | None]]) -> None:
    """After a run that stopped: keep its folder if it holds finished images (saying so,
    on stderr), else remove it."""
    if not folder.is_dir():  # moved into place already
        return
    finished = sum((folder / label).is_file() for _, label, _ in plan)
    if finished:
        print(
            f"{finished} of {len(plan)} images are done and kept in {folder}; the same "
            "command goes on from there (delete that folder to start afresh)",
            file=sys.stderr,
        )
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _owned(output_dir: Path) -> set[str]:
    """Names of the files an earlier ``predict_folder`` run wrote into ``output_dir``
    (from its record, which counts too); empty if there is no readable record."""
    try:
        record = json.loads((output_dir / MANIFEST).read_text(encoding="utf-8"))
        names = [
            *record.get("outputs", []),
            *record.get("probabilities", []),
            *record.get("written_before", []),
        ]
    except (OSError, ValueError, AttributeError, TypeError):
        return set()
    return {str(n) for n in names} | {MANIFEST}


def _check_output_dir(
    output_dir: Path, input_dir: Path, names: list[str], overwrite: bool
) -> set[str]:
    """Refuse an output folder that would lose anything not written by an earlier run;
    return the names of its files an earlier run wrote (empty for a new folder)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"the output path {output_dir} is a file, not a folder")
    if not output_dir.exists():
        parent = output_dir.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        check_writable(parent)  # without creating anything yet
        return set()
    if output_dir.resolve() == input_dir.resolve():
        raise ValueError(
            f"the output folder is the input folder ({output_dir}): the label images "
            "would take the names of your images; choose another output folder"
        )
    visible = [p.name for p in output_dir.iterdir() if not p.name.startswith(".")]
    if visible and not overwrite:
        raise ValueError(
            f"the output folder {output_dir} is not empty; choose a new or empty folder, "
            "or pass --overwrite (overwrite=True) to replace the files an earlier "
            "s2l predict wrote there"
        )
    owned = claim_outputs(output_dir, names)
    check_writable(output_dir)
    return owned


def claim_outputs(output_dir: str | os.PathLike, names: list[str]) -> set[str]:
    """Check that writing files of ``names`` into ``output_dir`` replaces no file that
    this package did not write there.

    Parameters
    ----------
    output_dir : str or os.PathLike
        The folder (it may not exist yet).
    names : list of str
        The file names to be written.

    Returns
    -------
    set of str
        The names of the files earlier runs wrote there, as their record
        (:data:`MANIFEST`) lists them, the record included; empty without a record.

    Raises
    ------
    ValueError
        If a file of one of ``names`` (or of the record's name) exists, ignoring case,
        and no record lists it: the error names such files.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return set()
    present = {p.name.casefold(): p.name for p in output_dir.iterdir()}
    owned = _owned(output_dir)
    foreign = [
        present[n.casefold()]
        for n in [*names, MANIFEST]
        if n.casefold() in present and present[n.casefold()] not in owned
    ]
    if foreign:
        listed = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{output_dir} holds {len(foreign)} file(s) of the names this run writes that "
            f"no earlier s2l predict or label export wrote there: {listed}. Only files "
            f"listed in its {MANIFEST} are replaced; move those files or choose another "
            "output folder"
        )
    return owned


def record_outputs(output_dir: Path, record: dict, owned: set[str]) -> None:
    """Write the record of a run's outputs (:data:`MANIFEST`) into ``output_dir``:
    ``record`` with ``"written_before"``, the files earlier runs wrote that this one did
    not replace and that are still there."""
    new = set(record.get("outputs", [])) | set(record.get("probabilities", []))
    before = sorted(n for n in owned - new - {MANIFEST} if (output_dir / n).exists())
    write_json(output_dir / MANIFEST, dict(record, written_before=before))


@dataclass(frozen=True)
class FolderOutput:
    """How :func:`predict_folder` writes its results.

    Attributes
    ----------
    mode : {"instance", "semantic"}
        Instance labels (``uint16``: 0 background, one number per nucleus) or a 0/1
        foreground mask.
    suffix : {".tif", ".png"} or None
        Output format; ``None``: the input file's own suffix for PNG and TIFF inputs,
        ``".tif"`` otherwise.
    probability : bool
        Also write ``<name>_prob.tif`` (``float32``).
    overwrite : bool
        Write into a folder that holds the results of an earlier run, replacing the
        files that run wrote (those listed in its ``s2l_predict.json``). Other files are
        never replaced or removed: a name this run would write that belongs to a file no
        earlier run wrote is an error, before any work.

    Raises
    ------
    ValueError
        An unknown ``mode`` or ``suffix``.
    """

    mode: str = "instance"
    suffix: str | None = None
    probability: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("instance", "semantic"):
            raise ValueError(f"mode must be 'instance' or 'semantic', got {self.mode!r}")
        if self.suffix is not None and self.suffix.lower() not in (".tif", ".tiff", ".png"):
            raise ValueError(
                f"suffix must be '.tif' or '.png' (or None: as the input), got {self.suffix!r}"
            )


def predict_folder(
    checkpoint: str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    preset: Preset | Mapping[str, Any] | None = None,
    output: FolderOutput | None = None,
    channel: int | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> list[Path]:
    """Predict every image of a folder into label images with the same names.

    Parameters
    ----------
    checkpoint : str or os.PathLike
        A checkpoint of this package.
    input_dir, output_dir : str or os.PathLike
        Folders. ``output_dir`` must be new or empty, unless ``output.overwrite``.
    preset : Preset or mapping, optional
        How the network's prediction becomes labels; default the checkpoint's
        (:meth:`Preset.of_checkpoint`). A mapping changes the settings it names (those
        not ``None``) of the checkpoint's preset, e.g. ``{"scale": 1.0}``; an unknown
        setting is a ``ValueError``.
    output : FolderOutput, optional
        What to write and how (default: instance labels in the input's format).
    channel : int, optional
        Take this channel of multi-channel images; default: the channel the checkpoint
        was trained on (``s2l train --channel``), if any.
    device : str or torch.device, optional
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    progress : bool, optional
        Show a progress bar.

    Returns
    -------
    list of pathlib.Path
        The written label images.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing or incompatible checkpoint, missing or empty input folder, unreadable
        image (named), two inputs whose outputs would share a name, or an output folder
        that is the input folder, a file, not empty (without ``overwrite``) or holds
        files of the output names that no earlier run wrote. Everything but an
        unreadable image is found before any image is read.
    OSError
        An output folder that cannot be written (found before any work) or a full disk.
    s2l_core.distributed.DistributedError
        With several processes, on the processes that did not fail themselves: another
        process failed (:class:`~s2l_core.distributed.RankFailed`, repeating its error)
        or was lost (:class:`~s2l_core.distributed.CollectiveError`).

    Notes
    -----
    Nothing is left half-written: a new output folder appears only when every image is
    done; into an existing folder the results are moved only when every image is done,
    and ``s2l_predict.json``, written last, records them (``"complete": true``). Until
    then the finished images wait in ``.<output folder>.unfinished.<process id>`` beside
    a new output folder, or ``.s2l_predict.json.unfinished.<process id>`` inside an
    existing one (:func:`s2l_core.files.unfinished_dir`). A run that stops (an
    error, Ctrl-C, a killed process) leaves them there, and the next call with the same
    checkpoint, settings and output folder goes on from there: an image is predicted
    again only if its input file changed (size or modification time), also when the
    output folder was made (empty) after the run stopped. A call with other
    settings starts afresh and deletes them; while one run writes the results of an
    output folder, another one into that folder is refused.

    With several processes (``torchrun``, :mod:`s2l_core.distributed`), process r
    predicts images r, r + N, ... (in sorted order) on its own device, into the one
    temporary folder that the main process made; the main process checks the folders
    and, when every process has written its share, moves the results into place and
    writes the record. A failure of any process fails all of them, and nothing is
    written. The input, the checkpoint and the output folder must then lie on a file
    system that every process sees. Every process returns the whole list.
    """
    output = output or FolderOutput()
    mode = output.mode
    output_dir = Path(output_dir)

    def check() -> tuple[list[tuple[Path, str, str | None]], set[str]]:
        files = list_images(input_dir)
        plan = _output_plan(files, output.suffix, output.probability)
        names = [n for _, *pair in plan for n in pair if n]
        return plan, _check_output_dir(output_dir, Path(input_dir), names, output.overwrite)

    # The main process checks the folders and makes the plan that every process follows.
    plan, owned = distributed.on_main(check, "checking the input and output folders")
    files = [path for path, _, _ in plan]
    names = [n for _, *pair in plan for n in pair if n]
    if distributed.is_distributed():
        device = distributed.local_device(device)
    model, state = distributed.on_every_rank(
        lambda: load_model(checkpoint, device), f"loading {checkpoint}"
    )
    if not isinstance(preset, Preset):
        preset = Preset.of_checkpoint(state).but(**(preset or {}))
    device = next(model.parameters()).device
    if channel is None:
        channel = (state.get("extra") or {}).get("channel")
    record = {
        "checkpoint": str(checkpoint),
        "mode": mode,
        "channel": channel,
        "preset": preset.to_dict(),
        "images": [p.name for p in files],
        "outputs": [label for _, label, _ in plan],
        "probabilities": [prob for _, _, prob in plan if prob],
        "complete": True,
    }

    # What decides the results' content: a stopped run's images are kept for a run of
    # the same settings, and only for inputs that did not change since.
    settings = {
        "checkpoint_sha256": distributed.on_main(
            lambda: sha256_of(checkpoint), "reading the checkpoint"
        ),
        **{k: record[k] for k in ("mode", "channel", "preset")},
        "suffix": output.suffix,
        "probability": output.probability,
    }
    inputs = {path.name: _fingerprint(path) for path in files}

    def make_folder() -> tuple[Path, bool, set[int]]:
        new = not output_dir.exists()
        # Beside a new output folder; inside an existing one (which may be the only
        # folder there that can be written), taking over what a run kept beside it
        # before the folder was made.
        stands_for, formerly = (output_dir, None) if new else (output_dir / MANIFEST, output_dir)
        remove_stale(stands_for)  # temporaries of earlier versions
        folder, before = unfinished_dir(
            stands_for, settings, {"inputs": inputs}, what=f"the results into {output_dir}",
            formerly=formerly,
        )  # fmt: skip
        done = set()
        if before is not None:
            kept = before.get("inputs") or {}
            done = {
                i for i, (path, label, prob) in enumerate(plan)
                if kept.get(path.name) == inputs[path.name] and (folder / label).is_file()
                and (prob is None or (folder / prob).is_file())
            }  # fmt: skip
            keep = {n for i in done for n in plan[i][1:] if n} | {UNFINISHED_RECORD}
            for entry in folder.iterdir():  # outdated results, temporaries of a killed run
                if entry.name not in keep:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            if done:
                print(
                    f"going on from a run that stopped: {len(done)} of {len(plan)} images "
                    f"were done (kept in {folder})",
                    file=sys.stderr,
                )
        return folder, new, done

    tmp, new, done = distributed.on_main(make_folder, "making the folder of the results")
    share = distributed.share(len(plan))
    todo = [i for i in share if i not in done]
    desc = "predict" if len(share) == len(plan) else f"predict ({len(share)} of {len(plan)} here)"

    def predict_into(folder: Path, indices: list[int]) -> None:
        if not folder.is_dir():  # another machine's folder: never make one here
            raise FileNotFoundError(
                f"the temporary output folder {folder}, made by the main process, is not "
                "visible to this process: the output folder must lie on a file system "
                "that every process sees"
            )
        for path, label, prob_name in (plan[i] for i in indices if i not in done):
            image = read_image(path)
            try:
                prob, labels = predict_image(
                    model, image, device=device, preset=preset, channel=channel,
                    instances="preset" if mode == "instance" else None,
                )  # fmt: skip
            except ValueError as err:  # an image of an unsupported kind: say which
                raise ValueError(f"{path}: {err}") from err
            if prob_name:
                write_image(folder / prob_name, prob.astype(np.float32))
            save_labels(folder / label, labels)  # last: the image counts as done
            bar.update(1)

    def finish() -> None:
        missing = [name for name in names if not (tmp / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} result(s) missing from {tmp}, e.g. {missing[0]}: the "
                "processes that wrote them saw another folder; the output folder must "
                "lie on a file system that every process sees"
            )
        if new:
            write_json(tmp / MANIFEST, record)
            place_dir(tmp, output_dir)
            (output_dir / UNFINISHED_RECORD).unlink()
        else:
            # Recorded before the moves, so that an interrupted move leaves a record
            # that owns every file and does not look finished.
            record_outputs(output_dir, dict(record, complete=False), owned)
            for name in names:
                os.replace(tmp / name, output_dir / name)
            record_outputs(output_dir, record, owned)
            shutil.rmtree(tmp)

    bar = tqdm(total=len(todo), desc=desc, disable=not (progress and distributed.is_main()))
    try:
        # Every few images the processes agree that all went well, so that none waits
        # long for the others and a failure stops them all soon.
        for indices in distributed.rounds(len(plan), _PREDICT_ROUND):
            distributed.on_every_rank(
                functools.partial(predict_into, tmp, indices),
                "predicting its share of the images",
            )
        bar.close()
        distributed.on_main(finish, f"moving the results into {output_dir}")
    except BaseException:
        bar.close()
        if distributed.is_main():
            _keep_or_remove(tmp, plan)
        raise
    return [output_dir / label for _, label, _ in plan]
