"""Prediction at another scale: predict_foreground(scale=) and the automatic scale."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from conftest import BrightNet
from torch import nn

import s2l_core.predict as predict_module
from s2l_core.infer import (
    DIHEDRAL,
    autocast_context,
    dihedral,
    predict_dihedral,
    predict_foreground,
    predict_rescaled,
    predict_tiled,
    undo_dihedral,
)
from s2l_core.model import UNet
from s2l_core.predict import (
    Preset,
    auto_scale,
    check_scale,
    labels_of,
    object_diameter,
    predict_image,
    predict_probability,
)

#: Prediction with no magnification, TTA, hysteresis or smoothing: the network as it is.
PLAIN = Preset(scale=1.0, tta=False, min_peak=0.0, smooth=0.0, min_size=16)


def _block(h: int = 32, w: int = 32) -> np.ndarray:
    image = np.zeros((3, h, w), np.float32)
    image[:, 8:24, 8:20] = 1.0
    return image


@pytest.mark.parametrize("scale", [2.0, 1.5, 0.5])
def test_scaled_prediction_comes_back_at_the_images_size(scale):
    model = BrightNet()
    image = _block()
    prob = predict_foreground(model, image, scale=scale)
    assert prob.shape == (32, 32) and prob.dtype == np.float32
    assert np.all((prob >= 0) & (prob <= 1))
    side = round(32 * scale)
    assert model.seen == [(side + (-side) % 4, side + (-side) % 4)]
    # a block aligned to even pixels survives the round trip exactly
    np.testing.assert_array_equal(prob > 0.5, image[0] > 0.5)


@pytest.mark.parametrize("scale", [1.3, 1.7, 1.9])
def test_magnified_prediction_stays_a_probability(scale):
    """Shrinking a saturated 0/1 map back with antialiasing can step past 1 by a rounding
    (1 + 1.2e-7 in float32); the EMA store refuses such values, so they are clipped."""
    model = BrightNet()
    image = (np.random.default_rng(0).random((3, 100, 120)) > 0.3).astype(np.float32) * 100
    prob = predict_foreground(model, image, scale=scale)
    assert prob.max() == 1.0 and prob.min() >= 0.0


def test_scale_rounds_each_side_and_one_is_the_plain_prediction():
    model = BrightNet()
    image = _block(30, 45)
    predict_foreground(model, image, scale=1.5)
    assert model.seen == [(48, 68)]  # 45 and 67.5 -> 68, padded to multiples of 4
    torch.manual_seed(0)
    net = UNet(base_channels=8, depth=2).eval()
    noise = np.random.default_rng(0).random((3, 40, 56)).astype(np.float32)
    assert np.array_equal(predict_foreground(net, noise, scale=1), predict_foreground(net, noise))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2", 0.01])
def test_bad_scale_is_refused(bad):
    with pytest.raises(ValueError, match="scale"):
        predict_foreground(BrightNet(), _block(), scale=bad)


def test_check_scale_takes_auto_and_positive_numbers():
    assert check_scale("auto") == "auto"
    assert check_scale(2) == 2.0 and isinstance(check_scale(2), float)
    assert check_scale(np.float32(0.5)) == 0.5
    assert check_scale(16) == 16.0 and check_scale(1 / 16) == 0.0625
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2", "Auto", None, 1e9, 16.5, 0.06):
        with pytest.raises(ValueError, match=r"scale must be a number from 0\.0625 to 16 or"):
            check_scale(bad)


# --------------------------------------------------------------------------- auto scale


def _disc(radius: float, shape: tuple[int, int] = (128, 128)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = shape[0] / 2, shape[1] / 2
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2).astype(np.float32)


def test_object_diameter_by_hand():
    labels = np.zeros((40, 40), np.int32)
    labels[0:10, 0:10] = 1  # area 100
    labels[20:24, 20:29] = 2  # area 36
    labels[30:35, 30:35] = 5  # area 25; labels 3 and 4 are absent and do not count
    assert object_diameter(labels) == pytest.approx(2 * np.sqrt(36 / np.pi))
    assert np.isnan(object_diameter(np.zeros((5, 5), np.uint16)))
    with pytest.raises(ValueError, match="integer"):
        object_diameter(np.zeros((5, 5), np.float32))
    with pytest.raises(ValueError, match="negative"):
        object_diameter(-np.ones((5, 5), np.int32))


@pytest.mark.parametrize(
    ("radius", "expected"),
    # tiny (held at 4x), small (to 30), middle (left as it is: 20 to 30 pixels), large
    # (shrunk), very large (held at 1/4), none
    [(3.0, 4.0), (5.0, 3.0), (12.5, 1.0), (30.0, 30 / 60), (70.0, 0.25), (0.0, 1.0)],
)
def test_auto_scale_brings_nuclei_to_the_diameter_both_ways(radius, expected):
    prob = _disc(radius, (160, 160))
    # the measured diameter of a digital disc is within a pixel of 2 r
    assert auto_scale(prob) == pytest.approx(expected, rel=0.05)


def test_auto_scale_settings_and_errors():
    prob = _disc(5.0)  # about 10 pixels across
    assert auto_scale(prob, max_scale=2.5) == 2.5  # 30 / 10 = 3, held at 2.5
    assert auto_scale(prob, diameter=20.0) == pytest.approx(2.0, rel=0.05)
    assert auto_scale(prob, diameter=10.5) == 1.0  # within a tenth of 1: left as it is
    assert auto_scale(prob, diameter=12.0) == pytest.approx(1.2, rel=0.05)
    assert auto_scale(prob, magnify_below=8.0) == 1.0  # 10 pixels: not magnified
    assert auto_scale(_disc(11.0), magnify_below=25.0) == pytest.approx(30 / 22, rel=0.05)
    assert auto_scale(prob, max_scale=1.0) == 1.0
    large = _disc(20.0)  # 40 pixels across
    assert auto_scale(large) == pytest.approx(0.75, rel=0.05)
    assert auto_scale(large, min_scale=1.0) == 1.0
    # A look at a smaller scale that finds the nuclei at least twice as large, and 15 to
    # 60 pixels across as the network saw them there, decides; others do not.
    assert auto_scale(prob, looks={0.5: large}) == pytest.approx(0.75, rel=0.05)  # 20 px
    assert auto_scale(prob, looks={0.25: large}) == pytest.approx(3.0, rel=0.05)  # 10 px
    assert auto_scale(large, looks={0.5: prob}) == pytest.approx(0.75, rel=0.05)
    assert auto_scale(_disc(8.0), looks={0.5: _disc(10.0)}) == pytest.approx(30 / 16, rel=0.05)
    huge = _disc(38.0, (100, 100))  # 76 px: found at a quarter (19 px), not at a half
    looks = {0.5: _disc(12.0, (100, 100)), 0.25: huge}
    assert auto_scale(_disc(5.0, (100, 100)), looks=looks) == pytest.approx(30 / 76, rel=0.05)
    assert auto_scale(np.zeros_like(prob), looks={0.5: large}) == 1.0  # nothing at scale 1
    # Nuclei of 10 pixels (measured at scale 1) and a look that finds objects of 100
    # pixels at a quarter (25 to the network: nuclei it knows) or of 280 at a half (140
    # to the network: a clump of small nuclei merged, which does not count).
    ten = _disc(5.0, (300, 300))
    assert auto_scale(ten, looks={0.25: _disc(50.0, (300, 300))}) == pytest.approx(0.3, rel=0.05)
    assert auto_scale(ten, looks={0.5: _disc(140.0, (300, 300))}) == pytest.approx(3.0, rel=0.05)
    for kwargs in (
        {"diameter": 0.0}, {"diameter": float("nan")}, {"max_scale": 0.5}, {"min_scale": 0.0},
        {"min_scale": 1.5}, {"looks": {0.5: np.zeros((3, 3))}}, {"looks": {1.5: prob}},
    ):  # fmt: skip
        with pytest.raises(ValueError, match=r"diameter|max_scale|min_scale|look"):
            auto_scale(prob, **kwargs)


def test_predict_probability_auto_looks_at_smaller_scales_then_predicts_at_its_choice(
    monkeypatch,
):
    small = np.repeat(_disc(5.0, (64, 64))[None], 3, axis=0)  # 10 pixels: magnified to 30
    model = BrightNet()
    prob, used = predict_probability(model, small, scale="auto")
    assert used == pytest.approx(3.0, rel=0.05) and prob.shape == (64, 64)
    # plain, the looks at a half and a quarter, final (64 * 2.95 = 189, padded to 192)
    assert model.seen == [(64, 64), (32, 32), (16, 16), (192, 192)]
    np.testing.assert_array_equal(prob > 0.5, small[0] > 0.5)
    middle = np.repeat(_disc(14.0, (64, 64))[None], 3, axis=0)  # 28 pixels: near enough
    model = BrightNet()
    prob, used = predict_probability(model, middle, scale="auto")
    assert used == 1.0 and model.seen == [(64, 64), (32, 32), (16, 16)]
    large = np.repeat(_disc(25.0, (64, 64))[None], 3, axis=0)  # 50 pixels: shrunk to 30
    model = BrightNet()
    prob, used = predict_probability(model, large, scale="auto")
    assert used == pytest.approx(0.6, rel=0.05) and prob.shape == (64, 64)
    # plain, half, quarter, final: 64 * 0.6 = 38 pixels, padded to the network's 4
    assert model.seen == [(64, 64), (32, 32), (16, 16), (40, 40)]
    mask, truth = prob > 0.5, large[0] > 0.5  # resampled twice: the border may move a pixel
    assert (mask & truth).sum() / (mask | truth).sum() > 0.97
    # No look that would leave under 16 pixels a side: a 40-pixel image is looked at half.
    model = BrightNet()
    predict_probability(model, large[:, 12:52, 12:52], scale="auto")
    assert model.seen[:2] == [(40, 40), (20, 20)] and (12, 12) not in model.seen
    # Magnified at most to MAX_AUTO_PIXELS: 96 x 96 allows 1.5 times a 64 x 64 image.
    monkeypatch.setattr(predict_module, "MAX_AUTO_PIXELS", 96 * 96)
    assert predict_probability(BrightNet(), small, scale="auto")[1] == pytest.approx(1.5)
    assert predict_probability(BrightNet(), large, scale=1.5)[1] == 1.5
    with pytest.raises(ValueError, match="'auto'"):
        predict_probability(BrightNet(), large, scale="big")
    model = BrightNet()
    with pytest.raises(ValueError, match="threshold must be a probability"):
        predict_probability(model, large, scale=1.0, threshold=0.0)
    assert model.seen == []  # refused before any pass


def test_predict_image_keeps_the_size_at_any_scale():
    image = (np.repeat(_disc(5.0, (50, 70))[..., None], 3, axis=2) * 255).astype(np.uint8)
    for scale in (1.0, 1.5, "auto"):
        prob, labels = predict_image(BrightNet(), image, scale=scale)
        assert prob.shape == labels.shape == (50, 70)
        assert labels.max() == 1


def test_semantic_mask_with_min_peak_keeps_confident_regions_and_their_holes():
    """A bright block (probability 0.99995) with a dark hole, and a faint block (0.88):
    min_peak 0.99 keeps the bright block only, hole and all; without it both stay."""
    image = np.zeros((40, 60), np.float32)
    image[5:25, 5:25] = 1.0
    image[12:16, 12:16] = 0.0  # a hole in the bright block
    image[5:25, 35:55] = 0.6  # faint: 20 * (0.6 - 0.5) = 2 -> sigmoid 0.88
    bright = np.zeros((40, 60), bool)
    bright[5:25, 5:25] = True
    bright[12:16, 12:16] = False
    _, every = predict_image(BrightNet(), image, preset=PLAIN, instances=None)
    _, kept = predict_image(BrightNet(), image, preset=PLAIN, instances=None, min_peak=0.99)
    assert kept.dtype == np.uint8
    assert np.array_equal(kept > 0, bright)
    assert np.array_equal(every > 0, bright | (image == 0.6))
    _, labels = predict_image(
        BrightNet(), image, preset=PLAIN, min_peak=0.99, instances="components"
    )
    assert labels.max() == 1 and not labels[5:25, 35:55].any()


def test_smooth_applies_to_labels_and_the_semantic_mask_not_to_the_probability():
    """A bright 15x15 block and a bright one-pixel speck: smoothed by a Gaussian of 1
    pixel, the speck and the block's four corners go from the mask and the labels; the
    probability returned is the network's own."""
    image = np.zeros((30, 30), np.float32)
    image[5:20, 5:20] = 1.0
    image[25, 25] = 1.0
    prob, mask = predict_image(BrightNet(), image, preset=PLAIN, instances=None)
    smooth_prob, smooth_mask = predict_image(
        BrightNet(), image, preset=PLAIN, instances=None, smooth=1.0
    )
    np.testing.assert_array_equal(prob, smooth_prob)
    assert mask.sum() == 15 * 15 + 1 and mask[25, 25]
    assert smooth_mask.sum() == 15 * 15 - 4 and not smooth_mask[25, 25]
    assert not smooth_mask[5, 5] and smooth_mask[5, 6]
    _, labels = predict_image(
        BrightNet(), image, preset=PLAIN, instances="components", min_size=0, smooth=1.0
    )
    assert np.array_equal(labels > 0, smooth_mask > 0)
    with pytest.raises(ValueError, match="smooth must be"):
        predict_image(BrightNet(), image, smooth=-1.0)


