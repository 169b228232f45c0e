"""The project's own conventions: environments agree, notebooks are clean, the CLI works."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import tomllib
import yaml
from conftest import load_tool

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
    pages = CHAPTERS + sorted((REPO / "book").glob("*.md"))  # text pages: MyST Markdown
    assert sorted(listed) == sorted(f"book/{p.stem}" for p in pages)


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


def test_papermills_injected_cell_is_hidden_from_the_page(tmp_path):
    notebook = nbformat.v4.new_notebook()
    injected = nbformat.v4.new_code_cell('profile = "smoke"')
    injected.metadata["tags"] = ["injected-parameters"]
    own = nbformat.v4.new_code_cell('profile = "cpu"', metadata={"tags": ["parameters"]})
    notebook.cells = [own, injected]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(notebook, path)
    load_tool("run_book").hide_injected_parameters(path)
    cells = nbformat.read(path, 4).cells
    assert cells[1].metadata["tags"] == ["injected-parameters", "remove-cell"]
    assert cells[0].metadata["tags"] == ["parameters"]


def test_book_check_finds_what_a_reader_must_not_meet(tmp_path):
    check = load_tool("check_book")
    html = tmp_path / "html"
    (html / "book").mkdir(parents=True)
    (html / "_sources" / "book").mkdir(parents=True)
    page = (
        '<script src="../_static/mathjax/tex-chtml.js"></script><p>a page</p>'
        '<img src="../_images/a.png"><div class="cell_output"><div><pre>12</pre></div>'
        "</div><table><tr><th>a</th></tr><tr><td>1</td></tr></table>"
    )
    intro = page + "<p>Scribble2Label: scribble-supervised cell segmentation</p>"
    (html / "book" / "00_introduction.html").write_text(intro)
    (html / "book" / "01_data.html").write_text(page)
    clean = nbformat.v4.new_notebook()
    clean.cells = [nbformat.v4.new_code_cell("x = 1")]
    nbformat.write(clean, html / "_sources" / "book" / "01_data.ipynb")
    assert check.problems(html) == []
    bad = (
        '<script src="https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-chtml.js"></script>'
        '<script src="https://cdn.jsdelivr.net/npm/@jupyter-widgets/html-manager"></script>'
        '<div class="cell tag_injected-parameters"></div> 100%|##| 3/3 [00:01<00:00, 2.9it/s]'
        "PreparedDataset('/root/.cache/scribble2label/bbbc038', 670 images)"
        '<div class="cell_output"><div><style>' + "p {}" * 2000 + "</style><pre>"
        + "row\n" * 1001 + "</pre></div></div><table><thead><tr><th>a</th></tr></thead>"
        "<tbody></tbody></table>"
    )  # fmt: skip
    (html / "book" / "01_data.html").write_text(bad)
    (html / "book" / "00_introduction.html").write_text(page)
    executed = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    executed.cells = [cell]
    nbformat.write(executed, html / "_sources" / "book" / "01_data.ipynb")
    found = "\n".join(check.problems(html))
    for what in (
        "papermill's injected parameters cell", "a raw repr", "a progress bar",
        "loads https://cdn.jsdelivr.net/npm/mathjax@3", "serves an executed copy",
        "no bibliography", "loads https://cdn.jsdelivr.net/npm/@jupyter-widgets",
        "cell output 1 shows 4004 characters", "table 1 is empty",
        "01_data.html: a chapter without a figure",
    ):  # fmt: skip
        assert what in found, found
    assert found.count("cell output") == 1  # style sheets are not shown text
    (html / "_images").mkdir()
    (html / "_images" / "a.png").write_bytes(b"0" * (check.MAX_FIGURE_BYTES + 1))
    (html / "book" / "01_data.html").write_text(page)
    (html / "book" / "00_introduction.html").write_text(intro)
    nbformat.write(clean, html / "_sources" / "book" / "01_data.ipynb")
    assert check.problems(html) == [
        f"{name}.html: figure ../_images/a.png has {check.MAX_FIGURE_BYTES + 1} bytes"
        for name in ("00_introduction", "01_data")
    ]


def test_live_widgets_leave_the_page_and_pictures_stay(tmp_path):
    view = "application/vnd.jupyter.widget-view+json"
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    only_widget = nbformat.v4.new_code_cell("session")
    only_widget.outputs = [
        nbformat.v4.new_output(
            "execute_result", data={view: {"model_id": "a"}, "text/plain": "VBox(...)"}
        )
    ]
    with_picture = nbformat.v4.new_code_cell("w")
    with_picture.outputs = [
        nbformat.v4.new_output(
            "display_data", data={view: {"model_id": "b"}, "image/png": "iVBORw0KGgo="}
        ),
        nbformat.v4.new_output("stream", name="stdout", text="kept\n"),
    ]
    notebook.cells = [only_widget, with_picture, nbformat.v4.new_markdown_cell("text")]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(notebook, path)
    load_tool("run_book").make_static(path)
    nb = nbformat.read(path, 4)
    assert "widgets" not in nb.metadata
    assert nb.cells[0].outputs == []
    assert [dict(o.get("data", {})) for o in nb.cells[1].outputs] == [
        {"image/png": "iVBORw0KGgo="},
        {},
    ]
    assert nb.cells[1].outputs[1]["text"] == "kept\n"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_code_cells_fit_the_page_column(path):
    nb = nbformat.read(path, as_version=4)
    long = [
        line
        for cell in nb.cells
        if cell.cell_type == "code"
        for line in cell.source.splitlines()
        if len(line) > 88
    ]
    assert long == [], f"code lines over 88 characters: {long[:3]}"


def test_each_page_says_how_it_was_made(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# 4. Training"),
        nbformat.v4.new_code_cell("x"),
    ]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(notebook, path)
    run_book = load_tool("run_book")
    run_book.add_banner(path, "smoke", 12.3)
    run_book.add_banner(path, "cpu", 1172.0)  # executed again: one banner, the last
    cells = nbformat.read(path, 4).cells
    banners = [c for c in cells if "banner" in c.metadata.get("tags", [])]
    assert len(banners) == 1 and cells[1] is banners[0] and len(cells) == 3
    assert "`cpu` profile" in banners[0].source and "1172 s" in banners[0].source
    assert "not results" not in banners[0].source  # only the smoke banner warns
    run_book.add_banner(path, "cpu", 1300.0, {"n_train": 96, "epochs": 42})
    (banner,) = [c for c in nbformat.read(path, 4).cells if "banner" in c.metadata.get("tags", [])]
    assert "`cpu` profile and `n_train = 96`, `epochs = 42` on" in banner.source


def test_each_chapter_gets_the_parameters_it_has(tmp_path):
    run_book = load_tool("run_book")
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(
        'profile = "cpu"\nn_train = None  # all\nflag = (\n    False\n)\nsteps: int = 3\n'
    )
    cell.metadata["tags"] = ["parameters"]
    notebook.cells = [nbformat.v4.new_code_cell("later = 1"), cell]
    path = tmp_path / "chapter.ipynb"
    nbformat.write(notebook, path)
    assert run_book.declared_parameters(path) == {"profile", "n_train", "flag", "steps"}
    given = {"profile": "cpu", "n_train": 96, "epochs": 42}
    assert run_book.chapter_parameters(path, given) == {"profile": "cpu", "n_train": 96}
    # Every chapter of the book has a parameters cell that names its profile.
    for chapter in CHAPTERS:
        assert "profile" in run_book.declared_parameters(chapter), chapter.name
    training = REPO / "book" / "04_training.ipynb"
    assert {"n_train", "epochs"} <= run_book.declared_parameters(training)


def test_a_parameter_no_chapter_has_is_refused():
    import subprocess
    import sys

    command = [sys.executable, str(REPO / "tools" / "run_book.py"), "--profile", "smoke"]
    command += ["--chapters", "01_data", "-p", "n_train", "96", "--no-build"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no chapter to run has the parameters ['n_train']" in done.stderr


@pytest.mark.browser
@pytest.mark.skipif(
    not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium at /usr/bin/chromium"
)
def test_book_reader_meets_what_a_reader_would(tmp_path):
    read_book = load_tool("read_book")
    html = tmp_path / "html"
    (html / "book").mkdir(parents=True)
    (html / "book" / "01_good.html").write_text(
        '<html><body><div class="cell_input"><pre style="width: 900px">x = 1</pre></div>'
        "</body></html>"
    )
    assert read_book.read(html, tmp_path / "shots", deadline=5) == []
    assert (tmp_path / "shots" / "01_good.png").stat().st_size > 0
    (html / "book" / "02_bad.html").write_text(
        "<html><body><script>undefinedFunction()</script>"
        '<img src="https://example.org/a.png">'
        '<div class="cell_input"><pre style="width: 200px; overflow: auto">'
        + "y = 2" + " + 2" * 100 + "</pre></div>"
        f'<span {read_book.MATH_MARK}>\\(x^2\\)</span></body></html>'
    )  # fmt: skip
    found = "\n".join(read_book.read(html, tmp_path / "shots", deadline=2))
    assert "01_good" not in found
    for what in (
        "02_bad.html: JavaScript error: undefinedFunction is not defined",
        "02_bad.html: requests https://example.org/a.png from the network",
        "02_bad.html: 1 code cell(s) cut off, e.g. 'y = 2 + 2",
        "02_bad.html: MathJax typeset 0 of its 1 formulas",
    ):
        assert what in found, found
