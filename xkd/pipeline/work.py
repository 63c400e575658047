"""One shard's work, as a dask task runs it on a worker.

read the shard's examples -> tokenize each side with the teacher's tokenizer -> mask each
(example, side, mask epoch) row -> length-bucketed batches -> teacher inference -> write the
shard files. Returns the shard's manifest record; the client commits it. The output is a
pure function of the task, so a retried task rewrites the same bytes.
"""

from __future__ import annotations

import ctypes
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import BadInput
from ..sampling import draw_uniforms, runs_by_row
from ..storage import Ragged, write_shard_files
from ..weights import load_error_reason
from .batching import PaddedBatch, length_buckets
from .corpus import ShardSlice
from .masking import SIDE_CODES, MaskConfig, mask_row
from .options import SIDES
from .teachers import DAMAGED, Outputs, TeacherLoadFailed, TeacherSpec, get_teacher, topk_dtype, worker_device
from .tokenize import tokenize_seen, word_starts


@dataclass(frozen=True)
class View:
    """How a teacher sees the corpus and what is kept: everything here changes the bytes, so
    all of it is part of the cache key."""

    max_length: int
    mask: MaskConfig
    sides: str
    outputs: Outputs
    text: bool
    compute_dtype: str

    def __post_init__(self):
        if self.sides not in SIDES:
            raise BadInput(f"--sides must be one of {', '.join(SIDES)}, not {self.sides!r}.")
        if not 2 < self.max_length <= 65535:
            raise BadInput(f"--max-length must be between 3 and 65535, not {self.max_length}.")

    def row_sides(self, parallel: bool) -> list[tuple[str, int]]:
        """(side name, index into an example's texts) for each side a row is made of."""
        if not parallel:
            return [("mono", 0)]
        return {"both": [("src", 0), ("tgt", 1)], "src": [("src", 0)], "tgt": [("tgt", 1)]}[self.sides]

    def to_json(self, parallel: bool) -> dict:
        return {
            "max_length": self.max_length,
            "mask": self.mask.to_json(),
            "sides": [s for s, _ in self.row_sides(parallel)],
            "outputs": self.outputs.to_json(),
            "text": self.text,
            "compute_dtype": self.compute_dtype,
        }


@dataclass(frozen=True)
class ShardTask:
    cache_root: str
    teacher: TeacherSpec
    view: View
    slice: ShardSlice
    device_type: str  # "cuda" | "cpu"
    token_budget: int
    torch_threads: int | None = None  # None: leave the worker's setting alone


