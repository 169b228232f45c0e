"""Check the built HTML book as a reader meets it, offline.

- no page shows papermill's injected parameters cell;
- no page loads a script or a style sheet from the network (formulas render offline:
  MathJax is served from the build; no widget manager from a CDN);
- every chapter executed from a notebook shows at least one figure;
- no table is empty, and no cell output is longer than :data:`MAX_OUTPUT_CHARS`
  characters of text, and no figure larger than :data:`MAX_FIGURE_BYTES`;
- the notebooks the download button serves are the chapters as written (no outputs);
- no page shows a progress bar or a raw ``PreparedDataset(...)`` repr with a cache path;
- the introduction carries the bibliography.

``python tools/check_book.py [_build/html]`` prints every problem and exits 1 if there
is one; :func:`problems` returns them.
"""

from __future__ import annotations

import re
import sys
from html.parser import HTMLParser
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
#: Scripts and style sheets a page loads.
LOADED = re.compile(r"<(?:script[^>]+src|link[^>]+href)=\"((?:https?:)?//[^\"]+)\"", re.IGNORECASE)
#: The longest text one cell output may show (a long table or log is a lab notebook).
MAX_OUTPUT_CHARS = 4000
#: The largest figure file a page may show.
MAX_FIGURE_BYTES = 1_000_000


class _Outputs(HTMLParser):
    """The text of every cell output of a page, and every table's number of data cells."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[str] = []
        self.tables: list[int] = []
        self._depth = 0  # nesting of <div> inside the current cell output
        self._in_output = False
        self._hidden = 0  # inside <style> or <script>: text that is not shown

    def handle_starttag(self, tag: str, attrs: list) -> None:
        classes = (dict(attrs).get("class") or "").split()
        if tag in ("style", "script"):
            self._hidden += 1
        elif tag == "div":
            if self._in_output:
                self._depth += 1
            elif "cell_output" in classes:
                self._in_output, self._depth = True, 1
                self.outputs.append("")
        elif tag == "table":
            self.tables.append(0)
        elif tag == "td" and self.tables:
            self.tables[-1] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script"):
            self._hidden = max(0, self._hidden - 1)
        elif tag == "div" and self._in_output:
            self._depth -= 1
            self._in_output = self._depth > 0

    def handle_data(self, data: str) -> None:
        if self._in_output and not self._hidden:
            self.outputs[-1] += data


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
        for src in LOADED.findall(text):
            found.append(f"{page.name}: loads {src} from the network")
        parsed = _Outputs()
        parsed.feed(text)
        for k, output in enumerate(parsed.outputs):
            if len(output) > MAX_OUTPUT_CHARS:
                found.append(
                    f"{page.name}: cell output {k + 1} shows {len(output)} characters "
                    f"(at most {MAX_OUTPUT_CHARS}): {output.strip()[:80]!r}"
                )
        for k, cells in enumerate(parsed.tables):
            if cells == 0:
                found.append(f"{page.name}: table {k + 1} is empty")
        figures = re.findall(r"<img[^>]+src=\"([^\"]+)\"", text)
        if (html / "_sources" / "book" / f"{page.stem}.ipynb").is_file() and not figures:
            found.append(f"{page.name}: a chapter without a figure")
        for src in figures:
            picture = (page.parent / src).resolve()
            if picture.is_file() and picture.stat().st_size > MAX_FIGURE_BYTES:
                size = picture.stat().st_size
                found.append(f"{page.name}: figure {src} has {size} bytes")
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
