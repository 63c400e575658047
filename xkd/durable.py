"""Durable writes: a file replaced so that a reader, or a kill at any instant, sees the old
bytes or the new ones, never half of them; and a directory's entries flushed so that a rename
survives a power loss.

A leaf: it imports nothing of xkd, so every layer (storage, vocab, student, evaluation) may
use it (tools/check_layers.py).
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries: a file created or renamed in it is only durable after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` under a temporary name beside `path`, fsync it, rename it over `path`,
    then fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
