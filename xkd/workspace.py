"""The workspace: one root holding caches/, vocabs/ and students/, so that

    xkd cache-teachers --teacher bert-base --corpus opus-en-hi
    xkd build-vocab --teachers mbert muril
    xkd train-student --method mergedistill

work as typed (docs/design.md, "Command-line contract"). The root is `--workspace`, else
$XKD_HOME, else ./xkd-runs. Each default is taken only when it is the one candidate; an
ambiguous default is a BadInput listing the candidates and the option that chooses, never a
silent pick. Explicit paths bypass all of this.

This module sits beside the CLI (it reads caches, vocabs and students' summaries, and asks
the method registry which caches a method can learn from); nothing below imports it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInput
from .storage.remote import WILDCARD, glob_urls, is_url, location
from .storage.view import view_of

HOME_ENV = "XKD_HOME"
DEFAULT_ROOT = "xkd-runs"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def find(cls, option: str | os.PathLike | None = None) -> "Workspace":
        """--workspace, else $XKD_HOME, else ./xkd-runs (made when something is written)."""
        chosen = option or os.environ.get(HOME_ENV) or DEFAULT_ROOT
        if is_url(chosen):  # caches only: `xkd ls` lists them (describe)
            return cls(location(chosen))
        root = Path(chosen).expanduser()
        if root.exists() and not root.is_dir():
            source = "--workspace" if option else (f"${HOME_ENV}" if os.environ.get(HOME_ENV) else "the default workspace")
            raise BadInput(f"{source} {root} is a file, not a directory: give a directory for caches/, vocabs/ and "
                           "students/ (--workspace DIR or XKD_HOME=DIR).")
        return cls(root)

    @property
    def caches(self) -> Path:
        return self.root / "caches"

    @property
    def vocabs(self) -> Path:
        return self.root / "vocabs"

    @property
    def students(self) -> Path:
        return self.root / "students"

    def cache_dirs(self) -> list[Path]:
        return _children_with(self.caches, "manifest.json")

    def vocab_dirs(self) -> list[Path]:
        from .vocab.vocabdir import META

        return _children_with(self.vocabs, META)

    def student_dirs(self) -> list[Path]:
        """Students: directories under students/ holding a summary, a config or checkpoints."""
        from .student.export import SUMMARY

        if not self.students.is_dir():
            return []
        return sorted(p for p in self.students.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and any((p / name).exists() for name in (SUMMARY, "config.json", "checkpoints")))

    def vocab_dir_for(self, teachers: list[str]) -> Path:
        """vocabs/<teacher>+<teacher>: named after the teachers, as build-vocab's slugs are."""
        from .vocab.union import teacher_slug

        slugs: list[str] = []
        for teacher in teachers:
            slugs.append(teacher_slug(teacher, set(slugs)))
        return self.vocabs / "+".join(slugs)

    def new_student_dir(self, method: str) -> Path:
        """students/<method>-NNN, one past the highest number of that method so far, made here:
        mkdir is atomic, so two runs started at once never get the same number (the one that
        loses the race takes the next). train-student then locks it, and removes it again if
        it leaves it empty."""
        self.students.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in self.students.iterdir()
                 if (m := re.fullmatch(re.escape(method) + r"-(\d+)", p.name))]
        number = max(taken, default=0) + 1
        while True:
            path = self.students / f"{method}-{number:03d}"
            try:
                path.mkdir()
                return path
            except FileExistsError:
                number += 1


def remove_if_empty(path: Path) -> None:
    """Remove a directory only if nothing was written in it (the numbered --out of a run
    refused before it wrote anything)."""
    with contextlib.suppress(OSError):  # ENOTEMPTY: the run wrote there
        path.rmdir()


def _children_with(parent: Path, marker: str) -> list[Path]:
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if (p / marker).is_file())


# --caches: several paths after one flag, and globs ---------------------------------------


