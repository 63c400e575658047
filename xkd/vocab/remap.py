"""Teacher -> student id remapping: numba kernels over flat and ragged arrays.

Input ids, top-k ids and gold labels are all flat integer arrays (a cache's ragged columns
are flat values plus row offsets, and remapping never changes the offsets), so one gather
kernel serves them all. It is memory-bound: a table of a few hundred thousand int32 entries
stays in cache, and the loop streams ids in and student ids out.

An id outside the table is never read past the table or clamped into garbage: each chunk
of ids is checked (a branch-free count that vectorises) before it is gathered, and on a bad
chunk the first offending position is found so that the error can name it.

Large arrays (PARALLEL_MIN ids or more) are cut into one part per core, each remapped by the
compiled kernel in its own thread (the kernels release the GIL). This rather than numba's
OpenMP `prange`: when the cores are busy (a training step, other jobs), OpenMP's spinning
workers made a 2M-id remap 5x slower than the serial kernel, while threads degrade to serial
speed (docs/benchmarks.md, "remap"); threads are also fork-safe (a forked data-loader worker
builds its own pool). Batches smaller than PARALLEL_MIN stay serial: threads cost more than
they save there.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from ..errors import XkdError

PARALLEL_MIN = 1 << 18  # ids; below this the serial kernel is as fast
# Ids are checked a chunk at a time, then gathered while the chunk is still in L2, so the
# check costs no second trip to memory.
_CHUNK = 1 << 14


@njit(cache=True, nogil=True, inline="always")
def _count_bad(ids, size):
    bad = 0
    for i in range(ids.size):
        bad += np.uint64(ids[i]) >= size  # a negative id wraps to a huge unsigned one
    return bad


@njit(cache=True, nogil=True, inline="always")
def _gather(ids, table, out):
    for i in range(ids.size):
        out[i] = table[ids[i]]


@njit(cache=True, nogil=True)
def _first_bad(ids, size):
    for i in range(ids.size):
        if np.uint64(ids[i]) >= size:
            return i
    return -1


@njit(cache=True, nogil=True)
def _remap_serial(ids, table, out):
    n = ids.size
    size = np.uint64(table.size)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        if _count_bad(ids[lo:hi], size):
            return lo + _first_bad(ids[lo:hi], size)
        _gather(ids[lo:hi], table, out[lo:hi])
    return -1


@njit(cache=True, nogil=True, inline="always")
def _gather_row(values, lo, hi, tables, base, size, out):
    """One row of a mixed-teacher batch; returns its first bad position or -1."""
    for i in range(lo, hi):
        v = np.uint64(values[i])
        if v >= size:
            return i
        out[i] = tables[base + v]
    return -1


@njit(cache=True, nogil=True)
def _remap_rows_serial(values, offsets, row_table, tables, starts, sizes, out, r0, r1):
    """Rows r0..r1-1 of ragged values whose rows come from different teachers: row r uses
    table row_table[r], stored at tables[starts[t]:starts[t] + sizes[t]]. Returns the
    first bad position or -1."""
    for r in range(r0, r1):
        t = row_table[r]
        bad = _gather_row(values, offsets[r], offsets[r + 1], tables, starts[t], np.uint64(sizes[t]), out)
        if bad >= 0:
            return bad
    return -1


_pool: tuple[int, ThreadPoolExecutor] | None = None


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _run_parts(calls: list) -> list:
    """Run (kernel, args) pairs on this process's thread pool (a forked child makes its own:
    the parent's threads do not exist there)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="xkd-remap"))
    futures = [_pool[1].submit(kernel, *args) for kernel, args in calls]
    return [f.result() for f in futures]


