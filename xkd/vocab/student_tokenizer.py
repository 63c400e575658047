"""The tokenizer saved with a union-vocab student (docs/vocab.md, "The student tokenizer").

A student saw each language as the teacher routed for it tokenized it, remapped into the
union (`Vocab.tokenize`). One plain WordPiece over the union cannot reproduce that: it
neither routes nor follows each teacher's casing. What can: a teacher's own fast tokenizer
whose every token id is replaced by its union id. For WordPiece, BPE and WordLevel models the
vocabulary is a token -> id dict, so the ids need not be contiguous and the remapped
tokenizer gives exactly the routed ids; a Unigram model's ids are positions in a list, so it
cannot carry union ids.

`save_student_tokenizer(vocab, dir)` writes

    tokenizer.json, tokenizer_config.json   what AutoTokenizer loads: the DEFAULT route's teacher
                                            tokenizer remapped to union ids (exact for every
                                            language routed to it), or, where that teacher is a
                                            Unigram, the vocab's plain WordPiece over the union
    tokenizers/<slug>/                      every other routed teacher: its remapped tokenizer, or
                                            (Unigram) its own files plus union_ids.npy
    xkd_tokenizer.json                      routes, default, auto_tokenizer_exact_for, teachers,
                                            and where each route's tokenizer is

and `load_student_tokenizer(dir)` (also `xkd.load_student_tokenizer`) applies the routing
with the language as an argument: `tok(texts, language="en")`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..families import position_offset
from ..names import normalize_language
from ..segments import second_segment_start, takes_token_types
from ..storage.untrusted import is_inside, load_id_table, parse_json, refuse_links_out, remove_tree
from .canonical import BYTELEVEL, from_canonical
from .remap import remap_lists

XKD_TOKENIZER = "xkd_tokenizer.json"
TOKENIZERS = "tokenizers"
UNION_IDS = "union_ids.npy"  # teacher id -> union id, beside a teacher tokenizer that keeps teacher ids
FORMAT = 1
EVERY_LANGUAGE = "*"

# Models whose vocabulary is a token -> id mapping, so that ids can be any union ids.
REMAPPABLE_MODELS = ("WordPiece", "BPE", "WordLevel")
# A union token the routed teacher lacks still gets its union id in the remapped tokenizer, so
# that len(tokenizer) is the union's size (scripts resize embeddings to it) and decode shows
# it. It is spelled with a trailing space, which no pre-tokenized word contains, so that no
# text can produce it and tokenization stays the teacher's.
UNREACHABLE = " "
# Tokenizers report "no limit" as a huge number.
_NO_LIMIT = 10**9
_SPECIAL_ATTRIBUTES = ("unk_token", "pad_token", "cls_token", "sep_token", "mask_token", "bos_token", "eos_token")


# Remapping a teacher tokenizer ------------------------------------------------------------

def remapped_tokenizer(vocab, teacher, *, model_max_length: int, token_types: bool = True):
    """The teacher's fast tokenizer with every id replaced by its union id (a
    PreTrainedTokenizerFast), or None where that cannot reproduce the teacher: a Unigram model
    (ids are list positions), a slow tokenizer, or a pre-tokenizer that keeps spaces inside
    words (the unreachable spelling of union tokens the teacher lacks would become reachable).

    Pairs get the token types training gave the student (1 from the second text's first token
    to the end, xkd/segments.py), whatever the teacher's template says (RoBERTa's gives 0s)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    entry = vocab.teacher(teacher)
    slug = entry["slug"]
    source = vocab.teacher_tokenizer(slug)
    if not getattr(source, "is_fast", False):
        return None
    spec = json.loads(source.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") not in REMAPPABLE_MODELS or not isinstance(model.get("vocab"), dict):
        return None
    if not _pre_tokenizer_drops_spaces(source.backend_tokenizer):
        return None
    table = vocab.map_for(slug)
    union_ids = {token: int(table[i]) for token, i in model["vocab"].items()}
    for added in spec.get("added_tokens") or []:
        added["id"] = int(table[added["id"]])
        # tokenizers re-derives an added token's id from the model vocab on load (or appends
        # it after the largest id), so the model vocab must hold it at its union id.
        union_ids.setdefault(added["content"], added["id"])
    _add_unreachable_union_tokens(union_ids, vocab, entry, model)
    model["vocab"] = union_ids
    spec["post_processor"] = _remapped_post_processor(spec.get("post_processor"), table)
    # Padding and truncation are per call; a teacher that saved fixed ones (MiniLM pads to
    # 128) must not pad every encoding of the raw backend.
    spec["truncation"] = None
    spec["padding"] = None
    backend = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    specials = {name: str(getattr(source, name)) for name in _SPECIAL_ATTRIBUTES if getattr(source, name, None) is not None}
    names = ["input_ids", "token_type_ids", "attention_mask"] if token_types else ["input_ids", "attention_mask"]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=model_max_length, model_input_names=names,
        padding_side="right", truncation_side=getattr(source, "truncation_side", "right"),
        clean_up_tokenization_spaces=bool(getattr(source, "clean_up_tokenization_spaces", False)), **specials,
    )


