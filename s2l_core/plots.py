"""Figures with the book's colour convention.

Everywhere in the book, foreground scribbles are :data:`FG_COLOUR` (orange) and
background scribbles :data:`BG_COLOUR` (blue); nucleus outlines are green (:data:`OUTLINE_COLOUR`).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgb
from skimage.segmentation import find_boundaries

from s2l_core.encoding import BACKGROUND, FOREGROUND

__all__ = ["BG_COLOUR", "FG_COLOUR", "outline", "show_image", "show_profile", "show_scribbles"]

FG_COLOUR = "#ff7f0e"
BG_COLOUR = "#1f77b4"
OUTLINE_COLOUR = "lime"


def outline(image: np.ndarray, labels: np.ndarray, colour: str = OUTLINE_COLOUR) -> np.ndarray:
    """Draw the outline of every labelled object onto a copy of an RGB image.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` ``uint8`` RGB or ``(H, W)`` grey image.
    labels : numpy.ndarray
        ``(H, W)`` instance labels (0 background).
    colour : str, optional
        Matplotlib colour of the outlines.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` ``uint8`` image with outlines.
    """
    rgb = _rgb(image)
    rgb[find_boundaries(labels, mode="inner")] = np.array(to_rgb(colour)) * 255
    return rgb


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    image = image[..., :3]
    if image.dtype != np.uint8:
        lo, hi = np.percentile(image, (0.5, 99.5))
        image = np.clip((image - lo) / max(hi - lo, 1e-9) * 255, 0, 255).astype(np.uint8)
    return image.copy()


def show_image(ax, image: np.ndarray, title: str = "", labels: np.ndarray | None = None) -> None:
    """Show an image (with optional nucleus outlines) on a matplotlib axis, no ticks."""
    ax.imshow(outline(image, labels) if labels is not None else _rgb(image))
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def show_scribbles(
    ax, image: np.ndarray, scribble: np.ndarray, title: str = "", thicken: int = 1
) -> None:
    """Show an image with its foreground and background scribbles in the book's colours.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw.
    image : numpy.ndarray
        ``(H, W, 3)`` or ``(H, W)`` image.
    scribble : numpy.ndarray
        ``(H, W)`` scribble image (0 background, 1 foreground, 250 unlabelled).
    title : str, optional
        Axis title.
    thicken : int, optional
        Dilate the one-pixel scribbles by this many pixels for visibility.
    """
    from scipy import ndimage as ndi

    rgb = _rgb(image) // 2
    for value, colour in ((BACKGROUND, BG_COLOUR), (FOREGROUND, FG_COLOUR)):
        mask = scribble == value
        if thicken:
            mask = ndi.binary_dilation(mask, iterations=thicken)
        rgb[mask] = np.array(to_rgb(colour)) * 255
    ax.imshow(rgb)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def show_profile(ax, values: np.ndarray, masks: dict[str, np.ndarray], title: str = "") -> None:
    """Plot grey values along a line, with where each mask covers it shaded beneath.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw.
    values : numpy.ndarray
        ``(L,)`` grey values or ``(L, C)`` colours (averaged over channels).
    masks : dict of str to numpy.ndarray
        ``(L,)`` masks or label rows (covered where ``> 0``), by legend name; each is
        shaded a little lower than the one before, so that they stay apart.
    title : str, optional
        Axis title.
    """
    values = np.asarray(values, dtype=float)
    if values.ndim == 2:
        values = values.mean(axis=1)
    top = values.max() if values.size and values.max() > 0 else 1.0
    x = np.arange(len(values))
    for k, (name, mask) in enumerate(masks.items()):
        height = top * (1.0 - 0.15 * k)
        ax.fill_between(x, 0, height * (np.asarray(mask) > 0), alpha=0.3, step="mid", label=name)
    ax.plot(x, values, color="0.2", label="grey value")
    ax.set(title=title, xlabel="pixel along the line", ylabel="grey value")
    ax.legend(fontsize=8)


def figure_grid(n: int, ncols: int = 3, size: float = 3.2):
    """A figure with ``n`` axes in rows of ``ncols``; unused axes hidden."""
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_axis_off()
    return fig, list(axes.flat[:n])


def draw_overview(fg_colour: str = FG_COLOUR, bg_colour: str = BG_COLOUR):
    """Draw the Scribble2Label training loop as a diagram; return the figure."""
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.set_xlim(0, 10.5)
    ax.set_ylim(0, 3.6)
    ax.set_axis_off()
    boxes = {
        "image": (0.2, 2.2, "image"),
        "scribbles": (0.2, 0.4, "scribbles\n(few pixels)"),
        "net": (3.0, 1.3, "U-Net"),
        "pce": (5.8, 2.4, "partial CE\n(scribbled pixels)"),
        "ema": (5.8, 0.2, "EMA store\nema ← α·p + (1−α)·ema"),
        "pseudo": (8.2, 1.3, "pseudo-labels\nema > τ or < 1−τ"),
    }
    centre = {}
    for key, (x, y, text) in boxes.items():
        width, height = (2.0, 1.0) if key != "ema" else (2.2, 1.0)
        colour = {"scribbles": fg_colour, "pseudo": bg_colour}.get(key, "#dddddd")
        ax.add_patch(
            FancyBboxPatch(
                (x, y), width, height, boxstyle="round,pad=0.05", fc=colour, ec="black", alpha=0.8
            )
        )
        ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=9)
        centre[key] = (x + width / 2, y + height / 2)
    for a, b, label in [
        ("image", "net", ""),
        ("net", "pce", "logits"),
        ("scribbles", "pce", ""),
        ("net", "ema", "every k epochs"),
        ("ema", "pseudo", ""),
        ("pseudo", "net", "λ · CE after warm-up"),
    ]:
        arrow = FancyArrowPatch(
            centre[a],
            centre[b],
            arrowstyle="-|>",
            mutation_scale=14,
            lw=1.2,
            shrinkA=28,
            shrinkB=28,
        )
        ax.add_patch(arrow)
        if label:
            mx, my = (centre[a][0] + centre[b][0]) / 2, (centre[a][1] + centre[b][1]) / 2
            ax.text(mx, my + 0.12, label, ha="center", fontsize=8, style="italic")
    ax.set_title("Scribble2Label: training from scribbles and confident, time-averaged predictions")
    return fig
