"""Tests of s2l_core.losses against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from s2l_core.losses import (
    LossParts,
    affinity_loss,
    dice_loss,
    partial_cross_entropy,
    pseudo_label_cross_entropy,
    pseudo_label_targets,
    scribble2label_loss,
)
from s2l_core.scribbles import BACKGROUND, FOREGROUND, UNLABELLED

U = UNLABELLED


def _hand_logits() -> torch.Tensor:
    # (1, 2, 2, 2): channel 0 background, channel 1 foreground
    bg = [[0.0, 1.0], [0.0, 3.0]]
    fg = [[0.0, 0.0], [2.0, -1.0]]
    return torch.tensor([[bg, fg]], requires_grad=True)


def _hand_scribbles(dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    return torch.tensor([[[FOREGROUND, BACKGROUND], [FOREGROUND, U]]], dtype=dtype)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# CE of a two-class softmax: -log(e^a / (e^a + e^b)) = log(1 + e^(b - a))
HAND_PCE = (math.log(2.0) + _softplus(-1.0) + _softplus(-2.0)) / 3.0


# --------------------------------------------------------------------------- pCE


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.int32])
def test_pce_hand_computed(dtype: torch.dtype) -> None:
    loss = partial_cross_entropy(_hand_logits(), _hand_scribbles(dtype))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(HAND_PCE, rel=1e-6)


def test_pce_ignores_unlabelled_pixels() -> None:
    logits = _hand_logits()
    scribbles = _hand_scribbles()
    base = partial_cross_entropy(logits, scribbles)
    base.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[0, :, 1, 1] == 0)
    assert torch.all(logits.grad[0, :, 0, 0] != 0)

    changed = logits.detach().clone()
    changed[0, :, 1, 1] = torch.tensor([-50.0, 70.0])  # only the unlabelled pixel
    assert partial_cross_entropy(changed, scribbles).item() == base.item()
    changed[0, :, 0, 0] = torch.tensor([-5.0, 7.0])  # a scribbled pixel: must matter
    assert partial_cross_entropy(changed, scribbles).item() != pytest.approx(base.item())


def test_pce_mean_over_batch_pixels_not_images() -> None:
    # image 0 has 1 scribbled pixel, image 1 has 3: the mean weights pixels equally
    logits = torch.zeros(2, 2, 1, 3)
    logits[0, 1, 0, 0] = 1.0  # fg favoured, label bg -> CE = softplus(1)
    scribbles = torch.tensor([[[0, U, U]], [[0, 1, 0]]], dtype=torch.uint8)
    expected = (_softplus(1.0) + 3 * math.log(2.0)) / 4
    assert partial_cross_entropy(logits, scribbles).item() == pytest.approx(expected, rel=1e-6)


def test_pce_empty_batch_is_zero_with_working_backward() -> None:
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    scribbles = torch.full((2, 4, 4), U, dtype=torch.uint8)
    loss = partial_cross_entropy(logits, scribbles)
    assert loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad == 0)


def test_pce_under_autocast_is_float32() -> None:
    logits = _hand_logits().detach().to(torch.bfloat16).requires_grad_()
    scribbles = _hand_scribbles()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = partial_cross_entropy(logits, scribbles)
    assert loss.dtype == torch.float32
    ref = partial_cross_entropy(logits.detach().float(), scribbles)
    assert loss.item() == ref.item()
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pce_cuda_matches_cpu() -> None:
    logits = _hand_logits().detach().cuda().half()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = partial_cross_entropy(logits, _hand_scribbles().cuda())
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(HAND_PCE, rel=1e-3)


@pytest.mark.parametrize(
    ("logits", "scribbles", "exc", "match"),
    [
        (torch.zeros(2, 2, 2), torch.zeros(2, 2, dtype=torch.uint8), ValueError, r"\(N, 2, H, W\)"),
        (torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.uint8), ValueError, "two"),
        (torch.zeros(1, 2, 2, 2, dtype=torch.int64), torch.zeros(1, 2, 2), TypeError, "floating"),
        (torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2), TypeError, "scribbles must be an integer"),
        (torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool), TypeError, "integer"),
        (torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 3, dtype=torch.uint8), ValueError, "shape"),
        (torch.zeros(1, 2, 2, 2), torch.zeros(2, 2, dtype=torch.uint8), ValueError, "shape"),
        (
            torch.zeros(1, 2, 2, 2),
            torch.tensor([[[0, 2], [255, 250]]], dtype=torch.uint8),
            ValueError,
            r"unknown label values \[2, 255\]",
        ),
    ],
)
def test_pce_errors(logits, scribbles, exc, match) -> None:
    with pytest.raises(exc, match=match):
        partial_cross_entropy(logits, scribbles)


# --------------------------------------------------------------------------- pseudo targets

EMA_GRID = [
    [0.9, 0.8, 0.81],
    [0.1, 0.2, 0.19],
    [0.95, 0.05, 0.5],
]
SCRIBBLE_GRID = [
    [U, U, U],
    [U, U, U],
    [FOREGROUND, BACKGROUND, U],
]
EXPECTED_TARGETS = [
    [1, U, 1],  # 0.8 == tau: not confident (strict)
    [0, U, 0],  # 0.2 == 1 - tau: not confident (strict)
    [U, U, U],  # scribbled pixels never get a pseudo-label; 0.5 is unconfident
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pseudo_targets_hand_grid(dtype: torch.dtype) -> None:
    ema = torch.tensor([EMA_GRID], dtype=dtype)
    scribbles = torch.tensor([SCRIBBLE_GRID], dtype=torch.uint8)
    targets = pseudo_label_targets(ema, scribbles, tau=0.8)
    assert targets.dtype == torch.int64
    assert targets.tolist() == [EXPECTED_TARGETS]


def test_pseudo_targets_exact_boundary_float64() -> None:
    # 1 - 0.8 is 0.19999999999999996 in float64: a value equal to it is not confident
    ema = torch.tensor([[[1.0 - 0.8, 0.8, math.nextafter(0.8, 1.0)]]], dtype=torch.float64)
    scribbles = torch.full((1, 1, 3), U, dtype=torch.uint8)
    assert pseudo_label_targets(ema, scribbles, tau=0.8).tolist() == [[[U, U, 1]]]


def test_pseudo_targets_other_tau() -> None:
    ema = torch.tensor([EMA_GRID])
    scribbles = torch.tensor([SCRIBBLE_GRID], dtype=torch.uint8)
    assert pseudo_label_targets(ema, scribbles, tau=0.6).tolist() == [
        [[1, 1, 1], [0, 0, 0], [U, U, U]]
    ]
    # tau = 1 is allowed and confident nowhere
    assert (pseudo_label_targets(ema, scribbles, tau=1.0) == U).all()


def test_pseudo_targets_valid_mask() -> None:
    ema = torch.tensor([EMA_GRID])
    ema[0, 2, 2] = float("nan")  # e.g. an EMA entry never computed, marked invalid
    ema[0, 1, 0] = 7.0  # out of range but invalid: not checked
    scribbles = torch.tensor([SCRIBBLE_GRID], dtype=torch.uint8)
    valid = torch.ones(1, 3, 3, dtype=torch.bool)
    valid[0, 0, 0] = False
    valid[0, 2, 2] = False
    valid[0, 1, 0] = False
    expected = [row[:] for row in EXPECTED_TARGETS]
    expected[0][0] = U
    expected[1][0] = U
    assert pseudo_label_targets(ema, scribbles, valid=valid).tolist() == [expected]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"tau": 0.5}, ValueError, r"tau must lie in \(0.5, 1\]"),
        ({"tau": 1.01}, ValueError, r"tau must lie in \(0.5, 1\]"),
        ({"tau": True}, TypeError, "tau must be a real number"),
        ({"ema": torch.tensor([[[0.0, 1.2, 0.5]]])}, ValueError, r"ema must lie in \[0, 1\]"),
        ({"ema": torch.tensor([[[0.0, float("nan"), 0.5]]])}, ValueError, "ema must lie"),
        ({"ema": torch.zeros(1, 1, 3, dtype=torch.uint8)}, TypeError, "ema must be a floating"),
        ({"ema": torch.zeros(1, 3)}, ValueError, r"ema must have shape \(N, H, W\)"),
        ({"ema": torch.zeros(1, 1, 4)}, ValueError, "scribbles must have shape"),
        ({"valid": torch.ones(1, 1, 3, dtype=torch.uint8)}, TypeError, "valid must be a bool"),
        ({"valid": torch.ones(1, 3, 1, dtype=torch.bool)}, ValueError, "valid must have shape"),
        ({"scribbles": torch.tensor([[[0, 1, 3]]])}, ValueError, r"unknown label values \[3\]"),
    ],
)
def test_pseudo_targets_errors(kwargs, exc, match) -> None:
    args = {
        "ema": torch.tensor([[[0.1, 0.5, 0.9]]]),
        "scribbles": torch.full((1, 1, 3), U, dtype=torch.uint8),
        "tau": 0.8,
    }
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pseudo_label_targets(**args)


def test_pseudo_cross_entropy_hand_and_empty() -> None:
    logits = _hand_logits()
    targets = torch.tensor([[[U, 0], [U, 0]]])
    expected = (_softplus(-1.0) + _softplus(-4.0)) / 2
    assert pseudo_label_cross_entropy(logits, targets).item() == pytest.approx(expected, rel=1e-6)

    empty = pseudo_label_cross_entropy(logits, torch.full((1, 2, 2), U))
    assert empty.item() == 0.0
    empty.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


# --------------------------------------------------------------------------- total loss


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 3, 3, generator=g, requires_grad=True)
    scribbles = torch.tensor([SCRIBBLE_GRID, [[U, U, U], [U, 1, U], [U, U, 0]]], dtype=torch.uint8)
    ema = torch.tensor([EMA_GRID, [[0.9] * 3, [0.5] * 3, [0.0] * 3]])
    return logits, scribbles, ema


def test_total_is_pce_plus_lambda_pseudo() -> None:
    logits, scribbles, ema = _batch()
    total, parts = scribble2label_loss(logits, scribbles, ema, tau=0.8, lam=0.5)
    pce = partial_cross_entropy(logits, scribbles)
    targets = pseudo_label_targets(ema, scribbles, tau=0.8)
    pseudo = pseudo_label_cross_entropy(logits, targets)
    assert pseudo.item() > 0
    assert total.item() == pytest.approx(pce.item() + 0.5 * pseudo.item(), rel=1e-6)

    # the pseudo term by hand: mean of -log_softmax at the target class
    logp = torch.log_softmax(logits.detach(), dim=1)
    terms = [-logp[n, t, i, j].item() for (n, i, j), t in _labelled(targets)]
    assert pseudo.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)

    assert isinstance(parts, LossParts)
    assert parts.pce == pytest.approx(pce.item())
    assert parts.pseudo == pytest.approx(pseudo.item())
    # image 0: 2 scribbled, 7 unscribbled, 4 pseudo (0.9, 0.81, 0.1, 0.19)
    # image 1: 2 scribbled, 7 unscribbled, 3 (row 0, ema 0.9) + 2 (row 2 unscribbled, 0.0)
    assert parts.n_scribbled == 4
    assert parts.n_pseudo == 9
    assert parts.pseudo_fraction == pytest.approx(9 / 14)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def _labelled(targets: torch.Tensor):
    for idx in torch.nonzero(targets != U).tolist():
        n, i, j = idx
        yield (n, i, j), int(targets[n, i, j])


def test_lambda_scales_the_pseudo_term() -> None:
    logits, scribbles, ema = _batch()
    t0, p0 = scribble2label_loss(logits, scribbles, ema, lam=0.0)
    t2, p2 = scribble2label_loss(logits, scribbles, ema, lam=2.0)
    assert t0.item() == pytest.approx(p0.pce)
    assert t2.item() == pytest.approx(p2.pce + 2.0 * p2.pseudo, rel=1e-6)
    assert t2.item() > t0.item()


def test_warm_up_total_is_pce() -> None:
    logits, scribbles, ema = _batch()
    pce = partial_cross_entropy(logits, scribbles)
    for total, parts in (
        scribble2label_loss(logits, scribbles, ema, use_pseudo=False),
        scribble2label_loss(logits, scribbles, None),
    ):
        assert total.item() == pce.item()
        assert parts.pseudo == 0.0 and parts.n_pseudo == 0 and parts.pseudo_fraction == 0.0
        assert parts.n_scribbled == 4
    with_pseudo, _ = scribble2label_loss(logits, scribbles, ema)
    assert with_pseudo.item() != pytest.approx(pce.item())


def test_total_valid_mask_ignores_pixels_in_both_terms() -> None:
    logits, scribbles, ema = _batch()
    valid = torch.ones(2, 3, 3, dtype=torch.bool)
    valid[0, 2, 0] = False  # a scribbled pixel
    valid[0, 0, 0] = False  # a pseudo-labelled pixel
    total, parts = scribble2label_loss(logits, scribbles, ema, valid=valid)

    masked_scribbles = scribbles.clone()
    masked_scribbles[0, 2, 0] = U
    masked_ema = ema.clone()
    masked_ema[0, 0, 0] = 0.5
    masked_ema[0, 2, 0] = 0.5  # now unscribbled in the reference: keep it unconfident
    ref, ref_parts = scribble2label_loss(logits, masked_scribbles, masked_ema)
    assert total.item() == pytest.approx(ref.item(), rel=1e-6)
    assert parts.n_scribbled == 3 and parts.n_pseudo == 8
    # unscribbled valid pixels: 7 - 1 (invalid) + 7 = 13; the ref counts 8 + 7 = 15
    assert parts.pseudo_fraction == pytest.approx(8 / 13)
    assert ref_parts.pseudo_fraction == pytest.approx(8 / 15)


def test_total_with_no_valid_pixel_at_all() -> None:
    logits = torch.randn(1, 2, 2, 2, requires_grad=True)
    scribbles = torch.full((1, 2, 2), U, dtype=torch.uint8)
    ema = torch.full((1, 2, 2), 0.5)
    total, parts = scribble2label_loss(logits, scribbles, ema)
    assert total.item() == 0.0
    assert parts == LossParts(0.0, 0.0, 0, 0, 0.0)
    total.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lam": -0.1}, ValueError, "lam must be finite and >= 0"),
        ({"lam": float("inf")}, ValueError, "lam must be finite"),
        ({"lam": "0.5"}, TypeError, "lam must be a real number"),
        ({"tau": 0.3}, ValueError, "tau must lie"),
        ({"valid": torch.ones(2, 3, 3)}, TypeError, "valid must be a bool"),
    ],
)
def test_total_errors(kwargs, exc, match) -> None:
    logits, scribbles, ema = _batch()
    with pytest.raises(exc, match=match):
        scribble2label_loss(logits, scribbles, ema, **kwargs)


def test_total_ema_shape_error() -> None:
    logits, scribbles, _ = _batch()
    with pytest.raises(ValueError, match="scribbles must have shape"):
        scribble2label_loss(logits, scribbles, torch.zeros(2, 3, 4))


# --------------------------------------------------------------------------- affinity


def _grey(rows: list[list[float]]) -> torch.Tensor:
    """(1, 3, H, W) image with the same intensities in every channel."""
    return torch.tensor(rows).expand(1, 3, -1, -1).clone()


def _fg_logits(rows: list[list[float]]) -> torch.Tensor:
    """(1, 2, H, W) logits whose foreground probability is sigmoid(rows)."""
    fg = torch.tensor(rows)
    return torch.stack([torch.zeros_like(fg), fg])[None].requires_grad_()


def test_affinity_hand_computed_row() -> None:
    # One row of three pixels, intensities 0, 0, 1; radius 2 makes three pairs:
    # (0, 1) and (1, 2) at distance 1, (0, 2) at distance 2.
    p = [0.5, 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(3.0))]
    sx, si = 1.5, 0.1

    def w(d: float, di: float) -> float:
        return math.exp(-(d * d) / (2 * sx * sx) - di * di / (2 * si * si))

    def cut(a: float, b: float) -> float:
        return a * (1 - b) + (1 - a) * b

    pairs = [(w(1, 0), cut(p[0], p[1])), (w(1, 1), cut(p[1], p[2])), (w(2, 1), cut(p[0], p[2]))]
    expected = sum(a * b for a, b in pairs) / sum(a for a, _ in pairs)
    loss = affinity_loss(
        _fg_logits([[0.0, 2.0, -3.0]]), _grey([[0.0, 0.0, 1.0]]), radius=2, downsample=1
    )
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_affinity_prefers_boundaries_on_edges() -> None:
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0  # dark left half, bright right half

    def halves(column: int) -> torch.Tensor:
        fg = torch.full((16, 16), -12.0)
        fg[:, column:] = 12.0
        return _fg_logits(fg.tolist())

    on_edge = affinity_loss(halves(8), image, downsample=1).item()
    in_flat = affinity_loss(halves(4), image, downsample=1).item()
    assert on_edge < 1e-3 < 0.05 < in_flat
    uniform = affinity_loss(_fg_logits(torch.full((16, 16), 12.0).tolist()), image).item()
    assert uniform < 1e-4  # agreeing everywhere costs (almost) nothing


def test_affinity_downsampling_equals_the_pooled_problem() -> None:
    gen = torch.Generator().manual_seed(0)
    small_logits = torch.randn(2, 2, 6, 7, generator=gen)
    small_image = torch.rand(2, 3, 6, 7, generator=gen)
    big_logits = small_logits.repeat_interleave(2, -1).repeat_interleave(2, -2)
    big_image = small_image.repeat_interleave(2, -1).repeat_interleave(2, -2)
    small = affinity_loss(small_logits, small_image, downsample=1)
    big = affinity_loss(big_logits, big_image, downsample=2)
    assert big.item() == pytest.approx(small.item(), rel=1e-5)


def test_affinity_valid_mask_and_empty() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 2, 8, 8, generator=gen, requires_grad=True)
    image = torch.rand(1, 3, 8, 8, generator=gen)
    valid = torch.ones(1, 8, 8, dtype=torch.bool)
    valid[..., 6:] = False
    loss = affinity_loss(logits, image, valid, downsample=2)
    loss.backward()
    assert torch.all(logits.grad[..., 6:] == 0)  # padding takes no part
    changed = logits.detach().clone()
    changed[..., 6:] = 40.0
    assert affinity_loss(changed, image, valid, downsample=2).item() == pytest.approx(loss.item())

    logits.grad = None
    none = affinity_loss(logits, image, torch.zeros_like(valid))
    assert none.item() == 0.0
    none.backward()
    assert torch.all(logits.grad == 0)


def test_affinity_under_autocast_is_float32() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, 8, 8, generator=gen).to(torch.bfloat16).requires_grad_()
    image = torch.rand(1, 3, 8, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = affinity_loss(logits, image)
    assert loss.dtype == torch.float32
    assert loss.item() == affinity_loss(logits.detach().float(), image).item()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"image": torch.zeros(1, 3, 4, 5)}, ValueError, "image must have shape"),
        ({"image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8)}, TypeError, "floating-point"),
        ({"radius": 0}, ValueError, "radius and downsample"),
        ({"downsample": 0}, ValueError, "radius and downsample"),
        ({"sigma_intensity": 0.0}, ValueError, "sigma_xy and sigma_intensity"),
        ({"valid": torch.ones(1, 4, 5, dtype=torch.bool)}, ValueError, "valid"),
    ],
)
def test_affinity_errors(kwargs, exc, match) -> None:
    args = {"image": torch.zeros(1, 3, 4, 4)} | kwargs
    with pytest.raises(exc, match=match):
        affinity_loss(torch.zeros(1, 2, 4, 4), **args)


# --------------------------------------------------------------------------- dice


def test_dice_hand_computed() -> None:
    # Foreground probabilities 0.5 (logit 0) and sigmoid(2); targets 1, 0, 1, unlabelled.
    q = 1 / (1 + math.exp(-2.0))
    logits = _fg_logits([[0.0, 2.0, 2.0, 50.0]])
    targets = torch.tensor([[[1, 0, 1, UNLABELLED]]])
    inter = 0.5 + q
    expected = 1 - (2 * inter + 1) / ((0.5 + q + q) + 2 + 1)
    loss = dice_loss(logits, targets)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert logits.grad[0, :, 0, 3].abs().max() == 0  # the unlabelled pixel gets no gradient


def test_dice_perfect_prediction_and_weighting_by_foreground_size() -> None:
    targets = torch.tensor([[[1, 1, 0, 0]]])
    assert dice_loss(_fg_logits([[30.0, 30.0, -30.0, -30.0]]), targets).item() < 1e-6
    # one false-positive pixel costs more when the foreground is small
    sparse = torch.tensor([[[1, 0, 0, 0, 0, 0, 0, 0]]])
    crowded = torch.tensor([[[1, 1, 1, 1, 1, 1, 1, 0]]])
    sparse_logits = _fg_logits([[30.0, 30.0] + [-30.0] * 6])
    crowded_logits = _fg_logits([[30.0] * 8])
    assert dice_loss(sparse_logits, sparse).item() > 2 * dice_loss(crowded_logits, crowded).item()


def test_dice_empty_and_autocast() -> None:
    logits = _fg_logits([[1.0, -1.0]])
    none = dice_loss(logits, torch.full((1, 1, 2), UNLABELLED))
    assert none.item() == 0.0
    none.backward()
    assert logits.grad.abs().max() == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dice_loss(logits.detach().bfloat16(), torch.tensor([[[1, 0]]]))
    assert loss.dtype == torch.float32


def test_dice_errors() -> None:
    with pytest.raises(ValueError, match="targets"):
        dice_loss(torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2), 7))
    with pytest.raises(ValueError, match="logits"):
        dice_loss(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