def _pre_tokenizer_drops_spaces(backend) -> bool:
    pre = backend.pre_tokenizer
    if pre is None:
        return False
    return not any(" " in piece for piece, _ in pre.pre_tokenize_str("a b  c\td"))


def _add_unreachable_union_tokens(union_ids: dict[str, int], vocab, entry: dict, model: dict) -> None:
    """Every union id the teacher has no token for, under a spelling no text produces."""
    taken = set(union_ids.values())
    # A byte-level BPE token of two or more characters arises only from a merge, and no merge
    # makes a token the teacher lacks: spelled as the teacher would, it decodes to its text.
    bare_is_unreachable = (
        model.get("type") == "BPE" and entry["convention"] == BYTELEVEL and not model.get("ignore_merges")
        and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
    )
    for union_id, token in enumerate(vocab.tokens):
        if union_id in taken:
            continue
        try:
            spelling = from_canonical(token, entry["convention"])
        except ValueError:
            spelling = token
        if not (bare_is_unreachable and len(spelling) >= 2):
            spelling += UNREACHABLE
        while spelling in union_ids:
            spelling += UNREACHABLE
        union_ids[spelling] = union_id


def _remapped_post_processor(node, table: np.ndarray):
    """The post-processor (a tokenizers JSON spec) with union ids and training's token types."""
    if node is None:
        return None
    kind = node.get("type")
    if kind == "Sequence":
        return {**node, "processors": [_remapped_post_processor(p, table) for p in node["processors"]]}
    if kind == "TemplateProcessing":
        for special in node["special_tokens"].values():
            special["ids"] = [int(table[i]) for i in special["ids"]]
        node["single"] = [_with_type(piece, 0) for piece in node["single"]]
        second, pair = False, []
        for piece in node["pair"]:
            (what, body), = piece.items()
            second = second or (what == "Sequence" and body.get("id") == "B")
            pair.append(_with_type(piece, int(second)))
        node["pair"] = pair
        return node
    if kind == "BertProcessing":  # [CLS] A [SEP] (type 0) B [SEP] (type 1): training's types already
        return {**node, "cls": [node["cls"][0], int(table[node["cls"][1]])],
                "sep": [node["sep"][0], int(table[node["sep"][1]])]}
    if kind == "RobertaProcessing":
        # Its pairs are all type 0; the same template with training's types, and the same
        # byte-level offset trimming.
        cls, sep = node["cls"][0], node["sep"][0]
        ids = {cls: int(table[node["cls"][1]]), sep: int(table[node["sep"][1]])}
        piece = lambda what, name, type_id: {what: {"id": name, "type_id": type_id}}  # noqa: E731
        template = {
            "type": "TemplateProcessing",
            "single": [piece("SpecialToken", cls, 0), piece("Sequence", "A", 0), piece("SpecialToken", sep, 0)],
            "pair": [piece("SpecialToken", cls, 0), piece("Sequence", "A", 0), piece("SpecialToken", sep, 0),
                     piece("SpecialToken", sep, 0), piece("Sequence", "B", 1), piece("SpecialToken", sep, 1)],
            "special_tokens": {name: {"id": name, "ids": [i], "tokens": [name]} for name, i in ids.items()},
        }
        trim = {"type": "ByteLevel", "add_prefix_space": bool(node.get("add_prefix_space", True)),
                "trim_offsets": bool(node.get("trim_offsets", True)), "use_regex": True}
        return {"type": "Sequence", "processors": [trim, template]}
    return node  # ByteLevel and others carry no ids


