"""Where a cache's files are: a local directory, or a prefix on object storage whose bytes
come through the bounded local fetch cache (fetch.py). Readers and verify ask for files by
their names relative to the cache root and see the same checks either way.

A shard's files live under shards/, or, for shards written to object storage, under
shards/<shard>-<digest>/ (the record's `dir`): an object store cannot rename, so a shard is
uploaded under a name made of its content, which no retry of another content can take, and
becomes visible only when the manifest lists it (writer.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from .fetch import Damaged, FetchCache, RangedFile
from .manifest import SHARDS
from .remote import Remote, is_url
from .shard import sha256_file


def shard_file(record: dict, rel: str) -> str:
    """The name, relative to the cache root, of a shard's file `rel` (a key of its `files`)."""
    folder = record.get("dir")
    return f"{SHARDS}/{folder}/{rel}" if folder else f"{SHARDS}/{rel}"


class LocalFiles:
    remote = None

    def __init__(self, root: Path):
        self.root = Path(root)

    def where(self, name: str) -> str:
        return str(self.root / name)

    def checked(self, name: str, size: int, sha256: str) -> str:
        """The local path of `name` once its size and sha256 match the manifest's
        (FileNotFoundError when missing, Damaged when different)."""
        path = self.root / name
        actual = os.stat(path).st_size
        if actual != size:
            raise Damaged(f"{path} has {actual} bytes, the manifest records {size}")
        if sha256_file(path) != sha256:
            raise Damaged(f"{path} differs from the manifest (sha256)")
        return str(path)

    def parquet(self, name: str, size: int, sha256: str):
        """What pq.ParquetFile reads; the size is checked here, pages by their CRCs."""
        path = self.root / name
        actual = os.stat(path).st_size
        if actual != size:
            raise Damaged(f"{path.name} has {actual} bytes, the manifest records {size}")
        return str(path)

    def measure(self, name: str) -> tuple[int, str]:
        """(size, sha256) of `name` as stored; FileNotFoundError when missing."""
        path = self.root / name
        if not path.is_file():
            raise FileNotFoundError(path)
        return path.stat().st_size, sha256_file(path)


class RemoteFiles:
    def __init__(self, url: str, fetch: FetchCache | None = None):
        self.remote = Remote(url)
        self.fetch = fetch or FetchCache()

    def where(self, name: str) -> str:
        return self.remote.child(name)

    def checked(self, name: str, size: int, sha256: str) -> str:
        return self.fetch.object(self.remote, name, size, sha256)

    def parquet(self, name: str, size: int, sha256: str):
        return RangedFile(self.fetch, self.remote, name, size, sha256)

    def open_chunk(self, name: str, size: int, sha256: str):
        """A Zarr chunk, fetched (checked whole) into the fetch cache unless there, opened for
        reading: once open, another process evicting it cannot take it away. It is not hashed
        again on a hit: its CRC32C is checked as it is read."""
        for attempt in range(3):
            try:
                return open(self.fetch.object(self.remote, name, size, sha256, recheck=False), "rb", buffering=0)
            except FileNotFoundError:  # evicted by another process between the two: fetch it again
                if attempt == 2:
                    raise

    def measure(self, name: str) -> tuple[int, str]:
        import hashlib

        data = self.remote.get(name)
        return len(data), hashlib.sha256(data).hexdigest()


def files_of(root, fetch: FetchCache | None = None) -> "LocalFiles | RemoteFiles":
    return RemoteFiles(str(root), fetch) if is_url(root) else LocalFiles(Path(root))
