"""mergedistill (Khanuja et al., seeds/004): L = λ·L_KD + (1−λ)·L_MLM, λ annealed.

L_KD is the cross-entropy between the teacher's distribution and the student's softmax over
the whole union vocabulary at each masked position. The teacher's distribution comes from
the cached top-k, in one of two forms:
- "topk" (the paper): softmax over the k stored logits (at temperature τ), i.e. the top-k
  renormalised; the rest of the vocabulary gets no mass.
- "tail": the exact top-k probabilities exp(logit − lognorm) plus the tail mass
  1 − Σ top-k, matched against the student's mass outside those k tokens. This is the exact
  cross-entropy between the two distributions coarsened to {top-k tokens, everything else},
  and needs τ = 1 (the log-normaliser is for τ = 1).
With k equal to the teacher's vocabulary both forms equal the full-softmax cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import BadInput
from ..targets import tail_cross_entropy
from . import register
from .base import Method, Need, collate_masked_lm, lambda_at, masked_log_probs


def kd_topk(student_logp: torch.Tensor, topk_ids, topk_logits, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy from the renormalised top-k (student_logp: (M, V) at τ)."""
    target = torch.softmax(topk_logits / temperature, dim=-1)
    return -(target * student_logp.gather(1, topk_ids)).sum(-1).mean()


def kd_tail(student_logp: torch.Tensor, topk_ids, topk_logits, lognorm) -> torch.Tensor:
    """Cross-entropy over {top-k tokens, the rest}, with the teacher's exact tail mass."""
    return tail_cross_entropy(student_logp, topk_ids, topk_logits, lognorm).mean()


@register
class MergeDistill(Method):
    name = "mergedistill"
    needs = (Need("topk", "--topk 8"),)
    columns = (
        "example_id", "lang", "side", "mask_epoch", "teacher_loss",
        "input_ids", "masked_positions", "labels", "topk_ids", "topk_logits", "lognorm",
    )

    def __init__(self, options, vocab=None, total_steps=1):
        super().__init__(options, vocab, total_steps)
        self.target = options.get("kd_target", "topk")
        self.temperature = float(options.get("temperature", 1.0))
        if self.target not in ("topk", "tail"):
            raise BadInput(f"--kd-target must be 'topk' or 'tail', not {self.target!r}")
        if self.target == "tail" and self.temperature != 1.0:
            raise BadInput("--kd-target tail needs --temperature 1: the cached log-normaliser is for τ = 1.")
        self.schedule = options.get("lambda_schedule", "anneal")
        self.lambda_start = float(options.get("lambda_start", 1.0))
        self.lambda_end = float(options.get("lambda_end", 0.0))

    def collate(self, rows):
        return collate_masked_lm(rows, self.vocab.pad_id)

    def kd(self, logp: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.target == "tail":
            return kd_tail(logp, batch["topk_ids"], batch["topk_logits"], batch["lognorm"])
        if self.temperature != 1.0:
            logp = torch.log_softmax(logp / self.temperature, dim=-1)  # logp is logits up to a constant
        return kd_topk(logp, batch["topk_ids"], batch["topk_logits"], self.temperature) * self.temperature**2

    def losses(self, batch, student, step):
        logp = masked_log_probs(student, batch)
        mlm = F.nll_loss(logp, batch["labels"])
        kd = self.kd(logp, batch)
        lam = lambda_at(self.schedule, self.lambda_start, self.lambda_end, step, self.total_steps)
        return {"loss": lam * kd + (1 - lam) * mlm, "kd": kd, "mlm": mlm, "lambda": torch.tensor(lam)}
