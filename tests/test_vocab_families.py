"""One union across the three subword conventions (issue 13, part 2; docs/vocab.md,
"Canonical forms across conventions").

Teachers of the five families in tests/families.py (WordPiece bert/distilbert with the real
mBERT vocab, byte-level BPE roberta with the real roberta-base vocab, SentencePiece Unigram
xlmr and mdeberta with byte fallback) are joined by `build_vocab`, and every result is checked
against a computation made here, not by xkd.vocab:

- each teacher id's union token reads back as the teacher's own token, and its union
  spelling is the documented canonical form (computed here from the token's bytes);
- the five special roles of every teacher, whatever their spelling, land on the union's
  one [PAD] [UNK] [CLS] [SEP] [MASK];
- the invariant that makes a cached row and a student-tokenized text agree: the student's
  routed ids for a text (and a text pair) equal the routed teacher's own ids mapped through
  its union map, for every teacher of every union (each pair of families shares a union);
- byte-fallback pieces `<0xHH>` and byte-level pieces holding partial UTF-8 survive (byte
  fallback in use needs the Unigram tokenizer.json loaded verbatim: see `verbatim_sp`).

One known clash between conventions (docs/vocab.md) is a strict expected failure at the end.
"""

from __future__ import annotations

import itertools
import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from xkd.errors import BadInput
from xkd.vocab import build_vocab, load_vocab

from conftest import PARALLEL
from families import FAMILIES, MIXED_TEXT, family_config, family_tokenizer

# Each union: its teachers in order, and the teacher each language is routed to. Every
# teacher gets at least one language; every pair of families but bert|distilbert (one and
# the same tokenizer, which build-vocab refuses twice) shares a union.
UNIONS = {
    "bert+xlmr+roberta": (("bert", "xlmr", "roberta"), {"en": "roberta", "es": "xlmr", "hi": "bert", "zh": "xlmr"}),
    "mdeberta+distilbert+roberta": (("mdeberta", "distilbert", "roberta"),
                                    {"en": "distilbert", "es": "mdeberta", "hi": "roberta", "zh": "mdeberta"}),
    "xlmr+mdeberta+distilbert": (("xlmr", "mdeberta", "distilbert"),
                                 {"en": "mdeberta", "es": "distilbert", "hi": "xlmr", "zh": "distilbert"}),
    "roberta+mdeberta+bert": (("roberta", "mdeberta", "bert"), {"en": "bert", "es": "roberta", "hi": "mdeberta"}),
}
UNROUTED = "fr"  # routed nowhere: every family here is cased, so it goes to the first teacher
CONVENTION = {"bert": "wordpiece", "distilbert": "wordpiece", "roberta": "bytelevel", "xlmr": "sentencepiece",
              "mdeberta": "sentencepiece"}
