"""How a union-vocab student tokenizes raw text (docs/vocab.md, "The student tokenizer").

A student trained on teacher caches saw each language as its teacher tokenized it,
remapped into the union. So the tokenizer that agrees with training is not one WordPiece
over the union, it is: route the text by language to the teacher tokenizer that produced
that language's cache, tokenize, remap. `route_tokenize` does that; a vocab dir keeps a
copy of every teacher tokenizer, so it needs no teacher at fine-tuning time.

Tools that want one plain tokenizer over a vocab dir (AutoTokenizer.from_pretrained(vocab_dir))
get `save_union_tokenizer`'s WordPiece over the union vocab. It lower-cases only
if every teacher does, and strips accents only if every teacher does, so that no teacher's
tokens become unreachable. It differs from training where greedy longest-match over the
union picks pieces the routed teacher lacks, and for languages whose teacher lower-cases
when another teacher does not (see docs/vocab.md for measured agreement). A saved student
carries better: its routes' teacher tokenizers remapped to union ids (student_tokenizer.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .remap import remap_lists
from .teachers import TeacherVocab

# Tokenizers report "no limit" as a huge number; a real one (512) is carried over.
_NO_LIMIT = 10**9


def union_casing(teachers: list[TeacherVocab]) -> dict:
    return {
        "lowercase": all(t.lowercase for t in teachers),
        "strip_accents": all(t.strip_accents for t in teachers),
    }


def default_route(teachers: list[TeacherVocab], slugs: list[str]) -> str:
    """The teacher for a language nobody routed: the first that neither lower-cases nor
    strips accents (they delete information in many scripts, e.g. Hindi vowel signs), else
    the first teacher."""
    for teacher, slug in zip(teachers, slugs):
        if not teacher.lowercase and not teacher.strip_accents:
            return slug
    return slugs[0]


def save_union_tokenizer(out: Path, vocab_txt: Path, teachers: list[TeacherVocab]) -> None:
    """A BERT WordPiece tokenizer over the union vocab, loadable with AutoTokenizer."""
    from transformers import BertTokenizer

    casing = union_casing(teachers)
    limits = [int(t.tokenizer.model_max_length) for t in teachers if int(t.tokenizer.model_max_length) < _NO_LIMIT]
    kwargs = {"model_max_length": min(limits)} if limits else {}
    tokenizer = BertTokenizer(
        vocab=str(vocab_txt), do_lower_case=casing["lowercase"], strip_accents=casing["strip_accents"],
        tokenize_chinese_chars=True, **kwargs,
    )
    tokenizer.save_pretrained(str(out))


def route_tokenize(tokenizer, table: np.ndarray, texts, text_pairs=None, *, max_length: int | None = None,
                   add_special_tokens: bool = True, what: str = "tokenize") -> list[np.ndarray]:
    """Tokenize with a teacher's tokenizer and remap into the union: one int32 array of
    union ids per text."""
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    if text_pairs is not None:
        text_pairs = [text_pairs] if isinstance(text_pairs, str) else list(text_pairs)
    encoded = tokenizer(
        texts, text_pairs, add_special_tokens=add_special_tokens,
        truncation=max_length is not None, max_length=max_length,
    )["input_ids"]
    out = remap_lists(encoded, table, what=what)
    return out[0] if single else out