def expand_cache_paths(values: list[str]) -> list[str]:
    """Each --caches value as given, or the sorted matches of a quoted glob (the shell expands
    unquoted ones). A glob that matches nothing is an error, not an empty list."""
    out: list[str] = []
    for value in values:
        if is_url(value):
            value = str(location(value))
            if not WILDCARD.search(value):
                out.append(value)
                continue
            matches = glob_urls(value, "manifest.json")
            if not matches:
                raise BadInput(f"--caches {value}: the pattern matches no cache on the object store (no "
                               "PREFIX/manifest.json under it). Check the pattern and the bucket.")
            out.extend(matches)
        elif WILDCARD.search(value) and not Path(value).exists():
            matches = sorted(glob.glob(os.path.expanduser(value)))
            if not matches:
                raise BadInput(f"--caches {value}: the pattern matches no file or directory. Check the pattern, or run "
                               "`xkd ls` to see the workspace's caches.")
            out.extend(matches)
        else:
            out.append(value)
    # One cache twice (typed twice, or two paths to one directory) would weigh its rows double
    # in training and be scored twice by evaluate.
    seen: dict[Path | str, str] = {}
    for value in out:
        resolved = value if is_url(value) else Path(value).expanduser().resolve()
        if resolved in seen:
            same = "is given twice" if seen[resolved] == value else f"and --caches {seen[resolved]} are one directory"
            raise BadInput(f"--caches {value} {same} ({resolved}): each cache would count twice. Give each cache once.")
        seen[resolved] = value
    return out


def spread_multi_value_options(argv: list[str], options=("--caches",)) -> list[str]:
    """`--caches a b c` -> `--caches a --caches b --caches c`: click options take one value
    each, but a shell glob gives several. Values run until the next token that starts with
    '-'; give positional arguments (evaluate's MODEL) before --caches."""
    out: list[str] = []
    current, taken = None, 0
    for token in argv:
        if token in options:
            current, taken = token, 0
        elif current and not token.startswith("-"):  # "--" and the next option end the values
            if taken:
                out.append(current)
            taken += 1
        else:
            current = None
        out.append(token)
    return out


# Defaults for train-student --------------------------------------------------------------


def default_caches(ws: Workspace, method: str, options: dict, student=None, allow_incomplete: bool = False) -> list[str]:
    """The workspace caches `method` can learn from, when no two of them would feed the rows of
    one language to one teacher; otherwise a BadInput listing the candidates and how to choose
    (--caches)."""
    from .storage import open_cache
    from .student.methods import cannot_use, method_config

    method_config(method, options)  # an unknown method or option is the error to report, not the caches
    dirs = ws.cache_dirs()
    if not dirs:
        raise BadInput(f"--caches: not given, and the workspace {ws.caches} holds no cache. Make one with "
                       "`xkd cache-teachers --teacher T --corpus C` (it writes there), or give --caches DIR [DIR ...].")
    usable, refused = [], []
    for path in dirs:
        cache = open_cache(path)
        if not cache.complete and not allow_incomplete:
            refused.append(f"{path.name} (incomplete: finish it with the same cache-teachers command, or give "
                           "--allow-incomplete)")
            continue
        reason = cannot_use(method, options, cache, student)
        if reason:
            refused.append(f"{path.name} ({reason})")
        else:
            usable.append(cache)
    if not usable:
        raise BadInput(f"--caches: not given, and no cache in {ws.caches} suits --method {method}: "
                       + "; ".join(refused) + ". Cache what the method needs (`xkd methods " + method
                       + "` lists it), or give --caches.")
    _refuse_a_language_fed_twice(ws, method, [view_of(cache) for cache in usable])
    return [str(c.path) for c in usable]


def _refuse_a_language_fed_twice(ws: Workspace, method: str, views: list) -> None:
    """Caches of different languages are one training set, whatever their corpora (MergeDistill:
    an English teacher over an English corpus, a Hindi one over a Hindi corpus). Two caches
    that would give one teacher's rows of one language are a choice only the user can make:
    two corpora of that language, or one corpus cached twice with other settings."""
    feeds: dict[tuple[str, str], list] = {}
    for view in views:
        for lang in view.languages or ("",):  # "": the manifest names no language
            feeds.setdefault((view.teacher_identity, lang), []).append(view)
    clashes = []
    for (_, lang), group in feeds.items():
        corpora: dict[str, list] = {}
        for view in group:
            corpora.setdefault(view.corpus, []).append(view)
        if len(corpora) > 1:
            listed = "; ".join(f"{same[0].corpus_spec}: " + " ".join(str(v.path) for v in same) for same in corpora.values())
            language = f"language {lang}" if lang else "no language recorded"
            clashes.append(f"teacher {group[0].teacher}, {language}: {len(corpora)} corpora ({listed})")
    if clashes:
        raise BadInput(f"--caches: not given, and the workspace holds caches that --method {method} can use which give "
                       f"one teacher's rows of one language from several corpora: {'; '.join(clashes)}. Caches of "
                       f"different languages train together, but which corpus a language comes from is yours to choose: "
                       f"give --caches DIR [DIR ...] (globs work, e.g. --caches '{ws.caches}/mbert-*').")
    # a cache of two languages is in two groups: each set of twins once
    twins = list({tuple(str(v.path) for v in group): group for group in feeds.values() if len(group) > 1}.values())
    if twins:
        listed = "; ".join(" and ".join(f"{v.path} (max length {v.max_length}, top-k {v.topk_k}, mask {v.mask_prob}, "
                                        f"key {v.key})" for v in group) for group in twins)
        raise BadInput(f"--caches: not given, and the workspace holds several caches of one teacher over one corpus "
                       f"({listed}). Choose with --caches DIR [DIR ...].")


