"""A vocab directory on disk, and `load_vocab`, the public way to use one.

Layout (written by build.py):

    vocab.txt                 the union, canonical WordPiece spellings, one a line (line i = id i)
    maps/<teacher>.npy        int32 teacher id -> union id, one per teacher
    teachers/<teacher>/       each teacher's tokenizer, for tokenizing as in training
    tokenizer.json, tokenizer_config.json
                              a plain WordPiece tokenizer over the union (AutoTokenizer)
    report.json               sizes, pairwise overlaps, per-teacher coverage
    xkd-vocab.json            what this is: teachers (name, model id, tokenizer hash,
                              convention, languages routed to it), special ids, hash
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..lines import read_lines
from ..names import normalize_language
from ..storage.untrusted import parse_json
from .canonical import CANONICAL_SPECIALS, SPECIAL_ROLES, from_canonical
from .remap import remap, remap_rows, stack_tables
from .tokenizer import route_tokenize

META = "xkd-vocab.json"
VOCAB_TXT = "vocab.txt"
REPORT = "report.json"
MAPS = "maps"
TEACHERS = "teachers"
FORMAT = 1

# Columns of a cache row that hold teacher vocabulary ids.
ID_COLUMNS = ("input_ids", "labels", "topk_ids", "sample_ids")


def vocab_hash(root: Path, slugs: list[str]) -> str:
    """The identity of a union: its tokens and every map."""
    h = hashlib.sha256()
    h.update((root / VOCAB_TXT).read_bytes())
    for slug in slugs:
        h.update(slug.encode() + b"\0")
        h.update((root / MAPS / f"{slug}.npy").read_bytes())
    return h.hexdigest()[:16]


def file_digests(root: Path) -> dict[str, list]:
    """Every file of a vocab but xkd-vocab.json (which records them): relative path -> [size,
    sha256]. build-vocab records them, and check_whole compares, so that any file deleted,
    changed or added after the build is named (a teacher's tokenizer.json deleted while its
    tokenizer_config.json remains still loads, as another tokenizer)."""
    found = {}
    for top, _, files in os.walk(root):
        for name in files:
            file = Path(top) / name
            relative = file.relative_to(root).as_posix()
            if relative != META:
                data = file.read_bytes()
                found[relative] = [len(data), hashlib.sha256(data).hexdigest()]
    return dict(sorted(found.items()))


def _meta_problem(meta) -> str | None:
    """What is wrong with the fields of xkd-vocab.json that a vocab's users rely on; None if nothing."""
    if not isinstance(meta, dict):
        return "is not a JSON object"
    if not (isinstance(meta.get("size"), int) and meta["size"] > 0) or not isinstance(meta.get("hash"), str):
        return "lacks the vocab's size or hash"
    specials = meta.get("specials")
    if not (isinstance(specials, dict) and all(isinstance(specials.get(r), int) for r in SPECIAL_ROLES)):
        return "lacks the ids of the special tokens"
    teachers = meta.get("teachers")
    if not (isinstance(teachers, list) and teachers and all(
            isinstance(t, dict) and isinstance(t.get("slug"), str) and t["slug"] and "/" not in t["slug"]
            and isinstance(t.get("map_size"), int) for t in teachers)):
        return "lacks its list of teachers (each with a slug and a map size)"
    if not isinstance(meta.get("routes"), dict) or meta.get("default_teacher") not in [t["slug"] for t in teachers]:
        return "lacks its language routes or names a default teacher it does not have"
    files = meta.get("files", {})
    if not (isinstance(files, dict) and all(isinstance(v, list) and len(v) == 2 for v in files.values())):
        return "has a damaged \"files\" record (each file's [size, sha256])"
    return None


