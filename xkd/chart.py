"""Bar and line charts as PNG files, drawn with matplotlib's Agg renderer (no display needed).

`xkd evaluate` draws one bar per language (<metric>.png beside results.json) and
`xkd train-student` its loss curves (losses.png beside metrics.jsonl, one line per loss term).

matplotlib is imported inside the functions: it costs about half a second, which `import xkd`
and every command that draws nothing should not pay. Figures are built on matplotlib's object
API (Figure and FigureCanvasAgg), not pyplot, so no figure stays open in a global registry
between checkpoints and no backend is chosen for the user's process. Text is drawn as given,
never parsed as mathtext (a '$' in a run's name is a dollar sign). Files are written
atomically, so a chart is either the old one or the new one, never half of either.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

from .durable import atomic_write_bytes

DPI = 100
BAR_COLOR = (38, 70, 120)
WHISKER_COLOR = (0, 0, 0)
# Distinct on white and in greyscale order; a ninth series reuses the first colour.
LINE_COLORS = ((38, 70, 120), (214, 96, 39), (44, 150, 72), (150, 60, 160), (190, 150, 0), (30, 150, 170),
               (120, 120, 120), (200, 40, 90))

BAR_CHART_HEIGHT = 320  # pixels
BAR_SLOT_WIDTH = 80  # pixels per bar, widened when a label or value text needs more
BAR_CHART_MARGINS = 120  # pixels beside the bars: the y axis, its ticks and label
LINE_CHART_SIZE = (800, 400)  # pixels
LINE_WIDTH = 1.5  # points
# How much wider (in points) a line is drawn per later line over it: 1.25 points, about 1.7
# pixels, of it shows on each side of the later line, which is at least one pixel of its own
# colour after anti-aliasing.
WIDER_PER_LINE = 2.5


@contextmanager
def _chart(path: str | os.PathLike, width: int, height: int):
    """One axes on a `width` x `height` pixel figure, laid out by matplotlib; on leaving the
    block, the figure is written to `path` as a PNG."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # parse_math is read as each text is made, so the whole drawing runs inside the context.
    with matplotlib.rc_context({"text.parse_math": False}), warnings.catch_warnings():
        # A language name or title in a script the bundled font lacks is drawn as boxes; one
        # warning per missing glyph on stderr would say nothing the picture does not.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        yield figure.add_subplot()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
    atomic_write_bytes(Path(path), buffer.getvalue())


