"""bench/gpu.py on a machine without CUDA: one line, exit 0, docs untouched; and its step
clock, which times the trainer's own loop (the GPU numbers rest on it), checked on CPU.

The CPU smoke run of every phase (`python bench/gpu.py --device cpu --quick --no-docs`) takes
about 2.5 minutes on two cores, too long for the suite; it is run by hand (docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, VOCABS

sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402  (bench/gpu.py)

DOCS = ROOT / "docs" / "benchmarks.md"


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_without_cuda_it_prints_one_line_exits_0_and_leaves_the_docs_alone():
    before = digest(DOCS)
    # No GPU visible, even on a machine that has one: the bench must not start there.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    assert lines[0].startswith("gpu bench: no CUDA GPU here") and "nothing measured" in lines[0]
    assert digest(DOCS) == before


def test_the_docs_gpu_section_describes_what_the_bench_measures():
    """docs/benchmarks.md's "## gpu" starts with the description bench/gpu.py writes (its
    placeholder, and every GPU run's section): sizes and targets in the docs are the code's."""
    text = DOCS.read_text()
    assert "\n## gpu\n" in text
    section = text[text.index("\n## gpu\n") + 1:]
    assert section.startswith("\n".join(["## gpu", "", *gpu.what_is_measured()]) + "\n")


class SlowBatches(torch.utils.data.IterableDataset):
    """Batches that take `load_s` each to make, like a loader reading shards."""

    def __init__(self, load_s: float, rows: int = 4, width: int = 6):
        self.load_s, self.rows, self.width = load_s, rows, width

    def __iter__(self):
        while True:
            time.sleep(self.load_s)
            mask = torch.ones(self.rows, self.width, dtype=torch.long)
            mask[0, -2:] = 0  # padding: tokens count only real positions
            yield {"input_ids": torch.zeros(self.rows, self.width, dtype=torch.long), "attention_mask": mask}


def test_the_clock_separates_waiting_for_data_from_the_rest_of_a_step():
    load_s, compute_s, steps, warmup = 0.02, 0.03, 8, 2
    clock = gpu.LoaderClock()
    plain = torch.utils.data.DataLoader
    with gpu.clocked_data_loaders(clock):
        # Built as the trainer builds its loader: through the torch.utils.data attribute.
        loader = torch.utils.data.DataLoader(SlowBatches(load_s), batch_size=None)
        batches = iter(loader)
        for _ in range(steps):
            next(batches)
            time.sleep(compute_s)
    assert torch.utils.data.DataLoader is plain
    assert len(clock.asked) == steps
    summary = clock.summary(warmup)
    assert summary["steps"] == steps - warmup - 1  # the last request has no next one to end its step
    # Sleeps last at least as long as asked; a loaded machine only adds to both.
    assert summary["wait_ms"] >= 1000 * load_s * 0.95
    assert summary["step_ms"] >= summary["wait_ms"] + 1000 * compute_s * 0.95
    assert summary["wait_share"] == pytest.approx(summary["wait_ms"] / summary["step_ms"])
    assert summary["tokens_per_s"] == pytest.approx(summary["rows_per_s"] * (6 - 2 / 4))
    with pytest.raises(RuntimeError, match="too few"):
        clock.summary(steps - 1)


@pytest.mark.slow
def test_a_train_student_run_is_timed_step_by_step(tmp_path):
    """train_run drives the real train_student (on CPU): one clocked `next()` per step."""
    from xkd.storage import CacheWriter, outputs_json, write_shard_files
    from xkd.storage.synthetic import synthetic_rows
    from xkd.vocab import build_vocab

    vocab_file, size = VOCABS / "bert-base-uncased.vocab.txt", 30522
    meta = {"teacher": {"name": str(vocab_file), "vocab_size": size}, "corpus": {"test": "gpu-bench"},
            "view": {}, "outputs": outputs_json(gpu.K, {})}
    cache = tmp_path / "cache"
    with CacheWriter(cache, "gpu-bench", meta, planned_shards=1) as writer:
        rows, _ = synthetic_rows(0, 64, vocab=size, k=gpu.K, max_len=24, langs=("en",))
        writer.commit(write_shard_files(cache, 0, rows, has_topk=True))
    build_vocab([str(vocab_file)], tmp_path / "vocab")
    steps, warmup = 5, 1
    result = gpu.train_run({
        "method": "mergedistill", "cache": str(cache), "vocab": str(tmp_path / "vocab"), "out": str(tmp_path / "out"),
        "steps": steps, "warmup_steps": warmup, "amp": "off", "workers": 0, "batch_size": 4,
        "student": {"hidden": 16, "layers": 1, "heads": 1}, "device": "cpu",
    })
    assert result["steps"] == steps - warmup - 1
    assert 0 <= result["wait_share"] < 1
    assert result["rows_per_s"] == pytest.approx(4 * result["steps_per_s"])
    assert np.isfinite(result["tokens_per_s"]) and result["tokens_per_s"] > result["rows_per_s"]


def test_utilisation_is_averaged_over_the_window_and_the_gpus_it_used(tmp_path, monkeypatch):
    """The sampler reads `nvidia-smi --query-gpu=index,utilization.gpu` (here a stand-in
    script on PATH: GPU 0 at 30%, GPU 1 at 90%) and averages the samples of a window over the
    CUDA devices that window used."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, 30\\n1, 90\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(gpu, "SAMPLE_EVERY_S", 0.02)
    with gpu.UtilisationSampler(["0", "1"]) as sampler:
        start = time.time()
        deadline = start + 10
        while len(sampler.samples) < 3 and time.time() < deadline:
            time.sleep(0.02)
        end = time.time()
    assert len(sampler.samples) >= 3
    assert sampler.mean(start, end) == pytest.approx(30)
    assert sampler.mean(start, end, devices=2) == pytest.approx(60)
    assert sampler.mean(end + 1, end + 2) is None  # no sample in the window
