"""The book's figure helpers draw what they are given."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from s2l_core.plots import show_profile


def test_show_profile_shades_each_mask_where_it_covers_the_line():
    values = np.stack([np.array([2, 4, 20, 40, 20, 4, 2], float)] * 3, axis=1)  # RGB
    truth = np.array([0, 1, 1, 1, 1, 1, 0])
    predicted = np.array([0, 0, 3, 3, 3, 0, 0])  # a label row: covered where > 0
    fig, ax = plt.subplots()
    show_profile(ax, values, {"truth": truth, "prediction": predicted}, "a row")
    (line,) = ax.get_lines()
    assert np.array_equal(line.get_ydata(), [2, 4, 20, 40, 20, 4, 2])  # channel mean
    shaded = [c.get_paths()[0].vertices[:, 1].max() for c in ax.collections]
    assert shaded == [40.0, 34.0]  # the second a little lower than the first
    # The shaded span of each mask, from its first covered pixel's left edge to its last
    # covered pixel's right edge (with step="mid" pixel k spans k - 0.5 … k + 0.5).
    spans = []
    for c in ax.collections:
        xy = c.get_paths()[0].vertices
        spans.append((xy[xy[:, 1] > 0, 0].min(), xy[xy[:, 1] > 0, 0].max()))
    assert spans == [(0.5, 5.5), (1.5, 4.5)]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "truth",
        "prediction",
        "grey value",
    ]
    assert ax.get_title() == "a row"
    plt.close(fig)


def test_error_image_colours_each_pixel_by_what_the_prediction_got_wrong():
    from matplotlib.colors import to_rgb

    from s2l_core.plots import ERROR_COLOURS, error_image

    truth = np.zeros((12, 12), np.uint16)
    truth[2:8, 2:8] = 1
    predicted = np.zeros_like(truth)
    predicted[4:10, 4:10] = 7  # overlaps the truth in rows/cols 4..7
    rgb = error_image(np.full((12, 12), 100, np.uint8), predicted, truth)

    def colour(name):
        return tuple(np.uint8(np.array(to_rgb(ERROR_COLOURS[name])) * 255))

    assert tuple(rgb[2, 2]) == colour("false negative")  # true, missed
    assert tuple(rgb[8, 8]) == colour("false positive")  # predicted, not true
    assert tuple(rgb[6, 6]) == colour("correct foreground")  # inside both, off the edge
    assert tuple(rgb[4, 4]) == (0, 0, 0)  # the predicted nucleus' outline
    assert tuple(rgb[0, 11]) == (33, 33, 33)  # background: the image, dimmed
    try:
        error_image(np.zeros((5, 5)), predicted, truth)
    except ValueError as err:
        assert "same height and width" in str(err)
    else:
        raise AssertionError("a mismatched image was accepted")


def test_maps_carry_a_colourbar_and_pieces_are_drawn_on_the_image():
    from matplotlib.colors import to_rgb

    from s2l_core.plots import SERIES_COLOURS, show_map, show_pieces

    fig, axes = plt.subplots(1, 2)
    show_map(axes[0], np.linspace(0, 1, 16).reshape(4, 4), "EMA", label="EMA")
    assert len(fig.axes) == 3  # the two axes and the colourbar
    assert fig.axes[-1].get_ylabel() == "EMA"
    pieces = np.zeros((9, 9), int)
    pieces[4, 1:8] = 2
    show_pieces(axes[1], np.full((9, 9), 200, np.uint8), pieces)
    shown = axes[1].get_images()[0].get_array()
    assert tuple(shown[4, 4]) == tuple(np.uint8(np.array(to_rgb(SERIES_COLOURS[1])) * 255))
    assert tuple(shown[0, 0]) == (100, 100, 100)  # away from the piece: the dimmed image
    plt.close(fig)


def test_pseudo_labels_are_tints_and_scribbles_stay_solid():
    from matplotlib.colors import to_rgb

    from s2l_core.plots import FG_COLOUR, show_pseudo_labels

    scribble = np.full((4, 4), 250, np.uint8)
    scribble[0, 0] = 1
    targets = np.full((4, 4), 250, np.uint8)
    targets[1, 1] = 1
    fig, ax = plt.subplots()
    show_pseudo_labels(ax, np.zeros((4, 4), np.uint8), scribble, targets)
    shown = ax.get_images()[0].get_array()
    solid = np.array(to_rgb(FG_COLOUR)) * 255
    assert np.allclose(shown[0, 0], solid, atol=1)
    assert np.allclose(shown[1, 1], 0.4 * solid, atol=1)  # a tint over a black image
    assert tuple(shown[3, 3]) == (0, 0, 0)
    plt.close(fig)
