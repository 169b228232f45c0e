"""Execute every chapter with papermill, then build the HTML book from the executed copies.

The committed notebooks in ``book/`` carry no outputs. This script

1. reads the chapter order from ``_toc.yml``;
2. executes each chapter in a fresh kernel with papermill, injecting the ``profile``
   parameter (and any ``-p NAME VALUE`` given here), into ``_build/src/book/``, and —
   under the default parameters — compares the outputs of cells tagged ``regression``
   with ``book/expected/`` (:mod:`check_drift`);
3. builds the book from ``_build/src`` with Jupyter Book, execution off and warnings as
   errors; the HTML lands in ``_build/html``.

A chapter that fails stops the run; its failing cell and traceback are printed, and the
executed notebook (with the error in place) is kept in ``_build/src/book/``.

Usage::

    python tools/run_book.py [--profile auto|smoke|cpu|full] [--chapters 01_data ...]
                             [-p NAME VALUE ...] [--no-build]
"""

from __future__ import annotations

import argparse
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


def execute(chapters: list[str], parameters: dict, timings: dict, drift: bool = True) -> None:
    import papermill as pm

    for chapter in chapters:
        source = ROOT / f"{chapter}.ipynb"
        target = SRC / f"{chapter}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"--- executing {chapter} with {parameters}", flush=True)
        start = time.perf_counter()
        try:
            pm.execute_notebook(
                source,
                target,
                parameters=parameters,
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


def build() -> None:
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(ROOT / name, SRC / name)
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
    print(f"--- the book: {html / 'index.html'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="auto", choices=["auto", "smoke", "cpu", "full"])
    parser.add_argument("--chapters", nargs="*", help="chapter names, e.g. 01_data (default: all)")
    parser.add_argument(
        "-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="extra parameter for every chapter",
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
    timings: dict[str, float] = {}
    # Outputs that must not drift are checked under the default parameters only.
    execute(chapters, parameters, timings, drift=not args.p)
    BUILD.mkdir(exist_ok=True)
    (BUILD / "timings.json").write_text(
        json.dumps({"parameters": parameters, "seconds": timings}, indent=2) + "\n"
    )
    if not args.no_build:
        build()


if __name__ == "__main__":
    main()
