"""mlm: the student on gold labels only (MergeDistill's SM2 baseline), same data and vocab.

Two sources of masked inputs (`source`):
- "cache" (default): the teacher's cached masked inputs and gold labels;
- "text": masks drawn on the student side from the rows' raw text, as TLM does
  ([CLS] text [SEP] pair_text [SEP] when the row has a translation, both sides masked; see
  student/text.py). For caches of encoder teachers, which store text but no masked
  positions: the "mlm only" baseline of an mmkd or xd comparison on the same cache.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import losses as L
from ..text import TEXT_COLUMNS, collate_tlm, pair_languages
from . import register
from .base import TEXT_NEED, Method, Plan, collate_masked_lm, masked_logits, option, require

CACHE_COLUMNS = ("example_id", "lang", "input_ids", "masked_positions", "labels")
TEXT_SOURCE = {"source": ("text",)}  # the cache's own masks need no masking options


@dataclass(frozen=True)
class Config:
    source: str = option("cache", "masked inputs: the cache's own masks, or masks drawn from the rows' text",
                         choices=("cache", "text"))
    mask_prob: float = option(0.15, "source=text: share of tokens masked (80/10/10)", paper=0.15, low=0.0, high=1.0,
                              low_open=True, high_open=True, used_when=TEXT_SOURCE)
    mask_seed: int = option(0, "source=text: seed of the masks", low=0, used_when=TEXT_SOURCE)
    max_length: int = option(128, "source=text: tokens per side", low=2, used_when=TEXT_SOURCE)


@register
class MaskedLM(Method):
    name = "mlm"
    paper = "MergeDistill's SM2 baseline, gold labels only (Khanuja et al. 2021)"
    Config = Config
    needs = ()

    @classmethod
    def plan_for(cls, config, caches, student):
        if config.source == "text":
            require(cls.name, caches, [TEXT_NEED], " --option source=text")
            return Plan(columns=TEXT_COLUMNS, pairs=pair_languages(caches))
        return Plan(columns=CACHE_COLUMNS)

    def collate(self, rows):
        c = self.config
        if c.source == "text":
            return collate_tlm(self.vocab, rows, self.plan.pairs, seed=c.mask_seed, prob=c.mask_prob, max_length=c.max_length)
        return collate_masked_lm(rows, self.vocab.pad_id)

    def losses(self, batch, student, step):
        mlm = L.gold_cross_entropy(masked_logits(student, batch), batch["labels"])
        return {"loss": mlm, "mlm": mlm}
