"""Vocabulary union, teacher->student id maps, numba remap kernels, the student tokenizer,
and embedding initialisation for a union-vocab student (docs/design.md, "build-vocab";
docs/vocab.md). Heavy libraries (transformers, torch) are imported only where used."""

from .build import build_vocab
from .embeddings import init_union_embeddings, student_from_teacher
from .materialise import needs_remap, remap_cache
from .remap import remap, remap_lists, remap_ragged, remap_rows, stack_tables
from .student_tokenizer import StudentTokenizer, load_student_tokenizer, save_student_tokenizer
from .vocabdir import Vocab, load_vocab

__all__ = [
    "StudentTokenizer", "Vocab", "build_vocab", "init_union_embeddings", "load_student_tokenizer", "load_vocab",
    "needs_remap", "remap", "remap_cache", "remap_lists", "remap_ragged", "remap_rows", "save_student_tokenizer",
    "stack_tables", "student_from_teacher",
]
