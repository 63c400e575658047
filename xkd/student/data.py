"""Streaming training data over caches.

The sample order is a pure function of (seed, batch index): which language each example
comes from, which row of that language it is, and in which order rows are visited are all
computed from counters, never from state accumulated while reading. So:
- resume is exact: the state is just (next batch, rows consumed per language);
- DataLoader workers and DDP ranks each compute the same plan and materialise only their
  own batches, so nothing is duplicated or dropped;
- nothing but the current shuffle window of each language is ever in memory.

Order within a language: each epoch permutes the language's row groups, cuts the permuted
list into windows of `shuffle_window` row groups (the shuffle buffer), and permutes rows
within each window. Languages are mixed by temperature sampling, q_l ∝ p_l^alpha, with p_l
the language's share of distinct examples (copies of one example by several teachers count
once), so --copies all and --copies best draw the same language mix.

Several teachers' copies of one example share a key (corpus identity, example id, side, mask
epoch); example ids restart at 0 in every corpus, so caches of different corpora never share
keys. --copies best keeps, per key, the copy with the lowest teacher loss.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from numba import njit
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import BadInput
from ..storage import Cache, Ragged, corpus_identity
from ..storage.reader import RecycledBuffers, read_each


@dataclass(frozen=True)
class StreamConfig:
    batch_size: int
    seed: int = 0
    alpha: float = 0.7  # language smoothing exponent; 1 = proportional, 0 = uniform
    copies: str = "all"  # several teachers' copies of an example: "all" or "best" (lowest teacher loss)
    shuffle_window: int = 8  # row groups per shuffle window
    mix: str = "example"  # "example": languages mixed within a batch; "batch": one language per batch
    languages: tuple[str, ...] = ()  # restrict to these; empty = every language in the caches
    columns: tuple[str, ...] | None = None  # Parquet columns to read; None = all
    dense: tuple[str, ...] = ()  # dense outputs to read
    world_size: int = 1  # DDP ranks; each takes every world_size-th batch
    rank: int = 0

    def __post_init__(self):
        if self.copies not in ("all", "best"):
            raise BadInput(f"--copies must be 'all' or 'best', not {self.copies!r}")
        if self.mix not in ("example", "batch"):
            raise BadInput(f"language mixing must be 'example' or 'batch', not {self.mix!r}")
        if self.batch_size < 1 or self.shuffle_window < 1:
            raise BadInput("--batch-size and the shuffle window must be at least 1")


@dataclass
class LanguageIndex:
    """Where one language's rows are: row groups (cache, shard, row group) with counts."""

    lang: str
    refs: np.ndarray  # (n, 3) int64: cache index, shard id, row group
    counts: np.ndarray  # (n,) rows of this language (after copy selection) per row group
    keep: list = field(default_factory=list)  # per ref: bool mask over the row group's rows, or None
    examples: int = 0  # distinct (corpus, example, side, mask epoch) keys: the language's share p_l

    @property
    def total(self) -> int:
        """Rows in one epoch of this language's stream (every copy under --copies all)."""
        return int(self.counts.sum())


def _codes(tables, name: str) -> tuple[np.ndarray, list]:
    """A string column over several tables as integer codes, and the names they stand for."""
    col = pa.chunked_array([c for t in tables for c in t[name].chunks], type=tables[0].schema.field(name).type).combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    encoded = pc.dictionary_encode(col)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()


