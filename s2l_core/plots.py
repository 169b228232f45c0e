"""Figures with the book's colour convention.

Everywhere in the book, foreground scribbles are :data:`FG_COLOUR` (orange) and
background scribbles :data:`BG_COLOUR` (blue), and these two colours mean nothing else:
pseudo-labels are pale tints of them, nucleus outlines are green (:data:`OUTLINE_COLOUR`),
errors have their own colours (:data:`ERROR_COLOURS`), and curves and bars take the
colours of :data:`SERIES_COLOURS` (:func:`book_style` makes them matplotlib's cycle).
Maps of values (probabilities, EMA maps) carry a colourbar (:func:`show_map`).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgb
from skimage.segmentation import find_boundaries

from s2l_core.encoding import BACKGROUND, FOREGROUND

__all__ = [
    "BG_COLOUR",
    "ERROR_COLOURS",
    "FG_COLOUR",
    "SERIES_COLOURS",
    "book_style",
    "error_image",
    "outline",
    "show_errors",
    "show_image",
    "show_map",
    "show_pieces",
    "show_profile",
    "show_pseudo_labels",
    "show_scribbles",
]

FG_COLOUR = "#ff7f0e"
BG_COLOUR = "#1f77b4"
OUTLINE_COLOUR = "lime"
#: Curves, bars and points: matplotlib's tab10 without its orange and blue.
SERIES_COLOURS = (
    "#2ca02c", "#9467bd", "#7f7f7f", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#d62728",
)  # fmt: skip
#: Pixels a prediction gets wrong: foreground where the truth has none (false positive),
#: and true foreground it misses (false negative); correct foreground is shown light.
ERROR_COLOURS = {
    "correct foreground": "#e0e0e0",
    "false positive": "#e7298a",
    "false negative": "#ffe119",
}


def book_style() -> None:
    """Make :data:`SERIES_COLOURS` matplotlib's colour cycle (orange and blue stay the
    scribbles' own)."""
    from cycler import cycler

    plt.rcParams["axes.prop_cycle"] = cycler(color=list(SERIES_COLOURS))


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


def _show(ax, picture: np.ndarray, title: str) -> None:
    """Show an RGB picture on an axis, with a title and no ticks."""
    ax.imshow(picture)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def show_image(ax, image: np.ndarray, title: str = "", labels: np.ndarray | None = None) -> None:
    """Show an image (with optional nucleus outlines) on a matplotlib axis, no ticks."""
    _show(ax, outline(image, labels) if labels is not None else _rgb(image), title)


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
    _show(ax, rgb, title)


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
        colour = {"scribbles": fg_colour, "pseudo": "#d9f0d3"}.get(key, "#dddddd")
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


def show_map(
    ax,
    values: np.ndarray,
    title: str = "",
    *,
    label: str = "foreground probability",
    cmap: str = "magma",
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> None:
    """Show a map of values (a probability, an EMA map, an uncertainty) with a colourbar.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw.
    values : numpy.ndarray
        ``(H, W)`` values.
    title : str, optional
        Axis title.
    label : str, optional
        What the colourbar measures.
    cmap : str, optional
        Matplotlib colour map.
    vmin, vmax : float, optional
        The values at the ends of the colour map.
    """
    shown = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    bar = ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def show_pieces(ax, image: np.ndarray, pieces: np.ndarray, title: str = "") -> None:
    """Show labelled skeleton pieces drawn on a dimmed image, each piece in its own
    colour of :data:`SERIES_COLOURS` (thickened by one pixel to be seen).

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw.
    image : numpy.ndarray
        ``(H, W, 3)`` or ``(H, W)`` image.
    pieces : numpy.ndarray
        ``(H, W)`` integer labels of the pieces (0 where there is none).
    title : str, optional
        Axis title.
    """
    from skimage.segmentation import expand_labels

    rgb = _rgb(image) // 2
    thick = expand_labels(np.asarray(pieces), 1)
    palette = np.array([to_rgb(c) for c in SERIES_COLOURS]) * 255
    drawn = thick > 0
    rgb[drawn] = palette[(thick[drawn] - 1) % len(palette)]
    _show(ax, rgb, title)


def show_pseudo_labels(
    ax, image: np.ndarray, scribble: np.ndarray, targets: np.ndarray, title: str = ""
) -> None:
    """Show pseudo-labels as pale tints of the scribble colours, scribbles solid on top.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
        Where to draw.
    image : numpy.ndarray
        ``(H, W, 3)`` or ``(H, W)`` image.
    scribble : numpy.ndarray
        ``(H, W)`` scribbles (0 background, 1 foreground, 250 unlabelled).
    targets : numpy.ndarray
        ``(H, W)`` pseudo-label targets in the same encoding (250 where none).
    title : str, optional
        Axis title.
    """
    rgb = _rgb(image).astype(np.float32) / 2
    for value, colour in ((BACKGROUND, BG_COLOUR), (FOREGROUND, FG_COLOUR)):
        tint = np.asarray(targets) == value
        rgb[tint] = 0.6 * rgb[tint] + 0.4 * np.array(to_rgb(colour)) * 255
    for value, colour in ((BACKGROUND, BG_COLOUR), (FOREGROUND, FG_COLOUR)):
        rgb[np.asarray(scribble) == value] = np.array(to_rgb(colour)) * 255
    _show(ax, rgb.astype(np.uint8), title)


def error_image(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """An RGB picture of where a prediction is right and wrong, pixel by pixel.

    Correct foreground, false positives and false negatives take
    :data:`ERROR_COLOURS` over the dimmed image; the predicted nuclei are outlined in
    black, so that merged and split nuclei show too.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` or ``(H, W)`` image.
    predicted, truth : numpy.ndarray
        ``(H, W)`` instance labels (0 background).

    Returns
    -------
    numpy.ndarray
        ``(H, W, 3)`` ``uint8``.

    Raises
    ------
    ValueError
        If the shapes differ.
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    if predicted.shape != truth.shape or _rgb(image).shape[:2] != truth.shape:
        raise ValueError(
            f"image {np.shape(image)}, prediction {predicted.shape} and truth "
            f"{truth.shape} must have the same height and width"
        )
    rgb = _rgb(image) // 3
    fg, true = predicted > 0, truth > 0
    for name, mask in (
        ("correct foreground", fg & true),
        ("false positive", fg & ~true),
        ("false negative", ~fg & true),
    ):
        rgb[mask] = np.array(to_rgb(ERROR_COLOURS[name])) * 255
    rgb[find_boundaries(predicted, mode="inner")] = 0
    return rgb


def show_errors(
    ax, image: np.ndarray, predicted: np.ndarray, truth: np.ndarray, title: str = ""
) -> None:
    """Show :func:`error_image` on an axis, with a legend of the error colours below it."""
    from matplotlib.patches import Patch

    _show(ax, error_image(image, predicted, truth), title)
    handles = [Patch(facecolor=c, edgecolor="0.3", label=n) for n, c in ERROR_COLOURS.items()]
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=7,
        frameon=False, handlelength=1.2, columnspacing=0.8,
    )  # fmt: skip