class Vocab:
    """A union vocabulary: its tokens, one id map per teacher, and the tokenizers."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            what = "no such directory" if not self.path.exists() else f"it has no {META}"
            raise BadInput(
                f"{self.path} is not an xkd vocab directory ({what}). Make one with "
                "`xkd build-vocab --teachers A B --out DIR`."
            )
        from ..storage.untrusted import refuse_links_out

        refuse_links_out(self.path, "vocab")  # a vocab is small: one walk covers every file read from it
        try:
            self.meta = parse_json(meta_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{meta_path} is not valid JSON ({e}); rebuild the vocab with xkd build-vocab.") from None
        if self.meta.get("format", 0) > FORMAT:
            raise BadInput(f"{meta_path} has vocab format {self.meta.get('format')}; this xkd reads up to {FORMAT}. Upgrade xkd.")
        self._maps: dict[str, np.ndarray] = {}
        self._tokenizers: dict[str, object] = {}

    def __repr__(self) -> str:
        return f"Vocab({str(self.path)!r}, size={self.size}, teachers={self.teacher_names})"

    # What it holds ----------------------------------------------------------------------
    @property
    def size(self) -> int:
        return int(self.meta["size"])

    def __len__(self) -> int:
        return self.size

    @property
    def hash(self) -> str:
        return self.meta["hash"]

    @cached_property
    def tokens(self) -> list[str]:
        lines = read_lines(self.path / VOCAB_TXT)
        if len(lines) != self.size:
            raise BadInput(f"{self.path / VOCAB_TXT} has {len(lines)} lines but {META} says {self.size}; rebuild the vocab.")
        return lines

    @cached_property
    def token_to_id(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    @property
    def special_ids(self) -> dict[str, int]:
        return dict(self.meta["specials"])

    pad_id = property(lambda self: self.special_ids["pad"])
    unk_id = property(lambda self: self.special_ids["unk"])
    cls_id = property(lambda self: self.special_ids["cls"])
    sep_id = property(lambda self: self.special_ids["sep"])
    mask_id = property(lambda self: self.special_ids["mask"])

    @property
    def teachers(self) -> list[dict]:
        return list(self.meta["teachers"])

    @property
    def teacher_names(self) -> list[str]:
        return [t["slug"] for t in self.meta["teachers"]]

    # Which teacher -------------------------------------------------------------------
    def teacher(self, key) -> dict:
        """The teacher entry for `key`: the name given at build time, its slug, model id,
        path or tokenizer hash; or a cache manifest (or its "teacher" part)."""
        if isinstance(key, dict):
            return self._teacher_from_manifest(key)
        found = self._match(str(key))
        if found is None:
            raise BadInput(
                f"teacher {key!r} is not in the vocab {self.path}. Its teachers are: "
                + "; ".join(f"{t['slug']} (given as {t['name']!r}, model {t['model_id']})" for t in self.meta["teachers"])
                + ". Name one of them, or rebuild the vocab with this teacher."
            )
        return found

    def _match(self, key: str) -> dict | None:
        candidates = {key}
        if Path(key).expanduser().exists():
            candidates.add(str(Path(key).expanduser().resolve()))
        for field in ("slug", "name", "model_id", "path", "tokenizer_hash"):
            for t in self.meta["teachers"]:
                if t.get(field) in candidates:
                    return t
        return None

    def _teacher_from_manifest(self, manifest: dict) -> dict:
        info = manifest["teacher"] if isinstance(manifest.get("teacher"), dict) else manifest
        found = None
        for field in ("name", "alias", "model_id", "path"):
            if isinstance(info.get(field), str) and info[field]:
                found = self._match(info[field])
                if found:
                    break
        if found is None and isinstance(info.get("path"), str) and (Path(info["path"]) / "config.json").is_file():
            found = self._match(self._fingerprint_of_dir(info["path"]))
        described = ", ".join(f"{k}={info[k]!r}" for k in ("name", "model_id", "path") if k in info) or "unnamed"
        if found is None:
            raise BadInput(
                f"the cache's teacher ({described}) is not among the teachers of the vocab {self.path} "
                f"({', '.join(self.teacher_names)}). Rebuild the vocab with `xkd build-vocab --teachers ...` "
                "including this teacher, or name the teacher explicitly."
            )
        self._check_same_tokenizer(info, found, described)
        return found

    @staticmethod
    def _fingerprint_of_dir(path: str) -> str:
        from transformers import AutoTokenizer

        from .teachers import tokenizer_fingerprint

        try:
            return tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))
        except Exception:  # an unloadable tokenizer just does not match
            return ""

    def _check_same_tokenizer(self, info: dict, entry: dict, described: str) -> None:
        """A name can match while the tokenizer differs (another revision): compare what the
        manifest records, so that remapped ids are never silently wrong."""
        problems = []
        if isinstance(info.get("vocab_size"), int) and info["vocab_size"] != entry["tokens"]:
            problems.append(f"its tokenizer has {info['vocab_size']} tokens, the vocab's teacher {entry['tokens']}")
        if isinstance(info.get("model_vocab_size"), int) and info["model_vocab_size"] > entry["map_size"]:
            problems.append(f"its model emits ids up to {info['model_vocab_size'] - 1}, the map covers {entry['map_size']}")
        table = self.map_for(entry["slug"])
        for role, tid in sorted((info.get("special_ids") or {}).items()):
            if (role in self.special_ids and isinstance(tid, int)
                    and (not 0 <= tid < table.size or table[tid] != self.special_ids[role])):
                problems.append(f"its {role} token is id {tid}, which the map does not send to the union's {role}")
        if problems:
            raise BadInput(
                f"the cache's teacher ({described}) matches the vocab's teacher {entry['slug']} by name, but "
                + "; ".join(problems) + ". They are different tokenizers: rebuild the vocab from the cache's teacher."
            )

    def check_whole(self) -> None:
        """Every file of the vocab is there and sound: xkd-vocab.json's fields, vocab.txt, each
        map (size and range), each teacher's tokenizer, the union tokenizer's files, and the
        recorded hash of the tokens and maps. For work that uses the vocab only at its end:
        train-student checks before step 1, as a damaged vocab used to fail at the save, after
        every step. Each problem is one paragraph naming the file."""
        rebuild = "Rebuild the vocab with `xkd build-vocab` (--overwrite replaces a damaged one)."
        problem = _meta_problem(self.meta)
        if problem:
            raise BadInput(f"{self.path / META} {problem}. {rebuild}")
        try:
            self.tokens  # noqa: B018 (its line count is checked against the size)
        except OSError as e:
            raise BadInput(f"{self.path / VOCAB_TXT} cannot be read ({e.strerror or e}). {rebuild}") from None
        slugs = [t["slug"] for t in self.meta["teachers"]]
        for entry in self.meta["teachers"]:
            slug, file = entry["slug"], self.path / MAPS / f"{entry['slug']}.npy"
            table = self.map_for(slug)
            if table.size != entry["map_size"]:
                raise BadInput(f"{file} maps {table.size} teacher ids, but {META} says teacher {slug} has {entry['map_size']}. "
                               + rebuild)
            if table.size and not (0 <= int(table.min()) and int(table.max()) < self.size):
                raise BadInput(f"{file} sends teacher ids outside the union's 0..{self.size - 1}. {rebuild}")
            try:
                self.teacher_tokenizer(slug)
            except BadInput:
                raise
            except Exception as e:  # whatever transformers raises for damaged tokenizer files
                reason = str(e).strip().split("\n")[0][:200] or type(e).__name__
                raise BadInput(f"{self.path / TEACHERS / slug}: the tokenizer of teacher {slug} cannot be loaded "
                               f"({reason}). {rebuild}") from None
        for name in ("tokenizer.json", "tokenizer_config.json"):
            try:
                parse_json((self.path / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise BadInput(f"{self.path / name} is missing or damaged ({e}). {rebuild}") from None
        found = vocab_hash(self.path, slugs)
        if found != self.hash:
            raise BadInput(f"{self.path / VOCAB_TXT} or a map in {self.path / MAPS} changed after the vocab was built: "
                           f"they hash to {found}, {META} records {self.hash}. {rebuild}")
        recorded = self.meta.get("files")  # absent in vocabs built before build-vocab recorded it
        if recorded is not None:
            now = file_digests(self.path)
            differences = [f"{self.path / name} {how}" for name in sorted({*recorded, *now}) for how in [
                "is missing" if name not in now else "was added" if name not in recorded
                else "changed" if now[name] != recorded[name] else None] if how]
            if differences:
                raise BadInput(f"{'; '.join(differences[:4])}{' ...' if len(differences) > 4 else ''} since the vocab was "
                               f"built ({META} records every file's size and sha256). {rebuild}")

    def map_for(self, teacher) -> np.ndarray:
        """The int32 teacher id -> union id table of a teacher (see `teacher` for keys)."""
        slug = teacher if isinstance(teacher, str) and teacher in self._maps else self.teacher(teacher)["slug"]
        table = self._maps.get(slug)
        if table is None:
            from ..storage.untrusted import load_id_table, require_inside

            file = require_inside(self.path, self.path / MAPS / f"{slug}.npy", "vocab")  # a slug from JSON, maybe "../x"
            table = self._maps[slug] = load_id_table(file, "rebuild the vocab with `xkd build-vocab`.")
            table.flags.writeable = False
        return table

    # Remapping ---------------------------------------------------------------------
    def remap(self, ids, teacher) -> np.ndarray:
        """Teacher ids (any integer array) -> union ids (int32, same shape)."""
        slug = self.teacher(teacher)["slug"]
        return remap(ids, self.map_for(slug), what=f"remap for teacher {slug}")

    def remap_columns(self, columns: dict, teacher) -> dict:
        """A cache block's columns with their ids (ID_COLUMNS) in union ids (Ragged
        columns keep their offsets); other columns are passed through."""
        from ..storage import Ragged

        slug = self.teacher(teacher)["slug"]
        table = self.map_for(slug)
        out = dict(columns)
        for name in ID_COLUMNS:
            col = columns.get(name)
            if col is None:
                continue
            what = f"remap of {name} for teacher {slug}"
            out[name] = (Ragged(remap(col.values, table, what=what), col.offsets) if isinstance(col, Ragged)
                         else remap(col, table, what=what))
        return out

    def stacked_maps(self, teachers: list) -> tuple:
        """Several teachers' maps stacked for `remap_rows` (batches that mix teachers)."""
        return stack_tables([self.map_for(t) for t in teachers])

    def remap_rows(self, values, offsets, row_teacher, stacked) -> np.ndarray:
        """Ragged ids whose row r comes from teacher row_teacher[r] (an index into the list
        given to stacked_maps)."""
        return remap_rows(values, offsets, row_teacher, stacked)

    def to_teacher_token(self, union_id: int, teacher) -> str:
        """The teacher's own spelling of a union token (specials by role)."""
        t = self.teacher(teacher)
        return self._teacher_spelling(self.tokens[int(union_id)], t)

    @staticmethod
    def _teacher_spelling(token: str, entry: dict) -> str:
        for role in SPECIAL_ROLES:
            if token == CANONICAL_SPECIALS[role] and entry["special_roles"].get(role):
                return entry["special_roles"][role]
        return from_canonical(token, entry["convention"])

    def teacher_tokens(self, teacher) -> list[str]:
        """Each of a teacher's ids, read back through the union in the teacher's spelling:
        teacher id -> union id -> union token -> teacher spelling. Equal to the teacher's
        own token list (the round trip that tests/test_vocab.py checks)."""
        entry = self.teacher(teacher)
        table = self.map_for(entry["slug"])[: entry["tokens"]]
        return [self._teacher_spelling(self.tokens[u], entry) for u in table.tolist()]

    # Tokenizing like in training ----------------------------------------------------------
    @property
    def routes(self) -> dict[str, str]:
        return dict(self.meta["routes"])

    def teacher_for(self, lang: str | None) -> str:
        """The teacher whose tokenizer a language is tokenized with (see docs/vocab.md).
        Codes compare in BCP-47 case ("EN" is "en"), as build-vocab and caches store them."""
        if not lang:
            return self.meta["default_teacher"]
        routes = self.meta["routes"]
        return routes.get(lang) or routes.get(normalize_language(lang) or lang, self.meta["default_teacher"])

    def teacher_tokenizer(self, teacher):
        from transformers import AutoTokenizer

        slug = self.teacher(teacher)["slug"]
        tok = self._tokenizers.get(slug)
        if tok is None:
            from ..storage.untrusted import require_inside

            where = require_inside(self.path, self.path / TEACHERS / slug, "vocab")
            tok = self._tokenizers[slug] = AutoTokenizer.from_pretrained(str(where))
        return tok

    def tokenize(self, texts, lang: str | None = None, text_pairs=None, *, max_length: int | None = None,
                 add_special_tokens: bool = True, teacher=None):
        """Union ids of raw text as the student saw it in training: tokenized by the teacher
        routed for `lang` (or the given teacher) and remapped. One int32 array per text (or
        one array for one string)."""
        slug = self.teacher(teacher)["slug"] if teacher is not None else self.teacher_for(lang)
        return route_tokenize(
            self.teacher_tokenizer(slug), self.map_for(slug), texts, text_pairs, max_length=max_length,
            add_special_tokens=add_special_tokens, what=f"tokenize with teacher {slug}",
        )

    def encode(self, texts, lang: str | None = None, text_pairs=None, *, max_length: int | None = None,
               teacher=None) -> dict:
        """`tokenize`, padded into a batch: {"input_ids", "attention_mask"} int64 arrays,
        padded with the union's [PAD]."""
        rows = self.tokenize(list([texts] if isinstance(texts, str) else texts), lang, text_pairs,
                             max_length=max_length, teacher=teacher)
        width = max((len(r) for r in rows), default=0)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def student_tokenizer(self):
        """The plain WordPiece tokenizer over the union (what AutoTokenizer loads from this
        directory). It does not route by language: see docs/vocab.md for where it differs. A
        student is saved with a routing tokenizer instead (student_tokenizer.py)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path))


def load_vocab(path: str | os.PathLike) -> Vocab:
    """The union vocab in `path` (docs/design.md, "Python API")."""
    return Vocab(path)
