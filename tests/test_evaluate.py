"""Scoring a whole split in one way for the benchmark, the reference and the book."""

from __future__ import annotations

import numpy as np
import pytest

from s2l_core.evaluate import PLAIN, SCORES, dataset_images, score_images, summarize_by


def _truth(shape=(40, 60)):
    truth = np.zeros(shape, np.uint16)
    truth[5:15, 5:15] = 1
    truth[20:30, 30:40] = 2
    return truth


def test_perfect_and_empty_predictions_score_as_expected():
    truth = _truth()
    images = [
        ("perfect", np.zeros((3, 40, 60), np.float32), truth),
        ("empty", np.zeros((3, 40, 60), np.float32), truth),
    ]
    probs = {"perfect": (truth > 0).astype(np.float32), "empty": np.zeros((40, 60), np.float32)}
    calls = iter(["perfect", "empty"])
    labels = {}
    table = score_images(
        lambda image: probs[next(calls)],
        images,
        instances=("watershed", "components"),
        labels_out=labels,
    )
    assert list(table.columns) == ["image_id", "size", "instances", "predict_s", *SCORES]
    assert len(table) == 4 and set(table["size"]) == {"40x60"}
    perfect = table[table["image_id"] == "perfect"]
    assert np.allclose(perfect[list(SCORES)].to_numpy(), 1.0)
    empty = table[table["image_id"] == "empty"]
    assert np.allclose(empty[["iou", "ap", "f1", "aji"]].to_numpy(), 0.0, atol=1e-6)
    assert set(labels) == {"perfect", "empty"} and set(labels["perfect"]) == {
        "watershed",
        "components",
    }
    assert labels["perfect"]["components"].max() == 2

    by_instances = summarize_by(table, "instances")
    assert by_instances["images"].tolist() == [2, 2]
    assert np.isclose(by_instances.loc["watershed", "iou"], 0.5, atol=1e-6)
    overall = summarize_by(table)
    assert overall["images"].item() == 4


def test_min_size_drops_small_predicted_objects():
    """Truth: two 100-pixel squares. The prediction adds a 9-pixel speck: kept at
    min_size 9, it costs foreground IoU 200 / 209; dropped at 10, the IoU is 1."""
    truth = _truth()
    prob = (truth > 0).astype(np.float32)
    prob[34:37, 50:53] = 1.0
    image = [("a", np.zeros((3, 40, 60), np.float32), truth)]
    kept = score_images(lambda x: prob, image, preset=PLAIN.but(min_size=9))
    dropped = score_images(lambda x: prob, image, preset=PLAIN.but(min_size=10))
    assert kept["iou"].item() == pytest.approx(200 / 209)
    assert dropped["iou"].item() == pytest.approx(1.0)
    # Made at scale 3, the speck was 81 pixels to the network: min_size 10 keeps it.
    seen_larger = score_images(lambda x: (prob, 3.0), image, preset=PLAIN.but(min_size=10))
    assert seen_larger["iou"].item() == pytest.approx(200 / 209)


def test_errors_name_the_problem():
    truth = _truth()
    image = [("a", np.zeros((3, 40, 60), np.float32), truth)]
    with pytest.raises(ValueError, match=r"a: the prediction has shape \(40, 59\)"):
        score_images(lambda x: np.zeros((40, 59), np.float32), image)
    with pytest.raises(ValueError, match="at least one method"):
        score_images(lambda x: np.zeros((40, 60), np.float32), image, instances=())
    with pytest.raises(ValueError, match="no scores"):
        summarize_by(score_images(lambda x: x, []))


def test_dataset_images_are_normalised_real_images(prepared):
    ids = prepared.ids("fluorescence", "test")[:2]
    triples = list(dataset_images(prepared, ids))
    assert [t[0] for t in triples] == list(ids)
    for _, image, truth in triples:
        assert image.dtype == np.float32 and image.shape == (3, *truth.shape)
        assert truth.max() > 0
    table = score_images(lambda x: np.zeros(x.shape[1:], np.float32), iter(triples))
    assert (table["iou"] < 0.01).all()