def test_cpu_bf16_prediction_is_a_float32_probability_close_to_float32():
    """bfloat16 autocast on the CPU changes the network's arithmetic, not the result's
    type or range, and moves probabilities by little (8 bits of mantissa)."""
    torch.manual_seed(0)
    model = UNet(base_channels=8, depth=2).eval()
    image = np.random.default_rng(0).random((3, 40, 52), dtype=np.float32)
    plain = predict_foreground(model, image)
    half = predict_foreground(model, image, cpu_bf16=True)
    assert half.dtype == np.float32 and half.shape == (40, 52)
    assert 0.0 <= half.min() and half.max() <= 1.0
    assert not np.array_equal(half, plain)  # bfloat16 did run
    assert np.abs(half - plain).max() < 0.05
    x, w = torch.ones(1, 1, 4, 4), torch.ones(1, 1, 3, 3)
    with autocast_context(torch.device("cpu"), cpu_bf16=True):
        assert torch.nn.functional.conv2d(x, w).dtype == torch.bfloat16
    with autocast_context(torch.device("cpu")):  # amp is for CUDA: float32 here
        assert torch.nn.functional.conv2d(x, w).dtype == torch.float32


# --------------------------------------------------------------------------- test-time augmentation


def test_dihedral_gives_eight_different_views_each_undone_exactly():
    array = np.arange(2 * 3 * 5).reshape(2, 3, 5)
    views = [dihedral(array, turns, mirrored) for turns, mirrored in DIHEDRAL]
    assert len({v.tobytes() + bytes(v.shape) for v in views}) == 8
    assert sum(v.shape == (2, 5, 3) for v in views) == 4  # odd turns swap the sides
    for (turns, mirrored), view in zip(DIHEDRAL, views, strict=True):
        np.testing.assert_array_equal(undo_dihedral(view, turns, mirrored), array)
    # by hand: a quarter turn counter-clockwise puts the last column on top
    np.testing.assert_array_equal(dihedral(np.array([[1, 2], [3, 4]]), 1, False), [[2, 4], [1, 3]])
    np.testing.assert_array_equal(dihedral(np.array([[1, 2], [3, 4]]), 0, True), [[2, 1], [4, 3]])