_ALLOCATOR_TUNED = False
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_allocator() -> None:
    """Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, and setting any threshold turns
    off glibc's dynamic mmap threshold: every tensor over 128 KiB is then mmapped and unmapped
    anew, which doubles the page faults of a CPU forward pass and slows it down by up to 2x
    (measured by bench/cache_teachers.py). Set the thresholds glibc would grow to by itself."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or not sys.platform.startswith("linux"):
        return
    _ALLOCATOR_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to undo
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


def process_shard(task: ShardTask) -> dict:
    """Run one shard end to end on this worker; return {"record", "examples", "timing"}."""
    import torch

    tune_allocator()
    if task.torch_threads:
        torch.set_num_threads(task.torch_threads)
    timing = {}
    t0 = time.perf_counter()
    examples = task.slice.examples()
    view, source = task.view, task.slice.source
    try:
        teacher = get_teacher(task.teacher, worker_device(task.device_type), view.compute_dtype)
    except Exception as e:  # the client checked what it can; whatever else stops the model loading does so every time
        raise TeacherLoadFailed(f"teacher {task.teacher.name!r} cannot be loaded from {task.teacher.path} on a worker "
                                f"({load_error_reason(e)}). {DAMAGED}") from None
    timing["read_load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rows = build_rows(examples, source.langs, source.parallel, view, teacher)
    timing["tokenize_mask_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    outputs, dense = run_teacher(teacher, rows, view.outputs, task.token_budget, view.mask.seed)
    timing["infer_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    columns = assemble_columns(rows, outputs, view)
    specs = view.outputs.dense_specs(task.teacher)
    record = write_shard_files(
        task.cache_root, task.slice.shard_id, columns, dense, specs,
        has_topk=bool(view.outputs.topk), has_text=view.text, has_pairs=source.has_pairs,
        topk_codec=view.outputs.topk_codec, has_sample=bool(view.outputs.sample),
    )
    # In the manifest, so that a resumed run's summary still counts every shard's.
    record["truncated_rows"] = rows.truncated
    timing["write_s"] = time.perf_counter() - t0
    return {"record": record, "examples": len(examples), "timing": timing}


@dataclass
class Rows:
    """A shard's rows before inference, in row order (example, side, mask epoch)."""

    example_id: np.ndarray
    pair_id: np.ndarray
    lang: np.ndarray
    side: np.ndarray
    mask_epoch: np.ndarray
    class_label: np.ndarray
    text: list[str]
    pair_text: list[str]
    input_ids: list[np.ndarray]
    word_start: list[np.ndarray]
    positions: list[np.ndarray]
    labels: list[np.ndarray]
    pad_id: int
    truncated: int = 0  # rows whose text was longer than the teacher's --max-length tokens
    segment_b: np.ndarray | None = None  # sentence pairs: where each row's second segment starts
    text_b: list[str] | None = None
    pair_text_b: list[str] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def build_rows(examples, langs, parallel: bool, view: View, teacher) -> Rows:
    sides = view.row_sides(parallel)
    epochs = view.mask.epochs if view.mask.active else 1
    pairs = bool(examples) and bool(examples[0].texts_b)

    def tokenized_side(i: int):
        texts_b = [ex.texts_b[i] for ex in examples] if pairs else None
        return tokenize_seen(teacher.tokenizer, [ex.texts[i] for ex in examples], view.max_length, texts_b)

    tokenized = {i: tokenized_side(i) for _, i in sides}
    if view.text and parallel:
        # The pair's text is stored as this teacher would see that side: a side it does not run
        # on (--sides src|tgt) is tokenized only to find where --max-length cuts it.
        for i in (0, 1):
            if i not in tokenized:
                tokenized[i] = tokenized_side(i)
    truncated = 0
    cols = {k: [] for k in ("example_id", "pair_id", "lang", "side", "mask_epoch", "class_label", "text",
                            "pair_text", "input_ids", "word_start", "positions", "labels", "segment_b", "text_b",
                            "pair_text_b")}
    for n, ex in enumerate(examples):
        # A row's text is what it covers: a 1 MB line the teacher saw 128 tokens of is stored
        # up to the end of those tokens.
        covered = {i: ex.texts[i] if t[n].seen is None else t[n].seen for i, t in tokenized.items()}
        covered_b = {i: ex.texts_b[i] if t[n].seen_b is None else t[n].seen_b for i, t in tokenized.items()} if pairs else {}
        for side, i in sides:
            row = tokenized[i][n]
            truncated += epochs * row.truncated
            starts = word_starts(row.word_index)
            for epoch in range(epochs):
                masked_ids, positions, labels = mask_row(row.ids, row.word_index, view.mask, teacher.vocab,
                                                         ex.example_id, side, epoch)
                cols["example_id"].append(ex.example_id)
                cols["pair_id"].append(ex.example_id if parallel else -1)
                cols["lang"].append(langs[i])
                cols["side"].append(side)
                cols["mask_epoch"].append(epoch)
                cols["class_label"].append(ex.label)
                cols["text"].append(covered[i])
                cols["pair_text"].append(covered.get(1 - i, ex.texts[1 - i]) if parallel else "")
                cols["input_ids"].append(masked_ids)
                cols["word_start"].append(starts)
                cols["positions"].append(positions)
                cols["labels"].append(labels)
                if pairs:
                    cols["segment_b"].append(row.segment_b)
                    cols["text_b"].append(covered_b[i])
                    cols["pair_text_b"].append(covered_b.get(1 - i, ex.texts_b[1 - i]) if parallel else "")
    return _rows_of(cols, pairs, teacher.pad_id, truncated)


def _rows_of(cols: dict[str, list], pairs: bool, pad_id: int, truncated: int) -> Rows:
    """The Rows of the per-row lists build_rows collected: per-row scalars as typed arrays, the
    rest as lists; the sentence-pair columns only when the corpus has pairs."""
    return Rows(
        example_id=np.array(cols["example_id"], dtype=np.uint64),
        pair_id=np.array(cols["pair_id"], dtype=np.int64),
        lang=np.array(cols["lang"], dtype=object),
        side=np.array(cols["side"], dtype=object),
        mask_epoch=np.array(cols["mask_epoch"], dtype=np.uint16),
        class_label=np.array(cols["class_label"], dtype=np.int32),
        text=cols["text"], pair_text=cols["pair_text"], input_ids=cols["input_ids"],
        word_start=cols["word_start"], positions=cols["positions"], labels=cols["labels"],
        pad_id=pad_id, truncated=truncated,
        segment_b=np.array(cols["segment_b"], dtype=np.uint16) if pairs else None,
        text_b=cols["text_b"] if pairs else None, pair_text_b=cols["pair_text_b"] if pairs else None,
    )


