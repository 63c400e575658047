"""Writing one shard: a Parquet file of rows plus a Zarr group of dense tensors.

`write_shard_files` is a pure function of its inputs (no manifest, no lock), so it can run
on any dask worker. It writes under temporary names, fsyncs, renames into place, and returns
the shard's record (sizes and sha256 of every file) for the single manifest owner to commit.
The same inputs always give the same bytes: no timestamps, fixed encodings, sorted names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from ..durable import fsync_dir
from .manifest import SHARDS
from .remote import Remote, is_url
from .schema import RAGGED_COLUMNS, DenseSpec, Ragged, arrow_schema, pack_keys
from .untrusted import remove_tree

# Parquet encodings chosen by bench/storage.py (see docs/benchmarks.md): byte-stream-split
# makes fp16/fp32 values compress (exponent bytes group together), and Zipf-distributed ids
# too (their high bytes are mostly zero); at k=8 it takes top-k from 34.7 to 29.6 bytes per
# masked position. Options name leaf columns, so a list column is "<name>.list.element"; a
# bare list name silently matches nothing. BYTE_STREAM_SPLIT on ints and fp16 needs a reader
# with Parquet format 2.11 (pyarrow >= 16). Dictionary encoding only pays for the two
# low-cardinality string columns. zstd level 3 is the point where more level stops paying.
# q8's uint8 codes are stored as 4-byte ints, whose three all-zero streams zstd then removes
# (7.2 bytes per position at k=8, not 9.7); splitting the draws of --sample 16 takes them
# from 21.4 to 17.5 bytes per position (delta encoding of the ascending ids: 22.4).
BYTE_STREAM_SPLIT_COLUMNS = ["teacher_loss"] + [
    f"{name}.list.element"
    for name in ("input_ids", "labels", "topk_ids", "topk_logits", "lognorm", "topk_codes", "sample_ids",
                 "sample_counts")
]
PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=3,
    use_dictionary=["lang", "side"],
    use_byte_stream_split=BYTE_STREAM_SPLIT_COLUMNS,
    write_statistics=["example_id"],
    data_page_size=1 << 20,
    # A CRC per page lets every read (not only `xkd verify`) notice a flipped byte.
    write_page_checksum=True,
)
DEFAULT_ROW_GROUP_SIZE = 512
ZARR_CHUNK_BYTES = 1 << 20


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def parquet_path(root: Path, shard_id: int) -> Path:
    return Path(root) / SHARDS / f"{shard_name(shard_id)}.parquet"


def zarr_path(root: Path, shard_id: int) -> Path:
    return Path(root) / SHARDS / f"{shard_name(shard_id)}.zarr"


def _offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=out[1:])
    return out


def q8_codes(rows: dict) -> Ragged:
    """The q8 codes of rows that hold top-k logits and log-normalisers (storage/codec.py): the
    log-probabilities are formed here in fp32, from whatever precision the rows hold."""
    from .codec import encode_q8

    logits, lognorm = rows["topk_logits"], rows["lognorm"]
    if not isinstance(logits, Ragged):
        logits = Ragged.from_rows(logits, np.float32)
        lognorm = Ragged.from_rows(lognorm, np.float32)
    positions = len(lognorm.values)
    k = len(logits.values) // positions if positions else 1
    logprobs = logits.values.astype(np.float32).reshape(positions, k) - lognorm.values.astype(np.float32)[:, None]
    return Ragged(encode_q8(logprobs).ravel(), logits.offsets)


def build_table(rows: dict, has_topk: bool, has_text: bool = False, has_pairs: bool = False, topk_codec: str = "fp16",
                has_sample: bool = False) -> pa.Table:
    """Rows as an Arrow table in the cache schema; adds the dense-alignment offsets. With the q8
    codec, rows that give topk_logits and lognorm have them encoded here."""
    rows = dict(rows)
    if has_topk and topk_codec == "q8" and "topk_codes" not in rows:
        rows["topk_codes"] = q8_codes(rows)
    for name in ("input_ids", "word_start"):
        if not isinstance(rows[name], Ragged):
            rows[name] = Ragged.from_rows(rows[name], np.uint32 if name == "input_ids" else np.bool_)
    input_ids, word_start = rows["input_ids"], rows["word_start"]
    n = len(input_ids)
    rows["token_offset"] = _offsets_from_lengths(input_ids.lengths())
    rows["word_offset"] = _offsets_from_lengths(word_start.row_sums())
    schema = arrow_schema(has_topk, has_text, has_pairs, topk_codec, has_sample)
    arrays = []
    for field in schema:
        if field.name not in rows:
            raise ValueError(f"shard rows lack column {field.name!r}")
        value = rows[field.name]
        if field.name in RAGGED_COLUMNS:
            if not isinstance(value, Ragged):
                value = Ragged.from_rows(value, field.type.value_type.to_pandas_dtype())
            arr = value.to_arrow(field.type.value_type)
        else:
            arr = pa.array(np.asarray(value), type=field.type)
        if len(arr) != n:
            raise ValueError(f"column {field.name!r} has {len(arr)} rows, input_ids has {n}")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=schema)


def dense_length(spec: DenseSpec, table: pa.Table) -> int:
    if spec.align == "row":
        return table.num_rows
    if spec.align == "token":
        return int(pa.compute.sum(pa.compute.list_value_length(table["input_ids"])).as_py() or 0)
    return int(pa.compute.sum(table["word_start"].combine_chunks().values).as_py() or 0)


def _key_layout_sizes(table: pa.Table, parquet_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per row, and the sum of squared row lengths per Parquet row group as written
    (a "keys" output stores L x heads x L values per row of L tokens)."""
    lengths = table["input_ids"].combine_chunks().value_lengths().to_numpy().astype(np.int64)
    meta = pq.ParquetFile(parquet_file).metadata
    group_rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    firsts = np.cumsum([0] + group_rows[:-1]).astype(np.int64)
    squares = np.add.reduceat(lengths * lengths, firsts) if len(lengths) else np.zeros(len(group_rows), np.int64)
    return lengths, squares


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            _fsync_file(os.path.join(dirpath, name))
        fsync_dir(Path(dirpath))


