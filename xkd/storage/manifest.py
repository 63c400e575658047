"""manifest.json: what a cache holds, and the only thing that makes a shard visible.

A shard exists for readers once the manifest lists it as done; files in shards/ that the
manifest does not list are leftovers of an interrupted run and are ignored (and replaced by
the resumed run). The manifest is replaced atomically (temp file, fsync, rename), and holds
no timestamps, so an interrupted-then-resumed run ends with the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path

from ..errors import BadInput, XkdError
from .schema import SCHEMA_VERSION

MANIFEST = "manifest.json"
LOCK = ".lock"
SHARDS = "shards"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cache_key(teacher: dict, corpus: dict, view: dict) -> str:
    """The content-derived identity of a cache: same inputs, same key, same directory.

    Callers put in everything that changes the bytes: teacher weights hash and tokenizer
    hash, the corpus fingerprint, and the view (max length, masking, seed, k, outputs).
    """
    payload = canonical_json({"schema": SCHEMA_VERSION, "teacher": teacher, "corpus": corpus, "view": view})
    return hashlib.sha256(payload).hexdigest()[:16]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write_bytes(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of the cache at `root`, or a clear error saying why it is not a cache."""
    root = Path(root)
    if not root.exists():
        raise BadInput(f"{root}: no such directory. Give the path of a cache directory (one with a {MANIFEST}).")
    path = root / MANIFEST
    if not root.is_dir() or not path.is_file():
        hint = ""
        if root.is_dir():
            found = sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))[:5]
            if found:
                hint = " It contains caches: " + ", ".join(str(p) for p in found) + "."
        raise BadInput(f"{root} is not an xkd cache: it has no {MANIFEST}.{hint}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise XkdError(
            f"{path} is not valid JSON ({e}). xkd only ever replaces the manifest atomically, so "
            "something else changed it; without it the shards cannot be trusted. Delete the cache "
            "directory and re-run the command that made it."
        ) from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise XkdError(f"{path} has no integer schema_version: it is not an xkd manifest.")
    if version > SCHEMA_VERSION:
        raise XkdError(
            f"{path} was written with cache schema version {version}, but this xkd reads versions up "
            f"to {SCHEMA_VERSION}. Upgrade xkd (pip install -U xkd) to read this cache."
        )
    return manifest


class CacheLock:
    """An exclusive, non-blocking lock on a cache directory for the duration of a write.

    flock is released by the kernel when the holder dies, even by SIGKILL, so a killed writer
    never leaves a stale lock behind.
    """

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "CacheLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                holder = self.path.read_text().strip() or "unknown"
                raise XkdError(
                    f"{self.path.parent} is being written by another xkd process ({holder}). Two writers "
                    "on one cache would interleave shards; wait for it to finish, or stop it and re-run "
                    "(the re-run resumes)."
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
