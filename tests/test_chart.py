"""xkd.chart: the PNGs it draws, read back with Pillow and measured in pixels against the
numbers they show and the axes matplotlib drew around them."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xkd.chart import BAR_COLOR, LINE_COLORS, bar_chart_png, line_chart_png

WHITE = (255, 255, 255)


def decode_png(path: Path) -> np.ndarray:
    """The (height, width, 3) pixels of an opaque PNG."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        rgba = np.asarray(image.convert("RGBA"))
    assert (rgba[..., 3] == 255).all(), "a chart must be opaque: viewers with a dark background show it too"
    return rgba[..., :3]


def of_color(image: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return (image == color).all(axis=-1)


def longest_run(flags: np.ndarray) -> range:
    """The longest stretch of True in a 1-D array (empty when there is none)."""
    best, start = range(0), None
    for index, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = index
        elif not flag and start is not None:
            best, start = max(best, range(start, index), key=len), None
    return best


def plot_box(image: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the plot, in pixels: the rows the y axis spans (the longest
    dark vertical line in the picture) and the columns the x axis spans (the longest horizontal one)."""
    dark = (image < 80).all(axis=-1)
    y_axis = max((longest_run(dark[:, column]) for column in range(dark.shape[1])), key=len)
    x_axis = max((longest_run(dark[row]) for row in range(dark.shape[0])), key=len)
    return y_axis.start, y_axis.stop - 1, x_axis.start, x_axis.stop - 1


def draw(tmp_path: Path, values, name="chart.png", **options) -> np.ndarray:
    labels = options.pop("labels", [f"l{index}" for index in range(len(values))])
    path = tmp_path / name
    bar_chart_png(path, options.pop("title", "a title"), labels, values, **options)
    return decode_png(path)


def bar_columns(image: np.ndarray) -> list[range]:
    """The column range of each bar, left to right, found by scanning for the bar colour."""
    has_bar = of_color(image, BAR_COLOR).any(axis=0)
    runs, column = [], 0
    while column < len(has_bar):
        run = longest_run(has_bar[column:])
        if not run:
            break
        if run.start > 0 and has_bar[column:column + run.start].any():  # an earlier, shorter bar
            run = longest_run(has_bar[column:column + run.start])
        runs.append(range(column + run.start, column + run.stop))
        column += run.stop
    return runs


def bar_rows(image: np.ndarray, column: int) -> range:
    return longest_run(of_color(image, BAR_COLOR)[:, column])


def test_png_is_opaque_mostly_white_and_grows_with_bars(tmp_path):
    image = draw(tmp_path, [0.25, 0.5, 1.0], y_label="F1")
    assert image.shape[0] == 320
    assert of_color(image, WHITE).mean() > 0.6
    wider = draw(tmp_path, [0.25, 0.5, 1.0, 0.1, 0.2, 0.3], name="wider.png", y_label="F1")
    assert wider.shape[1] == image.shape[1] + 3 * 80


def test_bars_reach_their_values_on_the_y_axis(tmp_path):
    image = draw(tmp_path, [0.25, 0.5, 1.0])  # scores in [0, 1]: the axis runs from 0 to 1
    top, bottom, left, right = plot_box(image)
    bars = bar_columns(image)
    assert len(bars) == 3 and all(left < bar.start < bar.stop <= right for bar in bars)
    for bar, value in zip(bars, [0.25, 0.5, 1.0]):
        rows = bar_rows(image, (bar.start + bar.stop) // 2)
        assert abs(rows.stop - bottom) <= 2  # every bar stands on the x axis
        assert abs(rows.start - (bottom - value * (bottom - top))) <= 2, value


def test_default_y_max(tmp_path):
    # Scores in [0, 1] are drawn against 1.0; anything else against 1.1 x the tallest bar.
    scores = draw(tmp_path, [0.5])
    explicit = draw(tmp_path, [0.5], name="explicit.png", y_max=1.0)
    assert len(bar_rows(scores, bar_columns(scores)[0].start)) == len(bar_rows(explicit, bar_columns(explicit)[0].start))

    large = draw(tmp_path, [2.0, 4.0], name="large.png")
    against_four = draw(tmp_path, [2.0, 4.0], name="four.png", y_max=4.0)
    tall = len(bar_rows(large, bar_columns(large)[1].start))
    assert abs(tall * 1.1 - len(bar_rows(against_four, bar_columns(against_four)[1].start))) <= 2


def test_a_bar_above_y_max_is_cut_at_the_top_of_the_plot(tmp_path):
    image = draw(tmp_path, [2.0, 0.5], y_max=1.0)
    top, bottom, _, _ = plot_box(image)
    cut = bar_rows(image, bar_columns(image)[0].start)
    assert abs(cut.start - top) <= 2 and abs(cut.stop - bottom) <= 2


def test_error_whisker_adds_pixels_above_the_bar(tmp_path):
    plain = draw(tmp_path, [0.5])
    whiskered = draw(tmp_path, [0.5], name="whiskered.png", errors=[0.1])
    (plain_bar,), (whiskered_bar,) = bar_columns(plain), bar_columns(whiskered)
    # The bar's edge columns: the whisker runs down the centre and over the bar.
    bar = bar_rows(whiskered, whiskered_bar.start)
    assert len(bar) == len(bar_rows(plain, plain_bar.start))
    center = (whiskered_bar.start + whiskered_bar.stop) // 2
    whisker_above = len(bar) // 5  # an error of 0.1 on a bar of 0.5
    dark = (whiskered[bar.start - whisker_above + 2:bar.start, center] < 80).all(axis=-1)
    assert dark.all()
    assert of_color(plain[bar.start - 3:bar.start, (plain_bar.start + plain_bar.stop) // 2], WHITE).all()


def test_bad_input_raises_value_error(tmp_path):
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match="2 labels but 1 values"):
        bar_chart_png(path, "t", ["en", "hi"], [0.5])
    with pytest.raises(ValueError, match="2 labels but 3 errors"):
        bar_chart_png(path, "t", ["en", "hi"], [0.5, 0.6], errors=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="'hi' is nan"):
        bar_chart_png(path, "t", ["en", "hi"], [0.5, math.nan])
    with pytest.raises(ValueError, match="error for 'en'"):
        bar_chart_png(path, "t", ["en"], [0.5], errors=[math.nan])
    with pytest.raises(ValueError, match=">= 0"):
        bar_chart_png(path, "t", ["en"], [-0.5])
    with pytest.raises(ValueError, match="no bars"):
        bar_chart_png(path, "t", [], [])
    with pytest.raises(ValueError, match="y_max"):
        bar_chart_png(path, "t", ["en"], [0.5], y_max=0.0)
    with pytest.raises(ValueError, match="finite"):
        line_chart_png(path, "t", {"loss": ([1], [float("nan")])})
    with pytest.raises(ValueError, match="no series"):
        line_chart_png(path, "t", {})
    with pytest.raises(ValueError, match="one y per x"):
        line_chart_png(path, "t", {"loss": ([1, 2], [0.5])})
    assert list(tmp_path.iterdir()) == []


def test_any_text_is_drawn_as_given_without_a_warning(tmp_path):
    # '$$' would be an unparsable formula to matplotlib's mathtext; scripts the font lacks are
    # drawn as boxes, without one warning per glyph.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = draw(tmp_path, [0.734, 0.5], title="Précision — 日本語 cost $$", labels=["zh-Hant", "हिन्दी"],
                     y_label="F₁ $_$")
        line_chart_png(tmp_path / "line.png", "run-$$", {"$x$": ([1, 2], [1.0, 0.5])}, x_label="$", y_label="日本語")
    assert len(bar_columns(image)) == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["chart.png", "line.png"]  # no temporary file left


def test_a_line_chart_puts_each_point_where_its_value_says(tmp_path):
    path = tmp_path / "chart.png"
    line_chart_png(path, "t", {"up": ([0, 10], [0.0, 10.0]), "flat": ([0, 10], [5.0, 5.0])}, x_label="step", y_label="y")
    image = decode_png(path)
    top, bottom, left, right = plot_box(image)
    up, flat = of_color(image, LINE_COLORS[0]), of_color(image, LINE_COLORS[1])
    # The axes run from the lowest x to the highest and from 0 to the highest y: "up" crosses
    # the plot corner to corner, "flat" runs halfway up, from the y axis to the right edge.
    for fraction in (0.1, 0.3, 0.7, 0.9):  # away from the middle, where "flat" is drawn over "up"
        column = round(left + fraction * (right - left))
        rows = np.nonzero(up[:, column])[0]
        assert abs(rows.mean() - (bottom - fraction * (bottom - top))) <= 2, fraction
        assert rows.max() - rows.min() <= 4  # drawn at one width: "flat" covers it nowhere but where they cross
    flat_rows, flat_columns = np.nonzero(flat[:, :right + 1])
    assert flat_rows.max() - flat_rows.min() <= 2
    assert abs(flat_rows.mean() - (top + bottom) / 2) <= 2
    assert flat_columns.min() <= left + 3 and flat_columns.max() >= right - 3
    # The legend, right of the plot, shows each series' colour.
    assert up[:, right + 1:].any() and flat[:, right + 1:].any()


def test_lines_drawn_over_each_other_each_show_their_colour(tmp_path):
    # A loss equal to its only term, and a term just above 0 (not hidden by the x axis).
    path = tmp_path / "chart.png"
    steps = list(range(1, 11))
    losses = [3.0 - 0.2 * step for step in steps]
    line_chart_png(path, "t", {"loss": (steps, losses), "mlm": (steps, losses), "tiny": (steps, [0.01] * 10)})
    image = decode_png(path)
    _, _, left, right = plot_box(image)
    width = right - left
    for color in LINE_COLORS[:3]:  # from end to end, in at least every other column
        columns = np.unique(np.nonzero(of_color(image, color)[:, left:right + 1])[1])
        assert columns.min() < 0.05 * width and columns.max() > 0.95 * width and len(columns) > width / 2, color
    # Lines that no other covers keep one width: "tiny" is a band of about 2 pixels.
    tiny_rows = np.nonzero(of_color(image, LINE_COLORS[2])[:, left:right + 1])[0]
    assert tiny_rows.max() - tiny_rows.min() <= 3


def test_a_line_chart_of_one_point_draws_a_dot(tmp_path):
    path = tmp_path / "chart.png"
    line_chart_png(path, "t", {"loss": ([7], [2.0])})
    image = decode_png(path)
    _, _, _, right = plot_box(image)
    dot_rows, dot_columns = np.nonzero(of_color(image, LINE_COLORS[0])[:, :right])
    assert len(dot_rows) >= 9 and dot_columns.max() - dot_columns.min() >= 3 and dot_rows.max() - dot_rows.min() >= 3
