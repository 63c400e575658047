"""Teacher distributions recovered from a cached top-k, and the student's matching view.

From top-k logits and the full-softmax log-normaliser the teacher's exact probabilities of
its top-k tokens, and the exact mass of all other tokens (the tail), are recoverable.
Comparing teacher and student over {the k tokens, the rest} is therefore exact.
"""

from __future__ import annotations

import torch


def teacher_top_and_tail(topk_logits: torch.Tensor, lognorm: torch.Tensor):
    """(M, k) probabilities of the top-k tokens and (M,) tail mass."""
    p_top = torch.exp(topk_logits - lognorm[:, None])
    return p_top, (1.0 - p_top.sum(-1)).clamp_min(0.0)


def student_top_and_tail(student_logp: torch.Tensor, topk_ids: torch.Tensor):
    """(M, k) student log-probabilities of the teacher's top-k tokens and (M,) log of the
    student's mass on every other token (a logsumexp, stable even when it is tiny)."""
    top = student_logp.gather(1, topk_ids)
    tail = torch.logsumexp(student_logp.scatter(1, topk_ids, float("-inf")), dim=-1)
    return top, tail


def _weighted(p: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    # 0 * log 0 is 0: a tail with no teacher mass contributes nothing, even where logq is -inf.
    return torch.where(p > 0, p * logq, torch.zeros_like(p))


def tail_cross_entropy(student_logp, topk_ids, topk_logits, lognorm) -> torch.Tensor:
    """Per position: −Σ_top p log q − p_tail log q_tail."""
    p_top, p_tail = teacher_top_and_tail(topk_logits, lognorm)
    s_top, s_tail = student_top_and_tail(student_logp, topk_ids)
    return -(_weighted(p_top, s_top).sum(-1) + _weighted(p_tail, s_tail))


def tail_kl(student_logp, topk_ids, topk_logits, lognorm) -> torch.Tensor:
    """Per position: KL(teacher || student) over {top-k tokens, the rest}."""
    p_top, p_tail = teacher_top_and_tail(topk_logits, lognorm)
    entropy = -(_weighted(p_top, torch.log(p_top)).sum(-1) + _weighted(p_tail, torch.log(p_tail)))
    return tail_cross_entropy(student_logp, topk_ids, topk_logits, lognorm) - entropy
