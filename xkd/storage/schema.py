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

# 2: dense arrays stored per output with a chosen codec (raw values + CRC32C by default: fp16
# teacher states compress by under 10%, and raw chunks are read straight into their buffers),
# and attention as only each row's real keys (layout "keys"). Caches of version 1 (zstd
# chunks, attention zero-padded to the max length) still read: the reader follows each
# array's own zarr.json and the spec's layout.
SCHEMA_VERSION = 2

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

# The same with the q8 codec (storage/codec.py): the ids as above, and per masked position k
# uint8 codes of the top-k log-probabilities in place of topk_logits and lognorm (the
# log-probabilities carry the normaliser). Readers decode them back to topk_logits (the
# log-probabilities) and lognorm (0), so no consumer sees the codes.
TOPK_Q8_FIELDS = [
    TOPK_FIELDS[0],
    pa.field("topk_codes", pa.list_(pa.uint8()), nullable=False),
]

# How top-k values are stored: "fp16" (TOPK_FIELDS) or "q8" (TOPK_Q8_FIELDS).
TOPK_CODECS = ("fp16", "q8")

# Present when draws were stored (cache-teachers --sample N; xkd/sampling.py): per masked
# position the distinct drawn ids, ascending, and how often each was drawn. Each position's
# counts sum to N, which is where one position's ids end and the next one's begin.
SAMPLE_FIELDS = [
    pa.field("sample_ids", pa.list_(pa.uint32()), nullable=False),
    pa.field("sample_counts", pa.list_(pa.uint16()), nullable=False),
]
MAX_SAMPLE = 2**16 - 1  # draws per position: a count is uint16

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

ALL_FIELDS = BASE_FIELDS + TOPK_FIELDS + TOPK_Q8_FIELDS[1:] + SAMPLE_FIELDS + TEXT_FIELDS + PAIR_FIELDS + PAIR_TEXT_FIELDS
RAGGED_COLUMNS = {f.name for f in ALL_FIELDS if pa.types.is_list(f.type)}

# How a dense array's first axis relates to rows: one entry per row, per token of the row,
# or per word (token with word_start) of the row.
ALIGNS = ("row", "token", "word")


def arrow_schema(has_topk: bool, has_text: bool = False, has_pairs: bool = False, topk_codec: str = "fp16",
                 has_sample: bool = False) -> pa.Schema:
    topk = (TOPK_Q8_FIELDS if topk_codec == "q8" else TOPK_FIELDS) if has_topk else []
    return pa.schema(BASE_FIELDS + topk + (SAMPLE_FIELDS if has_sample else []) + (TEXT_FIELDS if has_text else [])
                     + (PAIR_FIELDS if has_pairs else []) + (PAIR_TEXT_FIELDS if has_pairs and has_text else []))


# How a dense array's chunks are encoded (each codec ends with a CRC32C, so a flipped byte
# fails the read). "none": raw little-endian values, read straight into the reader's buffer;
# "lz4": blosc lz4 with byte shuffle; "zstd": zstd level 1 (what schema 1 wrote).
CODECS = ("none", "lz4", "zstd")
# How a token-aligned attention output's values are laid out: "padded" stores every token's
# heads x max_length probabilities (schema 1); "keys" stores only the row's real keys, per
# token heads x row length (the rest are zeros: attention never reaches padding), a row of
# L tokens as L x heads x L values in one flat array.
LAYOUTS = ("padded", "keys")


@dataclass(frozen=True)
class DenseSpec:
    """A dense output: `name` like "hidden.6", "cls", "pooled", "class_logits", "attn.3".

    `align` and `dim` say what a reader gets: one `dim`-wide vector per row, token or word.
    `codec` and `layout` say how it is stored (`heads` with the "keys" layout: dim is
    heads x max_length)."""

    name: str
    align: str
    dim: int
    dtype: str = "float16"
    codec: str = "none"
    layout: str = "padded"
    heads: int = 0

    def __post_init__(self):
        if self.align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, not {self.align!r}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, not {self.codec!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {self.layout!r}")
        if self.layout == "keys" and (self.align != "token" or self.heads < 1 or self.dim % self.heads):
            raise ValueError(f"{self.name}: the keys layout needs token alignment and dim = heads x max length")

    @property
    def max_keys(self) -> int:
        """Keys per head of a padded attention vector (the view's max length)."""
        return self.dim // self.heads if self.heads else self.dim

    def to_json(self) -> dict:
        out = {"align": self.align, "dim": self.dim, "dtype": self.dtype, "codec": self.codec}
        if self.layout == "keys":
            out.update(layout="keys", heads=self.heads)
        return out

    @classmethod
    def from_json(cls, name: str, d: dict) -> "DenseSpec":
        # Schema 1 recorded neither: its chunks were zstd, its attention padded.
        return cls(name=name, align=d["align"], dim=int(d["dim"]), dtype=d["dtype"], codec=d.get("codec", "zstd"),
                   layout=d.get("layout", "padded"), heads=int(d.get("heads", 0)))


def key_counts(spec: DenseSpec, token_counts: np.ndarray) -> np.ndarray:
    """Stored values per row of a "keys" output: L x heads x L for a row of L tokens."""
    lengths = np.asarray(token_counts, dtype=np.int64)
    return lengths * lengths * spec.heads


def pack_keys(padded: np.ndarray, token_counts: np.ndarray, heads: int) -> np.ndarray:
    """Token-aligned attention (tokens, heads x max_keys), keys zero-padded, as the "keys"
    layout's flat values: per row of L tokens, per token, per head, its first L keys."""
    tokens = len(padded)
    if not tokens:
        return np.zeros(0, padded.dtype)
    per_token = np.repeat(np.asarray(token_counts, dtype=np.int64), token_counts)
    cube = padded.reshape(tokens, heads, -1)
    keep = np.arange(cube.shape[2])[None, None, :] < per_token[:, None, None]
    return cube[np.broadcast_to(keep, cube.shape)]


def unpack_keys(values: np.ndarray, token_counts: np.ndarray, heads: int, max_keys: int) -> np.ndarray:
    """The inverse of pack_keys: (tokens, heads x max_keys), zeros past each row's length."""
    token_counts = np.asarray(token_counts, dtype=np.int64)
    tokens = int(token_counts.sum())
    out = np.zeros((tokens, heads, max_keys), dtype=values.dtype)
    per_token = np.repeat(token_counts, token_counts)
    keep = np.arange(max_keys)[None, None, :] < per_token[:, None, None]
    out[np.broadcast_to(keep, out.shape)] = values
    return out.reshape(tokens, heads * max_keys)


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