# Each family's spelling of the five roles (tests/families.py), and the union's.
SPELLINGS = {
    "bert": {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"},
    "distilbert": {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"},
    "mdeberta": {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"},
    "roberta": {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "mask": "<mask>", "unk": "<unk>"},
    "xlmr": {"cls": "<s>", "sep": "</s>", "pad": "<pad>", "mask": "<mask>", "unk": "<unk>"},
}
UNION_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
EDGE_TEXT = [
    "", "  two  spaces, a\ttab\nand a newline  ", "emoji 🙂 and 𝔉𝔯𝔞𝔨𝔱𝔲𝔯, ﬁ ligature, Ω, ½",
    "龘 and ࿕ and ꙮ: rare characters", "Ünïcödé ÀÉÎÕÜ ñ ç ß", "a##b ##c <0x41> [MASK] <mask>",
]


def test_every_pair_of_families_shares_a_union():
    covered = {frozenset(p) for teachers, _ in UNIONS.values() for p in itertools.combinations(teachers, 2)}
    assert {frozenset(p) for p in itertools.combinations(FAMILIES, 2)} - covered == {frozenset(("bert", "distilbert"))}


# Independent computations ----------------------------------------------------------------------

@lru_cache(maxsize=1)
def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character -> byte (Radford et al., encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def expected_union_spelling(token: str, convention: str) -> str:
    """The canonical spelling docs/vocab.md describes, computed from the token's bytes."""
    if convention == "wordpiece":
        return token
    if convention == "sentencepiece":
        if BYTE_PIECE.fullmatch(token):  # byte fallback keeps its spelling
            return token
        raw = token.replace("▁", " ").encode("utf-8")
    else:
        raw = bytes(gpt2_byte_decoder()[c] for c in token)
    word_start = raw[:1] == b" " and len(raw) > 1  # a lone marker is a continuation holding a space
    payload = raw[1:] if word_start else raw
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    readable = (text is not None and text != "" and text.isprintable() and not any(c.isspace() for c in text)
                and not re.fullmatch(r"(<0x[0-9A-F]{2}>)+", text) and not (word_start and text.startswith("##")))
    body = text if readable else "".join(f"<0x{b:02X}>" for b in payload)
    return body if word_start else "##" + body


def meaning(token: str, convention: str) -> tuple[bool, bytes]:
    """(starts a word?, the bytes it stands for) of a teacher's token. A SentencePiece
    byte-fallback piece is a byte inside a word: the word's `▁` is a piece of its own."""
    if convention == "wordpiece":
        cont = token.startswith("##") and len(token) > 2
        return not cont, (token[2:] if cont else token).encode("utf-8")
    if convention == "sentencepiece" and BYTE_PIECE.fullmatch(token):
        return False, bytes([int(token[3:5], 16)])
    raw = token.replace("▁", " ").encode("utf-8") if convention == "sentencepiece" else \
        bytes(gpt2_byte_decoder()[c] for c in token)
    return (True, raw[1:]) if raw[:1] == b" " and len(raw) > 1 else (False, raw)


def spm_byte_fallback(tokens: list[str]) -> list[str]:
    return [t for t in tokens if BYTE_PIECE.fullmatch(t)]


def is_partial_utf8(token: str) -> bool:
    """A byte-level token whose bytes are not valid UTF-8 (e.g. 'Ġà¤', a space and two of
    the three bytes of a Devanagari letter)."""
    try:
        bytes(gpt2_byte_decoder()[c] for c in token).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# Teachers and unions ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_dirs(tmp_path_factory) -> dict[str, Path]:
    """Each family's real tokenizer and config (the vocab needs no weights): a model
    directory as build-vocab reads it (config.json + tokenizer files)."""
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family in FAMILIES:
        out = root / family
        tokenizer = family_tokenizer(family)
        tokenizer.save_pretrained(out)
        family_config(family, tokenizer, "mlm").save_pretrained(out)
        dirs[family] = out
    return dirs


@pytest.fixture(scope="module")
def own(teacher_dirs):
    """The teacher's own tokenizer, loaded fresh from its directory, as the cache saw it."""
    from transformers import AutoTokenizer

    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = AutoTokenizer.from_pretrained(str(teacher_dirs[family]))
        return cache[family]

    return get


def own_tokens(tokenizer) -> list[str]:
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))  # ids 0..n-1 without gaps
    return tokens


@pytest.fixture(scope="module", params=list(UNIONS))
def union(request, teacher_dirs, tmp_path_factory):
    teachers, routes = UNIONS[request.param]
    out = tmp_path_factory.mktemp("union") / request.param
    summary = build_vocab([str(teacher_dirs[f]) for f in teachers], out, routes)
    vocab = load_vocab(out)
    assert vocab.teacher_names == list(teachers) and summary["routes"] == routes == vocab.routes
    return vocab, teachers, routes


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """MIXED_TEXT, edge cases, and real Tatoeba sentences in English, Spanish, Hindi and Chinese."""
    tatoeba = PARALLEL / "tatoeba"
    real = []
    for name in ("spa-eng.eng", "spa-eng.spa", "hin-eng.hin", "cmn-eng.cmn"):
        real += (tatoeba / f"tatoeba.{name}").read_text(encoding="utf-8").split("\n")[:25]
    return MIXED_TEXT + EDGE_TEXT + real


# Round trip ----------------------------------------------------------------------------------------

def test_every_teacher_id_round_trips_through_the_union(union, own):
    """For every id of every teacher: the union token it maps to is the token's canonical
    spelling (computed here), and reads back as the teacher's own token; the map is injective
    and covers exactly the teacher's ids (config.vocab_size = tokenizer size here)."""
    vocab, teachers, _ = union
    assert vocab.tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(vocab.tokens)) == vocab.size
    for family in teachers:
        tokens = own_tokens(own(family))
        table = vocab.map_for(family)
        assert table.dtype == np.int32 and table.shape == (len(tokens),)
        assert len(np.unique(table)) == len(tokens), f"{family}: two ids share a union id"
        assert vocab.teacher_tokens(family) == tokens
        specials = set(SPELLINGS[family].values())
        spelled = [vocab.tokens[u] for u in table.tolist()]
        wrong = [(i, t, s) for i, (t, s) in enumerate(zip(tokens, spelled))
                 if t not in specials and s != expected_union_spelling(t, CONVENTION[family])]
        assert not wrong, f"{family}: {len(wrong)} tokens spelled otherwise in the union, e.g. {wrong[:5]}"
        rng = np.random.default_rng(0)
        for i in rng.choice(len(tokens), 200, replace=False).tolist():
            assert vocab.to_teacher_token(int(table[i]), family) == tokens[i]


def test_teachers_of_one_convention_share_their_tokens(union, own):
    """The union merges equal canonical spellings: WordPiece 'the', SentencePiece '▁the' and
    byte-level 'Ġthe' are one union token, as are the two Unigram teachers' common pieces."""
    vocab, teachers, _ = union
    word_start = {"wordpiece": "{}", "sentencepiece": "▁{}", "bytelevel": "Ġ{}"}
    ids = set()
    for family in teachers:
        piece = word_start[CONVENTION[family]].format("the")
        ids.add(int(vocab.map_for(family)[own(family).convert_tokens_to_ids(piece)]))
    assert [vocab.tokens[i] for i in ids] == ["the"]
    if {"xlmr", "mdeberta"} <= set(teachers):
        x, m = own("xlmr").get_vocab(), own("mdeberta").get_vocab()
        xt, mt = vocab.map_for("xlmr"), vocab.map_for("mdeberta")
        specials = {*SPELLINGS["xlmr"].values(), *SPELLINGS["mdeberta"].values()}
        common = [t for t in x if t in m and t not in specials]
        assert len(common) > 1000
        assert all(xt[x[t]] == mt[m[t]] for t in common)


# Special tokens ----------------------------------------------------------------------------------

def test_special_roles_of_every_family_meet_in_the_union(union, own):
    """`<s>`, `</s>`, `<pad>`, `<mask>`, `<unk>` and `[CLS]`, `[SEP]`, `[PAD]`, `[MASK]`, `[UNK]`,
    at whatever ids each teacher has them, map to the union's one id per role; no other
    teacher token maps to those ids."""
    vocab, teachers, _ = union
    union_id = {role: vocab.tokens.index(spelling) for role, spelling in UNION_SPECIALS.items()}
    assert union_id == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4} == vocab.special_ids
    ids_in_teacher = {
        "bert": {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103},
        "roberta": {"cls": 0, "pad": 1, "sep": 2, "unk": 3, "mask": 50264},
        "xlmr": {"cls": 0, "pad": 1, "sep": 2, "unk": 3, "mask": len(own("xlmr")) - 1},
        "mdeberta": {"pad": 0, "cls": 1, "sep": 2, "unk": 3, "mask": len(own("mdeberta")) - 1},
    }
    ids_in_teacher["distilbert"] = ids_in_teacher["bert"]
    for family in teachers:
        tokenizer, table = own(family), vocab.map_for(family)
        for role, spelling in SPELLINGS[family].items():
            tid = tokenizer.convert_tokens_to_ids(spelling)
            assert tid == ids_in_teacher[family][role], (family, role)
            assert table[tid] == union_id[role], (family, spelling)
            assert vocab.to_teacher_token(union_id[role], family) == spelling
        assert sorted(np.flatnonzero(table < 5).tolist()) == sorted(ids_in_teacher[family].values()), family


