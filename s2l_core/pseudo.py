"""The EMA store of Scribble2Label and its update schedule.

Scribble2Label keeps, for every training image, a full-resolution map of the running
average (exponential moving average, EMA) of the network's foreground probability:

.. code-block:: text

    ema = alpha * p_fg + (1 - alpha) * ema        (alpha = 0.2, initial ema = 0)

The maps are updated every few epochs from predictions of the whole training images
(eval mode, no augmentation); the training loss (:mod:`s2l_core.losses`) turns their
confident pixels into pseudo-labels.

Unlike the original code, :class:`EMAStore` can be checkpointed: its
:meth:`EMAStore.state_dict` holds plain tensors, ints, floats and strings only, so a
checkpoint containing it loads with ``torch.load(..., weights_only=True)`` and a resumed
run continues from exactly the same maps (the original restarted them at 0, which makes
every unscribbled pixel confident background right after warm-up).

Note for data loaders: with worker processes, each worker holds its own copy of the
store as it was when the workers started. After an update, restart the workers (the
default ``persistent_workers=False`` does so every epoch) or read the maps in the main
process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from s2l_core.checks import check_alpha, check_tau
from s2l_core.encoding import BACKGROUND, FOREGROUND, UNLABELLED
from s2l_core.losses import pseudo_label_targets

__all__ = [
    "ConfidenceSummary",
    "EMAStore",
    "PseudoLabelQuality",
    "ema_due",
    "ema_due_iteration",
    "pseudo_label_accuracy",
]

_STATE_KIND = "s2l_core.EMAStore"
_STATE_VERSION = 1
_STARTS = ("zero", "first")


def _check_shape(image_id: str, shape: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"shape of image {image_id!r} must be a pair (H, W), got {shape!r}"
        ) from None
    if h <= 0 or w <= 0:
        raise ValueError(f"shape of image {image_id!r} must be positive, got {(h, w)}")
    return h, w


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.dtype != torch.float64:
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


@dataclass(frozen=True)
class ConfidenceSummary:
    """Pseudo-label coverage of one EMA map.

    Attributes
    ----------
    frac_fg : float
        Fraction of the considered pixels with ``ema > tau`` (confident foreground).
    frac_bg : float
        Fraction with ``ema < 1 - tau`` (confident background).
    frac_confident : float
        ``frac_fg + frac_bg``.
    n_pixels : int
        Number of pixels considered (all, or the unscribbled ones); fractions are 0.0
        when it is 0.
    """

    frac_fg: float
    frac_bg: float
    frac_confident: float
    n_pixels: int

    def as_dict(self) -> dict[str, float | int]:
        """Return the fields as a dict."""
        return asdict(self)


@dataclass(frozen=True)
class PseudoLabelQuality:
    """Agreement of the pseudo-labels of one image with its full mask.

    Attributes
    ----------
    accuracy : float
        Among unscribbled pixels that get a pseudo-label, the fraction whose label
        agrees with the full mask; NaN when no pixel gets one.
    accuracy_fg : float
        The same among pixels pseudo-labelled foreground (a precision); NaN if none.
    accuracy_bg : float
        The same among pixels pseudo-labelled background; NaN if none.
    coverage : float
        Pseudo-labelled pixels divided by unscribbled pixels (0.0 if none unscribbled).
    n_labelled : int
        Number of pseudo-labelled pixels.
    n_unscribbled : int
        Number of unscribbled pixels.
    """

    accuracy: float
    accuracy_fg: float
    accuracy_bg: float
    coverage: float
    n_labelled: int
    n_unscribbled: int

    def as_dict(self) -> dict[str, float | int]:
        """Return the fields as a dict."""
        return asdict(self)


class EMAStore:
    """Running average of the foreground probability, one map per training image.

    Parameters
    ----------
    shapes : Mapping[str, tuple[int, int]]
        Image id -> full-resolution image size ``(H, W)``. Images may differ in size.
    alpha : float, default 0.2
        Weight of the newest prediction, in ``(0, 1]``.
    start : {"zero", "first"}, default "zero"
        ``"zero"``: every map starts at 0 and the first update gives ``alpha * p``, as
        in the original. With ``alpha = 0.2`` a pixel predicted foreground with
        certainty needs 8 updates to pass ``tau = 0.8``, while background is confident
        after one: a short warm-up (few EMA updates) then labels every unscribbled pixel
        background. ``"first"``: the first update stores the prediction itself (the
        running average without the bias towards 0).

    Notes
    -----
    Every map is float32, of shape (H, W), and starts at 0. The
    update is computed in float32 as ``alpha * p + (1 - alpha) * ema`` with
    ``alpha`` and ``1 - alpha`` rounded to float32. Memory is ``4 * H * W`` bytes per
    image (see :attr:`nbytes`).

    Examples
    --------
    >>> store = EMAStore({"a": (2, 3)}, alpha=0.2)
    >>> store.update("a", np.ones((2, 3), np.float32))
    >>> round(float(store.get("a")[0, 0]), 6)
    0.2
    """

    def __init__(
        self, shapes: Mapping[str, tuple[int, int]], alpha: float = 0.2, start: str = "zero"
    ) -> None:
        if not isinstance(shapes, Mapping):
            raise TypeError(f"shapes must be a mapping id -> (H, W), got {type(shapes).__name__}")
        if start not in _STARTS:
            raise ValueError(f"start must be one of {_STARTS}, got {start!r}")
        self.alpha = check_alpha(alpha)
        self.start = start
        self._maps: dict[str, np.ndarray] = {}
        self._n_updates: dict[str, int] = {}
        for image_id, shape in shapes.items():
            if not isinstance(image_id, str):
                raise TypeError(f"image ids must be str, got {type(image_id).__name__}")
            self._maps[image_id] = np.zeros(_check_shape(image_id, shape), dtype=np.float32)
            self._n_updates[image_id] = 0

    # ----------------------------------------------------------------- access

    def _map(self, image_id: str) -> np.ndarray:
        try:
            return self._maps[image_id]
        except KeyError:
            raise KeyError(f"unknown image id {image_id!r} (the store holds {len(self)})") from None

    def __len__(self) -> int:
        return len(self._maps)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._maps

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __repr__(self) -> str:
        return f"EMAStore({len(self)} images, alpha={self.alpha}, {self.nbytes / 2**20:.1f} MiB)"

    @property
    def ids(self) -> list[str]:
        """Image ids in insertion order."""
        return list(self._maps)

    @property
    def nbytes(self) -> int:
        """Total memory of the maps in bytes (``4 * sum(H * W)``)."""
        return sum(m.nbytes for m in self._maps.values())

    def shape(self, image_id: str) -> tuple[int, int]:
        """Return the ``(H, W)`` of the map of ``image_id``."""
        h, w = self._map(image_id).shape
        return h, w

    def get(self, image_id: str, *, copy: bool = False) -> np.ndarray:
        """Return the EMA map of one image.

        Parameters
        ----------
        image_id : str
            Image id.
        copy : bool, default False
            If False, return a **read-only view** of the stored map: it costs no memory
            but reflects later :meth:`update` calls. If True, return a writable
            snapshot (a copy).

        Returns
        -------
        numpy.ndarray
            float32 array of shape (H, W) with values in ``[0, 1]``.
        """
        m = self._map(image_id)
        if copy:
            return m.copy()
        view = m.view()
        view.flags.writeable = False
        return view

    def n_updates(self, image_id: str) -> int:
        """Number of :meth:`update` calls made for ``image_id``."""
        self._map(image_id)
        return self._n_updates[image_id]

    def initialized(self, image_id: str) -> bool:
        """Whether ``image_id`` has received at least one update."""
        return self.n_updates(image_id) > 0

    # ----------------------------------------------------------------- update

    def update(self, image_id: str, prob_fg: np.ndarray | torch.Tensor) -> None:
        """Fold a new foreground probability map into the running average.

        ``ema = alpha * prob_fg + (1 - alpha) * ema``, in place, in float32.

        Parameters
        ----------
        image_id : str
            Image id.
        prob_fg : numpy.ndarray or torch.Tensor
            Foreground probability of the whole image, shape (H, W) equal to the
            stored map, floating dtype, finite values in ``[0, 1]``. A tensor may live
            on any device; it is copied to the CPU.

        Raises
        ------
        KeyError
            Unknown ``image_id``.
        TypeError, ValueError
            Non-floating dtype, wrong shape, or values outside ``[0, 1]`` / not finite.
        """
        m = self._map(image_id)
        p = _to_numpy(prob_fg)
        if not np.issubdtype(p.dtype, np.floating):
            raise TypeError(f"prob_fg must be floating-point, got dtype {p.dtype}")
        if p.shape != m.shape:
            raise ValueError(
                f"prob_fg for image {image_id!r} must have shape {m.shape}, got {p.shape}"
            )
        p = p.astype(np.float32, copy=False)
        in_range = (p >= 0) & (p <= 1)  # False for NaN
        if not in_range.all():
            bad = p[~in_range]
            raise ValueError(
                f"prob_fg for image {image_id!r} must lie in [0, 1]; found {bad.size} "
                f"value(s) outside, e.g. {bad[:5].tolist()}"
            )
        if self.start == "first" and self._n_updates[image_id] == 0:
            np.copyto(m, p)
        else:
            np.multiply(m, np.float32(1.0 - self.alpha), out=m)
            m += np.float32(self.alpha) * p
        # float32 rounding can overshoot [0, 1] by an ulp; keep the documented range.
        np.clip(m, 0.0, 1.0, out=m)
        self._n_updates[image_id] += 1

    # ----------------------------------------------------------------- checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Return a snapshot made of plain tensors, ints, floats and strings.

        Returns
        -------
        dict
            ``{"kind": str, "version": int, "alpha": float,
            "maps": {id: float32 CPU tensor (H, W)}, "n_updates": {id: int}}``; the
            tensors are copies. Safe for ``torch.load(..., weights_only=True)``.
        """
        return {
            "kind": _STATE_KIND,
            "version": _STATE_VERSION,
            "alpha": self.alpha,
            "start": self.start,
            "maps": {k: torch.from_numpy(m.copy()) for k, m in self._maps.items()},
            "n_updates": dict(self._n_updates),
        }

    @staticmethod
    def _check_state(sd: Mapping[str, Any]) -> None:
        if not isinstance(sd, Mapping):
            raise TypeError(f"state dict must be a mapping, got {type(sd).__name__}")
        missing = {"kind", "version", "alpha", "maps", "n_updates"} - set(sd)
        if missing:
            raise ValueError(f"state dict lacks the keys {sorted(missing)}")
        if sd["kind"] != _STATE_KIND:
            raise ValueError(f"state dict is not an EMAStore state (kind {sd['kind']!r})")
        if sd["version"] != _STATE_VERSION:
            raise ValueError(f"unsupported EMAStore state version {sd['version']!r}")
        if set(sd["maps"]) != set(sd["n_updates"]):
            raise ValueError("state dict: 'maps' and 'n_updates' hold different image ids")
        for k, t in sd["maps"].items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.ndim != 2:
                raise ValueError(f"state dict: map of {k!r} must be a 2-D float32 tensor")
            n = sd["n_updates"][k]
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"state dict: n_updates of {k!r} must be an int >= 0")

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot exactly (maps bit for bit, counts, alpha).

        Parameters
        ----------
        sd : Mapping
            As returned by :meth:`state_dict` (possibly after a torch.save/torch.load
            round trip).

        Raises
        ------
        ValueError
            If the snapshot is malformed, or holds other image ids or map shapes than
            this store (the store is then left unchanged).
        """
        self._check_state(sd)
        if set(sd["maps"]) != set(self._maps):
            extra = sorted(set(sd["maps"]) - set(self._maps))[:5]
            lacking = sorted(set(self._maps) - set(sd["maps"]))[:5]
            raise ValueError(
                f"state dict holds other image ids than this store "
                f"(unknown here: {extra}, missing there: {lacking})"
            )
        for k, t in sd["maps"].items():
            if tuple(t.shape) != self._maps[k].shape:
                raise ValueError(
                    f"state dict: map of {k!r} has shape {tuple(t.shape)}, "
                    f"the store expects {self._maps[k].shape}"
                )
        alpha = check_alpha(sd["alpha"])
        start = sd.get("start", "zero")
        if start not in _STARTS:
            raise ValueError(f"state dict: unknown start {start!r}")
        for k, t in sd["maps"].items():
            np.copyto(self._maps[k], t.detach().cpu().numpy())
            self._n_updates[k] = int(sd["n_updates"][k])
        self.alpha = alpha
        self.start = start

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> EMAStore:
        """Build a store from a :meth:`state_dict` snapshot without knowing the shapes."""
        cls._check_state(sd)
        shapes = {k: tuple(t.shape) for k, t in sd["maps"].items()}
        store = cls(shapes, alpha=sd["alpha"], start=sd.get("start", "zero"))
        store.load_state_dict(sd)
        return store

    # ----------------------------------------------------------------- summaries

    def confidence_summary(
        self, image_id: str, tau: float = 0.8, scribble: np.ndarray | None = None
    ) -> ConfidenceSummary:
        """Fractions of pixels that are confident foreground / background.

        Parameters
        ----------
        image_id : str
            Image id.
        tau : float, default 0.8
            Confidence threshold in ``(0.5, 1]`` (strict: ``ema == tau`` is not
            confident).
        scribble : numpy.ndarray or None, default None
            Integer (H, W) scribble map (0, 1, 250). If given, only unscribbled pixels
            are counted (the pixels that can get a pseudo-label); otherwise all pixels.

        Returns
        -------
        ConfidenceSummary
        """
        ema = self._map(image_id)
        if scribble is None:
            scribble = np.full(ema.shape, UNLABELLED, dtype=np.int64)
        targets = _targets_for(ema, scribble, tau, "scribble")
        n = int((_scribble_array(scribble, ema.shape, "scribble") == UNLABELLED).sum())
        n_fg = int((targets == FOREGROUND).sum())
        n_bg = int((targets == BACKGROUND).sum())
        if n == 0:
            return ConfidenceSummary(0.0, 0.0, 0.0, 0)
        return ConfidenceSummary(n_fg / n, n_bg / n, (n_fg + n_bg) / n, n)


def _scribble_array(scribble: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    s = _to_numpy(scribble)
    if s.dtype == np.bool_ or not np.issubdtype(s.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array (0, 1, {UNLABELLED}), got {s.dtype}")
    if s.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {s.shape}")
    return s.astype(np.int64, copy=False)


def _targets_for(ema: np.ndarray, scribble: Any, tau: float, name: str) -> np.ndarray:
    """Pseudo-label targets (H, W) int64 via :func:`s2l_core.losses.pseudo_label_targets`."""
    s = _scribble_array(scribble, ema.shape, name)
    t = pseudo_label_targets(
        torch.from_numpy(np.ascontiguousarray(ema))[None],
        torch.from_numpy(np.ascontiguousarray(s))[None],
        tau=tau,
    )
    return t[0].numpy()


def pseudo_label_accuracy(
    store: EMAStore,
    image_id: str,
    gt_foreground: np.ndarray,
    scribble: np.ndarray,
    tau: float = 0.8,
) -> PseudoLabelQuality:
    """How right the current pseudo-labels of one image are, against its full mask.

    Parameters
    ----------
    store : EMAStore
        The EMA store.
    image_id : str
        Image id.
    gt_foreground : numpy.ndarray
        Full mask of shape (H, W): bool, or integer where any non-zero value is
        foreground (an instance label image works).
    scribble : numpy.ndarray
        Integer scribble map of shape (H, W): 0, 1 scribbled, 250 unlabelled.
    tau : float, default 0.8
        Confidence threshold in ``(0.5, 1]``.

    Returns
    -------
    PseudoLabelQuality
        Accuracy over pseudo-labelled pixels (overall, foreground, background; NaN
        where there is no such pixel) and coverage of the unscribbled pixels.
    """
    tau = check_tau(tau)
    ema = store._map(image_id)
    gt = _to_numpy(gt_foreground)
    if gt.shape != ema.shape:
        raise ValueError(f"gt_foreground must have shape {ema.shape}, got {gt.shape}")
    if not (gt.dtype == np.bool_ or np.issubdtype(gt.dtype, np.integer)):
        raise TypeError(f"gt_foreground must be bool or integer, got dtype {gt.dtype}")
    gt = gt.astype(bool)
    targets = _targets_for(ema, scribble, tau, "scribble")
    s = _scribble_array(scribble, ema.shape, "scribble")

    n_unscribbled = int((s == UNLABELLED).sum())
    fg = targets == FOREGROUND
    bg = targets == BACKGROUND
    n_fg, n_bg = int(fg.sum()), int(bg.sum())
    ok_fg = int((fg & gt).sum())
    ok_bg = int((bg & ~gt).sum())
    n_labelled = n_fg + n_bg

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    return PseudoLabelQuality(
        accuracy=ratio(ok_fg + ok_bg, n_labelled),
        accuracy_fg=ratio(ok_fg, n_fg),
        accuracy_bg=ratio(ok_bg, n_bg),
        coverage=n_labelled / n_unscribbled if n_unscribbled else 0.0,
        n_labelled=n_labelled,
        n_unscribbled=n_unscribbled,
    )


# --------------------------------------------------------------------------- schedule


def _check_nonneg_int(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def ema_due(epoch: int, every: int = 5, start: int = 4) -> bool:
    """Whether the EMA maps are updated at the end of ``epoch``.

    Epochs are counted **from 0**: ``epoch`` is the index of the epoch that has just
    finished (its training and validation done). With the defaults the update happens
    after epochs 4, 9, 14, ..., i.e. after the 5th, 10th, 15th ... completed epoch, as in
    the original; warm-up epochs are included (the maps are already filled when the
    pseudo-label term starts).

    Parameters
    ----------
    epoch : int
        0-based index of the epoch just completed, ``>= 0``.
    every : int, default 5
        Period in epochs, ``>= 1``.
    start : int, default 4
        First 0-based epoch at which an update happens, ``>= 0``.

    Returns
    -------
    bool
        ``epoch >= start and (epoch - start) % every == 0``.
    """
    epoch = _check_nonneg_int(epoch, "epoch")
    every = _check_nonneg_int(every, "every", minimum=1)
    start = _check_nonneg_int(start, "start")
    return epoch >= start and (epoch - start) % every == 0


def ema_due_iteration(iteration: int, every_iterations: int, start: int | None = None) -> bool:
    """Iteration-based variant of :func:`ema_due` for small training budgets.

    Parameters
    ----------
    iteration : int
        0-based index of the optimisation step just completed, ``>= 0``.
    every_iterations : int
        Period in steps, ``>= 1``.
    start : int or None, default None
        First 0-based step index at which an update happens; ``None`` means
        ``every_iterations - 1``, i.e. after every ``every_iterations`` completed steps
        (steps 9, 19, 29, ... for a period of 10).

    Returns
    -------
    bool
        ``iteration >= start and (iteration - start) % every_iterations == 0``.
    """
    every = _check_nonneg_int(every_iterations, "every_iterations", minimum=1)
    if start is None:
        start = every - 1
    return ema_due(iteration, every=every, start=start)
