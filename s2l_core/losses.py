"""The Scribble2Label loss: partial cross-entropy plus confident EMA pseudo-labels.

Label encoding (see :mod:`s2l_core.scribbles`): ``0`` background, ``1`` foreground,
``250`` unlabelled. Every loss here ignores label ``250``.

The loss of Scribble2Label (Lee & Jeong, MICCAI 2020) is

.. math::

    L = \\mathrm{pCE}(\\text{scribbles}) + \\lambda \\, \\mathrm{CE}(\\text{pseudo-labels}),

where both terms are means over their own valid pixels in the whole batch. A pixel gets
a pseudo-label only where it is unscribbled and the running average (EMA) of the
network's foreground probability is confident: foreground where ``ema > tau``,
background where ``ema < 1 - tau`` (strict inequalities). During warm-up only the pCE
term is used.

Differences from the original code, on purpose:

- a batch without any valid pixel gives a loss of exactly zero that is still connected
  to the logits (``backward`` works and yields zero gradients) instead of a NaN mean;
- the cross-entropy is always computed in float32, with autocast disabled, whatever
  the dtype of the logits;
- an optional ``valid`` mask marks pixels that carry no information (padding added by a
  geometric augmentation, EMA entries never computed); they are ignored by both terms.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from s2l_core.checks import check_tau
from s2l_core.encoding import BACKGROUND, FOREGROUND, UNLABELLED

__all__ = [
    "LossParts",
    "affinity_loss",
    "dice_loss",
    "dice_targets",
    "partial_cross_entropy",
    "pseudo_label_cross_entropy",
    "pseudo_label_targets",
    "scribble2label_loss",
]


# --------------------------------------------------------------------------- checks


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 4 or logits.shape[1] != 2:
        raise ValueError(
            f"logits must have shape (N, 2, H, W) (two classes: background, foreground), "
            f"got shape {tuple(logits.shape)}"
        )
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _check_label_map(
    labels: torch.Tensor, name: str, shape: tuple[int, ...], device: torch.device
) -> None:
    """Check a label map of shape (N, H, W) with values in {0, 1, 250}."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if not _is_integer_dtype(labels.dtype):
        raise TypeError(
            f"{name} must be an integer tensor (0 background, 1 foreground, "
            f"{UNLABELLED} unlabelled), got dtype {labels.dtype}"
        )
    if tuple(labels.shape) != shape:
        raise ValueError(
            f"{name} must have shape (N, H, W) = {shape} to match the logits, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the logits are on {device}")
    known = (labels == BACKGROUND) | (labels == FOREGROUND) | (labels == UNLABELLED)
    if not bool(known.all()):
        bad = torch.unique(labels[~known])[:10].tolist()
        raise ValueError(
            f"{name} contains unknown label values {bad}; allowed are {BACKGROUND} "
            f"(background), {FOREGROUND} (foreground) and {UNLABELLED} (unlabelled)"
        )


def _check_logits_and_labels(
    logits: torch.Tensor, labels: torch.Tensor, name: str
) -> tuple[int, int, int]:
    """Check logits (N, 2, H, W) and a label map that matches them; return (N, H, W)."""
    _check_logits(logits)
    shape = (logits.shape[0], logits.shape[2], logits.shape[3])
    _check_label_map(labels, name, shape, logits.device)
    return shape


