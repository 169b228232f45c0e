"""The ``s2l`` command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from conftest import synthetic_nuclei

from s2l_core import predict as predict_module
from s2l_core.augment import normalize_image
from s2l_core.cli import main
from s2l_core.files import read_image, read_json, write_image
from s2l_core.infer import predict_foreground
from s2l_core.predict import Preset, load_model
from s2l_core.scribbles import synthesize_scribbles, to_napari


def test_cli_prepare(make_archive, tmp_path, capsys):
    archive = make_archive()
    args = ["prepare", "--source", str(archive), "--cache-dir", str(tmp_path), "--quiet"]
    status = main([*args, "--ratios", "0.5", "--workers", "1"])
    out = capsys.readouterr().out
    assert status == 0
    assert "prepared 3 images" in out and "scribbles at ratios (0.5,)" in out
    assert (tmp_path / "bbbc038" / "scribbles" / "seed0" / "r050" / "img00.png").is_file()


def test_cli_refuses_bad_ratios_before_any_work(tmp_path, capsys):
    """A ratio outside (0, 1] is an argument error, before any data is prepared."""
    for command in (
        ["prepare", "--cache-dir", str(tmp_path), "--ratios", "0.3", "0"],
        ["train", "--cache-dir", str(tmp_path), "--ratio", "1.5", "--out", "x.pt"],
        ["train", "--cache-dir", str(tmp_path), "--ratio", "nan", "--out", "x.pt"],
    ):
        with pytest.raises(SystemExit):
            main(command)
        assert "must lie in (0, 1]" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_reports_bad_source(tmp_path, capsys):
    status = main(["prepare", "--source", str(tmp_path / "nope.zip"), "--cache-dir", str(tmp_path)])
    assert status == 2
    assert "neither a URL" in capsys.readouterr().err


def _own_images(folder, n=3):
    images, scribbles = folder / "images", folder / "scribbles"
    for k in range(n):
        rgb, labels = synthetic_nuclei(k, (80, 100))
        write_image(images / f"cells_{k}.tif", rgb[..., 0].astype(np.uint16) * 200)  # 16-bit
        layer = to_napari(synthesize_scribbles(labels, 0.5, seed=k).scribble)
        if k < n - 1:  # the last image stays unannotated
            write_image(scribbles / f"cells_{k}.png", layer)
    return images, scribbles


def test_cli_train_and_predict_own_images(tmp_path, capsys, monkeypatch):
    images, scribbles = _own_images(tmp_path)
    out = tmp_path / "runs" / "mine.pt"
    args = ["train", "--images", str(images), "--scribbles", str(scribbles)]
    args += ["--scribble-format", "napari", "--profile", "smoke", "--out", str(out), "--quiet"]
    smooth = ["--affinity", "1.5", "--affinity-sigma", "0.05", "--dice", "0.5", "--cpu-bf16"]
    assert main([*args, "--epochs", "2", "--device", "cpu", *smooth]) == 0
    assert out.is_file() and out.with_name("mine.state.pt").is_file()
    config = load_model(out)[1]["config"]
    assert (config["affinity"], config["affinity_sigma"], config["dice"]) == (1.5, 0.05, 0.5)
    assert config["cpu_bf16"] is True
    assert main([*args, "--epochs", "3", "--device", "cpu", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    history = (tmp_path / "runs" / "mine.history.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # header and three epochs

    labels_dir = tmp_path / "labels"
    reads = []  # the checkpoint is read once: for the network and its preset
    read = predict_module.load_checkpoint
    monkeypatch.setattr(predict_module, "load_checkpoint", lambda p: reads.append(p) or read(p))
    assert (
        main(["predict", str(out), str(images), str(labels_dir), "--quiet", "--device", "cpu"]) == 0
    )
    assert reads == [str(out)]
    monkeypatch.undo()
    names = sorted(p.name for p in labels_dir.glob("cells_*"))
    assert names == ["cells_0.tif", "cells_1.tif", "cells_2.tif"]
    assert read_image(labels_dir / "cells_2.tif").shape == (80, 100)
    scaled = tmp_path / "scaled"
    assert main(["predict", str(out), str(images), str(scaled), "--quiet", "--scale", "1.5"]) == 0
    assert read_image(scaled / "cells_2.tif").shape == (80, 100)
    assert json.loads((scaled / "s2l_predict.json").read_text())["preset"]["scale"] == 1.5
    # The trained checkpoint carries the prediction preset, and flags replace its settings.
    assert load_model(out)[1]["extra"]["preset"] == Preset().to_dict()
    assert json.loads((labels_dir / "s2l_predict.json").read_text())["preset"] == (
        Preset().to_dict()
    )
    augmented = tmp_path / "augmented"
    args = ["predict", str(out), str(images), str(augmented), "--quiet", "--probability"]
    assert main([*args, "--scale", "1", "--device", "cpu"]) == 0  # TTA: the preset's
    assert json.loads((augmented / "s2l_predict.json").read_text())["preset"]["tta"] is True
    plain = tmp_path / "plain"
    assert main([*args[:3], str(plain), "--quiet", "--no-tta", "--scale", "1"]) == 0
    assert json.loads((plain / "s2l_predict.json").read_text())["preset"]["tta"] is False
    model = load_model(out, "cpu")[0]
    image = normalize_image(read_image(images / "cells_2.tif"))
    expected = predict_foreground(model, image, tta=True)
    assert np.abs(expected - predict_foreground(model, image)).max() > 1e-4
    np.testing.assert_allclose(read_image(augmented / "cells_2_prob.tif"), expected, atol=1e-6)
    for bad in ("0", "-2", "big", "inf"):
        with pytest.raises(SystemExit):
            main(["predict", str(out), str(images), str(tmp_path / "x"), "--scale", bad])
    assert "--scale" in capsys.readouterr().err
    peaked = tmp_path / "peaked"
    args = ["predict", str(out), str(images), str(peaked), "--quiet", "--mode", "semantic"]
    assert main([*args, "--min-peak", "1"]) == 0  # no probability exceeds 1: all dropped
    assert json.loads((peaked / "s2l_predict.json").read_text())["preset"]["min_peak"] == 1.0
    assert read_image(peaked / "cells_2.tif").max() == 0
    for bad in ("1.5", "-0.1", "high"):
        with pytest.raises(SystemExit):
            main([*args[:3], str(tmp_path / "y"), "--min-peak", bad])
    assert "--min-peak" in capsys.readouterr().err
    for bad in ("0", "1", "nan", "half"):
        with pytest.raises(SystemExit):
            main([*args[:3], str(tmp_path / "y"), "--threshold", bad])
    assert "--threshold" in capsys.readouterr().err
    for bad in ("-1", "nan", "inf", "wide"):
        with pytest.raises(SystemExit):
            main([*args[:3], str(tmp_path / "y"), "--smooth", bad])
    assert "--smooth" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    smoothed = tmp_path / "smoothed"
    assert main([*args[:3], str(smoothed), "--quiet", "--smooth", "1.5"]) == 0
    assert json.loads((smoothed / "s2l_predict.json").read_text())["preset"]["smooth"] == 1.5
    for bad in ("0", "-1", "inf", "deep"):
        with pytest.raises(SystemExit):
            main([*args[:3], str(tmp_path / "y"), "--split-depth", bad])
    assert "--split-depth" in capsys.readouterr().err
    split = tmp_path / "split"
    assert main([*args[:3], str(split), "--quiet", "--split-depth", "3"]) == 0
    assert json.loads((split / "s2l_predict.json").read_text())["preset"]["split_depth"] == 3.0


def test_cli_trains_and_predicts_one_channel_of_two(tmp_path, capsys):
    # Two-channel TIFFs, channels first as many microscopes write them: a useless
    # channel 0 (noise) and the nuclei in channel 1.
    images, scribbles = _own_images(tmp_path)
    two = tmp_path / "two"
    two.mkdir()
    rng = np.random.default_rng(0)
    for path in sorted(images.glob("*.tif")):
        nuclei = read_image(path)
        noise = rng.integers(0, 60000, nuclei.shape).astype(np.uint16)
        tifffile.imwrite(two / path.name, np.stack([noise, nuclei]))
    out = tmp_path / "two.pt"
    args = ["train", "--images", str(two), "--scribbles", str(scribbles), "--channel", "1"]
    args += ["--scribble-format", "napari", "--profile", "smoke", "--out", str(out)]
    assert main([*args, "--epochs", "1", "--device", "cpu", "--quiet"]) == 0
    assert load_model(out)[1]["extra"]["channel"] == 1
    # Predicting takes the checkpoint's channel unless told otherwise.
    labels_dir = tmp_path / "labels"
    assert main(["predict", str(out), str(two), str(labels_dir), "--quiet", "--device", "cpu"]) == 0
    assert read_json(labels_dir / "s2l_predict.json")["channel"] == 1
    assert read_image(labels_dir / "cells_0.tif").shape == (80, 100)
    status = main(["predict", str(out), str(two), str(tmp_path / "x"), "--channel", "2"])
    err = capsys.readouterr().err
    assert status == 2 and "cells_0.tif: channel 2 asked of an image with 2 channels" in err
    assert not (tmp_path / "x").exists()
    # The dataset's images are RGB: --channel is for one's own images.
    status = main(["train", "--channel", "0", "--out", str(tmp_path / "y.pt")])
    assert status == 2 and "--channel applies to your own images" in capsys.readouterr().err


def test_cli_errors_are_reported(tmp_path, capsys):
    images, scribbles = _own_images(tmp_path)
    status = main(["predict", str(tmp_path / "none.pt"), str(images), str(tmp_path / "o")])
    assert status == 2 and "checkpoint not found" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    status = main(["train", "--images", str(images), "--scribbles", str(empty), "--out", "x.pt"])
    assert status == 2 and "has a scribble file" in capsys.readouterr().err
    status = main(
        ["train", "--images", str(images), "--scribbles", str(scribbles), "--out", "x.pt"]
    )
    assert status == 2 and "values" in capsys.readouterr().err  # napari layers read as s2l
    # An image of a kind the network does not take is named, with its scribble file.
    tifffile.imwrite(images / "cells_0.tif", np.zeros((2, 80, 100), np.uint16))
    args = ["train", "--images", str(images), "--scribbles", str(scribbles)]
    status = main([*args, "--scribble-format", "napari", "--out", "x.pt"])
    err = capsys.readouterr().err
    assert status == 2 and "cells_0.tif (scribbles cells_0.png)" in err and "--channel" in err
    # A bad setting is refused before any image is read.
    status = main([*args, "--samples-per-epoch", "0", "--out", str(tmp_path / "z.pt")])
    assert status == 2
    assert "samples_per_epoch must be a whole number >= 1" in capsys.readouterr().err
    # No epoch, or an absurd number of them, is refused by the argument parser.
    for value in ("0", "-1", "1000000", "2.5"):
        with pytest.raises(SystemExit) as stop:
            main([*args, "--epochs", value, "--out", str(tmp_path / "z.pt")])
        assert stop.value.code == 2 and "--epochs" in capsys.readouterr().err
    assert not (tmp_path / "z.pt").exists()