# The invariant: routed student ids = the routed teacher's ids, remapped ------------------------------

def _expected(own, vocab, family, texts, pairs=None, max_length=None):
    tokenizer = own(family)
    kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
    table = vocab.map_for(family)
    if pairs is None:
        return [table[np.asarray(tokenizer(t, **kwargs)["input_ids"], dtype=np.int64)] for t in texts]
    # A pair as the cache pipeline encodes it, in a batch: a single call tokenizer(t, "") would
    # drop an empty second text (transformers reads "" as no pair); a batch keeps its template.
    return [table[np.asarray(tokenizer([t], [p], **kwargs)["input_ids"][0], dtype=np.int64)]
            for t, p in zip(texts, pairs)]


def _same(got, expected) -> list[int]:
    """Indices where two lists of id arrays differ."""
    assert len(got) == len(expected)
    bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g.tolist() != e.tolist()]
    return bad


def test_student_ids_equal_the_routed_teachers_ids_remapped(union, own, texts):
    """For every language and every text: vocab.tokenize(text, lang) equals the routed
    teacher's own ids (AutoTokenizer from its directory) through its map; also for sentence
    pairs, with truncation, padded by encode, and for an unrouted language (first teacher)."""
    vocab, teachers, routes = union
    pairs = texts[1:] + texts[:1]
    expected_routes = {**routes, UNROUTED: teachers[0]}
    for lang, family in expected_routes.items():
        got = vocab.tokenize(texts, lang)
        assert all(g.dtype == np.int32 for g in got)
        bad = _same(got, _expected(own, vocab, family, texts))
        assert not bad, f"{lang}->{family}: {len(bad)} texts differ, e.g. {texts[bad[0]]!r}"
        bad = _same(vocab.tokenize(texts, lang, pairs), _expected(own, vocab, family, texts, pairs))
        assert not bad, f"{lang}->{family} pairs: {len(bad)} differ, e.g. {(texts[bad[0]], pairs[bad[0]])!r}"
        bad = _same(vocab.tokenize(texts, lang, pairs, max_length=12),
                    _expected(own, vocab, family, texts, pairs, max_length=12))
        assert not bad, f"{lang}->{family} truncated pairs: {len(bad)} differ"
        one = vocab.tokenize(texts[2], lang)  # a single string gives one array
        assert one.tolist() == _expected(own, vocab, family, texts[2:3])[0].tolist()
    for family in teachers:  # each text under the teacher forced by name
        assert not _same(vocab.tokenize(texts, teacher=family), _expected(own, vocab, family, texts))
    lang, family = "hi", routes["hi"]
    batch = vocab.encode(MIXED_TEXT, lang, MIXED_TEXT[::-1])
    rows = _expected(own, vocab, family, MIXED_TEXT, MIXED_TEXT[::-1])
    width = max(len(r) for r in rows)
    assert batch["input_ids"].shape == (len(rows), width)
    for i, r in enumerate(rows):
        assert batch["input_ids"][i].tolist() == r.tolist() + [0] * (width - len(r))
        assert batch["attention_mask"][i].tolist() == [1] * len(r) + [0] * (width - len(r))


