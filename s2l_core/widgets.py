"""Drawing scribbles in a notebook: an interactive widget and a session over a folder.

:class:`ScribbleWidget` shows an image (grey or RGB, 8- or 16-bit, any size; zoom with
the wheel or the buttons, pan with the pan tool, the middle button or Shift+drag) and
lets the user paint foreground and background scribbles, erase them, undo, redo and
clear. Drawing happens in the browser, on canvases; when a stroke ends the changed
rectangle of the mask is sent to the kernel once, as bytes, and
:attr:`ScribbleWidget.scribble` holds the result in the package's encoding
(:data:`~s2l_core.scribbles.BACKGROUND` 0, :data:`~s2l_core.scribbles.FOREGROUND` 1,
:data:`~s2l_core.scribbles.UNLABELLED` 250). The current prediction and its uncertainty
can be shown over the image (:meth:`ScribbleWidget.set_prediction`).

:class:`ScribbleSession` steps through a folder of images, saves each image's scribbles
as ``<scribbles_dir>/<image stem>.png`` (atomically, whenever a stroke ends or the image
changes), loads them back, and imports label layers drawn in napari or ilastik.

The brush model (:func:`rasterize_stroke`) is shared by the browser and Python: pixel
``(row, col)`` covers the square ``[col, col + 1) × [row, row + 1)`` of image
coordinates ``(x, y)``, and a stroke of brush size ``s`` paints every pixel whose centre
``(col + 0.5, row + 0.5)`` lies within ``s / 2`` of the stroke's polyline (a disc swept
along it). The union does not depend on how densely the pointer was sampled, so a
stroke can be reproduced exactly from its vertices.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import anywidget
import numpy as np
import traitlets
from matplotlib.colors import to_rgb
from PIL import Image

from s2l_core.augment import select_channel
from s2l_core.encoding import (
    BACKGROUND,
    FOREGROUND,
    UNLABELLED,
    from_napari,
    read_scribble,
    save_scribble,
    validate_scribble,
)
from s2l_core.files import IMAGE_SUFFIXES, read_image, write_image
from s2l_core.plots import BG_COLOUR, FG_COLOUR
from s2l_core.predict import uncertainty as uncertainty_map

__all__ = [
    "IMAGE_SUFFIXES",
    "LABEL_SUFFIXES",
    "MAX_BRUSH",
    "PREDICTION_COLOUR",
    "SCRIBBLE_OPACITY",
    "UNCERTAINTY_COLOUR",
    "ScribbleSession",
    "ScribbleWidget",
    "apply_edit",
    "compose_annotation",
    "decode_labels",
    "display_image",
    "encode_labels",
    "encode_png",
    "overlay_rgba",
    "paint_stroke",
    "prediction_probability",
    "rasterize_stroke",
    "uncertainty_map",
]

_log = logging.getLogger(__name__)

#: Colour of the prediction overlay (foreground probability as opacity).
PREDICTION_COLOUR = "#2ca02c"
#: Colour of the uncertainty overlay (uncertainty as opacity).
UNCERTAINTY_COLOUR = "#e040fb"
#: Opacity of the scribble layer over the image, in the browser and in snapshots.
SCRIBBLE_OPACITY = 0.85
#: Suffixes of napari / ilastik label files :meth:`ScribbleSession.import_labels` reads.
LABEL_SUFFIXES = (".png", ".tif", ".tiff")
#: Largest brush size (diameter in image pixels).
MAX_BRUSH = 512

_TOOLS = ("foreground", "background", "erase", "pan")
_ALLOWED = np.array([BACKGROUND, FOREGROUND, UNLABELLED], dtype=np.uint8)

# ------------------------------------------------------------------------- pure helpers


def display_image(image: np.ndarray) -> np.ndarray:
    """Check an image and convert it to 8 bits for display.

    ``uint8`` images are shown as they are; any other dtype (16-bit microscopy, floats) is
    stretched between its 0.5th and 99.5th percentiles, as the book's figures do.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` grey, ``(H, W, 1)`` grey, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA
        (alpha ignored) image of an integer or floating dtype.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` or ``(H, W, 3)`` ``uint8``.

    Raises
    ------
    ValueError
        If the shape is not one of the above, the image is empty, or the dtype is not a
        real number type (boolean, complex, object and string arrays are refused).
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
        raise ValueError(
            f"image must be (H, W) grey or (H, W, 3|4) colour, got shape {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.dtype == bool or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ValueError(f"image must have an integer or floating dtype, got {image.dtype}")
    if image.ndim == 3:
        image = image[..., :3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    values = image.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(image.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, (0.5, 99.5))
    scaled = (np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo) - lo) / max(hi - lo, 1e-12)
    return np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8)


def encode_png(array: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Encode a ``uint8`` ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array as PNG bytes."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def encode_labels(scribble: np.ndarray) -> bytes:
    """Serialise a scribble image for the browser: its ``uint8`` values, row by row.

    Parameters
    ----------
    scribble : numpy.ndarray
        ``(H, W)`` scribble image (0 background, 1 foreground, 250 unlabelled).

    Returns
    -------
    bytes
        ``H * W`` bytes in C order.
    """
    return np.ascontiguousarray(validate_scribble(scribble)).tobytes()


def decode_labels(data: bytes | memoryview, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`encode_labels`.

    Parameters
    ----------
    data : bytes or memoryview
        ``H * W`` bytes.
    shape : tuple of int
        ``(H, W)``.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``uint8`` scribble image (a fresh, writable copy).

    Raises
    ------
    ValueError
        If the length does not match the shape or a value is not 0, 1 or 250.
    """
    h, w = shape
    array = np.frombuffer(data, dtype=np.uint8)
    if array.size != h * w:
        raise ValueError(f"expected {h * w} bytes for a {h}×{w} mask, got {array.size}")
    return validate_scribble(array.reshape(h, w).copy())


def apply_edit(
    scribble: np.ndarray, content: dict[str, Any], buffers: Sequence[bytes | memoryview]
) -> np.ndarray:
    """Apply one edit message of the browser to a scribble image.

    The browser sends, once per finished stroke (and per undo, redo or clear), the
    rectangle of the mask that changed: ``content`` holds its position and size
    (``x``, ``y``, ``width``, ``height``, in pixels) and ``buffers[0]`` its
    ``width * height`` new values, row by row, in the scribble encoding.

    Parameters
    ----------
    scribble : numpy.ndarray
        ``(H, W)`` ``uint8`` current scribble image (not modified).
    content : dict
        The message: ``{"x": int, "y": int, "width": int, "height": int, ...}``.
    buffers : sequence of bytes-like
        One buffer with the rectangle's values.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``uint8`` new scribble image.

    Raises
    ------
    ValueError
        If the rectangle does not lie inside the image, the buffer has the wrong length,
        or it holds values other than 0, 1 and 250.
    """
    h, w = scribble.shape
    try:
        x, y = int(content["x"]), int(content["y"])
        width, height = int(content["width"]), int(content["height"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"edit message lacks a valid rectangle: {content!r}") from err
    if width < 1 or height < 1 or x < 0 or y < 0 or x + width > w or y + height > h:
        raise ValueError(
            f"edit rectangle x={x} y={y} width={width} height={height} "
            f"does not lie inside the {h}×{w} image"
        )
    if len(buffers) != 1:
        raise ValueError(f"edit message must carry one buffer, got {len(buffers)}")
    patch = decode_labels(buffers[0], (height, width))
    out = scribble.copy()
    out[y : y + height, x : x + width] = patch
    return out


def _as_points(points: Iterable[Sequence[float]]) -> np.ndarray:
    array = np.asarray(list(points) if not isinstance(points, np.ndarray) else points, float)
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] == 0:
        raise ValueError(f"points must be a non-empty sequence of (x, y), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("points must be finite")
    return array


def rasterize_stroke(
    points: Iterable[Sequence[float]], brush_size: float, shape: tuple[int, int]
) -> np.ndarray:
    """Pixels painted by one stroke: a disc of diameter ``brush_size`` swept along a polyline.

    This is the brush of the widget, computed with the same floating-point operations as
    its JavaScript. Pixel ``(r, c)`` is painted when its centre ``(c + 0.5, r + 0.5)``
    lies within ``brush_size / 2`` of one of the segments (a single point paints a disc).

    Parameters
    ----------
    points : sequence of (x, y)
        Vertices of the stroke in image coordinates (``x`` along columns, ``y`` along
        rows; pixel ``(r, c)`` spans ``[c, c + 1) × [r, r + 1)``).
    brush_size : float
        Brush diameter in image pixels, > 0.
    shape : tuple of int
        ``(H, W)`` of the image.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``bool``.
    """
    pts = _as_points(points)
    if not brush_size > 0:
        raise ValueError(f"brush_size must be > 0, got {brush_size}")
    h, w = shape
    radius = float(brush_size) / 2
    r2 = radius * radius
    mask = np.zeros((h, w), dtype=bool)
    segments = itertools.pairwise(pts) if len(pts) > 1 else [(pts[0], pts[0])]
    for (x0, y0), (x1, y1) in segments:
        c0 = max(0, int(np.floor(min(x0, x1) - radius - 0.5)))
        c1 = min(w - 1, int(np.ceil(max(x0, x1) + radius - 0.5)))
        r0 = max(0, int(np.floor(min(y0, y1) - radius - 0.5)))
        r1 = min(h - 1, int(np.ceil(max(y0, y1) + radius - 0.5)))
        if c0 > c1 or r0 > r1:
            continue
        cx = np.arange(c0, c1 + 1, dtype=np.float64)[None, :] + 0.5
        cy = np.arange(r0, r1 + 1, dtype=np.float64)[:, None] + 0.5
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy
        if length2 == 0:
            t = np.zeros((cy.shape[0], cx.shape[1]))
        else:
            t = np.clip(((cx - x0) * dx + (cy - y0) * dy) / length2, 0.0, 1.0)
        ex = cx - (x0 + t * dx)
        ey = cy - (y0 + t * dy)
        mask[r0 : r1 + 1, c0 : c1 + 1] |= ex * ex + ey * ey <= r2
    return mask


def paint_stroke(
    scribble: np.ndarray, points: Iterable[Sequence[float]], value: int, brush_size: float
) -> np.ndarray:
    """Paint one stroke onto a copy of a scribble image (as the widget's brush does).

    Parameters
    ----------
    scribble : numpy.ndarray
        ``(H, W)`` scribble image.
    points : sequence of (x, y)
        Stroke vertices in image coordinates (see :func:`rasterize_stroke`).
    value : int
        :data:`~s2l_core.scribbles.FOREGROUND`, :data:`~s2l_core.scribbles.BACKGROUND`,
        or :data:`~s2l_core.scribbles.UNLABELLED` (the eraser).
    brush_size : float
        Brush diameter in image pixels.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``uint8``.
    """
    scribble = validate_scribble(scribble)
    if value not in (BACKGROUND, FOREGROUND, UNLABELLED):
        raise ValueError(f"value must be 0, 1 or 250, got {value}")
    out = scribble.copy()
    out[rasterize_stroke(points, brush_size, scribble.shape)] = value
    return out


def prediction_probability(
    prediction: np.ndarray, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Turn a prediction into a foreground probability map.

    Parameters
    ----------
    prediction : numpy.ndarray
        ``(H, W)`` foreground probability (floating, values in [0, 1]) or label map
        (boolean or integer; foreground where > 0, probability 0 or 1).
    shape : tuple of int, optional
        Required ``(H, W)``.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` ``float32`` in [0, 1].

    Raises
    ------
    ValueError
        On a wrong shape or dtype, or floating values outside [0, 1] (or NaN).
    """
    prediction = np.asarray(prediction)
    if prediction.ndim != 2:
        raise ValueError(f"prediction must be 2-D (H, W), got shape {prediction.shape}")
    if shape is not None and prediction.shape != tuple(shape):
        raise ValueError(f"prediction has shape {prediction.shape}, the image {tuple(shape)}")
    if prediction.dtype == bool or np.issubdtype(prediction.dtype, np.integer):
        return (prediction > 0).astype(np.float32)
    if not np.issubdtype(prediction.dtype, np.floating):
        raise ValueError(f"prediction must be floating, integer or boolean, not {prediction.dtype}")
    if not np.isfinite(prediction).all() or prediction.min() < 0 or prediction.max() > 1:
        raise ValueError("a floating prediction must be a probability map with values in [0, 1]")
    return prediction.astype(np.float32)


def _check_unit_map(values: np.ndarray, shape: tuple[int, int], what: str) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != tuple(shape):
        raise ValueError(f"{what} has shape {values.shape}, the image {tuple(shape)}")
    if values.dtype == bool or not (
        np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
    ):
        raise ValueError(f"{what} must be numeric, not {values.dtype}")
    values = values.astype(np.float32)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ValueError(f"{what} must hold values in [0, 1]")
    return values


def overlay_rgba(values: np.ndarray, colour: str) -> np.ndarray:
    """A map in [0, 1] as one colour whose opacity is the value.

    Parameters
    ----------
    values : numpy.ndarray
        ``(H, W)`` floating map in [0, 1].
    colour : str
        Matplotlib colour.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 4)`` ``uint8`` RGBA; alpha is ``round(255 * value)``.
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.empty((*values.shape, 4), dtype=np.uint8)
    out[..., :3] = np.round(np.array(to_rgb(colour)) * 255).astype(np.uint8)
    out[..., 3] = np.clip(np.round(values * 255), 0, 255).astype(np.uint8)
    return out