def default_vocab(ws: Workspace, caches: list[str], say=None) -> str:
    """The workspace vocab that covers every cache's teacher, built (and said so) when there is
    none; several is a BadInput listing them and --vocab."""
    from .storage import open_cache
    from .vocab import load_vocab
    from .vocab.build import build_vocab

    opened = [open_cache(c) for c in caches]
    covering = []
    for path in ws.vocab_dirs():
        vocab = load_vocab(path)
        try:
            for cache in opened:
                vocab.teacher(cache.manifest)
        except BadInput:
            continue
        covering.append(path)
    if len(covering) == 1:
        return str(covering[0])
    if len(covering) > 1:
        raise BadInput(f"--vocab: not given, and {len(covering)} vocabs in {ws.vocabs} cover the caches' teachers ("
                       + ", ".join(str(p) for p in covering) + "). Choose one with --vocab DIR.")
    teachers, routes = _teachers_and_routes([view_of(c) for c in opened])
    out = ws.vocab_dir_for(teachers)
    n = 2
    while out.exists():  # a vocab of the same names but other tokenizers (it did not cover the caches)
        out, n = out.with_name(f"{ws.vocab_dir_for(teachers).name}-{n}"), n + 1
    (say or (lambda msg: None))(f"no vocab in {ws.vocabs} covers the caches' teachers; building {out} from "
                                + ", ".join(teachers) + " (xkd build-vocab)")
    build_vocab(teachers, out, routes, progress=say)
    return str(out)


def _teachers_and_routes(views: list) -> tuple[list[str], dict[str, str]]:
    """Each distinct teacher once (its local directory when it still exists, else its name),
    and each language routed to its teacher when exactly one teacher cached it, so the
    student tokenizes each language as it saw it in training."""
    teachers: list[str] = []
    seen: dict[str, str] = {}
    langs: dict[str, set[str]] = {}
    for view in views:
        key = view.teacher_identity
        if key not in seen:
            path = view.teacher_path
            seen[key] = path if path and Path(path).is_dir() else (view.teacher or view.teacher_model_id)
            teachers.append(seen[key])
        for lang in view.corpus_langs:
            langs.setdefault(lang, set()).add(seen[key])
    routes = {lang: next(iter(ts)) for lang, ts in langs.items() if len(ts) == 1} if len(teachers) > 1 else {}
    return teachers, routes


def trained_vocab(model_dir: str | os.PathLike) -> Path | None:
    """The vocab dir an xkd student was trained with, as its summary names it, if it still exists."""
    from .student.export import SUMMARY, read_json

    summary = read_json(Path(model_dir) / SUMMARY)
    vocab = summary.get("vocab") if isinstance(summary, dict) else None
    return Path(vocab) if vocab and Path(vocab).is_dir() else None


# xkd ls ----------------------------------------------------------------------------------