def test_one_tokenizer_twice_is_refused_and_its_caches_use_the_one_entry(teacher_dirs, own, texts, tmp_path):
    """bert and distilbert carry the same tokenizer (mBERT's WordPiece), so they cannot both
    be teachers of one union; a distilbert cache finds the bert entry by its tokenizer, and
    its ids remap to what the student's routed tokenizer gives."""
    with pytest.raises(BadInput, match="same tokenizer"):
        build_vocab([str(teacher_dirs["bert"]), str(teacher_dirs["distilbert"])], tmp_path / "v")
    build_vocab([str(teacher_dirs["xlmr"]), str(teacher_dirs["bert"])], tmp_path / "v", {"hi": "bert"})
    vocab = load_vocab(tmp_path / "v")
    table = vocab.map_for({"teacher": {"name": "distilbert", "path": str(teacher_dirs["distilbert"])}})
    assert table is vocab.map_for("bert")
    distil = own("distilbert")
    expected = [table[np.asarray(distil(t)["input_ids"])] for t in texts]
    assert not _same(vocab.tokenize(texts, "hi"), expected)


# Byte pieces -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def verbatim_sp(teacher_dirs, tmp_path_factory) -> dict[str, Path]:
    """xlmr and mdeberta as AutoTokenizer loads their tokenizer.json verbatim. Loaded as
    XLMRobertaTokenizer / DebertaV2Tokenizer (their tokenizer_class), transformers rebuilds
    the pipeline from the class's defaults and keeps only the pieces: byte fallback (and
    NFKC) are gone, and a character without a piece is <unk>. With the generic class the
    file's Unigram model, byte fallback on, is what the teacher (and a cache) uses."""
    import shutil

    root = tmp_path_factory.mktemp("verbatim")
    dirs = {}
    for family in ("xlmr", "mdeberta"):
        out = root / f"{family}-bytes"
        shutil.copytree(teacher_dirs[family], out)
        config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        dirs[family] = out
    return dirs