def _blend(base: np.ndarray, rgba: np.ndarray, opacity: float) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float64) / 255 * float(opacity)
    return base * (1 - alpha) + rgba[..., :3].astype(np.float64) * alpha


def compose_annotation(
    image: np.ndarray,
    scribble: np.ndarray,
    *,
    prediction: np.ndarray | None = None,
    prediction_opacity: float = 0.5,
    uncertainty: np.ndarray | None = None,
    uncertainty_opacity: float = 0.6,
    scribble_opacity: float = SCRIBBLE_OPACITY,
    scale: int = 1,
) -> np.ndarray:
    """Picture of an annotation as the widget shows it: image, overlays, coloured scribbles.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` or ``(H, W, 3|4)`` image (any bit depth, see :func:`display_image`).
    scribble : numpy.ndarray
        ``(H, W)`` scribble image: foreground painted :data:`~s2l_core.plots.FG_COLOUR`,
        background :data:`~s2l_core.plots.BG_COLOUR`.
    prediction, uncertainty : numpy.ndarray, optional
        ``(H, W)`` maps in [0, 1] drawn in :data:`PREDICTION_COLOUR` and
        :data:`UNCERTAINTY_COLOUR` with the value as opacity.
    prediction_opacity, uncertainty_opacity, scribble_opacity : float, optional
        Opacity of each layer, as the widget's sliders.
    scale : int, optional
        Enlarge every pixel to a ``scale × scale`` block.

    Returns
    -------
    numpy.ndarray
        ``(H * scale, W * scale, 3)`` ``uint8`` RGB.
    """
    shown = display_image(image)
    scribble = validate_scribble(scribble, shown.shape[:2])
    rgb = shown if shown.ndim == 3 else np.repeat(shown[..., None], 3, axis=2)
    out = rgb.astype(np.float64)
    if prediction is not None:
        values = _check_unit_map(prediction, scribble.shape, "prediction")
        out = _blend(out, overlay_rgba(values, PREDICTION_COLOUR), prediction_opacity)
    if uncertainty is not None:
        values = _check_unit_map(uncertainty, scribble.shape, "uncertainty")
        out = _blend(out, overlay_rgba(values, UNCERTAINTY_COLOUR), uncertainty_opacity)
    layer = np.zeros((*scribble.shape, 4), dtype=np.uint8)
    for value, colour in ((FOREGROUND, FG_COLOUR), (BACKGROUND, BG_COLOUR)):
        layer[scribble == value] = (*np.round(np.array(to_rgb(colour)) * 255), 255)
    out = _blend(out, layer, scribble_opacity)
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if scale > 1:
        out = np.repeat(np.repeat(out, scale, axis=0), scale, axis=1)
    return out


