"""How top-k values are stored: "fp16" (topk_logits fp16 and lognorm fp32, lossless enough to
be the reference) or "q8" (one byte per value, `cache-teachers --topk-codec q8`).

q8 stores, per masked position, k uint8 codes of the top-k log-probabilities
logp_j = z_j - logsumexp(z) (<= 0; the log-normaliser is folded in, so no lognorm column).
A code is the number of the bin that holds logp; the bins split [Q8_FLOOR, 0] so that their
density is the average of two quantisers' (half the levels each):
- uniform in probability: caps the absolute error of p = exp(logp) (at 0.0065 in the mix),
  which is what τ = 1 losses feel (the tail target's error is Σ_j Δp_j (log q_tail - log q_j));
- uniform in sqrt(-logp): fine near logp = 0 and coarser for small p, but with a bounded
  relative error everywhere, which the renormalised and τ = 2 targets feel (they weigh
  sqrt(p_j) and log ratios).
Bin widths grow with depth: 0.0009 at logp = 0, 0.006 at -0.1, 0.012 at -0.7, 0.037 at -2,
0.14 at -5, 0.22 at -10, 0.27 at -15. Values below Q8_FLOOR (p < 2e-9) share the last code.
A code decodes to the point of its bin where exp() equals the bin's mean probability (for
values spread evenly over the bin), so rounding does not bias probabilities upwards as the
bin's midpoint in logp would (exp is convex): an unbiased p is what keeps the mean KD loss
unbiased. Elementwise and monotone: a sorted row stays sorted.

The bound, per value x (q8_logprob_tolerance): |decode(encode(x)) - x| <= the width of x's
bin, plus the distance of x to [Q8_FLOOR, 0] outside it (so -inf has an infinite bound, and
p itself, below exp(Q8_FLOOR), is what a clipped value can lose). Measured on the KD loss
(docs/pipeline.md, tests/test_topk_codec.py): the mean over >= 2,000 positions of the real
MiniLM teacher is within 1e-3 nats of the exact loss, and of the fp16 cache's give or take
the fp16 cache's own error, for the tail target and the renormalised top-k target at τ = 1
and 2, with the teacher itself and a random model as the student.

The tables are computed once, in float64, and rounded to float32, so encoding is comparisons
against fixed numbers: the same log-probabilities give the same bytes on every machine.
"""

from __future__ import annotations

import numpy as np

from ..errors import XkdError

Q8_LEVELS = 256
# log p below which values share the last code: exp(-20) = 2e-9, less than any top-k value a
# loss can feel (the tail target weighs it by at most log |V|, the τ = 2 target by exp(-10)).
Q8_FLOOR = -20.0
# The share of the levels spaced evenly in probability (the rest: evenly in sqrt(-logp)).
# Chosen by measurement on the real MiniLM teacher's logits (docs/pipeline.md), of 0, 0.25,
# 0.4, 0.5, 0.6 and 0.75: 0.5 had the smallest worst case of |mean| + 3 standard errors of the
# KD-loss difference to the exact loss (3 targets, 2 students, logits x1, x2 and x4).
Q8_PROBABILITY_SHARE = 0.5


def _compand(logp: np.ndarray) -> np.ndarray:
    """The quantiser's companding map: [Q8_FLOOR, 0] onto [1, 0], decreasing."""
    a = Q8_PROBABILITY_SHARE
    return a * -np.expm1(logp) / -np.expm1(Q8_FLOOR) + (1 - a) * np.sqrt(logp / Q8_FLOOR)


def _edges() -> np.ndarray:
    """Q8_LEVELS + 1 bin edges, descending from 0 to Q8_FLOOR: edge c is where the companding
    map reaches c / Q8_LEVELS (found by bisection; the map has no closed-form inverse)."""
    target = np.arange(Q8_LEVELS + 1) / Q8_LEVELS
    lo, hi = np.full(target.shape, Q8_FLOOR), np.zeros(target.shape)
    for _ in range(80):  # 20 / 2**80: far below float32's resolution
        mid = (lo + hi) / 2
        deeper = _compand(mid) > target
        lo, hi = np.where(deeper, mid, lo), np.where(deeper, hi, mid)
    edges = ((lo + hi) / 2).astype(np.float32)
    edges[0], edges[-1] = 0.0, Q8_FLOOR
    return edges


_EDGES = _edges()
# Ascending inner edges, for searchsorted: code = how many inner edges lie at or above x.
_INNER_ASCENDING = _EDGES[1:-1][::-1].copy()
_WIDTHS = (_EDGES[:-1].astype(np.float64) - _EDGES[1:]).astype(np.float32)


def _reconstruction() -> np.ndarray:
    """Per code, log of the mean of exp over its bin: log((e^hi - e^lo) / (hi - lo))."""
    hi, lo = _EDGES[:-1].astype(np.float64), _EDGES[1:].astype(np.float64)
    return (lo + np.log(np.expm1(hi - lo) / (hi - lo))).astype(np.float32)


_DECODED = _reconstruction()


def _codes_of(logprobs: np.ndarray) -> np.ndarray:
    clipped = np.clip(logprobs, Q8_FLOOR, 0.0)
    return (Q8_LEVELS - 1 - np.searchsorted(_INNER_ASCENDING, clipped, side="left")).astype(np.uint8)


def encode_q8(logprobs: np.ndarray) -> np.ndarray:
    """uint8 codes of log-probabilities (any shape, float32; -inf allowed, values above 0,
    from rounding, count as 0). NaN or +inf means the teacher's logits overflowed."""
    logprobs = np.asarray(logprobs, dtype=np.float32)
    if np.isnan(logprobs).any() or np.isposinf(logprobs).any():
        raise XkdError("the teacher's top-k log-probabilities hold NaN or +inf (its logits overflowed, as fp16 "
                       "compute can), so the q8 top-k codec cannot store them: cache this teacher with --dtype fp32 "
                       "or bf16, or with --topk-codec fp16")
    return _codes_of(logprobs)


def decode_q8(codes: np.ndarray) -> np.ndarray:
    """float32 log-probabilities of uint8 codes (any shape)."""
    return _DECODED[np.asarray(codes, dtype=np.uint8)]


def q8_logprob_tolerance(logprobs: np.ndarray) -> np.ndarray:
    """For each true log-probability, the largest |decode_q8(encode_q8(x)) - x| the codec
    allows: the width of x's bin, plus how far x lies outside [Q8_FLOOR, 0] (infinite for
    -inf). Widths never shrink with depth, so for a value x' known only to within eps of the
    encoded x, |decoded - x'| <= q8_logprob_tolerance(x' - eps) + eps."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    outside = np.abs(logprobs - np.clip(logprobs, Q8_FLOOR, 0.0))
    return _WIDTHS[_codes_of(logprobs.astype(np.float32))].astype(np.float64) + outside
