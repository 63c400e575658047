"""Benchmark: remapping teacher ids into a union vocabulary (xkd.remap, numba).

Remaps N ids (uint32 in, int32 out; default 200M) through a table the size of mBERT ∪ MuRIL
(288,973 entries, as in MergeDistill), with Zipf-distributed ids like real token streams,
and in the same run measures the two baselines over the same bytes:

- memcpy: np.copyto of the N uint32 ids into another array (the memory-bandwidth ceiling);
- numpy fancy indexing: table[ids].

Targets: remap bandwidth >= 0.6x memcpy, and >= 4x numpy. Each timing is the best of
--repeats runs on warm buffers. Writes its table into docs/benchmarks.md under "## remap".

    ./dev bench remap [--n 200000000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xkd.storage.synthetic import zipf_ids  # noqa: E402
from xkd.vocab import remap  # noqa: E402

TABLE_SIZE = 288_973  # mBERT ∪ MuRIL in MergeDistill
SECTION = "## remap"


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def make_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    ids = np.empty(n, dtype=np.uint32)
    rng = np.random.default_rng(seed)
    step = 10_000_000
    for lo in range(0, n, step):
        ids[lo : lo + step] = zipf_ids(rng, min(step, n - lo), vocab)
    return ids


def verdict(vs_memcpy: float, vs_numpy: float) -> str:
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return (f"Result: {vs_memcpy:.2f}x memcpy bandwidth (target 0.6x: {met(vs_memcpy >= 0.6)}), "
            f"{vs_numpy:.1f}x numpy (target 4x: {met(vs_numpy >= 4)}).")


def write_section(rows: list[tuple[str, str, str, str]], meta: str, n: int, result: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    table = [
        SECTION,
        "",
        f"Remapping {n / 1e6:.0f}M teacher ids (uint32 in, int32 out) through a teacher->student table of "
        f"{TABLE_SIZE:,} entries (the size of mBERT ∪ MuRIL), ids Zipf-distributed like real token streams. "
        "Baselines measured in the same run over the same bytes: memcpy (`np.copyto` of the ids) and numpy fancy "
        "indexing (`table[ids]`). Bandwidth counts bytes read plus bytes written. Best of the repeats, warm buffers.",
        "",
        "Command: `./dev bench remap`",
        "",
        f"Machine: {meta}",
        "",
        "| operation | time (s) | bandwidth (GB/s) | ratio |",
        "|---|---:|---:|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        result,
        "",
        "Targets: remap bandwidth >= 0.6x memcpy, and >= 4x numpy fancy indexing. `xkd.remap` checks every id "
        "(an id outside the table is an error naming it, never a silent read past the table) a chunk at a time "
        "before gathering it, and for arrays of 256k ids or more runs one part per core in threads (the numba "
        "kernel releases the GIL); smaller batches use the serial kernel. One thread's gather is bound by the "
        "core's load throughput, not by memory (compare the one-thread row with memcpy), so the memcpy target "
        "needs several free cores; the load average above says how free they were (0.34x at load 2.8, 0.54x "
        "at load 1.0). A fused branch-free variant (check and gather in one pass, out-of-range ids clamped "
        "for the read) was 1.07x the chunked kernel on one thread (20M ids, best of 15), too little to "
        "trade the kernel's simplicity for.",
        "",
    ]
    block = "\n".join(table)
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="Print only; leave docs/benchmarks.md alone.")
    args = parser.parse_args()

    import numba

    rng = np.random.default_rng(1)
    table = rng.permutation(TABLE_SIZE).astype(np.int32)
    print(f"generating {args.n:,} Zipf ids ...", file=sys.stderr)
    ids = make_ids(args.n, TABLE_SIZE)
    copy = np.empty_like(ids)
    out = np.empty(args.n, dtype=np.int32)
    remap(ids[:1000], table)  # compile (or load the cached kernels) before timing
    remap(ids, table, out=out)
    np.copyto(copy, ids)
    assert np.array_equal(out[:1_000_000], table[ids[:1_000_000]])

    moved = ids.nbytes + out.nbytes  # read + written, the same for all three
    t_copy = best_of(args.repeats, lambda: np.copyto(copy, ids))
    t_remap = best_of(args.repeats, lambda: remap(ids, table, out=out))
    t_remap_alloc = best_of(args.repeats, lambda: remap(ids, table))
    kernels = sys.modules["xkd.vocab.remap"]
    t_serial = best_of(args.repeats, lambda: kernels._remap_serial(ids, table, out))
    t_numpy = best_of(max(2, args.repeats // 2), lambda: table[ids])
    assert np.array_equal(out, table[ids])

    def gbs(t: float) -> str:
        return f"{moved / t / 1e9:.2f}"

    rows = [
        ("memcpy (np.copyto)", f"{t_copy:.3f}", gbs(t_copy), "1.00x memcpy"),
        ("xkd.remap into a reused buffer", f"{t_remap:.3f}", gbs(t_remap),
         f"{t_copy / t_remap:.2f}x memcpy, {t_numpy / t_remap:.1f}x numpy"),
        ("xkd.remap, allocating its output", f"{t_remap_alloc:.3f}", gbs(t_remap_alloc),
         f"{t_copy / t_remap_alloc:.2f}x memcpy, {t_numpy / t_remap_alloc:.1f}x numpy"),
        ("xkd.remap kernel on one thread", f"{t_serial:.3f}", gbs(t_serial),
         f"{t_copy / t_serial:.2f}x memcpy, {t_numpy / t_serial:.1f}x numpy"),
        ("numpy fancy indexing (table[ids])", f"{t_numpy:.3f}", gbs(t_numpy), f"{t_copy / t_numpy:.2f}x memcpy"),
    ]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    meta = (f"{platform.processor() or platform.machine()}, {cpus} CPU cores available, remap threads "
            f"{kernels._threads()}, numba {numba.__version__}, numpy {np.__version__}; "
            f"load average {load:.1f} when the run ended (other work shares the cores)")
    result = verdict(t_copy / t_remap, t_numpy / t_remap)
    for row in rows:
        print(" | ".join(row))
    print(meta)
    print(result)
    if not args.no_write:
        write_section(rows, meta, args.n, result)
        print(f"wrote {SECTION} to docs/benchmarks.md", file=sys.stderr)


if __name__ == "__main__":
    main()
