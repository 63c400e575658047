"""Sampled KD targets (random-sampling KD, Anshumann et al. 2025): the estimator is unbiased,
the stored runs round-trip, and bad requests are refused before any work.

The unbiasedness test draws with the code the pipeline runs (xkd.sampling) and the loss the
students train with (losses.sampled_cross_entropy), and compares the mean gradient over many
seeds with the full-distribution gradient q − p computed in float64 from the formula. Its
tolerance is the estimator's own standard error, computed from p: Var(p̂_j) = p_j(1 − p_j)/N
per draw set, so the mean over S seeds has standard deviation sqrt(p_j(1 − p_j)/(N·S)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xkd.cli import app
from xkd.sampling import draw_uniforms, expand, inverse_cdf, positions_of, runs
from xkd.student.losses import distillation_cross_entropy, sampled_cross_entropy

from conftest import TATOEBA

VOCAB = 40
POSITIONS = 3
N = 8
SEEDS = 3000
SIGMAS = 5.0  # per coordinate; 120 coordinates: a false alarm about once in 30,000 runs


def sampled_gradient(teacher_logits: torch.Tensor, student_logits: torch.Tensor, seed: int) -> torch.Tensor:
    """d loss / d z_S for one set of N draws per position, as a student would get it."""
    uniforms = np.concatenate([draw_uniforms(seed, m, 1, 0, 1, N) for m in range(POSITIONS)])
    ids, counts = runs(inverse_cdf(teacher_logits, torch.from_numpy(uniforms)).numpy())
    z = student_logits.clone().requires_grad_(True)
    logp = torch.log_softmax(z.double(), -1)
    loss = sampled_cross_entropy(logp, torch.from_numpy(positions_of(counts, N)), torch.from_numpy(ids.astype(np.int64)),
                                 torch.from_numpy(counts / N))
    loss.backward()
    return z.grad.double() * POSITIONS  # the loss is a mean over positions


def test_the_mean_sampled_gradient_converges_to_the_full_distribution_gradient():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(POSITIONS, VOCAB, generator=g) * 2.5  # peaked, yet with a real tail
    student = torch.randn(POSITIONS, VOCAB, generator=g)
    p = torch.softmax(teacher.double(), -1)
    q = torch.softmax(student.double(), -1)
    full = q - p  # d/dz_S of −Σ p log softmax(z_S), per position
    mean = sum(sampled_gradient(teacher, student, seed) for seed in range(SEEDS)) / SEEDS
    stderr = torch.sqrt(p * (1 - p) / (N * SEEDS))
    tolerance = SIGMAS * stderr + 1e-12
    assert torch.all((mean - full).abs() <= tolerance), float(((mean - full).abs() / tolerance).max())
    # The test can fail: the renormalised top-8 target's gradient is off by far more than that.
    z = student.clone().requires_grad_(True)
    values, top = teacher.topk(8, dim=-1)
    distillation_cross_entropy(z, values, topk_ids=top).backward()
    assert ((z.grad.double() * POSITIONS - full).abs() > tolerance).any()


def test_draws_follow_the_teacher_and_round_trip_through_runs():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 30, generator=g) * 3
    logits[:, 7] = -1e4  # a token whose probability underflows is never drawn
    uniforms = np.concatenate([draw_uniforms(3, 11, 2, m, 1, 64) for m in range(5)])
    ids = inverse_cdf(logits, torch.from_numpy(uniforms)).numpy()
    assert (np.diff(ids, axis=1) >= 0).all() and not (ids == 7).any()
    distinct, counts = runs(ids)
    assert np.array_equal(expand(distinct, counts, 64), ids)
    assert np.array_equal(np.bincount(positions_of(counts, 64), weights=counts), [64] * 5)
    # Each draw of u lies in its id's interval of the float64 cumulative distribution.
    cdf = np.cumsum(torch.softmax(logits.double(), -1).numpy(), axis=-1)
    below = np.where(ids > 0, np.take_along_axis(cdf, np.maximum(ids - 1, 0), 1), 0.0)
    assert (below <= uniforms + 1e-6).all() and (uniforms <= np.take_along_axis(cdf, ids, 1) + 1e-6).all()
    # A row's draws depend on its seed material only.
    assert not np.array_equal(draw_uniforms(3, 11, 2, 0, 1, 64), draw_uniforms(4, 11, 2, 0, 1, 64))


@pytest.mark.parametrize("args, says", [
    (["--sample", "16", "--no-mask"], "--sample draws at masked positions"),
    (["--topk", "0", "--topk-codec", "q8"], "--topk-codec chooses how top-k is stored"),
    (["--sample", "2000"], "--sample 2000"),
])
def test_sample_requests_that_cannot_work_are_refused(tmp_path, args, says):
    r = CliRunner().invoke(app, ["cache-teachers", "--teacher", "bert-base", "--corpus", TATOEBA, "--out", str(tmp_path),
                                 *args])
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output


def test_verify_checks_that_each_positions_counts_add_up_to_n(tmp_path):
    """A shard whose draws do not sum to N at a position (written whole, checksums and all) is
    damaged; the same rows with their counts intact are sound."""
    from xkd.storage import CacheWriter, outputs_json, write_shard_files
    from xkd.storage.schema import Ragged
    from xkd.storage.synthetic import synthetic_draws, synthetic_rows

    rows = synthetic_rows(0, 20, vocab=500, k=4)[0]
    plain = {name: col for name, col in rows.items() if name not in ("topk_ids", "topk_logits", "lognorm")}
    draws = synthetic_draws(rows, N, vocab=500)
    assert np.array_equal(draws["sample_counts"].row_sums(), rows["masked_positions"].lengths() * N)
    counts = draws["sample_counts"].values.copy()
    counts[3] += 1
    for name, sample_counts in (("sound", draws["sample_counts"]), ("bad", Ragged(counts, draws["sample_counts"].offsets))):
        root = tmp_path / name
        with CacheWriter(root, name, {"outputs": outputs_json(None, {}, sample=N)}, planned_shards=1) as writer:
            writer.commit(write_shard_files(root, 0, {**plain, **draws, "sample_counts": sample_counts}, has_sample=True))
            writer.finish()
        r = CliRunner().invoke(app, ["verify", str(root)])
        if name == "sound":
            assert r.exit_code == 0, r.output
        else:
            assert r.exit_code == 1 and f"sample_counts do not sum to {N} per masked position" in r.output, r.output