# ------------------------------------------------------------------------------ widget


class ScribbleWidget(anywidget.AnyWidget):
    """Paint foreground and background scribbles on an image, in the notebook.

    Tools: foreground, background, eraser, pan; brush size (diameter in image pixels);
    undo, redo and clear; zoom (wheel, ``+``/``−``/fit buttons) and pan (pan tool,
    middle button or Shift+drag); per-class pixel counts; toggles and opacity sliders
    for the prediction and uncertainty overlays. Works in JupyterLab and Notebook 7.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` grey or ``(H, W, 3|4)`` colour image of any integer or floating dtype;
        other than ``uint8`` it is shown percentile-stretched (:func:`display_image`).
    scribble : numpy.ndarray, optional
        ``(H, W)`` existing scribbles (0 background, 1 foreground, 250 unlabelled).
    brush_size : int, optional
        Brush diameter in image pixels (1 to :data:`MAX_BRUSH`).
    tool : str, optional
        ``"foreground"``, ``"background"``, ``"erase"`` or ``"pan"``.
    display_size : int, optional
        Largest side of the drawing area in screen pixels; the image is fitted into it
        (enlarged by a whole factor when it is smaller).
    **kwargs
        Other traits (``show_prediction``, ``prediction_opacity``, ...).

    Notes
    -----
    Every edit in the browser sends the changed rectangle of the mask (``H × W`` bytes at
    most) and the kernel sends the whole mask back to keep every view of the widget in
    step, so very large images (tens of megapixels) make each stroke cost a few tens of
    megabytes of local traffic.
    """

    _esm = Path(__file__).with_name("_widget.js")
    _css = Path(__file__).with_name("_widget.css")

    _image_png = traitlets.Bytes(b"").tag(sync=True)
    _width = traitlets.Int(0).tag(sync=True)
    _height = traitlets.Int(0).tag(sync=True)
    _labels = traitlets.Bytes(b"").tag(sync=True)
    _generation = traitlets.Int(0).tag(sync=True)
    _ack = traitlets.Unicode("").tag(sync=True)
    _prediction_png = traitlets.Bytes(b"").tag(sync=True)
    _uncertainty_png = traitlets.Bytes(b"").tag(sync=True)
    _style = traitlets.Dict().tag(sync=True)
    _status_error = traitlets.Bool(False).tag(sync=True)

    tool = traitlets.Enum(_TOOLS, default_value="foreground").tag(sync=True)
    brush_size = traitlets.Int(5).tag(sync=True)
    display_size = traitlets.Int(600).tag(sync=True)
    show_prediction = traitlets.Bool(True).tag(sync=True)
    prediction_opacity = traitlets.Float(0.5).tag(sync=True)
    show_uncertainty = traitlets.Bool(False).tag(sync=True)
    uncertainty_opacity = traitlets.Float(0.6).tag(sync=True)
    status = traitlets.Unicode("").tag(sync=True)

    def __init__(self, image: np.ndarray, scribble: np.ndarray | None = None, **kwargs: Any):
        style = {
            "foreground": FG_COLOUR,
            "background": BG_COLOUR,
            "prediction": PREDICTION_COLOUR,
            "uncertainty": UNCERTAINTY_COLOUR,
            "scribble_opacity": SCRIBBLE_OPACITY,
        }
        super().__init__(_style=style, **kwargs)
        self._image: np.ndarray | None = None
        self._probability: np.ndarray | None = None
        self._uncertainty: np.ndarray | None = None
        self._callbacks: list[Callable[[ScribbleWidget], Any]] = []
        self._edit_count = 0
        self.load(image, scribble)
        self.on_msg(self._on_message)

    # ---------------------------------------------------------------- validation of traits

    @traitlets.validate("brush_size")
    def _valid_brush(self, proposal):
        value = int(proposal["value"])
        if not 1 <= value <= MAX_BRUSH:
            raise traitlets.TraitError(f"brush_size must lie in [1, {MAX_BRUSH}], got {value}")
        return value

    @traitlets.validate("display_size")
    def _valid_display(self, proposal):
        value = int(proposal["value"])
        if value < 64:
            raise traitlets.TraitError(f"display_size must be at least 64 pixels, got {value}")
        return value

    @traitlets.validate("prediction_opacity", "uncertainty_opacity")
    def _valid_opacity(self, proposal):
        value = float(proposal["value"])
        if not 0 <= value <= 1:
            raise traitlets.TraitError(f"opacity must lie in [0, 1], got {value}")
        return value

    # ------------------------------------------------------------------------ image, mask

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the image."""
        return (self._height, self._width)

    @property
    def image(self) -> np.ndarray:
        """The image as given (a read-only view)."""
        view = self._image.view()
        view.flags.writeable = False
        return view

    def load(self, image: np.ndarray, scribble: np.ndarray | None = None) -> None:
        """Show another image, with its scribbles (or none); clears prediction and history.

        Parameters
        ----------
        image : numpy.ndarray
            ``(H, W)`` or ``(H, W, 3|4)`` image.
        scribble : numpy.ndarray, optional
            ``(H, W)`` scribble image of the same ``(H, W)``.

        Raises
        ------
        ValueError
            On a bad image, or scribbles of another shape or with unknown values.
        """
        shown = display_image(image)
        shape = shown.shape[:2]
        if scribble is None:
            labels = np.full(shape, UNLABELLED, dtype=np.uint8)
        else:
            labels = _checked_scribble(scribble, shape)
        png = encode_png(shown)
        self._image = np.asarray(image)
        self._probability = self._uncertainty = None
        with self.hold_sync():
            self._height, self._width = int(shape[0]), int(shape[1])
            self._image_png = png
            self._labels = labels.tobytes()
            self._prediction_png = b""
            self._uncertainty_png = b""
            self._generation += 1

    @property
    def scribble(self) -> np.ndarray:
        """``(H, W)`` ``uint8`` scribbles: 0 background, 1 foreground, 250 unlabelled.

        Reading returns a copy of what the kernel holds (updated once per stroke).
        Assigning validates the array (shape of the image, values 0/1/250), shows it in
        every view and clears the views' undo history.
        """
        return np.frombuffer(self._labels, dtype=np.uint8).reshape(self.shape).copy()

    @scribble.setter
    def scribble(self, value: np.ndarray) -> None:
        labels = _checked_scribble(value, self.shape)
        with self.hold_sync():
            self._labels = labels.tobytes()
            self._generation += 1

    def clear(self) -> None:
        """Remove every scribble (from Python; the Clear button does the same in the page)."""
        self.scribble = np.full(self.shape, UNLABELLED, dtype=np.uint8)

    @property
    def counts(self) -> dict[str, int]:
        """Number of ``foreground`` and ``background`` pixels."""
        labels = np.frombuffer(self._labels, dtype=np.uint8)
        return {
            "foreground": int(np.count_nonzero(labels == FOREGROUND)),
            "background": int(np.count_nonzero(labels == BACKGROUND)),
        }

    @property
    def edit_count(self) -> int:
        """Edits received from the browser (strokes, undos, redos, clears) and applied."""
        return self._edit_count

    def on_edit(self, callback: Callable[[ScribbleWidget], Any], remove: bool = False) -> None:
        """Call ``callback(widget)`` after each edit from the browser has been applied.

        Parameters
        ----------
        callback : callable
            Receives the widget; exceptions it raises are logged and shown in the
            widget's status line, not propagated.
        remove : bool, optional
            Unregister ``callback`` instead.
        """
        if remove:
            self._callbacks.remove(callback)
        else:
            self._callbacks.append(callback)

    def set_status(self, text: str, error: bool = False) -> None:
        """Show a line of text under the drawing area (in red when ``error``)."""
        with self.hold_sync():
            self.status = str(text)
            self._status_error = bool(error)

    def _on_message(self, _widget, content: Any, buffers: Sequence[bytes | memoryview]) -> None:
        if not isinstance(content, dict) or content.get("kind") != "edit":
            return
        ack = f"{content.get('view', '')}:{content.get('seq', '')}"
        if content.get("generation") != self._generation:
            # Drawn on an image or scribbles replaced since: the view reloads from _labels.
            self._ack = ack
            return
        try:
            labels = apply_edit(self.scribble, content, buffers)
        except ValueError as err:
            _log.warning("ignored an edit from the browser: %s", err)
            with self.hold_sync():
                self._ack = ack
                self.set_status(f"Error: ignored an edit from the browser: {err}", error=True)
            return
        with self.hold_sync():
            self._labels = labels.tobytes()
            self._ack = ack
        self._edit_count += 1
        for callback in list(self._callbacks):
            try:
                callback(self)
            except Exception as err:  # a callback must not break drawing
                _log.exception("scribble edit callback failed")
                self.set_status(f"Error: {err}", error=True)

    # ---------------------------------------------------------------------------- overlays

    @property
    def prediction(self) -> np.ndarray | None:
        """``(H, W)`` ``float32`` foreground probability shown, or ``None``."""
        return None if self._probability is None else self._probability.copy()

    @property
    def uncertainty(self) -> np.ndarray | None:
        """``(H, W)`` ``float32`` uncertainty shown (1 least certain), or ``None``."""
        return None if self._uncertainty is None else self._uncertainty.copy()

    def set_prediction(self, prediction: np.ndarray, uncertainty: np.ndarray | None = None) -> None:
        """Show the current prediction and its uncertainty as overlays.

        Parameters
        ----------
        prediction : numpy.ndarray
            ``(H, W)`` foreground probability in [0, 1], or a label map (boolean or
            integer, foreground where > 0).
        uncertainty : numpy.ndarray, optional
            ``(H, W)`` map in [0, 1], 1 least certain. Default
            :func:`uncertainty_map` of the probability (all 0 for a label map).

        Raises
        ------
        ValueError
            On a shape other than the image's or values outside [0, 1].
        """
        probability = prediction_probability(prediction, self.shape)
        if uncertainty is None:
            unsure = uncertainty_map(probability)
        else:
            unsure = _check_unit_map(uncertainty, self.shape, "uncertainty")
        self._probability, self._uncertainty = probability, unsure
        with self.hold_sync():
            self._prediction_png = encode_png(overlay_rgba(probability, PREDICTION_COLOUR))
            self._uncertainty_png = encode_png(overlay_rgba(unsure, UNCERTAINTY_COLOUR))

    def clear_prediction(self) -> None:
        """Remove both overlays."""
        self._probability = self._uncertainty = None
        with self.hold_sync():
            self._prediction_png = b""
            self._uncertainty_png = b""

    # ---------------------------------------------------------------------------- snapshot

    def snapshot(
        self, *, prediction: bool = False, uncertainty: bool = False, scale: int = 1
    ) -> np.ndarray:
        """The current annotation as an RGB picture (image + coloured scribbles).

        Parameters
        ----------
        prediction, uncertainty : bool, optional
            Include that overlay (if one is set) at the widget's opacity.
        scale : int, optional
            Enlarge every pixel to a ``scale × scale`` block.

        Returns
        -------
        numpy.ndarray
            ``(H * scale, W * scale, 3)`` ``uint8``.
        """
        return compose_annotation(
            self._image,
            self.scribble,
            prediction=self._probability if prediction else None,
            prediction_opacity=self.prediction_opacity,
            uncertainty=self._uncertainty if uncertainty else None,
            uncertainty_opacity=self.uncertainty_opacity,
            scale=scale,
        )

    def save_snapshot(
        self,
        path: str | os.PathLike,
        *,
        prediction: bool = False,
        uncertainty: bool = False,
        scale: int = 1,
    ) -> Path:
        """Write :meth:`snapshot` as a PNG (atomically), for readers without a kernel.

        Parameters
        ----------
        path : str or os.PathLike
            Destination ``.png`` file.
        prediction, uncertainty, scale
            As in :meth:`snapshot`.

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise ValueError(f"a snapshot is written as PNG; use a .png path, not {path}")
        write_image(
            path, self.snapshot(prediction=prediction, uncertainty=uncertainty, scale=scale)
        )
        return path


