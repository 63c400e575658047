"""RoBERTa: byte-level BPE (`Ġ` word starts), position ids from the pad id, one token type.

Longformer and Data2Vec-text are RoBERTas as far as xkd reads them."""

from . import Family

FAMILY = Family(
    name="roberta",
    model_types=("roberta", "longformer", "data2vec-text"),
    convention="bytelevel",
    aliases=(("roberta-base", "FacebookAI/roberta-base"),),
    positions_after_pad=True,
    mlm_head="lm_head",
)
