"""Read the built book in headless Chromium, page by page, as a reader would, offline.

Every page of ``_build/html`` is served from 127.0.0.1 (a free port) and opened in
Debian's Chromium, driven by Playwright. The reader

- screenshots the whole page into ``_build/screenshots/<page>.png``;
- fails on a JavaScript error or an error logged on the console;
- fails on any request that leaves the machine (the book must need no network);
- fails on a line of code cut off by the page column (a code cell wider than its box);
- on a page with formulas, waits until MathJax has typeset them (``mjx-container``
  elements, one per formula) and fails if it does not, or reports a TeX error.

``python tools/read_book.py [_build/html]`` prints every problem and exits 1 if there
is one; :func:`read` returns them. Without ``/usr/bin/chromium`` it says so and exits 0
(:func:`available`).
"""

from __future__ import annotations

import functools
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
#: Seconds a page may take to load and typeset its formulas.
DEADLINE = 60.0
#: The first line of every code cell wider than its box.
CUT_CODE = """() => Array.from(document.querySelectorAll("div.cell_input pre"))
    .filter(pre => pre.scrollWidth > pre.clientWidth + 1)
    .map(pre => pre.textContent.split("\\n")[0].slice(0, 60))"""
#: How a page's HTML marks a formula for MathJax (Sphinx's math nodes).
MATH_MARK = 'class="math notranslate nohighlight"'


def available() -> bool:
    """Whether Chromium and Playwright are here to read the book with."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return CHROMIUM.is_file()


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:
        pass


def _pages(html: Path) -> list[Path]:
    return sorted((html / "book").glob("*.html"))


def read(html: Path, shots: Path, *, deadline: float = DEADLINE) -> list[str]:
    """Open every page of the built book ``html`` and return the problems found.

    Parameters
    ----------
    html : pathlib.Path
        The built HTML book (with ``book/*.html`` pages).
    shots : pathlib.Path
        Folder for one full-page screenshot per page (made if missing).
    deadline : float, optional
        Seconds a page may take to load and typeset its formulas.

    Returns
    -------
    list of str
        One line per problem, naming the page; empty when every page reads well.
    """
    from playwright.sync_api import sync_playwright

    pages = _pages(html)
    if not pages:
        return [f"no chapter pages in {html / 'book'}"]
    shots.mkdir(parents=True, exist_ok=True)
    handler = functools.partial(_Quiet, directory=str(html))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    found: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="s2l-read-book-") as profile:
            with sync_playwright() as pw:
                context = pw.chromium.launch_persistent_context(
                    profile, executable_path=str(CHROMIUM), headless=True,
                    args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900},
                )  # fmt: skip
                try:
                    for page_path in pages:
                        found += _read_page(context, base, html, page_path, shots, deadline)
                finally:
                    context.close()
    finally:
        server.shutdown()
        server.server_close()
    return found


def _read_page(
    context, base: str, html: Path, page_path: Path, shots: Path, deadline: float
) -> list[str]:
    name = page_path.name
    problems: list[str] = []
    page = context.new_page()
    page.set_default_timeout(deadline * 1000)
    local = urlparse(base).netloc

    def route(request_route) -> None:
        url = urlparse(request_route.request.url)
        if url.scheme in ("http", "https") and url.netloc != local:
            problems.append(f"{name}: requests {request_route.request.url} from the network")
            request_route.abort()
        else:
            request_route.continue_()

    page.route("**/*", route)
    page.on("pageerror", lambda err: problems.append(f"{name}: JavaScript error: {err}"))
    page.on(
        "console",
        lambda msg: (
            problems.append(f"{name}: console error: {msg.text}") if msg.type == "error" else None
        ),
    )
    try:
        page.goto(f"{base}/{page_path.relative_to(html).as_posix()}", wait_until="load")
        cut = page.evaluate(CUT_CODE)
        if cut:
            problems.append(f"{name}: {len(cut)} code cell(s) cut off, e.g. {cut[0]!r}")
        formulas = page_path.read_text(encoding="utf-8").count(MATH_MARK)
        if formulas:
            problems += _typeset(page, name, formulas, deadline)
        page.screenshot(path=str(shots / f"{page_path.stem}.png"), full_page=True)
    finally:
        page.close()
    return problems


def _typeset(page, name: str, formulas: int, deadline: float) -> list[str]:
    """Wait until MathJax has typeset every formula of the page."""
    count = "() => document.querySelectorAll('mjx-container').length"
    end = time.monotonic() + deadline
    done = 0
    while time.monotonic() < end:
        done = page.evaluate(count)
        if done >= formulas:
            break
        page.wait_for_timeout(200)
    problems = []
    if done < formulas:
        problems.append(f"{name}: MathJax typeset {done} of its {formulas} formulas")
    errors = page.evaluate("() => document.querySelectorAll('mjx-merror').length")
    if errors:
        problems.append(f"{name}: {errors} formula(s) with TeX errors")
    return problems


def main() -> None:
    html = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "_build" / "html"
    if not available():
        print(f"read_book: no Chromium at {CHROMIUM} (or no Playwright): pages not read")
        return
    start = time.monotonic()
    found = read(html, html.parent / "screenshots")
    for problem in found:
        print(f"book reader: {problem}", file=sys.stderr)
    seconds = time.monotonic() - start
    print(f"--- read {len(_pages(html))} pages in Chromium in {seconds:.0f} s")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
