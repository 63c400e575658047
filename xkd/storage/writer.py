"""The single owner of a cache's manifest during a write.

Workers write shard files with `write_shard_files`; the process holding a `CacheWriter`
(the dask client, in cache-teachers) commits each finished shard's record. Holding the
writer means holding the cache's lock, so two writers on one cache are refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import XkdError
from .manifest import MANIFEST, SHARDS, CacheLock, read_manifest, write_manifest
from .schema import SCHEMA_VERSION, DenseSpec
from .untrusted import remove_tree

XKD_VERSION = "0.1.0"


def outputs_json(topk_k: int | None, dense_specs: dict[str, DenseSpec], text: bool = False,
                 pairs: bool = False) -> dict:
    """The manifest's description of what each row and dense array holds."""
    return {
        "text": text,
        "pairs": pairs,
        "topk": (
            {"k": topk_k, "ids": "uint32", "logits": "float16", "lognorm": "float32"} if topk_k else None
        ),
        "dense": {name: spec.to_json() for name, spec in sorted(dense_specs.items())},
    }


class CacheWriter:
    """Create or resume the cache at `root`, whose identity is `key`.

    `meta` is everything the manifest says about the cache besides its shards: teacher,
    corpus, view and outputs (see DESIGN.md). Re-opening a cache with the same key resumes it;
    a different key is refused, so settings can never be mixed in one cache silently.

    Resuming re-checks every finished shard's files (sizes and sha256, as `xkd verify` does)
    and forgets the damaged ones, listed in `.damaged`, so the resumed run rewrites them.
    """

    def __init__(self, root: str | os.PathLike, key: str, meta: dict, planned_shards: int | None = None):
        self.root = Path(root)
        self.key = key
        self.meta = meta
        self.planned_shards = planned_shards
        self._lock = CacheLock(self.root)
        self.manifest: dict = {}
        self.damaged: dict[int, list[str]] = {}

    def __enter__(self) -> "CacheWriter":
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / SHARDS).mkdir(exist_ok=True)
        self._lock.acquire()
        try:
            self._open()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def _open(self) -> None:
        if (self.root / MANIFEST).exists():
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
            write_manifest(self.root, self.manifest)
        self._remove_leftovers()

    def _forget_damaged_shards(self) -> None:
        from .verify import _check_files

        # Only finished shards have files to check; others are simply done again.
        done = [s for s in self.manifest["shards"] if s["state"] == "done"]
        self.damaged = {s["id"]: p for s in done if (p := _check_files(self.root, s))}
        if self.damaged:
            self.manifest["complete"] = False
            self._write([s for s in self.manifest["shards"] if s["id"] not in self.damaged])

    def _remove_leftovers(self) -> None:
        """Temp files of a killed run. Safe: we hold the lock, so no other writer is active."""
        leftovers = [*(self.root / SHARDS).glob(".*.tmp-*"), *self.root.glob(f".{MANIFEST}.tmp-*")]
        for path in leftovers:
            remove_tree(path)

    def done_shards(self) -> set[int]:
        return {s["id"] for s in self.manifest["shards"] if s["state"] == "done"}

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
        write_manifest(self.root, self.manifest)

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
        write_manifest(self.root, self.manifest)
        # A worker killed mid-write leaves temp files even when its retried task succeeds;
        # without this a finished cache would differ from an uninterrupted run's.
        self._remove_leftovers()
        return self.manifest
