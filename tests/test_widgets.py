"""The kernel side of the scribble widget and of the annotation session (no browser)."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import traitlets
from matplotlib.colors import to_rgb
from PIL import Image

from s2l_core.files import read_image, write_image
from s2l_core.plots import BG_COLOUR, FG_COLOUR
from s2l_core.scribbles import (
    BACKGROUND,
    FOREGROUND,
    UNLABELLED,
    from_napari,
    read_scribble,
    save_scribble,
)
from s2l_core.widgets import (
    PREDICTION_COLOUR,
    SCRIBBLE_OPACITY,
    UNCERTAINTY_COLOUR,
    ScribbleSession,
    ScribbleWidget,
    apply_edit,
    compose_annotation,
    decode_labels,
    display_image,
    encode_labels,
    overlay_rgba,
    paint_stroke,
    prediction_probability,
    rasterize_stroke,
    uncertainty_map,
)

SHAPE = (24, 32)


def grey(shape=SHAPE, dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hi = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    return (rng.uniform(0, 1, shape) * hi).astype(dtype)


def empty(shape=SHAPE) -> np.ndarray:
    return np.full(shape, UNLABELLED, np.uint8)


def edit_message(widget: ScribbleWidget, new: np.ndarray, seq: int = 1, **override):
    """The message the browser sends for an edit: the changed rectangle, as bytes."""
    rows, cols = np.nonzero(new != widget.scribble)
    y, x = rows.min(), cols.min()
    height, width = rows.max() - y + 1, cols.max() - x + 1
    content = {
        "kind": "edit",
        "view": "view1",
        "seq": seq,
        "generation": widget._generation,
        "x": int(x),
        "y": int(y),
        "width": int(width),
        "height": int(height),
    }
    content.update(override)
    patch = np.ascontiguousarray(new[y : y + height, x : x + width])
    return content, [memoryview(patch.tobytes())]


def browser_edit(widget: ScribbleWidget, new: np.ndarray, seq: int = 1, **override) -> None:
    widget._handle_custom_msg(*edit_message(widget, new, seq, **override))


def png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im)


def files_in(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------- the bytes


def test_labels_round_trip_through_bytes():
    mask = empty()
    mask[2:5, 3:9] = FOREGROUND
    mask[10, :] = BACKGROUND
    data = encode_labels(mask)
    assert isinstance(data, bytes) and len(data) == mask.size
    assert data[2 * SHAPE[1] + 3] == FOREGROUND  # row-major, one byte per pixel
    back = decode_labels(memoryview(data), SHAPE)
    assert back.dtype == np.uint8 and np.array_equal(back, mask)
    back[0, 0] = FOREGROUND  # a writable copy
    assert data[0] == UNLABELLED


def test_decoding_refuses_wrong_length_and_values():
    with pytest.raises(ValueError, match="expected 768 bytes"):
        decode_labels(b"\xfa" * 767, SHAPE)
    with pytest.raises(ValueError, match=r"values \[7\]"):
        decode_labels(bytes([7]) * 768, SHAPE)
    with pytest.raises(ValueError, match="values"):
        encode_labels(np.full(SHAPE, 2, np.uint8))


def test_apply_edit_puts_the_rectangle_in_place():
    mask = empty()
    patch = np.array([[0, 1, 250], [1, 1, 0]], np.uint8)
    content = {"x": 4, "y": 7, "width": 3, "height": 2}
    out = apply_edit(mask, content, [patch.tobytes()])
    assert np.array_equal(out[7:9, 4:7], patch)
    assert (np.delete(np.delete(out, np.s_[7:9], 0), np.s_[4:7], 1) == UNLABELLED).all()
    assert (mask == UNLABELLED).all()  # the input is untouched


@pytest.mark.parametrize(
    ("content", "buffers", "message"),
    [
        ({"x": 30, "y": 0, "width": 3, "height": 1}, [b"\0\0\0"], "inside"),
        ({"x": -1, "y": 0, "width": 1, "height": 1}, [b"\0"], "inside"),
        ({"x": 0, "y": 0, "width": 0, "height": 1}, [b""], "inside"),
        ({"x": 0, "y": 0, "width": 2, "height": 2}, [b"\0\0\0"], "expected 4 bytes"),
        ({"x": 0, "y": 0, "width": 2, "height": 1}, [b"\0\3"], "values"),
        ({"x": 0, "y": 0, "width": 1, "height": 1}, [], "one buffer"),
        ({"y": 0, "width": 1, "height": 1}, [b"\0"], "rectangle"),
        ({"x": "a", "y": 0, "width": 1, "height": 1}, [b"\0"], "rectangle"),
    ],
)
def test_apply_edit_refuses_bad_messages(content, buffers, message):
    with pytest.raises(ValueError, match=message):
        apply_edit(empty(), content, buffers)


# ---------------------------------------------------------------------------- the brush


def test_a_click_paints_a_disc():
    mask = rasterize_stroke([(10.5, 12.5)], 5, SHAPE)  # a pixel centre, radius 2.5
    rr, cc = np.nonzero(mask)
    assert mask.sum() == 21  # offsets with dr² + dc² <= 6.25
    assert set(zip(rr - 12, cc - 10, strict=True)) == {
        (dr, dc) for dr in range(-2, 3) for dc in range(-2, 3) if dr * dr + dc * dc <= 6.25
    }


def test_brush_is_the_swept_disc():
    points = [(3.3, 4.1), (25.7, 9.6), (12.2, 20.4)]
    size = 4
    mask = rasterize_stroke(points, size, SHAPE)
    cy, cx = np.mgrid[: SHAPE[0], : SHAPE[1]] + 0.5
    distance = np.full(SHAPE, np.inf)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((cx - x0) * dx + (cy - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        distance = np.minimum(distance, np.hypot(cx - x0 - t * dx, cy - y0 - t * dy))
    clear = np.abs(distance - size / 2) > 1e-9  # away from ties
    assert np.array_equal(mask[clear], (distance <= size / 2)[clear])


def test_brush_does_not_depend_on_sampling_density():
    sparse = [(2.5, 6.5), (29.5, 6.5)]
    dense = [(x + 0.5, 6.5) for x in range(2, 30)]
    assert np.array_equal(rasterize_stroke(sparse, 3, SHAPE), rasterize_stroke(dense, 3, SHAPE))
    rows = np.nonzero(rasterize_stroke(sparse, 3, SHAPE).any(axis=1))[0]
    assert rows.tolist() == [5, 6, 7]  # centres within 1.5 of y = 6.5


def test_brush_one_pixel_line_is_connected():
    mask = rasterize_stroke([(0.2, 0.7), (31.9, 23.1)], 1, SHAPE)
    assert mask.any(axis=0).all()  # every column touched: no gap


def test_brush_clips_at_the_border_and_refuses_bad_input():
    mask = rasterize_stroke([(-5.0, -5.0), (1.0, 1.0)], 4, SHAPE)
    assert mask[0, 0] and mask.sum() < 10
    assert not rasterize_stroke([(-50.0, -50.0)], 4, SHAPE).any()
    with pytest.raises(ValueError, match="brush_size"):
        rasterize_stroke([(1, 1)], 0, SHAPE)
    with pytest.raises(ValueError, match="points"):
        rasterize_stroke([], 3, SHAPE)
    with pytest.raises(ValueError, match="finite"):
        rasterize_stroke([(1, np.nan)], 3, SHAPE)


def test_paint_stroke_paints_and_erases():
    mask = paint_stroke(empty(), [(3.5, 3.5), (20.5, 3.5)], FOREGROUND, 3)
    assert (mask[2:5, 3:21] == FOREGROUND).all()
    erased = paint_stroke(mask, [(10.5, 3.5)], UNLABELLED, 1)
    assert erased[3, 10] == UNLABELLED and erased[3, 11] == FOREGROUND
    with pytest.raises(ValueError, match="value"):
        paint_stroke(mask, [(1, 1)], 2, 3)


# --------------------------------------------------------------------------- the widget


def test_widget_starts_unlabelled_and_sends_the_image_as_png():
    image = grey()
    widget = ScribbleWidget(image)
    assert widget.shape == SHAPE
    assert widget.scribble.dtype == np.uint8 and (widget.scribble == UNLABELLED).all()
    assert widget.counts == {"foreground": 0, "background": 0}
    assert np.array_equal(png_array(widget._image_png), image)
    assert "export default" in widget._esm
    assert ".s2l-widget" in widget._css
    with pytest.raises(ValueError, match="read-only"):
        widget.image[0, 0] = 1


def test_sixteen_bit_and_colour_images_are_display_normalised():
    image = np.linspace(0, 4000, SHAPE[0] * SHAPE[1]).reshape(SHAPE).astype(np.uint16)
    shown = display_image(image)
    assert shown.dtype == np.uint8 and shown.min() == 0 and shown.max() == 255
    widget = ScribbleWidget(image)
    assert np.array_equal(png_array(widget._image_png), shown)
    rgba = np.dstack([grey(seed=k) for k in range(4)])
    assert display_image(rgba).shape == (*SHAPE, 3)
    assert png_array(ScribbleWidget(rgba)._image_png).shape == (*SHAPE, 3)
    assert display_image(grey()[..., None]).shape == SHAPE
    flat = display_image(np.full(SHAPE, 7.0))
    assert flat.dtype == np.uint8 and (flat == 0).all()
    assert (display_image(np.full(SHAPE, np.nan)) == 0).all()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros(10, np.uint8), "shape"),
        (np.zeros((*SHAPE, 2), np.uint8), "shape"),
        (np.zeros((2, *SHAPE, 3), np.uint8), "shape"),
        (np.zeros((0, 5), np.uint8), "empty"),
        (np.zeros(SHAPE, bool), "dtype"),
        (np.zeros(SHAPE, complex), "dtype"),
        (np.zeros(SHAPE, object), "dtype"),
    ],
)
def test_widget_refuses_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        ScribbleWidget(image)


def test_scribble_property_loads_validates_and_copies():
    scribble = empty()
    scribble[1:4, 1:4] = FOREGROUND
    scribble[20, 5:9] = BACKGROUND
    widget = ScribbleWidget(grey(), scribble)
    assert np.array_equal(widget.scribble, scribble)
    assert widget.counts == {"foreground": 9, "background": 4}
    widget.scribble[0, 0] = FOREGROUND  # a copy: the widget does not change
    assert widget.scribble[0, 0] == UNLABELLED

    generation = widget._generation
    widget.scribble = empty()
    assert widget._generation == generation + 1  # the views reload and forget their history
    assert decode_labels(widget._labels, SHAPE).tolist() == empty().tolist()

    with pytest.raises(ValueError, match=r"shape \(24, 31\) do not fit the image of shape"):
        widget.scribble = empty((24, 31))
    with pytest.raises(ValueError, match="2-D"):
        widget.scribble = np.full((*SHAPE, 3), UNLABELLED, np.uint8)
    with pytest.raises(ValueError, match="integer dtype"):
        widget.scribble = empty().astype(float)
    bad = empty()
    bad[0, 0] = 2
    with pytest.raises(ValueError, match=r"values \[2\]"):
        widget.scribble = bad
    with pytest.raises(ValueError, match="do not fit"):
        ScribbleWidget(grey(), empty((3, 3)))
    assert widget._generation == generation + 1  # failed assignments changed nothing
    widget.scribble = scribble
    widget.clear()
    assert (widget.scribble == UNLABELLED).all()


def test_an_edit_from_the_browser_updates_the_mask_once():
    widget = ScribbleWidget(grey())
    seen = []
    widget.on_edit(lambda w: seen.append(w.scribble))
    stroke = paint_stroke(widget.scribble, [(5.2, 5.9), (20.7, 15.1)], FOREGROUND, 3)
    browser_edit(widget, stroke, seq=4)
    assert np.array_equal(widget.scribble, stroke)
    assert widget.edit_count == 1 and len(seen) == 1 and np.array_equal(seen[0], stroke)
    assert widget._ack == "view1:4"  # the view learns its edit arrived
    assert widget.counts["foreground"] == int((stroke == FOREGROUND).sum())

    undo = empty()
    browser_edit(widget, undo, seq=5)
    assert (widget.scribble == UNLABELLED).all() and widget.edit_count == 2


def test_stale_and_bad_edits_are_ignored():
    widget = ScribbleWidget(grey())
    seen = []
    widget.on_edit(seen.append)
    stroke = paint_stroke(widget.scribble, [(5.0, 5.0)], FOREGROUND, 5)

    # Drawn before Python replaced the scribbles: ignored, acknowledged so the view reloads.
    content, buffers = edit_message(widget, stroke, seq=1)
    widget.scribble = empty()
    widget._handle_custom_msg(content, buffers)
    assert (widget.scribble == UNLABELLED).all() and widget._ack == "view1:1"

    # A rectangle outside the image: ignored, shown as an error.
    browser_edit(widget, stroke, seq=2, x=SHAPE[1])
    assert (widget.scribble == UNLABELLED).all() and widget._ack == "view1:2"
    assert widget._status_error and "ignored" in widget.status

    widget._handle_custom_msg({"kind": "something else"}, [])
    widget._handle_custom_msg("not a dict", [])
    assert widget.edit_count == 0 and seen == []


def test_a_failing_callback_does_not_break_drawing():
    widget = ScribbleWidget(grey())

    def broken(_):
        raise RuntimeError("boom")

    widget.on_edit(broken)
    stroke = paint_stroke(widget.scribble, [(5.0, 5.0)], BACKGROUND, 3)
    browser_edit(widget, stroke)
    assert np.array_equal(widget.scribble, stroke)
    assert widget._status_error and "boom" in widget.status
    widget.on_edit(broken, remove=True)
    assert widget._callbacks == []


def test_trait_validation():
    widget = ScribbleWidget(grey())
    widget.brush_size = 12
    for name, value in [
        ("brush_size", 0),
        ("brush_size", 10_000),
        ("prediction_opacity", 1.5),
        ("uncertainty_opacity", -0.1),
        ("tool", "lasso"),
        ("display_size", 10),
    ]:
        with pytest.raises(traitlets.TraitError):
            setattr(widget, name, value)
    assert widget.brush_size == 12
    assert ScribbleWidget(grey(), tool="erase", brush_size=7).tool == "erase"


# ---------------------------------------------------------------------------- overlays


def test_uncertainty_is_one_at_one_half_and_zero_when_sure():
    p = np.array([[0.0, 0.25, 0.5, 0.75, 1.0]])
    assert np.allclose(uncertainty_map(p), [[0, 0.5, 1, 0.5, 0]])
    assert uncertainty_map(p).dtype == np.float32


def test_prediction_probability_accepts_probabilities_and_label_maps():
    labels = np.zeros(SHAPE, np.int32)
    labels[3:6, 3:6] = 7
    assert prediction_probability(labels).sum() == 9
    assert prediction_probability(labels > 0).dtype == np.float32
    prob = grey(dtype=np.float64)
    assert np.allclose(prediction_probability(prob), prob)
    for bad, message in [
        (prob * 2, r"\[0, 1\]"),
        (np.full(SHAPE, np.nan), r"\[0, 1\]"),
        (prob[None], "2-D"),
        (prob.astype(complex), "floating"),
    ]:
        with pytest.raises(ValueError, match=message):
            prediction_probability(bad)
    with pytest.raises(ValueError, match="shape"):
        prediction_probability(prob, (5, 5))


def test_overlay_colour_and_opacity():
    rgba = overlay_rgba(np.array([[0.0, 0.5, 1.0]]), "#ff0000")
    assert rgba.dtype == np.uint8
    assert rgba[..., :3].tolist() == [[[255, 0, 0]] * 3]
    assert rgba[..., 3].tolist() == [[0, 128, 255]]


def test_set_prediction_sets_both_overlays():
    widget = ScribbleWidget(grey())
    prob = np.linspace(0, 1, SHAPE[0] * SHAPE[1]).reshape(SHAPE)
    widget.set_prediction(prob)
    assert np.allclose(widget.prediction, prob)
    assert np.allclose(widget.uncertainty, 1 - 2 * np.abs(prob - 0.5), atol=1e-6)
    shown = png_array(widget._prediction_png)
    assert shown.shape == (*SHAPE, 4)
    assert np.array_equal(shown, overlay_rgba(prob, PREDICTION_COLOUR))
    unsure = png_array(widget._uncertainty_png)
    assert np.array_equal(unsure, overlay_rgba(widget.uncertainty, UNCERTAINTY_COLOUR))

    own = np.full(SHAPE, 0.3)
    widget.set_prediction(prob > 0.5, uncertainty=own)
    assert set(np.unique(widget.prediction)) == {0.0, 1.0}
    assert np.allclose(widget.uncertainty, 0.3)
    widget.set_prediction(prob > 0.5)
    assert (widget.uncertainty == 0).all()  # a label map is certain

    with pytest.raises(ValueError, match="shape"):
        widget.set_prediction(prob[:-1])
    with pytest.raises(ValueError, match="uncertainty"):
        widget.set_prediction(prob, uncertainty=own + 1)
    widget.clear_prediction()
    assert widget.prediction is None and widget._prediction_png == b""
    widget.set_prediction(prob)
    widget.load(grey(seed=3))
    assert widget.prediction is None and widget._uncertainty_png == b""  # new image


# ---------------------------------------------------------------------------- snapshot


def test_snapshot_blends_scribbles_in_the_book_colours(tmp_path):
    image = grey()
    scribble = empty()
    scribble[2, 3] = FOREGROUND
    scribble[4, 5] = BACKGROUND
    widget = ScribbleWidget(image, scribble)
    picture = widget.snapshot()
    assert picture.shape == (*SHAPE, 3) and picture.dtype == np.uint8
    for (r, c), colour in (((2, 3), FG_COLOUR), ((4, 5), BG_COLOUR)):
        expected = np.round(
            image[r, c] * (1 - SCRIBBLE_OPACITY) + np.array(to_rgb(colour)) * 255 * SCRIBBLE_OPACITY
        )
        assert np.abs(picture[r, c].astype(int) - expected).max() <= 1
    untouched = scribble == UNLABELLED
    assert np.array_equal(picture[untouched], np.repeat(image[..., None], 3, 2)[untouched])

    path = widget.save_snapshot(tmp_path / "figs" / "annotation.png", scale=3)
    saved = read_image(path)
    assert saved.shape == (SHAPE[0] * 3, SHAPE[1] * 3, 3)
    assert np.array_equal(saved[::3, ::3], picture)
    assert files_in(tmp_path / "figs") == ["annotation.png"]  # no temporary file left
    with pytest.raises(ValueError, match="PNG"):
        widget.save_snapshot(tmp_path / "annotation.jpg")

    widget.set_prediction(np.ones(SHAPE))
    with_prediction = widget.snapshot(prediction=True)
    assert not np.array_equal(with_prediction[untouched], picture[untouched])
    assert np.array_equal(widget.snapshot(), picture)
    with pytest.raises(ValueError, match="scale"):
        compose_annotation(image, scribble, scale=0)


# ----------------------------------------------------------------------------- session


@pytest.fixture
def folder(tmp_path):
    """Three images: 8-bit grey PNG, 16-bit TIFF, RGB PNG; and a scribble folder."""
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "a.png", grey(seed=1))
    write_image(images / "b.tif", grey(dtype=np.uint16, seed=2))
    write_image(images / "c.png", np.dstack([grey(seed=k) for k in range(3)]))
    (images / "notes.txt").write_text("not an image")
    return images, tmp_path / "scribbles"


def test_session_steps_through_the_folder(folder):
    images, scribbles = folder
    session = ScribbleSession(images, scribbles)
    assert [p.name for p in session.images] == ["a.png", "b.tif", "c.png"]
    assert len(session) == 3 and session.index == 0 and scribbles.is_dir()
    assert session.previous() == 0  # stays on the first
    assert session.next() == 1 and session.path.name == "b.tif"
    assert np.array_equal(session.widget.image, read_image(images / "b.tif"))
    assert session.next() == 2 and session.next() == 2  # stays on the last
    assert session.widget.shape == SHAPE
    assert files_in(scribbles) == []  # browsing writes nothing
    with pytest.raises(IndexError):
        session.go(3)
    assert ScribbleSession([images / "c.png", images / "a.png"], scribbles).path.name == "c.png"
    assert ScribbleSession(images, scribbles, start=2).path.name == "c.png"


def test_session_shows_one_channel_of_multichannel_images(tmp_path):
    import tifffile

    images = tmp_path / "images"
    images.mkdir()
    nuclei = grey(seed=3)
    tifffile.imwrite(images / "two.tif", np.stack([np.zeros_like(nuclei), nuclei]))
    session = ScribbleSession(images, tmp_path / "scribbles", channel=1)
    assert np.array_equal(session.widget.image, nuclei) and session.widget.shape == SHAPE
    with pytest.raises(ValueError, match=r"two\.tif: channel 2 asked of an image with 2"):
        ScribbleSession(images, tmp_path / "scribbles", channel=2)
    with pytest.raises(ValueError, match="is not a grey or colour image"):
        ScribbleSession(images, tmp_path / "scribbles")  # two channels, none chosen


def test_session_saves_every_stroke_and_loads_it_back(folder):
    images, scribbles = folder
    session = ScribbleSession(images, scribbles)
    widget = session.widget
    stroke = paint_stroke(widget.scribble, [(4.4, 4.4), (20.1, 8.3)], FOREGROUND, 3)
    browser_edit(widget, stroke)
    assert np.array_equal(read_scribble(scribbles / "a.png", SHAPE), stroke)
    assert "saved a.png" in widget.status and not widget._status_error

    session.next()
    assert (widget.scribble == UNLABELLED).all()  # b has its own (none yet)
    mark = empty()
    mark[0, 0] = BACKGROUND
    widget.scribble = mark  # set from Python: saved when the image changes
    session.previous()
    assert np.array_equal(widget.scribble, stroke)
    assert np.array_equal(read_scribble(scribbles / "b.png"), mark)
    assert np.array_equal(session.load_scribble(1), mark)
    assert session.load_scribble(2) is None

    reopened = ScribbleSession(images, scribbles, start=1)
    assert np.array_equal(reopened.widget.scribble, mark)
    assert files_in(scribbles) == ["a.png", "b.png"]


def test_a_failed_save_keeps_the_earlier_file(folder, monkeypatch):
    images, scribbles = folder
    session = ScribbleSession(images, scribbles)
    widget = session.widget
    first = paint_stroke(widget.scribble, [(3.0, 3.0), (12.0, 3.0)], FOREGROUND, 3)
    browser_edit(widget, first, seq=1)
    earlier = (scribbles / "a.png").read_bytes()

    def crash(self, fp, *args, **kwargs):  # half a file, then the disk fills up
        with open(fp, "wb") as handle:
            handle.write(earlier[: len(earlier) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(Image.Image, "save", crash)
    second = paint_stroke(widget.scribble, [(3.0, 15.0), (25.0, 15.0)], BACKGROUND, 3)
    browser_edit(widget, second, seq=2)  # the autosave fails...
    assert np.array_equal(widget.scribble, second)  # ...the drawing is kept in the kernel,
    assert widget._status_error and "NOT saved" in widget.status  # ...the user is told,
    assert isinstance(session.last_error, OSError)
    assert (scribbles / "a.png").read_bytes() == earlier  # ...and the earlier file survives
    assert files_in(scribbles) == ["a.png"]  # with no half-written file beside it
    with pytest.raises(OSError, match="No space"):
        session.save()
    with pytest.raises(OSError, match="No space"):
        session.next()  # cannot save: stays on the image
    assert session.index == 0

    monkeypatch.undo()
    browser_edit(widget, paint_stroke(second, [(20.5, 20.5)], FOREGROUND, 1), seq=3)
    assert np.array_equal(read_scribble(scribbles / "a.png"), widget.scribble)
    assert session.last_error is None and not widget._status_error


def test_session_refuses_bad_folders_and_files(folder, tmp_path):
    images, scribbles = folder
    with pytest.raises(ValueError, match="not found"):
        ScribbleSession(tmp_path / "missing", scribbles)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ScribbleSession(tmp_path / "none", scribbles)
    with pytest.raises(ValueError, match="no images given"):
        ScribbleSession([], scribbles)
    with pytest.raises(ValueError, match="not found"):
        ScribbleSession([images / "zz.png"], scribbles)
    write_image(images / "a.tif", grey())
    with pytest.raises(ValueError, match=r"share the scribble file a\.png"):
        ScribbleSession(images, scribbles)
    (images / "a.tif").unlink()
    # Scribbles saved into the images' folder would replace a.png and c.png.
    before = (images / "a.png").read_bytes()
    with pytest.raises(ValueError, match=r"scribbles of a\.png would be saved over the image"):
        ScribbleSession(images, images)
    assert (images / "a.png").read_bytes() == before

    session = ScribbleSession(images, scribbles)
    (scribbles / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    with pytest.raises(ValueError, match=r"scribbles of b\.tif"):
        session.next()
    assert session.index == 0  # still on a
    save_scribble(scribbles / "b.png", empty((5, 5)))  # the wrong shape
    with pytest.raises(ValueError, match="shape"):
        session.go(1)
    bad = np.full(SHAPE, 3, np.uint8)
    write_image(scribbles / "b.png", bad)  # values outside the encoding
    with pytest.raises(ValueError, match="values"):
        session.go(1)
    (scribbles / "b.png").unlink()
    (images / "c.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot open image"):
        session.go(2)
    assert session.go(1) == 1


def test_import_from_napari_and_ilastik(folder, tmp_path):
    images, scribbles = folder
    labels = tmp_path / "labels"
    labels.mkdir()
    layer_a = np.zeros(SHAPE, np.uint8)
    layer_a[1:3, 1:6] = 2  # foreground
    layer_a[20, :] = 1  # background
    layer_b = np.zeros(SHAPE, np.uint16)
    layer_b[5, 5] = 1
    write_image(labels / "a.png", layer_a)  # napari: PNG
    write_image(labels / "b.tif", layer_b)  # ilastik: TIFF, 16-bit
    session = ScribbleSession(images, scribbles)

    imported, skipped = session.import_labels(labels)
    assert imported == ["a", "b"] and skipped == []
    assert np.array_equal(read_scribble(scribbles / "a.png"), from_napari(layer_a))
    assert read_scribble(scribbles / "b.png")[5, 5] == BACKGROUND
    assert np.array_equal(session.widget.scribble, from_napari(layer_a))  # a is open
    assert session.widget.counts == {"foreground": 10, "background": 32}

    layer_a[:] = 0
    write_image(labels / "a.png", layer_a)
    assert session.import_labels(labels) == ([], ["a", "b"])  # existing ones kept
    assert session.widget.counts["foreground"] == 10
    assert session.import_labels(labels, overwrite=True) == (["a", "b"], [])
    assert session.widget.counts["foreground"] == 0

    suffixed = tmp_path / "suffixed"
    suffixed.mkdir()
    write_image(
        suffixed / "c_labels.png", (layer_a + 2 * (np.arange(SHAPE[1]) < 4)).astype(np.uint8)
    )
    assert session.import_labels(suffixed, name_suffix="_labels") == (["c"], [])
    assert (read_scribble(scribbles / "c.png")[:, :4] == FOREGROUND).all()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (np.full(SHAPE, 3, np.uint8), r"values \[3\]"),  # a third class
        (np.zeros((5, 5), np.uint8), "shape"),
        (np.zeros((*SHAPE, 3), np.uint8), "2-D"),
        (None, "cannot import"),  # unreadable
    ],
)
def test_a_bad_label_file_imports_nothing(folder, tmp_path, layer, message):
    images, scribbles = folder
    labels = tmp_path / "labels"
    labels.mkdir()
    write_image(labels / "a.png", np.zeros(SHAPE, np.uint8))  # good, but not written
    if layer is None:
        (labels / "b.png").write_bytes(b"garbage")
    else:
        write_image(labels / "b.png", layer)
    session = ScribbleSession(images, scribbles)
    with pytest.raises(ValueError, match=message):
        session.import_labels(labels)
    assert files_in(scribbles) == []
    with pytest.raises(FileNotFoundError):
        session.import_labels(tmp_path / "missing")


def test_session_navigation_bar(folder):
    images, scribbles = folder
    session = ScribbleSession(images, scribbles)
    ui = session.ui
    previous, following = session._nav_buttons
    assert ui.children[1] is session.widget
    assert previous.disabled and not following.disabled
    assert "a.png" in session._nav_label.value and "1 / 3" in session._nav_label.value
    following.click()
    assert session.index == 1 and not previous.disabled
    assert "b.tif" in session._nav_label.value
    (scribbles / "c.png").write_bytes(b"corrupt")
    following.click()  # an error is shown in the widget, not raised into the event loop
    assert session.index == 1 and session.widget._status_error
    assert "c.png" in session.widget.status
    bundle = session._repr_mimebundle_()
    data = bundle[0] if isinstance(bundle, tuple) else bundle
    assert "application/vnd.jupyter.widget-view+json" in data