def test_byte_fallback_and_partial_utf8_pieces_survive(teacher_dirs, verbatim_sp, own, texts, tmp_path):
    """Every SentencePiece byte-fallback piece `<0xHH>` keeps its spelling and its own union
    id; every byte-level RoBERTa piece holding partial UTF-8 ('Ġà¤') becomes `<0xHH>` escapes
    and reads back; and text that uses them (an emoji and a rare CJK character through byte
    fallback, Hindi for RoBERTa) tokenizes through the union as the teacher did."""
    from transformers import AutoTokenizer

    build_vocab([str(verbatim_sp["xlmr"]), str(teacher_dirs["roberta"]), str(verbatim_sp["mdeberta"])],
                tmp_path / "v", {"hi": "roberta", "zh": "xlmr-bytes", "ja": "mdeberta-bytes"})
    vocab = load_vocab(tmp_path / "v")
    sp = {f"{f}-bytes": AutoTokenizer.from_pretrained(str(d)) for f, d in verbatim_sp.items()}
    for name, tokenizer in sp.items():
        tokens, table = own_tokens(tokenizer), vocab.map_for(name)
        assert vocab.teacher_tokens(name) == tokens and len(np.unique(table)) == len(tokens)
        pieces = spm_byte_fallback(tokens)
        assert len(pieces) == 256
        for piece in pieces:
            u = int(table[tokens.index(piece)])
            assert vocab.tokens[u] == piece and vocab.to_teacher_token(u, name) == piece
    xt, mt = own_tokens(sp["xlmr-bytes"]), own_tokens(sp["mdeberta-bytes"])
    assert all(vocab.map_for("xlmr-bytes")[xt.index(p)] == vocab.map_for("mdeberta-bytes")[mt.index(p)]
               for p in spm_byte_fallback(xt))

    tokens, table = own_tokens(own("roberta")), vocab.map_for("roberta")
    partial = [i for i, t in enumerate(tokens) if t not in SPELLINGS["roberta"].values() and is_partial_utf8(t)]
    assert len(partial) > 300
    for i in partial:
        spelled = vocab.tokens[table[i]]
        assert re.fullmatch(r"(##)?(<0x[0-9A-F]{2}>)+", spelled), (tokens[i], spelled)
        assert vocab.to_teacher_token(int(table[i]), "roberta") == tokens[i]
    assert vocab.tokens[table[tokens.index("Ġà¤")]] == "<0xE0><0xA4>"
    assert vocab.tokens[table[tokens.index("à¤")]] == "##<0xE0><0xA4>"

    hindi = MIXED_TEXT[2]
    ids = own("roberta")(hindi)["input_ids"]
    assert tokens.index("Ġà¤") in ids
    assert vocab.tokenize(hindi, "hi").tolist() == table[ids].tolist()
    assert [vocab.to_teacher_token(u, "roberta") for u in vocab.tokenize(hindi, "hi")] == \
        own("roberta").convert_ids_to_tokens(ids)
    for lang, name in (("zh", "xlmr-bytes"), ("ja", "mdeberta-bytes")):
        text = "龘 🙂 ꙮ"
        ids = sp[name](text)["input_ids"]
        pieces = sp[name].convert_ids_to_tokens(ids)
        assert {"<0xF0>", "<0x9F>", "<0x99>", "<0x82>"} <= set(pieces)  # 🙂 = F0 9F 99 82, by byte fallback
        got = vocab.tokenize(text, lang)
        assert got.tolist() == vocab.map_for(name)[ids].tolist()
        assert [vocab.to_teacher_token(u, name) for u in got] == pieces
        expected = [vocab.map_for(name)[np.asarray(sp[name](t)["input_ids"], dtype=np.int64)] for t in texts]
        assert not _same(vocab.tokenize(texts, lang), expected)


# A known limit ---------------------------------------------------------------------------------

def test_a_union_token_shared_across_conventions_means_the_same_bytes(union, own, request):
    """Where teachers of different conventions share a union token, each teacher's token
    stands for the same bytes and the same word start (computed here from the tokens). Holds
    except for one documented clash, expected to fail where a SentencePiece and a byte-level
    teacher meet."""
    vocab, teachers, _ = union
    if {CONVENTION[f] for f in teachers} >= {"sentencepiece", "bytelevel"}:
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "known clash (docs/vocab.md, 'Canonical forms across conventions'): a SentencePiece byte-fallback "
            "piece <0xC3> (a byte inside a word) and a byte-level word-start byte 'ĠÃ' (a space, then the "
            "byte) are both spelled <0xC3> and share a union id")))
    seen: dict[int, tuple[str, str, tuple[bool, bytes]]] = {}
    clashes = []
    for family in teachers:
        specials = set(SPELLINGS[family].values())
        for token, u in zip(own_tokens(own(family)), vocab.map_for(family).tolist()):
            if token in specials:
                continue
            m = meaning(token, CONVENTION[family])
            other = seen.setdefault(u, (family, token, m))
            if other[2] != m:
                clashes.append((vocab.tokens[u], other[:2], (family, token)))
    assert not clashes, f"{len(clashes)} union tokens mean different bytes to different teachers, e.g. {clashes[:4]}"
