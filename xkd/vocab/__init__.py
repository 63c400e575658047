"""Vocabulary union, teacher->student id maps, numba remap kernels, the student tokenizer,
and embedding initialisation for a union-vocab student (DESIGN.md, "build-vocab";
docs/vocab.md). Heavy libraries (transformers, torch) are imported only where used."""

from .build import build_vocab
from .embeddings import init_union_embeddings, student_from_teacher
from .materialise import needs_remap, remap_cache
from .remap import remap, remap_lists, remap_ragged, remap_rows, stack_tables
from .vocabdir import Vocab, load_vocab

__all__ = [
    "Vocab", "build_vocab", "init_union_embeddings", "load_vocab", "needs_remap", "remap", "remap_cache",
    "remap_lists", "remap_ragged", "remap_rows", "stack_tables", "student_from_teacher",
]
