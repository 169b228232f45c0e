"""Normalisation, joint augmentation and whole-image inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from s2l_core.augment import AugmentConfig, normalize_image, random_crops, select_channel
from s2l_core.infer import predict_foreground
from s2l_core.model import UNet
from s2l_core.scribbles import UNLABELLED


def test_normalize_kinds_of_image():
    grey16 = np.linspace(0, 60000, 64 * 48).reshape(64, 48).astype(np.uint16)
    out = normalize_image(grey16)
    assert out.shape == (3, 64, 48) and out.dtype == np.float32
    assert np.allclose(out[0], out[2])
    assert out.min() >= -0.5 and out.max() <= 1.5
    assert np.isclose(np.percentile(out[0], 50), 0.5, atol=0.02)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 0] = np.arange(12)
    rgba[..., 3] = 255
    assert normalize_image(rgba).shape == (3, 10, 12)
    assert np.all(np.isfinite(normalize_image(np.zeros((5, 5), np.uint8))))  # flat image
    with pytest.raises(ValueError, match="expected an image of shape"):
        normalize_image(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="the image is empty"):
        normalize_image(np.zeros((0, 7), np.uint8))


def test_select_channel_last_first_and_errors():
    a, b = np.zeros((20, 30), np.uint16), np.arange(600, dtype=np.uint16).reshape(20, 30)
    last, first = np.dstack([a, b]), np.stack([a, b])  # (20, 30, 2) and (2, 20, 30)
    assert np.array_equal(select_channel(last, 1), b)
    assert np.array_equal(select_channel(first, 1), b)
    assert np.array_equal(select_channel(first, 0), a)
    assert select_channel(b, 0) is not None and np.array_equal(select_channel(b, 0), b)
    assert select_channel(last, None) is last  # no channel: the image as it is
    rgb = np.dstack([a, b, a + 1])
    assert np.array_equal(select_channel(rgb, 2), a + 1)  # RGB is channels-last too
    for image, channel, message in [
        (first, 2, "channel 2 asked of an image with 2 channels"),
        (b, 1, "channel 1 asked of a one-channel image"),
        (first, -1, "non-negative integer"),
        (first, True, "non-negative integer"),
        (first, 1.0, "non-negative integer"),
        (np.zeros((20, 30, 40)), 0, "cannot tell the channel axis"),
    ]:
        with pytest.raises(ValueError, match=message):
            select_channel(image, channel)


def test_normalize_sets_nan_and_infinite_pixels_to_background():
    image = np.linspace(0, 1000, 20 * 30, dtype=np.float32).reshape(20, 30)
    image[0, :10] = np.nan  # padding of a registered image
    image[0, 10:] = np.inf
    image[0, 29] = -np.inf
    out = normalize_image(image)
    assert np.all(np.isfinite(out))
    # The finite rows are scaled exactly as if the first row were not there …
    assert np.array_equal(out[:, 1:], normalize_image(image[1:]))
    # … and the non-finite pixels take the low percentile: 0.
    assert np.all(out[:, 0] == 0)
    with pytest.raises(ValueError, match="no finite value"):
        normalize_image(np.full((4, 4), np.nan, np.float32))


def _position_image(h, w):
    image = np.zeros((3, h, w), np.float32)
    image[0] = np.arange(h)[:, None]
    image[1] = np.arange(w)[None, :]
    return image


def test_plain_crop_takes_pixels_as_they_are():
    h, w = 80, 90
    image = _position_image(h, w)
    scribble = np.full((h, w), UNLABELLED, np.uint8)
    scribble[10:70:7, 5:80:3] = 1
    ema = np.random.default_rng(0).random((h, w)).astype(np.float32)
    cfg = AugmentConfig(crop_size=32)
    crops = random_crops([image], [scribble], [ema], np.random.default_rng(1), cfg, augment=False)
    y0, x0 = int(crops["image"][0, 0, 0, 0]), int(crops["image"][0, 1, 0, 0])
    assert np.array_equal(crops["image"][0, 0].numpy(), image[0, y0 : y0 + 32, x0 : x0 + 32])
    assert np.array_equal(crops["scribble"][0].numpy(), scribble[y0 : y0 + 32, x0 : x0 + 32])
    assert np.array_equal(crops["ema"][0].numpy(), ema[y0 : y0 + 32, x0 : x0 + 32])
    assert crops["valid"].all()


def test_augmentation_moves_image_scribble_and_ema_together():
    h, w = 120, 140
    pattern = np.zeros((h, w), bool)
    pattern[20:60, 30:100] = True
    pattern[80:110, 10:50] = True
    image = np.repeat(pattern[None].astype(np.float32), 3, axis=0)
    scribble = pattern.astype(np.uint8)  # 1 inside the blocks, 0 outside
    ema = pattern.astype(np.float32)
    cfg = AugmentConfig(crop_size=64, p_zoom=1.0, p_rotate=1.0, p_intensity=0.0)
    rng = np.random.default_rng(3)
    for _ in range(10):
        c = random_crops([image], [scribble], [ema], rng, cfg)
        valid = c["valid"][0]
        fg = (c["scribble"][0] == 1) & valid
        bg = (c["scribble"][0] == 0) & valid
        assert (c["image"][0, 0][fg] > 0.5).float().mean() > 0.97
        assert (c["image"][0, 0][bg] < 0.5).float().mean() > 0.97
        assert (c["ema"][0][fg] > 0.5).float().mean() > 0.97
        assert torch.all(c["scribble"][0][~valid] == UNLABELLED)
        assert torch.all(c["ema"][0][~valid] == 0)


def test_padding_is_unlabelled_never_background():
    image = np.ones((3, 40, 30), np.float32)
    scribble = np.zeros((40, 30), np.uint8)  # all background
    cfg = AugmentConfig(crop_size=64)
    c = random_crops([image], [scribble], [None], np.random.default_rng(0), cfg, augment=False)
    valid = c["valid"][0]
    assert valid.sum() == 40 * 30
    assert torch.all(c["scribble"][0][valid] == 0)
    assert torch.all(c["scribble"][0][~valid] == UNLABELLED)


def test_crops_are_seeded():
    image = _position_image(100, 100)
    scribble = np.full((100, 100), UNLABELLED, np.uint8)
    cfg = AugmentConfig(crop_size=48)
    a = random_crops([image] * 3, [scribble] * 3, [None] * 3, np.random.default_rng(7), cfg)
    b = random_crops([image] * 3, [scribble] * 3, [None] * 3, np.random.default_rng(7), cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_illumination_field_is_smooth_bounded_and_off_by_default():
    image = np.zeros((3, 80, 80), np.float32)
    scribble = np.full((80, 80), UNLABELLED, np.uint8)
    scribble[10:20, 10:20] = 1
    plain = AugmentConfig(crop_size=64, p_zoom=0, p_rotate=0, flips=False, p_intensity=0)
    lit = AugmentConfig(
        crop_size=64, p_zoom=0, p_rotate=0, flips=False, p_intensity=0,
        illumination=(0.3, 0.5), p_illumination=1.0,
    )  # fmt: skip
    a = random_crops([image] * 4, [scribble] * 4, [None] * 4, np.random.default_rng(5), plain)
    b = random_crops([image] * 4, [scribble] * 4, [None] * 4, np.random.default_rng(5), lit)
    # Off by default: a black image stays black, and the crops are cut at the same places.
    assert torch.all(a["image"] == 0)
    assert torch.equal(a["scribble"], b["scribble"]) and torch.equal(a["valid"], b["valid"])
    for field in b["image"]:
        assert torch.equal(field[0], field[1]) and torch.equal(field[0], field[2])
        # A field scaled to [0, 1] times an amplitude in [0.3, 0.5]: min 0, max in range.
        assert abs(field.min().item()) < 1e-6 and 0.3 - 1e-5 <= field.max().item() <= 0.5
        steps = torch.cat([field[0].diff(dim=0).abs().flatten(), field[0].diff(dim=1).abs()
                           .flatten()])  # fmt: skip
        assert steps.max() < 0.1  # smooth: no jump between neighbouring pixels
    assert AugmentConfig.from_dict(lit.to_dict()) == lit
    older = plain.to_dict()
    del older["illumination"], older["p_illumination"]
    assert AugmentConfig.from_dict(older) == plain


def test_gamma_bends_intensities_between_the_crops_extremes_and_is_off_by_default():
    ramp = np.tile(np.linspace(0.2, 1.0, 80, dtype=np.float32), (3, 80, 1))  # 0.2 … 1 along x
    scribble = np.full((80, 80), UNLABELLED, np.uint8)
    fixed = dict(crop_size=80, p_zoom=0, p_rotate=0, flips=False, p_intensity=0)
    plain = AugmentConfig(**fixed)  # crops the whole ramp, turned by a multiple of 90°

    def crop(cfg, seed):
        return random_crops([ramp], [scribble], [None], np.random.default_rng(seed), cfg)["image"][
            0
        ]

    assert torch.equal(
        crop(plain, 2).flatten().sort().values, torch.from_numpy(ramp).flatten().sort().values
    )
    # By hand: lo 0.2, hi 1.0, so x -> 0.2 + 0.8 * ((x - 0.2) / 0.8) ** 2 (the same turn).
    a, b = crop(plain, 2), crop(AugmentConfig(**fixed, gamma=(2.0, 2.0), p_gamma=1.0), 2)
    assert torch.allclose(b, 0.2 + 0.8 * ((a - 0.2) / 0.8) ** 2, atol=1e-6)
    assert b.min() == pytest.approx(0.2) and b.max() == pytest.approx(1.0)  # extremes stay
    # A range draws a gamma per crop, within it and on both sides of 1.
    wide = AugmentConfig(**fixed, gamma=(0.5, 2.0), p_gamma=1.0)
    lo_g, hi_g = [], []
    for seed in range(40):
        x, y = (crop(plain, seed) - 0.2) / 0.8, (crop(wide, seed) - 0.2) / 0.8
        inner = (x > 0.05) & (x < 0.95)
        g = torch.log(y[inner]) / torch.log(x[inner])  # the gamma that was applied
        assert g.max() - g.min() < 1e-3  # one gamma for the whole crop
        assert 0.5 - 1e-3 <= g.mean() <= 2.0 + 1e-3
        (lo_g if g.mean() < 1 else hi_g).append(g.mean())
    assert lo_g and hi_g
    assert AugmentConfig.from_dict(wide.to_dict()) == wide
    older = plain.to_dict()
    del older["gamma"], older["p_gamma"]
    assert AugmentConfig.from_dict(older) == plain
    with pytest.raises(ValueError, match="gamma must be a range"):
        AugmentConfig(gamma=(2.0, 0.5))
    for bad in [(0.0, 1.0), 2.0, (0.5, 1.0, 2.0), ("a", "b")]:
        with pytest.raises(ValueError, match="gamma must be a range"):
            AugmentConfig(gamma=bad)
    assert AugmentConfig(gamma=[1, 2]).gamma == (1.0, 2.0)  # lists and ints are accepted


def test_blur_and_noise_change_the_image_only_and_are_off_by_default():
    """A bright 20x20 square: a blur of sigma 1.5 keeps its total brightness and softens
    its edge; noise of sigma 0.1 adds a field of that spread, the same in the three
    (grey) channels; neither moves the scribbles, and neither draws a number when off."""
    image = np.zeros((3, 64, 64), np.float32)
    image[:, 22:42, 22:42] = 1.0
    scribble = np.full((64, 64), UNLABELLED, np.uint8)
    scribble[30:34, 30:34] = 1
    fixed = dict(crop_size=64, p_zoom=0, p_rotate=0, flips=False, p_intensity=0)
    plain, blurred = AugmentConfig(**fixed), AugmentConfig(**fixed, blur=(1.5, 1.5), p_blur=1)
    noisy = AugmentConfig(**fixed, noise=(0.1, 0.1), p_noise=1)

    def crop(cfg, seed=3):
        return random_crops([image], [scribble], [None], np.random.default_rng(seed), cfg)

    a, b, c = crop(plain), crop(blurred), crop(noisy)
    assert torch.equal(a["scribble"], b["scribble"]) and torch.equal(a["scribble"], c["scribble"])
    # A plain crop of the whole image, turned by a multiple of 90 degrees: 400 bright pixels.
    assert a["image"][0, 0].sum() == pytest.approx(400.0)
    assert b["image"][0, 0].sum() == pytest.approx(400.0, rel=1e-4)  # edges replicate 0
    edge = b["image"][0, 0][a["image"][0, 0] > 0].min()
    assert 0.4 < edge < 0.8  # a corner pixel keeps a part of its light
    added = c["image"][0] - a["image"][0]
    assert torch.equal(added[0], added[1]) and torch.equal(added[0], added[2])
    assert added[0].std().item() == pytest.approx(0.1, rel=0.1)
    # Off (the defaults): the random stream is untouched, so the crops are the same.
    rng = np.random.default_rng(3)
    random_crops([image], [scribble], [None], rng, plain)
    later = rng.random()
    rng = np.random.default_rng(3)
    random_crops([image], [scribble], [None], rng, AugmentConfig(**fixed, p_blur=1, p_noise=1))
    assert rng.random() == later
    assert AugmentConfig.from_dict(blurred.to_dict()) == blurred
    older = plain.to_dict()
    for key in ("blur", "p_blur", "noise", "p_noise"):
        del older[key]
    assert AugmentConfig.from_dict(older) == plain


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"crop_size": 0}, "crop_size must be a whole number of pixels >= 1, got 0"),
        ({"crop_size": 64.0}, "crop_size must be a whole number"),
        ({"zoom": (1.6, 0.6)}, r"zoom must be a finite range \(low, high\) with 0 < low"),
        ({"zoom": (0.0, 1.5)}, "zoom must be a finite range"),
        ({"zoom": (0.5, float("inf"))}, "zoom must be a finite range"),
        ({"zoom": 1.0}, "zoom must be a finite range"),
        ({"illumination": (0.5, -0.2)}, r"illumination must be a finite range \(low, high\)"),
        ({"illumination": (float("nan"), 0.1)}, "illumination must be a finite range"),
        ({"brightness": -0.1}, "brightness must be a finite number >= 0"),
        ({"brightness": float("inf")}, "brightness must be a finite number >= 0"),
        ({"contrast": 1.0}, r"contrast must be a finite number in \[0, 1\)"),
        ({"blur": (-1.0, 1.0)}, r"blur must be a finite range \(low, high\) with 0 <= low"),
        ({"noise": (0.2, 0.1)}, "noise must be a finite range"),
        ({"p_blur": 2.0}, "p_blur is a probability"),
    ],
)
def test_augment_config_refuses_bad_ranges(bad, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**bad)


def test_normalize_refuses_percentiles_out_of_order():
    image = np.arange(100, dtype=np.uint8).reshape(10, 10)
    for low, high in ((99.0, 1.0), (50.0, 50.0), (-1.0, 99.8), (1.0, 101.0), (float("nan"), 99)):
        with pytest.raises(ValueError, match="low and high must be percentiles"):
            normalize_image(image, low=low, high=high)
    x = normalize_image(image, low=0, high=100)
    assert x.min() == 0.0 and x.max() == 1.0


def test_augment_config_takes_lists_and_numpy_numbers():
    config = AugmentConfig(crop_size=np.int64(64), zoom=[1, 2], illumination=[-0.2, 0.5])
    assert type(config.crop_size) is int and config.zoom == (1.0, 2.0)
    assert config.illumination == (-0.2, 0.5)
    assert AugmentConfig.from_dict(config.to_dict()) == config
    assert AugmentConfig(zoom=(1, 1), brightness=0, contrast=0).zoom == (1.0, 1.0)


@pytest.mark.parametrize("shape", [(70, 45), (32, 32), (130, 97)])
def test_whole_image_prediction_keeps_the_size(shape):
    torch.manual_seed(0)
    model = UNet(base_channels=8, depth=2)
    image = np.random.default_rng(0).random((3, *shape)).astype(np.float32)
    prob = predict_foreground(model, image)
    assert prob.shape == shape and prob.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1))
    assert model.training  # the mode is restored


def test_tiled_prediction_matches_whole():
    torch.manual_seed(0)
    model = UNet(base_channels=8, depth=2).eval()
    image = np.random.default_rng(1).random((3, 150, 200)).astype(np.float32)
    whole = predict_foreground(model, image, tile=4096)
    tiled = predict_foreground(model, image, tile=96, overlap=32)
    assert np.abs(whole - tiled).max() < 1e-3
    # A tile that keeps no centre (100 - 2 * 64 < 0) is refused, not left empty.
    for tile, overlap in ((100, 64), (96, 48), (96, -1), (96.0, 32), (True, 0)):
        with pytest.raises(ValueError, match="tile"):
            predict_foreground(model, image, tile=tile, overlap=overlap)


@pytest.mark.parametrize("name", ["p_zoom", "p_rotate", "p_intensity", "p_illumination", "p_gamma"])
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_probabilities_outside_0_1_are_refused_by_name(name, bad):
    with pytest.raises(ValueError, match=f"{name} is a probability"):
        AugmentConfig(**{name: bad})
    assert getattr(AugmentConfig(**{name: 0}), name) == 0  # the ends are allowed
    assert getattr(AugmentConfig(**{name: 1.0}), name) == 1.0
