"""Words as each subword convention writes them, for the teacher pipeline (whole-word
masking, the cached word starts) and the students (mmkd's word alignment) alike, so that a
teacher's word i and a student's word i are the same word.
"""

from __future__ import annotations

import weakref

import numpy as np

from ..errors import BadInput
from .canonical import BL_SPACE, BYTELEVEL, SENTENCEPIECE, SP_WORD_START
from .teachers import backend_spec, convention_of

_MARKERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def word_marker(tokenizer) -> str | None:
    """What starts a word in the tokenizer's pieces: "▁" (SentencePiece: XLM-R, mDeBERTa),
    "Ġ" (byte-level BPE: RoBERTa), or None where the tokenizer's own word ids are the words
    (WordPiece: a word is a piece and its "##" continuations)."""
    if tokenizer not in _MARKERS:
        try:
            convention = convention_of(backend_spec(tokenizer), "teacher tokenizer")
        except BadInput:  # a convention without a marker: its word ids are all there is
            convention = None
        _MARKERS[tokenizer] = {SENTENCEPIECE: SP_WORD_START, BYTELEVEL: BL_SPACE}.get(convention)
    return _MARKERS[tokenizer]


def word_numbers(encoding, real: np.ndarray, sequence: np.ndarray, marker: str | None) -> np.ndarray:
    """The word of each token, numbered 0, 1, ... across the whole input (both segments of a
    pair), -1 at special tokens. With a marker, a word starts at a piece that begins with it
    or at the first piece of a segment, so "▁3", "-", "1," (or "Ġ3", "-", "1", ",") is one
    word, as the convention writes it; without one, at each new word id of the tokenizer."""
    n = len(real)
    new_segment = np.r_[True, (sequence[1:] != sequence[:-1]) | ~real[:-1]] if n else np.zeros(0, bool)
    if marker is not None:
        starts = real & (np.fromiter((t.startswith(marker) for t in encoding.tokens), bool, n) | new_segment)
    else:
        words = np.array([-1 if w is None else w for w in encoding.word_ids], dtype=np.int64)
        starts = real & (new_segment | np.r_[True, words[1:] != words[:-1]])
    numbers = np.cumsum(starts) - 1
    numbers[~real] = -1
    return numbers
