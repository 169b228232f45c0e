"""The human-in-the-loop rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synthetic_nuclei

from s2l_core.annotation import AnnotationLoop, Round, uncertainty
from s2l_core.augment import AugmentConfig
from s2l_core.checkpoint import load_checkpoint
from s2l_core.config import TrainConfig
from s2l_core.files import read_image
from s2l_core.infer import predict_foreground
from s2l_core.predict import MIN_AUTO_SCALE, Preset, load_model
from s2l_core.scribbles import UNLABELLED, read_scribble, synthesize_scribbles

SMALL = TrainConfig(
    epochs=2, batch_size=2, samples_per_epoch=4, warmup_epochs=1, ema_every=1, ema_start=0,
    model={"base_channels": 8, "depth": 2}, augment=AugmentConfig(crop_size=64),
)  # fmt: skip


def test_uncertainty_by_hand():
    assert np.allclose(uncertainty(np.array([0.0, 0.25, 0.5, 1.0])), [0, 0.5, 1, 0])


def test_two_rounds_keep_their_scribbles_and_continue(tmp_path):
    images, labels = {}, {}
    for k in range(3):
        images[f"img{k}"], labels[f"img{k}"] = synthetic_nuclei(k, (80, 96))
    loop = AnnotationLoop(images, tmp_path / "work", config=SMALL, device="cpu")
    scribbles = loop.blank_scribbles()
    scribbles["img0"] = synthesize_scribbles(labels["img0"], 0.3, seed=0).scribble
    first = loop.run_round(scribbles, epochs=2)
    assert first.number == 1 and set(first.probabilities) == {"img0", "img1", "img2"}
    assert first.uncertainty("img1").shape == (80, 96)
    scribbles["img1"] = synthesize_scribbles(labels["img1"], 0.5, seed=1).scribble
    second = loop.run_round(scribbles, epochs=2)
    assert second.folder.name == "round_02"
    # Round 1 kept what it trained on: img1 was still blank then.
    assert np.all(read_scribble(first.folder / "scribbles" / "img1.png") == UNLABELLED)
    assert np.array_equal(
        read_scribble(second.folder / "scribbles" / "img1.png"), scribbles["img1"]
    )
    w1 = load_checkpoint(first.checkpoint)["model"]
    w2 = load_checkpoint(second.checkpoint)["model"]
    assert not all(torch.equal(w1[k], w2[k]) for k in w1)
    written = loop.export_labels(tmp_path / "labels")
    assert sorted(p.name for p in written) == ["img0.tif", "img1.tif", "img2.tif"]
    assert read_image(written[0]).shape == (80, 96)
    # Exporting again replaces the earlier export's files, beside a file of the user's.
    (tmp_path / "labels" / "notes.txt").write_text("mine")
    (tmp_path / "labels" / "img0.tif").write_bytes(b"stale")
    assert loop.export_labels(tmp_path / "labels") == written
    assert read_image(written[0]).shape == (80, 96)
    assert (tmp_path / "labels" / "notes.txt").read_text() == "mine"
    # A file of an output's name that no export wrote is never replaced.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "img1.tif").write_bytes(b"my own image")
    with pytest.raises(ValueError, match=r"img1\.tif\. Only files listed in its s2l_predict"):
        loop.export_labels(mine)
    assert (mine / "img1.tif").read_bytes() == b"my own image"
    assert sorted(p.name for p in mine.iterdir()) == ["img1.tif"]


def test_loop_works_on_one_channel_of_multichannel_images(tmp_path):
    rgb, _ = synthetic_nuclei(0, (64, 80))
    two = np.stack([np.zeros((64, 80), np.uint8), rgb[..., 0]])  # channels first
    loop = AnnotationLoop({"a": two}, tmp_path, config=SMALL, device="cpu", channel=1)
    assert np.array_equal(loop.images["a"], rgb[..., 0])
    assert loop.normalized["a"].shape == (3, 64, 80)
    assert loop.blank_scribbles()["a"].shape == (64, 80)
    with pytest.raises(ValueError, match="image 'a': channel 2 asked of an image with 2"):
        AnnotationLoop({"a": two}, tmp_path, config=SMALL, channel=2)


def test_loop_errors(tmp_path):
    image, _ = synthetic_nuclei(0, (64, 64))
    loop = AnnotationLoop({"a": image}, tmp_path, config=SMALL, device="cpu")
    with pytest.raises(ValueError, match="some foreground and some background"):
        loop.run_round(loop.blank_scribbles())
    with pytest.raises(ValueError, match="unknown images"):
        loop.run_round({"b": np.zeros((64, 64), np.uint8)})
    with pytest.raises(ValueError, match=r"^image 'a': scribble image has shape \(10, 10\)"):
        loop.run_round({"a": np.zeros((10, 10), np.uint8)})
    with pytest.raises(ValueError, match="epochs must be a whole number >= 0"):
        loop.run_round({"a": np.where(image[..., 0] > 100, 1, 0).astype(np.uint8)}, epochs=-1)
    assert not (tmp_path / "round_01").exists()  # a refused round writes nothing
    with pytest.raises(RuntimeError, match="run a round"):
        loop.export_labels(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="folder not found"):
        AnnotationLoop(tmp_path / "nope", tmp_path)
    # Two files of one name would be one image to the loop: refused, naming both.
    folder = tmp_path / "twins"
    folder.mkdir()
    for name in ("a.png", "a.tif", "b.png"):
        (folder / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"share a name.*a\.png and a\.tif"):
        AnnotationLoop(folder, tmp_path)


def test_rounds_predict_with_the_loops_scale_and_tta(tmp_path):
    image, labels = synthetic_nuclei(0, (64, 80))
    scribbles = {"a": synthesize_scribbles(labels, 0.3, seed=0).scribble}
    plain = AnnotationLoop(
        {"a": image}, tmp_path / "plain", config=SMALL, device="cpu",
        preset=Preset(scale=1.0, tta=False),
    )  # fmt: skip
    assert plain.run_round(scribbles, epochs=1).scales == {"a": 1.0}
    assert load_model(plain.rounds[0].checkpoint)[1]["extra"]["preset"] == (
        Preset(scale=1.0, tta=False).to_dict()
    )
    loop = AnnotationLoop(
        {"a": image}, tmp_path / "work", config=SMALL, device="cpu",
        preset=Preset(scale=2, tta=True),
    )  # fmt: skip
    round_ = loop.run_round(scribbles, epochs=1)
    assert round_.scales == {"a": 2.0}
    model, _ = load_model(round_.checkpoint, "cpu")
    x = loop.normalized["a"]
    expected = predict_foreground(model, x, scale=2.0, tta=True)
    np.testing.assert_allclose(round_.probabilities["a"], expected, atol=1e-5)
    assert not np.allclose(expected, predict_foreground(model, x, scale=2.0), atol=1e-3)
    auto = AnnotationLoop({"a": image}, tmp_path / "auto", config=SMALL, device="cpu")
    assert auto.preset == Preset()  # the defaults: the automatic scale, with TTA
    assert MIN_AUTO_SCALE <= auto.run_round(scribbles, epochs=1).scales["a"] <= 2.0


def _three_squares() -> np.ndarray:
    """A confident square (peak 0.995), a faint one (0.9) and a tiny confident one (9 px)."""
    prob = np.zeros((40, 70), np.float32)
    prob[5:20, 5:20] = 0.995
    prob[5:20, 30:45] = 0.9
    prob[30:33, 60:63] = 0.995
    return prob


@pytest.mark.parametrize(
    ("min_peak", "min_size", "smooth", "expected"),
    [
        (0, 16, 0, [225, 225]),
        (0.99, 16, 0, [225]),
        (0.99, 4, 0, [225, 9]),
        (0, 1, 0, [225, 225, 9]),
        (0.99, 4, 1.0, [221, 5]),  # smoothed: the squares lose their corners
    ],
)
def test_export_labels_applies_min_peak_min_size_and_smooth(
    tmp_path, min_peak, min_size, smooth, expected
):
    loop = AnnotationLoop(
        {"a": np.zeros((40, 70), np.uint8)}, tmp_path, config=SMALL,
        preset=Preset(min_peak=min_peak, smooth=smooth),
    )  # fmt: skip
    loop.rounds.append(Round(1, tmp_path, tmp_path / "model.pt", {"a": _three_squares()}))
    (path,) = loop.export_labels(tmp_path / "labels", method="components", min_size=min_size)
    labels = read_image(path)
    assert sorted(np.bincount(labels.ravel())[1:], reverse=True) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scale": "big"}, "scale must be a number from 0.0625 to 16 or 'auto', got 'big'"),
        ({"scale": 0}, "scale must be a number from 0.0625 to 16 or 'auto', got 0"),
        ({"min_peak": 1.5}, r"min_peak must be a probability in \[0, 1\] or None, got 1.5"),
        ({"smooth": -1.0}, "smooth must be a finite number of pixels >= 0, got -1.0"),
    ],
)
def test_the_preset_refuses_bad_prediction_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preset(**kwargs)
