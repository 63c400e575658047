"""xkd.chart: the PNG it writes, read back by an independent decoder written here, and its font."""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from xkd.chart import BAR_COLOR, FONT, GLYPH_HEIGHT, GLYPH_WIDTH, GLYPHS, bar_chart_png, render_text

WHITE = (255, 255, 255)


def decode_png(path: Path) -> np.ndarray:
    """The (height, width, 3) pixels of an 8-bit RGB, non-interlaced PNG whose scanlines use filter 0."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks = []
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        body = data[offset + 8:offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind!r}"
        chunks.append((kind, body))
        offset += 12 + length
    assert offset == len(data)
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour_type, compression, filter_method, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour_type, compression, filter_method, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride)
    assert (rows[:, 0] == 0).all(), "a scanline uses a filter other than 0 (none)"
    return rows[:, 1:].reshape(height, width, 3)


def draw(tmp_path: Path, values, name="chart.png", **options) -> np.ndarray:
    labels = options.pop("labels", [f"l{index}" for index in range(len(values))])
    path = tmp_path / name
    bar_chart_png(path, options.pop("title", "a title"), labels, values, **options)
    return decode_png(path)


def bar_columns(image: np.ndarray) -> list[range]:
    """The column range of each bar, left to right, found by scanning for the bar colour."""
    has_bar = (image == BAR_COLOR).all(axis=2).any(axis=0)
    runs = []
    for is_bar, group in itertools.groupby(enumerate(has_bar), key=lambda item: item[1]):
        if is_bar:
            columns = [column for column, _ in group]
            runs.append(range(columns[0], columns[-1] + 1))
    return runs


def bar_height(image: np.ndarray, column: int) -> int:
    return int((image[:, column] == BAR_COLOR).all(axis=1).sum())


def bar_top(image: np.ndarray, column: int) -> int:
    return int(np.argmax((image[:, column] == BAR_COLOR).all(axis=1)))


def test_png_is_rgb_mostly_white_and_grows_with_bars(tmp_path):
    image = draw(tmp_path, [0.25, 0.5, 1.0], y_label="F1")
    assert image.shape[0] == 320
    assert (image == WHITE).all(axis=2).mean() > 0.6
    wider = draw(tmp_path, [0.25, 0.5, 1.0, 0.1, 0.2, 0.3], name="wider.png", y_label="F1")
    assert wider.shape[1] == image.shape[1] + 3 * 80


def test_bar_heights_are_proportional_to_values(tmp_path):
    image = draw(tmp_path, [0.25, 0.5, 1.0])
    bars = bar_columns(image)
    assert len(bars) == 3
    quarter, half, full = (bar_height(image, (bar.start + bar.stop) // 2) for bar in bars)
    assert full > 150
    assert abs(2 * quarter - half) <= 2
    assert abs(4 * quarter - full) <= 2


def test_default_y_max(tmp_path):
    # Scores in [0, 1] are drawn against 1.0; anything else against 1.1 x the tallest bar.
    scores = draw(tmp_path, [0.5])
    explicit = draw(tmp_path, [0.5], name="explicit.png", y_max=1.0)
    assert bar_height(scores, bar_columns(scores)[0].start) == bar_height(explicit, bar_columns(explicit)[0].start)

    large = draw(tmp_path, [2.0, 4.0], name="large.png")
    against_four = draw(tmp_path, [2.0, 4.0], name="four.png", y_max=4.0)
    tall = bar_height(large, bar_columns(large)[1].start)
    assert abs(tall * 1.1 - bar_height(against_four, bar_columns(against_four)[1].start)) <= 2


def test_error_whisker_adds_pixels_above_the_bar(tmp_path):
    plain = draw(tmp_path, [0.5])
    whiskered = draw(tmp_path, [0.5], name="whiskered.png", errors=[0.1])
    (plain_bar,), (whiskered_bar,) = bar_columns(plain), bar_columns(whiskered)
    # The bar's edge columns: the whisker runs down the centre and over the bar.
    height = bar_height(whiskered, whiskered_bar.start)
    assert height == bar_height(plain, plain_bar.start)
    top = bar_top(whiskered, whiskered_bar.start)
    center = (whiskered_bar.start + whiskered_bar.stop) // 2
    whisker_above = height // 5  # an error of 0.1 on a bar of 0.5
    assert not (whiskered[top - whisker_above + 2:top, center] == WHITE).all(axis=1).any()
    assert (plain[top - 3:top, (plain_bar.start + plain_bar.stop) // 2] == WHITE).all()


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
    assert list(tmp_path.iterdir()) == []


def test_non_ascii_text_is_drawn_as_question_marks(tmp_path):
    image = draw(tmp_path, [0.734, 0.5], title="Précision — 日本語", labels=["zh-Hant", "हिन्दी"], y_label="F₁")
    assert len(bar_columns(image)) == 2
    assert (render_text("é日") == render_text("??")).all()
    assert [path.name for path in tmp_path.iterdir()] == ["chart.png"]  # no temporary file left behind


def test_every_glyph_has_the_declared_size():
    assert {chr(code) for code in range(32, 127)} <= set(FONT)
    for char, hex_columns in FONT.items():
        columns = bytes.fromhex(hex_columns)
        assert len(columns) == GLYPH_WIDTH, char
        assert max(columns) < 2 ** GLYPH_HEIGHT, char
        assert GLYPHS[char].shape == (GLYPH_HEIGHT, GLYPH_WIDTH), char
    assert render_text("ab").shape == (2 * GLYPH_HEIGHT, 2 * (2 * GLYPH_WIDTH + 1))


@pytest.mark.parametrize("chars", ["0123456789", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"])
def test_glyphs_are_pairwise_distinct(chars):
    for first, second in itertools.combinations(chars, 2):
        assert not (GLYPHS[first] == GLYPHS[second]).all(), f"{first!r} and {second!r} share a glyph"
