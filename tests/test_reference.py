"""The reference checkpoint shipped with the book still loads and works with this code."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from s2l_core.augment import normalize_image
from s2l_core.config import TrainConfig
from s2l_core.infer import predict_foreground
from s2l_core.metrics import foreground_iou
from s2l_core.model import count_parameters
from s2l_core.predict import Preset, load_model, predict_image, predict_probability

REFERENCE = Path(__file__).resolve().parents[1] / "book" / "reference"
TOOLS = REFERENCE.parents[1] / "tools"
CHECKPOINT = REFERENCE / "s2l_fluorescence_r030.pt"
METRICS = REFERENCE / "s2l_fluorescence_r030.json"
#: The settings each reference was trained with: the ``cpu`` profile, and for
#: histopathology epochs of 160 crops in bfloat16 (``tools/make_reference.py``).
TRAINED = {
    "fluorescence": {},
    "histopathology": {"epochs": 51, "samples_per_epoch": 160, "cpu_bf16": True},
}


@pytest.mark.parametrize("modality", list(TRAINED))
def test_reference_checkpoint_loads_with_current_code(modality):
    checkpoint = REFERENCE / f"s2l_{modality}_r030.pt"
    metrics = checkpoint.with_suffix(".json")
    assert checkpoint.is_file() and metrics.is_file(), "run tools/make_reference.py"
    assert checkpoint.stat().st_size < 4_000_000  # int8 weights: a few MB
    model, state = load_model(checkpoint, "cpu")
    assert state["precision"] == "int8"
    # load_checkpoint turns the stored int8/float16 tensors back into float32.
    stored = state["model"].values()
    assert all(v.dtype == torch.float32 for v in stored if v.is_floating_point())
    assert not any(v.dtype == torch.int8 for v in stored)
    info = json.loads(metrics.read_text())
    assert info["checkpoint"] == checkpoint.name
    assert "tools/make_reference.py" in info["command"]
    assert TrainConfig.from_dict(state["config"]) == TrainConfig.from_dict(info["config"])
    # Chapter 4's cpu run must reproduce the fluorescence one: a changed profile needs
    # a new reference.
    assert TrainConfig.from_dict(state["config"]) == TrainConfig.profile("cpu", **TRAINED[modality])
    # It carries the preset that s2l predict uses for it, and its metrics were made with it
    # (read as a checkpoint's: one stored before split_depth was a setting splits at 2).
    preset = Preset.for_training("s2l", modality)
    assert Preset.of_checkpoint(state) == preset
    assert Preset.of_checkpoint({"extra": {"preset": info["preset"]}}) == preset
    assert info["train_minutes"] < 30  # the cpu profile's budget on a 2-core CPU
    for figures in (info["test_mean"], info["test_mean_plain"], *info["shifts"].values()):
        assert 0 < figures["iou"] <= 1 and 0 <= figures["ap"] <= 1
    assert count_parameters(model) > 100_000
    prob = predict_foreground(model, np.zeros((3, 64, 80), np.float32))
    assert prob.shape == (64, 80) and np.isfinite(prob).all()


@pytest.fixture(scope="module")
def make_reference():
    spec = importlib.util.spec_from_file_location("make_reference", TOOLS / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("modality", list(TRAINED))
def test_reference_metrics_repeat_the_generalization_benchmark(make_reference, modality):
    """The metrics file holds the benchmark's current figures of the method: rerun
    ``tools/make_reference.py --generalization-only`` after its report changes."""
    info = json.loads((REFERENCE / f"s2l_{modality}_r030.json").read_text())
    figures = info["generalization"]
    assert figures == make_reference.generalization_figures(modality)
    assert figures["variant"] == "s2l" and figures["preset"] == "default"
    assert len(figures["seeds"]) >= 2  # a figure that decides a design choice: two seeds
    if modality == "fluorescence":  # acquisition groups: every one held out in turn
        assert set(figures["groups"]) == {"256x256", "360x360", "520x696", "other"}
        assert figures["held_out_mean"]["iou"] < figures["test_split"]["iou"]


def test_generalization_figures_of_missing_or_partial_results(make_reference, tmp_path):
    results = tmp_path / "generalization.json"
    assert make_reference.generalization_figures("fluorescence", results) is None  # no file
    row = {"variant": "s2l", "modality": "fluorescence", "preset": "default", "seed": 0}
    per_fold = [row | {"fold": "in-distribution", "iou": 0.9, "ap": 0.6},
                row | {"fold": "a", "iou": 0.8, "ap": 0.5},
                row | {"fold": "a", "seed": 1, "iou": 0.7, "ap": 0.4},
                row | {"fold": "in-distribution", "seed": 1, "iou": 0.8, "ap": 0.5}]  # fmt: skip
    results.write_text(json.dumps({"per_fold": per_fold}))
    figures = make_reference.generalization_figures("fluorescence", results)
    assert Path(figures["results"]) == results.resolve()  # outside the project: whole path
    assert figures["held_out_mean"] == {"iou": 0.75, "ap": 0.45}
    assert make_reference.generalization_figures("histopathology", results) is None
    results.write_text(json.dumps({"per_fold": per_fold[:3]}))  # seed 1 lacks its test split
    with pytest.raises(ValueError, match="not every seed has every fold"):
        make_reference.generalization_figures("fluorescence", results)


@pytest.mark.slow
@pytest.mark.parametrize("modality", list(TRAINED))
def test_reference_checkpoint_segments_test_images(prepared, modality):
    checkpoint = REFERENCE / f"s2l_{modality}_r030.pt"
    model, state = load_model(checkpoint, "cpu")
    info = json.loads(checkpoint.with_suffix(".json").read_text())
    ids = prepared.ids(modality, "test")[:6]
    plain, preset = [], []
    for i in ids:
        truth = prepared.labels(i) > 0
        prob = predict_foreground(model, normalize_image(prepared.image(i)))
        plain.append(foreground_iou(prob > 0.5, truth))
        _, labels = predict_image(model, prepared.image(i), preset=Preset.of_checkpoint(state))
        preset.append(foreground_iou(labels > 0, truth))
    # The first test images score like the whole test split did when the file was made.
    assert np.mean(plain) > info["test_mean_plain"]["iou"] - 0.1
    assert np.mean(preset) > info["test_mean"]["iou"] - 0.1
    assert np.mean(preset) > 0.6


@pytest.mark.slow
def test_auto_scale_magnifies_small_real_nuclei_and_shrinks_magnified_ones(prepared):
    model, _ = load_model(CHECKPOINT, "cpu")
    ids = prepared.ids("fluorescence", "test")

    def first(shape: tuple[int, int], n: int) -> list[str]:
        return [i for i in ids if prepared.image(i).shape[:2] == shape][:n]

    def iou(prob, truth):
        return foreground_iou(prob > 0.5, truth > 0)

    gains = []
    for image_id in first((256, 256), 8):  # nuclei about 14 pixels across
        image, truth = normalize_image(prepared.image(image_id)), prepared.labels(image_id)
        plain, _ = predict_probability(model, image)
        magnified, scale = predict_probability(model, image, scale="auto")
        assert scale >= 1.5  # nuclei of 8 to 20 pixels, magnified to 30 (at most 4x)
        gains.append(iou(magnified, truth) - iou(plain, truth))
    assert np.mean(gains) > 0.01 and min(gains) > -0.01
    # The same images magnified three times (nuclei about 42 pixels, some parts of them
    # looking like small nuclei at scale 1): auto shrinks them and gains.
    gains = []
    for image_id in first((256, 256), 4) + first((360, 360), 2):
        raw, truth = prepared.image(image_id), prepared.labels(image_id)
        big = torch.nn.functional.interpolate(
            torch.from_numpy(normalize_image(raw))[None], scale_factor=3, mode="bilinear"
        )[0].numpy()
        big_truth = np.kron(truth, np.ones((3, 3), truth.dtype))
        plain, _ = predict_probability(model, big)
        shrunk, scale = predict_probability(model, big, scale="auto")
        assert scale < 0.9
        gains.append(iou(shrunk, big_truth) - iou(plain, big_truth))
    assert np.mean(gains) > 0.01 and min(gains) > -0.02
    # Shrunk to a third (nuclei of about 5 pixels, labels by nearest neighbour): auto
    # magnifies them at least three times, and the labels keep nuclei that min_size 24
    # would remove at the image's own pixels.
    preset = Preset.of_checkpoint(CHECKPOINT).but(tta=False)
    gains = []
    for image_id in first((256, 256), 6):
        raw, truth = prepared.image(image_id), prepared.labels(image_id)
        x = torch.from_numpy(raw[..., :3].transpose(2, 0, 1).astype(np.float32))[None]
        small = torch.nn.functional.interpolate(x, size=(85, 85), mode="bilinear",
                                                antialias=True)  # fmt: skip
        small = small[0].numpy().transpose(1, 2, 0).round().astype(np.uint8)
        small_truth = truth[1::3, 1::3][:85, :85]
        prob, scale = preset.probability(model, normalize_image(small))
        assert scale >= 3.0
        plain, _ = predict_probability(model, normalize_image(small))
        kept = preset.labels(prob, scale)
        assert kept.max() > preset.labels(prob, 1.0).max()  # small nuclei kept
        gains.append(iou(prob, small_truth) - iou(plain, small_truth))
    assert np.mean(gains) > 0.05