def _check_valid(valid: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> None:
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"valid must be a torch.Tensor or None, got {type(valid).__name__}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    if tuple(valid.shape) != shape:
        raise ValueError(f"valid must have shape (N, H, W) = {shape}, got {tuple(valid.shape)}")
    if valid.device != device:
        raise ValueError(f"valid is on {valid.device} but expected {device}")


# --------------------------------------------------------------------------- losses


def _masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over pixels whose target is not ``UNLABELLED``; zero-with-grad if none.

    Inputs are assumed validated. Computed in float32 with autocast disabled.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits32 = logits.float()
        target = targets.long()
        total = F.cross_entropy(logits32, target, ignore_index=UNLABELLED, reduction="sum")
        count = (target != UNLABELLED).sum()
        # With no valid pixel ``total`` is an exact 0 that still depends on the logits,
        # and the clamp keeps the division finite: the result is 0 with zero gradients.
        return total / count.clamp(min=1).to(total.dtype)


def partial_cross_entropy(logits: torch.Tensor, scribbles: torch.Tensor) -> torch.Tensor:
    """Partial cross-entropy (pCE) on the scribbled pixels of a batch.

    Parameters
    ----------
    logits : torch.Tensor
        Network output of shape (N, 2, H, W), any floating dtype; channel 0 is
        background, channel 1 foreground (softmax over the channel axis).
    scribbles : torch.Tensor
        Integer tensor of shape (N, H, W), on the same device: ``0`` background,
        ``1`` foreground, ``250`` unlabelled (ignored).

    Returns
    -------
    torch.Tensor
        Scalar float32: the cross-entropy averaged over all scribbled pixels of the
        batch (not per image). A batch without a scribbled pixel gives ``0`` connected
        to ``logits`` (its gradient is all zeros), never NaN.

    Raises
    ------
    TypeError, ValueError
        On a wrong shape, dtype or device, or a label value other than 0, 1, 250.
    """
    _check_logits_and_labels(logits, scribbles, "scribbles")
    return _masked_cross_entropy(logits, scribbles)


def pseudo_label_targets(
    ema: torch.Tensor,
    scribbles: torch.Tensor,
    tau: float = 0.8,
    valid: torch.Tensor | None = None,
    *,
    check: bool = True,
) -> torch.Tensor:
    """Pseudo-label targets from the EMA of the foreground probability.

    Parameters
    ----------
    ema : torch.Tensor
        Floating tensor of shape (N, H, W): the running average of the foreground
        probability, in ``[0, 1]`` at every valid pixel. The comparisons are made in the
        dtype of ``ema`` (thresholds are rounded to it), so with a float32 map an entry
        equal to ``float32(tau)`` is not confident.
    scribbles : torch.Tensor
        Integer tensor of shape (N, H, W), same device: ``0``/``1`` scribbled,
        ``250`` unlabelled.
    tau : float, default 0.8
        Confidence threshold in ``(0.5, 1]``.
    valid : torch.Tensor or None, default None
        Bool tensor of shape (N, H, W), same device. Pixels where it is ``False``
        (padding from augmentation, EMA entries never computed) get ``250`` and their
        EMA values are not checked (they may be anything, NaN included).
    check : bool, default True
        Check the inputs first (the value checks wait for the device). The training
        step passes ``False``: its inputs were checked where they were made.

    Returns
    -------
    torch.Tensor
        int64 tensor of shape (N, H, W): ``1`` where unscribbled, valid and
        ``ema > tau``; ``0`` where unscribbled, valid and ``ema < 1 - tau``; ``250``
        everywhere else (scribbled, unconfident or invalid pixels).

    Raises
    ------
    TypeError, ValueError
        On wrong shapes, dtypes or devices, unknown scribble values, EMA values outside
        ``[0, 1]`` at valid pixels, or ``tau`` outside ``(0.5, 1]``.
    """
    if check:
        _check_pseudo_inputs(ema, scribbles, tau, valid)
    usable = scribbles == UNLABELLED
    if valid is not None:
        usable = usable & valid
    hi = torch.tensor(tau, dtype=ema.dtype, device=ema.device)
    lo = torch.tensor(1.0 - tau, dtype=ema.dtype, device=ema.device)
    targets = torch.full(ema.shape, UNLABELLED, dtype=torch.int64, device=ema.device)
    targets[usable & (ema > hi)] = FOREGROUND
    targets[usable & (ema < lo)] = BACKGROUND
    return targets


def _check_pseudo_inputs(
    ema: torch.Tensor, scribbles: torch.Tensor, tau: float, valid: torch.Tensor | None
) -> None:
    """The checks of :func:`pseudo_label_targets`."""
    check_tau(tau)
    if not isinstance(ema, torch.Tensor):
        raise TypeError(f"ema must be a torch.Tensor, got {type(ema).__name__}")
    if not ema.dtype.is_floating_point:
        raise TypeError(f"ema must be a floating-point tensor, got dtype {ema.dtype}")
    if ema.ndim != 3:
        raise ValueError(f"ema must have shape (N, H, W), got shape {tuple(ema.shape)}")
    shape = tuple(ema.shape)
    _check_label_map(scribbles, "scribbles", shape, ema.device)
    _check_valid(valid, shape, ema.device)
    checked = ema if valid is None else ema[valid]
    in_range = (checked >= 0) & (checked <= 1)  # False for NaN as well
    if not bool(in_range.all()):
        bad = checked[~in_range]
        raise ValueError(
            f"ema must lie in [0, 1] at valid pixels; found {bad.numel()} value(s) outside, "
            f"e.g. {bad[:5].tolist()}"
        )


def pseudo_label_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against pseudo-label targets, averaged over labelled pixels.

    Parameters
    ----------
    logits : torch.Tensor
        Shape (N, 2, H, W), any floating dtype.
    targets : torch.Tensor
        Integer tensor of shape (N, H, W) with values in {0, 1, 250}, as returned by
        :func:`pseudo_label_targets`; ``250`` is ignored.

    Returns
    -------
    torch.Tensor
        Scalar float32 mean over the non-ignored pixels of the batch; ``0`` with a zero
        gradient when there is none.
    """
    _check_logits_and_labels(logits, targets, "targets")
    return _masked_cross_entropy(logits, targets)


@dataclass(frozen=True)
class LossParts:
    """Plain-number breakdown of :func:`scribble2label_loss` for logging.

    Attributes
    ----------
    pce : float
        Partial cross-entropy on scribbled pixels.
    pseudo : float
        Cross-entropy on pseudo-labelled pixels (0.0 during warm-up).
    n_scribbled : int
        Number of scribbled (valid) pixels in the batch.
    n_pseudo : int
        Number of pixels that received a pseudo-label.
    pseudo_fraction : float
        ``n_pseudo`` divided by the number of unscribbled valid pixels (0.0 if none).
    """

    pce: float
    pseudo: float
    n_scribbled: int
    n_pseudo: int
    pseudo_fraction: float

    def as_dict(self) -> dict[str, float | int]:
        """Return the fields as a dict (for logging tables)."""
        return asdict(self)


def scribble2label_loss(
    logits: torch.Tensor,
    scribbles: torch.Tensor,
    ema: torch.Tensor | None = None,
    *,
    tau: float = 0.8,
    lam: float = 0.5,
    use_pseudo: bool = True,
    valid: torch.Tensor | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, LossParts]:
    """The Scribble2Label training loss ``pCE + lam * CE(pseudo-labels)``.

    Parameters
    ----------
    logits : torch.Tensor
        Shape (N, 2, H, W), any floating dtype.
    scribbles : torch.Tensor
        Integer tensor of shape (N, H, W): ``0``, ``1`` scribbled, ``250`` unlabelled.
    ema : torch.Tensor or None, default None
        Floating tensor of shape (N, H, W), the EMA foreground probability of the crops
        (transformed together with the image). ``None`` means warm-up.
    tau : float, default 0.8
        Confidence threshold in ``(0.5, 1]``.
    lam : float, default 0.5
        Weight of the pseudo-label term, finite and ``>= 0``.
    use_pseudo : bool, default True
        ``False`` during warm-up: the loss is then the pCE alone and ``ema`` is ignored.
    valid : torch.Tensor or None, default None
        Bool tensor of shape (N, H, W). Pixels where it is ``False`` are ignored by
        both terms (scribbled or not).
    check : bool, default True
        Check the inputs first (the value checks wait for the device). The training
        step passes ``False``: its inputs were checked where they were made.

    Returns
    -------
    total : torch.Tensor
        Scalar float32 loss. During warm-up (``use_pseudo=False`` or ``ema=None``) it is
        the pCE tensor itself.
    parts : LossParts
        The two terms and the pixel counts as Python numbers (this synchronises with
        the device once per call).
    """
    if check:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise TypeError(f"lam must be a real number, got {type(lam).__name__}")
        if not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"lam must be finite and >= 0, got {lam}")
        tau = check_tau(tau)
        shape = _check_logits_and_labels(logits, scribbles, "scribbles")
        _check_valid(valid, shape, logits.device)

    if valid is not None:
        scribbles = torch.where(valid, scribbles.long(), UNLABELLED)
    pce = _masked_cross_entropy(logits, scribbles)
    n_scribbled = int((scribbles != UNLABELLED).sum())

    if not use_pseudo or ema is None:
        parts = LossParts(float(pce.detach()), 0.0, n_scribbled, 0, 0.0)
        return pce, parts

    targets = pseudo_label_targets(ema, scribbles, tau=tau, valid=valid, check=check)
    pseudo = _masked_cross_entropy(logits, targets)
    total = pce + lam * pseudo
    n_pseudo = int((targets != UNLABELLED).sum())
    unscribbled = scribbles == UNLABELLED
    if valid is not None:
        unscribbled = unscribbled & valid
    n_unscribbled = int(unscribbled.sum())
    fraction = n_pseudo / n_unscribbled if n_unscribbled else 0.0
    parts = LossParts(float(pce.detach()), float(pseudo.detach()), n_scribbled, n_pseudo, fraction)
    return total, parts


# --------------------------------------------------------------------------- extension


def dice_targets(
    scribble: torch.Tensor,
    ema: torch.Tensor | None,
    valid: torch.Tensor,
    tau: float = 0.8,
    *,
    check: bool = True,
) -> torch.Tensor:
    """The targets of :func:`dice_loss`: the scribbles, and where there is none the
    confident pseudo-labels of ``ema`` (:func:`pseudo_label_targets`) when it is given.

    Parameters
    ----------
    scribble : torch.Tensor
        ``(N, H, W)`` integer: 0 background, 1 foreground, 250 unlabelled.
    ema : torch.Tensor or None
        ``(N, H, W)`` EMA foreground probabilities, or ``None`` (no pseudo-labels).
    valid : torch.Tensor
        ``(N, H, W)`` bool: pixels of the image (not padding); the others get 250.
    tau : float, optional
        Confidence threshold of the pseudo-labels.
    check : bool, optional
        Check the inputs of :func:`pseudo_label_targets`.

    Returns
    -------
    torch.Tensor
        ``(N, H, W)`` ``int64`` targets in {0, 1, 250}.
    """
    target = torch.where(valid, scribble.long(), UNLABELLED)
    if ema is not None:
        pseudo = pseudo_label_targets(ema, target, tau=tau, valid=valid, check=check)
        target = torch.where(target == UNLABELLED, pseudo, target)
    return target


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Soft Dice loss of the foreground over the labelled pixels of a batch.

    Not part of the original method; an extension that the book measures. With
    :math:`p` the foreground probability and :math:`t` the 0/1 target, summed over all
    pixels of the batch whose target is not ``250``,

    .. math::

        L = 1 - \frac{2 \sum p t + 1}{\sum p + \sum t + 1}.

    Unlike the cross-entropy, which counts every pixel alike, it weighs the foreground
    against its own size, so a few false-positive pixels cost as much on a sparse crop
    as on a crowded one.

    Parameters
    ----------
    logits : torch.Tensor
        Shape (N, 2, H, W), any floating dtype.
    targets : torch.Tensor
        Integer tensor of shape (N, H, W), same device: ``0`` background, ``1``
        foreground, ``250`` unlabelled (left out), e.g. scribbles merged with
        pseudo-labels.

    Returns
    -------
    torch.Tensor
        Scalar float32 in ``[0, 1)``, computed with autocast disabled; ``0`` connected to
        ``logits`` when no pixel is labelled.

    Raises
    ------
    TypeError, ValueError
        On a wrong shape, dtype or device, or a label value other than 0, 1, 250.
    """
    _check_logits_and_labels(logits, targets, "targets")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = torch.softmax(logits.float(), dim=1)[:, 1]
        labelled = targets != UNLABELLED
        if not bool(labelled.any()):
            return p.sum() * 0.0
        t = (targets == FOREGROUND).float()
        p = p * labelled
        inter = (p * t).sum()
        return 1.0 - (2.0 * inter + 1.0) / (p.sum() + t.sum() + 1.0)


def _shifted(t: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``t`` (…, H, W) at pixel ``(y, x)`` and at its neighbour ``(y+dy, x+dx)``."""
    h, w = t.shape[-2:]
    xa = slice(max(0, -dx), w - max(0, dx))
    xb = slice(max(0, dx), w - max(0, -dx))
    return t[..., : h - dy, xa], t[..., dy:, xb]


def affinity_loss(
    logits: torch.Tensor,
    image: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    radius: int = 2,
    sigma_xy: float = 1.5,
    sigma_intensity: float = 0.1,
    downsample: int = 2,
) -> torch.Tensor:
    r"""Local affinity (CRF-style) regulariser: similar neighbours should agree.

    Not part of the original method; an extension that the book measures. Scribbles
    mark the inside of nuclei and the middle of the background, never the boundary, so
    nothing in pCE or the pseudo-labels says *where* the boundary lies. This term (a
    relaxed Potts model on a local window, as in the regularised losses for
    weakly-supervised segmentation of Tang et al., ECCV 2018, and the gated CRF loss of
    Obukhov et al., 2019) charges every pair of nearby pixels ``i, j`` the probability
    that they get different labels, ``p_i (1 - p_j) + (1 - p_i) p_j``, weighted by

    .. math::

        w_{ij} = \exp\Big(-\frac{\lVert x_i - x_j \rVert^2}{2 \sigma_{xy}^2}
                 - \frac{\overline{(I_i - I_j)^2}}{2 \sigma_I^2}\Big),

    so that label changes are cheap only across intensity edges. The result is the
    weighted mean over all pairs, in ``[0, 1]``.

    Parameters
    ----------
    logits : torch.Tensor
        Shape (N, 2, H, W), any floating dtype.
    image : torch.Tensor
        Shape (N, C, H, W) floating: the network input (normalised intensities, about
        ``[0, 1]``), on the same device.
    valid : torch.Tensor or None, default None
        Bool tensor of shape (N, H, W); pairs with an invalid pixel (padding) are left
        out.
    radius : int, default 2
        Half-width of the window, in pixels of the downsampled grid.
    sigma_xy : float, default 1.5
        Spatial scale of the weight, in pixels of the downsampled grid.
    sigma_intensity : float, default 0.1
        Intensity scale: neighbours whose intensities differ by much more than this are
        free to disagree.
    downsample : int, default 2
        Average-pool probabilities and image by this factor first: a factor of 2 makes
        4 times fewer pairs, and the window then reaches ``radius * downsample``
        full-resolution pixels.

    Returns
    -------
    torch.Tensor
        Scalar float32, computed with autocast disabled; ``0`` connected to ``logits``
        when no pair is valid.

    Raises
    ------
    TypeError, ValueError
        On a wrong shape, dtype or device, or a non-positive parameter.
    """
    _check_logits(logits)
    n, _, h, w = logits.shape
    if not isinstance(image, torch.Tensor) or not image.is_floating_point():
        raise TypeError("image must be a floating-point torch.Tensor")
    if image.ndim != 4 or image.shape[0] != n or image.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"image must have shape (N, C, H, W) = ({n}, C, {h}, {w}), got {tuple(image.shape)}"
        )
    if image.device != logits.device:
        raise ValueError(f"image is on {image.device} but logits are on {logits.device}")
    _check_valid(valid, (n, h, w), logits.device)
    if not all(isinstance(k, int) and k >= 1 for k in (radius, downsample)):
        raise ValueError(f"radius and downsample must be integers >= 1, got {radius}, {downsample}")
    if not (sigma_xy > 0 and sigma_intensity > 0):
        raise ValueError(
            f"sigma_xy and sigma_intensity must be > 0, got {sigma_xy}, {sigma_intensity}"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = torch.softmax(logits.float(), dim=1)[:, 1:2]
        x = image.float()
        v = torch.ones_like(p) if valid is None else valid[:, None].float()
        if downsample > 1:
            p = F.avg_pool2d(p, downsample)
            x = F.avg_pool2d(x, downsample)
            v = -F.max_pool2d(-v, downsample)  # a pooled pixel is valid if all of it is
        num = p.sum() * 0.0
        den = torch.zeros((), device=p.device)
        for dy in range(radius + 1):
            for dx in range(-radius, radius + 1):
                if dy == 0 and dx <= 0:
                    continue  # each unordered pair once
                pi, pj = _shifted(p, dy, dx)
                xi, xj = _shifted(x, dy, dx)
                vi, vj = _shifted(v, dy, dx)
                d2 = (xi - xj).square().mean(dim=1, keepdim=True)
                weight = torch.exp(
                    -(dy * dy + dx * dx) / (2 * sigma_xy**2) - d2 / (2 * sigma_intensity**2)
                ) * (vi * vj)
                num = num + (weight * (pi * (1 - pj) + (1 - pi) * pj)).sum()
                den = den + weight.sum()
        return num / den.clamp(min=1e-12)