def _checked_scribble(scribble: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    scribble = np.asarray(scribble)
    if scribble.ndim == 2 and scribble.shape != tuple(shape):
        raise ValueError(
            f"scribbles of shape {scribble.shape} do not fit the image of shape {tuple(shape)}"
        )
    return np.ascontiguousarray(validate_scribble(scribble, shape))


# ----------------------------------------------------------------------------- session


class ScribbleSession:
    """Annotate a folder of images one after the other, each with its own scribbles.

    The scribbles of image ``<stem>.<ext>`` live in ``<scribbles_dir>/<stem>.png`` (the
    package's encoding, :func:`~s2l_core.scribbles.save_scribble`). They are loaded when
    the image is opened and written atomically after every stroke and when another
    image is opened, so a crash loses at most the stroke being drawn and never leaves a
    half-written file.

    Parameters
    ----------
    images : str, os.PathLike or sequence of them
        A folder (every file with a suffix in :data:`IMAGE_SUFFIXES`, sorted by name) or
        a list of image files.
    scribbles_dir : str or os.PathLike
        Where the scribble PNGs are kept (created if missing).
    start : int, optional
        Index of the first image shown.
    channel : int, optional
        Show and annotate this channel of multi-channel images
        (:func:`s2l_core.augment.select_channel`), e.g. the nuclear stain.
    **widget_kwargs
        Passed to :class:`ScribbleWidget` (``brush_size``, ``display_size``, ...).

    Raises
    ------
    ValueError
        If there are no images, two images share a stem, or the first image or its
        scribbles cannot be read.
    """

    def __init__(
        self,
        images: str | os.PathLike | Sequence[str | os.PathLike],
        scribbles_dir: str | os.PathLike,
        *,
        start: int = 0,
        channel: int | None = None,
        **widget_kwargs: Any,
    ):
        self.images = _image_list(images)
        self.channel = channel
        self.scribbles_dir = Path(scribbles_dir)
        same = [
            p.name
            for p in self.images
            if (self.scribbles_dir / f"{p.stem}.png").resolve() == p.resolve()
        ]
        if same:
            raise ValueError(
                f"the scribbles of {same[0]} would be saved over the image itself "
                f"({self.scribbles_dir} holds the images); choose another scribbles folder"
            )
        self.scribbles_dir.mkdir(parents=True, exist_ok=True)
        self.last_error: Exception | None = None
        self._index = self._checked_index(start)
        image, scribble = self._read(self._index)
        self.widget = ScribbleWidget(image, scribble, **widget_kwargs)
        self.widget.on_edit(self._autosave)
        self._ui = None

    # ------------------------------------------------------------------------- navigation

    def __len__(self) -> int:
        return len(self.images)

    @property
    def index(self) -> int:
        """Index of the image shown."""
        return self._index

    @property
    def path(self) -> Path:
        """The image file shown."""
        return self.images[self._index]

    def scribble_path(self, index: int | None = None) -> Path:
        """Where the scribbles of image ``index`` (default: the one shown) are saved."""
        index = self._index if index is None else self._checked_index(index)
        return self.scribbles_dir / f"{self.images[index].stem}.png"

    def _checked_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self.images):
            raise IndexError(f"image index {index} outside 0..{len(self.images) - 1}")
        return index

    def _image(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Image ``index`` (its channel taken) and its ``(H, W)``."""
        path = self.images[index]
        try:
            image = select_channel(read_image(path), self.channel)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot open image {path}: {err}") from err
        return image, _image_shape(image, path)

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        path = self.images[index]
        image, shape = self._image(index)
        scribble_path = self.scribble_path(index)
        if not scribble_path.exists():
            return image, None
        try:
            scribble = read_scribble(scribble_path, shape)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"the scribbles of {path.name} in {scribble_path} cannot be used ({err}); "
                "repair, move or delete that file"
            ) from err
        return image, scribble

    def go(self, index: int) -> int:
        """Save the current scribbles and open image ``index`` with its own.

        Raises
        ------
        IndexError
            If ``index`` is out of range.
        ValueError
            If that image or its scribble file cannot be read; the current image stays.
        """
        index = self._checked_index(index)
        self.save(only_if_labelled=True)
        image, scribble = self._read(index)
        self.widget.load(image, scribble)
        self._index = index
        self.widget.set_status(f"{self.path.name} ({index + 1}/{len(self)})")
        self._update_nav()
        return index

    def next(self) -> int:
        """Open the next image (stays on the last one); return the index shown."""
        return self.go(min(self._index + 1, len(self) - 1))

    def previous(self) -> int:
        """Open the previous image (stays on the first one); return the index shown."""
        return self.go(max(self._index - 1, 0))

    # ----------------------------------------------------------------------------- saving

    def save(self, *, only_if_labelled: bool = False) -> Path | None:
        """Write the current scribbles to :meth:`scribble_path`, atomically.

        Parameters
        ----------
        only_if_labelled : bool, optional
            Skip (and return ``None``) when nothing is labelled and no file exists yet,
            so merely browsing creates no empty files.

        Returns
        -------
        pathlib.Path or None
            The file written.
        """
        scribble = self.widget.scribble
        path = self.scribble_path()
        if only_if_labelled and not path.exists() and not (scribble != UNLABELLED).any():
            return None
        save_scribble(path, scribble)
        return path

    def _autosave(self, widget: ScribbleWidget) -> None:
        try:
            path = self.save()
        except Exception as err:
            self.last_error = err
            _log.error("could not save scribbles: %s", err)
            widget.set_status(f"Error: scribbles NOT saved: {err}", error=True)
            return
        self.last_error = None
        counts = widget.counts
        widget.set_status(
            f"saved {path.name}: {counts['foreground']} foreground, "
            f"{counts['background']} background pixels"
        )

    def load_scribble(self, index: int | None = None) -> np.ndarray | None:
        """The saved scribbles of image ``index`` (default: current), or ``None``."""
        path = self.scribble_path(index)
        if not path.exists():
            return None
        return read_scribble(path)

    # ----------------------------------------------------------------------------- import

    def import_labels(
        self, folder: str | os.PathLike, *, name_suffix: str = "", overwrite: bool = False
    ) -> tuple[list[str], list[str]]:
        """Import label layers drawn in napari or ilastik (0 unlabelled, 1 background, 2 fg).

        For every image ``<stem>.<ext>`` a file ``<folder>/<stem><name_suffix>.png`` (or
        ``.tif``/``.tiff``) is converted with :func:`~s2l_core.scribbles.from_napari`
        and saved as its scribbles. Every file is read and checked before anything is
        written, so a bad file leaves all scribbles as they were.

        Parameters
        ----------
        folder : str or os.PathLike
            Folder of label images.
        name_suffix : str, optional
            Part of the label file names after the image stem (e.g. ``"_labels"``).
        overwrite : bool, optional
            Replace scribbles that already exist; otherwise those images are skipped.

        Returns
        -------
        imported, skipped : list of str
            Image stems imported, and those skipped because scribbles already existed.

        Raises
        ------
        FileNotFoundError
            If ``folder`` does not exist.
        ValueError
            If a label file cannot be read, does not have its image's shape, or holds
            labels other than 0, 1 and 2.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"label folder not found: {folder}")
        converted: list[tuple[int, np.ndarray]] = []
        skipped: list[str] = []
        for index, image_path in enumerate(self.images):
            candidates = [folder / f"{image_path.stem}{name_suffix}{s}" for s in LABEL_SUFFIXES]
            found = [p for p in candidates if p.is_file()]
            if not found:
                continue
            if self.scribble_path(index).exists() and not overwrite:
                skipped.append(image_path.stem)
                continue
            try:
                labels = read_image(found[0])
                _, shape = self._image(index)
                converted.append((index, from_napari(labels, shape)))
            except (OSError, ValueError) as err:
                raise ValueError(f"cannot import {found[0]} for {image_path.name}: {err}") from err
        for index, scribble in converted:
            save_scribble(self.scribble_path(index), scribble)
            if index == self._index:
                self.widget.scribble = scribble
        return [self.images[i].stem for i, _ in converted], skipped

    # --------------------------------------------------------------------------------- UI

    @property
    def ui(self):
        """The widget under a navigation bar (previous / next) as an ipywidgets ``VBox``."""
        if self._ui is None:
            import ipywidgets

            previous = ipywidgets.Button(description="◀ Previous", layout={"width": "auto"})
            following = ipywidgets.Button(description="Next ▶", layout={"width": "auto"})
            self._nav_label = ipywidgets.HTML()
            previous.on_click(lambda _: self._safe(self.previous))
            following.on_click(lambda _: self._safe(self.next))
            self._nav_buttons = (previous, following)
            bar = ipywidgets.HBox([previous, following, self._nav_label])
            self._ui = ipywidgets.VBox([bar, self.widget])
            self._update_nav()
        return self._ui

    def _safe(self, action: Callable[[], Any]) -> None:
        try:
            action()
        except Exception as err:
            self.last_error = err
            self.widget.set_status(f"Error: {err}", error=True)

    def _update_nav(self) -> None:
        if self._ui is None:
            return
        import html

        previous, following = self._nav_buttons
        previous.disabled = self._index == 0
        following.disabled = self._index == len(self) - 1
        self._nav_label.value = (
            f"&nbsp;image {self._index + 1} / {len(self)}: <b>{html.escape(self.path.name)}</b>"
        )

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.ui._repr_mimebundle_(**kwargs)


def _image_shape(image: np.ndarray, path: Path) -> tuple[int, int]:
    """``(H, W)`` of an image read from ``path``, checked as :func:`display_image` does."""
    image = np.asarray(image)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4))):
        raise ValueError(f"{path} is not a grey or colour image: shape {image.shape}")
    return (int(image.shape[0]), int(image.shape[1]))


def _image_list(images: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise ValueError(f"image folder not found: {folder}")
        paths = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    else:
        paths = [Path(p) for p in images]
        if not paths:
            raise ValueError("no images given")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"image files not found: {missing[:5]}")
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise ValueError(
                f"{stems[path.stem].name} and {path.name} would share the scribble file "
                f"{path.stem}.png; rename one"
            )
        stems[path.stem] = path
    return paths
