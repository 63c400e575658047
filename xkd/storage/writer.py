"""The single owner of a cache's manifest during a write.

Workers write shard files with `write_shard_files`; the process holding a `CacheWriter`
(the dask client, in cache-teachers) commits each finished shard's record. Holding the
writer means holding the cache's lock, so two writers on one cache are refused.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from ..durable import atomic_write_bytes
from ..errors import XkdError
from .manifest import MANIFEST, SHARDS, CacheLock, manifest_bytes, pid_alive, read_manifest, write_manifest
from .remote import Remote, RemoteUnavailable, is_url, location
from .schema import SCHEMA_VERSION, DenseSpec
from .untrusted import parse_json, remove_tree

XKD_VERSION = "0.1.0"


def outputs_json(topk_k: int | None, dense_specs: dict[str, DenseSpec], text: bool = False,
                 pairs: bool = False, topk_codec: str = "fp16", sample: int = 0, sample_seed: int = 0) -> dict:
    """The manifest's description of what each row and dense array holds. The q8 codec and the
    draws are recorded only when present, so earlier manifests read the same."""
    topk = None
    if topk_k:
        topk = {"k": topk_k, "ids": "uint32", "logits": "float16", "lognorm": "float32"} if topk_codec == "fp16" \
            else {"k": topk_k, "ids": "uint32", "codec": topk_codec, "codes": "uint8"}
    out = {
        "text": text,
        "pairs": pairs,
        "topk": topk,
        "dense": {name: spec.to_json() for name, spec in sorted(dense_specs.items())},
    }
    if sample:
        out["sample"] = {"n": sample, "seed": sample_seed, "ids": "uint32", "counts": "uint16"}
    return out


class CacheWriter:
    """Create or resume the cache at `root`, whose identity is `key`.

    `meta` is everything the manifest says about the cache besides its shards: teacher,
    corpus, view and outputs (docs/design.md, "The manifest"). Re-opening a cache with the same key resumes it;
    a different key is refused, so settings can never be mixed in one cache silently.

    Resuming re-checks every finished shard's files (sizes and sha256, as `xkd verify` does)
    and forgets the damaged ones, listed in `.damaged`, so the resumed run rewrites them.
    """

    def __init__(self, root: str | os.PathLike, key: str, meta: dict, planned_shards: int | None = None):
        self.root = location(root)
        self.key = key
        self.meta = meta
        self.planned_shards = planned_shards
        # On object storage: a lease object instead of flock, conditional PUTs instead of rename.
        self._store = RemoteManifest(self.root) if is_url(self.root) else LocalManifest(self.root)
        self.manifest: dict = {}
        self.damaged: dict[int, list[str]] = {}

    def __enter__(self) -> "CacheWriter":
        self._store.acquire()
        try:
            self._open()
        except BaseException:
            self._store.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._store.release()

    def _open(self) -> None:
        if self._store.exists():
            manifest = read_manifest(self.root)
            if manifest.get("key") != self.key:
                raise XkdError(
                    f"{self.root} already holds a cache made with other settings (key {manifest.get('key')}, "
                    f"this run's key is {self.key}). Give another --out, or delete that directory to rebuild it."
                )
            self.manifest = manifest
            self._forget_damaged_shards()
        else:
            self.manifest = {
                "schema_version": SCHEMA_VERSION,
                "xkd_version": XKD_VERSION,
                "key": self.key,
                **self.meta,
                "planned_shards": self.planned_shards,
                "complete": False,
                "shards": [],
                "totals": {"rows": 0, "tokens": 0, "masked": 0, "bytes": 0},
            }
            self._store.write(self.manifest)
        self._remove_leftovers()

    def _forget_damaged_shards(self) -> None:
        # Only finished shards have files to check; others are simply done again.
        done = [s for s in self.manifest["shards"] if s["state"] == "done"]
        self.damaged = self._store.damaged(done)
        if self.damaged:
            self.manifest["complete"] = False
            self._write([s for s in self.manifest["shards"] if s["id"] not in self.damaged])

    def _remove_leftovers(self) -> None:
        """What killed or failed attempts left. Safe: we hold the lock, so no other writer is
        active, and only what the manifest does not list is removed."""
        self._store.remove_leftovers([s for s in self.manifest["shards"] if s["state"] == "done"])

    def done_shards(self) -> set[int]:
        return {s["id"] for s in self.manifest["shards"] if s["state"] == "done"}

    def put(self, name: str, data: bytes) -> None:
        """A file beside the manifest that readers do not need (config.yaml, how the cache was
        made), replaced whole."""
        self._store.put(name, data)

    def commit(self, record: dict) -> None:
        """Make a written shard visible: record it in the manifest, atomically."""
        shards = [s for s in self.manifest["shards"] if s["id"] != record["id"]]
        shards.append(record)
        self._write(shards)

    def _write(self, shards: list[dict]) -> None:
        shards.sort(key=lambda s: s["id"])
        self.manifest["shards"] = shards
        self.manifest["totals"] = {
            k: sum(s[k] for s in shards) for k in ("rows", "tokens", "masked", "bytes")
        }
        if self.planned_shards is not None:
            self.manifest["complete"] = len(self.done_shards()) >= self.planned_shards
        self._store.write(self.manifest)

    def finish(self) -> dict:
        """Mark the cache complete (all planned shards, or however many a stream produced).

        Refused while a planned shard is not done: a cache marked complete is trusted by
        every reader, so it must never hide a missing shard."""
        done = self.done_shards()
        planned = self.manifest.get("planned_shards")
        if planned is None:  # a stream: as many as it produced (ids count up from 0)
            planned = max(done, default=-1) + 1
        missing = sorted(set(range(planned)) - done)
        if missing:
            raise XkdError(
                f"{self.root}: cannot mark the cache complete: {len(missing)} of {planned} planned shards are not "
                f"written (first: {missing[0]}). Re-run the command that made it: it resumes."
            )
        self.manifest["planned_shards"] = planned
        self.manifest["complete"] = True
        self._store.write(self.manifest)
        # A worker killed mid-write leaves temp files even when its retried task succeeds;
        # without this a finished cache would differ from an uninterrupted run's.
        self._remove_leftovers()
        return self.manifest


class LocalManifest:
    """A cache in a local directory: flock on .lock, the manifest replaced by rename."""

    def __init__(self, root: Path):
        self.root = root
        self._lock = CacheLock(root)

    def acquire(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SHARDS).mkdir(exist_ok=True)
        self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def exists(self) -> bool:
        return (self.root / MANIFEST).exists()

    def write(self, manifest: dict) -> None:
        write_manifest(self.root, manifest)

    def put(self, name: str, data: bytes) -> None:
        atomic_write_bytes(self.root / name, data)

    def damaged(self, done: list[dict]) -> dict[int, list[str]]:
        from .files import LocalFiles
        from .verify import _check_files

        return {s["id"]: p for s in done if (p := _check_files(LocalFiles(self.root), s))}

    def remove_leftovers(self, done: list[dict]) -> None:
        for path in [*(self.root / SHARDS).glob(".*.tmp-*"), *self.root.glob(f".{MANIFEST}.tmp-*")]:
            remove_tree(path)


class RemoteManifest:
    """A cache on object storage. The manifest is the commit point: every replacement is a
    conditional PUT (If-Match: the ETag this writer last wrote; If-None-Match: * for the
    first), so a manifest changed by anything else is never overwritten. One writer at a
    time holds the lease object (.lock, see Lease)."""

    def __init__(self, url: str):
        self.remote = Remote(url)
        self._lease = Lease(self.remote)
        self._etag: str | None = None

    def acquire(self) -> None:
        self._lease.acquire()

    def release(self) -> None:
        self._lease.release()

    def exists(self) -> bool:
        found = self.remote.get_with_etag(MANIFEST)
        self._etag = found[1] if found else None
        return found is not None

    def write(self, manifest: dict) -> None:
        self._lease.check()
        data = manifest_bytes(manifest)
        etag = self.remote.create(MANIFEST, data) if self._etag is None else self.remote.replace(MANIFEST, data, self._etag)
        if etag is None:
            raise XkdError(
                f"{self.remote.url}/{MANIFEST} was changed by something other than this run while it wrote (another "
                "writer, or a person): nothing of this run was committed over it. Check who else writes this cache, "
                "then run the same command again: it resumes from the manifest as it is now.")
        self._etag = etag

    def put(self, name: str, data: bytes) -> None:
        self._lease.check()
        self.remote.put(name, data)

    def damaged(self, done: list[dict]) -> dict[int, list[str]]:
        """Finished shards whose objects are missing or of another size (`xkd verify` checks
        every byte; a resume checks what a listing shows)."""
        from .files import shard_file

        sizes = self.remote.list(f"{SHARDS}/")
        found = {}
        for record in done:
            problems = []
            for rel, (size, _) in sorted(record["files"].items()):
                actual = sizes.get(shard_file(record, rel))
                if actual is None:
                    problems.append(f"object {rel} is missing")
                elif actual != size:
                    problems.append(f"object {rel} has {actual} bytes, {size} recorded")
            if problems:
                found[record["id"]] = problems
        return found

    def remove_leftovers(self, done: list[dict]) -> None:
        """Objects under shards/ that no finished shard lists: uploads of attempts that failed
        or were killed before their commit, or shards rewritten since."""
        from .files import shard_file

        listed = {shard_file(s, rel) for s in done for rel in s["files"]}
        stray = sorted(name for name in self.remote.list(f"{SHARDS}/") if name not in listed)
        if stray:
            self.remote.delete(stray)


class Lease:
    """The one-writer rule on object storage, where there is no flock: a .lock object created
    with If-None-Match: *, naming its holder and renewed every LEASE_SECONDS / 4 by a
    conditional PUT on its own ETag. Another writer is refused while the lease is fresh; a
    lease not renewed for LEASE_SECONDS (its holder died), or held by a process of this host
    that no longer exists (a killed run, resumed here), is taken over, again conditionally,
    so two newcomers cannot both take it."""

    SECONDS = 60

    def __init__(self, remote: Remote):
        self.remote = remote
        self._etag: str | None = None
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: str | None = None

    def _body(self) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": self._token,
                           "renewed": time.time()}).encode()

    def acquire(self) -> None:
        etag = self.remote.create(LEASE, self._body())
        if etag is None:
            found = self.remote.get_with_etag(LEASE)
            if found is None:  # released between our two requests
                etag = self.remote.create(LEASE, self._body())
            else:
                holder, stale = _lease_holder(found[0], self.SECONDS)
                etag = self.remote.replace(LEASE, self._body(), found[1]) if stale else None
                if etag is None:
                    raise XkdError(
                        f"{self.remote.url} is being written by another xkd process ({holder}). Two writers on one "
                        "cache would interleave shards; wait for it to finish, or stop it and re-run (the re-run "
                        f"resumes; a lease its holder stops renewing expires after {self.SECONDS} s).")
        if etag is None:
            raise XkdError(f"{self.remote.url}: another xkd process took the cache's lease at the same moment; run again.")
        self._etag = etag
        self._thread = threading.Thread(target=self._renew, name="xkd-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.SECONDS / 4):
            try:
                etag = self.remote.replace(LEASE, self._body(), self._etag)
            except XkdError as e:  # the store is unreachable: the next write says so
                self._lost = str(e)
                continue
            if etag is None:
                self._lost = "another process took over this cache's lease (this run looked dead to it)"
                return
            self._etag, self._lost = etag, None

    def check(self) -> None:
        """Before a commit: the lease is still ours."""
        if self._lost and self._lost.startswith("another"):
            raise XkdError(f"{self.remote.url}: {self._lost}; nothing more of this run is committed. Run the same "
                           "command again once the other writer is done: it resumes.")

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            found = self.remote.get_with_etag(LEASE)
            if found is not None and found[1] == self._etag:
                self.remote.delete([LEASE])
        except RemoteUnavailable:
            # Leaving the lease behind is harmless (a re-run here takes over a dead pid's lease at
            # once, elsewhere after SECONDS); raising would replace the error the run is ending with.
            pass


LEASE = ".lock"


def _lease_holder(data: bytes, seconds: float) -> tuple[str, bool]:
    """Who holds a lease (in words), and whether it may be taken over."""
    try:
        lease = parse_json(data)
        pid, host, renewed = int(lease["pid"]), str(lease["host"]), float(lease["renewed"])
    except (ValueError, KeyError, TypeError):
        return "unknown holder", True  # not a lease xkd wrote
    holder = f"pid {pid} on {host}"
    if host == socket.gethostname() and not pid_alive(pid):
        return holder, True
    return holder, time.time() - renewed > seconds

