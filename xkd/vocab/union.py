"""The union of several teachers' vocabularies, and each teacher's id map into it.

Order (deterministic; docs/design.md, "build-vocab"): the five unified special tokens
first, [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0-4, then each teacher's tokens in its own id
order, teachers in the order given, each canonical spelling once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import BadInput
from .canonical import CANONICAL_SPECIALS, SPECIAL_ROLES
from .teachers import TeacherVocab

UNION_SPECIALS = [CANONICAL_SPECIALS[role] for role in SPECIAL_ROLES]


@dataclass
class Union:
    tokens: list[str]
    maps: dict[str, np.ndarray]  # teacher slug -> int32 map (teacher id -> union id)
    canonical: dict[str, list[str]]  # teacher slug -> canonical spelling of each teacher id

    @property
    def size(self) -> int:
        return len(self.tokens)


def teacher_slug(name: str, taken: set[str]) -> str:
    """A file-name-safe, readable key for a teacher, unique among `taken`."""
    base = name.rstrip("/").split("/")[-1] or name
    base = re.sub(r"\.(txt|json)$", "", base)
    base = re.sub(r"\.vocab$", "", base)
    if base in ("vocab", "tokenizer"):  # a file in a directory: name it by the directory
        parts = [p for p in name.rstrip("/").split("/") if p]
        base = parts[-2] if len(parts) > 1 else base
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "teacher"
    unique, n = slug, 2
    while unique in taken:
        unique, n = f"{slug}-{n}", n + 1
    return unique


def _check_canonical(teacher: TeacherVocab, canonical: list[str]) -> None:
    """Two tokens of one teacher with one canonical spelling would share a student id and
    lose the round trip; a spelling with a line break cannot be a vocab.txt line."""
    first: dict[str, int] = {}
    for i, c in enumerate(canonical):
        if "\n" in c or "\r" in c:
            raise BadInput(
                f"teacher {teacher.name!r}: token {i} ({teacher.tokens[i]!r}) contains a line break and has no "
                "canonical form in a vocab.txt."
            )
        j = first.setdefault(c, i)
        if j != i:
            raise BadInput(
                f"teacher {teacher.name!r}: tokens {j} ({teacher.tokens[j]!r}) and {i} ({teacher.tokens[i]!r}) have "
                f"the same canonical form {c!r}, so the vocabulary mixes conventions that xkd cannot tell apart "
                "(docs/vocab.md). Give a tokenizer in one convention."
            )


def build_union(teachers: list[TeacherVocab], slugs: list[str]) -> Union:
    index: dict[str, int] = {}
    tokens: list[str] = []

    def add(token: str) -> int:
        i = index.get(token)
        if i is None:
            i = index[token] = len(tokens)
            tokens.append(token)
        return i

    for special in UNION_SPECIALS:
        add(special)
    maps, canonical = {}, {}
    for teacher, slug in zip(teachers, slugs):
        spelled = teacher.canonical_tokens()
        _check_canonical(teacher, spelled)
        table = np.empty(teacher.map_size, dtype=np.int32)
        table[: teacher.size] = [add(c) for c in spelled]
        # Ids a model's padded embedding matrix has beyond its tokenizer: no token, so [UNK].
        table[teacher.size:] = index[CANONICAL_SPECIALS["unk"]]
        maps[slug] = table
        canonical[slug] = spelled
    return Union(tokens=tokens, maps=maps, canonical=canonical)


def union_report(union: Union, teachers: list[TeacherVocab], slugs: list[str]) -> dict:
    """Sizes, pairwise overlaps and per-teacher coverage, over canonical spellings."""
    sets = {slug: set(union.canonical[slug]) for slug in slugs}
    counts = np.zeros(union.size, dtype=np.int64)
    for slug in slugs:
        counts[np.unique(union.maps[slug][: len(union.canonical[slug])])] += 1
    per_teacher, contributed = {}, {}
    seen: set[str] = set(UNION_SPECIALS)
    for teacher, slug in zip(teachers, slugs):
        new = sets[slug] - seen
        contributed[slug] = len(new)
        seen |= sets[slug]
        ids = np.unique(union.maps[slug][: teacher.size])
        per_teacher[slug] = {
            "name": teacher.name,
            "tokens": teacher.size,
            "map_size": teacher.map_size,
            "added_to_union": len(new),
            "only_in_this_teacher": int((counts[ids] == 1).sum()),
            "share_of_union": round(len(ids) / union.size, 6),
            "special_roles": {role: teacher.roles.get(role) for role in SPECIAL_ROLES},
        }
    overlaps = {}
    for i, a in enumerate(slugs):
        for b in slugs[i + 1:]:
            shared = len(sets[a] & sets[b])
            overlaps[f"{a}|{b}"] = {
                "shared": shared,
                "jaccard": round(shared / len(sets[a] | sets[b]), 6),
                f"share_of_{a}": round(shared / len(sets[a]), 6),
                f"share_of_{b}": round(shared / len(sets[b]), 6),
            }
    return {
        "union_size": union.size,
        "specials": {role: i for i, role in enumerate(SPECIAL_ROLES)},
        "teachers": per_teacher,
        "overlaps": overlaps,
    }
