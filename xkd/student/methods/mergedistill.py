"""mergedistill ("MergeDistill: Merging Pre-trained Language Models using Distillation",
Khanuja et al. 2021): L = λ·L_KD + (1−λ)·L_MLM, λ annealed.

L_KD is the cross-entropy between the teacher's distribution and the student's softmax over
the whole union vocabulary at each masked position (sec. 3, eq. 2). The teacher's
distribution comes from the cache, in one of three forms (`kd_target`):
- "topk" (the paper, k = 8): softmax over the k stored logits (at temperature τ), i.e. the
  top-k renormalised; the rest of the vocabulary gets no mass. With τ != 1 the term is
  multiplied by τ² (Hinton et al.; the rule of losses.distillation_cross_entropy, which
  computes both forms) so gradient sizes stay comparable across τ.
- "tail": the exact top-k probabilities exp(logit − lognorm) plus the tail mass
  1 − Σ top-k, matched against the student's mass outside those k tokens: the exact
  cross-entropy between the two distributions coarsened to {top-k tokens, everything else}.
  Needs τ = 1 (the log-normaliser is for τ = 1).
- "sampled": the empirical distribution of N ids drawn from the teacher's full softmax
  (cache-teachers --sample N; random-sampling KD, Anshumann et al. 2025): an unbiased
  estimate of the full-distribution cross-entropy and of its gradient, where both top-k forms
  are biased. Needs τ = 1 (the draws are from softmax(z_T)).
With k equal to the teacher's vocabulary both forms equal the full-softmax cross-entropy.

λ follows teacher annealing (Clark et al. 2019, as the paper does): linear from
`lambda_start` at the first step to `lambda_end` at the last. Languages mix within a batch;
the loader's `--alpha 0.7` smooths them (sec. 4) and `--copies all|best` chooses between
every teacher's copy of an example and the lowest-loss one (Table 4's Student_Both.all/.best).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import losses as L
from . import register
from .base import (
    KD_TARGET_HELP,
    KD_TARGETS,
    Method,
    Plan,
    check_kd_target,
    collate_masked_lm,
    kd_target_columns,
    kd_target_need,
    kd_target_why,
    kd_term,
    lambda_at,
    masked_logits,
    option,
    require,
)

COLUMNS = ("example_id", "lang", "side", "mask_epoch", "teacher_loss", "input_ids", "masked_positions", "labels")


@dataclass(frozen=True)
class Config:
    kd_target: str = option("topk", KD_TARGET_HELP, paper="topk", choices=KD_TARGETS)
    temperature: float = option(1.0, "distillation temperature τ (topk target only; the term is scaled by τ²)",
                                paper=1.0, low=0.0, low_open=True)
    lambda_schedule: str = option("anneal", "λ over training: linear from lambda_start to lambda_end, or constant",
                                  paper="anneal", choices=("anneal", "constant"))
    lambda_start: float = option(1.0, "λ (weight of L_KD) at the first step", paper=1.0, low=0.0, high=1.0)
    lambda_end: float = option(0.0, "λ at the last step (anneal only)", paper=0.0, low=0.0, high=1.0,
                                used_when={"lambda_schedule": ("anneal",)})

    def __post_init__(self):
        check_kd_target(self.kd_target, self.temperature)


@register
class MergeDistill(Method):
    name = "mergedistill"
    paper = "MergeDistill: Merging Pre-trained Language Models using Distillation (Khanuja et al. 2021)"
    Config = Config
    needs = (kd_target_need("topk"), kd_target_need("sampled"))

    @classmethod
    def plan_for(cls, config, caches, student):
        require(cls.name, caches, [kd_target_need(config.kd_target)], kd_target_why(config.kd_target))
        return Plan(columns=COLUMNS + kd_target_columns(config.kd_target))

    def collate(self, rows):
        return collate_masked_lm(rows, self.vocab.pad_id)

    def losses(self, batch, student, step):
        c = self.config
        logits = masked_logits(student, batch)
        logp = torch.log_softmax(logits, dim=-1)  # once, for both terms: (M, V) over the union vocab
        parts = {"kd": kd_term(c.kd_target, logits, logp, batch, c.temperature), "mlm": L.gold_nll(logp, batch["labels"])}
        lam = lambda_at(c.lambda_schedule, c.lambda_start, c.lambda_end, step, self.total_steps)
        return {"loss": L.weighted_sum(parts, {"kd": lam, "mlm": 1 - lam}), **parts,
                "lambda": logits.new_tensor(lam)}