def _scan(caches: list[Cache], copies: str, languages: tuple[str, ...]) -> dict[str, LanguageIndex]:
    """Per language, the row groups holding it, and its distinct examples. Reads only small
    columns: lang, example_id, side, mask_epoch (and teacher_loss for the best copy).

    A copy key is (corpus, example id, side, mask epoch): example ids restart at 0 in every
    corpus, so copies compete only within one corpus identity (see `corpus_identity`)."""
    cols = ["lang", "example_id", "side", "mask_epoch"] + (["teacher_loss"] if copies == "best" else [])
    corpora: dict[str, list[int]] = {}
    for ci, cache in enumerate(caches):
        corpora.setdefault(corpus_identity(cache.manifest), []).append(ci)
    by_lang: dict[str, list] = {}
    examples: dict[str, int] = {}
    for members in corpora.values():  # keys never cross corpora: one corpus in memory at a time
        refs = [(ci, shard, rg) for ci in members for shard in caches[ci].shard_ids  # caches in the order given
                for rg in range(len(caches[ci].row_groups(shard)))]
        tables = read_each([(caches[ci], shard, rg) for ci, shard, rg in refs],
                           lambda cache, shard, rg: cache.read_table(shard, rg, cols))
        groups = [(*ref, table) for ref, table in zip(refs, tables)]
        if not tables or not sum(t.num_rows for t in tables):
            continue
        first = _one_per_key(tables, best=copies == "best")
        lang, names = _codes(tables, "lang")
        for code, n in enumerate(np.bincount(lang[first], minlength=len(names)).tolist()):
            if n and (not languages or names[code] in languages):
                examples[str(names[code])] = examples.get(str(names[code]), 0) + n
        sizes = [t.num_rows for t in tables]
        bounds = np.cumsum([0, *sizes])
        for (ci, shard, rg, _), lo, hi in zip(groups, bounds[:-1], bounds[1:]):
            here = lang[lo:hi]
            for code in np.unique(here):
                name = str(names[code])
                if languages and name not in languages:
                    continue
                mask = here == code
                if copies == "best":
                    mask &= first[lo:hi]
                if mask.any():
                    by_lang.setdefault(name, []).append(((ci, shard, rg), int(mask.sum()), mask))
    index = {}
    for name, entries in sorted(by_lang.items()):
        index[name] = LanguageIndex(
            lang=name,
            refs=np.array([e[0] for e in entries], dtype=np.int64).reshape(-1, 3),
            counts=np.array([e[1] for e in entries], dtype=np.int64),
            keep=[e[2] for e in entries],
            examples=examples.get(name, 0),
        )
    return index


def _one_per_key(tables, best: bool) -> np.ndarray:
    """Over the rows of one corpus's row groups (concatenated, caches in the order given),
    True at one row per (example, side, mask epoch) key: with `best`, the copy with the
    lowest teacher loss (NaN counts as worst; ties: the earlier cache), else the first."""
    ex = np.concatenate([t["example_id"].to_numpy() for t in tables]).astype(np.uint64)
    side = _codes(tables, "side")[0]
    epoch = np.concatenate([t["mask_epoch"].to_numpy() for t in tables]).astype(np.int64)
    keys = (epoch, side, ex)  # np.lexsort: the last key sorts first
    if best:
        loss = np.concatenate([t["teacher_loss"].to_numpy() for t in tables]).astype(np.float64)
        keys = (np.where(np.isnan(loss), np.inf, loss), *keys)
    order = np.lexsort((np.arange(len(ex)), *keys))  # stable: the earlier row wins ties
    first = np.ones(len(order), dtype=bool)
    first[1:] = (np.diff(ex[order]) != 0) | (np.diff(side[order]) != 0) | (np.diff(epoch[order]) != 0)
    keep = np.zeros(len(ex), dtype=bool)
    keep[order[first]] = True
    return keep


def language_probabilities(totals: dict[str, int], alpha: float) -> dict[str, float]:
    """q_l ∝ p_l^alpha with p_l the language's share of examples (MergeDistill uses 0.7).

    The dataset counts a language's distinct examples, not its rows: with --copies all, an
    example cached by two teachers is two rows but one example, so "all" and "best" train
    on the same language mix (only the rows streamed for a language differ)."""
    langs = sorted(totals)
    p = np.array([totals[l] for l in langs], dtype=np.float64)
    p /= p.sum()
    q = p**alpha
    q /= q.sum()
    return dict(zip(langs, q.tolist()))


class _Window:
    """The rows of one shuffle window of one language, read and remapped, in shuffled order.

    The window's row groups stay separate parts (`starts`: where each begins in the window's
    numbering): batches gather their rows from the parts directly, so the window is never
    concatenated. Concatenating copied every dense value once more per window, which on
    hidden-state caches cost as much as reading them."""

    def __init__(self, parts: list[dict], order: np.ndarray):
        self.parts = parts
        self.starts = np.cumsum([0] + [num_rows(p) for p in parts[:-1]]).astype(np.int64)
        self.order = order

    def pieces(self, positions: np.ndarray, dest: np.ndarray) -> list[tuple[dict, np.ndarray, np.ndarray]]:
        """(part, rows of it, their places in the batch) for the window rows at `positions`
        of its shuffled order."""
        rows = self.order[positions]
        if len(self.parts) == 1:
            return [(self.parts[0], rows, dest)]
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        out = []
        for p in np.unique(part_of):
            here = part_of == p
            out.append((self.parts[p], rows[here] - self.starts[p], dest[here]))
        return out


