"""One canonical spelling for tokens of every subword convention (docs/vocab.md).

The union vocabulary is written in WordPiece style, because the student is a BERT-style
model whose tokenizer is a WordPiece vocab.txt:

- a word-initial piece is written bare (`the`), a continuation piece with `##` (`##ing`);
- SentencePiece marks word starts with `▁` (`▁the` -> `the`, `ing` -> `##ing`);
- byte-level BPE (GPT-2, RoBERTa) spells bytes with printable stand-in characters and marks
  a leading space with `Ġ` (`Ġthe` -> `the`, `ing` -> `##ing`);
- a piece whose text cannot be a vocab.txt line (invalid UTF-8, whitespace or control
  characters, empty) or could be misread (it looks like an escape, or a word-initial piece
  starting with `##`) is written as `<0xHH>` escapes of its UTF-8 bytes, so
  `Ġà¤` (a space and two bytes of one Devanagari letter) -> `<0xE0><0xA4>`;
- SentencePiece byte-fallback pieces `<0xHH>` keep their spelling;
- the five special roles are unified by role, whatever their spelling or id:
  pad, unk, cls, sep, mask -> [PAD] [UNK] [CLS] [SEP] [MASK] (`<pad> <unk> <s> </s> <mask>`).

`to_canonical` and `from_canonical` are inverse for every token of a convention, so a
teacher's token string can always be recovered from the union.
"""

from __future__ import annotations

import re
from functools import lru_cache

WORDPIECE = "wordpiece"
SENTENCEPIECE = "sentencepiece"
BYTELEVEL = "bytelevel"
CONVENTIONS = (WORDPIECE, SENTENCEPIECE, BYTELEVEL)

CONTINUATION = "##"
SP_WORD_START = "\u2581"  # ▁
BL_SPACE = "\u0120"  # Ġ, the byte-level stand-in for the space byte

SPECIAL_ROLES = ("pad", "unk", "cls", "sep", "mask")
CANONICAL_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
# Spellings that name a role when a bare vocab file carries no tokenizer config.
SPECIAL_SPELLINGS = {
    "[PAD]": "pad", "<pad>": "pad",
    "[UNK]": "unk", "<unk>": "unk",
    "[CLS]": "cls", "<s>": "cls",
    "[SEP]": "sep", "</s>": "sep",
    "[MASK]": "mask", "<mask>": "mask",
}

_ESCAPE = r"<0x[0-9A-F]{2}>"
_ESCAPES = re.compile(f"(?:{_ESCAPE})+")
_ONE_ESCAPE = re.compile(_ESCAPE)


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


@lru_cache(maxsize=1)
def _bytelevel_codec() -> tuple[re.Pattern, dict[int, int]]:
    """A pattern matching byte-level tokens, and a str.translate table to latin-1."""
    chars = "".join(sorted(byte_to_unicode().values()))
    return re.compile(f"[{re.escape(chars)}]*"), {ord(c): b for c, b in unicode_to_byte().items()}


_WHITESPACE = re.compile(r"\s")


def _clean(text: str) -> bool:
    """True when `text` can stand as itself in a vocab.txt line and be read back as itself."""
    return bool(text) and text.isprintable() and not _WHITESPACE.search(text) and not _ESCAPES.fullmatch(text)


def encode_piece(word_start: bool, payload: bytes) -> str:
    """(word start?, the piece's bytes) -> canonical spelling."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or not _clean(text) or (word_start and text.startswith(CONTINUATION)):
        text = "".join(f"<0x{b:02X}>" for b in payload)
    return text if word_start else CONTINUATION + text


def decode_piece(canonical: str) -> tuple[bool, bytes]:
    """The inverse of encode_piece."""
    word_start = not canonical.startswith(CONTINUATION)
    body = canonical if word_start else canonical[len(CONTINUATION):]
    if body and _ESCAPES.fullmatch(body):
        return word_start, bytes(int(m.group(0)[3:5], 16) for m in _ONE_ESCAPE.finditer(body))
    return word_start, body.encode("utf-8")


def _split_marker(raw: bytes) -> tuple[bool, bytes]:
    # A lone space is a continuation piece holding a space, so that "Ġ" and "ĠĠ" stay distinct.
    if raw.startswith(b" ") and len(raw) > 1:
        return True, raw[1:]
    return False, raw


def bytelevel_bytes(token: str) -> bytes | None:
    """The bytes a byte-level BPE token spells, or None if it is not byte-level."""
    pattern, table = _bytelevel_codec()
    if not pattern.fullmatch(token):
        return None
    return token.translate(table).encode("latin-1")


def to_canonical(token: str, convention: str) -> str:
    """A teacher's (non-special) token -> its canonical union spelling."""
    if convention == WORDPIECE:
        return token
    if convention == SENTENCEPIECE:
        if _ONE_ESCAPE.fullmatch(token):  # byte fallback
            return token
        return encode_piece(*_split_marker(token.replace(SP_WORD_START, " ").encode("utf-8")))
    if convention == BYTELEVEL:
        raw = bytelevel_bytes(token)
        if raw is None:
            raise ValueError(f"{token!r} is not a byte-level BPE token")
        return encode_piece(*_split_marker(raw))
    raise ValueError(f"unknown convention {convention!r}")


def from_canonical(canonical: str, convention: str) -> str:
    """A canonical (non-special) spelling -> the token string of a teacher of `convention`."""
    if convention == WORDPIECE:
        return canonical
    if convention == SENTENCEPIECE and _ONE_ESCAPE.fullmatch(canonical):
        return canonical
    word_start, payload = decode_piece(canonical)
    raw = (b" " if word_start else b"") + payload
    if convention == SENTENCEPIECE:
        return raw.decode("utf-8").replace(" ", SP_WORD_START)
    if convention == BYTELEVEL:
        table = byte_to_unicode()
        return "".join(table[b] for b in raw)
    raise ValueError(f"unknown convention {convention!r}")


def surface_text(canonical: str) -> tuple[bool, str]:
    """(word start?, plain text) of a canonical piece, for re-tokenizing it with another
    tokenizer. Bytes that are not valid UTF-8 become U+FFFD."""
    word_start, payload = decode_piece(canonical)
    return word_start, payload.decode("utf-8", errors="replace")


def word_start_marker_count(tokens: list[str]) -> dict[str, int]:
    """How many tokens carry each convention's marker: `##` continuations, `▁` and `Ġ` word
    starts. A bare vocab file's convention is guessed from these (see teachers.py)."""
    counts = {WORDPIECE: 0, SENTENCEPIECE: 0, BYTELEVEL: 0}
    for t in tokens:
        if len(t) > 2 and t.startswith(CONTINUATION):
            counts[WORDPIECE] += 1
        elif len(t) > 1 and t.startswith(SP_WORD_START):
            counts[SENTENCEPIECE] += 1
        elif len(t) > 1 and t.startswith(BL_SPACE):
            counts[BYTELEVEL] += 1
    return counts