def test_tta_of_a_pixelwise_network_is_the_plain_prediction():
    """A network that looks at each pixel alone sees every view alike, so each view turned
    back must land exactly on the plain prediction: any mistake in undoing a view moves
    the off-centre block of this non-square image."""
    model = BrightNet()
    image = _block(28, 44)
    image[:, 2:5, 30:41] = 1.0
    plain = predict_foreground(model, image)
    model.seen.clear()
    averaged = predict_foreground(model, image, tta=True)
    assert averaged.shape == (28, 44) and averaged.dtype == np.float32
    np.testing.assert_allclose(averaged, plain, atol=1e-6)
    assert sorted(model.seen) == [(28, 44)] * 4 + [(44, 28)] * 4


class _Marker(nn.Module):
    """Foreground at one pixel of whatever it is shown: row 0, column 1."""

    size_multiple = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = torch.full_like(x[:, :1], -30.0)
        fg[..., 0, 1] = 30.0
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def test_tta_averages_the_eight_views():
    """The marker pixel, seen through the eight views of a 6x6 image, comes back as the
    eight pixels of its orbit under the square's symmetries, each with 1/8."""
    prob = predict_foreground(_Marker(), np.zeros((3, 6, 6), np.float32), tta=True)
    orbit = [(0, 1), (1, 0), (0, 4), (1, 5), (5, 1), (4, 0), (5, 4), (4, 5)]
    expected = np.zeros((6, 6))
    for y, x in orbit:
        expected[y, x] = 1 / 8
    np.testing.assert_allclose(prob, expected, atol=1e-6)


