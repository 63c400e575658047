"""mlm: the student on gold labels only (MergeDistill's SM2 baseline), same data and vocab.

Two sources of masked inputs (`--option source=...`):
- "cache" (default): the teacher's cached masked inputs and gold labels;
- "text": masks drawn on the student side from the rows' raw text, as TLM does
  ([CLS] text [SEP] pair_text [SEP] when the row has a translation, both sides masked; see
  tlm.py). For caches of encoder teachers, which store text but no masked positions: the
  "mlm only" baseline of an mmkd or xd comparison on the same cache.
"""

from __future__ import annotations

import torch.nn.functional as F

from ...errors import BadInput
from . import register
from .base import TEXT_NEED, Method, collate_masked_lm, masked_log_probs
from .tlm import TEXT_COLUMNS, collate_tlm, pair_languages


@register
class MaskedLM(Method):
    name = "mlm"
    columns = ("example_id", "lang", "input_ids", "masked_positions", "labels")

    def __init__(self, options, vocab=None, total_steps=1):
        super().__init__(options, vocab, total_steps)
        self.source = options.get("source", "cache")
        if self.source not in ("cache", "text"):
            raise BadInput(f"--option source={self.source} for mlm: choose cache (the cached masks) or text (masks drawn from the rows' text).")
        if self.source == "text":
            self.needs = (TEXT_NEED,)
            self.columns = TEXT_COLUMNS
            self.mask_prob = float(options.get("mask_prob", 0.15))
            self.mask_seed = int(options.get("mask_seed", 0))
            self.max_length = int(options.get("max_length", 128))
        self.pairs: list = []

    def setup(self, student, caches):
        if self.source == "text":
            Method.check_caches.__func__(self, caches)  # reads `needs` and `name`: here, the text
            self.pairs = pair_languages(caches)

    def collate(self, rows):
        if self.source == "text":
            return collate_tlm(self.vocab, rows, self.pairs, seed=self.mask_seed, prob=self.mask_prob,
                               max_length=self.max_length)
        return collate_masked_lm(rows, self.vocab.pad_id)

    def losses(self, batch, student, step):
        mlm = F.nll_loss(masked_log_probs(student, batch), batch["labels"])
        return {"loss": mlm, "mlm": mlm}
