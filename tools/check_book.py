"""Check the built HTML book as a reader meets it, offline.

- no page shows papermill's injected parameters cell;
- formulas render without a network: MathJax is served from the build;
- the notebooks the download button serves are the chapters as written (no outputs);
- no page shows a progress bar or a raw ``PreparedDataset(...)`` repr with a cache path;
- the introduction carries the bibliography.

``python tools/check_book.py [_build/html]`` prints every problem and exits 1 if there
is one; :func:`problems` returns them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
#: Text that must not appear on a page, with what it means.
FORBIDDEN = {
    "tag_injected-parameters": "papermill's injected parameters cell",
    "PreparedDataset('": "a raw repr with a cache path",
}
#: A progress bar's rate, as tqdm prints it.
PROGRESS = re.compile(r"\d(?:it/s|s/it)\]")
MATHJAX = re.compile(r"<script[^>]+src=\"([^\"]*mathjax[^\"]*)\"", re.IGNORECASE)


def problems(html: Path) -> list[str]:
    """Every problem of the built book in ``html`` (empty when there is none)."""
    found = []
    pages = sorted((html / "book").glob("*.html"))
    if not pages:
        return [f"no chapter pages in {html / 'book'}"]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for needle, what in FORBIDDEN.items():
            if needle in text:
                found.append(f"{page.name}: shows {what}")
        if PROGRESS.search(text):
            found.append(f"{page.name}: shows a progress bar")
        for src in MATHJAX.findall(text):
            if src.startswith(("http:", "https:", "//")):
                found.append(f"{page.name}: loads MathJax from the network ({src})")
    for notebook in sorted((html / "_sources").rglob("*.ipynb")):
        nb = nbformat.read(notebook, 4)
        if any(c.get("outputs") for c in nb.cells if c.cell_type == "code"):
            found.append(f"{notebook.name}: the download serves an executed copy")
    intro = html / "book" / "00_introduction.html"
    if intro.is_file() and "Scribble2Label: scribble-supervised" not in intro.read_text():
        found.append(f"{intro.name}: no bibliography")
    return found


def main() -> None:
    html = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "_build" / "html"
    found = problems(html)
    for problem in found:
        print(f"book check: {problem}", file=sys.stderr)
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
