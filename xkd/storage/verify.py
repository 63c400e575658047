"""`xkd verify`: checksums, schema and offsets of every shard, without trusting anything."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .manifest import SHARDS, read_manifest
from .reader import Cache
from .schema import arrow_schema, ragged_from_arrow
from .shard import sha256_file, digest_of, parquet_path


def _check_files(root: Path, record: dict) -> list[str]:
    problems = []
    shards = root / SHARDS
    if digest_of(record["files"]) != record["sha256"]:
        problems.append("its file list does not match its recorded sha256 (the manifest was edited)")
    for rel, (size, sha) in sorted(record["files"].items()):
        path = shards / rel
        if not path.is_file():
            problems.append(f"file {rel} is missing")
            continue
        actual = path.stat().st_size
        if actual < size:
            problems.append(f"file {rel} is truncated ({actual} of {size} bytes)")
        elif actual != size:
            problems.append(f"file {rel} has {actual} bytes, {size} recorded")
        elif sha256_file(path) != sha:
            problems.append(f"file {rel} is corrupted (sha256 differs from the manifest)")
    return problems


def _check_contents(cache: Cache, record: dict) -> list[str]:
    """Schema and offsets; only run on shards whose bytes are intact."""
    shard_id = record["id"]
    try:
        table = pq.read_table(parquet_path(cache.path, shard_id))
    except Exception as e:  # any unreadable footer or page is the finding itself
        return [f"its Parquet file cannot be read ({e})"]
    k = cache.topk_k
    expected = arrow_schema(bool(k), cache.has_text)
    if not table.schema.remove_metadata().equals(expected):
        return [f"its Parquet schema differs from schema version {cache.manifest['schema_version']}"]
    problems = []
    if table.num_rows != record["rows"]:
        problems.append(f"it has {table.num_rows} rows, the manifest says {record['rows']}")
    ids = ragged_from_arrow(table["input_ids"])
    words = ragged_from_arrow(table["word_start"])
    masked = ragged_from_arrow(table["masked_positions"])
    n_tokens, n_masked = ids.lengths(), masked.lengths()
    token_offset = table["token_offset"].to_numpy()
    word_offset = table["word_offset"].to_numpy()
    word_counts = words.row_sums()
    if not np.array_equal(words.lengths(), n_tokens):
        problems.append("word_start lengths differ from input_ids lengths")
    if not np.array_equal(token_offset, np.concatenate([[0], np.cumsum(n_tokens)[:-1]]).astype(np.int64)):
        problems.append("token_offset is not the running total of input_ids lengths")
    if not np.array_equal(word_offset, np.concatenate([[0], np.cumsum(word_counts)[:-1]]).astype(np.int64)):
        problems.append("word_offset is not the running total of word starts")
    if not np.array_equal(ragged_from_arrow(table["labels"]).lengths(), n_masked):
        problems.append("labels and masked_positions differ in length")
    row_of_position = np.repeat(np.arange(len(n_masked)), n_masked)
    if masked.values.size and np.any(masked.values >= n_tokens[row_of_position]):
        problems.append("a masked position lies beyond its row's tokens")
    if k:
        for name, per in (("topk_ids", k), ("topk_logits", k), ("lognorm", 1)):
            if not np.array_equal(ragged_from_arrow(table[name]).lengths(), n_masked * per):
                problems.append(f"{name} does not hold {per} value(s) per masked position")
    if cache.dense_specs:
        group = cache.zarr_group(shard_id)
        want = {"row": table.num_rows, "token": int(n_tokens.sum()), "word": int(word_counts.sum())}
        for name, spec in cache.dense_specs.items():
            if name not in group:
                problems.append(f"dense array {name} is missing")
                continue
            shape = group[name].shape
            if shape != (want[spec.align], spec.dim):
                problems.append(f"dense array {name} has shape {shape}, expected ({want[spec.align]}, {spec.dim})")
    return problems


def verify_cache(path: str | os.PathLike) -> dict:
    """Every problem found, by shard. Raises only when the path is not a readable cache."""
    root = Path(path)
    manifest = read_manifest(root)
    cache = Cache(root)
    by_shard: dict[int, list[str]] = {}
    for record in manifest["shards"]:
        problems = _check_files(root, record)
        if not problems:
            problems = _check_contents(cache, record)
        if problems:
            by_shard[record["id"]] = problems
    planned = manifest.get("planned_shards")
    listed = {s["id"] for s in manifest["shards"]}
    incomplete = []
    if manifest.get("complete") and planned is not None:
        incomplete = [i for i in range(planned) if i not in listed]
    return {
        "cache": str(root),
        "ok": not by_shard and not incomplete,
        "shards_checked": len(manifest["shards"]),
        "problems": {str(k): v for k, v in sorted(by_shard.items())},
        "missing_shards": incomplete,
        "complete": bool(manifest.get("complete")),
    }


def format_problems(report: dict) -> str:
    lines = []
    for shard_id, problems in report["problems"].items():
        lines.append(f"shard {int(shard_id):05d}: " + "; ".join(problems) + ".")
    if report["missing_shards"]:
        lines.append("shards listed as planned but absent: " + ", ".join(map(str, report["missing_shards"])) + ".")
    return "\n".join(lines)
