"""How every xkd command reads text lines: one rule, in one leaf module (it imports nothing).

A line ends at "\\n" only, and one "\\r" before it is dropped, so CRLF files read like LF
files. Nothing else ends a line: str.splitlines() would also break at U+2028, U+0085, form
feeds and other characters that real corpora and real vocabularies (mBERT's) hold inside a
line, so the same file would give different lines, or line numbers, to different commands.
"""

from __future__ import annotations

import os


def strip_line_end(line):
    """A line as read with its terminator ("...\\n", "...\\r\\n", or none at the end of a
    file) -> its text. Works on str and bytes alike."""
    nl, cr = ("\n", "\r") if isinstance(line, str) else (b"\n", b"\r")
    return line.removesuffix(nl).removesuffix(cr)


def split_lines(text: str) -> list[str]:
    """The lines of a whole text. A final line end does not start another (empty) line."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_lines(path: str | os.PathLike, encoding: str = "utf-8") -> list[str]:
    """The lines of a text file (raises UnicodeDecodeError on bytes that are not `encoding`).
    A byte-order mark at the start is not part of the first line."""
    with open(path, "rb") as f:
        text = f.read().decode(encoding)
    return split_lines(text.removeprefix("\ufeff"))