def _with_type(piece: dict, type_id: int) -> dict:
    (what, body), = piece.items()
    return {what: {**body, "type_id": type_id}}


# Saving ---------------------------------------------------------------------------------

def _config_dict(model_config) -> dict:
    if model_config is None:
        return {}
    if isinstance(model_config, dict):
        return dict(model_config)
    return model_config.to_dict()


def _input_positions(config: dict) -> int | None:
    """How many tokens the student's position table takes."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or positions <= 0:
        return None
    # Position ids that start after the pad id (RoBERTa, XLM-R) leave pad_id + 1 rows of the
    # table to no input; an MBLM's (model_type xkd-mblm) are its encoder family's.
    model_type = config.get("family") or config.get("model_type")
    return positions - position_offset(model_type, config.get("pad_token_id") or 0)


def _model_max_length(vocab, slugs: list[str], config: dict) -> int:
    """The longest input both the student and every routed teacher tokenizer take (512 when
    none of them states a limit, as BERT)."""
    limits = [int(vocab.teacher_tokenizer(s).model_max_length) for s in slugs]
    limits = [n for n in limits if 0 < n < _NO_LIMIT]
    positions = _input_positions(config)
    if positions:
        limits.append(positions)
    return min(limits) if limits else 512


def _save_transformers_tokenizer(tokenizer, directory: Path) -> None:
    """save_pretrained, recording the generic class: it loads tokenizer.json as written (in
    transformers 4 and 5), where a model-specific class (BertTokenizer) would rebuild the
    pipeline from its own defaults and the teacher's vocabulary positions."""
    tokenizer.save_pretrained(str(directory))
    config_file = directory / "tokenizer_config.json"
    config = parse_json(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_route_tokenizers(vocab, out: Path, slugs: list[str], remapped: dict) -> dict[str, dict]:
    """Save each route's tokenizer under out/tokenizers/<slug>: the remapped one (union ids)
    where there is one, else the teacher's own files with the map to union ids. Returns
    xkd_tokenizer.json's entry for each."""
    entries: dict[str, dict] = {}
    for slug in slugs:
        where = out / TOKENIZERS / slug
        if remapped[slug] is not None:
            _save_transformers_tokenizer(remapped[slug], where)
            entries[slug] = {"dir": f"{TOKENIZERS}/{slug}", "ids": "union"}
        else:  # the very files training tokenized with, and the map
            shutil.copytree(vocab.path / "teachers" / slug, where)
            np.save(where / UNION_IDS, vocab.map_for(slug), allow_pickle=False)
            entries[slug] = {"dir": f"{TOKENIZERS}/{slug}", "ids": "teacher", "map": UNION_IDS}
    return entries


def save_student_tokenizer(vocab, out_dir: str | os.PathLike, *, model_config=None) -> dict:
    """Write the student tokenizer of `vocab` into `out_dir` (layout in this module's
    docstring); return what xkd_tokenizer.json says. `model_config`: the student's config
    (a transformers config or its dict; default: `out_dir`/config.json if there), for its
    input length and whether it reads token types."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model_config is None and (out / "config.json").is_file():
        model_config = parse_json((out / "config.json").read_text(encoding="utf-8"))
    config = _config_dict(model_config)
    token_types = takes_token_types(_Attributes(config)) if config else True
    default = vocab.meta["default_teacher"]
    routes = vocab.routes
    order = [t["slug"] for t in vocab.teachers]
    used = sorted(set(routes.values()) | {default}, key=lambda s: (s != default, order.index(s)))
    max_length = _model_max_length(vocab, used, config)
    remapped = {slug: remapped_tokenizer(vocab, slug, model_max_length=max_length, token_types=token_types)
                for slug in used}
    remove_tree(out / TOKENIZERS)  # a previous save's routes

    tokenizers: dict[str, dict] = {}
    auto_is_default_route = remapped[default] is not None
    if auto_is_default_route:
        _save_transformers_tokenizer(remapped[default], out)
        tokenizers[default] = {"dir": ".", "ids": "union"}
        exact = [EVERY_LANGUAGE] if len(used) == 1 else sorted(lang for lang, s in routes.items() if s == default)
    else:  # a Unigram default: no one tokenizer reproduces it; the plain union WordPiece, as before
        plain = vocab.student_tokenizer()
        plain.model_max_length = max_length
        plain.save_pretrained(str(out))
        exact = []
    tokenizers.update(_save_route_tokenizers(vocab, out, [slug for slug in used if slug not in tokenizers], remapped))

    names = {t["slug"]: t["name"] for t in vocab.teachers}
    info = {
        "format": FORMAT,
        "routes": dict(sorted(routes.items())),
        "default": default,
        "auto_tokenizer_exact_for": exact,
        # Explicitly routed languages AutoTokenizer gets wrong (it is the default route's tokenizer),
        # and whether it is right for languages nobody routed (they go to the default teacher).
        "auto_tokenizer_not_exact_for": sorted(lang for lang, s in routes.items()
                                               if s != default or not auto_is_default_route),
        "auto_tokenizer_exact_for_unrouted": auto_is_default_route,
        "teachers": {slug: names[slug] for slug in used},
        "tokenizers": tokenizers,
        "token_type_ids": token_types,
        "model_max_length": max_length,
        "specials": vocab.special_ids,
        "vocab_size": vocab.size,
        "vocab_hash": vocab.hash,
    }
    (out / XKD_TOKENIZER).write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


class _Attributes:
    """A config dict read as attributes (what xkd.segments.takes_token_types reads)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)


