"""The benchmark scripts' own logic: how a variant list becomes training configurations."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import BrightNet

from s2l_core.config import TrainConfig

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


variants = _load("bench_variants")


def test_variant_overrides_merge_into_the_profile():
    base = TrainConfig.profile("cpu", seed=3)
    wide = {"name": "w", "method": "s2l", "profile": "cpu", "overrides": {}}
    wide["overrides"] = {"model": {"base_channels": 32}, "augment": {"p_zoom": 0.0}, "tau": 0.7}
    config = variants.make_config(wide, seed=3)
    assert config.model == {"base_channels": 32}
    assert config.augment.p_zoom == 0.0
    # Fields the variant does not name keep the profile's values, nested ones included.
    assert config.augment.illumination == base.augment.illumination
    assert config.augment.zoom == base.augment.zoom
    assert (config.tau, config.seed, config.epochs) == (0.7, 3, base.epochs)
    assert config.use_pseudo

    for method in ("pce", "full"):
        baseline = variants.make_config({**wide, "method": method}, seed=3)
        assert not baseline.use_pseudo
    with pytest.raises(TypeError):
        variants.make_config({**wide, "overrides": {"no_such_field": 1}}, seed=0)


def test_variant_files_are_checked(tmp_path):
    path = tmp_path / "v.json"
    for content, message in [
        ([], "non-empty JSON list"),
        ([{"name": "a"}], "lacks"),
        ([{"name": "a", "method": "magic"}], "method must be"),
        ([{"name": "a", "method": "s2l"}, {"name": "a", "method": "pce"}], "twice"),
    ]:
        path.write_text(json.dumps(content))
        with pytest.raises(SystemExit, match=message):
            variants.load_variants(path)
    path.write_text(json.dumps([{"name": "a", "method": "s2l"}]))
    assert variants.load_variants(path) == [
        {"name": "a", "method": "s2l", "profile": "cpu", "overrides": {}}
    ]


def test_shipped_variant_files_load():
    shipped = sorted((BENCHMARKS / "results").glob("*/*.config.json"))
    assert shipped, "no variant files beside the results"
    for path in shipped:
        for variant in variants.load_variants(path):
            variants.make_config(variant, seed=0)


def test_variant_results_go_beside_their_configuration(tmp_path):
    config = tmp_path / "zoom_sweep.config.json"
    assert variants.default_output(config) == tmp_path / "zoom_sweep.json"
    other = variants.default_output(tmp_path / "mine.json")
    assert other == BENCHMARKS / "results" / "variants" / "mine.json"
    for path in sorted((BENCHMARKS / "results" / "variants").glob("*.config.json")):
        assert variants.default_output(path).is_file(), f"{path.name}: no results beside it"


def test_summary_is_per_size_means():
    scores = pd.DataFrame(
        {
            "size": ["256x256", "256x256", "512x640"],
            "iou": [0.8, 0.6, 0.9],
            "ap": [0.5, 0.3, 0.4],
            "f1": [1.0, 0.0, 0.5],
            "aji": [0.2, 0.4, 0.6],
        }
    )
    for other in ("dice", "original_mdice", "object_dice"):  # scored, not shown
        scores[other] = 0.5
    summary = variants.summarize(scores)
    assert summary["overall"]["iou"] == pytest.approx(2.3 / 3, abs=1e-4)
    assert summary["overall"]["images"] == 3
    assert summary["by_size"]["256x256"] == pytest.approx(
        {"iou": 0.7, "ap": 0.4, "f1": 0.5, "aji": 0.3, "images": 2}
    )


scale_bench = _load("bench_scale")


def test_scale_arguments_are_checked():
    assert scale_bench.parse_scale("1.5") == 1.5
    assert scale_bench.parse_scale("auto") == "auto"
    assert scale_bench.parse_scale("auto@30") == "auto@30"
    for bad in ("0", "-1", "inf", "nan", "auto@0", "auto@x", "auto@inf", "auto@auto", "big"):
        with pytest.raises(argparse.ArgumentTypeError):
            scale_bench.parse_scale(bad)
    assert scale_bench.parse_min_peak("none") is None
    assert scale_bench.parse_min_peak("0.99") == 0.99
    for bad in ("1.5", "-0.1", "high"):
        with pytest.raises(argparse.ArgumentTypeError):
            scale_bench.parse_min_peak(bad)
    assert scale_bench.parse_min_size("24") == 24
    for bad in ("0", "-3", "2.5", "big"):
        with pytest.raises(argparse.ArgumentTypeError):
            scale_bench.parse_min_size(bad)
    assert scale_bench.parse_checkpoint("s2l=a/b.pt") == ("s2l", Path("a/b.pt"))
    for bad in ("a/b.pt", "=a.pt", "s2l="):
        with pytest.raises(argparse.ArgumentTypeError):
            scale_bench.parse_checkpoint(bad)


def test_scale_tables_are_means_per_method_scale_and_size():
    images = [("256x256", 0.0), ("256x256", 0.2), ("512x640", 0.1)]
    rows = []
    for split in ("val", "test"):
        for scale, base in (("1.0", 0.5), ("auto", 0.7)):
            for i, (size, bump) in enumerate(images):
                rows.append(
                    {"image_id": f"{split}{i}", "size": size, "predict_s": 0.1, "iou": base + bump,
                     "ap": 0.4, "f1": 0.5, "aji": 0.3, "scale_used": 1.0 if scale == "1.0" else 2.0,
                     "area_ratio": 1.0 + bump, "method": "s2l", "split": split, "scale": scale,
                     "tta": False, "min_peak": "None", "min_size": 16, "smooth": 0.0,
                     "threshold": 0.5}
                )  # fmt: skip
    text = scale_bench.to_markdown(pd.DataFrame(rows), "python bench_scale.py", "fluorescence")
    assert "## val (3 images)" in text and "## test (3 images)" in text

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip("|").split("|")]

    table = [cells(line) for line in text.splitlines() if line.startswith("| s2l")]
    # per split: the overall rows (scale 1, auto), then the per-size rows (scale 1, auto)
    assert len(table) == 8
    overall_auto, sizes_auto = table[1], table[3]
    # method, scale, tta, min_peak, min_size, smooth, threshold
    assert overall_auto[:7] == ["s2l", "auto", "False", "None", "16", "0", "0.5"]
    assert float(overall_auto[7]) == pytest.approx(0.8)  # mean of 0.7, 0.9 and 0.8
    assert float(overall_auto[-2]) == 2.0  # mean scale
    assert float(overall_auto[-1]) == pytest.approx(1.1)  # median area ratio
    assert [float(c) for c in sizes_auto[7:]] == pytest.approx([0.8, 0.8])
    assert "256x256 (2)" in text and "512x640 (1)" in text


def test_threshold_bound_takes_each_images_best_threshold():
    """Image a scores best at 0.3 (0.9, against 0.6), image b at 0.5 (0.9, against 0.5):
    the best fixed threshold is 0.5 (mean 0.75, against 0.7), the bound 0.9."""
    ious = {("a", 0.3): 0.9, ("a", 0.5): 0.6, ("b", 0.3): 0.5, ("b", 0.5): 0.9}
    rows = [
        {"image_id": image_id, "size": "256x256", "predict_s": 0.1, "iou": iou, "ap": 0.4,
         "f1": 0.5, "aji": 0.3, "scale_used": 1.0, "area_ratio": 1.0, "method": "s2l",
         "split": "test", "scale": "auto", "tta": True, "min_peak": "0.99", "min_size": 24,
         "smooth": 0.0, "threshold": threshold}
        for (image_id, threshold), iou in ious.items()
    ]  # fmt: skip
    per_image = pd.DataFrame(rows)
    bound = scale_bench.threshold_bound(per_image)
    assert len(bound) == 1
    row = bound.iloc[0]
    assert row["best fixed threshold"] == 0.5
    assert row["iou at it"] == pytest.approx(0.75)
    assert row["iou, best per image"] == pytest.approx(0.9)
    text = scale_bench.to_markdown(per_image, "python bench_scale.py", "fluorescence")
    bound_rows = text.split("Best threshold per image (test)")[1].splitlines()
    (line,) = [line for line in bound_rows if line.startswith("| s2l")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[:6] == ["s2l", "auto", "True", "0.99", "24", "0"]
    assert [float(c) for c in cells[6:]] == pytest.approx([0.5, 0.75, 0.9])
    one = per_image[per_image["threshold"] == 0.5]
    assert scale_bench.threshold_bound(one) is None
    assert "Best threshold per image" not in scale_bench.to_markdown(one, "c", "fluorescence")


def _two_nuclei() -> list[tuple[str, np.ndarray, np.ndarray]]:
    """One image whose first channel is its truth: nuclei of 64 and 80 pixels."""
    truth = np.zeros((24, 32), np.uint16)
    truth[4:12, 4:12], truth[14:22, 18:28] = 1, 2
    image = np.repeat((truth > 0).astype(np.float32)[None], 3, axis=0)
    return [("a", image, truth)]


def test_score_checkpoint_predicts_once_per_image_with_or_without_tta():
    images = _two_nuclei()
    for tta, calls in ((False, 1), (True, 8)):
        model = BrightNet()
        rows = scale_bench.score_checkpoint(model, "cpu", images, 1.0, (None, 0.99), tta=tta)
        assert len(model.seen) == calls  # one prediction, scored at both min_peak values
        assert list(rows["tta"]) == [tta, tta] and list(rows["min_peak"]) == ["None", "0.99"]
        assert rows["iou"].tolist() == pytest.approx([1.0, 1.0])


def test_score_checkpoint_scores_every_min_size_of_one_prediction():
    """Truth objects of 64 and 80 pixels: at min_size 70 the first is dropped."""
    model = BrightNet()
    rows = scale_bench.score_checkpoint(
        model, "cpu", _two_nuclei(), 1.0, (None, 0.99), min_sizes=(16, 70)
    )
    assert len(model.seen) == 1
    assert list(zip(rows["min_peak"], rows["min_size"], strict=True)) == [
        ("None", 16), ("None", 70), ("0.99", 16), ("0.99", 70)
    ]  # fmt: skip
    assert rows["iou"].tolist() == pytest.approx([1.0, 80 / 144, 1.0, 80 / 144])


def test_score_checkpoint_scores_every_threshold_of_one_prediction():
    """The 80-pixel nucleus is drawn at 0.48 (probability about 0.40 for the stand-in
    network): foreground at threshold 0.3, not at 0.5, which finds only the 64-pixel one."""
    ((image_id, image, truth),) = _two_nuclei()
    image[:, truth == 2] = 0.48
    model = BrightNet()
    rows = scale_bench.score_checkpoint(
        model, "cpu", [(image_id, image, truth)], 1.0, thresholds=(0.3, 0.5)
    )
    assert len(model.seen) == 1
    assert rows["threshold"].tolist() == [0.3, 0.5]
    assert rows["iou"].tolist() == pytest.approx([1.0, 64 / 144])
    assert rows["area_ratio"].tolist() == pytest.approx([1.0, 64 / 144])


def test_score_checkpoint_scores_every_smoothing_of_one_prediction():
    """Smoothed by a Gaussian of 1 pixel, each 8x8 or 8x10 nucleus loses its four corner
    pixels: IoU (64 + 80 - 8) / 144 against 1 unsmoothed."""
    model = BrightNet()
    rows = scale_bench.score_checkpoint(model, "cpu", _two_nuclei(), 1.0, smooths=(0.0, 1.0))
    assert len(model.seen) == 1
    assert rows["smooth"].tolist() == [0.0, 1.0]
    assert rows["iou"].tolist() == pytest.approx([1.0, 136 / 144])


generalization = _load("bench_generalization")


def test_leave_one_group_out_folds_never_train_on_the_group_they_score():
    """A manifest of three shapes: each group's fold trains on the other groups' training
    images and scores every image of its own group; the in-distribution fold is the
    split as persisted."""
    rows = []
    for k, (shape, split) in enumerate(
        [((256, 256), "train"), ((256, 256), "test"), ((360, 360), "train"),
         ((360, 360), "val"), ((512, 640), "train"), ((603, 1272), "test"),
         ((256, 320), "train")]
    ):  # fmt: skip
        rows.append({"image_id": f"i{k}", "modality": "fluorescence", "height": shape[0],
                     "width": shape[1], "split": split})  # fmt: skip
    rows.append({"image_id": "h", "modality": "histopathology", "height": 256, "width": 320,
                 "split": "train"})  # fmt: skip

    # i7 (test split) has two bright nuclei and a mask for neither: scored nowhere.
    rows.append({"image_id": "i7", "modality": "fluorescence", "height": 256, "width": 256,
                 "split": "test"})  # fmt: skip

    class Manifest:
        manifest = pd.DataFrame(rows)
        root = "manifest-of-the-folds-test"

        @staticmethod
        def image(image_id):
            image = np.zeros((16, 16, 3), np.uint8)
            image[2:6, 2:6] = image[9:14, 9:14] = 200
            return image

        @staticmethod
        def labels(image_id):
            labels = np.zeros((16, 16), np.uint16)
            if image_id != "i7":
                labels[2:6, 2:6], labels[9:14, 9:14] = 1, 2
            return labels

    folds = generalization.folds(Manifest, "fluorescence")
    assert set(folds) == {"in-distribution", "256x256", "360x360", "other"}
    assert folds["in-distribution"] == (["i0", "i2", "i4", "i6"], ["i3"], ["i1", "i5"])
    assert folds["256x256"] == (["i2", "i4", "i6"], ["i3"], ["i0", "i1"])
    assert folds["360x360"] == (["i0", "i4", "i6"], [], ["i2", "i3"])
    assert folds["other"] == (["i0", "i2"], ["i3"], ["i4", "i5", "i6"])
    for train, val, scored in folds.values():
        assert not set(scored) & (set(train) | set(val))
    assert generalization.unscored(Manifest, "fluorescence") == {"i7"}
    assert list(generalization.folds(Manifest, "histopathology")) == ["in-distribution"]


def test_label_coverage_is_the_labelled_share_of_the_bright_pixels():
    image = np.zeros((20, 20), np.uint8)
    image[2:6, 2:6] = image[10:18, 10:18] = 180  # 16 and 64 bright pixels
    labels = np.zeros((20, 20), np.uint16)
    labels[2:6, 2:6] = 1
    assert generalization.label_coverage(image, labels) == pytest.approx(16 / 80)
    labels[10:18, 10:18] = 2
    assert generalization.label_coverage(image, labels) == 1.0
    rgb = np.repeat(image[..., None], 4, axis=-1)  # RGBA reads as its grey
    assert generalization.label_coverage(rgb, np.zeros_like(labels)) == 0.0
    assert generalization.label_coverage(np.full((8, 8), 9, np.uint8), labels[:8, :8]) == 1.0


def test_shifts_change_image_and_labels_as_named():
    image = np.zeros((20, 30, 3), np.uint8)
    image[5:15, 10:20] = 200
    labels = np.zeros((20, 30), np.uint16)
    labels[5:15, 10:20] = 7
    big, big_labels = generalization.shift_image(image, labels, "scale", 2.0, seed=0)
    assert big.shape == (40, 60, 3) and big_labels.shape == (40, 60)
    assert big_labels.dtype == np.uint16 and set(np.unique(big_labels)) == {0, 7}
    assert (big_labels == 7).sum() == 4 * 100  # the area times four
    small, small_labels = generalization.shift_image(image, labels, "scale", 0.5, seed=0)
    assert small.shape == (10, 15, 3)
    # Rows 5-14 become rows 2.5-7.5: rows 2 and 7 half covered (a tie, background).
    assert np.array_equal(np.argwhere(small_labels == 7).min(0), [3, 5])
    assert np.array_equal(np.argwhere(small_labels == 7).max(0), [6, 9])
    assert (small_labels == 7).sum() == 4 * 5
    same, same_labels = generalization.shift_image(image, labels, "identity", 1.0, seed=0)
    assert same is image and same_labels is labels
    dim, dim_labels = generalization.shift_image(image, labels, "dim", 0.1, seed=0)
    assert dim.max() == 20 and dim_labels is labels
    gamma, _ = generalization.shift_image(image, labels, "gamma", 2.0, seed=0)
    assert gamma.max() == 200 and gamma.min() == 0  # the extremes stay
    noisy, _ = generalization.shift_image(image, labels, "noise", 0.1, seed=1)
    again, _ = generalization.shift_image(image, labels, "noise", 0.1, seed=1)
    assert np.array_equal(noisy, again) and not np.array_equal(noisy, image)
    blurred, _ = generalization.shift_image(image[..., 0], labels, "blur", 1.0, seed=0)
    assert blurred.shape == (20, 30, 1) and 0 < blurred[5, 10, 0] < 200
    with pytest.raises(ValueError, match="unknown shift"):
        generalization.shift_image(image, labels, "sepia", 1.0, seed=0)


def test_shrunk_labels_lie_where_the_shrunk_image_shows_them():
    """Nuclei shrunk to a third: the labels cover the pixels that the image's own
    threshold finds, at every offset of the nuclei to the third-pixel grid."""
    yy, xx = np.mgrid[:90, :90]
    labels = np.zeros((90, 90), np.uint16)
    for k, (y, x) in enumerate([(20, 20), (21, 50), (52, 22), (53, 70), (75, 40)], start=1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= 7.5**2] = k
    image = np.where(labels > 0, 200, 10).astype(np.uint8)[..., None]
    small, small_labels = generalization.shift_image(image, labels, "scale", 1 / 3, seed=0)
    found, truth = small[..., 0] > 105, small_labels > 0
    assert (found & truth).sum() / (found | truth).sum() > 0.95
    assert set(np.unique(small_labels)) == set(range(6))
    for k in range(1, 6):  # each nucleus keeps about its area over nine
        assert abs((small_labels == k).sum() - (labels == k).sum() / 9) <= 4
    assert np.array_equal(generalization.resize_labels(labels, (90, 90)), labels)


def test_generalization_summary_needs_every_group_for_a_held_out_mean():
    """Two seeds; seed 1 lacks the group 'b': its held-out mean is not a mean of 'a'."""
    rows = []
    for seed, fold, iou in [(0, "in-distribution", 0.9), (0, "a", 0.8), (0, "b", 0.6),
                            (1, "in-distribution", 0.88), (1, "a", 0.7)]:  # fmt: skip
        rows.append({"variant": "s2l", "method": "s2l", "modality": "fluorescence",
                     "preset": "default", "seed": seed, "fold": fold, "shift": "none",
                     "iou": iou, "ap": iou / 2, "f1": iou, "aji": iou})  # fmt: skip
    text = generalization.to_markdown(pd.DataFrame(rows), "cmd")
    line = next(x for x in text.splitlines() if x.startswith("| s2l |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[4] == "2"  # seeds
    assert cells[5] == "0.890 ± 0.010 (0.445)"  # in-distribution over both seeds
    assert cells[6] == "0.700 (0.350) [1 seed]"  # held-out mean of seed 0 only: (0.8+0.6)/2
    assert cells[8] == "0.750 ± 0.050 (0.375)"  # group a over both seeds
    # The page says what each preset shown is, and only those.
    presets = next(x for x in text.splitlines() if x.startswith("Presets: "))
    assert presets == f"Presets: `default`: {generalization.PRESET_NOTES['default']}."


def test_method_figures_average_groups_per_seed_then_seeds():
    """Known by hand: seed 0 holds out a 0.8, b 0.6 (mean 0.7); seed 1 a 0.7, b 0.5 (0.6)."""
    rows = [
        {"variant": v, "modality": "fluorescence", "preset": p, "seed": seed, "fold": fold,
         "iou": iou, "ap": iou / 2}
        for seed, fold, iou in [(0, "in-distribution", 0.9), (0, "a", 0.8), (0, "b", 0.6),
                                (1, "in-distribution", 0.88), (1, "a", 0.7), (1, "b", 0.5)]
        for v, p in [("s2l", "default"), ("s2l", "plain"), ("pce", "default")]
    ]  # fmt: skip
    per_fold = pd.DataFrame(rows)
    per_fold.loc[per_fold["variant"] == "pce", "iou"] = 0.1  # other rows do not count
    figures = generalization.method_figures(per_fold, "s2l", "fluorescence")
    assert figures["seeds"] == [0, 1]
    assert figures["test_split"] == {"iou": 0.89, "ap": 0.445}
    assert figures["held_out_mean"] == {"iou": 0.65, "ap": 0.325}
    assert figures["held_out_mean_per_seed"] == {
        "0": {"iou": 0.7, "ap": 0.35}, "1": {"iou": 0.6, "ap": 0.3}
    }  # fmt: skip
    assert figures["groups"] == {"a": {"iou": 0.75, "ap": 0.375}, "b": {"iou": 0.55, "ap": 0.275}}
    # A modality of one group has a test split only.
    one = per_fold[per_fold["fold"] == "in-distribution"]
    assert set(generalization.method_figures(one, "s2l", "fluorescence")) == {
        "variant", "preset", "seeds", "test_split"
    }  # fmt: skip
    with pytest.raises(ValueError, match="not every seed has every fold"):
        lacking = (per_fold["seed"] == 1) & (per_fold["fold"] == "b")
        generalization.method_figures(per_fold[~lacking], "s2l", "fluorescence")
    with pytest.raises(ValueError, match="no rows of variant 's2l', histopathology"):
        generalization.method_figures(per_fold, "s2l", "histopathology")


def test_generalization_default_is_what_s2l_predict_does_with_each_network():
    from s2l_core.evaluate import PLAIN
    from s2l_core.predict import Preset

    for method in ("s2l", "pce", "full"):
        for modality in ("fluorescence", "histopathology"):
            named = generalization.presets(modality, method)
            assert named["default"] == ("auto_tta", Preset.for_training(method, modality))
            assert named["plain"] == ("scale1", PLAIN)
    # A network trained on full masks is less confident: its preset keeps lower peaks.
    assert generalization.presets("fluorescence", "full")["default"][1].min_peak == 0.9
    assert generalization.presets("fluorescence")["default"][1].min_peak == 0.99


def test_generalization_defaults_point_to_shipped_files():
    assert generalization.VARIANTS.is_file()
    assert generalization.VARIANTS.parent == generalization.RESULTS
    assert (generalization.RESULTS / "generalization.json").is_file()


def test_magnify_benchmark_scores_the_packages_ways_against_the_earlier_one():
    """Its bicubic way is what predict_foreground does, its image-pixel labels what
    labels_of does below a scale of 2 (and did above it)."""
    import torch

    from s2l_core.infer import predict_foreground
    from s2l_core.model import UNet
    from s2l_core.predict import Preset, labels_of

    magnify = _load("bench_magnify")
    torch.manual_seed(0)
    net = UNet(base_channels=8, depth=2).eval()
    image = np.random.default_rng(0).random((3, 24, 20)).astype(np.float32)
    np.testing.assert_array_equal(
        magnify.magnified(net, image, 2.5, "bicubic"), predict_foreground(net, image, scale=2.5)
    )
    assert not np.array_equal(
        magnify.magnified(net, image, 2.5, "bilinear"), predict_foreground(net, image, scale=2.5)
    )
    yy, xx = np.mgrid[:40, :40]
    prob = np.zeros((40, 40), np.float32)
    for y, x in ((10, 10), (10, 17), (28, 25)):
        prob = np.maximum(prob, np.clip(4 - np.hypot(yy - y, xx - x), 0, 1))
    preset = Preset(tta=False)
    for scale in (0.5, 1.0, 1.9):
        assert np.array_equal(
            magnify.image_pixels(prob, preset, scale), labels_of(prob, preset, scale=scale)
        )


def test_preset_sweep_scores_kept_cases_and_averages_groups_then_seeds(tmp_path):
    """Two held-out groups, two seeds, one kept probability each: the scores are found
    from the kept files at every threshold and split depth, and the held-out mean
    weighs groups alike whatever their number of images."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    preset = _load("bench_preset")
    from s2l_core.predict import Preset, labels_of

    folder = tmp_path / "preset"
    folder.mkdir()
    yy, xx = np.mgrid[:40, :40]
    prob = np.clip(1.2 - np.hypot(yy - 20, xx - 20) / 8, 0, 1).astype(np.float32)
    truth = (np.hypot(yy - 20, xx - 20) <= 6).astype(np.uint16)  # radius 6: p > 0.45
    todo = [(g, s, "x1", f"{g}-img{k}", None) for g, n in [("a", 1), ("b", 2)]
            for s in (0, 1) for k in range(n)]  # fmt: skip
    for fold, seed, shift, image_id, _ in todo:
        with open(folder / preset.kept_name(fold, seed, shift, image_id), "wb") as f:
            np.savez_compressed(f, prob=prob.astype(np.float16), scale=1.0, truth=truth)
    table = preset.score_cases(todo, folder, tmp_path / "scores.csv")
    assert len(table) == len(todo) * len(preset.THRESHOLDS) * len(preset.SPLIT_DEPTHS)
    row = table[(table.threshold == 0.6) & (table.split_depth == 1.0)].iloc[0]
    labels = labels_of(prob, Preset(threshold=0.6, split_depth=1.0))
    expected = ((labels > 0) & (truth > 0)).sum() / ((labels > 0) | (truth > 0)).sum()
    assert row.iou == pytest.approx(expected, abs=1e-4)
    again = preset.score_cases(todo, folder, tmp_path / "scores.csv")  # all kept: reused
    pd.testing.assert_frame_equal(again, table)
    # Group b's two images score 0 and 1, group a's one image 1: the held-out mean of
    # the groups is (1 + 0.5) / 2, not (1 + 0 + 1) / 3.
    scores = pd.DataFrame(
        {"fold": ["a", "b", "b"], "seed": 0, "shift": "x1", "threshold": 0.6,
         "split_depth": 1.0, "iou": [1.0, 0.0, 1.0], "ap": [1.0, 0.0, 1.0]}
    )  # fmt: skip
    means = preset.group_means(scores)
    assert means.set_index("fold")["iou"].to_dict() == {"a": 1.0, "b": 0.5}
    assert means["iou"].mean() == 0.75
    page = preset.to_markdown(scores, "python benchmarks/bench_preset.py")
    assert "| 0.75 |" in " ".join(page.split())
    # Only held-out groups were scored: the other sections say so, with no empty table.
    assert page.count("None scored in this run.") == 2
    assert "test split, by change (mean of the seeds)\n\nNone scored in this run." in page
    assert "| threshold   | split_depth   |" not in page