def _starts(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _spans(starts: np.ndarray, counts: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Flat destination indices of the given rows' entries, rows in the given order."""
    c = counts[rows]
    return np.repeat(starts[rows] - _starts(c)[:-1], c) + np.arange(int(c.sum()))


def shard_uniforms(rows: Rows, n_masked: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(masked positions, n) uniforms of --sample's draws, rows in order: each row's from its own
    seed (xkd/sampling.py), so batching never changes a draw."""
    per_row = [draw_uniforms(seed, int(rows.example_id[r]), SIDE_CODES[rows.side[r]], int(rows.mask_epoch[r]),
                             int(n_masked[r]), n) for r in range(len(rows)) if n_masked[r]]
    return np.concatenate(per_row) if per_row else np.zeros((0, n))


def draws_by_row(draws: np.ndarray, n_masked: np.ndarray) -> dict[str, Ragged]:
    """The (positions, N) draws as the cache stores them: per row, its positions' distinct ids
    with their counts."""
    ids, counts, per_row = runs_by_row(draws, n_masked)
    return {"sample_ids": Ragged(ids, _starts(per_row)), "sample_counts": Ragged(counts, _starts(per_row))}


def run_teacher(teacher, rows: Rows, outputs: Outputs, token_budget: int, seed: int = 0) -> tuple[dict, dict]:
    """Batched inference over a shard's rows; results scattered back into row order. `seed`:
    the masks' seed, which --sample's draws follow too."""
    n = len(rows)
    lengths = np.array([len(ids) for ids in rows.input_ids], dtype=np.int64)
    n_masked = np.array([len(p) for p in rows.positions], dtype=np.int64)
    n_words = np.array([int(ws.sum()) for ws in rows.word_start], dtype=np.int64)
    token_starts, masked_starts, word_starts_ = _starts(lengths), _starts(n_masked), _starts(n_words)
    specs = outputs.dense_specs(teacher.spec)
    extent = {"row": n, "token": int(lengths.sum()), "word": int(n_words.sum())}
    dense = {name: np.zeros((extent[s.align], s.dim), dtype=s.dtype) for name, s in specs.items()}
    total_masked = int(n_masked.sum())
    k = outputs.topk
    flat = {"teacher_loss": np.full(n, np.nan, dtype=np.float32)}
    if k:
        flat.update(topk_ids=np.zeros((total_masked, k), np.uint32),
                    topk_logits=np.zeros((total_masked, k), topk_dtype(outputs)), lognorm=np.zeros(total_masked, np.float32))
    if outputs.sample:
        uniforms = shard_uniforms(rows, n_masked, outputs.sample, seed)
        flat["sample_draws"] = np.zeros((total_masked, outputs.sample), np.int64)
    for batch_rows in length_buckets(lengths, token_budget):
        batch = PaddedBatch.build(batch_rows, rows.input_ids, rows.word_start, rows.positions, rows.labels, rows.pad_id,
                                  rows.segment_b)
        dest = _spans(masked_starts, n_masked, batch_rows)
        if outputs.sample:
            batch.uniforms = uniforms[dest]
        result = teacher.infer(batch, outputs)
        flat["teacher_loss"][batch_rows] = result["teacher_loss"]
        for name in ("topk_ids", "topk_logits", "lognorm", "sample_draws"):
            if name in flat:
                flat[name][dest] = result[name]
        for name, s in specs.items():
            if s.align == "row":
                dense[name][batch_rows] = result[name]
            elif s.align == "token":
                dense[name][_spans(token_starts, lengths, batch_rows)] = result[name]
            else:
                dense[name][_spans(word_starts_, n_words, batch_rows)] = result[name]
    if k:
        offsets = masked_starts * k
        flat["topk_ids"] = Ragged(flat["topk_ids"].ravel(), offsets)
        flat["topk_logits"] = Ragged(flat["topk_logits"].ravel(), offsets)
        flat["lognorm"] = Ragged(flat["lognorm"], masked_starts)
    if outputs.sample:
        flat.update(draws_by_row(flat.pop("sample_draws"), n_masked))
    return flat, dense


def assemble_columns(rows: Rows, outputs: dict, view: View) -> dict:
    columns = {
        "example_id": rows.example_id, "pair_id": rows.pair_id, "lang": rows.lang, "side": rows.side,
        "mask_epoch": rows.mask_epoch, "class_label": rows.class_label,
        "input_ids": Ragged.from_rows(rows.input_ids, np.uint32),
        "word_start": Ragged.from_rows(rows.word_start, np.bool_),
        "masked_positions": Ragged.from_rows(rows.positions, np.uint16),
        "labels": Ragged.from_rows(rows.labels, np.uint32),
        **outputs,
    }
    if view.text:
        columns["text"] = np.array(rows.text, dtype=object)
        columns["pair_text"] = np.array(rows.pair_text, dtype=object)
    if rows.segment_b is not None:
        columns["segment_b"] = rows.segment_b
        if view.text:
            columns["text_b"] = np.array(rows.text_b, dtype=object)
            columns["pair_text_b"] = np.array(rows.pair_text_b, dtype=object)
    return columns

