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

import numpy as np

from ..errors import BadInput, XkdError
from .completeness import finish_command
from .schema import ALIGNS, CODECS, LAYOUTS, SCHEMA_VERSION

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
    """The manifest of the cache at `root`, or a clear error saying why it is not a cache.

    Everything readers rely on is checked here, once, so that a damaged or hand-edited
    manifest is one paragraph naming the file in every command, never a KeyError deep in
    a reader.
    """
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
        raise BadInput(f"{path} is not valid JSON ({e}). {_restore(root, None)}") from None
    except OSError as e:
        raise BadInput(f"{path} cannot be read ({e.strerror or e}).") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadInput(f"{path} has no integer schema_version: it is not an xkd manifest. {_restore(root, manifest)}")
    if version > SCHEMA_VERSION:
        raise XkdError(
            f"{path} was written with cache schema version {version}, but this xkd reads versions up "
            f"to {SCHEMA_VERSION}. Upgrade xkd (pip install -U xkd) to read this cache."
        )
    problem = manifest_problem(manifest)
    if problem:
        raise BadInput(f"{path} is not a valid xkd manifest: {problem}. {_restore(root, manifest)}")
    return manifest


def _restore(root: Path, manifest) -> str:
    """What to do about a bad manifest. xkd writes it only through atomic_write_bytes, so a
    bad one was changed by something else, and nothing in the shards can be trusted without
    it. The command that made the cache is quoted when the rest of the manifest records it."""
    command = None
    if isinstance(manifest, dict):
        try:
            command = finish_command(root, manifest)
        except Exception:  # a hint from a damaged manifest must never become another error
            command = None
    rerun = f" (`{command}`)" if command else ""
    return (
        "xkd only ever replaces the manifest atomically, so something else changed it, and without a sound "
        f"manifest the shards cannot be trusted. Delete the cache directory and re-run the command that made it{rerun}. "
        "(Or restore manifest.json from a copy, if you have one.)"
    )


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a parsed manifest's structure, in words; None if nothing."""
    for name in ("teacher", "corpus", "view", "outputs", "totals"):
        if manifest.get(name) is not None and not isinstance(manifest[name], dict):
            return f"`{name}` is not an object"
    planned = manifest.get("planned_shards")
    if planned is not None and not _is_int(planned):
        return f"`planned_shards` is {planned!r}, not a shard count"
    if not isinstance(manifest.get("complete", False), bool):
        return f"`complete` is {manifest['complete']!r}, not true or false"
    problem = _outputs_problem(manifest.get("outputs") or {})
    if problem:
        return problem
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "it has no `shards` list" if shards is None else "`shards` is not a list"
    seen: set[int] = set()
    for i, record in enumerate(shards):
        where = f"`shards` entry {i}"
        if not isinstance(record, dict):
            return f"{where} is not an object"
        if not _is_int(record.get("id")):
            return f"{where} has no shard id"
        where = f"the entry of shard {record['id']}"
        if record["id"] in seen:
            return f"shard {record['id']} is listed twice"
        seen.add(record["id"])
        if not isinstance(record.get("state"), str):
            return f"{where} has no state"
        for field in ("rows", "tokens", "masked", "bytes"):
            if not _is_int(record.get(field)):
                return f"{where} has no count `{field}`"
        if record["state"] != "done":
            continue  # only finished shards are read; an unfinished one counts as missing
        files = record.get("files")
        if not isinstance(files, dict) or not files or not isinstance(record.get("sha256"), str):
            return f"{where} lacks its file list or sha256"
        for name, entry in files.items():
            if not (isinstance(entry, list) and len(entry) == 2 and _is_int(entry[0]) and isinstance(entry[1], str)):
                return f"{where} records file {name} as {entry!r}, not [size, sha256]"
            if name.startswith("/") or ".." in name.split("/"):
                return f"{where} names file {name}, which lies outside the cache"
        for field in ("bytes_by_output", "langs"):
            value = record.get(field)
            if value is not None and not (isinstance(value, dict) and all(_is_int(v) for v in value.values())):
                return f"{where} has a `{field}` that is not an object of counts"
    return None


def _outputs_problem(outputs: dict) -> str | None:
    topk = outputs.get("topk")
    if topk is not None and not (isinstance(topk, dict) and _is_int(topk.get("k"), 1)):
        return f"`outputs.topk` is {topk!r}, not {{\"k\": K, ...}}"
    dense = outputs.get("dense") or {}
    if not isinstance(dense, dict):
        return "`outputs.dense` is not an object"
    for name, spec in dense.items():
        if not (isinstance(spec, dict) and spec.get("align") in ALIGNS and _is_int(spec.get("dim"), 1)
                and isinstance(spec.get("dtype"), str)):
            return f"`outputs.dense.{name}` is {spec!r}, not {{\"align\": row|token|word, \"dim\": N, \"dtype\": ...}}"
        try:
            np.dtype(spec["dtype"])
        except TypeError:
            return f"`outputs.dense.{name}` has dtype {spec['dtype']!r}, which is not a numpy dtype"
        if spec.get("codec", "zstd") not in CODECS:
            return f"`outputs.dense.{name}` has codec {spec['codec']!r}, not one of {', '.join(CODECS)}"
        layout = spec.get("layout", "padded")
        if layout not in LAYOUTS:
            return f"`outputs.dense.{name}` has layout {layout!r}, not one of {', '.join(LAYOUTS)}"
        if layout == "keys" and not (spec["align"] == "token" and _is_int(spec.get("heads"), 1)
                                     and spec["dim"] % spec["heads"] == 0):
            return f"`outputs.dense.{name}` has the keys layout without token alignment and heads dividing its dim"
    return None


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