def test_tta_prediction_turns_with_the_image():
    """Averaged over all eight views, any network's prediction of a turned or mirrored
    image is the turned or mirrored prediction (sides a multiple of the network's, so
    that no padding breaks the symmetry)."""
    torch.manual_seed(0)
    net = UNet(base_channels=8, depth=2).eval()
    image = np.random.default_rng(1).random((3, 32, 48), dtype=np.float32)
    base = predict_foreground(net, image, tta=True)
    assert np.abs(base - predict_foreground(net, image)).max() > 1e-3  # TTA did change it
    for turns, mirrored in DIHEDRAL[1:]:
        view = np.ascontiguousarray(dihedral(image, turns, mirrored))
        turned = predict_foreground(net, view, tta=True)
        np.testing.assert_allclose(turned, dihedral(base, turns, mirrored), atol=1e-5)


def test_tta_with_scale_and_auto():
    model = BrightNet()
    predict_foreground(model, _block(30, 45), scale=1.5, tta=True)
    assert sorted(model.seen) == [(48, 68)] * 4 + [(68, 48)] * 4
    small = np.repeat(_disc(5.0, (64, 64))[None], 3, axis=0)
    model = BrightNet()
    prob, used = predict_probability(model, small, scale="auto", tta=True)
    looks = [(64, 64), (32, 32), (16, 16)]  # measured once, plainly
    assert used == pytest.approx(3.0, rel=0.05) and model.seen == looks + [(192, 192)] * 8
    np.testing.assert_array_equal(prob > 0.5, small[0] > 0.5)
    middle = np.repeat(_disc(14.0, (64, 64))[None], 3, axis=0)
    model = BrightNet()
    prob, used = predict_probability(model, middle, scale="auto", tta=True)
    assert used == 1.0 and model.seen == looks + [(64, 64)] * 7  # the plain pass is a view
    np.testing.assert_array_equal(prob, predict_foreground(BrightNet(), middle, tta=True))