def test_preset_sweep_keeps_cases_whose_scores_outlive_their_network(tmp_path, monkeypatch, capsys):
    """A case is scored when its network, its kept probability or its kept scores are
    there; one with none of them is left out and counted, and a case whose scores are
    incomplete with nothing to finish them from stops with its name."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    preset = _load("bench_preset")
    import bench_generalization

    folds = {"a": ([], [], ["a1"]), "b": ([], [], ["b1"])}
    monkeypatch.setattr(bench_generalization, "folds", lambda dataset, modality: folds)

    class Histo:
        def ids(self, modality, split):
            return ["h1"]

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "s2l__fluorescence__a__s0.pt").write_bytes(b"")  # fold a, seed 0
    (tmp_path / "preset").mkdir()
    (tmp_path / "preset" / preset.kept_name("b", 0, "x1", "b1")).write_bytes(b"")
    scored = {preset.kept_name("a", 1, "gamma 2", "a1")}
    todo = preset.cases(Histo(), tmp_path, [0, 1], frozenset(scored), list(preset.SHIFTS))
    names = {preset.kept_name(*case[:4]) for case in todo}
    assert {c[:4] for c in todo if c[0] == "a" and c[1] == 0} == {
        ("a", 0, s, "a1") for s in preset.SHIFTS
    }
    assert preset.kept_name("b", 0, "x1", "b1") in names
    assert scored <= names
    assert len(todo) == len(preset.SHIFTS) + 2
    n_all = 2 * (2 * len(preset.SHIFTS) + 1)
    assert f"{n_all - len(todo)} images left out" in capsys.readouterr().out
    # Kept scores are not predicted again (the network is not there to do it) ...
    without_network = [c for c in todo if c[1] == 1]
    preset.predict_cases(None, without_network, tmp_path / "preset")
    # ... and scores that lack a threshold stop with the case's name.
    kept = tmp_path / "scores.csv"
    pd.DataFrame(
        {"file": sorted(scored), "threshold": 0.5, "split_depth": 1.0, "iou": 1.0, "ap": 1.0}
    ).to_csv(kept, index=False)
    with pytest.raises(SystemExit, match=r"a_s1_g2\.0_a1\.npz: scores incomplete"):
        preset.score_cases(without_network, tmp_path / "preset", kept)


def test_preset_sweep_draws_per_fold_images_or_every_image(tmp_path, monkeypatch):
    """24 images of a fold of 30 by default, the same 24 on every call; ``per_fold=0``
    takes all 30, and a fold smaller than ``per_fold`` gives all it has."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    preset = _load("bench_preset")
    import bench_generalization

    folds = {"big": ([], [], [f"i{k:02d}" for k in range(30)]), "small": ([], [], ["s1", "s2"])}
    monkeypatch.setattr(bench_generalization, "folds", lambda dataset, modality: folds)

    class Histo:
        def ids(self, modality, split):
            return []

    (tmp_path / "ckpt").mkdir()
    for fold in folds:
        (tmp_path / "ckpt" / f"s2l__fluorescence__{fold}__s0.pt").write_bytes(b"")

    def drawn(**kwargs):
        todo = preset.cases(Histo(), tmp_path, [0], shifts=["x1"], **kwargs)
        return {fold: [c[3] for c in todo if c[0] == fold] for fold in folds}

    default = drawn()
    assert len(default["big"]) == preset.PER_FOLD == 24
    assert set(default["big"]) < set(folds["big"][2])
    assert default == drawn()
    assert drawn(per_fold=0) == {f: sorted(ids) for f, (_, _, ids) in folds.items()}
    assert drawn(per_fold=5)["small"] == ["s1", "s2"]
    assert len(set(drawn(per_fold=5)["big"])) == 5


