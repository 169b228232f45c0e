"""The training loop, checkpoints, baselines and prediction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from scipy import ndimage as ndi

from s2l_core.augment import AugmentConfig
from s2l_core.baselines import RandomForestSegmenter
from s2l_core.checkpoint import load_checkpoint
from s2l_core.config import PROFILES, TrainConfig
from s2l_core.metrics import f1_at, foreground_iou
from s2l_core.predict import (
    FolderOutput,
    Preset,
    check_smooth,
    check_threshold,
    foreground_to_instances,
    labels_of,
    load_model,
    predict_folder,
)
from s2l_core.samples import TrainSample
from s2l_core.train import Trainer

TINY = dict(
    epochs=4, batch_size=2, samples_per_epoch=4, warmup_epochs=1, ema_every=1, ema_start=0,
    val_every=2, model={"base_channels": 8, "depth": 2}, augment=AugmentConfig(crop_size=64),
)  # fmt: skip


def _comparable(trainer):
    timing = [c for c in trainer.history_frame().columns if "seconds" in c or c == "crops_per_s"]
    return trainer.history_frame().drop(columns=timing)


def _trainer(samples, val=None, **overrides):
    config = TrainConfig(**{**TINY, **overrides})
    return Trainer(samples, config, val=val, device="cpu", verbose=False)


def test_resumed_run_equals_straight_run(synthetic_samples, tmp_path):
    train, val = synthetic_samples(3), synthetic_samples(1, offset=10)
    config = TrainConfig(**TINY)
    straight = Trainer(train, config, val=val, device="cpu", verbose=False)
    straight.fit(progress=False)

    first = Trainer(train, config, val=val, device="cpu", verbose=False)
    first.fit(2, checkpoint=tmp_path / "state.pt", progress=False)
    assert first.epoch == 2
    resumed = Trainer.resume(tmp_path / "state.pt", train, val=val, device="cpu", verbose=False)
    assert resumed.epoch == 2 and resumed.ema_updates == 2
    resumed.fit(progress=False)

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for image_id in straight.ema.ids:
        assert np.array_equal(straight.ema.get(image_id), resumed.ema.get(image_id))
    pd.testing.assert_frame_equal(_comparable(straight), _comparable(resumed))
    assert straight.history[-1]["pseudo_active"]  # the pseudo-label phase was reached


def test_scribble2label_learns_a_simple_problem(synthetic_samples):
    """From skeleton scribbles alone, pseudo-labels spread correctly over the images."""
    train = synthetic_samples(4, ratio=1.0)
    test = synthetic_samples(1, offset=20)[0]
    fast = dict(optimizer="adamw", lr_encoder=3e-3, lr_decoder=1e-2, batch_size=4)
    trainer = _trainer(train, epochs=50, samples_per_epoch=8, warmup_epochs=15, **fast)
    history = trainer.fit(progress=False)
    assert history["pce"].iloc[-3:].mean() < history["pce"].iloc[:3].mean() / 10
    last = history.dropna(subset=["pseudo_accuracy"]).iloc[-1]
    assert last["pseudo_coverage"] > 0.9 and last["pseudo_accuracy"] > 0.98
    assert history["pseudo_active"].iloc[-1] and history["pseudo_fraction"].iloc[-1] > 0.5
    prob = trainer.predict(test.image)
    # Small disks (radius 4-7 px): a one-pixel border error costs a third of the IoU.
    assert foreground_iou(prob > 0.5, test.labels > 0) > 0.6
    nuclei = foreground_to_instances(prob, method="components", min_size=4)
    assert f1_at(nuclei, test.labels) > 0.8  # nuclei found, one to one


def test_pce_baseline_never_uses_pseudo_labels(synthetic_samples):
    config = TrainConfig(**{**TINY, "use_pseudo": False, "epochs": 3})
    trainer = Trainer(synthetic_samples(2), config, device="cpu", verbose=False)
    history = trainer.fit(progress=False)
    assert not history["pseudo_active"].any()
    assert (history["pseudo"] == 0).all()
    assert not history["ema_updated"].any() and trainer.ema_updates == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"epochs": -1}, "epochs must be a whole number >= 0, got -1"),
        ({"epochs": 2.5}, "epochs must be a whole number >= 0, got 2.5"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
        ({"samples_per_epoch": 0}, "samples_per_epoch must be a whole number >= 1"),
        ({"warmup_epochs": -1}, "warmup_epochs must be a whole number >= 0"),
        ({"ema_every": 0}, "ema_every must be a whole number >= 1"),
        ({"ema_start": -1}, "ema_start must be a whole number >= 0"),
        ({"val_every": -1}, "val_every must be a whole number >= 0"),
        ({"t0": 0}, "t0 must be a whole number >= 1"),
        ({"t_mult": True}, "t_mult must be a whole number >= 1, got True"),
        ({"seed": -3}, "seed must be a whole number >= 0"),
        ({"tau": 0.4}, r"tau must lie in \(0.5, 1\], got 0.4"),
        ({"tau": "0.8"}, "tau must be a real number"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0 and <= 1, got 0.0"),
        ({"alpha": 1.5}, "alpha must be a finite number > 0 and <= 1"),
        ({"lam": -0.5}, "lam must be a finite number >= 0, got -0.5"),
        ({"lam": float("inf")}, "lam must be a finite number >= 0"),
        ({"lr_encoder": 0.0}, "lr_encoder must be a finite number > 0"),
        ({"lr_decoder": float("nan")}, "lr_decoder must be a finite number > 0"),
        ({"weight_decay": -1e-5}, "weight_decay must be a finite number >= 0"),
        ({"eta_min": "0"}, "eta_min must be a number, got '0'"),
        ({"ema_start_value": "one"}, "ema_start_value must be 'first' or 'zero'"),
    ],
)
def test_config_refuses_bad_values_when_made(bad, message):
    """Each bad value is refused when the configuration is made, not minutes into a run
    (tau after the first batch, ema_every after the first epoch), and named."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)
    with pytest.raises(ValueError, match=message):
        TrainConfig.profile("cpu", **bad)


