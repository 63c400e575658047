"""mlm: the student on gold labels only (MergeDistill's SM2 baseline), same data and vocab."""

from __future__ import annotations

import torch.nn.functional as F

from . import register
from .base import Method, collate_masked_lm, masked_log_probs


@register
class MaskedLM(Method):
    name = "mlm"
    columns = ("example_id", "lang", "input_ids", "masked_positions", "labels")

    def collate(self, rows):
        return collate_masked_lm(rows, self.vocab.pad_id)

    def losses(self, batch, student, step):
        mlm = F.nll_loss(masked_log_probs(student, batch), batch["labels"])
        return {"loss": mlm, "mlm": mlm}
