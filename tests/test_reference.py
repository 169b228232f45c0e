"""The reference checkpoint shipped with the book still loads and works with this code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from s2l_core.augment import normalize_image
from s2l_core.infer import predict_foreground
from s2l_core.metrics import foreground_iou
from s2l_core.model import count_parameters
from s2l_core.predict import load_model, predict_probability
from s2l_core.train import TrainConfig

REFERENCE = Path(__file__).resolve().parents[1] / "book" / "reference"
CHECKPOINT = REFERENCE / "s2l_fluorescence_r030.pt"
METRICS = REFERENCE / "s2l_fluorescence_r030.json"


def test_reference_checkpoint_loads_with_current_code():
    assert CHECKPOINT.is_file() and METRICS.is_file(), "run tools/make_reference.py"
    assert CHECKPOINT.stat().st_size < 5_000_000  # int8 weights: a few MB
    model, state = load_model(CHECKPOINT, "cpu")
    assert state["precision"] == "int8"
    # load_checkpoint turns the stored int8/float16 tensors back into float32.
    stored = state["model"].values()
    assert all(v.dtype == torch.float32 for v in stored if v.is_floating_point())
    assert not any(v.dtype == torch.int8 for v in stored)
    info = json.loads(METRICS.read_text())
    assert info["checkpoint"] == CHECKPOINT.name
    assert "tools/make_reference.py" in info["command"]
    assert TrainConfig.from_dict(state["config"]) == TrainConfig.from_dict(info["config"])
    # Chapter 4's cpu run must reproduce it: a changed profile needs a new reference.
    assert TrainConfig.from_dict(state["config"]) == TrainConfig.profile("cpu")
    assert count_parameters(model) > 100_000
    prob = predict_foreground(model, np.zeros((3, 64, 80), np.float32))
    assert prob.shape == (64, 80) and np.isfinite(prob).all()


@pytest.mark.slow
def test_reference_checkpoint_segments_test_images(prepared):
    model, _ = load_model(CHECKPOINT, "cpu")
    info = json.loads(METRICS.read_text())
    ids = prepared.ids("fluorescence", "test")[:8]
    ious = [
        foreground_iou(
            predict_foreground(model, normalize_image(prepared.image(i))) > 0.5,
            prepared.labels(i) > 0,
        )
        for i in ids
    ]
    # The first test images score like the whole test split did when the file was made.
    assert np.mean(ious) > info["test_mean"]["iou"] - 0.1
    assert np.mean(ious) > 0.6


@pytest.mark.slow
def test_auto_scale_magnifies_small_real_nuclei_and_places_their_borders_better(prepared):
    model, _ = load_model(CHECKPOINT, "cpu")
    ids = prepared.ids("fluorescence", "test")

    def first(shape: tuple[int, int], n: int) -> list[str]:
        return [i for i in ids if prepared.image(i).shape[:2] == shape][:n]

    gains = []
    for image_id in first((256, 256), 8):  # nuclei about 14 pixels across
        image, truth = normalize_image(prepared.image(image_id)), prepared.labels(image_id) > 0
        plain, _ = predict_probability(model, image)
        magnified, scale = predict_probability(model, image, scale="auto")
        assert scale == 2.0  # 40 / 14 is held at the largest magnification
        gains.append(foreground_iou(magnified > 0.5, truth) - foreground_iou(plain > 0.5, truth))
    assert np.mean(gains) > 0.01 and min(gains) > -0.01
    for image_id in first((360, 360), 2):  # nuclei about 47 pixels across: left alone
        image = normalize_image(prepared.image(image_id))
        magnified, scale = predict_probability(model, image, scale="auto")
        assert scale == 1.0
        np.testing.assert_array_equal(magnified, predict_probability(model, image)[0])
