"""Evaluation: the scores of the original Scribble2Label and the standard nuclei scores.

Every function takes 2-D numpy arrays (anything :func:`numpy.asarray` accepts) of one
image. Two kinds of input appear:

- a *foreground* image: any dtype, a pixel is foreground where its value is ``> 0`` (so a
  label image works too);
- a *label* image: integer dtype, ``0`` is background and every other value is one object.
  Labels need not be consecutive; negative labels, floating-point and boolean arrays are
  rejected with an error that says so.

What the original code reports, reproduced for comparability with the paper:

- :func:`foreground_iou`: foreground IoU with smoothing ``1e-6`` (empty vs empty is 1);
- :func:`original_mdice`: its object-level "mDice", quirks included.

Scores that the original does not report and that should be read beside them:

- :func:`object_dice`: a corrected object-level Dice (one-to-one matching, every missed
  or spurious object counts);
- :func:`average_precision`: the 2018 Data Science Bowl score (mean over IoU thresholds
  0.5 … 0.95 of TP / (TP + FP + FN));
- :func:`f1_at` and :func:`detection_scores`: detection F1, precision and recall at one
  IoU threshold;
- :func:`aggregated_jaccard_index`: the Aggregated Jaccard Index of Kumar et al. (2017).

And one diagnostic: :func:`border_offset` finds how far the predicted borders sit inside
or outside the true ones.

:func:`evaluate_image` computes all of them for one image and :func:`summarize` averages
the per-image results over a test set (the original averages per-image scores over
images).

Overlaps between objects are computed once per image from a contingency table of the two
label images (:func:`numpy.bincount` on pairs of labels), never with a loop over objects,
so an image of 1040×1388 pixels with hundreds of nuclei takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import ndimage as ndi
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from skimage.measure import label as _label

from s2l_core.encoding import FOREGROUND, UNLABELLED

__all__ = [
    "DSB_THRESHOLDS",
    "ORIGINAL_MDICE_EPS",
    "ORIGINAL_MDICE_MIN_GT_SIZE",
    "ORIGINAL_MIN_OBJECT_SIZE",
    "BorderOffset",
    "Overlaps",
    "aggregated_jaccard_index",
    "average_precision",
    "border_offset",
    "detection_scores",
    "evaluate_image",
    "f1_at",
    "foreground_dice",
    "foreground_iou",
    "instances_from_semantic",
    "match_instances",
    "object_dice",
    "original_mdice",
    "scribble_cross_entropy",
    "summarize",
]

#: IoU thresholds of the 2018 Data Science Bowl: 0.5, 0.55, …, 0.95 (exact decimals).
DSB_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

#: Smoothing constant of the original object-level mDice.
ORIGINAL_MDICE_EPS: float = 1e-4

#: Ground-truth objects smaller than this (in pixels) score 1 in the original mDice.
ORIGINAL_MDICE_MIN_GT_SIZE: int = 20

#: Predicted components smaller than this (in pixels) are removed by the original.
ORIGINAL_MIN_OBJECT_SIZE: int = 64


# --------------------------------------------------------------------------- checks


def _as_image(image: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D image of shape (H, W), got a {arr.ndim}-D array "
            f"of shape {arr.shape}"
        )
    return arr


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}"
        )


def _check_label_dtype(arr: np.ndarray, name: str) -> None:
    if arr.dtype == np.bool_:
        raise TypeError(
            f"{name} must be an integer label image, got dtype bool (a binary mask?): "
            f"label it first, e.g. with skimage.measure.label"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label image, got dtype {arr.dtype}")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger):
        lowest = int(arr.min())
        if lowest < 0:
            raise ValueError(
                f"{name} has negative labels (minimum {lowest}); labels must be >= 0, "
                f"with 0 for background"
            )


def _label_pair(pred_labels: ArrayLike, gt_labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred = _as_image(pred_labels, "pred_labels")
    gt = _as_image(gt_labels, "gt_labels")
    _check_same_shape(pred, gt, "pred_labels", "gt_labels")
    _check_label_dtype(pred, "pred_labels")
    _check_label_dtype(gt, "gt_labels")
    return pred, gt


def _foreground_pair(pred: ArrayLike, gt: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = _as_image(pred, "pred")
    g = _as_image(gt, "gt")
    _check_same_shape(p, g, "pred", "gt")
    return p > 0, g > 0


def _check_iou_threshold(t: float, name: str) -> float:
    t = float(t)
    if not 0.5 <= t < 1.0:
        raise ValueError(
            f"{name} must lie in [0.5, 1) (a match needs IoU > threshold; from 0.5 on, "
            f"every object has at most one match), got {t}"
        )
    return t


def _check_thresholds(thresholds: ArrayLike) -> np.ndarray:
    ts = np.asarray(thresholds, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError(
            f"thresholds must be a non-empty 1-D sequence of IoU thresholds, got shape {ts.shape}"
        )
    for t in ts:
        _check_iou_threshold(t, "every threshold")
    return ts


# ------------------------------------------------------------------ overlap tables


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map the labels of a validated label image onto ``0..n``.

    Returns the flat relabelled image (int64, ``0`` stays background, the k-th smallest
    label becomes ``k``), the original label values (ascending) and the objects' areas.
    """
    flat = labels.ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, labels.dtype), np.zeros(0, np.int64)
    top = int(flat.max())
    if top <= max(1 << 16, 2 * flat.size):
        flat_i = flat.astype(np.intp, copy=False)
        counts = np.bincount(flat_i)
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat_i], ids.astype(labels.dtype), counts[ids].astype(np.int64)
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    rel = inverse.astype(np.int64).ravel()
    if ids[0] == 0:
        ids, counts = ids[1:], counts[1:]
    else:
        rel += 1
    return rel, ids, counts.astype(np.int64)


