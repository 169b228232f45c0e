"""The project's own conventions: environments agree, notebooks are clean, the CLI works."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((REPO / "book").glob("*.ipynb"))


def test_environment_yml_installs_what_the_makefile_installs():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip_sections) == 1
    (requirement,) = pip_sections[0]
    makefile = (REPO / "Makefile").read_text()
    installs = re.findall(r"pip install -e '(\.\[[^\]]*\])'", makefile)
    assert installs == [requirement.removeprefix("-e ").strip()]
    named = set(re.search(r"\[(.*)\]", requirement).group(1).split(","))
    assert named == extras  # every extra, in both
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    minimum = pyproject["project"]["requires-python"].removeprefix(">=")
    version = python.split("=")[-1]
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


def test_toc_lists_every_chapter():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    listed = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert sorted(listed) == [f"book/{p.stem}" for p in CHAPTERS]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_committed_notebooks_are_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs committed"
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    assert "profile" in tagged[0].source
    assert nb.metadata["kernelspec"]["name"] == "python3"
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    for heading in ("## What you will learn", "## Setup", "## Summary", "## Exercises"):
        assert heading in text, f"chapter template: missing {heading!r}"
    assert ":class: dropdown" in text, "exercise solutions belong in dropdowns"


def _drift_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_drift", REPO / "tools" / "check_drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _executed(value: str, extra_html: bool = True) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    tagged = nbformat.v4.new_code_cell("print(counts)", metadata={"tags": ["regression"]})
    data = {"text/plain": value} | ({"text/html": f"<b>{value}</b>"} if extra_html else {})
    tagged.outputs = [nbformat.v4.new_output("execute_result", data=data, execution_count=3)]
    other = nbformat.v4.new_code_cell("plot()")
    other.outputs = [nbformat.v4.new_output("stream", name="stdout", text="anything\n")]
    nb.cells = [other, tagged]
    return nb


def test_drift_check_sees_changed_outputs_only():
    drift = _drift_module()
    expected = _executed("fluorescence 546")
    assert drift.compare(expected, _executed("fluorescence 546", extra_html=False)) == ""
    report = drift.compare(expected, _executed("fluorescence 545"))
    assert "546" in report and "545" in report


def test_expected_outputs_belong_to_tagged_cells():
    drift = _drift_module()
    for path in sorted((REPO / "book" / "expected").glob("*.ipynb")):
        chapter = nbformat.read(REPO / "book" / path.name, as_version=4)
        expected = nbformat.read(path, as_version=4)
        sources = [c.source for c in drift.regression_cells(chapter).cells]
        assert [c.source for c in expected.cells] == sources, f"{path.name}: update expected"