def shard_files(root: Path, shard_id: int) -> list[Path]:
    """The files of a shard on disk, in a fixed order (relative to shards/)."""
    base = Path(root) / SHARDS
    files = [parquet_path(root, shard_id)]
    z = zarr_path(root, shard_id)
    if z.is_dir():
        files += sorted(p for p in z.rglob("*") if p.is_file())
    return [f.relative_to(base) for f in files]


def digest_of(files: dict) -> str:
    """One checksum for a shard, over its files' names, sizes and checksums."""
    h = hashlib.sha256()
    for name in sorted(files):
        size, sha = files[name]
        h.update(f"{name}\0{size}\0{sha}\n".encode())
    return h.hexdigest()


def zarr_compressors(codec: str) -> list:
    """The bytes-to-bytes codecs of a dense array (see schema.CODECS); the CRC32C comes last,
    over the stored bytes, so a corrupted chunk fails to read whatever the codec."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if codec == "none":
        return [Crc32cCodec()]
    if codec == "lz4":
        return [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle", typesize=2), Crc32cCodec()]
    return [ZstdCodec(level=1), Crc32cCodec()]


def _write_zarr(path: Path, dense: dict, specs: dict[str, DenseSpec], expected: dict[str, int],
                row_group_tokens: np.ndarray) -> None:
    import zarr

    group = zarr.open_group(zarr.storage.LocalStore(path), mode="w", zarr_format=3)
    for name in sorted(specs):
        spec = specs[name]
        data = np.ascontiguousarray(dense[name], dtype=spec.dtype)
        if data.shape != (expected[name], spec.dim):
            raise ValueError(
                f"dense output {name!r} has shape {data.shape}, expected ({expected[name]}, {spec.dim}) "
                f"for align={spec.align}"
            )
        attributes = {}
        if spec.layout == "keys":
            token_counts, values_per_row_group = row_group_tokens
            data = pack_keys(data, token_counts, spec.heads)
            # Where each Parquet row group's values start: a row's offset within its row
            # group follows from the row lengths, but a row group's start would need every
            # earlier row's length.
            starts = np.zeros(len(values_per_row_group) + 1, dtype=np.int64)
            np.cumsum(values_per_row_group * spec.heads, out=starts[1:])
            attributes["row_group_starts"] = starts.tolist()
        width = data.shape[1] if data.ndim == 2 else 1
        chunk_rows = max(1, ZARR_CHUNK_BYTES // (width * data.dtype.itemsize))
        # As many chunks as that size needs, evened out: Zarr stores the last chunk at full
        # size, so an array just over a chunk boundary would store almost a chunk of padding.
        n_chunks = -(-max(1, data.shape[0]) // chunk_rows)
        chunks = (-(-max(1, data.shape[0]) // n_chunks),) + data.shape[1:]
        arr = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            compressors=zarr_compressors(spec.codec),
            fill_value=0,
            attributes=attributes,
            # Every chunk is a file, zeros too: a missing chunk file is then damage, never
            # a silent run of zeros (the direct reader relies on it).
            config={"write_empty_chunks": True},
        )
        if data.size:
            arr[...] = data


def write_shard_files(
    root: str | os.PathLike,
    shard_id: int,
    rows: dict,
    dense: dict | None = None,
    dense_specs: dict[str, DenseSpec] | None = None,
    has_topk: bool = False,
    has_text: bool = False,
    has_pairs: bool = False,
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
    *,
    topk_codec: str = "fp16",
    has_sample: bool = False,
) -> dict:
    """Write shard `shard_id` atomically; return its manifest record.

    `rows` maps every column of the schema (except the offsets, computed here) to a numpy
    array (scalars) or a Ragged / list of arrays (lists). `dense` maps each name of
    `dense_specs` to an array whose first axis follows the spec's alignment. `has_topk`,
    `has_text`, `has_pairs`, `topk_codec` and `has_sample` must agree with the manifest's
    outputs (see writer.outputs_json).

    A `root` on object storage (a URL): the shard is written to a local temporary directory
    and uploaded under shards/<shard>-<digest>/ (see upload_shard).
    """
    if is_url(root):
        with tempfile.TemporaryDirectory(prefix="xkd-shard-") as local:
            record = write_shard_files(local, shard_id, rows, dense, dense_specs, has_topk, has_text, has_pairs,
                                       row_group_size, topk_codec=topk_codec, has_sample=has_sample)
            return upload_shard(Remote(str(root)), Path(local), record)
    root = Path(root)
    dense = dense or {}
    dense_specs = dense_specs or {}
    if set(dense) != set(dense_specs):
        raise ValueError(f"dense outputs {sorted(dense)} do not match their specs {sorted(dense_specs)}")
    table = build_table(rows, has_topk, has_text, has_pairs, topk_codec, has_sample)
    expected = {name: dense_length(spec, table) for name, spec in dense_specs.items()}
    _write_in_place(root, shard_id, table, dense, dense_specs, expected, row_group_size)
    return _shard_record(root, shard_id, table, dense_specs)


def _write_in_place(root: Path, shard_id: int, table: pa.Table, dense: dict, dense_specs: dict[str, DenseSpec],
                    expected: dict[str, int], row_group_size: int) -> None:
    """Write the shard's Parquet file (and its Zarr group, when there are dense outputs) under
    temporary names, fsync them, and rename them into place, the Zarr group first; the temporary
    files are removed whatever happens."""
    shards = root / SHARDS
    shards.mkdir(parents=True, exist_ok=True)
    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    name = shard_name(shard_id)
    tmp_parquet = shards / f".{name}.parquet.{tag}"
    tmp_zarr = shards / f".{name}.zarr.{tag}"
    try:
        pq.write_table(table, tmp_parquet, row_group_size=row_group_size, **PARQUET_OPTIONS)
        _fsync_file(tmp_parquet)
        if dense_specs:
            _write_zarr(tmp_zarr, dense, dense_specs, expected, _key_layout_sizes(table, tmp_parquet))
            _fsync_tree(tmp_zarr)
            final_zarr = zarr_path(root, shard_id)
            if final_zarr.exists():  # a leftover of an interrupted run, never listed as done
                remove_tree(final_zarr)
            os.rename(tmp_zarr, final_zarr)
        os.replace(tmp_parquet, parquet_path(root, shard_id))
        fsync_dir(shards)
    finally:
        tmp_parquet.unlink(missing_ok=True)
        if tmp_zarr.exists():
            shutil.rmtree(tmp_zarr)


def _shard_record(root: Path, shard_id: int, table: pa.Table, dense_specs: dict[str, DenseSpec]) -> dict:
    """The manifest record of a shard just written: what it holds, and each file's size and sha256."""
    shards = root / SHARDS
    name = shard_name(shard_id)
    files = {}
    for rel in shard_files(root, shard_id):
        path = shards / rel
        files[str(rel)] = [path.stat().st_size, sha256_file(path)]
    lengths = table["input_ids"].combine_chunks().value_lengths().to_numpy()
    masked = table["masked_positions"].combine_chunks().value_lengths().to_numpy()
    ids = table["example_id"].to_numpy()
    langs = pa.compute.value_counts(table["lang"]).to_pylist()
    return {
        "id": shard_id,
        "rows": table.num_rows,
        "tokens": int(lengths.sum()),
        "masked": int(masked.sum()),
        "example_ids": [int(ids.min()), int(ids.max())] if len(ids) else None,
        "langs": {d["values"]: d["counts"] for d in sorted(langs, key=lambda d: d["values"])},
        "bytes": sum(size for size, _ in files.values()),
        "bytes_by_output": _bytes_by_output(shards / f"{name}.parquet", dense_specs, files, name),
        "files": files,
        "sha256": digest_of(files),
        "state": "done",
    }


