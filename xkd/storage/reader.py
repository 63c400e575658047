"""Lazy reading of a cache: by shard, by Parquet row group, or by example id.

Nothing here loads a whole cache. The unit of reading is a `Block` (one row group of one
shard plus the matching slices of its dense arrays); per-example dicts are views into it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import BadInput, XkdError
from .completeness import completeness, finish_command, incomplete_message
from .fetch import Damaged, FetchCache, RangedFile
from .files import files_of, shard_file
from .manifest import MAX_EXPANSION, read_manifest
from .remote import Remote, location
from .schema import RAGGED_COLUMNS, DenseSpec, Ragged, key_counts, pack_keys, ragged_from_arrow, unpack_keys
from .shard import ZARR_CHUNK_BYTES, digest_of, shard_name
from .untrusted import parse_json

_OPEN_FILES = 8  # open Parquet/Zarr handles kept per cache

# Zarr's metadata files (v3 and v2). They are small, and they decide how every chunk is
# decoded (dtype, byte order, shape, codecs): an edited one reads without any error, as
# wrong numbers, since chunk CRCs cover only the chunks. So they are checked on open.
ZARR_METADATA = ("zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata")


def is_metadata_file(rel: str) -> bool:
    return rel.rsplit("/", 1)[-1] in ZARR_METADATA


try:  # zarr's own CRC32C (a dependency of zarr 3); without it every read goes through zarr
    import google_crc32c
except ImportError:  # pragma: no cover
    google_crc32c = None


class DirectArray:
    """A Zarr v3 array whose chunks are raw little-endian values followed by their CRC32C
    (codec "none"), read by this reader itself: each chunk's bytes go with one readinto
    straight into the caller's buffer, and the CRC is computed over them where they land.

    Why not zarr's own read: it decodes every chunk into a fresh buffer, strips the CRC
    into another and copies the selection into a third, through an event loop per call;
    for dense teacher outputs that was most of the loader's time (docs/benchmarks.md,
    "## train"). The files are ordinary Zarr: zarr reads them too.
    """

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype, chunk_rows: int, attributes: dict):
        self.path = path
        self.shape = shape
        self.dtype = dtype
        self.chunk_rows = chunk_rows
        self.attrs = attributes
        self.row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        self._chunk_prefix = f"{path}/c/"  # a string: pathlib's joins cost more than reading a chunk
        self._suffix = "/0" * (len(shape) - 1)
        # Chunk k opened for reading, and its size (None: missing). A remote cache replaces
        # both: chunks are fetched, checked, into the local fetch cache and opened there.
        self.open_chunk = self._open_local_chunk
        self.chunk_size = self._local_chunk_size
        self.forget = None  # remote: drop chunk k's local copy, so that it is fetched again

    def chunk_name(self, k: int) -> str:
        """Chunk k's file, relative to the array's directory."""
        return f"c/{k}{self._suffix}"

    def _local_chunk(self, k: int) -> str:
        return f"{self._chunk_prefix}{k}{self._suffix}"

    def _open_local_chunk(self, k: int):
        return open(self._local_chunk(k), "rb", buffering=0)

    def _local_chunk_size(self, k: int) -> int | None:
        try:
            return os.stat(self._local_chunk(k)).st_size
        except FileNotFoundError:
            return None

    @classmethod
    def of(cls, path, metadata: bytes | None = None) -> "DirectArray | None":
        """The array at `path` (its zarr.json: `metadata`, read from `path` if not given)
        when its chunks are raw values + CRC32C, else None."""
        if google_crc32c is None:
            return None
        meta = parse_json(metadata if metadata is not None else (Path(path) / "zarr.json").read_bytes())
        codecs = [c.get("name") for c in meta.get("codecs") or []]
        endian = ((meta.get("codecs") or [{}])[0].get("configuration") or {}).get("endian", "little")
        grid = meta.get("chunk_grid") or {}
        keys = meta.get("chunk_key_encoding") or {}
        shape = tuple(int(x) for x in meta.get("shape") or ())
        chunks = tuple(int(x) for x in (grid.get("configuration") or {}).get("chunk_shape") or ())
        if (codecs != ["bytes", "crc32c"] or endian != "little" or grid.get("name") != "regular"
                or keys.get("name") != "default" or (keys.get("configuration") or {}).get("separator", "/") != "/"
                or meta.get("storage_transformers") or len(shape) not in (1, 2) or len(chunks) != len(shape)
                or chunks[1:] != shape[1:] or np.dtype(meta["data_type"]).byteorder == ">"):
            return None
        return cls(path, shape, np.dtype(meta["data_type"]), max(1, chunks[0]), meta.get("attributes") or {})

    def check_chunk_files(self) -> None:
        """The shape and chunk shape in zarr.json against the chunk files: every chunk is
        stored at full size (chunk rows x row bytes + the 4-byte CRC), so the first chunk's
        size pins the row width and chunk rows, and the last chunk's existence the rows. A
        zarr.json edited to claim more than the files hold would make reads allocate it."""
        if not self.shape[0]:
            return
        last = (self.shape[0] - 1) // self.chunk_rows
        size = self.chunk_size(0)
        if size != self.chunk_rows * self.row_bytes + 4:
            held = "is missing" if size is None else f"holds {size:,} bytes"
            raise ValueError(f"chunk 0 {held}, where its zarr.json's chunks of {self.chunk_rows:,} x {self.row_bytes:,} "
                             "bytes need that and 4 (a truncated chunk, or an edited zarr.json)")
        if self.chunk_size(last) is None:
            raise ValueError(f"its zarr.json says {self.shape[0]:,} rows in {last + 1:,} chunks, but chunk {last:,} is missing")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new array; ValueError/OSError when a chunk is damaged."""
        if stop > start and (stop > self.shape[0] or start < 0):  # before allocating: a bad span can be huge
            raise ValueError(f"rows {start}:{stop} lie outside the array's {self.shape[0]}")
        if stop <= start:
            return np.empty((0,) + self.shape[1:], dtype=self.dtype)
        # A recycled buffer: a fresh one is new memory, whose every page the kernel faults in
        # and zeroes as readinto writes it; the training loader reads a window of these per
        # shuffle window, and the faults cost it more than the copy did (docs/benchmarks.md).
        dest = READ_BUFFERS.take((stop - start) * self.row_bytes)
        out = dest.view(self.dtype).reshape((stop - start,) + self.shape[1:])
        rows, rb = self.chunk_rows, self.row_bytes
        for k in range(start // rows, (stop - 1) // rows + 1):
            first, last = k * rows, min(k * rows + rows, self.shape[0])
            lo, hi = max(start, first), min(stop, last)
            before, inside = (lo - first) * rb, (hi - lo) * rb
            after = rows * rb - before - inside  # an edge chunk is stored at full size
            with self.open_chunk(k) as f:
                crc = google_crc32c.extend(0, _read_exactly(f, before)) if before else 0
                window = dest[(lo - start) * rb : (hi - start) * rb]
                got = 0
                while got < inside:  # a regular file fills it at once unless it is short
                    n = f.readinto(window[got:])
                    if not n:
                        raise ValueError(f"chunk {k} is truncated")
                    got += n
                crc = google_crc32c.extend(crc, window)
                if after:
                    crc = google_crc32c.extend(crc, _read_exactly(f, after))
                stored = f.read(5)
            if len(stored) != 4:
                raise ValueError(f"chunk {k} has {'trailing bytes' if len(stored) > 4 else 'no checksum'}")
            if crc != int.from_bytes(stored, "little"):
                raise ValueError(f"chunk {k}: stored and computed checksums do not match")
        return out


class RecycledBuffers:
    """Byte buffers handed out again once nothing references them any more.

    Large arrays read or built per shuffle window or per batch (MBs each, over and over)
    would otherwise be new memory every time: the kernel faults in and zeroes each page on
    its first write, which on dense teacher outputs cost as much as copying the values. A
    buffer is free when the only references left are this pool's: numpy views, and torch
    tensors made from them, all hold a reference to the buffer that owns their memory, so
    nothing still using it can be written over. Free buffers are kept up to the bytes in
    use (or `floor`), so the pool follows the working set instead of growing with a cache."""

    def __init__(self, floor: int = 64 << 20):
        import sys
        import threading

        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()
        # A fork while another thread (the loader's window reader) holds the lock would leave
        # the child's copy locked for good: DataLoader workers are forked.
        os.register_at_fork(after_in_child=lambda: setattr(self, "_lock", threading.Lock()))
        self._refs = sys.getrefcount
        self._floor = floor
        probe = [np.empty(0, dtype=np.uint8)]
        self._idle = min(self._refs(buf) for buf in probe)  # a buffer only the pool holds, seen as the loop sees it

    def take(self, nbytes: int) -> np.ndarray:
        """An uninitialised uint8 array of nbytes, recycled where a free buffer fits."""
        with self._lock:
            best, free, used = None, [], 0
            for buf in self._buffers:
                if self._refs(buf) > self._idle:
                    used += len(buf)
                else:
                    free.append(buf)
                    if nbytes <= len(buf) <= 2 * nbytes and (best is None or len(buf) < len(best)):
                        best = buf
            if best is None:  # some slack, so that the next, slightly larger request fits too
                best = np.empty(nbytes + nbytes // 8, dtype=np.uint8)
                self._buffers.append(best)
            else:
                free = [buf for buf in free if buf is not best]  # by identity: == on arrays compares values
            used += len(best)
            spare = sum(len(buf) for buf in free)
            for buf in sorted(free, key=len, reverse=True):
                if spare <= max(used, self._floor):
                    break
                self._buffers = [b for b in self._buffers if b is not buf]
                spare -= len(buf)
            return best[:nbytes]


READ_BUFFERS = RecycledBuffers()  # DirectArray.read's arrays


def decoded_topk(codes: Ragged, k: int) -> dict[str, Ragged]:
    """A q8 cache's codes as the columns an fp16 cache holds: topk_logits, the decoded
    log-probabilities (float32), and lognorm, 0 at every position (storage/codec.py)."""
    from .codec import decode_q8

    positions = codes.offsets // k
    return {"topk_logits": Ragged(decode_q8(codes.values).astype(np.float32, copy=False), codes.offsets),
            "lognorm": Ragged(np.zeros(int(positions[-1]), np.float32), positions)}


def _read_exactly(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("a chunk is truncated")
    return data


class Block:
    """Rows of one row group: scalar columns as numpy, ragged columns as Ragged, plus the
    dense arrays' slices for exactly these rows."""

    def __init__(self, cache: "Cache", shard_id: int, columns: dict, dense: dict, dense_offsets: dict,
                 packed: tuple = ()):
        self.cache = cache
        self.shard_id = shard_id
        self.columns = columns
        self.dense = dense  # name -> array covering these rows
        self._dense_offsets = dense_offsets  # name -> (rows + 1) offsets into self.dense[name]
        # Attention outputs held in the "keys" layout (flat, per row L x heads x L values);
        # example() gives them back padded, as every cache version did.
        self.packed = packed

    @property
    def num_rows(self) -> int:
        return len(self.columns["example_id"])

    def dense_rows(self, name: str, i: int) -> np.ndarray:
        off = self._dense_offsets[name]
        return self.dense[name][off[i] : off[i + 1]]

    def example(self, i: int) -> dict:
        out = {}
        for name, col in self.columns.items():
            if name in ("token_offset", "word_offset"):
                continue
            out[name] = col.row(i) if isinstance(col, Ragged) else col[i]
        k = self.cache.topk_k
        if k and "topk_ids" in out:
            out["topk_ids"] = out["topk_ids"].reshape(-1, k)
            out["topk_logits"] = out["topk_logits"].reshape(-1, k)
        for name, spec in self.cache.dense_specs.items():
            if name in self.dense:
                rows = self.dense_rows(name, i)
                if name in self.packed:
                    heads = self.cache.attention_heads(name)
                    rows = unpack_keys(rows, np.array([len(out["input_ids"])]), heads, spec.dim // heads)
                out[name] = rows[0] if spec.align == "row" else rows
        return out


class Cache:
    """A cache on disk. `len()` counts rows (examples as the teacher saw them).

    Opening checks what is cheap to check: each finished shard's file list against its
    recorded digest, and the Zarr metadata files' sizes and sha256. The Parquet files (size
    checked when first opened, CRC per page) and Zarr chunks (CRC each) are checked as they
    are read, and fully by `xkd verify`; `check=False` (verify's) skips the checks on open.
    An incomplete cache opens (readers may want the finished part); callers that must not
    silently use part of a corpus call `require_complete()`.
    """

    def __init__(self, path: str | os.PathLike, *, check: bool = True, fetch: FetchCache | None = None):
        self.path = location(path)
        # The files, local or on object storage (then fetched through `fetch`, a bounded
        # local cache; by default ~/.cache/xkd/remote).
        self.files = files_of(self.path, fetch)
        self.manifest = read_manifest(self.path)
        self._shards = {s["id"]: s for s in self.manifest["shards"] if s["state"] == "done"}
        self._parquet: OrderedDict[int, pq.ParquetFile] = OrderedDict()
        self._zarr: OrderedDict[int, object] = OrderedDict()
        self._direct: OrderedDict[int, dict] = OrderedDict()  # shard -> name -> DirectArray or None
        self._sized: set[tuple[int, str]] = set()  # (shard, dense name) whose sizes _check_size accepted
        self._lock = threading.RLock()
        if check:
            self._check_cheaply()

    def _check_cheaply(self) -> None:
        for shard_id in self.shard_ids:
            record = self._shards[shard_id]
            if digest_of(record["files"]) != record["sha256"]:
                raise self._damaged(
                    shard_id, "has a file list that does not match its recorded sha256 (the manifest was edited)")
            for rel in sorted(record["files"]):
                if is_metadata_file(rel):  # Parquet pages and Zarr chunks: big, and CRC-checked on every read
                    self._check_width(shard_id, rel, self.metadata_file(shard_id, rel))

    def metadata_file(self, shard_id: int, rel: str) -> str:
        """The local path of a shard's small metadata file `rel` once checked against the
        manifest (size and sha256): it says how the arrays' bytes are decoded, so an edited
        one would read, without any error, as wrong numbers."""
        record = self._shards[shard_id]
        name = shard_file(record, rel)
        try:
            return self.files.checked(name, *record["files"][rel])
        except FileNotFoundError:
            group = self.files.where(shard_file(record, rel.split("/", 1)[0]))
            whole_group = self.files.remote is None and not Path(group).is_dir()
            missing = group.rsplit("/", 1)[-1] if whole_group else self.files.where(name)
            raise self._damaged(shard_id, f"is listed as done but {missing} is missing") from None
        except Damaged as e:
            raise self._damaged(shard_id, f"is damaged: {e}; it says how the arrays' bytes are decoded, so reading "
                                          "through it would give wrong numbers") from None

    def _check_width(self, shard_id: int, rel: str, path: str) -> None:
        """An array's row width in its zarr.json against the manifest's dim, on open: methods
        size their heads by the dim, which the manifest bounds by the files' bytes (and the
        first read checks zarr.json's other numbers against the chunk files)."""
        parts = rel.split("/")
        if len(parts) != 3 or parts[1] not in self.dense_specs or parts[2] not in ("zarr.json", ".zarray"):
            return
        spec = self.dense_specs[parts[1]]
        try:
            shape = tuple(parse_json(Path(path).read_bytes()).get("shape") or ())
        except (ValueError, AttributeError):
            shape = None
        width = () if spec.layout == "keys" else (spec.dim,)
        if shape is None or shape[1:] != width:
            where = self.files.where(shard_file(self._shards[shard_id], rel))
            raise self._damaged(shard_id, f"is damaged: {where} gives rows of shape {shape[1:] if shape else None}, "
                                          f"the manifest's dim {width}")

    def check_dense_sizes(self, shard_id: int) -> None:
        """The numbers in each uncompressed array's zarr.json against the manifest and its
        chunk files (a stat each), as the first read of each array checks them: for verify,
        which reads no dense values. Raises BadInput naming the array."""
        for name in self.dense_specs:
            direct = self.direct_array(shard_id, name)
            if direct is not None and (shard_id, name) not in self._sized:
                try:
                    self._check_size(shard_id, name, direct, compressed=False)
                except ValueError as e:
                    where = self.files.where(shard_file(self._shards[shard_id], f"{shard_name(shard_id)}.zarr/{name}"))
                    raise self._damaged(shard_id, f"is damaged: {where} cannot be read ({e})") from None
                self._sized.add((shard_id, name))

    # Complete or not ------------------------------------------------------------------
    @cached_property
    def completeness(self) -> dict:
        """See storage.completeness: complete, planned/done/missing shards, missing rows."""
        return completeness(self.manifest)

    @property
    def complete(self) -> bool:
        return self.completeness["complete"]

    def incomplete_message(self) -> str:
        return incomplete_message(self.path, self.completeness, finish_command(self.path, self.manifest))

    def require_complete(self, allow: str = "--allow-incomplete") -> None:
        """Refuse an incomplete cache: one paragraph saying what is missing, how to finish
        it, and that `allow` uses the finished shards only."""
        if not self.complete:
            raise BadInput(f"{self.incomplete_message()} Or give {allow} to use only {self.finished_shards()}.")

    def finished_shards(self) -> str:
        n = len(self._shards)
        return f"its {n} finished shard" + ("" if n == 1 else "s")

    # What is stored -----------------------------------------------------------------
    @cached_property
    def topk_k(self) -> int | None:
        topk = (self.manifest.get("outputs") or {}).get("topk")
        return int(topk["k"]) if topk else None

    @cached_property
    def topk_codec(self) -> str:
        """How the top-k values are stored: "fp16", or "q8" (read back decoded: topk_logits are
        then the log-probabilities and lognorm 0)."""
        topk = (self.manifest.get("outputs") or {}).get("topk") or {}
        return topk.get("codec", "fp16")

    @cached_property
    def sample_n(self) -> int | None:
        """Draws per masked position (cache-teachers --sample N), or None."""
        sample = (self.manifest.get("outputs") or {}).get("sample")
        return int(sample["n"]) if sample else None

    @cached_property
    def has_text(self) -> bool:
        return bool((self.manifest.get("outputs") or {}).get("text"))

    @cached_property
    def has_pairs(self) -> bool:
        """Rows are sentence pairs (segment_b, and text_b with the text); older caches: never."""
        return bool((self.manifest.get("outputs") or {}).get("pairs"))

    @cached_property
    def dense_specs(self) -> dict[str, DenseSpec]:
        dense = (self.manifest.get("outputs") or {}).get("dense") or {}
        return {name: DenseSpec.from_json(name, d) for name, d in dense.items()}

    def attention_heads(self, name: str) -> int:
        """Heads of an attention output (attn.<layer>): recorded with the "keys" layout; for
        schema-1 caches (always padded), the teacher's."""
        spec = self.dense_specs[name]
        if spec.heads:
            return spec.heads
        heads = int((self.manifest.get("teacher") or {}).get("num_heads") or 0)
        if not heads or spec.dim % heads:
            raise BadInput(f"cache {self.path}: {name} is {spec.dim} wide, which is not heads x max length for the "
                           f"teacher's {heads or 'unrecorded'} heads; re-run cache-teachers.")
        return heads

    def is_attention(self, name: str) -> bool:
        spec = self.dense_specs[name]
        return spec.layout == "keys" or (name.startswith("attn.") and spec.align == "token")

    @property
    def shard_ids(self) -> list[int]:
        return sorted(self._shards)

    def shard(self, shard_id: int) -> dict:
        return self._shards[shard_id]

    def __len__(self) -> int:
        return sum(s["rows"] for s in self._shards.values())

    def __repr__(self) -> str:
        return f"Cache({str(self.path)!r}, rows={len(self)}, shards={len(self._shards)})"

    # Files --------------------------------------------------------------------------
    def _damaged(self, shard_id: int, problem: str) -> XkdError:
        # A damaged cache is bad input to whatever reads it (exit 2); the fix is the same
        # for every kind of damage, since cache-teachers re-checks and rewrites bad shards.
        command = finish_command(self.path, self.manifest)
        rerun = f"re-run the command that made the cache, with the same options{f' (`{command}`)' if command else ''}"
        return BadInput(
            f"cache {self.path}: shard {shard_id} {problem}. Run `xkd verify {self.path}` for a full "
            f"check, then {rerun}: it rewrites damaged shards."
        )

    def _record(self, shard_id: int) -> dict:
        # Files of shards the manifest does not list as done are leftovers of an interrupted
        # run: reading them would show a reader a shard that was never committed.
        record = self._shards.get(shard_id)
        if record is None:
            raise XkdError(
                f"cache {self.path} has no finished shard {shard_id}; its finished shards are "
                f"{self.shard_ids[:10]}{' ...' if len(self._shards) > 10 else ''}."
            )
        return record

    # The read-ahead thread and read_blocks' threads read while the main thread does: the
    # handles below are made and cached under one lock.
    def parquet_file(self, shard_id: int) -> pq.ParquetFile:
        with self._lock:
            return self._parquet_file(shard_id)

    def zarr_group(self, shard_id: int):
        with self._lock:
            return self._zarr_group(shard_id)

    def direct_array(self, shard_id: int, name: str) -> DirectArray | None:
        """The dense array `name` of a shard when this reader reads its chunks itself (codec
        "none"), else None (zarr reads it)."""
        with self._lock:
            return self._direct_array(shard_id, name)

    def _parquet_file(self, shard_id: int) -> pq.ParquetFile:
        f = self._parquet.get(shard_id)
        if f is None:
            record = self._record(shard_id)
            rel = f"{shard_name(shard_id)}.parquet"
            if rel not in record["files"]:
                raise self._damaged(shard_id, f"lists no {rel} among its files (the manifest was edited)")
            try:
                f = self.open_parquet(shard_id)
            except FileNotFoundError:
                raise self._damaged(shard_id, f"is listed as done but {rel} is missing") from None
            except Damaged as e:
                raise self._damaged(shard_id, f"is damaged: {e}") from None
            except (OSError, pa.ArrowException) as e:
                raise self._damaged(shard_id, f"is damaged: {rel} cannot be read ({e})") from None
            # Commands size their work by the manifest's counts (inspect's totals, the batch
            # against the corpus): a count the file does not hold is damage, found here.
            if f.metadata.num_rows != record["rows"]:
                raise self._damaged(shard_id, f"is damaged: the manifest counts {record['rows']:,} rows, "
                                              f"{rel} holds {f.metadata.num_rows:,}")
            self._parquet[shard_id] = f
            if len(self._parquet) > _OPEN_FILES:
                self._parquet.popitem(last=False)
        else:
            self._parquet.move_to_end(shard_id)
        return f

    def open_parquet(self, shard_id: int) -> pq.ParquetFile:
        """A shard's Parquet file, opened afresh, its row count not compared with the manifest
        (verify reports that itself); page CRCs are checked as pages are read."""
        record = self._record(shard_id)
        rel = f"{shard_name(shard_id)}.parquet"
        source = self.files.parquet(shard_file(record, rel), *record["files"][rel])
        f = pq.ParquetFile(source, page_checksum_verification=True)
        f.ranged = source if isinstance(source, RangedFile) else None  # a remote file: fetched by byte range
        # pyarrow's reader of one file is not safe across threads (concurrent read_row_group on a
        # Python file object crashed the process): reads of one file take turns, fetches do not.
        f.read_lock = threading.Lock()
        return f

    def _zarr_group(self, shard_id: int):
        import zarr

        g = self._zarr.get(shard_id)
        if g is None:
            record = self._record(shard_id)
            name = shard_file(record, f"{shard_name(shard_id)}.zarr")
            if self.files.remote is not None:  # compressed arrays on object storage: zarr reads them itself
                store = zarr.storage.ObjectStore(Remote(self.files.where(name)).store, read_only=True)
            elif not Path(self.files.where(name)).is_dir():
                raise self._damaged(shard_id, f"is listed as done but {shard_name(shard_id)}.zarr is missing")
            else:
                store = zarr.storage.LocalStore(self.files.where(name), read_only=True)
            try:
                g = zarr.open_group(store, mode="r")
            except Exception as e:  # unreadable group metadata is the finding itself
                raise self._damaged(shard_id, f"is damaged: {self.files.where(name)}/zarr.json cannot be read ({e})") from None
            self._zarr[shard_id] = g
            if len(self._zarr) > _OPEN_FILES:
                self._zarr.popitem(last=False)
        return g

    def _direct_array(self, shard_id: int, name: str) -> DirectArray | None:
        arrays = self._direct.get(shard_id)
        if arrays is None:
            self._record(shard_id)
            arrays = self._direct[shard_id] = {}
            if len(self._direct) > _OPEN_FILES:
                self._direct.popitem(last=False)
        else:
            self._direct.move_to_end(shard_id)
        if name not in arrays:
            record = self._shards[shard_id]
            array_rel = f"{shard_name(shard_id)}.zarr/{name}"
            if f"{array_rel}/zarr.json" not in record["files"]:
                if not any(rel.startswith(f"{shard_name(shard_id)}.zarr/") for rel in record["files"]):
                    raise self._damaged(shard_id, f"is listed as done but {shard_name(shard_id)}.zarr is missing")
                arrays[name] = None  # zarr v2 metadata (schema 1): zarr reads it
                return None
            metadata = self.metadata_file(shard_id, f"{array_rel}/zarr.json")
            where = self.files.where(shard_file(record, array_rel))
            try:
                direct = DirectArray.of(where, Path(metadata).read_bytes())
            except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable metadata is the finding itself
                raise self._damaged(shard_id, f"is damaged: {where}/zarr.json cannot be read ({e})") from None
            if direct is not None and self.files.remote is not None:
                def chunk(k: int, rel=array_rel, direct=direct) -> tuple[str, list | None]:
                    """Chunk k's name relative to the cache and its manifest entry [size, sha256]."""
                    name = f"{rel}/{direct.chunk_name(k)}"
                    return shard_file(record, name), record["files"].get(name)

                def open_chunk(k: int):
                    name, entry = chunk(k)
                    if entry is None:
                        raise ValueError(f"chunk {k} is missing")
                    return self.files.open_chunk(name, *entry)

                def forget(k: int) -> None:
                    if (entry := chunk(k)[1]) is not None:
                        self.files.fetch.forget_object(entry[1])
                direct.chunk_size = lambda k: (chunk(k)[1] or [None])[0]
                direct.open_chunk, direct.forget = open_chunk, forget
            arrays[name] = direct
        return arrays[name]

    def _read_dense(self, shard_id: int, name: str, start: int, stop: int) -> np.ndarray:
        direct = self.direct_array(shard_id, name)
        array = direct if direct is not None else self.zarr_group(shard_id)[name]
        if (shard_id, name) not in self._sized:
            self._check_size(shard_id, name, array, direct is None)
            self._sized.add((shard_id, name))
        if direct is not None:
            try:
                return direct.read(start, stop)
            except ValueError:
                if direct.forget is None:
                    raise
                # Chunks of a remote cache come from the local fetch cache, checked whole when they were
                # fetched: a failed CRC now is damage on this disk. Fetch them again (checked), and read
                # once more; a second failure is the cache's own.
                for k in range(start // direct.chunk_rows, max(start, stop - 1) // direct.chunk_rows + 1):
                    direct.forget(k)
                return direct.read(start, stop)
        if stop > array.shape[0]:  # zarr would return fewer rows, and the offsets would go wrong
            raise ValueError(f"rows {start}:{stop} lie outside the array's {array.shape[0]}")
        return array[start:stop]

    def _check_size(self, shard_id: int, name: str, array, compressed: bool) -> None:
        """A dense array's row width (zarr.json) against the manifest's dim, and a compressed
        array's chunk against its file: zarr decodes a whole chunk at once, and no zstd or lz4
        chunk expands more than MAX_EXPANSION-fold, so a zarr.json claiming more is refused
        before anything is allocated. (Uncompressed chunks: DirectArray.check_chunk_files.)"""
        spec = self.dense_specs[name]
        width = () if spec.layout == "keys" else (spec.dim,)
        if tuple(array.shape[1:]) != width:
            raise ValueError(f"its zarr.json gives rows of shape {tuple(array.shape[1:])}, the manifest {width}")
        if not compressed:
            array.check_chunk_files()
            return
        if not array.shape[0]:
            return
        chunk_bytes = int(np.prod(array.chunks, dtype=object)) * array.dtype.itemsize
        first = f"{shard_name(shard_id)}.zarr/{name}/c/" + "/".join(["0"] * len(array.shape))
        stored = self._shards[shard_id]["files"].get(first, [0])[0]
        if chunk_bytes > max(ZARR_CHUNK_BYTES, stored * MAX_EXPANSION):
            raise ValueError(f"its zarr.json says chunks of {chunk_bytes:,} bytes, more than its {stored:,}-byte "
                             f"chunk 0 can hold")

    def _row_group_start(self, shard_id: int, name: str, row_group: int) -> int:
        """Where a row group's values start in a "keys" output (recorded by the writer)."""
        direct = self.direct_array(shard_id, name)
        attrs = direct.attrs if direct is not None else self.zarr_group(shard_id)[name].attrs
        starts = attrs.get("row_group_starts")
        if not isinstance(starts, list) or row_group >= len(starts) - 1:
            raise ValueError(f"its zarr.json records no start for row group {row_group}")
        return int(starts[row_group])

    def row_groups(self, shard_id: int) -> list[int]:
        """Rows per row group of a shard, from the Parquet footer only."""
        meta = self.parquet_file(shard_id).metadata
        return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]

    # Reading --------------------------------------------------------------------------
    def read_table(self, shard_id: int, row_group: int | None = None, columns=None) -> pa.Table:
        f = self.parquet_file(shard_id)
        try:
            if row_group is not None and f.ranged is not None:  # one request for the row group's column chunks
                f.ranged.fetch(*row_group_span(f.metadata, row_group, columns))
            with f.read_lock:
                return f.read(columns=columns) if row_group is None else f.read_row_group(row_group, columns=columns)
        except (OSError, pa.ArrowException) as e:  # page checksums fail here on a flipped byte
            name = f"{shard_name(shard_id)}.parquet"
            raise self._damaged(shard_id, f"is damaged: {name} cannot be read ({e})") from None

    def read_block(self, shard_id: int, row_group: int, columns=None, dense=None, packed_keys: bool = False) -> Block:
        """One row group with the matching dense slices. `dense=None` reads every stored
        dense output, `dense=()` none of them. With `packed_keys`, attention outputs come in
        the "keys" layout (flat: per row of L tokens, L x heads x L values) whatever the
        cache stores, which is how the training loader moves them; otherwise each token's
        heads x max_length vector, zero-padded, as the cache format always described it."""
        dense_names = list(self.dense_specs) if dense is None else list(dense)
        cols = None if columns is None else list(dict.fromkeys([*columns, "example_id"]))
        if cols is not None and dense_names:
            cols = list(dict.fromkeys([*cols, "input_ids", "word_start", "token_offset", "word_offset"]))
        decode = self.topk_codec == "q8" and (cols is None or "topk_logits" in cols or "lognorm" in cols)
        if decode and cols is not None:
            cols = [c for c in cols if c not in ("topk_logits", "lognorm")] + ["topk_codes"]
        table = self.read_table(shard_id, row_group, cols)
        columns_np = {}
        for name in table.column_names:
            col = table[name]
            columns_np[name] = ragged_from_arrow(col) if name in RAGGED_COLUMNS else col.to_numpy()
        if decode:
            columns_np.update(decoded_topk(columns_np.pop("topk_codes"), self.topk_k))
        dense_out, dense_offsets, packed = {}, {}, []
        for name in dense_names:
            spec = self.dense_specs[name]
            try:
                if spec.layout == "keys":
                    counts = key_counts(spec, columns_np["input_ids"].lengths())
                    start = self._row_group_start(shard_id, name, row_group)
                    values = self._read_dense(shard_id, name, start, start + int(counts.sum()))
                else:
                    start, counts = self._dense_span(spec, columns_np, shard_id, row_group)
                    values = self._read_dense(shard_id, name, start, start + int(counts.sum()))
            except XkdError:
                raise
            except Exception as e:  # a failed chunk CRC or decompression is the finding itself
                where = f"{shard_name(shard_id)}.zarr/{name}"
                raise self._damaged(shard_id, f"is damaged: {where} cannot be read ({e})") from None
            if spec.layout == "keys" or (packed_keys and self.is_attention(name)):
                if spec.layout != "keys":  # schema 1: drop the zero padding past each row's length
                    lengths = columns_np["input_ids"].lengths()
                    values = pack_keys(values, lengths, self.attention_heads(name))
                    counts = lengths * lengths * self.attention_heads(name)
                packed.append(name)
            offsets = np.zeros(len(counts) + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            dense_out[name], dense_offsets[name] = values, offsets
        block = Block(self, shard_id, columns_np, dense_out, dense_offsets, tuple(packed))
        if not packed_keys and packed:  # the documented per-token layout, zero-padded keys
            for name in packed:
                spec, heads = self.dense_specs[name], self.attention_heads(name)
                lengths = columns_np["input_ids"].lengths()
                block.dense[name] = unpack_keys(block.dense[name], lengths, heads, spec.dim // heads)
                block._dense_offsets[name] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            block.packed = ()
        return block

    def _dense_span(self, spec: DenseSpec, cols: dict, shard_id: int, row_group: int):
        """Where these rows start in a dense array, and how many entries each row has."""
        n = len(cols["example_id"])
        if spec.align == "row":
            start = sum(self.row_groups(shard_id)[:row_group])
            return start, np.ones(n, dtype=np.int64)
        if spec.align == "token":
            return (int(cols["token_offset"][0]) if n else 0), cols["input_ids"].lengths()
        counts = cols["word_start"].row_sums()
        return (int(cols["word_offset"][0]) if n else 0), counts

    def iter_blocks(self, columns=None, dense=None, shards=None):
        for shard_id in shards if shards is not None else self.shard_ids:
            for rg in range(len(self.row_groups(shard_id))):
                yield self.read_block(shard_id, rg, columns=columns, dense=dense)

    def iter_examples(self, columns=None, dense=None, shards=None):
        """One dict of numpy arrays per row; keys as in docs/design.md ("Python API"), where stored."""
        for block in self.iter_blocks(columns=columns, dense=dense, shards=shards):
            for i in range(block.num_rows):
                yield block.example(i)

    def examples_by_id(self, example_id: int) -> list[dict]:
        """Every row of one example (its sides and mask epochs), reading only the row groups
        whose statistics can contain it."""
        out = []
        for shard_id, record in self._shards.items():
            lo_hi = record.get("example_ids")
            if not lo_hi or not lo_hi[0] <= example_id <= lo_hi[1]:
                continue
            meta = self.parquet_file(shard_id).metadata
            col = meta.schema.to_arrow_schema().get_field_index("example_id")
            for rg in range(meta.num_row_groups):
                stats = meta.row_group(rg).column(col).statistics
                if stats is not None and stats.has_min_max and not stats.min <= example_id <= stats.max:
                    continue
                block = self.read_block(shard_id, rg)
                for i in np.flatnonzero(block.columns["example_id"] == example_id):
                    out.append(block.example(int(i)))
        return out


# Row groups of caches on object storage read at once: their time is the network's, not the CPU's
# (docs/benchmarks.md, "## remote": about 1.5x the throughput of one request at a time at 8).
REMOTE_READS = 8


def read_each(requests, read) -> list:
    """`read(cache, shard, row_group)` for each (cache, shard, row_group), results in the order
    given; concurrently where the caches are on object storage."""
    if sum(1 for cache, _, _ in requests if cache.files.remote is not None) < 2:
        return [read(*request) for request in requests]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(REMOTE_READS, thread_name_prefix="xkd-fetch") as pool:
        return list(pool.map(lambda request: read(*request), requests))


def row_group_span(meta: pq.FileMetaData, row_group: int, columns=None) -> tuple[int, int]:
    """The bytes [start, end) of a Parquet file that hold a row group's column chunks (of
    `columns`, or all of them)."""
    group = meta.row_group(row_group)
    wanted = None if columns is None else {c.split(".")[0] for c in columns}
    start, end = None, 0
    for i in range(group.num_columns):
        chunk = group.column(i)
        if wanted is not None and chunk.path_in_schema.split(".")[0] not in wanted:
            continue
        first = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
        start = first if start is None else min(start, first)
        end = max(end, first + chunk.total_compressed_size)
    return (start or 0), end


def open_cache(path: str | os.PathLike, allow_incomplete: bool = True, fetch: FetchCache | None = None) -> Cache:
    """Open the cache at `path`, a directory or a URL (s3://...), for reading (see docs/design.md,
    "Python API"). A damaged manifest or metadata file is refused; an incomplete cache too
    unless `allow_incomplete` (`cache.completeness` says what is missing). `fetch`: where a
    remote cache's bytes are kept locally (default: FetchCache(), ~/.cache/xkd/remote)."""
    cache = Cache(path, fetch=fetch)
    if not allow_incomplete:
        cache.require_complete()
    return cache
