"""`xkd build-vocab`: teachers in, a vocab directory out (layout in vocabdir.py).

The directory is written under a temporary name and renamed into place, so a failed run
leaves any previous vocab at `out` untouched. The same inputs give byte-identical files, so
a vocab already at `out` is kept when the build equals it, and refused (unless overwrite)
when it differs: students and remapped caches made with it name it by its directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..names import language_code
from .canonical import SPECIAL_ROLES
from .teachers import TeacherVocab, load_teacher_vocab
from .tokenizer import default_route, save_union_tokenizer, union_casing
from .union import build_union, teacher_slug, union_report
from .vocabdir import FORMAT, MAPS, META, REPORT, TEACHERS, VOCAB_TXT, vocab_hash

XKD_VERSION = "0.1.0"


def parse_lang_teacher(values: list[str]) -> dict[str, str]:
    """--lang-teacher hi=mbert (repeatable; also hi=mbert,en=bert-base) -> {lang: teacher}."""
    routes: dict[str, str] = {}
    for value in values:
        for item in value.split(","):
            lang, sep, teacher = item.partition("=")
            if not sep or not lang.strip() or not teacher.strip():
                raise BadInput(f"--lang-teacher {value!r}: each item must be LANG=TEACHER, e.g. hi=mbert.")
            code = language_code(lang.strip(), f"--lang-teacher {value!r}")
            if code in routes:
                raise BadInput(f"--lang-teacher routes language {code!r} twice.")
            routes[code] = teacher.strip()
    return routes


def _normalise_routes(routes: dict[str, str]) -> dict[str, str]:
    """Language codes in BCP-47 case, so that routes match the languages caches record."""
    out: dict[str, str] = {}
    for lang, teacher in routes.items():
        code = language_code(lang, f"--lang-teacher {lang}={teacher}")
        if code in out:
            raise BadInput(f"--lang-teacher routes language {code!r} twice.")
        out[code] = teacher
    return out


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _route_slugs(routes: dict[str, str], teachers: list[TeacherVocab], slugs: list[str]) -> dict[str, str]:
    out = {}
    for lang, key in sorted(routes.items()):
        match = [s for t, s in zip(teachers, slugs) if key in (t.name, s, t.model_id, t.path)]
        if not match:
            raise BadInput(
                f"--lang-teacher {lang}={key}: {key!r} is not one of --teachers ({', '.join(t.name for t in teachers)})."
            )
        out[lang] = match[0]
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _keep_or_refuse(tmp: Path, out: Path, overwrite: bool) -> bool:
    """True when `out` already holds exactly what was built in `tmp` (keep it); raise when it
    holds another vocab and `overwrite` is off; False to replace it (or create it)."""
    if not (out / META).is_file():
        return False
    new, old = _files(tmp), _files(out)
    if new == old:
        return True
    if overwrite:
        return False
    differ = sorted(name for name in new.keys() | old.keys() if new.get(name) != old.get(name))

    def described(root: Path) -> str:
        try:
            meta = json.loads((root / META).read_text(encoding="utf-8"))
            return f"teachers {', '.join(t['name'] for t in meta['teachers'])}, hash {meta['hash']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "unreadable"

    raise BadInput(
        f"--out {out} already holds a different vocab ({described(out)}; this build: {described(tmp)}; "
        f"{', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''} differ). Students and remapped caches made "
        "with it would no longer match it. Give another --out, or pass --overwrite to replace it."
    )


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; give a directory for the vocab.")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise BadInput(f"--out {out} is a non-empty directory that is not an xkd vocab; give a new or empty directory.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def build_vocab(teachers: list[str], out: str | os.PathLike, lang_teacher: dict[str, str] | None = None,
                progress=None, overwrite: bool = False) -> dict:
    """Build the union vocab of `teachers` (aliases, model ids, model or tokenizer dirs, or
    bare vocab files) into `out`; return a summary (sizes, overlaps, paths). A vocab already
    at `out` is kept when it is identical (summary "reused": true), and replaced only with
    `overwrite` when it differs."""
    say = progress or (lambda msg: None)
    if not teachers:
        raise BadInput("--teachers: give at least one teacher (an alias, model id, directory or vocab file).")
    out = Path(out)
    loaded: list[TeacherVocab] = []
    for name in teachers:
        say(f"reading the vocabulary of {name}")
        loaded.append(load_teacher_vocab(name))
    slugs: list[str] = []
    fingerprints: list[str] = []
    for t in loaded:
        fp = t.fingerprint
        if fp in fingerprints:
            twin = loaded[fingerprints.index(fp)].name
            raise BadInput(f"--teachers {twin!r} and {t.name!r} have the same tokenizer; give each teacher once.")
        fingerprints.append(fp)
        slugs.append(teacher_slug(t.name, set(slugs)))
    routes = _route_slugs(_normalise_routes(lang_teacher or {}), loaded, slugs)

    union = build_union(loaded, slugs)
    report = union_report(union, loaded, slugs)
    tmp = _prepare_out(out)
    try:
        (tmp / VOCAB_TXT).write_bytes(("\n".join(union.tokens) + "\n").encode("utf-8"))
        (tmp / MAPS).mkdir()
        for slug in slugs:
            np.save(tmp / MAPS / f"{slug}.npy", union.maps[slug], allow_pickle=False)
        for t, slug in zip(loaded, slugs):
            t.tokenizer.save_pretrained(str(tmp / TEACHERS / slug))
        save_union_tokenizer(tmp, tmp / VOCAB_TXT, loaded)
        _write_json(tmp / REPORT, report)
        meta = {
            "format": FORMAT,
            "xkd_version": XKD_VERSION,
            "size": union.size,
            "hash": vocab_hash(tmp, slugs),
            "specials": {role: i for i, role in enumerate(SPECIAL_ROLES)},
            "teachers": [
                {
                    "name": t.name, "slug": slug, "model_id": t.model_id, "source": t.source, "path": t.path,
                    "convention": t.convention, "tokenizer_hash": fp,
                    "tokens": t.size, "map_size": t.map_size, "lowercase": t.lowercase,
                    "strip_accents": t.strip_accents, "special_roles": {r: t.roles.get(r) for r in SPECIAL_ROLES},
                    "langs": sorted(lang for lang, s in routes.items() if s == slug),
                }
                for t, slug, fp in zip(loaded, slugs, fingerprints)
            ],
            "routes": routes,
            "default_teacher": default_route(loaded, slugs),
            "union_tokenizer": union_casing(loaded),
        }
        _write_json(tmp / META, meta)
        reused = _keep_or_refuse(tmp, out, overwrite)
        if reused:
            say(f"{out} already holds this vocab (identical files); kept it")
        else:
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {
        "vocab_dir": str(out),
        "size": union.size,
        "hash": meta["hash"],
        "teachers": {slug: report["teachers"][slug] for slug in slugs},
        "overlaps": report["overlaps"],
        "routes": routes,
        "default_teacher": meta["default_teacher"],
        "reused": reused,
    }


def format_summary(summary: dict) -> str:
    kept = " (already there, identical: kept)" if summary.get("reused") else ""
    lines = [f"{summary['vocab_dir']}: union of {len(summary['teachers'])} teachers, {summary['size']:,} tokens{kept}"]
    for slug, t in summary["teachers"].items():
        lines.append(
            f"  {slug:<28} {t['tokens']:>8,} tokens, {t['added_to_union']:>8,} added to the union, "
            f"{t['only_in_this_teacher']:>8,} only here, {100 * t['share_of_union']:5.1f}% of the union"
        )
    for pair, o in summary["overlaps"].items():
        lines.append(f"  overlap {pair}: {o['shared']:,} shared (Jaccard {o['jaccard']:.3f})")
    routes = ", ".join(f"{lang}->{slug}" for lang, slug in summary["routes"].items())
    lines.append(f"  tokenize: {routes + ', ' if routes else ''}other languages->{summary['default_teacher']}")
    return "\n".join(lines)
