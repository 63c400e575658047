"""`xkd inspect`: what a cache holds and what it costs, from the manifest, plus whether it
is complete and what every reader's cheap checks on open say (`damaged`)."""

from __future__ import annotations

import os

from ..errors import BadInput
from .completeness import completeness, finish_command, how_to_finish, what_is_missing
from .manifest import read_manifest
from .reader import Cache


def inspect_cache(path: str | os.PathLike) -> dict:
    manifest = read_manifest(path)
    shards = [s for s in manifest["shards"] if s["state"] == "done"]
    totals = {k: sum(s[k] for s in shards) for k in ("rows", "tokens", "masked", "bytes")}
    per_output: dict[str, int] = {}
    langs: dict[str, int] = {}
    for s in shards:
        for name, size in (s.get("bytes_by_output") or {}).items():
            per_output[name] = per_output.get(name, 0) + size
        for lang, n in (s.get("langs") or {}).items():
            langs[lang] = langs.get(lang, 0) + n
    outputs = manifest.get("outputs") or {}
    present = (["topk"] if outputs.get("topk") else []) + (["sample"] if outputs.get("sample") else []) \
        + sorted(outputs.get("dense") or {})

    def ratio(n, d):
        return round(n / d, 3) if d else None

    return {
        "cache": str(path),
        "key": manifest.get("key"),
        **_completeness(path, manifest),
        "damaged": _damage(path),
        "shards": len(shards),
        **totals,
        "outputs": present,
        "topk_k": (outputs.get("topk") or {}).get("k"),
        "topk_codec": (outputs.get("topk") or {}).get("codec", "fp16") if outputs.get("topk") else None,
        "sample_n": (outputs.get("sample") or {}).get("n"),
        "sample_seed": (outputs.get("sample") or {}).get("seed"),
        "teacher": (manifest.get("teacher") or {}).get("name"),
        "inputs": "sentence pairs" if outputs.get("pairs") else "single texts",
        "languages": dict(sorted(langs.items())),
        "bytes_by_output": {
            name: {
                "bytes": size,
                "per_token": ratio(size, totals["tokens"]),
                "per_masked_position": ratio(size, totals["masked"]),
            }
            for name, size in sorted(per_output.items())
        },
        "bytes_per_token": ratio(totals["bytes"], totals["tokens"]),
        "bytes_per_masked_position": ratio(totals["bytes"], totals["masked"]),
    }


def _damage(path) -> str | None:
    """What a reader would refuse on open (the metadata files' sizes and hashes), in words,
    and whether each shard's Parquet footer holds the rows the report counts from the
    manifest (footers only: a few kB per shard)."""
    try:
        cache = Cache(path)
        for shard_id in cache.shard_ids:
            cache.parquet_file(shard_id)
    except BadInput as e:
        return str(e)
    return None


def _completeness(path, manifest: dict) -> dict:
    info = completeness(manifest)
    return {
        "complete": info["complete"],
        "planned_shards": info["planned_shards"],
        "missing_shards": info["missing_shards"],
        "missing_rows": info["missing_rows"],
        # In words, for the text output: what is missing and the command that finishes it.
        "incomplete": None if info["complete"] else
        f"{what_is_missing(info)}. {how_to_finish(finish_command(path, manifest))}",
    }


def _details(info: dict) -> str:
    """How top-k and the draws are stored, for the outputs line."""
    parts = []
    if info["topk_k"]:
        parts.append(f"top-k k={info['topk_k']}, codec {info['topk_codec']}")
    if info["sample_n"]:
        parts.append(f"sampled N={info['sample_n']}, seed {info['sample_seed']}")
    return f" ({'; '.join(parts)})" if parts else ""


def format_inspect(info: dict) -> str:
    lines = [
        f"cache      {info['cache']}  (key {info['key']}, {'complete' if info['complete'] else 'INCOMPLETE'})",
        *([f"INCOMPLETE {info['incomplete']}"] if info["incomplete"] else []),
        f"teacher    {info['teacher']}",
        f"rows       {info['rows']:,} in {info['shards']} shards ({info['inputs']})",
        f"tokens     {info['tokens']:,}",
        f"masked     {info['masked']:,} positions",
        f"outputs    {', '.join(info['outputs']) or 'none'}" + _details(info),
        "languages  " + (", ".join(f"{k} {v:,}" for k, v in info["languages"].items()) or "none"),
        f"bytes      {info['bytes']:,} ({info['bytes_per_token']} per token, "
        f"{info['bytes_per_masked_position']} per masked position)",
        "",
        f"{'column / array':<20}{'bytes':>14}{'per token':>12}{'per masked':>12}",
    ]
    for name, b in info["bytes_by_output"].items():
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(f"{name:<20}{b['bytes']:>14,}{fmt(b['per_token']):>12}{fmt(b['per_masked_position']):>12}")
    return "\n".join(lines)