def test_tta_reuses_a_given_identity_view_and_checks_it():
    torch.manual_seed(0)
    net = UNet(base_channels=8, depth=2).eval()
    image = np.random.default_rng(1).random((3, 40, 56)).astype(np.float32)
    plain = predict_foreground(net, image)
    np.testing.assert_array_equal(
        predict_dihedral(partial(predict_tiled, net), image, identity=plain),
        predict_foreground(net, image, tta=True),
    )
    model = BrightNet()
    predict_dihedral(partial(predict_tiled, model), image, identity=np.zeros((40, 56), np.float32))
    assert len(model.seen) == 7
    with pytest.raises(ValueError, match=r"identity has shape \(40, 55\)"):
        predict_dihedral(partial(predict_tiled, BrightNet()), image, identity=plain[:, :55])


def test_images_are_magnified_bicubically_and_shrunk_bilinearly():
    """What the network is given: an image magnified by bicubic interpolation (a step
    overshoots on both sides, steeper than bilinear), one shrunk by antialiased
    bilinear (a weighted mean of the pixels it covers); the probability comes back at
    the image's size."""
    image = np.zeros((3, 12, 12), np.float32)
    image[:, :, 6:] = 1.0  # a vertical step
    seen = []

    def network(x):
        seen.append(x)
        return np.full(x.shape[-2:], 0.5, np.float32)

    assert predict_rescaled(network, image, 4.0).shape == (12, 12)
    assert seen[-1].shape == (3, 48, 48)
    up = seen[-1][0, 0]
    assert up.min() < 0 and up.max() > 1  # the bicubic overshoot
    linear = torch.nn.functional.interpolate(torch.from_numpy(image)[None], scale_factor=4,
                                             mode="bilinear")[0, 0, 0].numpy()  # fmt: skip
    assert np.diff(up).max() > 1.1 * np.diff(linear).max()  # a steeper step
    predict_rescaled(network, image, 4.0, magnify="bilinear")  # for comparison
    np.testing.assert_allclose(seen[-1][0, 0], linear, atol=1e-6)
    with pytest.raises(ValueError, match="magnify must be 'bicubic' or 'bilinear'"):
        predict_rescaled(network, image, 4.0, magnify="nearest")
    predict_rescaled(network, image, 0.5)
    assert seen[-1].shape == (3, 6, 6)
    # Each pixel the mean of the four nearest, weighted 1, 3, 3, 1 (no overshoot).
    np.testing.assert_allclose(seen[-1][0, 0], [0, 0, 0.125, 0.875, 1, 1], atol=1e-6)


def test_the_pieces_compose_into_predict_foreground():
    """Rescaling around test-time augmentation around one pass: predict_foreground."""
    torch.manual_seed(0)
    net = UNet(base_channels=8, depth=2).eval()
    image = np.random.default_rng(2).random((3, 48, 40)).astype(np.float32)
    plain = partial(predict_tiled, net, tile=32, overlap=8)
    composed = predict_rescaled(partial(predict_dihedral, plain), image, 1.5)
    np.testing.assert_array_equal(
        composed, predict_foreground(net, image, tile=32, overlap=8, scale=1.5, tta=True)
    )
    assert composed.shape == (48, 40)


