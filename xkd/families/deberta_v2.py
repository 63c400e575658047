"""DeBERTa-v2/v3 (mDeBERTa-v3): SentencePiece Unigram (`▁` word starts, `[CLS] [SEP] [PAD]=0`),
relative positions, no token types."""

from . import Family

FAMILY = Family(
    name="deberta-v2",
    model_types=("deberta-v2",),
    convention="sentencepiece",
    aliases=(("mdeberta", "microsoft/mdeberta-v3-base"),),
    # The head of config.legacy (true unless the config says otherwise); legacy=false's
    # lm_predictions takes the word embeddings as a second input.
    mlm_head="cls",
)