def _parts(n: int) -> int:
    return min(_threads(), max(1, n // (PARALLEL_MIN // 2))) if n >= PARALLEL_MIN else 1


def as_table(table) -> np.ndarray:
    table = np.ascontiguousarray(table)
    if table.ndim != 1 or not np.issubdtype(table.dtype, np.integer):
        raise TypeError(f"a remap table is a 1-D integer array, not {table.dtype} of shape {table.shape}")
    if table.size == 0:
        raise XkdError("the remap table is empty: it maps no teacher id.")
    return table.astype(np.int32, copy=False)


def _check_ids(ids) -> np.ndarray:
    ids = np.asarray(ids)
    if not (np.issubdtype(ids.dtype, np.integer)) or ids.dtype == np.bool_:
        raise TypeError(f"remap needs integer ids, not {ids.dtype}")
    return ids


def _kernel_ids(flat: np.ndarray) -> np.ndarray:
    """The kernels are compiled for two id types only, uint32 (caches) and int64 (Python,
    torch), which bounds first-use compilation; other integer types are widened (exactly)."""
    if flat.dtype in (np.uint32, np.int64):
        return flat
    small_unsigned = flat.dtype.kind == "u" and flat.dtype.itemsize <= 4
    return flat.astype(np.uint32 if small_unsigned else np.int64)


def _out_of_range(ids: np.ndarray, flat_index: int, table_size: int, what: str) -> XkdError:
    where = tuple(int(i) for i in np.unravel_index(flat_index, ids.shape)) if ids.ndim > 1 else flat_index
    value = ids.reshape(-1)[flat_index]
    return XkdError(
        f"{what}: id {int(value)} at position {where} is out of range for a table of {table_size} entries "
        f"(valid ids are 0..{table_size - 1}). The ids were made with another vocabulary than this map's "
        "teacher: check that the cache's teacher is the one the vocab was built from."
    )


def remap(ids, table, *, out: np.ndarray | None = None, what: str = "remap") -> np.ndarray:
    """table[ids] as int32, for integer ids of any shape; an id outside the table is an
    XkdError naming the id, its position and the table size."""
    ids = _check_ids(ids)
    table = as_table(table)
    flat = _kernel_ids(np.ascontiguousarray(ids).reshape(-1))
    if out is None:
        out = np.empty(flat.size, dtype=np.int32)
    elif out.dtype != np.int32 or out.size != flat.size or not out.flags.c_contiguous:
        raise ValueError("out must be a contiguous int32 array of the ids' size")
    result = out.reshape(-1)
    parts = _parts(flat.size)
    if parts == 1:
        bad = _remap_serial(flat, table, result) if flat.size else -1
    else:
        bounds = np.linspace(0, flat.size, parts + 1).astype(np.int64).tolist()
        found = _run_parts([(_remap_serial, (flat[a:b], table, result[a:b])) for a, b in zip(bounds, bounds[1:])])
        bad = next((a + f for a, f in zip(bounds, found) if f >= 0), -1)
    if bad >= 0:
        raise _out_of_range(ids, int(bad), table.size, what)
    return result.reshape(ids.shape)


def remap_ragged(ragged, table, *, what: str = "remap"):
    """A Ragged (values + offsets) with its values remapped; the offsets are shared."""
    from ..storage import Ragged

    return Ragged(remap(ragged.values, table, what=what), ragged.offsets)


def remap_lists(rows, table, *, what: str = "remap") -> list[np.ndarray]:
    """Lists of ids (a tokenizer's input_ids, one list per text) remapped in one call: one
    int32 array per list."""
    lengths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=int(lengths.sum()))
    return np.split(remap(flat, table, what=what), np.cumsum(lengths)[:-1]) if len(rows) else []


def stack_tables(tables: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several teachers' tables as one array plus (start, size) of each, for remap_rows."""
    tables = [as_table(t) for t in tables]
    sizes = np.array([t.size for t in tables], dtype=np.int64)
    starts = np.zeros(len(tables), dtype=np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    return np.concatenate(tables), starts, sizes


def remap_rows(values, offsets, row_table, stacked, *, what: str = "remap") -> np.ndarray:
    """Ragged values whose rows come from different teachers (a mixed batch): row r is
    remapped with table row_table[r] of `stacked` (from stack_tables)."""
    values = _check_ids(values)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    row_table = np.ascontiguousarray(row_table, dtype=np.int64)
    tables, starts, sizes = stacked
    if row_table.size != offsets.size - 1:
        raise ValueError(f"row_table has {row_table.size} entries for {offsets.size - 1} rows")
    if row_table.size and (row_table.min() < 0 or row_table.max() >= starts.size):
        raise ValueError(f"row_table names tables outside 0..{starts.size - 1}")
    out = np.empty(values.size, dtype=np.int32)
    flat = _kernel_ids(np.ascontiguousarray(values).reshape(-1))
    rows = row_table.size
    parts = min(_parts(flat.size), max(1, rows))
    # Cut at rows holding equal shares of the values.
    cuts = np.minimum(np.searchsorted(offsets, np.linspace(0, flat.size, parts + 1)[1:-1]), rows).tolist()
    bounds = [0, *cuts, rows]
    calls = [(_remap_rows_serial, (flat, offsets, row_table, tables, starts, sizes, out, a, b))
             for a, b in zip(bounds, bounds[1:]) if b > a]
    found = _run_parts(calls) if len(calls) > 1 else [kernel(*args) for kernel, args in calls]
    bad = min((f for f in found if f >= 0), default=-1)
    if bad >= 0:
        row = int(np.searchsorted(offsets, bad, side="right") - 1)
        raise _out_of_range(values, int(bad), int(sizes[row_table[row]]), f"{what} (row {row})")
    return out