@dataclass(frozen=True)
class _Contingency:
    """Sparse overlap table of two label images (one entry per overlapping pair)."""

    gt_ids: np.ndarray  # (n_gt,) label values of the ground-truth objects, ascending
    pred_ids: np.ndarray  # (n_pred,) label values of the predicted objects, ascending
    gt_areas: np.ndarray  # (n_gt,) int64
    pred_areas: np.ndarray  # (n_pred,) int64
    gi: np.ndarray  # (n_pairs,) int64 index into gt_ids
    pj: np.ndarray  # (n_pairs,) int64 index into pred_ids
    inter: np.ndarray  # (n_pairs,) int64 intersection in pixels, > 0

    @property
    def n_gt(self) -> int:
        return int(self.gt_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @cached_property
    def iou(self) -> np.ndarray:
        union = self.gt_areas[self.gi] + self.pred_areas[self.pj] - self.inter
        return self.inter / union


def _contingency(pred: np.ndarray, gt: np.ndarray) -> _Contingency:
    rg, gt_ids, gt_areas = _relabel(gt)
    rp, pred_ids, pred_areas = _relabel(pred)
    n_g, n_p = gt_ids.size, pred_ids.size
    empty = np.zeros(0, np.int64)
    if n_g == 0 or n_p == 0:
        return _Contingency(gt_ids, pred_ids, gt_areas, pred_areas, empty, empty, empty)
    both = (rg > 0) & (rp > 0)
    key = (rg[both] - 1) * n_p + (rp[both] - 1)
    if n_g * n_p <= 1 << 20:
        table = np.bincount(key, minlength=n_g * n_p)
        keys = np.flatnonzero(table)
        inter = table[keys]
    else:
        keys, inter = np.unique(key, return_counts=True)
    gi, pj = np.divmod(keys.astype(np.int64), n_p)
    return _Contingency(
        gt_ids, pred_ids, gt_areas, pred_areas, gi, pj, inter.astype(np.int64, copy=False)
    )


class Overlaps(NamedTuple):
    """IoU matrix between ground-truth and predicted objects (see :func:`match_instances`).

    Attributes
    ----------
    iou : numpy.ndarray or scipy.sparse.csr_array of float64, shape (n_gt, n_pred)
        ``iou[i, j]`` is the IoU of the objects ``gt_ids[i]`` and ``pred_ids[j]``.
    gt_ids : numpy.ndarray, shape (n_gt,)
        The ground-truth label values, ascending (row order).
    pred_ids : numpy.ndarray, shape (n_pred,)
        The predicted label values, ascending (column order).
    """

    iou: np.ndarray | sparse.csr_array
    gt_ids: np.ndarray
    pred_ids: np.ndarray


def match_instances(
    pred_labels: ArrayLike, gt_labels: ArrayLike, *, sparse_output: bool = False
) -> Overlaps:
    """IoU of every ground-truth object with every predicted object.

    Computed from a contingency table of the two label images (one pass over the pixels),
    not from a loop over pairs of objects.

    Parameters
    ----------
    pred_labels : array_like of int, shape (H, W)
        Predicted instance labels, 0 for background; labels need not be consecutive.
    gt_labels : array_like of int, shape (H, W)
        Ground-truth instance labels, 0 for background.
    sparse_output : bool, optional
        Return the IoU matrix as a :class:`scipy.sparse.csr_array` (only overlapping pairs
        stored) instead of a dense array.

    Returns
    -------
    Overlaps
        Named tuple ``(iou, gt_ids, pred_ids)``: ``iou`` has shape (n_gt, n_pred) and dtype
        float64, rows follow ``gt_ids`` and columns ``pred_ids`` (label values, ascending,
        background excluded). Pairs that do not overlap have IoU 0.

    Raises
    ------
    ValueError
        If an input is not 2-D, the shapes differ or a label is negative.
    TypeError
        If an input does not have an integer dtype.
    """
    pred, gt = _label_pair(pred_labels, gt_labels)
    c = _contingency(pred, gt)
    shape = (c.n_gt, c.n_pred)
    if sparse_output:
        iou = sparse.csr_array((c.iou, (c.gi, c.pj)), shape=shape, dtype=np.float64)
    else:
        iou = np.zeros(shape, dtype=np.float64)
        iou[c.gi, c.pj] = c.iou
    return Overlaps(iou, c.gt_ids, c.pred_ids)


# ---------------------------------------------------------------- foreground scores


def foreground_iou(pred: ArrayLike, gt: ArrayLike, smooth: float = 1e-6) -> float:
    """Foreground IoU of one image, smoothed as in the original code.

    ``(|P ∩ G| + smooth) / (|P ∪ G| + smooth)`` where ``P`` and ``G`` are the pixels with a
    value ``> 0``. Empty vs empty scores 1.

    Parameters
    ----------
    pred, gt : array_like, shape (H, W)
        Prediction and ground truth, any dtype (binary masks or label images).
    smooth : float, optional
        Smoothing constant (1e-6 in the original).

    Returns
    -------
    float
        The IoU, in [0, 1].
    """
    p, g = _foreground_pair(pred, gt)
    inter = np.count_nonzero(p & g)
    union = np.count_nonzero(p | g)
    return float((inter + smooth) / (union + smooth))


def foreground_dice(pred: ArrayLike, gt: ArrayLike, smooth: float = 1e-6) -> float:
    """Foreground Dice of one image: ``(2 |P ∩ G| + smooth) / (|P| + |G| + smooth)``.

    ``P`` and ``G`` are the pixels with a value ``> 0``. Empty vs empty scores 1.

    Parameters
    ----------
    pred, gt : array_like, shape (H, W)
        Prediction and ground truth, any dtype (binary masks or label images).
    smooth : float, optional
        Smoothing constant.

    Returns
    -------
    float
        The Dice coefficient, in [0, 1].
    """
    p, g = _foreground_pair(pred, gt)
    inter = np.count_nonzero(p & g)
    total = np.count_nonzero(p) + np.count_nonzero(g)
    return float((2 * inter + smooth) / (total + smooth))


def scribble_cross_entropy(prob: ArrayLike, scribble: ArrayLike) -> float:
    """Mean binary cross-entropy of a foreground probability on the scribbled pixels.

    A score that needs only scribbles (validation without full masks).

    Parameters
    ----------
    prob : array_like, shape (H, W)
        Foreground probability (clipped to [1e-6, 1 - 1e-6]).
    scribble : array_like, shape (H, W)
        Scribble image: 0 background, 1 foreground, 250 unlabelled (ignored).

    Returns
    -------
    float
        The mean over scribbled pixels; NaN if none is scribbled.
    """
    prob, scribble = np.asarray(prob), np.asarray(scribble)
    _check_same_shape(prob, scribble, "prob", "scribble")
    scribbled = scribble != UNLABELLED
    if not scribbled.any():
        return float("nan")
    p = np.clip(prob[scribbled], 1e-6, 1 - 1e-6)
    fg = scribble[scribbled] == FOREGROUND
    return float(-np.mean(np.where(fg, np.log(p), np.log1p(-p))))


class BorderOffset(NamedTuple):
    """How far the predicted borders sit from the true ones (see :func:`border_offset`)."""

    #: The radius with the highest IoU: > 0 the truth is wider, < 0 narrower.
    offset: int
    #: ``(2 R + 1,)`` ``int``: ``-R … R``.
    radii: np.ndarray
    #: ``(2 R + 1,)`` ``float64``: the foreground IoU after growing (or shrinking) by each.
    ious: np.ndarray


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return yy * yy + xx * xx <= radius * radius


def border_offset(
    pred: ArrayLike, gt: ArrayLike, max_radius: int = 5, smooth: float = 1e-6
) -> BorderOffset:
    """Grow or shrink the predicted foreground by a disk and find the best-fitting border.

    A diagnostic, not a score: it separates a prediction whose borders sit a constant
    distance inside (or outside) the true ones — a difference of drawing convention,
    e.g. masks drawn around the blur of a nucleus — from one that is wrong in shape.

    Parameters
    ----------
    pred, gt : array_like, shape (H, W)
        Prediction and ground truth, any dtype; foreground where ``> 0``.
    max_radius : int, optional
        Largest radius ``R`` tried, in pixels, both ways.
    smooth : float, optional
        Smoothing constant of the IoU (as :func:`foreground_iou`).

    Returns
    -------
    BorderOffset
        ``offset`` (the radius with the highest IoU; ties go to the smallest ``|r|``),
        ``radii`` and ``ious``. Radius ``r > 0`` dilates the prediction with a disk of
        radius ``r``, ``r < 0`` erodes it (outside the image counts as foreground, so
        nuclei cut by the border are not shrunk from it); ``ious[R]`` is
        :func:`foreground_iou` of the prediction as it is.

    Raises
    ------
    ValueError
        If ``max_radius`` is not a non-negative integer, or the shapes differ.
    """
    if (
        isinstance(max_radius, bool)
        or not isinstance(max_radius, (int, np.integer))
        or max_radius < 0
    ):
        raise ValueError(f"max_radius must be a non-negative integer, got {max_radius!r}")
    p, g = _foreground_pair(pred, gt)
    radii = np.arange(-max_radius, max_radius + 1)
    ious = np.empty(len(radii))
    n_gt = np.count_nonzero(g)
    for k, r in enumerate(radii):
        if r > 0:
            q = ndi.binary_dilation(p, _disk(r))
        elif r < 0:
            q = ndi.binary_erosion(p, _disk(-r), border_value=1)
        else:
            q = p
        inter = np.count_nonzero(q & g)
        ious[k] = (inter + smooth) / (np.count_nonzero(q) + n_gt - inter + smooth)
    best = np.flatnonzero(ious >= ious.max() - 1e-12)
    return BorderOffset(int(radii[best[np.argmin(np.abs(radii[best]))]]), radii, ious)


# ------------------------------------------------------------ the original's mDice


def instances_from_semantic(
    pred: ArrayLike,
    min_size: int = ORIGINAL_MIN_OBJECT_SIZE,
    fill_holes: bool = True,
    connectivity: int = 2,
) -> np.ndarray:
    """Instances of a semantic prediction as the original's mDice extracts them.

    Connected components of the foreground (``pred > 0``); components with fewer than
    ``min_size`` pixels are removed; holes are filled (:func:`scipy.ndimage.binary_fill_holes`,
    which may join components that enclose a hole together); the result is labelled
    again. Labels are consecutive, in raster order of each object's first pixel (as
    :func:`skimage.measure.label` numbers them).

    Parameters
    ----------
    pred : array_like, shape (H, W)
        Semantic prediction, any dtype; foreground where ``> 0``.
    min_size : int, optional
        Smallest component kept, in pixels (64 in the original).
    fill_holes : bool, optional
        Fill holes in the foreground after the removal (as the original).
    connectivity : int, optional
        1 for 4-connected, 2 for 8-connected components (the original: 8).

    Returns
    -------
    numpy.ndarray of int, shape (H, W)
        Instance labels, 0 for background.
    """
    fg = _as_image(pred, "pred") > 0
    if connectivity not in (1, 2):
        raise ValueError(f"connectivity must be 1 or 2, got {connectivity}")
    if min_size > 0:
        comp = _label(fg, connectivity=connectivity)
        small = np.bincount(comp.ravel()) < min_size
        small[0] = False
        fg = ~small[comp] & fg
    if fill_holes:
        fg = ndi.binary_fill_holes(fg)
    return _label(fg, connectivity=connectivity)


def original_mdice(pred_foreground: ArrayLike, gt_labels: ArrayLike) -> float:
    """Object-level "mDice" of one image, exactly as the original Scribble2Label reports it.

    For comparability with the paper only: the score has quirks that can make it far too
    high (see below). Report :func:`object_dice` beside it.

    The prediction is turned into instances with :func:`instances_from_semantic`
    (8-connected components, components under 64 px removed, holes filled). Then the
    ground-truth label values ``l = 1, 2, …, max(gt_labels)`` are visited in increasing
    order; **every** value counts, including values that no pixel carries. Each one
    scores:

    1. *tiny*: if the object has fewer than 20 pixels (0 for an absent label), it scores 1;
    2. *missed*: else, if no predicted instance overlaps it, it scores
       ``eps / (|G_l| + eps)`` (practically 0);
    3. *matched*: else its match is the predicted instance with the most pixels inside it
       (ties: the smallest instance label) — not one-to-one, no IoU threshold — and it
       scores ``(2 |G_l ∩ P| + eps) / (|G_l| + |P| + eps)``, ``P`` the whole instance.

    ``eps`` is 1e-4. The *border drop*: let ``k`` be the first visited label that is tiny
    or missed. From ``k`` on (``k`` included), every ground-truth object touching the image
    border (any pixel in the first or last row or column) scores 1, whatever the cases
    above say; objects before ``k`` keep their scores. The result is the mean over all
    ``max(gt_labels)`` values. An image without ground-truth objects scores 0, whatever
    the prediction.

    So the score depends on the label order: in an image of four nuclei where nucleus 1
    is predicted perfectly, nucleus 2 (inside) is missed and nuclei 3 and 4 (on the
    border) are missed, the score is ``(1 + 0 + 1 + 1) / 4 = 0.75``; :func:`object_dice`
    gives 0.25. Differences from the original code: the input arrays are not modified
    (the original blanks the dropped objects in the caller's ground truth), and ties are
    broken by label as stated (the same as the original's ``np.unique`` / ``argmax``).

    Parameters
    ----------
    pred_foreground : array_like, shape (H, W)
        Semantic prediction (e.g. the argmax), any dtype; foreground where ``> 0``. A
        label image is reduced to its foreground first.
    gt_labels : array_like of int, shape (H, W)
        Ground-truth instance labels, 0 for background. Gaps in the numbering count as
        tiny objects (score 1, and they start the border drop), as in the original; pass
        ``skimage.segmentation.relabel_sequential(gt_labels)[0]`` to avoid that.

    Returns
    -------
    float
        The image's mDice (the original averages it over images).
    """
    fg = _as_image(pred_foreground, "pred_foreground")
    gt = _as_image(gt_labels, "gt_labels")
    _check_same_shape(fg, gt, "pred_foreground", "gt_labels")
    _check_label_dtype(gt, "gt_labels")
    n_labels = int(gt.max()) if gt.size else 0
    if n_labels == 0:
        return 0.0
    if n_labels > max(1 << 24, 4 * gt.size):
        raise ValueError(
            f"the original mDice visits every label value 1..max(gt_labels); the maximum "
            f"{n_labels} is too large: relabel gt_labels sequentially first"
        )
    inst = instances_from_semantic(fg)
    g = gt.astype(np.intp, copy=False)
    areas = np.bincount(g.ravel(), minlength=n_labels + 1)[1:]  # (L,) for labels 1..L
    border = np.zeros(n_labels + 1, dtype=bool)
    border[np.concatenate([g[0], g[-1], g[:, 0], g[:, -1]])] = True
    border = border[1:]

    # Best-overlapping instance of every label: sort the overlapping pairs by
    # (label, overlap descending, instance label) and keep the first of each label.
    n_inst = int(inst.max())
    best_inter = np.zeros(n_labels, dtype=np.int64)
    best_area = np.zeros(n_labels, dtype=np.int64)
    both = (g > 0) & (inst > 0)
    if n_inst and both.any():  # no overlap at all: every label keeps 0
        keys, inter = np.unique(g[both] * (n_inst + 1) + inst[both], return_counts=True)
        gl, pl = np.divmod(keys, n_inst + 1)
        order = np.lexsort((pl, -inter, gl))
        gl, pl, inter = gl[order], pl[order], inter[order]
        first = np.r_[True, gl[1:] != gl[:-1]]
        inst_areas = np.bincount(inst.ravel())
        best_inter[gl[first] - 1] = inter[first]
        best_area[gl[first] - 1] = inst_areas[pl[first]]

    eps = ORIGINAL_MDICE_EPS
    tiny = areas < ORIGINAL_MDICE_MIN_GT_SIZE
    missed = ~tiny & (best_inter == 0)
    scores = (2 * best_inter + eps) / (areas + best_area + eps)  # missed: eps / (|G| + eps)
    scores[tiny] = 1.0
    trigger = np.flatnonzero(tiny | missed)
    if trigger.size:
        k = trigger[0]
        scores[k:][border[k:]] = 1.0
    return float(scores.mean())


# ------------------------------------------------------------ object-level scores


def _object_dice(c: _Contingency) -> float:
    if c.n_gt == 0 and c.n_pred == 0:
        return 1.0
    if c.inter.size == 0:
        return 0.0
    pair_dice = 2 * c.inter / (c.gt_areas[c.gi] + c.pred_areas[c.pj])
    # The matching decomposes over the connected components of the bipartite overlap
    # graph; most components are one pair, matched as they are. Hungarian on the rest.
    graph = sparse.coo_array(
        (np.ones(c.inter.size), (c.gi, c.n_gt + c.pj)), shape=(c.n_gt + c.n_pred,) * 2
    )
    _, comp = connected_components(graph, directed=False)
    pair_comp = comp[c.gi]
    single = np.bincount(pair_comp)[pair_comp] == 1
    dice_sum = float(pair_dice[single].sum())
    n_matched = int(np.count_nonzero(single))
    rest = np.flatnonzero(~single)
    rest = rest[np.argsort(pair_comp[rest], kind="stable")]
    for group in np.split(rest, np.flatnonzero(np.diff(pair_comp[rest])) + 1):
        if group.size == 0:
            continue
        ug, g_idx = np.unique(c.gi[group], return_inverse=True)
        up, p_idx = np.unique(c.pj[group], return_inverse=True)
        iou = np.zeros((ug.size, up.size))
        iou[g_idx, p_idx] = c.iou[group]
        dice = np.zeros((ug.size, up.size))
        dice[g_idx, p_idx] = pair_dice[group]
        rows, cols = linear_sum_assignment(iou, maximize=True)
        keep = iou[rows, cols] > 0
        dice_sum += float(dice[rows[keep], cols[keep]].sum())
        n_matched += int(np.count_nonzero(keep))
    return dice_sum / (c.n_gt + c.n_pred - n_matched)


def object_dice(pred_labels: ArrayLike, gt_labels: ArrayLike) -> float:
    """Corrected object-level Dice: one-to-one matching, every unmatched object scores 0.

    Ground-truth and predicted objects are matched one-to-one by the Hungarian algorithm
    (:func:`scipy.optimize.linear_sum_assignment`, per connected group of overlapping
    objects) maximising the total IoU; only overlapping pairs (IoU > 0) can be matched, no
    IoU threshold otherwise. With ``M`` the matched pairs and ``Dice(g, p) = 2 |g ∩ p| /
    (|g| + |p|)``,

    ``object_dice = sum_{(g, p) in M} Dice(g, p) / (n_gt + n_pred - |M|)``,

    i.e. the mean Dice over the matched pairs, the missed ground-truth objects and the
    spurious (false-positive) predicted objects, the last two scoring 0. No exception for
    small or border-touching objects. Both images empty: 1; exactly one empty: 0.

    Parameters
    ----------
    pred_labels : array_like of int, shape (H, W)
        Predicted instance labels, 0 for background.
    gt_labels : array_like of int, shape (H, W)
        Ground-truth instance labels, 0 for background.

    Returns
    -------
    float
        The score, in [0, 1].
    """
    pred, gt = _label_pair(pred_labels, gt_labels)
    return _object_dice(_contingency(pred, gt))


def _ap_values(c: _Contingency, thresholds: np.ndarray) -> np.ndarray:
    if c.n_gt == 0 and c.n_pred == 0:
        return np.ones(thresholds.size)
    tp = np.count_nonzero(c.iou[None, :] > thresholds[:, None], axis=1)
    return tp / (c.n_gt + c.n_pred - tp)


def average_precision(
    pred_labels: ArrayLike,
    gt_labels: ArrayLike,
    thresholds: ArrayLike = DSB_THRESHOLDS,
    *,
    return_per_threshold: bool = False,
) -> float | tuple[float, np.ndarray]:
    """The 2018 Data Science Bowl score of one image.

    At each threshold ``t`` a true positive is a (ground-truth, predicted) pair with
    ``IoU > t`` (strictly); for ``t >= 0.5`` every object is in at most one such pair.
    ``FP = n_pred - TP``, ``FN = n_gt - TP`` and ``AP(t) = TP / (TP + FP + FN)``. The score
    is the mean of ``AP(t)`` over the thresholds. Both images empty: 1 at every threshold;
    exactly one empty: 0.

    Parameters
    ----------
    pred_labels : array_like of int, shape (H, W)
        Predicted instance labels, 0 for background.
    gt_labels : array_like of int, shape (H, W)
        Ground-truth instance labels, 0 for background.
    thresholds : array_like of float, shape (T,), optional
        IoU thresholds, each in [0.5, 1); default 0.5, 0.55, …, 0.95.
    return_per_threshold : bool, optional
        Also return ``AP(t)`` for each threshold.

    Returns
    -------
    float
        The mean over thresholds.
    numpy.ndarray of float64, shape (T,)
        ``AP(t)`` per threshold, only if ``return_per_threshold``.
    """
    pred, gt = _label_pair(pred_labels, gt_labels)
    ts = _check_thresholds(thresholds)
    per = _ap_values(_contingency(pred, gt), ts)
    if return_per_threshold:
        return float(per.mean()), per
    return float(per.mean())


def _detection(c: _Contingency, iou: float) -> dict[str, float]:
    tp = int(np.count_nonzero(c.iou > iou))
    fp, fn = c.n_pred - tp, c.n_gt - tp
    precision = tp / c.n_pred if c.n_pred else float(c.n_gt == 0)
    recall = tp / c.n_gt if c.n_gt else float(c.n_pred == 0)
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }


def detection_scores(
    pred_labels: ArrayLike, gt_labels: ArrayLike, iou: float = 0.5
) -> dict[str, float]:
    """Detection counts and scores at one IoU threshold.

    A true positive is a (ground-truth, predicted) pair with IoU > ``iou`` (one-to-one for
    ``iou >= 0.5``). ``precision = TP / n_pred``, ``recall = TP / n_gt``,
    ``f1 = 2 TP / (2 TP + FP + FN)``. With no predicted (ground-truth) object, precision
    (recall) is 1 if the other image is empty too, else 0; F1 of two empty images is 1.

    Parameters
    ----------
    pred_labels : array_like of int, shape (H, W)
        Predicted instance labels, 0 for background.
    gt_labels : array_like of int, shape (H, W)
        Ground-truth instance labels, 0 for background.
    iou : float, optional
        IoU threshold, in [0.5, 1).

    Returns
    -------
    dict
        ``tp``, ``fp``, ``fn`` (int) and ``precision``, ``recall``, ``f1`` (float).
    """
    pred, gt = _label_pair(pred_labels, gt_labels)
    return _detection(_contingency(pred, gt), _check_iou_threshold(iou, "iou"))


def f1_at(pred_labels: ArrayLike, gt_labels: ArrayLike, iou: float = 0.5) -> float:
    """Detection F1 at one IoU threshold (see :func:`detection_scores`).

    Parameters
    ----------
    pred_labels : array_like of int, shape (H, W)
        Predicted instance labels, 0 for background.
    gt_labels : array_like of int, shape (H, W)
        Ground-truth instance labels, 0 for background.
    iou : float, optional
        IoU threshold, in [0.5, 1); a match needs IoU > ``iou``.

    Returns
    -------
    float
        ``2 TP / (2 TP + FP + FN)``; 1 if both images are empty.
    """
    return detection_scores(pred_labels, gt_labels, iou)["f1"]


