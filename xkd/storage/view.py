"""A typed view of a cache's manifest: what methods and the loader ask of a cache (its
languages, sides, classes, teacher shape, pooling, what it stores), read once, so that no
caller walks raw manifest dicts with chains of .get()."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .schema import DenseSpec
from .untrusted import parse_json


@dataclass(frozen=True)
class CacheView:
    path: Path | str  # a URL for a cache on object storage
    key: str | None  # the cache key (None: written by hand)
    rows: int  # rows in its finished shards
    bytes: int  # bytes of its finished shards' files
    teacher: str  # the alias or path the teacher was given as
    teacher_identity: str  # weights and tokenizer: caches of one teacher share it, whatever its name
    teacher_model_id: str | None
    teacher_kind: str | None
    teacher_source: str | None
    teacher_path: str
    teacher_layers: int
    teacher_heads: int
    teacher_width: int
    teacher_labels: tuple[str, ...] | None  # class names in the teacher's own id order (classifiers)
    pooling: dict = field(hash=False)  # the teacher's sentence pooling: {"mode": ..., "normalize": ...}
    corpus: str  # corpus_identity: caches of one corpus share it, whatever the teacher
    corpus_spec: str | None  # the corpus as cache-teachers was given it
    corpus_langs: tuple[str, ...]  # (lang,) for a monolingual corpus, (src, tgt) for a parallel one
    corpus_labels: tuple[str, ...] | None  # a labeled corpus's class names, in class-id order
    sides: tuple[str, ...]  # "mono", or the sides of a parallel corpus the teacher saw
    max_length: int
    mask_prob: float | None
    topk_k: int | None
    sample_n: int | None  # draws per masked position (cache-teachers --sample N)
    has_text: bool
    has_pairs: bool  # rows are sentence pairs (segment_b; text_b with the text)
    dense: dict[str, DenseSpec] = field(hash=False)

    @property
    def pair(self) -> tuple[str, str] | None:
        """(src, tgt) languages of a parallel corpus; None for a monolingual one."""
        return (self.corpus_langs[0], self.corpus_langs[1]) if len(self.corpus_langs) == 2 else None

    @property
    def languages(self) -> tuple[str, ...]:
        """The languages of the cache's rows: the corpus language, or those of the cached sides."""
        if not self.corpus_langs:
            return ()
        return tuple(self.corpus_langs[1] if side == "tgt" else self.corpus_langs[0] for side in self.sides)


def corpus_identity(manifest: dict) -> str:
    """Which corpus numbers a cache's example ids: its manifest's corpus fingerprint, split and
    languages (what the cache key hashes of the corpus). Caches of one corpus made by
    different teachers share it, whatever else their corpus blocks record (counts, paths);
    example ids of different corpora are unrelated, so copies are only ever matched within
    one identity. Caches whose manifest names no corpus (written by hand) share one."""
    corpus = manifest.get("corpus") or {}
    return json.dumps([corpus.get("fingerprint"), corpus.get("split"), corpus.get("langs")], sort_keys=True)


def view_of(cache) -> CacheView:
    """The typed view of an open cache (storage.Cache)."""
    m = cache.manifest
    teacher, corpus, view = m.get("teacher") or {}, m.get("corpus") or {}, m.get("view") or {}
    labels = corpus.get("labels")
    return CacheView(
        path=cache.path,
        key=m.get("key"),
        rows=len(cache),
        bytes=sum(int(s.get("bytes") or 0) for s in m.get("shards") or () if s.get("state") == "done"),
        teacher=str(teacher.get("name") or ""),
        teacher_identity=f"{teacher.get('weights_sha256') or teacher.get('model_id')}/{teacher.get('tokenizer_sha256')}",
        teacher_model_id=teacher.get("model_id"),
        teacher_kind=teacher.get("kind"),
        teacher_source=teacher.get("source"),
        teacher_path=str(teacher.get("path") or ""),
        teacher_layers=int(teacher.get("num_layers") or 0),
        teacher_heads=int(teacher.get("num_heads") or 0),
        teacher_width=int(teacher.get("hidden_size") or 0),
        teacher_labels=_teacher_labels(teacher),
        pooling=dict(teacher.get("pooling") or {}),
        corpus=corpus_identity(m),
        corpus_spec=corpus.get("spec"),
        corpus_langs=tuple(str(x) for x in corpus.get("langs") or ()),
        corpus_labels=tuple(str(x) for x in labels) if labels else None,
        sides=tuple(view.get("sides") or ("mono",)),
        max_length=int(view.get("max_length") or 0),
        mask_prob=(view.get("mask") or {}).get("prob"),
        topk_k=cache.topk_k,
        sample_n=cache.sample_n,
        has_text=cache.has_text,
        has_pairs=cache.has_pairs,
        dense=dict(cache.dense_specs),
    )


def _teacher_labels(teacher: dict) -> tuple[str, ...] | None:
    """Class names in id order: recorded in the manifest by cache-teachers, or (caches made
    before it recorded them) read from the teacher's config.json when it is still there."""
    labels = teacher.get("labels")
    if labels is None and teacher.get("kind") == "classifier":
        config = Path(str(teacher.get("path") or "")) / "config.json"
        if config.is_file():
            id2label = parse_json(config.read_text()).get("id2label") or {}
            labels = [id2label[k] for k in sorted(id2label, key=int)]
    return tuple(str(x) for x in labels) if labels else None