def test_preset_sweep_refuses_a_negative_per_fold_before_reading_anything(tmp_path, capsys):
    """A negative ``--per-fold`` is refused by name, before the dataset or the kept
    scores are read (the dataset named here does not exist)."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    preset = _load("bench_preset")
    absent = tmp_path / "no-dataset"
    with pytest.raises(SystemExit) as stop:
        preset.main(["--per-fold", "-1", "--dataset", str(absent), "--work", str(tmp_path)])
    assert stop.value.code == 2
    assert "--per-fold must be 0 (every image) or more, got -1" in capsys.readouterr().err
    assert sorted(tmp_path.iterdir()) == []


def test_generalization_training_resumes_where_it_stopped(synthetic_samples, tmp_path):
    import torch

    from s2l_core.augment import AugmentConfig
    from s2l_core.train import Trainer

    bench = _load("bench_generalization")
    train, val = synthetic_samples(3), synthetic_samples(1, offset=10)
    config = TrainConfig(
        epochs=3, batch_size=2, samples_per_epoch=4, warmup_epochs=1, ema_every=1,
        ema_start=0, val_every=0, model={"base_channels": 8, "depth": 2},
        augment=AugmentConfig(crop_size=64),
    )  # fmt: skip
    straight = bench.train_resumably(train, val, config, tmp_path / "a.state.pt", "cpu")
    state = tmp_path / "b.state.pt"
    interrupted = Trainer(train, config, val=val, device="cpu", verbose=False)
    interrupted.fit(2, checkpoint=state, progress=False)  # a run stopped after epoch 2
    resumed = bench.train_resumably(train, val, config, state, "cpu")
    assert resumed.epoch == 3 and len(resumed.history) == 3
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = dataclasses.replace(config, seed=1)  # another job's state is not taken over
    with pytest.raises(SystemExit, match="another configuration"):
        bench.train_resumably(train, val, other, state, "cpu")


def test_a_carried_dataset_gives_the_same_folds_and_samples(prepared, scribble_set, tmp_path):
    """The copy for another machine holds one modality and one ratio of the real mirror,
    opens as a prepared dataset and gives the same folds and samples; it never replaces
    a folder that holds files."""
    from s2l_core.data import PreparedDataset
    from s2l_core.samples import load_samples
    from s2l_core.scribbles import ScribbleSet

    carried = _load("carry_dataset")
    generalization = _load("bench_generalization")
    out = carried.carry(prepared, scribble_set, tmp_path / "carry", "fluorescence", 0.3)
    copy = PreparedDataset(out)
    copy_scribbles = ScribbleSet(copy, 0)
    assert copy.ids() == prepared.ids("fluorescence") and copy.missing_files() == []
    assert copy_scribbles.ratios == (0.3,) and copy_scribbles.missing_files() == []
    folds = generalization.folds(copy, "fluorescence")
    assert folds == generalization.folds(prepared, "fluorescence") and len(folds) == 5
    ids = folds["other"][2][:4]
    for a, b in zip(
        load_samples(prepared, ids, scribble_set, 0.3),
        load_samples(copy, ids, copy_scribbles, 0.3),
        strict=True,
    ):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.scribble, b.scribble)
        assert np.array_equal(a.labels, b.labels)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        carried.carry(prepared, scribble_set, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
