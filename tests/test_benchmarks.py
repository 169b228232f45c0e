"""The benchmark scripts' own logic: how a variant list becomes training configurations."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

from s2l_core.train import TrainConfig

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
    for path in sorted((BENCHMARKS / "variants").glob("*.json")):
        for variant in variants.load_variants(path):
            variants.make_config(variant, seed=0)


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
