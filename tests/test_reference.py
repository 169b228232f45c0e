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
from s2l_core.predict import load_model
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
