"""Storage budget and speed of the cache format (bench name: storage).

    ./dev bench storage            # or: python bench/storage.py [--rows N] [--no-docs]

For top-k k=8 and k=32 on synthetic shards with realistic statistics (xkd.storage.synthetic:
Zipf ids over a 120k vocabulary, MLM-like logits), it measures
  - bytes per masked position of the top-k outputs (ids + logits + log-normaliser), from
    the per-column bytes the shard writer records, against naive layouts of the same values:
    np.save of int64 ids + fp32 logits + fp32 log-normaliser, and Parquet with pyarrow's
    defaults (snappy, dictionary, no byte-stream-split);
  - write throughput of write_shard_files against np.save (+ fsync, as durable) of the very
    arrays it is given;
  - read throughput of the reader (Cache.iter_blocks over the top-k columns, decoded into
    numpy) against np.load of the same decoded arrays, both from the page cache.
Throughputs are MB/s of decoded arrays; each is the best of several interleaved repeats,
so the ratio to the baseline measured in the same run is what to compare across machines.
Writes its table into docs/benchmarks.md under "## storage".
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from xkd.storage import CacheWriter, Ragged, open_cache, outputs_json, write_shard_files
from xkd.storage.schema import ragged_from_arrow
from xkd.storage.shard import DEFAULT_ROW_GROUP_SIZE, PARQUET_OPTIONS, build_table
from xkd.storage.synthetic import synthetic_draws, synthetic_rows

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
VOCAB = 120_000
SHARDS = 4
TOPK_COLUMNS = ("topk_ids", "topk_logits", "lognorm")
REPEATS = 5
READ_BYTES = 96_000_000  # decoded bytes per read pass: three times this machine's 32 MiB L3
TARGET_BYTES_K8 = 40.0
TARGET_Q8_BYTES_K8 = 24.0
SAMPLE_SIZES = (8, 16, 32)
TARGET_READ_RATIO = 0.5


def interleaved_best(fns: dict, repeats=REPEATS) -> dict:
    """Best time of each function, run in turns so that load from other processes on a
    shared machine falls on all of them alike."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def flat_arrays(rows: dict) -> dict[str, np.ndarray]:
    """Every array write_shard_files is given, as numpy (ragged columns as values + offsets)."""
    out = {}
    for name, value in rows.items():
        if isinstance(value, Ragged):
            out[f"{name}.values"], out[f"{name}.offsets"] = value.values, value.offsets
        elif value.dtype == object:
            out[name] = value.astype(str)
        else:
            out[name] = value
    return out