def describe(ws: Workspace) -> dict:
    """What the workspace holds: caches, vocabs and students, each a dict of plain values.
    A workspace that does not exist is refused: listing it as empty would hide a mistyped path.
    A workspace on object storage (--workspace s3://...) holds caches only: those under
    URL/caches/ (as cache-teachers --out URL/caches writes them) and directly under URL."""
    if is_url(ws.root):
        found = glob_urls(f"{ws.root}/caches/*", "manifest.json") + glob_urls(f"{ws.root}/*", "manifest.json")
        return {"workspace": str(ws.root), "caches": [_describe_cache(url) for url in found], "vocabs": [], "students": []}
    if not ws.root.is_dir():
        raise BadInput(f"workspace {ws.root} does not exist (from --workspace, ${HOME_ENV} or the default ./{DEFAULT_ROOT}): "
                       "give the directory that cache-teachers, build-vocab and train-student wrote to.")
    return {
        "workspace": str(ws.root),
        "caches": [_describe_cache(p) for p in ws.cache_dirs()],
        "vocabs": [_describe_vocab(p) for p in ws.vocab_dirs()],
        "students": [_describe_student(p) for p in ws.student_dirs()],
    }


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _describe_cache(path) -> dict:
    from .storage import open_cache

    try:
        cache = open_cache(path)
    except Exception as e:  # a damaged cache is listed, not fatal to the listing
        return {"path": str(path), "error": str(e).split(". ")[0]}
    view = view_of(cache)
    named = [f"top-{view.topk_k}" if view.topk_k else None, *sorted(view.dense), "pairs" if view.has_pairs else None]
    return {
        "path": str(path),
        "teacher": view.teacher,
        "corpus": view.corpus_spec,
        "languages": list(view.corpus_langs),
        "rows": view.rows,
        "outputs": [o for o in named if o],
        "bytes": view.bytes if is_url(path) else _dir_bytes(path),  # on disk: with what a run left beside the shards
        "complete": bool(cache.complete),
    }


def _describe_vocab(path: Path) -> dict:
    from .vocab import load_vocab

    try:
        vocab = load_vocab(path)
    except Exception as e:
        return {"path": str(path), "error": str(e).split(". ")[0]}
    return {"path": str(path), "teachers": [t["name"] for t in vocab.teachers], "size": vocab.size,
            "routes": vocab.routes}


def _describe_student(path: Path) -> dict:
    from .student.export import EVALUATION, SUMMARY, read_json

    summary = read_json(path / SUMMARY) or {}
    evaluation = read_json(path / EVALUATION)
    checkpoints = sorted((path / "checkpoints").glob("step-*")) if (path / "checkpoints").is_dir() else []
    status = "finished" if summary and not summary.get("partial") else (
        "stopped (resume with --resume)" if checkpoints or summary else "no run recorded")
    return {
        "path": str(path),
        "method": summary.get("method"),
        "caches": summary.get("caches") or [],
        "steps": summary.get("steps"),
        "status": status,
        "final": summary.get("final") or {},
        "evaluation": evaluation or {},
    }


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_listing(info: dict) -> str:
    lines = [f"workspace {info['workspace']}"]
    lines.append(f"\ncaches ({len(info['caches'])})")
    for c in info["caches"]:
        if "error" in c:
            lines.append(f"  {Path(c['path']).name}: unreadable: {c['error']}")
            continue
        lines.append(f"  {Path(c['path']).name}: {c['teacher']} on {c['corpus']} ({', '.join(c['languages'] or [])}), "
                     f"{c['rows']:,} rows, {', '.join(c['outputs']) or 'ids only'}, {_size(c['bytes'])}, "
                     + ("complete" if c["complete"] else "INCOMPLETE"))
    lines.append(f"\nvocabs ({len(info['vocabs'])})")
    for v in info["vocabs"]:
        lines.append(f"  {Path(v['path']).name}: " + (f"unreadable: {v['error']}" if "error" in v else
                     f"{' + '.join(v['teachers'])}, {v['size']:,} tokens"))
    lines.append(f"\nstudents ({len(info['students'])})")
    for s in info["students"]:
        caches = ", ".join(Path(c).name for c in s["caches"])
        final = ", ".join(f"{k} {v:.4g}" for k, v in s["final"].items() if isinstance(v, (int, float)))
        lines.append(f"  {Path(s['path']).name}: {s['method'] or '?'} on {caches or '?'}, {s['steps'] or 0} steps, "
                     f"{s['status']}" + (f"; final {final}" if final else ""))
        for key, result in s["evaluation"].items():
            scores = ", ".join(f"{k} {v:.4g}" for k, v in _headline(result).items())
            lines.append(f"      {key}: {scores}")
    return "\n".join(lines)


def _headline(result: dict, most: int = 8) -> dict:
    """The numbers worth one line: top-level scores (accuracy, loss, ...) and per-language ones
    (`f1 hi`), at most `most` of them."""
    out = {}
    for key, value in result.items():
        if isinstance(value, float):
            out[key] = value
        elif isinstance(value, dict) and key not in ("std",):
            out.update({f"{key} {k}": v for k, v in value.items() if isinstance(v, float)})
    return dict(list(out.items())[:most])
