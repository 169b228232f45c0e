"""Tests of s2l_core.pseudo: the EMA store, its checkpoint and the update schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s2l_core.pseudo import (
    ConfidenceSummary,
    EMAStore,
    ema_due,
    ema_due_iteration,
    pseudo_label_accuracy,
)
from s2l_core.scribbles import BACKGROUND, FOREGROUND, UNLABELLED

U = UNLABELLED


# --------------------------------------------------------------------------- updates


def test_starts_at_zero_and_uninitialized() -> None:
    store = EMAStore({"a": (3, 4)})
    assert store.alpha == 0.2
    assert store.get("a").dtype == np.float32
    assert store.get("a").shape == (3, 4)
    assert not store.get("a").any()
    assert store.n_updates("a") == 0
    assert not store.initialized("a")


def test_three_updates_hand_computed() -> None:
    store = EMAStore({"a": (1, 3)}, alpha=0.2)
    probs = [
        np.array([[1.0, 0.5, 0.0]], np.float32),
        np.array([[0.5, 1.0, 0.0]], np.float32),
        np.array([[0.0, 0.25, 1.0]], np.float32),
    ]
    # ema1 = 0.2 p1;  ema2 = 0.2 p2 + 0.8 ema1;  ema3 = 0.2 p3 + 0.8 ema2
    expected = [
        [0.2, 0.1, 0.0],
        [0.1 + 0.16, 0.2 + 0.08, 0.0],  # 0.26, 0.28, 0
        [0.0 + 0.208, 0.05 + 0.224, 0.2],  # 0.208, 0.274, 0.2
    ]
    for i, (p, e) in enumerate(zip(probs, expected, strict=True)):
        store.update("a", p)
        np.testing.assert_allclose(store.get("a")[0], e, rtol=1e-6, atol=1e-7)
        assert store.n_updates("a") == i + 1
    assert store.initialized("a")


def test_update_formula_exact_in_float32() -> None:
    rng = np.random.default_rng(1)
    store = EMAStore({"x": (5, 7)}, alpha=0.2)
    ref = np.zeros((5, 7), np.float32)
    for _ in range(4):
        p = rng.random((5, 7), dtype=np.float32)
        store.update("x", p)
        ref = np.float32(0.2) * p + np.float32(0.8) * ref
        assert np.array_equal(store.get("x"), ref)


def test_update_accepts_torch_tensor() -> None:
    store = EMAStore({"a": (2, 2)}, alpha=0.5)
    store.update("a", torch.tensor([[1.0, 0.0], [0.5, 0.25]], dtype=torch.float64))
    np.testing.assert_array_equal(store.get("a"), [[0.5, 0.0], [0.25, 0.125]])
    assert store.get("a").dtype == np.float32


def test_different_image_sizes_and_nbytes() -> None:
    shapes = {"small": (256, 256), "big": (1040, 1388), "odd": (3, 5)}
    store = EMAStore(shapes)
    assert len(store) == 3 and store.ids == ["small", "big", "odd"]
    assert "big" in store and "nope" not in store
    for k, s in shapes.items():
        assert store.shape(k) == s
        assert store.get(k).shape == s
    assert store.nbytes == 4 * (256 * 256 + 1040 * 1388 + 15)
    store.update("odd", np.full((3, 5), 1.0, np.float32))
    assert store.initialized("odd") and not store.initialized("big")
    assert not store.get("big").any()
    with pytest.raises(ValueError, match=r"must have shape \(1040, 1388\)"):
        store.update("big", np.zeros((256, 256), np.float32))


@pytest.mark.parametrize(
    ("prob", "exc", "match"),
    [
        (np.zeros((2, 3), np.float32), ValueError, r"must have shape \(2, 2\), got \(2, 3\)"),
        (np.zeros((1, 2, 2), np.float32), ValueError, "must have shape"),
        (np.array([[0.0, 1.5], [0.2, 0.3]], np.float32), ValueError, r"must lie in \[0, 1\]"),
        (np.array([[0.0, -0.1], [0.2, 0.3]]), ValueError, r"must lie in \[0, 1\]"),
        (np.array([[0.0, np.nan], [0.2, 0.3]]), ValueError, r"must lie in \[0, 1\]"),
        (np.zeros((2, 2), np.uint8), TypeError, "floating-point"),
    ],
)
def test_update_errors_leave_store_unchanged(prob, exc, match) -> None:
    store = EMAStore({"a": (2, 2)})
    with pytest.raises(exc, match=match):
        store.update("a", prob)
    assert store.n_updates("a") == 0 and not store.get("a").any()


def test_unknown_id_and_bad_construction() -> None:
    store = EMAStore({"a": (2, 2)})
    with pytest.raises(KeyError, match="unknown image id 'b'"):
        store.get("b")
    with pytest.raises(KeyError, match="unknown image id"):
        store.update("b", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\]"):
        EMAStore({"a": (2, 2)}, alpha=0.0)
    with pytest.raises(ValueError, match="must be a pair"):
        EMAStore({"a": (2, 2, 3)})
    with pytest.raises(ValueError, match="must be positive"):
        EMAStore({"a": (0, 2)})
    with pytest.raises(TypeError, match="image ids must be str"):
        EMAStore({1: (2, 2)})


def test_get_view_is_read_only_and_copy_is_a_snapshot() -> None:
    store = EMAStore({"a": (2, 2)}, alpha=1.0)
    view = store.get("a")
    snap = store.get("a", copy=True)
    with pytest.raises(ValueError, match="read-only"):
        view[0, 0] = 1.0
    snap[0, 0] = 0.75  # writable, and does not touch the store
    assert store.get("a")[0, 0] == 0.0
    store.update("a", np.ones((2, 2), np.float32))
    assert view[0, 0] == 1.0  # the view follows updates
    assert snap[1, 1] == 0.0  # the copy does not


# --------------------------------------------------------------------------- checkpoint


def _trained_store() -> EMAStore:
    rng = np.random.default_rng(7)
    store = EMAStore({"a": (4, 6), "b": (5, 3), "c": (2, 2)}, alpha=0.2)
    for _ in range(3):
        store.update("a", rng.random((4, 6), dtype=np.float32))
    store.update("b", rng.random((5, 3), dtype=np.float32))
    return store


def test_state_dict_round_trip_weights_only(tmp_path) -> None:
    store = _trained_store()
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 12, "ema_store": store.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 12

    resumed = EMAStore({"a": (4, 6), "b": (5, 3), "c": (2, 2)}, alpha=0.5)
    assert not np.array_equal(resumed.get("a"), store.get("a"))  # the test can fail
    resumed.load_state_dict(ckpt["ema_store"])
    assert resumed.alpha == 0.2
    for k in store.ids:
        assert resumed.get(k).dtype == np.float32
        # equal to the bit
        assert np.array_equal(resumed.get(k).view(np.uint32), store.get(k).view(np.uint32))
        assert resumed.n_updates(k) == store.n_updates(k)
    assert [resumed.n_updates(k) for k in "abc"] == [3, 1, 0]

    rebuilt = EMAStore.from_state_dict(ckpt["ema_store"])
    assert rebuilt.ids == store.ids
    assert all(np.array_equal(rebuilt.get(k), store.get(k)) for k in store.ids)

    # the resumed store continues exactly like the original
    p = np.full((4, 6), 0.9, np.float32)
    store.update("a", p)
    resumed.update("a", p)
    assert np.array_equal(resumed.get("a"), store.get("a"))


def test_state_dict_is_a_snapshot() -> None:
    store = _trained_store()
    sd = store.state_dict()
    before = sd["maps"]["a"].clone()
    store.update("a", np.ones((4, 6), np.float32))
    assert torch.equal(sd["maps"]["a"], before)
    assert sd["n_updates"]["a"] == 3


def test_load_state_dict_mismatch_errors() -> None:
    sd = _trained_store().state_dict()
    with pytest.raises(ValueError, match="other image ids"):
        EMAStore({"a": (4, 6), "b": (5, 3)}).load_state_dict(sd)
    target = EMAStore({"a": (4, 6), "b": (5, 4), "c": (2, 2)})
    with pytest.raises(ValueError, match=r"map of 'b' has shape \(5, 3\)"):
        target.load_state_dict(sd)
    assert target.n_updates("a") == 0 and not target.get("a").any()  # left unchanged
    with pytest.raises(ValueError, match="not an EMAStore state"):
        EMAStore.from_state_dict({**sd, "kind": "something else"})
    with pytest.raises(ValueError, match="lacks the keys"):
        EMAStore.from_state_dict({"maps": sd["maps"]})


# --------------------------------------------------------------------------- summaries


def _store_with(ema: np.ndarray) -> EMAStore:
    store = EMAStore({"img": ema.shape}, alpha=1.0)  # alpha 1: the map becomes ema
    store.update("img", ema)
    return store


EMA = np.array(
    [
        [0.9, 0.8, 0.81, 0.0],
        [0.1, 0.2, 0.19, 0.5],
    ],
    np.float32,
)
SCRIBBLE = np.array(
    [
        [U, U, U, BACKGROUND],
        [U, U, FOREGROUND, U],
    ],
    np.uint8,
)


def test_confidence_summary() -> None:
    store = _store_with(EMA)
    all_px = store.confidence_summary("img", tau=0.8)
    # fg: 0.9, 0.81; bg: 0.0, 0.1, 0.19 (0.8 and 0.2 are on the boundary: not confident)
    assert all_px == ConfidenceSummary(2 / 8, 3 / 8, 5 / 8, 8)
    unscribbled = store.confidence_summary("img", tau=0.8, scribble=SCRIBBLE)
    # unscribbled: 0.9, 0.8, 0.81, 0.1, 0.2, 0.5 -> fg 2, bg 1
    assert unscribbled == ConfidenceSummary(2 / 6, 1 / 6, 3 / 6, 6)


def test_pseudo_label_accuracy() -> None:
    store = _store_with(EMA)
    gt = np.array(
        [
            [1, 1, 0, 0],  # (0, 2) pseudo fg but gt background: a fg error
            [0, 1, 1, 1],
        ],
        np.uint16,
    )
    q = pseudo_label_accuracy(store, "img", gt, SCRIBBLE, tau=0.8)
    # pseudo-labelled: (0,0) fg ok, (0,2) fg wrong, (1,0) bg ok
    assert q.n_unscribbled == 6 and q.n_labelled == 3
    assert q.accuracy == pytest.approx(2 / 3)
    assert q.accuracy_fg == pytest.approx(1 / 2)
    assert q.accuracy_bg == 1.0
    assert q.coverage == pytest.approx(3 / 6)

    none = pseudo_label_accuracy(store, "img", gt.astype(bool), SCRIBBLE, tau=1.0)
    assert none.n_labelled == 0 and none.coverage == 0.0 and math.isnan(none.accuracy)
    with pytest.raises(ValueError, match="gt_foreground must have shape"):
        pseudo_label_accuracy(store, "img", gt[:, :3], SCRIBBLE)
    with pytest.raises(ValueError, match=r"unknown label values \[7\]"):
        pseudo_label_accuracy(store, "img", gt, np.where(SCRIBBLE == U, 7, SCRIBBLE))


# --------------------------------------------------------------------------- schedule


def test_ema_due_default_schedule() -> None:
    assert [e for e in range(25) if ema_due(e)] == [4, 9, 14, 19, 24]
    assert not ema_due(0) and not ema_due(5) and ema_due(99) and not ema_due(100)
    assert [e for e in range(10) if ema_due(e, every=3, start=0)] == [0, 3, 6, 9]


def test_ema_due_iteration() -> None:
    assert [i for i in range(35) if ema_due_iteration(i, 10)] == [9, 19, 29]
    assert [i for i in range(8) if ema_due_iteration(i, 1)] == list(range(8))
    assert [i for i in range(12) if ema_due_iteration(i, 5, start=2)] == [2, 7]


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: ema_due(-1), ValueError, "epoch must be >= 0"),
        (lambda: ema_due(3, every=0), ValueError, "every must be >= 1"),
        (lambda: ema_due(2.0), TypeError, "epoch must be an int"),
        (lambda: ema_due_iteration(3, 0), ValueError, "every_iterations must be >= 1"),
    ],
)
def test_schedule_errors(call, exc, match) -> None:
    with pytest.raises(exc, match=match):
        call()


def test_constants_are_the_scribble_encoding() -> None:
    assert (BACKGROUND, FOREGROUND, UNLABELLED) == (0, 1, 250)


def test_first_start_stores_the_first_prediction():
    import torch

    zero = EMAStore({"a": (2, 2)}, alpha=0.2)
    first = EMAStore({"a": (2, 2)}, alpha=0.2, start="first")
    p1 = np.array([[1.0, 0.0], [0.5, 0.9]], np.float32)
    p2 = np.array([[0.0, 1.0], [0.5, 0.4]], np.float32)
    for store in (zero, first):
        store.update("a", p1)
    assert np.allclose(zero.get("a"), 0.2 * p1)
    assert np.array_equal(first.get("a"), p1)
    first.update("a", p2)
    assert np.allclose(first.get("a"), 0.2 * p2 + 0.8 * p1)
    restored = EMAStore.from_state_dict(first.state_dict())
    assert restored.start == "first"
    with pytest.raises(ValueError, match="start must be one of"):
        EMAStore({"a": (2, 2)}, start="ones")
    assert torch.is_tensor(first.state_dict()["maps"]["a"])
