"""Bar and line charts as PNG files, drawn with numpy and encoded with zlib: no plotting library.

`xkd evaluate` and `xkd rdt` draw one bar per language, and `xkd train-student` draws its
loss curves (one line per loss term, losses.png beside metrics.jsonl), so a run's results
can be looked at without installing matplotlib or pillow (neither is a dependency, and neither may become
one). Text comes from a small embedded 5x7 bitmap font covering printable ASCII, drawn at
2x; characters it lacks are drawn as '?'. Files are written atomically, so a chart is
either the old one or the new one, never half of either.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .storage.manifest import atomic_write_bytes

GLYPH_WIDTH = 5
GLYPH_HEIGHT = 7

# One glyph per printable ASCII character, 32 (space) to 126 ('~') in order. Each glyph is
# GLYPH_WIDTH columns of two hex digits, left to right; bit r of a column is pixel row r,
# counting from the top. The comment above each line names its characters.
_ASCII_HEX = (
    # space ! " # $ % & '
    "0000000000 00005F0000 0007000700 147F147F14 242A7F2A12 2313086462 3649552250 0005030000 "
    # ( ) * + , - . /
    "001C224100 0041221C00 082A1C2A08 08083E0808 0050300000 0808080808 0060600000 2010080402 "
    # 0 1 2 3 4 5 6 7
    "3E5149453E 00427F4000 4261514946 2141454B31 1814127F10 2745454539 3C4A494930 0171090503 "
    # 8 9 : ; < = > ?
    "3649494936 064949291E 0036360000 0056360000 0008142241 1414141414 4122140800 0201510906 "
    # @ A B C D E F G
    "3249794136 7E1111117E 7F49494936 3E41414122 7F4141221C 7F49494941 7F09090101 3E41415132 "
    # H I J K L M N O
    "7F0808087F 00417F4100 2040413F01 7F08142241 7F40404040 7F0204027F 7F0408107F 3E4141413E "
    # P Q R S T U V W
    "7F09090906 3E4151215E 7F09192946 4649494931 01017F0101 3F4040403F 1F2040201F 7F2018207F "
    # X Y Z [ \ ] ^ _
    "6314081463 0304780403 6151494543 007F414100 0204081020 0041417F00 0402010204 4040404040 "
    # ` a b c d e f g
    "0001020400 2054545478 7F48444438 3844444420 384444487F 3854545418 087E090102 0C5252523E "
    # h i j k l m n o
    "7F08040478 00447D4000 2040443D00 007F102844 00417F4000 7C04180478 7C08040478 3844444438 "
    # p q r s t u v w
    "7C14141408 081414187C 7C08040408 4854545420 043F444020 3C4040207C 1C2040201C 3C4030403C "
    # x y z { | } ~
    "4428102844 0C5050503C 4464544C44 0008364100 00007F0000 0041360800 0804081008"
)

# Printable ASCII plus '±', which value labels with error bars use. strict=True makes a
# glyph added or dropped by mistake fail at import instead of shifting every later glyph.
FONT: dict[str, str] = dict(zip(map(chr, range(32, 127)), _ASCII_HEX.split(), strict=True))
FONT["±"] = "44445F4444"


def _decode_glyph(hex_columns: str) -> np.ndarray:
    columns = np.frombuffer(bytes.fromhex(hex_columns), dtype=np.uint8)
    rows = np.arange(GLYPH_HEIGHT, dtype=np.uint8)[:, None]
    return ((columns[None, :] >> rows) & 1).astype(bool)


GLYPHS: dict[str, np.ndarray] = {char: _decode_glyph(hex_columns) for char, hex_columns in FONT.items()}

SCALE = 2
TEXT_HEIGHT = GLYPH_HEIGHT * SCALE

WHITE = (255, 255, 255)
INK = (0, 0, 0)
BAR_COLOR = (38, 70, 120)
WHISKER_COLOR = INK

HEIGHT = 320
PAD = 10
LINE = SCALE  # axis, tick and whisker thickness, matching the text's stroke width
TICK_LENGTH = 6
VALUE_GAP = 6  # between a bar (or its whisker) and the value printed above it
LABEL_GAP = 6  # between the x axis and the labels below it
BAR_WIDTH = 48
MIN_SLOT_WIDTH = 80
SLOT_TEXT_MARGIN = 12  # keeps the texts of neighbouring bars from touching
CAP_WIDTH = 16

# Rows, top to bottom: title, room for a value label above a full-height bar, the plot,
# the x axis, the labels.
PLOT_TOP = PAD + TEXT_HEIGHT + PAD + TEXT_HEIGHT + VALUE_GAP
PLOT_BOTTOM = HEIGHT - PAD - TEXT_HEIGHT - LABEL_GAP - LINE
PLOT_HEIGHT = PLOT_BOTTOM - PLOT_TOP


def render_text(text: str) -> np.ndarray:
    """A boolean mask of `text` at SCALE; characters without a glyph are drawn as '?'."""
    glyphs = [GLYPHS.get(char, GLYPHS["?"]) for char in text]
    gap = np.zeros((GLYPH_HEIGHT, 1), dtype=bool)
    spaced = [part for glyph in glyphs for part in (glyph, gap)][:-1]
    mask = np.concatenate(spaced, axis=1) if spaced else np.zeros((GLYPH_HEIGHT, 0), dtype=bool)
    return mask.repeat(SCALE, axis=0).repeat(SCALE, axis=1)


def text_width(text: str) -> int:
    return render_text(text).shape[1]


def encode_png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (height, width, 3) uint8 array.

    Every scanline uses filter type 0 (none): charts are mostly flat colour, which zlib
    compresses well without PNG's predictors, and readers stay trivial.
    """
    height, width, channels = rgb.shape
    if channels != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"encode_png needs an (height, width, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    filter_none = np.zeros((height, 1), dtype=np.uint8)
    scanlines = np.concatenate([filter_none, rgb.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, colour type 2: RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 9)) + chunk(b"IEND", b""))


