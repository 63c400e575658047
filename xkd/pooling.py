"""Sentence vectors from token states: one definition for the teacher (pipeline, cached
`pooled`), the student it is distilled into (xd) and bitext evaluation, so a student is
pooled exactly as its teacher was. A leaf: imports nothing of xkd."""

from __future__ import annotations

import torch

MODES = ("mean", "cls", "max", "mean_sqrt_len")


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """(batch, length, dim) states and their (batch, length) mask -> (batch, dim), over real
    tokens only: mean, [CLS] (the first token), max, or the sum over sqrt(length)
    (sentence-transformers' mean_sqrt_len)."""
    mask = attention_mask.to(hidden.dtype)[:, :, None]
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).amax(dim=1)
    summed = (hidden * mask).sum(dim=1)
    count = mask.sum(dim=1).clamp(min=1e-9)
    return summed / (count.sqrt() if mode == "mean_sqrt_len" else count)
