"""`xkd build-vocab`: teachers in, a vocab directory out (layout in vocabdir.py).

The directory is written under a temporary name beside `out` and swapped into place in one
rename (RENAME_EXCHANGE), so a failed or killed run leaves at `out` the previous vocab or the
new one, whole; what a killed run leaves beside it (`.NAME.tmp-PID`) is removed by the next
build once that PID is gone. One build at a time per `out`: a lock beside it
(`.NAME.lock`) refuses a second, naming the first. The same inputs give byte-identical
files, so a vocab already at `out` is kept when the build equals it, and refused (unless
overwrite) when it differs: students and remapped caches made with it name it by its directory.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..durable import fsync_dir
from ..errors import BadInput
from ..names import language_code
from ..storage.manifest import DirLock, pid_alive
from ..storage.untrusted import parse_json, remove_tree
from .canonical import SPECIAL_ROLES
from .teachers import TeacherVocab, load_teacher_vocab
from .tokenizer import default_route, save_union_tokenizer, union_casing
from .union import Union, build_union, teacher_slug, union_report
from .vocabdir import FORMAT, MAPS, META, REPORT, TEACHERS, VOCAB_TXT, file_digests, vocab_hash

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
            meta = parse_json((root / META).read_text(encoding="utf-8"))
            return f"teachers {', '.join(t['name'] for t in meta['teachers'])}, hash {meta['hash']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "unreadable"

    raise BadInput(
        f"--out {out} already holds a different vocab ({described(out)}; this build: {described(tmp)}; "
        f"{', '.join(differ[:3])}{' ...' if len(differ) > 3 else ''} differ). Students and remapped caches made "
        "with it would no longer match it. Give another --out, or pass --overwrite to replace it."
    )


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out {out} is a file; give a directory for the vocab.")
    if out.is_dir() and any(out.iterdir()) and not (out / META).is_file():
        raise BadInput(f"--out {out} is a non-empty directory that is not an xkd vocab; give a new or empty directory.")
    if (out / META).is_file():
        # Replacing the vocab deletes all it holds: never another output written into it.
        for top, _, files in os.walk(out):
            for marker in ("manifest.json", "xkd_student.json", "train_summary.json"):
                if marker in files:
                    raise BadInput(
                        f"--out {out} holds {Path(top) / marker}, which is not a vocab's own file (a cache or a student "
                        "written into the vocab): build-vocab would delete it with the old vocab. Move that directory out "
                        "of the vocab first, or give another --out.")


def _lock(out: Path) -> DirLock:
    """Beside `out`, not in it: the directory itself is swapped for the new one."""
    return DirLock(out.with_name(f".{out.name}.lock"), lambda holder: (
        f"{out} is being built by another build-vocab ({holder}). Two builds into one vocab would replace each "
        "other's files: wait for it to finish (or stop it), then run again."), remove=True)


def _remove_stale(out: Path) -> None:
    """What killed builds of `out` left beside it, each named after its process: a temporary
    vocab (`.NAME.tmp-PID`, after a swap the old vocab being deleted), or the old vocab moved
    aside where no atomic swap exists (`.NAME.old-PID`: put back when `out` is missing, which
    is its only copy then). Only those of processes that are gone: a live PID may be another
    host's build on a shared file system, or a reused PID; its directory is left alone."""
    prefix = f".{out.name}."
    for left in sorted(p for p in out.parent.iterdir() if p.name.startswith(prefix)):
        kind, _, pid = left.name[len(prefix):].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or not left.is_dir() or pid_alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(left, out)
        else:
            remove_tree(left)  # a link is removed, never followed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system has no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the vocab built in `tmp` at `out`, replacing one there in one step: a kill at any
    instant leaves the old vocab or the new one at `out`, whole (deleting the old one used to
    be the first step, and a kill during it left half a vocab)."""
    for path in sorted(tmp.rglob("*")):  # its files on disk before any name points to them
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    if not out.exists():
        os.replace(tmp, out)
    elif _exchange(tmp, out):
        fsync_dir(out.parent)
        remove_tree(tmp)  # the old vocab now (a link if --out was one); a kill here leaves it to _remove_stale
    else:  # no atomic swap: the old vocab aside, then the new one in (_remove_stale puts it back if killed between)
        aside = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, aside)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        remove_tree(aside)
    fsync_dir(out.parent)


def build_vocab(teachers: list[str], out: str | os.PathLike, lang_teacher: dict[str, str] | None = None,
                progress=None, overwrite: bool = False) -> dict:
    """Build the union vocab of `teachers` (aliases, model ids, model or tokenizer dirs, or
    bare vocab files) into `out`; return a summary (sizes, overlaps, paths). A vocab already
    at `out` is kept when it is identical (summary "reused": true), and replaced only with
    `overwrite` when it differs."""
    if not teachers:
        raise BadInput("--teachers: give at least one teacher (an alias, model id, directory or vocab file).")
    out = Path(out)
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Held for the whole build, so that a second build of `out` is refused at once, not after
    # it has replaced the first one's vocab.
    with _lock(out):
        _remove_stale(out)
        return _build(teachers, out, lang_teacher, progress or (lambda msg: None), overwrite)


def _load_teachers(teachers: list[str], say) -> tuple[list[TeacherVocab], list[str], list[str]]:
    """Each teacher's vocabulary, its slug (its name in the vocab directory) and its tokenizer's
    fingerprint; two teachers with one tokenizer are refused."""
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
    return loaded, slugs, fingerprints


def _meta(tmp: Path, union: Union, loaded: list[TeacherVocab], slugs: list[str], fingerprints: list[str],
          routes: dict[str, str]) -> dict:
    """meta.json of the vocab being written in `tmp`: its hash and files' digests are of what
    `tmp` holds, so it is made once every other file is written."""
    return {
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
        "files": file_digests(tmp),
    }


def _build(teachers: list[str], out: Path, lang_teacher: dict[str, str] | None, say, overwrite: bool) -> dict:
    loaded, slugs, fingerprints = _load_teachers(teachers, say)
    routes = _route_slugs(_normalise_routes(lang_teacher or {}), loaded, slugs)

    union = build_union(loaded, slugs)
    report = union_report(union, loaded, slugs)
    _check_out(out)  # again, under the lock
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        (tmp / VOCAB_TXT).write_bytes(("\n".join(union.tokens) + "\n").encode("utf-8"))
        (tmp / MAPS).mkdir()
        for slug in slugs:
            np.save(tmp / MAPS / f"{slug}.npy", union.maps[slug], allow_pickle=False)
        for t, slug in zip(loaded, slugs):
            t.tokenizer.save_pretrained(str(tmp / TEACHERS / slug))
        save_union_tokenizer(tmp, tmp / VOCAB_TXT, loaded)
        _write_json(tmp / REPORT, report)
        meta = _meta(tmp, union, loaded, slugs, fingerprints, routes)
        _write_json(tmp / META, meta)
        reused = _keep_or_refuse(tmp, out, overwrite)
        if reused:
            say(f"{out} already holds this vocab (identical files); kept it")
        else:
            _swap_in(tmp, out)
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