def _paint(canvas: np.ndarray, mask: np.ndarray, top: int, left: int, color: tuple[int, int, int]) -> None:
    """Draw `mask` with its top-left corner at (top, left); what falls off the canvas is cut."""
    height, width = mask.shape
    row0, col0 = max(top, 0), max(left, 0)
    row1, col1 = min(top + height, canvas.shape[0]), min(left + width, canvas.shape[1])
    if row1 > row0 and col1 > col0:
        canvas[row0:row1, col0:col1][mask[row0 - top:row1 - top, col0 - left:col1 - left]] = color


def _fill(canvas: np.ndarray, top: int, bottom: int, left: int, right: int, color: tuple[int, int, int]) -> None:
    canvas[max(top, 0):max(bottom, 0), max(left, 0):max(right, 0)] = color


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

    tick_texts = {PLOT_BOTTOM: "0", PLOT_TOP: f"{top_value:.4g}"}
    y_label_room = TEXT_HEIGHT + PAD if y_label else 0
    axis_left = PAD + y_label_room + max(map(text_width, tick_texts.values())) + 4 + TICK_LENGTH
    slot_width = max(MIN_SLOT_WIDTH, max(map(text_width, [*labels, *value_texts])) + SLOT_TEXT_MARGIN)
    bars_left = axis_left + LINE
    bars_right = bars_left + slot_width * len(labels)
    width = max(bars_right + PAD, text_width(title) + 2 * PAD)

    canvas = np.full((HEIGHT, width, 3), WHITE, dtype=np.uint8)
    _paint(canvas, render_text(title), PAD, (width - text_width(title)) // 2, INK)

    _fill(canvas, PLOT_TOP, PLOT_BOTTOM + LINE, axis_left, axis_left + LINE, INK)
    _fill(canvas, PLOT_BOTTOM, PLOT_BOTTOM + LINE, axis_left, bars_right, INK)
    for row, text in tick_texts.items():
        _fill(canvas, row, row + LINE, axis_left - TICK_LENGTH, axis_left, INK)
        mask = render_text(text)
        _paint(canvas, mask, row + LINE // 2 - TEXT_HEIGHT // 2, axis_left - TICK_LENGTH - 4 - mask.shape[1], INK)
    if y_label:
        mask = np.rot90(render_text(y_label))  # reads bottom to top, as y-axis labels do
        _paint(canvas, mask, (PLOT_TOP + PLOT_BOTTOM - mask.shape[0]) // 2, PAD, INK)

    def row_of(value: float) -> int:
        return PLOT_BOTTOM - round(min(max(value, 0.0), top_value) / top_value * PLOT_HEIGHT)

    for index, (label, value, error, value_text) in enumerate(zip(labels, values, shown_errors, value_texts)):
        center = bars_left + index * slot_width + slot_width // 2
        bar_top = row_of(value)
        _fill(canvas, bar_top, PLOT_BOTTOM, center - BAR_WIDTH // 2, center + BAR_WIDTH // 2, BAR_COLOR)
        drawn_top = bar_top
        if errors is not None:
            whisker_top, whisker_bottom = row_of(value + error), row_of(value - error)
            _fill(canvas, whisker_top, whisker_bottom, center - LINE // 2, center + LINE - LINE // 2, WHISKER_COLOR)
            for cap_row in (whisker_top, whisker_bottom - LINE):
                _fill(canvas, cap_row, cap_row + LINE, center - CAP_WIDTH // 2, center + CAP_WIDTH // 2, WHISKER_COLOR)
            drawn_top = min(bar_top, whisker_top)
        mask = render_text(value_text)
        _paint(canvas, mask, drawn_top - VALUE_GAP - TEXT_HEIGHT, center - mask.shape[1] // 2, INK)
        mask = render_text(label)
        _paint(canvas, mask, PLOT_BOTTOM + LINE + LABEL_GAP, center - mask.shape[1] // 2, INK)

    atomic_write_bytes(Path(path), encode_png(canvas))


# Line charts ---------------------------------------------------------------------------

# Distinct on white and in greyscale order; a ninth series reuses the first colour.
LINE_COLORS = ((38, 70, 120), (214, 96, 39), (44, 150, 72), (150, 60, 160), (190, 150, 0), (30, 150, 170),
               (120, 120, 120), (200, 40, 90))
LINE_PLOT_WIDTH = 560
SWATCH_WIDTH = 20
LEGEND_ROW = TEXT_HEIGHT + 6


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


def _segments(cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel on the polyline through (rows, cols): each segment sampled once per pixel
    of its longer side, so lines have no gaps."""
    if len(cols) == 1:
        return np.rint(cols).astype(int), np.rint(rows).astype(int)
    steps = np.maximum(np.abs(np.diff(cols)), np.abs(np.diff(rows))).astype(int) + 1
    t = np.concatenate([np.linspace(0.0, 1.0, n) for n in steps])
    start = np.repeat(np.arange(len(steps)), steps)
    return (np.rint(cols[start] + t * (cols[start + 1] - cols[start])).astype(int),
            np.rint(rows[start] + t * (rows[start + 1] - rows[start])).astype(int))


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

    y_ticks = [f"{y_high:.4g}", f"{y_low:.4g}"]
    y_label_room = TEXT_HEIGHT + PAD if y_label else 0
    axis_left = PAD + y_label_room + max(map(text_width, y_ticks)) + 4 + TICK_LENGTH
    plot_left, plot_right = axis_left + LINE, axis_left + LINE + LINE_PLOT_WIDTH
    legend_left = plot_right + 2 * PAD
    legend_width = SWATCH_WIDTH + 6 + max(map(text_width, series))
    width = max(legend_left + legend_width + PAD, text_width(title) + 2 * PAD)
    plot_top = PAD + TEXT_HEIGHT + PAD
    # Tall enough for the plot and for one legend row per series.
    plot_bottom = max(plot_top + 220, plot_top + LEGEND_ROW * len(series))
    height = plot_bottom + LINE + LABEL_GAP + TEXT_HEIGHT + (LABEL_GAP + TEXT_HEIGHT if x_label else 0) + PAD

    canvas = np.full((height, width, 3), WHITE, dtype=np.uint8)
    _paint(canvas, render_text(title), PAD, (width - text_width(title)) // 2, INK)
    _fill(canvas, plot_top, plot_bottom + LINE, axis_left, axis_left + LINE, INK)
    _fill(canvas, plot_bottom, plot_bottom + LINE, axis_left, plot_right, INK)
    for row, text in ((plot_top, y_ticks[0]), (plot_bottom, y_ticks[1])):
        _fill(canvas, row, row + LINE, axis_left - TICK_LENGTH, axis_left, INK)
        mask = render_text(text)
        _paint(canvas, mask, row + LINE // 2 - TEXT_HEIGHT // 2, axis_left - TICK_LENGTH - 4 - mask.shape[1], INK)
    tick_row = plot_bottom + LINE + LABEL_GAP
    x_ticks = ((plot_left, x_low), (plot_right - 1, x_high)) if x_high > x_low else (((plot_left + plot_right) // 2, x_low),)
    for col, value in x_ticks:
        mask = render_text(f"{value:.6g}")
        _paint(canvas, mask, tick_row, min(max(col - mask.shape[1] // 2, 0), width - mask.shape[1]), INK)
    if x_label:
        mask = render_text(x_label)
        _paint(canvas, mask, tick_row + TEXT_HEIGHT + LABEL_GAP, (plot_left + plot_right - mask.shape[1]) // 2, INK)
    if y_label:
        mask = np.rot90(render_text(y_label))
        _paint(canvas, mask, (plot_top + plot_bottom - mask.shape[0]) // 2, PAD, INK)

    x_span = x_high - x_low
    for index, (name, (xs, ys)) in enumerate(series.items()):
        color = LINE_COLORS[index % len(LINE_COLORS)]
        # Earlier lines are thicker, so that terms with (nearly) the same values, drawn over
        # each other (a loss equal to its only term), still show each colour at the edges.
        thickness = LINE * (1 + max(0, min(len(series), 4) - 1 - index))
        x = np.asarray(xs, dtype=float)
        y = np.asarray(ys, dtype=float)
        cols = plot_left + ((x - x_low) / x_span if x_span else np.full_like(x, 0.5)) * (LINE_PLOT_WIDTH - LINE)
        rows = plot_bottom - LINE - (y - y_low) / (y_high - y_low) * (plot_bottom - LINE - plot_top)
        line_cols, line_rows = _segments(cols, rows)
        dot = thickness + 2 * LINE if len(x) == 1 else thickness  # a lone point must be visible
        for d_row in range(dot):
            for d_col in range(dot):
                canvas[np.clip(line_rows + d_row - dot // 2 + LINE // 2, 0, height - 1),
                       np.clip(line_cols + d_col - dot // 2 + LINE // 2, 0, width - 1)] = color
        legend_row = plot_top + index * LEGEND_ROW
        _fill(canvas, legend_row + TEXT_HEIGHT // 2 - LINE, legend_row + TEXT_HEIGHT // 2 + LINE, legend_left,
              legend_left + SWATCH_WIDTH, color)
        _paint(canvas, render_text(name), legend_row, legend_left + SWATCH_WIDTH + 6, INK)

    atomic_write_bytes(Path(path), encode_png(canvas))
