"""BERT: WordPiece (`##` continuations), absolute positions from 0, two token types.

MiniLM (sentence-transformers/all-MiniLM-L6-v2) and MuRIL are BERTs. xkd's default student is
one (an ALBERT with --embedding-dim, see albert.py)."""

from . import Family

FAMILY = Family(
    name="bert",
    model_types=("bert",),
    convention="wordpiece",
    aliases=(
        ("bert-base", "google-bert/bert-base-uncased"),
        ("bert-base-cased", "google-bert/bert-base-cased"),
        ("mbert", "google-bert/bert-base-multilingual-cased"),
        ("muril", "google/muril-base-cased"),
        ("minilm", "sentence-transformers/all-MiniLM-L6-v2"),
    ),
    mlm_head="cls",
    student_classes=("BertConfig", "BertForMaskedLM"),
)
