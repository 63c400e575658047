"""ALBERT: SentencePiece (`▁` word starts), a factorised embedding. xkd builds one as the bert
student with --embedding-dim smaller than --hidden (student/models.py), whose MLM head is
`predictions`."""

from . import Family

FAMILY = Family(
    name="albert",
    model_types=("albert",),
    convention="sentencepiece",
    mlm_head="predictions",
)