def _aji(c: _Contingency) -> float:
    if c.n_gt == 0 and c.n_pred == 0:
        return 1.0
    order = np.lexsort((c.pj, -c.iou, c.gi))
    gi, pj, inter = c.gi[order], c.pj[order], c.inter[order]
    first = np.r_[True, gi[1:] != gi[:-1]] if gi.size else np.zeros(0, bool)
    gi, pj, inter = gi[first], pj[first], inter[first]
    numerator = int(inter.sum())
    denominator = int((c.gt_areas[gi] + c.pred_areas[pj] - inter).sum())
    unmatched_gt = np.ones(c.n_gt, dtype=bool)
    unmatched_gt[gi] = False
    unused_pred = np.ones(c.n_pred, dtype=bool)
    unused_pred[pj] = False
    denominator += int(c.gt_areas[unmatched_gt].sum()) + int(c.pred_areas[unused_pred].sum())
    return numerator / denominator


def aggregated_jaccard_index(pred_labels: ArrayLike, gt_labels: ArrayLike) -> float:
    """Aggregated Jaccard Index of one image (Kumar et al., IEEE TMI 2017).

    For each ground-truth object ``G_i`` the predicted object ``P_j`` with the highest IoU
    is chosen (ties: the smallest predicted label; a predicted object may be chosen by
    several ground-truth objects, as in the original definition). ``|G_i ∩ P_j|`` is added
    to the numerator and ``|G_i ∪ P_j|`` to the denominator. A ground-truth object that no
    prediction overlaps adds its area to the denominator. Finally the area of every
    predicted object never chosen is added to the denominator. Both images empty: 1;
    exactly one empty: 0.

    Parameters
    ----------
    pred_labels : array_like of int, shape (H, W)
        Predicted instance labels, 0 for background.
    gt_labels : array_like of int, shape (H, W)
        Ground-truth instance labels, 0 for background.

    Returns
    -------
    float
        The AJI, in [0, 1].
    """
    pred, gt = _label_pair(pred_labels, gt_labels)
    return _aji(_contingency(pred, gt))


