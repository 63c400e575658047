"""The local side of a remote cache: a bounded directory of fetched bytes (train-student's
--cache-dir and --cache-size), shared by every process that reads (DataLoader workers, DDP
ranks, later runs).

Two kinds of entries, both named by content so that an entry can never be stale:
- whole objects (Zarr chunks and metadata), named by the sha256 the manifest records for
  them, and checked against it as they arrive: a flipped remote byte never enters the cache;
- byte ranges of Parquet files (a footer, a row group), named by the file's recorded sha256
  and the range, each followed by the sha256 of its bytes (every Parquet page carries a CRC
  too, but a failed CRC would blame the remote cache, which verify finds sound).
An entry damaged on this disk is fetched again, never read as the cache's data: metadata and
ranges are hashed again on every use; a chunk, whose CRC32C every read checks, on a failed
CRC (reader.Cache._read_dense). The remote cache is the truth.

Entries are written under a temporary name and renamed, so a reader sees a whole entry or
none, also while another process writes the same one. When the directory grows past its
limit, the least recently used entries are removed (a hit touches its entry), down to 80% of
it. Readers hold nothing by name: a range comes back as bytes, and a chunk is opened at once
(files.RemoteFiles.open_chunk, which fetches it again if another process evicted it in
between), and an open file outlives its removal.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from ..errors import BadInput

DEFAULT_LIMIT = 20 * 2**30
PARQUET_FOOTER_BYTES = 64 * 1024  # pyarrow's first read of a footer


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xkd" / "remote"


class Damaged(ValueError):
    """Fetched bytes that do not match the manifest."""


class FetchCache:
    def __init__(self, directory: str | os.PathLike | None = None, limit: int = DEFAULT_LIMIT):
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.limit = int(limit)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInput(f"--cache-dir {self.directory}: cannot create it ({e.strerror or e}); give a directory this "
                           "user may write to.") from None
        self._lock = threading.Lock()
        self._added = 0  # bytes this process added since it last measured the directory
        self._total: int | None = None
        self.hits = self.misses = self.fetched_bytes = 0

    def __reduce__(self):  # DataLoader workers and dask: the same directory, counters start again
        return (FetchCache, (self.directory, self.limit))

    # Whole objects ------------------------------------------------------------------
    def object(self, remote, name: str, size: int, sha256: str, recheck: bool = True) -> str:
        """The local path of object `name`, fetched and checked against `size` and
        `sha256` unless already here. Raises Damaged when the remote bytes differ.
        `recheck=False`: an entry already here is not hashed again; for Zarr chunks, whose
        CRC32C every read checks (a failed one calls `forget_object` and reads again)."""
        path = self._entry("objects", sha256, sha256)
        if self._touch(path):
            if not recheck or _holds(path, size, sha256):
                return str(path)
            self._forget(path)
        data = remote.get(name)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise Damaged(f"{remote.url}/{name} holds {len(data):,} bytes that differ from the manifest's "
                          f"({size:,} bytes, sha256 {sha256[:12]}...)")
        self._store(path, data)
        return str(path)

    # Byte ranges --------------------------------------------------------------------
    def range(self, remote, name: str, sha256: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of object `name` (whose whole content has `sha256`)."""
        path = self._entry("ranges", sha256, f"{sha256}-{int(start)}-{int(end)}")
        if self._touch(path):
            try:
                entry = path.read_bytes()
            except FileNotFoundError:  # removed by another process in between: fetch it again
                entry = b""
            data, digest = entry[:-_DIGEST], entry[-_DIGEST:]
            if len(data) == end - start and hashlib.sha256(data).digest() == digest:
                return data
            self._forget(path)
        data = remote.get_range(name, start, end)
        if len(data) != end - start:
            raise Damaged(f"{remote.url}/{name} is shorter than the manifest records (no bytes {start:,}-{end:,})")
        self._store(path, data + hashlib.sha256(data).digest())
        return data

    # The directory ------------------------------------------------------------------
    def _entry(self, kind: str, sha256: str, name: str) -> Path:
        """Where an entry lives. The sha256 comes from a manifest, which read_manifest checked
        to be 64 hex digits; checked again here, as it names a path."""
        if not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
            raise Damaged(f"{sha256!r} is not a sha256")
        return self.directory / kind / sha256[:2] / name

    def _touch(self, path: Path) -> bool:
        try:
            os.utime(path)
        except FileNotFoundError:
            self.misses += 1
            return False
        self.hits += 1
        return True

    def forget_object(self, sha256: str) -> None:
        """Remove an object's entry (found damaged on this disk), so that it is fetched again."""
        self._entry("objects", sha256, sha256).unlink(missing_ok=True)

    def _forget(self, path: Path) -> None:
        """An entry found damaged (or gone): counted as a miss, removed so it is fetched again."""
        self.hits -= 1
        self.misses += 1
        path.unlink(missing_ok=True)

    def _store(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # no fsync: a lost entry is fetched again, and every use re-checks it
        self.fetched_bytes += len(data)
        with self._lock:
            self._added += len(data)
            if self._total is None or self._total + self._added > self.limit:
                self._evict()

    def _entries(self):
        """(last use, size, path) of every entry, as found (another process may be renaming or
        removing some meanwhile)."""
        for sub in ("objects", "ranges"):
            for dirpath, _, files in os.walk(self.directory / sub):
                for name in files:
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(FileNotFoundError):
                        info = os.stat(path)
                        yield info.st_mtime, info.st_size, path

    def _evict(self) -> None:
        entries = list(self._entries())
        total = sum(size for _, size, _ in entries)
        if total > self.limit:
            for _, size, path in sorted(entries):
                if total <= self.limit * 0.8:
                    break
                try:
                    os.unlink(path)
                    total -= size
                except FileNotFoundError:
                    pass
        self._total, self._added = total, 0

    def size(self) -> int:
        """Bytes in the directory now."""
        return sum(size for _, size, _ in self._entries())


_DIGEST = 32  # bytes of a sha256, after a range entry's bytes


def _holds(path: Path, size: int, sha256: str) -> bool:
    """Whether the entry at `path` is the object of this size and sha256."""
    try:
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except FileNotFoundError:  # removed by another process in between
        return False
    return len(data) == size and hashlib.sha256(data).hexdigest() == sha256


class RangedFile(io.RawIOBase):
    """A remote Parquet file as a seekable file for pyarrow, served from fetched ranges: the
    reader fetches a row group's whole span first (`fetch`), so pyarrow's reads of its column
    chunks are copies from memory. A read outside every fetched range fetches just that range
    (pyarrow's footer reads)."""

    def __init__(self, cache: FetchCache, remote, name: str, size: int, sha256: str, keep: int = 16):
        super().__init__()
        self._cache, self._remote, self._name = cache, remote, name
        self._size, self._sha = size, sha256
        self._pos = 0
        self._lock = threading.Lock()
        self._ranges: OrderedDict[tuple[int, int], bytes] = OrderedDict()  # the last `keep` ranges, in memory
        self._keep = keep
        footer = max(0, size - PARQUET_FOOTER_BYTES)
        self.fetch(footer, size)

    def fetch(self, start: int, end: int) -> None:
        """Hold bytes [start, end) in memory (from the fetch cache, or fetched into it)."""
        start, end = max(0, start), min(self._size, end)
        if end <= start or self._held(start, end) is not None:
            return
        data = self._cache.range(self._remote, self._name, self._sha, start, end)
        with self._lock:  # the loader's read-ahead thread reads while the main thread does
            self._ranges[(start, end)] = data
            while len(self._ranges) > self._keep + 1:  # +1: the footer stays
                oldest = next(k for k in self._ranges if k[1] != self._size)
                del self._ranges[oldest]

    def _held(self, start: int, end: int) -> tuple[int, bytes] | None:
        """(where it starts, its bytes) of a range in memory that holds [start, end)."""
        with self._lock:
            return next(((lo, data) for (lo, hi), data in self._ranges.items() if lo <= start and end <= hi), None)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: offset, 1: self._pos + offset, 2: self._size + offset}[whence]
        return self._pos

    def size(self) -> int:
        return self._size

    def readinto(self, buffer) -> int:
        start = self._pos
        end = min(self._size, start + len(buffer))
        if end <= start:
            return 0
        found = self._held(start, end)
        if found is None:
            self.fetch(start, end)
            found = self._held(start, end)
        lo, data = found
        memoryview(buffer)[: end - start] = data[start - lo : end - lo]
        self._pos = end
        return end - start
