"""Length-bucketed batches under a token budget (docs/design.md, "Stage one", step 3).

A shard's rows are sorted by length and cut greedily so that rows x longest row (the padded
size the teacher computes on) stays within the budget. Sorting makes each batch's rows
nearly equal in length, so almost no compute is spent on padding. The cut depends only on
the rows' lengths and the budget, so a retried shard sees the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadInput
from ..segments import token_type_ids


def length_buckets(lengths: np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Row indices per batch, shortest rows first; each batch's padded size <= budget (a row
    longer than the budget gets a batch of its own)."""
    if token_budget < 1:
        raise BadInput(f"--token-budget must be at least 1, not {token_budget}.")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        # Sorted ascending, so the batch's longest row is its last one.
        if end - start > 1 and (end - start) * lengths[order[end - 1]] > token_budget:
            batches.append(order[start : end - 1])
            start = end - 1
    if start < len(order):
        batches.append(order[start:])
    return batches


@dataclass
class PaddedBatch:
    """Rows padded to the batch's longest; masked positions flattened in row-major order."""

    rows: np.ndarray  # indices of these rows in the shard
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64
    word_start: np.ndarray  # (B, T) bool
    masked_rows: np.ndarray  # (M,) int64, row within the batch
    masked_cols: np.ndarray  # (M,) int64
    labels: np.ndarray  # (M,) int64
    token_type_ids: np.ndarray | None = None  # (B, T) int64, sentence pairs only
    uniforms: np.ndarray | None = None  # (M, N) sorted uniforms of --sample's draws (xkd/sampling.py)

    @classmethod
    def build(cls, rows: np.ndarray, ids: list, word_start: list, positions: list, labels: list, pad_id: int,
              segment_b: np.ndarray | None = None):
        lengths = np.array([len(ids[r]) for r in rows])
        width = int(lengths.max())
        input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        starts = np.zeros((len(rows), width), dtype=bool)
        for i, r in enumerate(rows):
            input_ids[i, : lengths[i]] = ids[r]
            attention[i, : lengths[i]] = 1
            starts[i, : lengths[i]] = word_start[r]
        n_masked = np.array([len(positions[r]) for r in rows], dtype=np.int64)
        masked_rows = np.repeat(np.arange(len(rows)), n_masked)
        if n_masked.sum():
            masked_cols = np.concatenate([positions[r] for r in rows]).astype(np.int64)
            flat_labels = np.concatenate([labels[r] for r in rows]).astype(np.int64)
        else:
            masked_cols = flat_labels = np.zeros(0, np.int64)
        types = None if segment_b is None else token_type_ids(lengths, segment_b[rows], width)
        return cls(np.asarray(rows), input_ids, attention, starts, masked_rows, masked_cols, flat_labels, types)
