"""Synthetic shards with realistic statistics, for storage tests and benchmarks.

Ids are Zipf-distributed over the vocabulary (frequent tokens have small ids, as in real
WordPiece vocabularies); top-k logits fall off from a peak like a trained MLM's; the
log-normaliser adds a plausible tail mass. Deterministic given the seed.
"""

from __future__ import annotations

import functools

import numpy as np

from ..sampling import runs_by_row
from .schema import DenseSpec, Ragged


@functools.lru_cache(maxsize=8)
def _zipf_cdf(vocab: int, a: float) -> np.ndarray:
    """P(id <= i) for i < vocab, where id = Zipf(a) - 1; what lies past the vocabulary is
    left to the last bucket. zeta(a) by Euler-Maclaurin at N = vocab."""
    n = np.arange(1, vocab + 1, dtype=np.float64)
    head = n ** -a
    zeta = head.sum() + vocab ** (1 - a) / (a - 1) - vocab**-a / 2 + a * vocab ** (-a - 1) / 12
    return np.cumsum(head) / zeta


def zipf_ids(rng: np.random.Generator, n: int, vocab: int, a: float = 1.1) -> np.ndarray:
    """Zipf(a) - 1, with draws past the vocabulary replaced by uniform ids (rare tokens).

    The same law as `rng.zipf`, drawn by inverting its CDF (rng.zipf is slow for a near 1)."""
    ids = np.searchsorted(_zipf_cdf(vocab, a), rng.random(n), side="right")
    past = ids >= vocab
    ids[past] = rng.integers(0, vocab, size=int(past.sum()))
    return ids.astype(np.uint32)


def distinct_zipf_ids(rng: np.random.Generator, n: int, k: int, vocab: int) -> np.ndarray:
    """(n, k) Zipf ids, distinct within each row, as a top-k over a vocabulary is."""
    if k > vocab:
        raise ValueError(f"cannot draw {k} distinct ids from a vocabulary of {vocab}")
    out = np.zeros((n, k), dtype=np.uint32)
    todo = np.arange(n)
    while todo.size:
        draws = zipf_ids(rng, todo.size * 2 * k, vocab).reshape(todo.size, 2 * k)
        order = np.argsort(draws, axis=1, kind="stable")
        ranked = np.take_along_axis(draws, order, axis=1)
        repeat = np.zeros_like(ranked, dtype=bool)
        repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
        first = np.empty_like(repeat)
        np.put_along_axis(first, order, ~repeat, axis=1)  # first occurrence, in draw order
        enough = first.sum(axis=1) >= k
        rows, cols = np.nonzero(first[enough])
        per_row = np.cumsum(first[enough], axis=1)[rows, cols] <= k
        out[todo[enough]] = draws[enough][rows[per_row], cols[per_row]].reshape(-1, k)
        todo = todo[~enough]
    return out


