"""DistilBERT: BERT's WordPiece tokenizers, its sizes spelled dim/n_layers/n_heads (transformers'
attribute map reads them), no token types, and an MLM head of three modules (no single one)."""

from . import Family

FAMILY = Family(
    name="distilbert",
    model_types=("distilbert",),
    convention="wordpiece",
    aliases=(("distilmbert", "distilbert/distilbert-base-multilingual-cased"),),
)
