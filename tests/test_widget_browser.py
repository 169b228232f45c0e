"""The scribble widget end to end: JupyterLab, a kernel and headless Chromium.

The test starts a JupyterLab server on 127.0.0.1 (free port, token, temporary root,
settings, workspace, runtime, config and data folders), writes a notebook that opens a
:class:`~s2l_core.widgets.ScribbleSession` on a synthetic 16-bit image with scribbles
imported from a napari label layer, runs it in Chromium (driven by Playwright), then
draws with the mouse: a foreground stroke, a background stroke, a foreground stroke
that is undone, redone and undone again, an eraser stroke after zooming in; then it
clears everything and undoes that. After each edit it compares the mask the kernel
holds (the notebook writes it on every edit) with the same strokes rasterised in Python
by :func:`s2l_core.widgets.paint_stroke`: they must be equal pixel for pixel. Every wait
polls with a deadline; nothing sleeps for a fixed time.

Why no tolerance is needed: the brush paints the pixels whose centre lies within
``brush_size / 2`` of the stroke's polyline, so the result depends on the polyline only,
not on how densely the browser sampled the pointer. The page receives the positions
through page coordinates, kept by Chromium as 32-bit floats, so its polyline differs
from the test's by about 1e-5 image pixels. The test checks that (every sampled position
and every vertex within :data:`MARGIN` of the intended stroke) and that no pixel centre
lies within :data:`MARGIN` of a brush edge, which makes the two masks identical.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool

from s2l_core.files import atomic_path, read_image, write_image
from s2l_core.scribbles import BACKGROUND, FOREGROUND, UNLABELLED, read_scribble
from s2l_core.widgets import paint_stroke, rasterize_stroke

# The same browser, with the same offline flags, as the book's reader.
_READER = load_tool("read_book")
CHROMIUM, CHROMIUM_ARGS = _READER.CHROMIUM, _READER.CHROMIUM_ARGS
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "widget.png"
#: Deadline of every wait, generous for a loaded two-core machine.
DEADLINE = 120.0
#: No pixel centre may lie closer than this (image pixels) to a brush edge.
MARGIN = 0.01

SHAPE = (160, 200)  # (H, W) of the synthetic image

# Strokes in image coordinates (x along columns, y along rows): (tool, brush, vertices).
STROKE_FG = ("foreground", 9, [(30.3, 40.5), (90.2, 52.6), (120.4, 100.9)])
STROKE_BG = ("background", 7, [(20.0, 130.0), (171.2, 121.1), (180.3, 30.1)])
STROKE_UNDONE = ("foreground", 11, [(60.4, 148.7), (149.7, 70.6)])
STROKE_ERASE = ("erase", 5, [(74.9, 25.5), (95.5, 138.7)])
VALUE = {"foreground": FOREGROUND, "background": BACKGROUND, "erase": UNLABELLED}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
    ),
]


# ------------------------------------------------------------------------------ helpers


def wait_for(condition: Callable[[], object], what: str, diagnose=None, deadline=DEADLINE):
    """Poll ``condition`` until it returns something truthy; fail after ``deadline`` s."""
    end = time.monotonic() + deadline
    delay = 0.05
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            details = f"\n{diagnose()}" if diagnose else ""
            pytest.fail(f"timed out after {deadline:.0f} s waiting for {what}{details}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def distance_to_polyline(points, shape=None, queries=None) -> np.ndarray:
    """Distance to a polyline of every pixel centre (``(H, W)``) or of ``queries`` (``(N,)``)."""
    if queries is None:
        cy, cx = np.mgrid[: shape[0], : shape[1]] + 0.5
    else:
        cx, cy = np.asarray(queries, float).T
    best = np.full(cx.shape, np.inf)
    pts = np.asarray(points, float)
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((cx - x0) * dx + (cy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        best = np.minimum(best, np.hypot(cx - (x0 + t * dx), cy - (y0 + t * dy)))
    return best


def synthetic_image() -> np.ndarray:
    """A 16-bit fluorescence-like image: a chain of touching nuclei under the foreground
    stroke, a few scattered nuclei, none near the background scribbles."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(7)
    h, w = SHAPE
    yy, xx = np.mgrid[:h, :w] + 0.5
    fg = np.asarray(STROKE_FG[2])
    centres = [
        tuple(a + t * (b - a))
        for a, b in itertools.pairwise(fg)
        for t in np.linspace(0, 1, int(np.hypot(*(b - a)) // 16) + 1, endpoint=False)
    ]
    centres += [tuple(fg[-1]), (140.0, 75.5)]
    while len(centres) < 26:
        x, y = rng.uniform(12, w - 12), rng.uniform(12, h - 12)
        near_bg = distance_to_polyline(STROKE_BG[2], queries=[(x, y)])[0] < 18 or (
            y < 26 and x > 138
        )
        crowded = min(np.hypot(x - cx, y - cy) for cx, cy in centres) < 20
        if not (near_bg or crowded):
            centres.append((x, y))
    texture = ndi.gaussian_filter(rng.normal(0, 1, SHAPE), 1.5)
    nuclei = np.zeros(SHAPE)
    for cx, cy in centres:
        radius, squash, angle = rng.uniform(6.5, 9), rng.uniform(0.75, 1.0), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = ((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle)) / squash
        inside = 1 / (1 + np.exp(np.clip((np.hypot(u, v) - radius) / 0.8, -50, 50)))
        nuclei = np.maximum(nuclei, rng.uniform(15000, 28000) * inside * (1 + 0.25 * texture))
    image = 2500 + nuclei + rng.normal(0, 250, SHAPE)
    return np.clip(image, 0, 65535).astype(np.uint16)


def napari_labels() -> np.ndarray:
    """A label layer as napari / ilastik save it: 0 unlabelled, 1 background, 2 foreground."""
    labels = np.zeros(SHAPE, np.uint8)
    labels[10:14, 150:190] = 1  # a background line, top right
    labels[74:77, 135:146] = 2  # a short foreground line across a nucleus
    return labels


NOTEBOOK_CODE = """\
import os
from pathlib import Path

import numpy as np

from s2l_core.widgets import ScribbleSession

out = Path({out!r})
session = ScribbleSession({images!r}, {scribbles!r}, brush_size=3)
session.import_labels({labels!r})
widget = session.widget
image = widget.image.astype(float)
widget.set_prediction((image - image.min()) / (image.max() - image.min()))
widget.show_prediction = False


def report(w):
    # One file, replaced atomically: the mask and how many edits it includes.
    tmp = out / "state.tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, mask=w.scribble, edits=w.edit_count)
    os.replace(tmp, out / "state.npz")


widget.on_edit(report)
report(widget)
session
"""


def write_notebook(path: Path, code: str) -> None:
    notebook = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "scribble-widget",
                "metadata": {},
                "outputs": [],
                "source": code.splitlines(keepends=True),
            }
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook, indent=1), encoding="utf-8")