def synthetic_rows(
    seed: int,
    n_rows: int,
    vocab: int = 120_000,
    k: int = 8,
    first_example_id: int = 0,
    min_len: int = 12,
    max_len: int = 128,
    mask_prob: float = 0.15,
    dense_specs: dict[str, DenseSpec] | None = None,
    langs: tuple[str, ...] = ("en", "hi"),
) -> tuple[dict, dict]:
    """(rows, dense) ready for write_shard_files."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=n_rows)
    input_ids = [zipf_ids(rng, int(n), vocab) for n in lengths]
    word_start = [rng.random(int(n)) < 0.7 for n in lengths]
    masked = [np.sort(rng.choice(int(n), size=max(1, int(round(n * mask_prob))), replace=False)).astype(np.uint16)
              for n in lengths]
    n_masked = np.array([len(m) for m in masked])
    total_masked = int(n_masked.sum())

    topk_ids = distinct_zipf_ids(rng, total_masked, k, vocab)
    peak = rng.normal(14.0, 2.5, size=(total_masked, 1))
    gaps = np.cumsum(rng.exponential(0.9, size=(total_masked, k)), axis=1)
    logits = (peak - (gaps - gaps[:, :1])).astype(np.float32)  # descending from the peak
    tail = rng.uniform(0.01, 0.6, size=total_masked)  # probability mass outside the top-k
    top_lse = np.logaddexp.reduce(logits, axis=1)
    lognorm = (top_lse - np.log1p(-tail)).astype(np.float32)

    split = np.cumsum(n_masked)[:-1]
    rows = {
        "example_id": np.arange(first_example_id, first_example_id + n_rows, dtype=np.uint64),
        "pair_id": np.full(n_rows, -1, dtype=np.int64),
        "lang": np.array([langs[i % len(langs)] for i in range(n_rows)], dtype=object),
        "side": np.array(["mono"] * n_rows, dtype=object),
        "mask_epoch": np.zeros(n_rows, dtype=np.uint16),
        "input_ids": Ragged.from_rows(input_ids, np.uint32),
        "word_start": Ragged.from_rows(word_start, np.bool_),
        "masked_positions": Ragged.from_rows(masked, np.uint16),
        "labels": Ragged.from_rows([ids[m] for ids, m in zip(input_ids, masked)], np.uint32),
        "teacher_loss": rng.uniform(0.5, 4.0, size=n_rows).astype(np.float32),
        "class_label": np.full(n_rows, -1, dtype=np.int32),
        "topk_ids": Ragged.from_rows([a.ravel() for a in np.split(topk_ids, split)], np.uint32),
        "topk_logits": Ragged.from_rows([a.ravel() for a in np.split(logits.astype(np.float16), split)], np.float16),
        "lognorm": Ragged.from_rows(np.split(lognorm, split), np.float32),
    }
    dense = {}
    for name, spec in (dense_specs or {}).items():
        count = {"row": n_rows, "token": int(lengths.sum()), "word": int(sum(w.sum() for w in word_start))}[spec.align]
        if spec.layout == "keys":
            dense[name] = _attention(rng, lengths, spec.heads, spec.max_keys, spec.dtype)
        else:
            dense[name] = rng.standard_normal((count, spec.dim)).astype(spec.dtype)
    return rows, dense


def _attention(rng: np.random.Generator, lengths: np.ndarray, heads: int, max_keys: int, dtype) -> np.ndarray:
    """Per token, each head's softmax over its row's keys, zeros past the row's length (the
    padded form attention outputs are given to write_shard_files in)."""
    per_token = np.repeat(lengths, lengths)
    scores = rng.standard_normal((len(per_token), heads, max_keys)).astype(np.float32)
    real = np.arange(max_keys)[None, None, :] < per_token[:, None, None]
    probs = np.where(real, np.exp(scores), 0.0)
    probs /= probs.sum(-1, keepdims=True)
    return probs.reshape(len(per_token), heads * max_keys).astype(dtype)


def synthetic_draws(rows: dict, n: int, vocab: int = 120_000, seed: int = 0) -> dict:
    """sample_ids and sample_counts for rows made by synthetic_rows, as `--sample n` would store
    them if the teacher's distribution were the rows' own: each draw is one of the top-k ids
    with its probability exp(logit − lognorm), else (with the tail mass) a Zipf id."""
    rng = np.random.default_rng([seed, n])
    positions = len(rows["lognorm"].values)
    k = len(rows["topk_ids"].values) // max(positions, 1)
    ids = rows["topk_ids"].values.reshape(positions, k).astype(np.int64)
    p_top = np.exp(rows["topk_logits"].values.astype(np.float64).reshape(positions, k)
                   - rows["lognorm"].values.astype(np.float64)[:, None])
    cdf = np.cumsum(p_top, axis=1)
    u = rng.random((positions, n))
    slot = (u[:, :, None] >= cdf[:, None, :]).sum(-1)  # k: in the tail
    draws = np.where(slot < k, np.take_along_axis(ids, np.minimum(slot, k - 1), 1),
                     zipf_ids(rng, positions * n, vocab).reshape(positions, n))
    draws.sort(axis=1)
    ids, counts, per_row = runs_by_row(draws, rows["masked_positions"].lengths())
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    return {"sample_ids": Ragged(ids, offsets), "sample_counts": Ragged(counts, offsets)}