def test_samples_refuse_labels_that_do_not_fit_the_image():
    from conftest import synthetic_nuclei

    image, labels = synthetic_nuclei(0)
    scribble = np.full(labels.shape, 250, np.uint8)
    for bad in (labels[:-8], labels.astype(np.float32)):
        with pytest.raises(ValueError, match=r"^a: labels must be an integer \(or boolean\)"):
            TrainSample.from_arrays("a", image, scribble, bad)
    assert TrainSample.from_arrays("a", image, scribble, labels > 0).labels.dtype == bool


def test_fit_refuses_bad_counts_before_training(synthetic_samples):
    trainer = _trainer(synthetic_samples(1), epochs=1)
    with pytest.raises(ValueError, match=r"epochs must be a whole number >= 0, got 2\.5"):
        trainer.fit(2.5, progress=False)  # used to train 2 epochs
    with pytest.raises(ValueError, match="checkpoint_every must be a whole number >= 1"):
        trainer.fit(checkpoint_every=0, progress=False)  # used to fail after an epoch
    assert trainer.epoch == 0 and trainer.history == []


def test_crops_must_fit_the_network(synthetic_samples):
    """The UNet of TINY (depth 2) takes sides that are multiples of 8."""
    crops = AugmentConfig(crop_size=60)
    with pytest.raises(ValueError, match=r"crop_size \(60\) must be a multiple .* 8 \(e.g. 64\)"):
        Trainer(synthetic_samples(1), TrainConfig(**{**TINY, "augment": crops}), device="cpu")


def test_config_takes_the_edges_of_its_ranges():
    edges = TrainConfig(
        epochs=0, warmup_epochs=0, ema_start=0, val_every=0, alpha=1.0, tau=1.0, lam=0.0,
        weight_decay=0.0, eta_min=0.0, seed=0, samples_per_epoch=np.int64(1),
    )  # fmt: skip
    assert type(edges.samples_per_epoch) is int  # a NumPy integer is stored as an int
    assert TrainConfig.from_dict(edges.to_dict()) == edges
    for name in PROFILES:
        assert TrainConfig.profile(name) == PROFILES[name]


def test_affinity_term_is_logged_and_changes_training(synthetic_samples):
    train = synthetic_samples(2)
    plain = _trainer(train, epochs=2)
    plain.fit(progress=False)
    smooth = _trainer(train, epochs=2, affinity=2.0, affinity_sigma=0.05)
    history = smooth.fit(progress=False)
    assert (plain.history_frame()["affinity"] == 0).all()
    assert (history["affinity"] > 0).all() and (history["affinity"] < 1).all()
    a, b = plain.model.state_dict(), smooth.model.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    for bad in ({"affinity": -1.0}, {"affinity": float("nan")}, {"affinity_sigma": 0.0}):
        with pytest.raises(ValueError, match="affinity"):
            TrainConfig(**bad)


def test_dice_term_is_logged_and_changes_training(synthetic_samples):
    train = synthetic_samples(2)
    plain = _trainer(train, epochs=2)
    plain.fit(progress=False)
    overlap = _trainer(train, epochs=2, dice=1.0)
    history = overlap.fit(progress=False)
    assert (plain.history_frame()["dice"] == 0).all()
    assert (history["dice"] > 0).all() and (history["dice"] < 1).all()
    a, b = plain.model.state_dict(), overlap.model.state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    for bad in ({"dice": -0.5}, {"dice": float("inf")}):
        with pytest.raises(ValueError, match="dice"):
            TrainConfig(**bad)