def _rgb(color: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(channel / 255 for channel in color)


def _text_width(text: str, fontsize: float) -> float:
    """The width of `text` in pixels at `fontsize` points, as the Agg renderer draws it."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    width, _, _ = TextToPath().get_text_width_height_descent(text, FontProperties(size=fontsize), ismath=False)
    return width * DPI / 72


def _check_inputs(labels: list[str], values: list[float], errors: list[float] | None,
                  y_max: float | None) -> None:
    if not labels:
        raise ValueError("bar chart: no bars to draw (labels is empty)")
    if len(values) != len(labels):
        raise ValueError(f"bar chart: {len(labels)} labels but {len(values)} values; give one value per label")
    if errors is not None and len(errors) != len(labels):
        raise ValueError(f"bar chart: {len(labels)} labels but {len(errors)} errors; give one error per label")
    for label, value in zip(labels, values):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"bar chart: the value for {label!r} is {value}; bars need a finite number >= 0")
    for label, error in zip(labels, errors or []):
        if not math.isfinite(error) or error < 0:
            raise ValueError(f"bar chart: the error for {label!r} is {error}; errors need a finite number >= 0")
    if y_max is not None and not (math.isfinite(y_max) and y_max > 0):
        raise ValueError(f"bar chart: y_max is {y_max}; it must be a finite number > 0")


def _default_y_max(values: list[float], errors: list[float]) -> float:
    # Scores in [0, 1] get the full 0-1 axis, so charts of different runs compare by eye.
    if all(0 <= value <= 1 for value in values):
        return 1.0
    return max(value + error for value, error in zip(values, errors)) * 1.1


def bar_chart_png(path: str | os.PathLike, title: str, labels: list[str], values: list[float],
                  errors: list[float] | None = None, y_max: float | None = None, y_label: str = "") -> None:
    """Write a bar chart, one bar per label with its value printed above it, to `path`.

    `errors` adds a whisker of value +- error to each bar and "±error" to its value. Bars and
    whiskers taller than `y_max` are cut at the top of the plot. Raises ValueError for
    mismatched lengths, NaN or infinite numbers, and negative values or errors (the y axis
    starts at 0).
    """
    _check_inputs(labels, values, errors, y_max)
    shown_errors = errors if errors is not None else [0.0] * len(values)
    top_value = y_max if y_max is not None else _default_y_max(values, shown_errors)
    if errors is None:
        value_texts = [f"{value:.3f}" for value in values]
    else:
        value_texts = [f"{value:.3f}±{error:.3f}" for value, error in zip(values, errors)]

    with _chart(path, BAR_CHART_MARGINS + BAR_SLOT_WIDTH, BAR_CHART_HEIGHT) as axes:
        # Each bar gets a slot wide enough for its label and value; the figure, for its title.
        slot = max(BAR_SLOT_WIDTH, round(max(_text_width(text, 10) for text in [*labels, *value_texts])) + 12)
        axes.figure.set_figwidth(max(BAR_CHART_MARGINS + slot * len(labels), _text_width(title, 12) + 40) / DPI)
        positions = range(len(labels))
        axes.bar(positions, values, width=0.6, color=_rgb(BAR_COLOR), yerr=errors, capsize=6,
                 error_kw={"ecolor": _rgb(WHISKER_COLOR), "elinewidth": LINE_WIDTH, "capthick": LINE_WIDTH})
        axes.set_xticks(positions, labels)
        axes.set_xlim(-0.5, len(labels) - 0.5)
        axes.set_ylim(0, top_value)
        axes.set_title(title, fontsize=12, pad=20)  # room for the value above a full-height bar
        axes.set_ylabel(y_label)
        axes.spines[["top", "right"]].set_visible(False)
        for position, value, error, text in zip(positions, values, shown_errors, value_texts):
            # Above the bar or its whisker; for one cut at y_max, at the top of the plot.
            axes.annotate(text, (position, min(value + error, top_value)), xytext=(0, 4), textcoords="offset points",
                          ha="center", va="bottom", fontsize=10, annotation_clip=False)


def _check_series(series: dict[str, tuple[list[float], list[float]]]) -> None:
    if not series:
        raise ValueError("line chart: no series to draw")
    for name, (xs, ys) in series.items():
        if not len(xs) or len(xs) != len(ys):
            raise ValueError(f"line chart: series {name!r} has {len(xs)} x values and {len(ys)} y values; "
                             "give one y per x, at least one point")
        bad = next((v for v in [*xs, *ys] if not math.isfinite(v)), None)
        if bad is not None:
            raise ValueError(f"line chart: series {name!r} holds {bad}; points need finite numbers")


def _meet(first: tuple[list[float], list[float]], second: tuple[list[float], list[float]], within: float) -> bool:
    """Whether two series of (xs, ys) come `within` of each other at an x they share."""
    second_at = dict(zip(*second))
    return any(x in second_at and abs(y - second_at[x]) <= within for x, y in zip(*first))


def line_chart_png(path: str | os.PathLike, title: str, series: dict[str, tuple[list[float], list[float]]],
                   x_label: str = "", y_label: str = "") -> None:
    """Write a line chart, one line per named series of (xs, ys), with a legend, to `path`.

    The y axis runs from 0 (or the lowest value, when one is negative) to the highest value;
    the x axis from the lowest x to the highest. A series of one point is drawn as a dot.
    Raises ValueError for no series, mismatched lengths, and NaN or infinite numbers.
    """
    _check_series(series)
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys]
    x_low, x_high = min(xs_all), max(xs_all)
    y_low, y_high = min(0.0, min(ys_all)), max(ys_all)
    if y_high == y_low:  # a flat line still needs a scale
        y_high = y_low + (abs(y_low) or 1.0)

    curves = list(series.values())
    overlap = (y_high - y_low) / 100  # about 3 pixels of the plot's height: closer lines cover each other
    with _chart(path, *LINE_CHART_SIZE) as axes:
        for index, (name, (xs, ys)) in enumerate(series.items()):
            # A line that a later one covers somewhere (a loss equal to its only term) is drawn
            # wider, once per such later line, so that each colour still shows at the edges.
            covered_by = sum(_meet(curves[index], later, overlap) for later in curves[index + 1:])
            thickness = LINE_WIDTH + WIDER_PER_LINE * min(covered_by, 3)
            # Not clipped: a line along the highest value is drawn whole, not halved by the frame.
            axes.plot(xs, ys, color=_rgb(LINE_COLORS[index % len(LINE_COLORS)]), linewidth=thickness, label=name,
                      marker="o" if len(xs) == 1 else None, clip_on=False)
        if x_high > x_low:
            axes.set_xlim(x_low, x_high)
        axes.set_ylim(y_low, y_high)
        axes.set_title(title, fontsize=12, pad=12)  # clear of a line along the highest value
        axes.set_xlabel(x_label)
        axes.set_ylabel(y_label)
        axes.spines[["top", "right"]].set_visible(False)
        # The axes stand a little apart from the plot, so that a line at the lowest value or
        # the first x (a loss term near 0) is not drawn under an axis.
        axes.spines[["left", "bottom"]].set_position(("outward", 6))
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, frameon=False)
