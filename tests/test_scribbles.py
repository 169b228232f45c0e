"""Scribble synthesis, encoding and converters."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from s2l_core.scribbles import (
    BACKGROUND,
    FOREGROUND,
    RATIOS,
    UNLABELLED,
    ScribblePieces,
    from_napari,
    read_scribble,
    save_scribble,
    scribble_pieces,
    synthesize_scribbles,
    to_napari,
    validate_scribble,
)


def lines_mask(n: int = 10) -> np.ndarray:
    """``n`` separate one-pixel-wide horizontal nuclei: each is its own skeleton."""
    mask = np.zeros((4 * n + 4, 30), dtype=np.uint16)
    for k in range(n):
        mask[4 * k + 2, 5:25] = k + 1
    return mask


# ----------------------------------------------------------------------------- synthesis


def test_thin_nuclei_are_their_own_scribbles():
    mask = lines_mask(10)
    pieces = scribble_pieces(mask)
    assert pieces.n_fg == 10
    result = synthesize_scribbles(mask, 0.3, seed=1)
    assert (result.n_fg_pieces, result.n_fg_kept) == (10, 3)
    fg = result.scribble == FOREGROUND
    # Exactly three whole lines are kept, and nothing else.
    kept = [k for k in range(1, 11) if fg[mask == k].all()]
    assert len(kept) == 3
    assert np.array_equal(fg, np.isin(mask, kept))


def test_bar_skeleton_is_its_midline():
    mask = np.zeros((7, 15), dtype=np.uint8)
    mask[2:5, 2:13] = 1
    result = synthesize_scribbles(mask, 1.0)
    fg = result.scribble == FOREGROUND
    assert result.n_fg_kept == 1
    assert fg[3, 2:11].all()  # the middle row of the bar
    assert not fg[[0, 1, 5, 6]].any()


def test_background_is_cut_at_corners():
    mask = np.zeros((60, 60), dtype=np.uint8)
    mask[20:40, 20:40] = 1  # one square nucleus in the middle
    pieces = scribble_pieces(mask)
    skeleton = skeletonize(mask == 0)
    assert pieces.n_bg > 1  # the cut split the background skeleton
    assert (pieces.bg > 0).sum() < skeleton.sum()  # corner patches were cleared
    assert np.all(skeleton[pieces.bg > 0])  # pieces lie on the skeleton


def test_counts_shortfall_and_ratio_rule_on_hand_made_pieces():
    fg = np.zeros((10, 10), np.int32)
    fg[1, 1:6] = [1, 0, 2, 0, 3]
    fg[3, 1:5] = [4, 0, 5, 0]
    bg = np.zeros((10, 10), np.int32)
    bg[8, 1] = 1
    bg[8, 5] = 2
    pieces = ScribblePieces(fg, 5, bg, 2)
    labels = np.zeros((10, 10), np.uint8)
    results = synthesize_scribbles(labels, [0.1, 0.5, 1.0], pieces=pieces)
    assert [r.n_fg_kept for r in results.values()] == [1, 2, 5]  # at least one; round(2.5)=2
    full = results[1.0]
    assert (full.n_bg_wanted, full.n_bg_kept, full.bg_shortfall) == (5, 2, 3)
    assert (full.scribble == BACKGROUND).sum() == 2
    assert (full.scribble == FOREGROUND).sum() == 5
    assert results[0.1].bg_shortfall == 0 and (results[0.1].scribble == BACKGROUND).sum() == 1


def test_empty_mask_gives_no_scribbles():
    result = synthesize_scribbles(np.zeros((32, 32), np.uint8), 0.5)
    assert result.n_fg_kept == 0 and result.n_bg_kept == 0
    assert np.all(result.scribble == UNLABELLED)


def test_scribbles_stay_in_their_class_on_random_masks_of_any_size():
    # Random rectangles on images from 1x1 to 40x40, including one pixel high or wide
    # (which scikit-image's corner detector refuses as such): foreground strokes lie on
    # nuclei, background strokes off them, and every value is 0, 1 or 250.
    rng = np.random.default_rng(1)
    shapes = [(1, 50), (50, 1), (1, 1), (2, 30)] + [
        tuple(rng.integers(1, 40, 2)) for _ in range(60)
    ]
    for h, w in shapes:
        labels = np.zeros((h, w), np.int32)
        for k in range(rng.integers(0, 5)):
            r0, c0 = rng.integers(0, h), rng.integers(0, w)
            labels[r0 : r0 + rng.integers(1, 15), c0 : c0 + rng.integers(1, 15)] = k + 1
        for ratio in (0.1, 1.0):
            s = synthesize_scribbles(labels, ratio, seed=3).scribble
            assert s.shape == (h, w) and set(np.unique(s)) <= {BACKGROUND, FOREGROUND, UNLABELLED}
            assert not np.any((s == FOREGROUND) & (labels == 0))
            assert not np.any((s == BACKGROUND) & (labels > 0))
    line = np.zeros((1, 50), np.int32)
    line[0, 10:20] = 1
    s = synthesize_scribbles(line, 1.0, seed=0).scribble
    # The nucleus is its own stroke; the background skeleton is the two runs beside it,
    # and one of them is kept (as many background pieces as foreground ones).
    assert np.all(s[0, 10:20] == FOREGROUND)
    assert np.all(s[0, :10] == BACKGROUND) != np.all(s[0, 20:] == BACKGROUND)


def test_seed_key_and_nesting():
    mask = lines_mask(20)
    a = synthesize_scribbles(mask, RATIOS, seed=5, key="img")
    b = synthesize_scribbles(mask, RATIOS, seed=5, key="img")
    c = synthesize_scribbles(mask, RATIOS, seed=6, key="img")
    d = synthesize_scribbles(mask, RATIOS, seed=5, key="other")
    assert all(np.array_equal(a[r].scribble, b[r].scribble) for r in RATIOS)
    assert not np.array_equal(a[0.3].scribble, c[0.3].scribble)
    assert not np.array_equal(a[0.3].scribble, d[0.3].scribble)
    for small, large in itertools.pairwise(RATIOS):
        assert np.all(a[large].scribble[a[small].scribble == FOREGROUND] == FOREGROUND)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"ratio must lie in \(0, 1\]"):
        synthesize_scribbles(lines_mask(2), ratio)


def test_bad_labels():
    with pytest.raises(ValueError, match="2-D"):
        synthesize_scribbles(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        synthesize_scribbles(np.zeros((4, 4), np.float32))


# ----------------------------------------------------------------------------- encoding


def test_napari_conversion_by_hand():
    scribble = np.array([[0, 1], [250, 1]], np.uint8)
    napari = to_napari(scribble)
    assert napari.tolist() == [[1, 2], [0, 2]]
    assert np.array_equal(from_napari(napari), scribble)
    assert np.array_equal(from_napari(np.array([[0, 1], [2, 0]], np.int64)), [[250, 0], [1, 250]])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 2, 2), np.uint8), "2-D"),
        (np.zeros((2, 2), np.float32), "integer dtype"),
        (np.array([[0, 3]], np.uint8), r"values \[3\]"),
    ],
)
def test_from_napari_rejects_bad_layers(array, message):
    with pytest.raises(ValueError, match=message):
        from_napari(array)


def test_validation_errors():
    with pytest.raises(ValueError, match=r"values \[2\]"):
        validate_scribble(np.array([[0, 2]], np.uint8))
    with pytest.raises(ValueError, match=r"shape \(1, 2\), expected \(2, 2\)"):
        validate_scribble(np.array([[0, 1]], np.uint8), shape=(2, 2))
    with pytest.raises(ValueError, match="integer dtype"):
        to_napari(np.zeros((2, 2), bool))


def test_save_is_validated_and_atomic(tmp_path):
    path = tmp_path / "s.png"
    good = np.array([[0, 1, 250]], np.uint8)
    save_scribble(path, good)
    with pytest.raises(ValueError, match="values"):
        save_scribble(path, np.array([[7, 7, 7]], np.uint8))
    assert np.array_equal(read_scribble(path), good)  # the earlier file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["s.png"]


# ----------------------------------------------------------------------------- real data


def _sample_ids(prepared, per_modality=4):
    return [
        i
        for m in ("fluorescence", "histopathology", "brightfield")
        for i in prepared.ids(m)[:per_modality]
    ]


@pytest.mark.slow
def test_real_scribbles_lie_inside_their_class(prepared, scribble_set):
    for image_id in _sample_ids(prepared):
        labels = prepared.labels(image_id)
        for ratio in RATIOS:
            scribble = scribble_set.scribble(image_id, ratio)
            assert scribble.shape == labels.shape and scribble.dtype == np.uint8
            assert np.all(labels[scribble == FOREGROUND] > 0)
            assert np.all(labels[scribble == BACKGROUND] == 0)


@pytest.mark.slow
def test_real_ratio_holds_and_background_matches(scribble_set):
    table = scribble_set.summary
    assert sorted(table["ratio"].unique()) == list(RATIOS)
    expected = np.maximum(1, np.round(table["ratio"] * table["n_fg_pieces"]))
    assert np.array_equal(table["n_fg_kept"], expected.astype(int))
    assert np.array_equal(table["n_bg_kept"] + table["bg_shortfall"], table["n_fg_kept"])
    totals = table.groupby("ratio")[["n_fg_kept", "n_fg_pieces"]].sum()
    fraction = totals["n_fg_kept"] / totals["n_fg_pieces"]
    assert np.allclose(fraction.to_numpy(), RATIOS, atol=0.02)
    full = table[table["ratio"] == 1.0]
    assert (full["n_fg_kept"] == full["n_fg_pieces"]).all()


@pytest.mark.slow
def test_real_scribbles_are_reproducible(prepared, scribble_set):
    for image_id in _sample_ids(prepared, 2):
        labels = prepared.labels(image_id)
        again = synthesize_scribbles(labels, RATIOS, seed=0, key=image_id)
        for ratio in RATIOS:
            assert np.array_equal(again[ratio].scribble, scribble_set.scribble(image_id, ratio))
        full_fg = again[1.0].scribble == FOREGROUND
        assert np.array_equal(full_fg, skeletonize(labels > 0))
        n_pieces = ndi.label(full_fg, structure=np.ones((3, 3)))[1]
        assert n_pieces == again[1.0].n_fg_pieces
