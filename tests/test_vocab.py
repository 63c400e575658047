"""build-vocab on the real vocab files: union sizes, the round trip, special tokens,
canonical forms, reproducibility, the remap kernels, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import xkd
from xkd.cli import app
from xkd.errors import BadInput, XkdError
from xkd.vocab import build_vocab, load_vocab, remap, remap_ragged, remap_rows, stack_tables
from xkd.vocab.canonical import (
    BYTELEVEL,
    SENTENCEPIECE,
    WORDPIECE,
    byte_to_unicode,
    from_canonical,
    to_canonical,
)
from xkd.vocab.remap import PARALLEL_MIN

from conftest import VOCABS

UNCASED = VOCABS / "bert-base-uncased.vocab.txt"
CASED = VOCABS / "bert-base-cased.vocab.txt"
MBERT = VOCABS / "bert-base-multilingual-cased.vocab.txt"
CHINESE = VOCABS / "bert-base-chinese.vocab.txt"
BETO_CASED = VOCABS / "beto-base-cased.vocab.txt"
BETO_UNCASED = VOCABS / "beto-base-uncased.vocab.txt"
ROBERTA = VOCABS / "roberta-base"
SPECIAL_SPELLINGS = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}

runner = CliRunner()


def lines(path: Path) -> list[str]:
    """A vocab.txt read independently of xkd: split on newlines only (bert-base-chinese holds
    U+2028 as a token, which str.splitlines would split on)."""
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def roberta_tokens() -> list[str]:
    vocab = json.loads((ROBERTA / "vocab.json").read_text(encoding="utf-8"))
    return sorted(vocab, key=vocab.get)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """WordPiece uncased + mBERT + BETO (specials in another order) + byte-level BPE RoBERTa."""
    out = tmp_path_factory.mktemp("vocab") / "four"
    build_vocab([str(UNCASED), str(MBERT), str(BETO_CASED), str(ROBERTA)], out)
    return load_vocab(out)


# Canonical forms -----------------------------------------------------------------------------

@pytest.mark.parametrize("convention,token,canonical", [
    (WORDPIECE, "the", "the"),
    (WORDPIECE, "##ing", "##ing"),
    (WORDPIECE, "###", "###"),
    (SENTENCEPIECE, "\u2581the", "the"),
    (SENTENCEPIECE, "ing", "##ing"),
    (SENTENCEPIECE, "\u2581", "##<0x20>"),
    (SENTENCEPIECE, "<0x0A>", "<0x0A>"),
    (SENTENCEPIECE, "\u2581New\u2581York", "<0x4E><0x65><0x77><0x20><0x59><0x6F><0x72><0x6B>"),
    (BYTELEVEL, "\u0120the", "the"),
    (BYTELEVEL, "s", "##s"),
    (BYTELEVEL, "\u0120", "##<0x20>"),
    (BYTELEVEL, "\u0120\u0120", "<0x20>"),
    (BYTELEVEL, "\u0120\u00e0\u00a4", "<0xE0><0xA4>"),  # a space and two bytes of a Devanagari letter
    (BYTELEVEL, "\u0120##", "<0x23><0x23>"),  # would read as a continuation
    (BYTELEVEL, "\u010a", "##<0x0A>"),  # newline byte
    (BYTELEVEL, "<0x41>", "##<0x3C><0x30><0x78><0x34><0x31><0x3E>"),  # looks like an escape
    (BYTELEVEL, "\u0120caf\u00c3\u00a9", "caf\u00e9"),  # UTF-8 bytes of é decode
])
def test_canonical_form_and_its_inverse(convention, token, canonical):
    assert to_canonical(token, convention) == canonical
    assert from_canonical(canonical, convention) == token


def test_every_short_byte_sequence_round_trips_through_the_canonical_form():
    table = byte_to_unicode()
    seen = {}
    for a in range(256):
        for b in [None, *range(0, 256, 7)]:
            raw = bytes([a]) if b is None else bytes([a, b])
            token = "".join(table[x] for x in raw)
            canonical = to_canonical(token, BYTELEVEL)
            assert "\n" not in canonical and canonical
            assert from_canonical(canonical, BYTELEVEL) == token
            assert seen.setdefault(canonical, token) == token  # injective


# The union -------------------------------------------------------------------------------------

def test_union_size_equals_an_independent_set_union(tmp_path):
    """Five WordPiece vocabs (BETO's specials in another order, U+2028 in Chinese): the union
    is the five unified specials plus every other distinct line."""
    files = [UNCASED, MBERT, BETO_CASED, BETO_UNCASED, CHINESE]
    summary = build_vocab([str(f) for f in files], tmp_path / "v")
    distinct = set()
    for f in files:
        distinct |= set(lines(f)) - SPECIAL_SPELLINGS
    expected = 5 + len(distinct)
    vocab = load_vocab(tmp_path / "v")
    assert summary["size"] == vocab.size == len(vocab.tokens) == expected
    assert len(set(vocab.tokens)) == expected
    # The order: specials, then each teacher's new tokens in its own order.
    first_new = [t for t in lines(UNCASED) if t not in SPECIAL_SPELLINGS]
    assert vocab.tokens[5 : 5 + len(first_new)] == first_new
    # Pairwise overlap of the report, independently.
    a, b = set(lines(UNCASED)), set(lines(MBERT))
    pair = summary["overlaps"]["bert-base-uncased|bert-base-multilingual-cased"]
    assert pair["shared"] == len(a & b)
    assert pair["jaccard"] == pytest.approx(len(a & b) / len(a | b), abs=1e-6)
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["teachers"]["bert-base-multilingual-cased"]["added_to_union"] == len(b - a)
    assert report["teachers"]["bert-base-chinese"]["only_in_this_teacher"] == len(
        set(lines(CHINESE)) - set().union(*(set(lines(f)) for f in files if f != CHINESE))
    )


def test_roberta_joins_the_union_in_canonical_form(four):
    """Byte-level BPE tokens meet WordPiece ones: 'Ġthe' is bert's 'the'; every RoBERTa id
    has its own union id; its clean tokens' canonical forms are computed here independently
    from the decoded text (a leading space marks a word start)."""
    tokens = roberta_tokens()
    table = four.map_for(str(ROBERTA))
    assert table.dtype == np.int32 and table.shape == (50265,)
    assert len(np.unique(table)) == 50265
    uncased = four.map_for(str(UNCASED))
    assert table[tokens.index("\u0120the")] == uncased[lines(UNCASED).index("the")]
    decode = {c: b for b, c in byte_to_unicode().items()}
    checked = 0
    for i, tok in enumerate(tokens[:5000]):
        if tok in ("<s>", "<pad>", "</s>", "<unk>", "<mask>"):
            continue
        text = bytes(decode[c] for c in tok).decode("utf-8", errors="replace")
        if (text.startswith(" ") and len(text) > 1 and text[1:].isprintable() and " " not in text[1:]
                and "\ufffd" not in text and not text[1:].startswith("##")):
            assert four.tokens[table[i]] == text[1:]
            checked += 1
        elif " " not in text and text.isprintable() and text and "\ufffd" not in text:
            assert four.tokens[table[i]] == "##" + text
            checked += 1
    assert checked > 4500


def test_round_trip_for_every_token_of_every_teacher(four):
    """teacher id -> student id -> token string gives back the teacher's token, for all
    30,522 + 119,547 + 31,002 + 50,265 tokens."""
    expected = {str(UNCASED): lines(UNCASED), str(MBERT): lines(MBERT), str(BETO_CASED): lines(BETO_CASED),
                str(ROBERTA): roberta_tokens()}
    for teacher, tokens in expected.items():
        assert four.teacher_tokens(teacher) == tokens
    assert four.to_teacher_token(four.map_for(str(ROBERTA))[50264], str(ROBERTA)) == "<mask>"


def test_a_sentencepiece_tokenizer_json_joins_by_canonical_form(tmp_path):
    """A real Unigram/Metaspace tokenizer (trained here with the tokenizers library on
    Tatoeba text), given as a bare tokenizer.json: '▁the' meets bert's 'the', and the
    round trip holds for every one of its tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from conftest import PARALLEL

    sp = Tokenizer(models.Unigram())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    text = (PARALLEL / "tatoeba" / "tatoeba.deu-eng.deu").read_text(encoding="utf-8").split("\n")[:400]
    sp.train_from_iterator(text, trainers.UnigramTrainer(
        vocab_size=600, special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<mask>"], unk_token="<unk>"))
    sp.save(str(tmp_path / "tokenizer.json"))
    build_vocab([str(UNCASED), str(tmp_path / "tokenizer.json")], tmp_path / "v")
    vocab = load_vocab(tmp_path / "v")
    sp_vocab = sp.get_vocab()
    sp_tokens = sorted(sp_vocab, key=sp_vocab.get)
    entry = vocab.teacher(str(tmp_path / "tokenizer.json"))
    assert entry["convention"] == SENTENCEPIECE
    assert vocab.teacher_tokens(str(tmp_path / "tokenizer.json")) == sp_tokens
    table = vocab.map_for(str(tmp_path / "tokenizer.json"))
    assert table[sp_vocab["<mask>"]] == vocab.mask_id and table[sp_vocab["<s>"]] == vocab.cls_id
    bert = lines(UNCASED)
    shared = [t for t in sp_tokens if t.startswith("\u2581") and t[1:] in bert]
    assert len(shared) > 50
    for t in shared:
        assert vocab.tokens[table[sp_vocab[t]]] == t[1:]
        assert table[sp_vocab[t]] == vocab.map_for(str(UNCASED))[bert.index(t[1:])]
    words = vocab.tokenize(["Ich habe Hunger."], teacher=str(tmp_path / "tokenizer.json"))[0]
    assert [vocab.to_teacher_token(u, str(tmp_path / "tokenizer.json")) for u in words] == sp.encode("Ich habe Hunger.").tokens


def test_special_tokens_are_unified_whatever_their_ids(four):
    assert four.tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (four.pad_id, four.unk_id, four.cls_id, four.sep_id, four.mask_id) == (0, 1, 2, 3, 4)
    beto = four.map_for(str(BETO_CASED))
    # BETO: [MASK]=0 [PAD]=1 [EOS]=2 [UNK]=3 [CLS]=4 [SEP]=5
    assert beto[[0, 1, 3, 4, 5]].tolist() == [4, 0, 1, 2, 3]
    assert beto[2] >= 5 and four.tokens[beto[2]] == "[EOS]"
    uncased = four.map_for(str(UNCASED))
    assert uncased[[0, 100, 101, 102, 103]].tolist() == [0, 1, 2, 3, 4]
    roberta = four.map_for(str(ROBERTA))
    # <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=50264
    assert roberta[[0, 1, 2, 3, 50264]].tolist() == [2, 0, 3, 1, 4]
    meta = json.loads((four.path / "xkd-vocab.json").read_text())
    beto_meta = next(t for t in meta["teachers"] if t["slug"] == "beto-base-cased")
    assert beto_meta["special_roles"] == {"cls": "[CLS]", "mask": "[MASK]", "pad": "[PAD]", "sep": "[SEP]", "unk": "[UNK]"}


def test_the_union_tokenizer_loads_with_autotokenizer(four):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(four.path))
    assert len(tok) == four.size
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    ids = tok("Hola, ¿qué tal?")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    assert tok.convert_ids_to_tokens(ids)[1:-1] == tok.tokenize("Hola, ¿qué tal?")
    assert (four.path / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1] == four.tokens


def test_same_inputs_give_byte_identical_outputs(tmp_path):
    teachers = [str(BETO_UNCASED), str(ROBERTA), str(CASED)]
    build_vocab(teachers, tmp_path / "a", {"es": str(BETO_UNCASED)})
    build_vocab(teachers, tmp_path / "b", {"es": str(BETO_UNCASED)})
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) >= 10
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_manifest_keys_select_the_teacher_and_catch_other_tokenizers(four):
    by_manifest = four.map_for({"teacher": {"name": "something-else", "path": str(MBERT), "vocab_size": 119547,
                                            "special_ids": {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}}})
    assert by_manifest is four.map_for("bert-base-multilingual-cased")
    assert four.map_for(str(MBERT.resolve())) is by_manifest
    with pytest.raises(BadInput, match="has 30000 tokens, the vocab.s teacher 30522"):
        four.map_for({"teacher": {"name": str(UNCASED), "vocab_size": 30000}})
    with pytest.raises(BadInput, match="mask token is id 0"):
        four.map_for({"teacher": {"name": str(UNCASED), "special_ids": {"mask": 0}}})
    with pytest.raises(BadInput, match="not among the teachers"):
        four.map_for({"teacher": {"name": "muril", "model_id": "google/muril-base-cased"}})
    with pytest.raises(BadInput, match="not in the vocab"):
        four.map_for("xlmr")


# Remapping -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.uint32, np.int64, np.uint16, np.int32])
def test_remap_equals_fancy_indexing_for_any_integer_array(dtype):
    rng = np.random.default_rng(0)
    table = rng.permutation(60_000).astype(np.int32)
    ids = rng.integers(0, 60_000, size=(7, 11, 13)).astype(dtype)
    out = remap(ids, table)
    assert out.dtype == np.int32 and out.shape == ids.shape
    assert np.array_equal(out, table[ids])
    assert np.array_equal(xkd.remap(ids[:, 3, ::2], table), table[ids[:, 3, ::2]])  # non-contiguous
    assert remap(np.zeros((0, 4), dtype), table).shape == (0, 4)


def test_large_arrays_take_the_parallel_kernel_and_agree():
    rng = np.random.default_rng(1)
    table = rng.permutation(290_000).astype(np.int32)
    ids = rng.integers(0, 290_000, size=PARALLEL_MIN * 3 + 17).astype(np.uint32)
    assert np.array_equal(remap(ids, table), table[ids])
    out = np.empty(ids.size, np.int32)
    assert remap(ids, table, out=out) is not None and np.array_equal(out, table[ids])


@pytest.mark.parametrize("n", [1000, PARALLEL_MIN * 2 + 5])
@pytest.mark.parametrize("bad", [290_000, 4_000_000_000, -1])
def test_an_id_out_of_range_is_an_error_naming_it(n, bad):
    table = np.arange(290_000, dtype=np.int32)
    ids = np.arange(n, dtype=np.int64) % 290_000
    ids[n - 3] = bad
    if bad < 0 or bad >= 2**32:
        arr = ids
    else:
        arr = ids.astype(np.uint32)
    with pytest.raises(XkdError, match=rf"id {bad} at position {n - 3} is out of range for a table of 290000 entries"):
        remap(arr, table)
    with pytest.raises(XkdError, match=r"position \(1, 2\)"):
        remap(np.array([[1, 2, 3], [4, 5, 290_000]]), table)


def test_ragged_and_mixed_teacher_rows(four):
    from xkd.storage import Ragged

    rows = Ragged.from_rows([np.array([101, 7592, 102]), np.array([0, 31414, 2]), np.array([4, 0, 5])], np.uint32)
    uncased, roberta, beto = (four.map_for(str(p)) for p in (UNCASED, ROBERTA, BETO_CASED))
    flat = remap_ragged(rows, roberta)
    assert np.array_equal(flat.offsets, rows.offsets) and np.array_equal(flat.values, roberta[rows.values])
    stacked = four.stacked_maps([str(UNCASED), str(ROBERTA), str(BETO_CASED)])
    mixed = four.remap_rows(rows.values, rows.offsets, np.array([0, 1, 2]), stacked)
    assert mixed.tolist() == [*uncased[[101, 7592, 102]], *roberta[[0, 31414, 2]], *beto[[4, 0, 5]]]
    assert [four.tokens[i] for i in mixed[[0, 2, 3, 5, 6, 8]]] == ["[CLS]", "[SEP]"] * 3
    # RoBERTa spells a sentence-initial word without its space marker, so it is a continuation.
    assert mixed[7] == four.mask_id and four.tokens[mixed[1]] == "hello" and four.tokens[mixed[4]] == "##Hello"
    with pytest.raises(XkdError, match=r"row 1\).*id 60000 at position 4 .* table of 50265"):
        remap_rows(np.array([1, 2, 3, 4, 60000, 6], np.uint32), np.array([0, 3, 6]), np.array([0, 1]),
                   stack_tables([uncased, roberta]))
    with pytest.raises(XkdError, match="teacher roberta-base"):
        four.remap(np.array([50265]), str(ROBERTA))


def _remap_in_child(n: int) -> tuple[bool, bool, bool]:
    import os
    import sys

    kernels = sys.modules["xkd.vocab.remap"]
    rng = np.random.default_rng(5)
    table = rng.permutation(50_000).astype(np.int32)
    ids = rng.integers(0, 50_000, size=n).astype(np.uint32)
    offsets = np.arange(0, n + 1, 64)
    rows = remap_rows(ids, offsets, np.arange(offsets.size - 1) % 2, stack_tables([table, table[::-1]]))
    expected_rows = np.where(np.repeat(np.arange(offsets.size - 1) % 2, 64) == 0, table[ids], table[::-1][ids])
    same = bool(np.array_equal(remap(ids, table), table[ids]))
    own_pool = kernels._threads() == 1 or kernels._pool[0] == os.getpid()
    return own_pool, same, bool(np.array_equal(rows, expected_rows))


def test_a_forked_worker_remaps_with_its_own_threads():
    """A data-loader worker forked after the parent used its remap threads gets a pool of
    its own (the parent's threads do not exist in it) and the same results."""
    import multiprocessing

    n = PARALLEL_MIN * 2
    assert _remap_in_child(n) == (True, True, True)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply_async(_remap_in_child, (n,)).get(timeout=120) == (True, True, True)


# Command line and bad input --------------------------------------------------------------------

def test_cli_build_vocab_json_and_both_ways_to_give_several_teachers(tmp_path):
    one = runner.invoke(app, ["build-vocab", "--teachers", str(UNCASED), str(BETO_UNCASED),
                              "--out", str(tmp_path / "a"), "--json"])
    assert one.exit_code == 0, one.output
    result = json.loads(one.stdout.strip().splitlines()[-1])
    assert result["vocab_dir"] == str(tmp_path / "a") and result["size"] == load_vocab(tmp_path / "a").size
    assert set(result["teachers"]) == {"bert-base-uncased", "beto-base-uncased"}
    two = runner.invoke(app, ["build-vocab", "--teachers", str(UNCASED), "--teachers", str(BETO_UNCASED),
                              "--out", str(tmp_path / "b")])
    assert two.exit_code == 0 and "union of 2 teachers" in two.output
    assert (tmp_path / "a" / "vocab.txt").read_bytes() == (tmp_path / "b" / "vocab.txt").read_bytes()


def _bad(tmp_path, args, match):
    result = runner.invoke(app, ["build-vocab", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert match in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_bad_vocab_files_are_clear_errors_with_exit_code_2(tmp_path):
    _bad(tmp_path, ["--teachers", str(tmp_path / "missing.vocab.txt")], "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    _bad(tmp_path, ["--teachers", str(empty)], "is empty")
    dup = tmp_path / "dup.txt"
    dup.write_text("[PAD]\n[UNK]\nthe\n##s\nthe\n")
    _bad(tmp_path, ["--teachers", str(dup)], "line 5 repeats the token 'the' of line 3")
    blank = tmp_path / "blank.txt"
    blank.write_text("[PAD]\n[UNK]\n\nthe\n")
    _bad(tmp_path, ["--teachers", str(blank)], "line 3 is empty")
    mixed = tmp_path / "mixed.txt"
    words = lines(UNCASED)[1000:1100]
    mixed.write_text("\n".join(["[PAD]", "[UNK]", *[f"##{w}" for w in words], *[f"\u2581{w}" for w in words]]) + "\n")
    _bad(tmp_path, ["--teachers", str(mixed)], "mixes token conventions")
    _bad(tmp_path, ["--teachers", str(UNCASED), str(UNCASED)], "have the same tokenizer")
    _bad(tmp_path, ["--teachers", str(UNCASED), "--lang-teacher", "hi=mbert"], "is not one of --teachers")
    _bad(tmp_path, ["--teachers", str(UNCASED), "--lang-teacher", "hi"], "LANG=TEACHER")
    _bad(tmp_path, ["--teachers", "no-such-teacher-anywhere"], "does not resolve")


def test_a_failed_build_leaves_the_previous_vocab_untouched(tmp_path):
    build_vocab([str(BETO_UNCASED)], tmp_path / "v")
    before = (tmp_path / "v" / "vocab.txt").read_bytes()
    with pytest.raises(BadInput):
        build_vocab([str(BETO_UNCASED), str(tmp_path / "missing.txt")], tmp_path / "v")
    assert (tmp_path / "v" / "vocab.txt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v"]
    build_vocab([str(BETO_CASED)], tmp_path / "v", overwrite=True)  # a successful build with overwrite replaces it
    assert load_vocab(tmp_path / "v").teacher_names == ["beto-base-cased"]
    assert not (tmp_path / "v" / "maps" / "beto-base-uncased.npy").exists()


def test_load_vocab_on_a_directory_that_is_not_one(tmp_path):
    with pytest.raises(BadInput, match="not an xkd vocab directory"):
        xkd.load_vocab(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("mine")
    with pytest.raises(BadInput, match="not an xkd vocab"):
        build_vocab([str(BETO_UNCASED)], tmp_path / "x")
    assert (tmp_path / "x" / "keep").read_text() == "mine"
