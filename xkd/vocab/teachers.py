"""A teacher's vocabulary, read from whatever names it: an alias, a model id, a model
directory, a tokenizer directory, or a bare vocab file (vocab.txt, vocab.json + merges.txt,
tokenizer.json).

Everything becomes a `TeacherVocab`: its tokens by id, its convention (canonical.py), which
tokens play the five special roles, and a Hugging Face tokenizer, so that the student can
tokenize text exactly as this teacher did in training.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..names import resolve_teacher
from ..readers import text_lines
from ..storage.untrusted import parse_json
from ..weights import config_size_problem
from .canonical import (
    BL_SPACE,
    BYTELEVEL,
    CANONICAL_SPECIALS,
    CONTINUATION,
    SENTENCEPIECE,
    SP_WORD_START,
    SPECIAL_ROLES,
    SPECIAL_SPELLINGS,
    WORDPIECE,
    bytelevel_bytes,
    to_canonical,
    word_start_marker_count,
)

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json")


@dataclass
class TeacherVocab:
    name: str  # as the user gave it
    model_id: str  # the resolved model id, or the file's path for a bare vocab
    source: str  # where it came from: "local directory", "vocab file", ...
    convention: str
    tokens: list[str]  # by id
    roles: dict[str, str]  # special role -> this teacher's token for it
    tokenizer: object = field(repr=False)  # a transformers tokenizer (tokenizers backend)
    model_vocab_size: int | None = None  # config.vocab_size of a model dir (may pad the tokenizer)
    lowercase: bool = False
    strip_accents: bool = False
    path: str | None = None  # the local file or directory it was read from

    @property
    def size(self) -> int:
        return len(self.tokens)

    @property
    def map_size(self) -> int:
        """Rows of the teacher->student map: every id the teacher's model can emit."""
        return max(self.size, self.model_vocab_size or 0)

    def canonical_tokens(self) -> list[str]:
        """Canonical spelling of each token, by id (specials by role)."""
        role_of = {tok: role for role, tok in self.roles.items()}
        out = []
        for token in self.tokens:
            role = role_of.get(token)
            out.append(CANONICAL_SPECIALS[role] if role else to_canonical(token, self.convention))
        return out

    @property
    def fingerprint(self) -> str:
        return tokenizer_fingerprint(self.tokenizer)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what a tokenizer does (vocab, normalizer, pre-tokenizer, special tokens),
    stable across where it was loaded from. Truncation and padding settings are left out:
    they change as the tokenizer is used."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    # tokenizers serialises in a fixed order (vocab by id), so no key sorting is needed.
    payload = json.dumps(spec, ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def backend_spec(tokenizer) -> dict:
    return json.loads(tokenizer.backend_tokenizer.to_str())


def _walk(node):
    """Every component of a tokenizers normalizer / pre-tokenizer / decoder spec."""
    if isinstance(node, dict):
        yield node
        for key in ("normalizers", "pretokenizers", "decoders"):
            for child in node.get(key) or ():
                yield from _walk(child)


def casing_of(spec: dict) -> tuple[bool, bool]:
    """(lowercases?, strips accents?) from a tokenizers spec's normalizer."""
    lowercase = strip = False
    for part in _walk(spec.get("normalizer")):
        kind = part.get("type")
        if kind == "BertNormalizer":
            lowercase = lowercase or bool(part.get("lowercase"))
            sa = part.get("strip_accents")
            strip = strip or bool(sa) or (sa is None and bool(part.get("lowercase")))
        elif kind == "Lowercase":
            lowercase = True
        elif kind == "StripAccents":
            strip = True
    return lowercase, strip


def convention_of(spec: dict, where: str) -> str:
    """The subword convention a tokenizers spec uses, or a clear error if it has no
    canonical form here."""
    model = spec.get("model") or {}
    kind = model.get("type")
    parts = [p.get("type") for key in ("pre_tokenizer", "decoder") for p in _walk(spec.get(key))]
    if kind == "WordPiece":
        prefix = model.get("continuing_subword_prefix", "##")
        if prefix != "##":
            raise BadInput(
                f"{where}: a WordPiece tokenizer whose continuation prefix is {prefix!r}, not '##'. xkd compares "
                "tokens in one canonical form (docs/vocab.md) and knows WordPiece only with '##'."
            )
        return WORDPIECE
    if "ByteLevel" in parts and kind == "BPE":
        return BYTELEVEL
    if "Metaspace" in parts and kind in ("BPE", "Unigram"):
        return SENTENCEPIECE
    raise BadInput(
        f"{where}: a {kind} tokenizer with pre-tokenizer/decoder {parts or 'none'} has no canonical form in xkd. "
        "Supported conventions: WordPiece '##', SentencePiece '▁' (Unigram or BPE with Metaspace) and byte-level "
        "BPE 'Ġ' (docs/vocab.md)."
    )


def _roles_from(tokenizer, vocab: dict[str, int]) -> dict[str, str]:
    """Role -> token, from the tokenizer's special-token attributes (BOS/EOS stand in for
    CLS/SEP, as in RoBERTa)."""
    candidates = {
        "pad": [tokenizer.pad_token],
        "unk": [tokenizer.unk_token],
        "cls": [tokenizer.cls_token, tokenizer.bos_token],
        "sep": [tokenizer.sep_token, tokenizer.eos_token],
        "mask": [tokenizer.mask_token],
    }
    roles = {}
    for role in SPECIAL_ROLES:
        for tok in candidates[role]:
            if tok is not None and str(tok) in vocab:
                roles[role] = str(tok)
                break
    return roles


def _tokens_by_id(vocab: dict[str, int], where: str) -> list[str]:
    n = max(vocab.values()) + 1 if vocab else 0
    tokens = [None] * n
    for tok, i in vocab.items():
        tokens[i] = tok
    holes = [i for i, t in enumerate(tokens) if t is None]
    if holes:
        raise BadInput(
            f"{where}: the vocabulary has no token for ids {holes[:10]}{' ...' if len(holes) > 10 else ''}; "
            "ids must run from 0 without gaps."
        )
    return tokens


# Bare vocab files ----------------------------------------------------------------------


def read_vocab_txt(path: Path) -> list[str]:
    """The lines of a WordPiece vocab.txt, checked: exists, not empty, no empty or duplicate
    lines. Read as every command reads lines (xkd.lines): split on '\\n' only (some real
    vocabs hold U+2028 as a token), a CRLF line end is a line end."""
    lines = text_lines(path, "vocab file", "A WordPiece vocab.txt holds one token a line, in UTF-8.")
    seen: dict[str, int] = {}
    for number, token in enumerate(lines, 1):
        if token == "":
            raise BadInput(f"vocab file {path}, line {number} is empty. Every line must hold one token.")
        if token in seen:
            raise BadInput(
                f"vocab file {path}, line {number} repeats the token {token!r} of line {seen[token]}. A vocabulary "
                "needs one id per token: remove the duplicate line (ids after it shift by one, so check the "
                "model's embeddings match)."
            )
        seen[token] = number
    return lines


def check_one_convention(tokens: list[str], expected: str, where: str) -> None:
    """A bare vocab's convention is guessed from its markers; a vocab that mixes them has no
    single canonical form (which tokens start words?), so it is refused."""
    counts = word_start_marker_count(tokens)
    threshold = max(10, len(tokens) // 1000)
    foreign = [k for k, v in counts.items() if k != expected and v >= threshold]
    if foreign and counts[expected] >= threshold:
        marker = {WORDPIECE: CONTINUATION, SENTENCEPIECE: SP_WORD_START, BYTELEVEL: BL_SPACE}
        described = {WORDPIECE: "'##' continuations", SENTENCEPIECE: "'▁' word starts", BYTELEVEL: "'Ġ' word starts"}
        m = marker[foreign[0]]
        examples = [f"line {i + 1}: {t!r}" for i, t in enumerate(tokens) if t.startswith(m) and len(t) > len(m)][:3]
        raise BadInput(
            f"{where} mixes token conventions: {counts[expected]} {described[expected]} and "
            + ", ".join(f"{counts[k]} {described[k]}" for k in foreign)
            + f" (e.g. {'; '.join(examples)}). With both, xkd cannot tell which tokens start a word, so they have no "
            "canonical form. Give the teacher's model or tokenizer directory (its tokenizer.json states the "
            "convention), or a vocab in one convention."
        )


def _infer_casing(tokens: list[str]) -> tuple[bool, bool]:
    """(lowercase, strip accents) for a bare vocab.txt with no tokenizer config: a vocab with
    (almost) no upper-case tokens was made lower-cased; one that is lower-cased and has no
    combining marks after NFD also stripped accents (bert-base-uncased; BETO uncased keeps
    them)."""
    words = [t for t in tokens if not (t.startswith("[") and t.endswith("]"))]
    upper = sum(1 for t in words if t.lower() != t)
    lowercase = upper <= max(5, len(words) // 1000)
    accented = 0
    for t in words:
        nfd = unicodedata.normalize("NFD", t)
        if nfd != t or not t.isascii():
            accented += any(unicodedata.combining(c) for c in nfd)
    return lowercase, lowercase and accented == 0


def _wordpiece_from_file(path: Path, name: str) -> TeacherVocab:
    from transformers import BertTokenizer

    tokens = read_vocab_txt(path)
    check_one_convention(tokens, WORDPIECE, f"vocab file {path}")
    lowercase, strip = _infer_casing(tokens)
    roles = {}
    for tok in tokens:
        role = SPECIAL_SPELLINGS.get(tok)
        if role and role not in roles:
            roles[role] = tok
    if "unk" not in roles:
        raise BadInput(f"vocab file {path} has no unknown token ([UNK] or <unk>); a WordPiece tokenizer needs one.")
    # The tokens as read here, not the file again: the tokenizer then has exactly these ids,
    # whatever line ends the file uses.
    tokenizer = BertTokenizer(
        vocab={tok: i for i, tok in enumerate(tokens)}, do_lower_case=lowercase, strip_accents=strip,
        **{f"{role}_token": tok for role, tok in roles.items()},
    )
    if len(tokenizer) != len(tokens):
        missing = sorted(set(tokenizer.get_vocab()) - set(tokens))
        raise BadInput(f"vocab file {path} lacks tokens its tokenizer needs: {missing[:5]}.")
    return TeacherVocab(
        name=name, model_id=str(path.resolve()), source="vocab file", convention=WORDPIECE, tokens=tokens,
        roles=roles, tokenizer=tokenizer, lowercase=lowercase, strip_accents=strip, path=str(path.resolve()),
    )


def _bpe_from_files(vocab_json: Path, name: str) -> TeacherVocab:
    from transformers import GPT2Tokenizer, RobertaTokenizer

    merges = vocab_json.with_name("merges.txt")
    if not merges.is_file():
        raise BadInput(f"{vocab_json}: a BPE vocab.json needs merges.txt beside it; {merges} does not exist.")
    try:
        vocab = parse_json(vocab_json.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{vocab_json} is not a JSON vocabulary ({e}).") from None
    if not isinstance(vocab, dict) or not vocab:
        raise BadInput(f"{vocab_json} is empty or not a token -> id object.")
    where = f"vocab file {vocab_json}"
    tokens = _tokens_by_id(vocab, where)
    if len(set(vocab.values())) != len(vocab):
        raise BadInput(f"{where}: several tokens share one id; each token needs its own id.")
    not_bytes = [t for t in tokens if bytelevel_bytes(t) is None and t not in SPECIAL_SPELLINGS]
    if len(not_bytes) > len(tokens) // 100:
        raise BadInput(
            f"{where}: {len(not_bytes)} tokens (e.g. {not_bytes[:3]}) are not byte-level BPE, the only BPE vocab.json "
            "convention xkd reads bare. Give the tokenizer's directory with its tokenizer.json instead."
        )
    cls = RobertaTokenizer if "<s>" in vocab and "<mask>" in vocab else GPT2Tokenizer
    tokenizer = cls(vocab=str(vocab_json), merges=str(merges))
    if len(tokenizer) != len(tokens):
        raise BadInput(f"{where}: its tokenizer has {len(tokenizer)} tokens but the file {len(tokens)}.")
    return TeacherVocab(
        name=name, model_id=str(vocab_json.resolve()), source="vocab file", convention=BYTELEVEL, tokens=tokens,
        roles=_roles_from(tokenizer, vocab), tokenizer=tokenizer, path=str(vocab_json.resolve()),
    )


def _from_tokenizer(tokenizer, name: str, model_id: str, source: str, where: str,
                    model_vocab_size: int | None = None, path: Path | None = None) -> TeacherVocab:
    spec = backend_spec(tokenizer)
    convention = convention_of(spec, where)
    vocab = tokenizer.get_vocab()
    if not vocab:
        raise BadInput(f"{where}: the tokenizer's vocabulary is empty.")
    tokens = _tokens_by_id(vocab, where)
    lowercase, strip = casing_of(spec)
    return TeacherVocab(
        name=name, model_id=model_id, source=source, convention=convention, tokens=tokens,
        roles=_roles_from(tokenizer, vocab), tokenizer=tokenizer, model_vocab_size=model_vocab_size,
        lowercase=lowercase, strip_accents=strip, path=str(path) if path else None,
    )


def _from_tokenizer_json(path: Path, name: str) -> TeacherVocab:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as e:  # the library's parse error is the finding
        raise BadInput(f"{path} is not a readable tokenizer.json ({e}).") from None
    # A bare tokenizer.json names no roles: give the ones whose usual spellings it holds.
    vocab = backend.get_vocab(with_added_tokens=True)
    roles = {}
    for tok in sorted(vocab, key=vocab.get):
        role = SPECIAL_SPELLINGS.get(tok)
        if role and role not in roles:
            roles[role] = tok
    kwargs = {f"{role}_token": tok for role, tok in roles.items()}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    return _from_tokenizer(tokenizer, name, str(path.resolve()), "tokenizer file", f"tokenizer file {path}",
                           path=path.resolve())


def _from_model_dir(path: Path, name: str, model_id: str, source: str) -> TeacherVocab:
    from transformers import AutoTokenizer

    where = f"teacher {name!r} ({path})"
    model_vocab_size = None
    config = path / "config.json"
    if config.is_file():  # first: AutoTokenizer may build the model's config, which allocates num_labels names
        try:
            sizes = parse_json(config.read_text(encoding="utf-8"))
            sizes = sizes if isinstance(sizes, dict) else {}
            model_vocab_size = sizes.get("vocab_size")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInput(f"{config} is not valid JSON ({e}).") from None
        # The teacher->student map has a row per id the model can emit: a vocab_size the weights
        # cannot hold (10**12) would allocate terabytes.
        if (oversized := config_size_problem(path, sizes)) is not None:
            raise BadInput(f"{where}: {config}: {oversized}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers' message says what is missing
        raise BadInput(f"{where}: its tokenizer cannot be loaded ({type(e).__name__}: {e}).") from None
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise BadInput(f"{where}: only tokenizers with a fast (tokenizers) backend are supported.")
    return _from_tokenizer(tokenizer, name, model_id, source, where, model_vocab_size, path)


def _from_file(path: Path, name: str) -> TeacherVocab:
    if path.name == "tokenizer.json":
        return _from_tokenizer_json(path, name)
    if path.suffix == ".json":
        return _bpe_from_files(path, name)
    return _wordpiece_from_file(path, name)


def load_teacher_vocab(name: str) -> TeacherVocab:
    """A --teachers value -> its vocabulary."""
    path = Path(name).expanduser()
    if path.is_file():
        return _from_file(path, name)
    if path.is_dir() and not (path / "config.json").is_file():
        # A tokenizer directory without a model (e.g. vocab.json + merges.txt).
        if (path / "tokenizer_config.json").is_file() and (path / "tokenizer.json").is_file():
            return _from_model_dir(path.resolve(), name, str(path.resolve()), "tokenizer directory")
        for file in TOKENIZER_FILES:
            if (path / file).is_file():
                teacher = _from_file(path / file, name)
                teacher.model_id = teacher.path = str(path.resolve())
                return teacher
        raise BadInput(
            f"teacher {name!r}: {path} holds neither a model (config.json) nor a tokenizer ({', '.join(TOKENIZER_FILES)})."
        )
    if not path.exists() and re.search(r"\.(txt|json)$", name):
        raise BadInput(f"vocab file {path} does not exist. Give an existing vocab file, a model directory, or an alias.")
    resolved = resolve_teacher(name)
    if resolved.path is None:
        from transformers import AutoTokenizer  # online: the hub provides the tokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolved.model_id)
        return _from_tokenizer(tokenizer, name, resolved.model_id, "hub", f"teacher {name!r}")
    return _from_model_dir(resolved.path, name, resolved.model_id, resolved.source)
