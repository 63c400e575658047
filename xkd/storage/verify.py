"""`xkd verify`: checksums, schema and offsets of every shard, without trusting anything,
and whether every planned shard is there.

The report's status is "ok", "incomplete" (every finished shard is sound, but planned ones
are missing: a killed or running cache-teachers) or "damaged" (a shard's bytes or the
manifest are wrong; this includes a manifest that says complete but lacks planned shards).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import BadInput
from .completeness import completeness, finish_command, how_to_finish, id_ranges, what_is_missing
from .files import shard_file
from .manifest import read_manifest
from .reader import Cache
from .remote import location
from .schema import arrow_schema, key_counts, ragged_from_arrow
from .shard import digest_of


def _check_files(files, record: dict) -> list[str]:
    """Every file of a finished shard against its recorded size and sha256 (`files`: the
    cache's LocalFiles or RemoteFiles; a remote object is downloaded to be hashed)."""
    problems = []
    if digest_of(record["files"]) != record["sha256"]:
        problems.append("its file list does not match its recorded sha256 (the manifest was edited)")
    for rel, (size, sha) in sorted(record["files"].items()):
        try:
            actual, digest = files.measure(shard_file(record, rel))
        except FileNotFoundError:
            problems.append(f"file {rel} is missing")
            continue
        if actual < size:
            problems.append(f"file {rel} is truncated ({actual} of {size} bytes)")
        elif actual != size:
            problems.append(f"file {rel} has {actual} bytes, {size} recorded")
        elif digest != sha:
            problems.append(f"file {rel} is corrupted (sha256 differs from the manifest)")
    return problems


def _check_contents(cache: Cache, record: dict) -> list[str]:
    """Schema and offsets; only run on shards whose bytes are intact."""
    shard_id = record["id"]
    try:
        table = cache.open_parquet(shard_id).read()
    except Exception as e:  # any unreadable footer or page is the finding itself
        return [f"its Parquet file cannot be read ({e})"]
    k = cache.topk_k
    expected = arrow_schema(bool(k), cache.has_text, cache.has_pairs, cache.topk_codec, bool(cache.sample_n))
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
    problems += _masked_output_problems(cache, table, n_masked)
    if cache.dense_specs:
        try:  # the numbers in zarr.json against the chunk files, as every reader checks them on open
            cache.check_dense_sizes(shard_id)
        except BadInput as e:
            return [str(e).split(" is damaged: ", 1)[-1].split(". Run `xkd verify", 1)[0]]
        group = cache.zarr_group(shard_id)
        want = {"row": table.num_rows, "token": int(n_tokens.sum()), "word": int(word_counts.sum())}
        for name, spec in cache.dense_specs.items():
            if name not in group:
                problems.append(f"dense array {name} is missing")
                continue
            shape = group[name].shape
            expected = (want[spec.align], spec.dim)
            if spec.layout == "keys":  # only each row's real keys: n x heads x n per row of n tokens
                expected = (int(key_counts(spec, n_tokens).sum()),)
            if shape != expected:
                problems.append(f"dense array {name} has shape {shape}, expected {expected}")
            elif spec.layout == "keys":  # the reader finds each row group's values through these
                group_rows = cache.row_groups(shard_id)
                firsts = np.cumsum([0] + group_rows).astype(np.int64)
                per_row = np.concatenate([[0], np.cumsum(key_counts(spec, n_tokens))]).astype(np.int64)
                if group[name].attrs.get("row_group_starts") != per_row[firsts].tolist():
                    problems.append(f"dense array {name} records row group starts that do not match its rows")
    return problems


def _masked_output_problems(cache: Cache, table, n_masked: np.ndarray) -> list[str]:
    """Top-k: k ids and values per masked position (and a log-normaliser with fp16); the draws."""
    problems, k = [], cache.topk_k
    if k:
        stored = (("topk_ids", k), ("topk_codes", k)) if cache.topk_codec == "q8" else \
            (("topk_ids", k), ("topk_logits", k), ("lognorm", 1))
        for name, per in stored:
            if not np.array_equal(ragged_from_arrow(table[name]).lengths(), n_masked * per):
                problems.append(f"{name} does not hold {per} value(s) per masked position")
    if cache.sample_n:
        problems += _sample_problems(table, n_masked, cache.sample_n)
    return problems


def _sample_problems(table, n_masked: np.ndarray, n: int) -> list[str]:
    """Draws: one count per id, counts of at least 1 that sum to n per masked position
    (xkd/sampling.py). The ids' order is not checked: cache-teachers writes them ascending, and a
    union-vocab copy keeps that order in other ids."""
    ids, counts = ragged_from_arrow(table["sample_ids"]), ragged_from_arrow(table["sample_counts"])
    if not np.array_equal(ids.lengths(), counts.lengths()):
        return ["sample_ids and sample_counts differ in length"]
    if counts.values.size and counts.values.min() < 1:
        return ["a sample count is 0"]
    if not np.array_equal(counts.row_sums(), n_masked * n):
        return [f"sample_counts do not sum to {n} per masked position"]
    return []


def verify_cache(path: str | os.PathLike) -> dict:
    """Every problem found, by shard, and what is missing. Raises only when the path is not
    a readable cache."""
    root = location(path)
    manifest = read_manifest(root)
    cache = Cache(root, check=False)  # everything is checked below, and reported by shard
    by_shard: dict[int, list[str]] = {}
    done = [s for s in manifest["shards"] if s["state"] == "done"]  # others count as missing
    for record in done:
        problems = _check_files(cache.files, record)
        if not problems:
            problems = _check_contents(cache, record)
        if problems:
            by_shard[record["id"]] = problems
    info = completeness(manifest)
    missing = info["missing_shards"] or []
    # A manifest that says complete yet lacks planned shards was edited: damage, not a run
    # still to finish.
    contradicts = info["marked_complete"] and bool(missing)
    status = "damaged" if by_shard or contradicts else "ok" if info["complete"] else "incomplete"
    return {
        "cache": str(root),
        "ok": status == "ok",
        "status": status,
        "shards_checked": len(done),
        "problems": {str(k): v for k, v in sorted(by_shard.items())},
        "complete": info["complete"],
        "marked_complete": info["marked_complete"],
        "planned_shards": info["planned_shards"],
        "missing_shards": missing,
        "missing_rows": info["missing_rows"],
        "finish": finish_command(root, manifest),
    }


def format_problems(report: dict) -> str:
    lines = []
    for shard_id, problems in report["problems"].items():
        lines.append(f"shard {int(shard_id):05d}: " + "; ".join(problems) + ".")
    if report["missing_shards"] and report["status"] == "damaged":
        rows = f" ({report['missing_rows']:,} rows)" if report["missing_rows"] else ""
        ids = id_ranges(report["missing_shards"])
        if report["marked_complete"]:
            lines.append(f"shards listed as planned but absent: {ids}. The manifest says the cache is complete, "
                         f"so it was edited: these shards{rows} are missing.")
        else:
            lines.append(f"shards not written yet (the run that made the cache did not finish): {ids}{rows}.")
    return "\n".join(lines)


def format_verdict(report: dict) -> str:
    """The paragraph for a cache that is not ok (stderr of `xkd verify`)."""
    root = report["cache"]
    if report["status"] == "damaged":
        rerun = f" (`{report['finish']}`)" if report["finish"] else ""
        return (f"{root} is damaged.\n{format_problems(report)}\nRe-run the command that made the cache{rerun}: "
                "it rewrites only the damaged or missing shards.")
    info = {"missing_shards": report["missing_shards"],
            "planned_shards": report["planned_shards"], "done_shards": report["shards_checked"],
            "missing_rows": report["missing_rows"]}
    n = report["shards_checked"]
    return (f"cache {root} is incomplete: {what_is_missing(info)}. Its {n} finished shard{'' if n == 1 else 's'} "
            f"{'is' if n == 1 else 'are'} sound; train-student and evaluate refuse it unless given --allow-incomplete. "
            f"{how_to_finish(report['finish'])}")