def save_all(arrays: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        path = directory / f"{name}.npy"
        with open(path, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())


def topk_column_bytes(path: Path) -> dict[str, int]:
    """Compressed bytes of each top-k column in a Parquet file, from its footer."""
    meta = pq.ParquetFile(path).metadata
    schema = meta.schema.to_arrow_schema()
    return {
        name: sum(meta.row_group(g).column(schema.get_field_index(name)).total_compressed_size
                  for g in range(meta.num_row_groups))
        for name in TOPK_COLUMNS
    }


def plausibility(shards: list[dict], k: int) -> dict:
    ids = np.concatenate([r["topk_ids"].values for r in shards]).reshape(-1, k)
    logits = np.concatenate([r["topk_logits"].values for r in shards]).astype(np.float64).reshape(-1, k)
    lognorm = np.concatenate([r["lognorm"].values for r in shards]).astype(np.float64)
    inputs = np.concatenate([r["input_ids"].values for r in shards])
    p = np.exp(logits - lognorm[:, None])
    return {
        "top-k ids below 1000": float((ids < 1000).mean()),
        "top-k ids median": float(np.median(ids)),
        "distinct ids per position": bool((np.diff(np.sort(ids, axis=1), axis=1) > 0).all()),
        "input ids below 1000": float((inputs < 1000).mean()),
        "top-1 logit mean": float(logits[:, 0].mean()),
        "top-1 probability (median)": float(np.median(p[:, 0])),
        "tail mass outside top-k (median)": float(np.median(1 - p.sum(axis=1))),
    }


def run_k(k: int, rows_per_shard: int, work: Path) -> dict:
    shards = [
        synthetic_rows(s, rows_per_shard, vocab=VOCAB, k=k, first_example_id=s * rows_per_shard)[0]
        for s in range(SHARDS)
    ]
    masked = sum(len(r["lognorm"].values) for r in shards)
    tokens = sum(len(r["input_ids"].values) for r in shards)

    # Write: the shard writer, against np.save + fsync of the same arrays.
    cache_dir, npy_dir = work / f"cache-k{k}", work / f"npy-k{k}"

    def write_cache():
        shutil.rmtree(cache_dir, ignore_errors=True)
        with CacheWriter(cache_dir, f"bench-k{k}", {"outputs": outputs_json(k, {})}) as writer:
            for s, rows in enumerate(shards):
                writer.commit(write_shard_files(cache_dir, s, rows, has_topk=True))
            writer.finish()

    def write_npy():
        shutil.rmtree(npy_dir, ignore_errors=True)
        for s, rows in enumerate(shards):
            save_all(flat_arrays(rows), npy_dir / str(s))

    write_mb = sum(a.nbytes for rows in shards for a in flat_arrays(rows).values()) / 1e6
    write_times = interleaved_best({"xkd": write_cache, "np.save": write_npy}, repeats=3)

    manifest = open_cache(cache_dir).manifest
    by_output: dict[str, int] = {}
    for record in manifest["shards"]:
        for name, size in record["bytes_by_output"].items():
            by_output[name] = by_output.get(name, 0) + size
    topk_bytes = {name: by_output[name] / masked for name in TOPK_COLUMNS}

    # Naive layouts of the same top-k values.
    ids = np.concatenate([r["topk_ids"].values for r in shards])
    logits = np.concatenate([r["topk_logits"].values for r in shards])
    lognorm = np.concatenate([r["lognorm"].values for r in shards])
    naive_dir = work / f"naive-k{k}"
    save_all({"ids": ids.astype(np.int64), "logits": logits.astype(np.float32), "lognorm": lognorm}, naive_dir)
    naive_npy = sum(p.stat().st_size for p in naive_dir.iterdir()) / masked
    default_bytes = 0
    for s, rows in enumerate(shards):
        path = work / f"defaults-k{k}-{s}.parquet"
        pq.write_table(build_table(rows, has_topk=True), path, row_group_size=DEFAULT_ROW_GROUP_SIZE)
        default_bytes += sum(topk_column_bytes(path).values())
    default_bytes /= masked

    # Read: the reader's top-k columns as numpy, against np.load of the same decoded arrays.
    # Both read more than the CPU caches hold (the shards repeated), as a real cache would.
    copies = -(-READ_BYTES // (ids.nbytes + logits.nbytes + lognorm.nbytes))
    read_dir = work / f"read-k{k}"
    with CacheWriter(read_dir, f"bench-read-k{k}", {"outputs": outputs_json(k, {})}) as writer:
        for copy in range(copies):
            for s, rows in enumerate(shards):
                writer.commit(write_shard_files(read_dir, copy * SHARDS + s, rows, has_topk=True))
        writer.finish()
    ids, logits, lognorm = (np.concatenate([a] * copies) for a in (ids, logits, lognorm))
    decoded_dir = work / f"decoded-k{k}"
    save_all({"ids": ids, "logits": logits, "lognorm": lognorm}, decoded_dir)
    read_bytes = ids.nbytes + logits.nbytes + lognorm.nbytes
    read_mb = read_bytes / 1e6
    cache = open_cache(read_dir)

    def read_cache():
        n = 0
        for block in cache.iter_blocks(columns=list(TOPK_COLUMNS), dense=()):
            n += sum(block.columns[name].values.nbytes for name in TOPK_COLUMNS)
        assert n == read_bytes

    def read_npy():
        n = sum(np.load(decoded_dir / f"{name}.npy").nbytes for name in ("ids", "logits", "lognorm"))
        assert n == read_bytes

    # Warm the page cache and the open file handles, and check that what is timed is right.
    read_npy()
    got = {name: [] for name in TOPK_COLUMNS}
    for block in cache.iter_blocks(columns=list(TOPK_COLUMNS), dense=()):
        for name in TOPK_COLUMNS:
            got[name].append(block.columns[name].values)
    for name, want in zip(TOPK_COLUMNS, (ids, logits, lognorm)):
        assert np.array_equal(np.concatenate(got[name]), want), name
    read_times = interleaved_best({"xkd": read_cache, "np.load": read_npy})

    return {
        "k": k,
        "rows": len(open_cache(cache_dir)),
        "tokens": tokens,
        "masked": masked,
        "topk_bytes": topk_bytes,
        "topk_total": sum(topk_bytes.values()),
        "shard_bytes_per_masked": manifest["totals"]["bytes"] / masked,
        "naive_npy": naive_npy,
        "default_parquet": default_bytes,
        "write_mb": write_mb,
        "write_mbps": {name: write_mb / t for name, t in write_times.items()},
        "read_mb": read_mb,
        "read_mbps": {name: read_mb / t for name, t in read_times.items()},
        "plausibility": plausibility(shards, k),
    }


def bytes_per_masked(cache_dir: Path, names, masked: int) -> dict[str, float]:
    by_output: dict[str, int] = {}
    for record in open_cache(cache_dir).manifest["shards"]:
        for name, size in record["bytes_by_output"].items():
            by_output[name] = by_output.get(name, 0) + size
    return {name: by_output[name] / masked for name in names}


def run_sampled_and_q8(rows_per_shard: int, work: Path) -> dict:
    """Bytes per masked position of --sample N's draws (N = 8, 16, 32) and of the q8 top-k codec,
    over the k=8 synthetic shards (the draws follow each position's synthetic distribution)."""
    shards = [synthetic_rows(s, rows_per_shard, vocab=VOCAB, k=8, first_example_id=s * rows_per_shard)[0]
              for s in range(SHARDS)]
    masked = sum(len(r["lognorm"].values) for r in shards)
    sampled = {}
    for n in SAMPLE_SIZES:
        cache_dir = work / f"sample-{n}"
        with CacheWriter(cache_dir, f"bench-sample-{n}", {"outputs": outputs_json(None, {}, sample=n)}) as writer:
            for s, rows in enumerate(shards):
                plain = {name: col for name, col in rows.items() if name not in TOPK_COLUMNS}
                writer.commit(write_shard_files(cache_dir, s, {**plain, **synthetic_draws(rows, n, VOCAB, s)},
                                                has_sample=True))
            writer.finish()
        distinct = sum(len(block.columns["sample_ids"].values) for block in
                       open_cache(cache_dir).iter_blocks(columns=["sample_ids"], dense=()))
        sampled[n] = {**bytes_per_masked(cache_dir, ("sample_ids", "sample_counts"), masked),
                      "distinct": distinct / masked}
    cache_dir = work / "q8"
    with CacheWriter(cache_dir, "bench-q8", {"outputs": outputs_json(8, {}, topk_codec="q8")}) as writer:
        for s, rows in enumerate(shards):
            writer.commit(write_shard_files(cache_dir, s, rows, has_topk=True, topk_codec="q8"))
        writer.finish()
    return {"masked": masked, "sampled": sampled, "q8": bytes_per_masked(cache_dir, ("topk_ids", "topk_codes"), masked)}


def sampled_and_q8_lines(r: dict, fp16_total: float) -> list[str]:
    lines = [
        "",
        f"Bytes per masked position of `--sample N`'s draws (distinct ids uint32 + their counts uint16), over the k=8 "
        f"shards above ({r['masked']:,} positions; each position's draws follow its synthetic distribution: a top-k id "
        "with its probability, else a Zipf id for the tail mass):",
        "",
        "| N | sample_ids | sample_counts | total | distinct ids per position |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, b in r["sampled"].items():
        lines.append(f"| {n} | {b['sample_ids']:.2f} | {b['sample_counts']:.2f} | "
                     f"**{b['sample_ids'] + b['sample_counts']:.2f}** | {b['distinct']:.2f} |")
    q8 = r["q8"]
    total = q8["topk_ids"] + q8["topk_codes"]
    lines += [
        "",
        "The q8 top-k codec (`--topk-codec q8`, k=8, the same shards): ids as before, one byte per log-probability, "
        "no log-normaliser:",
        "",
        "| codec | topk_ids | values | total | target |",
        "|---|---:|---:|---:|---|",
        f"| fp16 (default) | | | {fp16_total:.2f} | |",
        f"| q8 | {q8['topk_ids']:.2f} | {q8['topk_codes']:.2f} | **{total:.2f}** | <= {TARGET_Q8_BYTES_K8:.0f}: "
        f"{'met' if total <= TARGET_Q8_BYTES_K8 else 'MISSED'} |",
    ]
    return lines


def encoding_alternatives(k: int, rows_per_shard: int, work: Path) -> list[dict]:
    """The shard writer's Parquet options against alternatives, on one shard's top-k columns:
    bytes per masked position, and read speed (row group by row group, as the reader reads)
    relative to np.load of the same decoded arrays in the same run."""
    rows = synthetic_rows(0, rows_per_shard, vocab=VOCAB, k=k)[0]
    table = build_table(rows, has_topk=True)
    masked = len(rows["lognorm"].values)
    decoded = work / "alternatives-decoded"
    save_all({name: rows[name].values for name in TOPK_COLUMNS}, decoded)
    plain = {"compression": None, "compression_level": None}
    variants = {
        "xkd (PARQUET_OPTIONS, 512-row groups)": ({}, DEFAULT_ROW_GROUP_SIZE),
        "xkd, 4096-row groups": ({}, 4096),
        "xkd without page checksums": ({"write_page_checksum": False}, DEFAULT_ROW_GROUP_SIZE),
        "xkd without byte-stream-split": ({"use_byte_stream_split": False}, DEFAULT_ROW_GROUP_SIZE),
        "xkd with lz4 instead of zstd": ({"compression": "lz4", "compression_level": None}, DEFAULT_ROW_GROUP_SIZE),
        "xkd uncompressed": (plain, DEFAULT_ROW_GROUP_SIZE),
        "uncompressed, 4096-row groups": (plain, 4096),
        "pyarrow defaults (snappy, dictionary)": (None, DEFAULT_ROW_GROUP_SIZE),
    }
    files, readers, paths = {}, {}, {}
    for name, (changes, row_group_size) in variants.items():
        path = paths[name] = work / f"alternative-{len(files)}.parquet"
        options = None if changes is None else {**PARQUET_OPTIONS, **changes}
        pq.write_table(table, path, row_group_size=row_group_size, **(options or {}))
        checksums = bool(options and options.get("write_page_checksum"))
        files[name] = pq.ParquetFile(path, page_checksum_verification=checksums)

        def read(f=files[name]):
            for g in range(f.num_row_groups):
                t = f.read_row_group(g, columns=["example_id", *TOPK_COLUMNS])
                for column in TOPK_COLUMNS:
                    ragged_from_arrow(t[column])

        readers[name] = read

    def read_npy():
        for name in TOPK_COLUMNS:
            np.load(decoded / f"{name}.npy")

    times = interleaved_best({"np.load": read_npy, **readers})
    return [
        {"variant": name, "bytes": sum(topk_column_bytes(paths[name]).values()) / masked,
         "read_ratio": times["np.load"] / times[name]}
        for name in variants
    ]


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model} ({platform.machine()}), Python {platform.python_version()}"


def report(results: list[dict], alternatives: list[dict], seconds: float, sampled: dict) -> str:
    by_k = {r["k"]: r for r in results}
    lines = [
        "## storage",
        "",
        f"Run with `./dev bench storage` (bench/storage.py) on {datetime.date.today().isoformat()}, "
        f"{machine()}; {seconds:.0f} s. The machine was shared with other jobs (load average "
        f"{os.getloadavg()[1]:.1f} over the last 5 minutes), so absolute MB/s vary by up to 2x between "
        "runs; byte counts are exact and repeatable.",
        f"Data: {results[0]['rows']:,} synthetic rows in {SHARDS} shards per k "
        f"({results[0]['tokens']:,} tokens, {results[0]['masked']:,} masked positions), "
        "xkd.storage.synthetic over a 120k vocabulary.",
        "",
        "Bytes per masked position of the top-k outputs (ids + logits + log-normaliser), from "
        "the shard records' `bytes_by_output`:",
        "",
        "| k | topk_ids | topk_logits | lognorm | xkd total | Parquet, pyarrow defaults | np.save int64 + fp32 | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, r in by_k.items():
        b = r["topk_bytes"]
        target = (f"<= {TARGET_BYTES_K8:.0f}: {'met' if r['topk_total'] <= TARGET_BYTES_K8 else 'MISSED'}"
                  if k == 8 else "")
        lines.append(
            f"| {k} | {b['topk_ids']:.2f} | {b['topk_logits']:.2f} | {b['lognorm']:.2f} | **{r['topk_total']:.2f}** "
            f"| {r['default_parquet']:.2f} | {r['naive_npy']:.2f} | {target} |"
        )
    lines += [
        "",
        "Whole shard (every column, no dense outputs) per masked position: "
        + ", ".join(f"k={k}: {r['shard_bytes_per_masked']:.1f} B" for k, r in by_k.items()) + ".",
        "",
        "Throughput, MB/s of decoded arrays, best of interleaved repeats, files in the page cache. "
        "Writes: the shards above, every column. Reads: the top-k columns of "
        + ", ".join(f"{r['read_mb']:.0f} MB (k={k})" for k, r in by_k.items())
        + " per pass, more than the CPU caches hold:",
        "",
        "| k | write: write_shard_files | write: np.save + fsync | ratio "
        "| read: Cache.iter_blocks (top-k) | read: np.load | ratio | read target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k, r in by_k.items():
        w, rd = r["write_mbps"], r["read_mbps"]
        ratio = rd["xkd"] / rd["np.load"]
        lines.append(
            f"| {k} | {w['xkd']:.0f} | {w['np.save']:.0f} | {w['xkd'] / w['np.save']:.2f}x "
            f"| {rd['xkd']:.0f} | {rd['np.load']:.0f} | {ratio:.2f}x "
            f"| >= {TARGET_READ_RATIO}x: {'met' if ratio >= TARGET_READ_RATIO else 'MISSED'} |"
        )
    lines += [
        "",
        "Parquet options for the top-k columns (k=8, one shard; read speed as a ratio to np.load "
        "of the same decoded arrays in the same run; the shard fits in the CPU cache, so compare "
        "the rows with each other, not with the table above):",
        "",
        "| variant | bytes per masked position | read speed / np.load |",
        "|---|---:|---:|",
    ]
    lines += [f"| {a['variant']} | {a['bytes']:.2f} | {a['read_ratio']:.3f}x |" for a in alternatives]
    p = results[0]["plausibility"]
    lines += sampled_and_q8_lines(sampled, by_k[8]["topk_total"])
    lines += [
        "",
        "Plausibility of the synthetic data (k=8): "
        + "; ".join(f"{name} {value:.3g}" if not isinstance(value, bool) else f"{name} {value}"
                    for name, value in p.items()) + ".",
    ]
    r8 = by_k[8]
    decoded_per_position = 8 * 4 + 8 * 2 + 4  # uint32 ids, fp16 logits, fp32 lognorm
    positions_per_s = r8["read_mbps"]["xkd"] * 1e6 / decoded_per_position
    if r8["read_mbps"]["xkd"] < TARGET_READ_RATIO * r8["read_mbps"]["np.load"]:
        lines += [
            "",
            "Why the read target is missed: np.load of page-cached arrays is one memory copy, while "
            "the reader decompresses zstd and rebuilds list offsets from Parquet repetition levels. "
            "The options table shows that no encoding closes the gap within Parquet list columns "
            "(even uncompressed pages read at a small fraction of np.load), and the byte target "
            "rules out uncompressed storage (52 decoded bytes per position at k=8). In absolute "
            f"terms the reader delivers {positions_per_s / 1e6:.1f} M masked positions per second "
            "per process at k=8; a student step of 256 sequences of 128 tokens uses about 5,000.",
        ]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = DOCS) -> None:
    """Replace this bench's section of docs/benchmarks.md, keeping every other section."""
    heading = text.splitlines()[0]
    intro = "# Benchmarks\n\nMeasured by `./dev bench NAME`; each section is written by bench/NAME.py.\n"
    current = path.read_text() if path.exists() else intro
    lines = current.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        new = current.rstrip("\n") + "\n\n" + text
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + text + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000, help="rows per shard (4 shards per k)")
    parser.add_argument("--no-docs", action="store_true", help="print the table only")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xkd-bench-storage-") as work:
        results = []
        for k in (8, 32):
            print(f"storage bench: k={k} ...", file=sys.stderr, flush=True)
            results.append(run_k(k, args.rows, Path(work)))
        print("storage bench: Parquet options ...", file=sys.stderr, flush=True)
        alternatives = encoding_alternatives(8, args.rows, Path(work))
        print("storage bench: sampled targets and the q8 codec ...", file=sys.stderr, flush=True)
        sampled = run_sampled_and_q8(args.rows, Path(work))
    text = report(results, alternatives, time.perf_counter() - start, sampled)
    print(text)
    if not args.no_docs:
        write_section(text)
        print(f"wrote the '## storage' section of {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
