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