def test_dice_targets_are_scribbles_then_confident_pseudo_labels(synthetic_samples):
    from s2l_core.losses import dice_targets

    scribble = torch.tensor([[[1, 0, 250, 250, 250, 1]]])
    ema = torch.tensor([[[0.0, 1.0, 0.9, 0.1, 0.5, 0.0]]])
    valid = torch.tensor([[[True, True, True, True, True, False]]])
    merged = dice_targets(scribble, ema, valid, tau=0.8)
    # scribbles win over the EMA; unscribbled pixels get 1 above tau, 0 below 1 - tau,
    # nothing in between; invalid pixels nothing at all
    assert merged.tolist() == [[[1, 0, 1, 0, 250, 250]]]
    warmup = dice_targets(scribble, None, valid, tau=0.8)
    assert warmup.tolist() == [[[1, 0, 250, 250, 250, 250]]]


def test_frozen_head_reproduces_the_original_defect(synthetic_samples):
    frozen = _trainer(synthetic_samples(2), epochs=1, freeze_head=True)
    before = [p.clone() for p in frozen.model.head_parameters()]
    frozen.fit(progress=False)
    assert all(
        torch.equal(a, b) for a, b in zip(before, frozen.model.head_parameters(), strict=True)
    )
    trained = Trainer(
        synthetic_samples(2), TrainConfig(**{**TINY, "epochs": 1}), device="cpu", verbose=False
    )
    before = [p.clone() for p in trained.model.head_parameters()]
    trained.fit(progress=False)
    assert not all(
        torch.equal(a, b) for a, b in zip(before, trained.model.head_parameters(), strict=True)
    )


def test_model_selection_modes(synthetic_samples, tmp_path):
    train, val = synthetic_samples(2), synthetic_samples(1, offset=5)
    for select, how in [("last", "last epoch"), ("val_scribble", "val_scribble_loss"),
                        ("val_iou_full_masks", "val_iou_full_masks")]:  # fmt: skip
        trainer = Trainer(
            train, TrainConfig(**{**TINY, "select": select}), val=val, device="cpu", verbose=False
        )
        trainer.fit(progress=False)
        path = trainer.export(tmp_path / f"{select}.pt")
        state = load_checkpoint(path)
        assert state["selected"]["how"] == how
        assert state["kind"] == "model"
    with pytest.raises(ValueError, match="select must be one of"):
        TrainConfig(select="best")


