"""The tokenizer saved with a union-vocab student (issue 14; docs/vocab.md, "The student tokenizer").

Training tokenized each language with the teacher tokenizer the vocab routes it to, remapped
into the union (`Vocab.tokenize`); these tests hold the saved tokenizer to those ids on 200
Tatoeba sentences per language, alone and as pairs:

- a two-route union (the real MiniLM, which lower-cases, for English; a tiny model with the
  real mBERT vocabulary, cased, for Hindi): `xkd.load_student_tokenizer(dir)` is exact for
  both; AutoTokenizer(dir) is the remapped default route (mBERT), exact for Hindi and not
  claimed, nor true, for English;
- single-teacher unions (mBERT WordPiece, RoBERTa byte-level BPE): AutoTokenizer(dir) is
  exact for every language, with the union's special ids and size;
- a Unigram route (XLM-R style), which no remapped tokenizer can carry: kept as the
  teacher's files plus its id map, still exact through the loader;
- `train-student` writes it all into the student directory, and replaces it on --overwrite.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from typer.testing import CliRunner

import xkd
from xkd.errors import BadInput
from xkd.vocab import build_vocab, load_vocab, save_student_tokenizer
from xkd.vocab.build import parse_lang_teacher

from conftest import PARALLEL, VOCABS, build_tiny_bert, cache_teacher

N = 200
LANGS = ("en", "hi")


def tatoeba(lang: str) -> list[str]:
    name = {"en": "tatoeba.hin-eng.eng", "hi": "tatoeba.hin-eng.hin"}[lang]
    lines = (PARALLEL / "tatoeba" / name).read_text(encoding="utf-8").split("\n")  # "\n" only, as xkd reads lines
    return [line for line in lines if line][:N]


@pytest.fixture(scope="module")
def sentences():
    return {lang: tatoeba(lang) for lang in LANGS}


def training_ids(vocab, texts, lang, pairs=None, max_length=None) -> list[list[int]]:
    return [row.tolist() for row in vocab.tokenize(texts, lang, pairs, max_length=max_length)]


def agreement(got, want) -> int:
    """How many rows are equal, id for id."""
    assert len(got) == len(want)
    return sum(list(map(int, g)) == w for g, w in zip(got, want))


def auto_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def mbert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("teachers") / "tiny-mbert",
                           VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False, seed=2)


@pytest.fixture(scope="module")
def two_routes(minilm_dir, mbert, tmp_path_factory):
    """MiniLM for English, mBERT for Hindi (and the default: it neither lower-cases nor strips
    accents), as `xkd build-vocab --lang-teacher en=... --lang-teacher hi=...`."""
    root = tmp_path_factory.mktemp("two-routes")
    routes = parse_lang_teacher([f"en={minilm_dir}", f"hi={mbert}"])
    build_vocab([str(minilm_dir), str(mbert)], root / "vocab", lang_teacher=routes)
    vocab = load_vocab(root / "vocab")
    info = save_student_tokenizer(vocab, root / "student")
    return {"vocab": vocab, "dir": root / "student", "info": info, "minilm": vocab.teacher(str(minilm_dir))["slug"],
            "mbert": vocab.teacher(str(mbert))["slug"]}


# Two routes -------------------------------------------------------------------------------

def test_two_route_student_dir_says_what_autotokenizer_reproduces(two_routes):
    info, vocab = two_routes["info"], two_routes["vocab"]
    assert info == json.loads((two_routes["dir"] / "xkd_tokenizer.json").read_text(encoding="utf-8"))
    assert info["routes"] == {"en": two_routes["minilm"], "hi": two_routes["mbert"]}
    assert info["default"] == two_routes["mbert"]
    assert info["auto_tokenizer_exact_for"] == ["hi"] and info["auto_tokenizer_not_exact_for"] == ["en"]
    assert info["auto_tokenizer_exact_for_unrouted"] is True  # e.g. French goes to the default, mBERT
    assert set(info["teachers"]) == {two_routes["minilm"], two_routes["mbert"]}
    assert info["tokenizers"][two_routes["mbert"]]["dir"] == "."
    assert (two_routes["dir"] / info["tokenizers"][two_routes["minilm"]]["dir"] / "tokenizer.json").is_file()
    assert info["specials"] == vocab.special_ids and info["vocab_size"] == vocab.size


def test_loader_gives_the_training_ids_for_every_language(two_routes, sentences):
    vocab = two_routes["vocab"]
    tok = xkd.load_student_tokenizer(two_routes["dir"])
    for lang in LANGS:
        texts = sentences[lang]
        assert agreement(tok(texts, language=lang)["input_ids"], training_ids(vocab, texts, lang)) == N, lang
        assert tok.encode(texts[0], language=lang) == training_ids(vocab, texts[:1], lang)[0]
        # Pairs, truncated: the routed teacher's pair template and truncation, in union ids.
        pairs = sentences[lang][::-1]
        got = tok(texts, pairs, language=lang, truncation=True, max_length=24)["input_ids"]
        assert agreement(got, training_ids(vocab, texts, lang, pairs, max_length=24)) == N, lang


def test_loader_batches_equal_what_training_fed_the_student(two_routes, sentences):
    """Padded ids, attention mask and the pair token types, as xkd.student.text builds them."""
    import torch

    from xkd.student.text import encode_by_language

    vocab = two_routes["vocab"]
    tok = xkd.load_student_tokenizer(two_routes["dir"])
    for lang in LANGS:
        texts, pairs = sentences[lang][:32], sentences[lang][32:64]
        want = encode_by_language(vocab, texts, [lang] * len(texts), 40, pairs)
        got = tok(texts, pairs, language=lang, padding=True, truncation=True, max_length=40, return_tensors="pt")
        assert set(got) == set(want) == {"input_ids", "attention_mask", "token_type_ids"}
        for key in want:
            assert torch.equal(got[key], want[key]), (lang, key)
        single = tok(texts, language=lang, padding=True, return_tensors="pt")
        assert torch.equal(single["input_ids"], torch.from_numpy(vocab.encode(texts, lang)["input_ids"]))


def test_autotokenizer_is_exact_where_claimed_and_not_for_english(two_routes, sentences):
    vocab, info = two_routes["vocab"], two_routes["info"]
    auto = auto_tokenizer(two_routes["dir"])
    assert len(auto) == vocab.size  # scripts resize embeddings to len(tokenizer)
    assert (auto.pad_token_id, auto.unk_token_id, auto.cls_token_id, auto.sep_token_id, auto.mask_token_id) == (
        vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id)
    assert auto.model_max_length == 512  # MiniLM's limit; mBERT's tiny copy states none
    counts = {lang: agreement(auto(sentences[lang])["input_ids"], training_ids(vocab, sentences[lang], lang))
              for lang in LANGS}
    assert counts["hi"] == N
    hi = sentences["hi"]
    pairs = auto(hi, hi[::-1], truncation=True, max_length=24)["input_ids"]
    assert agreement(pairs, training_ids(vocab, hi, "hi", hi[::-1], max_length=24)) == N
    # English went through MiniLM, which lower-cases: AutoTokenizer (mBERT's) keeps the capitals.
    assert "en" not in info["auto_tokenizer_exact_for"] and counts["en"] < N // 10, counts


def test_decode_reads_back_the_text(two_routes, sentences):
    tok = xkd.load_student_tokenizer(two_routes["dir"])
    auto = auto_tokenizer(two_routes["dir"])
    text = sentences["en"][0]
    assert tok.decode(tok.encode(text, language="en"), language="en", skip_special_tokens=True) == text.lower()
    hi = sentences["hi"][1]
    ids = tok.encode(hi, language="hi")
    assert auto.decode(ids, skip_special_tokens=True) == tok.decode(ids, language="hi", skip_special_tokens=True)
    assert auto.decode(ids, skip_special_tokens=True).replace(" ", "") == hi.replace(" ", "")


def test_the_comparison_catches_english_routed_through_mbert(two_routes, sentences, tmp_path):
    """The mutation the tests exist for: a student tokenizer sending English to mBERT."""
    wrong = tmp_path / "wrong"
    shutil.copytree(two_routes["dir"], wrong)
    info = json.loads((wrong / "xkd_tokenizer.json").read_text(encoding="utf-8"))
    info["routes"]["en"] = two_routes["mbert"]
    (wrong / "xkd_tokenizer.json").write_text(json.dumps(info), encoding="utf-8")
    texts = sentences["en"]
    got = xkd.load_student_tokenizer(wrong)(texts, language="en")["input_ids"]
    assert agreement(got, training_ids(two_routes["vocab"], texts, "en")) < N // 10


def test_a_call_without_language_warns_once_when_routes_differ(two_routes):
    tok = xkd.load_student_tokenizer(two_routes["dir"])
    with pytest.warns(UserWarning, match="language="):
        tok(["Hello."])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok(["Hello again."])  # once per tokenizer
        tok(["Hello."], language="EN")  # codes compare in BCP-47 case
    assert tok.teacher_for("EN") == two_routes["minilm"] and tok.teacher_for("fr") == two_routes["mbert"]


# One route --------------------------------------------------------------------------------

def single_teacher_checks(vocab, student, sentences):
    info = json.loads((student / "xkd_tokenizer.json").read_text(encoding="utf-8"))
    assert info["auto_tokenizer_exact_for"] == ["*"] and not (student / "tokenizers").exists()
    auto = auto_tokenizer(student)
    assert len(auto) == vocab.size
    assert (auto.pad_token_id, auto.unk_token_id, auto.cls_token_id, auto.sep_token_id, auto.mask_token_id) == (
        vocab.pad_id, vocab.unk_id, vocab.cls_id, vocab.sep_id, vocab.mask_id)
    tok = xkd.load_student_tokenizer(student)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one route: nothing to warn about
        tok(["x"])
    for lang in LANGS:
        texts = sentences[lang]
        want = training_ids(vocab, texts, lang)
        assert agreement(auto(texts)["input_ids"], want) == N, lang
        assert agreement(tok(texts, language=lang)["input_ids"], want) == N, lang
        pairs = texts[::-1]
        want = training_ids(vocab, texts, lang, pairs, max_length=24)
        assert agreement(auto(texts, pairs, truncation=True, max_length=24)["input_ids"], want) == N, lang
    return auto


def test_single_wordpiece_teacher_autotokenizer_is_exact_for_every_language(mbert, sentences, tmp_path):
    build_vocab([str(mbert)], tmp_path / "vocab")
    vocab = load_vocab(tmp_path / "vocab")
    save_student_tokenizer(vocab, tmp_path / "student")
    single_teacher_checks(vocab, tmp_path / "student", sentences)


def test_a_student_saved_again_with_one_route_drops_the_earlier_routes(two_routes, mbert, tmp_path):
    from xkd.student.models import StudentConfig, build_student
    from xkd.student.run import save_student
    from xkd.vocab import StudentTokenizer

    out = tmp_path / "student"
    vocab = two_routes["vocab"]
    model = build_student(StudentConfig(hidden=32, layers=1, heads=2), vocab.size, vocab.pad_id)
    save_student(model, StudentTokenizer.from_vocab(vocab, model.config), out)
    assert (out / "tokenizers" / two_routes["minilm"] / "tokenizer.json").is_file()
    build_vocab([str(mbert)], tmp_path / "one")
    one = load_vocab(tmp_path / "one")
    model = build_student(StudentConfig(hidden=32, layers=1, heads=2), one.size, one.pad_id)
    save_student(model, StudentTokenizer.from_vocab(one, model.config), out)
    assert not (out / "tokenizers").exists()
    assert json.loads((out / "xkd_tokenizer.json").read_text())["auto_tokenizer_exact_for"] == ["*"]


def test_single_byte_level_bpe_teacher_autotokenizer_is_exact(sentences, tmp_path):
    import torch

    from xkd.student.text import encode_by_language

    from families import build_family

    roberta = build_family("roberta", tmp_path / "roberta")
    build_vocab([str(roberta)], tmp_path / "vocab")
    vocab = load_vocab(tmp_path / "vocab")
    save_student_tokenizer(vocab, tmp_path / "student")
    auto = single_teacher_checks(vocab, tmp_path / "student", sentences)
    # RoBERTa's template gives pairs all-0 token types; training gave the second text 1s.
    texts, pairs = sentences["en"][:8], sentences["en"][8:16]
    want = encode_by_language(vocab, texts, ["en"] * 8, 32, pairs)
    got = auto(texts, pairs, padding=True, truncation=True, max_length=32, return_tensors="pt")
    assert all(torch.equal(got[k], want[k]) for k in want)
    teacher = vocab.teacher_tokenizer("roberta")
    ids = auto(sentences["hi"][0])["input_ids"]
    assert auto.decode(ids, skip_special_tokens=True) == teacher.decode(teacher(sentences["hi"][0])["input_ids"],
                                                                        skip_special_tokens=True)


def test_student_config_sets_length_and_token_types(mbert, tmp_path):
    """An XLM-R-architecture student reads no token types and has max_length position rows."""
    build_vocab([str(mbert)], tmp_path / "vocab")
    vocab = load_vocab(tmp_path / "vocab")
    config = {"model_type": "xlm-roberta", "type_vocab_size": 1, "max_position_embeddings": 130, "pad_token_id": 0}
    info = save_student_tokenizer(vocab, tmp_path / "student", model_config=config)
    assert info["model_max_length"] == 129 and info["token_type_ids"] is False
    auto = auto_tokenizer(tmp_path / "student")
    assert auto.model_max_length == 129 and "token_type_ids" not in auto(["a b"], ["c"])
    assert "token_type_ids" not in xkd.load_student_tokenizer(tmp_path / "student")(["a b"], ["c"], language="en")


# A Unigram route --------------------------------------------------------------------------

def test_unigram_route_is_kept_as_teacher_files_and_map(mbert, sentences, tmp_path):
    from families import build_family

    xlmr = build_family("xlmr", tmp_path / "xlmr")
    build_vocab([str(mbert), str(xlmr)], tmp_path / "vocab", lang_teacher={"en": str(xlmr)})
    vocab = load_vocab(tmp_path / "vocab")
    info = save_student_tokenizer(vocab, tmp_path / "student")
    assert info["tokenizers"]["xlmr"] == {"dir": "tokenizers/xlmr", "ids": "teacher", "map": "union_ids.npy"}
    assert np.array_equal(np.load(tmp_path / "student" / "tokenizers" / "xlmr" / "union_ids.npy"), vocab.map_for("xlmr"))
    assert info["auto_tokenizer_not_exact_for"] == ["en"] and info["auto_tokenizer_exact_for_unrouted"] is True
    tok = xkd.load_student_tokenizer(tmp_path / "student")
    auto = auto_tokenizer(tmp_path / "student")
    for lang in LANGS:  # hi is not routed: the default teacher, mBERT, whose remapped tokenizer AutoTokenizer is
        texts = sentences[lang]
        want = training_ids(vocab, texts, lang)
        assert agreement(tok(texts, language=lang)["input_ids"], want) == N, lang
        assert agreement(auto(texts)["input_ids"], want) == (N if lang == "hi" else 0), lang
    ids = tok.encode(sentences["en"][0], language="en")
    assert tok.decode(ids, language="en", skip_special_tokens=True) == sentences["en"][0]

    # A Unigram default route: AutoTokenizer stays the plain union WordPiece, claimed exact for nothing.
    build_vocab([str(xlmr), str(mbert)], tmp_path / "vocab2", lang_teacher={"hi": str(mbert)})
    vocab = load_vocab(tmp_path / "vocab2")
    info = save_student_tokenizer(vocab, tmp_path / "student2")
    assert info["default"] == "xlmr" and info["tokenizers"]["xlmr"]["ids"] == "teacher"
    assert info["auto_tokenizer_exact_for"] == [] and info["auto_tokenizer_exact_for_unrouted"] is False
    assert info["auto_tokenizer_not_exact_for"] == ["hi"] and info["tokenizers"]["tiny-mbert"]["ids"] == "union"
    assert len(auto_tokenizer(tmp_path / "student2")) == vocab.size
    tok = xkd.load_student_tokenizer(tmp_path / "student2")
    for lang in LANGS:
        texts = sentences[lang]
        assert agreement(tok(texts, language=lang)["input_ids"], training_ids(vocab, texts, lang)) == N, lang


def test_missing_tokenizer_is_a_clear_error(two_routes, tmp_path):
    with pytest.raises(BadInput, match="holds no xkd student tokenizer"):
        xkd.load_student_tokenizer(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(two_routes["dir"], broken)
    shutil.rmtree(broken / "tokenizers")
    with pytest.raises(BadInput, match="tokenizers/ included"):
        xkd.load_student_tokenizer(broken)


# train-student writes it ------------------------------------------------------------------

def test_train_student_saves_the_routed_tokenizer(two_routes, mbert, sentences, thread_client, tmp_path):
    from transformers import AutoModelForMaskedLM

    from xkd.cli import app

    vocab = two_routes["vocab"]
    text = tmp_path / "hi.txt"
    text.write_text("\n".join(sentences["hi"][:8]) + "\n", encoding="utf-8")
    cache = cache_teacher(thread_client, tmp_path / "caches", mbert, f"text:{text}@hi", topk=4, max_length=32)
    out = tmp_path / "student"

    def train(*extra):
        result = CliRunner().invoke(app, [
            "train-student", "--method", "mlm", "--caches", cache, "--vocab", str(vocab.path), "--hidden", "32",
            "--layers", "2", "--heads", "2", "--steps", "2", "--batch-size", "4", "--lr", "1e-3",
            "--out", str(out), "--json", *extra])
        assert result.exit_code == 0, result.output

    train()
    info = json.loads((out / "xkd_tokenizer.json").read_text(encoding="utf-8"))
    assert info["routes"] == two_routes["info"]["routes"] and info["auto_tokenizer_exact_for"] == ["hi"]
    assert info["model_max_length"] == 512 and info["token_type_ids"] is True  # a BERT student of 512 positions
    assert (out / "tokenizers" / two_routes["minilm"] / "tokenizer.json").is_file()
    assert AutoModelForMaskedLM.from_pretrained(out).config.vocab_size == len(auto_tokenizer(out)) == vocab.size
    tok = xkd.load_student_tokenizer(out)
    for lang in LANGS:
        texts = sentences[lang][:20]
        assert agreement(tok(texts, language=lang)["input_ids"], training_ids(vocab, texts, lang)) == 20, lang

    # A student saved before xkd_tokenizer.json existed: routed through the vocab its summary names.
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy, ignore=shutil.ignore_patterns("xkd_tokenizer.json", "tokenizers", "checkpoints"))
    assert xkd.load_student_tokenizer(legacy).encode(sentences["en"][0], language="en") == \
        training_ids(vocab, sentences["en"][:1], "en")[0]

    train("--overwrite")  # the tokenizers/ folder is swapped whole, nothing left over
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert (out / "tokenizers" / two_routes["minilm"] / "tokenizer.json").is_file()
    assert xkd.load_student_tokenizer(out).encode(sentences["en"][0], language="en") == \
        training_ids(vocab, sentences["en"][:1], "en")[0]
