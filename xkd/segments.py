"""Sentence pairs as models read them: which tokens belong to the second segment.

A cached pair row stores its input ids in the teacher's own template and `segment_b`, the
position of the second segment's first token. Token type ids are rebuilt from that for every
model that takes them, teacher and student alike, so the pipeline (teachers) and the
students share this leaf rather than one importing the other.
"""

from __future__ import annotations

import numpy as np


def token_type_ids(lengths: np.ndarray, segment_b: np.ndarray, width: int) -> np.ndarray:
    """(rows, width) int64 token types from each row's segment_b: 1 from the second segment's
    first token to the row's end (BERT's [CLS] a [SEP] -> 0, b [SEP] -> 1), 0 elsewhere and
    in rows of one text (segment_b 0)."""
    positions = np.arange(width)[None, :]
    segment_b = np.asarray(segment_b, dtype=np.int64)[:, None]
    return ((segment_b > 0) & (positions >= segment_b) & (positions < np.asarray(lengths)[:, None])).astype(np.int64)


def takes_token_types(config) -> bool:
    """Whether a model (its config) has a token type embedding to give types 0 and 1 to
    (BERT); one that has not (RoBERTa and XLM-R: one type; DistilBERT, mDeBERTa-v3: none)
    reads a pair from its template alone."""
    return getattr(config, "type_vocab_size", 0) >= 2


def second_segment_start(sequence_ids) -> int:
    """segment_b of one encoding (a fast tokenizer's `sequence_ids`: None at specials, 0 in
    the first segment, 1 in the second): the second segment's first token, or, where
    truncation left it no token, the position after the first segment's separator(s)."""
    sequence = [-1 if s is None else s for s in sequence_ids]
    if 1 in sequence:
        return sequence.index(1)
    return len(sequence) - 1