def test_checkpoint_errors(synthetic_samples, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not a Scribble2Label checkpoint"):
        load_checkpoint(other)
    trainer = Trainer(
        synthetic_samples(2), TrainConfig(**{**TINY, "epochs": 1}), device="cpu", verbose=False
    )
    trainer.fit(checkpoint=tmp_path / "s.pt", progress=False)
    with pytest.raises(ValueError, match="trained on other images"):
        Trainer.resume(
            tmp_path / "s.pt", synthetic_samples(2, offset=3), device="cpu", verbose=False
        )
    trainer.export(tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        Trainer.resume(tmp_path / "model.pt", synthetic_samples(2), device="cpu", verbose=False)


def test_fine_tuning_starts_from_a_checkpoint(synthetic_samples, tmp_path):
    first = _trainer(synthetic_samples(2), epochs=2)
    first.fit(progress=False)
    path = first.export(tmp_path / "round1.pt")
    second = _trainer(synthetic_samples(2, offset=4), epochs=1)
    second.load_weights(path)
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    wider = _trainer(synthetic_samples(2), model={"base_channels": 12, "depth": 2})
    with pytest.raises(ValueError, match="holds a network"):
        wider.load_weights(path)


def test_profiles():
    assert TrainConfig.profile("full").batch_size == 30
    assert TrainConfig.profile("cpu", epochs=3).epochs == 3
    with pytest.raises(ValueError, match="unknown profile"):
        TrainConfig.profile("fast")
    cfg = TrainConfig.profile("smoke")
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------- instances


def _touching_disks():
    yy, xx = np.mgrid[:60, :80]
    a = (yy - 30) ** 2 + (xx - 28) ** 2 <= 12**2
    b = (yy - 30) ** 2 + (xx - 50) ** 2 <= 12**2
    return (a | b).astype(np.float32), a, b


def test_watershed_splits_touching_nuclei():
    prob, a, b = _touching_disks()
    assert foreground_to_instances(prob, method="components").max() == 1
    labels = foreground_to_instances(prob, method="watershed")
    assert labels.dtype == np.uint16 and labels.max() == 2
    for disk_mask in (a, b):
        _, counts = np.unique(labels[disk_mask], return_counts=True)
        assert counts.max() / disk_mask.sum() > 0.9  # each disk is mostly one label


def test_small_objects_are_removed():
    prob = np.zeros((30, 30), np.float32)
    prob[2:4, 2:4] = 1  # 4 px
    prob[10:20, 10:20] = 1  # 100 px
    labels = foreground_to_instances(prob, min_size=16, method="components")
    assert labels.max() == 1 and (labels > 0).sum() == 100
    every = foreground_to_instances(prob, min_size=1, method="components")
    assert every.dtype == np.uint16 and every.max() == 2 and (every > 0).sum() == 104
    prob[20:26, 20:26] = 1  # touches the 100 px square at a corner: the same object
    prob[2:4, 26:28] = 1  # a second 4 px speck
    for min_size, objects, area in ((1, 3, 144), (5, 1, 136)):
        labels = foreground_to_instances(prob, min_size=min_size, method="components")
        assert labels.max() == objects and (labels > 0).sum() == area
        assert set(np.unique(labels)) == set(range(objects + 1))  # numbered 1..n
    with pytest.raises(ValueError, match="method must be"):
        foreground_to_instances(prob, method="magic")


def test_labels_of_reads_the_presets_sizes_in_the_networks_pixels():
    """Nuclei of 12 pixels, found on an image magnified twice: the network saw them as 48
    pixels, over min_size 24, so they stay; at scale 1 they go. Shrunk to half, the
    network saw 100-pixel regions as 25: those stay, and regions of 80 (20 to it) go."""
    prob = np.zeros((40, 40), np.float32)
    prob[2:5, 2:6] = prob[20:23, 30:34] = 1.0  # 12 px each
    preset = Preset(min_peak=0.0, smooth=0.0, tta=False)
    assert labels_of(prob, preset).max() == 0
    assert labels_of(prob, preset, scale=2.0).max() == 2
    assert labels_of(prob, preset, "components", scale=2.0).max() == 2
    assert labels_of(prob, preset, None, scale=2.0).sum() == 24  # the mask keeps all anyway
    big = np.zeros((40, 40), np.float32)
    big[2:12, 2:12] = 1.0  # 100 px
    big[20:28, 20:30] = 1.0  # 80 px
    kept = labels_of(big, preset, scale=0.5)
    assert kept.max() == 1 and (kept > 0).sum() == 100
    assert labels_of(big, preset).max() == 2
    speck = big.copy()
    speck[35, 35] = 1.0  # one pixel: kept by min_size 1 at any scale
    assert labels_of(speck, preset.but(min_size=1), "components", scale=0.5).max() == 3
    # Two nuclei 7 pixels across, 5.5 apart, found on an image magnified four times: the
    # watershed at the network's pixels (28-pixel nuclei) splits them, at the image's not.
    yy, xx = np.mgrid[:30, :30]
    pair = np.zeros((30, 30), np.float32)
    for x in (10.0, 15.5):
        pair = np.maximum(pair, np.clip(3.5 - np.hypot(yy - 10, xx - x), 0, 1))
    split = labels_of(pair, preset, scale=4.0)
    assert split.max() == 2 and split.dtype == np.uint16 and split.shape == (30, 30)
    assert np.array_equal(split > 0, labels_of(pair, preset, None, scale=4.0) > 0)
    assert split[10, 8] != split[10, 17]
    assert foreground_to_instances(pair, split_depth=0.5, min_size=1).max() == 1
    with pytest.raises(ValueError, match="not 'auto'"):
        labels_of(prob, preset, scale="auto")
    with pytest.raises(ValueError, match="scale"):
        labels_of(prob, preset, scale=0.0)


@pytest.mark.parametrize("method", ["components", "watershed"])
def test_min_peak_drops_faint_regions_and_keeps_confident_ones_whole(method):
    """A confident nucleus (core 1.0 inside a 0.6 rim) and two faint regions (0.7 and
    0.85 everywhere): with min_peak 0.9 only the nucleus stays, rim included; without
    it all three do."""
    yy, xx = np.mgrid[:60, :90]
    prob = np.zeros((60, 90), np.float32)
    prob[(yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2] = 0.6  # rim of the confident nucleus
    prob[(yy - 20) ** 2 + (xx - 20) ** 2 <= 6**2] = 1.0  # its core
    prob[(yy - 20) ** 2 + (xx - 60) ** 2 <= 8**2] = 0.7  # faint blob
    prob[45:55, 30:45] = 0.85  # a faint region apart from the rest
    outer = (yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2
    every = foreground_to_instances(prob, method=method)
    assert every.max() == 3
    kept = foreground_to_instances(prob, method=method, min_peak=0.9)
    assert kept.max() == 1
    assert np.array_equal(kept > 0, outer)
    assert np.array_equal(foreground_to_instances(prob, method=method, min_peak=0.0), every)
    assert foreground_to_instances(prob, method=method, min_peak=1.0).max() == 0
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="min_peak must be a probability"):
            foreground_to_instances(prob, min_peak=bad)


def test_threshold_sets_the_foreground_and_is_checked():
    """A square of 0.9 inside a ring of 0.4 (a 10x10 square with a 2-pixel ring, 196
    pixels): the ring is foreground at 0.3 and not at 0.5."""
    prob = np.zeros((30, 30), np.float32)
    prob[5:19, 5:19] = 0.4
    prob[7:17, 7:17] = 0.9
    for threshold, area in ((0.3, 196), (0.5, 100), (0.95, 0)):
        labels = foreground_to_instances(prob, threshold=threshold, method="components")
        assert (labels > 0).sum() == area
    assert check_threshold(np.float32(0.25)) == 0.25
    for bad in (0, -1.0, float("nan"), float("inf"), "2"):  # NaN used to crash the process
        with pytest.raises(ValueError, match="split_depth must be a positive finite number"):
            foreground_to_instances(prob, split_depth=bad)
    for bad in (-1, 2.5, float("nan"), "16", True):  # NaN used to keep every object
        with pytest.raises(ValueError, match="min_size must be a whole number of pixels >= 0"):
            foreground_to_instances(prob, min_size=bad)
    assert foreground_to_instances(prob, min_size=np.int64(0)).max() == 1
    for bad in (0, 1, 1.5, -0.2, float("nan"), "0.5", True, None):
        with pytest.raises(ValueError, match="threshold must be a probability in"):
            foreground_to_instances(prob, threshold=bad)


def test_smooth_rounds_corners_drops_specks_and_tests_min_peak_on_the_raw_probability():
    """A 20x20 square of 1 and a one-pixel speck. Smoothed by a Gaussian of 1 pixel, the
    speck peaks at 0.399^2 = 0.16 and goes; a corner pixel of the square gets
    (0.399 + 0.601 / 2)^2 = 0.49 and goes; every other pixel of the square stays, and
    nothing outside it is added: 396 pixels."""
    prob = np.zeros((40, 40), np.float32)
    prob[10:30, 10:30] = 1.0
    prob[3, 3] = 1.0
    plain = foreground_to_instances(prob, method="components", min_size=0)
    assert plain.max() == 2 and (plain > 0).sum() == 401
    same = foreground_to_instances(prob, method="components", min_size=0, smooth=0)
    assert np.array_equal(same, plain)
    smoothed = foreground_to_instances(prob, method="components", min_size=0, smooth=1.0)
    square = np.zeros((40, 40), bool)
    square[10:30, 10:30] = True
    for y, x in ((10, 10), (10, 29), (29, 10), (29, 29)):
        square[y, x] = False
    assert np.array_equal(smoothed > 0, square)
    # A block of 0.9 with one pixel of 1.0: smoothed, it never exceeds 0.99, but the
    # hysteresis looks at the probability itself, so the block stays.
    block = np.zeros((30, 30), np.float32)
    block[8:22, 8:22] = 0.9
    block[15, 15] = 1.0
    assert ndi.gaussian_filter(block, 1.0).max() < 0.99
    kept = foreground_to_instances(block, method="components", smooth=1.0, min_peak=0.99)
    assert kept.max() == 1
    assert check_smooth(np.float32(0.75)) == 0.75 and check_smooth(0) == 0.0
    for bad in (-0.5, float("nan"), float("inf"), "1", True, None):
        with pytest.raises(ValueError, match="smooth must be a finite number of pixels >= 0"):
            foreground_to_instances(prob, smooth=bad)


# ----------------------------------------------------------------------------- baselines


def test_random_forest_baseline(synthetic_samples):
    train, test = synthetic_samples(3), synthetic_samples(1, offset=30)[0]
    rf = RandomForestSegmenter(n_estimators=20, seed=0).fit(
        [s.image for s in train], [s.scribble for s in train]
    )
    prob = rf.predict_proba(test.image)
    assert prob.shape == test.labels.shape
    assert foreground_iou(prob > 0.5, test.labels > 0) > 0.8
    with pytest.raises(ValueError, match="both foreground and background"):
        RandomForestSegmenter().fit(
            [train[0].image], [np.full(train[0].scribble.shape, 250, np.uint8)]
        )
    # A scribble of another size used to be read at the wrong pixels, silently.
    image, scribble = train[1].image, train[1].scribble
    cases = [
        ([train[0].image, image], [train[0].scribble, scribble[:-8, :-8]],
         r"^image 1: scribble image has shape \(88, 88\), expected \(96, 96\)"),
        ([image], [scribble, scribble], "1 images but 2 scribble images"),
        ([np.moveaxis(image, 0, -1)], [scribble], r"image 0: expected a normalised \(3, H, W\)"),
        ([image], [np.where(scribble == 1, 7, scribble)], "image 0: scribble image holds values"),
    ]  # fmt: skip
    for images, scribbles, message in cases:
        with pytest.raises(ValueError, match=message):
            RandomForestSegmenter(n_estimators=2).fit(images, scribbles)
    with pytest.raises(ValueError, match=r"predict_proba: expected a normalised \(3, H, W\)"):
        rf.predict_proba(np.moveaxis(test.image, 0, -1))
    for bad, message in (
        ({"n_estimators": 0}, "n_estimators must be a whole number >= 1, got 0"),
        ({"max_pixels_per_image": 0}, "max_pixels_per_image must be a whole number >= 1"),
        ({"max_depth": 2.5}, "max_depth must be a whole number >= 1"),
        ({"seed": -1}, "seed must be a whole number >= 0"),
        ({"sigma_min": 0.0}, "0 < sigma_min <= sigma_max and finite"),
        ({"sigma_min": 20.0}, "0 < sigma_min <= sigma_max and finite"),
        ({"sigma_max": float("nan")}, "0 < sigma_min <= sigma_max and finite"),
    ):
        with pytest.raises(ValueError, match=message):
            RandomForestSegmenter(**bad)
    assert RandomForestSegmenter(max_depth=None).classifier.max_depth is None


# ----------------------------------------------------------------------------- folders


@pytest.fixture
def tiny_checkpoint(synthetic_samples, tmp_path):
    trainer = Trainer(
        synthetic_samples(2), TrainConfig(**{**TINY, "epochs": 1}), device="cpu", verbose=False
    )
    trainer.fit(progress=False)
    return trainer.export(tmp_path / "model.pt")


def test_predict_folder_of_mixed_images(tiny_checkpoint, tmp_path):
    from conftest import synthetic_nuclei

    from s2l_core.files import read_image, read_json, write_image

    src = tmp_path / "in"
    rgb, _ = synthetic_nuclei(1, (70, 90))
    write_image(src / "grey8.png", rgb[..., 0])
    write_image(src / "rgb.png", rgb)
    write_image(src / "rgba.png", np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)]))
    write_image(src / "grey16.tif", rgb[..., 0].astype(np.uint16) * 250)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    written = predict_folder(tiny_checkpoint, src, out, progress=False, device="cpu")
    assert sorted(p.name for p in written) == ["grey16.tif", "grey8.png", "rgb.png", "rgba.png"]
    for path in written:
        labels = read_image(path)
        assert labels.shape == (70, 90) and np.issubdtype(labels.dtype, np.integer)
    assert read_json(out / "s2l_predict.json")["mode"] == "instance"
    with pytest.raises(ValueError, match="not empty"):
        predict_folder(tiny_checkpoint, src, out, progress=False, device="cpu")
    semantic = predict_folder(
        tiny_checkpoint, src, tmp_path / "sem", output=FolderOutput(mode="semantic"),
        progress=False, device="cpu",
    )  # fmt: skip
    assert set(np.unique(read_image(semantic[0]))) <= {0, 1}
    magnified = predict_folder(
        tiny_checkpoint, src, tmp_path / "auto", preset=Preset(scale="auto"), progress=False,
        device="cpu",
    )  # fmt: skip
    assert all(read_image(p).shape == (70, 90) for p in magnified)
    settings = read_json(tmp_path / "auto" / "s2l_predict.json")["preset"]
    assert settings["scale"] == "auto" and settings == Preset().to_dict()
    preset = Preset.of_checkpoint(tiny_checkpoint).but(scale=1.0, tta=False, min_peak=0)
    plain = predict_folder(
        tiny_checkpoint, src, tmp_path / "plain", preset=preset, progress=False, device="cpu"
    )
    settings = read_json(tmp_path / "plain" / "s2l_predict.json")["preset"]
    assert settings == Preset(scale=1.0, tta=False, min_peak=0.0).to_dict()
    assert len(plain) == 4
    # Settings given as a mapping change the checkpoint's preset; None keeps its setting.
    stored = Preset.of_checkpoint(tiny_checkpoint)
    changed = {"scale": 1.0, "tta": False, "min_peak": 0, "threshold": None}
    predict_folder(
        tiny_checkpoint, src, tmp_path / "map", preset=changed, progress=False, device="cpu"
    )
    settings = read_json(tmp_path / "map" / "s2l_predict.json")["preset"]
    assert settings == stored.but(scale=1.0, tta=False, min_peak=0.0).to_dict()
    assert settings["threshold"] == stored.threshold
    with pytest.raises(ValueError, match=r"unknown preset settings \['treshold'\]"):
        predict_folder(tiny_checkpoint, src, tmp_path / "bad", preset={"treshold": 0.5})
    assert not (tmp_path / "bad").exists()


