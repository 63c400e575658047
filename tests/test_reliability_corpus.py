"""A corpus that changes during a run never gets into its cache (issue #11, item 1).

The cache key names the corpus bytes planning read. Every shard task proves it reads those
bytes (the sha256 of each file's byte range, recorded in the plan) before it computes
anything, so a file rewritten mid-run fails the shards whose bytes changed, naming the file,
and commits nothing for them; the shards cached before stay valid, and a re-run with the
restored file finishes the cache to the bytes of an uninterrupted run.

The fault is injected deterministically, with no hook in xkd: the test's one-thread dask
worker is held busy by a gate task, so the run's shard tasks wait in its queue until the test
has rewritten the file, and then all read the new bytes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xkd import open_cache
from xkd.cli import app

from conftest import PARALLEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHARD = 8
PAIRS = 40  # 5 shards: the rewrite below changes only the bytes of shards 2-4


def cache_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def gate(started: str, release: str) -> None:
    """Occupies the worker's one thread until `release` exists."""
    Path(started).touch()
    deadline = time.time() + 300
    while not os.path.exists(release) and time.time() < deadline:
        time.sleep(0.02)


def xkd_tasks(dask_scheduler) -> int:
    """Shard tasks waiting for a worker (an earlier run's finished ones do not count)."""
    return sum(str(key).startswith("xkd-") and ts.state in ("queued", "processing", "waiting", "no-worker")
               for key, ts in dask_scheduler.tasks.items())


def wait_until(condition, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def corpus(tmp_path):
    """40 aligned English-Hindi Tatoeba pairs in files of the test's own."""
    tatoeba = PARALLEL / "tatoeba"
    en = (tatoeba / "tatoeba.hin-eng.eng").read_bytes().split(b"\n")[:PAIRS]
    hi = (tatoeba / "tatoeba.hin-eng.hin").read_bytes().split(b"\n")[:PAIRS]
    assert all(en) and all(hi)
    (tmp_path / "c.en").write_bytes(b"".join(line + b"\n" for line in en))
    (tmp_path / "c.hi").write_bytes(b"".join(line + b"\n" for line in hi))
    return tmp_path / "c.en", tmp_path / "c.hi"


def test_a_corpus_file_rewritten_mid_run_commits_none_of_its_new_bytes(thread_client, tiny_teachers, corpus, tmp_path):
    en, hi = corpus
    original_hi = hi.read_bytes()

    def command(out: Path) -> list[str]:
        return ["cache-teachers", "--teacher", str(tiny_teachers["multi"]), "--corpus", f"parallel:{en}@en,{hi}@hi",
                "--out", str(out), "--shard-size", str(SHARD), "--topk", "4", "--scheduler",
                thread_client.scheduler.address, "--json"]

    runner = CliRunner()
    reference = runner.invoke(app, command(tmp_path / "reference"))
    assert reference.exit_code == 0, reference.output
    [ref_info] = json.loads(reference.stdout.strip().split("\n")[-1])["caches"]
    assert ref_info["shards"] == PAIRS // SHARD

    # Hold the worker, start the run, and rewrite the Hindi file once its shards are queued:
    # the lines of shards 2-4 in reverse order within each shard. Every shard still starts
    # and ends at the same byte, so only the bytes themselves show the pairs are misaligned.
    started, release = tmp_path / "gate-started", tmp_path / "gate-release"
    held = thread_client.submit(gate, str(started), str(release), pure=False)
    wait_until(started.exists, "the gate task to hold the worker")
    outcome = {}
    run = threading.Thread(target=lambda: outcome.setdefault("result", runner.invoke(app, command(tmp_path / "out"))))
    run.start()
    try:
        wait_until(lambda: thread_client.run_on_scheduler(xkd_tasks) == PAIRS // SHARD, "the run's shard tasks")
        lines = original_hi.split(b"\n")[:PAIRS]
        for start in range(2 * SHARD, PAIRS, SHARD):
            lines[start : start + SHARD] = lines[start : start + SHARD][::-1]
        hi.write_bytes(b"".join(line + b"\n" for line in lines))
    finally:
        release.touch()
        run.join(timeout=300)
        held.result()
    result = outcome["result"]

    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"{hi} changed after the run read it" in result.stderr
    assert "Nothing was cached for this shard" in result.stderr and "restore the corpus" in result.stderr
    root = tmp_path / "out" / Path(ref_info["path"]).name
    manifest = json.loads((root / "manifest.json").read_text())
    assert [s["id"] for s in manifest["shards"]] == [0, 1]  # the shards whose bytes did not change
    assert sorted({p.name.split(".")[0] for p in (root / "shards").iterdir()}) == ["00000", "00001"]
    en_lines = en.read_text(encoding="utf-8").split("\n")
    hi_lines = original_hi.decode("utf-8").split("\n")
    for row in open_cache(root).iter_examples():  # every cached pair is an original, aligned pair
        src, tgt = (row["text"], row["pair_text"]) if row["side"] == "src" else (row["pair_text"], row["text"])
        assert (src, tgt) == (en_lines[row["example_id"]], hi_lines[row["example_id"]])
    verify = runner.invoke(app, ["verify", str(root), "--json"])
    report = json.loads(verify.stdout.strip().split("\n")[-1])
    assert report["problems"] == {} and verify.exit_code in (0, 3), verify.output  # sound, not yet complete

    hi.write_bytes(original_hi)
    resumed = runner.invoke(app, command(tmp_path / "out"))
    assert resumed.exit_code == 0, resumed.output
    [info] = json.loads(resumed.stdout.strip().split("\n")[-1])["caches"]
    assert info["shards_run"] == 3 and info["complete"]
    assert cache_bytes(root) == cache_bytes(Path(ref_info["path"]))
