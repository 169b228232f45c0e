"""Tests of s2l_core.metrics on small images whose scores were worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.segmentation import relabel_sequential

from s2l_core import metrics as M

EPS = M.ORIGINAL_MDICE_EPS


def boxes(shape, *rects, labels=None, dtype=np.int32):
    """Label image with rectangle k (r0, r1, c0, c1) painted with labels[k] (default k+1)."""
    out = np.zeros(shape, dtype=dtype)
    labels = labels if labels is not None else range(1, len(rects) + 1)
    for lab, (r0, r1, c0, c1) in zip(labels, rects, strict=True):
        out[r0:r1, c0:c1] = lab
    return out


def brute_force_iou(pred, gt):
    gt_ids = [v for v in np.unique(gt) if v]
    pred_ids = [v for v in np.unique(pred) if v]
    iou = np.zeros((len(gt_ids), len(pred_ids)))
    for i, g in enumerate(gt_ids):
        for j, p in enumerate(pred_ids):
            a, b = gt == g, pred == p
            iou[i, j] = np.sum(a & b) / np.sum(a | b)
    return iou, np.array(gt_ids), np.array(pred_ids)


# ----------------------------------------------------------------------- basic cases


def test_perfect_prediction_scores_one_everywhere_even_with_other_label_values():
    gt = boxes((40, 40), (5, 15, 5, 15), (5, 15, 25, 35), (25, 35, 10, 20))
    pred = (gt * 7).astype(np.uint16)  # labels 7, 14, 21: not consecutive, other dtype
    row = M.evaluate_image(pred, gt)
    for key in ("iou", "dice", "original_mdice", "object_dice", "ap", "f1", "aji"):
        assert row[key] == pytest.approx(1.0, abs=1e-12), key
    assert row["n_gt"] == 3
    assert row["n_pred"] == 3


def test_empty_vs_empty():
    z = np.zeros((16, 16), dtype=np.int32)
    assert M.foreground_iou(z, z) == 1.0
    assert M.foreground_dice(z, z) == 1.0
    assert M.object_dice(z, z) == 1.0
    assert M.average_precision(z, z) == 1.0
    assert M.f1_at(z, z) == 1.0
    assert M.aggregated_jaccard_index(z, z) == 1.0
    det = M.detection_scores(z, z)
    assert (det["precision"], det["recall"]) == (1.0, 1.0)
    # The original's mDice averages over no object at all and reports 0.
    assert M.original_mdice(z, z) == 0.0


def test_prediction_empty_ground_truth_not():
    gt = boxes((30, 30), (5, 15, 5, 15))
    pred = np.zeros_like(gt)
    assert M.foreground_iou(pred, gt) == pytest.approx(1e-6 / (100 + 1e-6))
    assert M.foreground_dice(pred, gt) == pytest.approx(0.0, abs=1e-7)
    assert M.object_dice(pred, gt) == 0.0
    assert M.average_precision(pred, gt) == 0.0
    assert M.aggregated_jaccard_index(pred, gt) == 0.0
    det = M.detection_scores(pred, gt)
    assert det == {"tp": 0, "fp": 0, "fn": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.original_mdice(pred, gt) == pytest.approx(EPS / (100 + EPS))


def test_ground_truth_empty_prediction_not():
    pred = boxes((30, 30), (5, 15, 5, 15), (20, 25, 20, 25))
    gt = np.zeros_like(pred)
    assert M.object_dice(pred, gt) == 0.0
    assert M.average_precision(pred, gt) == 0.0
    assert M.aggregated_jaccard_index(pred, gt) == 0.0
    det = M.detection_scores(pred, gt)
    assert det["fp"] == 2
    assert (det["precision"], det["recall"], det["f1"]) == (0.0, 0.0, 0.0)
    assert M.original_mdice(pred, gt) == 0.0


def test_shifted_square_has_iou_one_third():
    # Two 4x4 squares overlapping in 4x2 pixels: intersection 8, union 24.
    gt = boxes((10, 10), (2, 6, 2, 6))
    pred = boxes((10, 10), (2, 6, 4, 8))
    ov = M.match_instances(pred, gt)
    np.testing.assert_allclose(ov.iou, [[1 / 3]])
    assert M.foreground_iou(pred, gt) == pytest.approx(1 / 3)
    assert M.foreground_dice(pred, gt) == pytest.approx(0.5)
    assert M.object_dice(pred, gt) == pytest.approx(0.5)  # matched despite IoU < 0.5
    assert M.aggregated_jaccard_index(pred, gt) == pytest.approx(1 / 3)
    assert M.average_precision(pred, gt) == 0.0
    assert M.f1_at(pred, gt) == 0.0


def test_foreground_scores_accept_any_dtype_and_treat_positive_as_foreground():
    gt = boxes((10, 10), (0, 5, 0, 10))  # 50 px
    pred = np.zeros((10, 10), dtype=np.float32)
    pred[0:10, 0:5] = 0.7  # 50 px, 25 of them in gt
    pred[9, 9] = -1.0  # not foreground
    assert M.foreground_iou(pred, gt, smooth=0) == pytest.approx(25 / 75)
    assert M.foreground_dice(pred, gt, smooth=0) == pytest.approx(50 / 100)


# ------------------------------------------------------------------ average precision


def test_ap_iou_between_thresholds_and_strict_inequality():
    # gt 4x4 (16 px) and pred 4x3 inside it (12 px): IoU = 0.75 exactly; it beats the
    # thresholds 0.5 ... 0.7 (5 of 10) but not 0.75 itself (IoU > t is strict).
    gt = boxes((10, 10), (1, 5, 1, 5))
    pred = boxes((10, 10), (1, 5, 1, 4))
    mean, per = M.average_precision(pred, gt, return_per_threshold=True)
    np.testing.assert_array_equal(per, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    assert mean == pytest.approx(0.5)
    assert M.f1_at(pred, gt, iou=0.7) == 1.0
    assert M.f1_at(pred, gt, iou=0.75) == 0.0


def test_ap_with_miss_and_false_positive():
    # Object 1: IoU 10/16 = 0.625 (beats 0.5, 0.55, 0.6); object 2 missed; one spurious
    # prediction. AP(t) = 1 / (1 + 1 + 1) for t < 0.625, else 0.
    gt = boxes((20, 20), (0, 4, 0, 4), (10, 14, 10, 14))
    pred = np.zeros_like(gt)
    pred[0:2, 0:4] = 3
    pred[2, 0:2] = 3  # 10 px inside object 1
    pred[15:18, 0:3] = 9  # false positive
    mean, per = M.average_precision(pred, gt, return_per_threshold=True)
    np.testing.assert_allclose(per, [1 / 3] * 3 + [0] * 7)
    assert mean == pytest.approx(0.1)
    det = M.detection_scores(pred, gt, iou=0.6)
    assert det == {
        "tp": 1,
        "fp": 1,
        "fn": 1,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
    }


def test_iou_exactly_half_is_not_a_match():
    gt = boxes((10, 10), (0, 4, 0, 4))
    pred = boxes((10, 10), (0, 4, 0, 2))  # 8 of 16 px: IoU 0.5
    assert M.f1_at(pred, gt, iou=0.5) == 0.0
    assert M.average_precision(pred, gt) == 0.0


def test_ap_custom_thresholds():
    gt = boxes((10, 10), (1, 5, 1, 5))
    pred = boxes((10, 10), (1, 5, 1, 4))  # IoU 0.75
    assert M.average_precision(pred, gt, thresholds=[0.5, 0.8]) == pytest.approx(0.5)


# ------------------------------------------------------------- split and merged nuclei


def test_split_nucleus():
    # gt: one 10x10 nucleus; pred: split into 10x6 (IoU 0.6) and 10x4 (IoU 0.4).
    gt = boxes((20, 20), (5, 15, 5, 15))
    pred = boxes((20, 20), (5, 15, 5, 11), (5, 15, 11, 15))
    np.testing.assert_allclose(M.match_instances(pred, gt).iou, [[0.6, 0.4]])
    # AP: t = 0.5, 0.55 -> TP 1, FP 1 -> 1/2; t >= 0.6 -> 0.  Mean 1/10.
    assert M.average_precision(pred, gt) == pytest.approx(0.1)
    det = M.detection_scores(pred, gt)
    assert (det["precision"], det["recall"], det["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    # Matched pair Dice 2*60/160 = 0.75, one spurious object: 0.75 / 2.
    assert M.object_dice(pred, gt) == pytest.approx(0.375)
    # AJI: best match has 60 in 100, the unused 40 px join the union: 60 / 140.
    assert M.aggregated_jaccard_index(pred, gt) == pytest.approx(3 / 7)
    # The original mDice sees the foreground only: one component, a perfect match.
    assert M.original_mdice(pred > 0, gt) == pytest.approx(1.0)


def test_merged_pair():
    # gt: 10x6 (60 px) and 10x4 (40 px) side by side; pred: one 10x10 covering both.
    gt = boxes((20, 20), (5, 15, 5, 11), (5, 15, 11, 15))
    pred = boxes((20, 20), (5, 15, 5, 15))
    np.testing.assert_allclose(M.match_instances(pred, gt).iou, [[0.6], [0.4]])
    assert M.average_precision(pred, gt) == pytest.approx(0.1)
    assert M.object_dice(pred, gt) == pytest.approx(0.375)
    # Kumar's AJI lets both gt objects take the merged object: (60 + 40) / (100 + 100).
    assert M.aggregated_jaccard_index(pred, gt) == pytest.approx(0.5)
    # The original matches both gt objects to the same component (not one-to-one).
    expected = ((120 + EPS) / (160 + EPS) + (80 + EPS) / (140 + EPS)) / 2
    assert M.original_mdice(pred, gt) == pytest.approx(expected, rel=1e-12)


def test_object_dice_matches_one_to_one():
    # gt A (4x8 = 32 px) and B (4x4 = 16 px). P1: 24 px inside A (IoU 24/32).
    # P2: 8 px of A and all of B, 24 px (IoU with A 8/48, with B 16/24).
    gt = boxes((20, 20), (0, 4, 0, 8), (0, 4, 10, 14))
    pred = np.zeros_like(gt)
    pred[0:4, 0:6] = 1
    pred[0:4, 6:8] = 2
    pred[0:4, 10:14] = 2
    ov = M.match_instances(pred, gt)
    np.testing.assert_allclose(ov.iou, [[24 / 32, 8 / 48], [0, 16 / 24]])
    # Pairs A-P1 (Dice 48/56) and B-P2 (Dice 32/40), nothing left over.
    expected = (48 / 56 + 32 / 40) / 2
    assert M.object_dice(pred, gt) == pytest.approx(expected)


def test_object_dice_maximises_total_iou_not_greedy():
    # 1-pixel-high strips. A = 20 px, B = 10 px; P = 10 px of A + 3 px of B (13 px);
    # Q = 8 px of A. IoU(A,P) = 10/23 is the largest, but taking it leaves B and Q
    # unmatched (greedy: (20/33) / 3 = 0.20). The total IoU is larger with A-Q (8/20)
    # and B-P (3/20): two pairs, Dice 16/28 and 6/23, no object left over.
    gt = np.zeros((1, 40), dtype=np.int32)
    pred = np.zeros_like(gt)
    gt[0, 0:20] = 1  # A
    gt[0, 30:40] = 2  # B
    pred[0, 0:10] = 10  # P ...
    pred[0, 30:33] = 10  # ... spans A and B
    pred[0, 10:18] = 20  # Q
    ov = M.match_instances(pred, gt)
    np.testing.assert_allclose(ov.iou, [[10 / 23, 8 / 20], [3 / 20, 0]])
    assert M.object_dice(pred, gt) == pytest.approx((16 / 28 + 6 / 23) / 2)


# ----------------------------------------------------------------------------- AJI


def test_aji_hand_computed():
    # g1: 4x4 with a shifted 4x4 prediction (intersection 8, union 24); g2: exact 4x4;
    # g3: 3x3 missed; one spurious 2x2 prediction.
    # C = 8 + 16 = 24, U = 24 + 16 + 9 (missed g3) + 4 (unused prediction) = 53.
    gt = boxes((30, 30), (0, 4, 0, 4), (10, 14, 10, 14), (20, 23, 20, 23))
    pred = boxes((30, 30), (0, 4, 2, 6), (10, 14, 10, 14), (25, 27, 0, 2))
    assert M.aggregated_jaccard_index(pred, gt) == pytest.approx(24 / 53)


def test_aji_picks_highest_iou_not_largest_overlap():
    # g (10x10) overlaps a huge prediction in 60 px (IoU 60/(100+400-60)) and a small
    # one in 40 px (IoU 40/(100+40-40) = 0.4): the small one is chosen.
    gt = boxes((30, 30), (0, 10, 0, 10))
    pred = np.zeros_like(gt)
    pred[0:10, 4:10] = 1  # 60 px inside g
    pred[10:30, 0:17] = 1  # 340 more px outside: P1 has 400 px
    pred[0:10, 0:4] = 2  # 40 px, all inside g
    c_num = 40
    c_den = 100 + 400  # union(g, P2) = 100; P1 unused adds 400
    assert M.aggregated_jaccard_index(pred, gt) == pytest.approx(c_num / c_den)


# ------------------------------------------------------------- the original's mDice


def test_instances_from_semantic_connectivity_removal_and_holes():
    sem = np.zeros((40, 40), dtype=np.uint8)
    sem[0:8, 0:8] = 1
    sem[8:16, 8:16] = 1  # touches the first square at a corner only
    inst8 = M.instances_from_semantic(sem)
    assert inst8.max() == 1
    inst4 = M.instances_from_semantic(sem, connectivity=1)
    assert inst4.max() == 2

    sem = np.zeros((40, 40), dtype=np.uint8)
    sem[0:7, 20:29] = 1  # 63 px: removed
    sem[20:28, 0:8] = 1  # 64 px: kept
    inst = M.instances_from_semantic(sem)
    assert inst.max() == 1
    assert np.count_nonzero(inst) == 64

    ring = np.zeros((20, 20), dtype=bool)
    ring[2:12, 2:12] = True
    ring[5:8, 5:8] = False  # a 3x3 hole
    assert np.count_nonzero(M.instances_from_semantic(ring)) == 100
    assert np.count_nonzero(M.instances_from_semantic(ring, fill_holes=False)) == 91


def test_original_mdice_tiny_ground_truth_scores_one():
    # A 3x3 nucleus nobody predicted scores 1; the other is predicted exactly.
    gt = boxes((40, 40), (5, 8, 5, 8), (20, 30, 20, 30))
    pred = boxes((40, 40), (20, 30, 20, 30))
    assert M.original_mdice(pred, gt) == pytest.approx(1.0)
    assert M.object_dice(pred, gt) == pytest.approx(0.5)  # the corrected score


def test_original_mdice_four_nuclei_three_misses():
    # method.md §5: nucleus 1 (inside) predicted exactly, nucleus 2 (inside) missed,
    # nuclei 3 and 4 (on the border) missed. The miss of nucleus 2 starts the border drop:
    # 3 and 4 score 1. Original: (1 + ~0 + 1 + 1) / 4 = 0.75; right: 1 / 4.
    gt = boxes((50, 50), (10, 20, 10, 20), (30, 40, 10, 20), (0, 10, 30, 40), (40, 50, 30, 40))
    pred = boxes((50, 50), (10, 20, 10, 20))
    expected = (1 + EPS / (100 + EPS) + 1 + 1) / 4
    assert M.original_mdice(pred, gt) == pytest.approx(expected, rel=1e-12)
    assert M.object_dice(pred, gt) == pytest.approx(0.25)
    assert M.average_precision(pred, gt) == pytest.approx(0.25)


def test_original_mdice_when_no_prediction_touches_any_nucleus():
    # One 100-pixel nucleus inside, one 100-pixel nucleus on the border; the only
    # predicted object (100 px, kept: >= 64) lies elsewhere. Nucleus 1 is missed and starts
    # the border drop, so nucleus 2 scores 1: (eps / (100 + eps) + 1) / 2.
    gt = boxes((50, 50), (10, 20, 10, 20), (40, 50, 0, 10))
    pred = boxes((50, 50), (30, 40, 30, 40))
    assert M.original_mdice(pred, gt) == pytest.approx((EPS / (100 + EPS) + 1) / 2, rel=1e-12)
    assert M.evaluate_image(pred, gt)["object_dice"] == 0.0


def test_original_mdice_depends_on_label_order():
    # Border nucleus (10x20 = 200 px) half predicted (Dice 2*100/300); inside nucleus
    # missed. Border nucleus visited first: scored normally. Visited after the miss: 1.
    border = (0, 10, 20, 40)
    inside = (30, 40, 10, 20)
    pred = boxes((50, 50), (0, 10, 20, 30))
    missed = EPS / (100 + EPS)
    half = (200 + EPS) / (300 + EPS)
    gt_border_first = boxes((50, 50), border, inside)
    assert M.original_mdice(pred, gt_border_first) == pytest.approx((half + missed) / 2)
    gt_border_last = boxes((50, 50), inside, border)
    assert M.original_mdice(pred, gt_border_last) == pytest.approx((missed + 1) / 2)
    # The corrected score does not care about the order.
    assert M.object_dice(pred, gt_border_first) == M.object_dice(pred, gt_border_last)


def test_original_mdice_tiny_object_starts_the_border_drop():
    pred = boxes((50, 50), (0, 10, 20, 30))
    gt_alone = boxes((50, 50), (0, 10, 20, 40))
    assert M.original_mdice(pred, gt_alone) == pytest.approx((200 + EPS) / (300 + EPS))
    gt_with_tiny = boxes((50, 50), (30, 33, 30, 33), (0, 10, 20, 40))
    assert M.original_mdice(pred, gt_with_tiny) == pytest.approx(1.0)


def test_original_mdice_counts_label_gaps():
    # Labels 1 and 3: the absent label 2 scores 1 and starts the border drop, so the
    # half-predicted border nucleus 3 scores 1 too.
    gt = boxes((50, 50), (30, 40, 10, 20), (0, 10, 20, 40), labels=[1, 3])
    pred = boxes((50, 50), (30, 40, 10, 20), (0, 10, 20, 30))
    assert M.original_mdice(pred, gt) == pytest.approx(1.0)
    seq = relabel_sequential(gt)[0]
    assert M.original_mdice(pred, seq) == pytest.approx((1 + (200 + EPS) / (300 + EPS)) / 2)


def test_original_mdice_removes_small_predictions_and_fills_holes():
    gt = boxes((30, 30), (5, 12, 5, 12), (15, 25, 15, 25))  # 49 px and 100 px
    pred = (gt > 0).astype(np.uint8)
    pred[19:21, 19:21] = 0  # a hole in the second prediction: filled
    # The 49 px prediction is under 64 px: removed, so nucleus 1 is missed (interior).
    expected = (EPS / (49 + EPS) + 1) / 2
    assert M.original_mdice(pred, gt) == pytest.approx(expected, rel=1e-12)


def test_original_mdice_does_not_modify_its_inputs():
    gt = boxes((50, 50), (30, 40, 10, 20), (0, 10, 20, 40))
    pred = boxes((50, 50), (0, 10, 20, 30))
    gt_copy, pred_copy = gt.copy(), pred.copy()
    M.original_mdice(pred, gt)
    np.testing.assert_array_equal(gt, gt_copy)
    np.testing.assert_array_equal(pred, pred_copy)


# ------------------------------------------------------------- the vectorized matrix


def test_iou_matrix_equals_brute_force_on_random_labels():
    rng = np.random.default_rng(0)
    shape = (60, 80)

    def random_labels(n, values):
        out = np.zeros(shape, dtype=np.uint16)
        for v in values[:n]:
            r, c = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
            h, w = rng.integers(3, 15, size=2)
            out[r : r + h, c : c + w] = v  # later rectangles overwrite earlier ones
        return out

    gt = random_labels(40, rng.permutation(np.arange(1, 2000, 7)))
    pred = random_labels(50, rng.permutation(np.arange(3, 3000, 11)))
    expected, gt_ids, pred_ids = brute_force_iou(pred, gt)
    assert expected.shape[0] > 20 and expected.shape[1] > 20
    assert np.count_nonzero(expected) > 10

    ov = M.match_instances(pred, gt)
    np.testing.assert_array_equal(ov.gt_ids, gt_ids)
    np.testing.assert_array_equal(ov.pred_ids, pred_ids)
    np.testing.assert_allclose(ov.iou, expected, rtol=0, atol=1e-15)
    sp = M.match_instances(pred, gt, sparse_output=True)
    np.testing.assert_allclose(sp.iou.toarray(), expected, rtol=0, atol=1e-15)

    # Huge label values take another relabelling path: same matrix.
    ov_big = M.match_instances(pred.astype(np.int64) * 1_000_003, gt)
    np.testing.assert_allclose(ov_big.iou, expected, rtol=0, atol=1e-15)


def test_many_objects_use_the_sparse_path():
    # 10,000 one-pixel objects on each side (the dense pair table would be 10^8 cells).
    gt = np.arange(1, 10_001, dtype=np.int32).reshape(100, 100)
    rng = np.random.default_rng(1)
    pred = rng.permutation(np.arange(1, 10_001))[gt - 1].astype(np.int64) * 1_000_003
    assert M.average_precision(pred, gt) == 1.0
    assert M.object_dice(pred, gt) == 1.0
    assert M.aggregated_jaccard_index(pred, gt) == 1.0
    pred[0, 0] = 0
    det = M.detection_scores(pred, gt)
    assert (det["tp"], det["fp"], det["fn"]) == (9_999, 0, 1)


# --------------------------------------------------------------- evaluate, summarize


def test_evaluate_image_and_summarize():
    gt = boxes((20, 20), (5, 15, 5, 15))
    split = boxes((20, 20), (5, 15, 5, 11), (5, 15, 11, 15))
    row_split = M.evaluate_image(split, gt, per_threshold=True)
    assert row_split["object_dice"] == pytest.approx(0.375)
    assert row_split["aji"] == pytest.approx(3 / 7)
    assert row_split["ap"] == pytest.approx(0.1)
    assert row_split["ap@0.50"] == pytest.approx(0.5)
    assert row_split["ap@0.95"] == 0.0
    assert row_split["f1"] == pytest.approx(2 / 3)
    assert (row_split["n_gt"], row_split["n_pred"]) == (1, 2)
    assert row_split["original_mdice"] == pytest.approx(1.0)  # sees the foreground only
    assert M.evaluate_image(gt, gt).keys() == {
        "iou",
        "dice",
        "original_mdice",
        "object_dice",
        "ap",
        "f1",
        "precision",
        "recall",
        "aji",
        "n_gt",
        "n_pred",
    }
    row_perfect = M.evaluate_image(gt, gt, per_threshold=True)

    table = M.summarize([{"image": "a", **row_split}, {"image": "b", **row_perfect}])
    assert isinstance(table, pd.DataFrame)
    assert list(table.index) == ["mean", "std"]
    assert "image" not in table.columns
    assert table.loc["mean", "object_dice"] == pytest.approx((0.375 + 1) / 2)
    assert table.loc["std", "object_dice"] == pytest.approx(0.625 / np.sqrt(2))
    assert table.loc["mean", "aji"] == pytest.approx((3 / 7 + 1) / 2)
    assert table.loc["mean", "ap@0.50"] == pytest.approx(0.75)
    assert table.loc["mean", "n_pred"] == pytest.approx(1.5)


# ---------------------------------------------------------------------- validation


def test_validation_errors():
    a = np.zeros((4, 4), dtype=np.int32)
    with pytest.raises(ValueError, match=r"same shape, got \(4, 4\) and \(4, 5\)"):
        M.average_precision(a, np.zeros((4, 5), dtype=np.int32))
    with pytest.raises(ValueError, match=r"pred_labels must be a 2-D image.*3-D"):
        M.object_dice(np.zeros((2, 4, 4), dtype=np.int32), a)
    with pytest.raises(TypeError, match="gt_labels must be an integer label image, got dtype f"):
        M.aggregated_jaccard_index(a, a.astype(np.float64))
    with pytest.raises(TypeError, match="dtype bool"):
        M.match_instances(a.astype(bool), a)
    neg = a.copy()
    neg[0, 0] = -3
    with pytest.raises(ValueError, match=r"gt_labels has negative labels \(minimum -3\)"):
        M.f1_at(a, neg)
    with pytest.raises(ValueError, match=r"\[0.5, 1\)"):
        M.average_precision(a, a, thresholds=[0.3, 0.5])
    with pytest.raises(ValueError, match=r"iou must lie in \[0.5, 1\)"):
        M.f1_at(a, a, iou=0.25)
    with pytest.raises(ValueError, match="same shape"):
        M.foreground_iou(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="2-D"):
        M.foreground_dice(np.zeros(9), np.zeros(9))
    with pytest.raises(TypeError, match="gt_labels must be an integer"):
        M.original_mdice(a, a.astype(np.float32))
    with pytest.raises(ValueError, match="at least one"):
        M.summarize([])


def disk_mask(shape, center, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def test_border_offset_finds_a_constant_offset_both_ways():
    dot = np.zeros((15, 15), np.uint8)
    dot[7, 7] = 1
    disk = disk_mask((15, 15), (7, 7), 2)  # 13 pixels
    # One pixel grown by a disk of radius 2 is that disk: IoU 1 at +2, exactly.
    grow = M.border_offset(dot, disk, max_radius=3)
    assert grow.offset == 2 and list(grow.radii) == [-3, -2, -1, 0, 1, 2, 3]
    assert grow.ious[3] == pytest.approx(1 / 13)  # as predicted: 1 of 13 pixels
    assert grow.ious[3] == pytest.approx(M.foreground_iou(dot, disk))
    assert grow.ious[5] == pytest.approx(1.0)
    assert grow.ious[4] == pytest.approx(5 / 13)  # radius 1: the 4-neighbourhood cross
    assert grow.ious[0] == grow.ious[1] == grow.ious[2] == pytest.approx(1e-6 / (13 + 1e-6))
    # And the other way: the disk shrunk by 2 is the dot.
    shrink = M.border_offset(disk, dot, max_radius=3)
    assert shrink.offset == -2 and shrink.ious[1] == pytest.approx(1.0)
    # Larger disks: a truth 3 px wider all round is found as +3, a narrower one as -3.
    small, large = disk_mask((60, 60), (30, 30), 8), disk_mask((60, 60), (30, 30), 11)
    assert M.border_offset(small, large).offset == 3
    assert M.border_offset(large, small).offset == -3
    assert M.border_offset(large, large).offset == 0


def test_border_offset_ties_edges_and_errors():
    # Nothing predicted, nothing true: every radius scores 1, the tie goes to 0.
    empty = np.zeros((8, 8), np.uint8)
    result = M.border_offset(empty, empty, max_radius=2)
    assert result.offset == 0 and np.allclose(result.ious, 1.0)
    # A nucleus cut by the image border is not shrunk from the border side.
    edge = np.zeros((10, 10), np.uint8)
    edge[0:4, 3:7] = 1
    eroded = M.border_offset(edge, edge, max_radius=1)
    assert eroded.ious[0] == pytest.approx(6 / 16)  # rows 0-2 (not 1-2), columns 4-5
    with pytest.raises(ValueError, match="max_radius must be a non-negative integer"):
        M.border_offset(edge, edge, max_radius=-1)
    with pytest.raises(ValueError, match="max_radius must be a non-negative integer"):
        M.border_offset(edge, edge, max_radius=1.5)
    with pytest.raises(ValueError, match="shape"):
        M.border_offset(edge, edge[:5])


def test_every_score_is_defined_and_in_range_on_random_label_images():
    # Random rectangles, overlapping or not, repeated labels, gaps, empty images, 1-pixel
    # images: every score of evaluate_image lies in [0, 1] and none raises.
    rng = np.random.default_rng(0)

    def random_labels(h, w):
        labels = np.zeros((h, w), np.int32)
        for _ in range(rng.integers(0, 5)):
            r0, c0 = rng.integers(0, h), rng.integers(0, w)
            r1, c1 = r0 + rng.integers(1, 15), c0 + rng.integers(1, 15)
            labels[r0:r1, c0:c1] = rng.integers(1, 8)
        return labels

    for _ in range(400):
        h, w = rng.integers(1, 40, 2)
        row = M.evaluate_image(random_labels(h, w), random_labels(h, w))
        for key in ("iou", "dice", "ap", "f1", "aji", "original_mdice", "object_dice"):
            assert 0.0 <= row[key] <= 1.0 + 1e-9, (key, row[key])