# Loading and using ------------------------------------------------------------------------

class StudentTokenizer:
    """Tokenizes raw text as a union-vocab student saw it in training: each language by the
    teacher tokenizer routed for it, in union ids.

        tok = xkd.load_student_tokenizer("students/xd")
        batch = tok(texts, language="en", padding=True, truncation=True, max_length=128, return_tensors="pt")

    Made from a saved student directory (`load_student_tokenizer`) or from a vocab
    (`StudentTokenizer.from_vocab`, which `save_pretrained` writes out)."""

    def __init__(self, info: dict, *, root: Path | None = None, vocab=None, model_config=None):
        self.info = info
        self._root = root
        self._vocab = vocab
        self._model_config = model_config
        self._routes: dict[str, tuple] = {}
        self._warned = False

    @classmethod
    def from_vocab(cls, vocab, model_config=None) -> "StudentTokenizer":
        default = vocab.meta["default_teacher"]
        config = _config_dict(model_config)
        info = {
            "format": FORMAT, "routes": vocab.routes, "default": default,
            "teachers": {t["slug"]: t["name"] for t in vocab.teachers},
            "token_type_ids": takes_token_types(_Attributes(config)) if config else True,
            "specials": vocab.special_ids, "vocab_size": vocab.size, "vocab_hash": vocab.hash,
        }
        return cls(info, vocab=vocab, model_config=model_config)

    def __repr__(self) -> str:
        where = self._root if self._root is not None else f"vocab {self._vocab.path}"
        return f"StudentTokenizer({str(where)!r}, routes={self.routes}, default={self.default!r})"

    # What it is ------------------------------------------------------------------------
    @property
    def routes(self) -> dict[str, str]:
        return dict(self.info["routes"])

    @property
    def default(self) -> str:
        return self.info["default"]

    @property
    def auto_tokenizer_exact_for(self) -> list[str]:
        return list(self.info.get("auto_tokenizer_exact_for", []))

    @property
    def multi_route(self) -> bool:
        return len(set(self.info["routes"].values()) | {self.default}) > 1

    def __len__(self) -> int:
        return int(self.info["vocab_size"])

    pad_token_id = property(lambda self: self.info["specials"]["pad"])
    unk_token_id = property(lambda self: self.info["specials"]["unk"])
    cls_token_id = property(lambda self: self.info["specials"]["cls"])
    sep_token_id = property(lambda self: self.info["specials"]["sep"])
    mask_token_id = property(lambda self: self.info["specials"]["mask"])

    @property
    def model_max_length(self) -> int | None:
        return self.info.get("model_max_length")

    def teacher_for(self, language: str | None) -> str:
        """The teacher (slug) whose tokenizer `language` is tokenized with; codes compare in
        BCP-47 case, as Vocab.teacher_for."""
        if not language:
            return self.default
        routes = self.info["routes"]
        return routes.get(language) or routes.get(normalize_language(language) or language, self.default)

    def _route(self, slug: str) -> tuple:
        """(a transformers tokenizer, the teacher->union table or None when its ids are union ids)."""
        found = self._routes.get(slug)
        if found is None:
            if self._vocab is not None:
                found = (self._vocab.teacher_tokenizer(slug), self._vocab.map_for(slug))
            else:
                from transformers import AutoTokenizer

                entry = self.info["tokenizers"][slug]
                where = self._root / entry["dir"]
                table = (load_id_table(where / entry["map"], f"save the student's tokenizer again ({self._root / XKD_TOKENIZER} "
                                       "names it).") if entry.get("ids") == "teacher" else None)
                found = (AutoTokenizer.from_pretrained(str(where)), table)
            self._routes[slug] = found
        return found

    def _slug(self, language: str | None) -> str:
        if language is None and self.multi_route and not self._warned:
            self._warned = True
            by_teacher = ", ".join(f"{lang}: {slug}" for lang, slug in sorted(self.info["routes"].items()))
            warnings.warn(
                f"this student learnt its languages from different teacher tokenizers ({by_teacher}; others: "
                f"{self.default}); a call without language= tokenizes with {self.default}'s, which differs from "
                "training for the languages routed elsewhere. Pass language=CODE.", stacklevel=3)
        return self.teacher_for(language)

    # Tokenizing ----------------------------------------------------------------------
    def __call__(self, text, text_pair=None, *, language: str | None = None, add_special_tokens: bool = True,
                 padding=False, truncation=None, max_length: int | None = None, return_tensors=None,
                 return_attention_mask: bool = True, return_token_type_ids: bool | None = None):
        """input_ids (union ids), attention_mask and, for a student that reads them, token_type_ids,
        as training built them. Arguments as a transformers tokenizer's; padding is on the right
        with the union's [PAD]; padding=True pads to the longest, "max_length" to max_length."""
        from transformers import BatchEncoding

        slug = self._slug(language)
        tokenizer, table = self._route(slug)
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pairs = None if text_pair is None else ([text_pair] if isinstance(text_pair, str) else list(text_pair))
        encoded = tokenizer(texts, pairs, add_special_tokens=add_special_tokens, truncation=truncation,
                            max_length=max_length, return_attention_mask=False, return_token_type_ids=False)
        rows = [list(map(int, r)) for r in encoded["input_ids"]]
        if table is not None:
            rows = [r.tolist() for r in remap_lists(rows, table, what=f"tokenize with teacher {slug}")]
        starts = [second_segment_start(e.sequence_ids) if pairs is not None else 0 for e in encoded.encodings]
        types = [[int(start > 0 and i >= start) for i in range(len(r))] for r, start in zip(rows, starts)]
        masks = [[1] * len(r) for r in rows]
        width = self._padded_width(rows, padding, max_length)
        if width is not None:
            for r, t, m in zip(rows, types, masks):
                extra = max(width - len(r), 0)
                r += [self.pad_token_id] * extra
                t += [0] * extra
                m += [0] * extra
        data = {"input_ids": rows}
        if return_token_type_ids if return_token_type_ids is not None else self.info.get("token_type_ids", True):
            data["token_type_ids"] = types
        if return_attention_mask:
            data["attention_mask"] = masks
        if single and return_tensors is None:
            data = {k: v[0] for k, v in data.items()}
        return BatchEncoding(data, tensor_type=return_tensors)

    def _padded_width(self, rows, padding, max_length) -> int | None:
        if padding is True or padding == "longest":
            return max((len(r) for r in rows), default=0)
        if padding == "max_length":
            width = max_length or self.model_max_length
            if not width:
                raise BadInput("padding='max_length' needs max_length= (this tokenizer records no model_max_length).")
            return width
        if padding in (False, None, "do_not_pad"):
            return None
        raise BadInput(f"padding={padding!r}: give True (or 'longest'), 'max_length' or False.")

    def encode(self, text: str, text_pair: str | None = None, *, language: str | None = None,
               add_special_tokens: bool = True, truncation=None, max_length: int | None = None) -> list[int]:
        """The union ids of one text (or pair)."""
        return list(self(text, text_pair, language=language, add_special_tokens=add_special_tokens,
                         truncation=truncation, max_length=max_length, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"])

    def decode(self, ids, *, language: str | None = None, skip_special_tokens: bool = False) -> str:
        """Text of union ids, by the language's teacher tokenizer's decoder. Through a teacher
        that keeps its own ids (a Unigram), ids it lacks read as its unknown token."""
        tokenizer, table = self._route(self.teacher_for(language))
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if table is not None:
            inverse = np.full(len(self), tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0, np.int64)
            inverse[table[::-1]] = np.arange(table.size - 1, -1, -1)  # the first teacher id of a union id wins
            ids = inverse[ids].tolist()
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, *, language: str | None = None, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, language=language, skip_special_tokens=skip_special_tokens) for s in sequences]

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write this tokenizer into `directory` (a student directory)."""
        if self._vocab is not None:
            save_student_tokenizer(self._vocab, directory, model_config=self._model_config)
            return
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", XKD_TOKENIZER):
            if (self._root / name).is_file():
                shutil.copy2(self._root / name, out / name)
        if (self._root / TOKENIZERS).is_dir():
            remove_tree(out / TOKENIZERS)
            shutil.copytree(self._root / TOKENIZERS, out / TOKENIZERS)


def _check_routes(root: Path, info_file: Path, info: dict) -> None:
    """Every route's directory and map stays inside the student directory: a route of
    "../elsewhere" (or a link) would load a tokenizer and ids from any directory."""
    routes = info.get("tokenizers", {})
    if not isinstance(routes, dict) or not all(isinstance(e, dict) and isinstance(e.get("dir"), str)
                                               and isinstance(e.get("map", ""), str) for e in routes.values()):
        raise BadInput(f"{info_file}: \"tokenizers\" must map each teacher to {{\"dir\": PATH, ...}}; save the student's "
                       "tokenizer again (xkd.vocab.save_student_tokenizer(vocab, dir)).")
    for entry in routes.values():
        for where in (root / entry["dir"], root / entry["dir"] / entry.get("map", "")):
            if os.path.isabs(entry["dir"]) or not is_inside(root, where):
                raise BadInput(f"{info_file} routes to {where}, outside the student directory {root}: xkd loads a "
                               "student's tokenizers from inside it only (docs/reliability.md, \"Untrusted files\"). "
                               "Save the student's tokenizer again (xkd.vocab.save_student_tokenizer(vocab, dir)).")
    refuse_links_out(root, "student directory")


def load_student_tokenizer(path: str | os.PathLike) -> StudentTokenizer:
    """The tokenizer of a union-vocab student directory (written by train-student), applying
    its language routes: `tok(texts, language="hi")`. Also takes a vocab directory, or a
    student saved before xkd_tokenizer.json existed (through the vocab its
    train_summary.json names)."""
    root = Path(path)
    info_file = root / XKD_TOKENIZER
    if info_file.is_file():
        try:
            info = parse_json(info_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{info_file} is not valid JSON ({e}); save the student's tokenizer again "
                           "(xkd.vocab.save_student_tokenizer(vocab, dir)).") from None
        if info.get("format", 0) > FORMAT:
            raise BadInput(f"{info_file} has format {info.get('format')}; this xkd reads up to {FORMAT}. Upgrade xkd.")
        _check_routes(root, info_file, info)
        missing = sorted(s for s, e in info.get("tokenizers", {}).items() if not (root / e["dir"]).is_dir())
        if missing:
            raise BadInput(f"{root} is incomplete: {XKD_TOKENIZER} names the tokenizers of {', '.join(missing)} under "
                           f"{root / TOKENIZERS}, which are not there. Copy the whole student directory, tokenizers/ "
                           "included, or save its tokenizer again.")
        return StudentTokenizer(info, root=root)
    from .vocabdir import META, load_vocab

    if (root / META).is_file():
        return StudentTokenizer.from_vocab(load_vocab(root))
    try:
        trained_with = parse_json((root / "train_summary.json").read_text(encoding="utf-8")).get("vocab")
    except (OSError, ValueError, AttributeError):
        trained_with = None
    if trained_with and (Path(trained_with) / META).is_file():
        config = root / "config.json"
        return StudentTokenizer.from_vocab(load_vocab(trained_with),
                                           parse_json(config.read_text(encoding="utf-8")) if config.is_file() else None)
    what = "no such directory" if not root.exists() else f"it has no {XKD_TOKENIZER}"
    gone = f" (its train_summary.json names the vocab {trained_with}, which is gone)" if trained_with else ""
    raise BadInput(f"{root} holds no xkd student tokenizer ({what}){gone}. Give a student directory written by "
                   "`xkd train-student` or a vocab directory from `xkd build-vocab`; any other model's tokenizer "
                   "loads with transformers.AutoTokenizer.")
