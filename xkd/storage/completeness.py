"""Is a cache complete, and if not, what is missing and how to finish it.

A cache is complete when every planned shard is listed as done and the writer marked it
complete. `planned_shards` is written when the cache is created, so a killed run, a shard
whose entry was removed, or one not marked done all show as missing here, and every command
(train-student, evaluate, remap, verify, inspect) says the same thing about them.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .remote import is_url


def completeness(manifest: dict) -> dict:
    """{"complete", "planned_shards", "done_shards", "missing_shards", "missing_rows" (None
    when unknown), "marked_complete"}. Without a plan, the known missing shards are the gaps
    below the highest finished one (shard ids count up from 0)."""
    planned = manifest.get("planned_shards")
    done = {s["id"] for s in manifest["shards"] if s["state"] == "done"}
    done_rows = sum(s["rows"] for s in manifest["shards"] if s["state"] == "done")
    marked = bool(manifest.get("complete"))
    upto = planned if planned is not None else max(done, default=-1) + 1
    missing = [i for i in range(upto) if i not in done]
    complete = marked and not missing
    expected = expected_rows(manifest)
    if complete:
        missing_rows = 0
    elif expected is not None and expected >= done_rows:
        missing_rows = expected - done_rows
    else:
        missing_rows = None
    return {
        "complete": complete,
        "planned_shards": planned,
        "done_shards": len(done),
        "missing_shards": missing,
        "missing_rows": missing_rows,
        "marked_complete": marked,
    }


def expected_rows(manifest: dict) -> int | None:
    """Rows of the finished cache: one per (example, side, mask epoch), when the manifest
    records the corpus's example count, the sides and the mask epochs."""
    corpus, view = manifest.get("corpus") or {}, manifest.get("view") or {}
    examples, sides = corpus.get("examples"), view.get("sides")
    epochs = (view.get("mask") or {}).get("epochs", 1)
    if not isinstance(examples, int) or not isinstance(sides, list) or not sides or not isinstance(epochs, int):
        return None
    return examples * len(sides) * epochs


def id_ranges(ids: list[int], limit: int = 8) -> str:
    """[3, 4, 5, 9] -> "3-5, 9" (at most `limit` ranges, then "...")."""
    ranges: list[list[int]] = []
    for i in ids:
        if ranges and i == ranges[-1][1] + 1:
            ranges[-1][1] = i
        else:
            ranges.append([i, i])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    return ", ".join(parts) + (", ..." if len(ranges) > limit else "")


def what_is_missing(info: dict) -> str:
    """"11 of 15 shards are missing (shards 4-14, 165 rows)", in words."""
    missing, planned = info["missing_shards"], info["planned_shards"]
    if planned is None:
        what = f"it has {info['done_shards']} finished shards, and its manifest does not say how many were planned"
        if missing:
            what += f"; shards {id_ranges(missing)} below the last finished one are missing"
    elif not missing:
        what = f"all {planned} planned shards are done, but the run that wrote it did not finish"
    else:
        noun, verb = ("shard", "is") if len(missing) == 1 else ("shards", "are")
        rows = f", {info['missing_rows']:,} rows" if info["missing_rows"] else ""
        what = f"{len(missing)} of {planned} shards {verb} missing ({noun} {id_ranges(missing)}{rows})"
    if planned is None and info["missing_rows"]:
        what += f"; {info['missing_rows']:,} rows are missing"
    return what


def parent_and_name(root) -> tuple[str, str]:
    """A cache's --out and its own name, for a local path or a URL."""
    if is_url(root):
        parent, _, name = str(root).rstrip("/").rpartition("/")
        return parent, name
    return str(Path(root).parent), Path(root).name


def finish_command(root: str | Path, manifest: dict) -> str | None:
    """The command that finishes the cache at `root`: the one its writer recorded in the
    manifest (`made_by`: the command's arguments but --out, and whether --out is the cache's
    parent, as for cache-teachers, or the cache itself, as for remap), with this location as
    --out. The same settings give the same cache key, so that run resumes this cache and
    computes only what is missing. None for caches written before commands were recorded,
    and for a cache-teachers cache moved under another name (it would write OUT/<teacher>-<key>)."""
    made = manifest.get("made_by")
    if not (isinstance(made, dict) and isinstance(made.get("args"), list) and made.get("out") in ("parent", "self")):
        return None
    parent, name = parent_and_name(root)
    key = manifest.get("key")
    if made["out"] == "parent" and key and not name.endswith(f"-{key}"):
        return None
    return shlex.join([*map(str, made["args"]), "--out", str(root) if made["out"] == "self" else parent])


def how_to_finish(command: str | None) -> str:
    """How to finish a cache, given `finish_command`'s answer."""
    if command is None:
        return ("Finish it by re-running the command that made it, with the same options: it resumes "
                "the cache and computes only the missing shards.")
    return (f"Finish it by re-running the command that made it, with the same options; from its manifest: "
            f"`{command}`. It resumes the cache and computes only the missing shards.")


def incomplete_message(root: str | Path, info: dict, command: str | None) -> str:
    """One paragraph: the cache is incomplete, what is missing, and how to finish it."""
    edited = " although its manifest says it is complete (was the manifest edited?)" if info["marked_complete"] else ""
    return f"cache {root} is incomplete{edited}: {what_is_missing(info)}. {how_to_finish(command)}"