def publish_screenshot(shot: Path) -> None:
    """Move a screenshot to :data:`SCREENSHOT`, atomically, unless the picture is the same.

    Two runs give the same picture up to the anti-aliasing of a few pixels (seen: 3
    pixels at a rounded button corner) and different PNG bytes; leaving the picture
    alone then keeps the working tree clean.
    """
    new = read_image(shot)
    if SCREENSHOT.is_file():
        with contextlib.suppress(ValueError):
            old = read_image(SCREENSHOT)
            if old.shape == new.shape and np.count_nonzero((old != new).any(axis=-1)) <= 50:
                return
    with atomic_path(SCREENSHOT) as tmp:
        shutil.copyfile(shot, tmp)
        tmp.chmod(0o644)  # mkstemp makes files private; this is a public figure


# ------------------------------------------------------------------------------ server


class LabServer:
    """A JupyterLab server in temporary folders, stopped (with its kernels) on exit."""

    def __init__(self, base: Path):
        self.base = base
        self.root = base / "root"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "server.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LabServer:
        dirs = {name: self.base / name for name in ("settings", "workspaces", "runtime")}
        dirs |= {name: self.base / name for name in ("config", "data", "ipython")}
        for folder in [self.root, *dirs.values()]:
            folder.mkdir(parents=True, exist_ok=True)
        # No news or update checks (there is no internet) and no notification toasts.
        notification = dirs["settings"] / "@jupyterlab" / "apputils-extension"
        notification.mkdir(parents=True)
        (notification / "notification.jupyterlab-settings").write_text(
            json.dumps({"checkForUpdates": False, "fetchNews": "false", "doNotDisturbMode": True})
        )
        env = os.environ.copy()
        env.update(
            JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
            JUPYTER_CONFIG_DIR=str(dirs["config"]),
            JUPYTER_DATA_DIR=str(dirs["data"]),
            IPYTHONDIR=str(dirs["ipython"]),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONUNBUFFERED="1",
        )
        command = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.allow_root=True",
            "--LabApp.expose_app_in_browser=True",
            f"--LabApp.user_settings_dir={dirs['settings']}",
            f"--LabApp.workspaces_dir={dirs['workspaces']}",
            "--LabApp.extension_manager=readonly",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
        ]
        self._log = open(self.log_path, "wb")  # closed in __exit__
        self.process = subprocess.Popen(
            command, cwd=self.root, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        wait_for(self._answers, "the JupyterLab server to answer /api/status", self.log_tail)
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"jupyter lab exited with {self.process.returncode}\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(self.api_request("/api/status"), timeout=5) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def api_request(self, path: str, method: str = "GET") -> urllib.request.Request:
        return urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )

    def log_tail(self, n: int = 4000) -> str:
        try:
            return "server log (end):\n" + self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            # /api/shutdown stops the kernels too; terminate/kill only if it does not end.
            with contextlib.suppress(urllib.error.URLError, OSError):
                urllib.request.urlopen(self.api_request("/api/shutdown", "POST"), timeout=10)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
        self._log.close()