def test_preset_defaults_checks_and_checkpoint_round_trip():
    preset = Preset()
    assert (preset.scale, preset.tta, preset.min_peak, preset.min_size) == ("auto", True, 0.99, 24)
    assert (preset.threshold, preset.split_depth) == (0.6, 1.0)
    assert Preset.from_dict(preset.to_dict()) == preset
    assert Preset.from_dict({"tta": False}) == Preset(tta=False)  # missing keys: defaults
    assert Preset(min_peak=None).min_peak == 0.0  # None and 0 both keep every region
    # ``but`` replaces the settings given, and None keeps the preset's.
    assert preset.but(scale=1.0, tta=None, threshold=None) == Preset(scale=1.0)
    # A checkpoint's own preset, or the defaults for one that has none.
    # A preset stored before split_depth was a setting split at 2; later ones say so.
    old = {"extra": {"preset": {"min_size": 40}}}
    assert Preset.of_checkpoint(old) == Preset(min_size=40, split_depth=2.0)
    stored = {"extra": {"preset": Preset(split_depth=1.5).to_dict()}}
    assert Preset.of_checkpoint(stored) == Preset(split_depth=1.5)
    assert Preset.of_checkpoint({"extra": {}}) == Preset.of_checkpoint({}) == Preset()
    assert Preset.for_training("full").min_peak == 0.9 and Preset.for_training("pce") == preset
    assert Preset.for_training("s2l", "fluorescence") == Preset.for_training("s2l", None)
    histology = Preset.for_training("full", "histopathology")
    assert (histology.threshold, histology.split_depth, histology.min_peak) == (0.5, 2.0, 0.9)
    for bad, message in [
        ({"threshold": 1.0}, "threshold must be a probability"),
        ({"method": "blobs"}, "method must be 'watershed' or 'components'"),
        ({"min_size": -1}, "min_size must be a whole number"),
        ({"min_peak": 1.5}, "min_peak must be a probability"),
        ({"smooth": float("nan")}, "smooth must be a finite number"),
        ({"scale": "big"}, "scale must be a number from 0.0625 to 16 or 'auto'"),
        ({"diameter": 0}, "diameter must be a positive finite number"),
        ({"split_depth": float("inf")}, "split_depth must be a positive finite number"),
        ({"split_depth": True}, "split_depth must be a positive finite number"),
        ({"tta": "yes"}, "tta must be True or False"),
    ]:
        with pytest.raises(ValueError, match=message):
            Preset(**bad)
    with pytest.raises(ValueError, match=r"unknown preset settings \['colour'\]"):
        Preset.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="not a dict of settings"):
        Preset.of_checkpoint({"extra": {"preset": 5}})
    with pytest.raises(ValueError, match="baseline must be"):
        Preset.for_training("rf")


def test_preset_split_depth_is_in_the_networks_pixels():
    """Two discs of radius 6, 8 pixels apart: a valley of about 3 pixels between them.
    The preset's split depth splits them where it stays under the valley, in the image's
    pixels: 3 splits them at scale 1 but not on an image the network saw at half its
    size (6 of its pixels)."""
    yy, xx = np.mgrid[:40, :50]
    discs = ((yy - 20) ** 2 + (xx - 19) ** 2 <= 36) | ((yy - 20) ** 2 + (xx - 27) ** 2 <= 36)
    prob = discs.astype(np.float32)
    bare = Preset(min_size=1, min_peak=0.0, smooth=0.0, threshold=0.5)
    for depth, scale, nuclei in [(1.0, 1.0, 2), (1.0, 0.5, 2), (3.0, 1.0, 2), (3.0, 0.5, 1)]:
        assert labels_of(prob, bare.but(split_depth=depth), scale=scale).max() == nuclei


def test_predict_image_takes_the_presets_settings():
    """The same image through the defaults and through a preset that magnifies by 2 and
    keeps every region: the settings reach the network (sizes seen) and the labels."""
    image = np.zeros((40, 48), np.float32)
    image[10:30, 10:30] = 1.0
    model = BrightNet()
    _, labels = predict_image(model, image, preset=PLAIN.but(scale=2.0))
    assert model.seen == [(80, 96)] and labels.max() == 1
    model = BrightNet()
    predict_image(model, image, preset=PLAIN, tta=True)
    assert len(model.seen) == 8  # the eight views
