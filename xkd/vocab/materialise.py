"""`xkd remap`: write a copy of a cache whose ids are in a union vocabulary.

Students normally remap as they read (docs/design.md, "The cache"): one cache serves every union it takes part
in. A materialised copy trades disk for a loader that does no remapping, and lets tools
that know nothing of xkd's maps read union ids directly. The copy is a cache like any other
(same shards, row groups, dense arrays and checks, `xkd verify` passes), and its manifest
says which vocab its ids are in:

    "vocab": {"hash", "size", "dir", "teacher", "specials", "source_cache": {"path", "key"}}

The copy is written shard by shard through CacheWriter, so an interrupted run resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..storage import Cache, CacheWriter, Ragged, cache_key, open_cache, write_shard_files
from ..storage.remote import absolute, is_url, location
from .vocabdir import ID_COLUMNS, Vocab, load_vocab

# Keys the cache writer owns; everything else in a manifest describes the cache and is copied.
_WRITER_KEYS = {"schema_version", "xkd_version", "key", "planned_shards", "complete", "shards", "totals"}


def needs_remap(manifest: dict, vocab: Vocab) -> bool:
    """False when a cache's ids are already in `vocab` (a materialised copy), True when they
    are teacher ids; an error when they are in another union."""
    held = manifest.get("vocab")
    if not held:
        return True
    if held.get("hash") != vocab.hash:
        raise BadInput(
            f"the cache's ids are in the union vocab {held.get('dir')} (hash {held.get('hash')}), not in "
            f"{vocab.path} (hash {vocab.hash}). Use that vocab, or the original teacher-id cache "
            f"{held.get('source_cache', {}).get('path')}."
        )
    return False


def _concat_columns(blocks: list[dict]) -> dict:
    out = {}
    for name in blocks[0]:
        parts = [b[name] for b in blocks]
        out[name] = Ragged.concat(parts) if isinstance(parts[0], Ragged) else np.concatenate(parts)
    return out


def check_copy_out(out: Path, cache: Path, vocab_dir: Path) -> None:
    """The copy's --out, before anything is read: not the source cache or the vocab, not inside
    them or holding them, and not inside another cache (as train-student refuses for a
    student): the copy's manifest and shards would mix with the files there."""
    resolved = out.resolve()
    for what, given in (("the cache to remap", cache), ("the vocab given with --vocab", vocab_dir)):
        root = given.resolve()
        where = "is" if resolved == root else "is inside" if root in resolved.parents else \
            "holds" if resolved in root.parents else None
        if where:
            raise BadInput(f"--out {out} {where} {what}, {given}: the copy's manifest and shards would be written "
                           "among its files. Give a directory of its own (e.g. caches/NAME-union).")
    for parent in resolved.parents:
        if (parent / "manifest.json").is_file():
            raise BadInput(f"--out {out} is inside the cache directory {parent} (it holds manifest.json): the copy would "
                           "mix with that cache. Give a directory of its own (e.g. caches/NAME-union).")
    # A cache's own writer (a remap stopped before its manifest) leaves only these; anything else
    # is someone else's directory (a student, a teacher), where a manifest and shards/ would mix in.
    if out.is_dir() and not (out / "manifest.json").is_file():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ("shards", ".lock", ".damaged")
                         and not p.name.startswith(".manifest.json.tmp-"))
        if foreign:
            raise BadInput(f"--out {out} is a non-empty directory that is not a cache (it holds "
                           f"{', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}): the copy's manifest.json "
                           "and shards/ would be written among its files. Give a new or empty directory (e.g. "
                           "caches/NAME-union), or the directory of an earlier remap of this cache to resume it.")


