"""Catch drift between the chapters and the package: outputs that must not change.

Cells tagged ``regression`` print results that depend only on the data, the seeds and
the package (counts of the dataset, the seeded split, scribble budgets, scores of
hand-made examples). Their expected outputs are kept in ``book/expected/<chapter>.ipynb``.
After papermill has executed a chapter, :func:`check` compares the tagged cells' outputs
with the expected ones using pytest-notebook's notebook diff, and reports every
difference. ``python tools/check_drift.py --update`` rewrites the expected files from the
last executed book.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from pytest_notebook.diffing import diff_notebooks, diff_to_string, filter_diff

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "book" / "expected"
EXECUTED = ROOT / "_build" / "src" / "book"
TAG = "regression"
IGNORED = ["/metadata", "/cells/*/metadata", "/cells/*/execution_count", "/cells/*/id",
           "/cells/*/outputs/*/execution_count", "/cells/*/outputs/*/metadata"]  # fmt: skip


def regression_cells(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A notebook of the cells tagged ``regression``, plain-text outputs only."""
    out = nbformat.v4.new_notebook()
    for cell in nb.cells:
        if cell.cell_type != "code" or TAG not in cell.metadata.get("tags", []):
            continue
        new = nbformat.v4.new_code_cell(cell.source, metadata={"tags": [TAG]})
        for output in cell.get("outputs", []):
            kind = output["output_type"]
            if kind == "stream":
                text = output["text"]
                new.outputs.append(nbformat.v4.new_output(kind, name=output["name"], text=text))
            elif kind in ("execute_result", "display_data") and "text/plain" in output["data"]:
                data = {"text/plain": output["data"]["text/plain"]}
                new.outputs.append(nbformat.v4.new_output("display_data", data=data))
        out.cells.append(new)
    return out


def compare(expected: nbformat.NotebookNode, executed: nbformat.NotebookNode) -> str:
    """A readable diff of the regression cells, or ``""`` when they agree."""
    want, got = regression_cells(expected), regression_cells(executed)
    diff = filter_diff(diff_notebooks(want, got), IGNORED)
    return diff_to_string(want, diff, use_git=False, use_color=False) if diff else ""


def check(chapter: Path, executed_dir: Path = EXECUTED, expected_dir: Path = EXPECTED) -> str:
    """Compare one executed chapter with its expected outputs ("" when none are kept)."""
    expected = expected_dir / chapter.name
    if not expected.is_file():
        return ""
    return compare(nbformat.read(expected, 4), nbformat.read(executed_dir / chapter.name, 4))


def update(executed_dir: Path = EXECUTED, expected_dir: Path = EXPECTED) -> list[Path]:
    """Rewrite the expected outputs from the executed chapters that have tagged cells."""
    written = []
    for path in sorted(executed_dir.glob("*.ipynb")):
        cells = regression_cells(nbformat.read(path, 4))
        if cells.cells:
            expected_dir.mkdir(parents=True, exist_ok=True)
            nbformat.write(cells, expected_dir / path.name)
            written.append(expected_dir / path.name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the expected outputs")
    args = parser.parse_args()
    if args.update:
        for path in update():
            print(f"wrote {path}")
        return
    failed = False
    for path in sorted(EXECUTED.glob("*.ipynb")):
        report = check(path)
        if report:
            failed = True
            print(f"--- {path.name}: outputs drifted from {EXPECTED / path.name}\n{report}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