def test_predict_folder_errors_leave_no_partial_output(tiny_checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        predict_folder(tiny_checkpoint, src, tmp_path / "out", progress=False)
    from s2l_core.files import write_image

    write_image(src / "a.png", np.zeros((40, 40), np.uint8))
    (src / "b.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"b\.png"):
        predict_folder(tiny_checkpoint, src, tmp_path / "out", progress=False, device="cpu")
    # No output folder; a.png's result is kept beside it for the next call.
    assert not (tmp_path / "out").exists()
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert kept.name.startswith(".out.unfinished.") and (kept / "a.png").is_file()
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        predict_folder(tmp_path / "missing.pt", src, tmp_path / "out2", progress=False)
    # A readable image of a kind the network does not take (two channels, first): named.
    (src / "b.png").unlink()
    predict_folder(tiny_checkpoint, src, tmp_path / "out", progress=False, device="cpu")
    assert (tmp_path / "out" / "a.png").is_file() and not kept.exists()
    tifffile.imwrite(src / "c.tif", np.zeros((2, 40, 40), np.uint16))
    with pytest.raises(ValueError, match=r"c\.tif: expected an image of shape .* --channel"):
        predict_folder(tiny_checkpoint, src, tmp_path / "out3", progress=False, device="cpu")
    assert not (tmp_path / "out3").exists()
    # Bad settings are refused by the preset and the output options, before any image
    # is read, and no image is blamed for them.
    for settings, message in (
        ({"scale": "x2"}, r"^scale must be a number from 0.0625 to 16 or 'auto', got 'x2'"),
        ({"min_peak": 1.5}, r"^min_peak must be a probability in \[0, 1\] or None"),
        ({"threshold": 1}, r"^threshold must be a probability in \(0, 1\), got 1"),
        ({"method": "blobs"}, r"^method must be 'watershed' or 'components'"),
        ({"min_size": -1}, r"^min_size must be a whole number of pixels >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            Preset.of_checkpoint(tiny_checkpoint).but(**settings)
    with pytest.raises(ValueError, match=r"^suffix must be '\.tif' or '\.png'.*got 'tif'"):
        FolderOutput(suffix="tif")
    with pytest.raises(ValueError, match=r"^mode must be 'instance' or 'semantic'"):
        FolderOutput(mode="labels")
    assert not (tmp_path / "out6").exists()


def test_loaded_model_predicts_like_the_trainer(synthetic_samples, tmp_path):
    samples = synthetic_samples(2)
    trainer = _trainer(samples, epochs=1)
    trainer.fit(progress=False)
    model, state = load_model(trainer.export(tmp_path / "m.pt"), "cpu")
    from s2l_core.infer import predict_foreground

    assert np.allclose(
        predict_foreground(model, samples[0].image), trainer.predict(samples[0].image), atol=1e-5
    )
    assert state["config"]["model"] == TINY["model"]


def test_compress_weights_by_hand():
    from s2l_core.checkpoint import compress_weights

    w = torch.tensor([[[[1.0, -0.25]]], [[[0.0, 0.0]]], [[[0.01, 0.04]]]])  # (3, 1, 1, 2)
    stored, scales = compress_weights({"w": w, "b": torch.ones(3), "n": torch.tensor(7)}, "int8")
    assert stored["w"].dtype == torch.int8 and stored["b"].dtype == torch.float16
    assert stored["n"].item() == 7 and set(scales) == {"w"}
    # Per output channel: the largest magnitude maps to 127, zeros stay exact.
    assert stored["w"][:, 0, 0, :].tolist() == [[127, -32], [0, 0], [32, 127]]
    assert torch.allclose(scales["w"], torch.tensor([1 / 127, 1e-12 / 127, 0.04 / 127]))
    with pytest.raises(ValueError, match="precision must be one of"):
        compress_weights({"w": w}, "int4")


def test_export_metadata_must_load_safely(synthetic_samples, tmp_path):
    trainer = _trainer(synthetic_samples(1), epochs=1)
    extra = {"minutes": np.float64(1.5), "n": np.int64(3), "tags": ("a", "b")}
    state = load_checkpoint(trainer.export(tmp_path / "m.pt", extra=extra))
    assert state["extra"] == {"minutes": 1.5, "n": 3, "tags": ["a", "b"]}
    with pytest.raises(TypeError, match=r"plain values.*Path"):
        trainer.export(tmp_path / "bad.pt", extra={"where": tmp_path})
    assert not (tmp_path / "bad.pt").exists()


@pytest.mark.parametrize("precision", ["float16", "int8"])
def test_smaller_checkpoints_load_as_float32_and_predict_alike(
    synthetic_samples, tmp_path, precision
):
    samples = synthetic_samples(2)
    trainer = _trainer(samples, epochs=1)
    trainer.fit(progress=False)
    full = trainer.export(tmp_path / "full.pt")
    small = trainer.export(tmp_path / "small.pt", precision=precision)
    assert small.stat().st_size < full.stat().st_size * (0.6 if precision == "float16" else 0.45)
    state = load_checkpoint(small)
    assert "scales" not in state and state["precision"] == precision
    reference = load_checkpoint(full)["model"]
    for name, tensor in state["model"].items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.allclose(tensor, reference[name], rtol=0.02, atol=1e-2), name
    model, _ = load_model(small, "cpu")
    prob = trainer.predict(samples[0].image)
    from s2l_core.infer import predict_foreground

    assert np.abs(predict_foreground(model, samples[0].image) - prob).max() < 0.05


@pytest.mark.slow
def test_smoke_training_on_real_images(prepared, scribble_set, tmp_path):
    from s2l_core.samples import load_samples

    train_ids = prepared.ids("fluorescence", "train")[:4]
    train = load_samples(prepared, train_ids, scribble_set, 0.3)
    val = load_samples(prepared, prepared.ids("fluorescence", "val")[:2], scribble_set, 0.3)
    assert train[0].image.dtype == np.float32 and train[0].image.shape[0] == 3
    trainer = Trainer(train, TrainConfig.profile("smoke"), val=val, device="cpu", verbose=False)
    history = trainer.fit(checkpoint=tmp_path / "state.pt", progress=False)
    assert len(history) == 3 and np.isfinite(history["loss"]).all()
    assert "val_iou_full_masks" in history and "val_scribble_loss" in history
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["train_ids"] == train_ids and state["epoch"] == 3
    full = load_samples(prepared, train_ids[:1], full_masks=True)
    assert np.isin(full[0].scribble, [0, 1]).all()
    assert np.array_equal(full[0].scribble == 1, prepared.labels(train_ids[0]) > 0)


# ----------------------------------------------------------------------------- bfloat16


def test_cpu_bf16_trains_in_bfloat16_only_where_the_cpu_has_it(
    synthetic_samples, monkeypatch, capsys
):
    """With ``cpu_bf16`` and a CPU that computes bfloat16 natively, the network's
    forward pass runs in bfloat16 (its logits come out so), training learns and the same
    seed gives the same run; on a CPU without it, training stays in float32 and says so."""
    import s2l_core.runtime as train_module  # where the CPU is asked

    train = synthetic_samples(3)
    seen = []
    monkeypatch.setattr(train_module, "cpu_bf16_native", lambda: True)
    runs = []
    for _ in range(2):
        trainer = _trainer(train, cpu_bf16=True, epochs=6)
        assert trainer.cpu_bf16
        trainer.model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        runs.append(trainer.fit(progress=False))
    assert torch.bfloat16 in seen
    first, second = runs
    assert np.isfinite(first["loss"]).all() and first["loss"].iloc[-1] < first["loss"].iloc[0]
    pd.testing.assert_series_equal(first["loss"], second["loss"])  # reproducible

    monkeypatch.setattr(train_module, "cpu_bf16_native", lambda: False)
    config = TrainConfig(**{**TINY, "cpu_bf16": True})
    fallback = Trainer(train, config, device="cpu", verbose=True)
    assert not fallback.cpu_bf16
    assert "no native bfloat16" in capsys.readouterr().out
    seen.clear()
    fallback.model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    fallback.fit(1, progress=False)
    assert seen and set(seen) == {torch.float32}


def test_the_gpu_path_of_crops_trains_as_the_cpu_path(synthetic_samples, tmp_path):
    """On a GPU the trainer makes each batch of crops in one batched resampling
    (``crop_source``); forced onto the CPU here, it draws the same crops from the same
    generator (to float rounding) and keeps the EMA maps it crops from current, also
    after a resume."""
    from s2l_core.augment import CropSource

    def batched(trainer):
        s = trainer.train_samples
        trainer.crop_source = CropSource([x.image for x in s], [x.scribble for x in s], "cpu")
        return trainer

    train = synthetic_samples(3)
    plain, fast = _trainer(train, epochs=2), batched(_trainer(train, epochs=2))
    plain.fit(progress=False)
    fast.fit(2, checkpoint=tmp_path / "state.pt", progress=False)
    assert fast.history[-1]["pseudo_active"]  # the crops carried EMA maps
    pd.testing.assert_frame_equal(_comparable(plain), _comparable(fast), atol=1e-3)
    for image_id in plain.ema.ids:
        assert np.allclose(plain.ema.get(image_id), fast.ema.get(image_id), atol=1e-2)
    # A resumed trainer crops from the resumed EMA maps, not from blank ones.
    resumed = batched(Trainer.resume(tmp_path / "state.pt", train, device="cpu", verbose=False))
    resumed.fit(3, progress=False)
    assert resumed.history[-1]["pseudo_active"]
    for k, sample in enumerate(train):
        copied = resumed.crop_source.emas[k]
        assert copied is not None and torch.equal(
            copied, torch.from_numpy(resumed.ema.get(sample.image_id, copy=True))
        )


def test_the_ema_pass_in_batches_equals_the_pass_one_by_one(synthetic_samples):
    """On a GPU the EMA pass predicts equal-sized images a batch at a time
    (``ema_batch``); here on the CPU, the maps equal those of the pass one by one."""
    from s2l_core.infer import predict_batch, predict_foreground

    train = synthetic_samples(3) + synthetic_samples(2, offset=10)
    one, batched = _trainer(train, epochs=1), _trainer(train, epochs=1)
    assert one.ema_batch == 1  # the CPU's default
    batched.ema_batch = 2
    for trainer in (one, batched):
        trainer.fit(progress=False)
    for image_id in one.ema.ids:
        assert np.allclose(one.ema.get(image_id), batched.ema.get(image_id), atol=1e-5)
    images = [s.image for s in train[:2]]
    alone = [predict_foreground(one.model, i, amp=False) for i in images]
    together = predict_batch(one.model, images, amp=False)
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(alone, together, strict=True))
    with pytest.raises(ValueError, match="one shape"):
        predict_batch(one.model, [images[0], images[0][:, :16]])