class StreamingDataset(IterableDataset):
    """Yields collated batches forever; each batch carries `loader_state`, the state to
    resume from after it (see module docstring)."""

    def __init__(self, caches: list[Cache], config: StreamConfig, remap_tables=None, collate=None):
        if not caches:
            raise BadInput("no caches given: pass one or more with --caches")
        self.caches = caches
        self.config = config
        self.remap_tables = remap_tables or [None] * len(caches)
        self.collate = collate or (lambda rows: rows)
        self.index = _scan(caches, config.copies, config.languages)
        if not self.index:
            where = ", ".join(str(c.path) for c in caches)
            wanted = f" in languages {', '.join(config.languages)}" if config.languages else ""
            raise BadInput(f"the caches hold no rows{wanted}: {where}")
        self.langs = sorted(self.index)
        self.examples = {l: self.index[l].examples for l in self.langs}  # p_l counts these
        self.rows = {l: self.index[l].total for l in self.langs}  # rows per epoch of each stream
        self.probs = language_probabilities(self.examples, config.alpha)
        self._q = np.array([self.probs[l] for l in self.langs])
        self._start = {"batch": 0, "consumed": {l: 0 for l in self.langs}}
        self._windows: dict[str, tuple[tuple[int, int], _Window]] = {}
        self._layouts: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._ahead = None  # while iterating: the window read ahead, ((language, epoch, window), Future)
        self._reader = None  # while iterating: the thread that reads it
        self._stop = threading.Event()  # tells a read ahead that nobody will want it

    def __getstate__(self):  # DataLoader workers get the dataset pickled under spawn; a thread cannot be
        return {**self.__dict__, "_ahead": None, "_reader": None, "_stop": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._stop = threading.Event()

    # Resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"batch": self._start["batch"], "consumed": dict(self._start["consumed"])}

    def load_state_dict(self, state: dict) -> None:
        if state["batch"] % self.config.world_size:
            raise BadInput(f"loader state at batch {state['batch']} does not fall on a {self.config.world_size}-rank boundary")
        consumed = {l: int(state["consumed"].get(l, 0)) for l in self.langs}
        self._start = {"batch": int(state["batch"]), "consumed": consumed}

    # The plan -------------------------------------------------------------------------
    def _languages_of(self, batch: int) -> np.ndarray:
        rng = np.random.default_rng([self.config.seed, batch, 7])
        size = 1 if self.config.mix == "batch" else self.config.batch_size
        drawn = rng.choice(len(self.langs), size=size, p=self._q)
        return np.repeat(drawn, self.config.batch_size // size)

    def _epoch_layout(self, li: int, epoch: int):
        """Row-group order of one language's epoch and where each window ends."""
        if (li, epoch) in self._layouts:
            return self._layouts[li, epoch]
        if len(self._layouts) > 4 * len(self.langs):
            self._layouts.clear()
        idx = self.index[self.langs[li]]
        perm = np.random.default_rng([self.config.seed, li, epoch, 1]).permutation(len(idx.refs))
        w = self.config.shuffle_window
        counts = idx.counts[perm]
        window_ends = np.cumsum(np.add.reduceat(counts, np.arange(0, len(perm), w)))
        self._layouts[li, epoch] = perm, window_ends
        return perm, window_ends

    def _window(self, li: int, epoch: int, window: int, perm: np.ndarray, size: int) -> _Window:
        lang = self.langs[li]
        cached = self._windows.get(lang)
        if cached and cached[0] == (epoch, window):
            return cached[1]
        ahead, self._ahead, win = self._ahead, None, None
        if ahead is not None and ahead[0] == (li, epoch, window):
            win = ahead[1].result()  # a failed read raises here, as it would have read here
        if win is None:
            if ahead is not None:  # read ahead for nothing; the cache is read by one thread at a time
                self._stop.set()
                wait([ahead[1]])
                self._stop.clear()
            win = self._read_window(li, epoch, window, perm, size)
        self._windows[lang] = ((epoch, window), win)
        return win

    def _read_ahead(self, consumed: np.ndarray) -> None:
        """Start reading, on the reader thread, the next window of the language expected to
        run out of its current window first (rows left / its sampling probability).

        The next window's read then overlaps the current window's batches (and the training
        step), where it used to stall the batch that first needed it: on dense teacher outputs
        the read was half of the loader's time. One window ahead at most, so memory holds one
        window more than the current ones, as it did while a window was being replaced."""
        if self._ahead is not None or self._reader is None:
            return
        best = None
        for li, lang in enumerate(self.langs):
            if self._q[li] <= 0:  # never drawn (--alpha and a language of no rows' weight): nothing to read ahead
                continue
            epoch, within = divmod(int(consumed[li]), self.rows[lang])
            _, ends = self._epoch_layout(li, epoch)
            window = int(np.searchsorted(ends, within, side="right"))
            cached = self._windows.get(lang)
            if cached and cached[0] == (epoch, window):
                left = (int(ends[window]) - within) / self._q[li]
                wanted = (epoch, window + 1) if window + 1 < len(ends) else (epoch + 1, 0)
            else:  # its current window is not read yet (no batch has drawn it since it began)
                left, wanted = 0.0, (epoch, window)
            if best is None or left < best[0]:
                best = (left, li, wanted)
        if best is None:
            return
        _, li, (epoch, window) = best
        perm, ends = self._epoch_layout(li, epoch)
        size = int(ends[window] - (ends[window - 1] if window else 0))
        future = self._reader.submit(self._read_window, li, epoch, window, perm, size)
        self._ahead = ((li, epoch, window), future)

    def _read_window(self, li: int, epoch: int, window: int, perm: np.ndarray, size: int) -> _Window | None:
        """One shuffle window, read and remapped (on the reader thread when read ahead: it
        touches nothing of the dataset's but what iteration never changes)."""
        idx = self.index[self.langs[li]]
        w = self.config.shuffle_window
        if self._stop.is_set():
            return None
        chosen = perm[window * w : (window + 1) * w]
        refs = [tuple(int(v) for v in idx.refs[j]) for j in chosen]
        # Attention comes packed (only each row's real keys): a fraction of the padded bytes to
        # gather, and what tinybert's losses read (losses.packed_attention_mse). Row groups of
        # caches on object storage are fetched at once (read_each).
        blocks = read_each([(self.caches[ci], shard, rg) for ci, shard, rg in refs],
                           lambda cache, shard, rg: cache.read_block(shard, rg, columns=self.config.columns,
                                                                     dense=self.config.dense, packed_keys=True))
        parts = []
        for j, (ci, _, _), block in zip(chosen, refs, blocks):
            rows = _block_rows(block, np.flatnonzero(idx.keep[j]), ci)
            parts.append(_remap_rows(rows, self.remap_tables[ci]))
        order = np.random.default_rng([self.config.seed, li, epoch, window, 2]).permutation(size)
        return _Window(parts, order)

    def _rows_for(self, li: int, positions: np.ndarray) -> list[tuple[dict, np.ndarray, np.ndarray]]:
        """Where the rows at the given positions of a language's endless stream are: per
        shuffle window touched, (window rows, rows to take from it, their indices in
        `positions`)."""
        total = self.index[self.langs[li]].total
        pieces = []
        epochs = positions // total
        for epoch in np.unique(epochs):
            perm, ends = self._epoch_layout(li, int(epoch))
            in_epoch = np.flatnonzero(epochs == epoch)
            within = positions[in_epoch] % total
            windows = np.searchsorted(ends, within, side="right")
            for window in np.unique(windows):
                here = windows == window
                start = ends[window - 1] if window else 0
                win = self._window(li, int(epoch), int(window), perm, int(ends[window] - start))
                pieces.extend(win.pieces(within[here] - start, in_epoch[here]))
        return pieces

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start = batch = self._start["batch"]
        consumed = np.array([self._start["consumed"][l] for l in self.langs], dtype=np.int64)
        self._windows, self._layouts, self._ahead = {}, {}, None
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="xkd-window")
        try:
            yield from self._batches(batch, start, consumed, worker, workers)
        finally:  # the iterator closed or failed: a read ahead is stopped, not waited out
            self._stop.set()
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader, self._ahead = None, None
            self._stop.clear()

    def _batches(self, batch: int, start: int, consumed: np.ndarray, worker: int, workers: int):
        world, rank = self.config.world_size, self.config.rank
        while True:
            # A group is one batch per rank; DataLoader workers take groups round-robin,
            # counted from this iterator's first batch: the DataLoader asks worker 0 first
            # whatever batch a resumed run starts at (start is a multiple of world).
            mine = ((batch - start) // world) % workers == worker
            rows = None
            for r in range(world):
                langs = self._languages_of(batch)
                counts = np.bincount(langs, minlength=len(self.langs))
                if mine and r == rank:
                    positions = np.empty(len(langs), dtype=np.int64)
                    for li in np.flatnonzero(counts):
                        positions[langs == li] = consumed[li] + np.arange(counts[li])
                    rows = self._gather(langs, positions)
                consumed += counts
                batch += 1
            if rows is not None:
                out = self.collate(rows)
                out["loader_state"] = {"batch": batch, "consumed": dict(zip(self.langs, consumed.tolist()))}
                self._read_ahead(consumed)  # now: the batch holds copies, so the window before is free
                yield out

    def _gather(self, langs: np.ndarray, positions: np.ndarray) -> dict:
        pieces = []
        for li in np.unique(langs):
            sel = np.flatnonzero(langs == li)
            pieces.extend((rows, take, sel[dest]) for rows, take, dest in self._rows_for(int(li), positions[sel]))
        return _assemble(pieces, len(langs))


# Row sets: dict of column name -> numpy array (one value per row) or Ragged -------------


def _block_rows(block, rows: np.ndarray, cache_index: int) -> dict:
    every = len(rows) == block.num_rows  # rows are sorted and distinct: no copy needed
    out = {}
    for name, col in block.columns.items():
        out[name] = col if every else col.take(rows) if isinstance(col, Ragged) else col[rows]
    for name in block.dense:
        dense = Ragged(block.dense[name], block._dense_offsets[name])
        out[name] = dense if every else dense.take(rows)
    out["source"] = np.full(len(rows), cache_index, dtype=np.int64)
    return out


def _remap_rows(rows: dict, table) -> dict:
    if table is None:
        return rows
    from ..vocab import remap
    from ..vocab.vocabdir import ID_COLUMNS

    for name in ID_COLUMNS:
        if name in rows:
            col = rows[name]
            rows[name] = Ragged(remap(col.values, table), col.offsets)
    return rows


def _concat_rows(parts: list[dict]) -> dict:
    """Row sets one after another (evaluate's batches; the training loader's windows gather
    from their parts instead, see _Window)."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name, first in parts[0].items():
        cols = [p[name] for p in parts]
        out[name] = Ragged.concat(cols) if isinstance(first, Ragged) else np.concatenate(cols)
    return out


def _take_rows(rows: dict, idx: np.ndarray) -> dict:
    return {name: col.take(idx) if isinstance(col, Ragged) else col[idx] for name, col in rows.items()}


def _assemble(pieces: list[tuple[dict, np.ndarray, np.ndarray]], n: int) -> dict:
    """One row set of n rows from pieces (rows, take, dest): out[dest] = rows[take].

    A batch draws from one shuffle window per language; gathering each row's values
    straight into place copies them once, where taking per piece, concatenating and then
    restoring the batch order copied them three times (per-row work the loader benchmark
    showed to cost as much as reading the Parquet pages)."""
    if len(pieces) == 1 and np.array_equal(pieces[0][2], np.arange(n)):
        return _take_rows(pieces[0][0], pieces[0][1])
    out = {}
    for name, first in pieces[0][0].items():
        if isinstance(first, Ragged):
            lengths = np.empty(n, dtype=np.int64)
            for rows, take, dest in pieces:
                _lengths_into(rows[name].offsets, take, dest, lengths)
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            values = _new_values(int(offsets[-1]), first.values)
            if len(values):
                dst, width = _as_words(values)
                for rows, take, dest in pieces:
                    _copy_rows(_as_words(rows[name].values)[0], rows[name].offsets, take, dst, offsets, dest, width)
            out[name] = Ragged(values, offsets)
        else:
            values = np.empty((n,) + first.shape[1:], dtype=first.dtype)
            for rows, take, dest in pieces:
                values[dest] = rows[name][take]
            out[name] = values
    return out


_WORDS = (np.uint64, np.uint32, np.uint16, np.uint8)
_BATCH_BUFFERS = RecycledBuffers()  # batches' gathered ragged values


def _new_values(rows: int, like: np.ndarray) -> np.ndarray:
    """Uninitialised room for `rows` value rows of `like`'s shape and dtype, in a recycled
    buffer: a batch's dense values are MBs, and new memory per batch costs a page fault per
    page written (see RecycledBuffers)."""
    shape = (rows,) + like.shape[1:]
    nbytes = like.dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    if nbytes < 1 << 16:  # small columns (token ids): malloc serves these from its own free lists
        return np.empty(shape, dtype=like.dtype)
    return _BATCH_BUFFERS.take(nbytes).view(like.dtype).reshape(shape)


def _as_words(values: np.ndarray) -> tuple[np.ndarray, int]:
    """A ragged column's values as flat machine words, and words per value row, so that
    one compiled copy kernel per word size serves every dtype and trailing shape."""
    row_bytes = values.itemsize
    for size in values.shape[1:]:
        row_bytes *= size
    word = _WORDS[(row_bytes % 8 != 0) + (row_bytes % 4 != 0) + (row_bytes % 2 != 0)]
    flat = np.ascontiguousarray(values).reshape(-1).view(np.uint8).view(word)
    return flat, row_bytes // flat.itemsize


@njit(cache=True, nogil=True)
def _lengths_into(src_offsets, take, dest, lengths):
    for r in range(take.size):
        lengths[dest[r]] = src_offsets[take[r] + 1] - src_offsets[take[r]]


@njit(cache=True, nogil=True)
def _copy_rows(src, src_offsets, take, dst, dst_offsets, dest, width):
    for r in range(take.size):
        s = src_offsets[take[r]] * width
        d = dst_offsets[dest[r]] * width
        n = dst_offsets[dest[r] + 1] * width - d
        dst[d : d + n] = src[s : s + n]


def num_rows(rows: dict) -> int:
    return len(rows["example_id"])


def padded(col: Ragged, pad_value, dtype=torch.long) -> torch.Tensor:
    """A ragged column as a (rows, longest) tensor padded with pad_value."""
    lengths = col.lengths()
    width = int(lengths.max()) if len(lengths) else 0
    if dtype == torch.long and col.values.ndim == 1 and col.values.dtype.kind in "iu":
        out = np.full((len(lengths), width), pad_value, dtype=np.int64)
        _pad_rows(col.values, col.offsets, out)
        return torch.from_numpy(out)
    if pad_value == 0 and col.values.dtype.kind == "f":
        out = padded_dense(col)
        return out if out.dtype == dtype else out.to(dtype)
    out = np.full((len(lengths), width) + col.values.shape[1:], pad_value, dtype=col.values.dtype)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    cols = np.arange(len(col.values)) - np.repeat(col.offsets[:-1], lengths)
    out[rows, cols] = col.values
    return torch.from_numpy(out.astype(np.int64 if dtype == torch.long else out.dtype, copy=False)).to(dtype)


def padded_dense(col: Ragged, width: int | None = None) -> torch.Tensor:
    """A ragged dense output (per row, n x dim values) as a zero-padded (rows, width, dim)
    tensor in its stored dtype (fp16 for teacher states): one copy, by a compiled kernel.

    The dtype is kept on purpose: losses convert to fp32 where they compute (on the GPU,
    where it is free), while a CPU fp16 -> fp32 conversion here ran at a quarter of the
    speed of reading the values from disk, and doubled the bytes every later step moves."""
    lengths = col.lengths()
    if width is None:
        width = int(lengths.max()) if len(lengths) else 0
    if len(lengths) and int(lengths.max()) > width:
        raise ValueError(f"a row has {int(lengths.max())} entries, more than the width {width}")
    # Uninitialised, with the kernel writing the padding: np.zeros would write every byte
    # twice (its zeros, then the values), which cost as much as the copy itself.
    out = np.empty((len(lengths), width) + col.values.shape[1:], dtype=col.values.dtype)
    if out.size:
        src, words = _as_words(col.values) if len(col.values) else _as_words(out[:0].reshape((0,) + out.shape[2:]))
        _pad_words(src, col.offsets, words, out.reshape(-1).view(src.dtype), width * words)
    return torch.from_numpy(out)


@njit(cache=True, nogil=True)
def _pad_words(src, offsets, width, dst, row_stride):
    """Row r's values (`width` words each) into dst[r * row_stride:], zeros after them."""
    for r in range(offsets.size - 1):
        s = offsets[r] * width
        n = offsets[r + 1] * width - s
        d = r * row_stride
        dst[d : d + n] = src[s : s + n]
        dst[d + n : d + row_stride] = 0


def padded_with_mask(ids: Ragged, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids as (input_ids, attention_mask), right-padded to the longest row."""
    input_ids = padded(ids, pad_id)
    lengths = torch.from_numpy(ids.lengths())
    return input_ids, (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long()


@njit(cache=True, nogil=True)
def _pad_rows(values, offsets, out):
    """Row r's values into out[r, :length], widening to out's dtype as they are copied."""
    for r in range(offsets.size - 1):
        lo = offsets[r]
        for i in range(offsets[r + 1] - lo):
            out[r, i] = values[lo + i]