# ------------------------------------------------------------------- one image, many


def evaluate_image(
    pred_labels: ArrayLike,
    gt_labels: ArrayLike,
    *,
    thresholds: ArrayLike = DSB_THRESHOLDS,
    iou: float = 0.5,
    per_threshold: bool = False,
) -> dict[str, float]:
    """Every score of this module for one image.

    Parameters
    ----------
    pred_labels : array_like of int, shape (H, W)
        Predicted instance labels, 0 for background. The foreground scores and the
        original mDice use only its foreground ``pred_labels > 0`` (the original mDice
        extracts its own instances from it, see :func:`original_mdice`).
    gt_labels : array_like of int, shape (H, W)
        Ground-truth instance labels, 0 for background.
    thresholds : array_like of float, optional
        IoU thresholds of the average precision.
    iou : float, optional
        IoU threshold of F1, precision and recall.
    per_threshold : bool, optional
        Add one ``"ap@T"`` entry per threshold (``T`` with two decimals).

    Returns
    -------
    dict
        ``iou`` (:func:`foreground_iou`), ``dice`` (:func:`foreground_dice`),
        ``original_mdice``, ``object_dice``, ``ap`` (:func:`average_precision`), ``f1``,
        ``precision``, ``recall`` (at ``iou``), ``aji``, and the object counts ``n_gt`` and
        ``n_pred``.
    """
    pred, gt = _label_pair(pred_labels, gt_labels)
    ts = _check_thresholds(thresholds)
    det_iou = _check_iou_threshold(iou, "iou")
    c = _contingency(pred, gt)
    ap = _ap_values(c, ts)
    det = _detection(c, det_iou)
    row: dict[str, float] = {
        "iou": foreground_iou(pred, gt),
        "dice": foreground_dice(pred, gt),
        "original_mdice": original_mdice(pred, gt),
        "object_dice": _object_dice(c),
        "ap": float(ap.mean()),
        "f1": det["f1"],
        "precision": det["precision"],
        "recall": det["recall"],
        "aji": _aji(c),
        "n_gt": c.n_gt,
        "n_pred": c.n_pred,
    }
    if per_threshold:
        row.update({f"ap@{t:.2f}": float(v) for t, v in zip(ts, ap, strict=True)})
    return row


def summarize(rows: Iterable[Mapping[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over images of per-image results.

    Parameters
    ----------
    rows : iterable of dict, or pandas.DataFrame
        One mapping per image, e.g. from :func:`evaluate_image`; non-numeric entries
        (an image name, say) are ignored.

    Returns
    -------
    pandas.DataFrame
        Index ``["mean", "std"]`` (standard deviation with ``ddof=1``; NaN for one image),
        one column per numeric entry. ``summarize(rows).loc["mean"]`` is the per-image
        average that the original reports.
    """
    table = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if table.empty:
        raise ValueError("summarize needs at least one per-image result, got none")
    numeric = table.select_dtypes(include="number")
    if numeric.shape[1] == 0:
        raise ValueError(f"no numeric column to summarize among {list(table.columns)}")
    return numeric.agg(["mean", "std"])
