"""A writer killed with SIGKILL leaves no partial shard visible, and resuming it ends with the
same bytes as an uninterrupted run. The writer is a real process (tests/_storage_writer_proc.py)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import xkd
from xkd.errors import XkdError
from xkd.storage import CacheWriter, verify_cache

SCRIPT = Path(__file__).with_name("_storage_writer_proc.py")
N_SHARDS = 4
_spec = importlib.util.spec_from_file_location("_storage_writer_proc", SCRIPT)
proc_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proc_module)


def cache_files(root: Path) -> dict[str, bytes]:
    """Everything a reader or a resumed writer sees: manifest.json and all of shards/."""
    files = {"manifest.json": (root / "manifest.json").read_bytes()}
    for path in sorted((root / "shards").rglob("*")):
        if path.is_file():
            files[str(path.relative_to(root))] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's files, and how long its writing took (to aim the random kills)."""
    root = tmp_path_factory.mktemp("reference") / "c"
    proc = start_writer(root)
    wait_for_line(proc, "ready")
    start = time.perf_counter()
    assert wait_for_line(proc, "done") == "done " + " ".join(map(str, range(N_SHARDS)))
    writing_s = time.perf_counter() - start
    assert proc.wait() == 0
    proc.stdout.close()
    proc.stderr.close()
    return cache_files(root), writing_s


def start_writer(root: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(N_SHARDS), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, prefix: str) -> str:
    while True:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer exited before {prefix!r}: {proc.wait()} {proc.stderr.read()}")
        if line.startswith(prefix):
            return line.strip()


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def assert_only_complete_shards_visible(root: Path, reference_files: dict) -> list[int]:
    """What a reader sees after the kill: only committed shards, each byte-identical to the
    uninterrupted run's and readable in full."""
    if not (root / "manifest.json").exists():  # killed before the cache existed
        assert not any((root / "shards").rglob("*.parquet")) if (root / "shards").exists() else True
        return []
    cache = xkd.open_cache(root)
    done = cache.shard_ids
    assert done == list(range(len(done)))
    for shard_id in done:
        for rel in cache.shard(shard_id)["files"]:
            assert (root / "shards" / rel).read_bytes() == reference_files[f"shards/{rel}"], rel
    ids = [int(e["example_id"]) for e in cache.iter_examples()]
    assert ids == list(range(len(done) * proc_module.ROWS_PER_SHARD))
    report = verify_cache(root)
    # The committed shards are sound; a killed run leaves the cache incomplete, not ok.
    assert report["problems"] == {} and report["shards_checked"] == len(done), report
    assert report["status"] == ("ok" if report["complete"] else "incomplete"), report
    return done


def resume_and_compare(root: Path, done: list[int], reference_files: dict) -> None:
    written = proc_module.write_cache(root, N_SHARDS)
    assert written == [s for s in range(N_SHARDS) if s not in done]  # done shards are skipped
    assert cache_files(root) == reference_files
    leftovers = [p.name for p in [*root.iterdir(), *(root / "shards").iterdir()] if ".tmp-" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("step", ["zarr-rename", "parquet-rename", "commit", "manifest-replace"])
def test_writer_killed_at_each_step_of_a_shard(tmp_path, reference, step):
    reference_files, _ = reference
    root = tmp_path / "c"
    proc = start_writer(root, "--pause-before", step, "--pause-shard", "2")
    try:
        paused = wait_for_line(proc, "paused")
        assert paused == f"paused {step} 2 pid {proc.pid}"
        # While it is frozen, it holds the cache: a second writer is refused, naming it.
        with pytest.raises(XkdError, match=rf"being written by another xkd process \(pid {proc.pid} on "):
            with CacheWriter(root, proc_module.KEY, {}):
                pass
    finally:
        kill(proc)
    done = assert_only_complete_shards_visible(root, reference_files)
    assert done == [0, 1]
    shards = root / "shards"
    partial = sorted(p.name for p in shards.iterdir() if p.name.startswith((".00002", "00002")))
    expected_partial = {
        "zarr-rename": [".00002.parquet", ".00002.zarr"],
        "parquet-rename": [".00002.parquet", "00002.zarr"],
        "commit": ["00002.parquet", "00002.zarr"],
        "manifest-replace": ["00002.parquet", "00002.zarr"],
    }[step]
    assert [name.split(".tmp-")[0] for name in partial] == expected_partial
    if step == "manifest-replace":
        assert [p.name.split("-")[0] for p in root.glob(".manifest.json.tmp-*")] == [".manifest.json.tmp"]
    resume_and_compare(root, done, reference_files)


def test_writer_killed_at_random_instants(tmp_path, reference):
    reference_files, uninterrupted_s = reference
    rng = np.random.default_rng(0)
    for attempt in range(4):
        root = tmp_path / f"c{attempt}"
        proc = start_writer(root)
        wait_for_line(proc, "ready")
        time.sleep(rng.uniform(0, uninterrupted_s))
        kill(proc)
        done = assert_only_complete_shards_visible(root, reference_files)
        resume_and_compare(root, done, reference_files)
