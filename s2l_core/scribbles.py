"""Scribbles synthesized from full masks, for every image of a prepared dataset.

Scribble images use the encoding of :mod:`s2l_core.encoding` (0 background,
1 foreground, 250 unlabelled), whose names this module re-exports.

Synthesis follows the original (Lee & Jeong, MICCAI 2020):

- foreground: the skeleton of all nuclei together; each 8-connected piece of it is one
  scribble (touching nuclei share one); a fraction ``ratio`` of the pieces is kept;
- background: the skeleton of the background, cut at its Harris corners (a 3×3 patch is
  cleared around each), as many pieces kept as foreground pieces were kept.

Two differences from the original are deliberate: every random choice is seeded (per
image, from the seed and the image id, so the result does not depend on processing
order), and the pieces kept at a smaller ratio are a subset of those kept at a larger one
(one random order of the pieces per image), so a sweep over ratios adds annotation
rather than redrawing it. Where the background has fewer pieces than wanted, all of them
are kept and :attr:`ScribbleResult.bg_shortfall` says how many were missing (the original
crashed).
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.feature import corner_harris, corner_peaks
from skimage.morphology import skeletonize

from s2l_core.checks import check_ratio
from s2l_core.data import PreparedDataset
from s2l_core.encoding import (
    BACKGROUND,
    FOREGROUND,
    UNLABELLED,
    from_napari,
    read_scribble,
    save_scribble,
    to_napari,
    validate_scribble,
)
from s2l_core.files import atomic_dir, lock_of, locked, read_image, remove_stale, write_image
from s2l_core.runtime import parallel_map

__all__ = [
    "BACKGROUND",
    "FOREGROUND",
    "RATIOS",
    "UNLABELLED",
    "ScribblePieces",
    "ScribbleResult",
    "ScribbleSet",
    "from_napari",
    "prepare_scribbles",
    "read_scribble",
    "save_scribble",
    "scribble_pieces",
    "synthesize_scribbles",
    "to_napari",
    "validate_scribble",
]

#: The scribble ratios ("scribble detail") of the paper.
RATIOS = (0.1, 0.3, 0.5, 1.0)

_EIGHT = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------- synthesis


@dataclass(frozen=True)
class ScribblePieces:
    """Every candidate scribble of one image, before the random selection.

    Attributes
    ----------
    fg : numpy.ndarray
        ``(H, W)`` ``int32``: 0, or the index (from 1) of the foreground skeleton piece.
    n_fg : int
        Number of foreground pieces.
    bg : numpy.ndarray
        ``(H, W)`` ``int32``: 0, or the index (from 1) of the cut background skeleton piece.
    n_bg : int
        Number of background pieces.
    """

    fg: np.ndarray
    n_fg: int
    bg: np.ndarray
    n_bg: int


@dataclass(frozen=True)
class ScribbleResult:
    """Synthesized scribbles of one image at one ratio.

    Attributes
    ----------
    scribble : numpy.ndarray
        ``(H, W)`` ``uint8``: 0 background, 1 foreground, 250 unlabelled.
    ratio : float
        Fraction of foreground pieces asked for.
    n_fg_pieces, n_fg_kept : int
        Foreground pieces available and kept.
    n_bg_pieces, n_bg_kept : int
        Background pieces available and kept.
    n_bg_wanted : int
        Background pieces wanted (= ``n_fg_kept``).
    """

    scribble: np.ndarray
    ratio: float
    n_fg_pieces: int
    n_fg_kept: int
    n_bg_pieces: int
    n_bg_kept: int
    n_bg_wanted: int

    @property
    def bg_shortfall(self) -> int:
        """How many background pieces were wanted but did not exist."""
        return self.n_bg_wanted - self.n_bg_kept

    def summary(self) -> dict:
        """The counts as a flat dict (for tables)."""
        return {
            "ratio": self.ratio,
            "n_fg_pieces": self.n_fg_pieces,
            "n_fg_kept": self.n_fg_kept,
            "n_bg_pieces": self.n_bg_pieces,
            "n_bg_kept": self.n_bg_kept,
            "bg_shortfall": self.bg_shortfall,
            "fg_pixels": int(np.count_nonzero(self.scribble == FOREGROUND)),
            "bg_pixels": int(np.count_nonzero(self.scribble == BACKGROUND)),
        }


def _foreground(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) mask, got shape {labels.shape}")
    if labels.dtype != bool and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be boolean or integer, got dtype {labels.dtype}")
    return labels > 0


def scribble_pieces(labels: np.ndarray, *, min_distance: int = 5) -> ScribblePieces:
    """Find every candidate scribble piece of a mask.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` instance labels or binary mask (foreground where > 0).
    min_distance : int, optional
        Minimum distance between Harris corners that cut the background skeleton.

    Returns
    -------
    ScribblePieces
    """
    fg = _foreground(labels)
    fg_pieces, n_fg = ndi.label(skeletonize(fg), structure=_EIGHT)
    bg_skeleton = skeletonize(~fg)
    if bg_skeleton.any():
        x = bg_skeleton.astype(np.float64)
        # scikit-image squeezes an image one pixel high or wide to 1-D and refuses it.
        response = corner_harris(x) if min(x.shape) > 1 else corner_harris(np.pad(x, 1))[1:-1, 1:-1]
        # threshold_rel=0.1 is the default of the scikit-image the original ran on;
        # newer releases changed it and also return peaks in flat regions.
        corners = corner_peaks(response, min_distance=min_distance, threshold_rel=0.1)
        cut = np.zeros_like(bg_skeleton)
        h, w = cut.shape
        for r, c in corners:
            cut[max(r - 1, 0) : min(r + 2, h), max(c - 1, 0) : min(c + 2, w)] = True
        bg_skeleton &= ~cut
    bg_pieces, n_bg = ndi.label(bg_skeleton, structure=_EIGHT)
    return ScribblePieces(
        fg_pieces.astype(np.int32), int(n_fg), bg_pieces.astype(np.int32), int(n_bg)
    )


def _rng(seed: int, key: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def _n_kept(ratio: float, n: int) -> int:
    return 0 if n == 0 else max(1, min(n, round(ratio * n)))


def synthesize_scribbles(
    labels: np.ndarray,
    ratios: float | Sequence[float] = 0.3,
    *,
    seed: int = 0,
    key: str = "",
    pieces: ScribblePieces | None = None,
) -> ScribbleResult | dict[float, ScribbleResult]:
    """Synthesize scribbles from a full mask, as the original Scribble2Label does.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` instance labels or binary mask (foreground where > 0).
    ratios : float or sequence of float, optional
        Fraction(s) of foreground skeleton pieces to keep, each in (0, 1]. At least one
        piece is kept when any exists.
    seed : int, optional
        Seed of the random selection.
    key : str, optional
        Mixed into the seed (the image id), so every image gets its own draw whatever the
        order in which images are processed.
    pieces : ScribblePieces, optional
        Precomputed :func:`scribble_pieces` of ``labels``.

    Returns
    -------
    ScribbleResult or dict of float to ScribbleResult
        One result for a single ratio, a dict keyed by ratio for a sequence. Pieces kept
        at a smaller ratio are kept at every larger ratio too.
    """
    single = np.isscalar(ratios)
    ratio_list = [check_ratio(r) for r in ([ratios] if single else ratios)]
    if pieces is None:
        pieces = scribble_pieces(labels)
    elif pieces.fg.shape != np.shape(labels):
        raise ValueError(f"pieces of shape {pieces.fg.shape} do not fit labels {np.shape(labels)}")
    rng = _rng(seed, key)
    fg_order = rng.permutation(pieces.n_fg) + 1
    bg_order = rng.permutation(pieces.n_bg) + 1
    results = {}
    for ratio in ratio_list:
        n_fg = _n_kept(ratio, pieces.n_fg)
        n_bg = min(n_fg, pieces.n_bg)
        scribble = np.full(pieces.fg.shape, UNLABELLED, dtype=np.uint8)
        keep_bg = np.zeros(pieces.n_bg + 1, dtype=bool)
        keep_bg[bg_order[:n_bg]] = True
        scribble[keep_bg[pieces.bg]] = BACKGROUND
        keep_fg = np.zeros(pieces.n_fg + 1, dtype=bool)
        keep_fg[fg_order[:n_fg]] = True
        scribble[keep_fg[pieces.fg]] = FOREGROUND
        results[ratio] = ScribbleResult(scribble, ratio, pieces.n_fg, n_fg, pieces.n_bg, n_bg, n_fg)
    return results[ratio_list[0]] if single else results


# --------------------------------------------------------------------------- dataset level


def _ratio_dir(ratio: float) -> str:
    return f"r{round(ratio * 100):03d}"


class ScribbleSet:
    """Synthesized scribbles of a prepared dataset, for one seed.

    Layout: ``<dataset>/scribbles/seed<seed>/r<percent>/<image_id>.png`` and
    ``summary.csv`` (one row per image and ratio: pieces available, kept, shortfall,
    pixel counts).

    Parameters
    ----------
    dataset : PreparedDataset
        The dataset the scribbles belong to.
    seed : int, optional
        The synthesis seed.
    """

    def __init__(self, dataset: PreparedDataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.root = dataset.root / "scribbles" / f"seed{self.seed}"
        summary = self.root / "summary.csv"
        if not summary.is_file():
            raise FileNotFoundError(
                f"no scribbles for seed {self.seed} in {self.root}; run prepare_scribbles() first"
            )
        self.summary: pd.DataFrame = pd.read_csv(summary, dtype={"image_id": str})
        self.ratios: tuple[float, ...] = tuple(
            float(r) for r in sorted(self.summary["ratio"].unique())
        )

    def path(self, image_id: str, ratio: float) -> Path:
        """Path of the scribble PNG of ``image_id`` at ``ratio``."""
        ratio = check_ratio(ratio)
        if not any(np.isclose(ratio, r) for r in self.ratios):
            raise ValueError(f"no scribbles at ratio {ratio}; this set has {self.ratios}")
        return self.root / _ratio_dir(ratio) / f"{image_id}.png"

    def scribble(self, image_id: str, ratio: float) -> np.ndarray:
        """The ``(H, W)`` ``uint8`` scribble image of ``image_id`` at ``ratio``."""
        return read_scribble(self.path(image_id, ratio))

    def missing_files(self) -> list[Path]:
        """Scribble files that ``summary.csv`` lists but the folder lacks, and images of
        the dataset that the summary leaves out (empty when the set is complete)."""
        missing = []
        for ratio, rows in self.summary.groupby("ratio"):
            folder = self.root / _ratio_dir(float(ratio))
            present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
            missing += [folder / f"{i}.png" for i in rows["image_id"] if f"{i}.png" not in present]
        unlisted = set(self.dataset.manifest.index) - set(self.summary["image_id"])
        folder = self.root / _ratio_dir(self.ratios[0]) if self.ratios else self.root
        return missing + [folder / f"{i}.png" for i in sorted(unlisted)]


def _scribble_one(args: tuple[Path, str, tuple[float, ...], int, Path]) -> list[dict]:
    labels_path, image_id, ratios, seed, out = args
    results = synthesize_scribbles(read_image(labels_path), ratios, seed=seed, key=image_id)
    rows = []
    for ratio, result in results.items():
        write_image(out / _ratio_dir(ratio) / f"{image_id}.png", result.scribble)
        rows.append({"image_id": image_id, **result.summary()})
    return rows


def prepare_scribbles(
    dataset: PreparedDataset,
    ratios: Sequence[float] = RATIOS,
    *,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> ScribbleSet:
    """Synthesize and save scribbles for every image of a prepared dataset.

    Reuses a complete earlier run with the same seed that holds every requested ratio.
    The set for a seed is written into a temporary folder and renamed into place when
    complete.

    Parameters
    ----------
    dataset : PreparedDataset
        From :func:`s2l_core.data.prepare_dataset`.
    ratios : sequence of float, optional
        Scribble ratios, each in (0, 1].
    seed : int, optional
        Synthesis seed.
    workers : int, optional
        Worker processes (default: the number of CPUs, at most 8).
    progress : bool, optional
        Show a progress bar.
    force : bool, optional
        Synthesize again even if a complete set exists.

    Returns
    -------
    ScribbleSet

    Notes
    -----
    Processes that synthesize scribbles of one dataset take turns (the dataset's lock,
    :func:`s2l_core.files.lock_of`). An earlier set is reused only if every file its
    summary lists is present and it covers every image of the dataset.
    """
    wanted = {check_ratio(r) for r in ratios}
    with locked(lock_of(dataset.root), f"the dataset {dataset.root}"):
        return _prepare_locked(dataset, wanted, int(seed), workers, progress, force)


def _prepare_locked(
    dataset: PreparedDataset, wanted: set[float], seed: int, workers, progress, force
) -> ScribbleSet:
    root = dataset.root / "scribbles" / f"seed{seed}"
    if not force and (root / "summary.csv").is_file():
        existing = ScribbleSet(dataset, seed)
        missing = existing.missing_files()
        if not missing and all(any(np.isclose(r, e) for e in existing.ratios) for r in wanted):
            return existing
        if missing:
            print(
                f"{root} lacks {len(missing)} scribble files (e.g. "
                f"{missing[0].parent.name}/{missing[0].name}); synthesizing them again",
                file=sys.stderr,
            )
        wanted |= set(existing.ratios)
    remove_stale(root, held=True)
    ordered = tuple(sorted(wanted))
    ids = list(dataset.manifest["image_id"])
    with atomic_dir(root) as tmp:
        jobs = [(dataset.labels_path(i), i, ordered, seed, tmp) for i in ids]
        rows = parallel_map(_scribble_one, jobs, workers, "scribbles", progress)
        table = pd.DataFrame([row for chunk in rows for row in chunk])
        table.to_csv(tmp / "summary.csv", index=False)
    return ScribbleSet(dataset, seed)
