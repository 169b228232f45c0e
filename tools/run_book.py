"""Execute every chapter with papermill, then build the HTML book from the executed copies.

The committed notebooks in ``book/`` carry no outputs. This script

1. reads the chapter order from ``_toc.yml``;
2. executes each chapter in a fresh kernel with papermill, injecting the ``profile``
   parameter, and each ``-p NAME VALUE`` given here into the chapters whose parameters
   cell names it, into ``_build/src/book/``; a chapter run with its default parameters
   (the profile aside) has the outputs of its cells tagged ``regression`` compared with
   ``book/expected/`` (:mod:`check_drift`);
3. builds the book from ``_build/src`` with Jupyter Book, execution off and warnings as
   errors; the HTML lands in ``_build/html``, its download buttons serve the chapters as
   written, :mod:`check_book` checks the pages as a reader meets them offline, and
   :mod:`read_book` reads every page in headless Chromium (where it is installed):
   no JavaScript error, no request to the network, formulas typeset, no code cut off.

Papermill's injected parameters cell is tagged ``remove-cell``, so a page shows the
chapter's own parameters cell only; live widgets are left out of the pages
(:func:`make_static`), which need no kernel and no network. Pages of the table of
contents written in MyST Markdown (``.md``) are copied, not executed.

A chapter that fails stops the run; its failing cell and traceback are printed, and the
executed notebook (with the error in place) is kept in ``_build/src/book/``.

Usage::

    python tools/run_book.py [--profile auto|smoke|cpu|full] [--chapters 01_data ...]
                             [-p NAME VALUE ...] [--no-build]
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
SRC = BUILD / "src"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def chapters_from_toc(toc_path: Path) -> list[str]:
    """The notebook paths (without suffix) of ``_toc.yml``, in reading order."""
    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return files


def resolve_profile(profile: str) -> str:
    if profile != "auto":
        return profile
    import torch

    return "full" if torch.cuda.is_available() else "cpu"


def parse_value(text: str):
    """Parameter values as YAML scalars: numbers, true/false, null, else strings."""
    return yaml.safe_load(text)


def declared_parameters(notebook: Path) -> set[str]:
    """The names that the chapter's cell tagged ``parameters`` assigns (none without
    one)."""
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            return {
                target.id
                for node in tree.body
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Name)
            }
    return set()


def chapter_parameters(notebook: Path, parameters: dict) -> dict:
    """The parameters one chapter gets: the profile always, the others where its
    parameters cell names them."""
    declared = declared_parameters(notebook)
    return {k: v for k, v in parameters.items() if k == "profile" or k in declared}


def execute(chapters: list[str], parameters: dict, timings: dict) -> None:
    import papermill as pm

    for chapter in chapters:
        source = ROOT / f"{chapter}.ipynb"
        target = SRC / f"{chapter}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not source.is_file():  # a page of text (MyST Markdown): nothing to execute
            shutil.copy2(ROOT / f"{chapter}.md", SRC / f"{chapter}.md")
            continue
        own = chapter_parameters(source, parameters)
        print(f"--- executing {chapter} with {own}", flush=True)
        start = time.perf_counter()
        try:
            pm.execute_notebook(
                source,
                target,
                parameters=own,
                cwd=str(source.parent),
                kernel_name="python3",
                progress_bar=False,
                log_output=False,
            )
        except pm.PapermillExecutionError as err:
            print(f"\nchapter {chapter} failed in cell {err.exec_count}:\n", file=sys.stderr)
            print(err.source, file=sys.stderr)
            print(f"\n{err.ename}: {err.evalue}", file=sys.stderr)
            print("".join(err.traceback[-5:]), file=sys.stderr)
            print(f"\nexecuted notebook with the error: {target}", file=sys.stderr)
            raise SystemExit(1) from None
        timings[chapter] = round(time.perf_counter() - start, 1)
        print(f"    done in {timings[chapter]} s", flush=True)
        hide_injected_parameters(target)
        make_static(target)
        extra = {k: v for k, v in own.items() if k != "profile"}
        add_banner(target, own.get("profile", "?"), timings[chapter], extra)
        if not extra:  # outputs that must not drift: under the default parameters only
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            import check_drift

            report = check_drift.check(target)
            if report:
                print(f"\nchapter {chapter}: outputs drifted from book/expected/", file=sys.stderr)
                print(report, file=sys.stderr)
                raise SystemExit(1)


def hardware() -> str:
    """The machine, in words: the GPU where CUDA is present, else the CPU and its cores."""
    import os
    import platform

    import torch

    if torch.cuda.is_available():
        return f"one {torch.cuda.get_device_name(0)} GPU"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"a CPU ({name}, {os.cpu_count()} cores)"


def add_banner(
    notebook: Path, profile: str, seconds: float, parameters: dict | None = None
) -> None:
    """Say at the top of an executed chapter which profile (and which other parameters
    given to it) made its outputs, on what machine, and how long it took (a note after
    the chapter's first cell)."""
    import nbformat

    nb = nbformat.read(notebook, 4)
    given = ", ".join(f"`{name} = {value!r}`" for name, value in (parameters or {}).items())
    with_what = f"the `{profile}` profile" + (f" and {given}" if given else "")
    text = f"This page was executed with {with_what} on {hardware()} in {seconds:.0f} s."
    if profile == "smoke":
        text += (
            " The `smoke` profile only checks that the code runs: its models train for "
            "seconds, so their scores and figures are not results. `make book` runs the "
            "`cpu` profile (or `full` on a GPU)."
        )
    banner = nbformat.v4.new_markdown_cell(f"```{{note}}\n{text}\n```")
    banner.metadata["tags"] = ["banner"]
    nb.cells = [c for c in nb.cells if "banner" not in c.metadata.get("tags", [])]
    nb.cells.insert(1, banner)
    nbformat.write(nb, notebook)


def hide_injected_parameters(notebook: Path) -> None:
    """Tag the cell papermill injected (``injected-parameters``) ``remove-cell``, so the
    page shows the chapter's own parameters cell only."""
    import nbformat

    nb = nbformat.read(notebook, 4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    nbformat.write(nb, notebook)


def make_static(notebook: Path) -> None:
    """Leave no live widget on the page: a widget's view needs a kernel and JavaScript
    from a CDN, which a static, offline book has neither of. The widget state is
    dropped, and so is every output that is only a widget (the chapter shows a picture
    of it instead); outputs that also carry a picture or text keep those."""
    import nbformat

    nb = nbformat.read(notebook, 4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                data.pop(WIDGET_VIEW)
                if set(data) <= {"text/plain"}:
                    continue  # a widget's repr, e.g. "VBox(children=...)"
            kept.append(output)
        if cell.cell_type == "code":
            cell.outputs = kept
    nbformat.write(nb, notebook)


def build() -> None:
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, SRC / name)
    # Pictures of the repository that the chapters show (e.g. the widget in JupyterLab).
    (SRC / "docs").mkdir(exist_ok=True)
    for picture in (ROOT / "docs").glob("*.png"):
        shutil.copy2(picture, SRC / "docs" / picture.name)
    for extra in (ROOT / "book").iterdir():
        if extra.suffix not in (".ipynb",) and not extra.name.startswith("."):
            dest = SRC / "book" / extra.name
            if extra.is_dir():
                shutil.copytree(extra, dest, dirs_exist_ok=True)
            else:
                shutil.copy2(extra, dest)
    out = BUILD / "jb"
    command = [
        str(Path(sys.executable).with_name("jupyter-book")), "build", str(SRC),
        "--path-output", str(out), "-W", "-n", "--keep-going",
    ]  # fmt: skip
    print("--- building the book:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    html = BUILD / "html"
    if html.exists():
        shutil.rmtree(html)
    shutil.copytree(out / "_build" / "html", html)
    # The download button serves the chapter as written (no outputs, no injected
    # parameters), not the executed copy the page was built from.
    for executed in (html / "_sources").rglob("*.ipynb"):
        source = ROOT / executed.relative_to(html / "_sources")
        if source.is_file():
            shutil.copy2(source, executed)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import check_book

    found = check_book.problems(html)
    for problem in found:
        print(f"book check: {problem}", file=sys.stderr)
    if found:
        raise SystemExit(1)
    import read_book

    if read_book.available():  # every page in Chromium, offline
        start = time.perf_counter()
        found = read_book.read(html, BUILD / "screenshots")
        for problem in found:
            print(f"book reader: {problem}", file=sys.stderr)
        if found:
            raise SystemExit(1)
        seconds = time.perf_counter() - start
        print(f"--- read every page in Chromium in {seconds:.0f} s: {BUILD / 'screenshots'}")
    else:
        print(f"--- no Chromium at {read_book.CHROMIUM}: the pages were not read in a browser")
    print(f"--- the book: {html / 'index.html'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="auto", choices=["auto", "smoke", "cpu", "full"])
    parser.add_argument("--chapters", nargs="*", help="chapter names, e.g. 01_data (default: all)")
    parser.add_argument(
        "-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="a parameter for the chapters whose parameters cell names it",
    )  # fmt: skip
    parser.add_argument("--no-build", action="store_true", help="execute only")
    args = parser.parse_args()
    chapters = chapters_from_toc(ROOT / "_toc.yml")
    if args.chapters:
        unknown = [c for c in args.chapters if not any(ch.endswith(c) for ch in chapters)]
        if unknown:
            parser.error(f"unknown chapters {unknown}; the book has {chapters}")
        chapters = [ch for ch in chapters if any(ch.endswith(c) for c in args.chapters)]
    parameters = {"profile": resolve_profile(args.profile)}
    parameters.update({name: parse_value(value) for name, value in args.p})
    notebooks = [ROOT / f"{ch}.ipynb" for ch in chapters if (ROOT / f"{ch}.ipynb").is_file()]
    declared = set().union(*(declared_parameters(nb) for nb in notebooks))
    unknown = sorted(set(parameters) - declared - {"profile"})
    if unknown:
        parser.error(f"no chapter to run has the parameters {unknown}")
    timings: dict[str, float] = {}
    execute(chapters, parameters, timings)
    BUILD.mkdir(exist_ok=True)
    (BUILD / "timings.json").write_text(
        json.dumps({"parameters": parameters, "seconds": timings}, indent=2) + "\n"
    )
    if not args.no_build:
        build()


if __name__ == "__main__":
    main()