# -------------------------------------------------------------------------------- test


def test_strokes_in_chromium_reach_the_kernel_pixel_for_pixel(tmp_path):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    h, w = SHAPE

    # Every stroke must keep pixel centres away from brush edges (see the module docstring).
    for tool, brush, points in (STROKE_FG, STROKE_BG, STROKE_UNDONE, STROKE_ERASE):
        gap = np.abs(distance_to_polyline(points, SHAPE) - brush / 2).min()
        assert gap > MARGIN, f"{tool} stroke passes {gap:.4f} px from a pixel centre"

    with LabServer(tmp_path / "lab") as server:
        data = server.root / "data"
        images, scribbles, labels, out = (
            data / name for name in ("images", "scribbles", "labels", "out")
        )
        for folder in (images, scribbles, labels, out):
            folder.mkdir(parents=True)
        write_image(images / "cells_a.tif", synthetic_image())
        write_image(images / "cells_b.tif", synthetic_image()[::-1].copy())
        write_image(labels / "cells_a.png", napari_labels())
        code = NOTEBOOK_CODE.format(
            out=str(out), images=str(images), scribbles=str(scribbles), labels=str(labels)
        )
        write_notebook(server.root / "scribble_widget.ipynb", code)
        state_path = out / "state.npz"

        def kernel_state():
            try:
                with np.load(state_path) as state:
                    return int(state["edits"]), state["mask"].copy()
            except (OSError, ValueError, KeyError):
                return None

        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium"),
                executable_path=str(CHROMIUM),
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 1000},
                device_scale_factor=1,
            )
            try:
                page = context.new_page()
                page.set_default_timeout(DEADLINE * 1000)
                console: list[str] = []
                page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
                page.on("pageerror", lambda err: console.append(f"page error: {err}"))

                def diagnose() -> str:
                    try:
                        outputs = page.locator(".jp-OutputArea-output").all_inner_texts()
                    except Exception as err:  # the page itself may be the problem
                        outputs = [f"(cannot read the outputs: {err})"]
                    return "\n".join(
                        [
                            "cell outputs:",
                            *outputs,
                            "browser console (end):",
                            *console[-20:],
                            server.log_tail(),
                        ]
                    )

                page.goto(f"{server.url}/lab/tree/scribble_widget.ipynb?token={server.token}")
                kernel_idle = """() => {
                    const app = window.jupyterapp;
                    const panel = app && app.shell && app.shell.currentWidget;
                    const kernel = panel && panel.sessionContext
                        && panel.sessionContext.session && panel.sessionContext.session.kernel;
                    return Boolean(kernel && kernel.status === "idle"
                        && panel.content && panel.content.widgets.length > 0);
                }"""

                def evaluate(script: str):
                    try:
                        return page.evaluate(script)
                    except PlaywrightError:  # e.g. the page is still loading
                        return None

                wait_for(lambda: evaluate(kernel_idle), "the notebook's kernel to idle", diagnose)
                page.evaluate(
                    "() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }"
                )
                widget = page.locator(".s2l-widget")
                wait_for(
                    lambda: widget.count() == 1 and widget.get_attribute("data-ready") == "true",
                    "the widget to show its image",
                    diagnose,
                )
                widget.scroll_into_view_if_needed()

                # The imported napari scribbles are in the kernel and on the canvas.
                expected = np.full(SHAPE, UNLABELLED, np.uint8)
                expected[10:14, 150:190] = BACKGROUND
                expected[74:77, 135:146] = FOREGROUND
                edits = 0
                report: list[str] = []

                def kernel_has(n_edits: int, mask: np.ndarray, what: str) -> None:
                    state = wait_for(
                        lambda: (s := kernel_state()) and s[0] >= n_edits and s,
                        f"edit {n_edits} ({what}) to reach the kernel",
                        diagnose,
                    )
                    assert state[0] == n_edits, f"{what}: the kernel saw {state[0]} edits"
                    got = state[1]
                    if not np.array_equal(got, mask):
                        diff = np.argwhere(got != mask)
                        last = widget.get_attribute("data-last-stroke")
                        pytest.fail(
                            f"{what}: {len(diff)} pixels differ, e.g. (row, col) "
                            f"{diff[:10].tolist()}; kernel {got[tuple(diff[0])]} vs expected "
                            f"{mask[tuple(diff[0])]}; browser's last stroke: {last}"
                        )

                kernel_has(0, expected, "the imported scribbles")

                def counts_shown() -> tuple[int, int]:
                    counts = widget.locator(".s2l-counts")
                    return (
                        int(counts.get_attribute("data-foreground")),
                        int(counts.get_attribute("data-background")),
                    )

                assert counts_shown() == (
                    np.count_nonzero(expected == FOREGROUND),
                    np.count_nonzero(expected == BACKGROUND),
                )

                def choose(tool: str, brush: int) -> None:
                    widget.locator(f'button[data-tool="{tool}"]').click()
                    number = widget.locator("input.s2l-brush-number")
                    number.fill(str(brush))
                    wait_for(
                        lambda: (
                            widget.get_attribute("data-tool") == tool
                            and widget.get_attribute("data-brush") == str(brush)
                        ),
                        f"tool {tool} with brush {brush}",
                        diagnose,
                    )

                def draw(points) -> int:
                    box = widget.locator("canvas.s2l-scribbles").bounding_box()
                    view = widget.locator(".s2l-viewport").bounding_box()

                    def to_page(x: float, y: float) -> tuple[float, float]:
                        px = box["x"] + x * box["width"] / w
                        py = box["y"] + y * box["height"] / h
                        assert view["x"] < px < view["x"] + view["width"], "outside the view"
                        assert view["y"] < py < view["y"] + view["height"], "outside the view"
                        return px, py

                    page.mouse.move(*to_page(*points[0]))
                    page.mouse.down()
                    moves = 1
                    previous = to_page(*points[0])
                    for point in points[1:]:
                        target = to_page(*point)
                        steps = max(8, int(np.hypot(*np.subtract(target, previous)) / 6))
                        page.mouse.move(*target, steps=steps)
                        previous = target
                        moves += steps
                    page.mouse.up()
                    return moves

                def stroke(spec, what: str) -> None:
                    nonlocal expected, edits
                    tool, brush, points = spec
                    choose(tool, brush)
                    moves = draw(points)
                    expected = paint_stroke(expected, points, VALUE[tool], brush)
                    edits += 1
                    kernel_has(edits, expected, what)
                    # How far the positions the page received lie from the intended stroke.
                    sampled = json.loads(widget.get_attribute("data-last-stroke"))["points"]
                    off_line = distance_to_polyline(points, queries=sampled).max()
                    corners = max(
                        np.hypot(*(np.asarray(sampled) - vertex).T).min() for vertex in points
                    )
                    deviation = max(off_line, corners)
                    assert deviation < MARGIN, f"{what}: the page's stroke is {deviation} px off"
                    report.append(
                        f"{what}: {len(sampled)} samples ({moves} moves), {deviation:.1e} px"
                    )

                stroke(STROKE_FG, "foreground stroke")
                stroke(STROKE_BG, "background stroke")

                def press(action: str, mask: np.ndarray) -> None:
                    nonlocal expected, edits
                    widget.locator(f'button[data-action="{action}"]').click()
                    expected = mask
                    edits += 1
                    kernel_has(edits, expected, action)

                before_undone = expected
                stroke(STROKE_UNDONE, "second foreground stroke")
                with_undone = expected
                press("undo", before_undone)
                press("redo", with_undone)
                press("undo", before_undone)

                # Zoomed in, the page-to-image mapping changes; the mask must not.
                widget.locator('button[data-action="zoom-in"]').click()
                wait_for(
                    lambda: (
                        widget.locator("canvas.s2l-scribbles").bounding_box()["width"] > 1.2 * w * 3
                    ),
                    "the zoom",
                    diagnose,
                )
                stroke(STROKE_ERASE, "eraser stroke (zoomed in)")

                # The erased stroke really removed labels from both classes.
                erased = rasterize_stroke(STROKE_ERASE[2], STROKE_ERASE[1], SHAPE)
                assert (before_undone[erased] == FOREGROUND).any()
                assert (before_undone[erased] == BACKGROUND).any()

                erased_state = expected
                press("clear", np.full(SHAPE, UNLABELLED, np.uint8))
                press("undo", erased_state)

                # What the page counts, the kernel holds, and the session saved agree.
                wait_for(
                    lambda: (
                        counts_shown()
                        == (
                            np.count_nonzero(expected == FOREGROUND),
                            np.count_nonzero(expected == BACKGROUND),
                        )
                    ),
                    "the counts shown to match",
                    diagnose,
                )
                saved = read_scribble(scribbles / "cells_a.png", SHAPE)
                assert np.array_equal(saved, expected)

                # Wheel zoom, a drag with the pan tool and an overlay toggle edit nothing.
                def canvas_box() -> dict:
                    return widget.locator("canvas.s2l-scribbles").bounding_box()

                view = widget.locator(".s2l-viewport").bounding_box()
                centre = (view["x"] + view["width"] / 2, view["y"] + view["height"] / 2)
                width_before = canvas_box()["width"]
                page.mouse.move(*centre)
                page.mouse.wheel(0, -300)
                wait_for(
                    lambda: canvas_box()["width"] > 1.5 * width_before, "the wheel zoom", diagnose
                )
                widget.locator('button[data-tool="pan"]').click()
                left, top = canvas_box()["x"], canvas_box()["y"]
                page.mouse.move(*centre)
                page.mouse.down()
                page.mouse.move(centre[0] + 60, centre[1] + 40, steps=5)
                page.mouse.up()
                wait_for(
                    lambda: (
                        abs(canvas_box()["x"] - left - 60) < 0.5
                        and abs(canvas_box()["y"] - top - 40) < 0.5
                    ),
                    "the pan",
                    diagnose,
                )
                uncertainty = widget.locator("canvas.s2l-uncertainty")
                widget.locator('input[data-overlay="uncertainty"]').check()
                wait_for(
                    lambda: uncertainty.evaluate("c => c.style.visibility") == "visible",
                    "the uncertainty overlay",
                    diagnose,
                )
                widget.locator('input[data-overlay="uncertainty"]').uncheck()
                assert kernel_state()[0] == edits

                # A picture for the README and the book: fitted, the pointer away.
                widget.locator('button[data-action="fit"]').click()
                widget.locator('button[data-tool="foreground"]').click()
                page.mouse.move(5, 5)
                evaluate("() => document.activeElement && document.activeElement.blur()")
                wait_for(
                    lambda: not widget.locator(".s2l-cursor").is_visible(),
                    "the brush cursor to hide",
                    diagnose,
                )
                output = page.locator(".jp-OutputArea-output", has=widget)
                shot = tmp_path / "widget.png"
                output.screenshot(path=str(shot))
                publish_screenshot(shot)
                assert kernel_state()[0] == edits  # no edit besides those drawn
                elapsed = time.monotonic() - started
            finally:
                context.close()

    print("\n".join(report))
    print(f"browser test: {elapsed:.1f} s from the server's start to the screenshot")
    assert SCREENSHOT.is_file()
