"""Sampled KD targets (random-sampling KD: Anshumann et al. 2025, "Sparse Logit Sampling:
Accelerating Knowledge Distillation in LLMs"): at each masked position, N token ids drawn with
replacement from the teacher's softmax, kept as the distinct ids (ascending) with their counts.

Why it is unbiased: the empirical distribution p̂_j = count_j / N has E[p̂] = p, and the
student's cross-entropy −Σ_j p̂_j log q_j is linear in p̂, so its expectation, and that of its
gradient with respect to the student's logits (q − p̂), are the full-distribution loss and
gradient. A truncated top-k is not: it renormalises the head and drops the tail.

How draws are made: N uniforms per position from a generator seeded by (seed, example id,
side, mask epoch), as masks are, sorted, then mapped through the teacher's cumulative
distribution over ids in id order (inverse CDF). The draws are a pure function of the row and
the teacher's logits, never of the batch or the worker: a retried shard draws the same ids, and
`xkd verify --teacher` redraws them. Sorted uniforms give nondecreasing ids, so the distinct ids
and their counts are runs.

A leaf: numpy here, torch only inside the function that takes torch tensors.
"""

from __future__ import annotations

import numpy as np

# The fifth word of a row's seed: masks use the first four (pipeline/masking.row_rng), so the
# draws are a stream of their own and adding --sample leaves every mask as it was.
SAMPLE_STREAM = 1


def draw_uniforms(seed: int, example_id: int, side_code: int, epoch: int, n_positions: int, n: int) -> np.ndarray:
    """(n_positions, n) uniforms in [0, 1), each position's sorted ascending."""
    rng = np.random.default_rng([seed, example_id, side_code, epoch, SAMPLE_STREAM])
    return np.sort(rng.random((n_positions, n)), axis=1)


def inverse_cdf(logits, uniforms):
    """Token ids (m, n) int64, nondecreasing per position: for each uniform u the id j with
    cdf(j − 1) <= u < cdf(j), cdf the running sum of softmax(logits) in id order.
    logits (m, V) and uniforms (m, n) are torch tensors on one device. The sum runs in fp64 so
    that a 250k-token vocabulary's last ids are reachable to within 1e-16, not fp32's 1e-7; a
    token whose probability underflows to 0 is never drawn."""
    import torch

    cdf = torch.softmax(logits.float(), dim=-1).cumsum(-1, dtype=torch.float64)
    ids = torch.searchsorted(cdf, uniforms.to(torch.float64) * cdf[:, -1:], right=True)
    return ids.clamp_(max=logits.shape[-1] - 1)


def runs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nondecreasing ids (m, n) as (distinct ids, counts), positions in order; each position's
    counts sum to n, which is how a reader finds where one position ends (`positions_of`)."""
    ids = np.asarray(ids)
    if not ids.size:
        return np.zeros(0, np.uint32), np.zeros(0, np.uint16)
    first = np.ones(ids.shape, dtype=bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = np.flatnonzero(first.ravel())
    counts = np.diff(np.append(starts, ids.size))
    return ids.ravel()[starts].astype(np.uint32), counts.astype(np.uint16)


def runs_by_row(draws: np.ndarray, n_masked: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nondecreasing draws (positions, n), rows' positions one after another (n_masked per
    row), as the cache stores them: (distinct ids, counts, how many of them each row has)."""
    ids, counts = runs(draws)
    row_of_position = np.repeat(np.arange(len(n_masked)), n_masked)
    per_row = np.bincount(row_of_position[positions_of(counts, draws.shape[1])], minlength=len(n_masked))
    return ids, counts, per_row


def positions_of(counts: np.ndarray, n: int) -> np.ndarray:
    """The masked position (0, 1, ...) each stored id belongs to, from counts that sum to n per
    position."""
    counts = np.asarray(counts, dtype=np.int64)
    before = np.cumsum(counts) - counts
    return before // n


def expand(ids: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """The (m, n) draws, sorted per position, that `runs` encoded."""
    return np.repeat(np.asarray(ids), np.asarray(counts, dtype=np.int64)).reshape(-1, n)