def _copy_meta(src: Cache, vocab: Vocab, slug: str) -> dict:
    """The copy's manifest metadata: the source's description (what its writer does not own),
    which vocab its ids are in and the cache they come from, and the command that made it."""
    manifest = src.manifest
    meta = {k: v for k, v in manifest.items() if k not in _WRITER_KEYS}
    meta["vocab"] = {
        "hash": vocab.hash,
        "size": vocab.size,
        "dir": str(vocab.path.resolve()),
        "teacher": slug,
        "specials": vocab.special_ids,
        "source_cache": {"path": absolute(src.path), "key": manifest.get("key")},
    }
    meta["made_by"] = {"args": ["xkd", "remap", absolute(src.path), "--vocab", str(vocab.path.resolve())], "out": "self"}
    return meta


def _remapped_shard(src: Cache, vocab: Vocab, slug: str, shard_id: int) -> tuple[dict, dict]:
    """One shard of `src` with its ids in `vocab`: its columns (ids unsigned, as the cache schema
    stores them) and its dense arrays, each whole."""
    columns, dense = [], {name: [] for name in src.dense_specs}
    for block in src.iter_blocks(shards=[shard_id]):
        remapped = vocab.remap_columns(block.columns, slug)
        for name in ID_COLUMNS:  # the cache schema stores ids unsigned
            if name in remapped:
                remapped[name] = Ragged(remapped[name].values.astype(np.uint32), remapped[name].offsets)
        columns.append(remapped)
        for name in dense:
            dense[name].append(block.dense[name])
    return _concat_columns(columns), {name: np.concatenate(parts) for name, parts in dense.items()}


def remap_cache(cache: str | os.PathLike, vocab: str | os.PathLike | Vocab, out: str | os.PathLike,
                teacher: str | None = None, progress=None) -> dict:
    """Write a union-vocab copy of `cache` to `out`; return a summary."""
    say = progress or (lambda msg: None)
    out = location(out)
    if not is_url(out):
        check_copy_out(out, Path(cache), vocab.path if isinstance(vocab, Vocab) else Path(vocab))
    src = open_cache(cache)
    vocab = vocab if isinstance(vocab, Vocab) else load_vocab(vocab)
    manifest = src.manifest
    if manifest.get("vocab"):
        raise BadInput(
            f"{src.path} already holds union ids (vocab {manifest['vocab'].get('dir')}); remap its source cache "
            f"{manifest['vocab'].get('source_cache', {}).get('path')} instead."
        )
    if not src.complete:
        raise BadInput(f"{src.incomplete_message()} A union-vocab copy needs the whole cache.")
    entry = vocab.teacher(teacher) if teacher else vocab.teacher(manifest)
    slug = entry["slug"]
    meta = _copy_meta(src, vocab, slug)
    key = cache_key(manifest.get("teacher", {}), manifest.get("corpus", {}),
                    {"source_key": manifest.get("key"), "vocab": vocab.hash, "teacher_map": slug})
    has_topk = bool(src.topk_k)
    rows_written = 0
    with CacheWriter(out, key, meta, planned_shards=len(src.shard_ids)) as writer:
        done = writer.done_shards()
        for shard_id in src.shard_ids:
            if shard_id in done:
                continue
            rows, dense_arrays = _remapped_shard(src, vocab, slug, shard_id)
            record = write_shard_files(
                out, shard_id, rows, dense_arrays, src.dense_specs, has_topk=has_topk, has_text=src.has_text,
                has_pairs=src.has_pairs, row_group_size=src.row_groups(shard_id)[0],
                # q8 values are read decoded and encoded again: the same codes (storage/codec.py)
                topk_codec=src.topk_codec, has_sample=src.sample_n is not None,
            )
            writer.commit(record)
            rows_written += record["rows"]
            say(f"shard {shard_id:05d}: {record['rows']} rows remapped")
        final = writer.finish()
    return {
        "cache": str(out),
        "source": str(src.path),
        "vocab_dir": str(vocab.path),
        "vocab_hash": vocab.hash,
        "teacher": slug,
        "rows": final["totals"]["rows"],
        "rows_written_now": rows_written,
        "shards": len(final["shards"]),
        "bytes": final["totals"]["bytes"],
    }