def upload_shard(remote: Remote, local_root: Path, record: dict) -> dict:
    """Upload a shard written under `local_root` to the cache at `remote`, under a folder named
    by its content (shard id and digest): an object store cannot rename, so a shard cannot be
    written under a temporary name and moved; instead, no attempt can put different bytes under
    this name, and a retry of the same shard writes the same bytes to the same objects. The
    shard is visible only once the manifest lists it; objects of attempts that never make it
    into the manifest are removed by the writer (CacheWriter.remove_leftovers)."""
    from concurrent.futures import ThreadPoolExecutor

    folder = f"{shard_name(record['id'])}-{record['sha256'][:16]}"
    # Zarr chunks are ~1 MiB objects: requests in flight at once, not one after another.
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda rel: remote.put(f"{SHARDS}/{folder}/{rel}", local_root / SHARDS / rel),
                      sorted(record["files"])))
    return {**record, "dir": folder}


def _bytes_by_output(parquet_file: Path, dense_specs: dict, files: dict, name: str) -> dict:
    """Compressed bytes on disk per column (Parquet) and per dense array (Zarr); "metadata"
    is the rest (Parquet footer, Zarr group metadata), so the values sum to the shard's bytes."""
    meta = pq.ParquetFile(parquet_file).metadata
    out: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            key = col.path_in_schema.split(".")[0]
            out[key] = out.get(key, 0) + col.total_compressed_size
    for dense_name in dense_specs:
        prefix = f"{name}.zarr/{dense_name}/"
        out[dense_name] = sum(size for rel, (size, _) in files.items() if rel.startswith(prefix))
    out["metadata"] = sum(size for size, _ in files.values()) - sum(out.values())
    return out
