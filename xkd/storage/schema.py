"""The cache's columns, their on-disk types, and how dense tensors align to rows.

One Parquet row is one (example, side, mask epoch) as a teacher saw it. Ragged per-row data
(token ids, masked positions, top-k) lives in Parquet list columns; dense tensors (hidden
states, sentence vectors, class logits) live in Zarr arrays whose first axis is indexed
through the row's offsets. The choice of types is the storage budget: ids are uint32 (every
real vocabulary fits), top-k logits fp16, log-normalisers fp32 (they carry the whole
softmax's mass, so fp16's 3 significant digits would bias every recovered probability).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = 1

# Columns every cache row has, whatever the teacher produced.
BASE_FIELDS = [
    pa.field("example_id", pa.uint64(), nullable=False),
    pa.field("pair_id", pa.int64(), nullable=False),  # -1 for monolingual rows
    pa.field("lang", pa.string(), nullable=False),
    pa.field("side", pa.string(), nullable=False),  # "mono" | "src" | "tgt"
    pa.field("mask_epoch", pa.uint16(), nullable=False),
    # What the teacher saw, masking applied; labels hold the original ids at the masked
    # positions, so the unmasked sentence is input_ids with labels written back.
    pa.field("input_ids", pa.list_(pa.uint32()), nullable=False),
    pa.field("word_start", pa.list_(pa.bool_()), nullable=False),
    pa.field("masked_positions", pa.list_(pa.uint16()), nullable=False),
    pa.field("labels", pa.list_(pa.uint32()), nullable=False),
    pa.field("teacher_loss", pa.float32(), nullable=False),  # NaN where nothing is masked
    pa.field("class_label", pa.int32(), nullable=False),  # -1 where the example has none
    # Where this row's slice starts in token- and word-aligned Zarr arrays of the shard.
    pa.field("token_offset", pa.int64(), nullable=False),
    pa.field("word_offset", pa.int64(), nullable=False),
]

# Present when the teacher is a masked LM and top-k was asked for. topk_ids and topk_logits
# hold n_masked * k values per row, the row's masked positions in order, each sorted by
# descending logit; lognorm holds logsumexp over the full vocabulary per masked position.
TOPK_FIELDS = [
    pa.field("topk_ids", pa.list_(pa.uint32()), nullable=False),
    pa.field("topk_logits", pa.list_(pa.float16()), nullable=False),
    pa.field("lognorm", pa.list_(pa.float32()), nullable=False),
]

# Present when the raw text was stored: students that tokenize a side themselves (the
# translation side in xd and mmkd, a student tokenizer unlike the teacher's) read it here.
# pair_text is the other side of a parallel pair ("" for monolingual rows), so one row
# carries a whole pair and students need no join across rows.
TEXT_FIELDS = [
    pa.field("text", pa.string(), nullable=False),
    pa.field("pair_text", pa.string(), nullable=False),
]

# Present when the corpus's records are sentence pairs (premise/hypothesis, a PAWS-X pair):
# the row's input_ids are the teacher's own pair template, and segment_b is the position of
# the second segment's first token, so token type ids (BERT: 1 from there on) can be rebuilt
# for any model that takes them. 0 where a row holds one text.
PAIR_FIELDS = [pa.field("segment_b", pa.uint16(), nullable=False)]
# With the text stored, the second segments: text_b (this row's) and pair_text_b (the other
# side's, for a parallel corpus of pairs; "" otherwise).
PAIR_TEXT_FIELDS = [
    pa.field("text_b", pa.string(), nullable=False),
    pa.field("pair_text_b", pa.string(), nullable=False),
]

ALL_FIELDS = BASE_FIELDS + TOPK_FIELDS + TEXT_FIELDS + PAIR_FIELDS + PAIR_TEXT_FIELDS
RAGGED_COLUMNS = {f.name for f in ALL_FIELDS if pa.types.is_list(f.type)}

# How a dense array's first axis relates to rows: one entry per row, per token of the row,
# or per word (token with word_start) of the row.
ALIGNS = ("row", "token", "word")


def arrow_schema(has_topk: bool, has_text: bool = False, has_pairs: bool = False) -> pa.Schema:
    return pa.schema(BASE_FIELDS + (TOPK_FIELDS if has_topk else []) + (TEXT_FIELDS if has_text else [])
                     + (PAIR_FIELDS if has_pairs else []) + (PAIR_TEXT_FIELDS if has_pairs and has_text else []))


@dataclass(frozen=True)
class DenseSpec:
    """A dense output: `name` like "hidden.6", "cls", "pooled", "class_logits"."""

    name: str
    align: str
    dim: int
    dtype: str = "float16"

    def __post_init__(self):
        if self.align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, not {self.align!r}")

    def to_json(self) -> dict:
        return {"align": self.align, "dim": self.dim, "dtype": self.dtype}

    @classmethod
    def from_json(cls, name: str, d: dict) -> "DenseSpec":
        return cls(name=name, align=d["align"], dim=int(d["dim"]), dtype=d["dtype"])


class Ragged:
    """A ragged column as flat values plus row offsets (len = rows + 1).

    This is Arrow's own list layout, so building a column costs no per-row Python work.
    """

    __slots__ = ("values", "offsets")

    def __init__(self, values: np.ndarray, offsets: np.ndarray):
        self.values = np.asarray(values)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.values):
            raise ValueError("offsets must start at 0 and end at len(values)")

    @classmethod
    def from_rows(cls, rows, dtype) -> "Ragged":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = (
            np.concatenate([np.asarray(r, dtype=dtype).ravel() for r in rows])
            if len(rows)
            else np.zeros(0, dtype)
        )
        return cls(values.astype(dtype, copy=False), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row_sums(self) -> np.ndarray:
        """Per-row sum of the values (e.g. words per row from word-start flags)."""
        running = np.zeros(len(self.values) + 1, dtype=np.int64)
        np.cumsum(self.values, out=running[1:])
        return running[self.offsets[1:]] - running[self.offsets[:-1]]

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def take(self, rows: np.ndarray) -> "Ragged":
        """The given rows, in the given order, as a new Ragged (one vectorised gather)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.lengths()[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        shift = np.repeat(self.offsets[:-1][rows] - offsets[:-1], lengths)
        return Ragged(self.values[np.arange(offsets[-1]) + shift], offsets)

    @classmethod
    def concat(cls, parts: list["Ragged"]) -> "Ragged":
        if len(parts) == 1:
            return parts[0]
        sizes = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + base for p, base in zip(parts, sizes)])
        return cls(np.concatenate([p.values for p in parts]), offsets)

    def to_arrow(self, value_type: pa.DataType) -> pa.Array:
        values = pa.array(self.values, type=value_type)
        if self.offsets[-1] < 2**31:
            return pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), values)
        raise ValueError("a shard's ragged column is over 2**31 values; use smaller shards")


def ragged_from_arrow(column: pa.ChunkedArray | pa.Array) -> Ragged:
    """The inverse of Ragged.to_arrow for a list column read back from Parquet."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.values.to_numpy(zero_copy_only=False)
    # A sliced ListArray keeps the parent's values: rebase so offsets start at 0.
    start, stop = offsets[0], offsets[-1]
    return Ragged(values[start:stop], offsets - start)
