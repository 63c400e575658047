"""Rewrite a cache's shards with other dense codecs or attention layout (same rows, same
values): how a schema-1 cache becomes a schema-2 one, and how the benchmarks compare layouts."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .reader import open_cache
from .schema import RAGGED_COLUMNS, ragged_from_arrow
from .shard import DEFAULT_ROW_GROUP_SIZE, write_shard_files
from .writer import CacheWriter, outputs_json


def rewrite_cache(source: str | os.PathLike, out: str | os.PathLike, *, codec: str = "none",
                  attention_layout: str = "keys", row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> Path:
    """Every dense output of `source` in `codec`, attention in `attention_layout`, written by
    today's writer to `out` (a new cache with the same key, rows and values)."""
    old = open_cache(source)
    heads = int((old.manifest.get("teacher") or {}).get("num_heads") or 0)
    specs = {name: replace(spec, codec=codec, **({"layout": attention_layout,
                                                   "heads": heads if attention_layout == "keys" else 0}
                                                  if name.startswith("attn.") else {}))
             for name, spec in old.dense_specs.items()}
    meta = {key: old.manifest[key] for key in ("teacher", "corpus", "view")}
    meta["outputs"] = {**old.manifest["outputs"], "dense": outputs_json(None, specs)["dense"]}
    with CacheWriter(out, old.manifest["key"], meta, planned_shards=len(old.shard_ids)) as writer:
        for shard in old.shard_ids:
            table = old.read_table(shard)
            rows = {name: ragged_from_arrow(table[name]) if name in RAGGED_COLUMNS
                    else table[name].to_numpy(zero_copy_only=False)
                    for name in table.column_names if name not in ("token_offset", "word_offset")}
            blocks = [old.read_block(shard, rg) for rg in range(len(old.row_groups(shard)))]
            dense = {name: np.concatenate([b.dense[name] for b in blocks]) for name in specs}
            writer.commit(write_shard_files(out, shard, rows, dense, specs, has_topk=old.topk_k is not None,
                                            has_text=old.has_text, has_pairs=old.has_pairs,
                                            row_group_size=row_group_size, topk_codec=old.topk_codec,
                                            has_sample=old.sample_n is not None))
        writer.finish()
    return Path(out)
