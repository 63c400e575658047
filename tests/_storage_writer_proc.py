"""A cache writer that tests kill with SIGKILL (tests/test_storage_crash.py).

    python tests/_storage_writer_proc.py ROOT N_SHARDS [--pause-before STEP --pause-shard S]

writes N_SHARDS synthetic shards (data seeded by shard id) the way cache-teachers does:
CacheWriter + write_shard_files + commit, skipping shards already done. With --pause-before,
it freezes just before STEP of shard S and prints `paused <STEP> <S> pid <PID>`, so a test
can kill it at an exact instant; without it, a test kills it at random times.

STEP is one of (in the order a shard is written):
  zarr-rename      both temp files are complete, nothing renamed yet
  parquet-rename   the Zarr group has its final name, the Parquet file is still temp
  commit           both final files exist, the manifest does not list the shard
  manifest-replace the new manifest is written to its temp name, not yet renamed
The freeze wraps os.rename/os.replace as the storage modules and xkd.durable (which replaces
the manifest) see them; nothing else of the storage code is replaced.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from xkd.storage import CacheWriter, DenseSpec, cache_key, outputs_json, write_shard_files
from xkd.storage.synthetic import synthetic_rows

K = 8
ROWS_PER_SHARD = 120
ROW_GROUP_SIZE = 50
DENSE_SPECS = {
    "hidden.1": DenseSpec("hidden.1", "token", 16),
    "cls": DenseSpec("cls", "row", 16, "float32"),
}
KEY = cache_key({"name": "synthetic-teacher"}, {"spec": "synthetic"}, {"k": K, "seed": 0})


def write_cache(root: str | os.PathLike, n_shards: int, before_commit=None) -> list[int]:
    """Write (or resume) the cache; the ids of the shards this call wrote."""
    meta = {"teacher": {"name": "synthetic-teacher"}, "outputs": outputs_json(K, DENSE_SPECS)}
    written = []
    with CacheWriter(root, KEY, meta, planned_shards=n_shards) as writer:
        for shard_id in range(n_shards):
            if shard_id in writer.done_shards():
                continue
            rows, dense = synthetic_rows(
                shard_id, ROWS_PER_SHARD, k=K, first_example_id=shard_id * ROWS_PER_SHARD,
                max_len=64, dense_specs=DENSE_SPECS,
            )
            record = write_shard_files(root, shard_id, rows, dense, DENSE_SPECS, has_topk=True,
                                       row_group_size=ROW_GROUP_SIZE)
            if before_commit:
                before_commit(shard_id)
            writer.commit(record)
            written.append(shard_id)
        writer.finish()
    return written


def _freeze(step: str, shard_id: int) -> None:
    print(f"paused {step} {shard_id} pid {os.getpid()}", flush=True)
    while True:
        time.sleep(60)


class _FreezingOs:
    """os as xkd.storage.shard and xkd.durable see it, freezing before one rename."""

    def __init__(self, step: str, shard_id: int, state: dict):
        self.step, self.shard_id, self.state = step, shard_id, state

    def __getattr__(self, name):
        return getattr(os, name)

    def _maybe_freeze(self, dst) -> None:
        name = Path(dst).name
        stem = f"{self.shard_id:05d}"
        if (
            (self.step == "zarr-rename" and name == f"{stem}.zarr")
            or (self.step == "parquet-rename" and name == f"{stem}.parquet")
            or (self.step == "manifest-replace" and name == "manifest.json" and self.state.get("committing"))
        ):
            _freeze(self.step, self.shard_id)

    def rename(self, src, dst):
        self._maybe_freeze(dst)
        return os.rename(src, dst)

    def replace(self, src, dst):
        self._maybe_freeze(dst)
        return os.replace(src, dst)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("n_shards", type=int)
    parser.add_argument("--pause-before", choices=["zarr-rename", "parquet-rename", "commit", "manifest-replace"])
    parser.add_argument("--pause-shard", type=int, default=0)
    args = parser.parse_args()
    state: dict = {}
    before_commit = None
    if args.pause_before == "commit":
        def before_commit(shard_id):
            if shard_id == args.pause_shard:
                _freeze("commit", shard_id)
    elif args.pause_before:
        import xkd.durable as durable_module
        import xkd.storage.shard as shard_module

        freezing = _FreezingOs(args.pause_before, args.pause_shard, state)
        shard_module.os = durable_module.os = freezing

        def before_commit(shard_id):
            state["committing"] = shard_id == args.pause_shard
    # Load what the shard writer imports lazily (zarr; pandas, through pyarrow's string
    # conversion) before "ready", so random kill times spread over writing, not importing.
    with tempfile.TemporaryDirectory() as warm_up:
        rows, dense = synthetic_rows(0, 2, k=K, dense_specs=DENSE_SPECS)
        write_shard_files(warm_up, 0, rows, dense, DENSE_SPECS, has_topk=True)
    print(f"ready pid {os.getpid()}", flush=True)
    written = write_cache(args.root, args.n_shards, before_commit)
    print("done " + " ".join(map(str, written)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
