"""Teachers of every encoder family cached exactly (issue 13): BERT and DistilBERT
(WordPiece), RoBERTa (byte-level BPE), XLM-R and mDeBERTa (SentencePiece Unigram with byte
fallback; mDeBERTa with relative positions and no token types). For each, what the cache
holds equals the teacher's own forward: the unmasked ids are the tokenizer's, top-k and the
log-normaliser are the model's MLM logits at the masked positions, hidden states and
sentence vectors are its encoder's, and a pair classifier's logits are its own on
tokenizer(a, b). Words follow the family's convention: `##` continuations for WordPiece,
`▁`/`Ġ` word starts for the others, on text with punctuation, digits, CJK and three scripts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xkd.storage import open_cache

from conftest import cache_teacher
from families import FAMILIES, MIXED_TEXT, build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_LENGTH = 40
TOPK = 5
PAIRS = [("The team won the match, 3-1.", "Los jugadores celebraron."), ("टीम ने मैच जीता।", "東京は日本の首都です。"),
         ("Prices rose 3.5% to $1,200.", "It rained all day in the city, and the final was put off until Monday.")]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: {"mlm": build_family(family, root / f"{family}-mlm", "mlm", seed=1),
                     "classifier": build_family(family, root / f"{family}-cls", "classifier", seed=2)}
            for family in FAMILIES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "mixed.txt"
    path.write_text("\n".join(MIXED_TEXT) + "\n", encoding="utf-8")
    return f"text:{path}@en"


def rows_of(cache, columns):
    out = []
    for block in cache.iter_blocks(columns=columns):
        for r in range(block.num_rows):
            out.append({c: block.columns[c].row(r) if hasattr(block.columns[c], "row") else block.columns[c][r]
                        for c in columns} | {name: block.dense_rows(name, r) for name in block.dense})
    return out


# What marks a word start in each family's pieces (None: WordPiece, where "##" marks the rest).
WORD_MARKER = {"bert": None, "distilbert": None, "roberta": "\u0120", "xlmr": "\u2581", "mdeberta": "\u2581"}


def convention_word_starts(family, tokenizer, ids: list[int]) -> list[bool]:
    """Word starts by the family's own spelling of its pieces: a WordPiece piece without
    "##"; a SentencePiece or byte-level piece with its marker, or the first piece after a
    special token; never a special token."""
    marker, specials = WORD_MARKER[family], set(tokenizer.all_special_ids)
    starts, after_special = [], True
    for token, i in zip(tokenizer.convert_ids_to_tokens(ids), ids):
        special = i in specials
        if special:
            starts.append(False)
        elif marker is None:
            starts.append(not token.startswith("##"))
        else:
            starts.append(token.startswith(marker) or after_special)
        after_special = special
    return starts


@pytest.mark.parametrize("family", FAMILIES)
def test_a_masked_lm_teacher_of_every_family_is_cached_as_it_computes(thread_client, teachers, corpus, tmp_path,
                                                                      family):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    teacher = teachers[family]["mlm"]
    cache = open_cache(cache_teacher(thread_client, tmp_path, teacher, corpus, max_length=MAX_LENGTH, topk=TOPK,
                                     mask_prob=0.25, whole_word=True, hidden_layers=[0, 2], hidden_positions="all",
                                     sentence=["cls", "pooled"]))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForMaskedLM.from_pretrained(str(teacher)).eval()
    columns = ("input_ids", "word_start", "masked_positions", "labels", "topk_ids", "topk_logits", "lognorm")
    rows = rows_of(cache, columns)
    assert len(rows) == len(MIXED_TEXT)
    masked_somewhere = 0
    for text, row in zip(MIXED_TEXT, rows):
        ids = row["input_ids"].astype(np.int64)
        positions = row["masked_positions"].astype(np.int64)
        unmasked = ids.copy()
        unmasked[positions] = row["labels"]
        assert unmasked.tolist() == tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        starts = convention_word_starts(family, tokenizer, unmasked.tolist())
        assert row["word_start"].tolist() == starts, (family, tokenizer.convert_ids_to_tokens(unmasked.tolist()))
        # Whole-word masking: a masked word is masked in all its pieces.
        word = np.cumsum(starts) - 1
        masked_words = set(word[positions].tolist())
        real = np.array([i not in tokenizer.all_special_ids for i in unmasked.tolist()])
        assert set(np.flatnonzero(np.isin(word, list(masked_words)) & real).tolist()) == set(positions.tolist())
        masked_somewhere += len(positions)
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True)
        logits = out.logits[0, positions].double()
        lognorm = torch.logsumexp(logits, -1).numpy()
        np.testing.assert_allclose(row["lognorm"], lognorm, rtol=1e-5, atol=1e-5)
        top = row["topk_ids"].reshape(len(positions), TOPK).astype(np.int64)
        assert (top[:, 0] == logits.argmax(-1).numpy()).all()
        gathered = np.take_along_axis(logits.numpy(), top, 1)
        np.testing.assert_allclose(row["topk_logits"].reshape(len(positions), TOPK), gathered,
                                   rtol=2.0**-10, atol=1e-4)  # fp16: 11 significant bits
        for layer in (0, 2):
            np.testing.assert_allclose(row[f"hidden.{layer}"], out.hidden_states[layer][0].numpy(), rtol=2.0**-10,
                                       atol=2e-3)
        np.testing.assert_allclose(row["cls"][0], out.hidden_states[-1][0, 0].numpy(), rtol=2.0**-10, atol=2e-3)
        mean = out.hidden_states[-1][0].mean(0).numpy()  # one unpadded row: the mean over its tokens
        np.testing.assert_allclose(row["pooled"][0], mean, rtol=2.0**-10, atol=2e-3)
    assert masked_somewhere > 5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_classifier_of_every_family_is_cached_as_it_computes(thread_client, teachers, tmp_path, family):
    """Class logits on sentence pairs and on single texts, each in the family's own template
    and calling convention: token types for BERT only, RoBERTa/XLM-R's doubled separator,
    DistilBERT and mDeBERTa without token types."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = teachers[family]["classifier"]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{a}\t{b}\n" for a, b in PAIRS), encoding="utf-8")
    cache = open_cache(cache_teacher(thread_client, tmp_path / "c", teacher, f"pairs:{path}@en", max_length=24,
                                     text=True))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher)).eval()
    rows = rows_of(cache, ("input_ids", "segment_b"))
    for (a, b), row in zip(PAIRS, rows):
        enc = tokenizer(a, b, truncation=True, max_length=24, return_tensors="pt")
        assert row["input_ids"].tolist() == enc["input_ids"][0].tolist()
        sequence = enc.encodings[0].sequence_ids
        assert sequence[row["segment_b"]] == 1 and 1 not in sequence[: row["segment_b"]]
        with torch.no_grad():
            expected = model(**enc).logits[0].numpy()
        np.testing.assert_allclose(row["class_logits"][0], expected, rtol=2.0**-10, atol=1e-3)
    # Single texts: the same teacher, its own template for one segment.
    single = tmp_path / "single.txt"
    single.write_text("\n".join(MIXED_TEXT) + "\n", encoding="utf-8")
    cache = open_cache(cache_teacher(thread_client, tmp_path / "s", teacher, f"text:{single}@en", max_length=24))
    for text, row in zip(MIXED_TEXT, rows_of(cache, ("input_ids",))):
        enc = tokenizer(text, truncation=True, max_length=24, return_tensors="pt")
        assert row["input_ids"].tolist() == enc["input_ids"][0].tolist()
        with torch.no_grad():
            expected = model(**enc).logits[0].numpy()
        np.testing.assert_allclose(row["class_logits"][0], expected, rtol=2.0**-10, atol=1e-3)


# Students whose vocabulary is their own (as in Yang et al., 2022, Cross-Lingual Text Classification
# with Multilingual Distillation and Zero-Shot-Aware Training: RoBERTa-family teachers, an mBERT
# student). xd and multikd read text and teacher outputs only, so the vocab needs no teacher.

EN = ["The team won the match yesterday.", "It rained all day in the city.", "She cooked rice with vegetables.",
      "The orchestra played a quiet song.", "Prices rose again this week."]
ES = ["El equipo ganó el partido ayer.", "Llovió todo el día en la ciudad.", "Ella cocinó arroz con verduras.",
      "La orquesta tocó una canción tranquila.", "Los precios subieron otra vez esta semana."]


@pytest.fixture(scope="module")
def own_vocab_setup(thread_client, teachers, tmp_path_factory):
    from xkd.student.models import StudentConfig
    from xkd.vocab import build_vocab

    from conftest import VOCABS

    root = tmp_path_factory.mktemp("own-vocab")
    en, es = root / "en.txt", root / "es.txt"
    en.write_text("\n".join(EN) + "\n", encoding="utf-8")
    es.write_text("\n".join(ES) + "\n", encoding="utf-8")
    mbert = str(VOCABS / "bert-base-multilingual-cased.vocab.txt")
    build_vocab([mbert], root / "vocab")  # the student's own vocabulary: no teacher of these caches in it
    caches = root / "caches"
    return {
        "root": root, "vocab": str(root / "vocab"), "student": StudentConfig(hidden=32, layers=2, heads=2, dropout=0.0),
        "roberta": teachers["roberta"]["classifier"], "xlmr": teachers["xlmr"]["classifier"],
        "en": cache_teacher(thread_client, caches, teachers["roberta"]["classifier"], f"text:{en}@en", text=True),
        "es": cache_teacher(thread_client, caches, teachers["xlmr"]["classifier"], f"text:{es}@es", text=True),
        "parallel": cache_teacher(thread_client, caches, teachers["roberta"]["classifier"],
                                  f"parallel:{en}@en,{es}@es", sides="src", text=True),
    }


def own_vocab_batch(method, setup, names, batch_size=5):
    from xkd import load_vocab
    from xkd.student.data import StreamConfig, StreamingDataset
    from xkd.student.methods import prepare
    from xkd.student.models import Student
    from xkd.student.run import remap_tables

    vocab = load_vocab(setup["vocab"])
    caches = [open_cache(setup[n]) for n in names]
    torch.manual_seed(0)
    prepared = prepare(method, {}, caches, vocab, student=setup["student"])
    plan = prepared.plan
    tables = remap_tables(caches, vocab, plan.columns)
    assert tables == [None] * len(caches)  # no teacher ids are read, so none is remapped
    ds = StreamingDataset(caches, StreamConfig(batch_size=batch_size, columns=plan.columns, dense=plan.dense,
                                               mix=plan.mix), remap_tables=tables, collate=prepared.method.collate)
    batch = next(iter(ds))
    batch.pop("loader_state")
    return prepared.method, prepared.model.eval(), Student(prepared.model.eval()), batch, vocab


def teacher_logits(teacher_dir, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir)).eval()
    with torch.no_grad():
        return torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0] for t in texts]).half().float()


def student_logits(model, vocab, texts, lang):
    with torch.no_grad():
        return torch.stack([model(**{k: torch.from_numpy(v) for k, v in vocab.encode([t], lang).items()}).logits[0]
                            for t in texts]).float()


def test_multikd_trains_an_mbert_student_from_roberta_and_xlmr_teachers(own_vocab_setup):
    m, model, student, batch, vocab = own_vocab_batch("multikd", own_vocab_setup, ["en", "es"], batch_size=4)
    lang = batch["lang"][0]
    texts = [(EN if lang == "en" else ES)[int(i)] for i in batch["example_id"]]
    with torch.no_grad():
        offline = float(m.losses(batch, student, 0)["kd"])
    teacher = teacher_logits(own_vocab_setup["roberta" if lang == "en" else "xlmr"], texts)
    tau = 8.0
    on_student = student_logits(model, vocab, texts, lang)
    expected = -(torch.softmax(teacher / tau, -1) * torch.log_softmax(on_student / tau, -1)).sum(-1).mean()
    assert offline == pytest.approx(float(expected), rel=1e-4)


def test_xd_trains_an_mbert_student_from_a_roberta_teacher(own_vocab_setup):
    m, model, student, batch, vocab = own_vocab_batch("xd", own_vocab_setup, ["parallel"])
    ids = [int(i) for i in batch["example_id"]]
    with torch.no_grad():
        offline = m.losses(batch, student, 0)
    target = teacher_logits(own_vocab_setup["roberta"], [EN[i] for i in ids])
    on_es = student_logits(model, vocab, [ES[i] for i in ids], "es")
    assert float(offline["xd"]) == pytest.approx(float((on_es - target).pow(2).sum(-1).mean()), rel=1e-4)


def test_train_student_multikd_with_its_own_vocab_through_the_cli(own_vocab_setup, tmp_path):
    import json

    from typer.testing import CliRunner

    from xkd.cli import app

    setup = own_vocab_setup
    r = CliRunner().invoke(app, ["train-student", "--method", "multikd", "--caches", setup["en"], "--caches", setup["es"],
                                 "--vocab", setup["vocab"], "--hidden", "32", "--layers", "2", "--heads", "2",
                                 "--steps", "3", "--batch-size", "4", "--out", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 3


@pytest.mark.parametrize("alias, model_id", [("xlmr", "FacebookAI/xlm-roberta-base"),
                                             ("mdeberta", "microsoft/mdeberta-v3-base"),
                                             ("distilmbert", "distilbert/distilbert-base-multilingual-cased"),
                                             ("roberta-base", "FacebookAI/roberta-base")])
def test_family_aliases_name_their_hub_ids_and_fail_clearly_offline(alias, model_id, monkeypatch, tmp_path):
    from xkd.errors import BadInput
    from xkd.names import resolve_teacher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # nothing downloaded
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput) as e:
        resolve_teacher(alias)
    said = str(e.value)
    assert f"alias {alias!r} means {model_id}" in said and "HF_HUB_OFFLINE=1" in said


def test_mergedistill_trains_one_student_from_teachers_of_all_five_families(thread_client, teachers, tmp_path):
    """Caches of a WordPiece, a DistilBERT, a byte-level BPE and two SentencePiece teachers,
    one union over their tokenizers (DistilBERT's is mBERT's, so it shares BERT's entry), and
    one mergedistill student trained on all five: every cache's top-k is remapped into the
    union and the run ends with a loadable student."""
    import json

    from typer.testing import CliRunner

    from xkd.cli import app
    from xkd.vocab import build_vocab

    text = tmp_path / "mixed.txt"
    text.write_text("\n".join(MIXED_TEXT) + "\n", encoding="utf-8")
    routes = {"en": "bert", "de": "distilbert", "fr": "roberta", "es": "xlmr", "hi": "mdeberta"}
    caches = [cache_teacher(thread_client, tmp_path / "caches", teachers[family]["mlm"], f"text:{text}@{lang}",
                            max_length=MAX_LENGTH, topk=TOPK) for lang, family in routes.items()]
    distinct = [f for f in routes.values() if f != "distilbert"]
    build_vocab([str(teachers[f]["mlm"]) for f in distinct], tmp_path / "vocab",
                {lang: str(teachers[f]["mlm"]) for lang, f in routes.items() if f != "distilbert"})
    args = ["train-student", "--method", "mergedistill", "--vocab", str(tmp_path / "vocab"), "--hidden", "32",
            "--layers", "2", "--heads", "2", "--steps", "4", "--batch-size", "10", "--out", str(tmp_path / "s"), "--json"]
    for cache in caches:
        args += ["--caches", cache]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary["languages"]) == set(routes) and np.isfinite(summary["final"]["loss"])
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model, tokenizer = AutoModelForMaskedLM.from_pretrained(tmp_path / "s"), AutoTokenizer.from_pretrained(tmp_path / "s")
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_student_numbers_words_as_the_teacher_pipeline_does(teachers, tmp_path, family):
    """mmkd aligns the student's word i with the cache's word i: the student's word numbers
    (routed through the union vocab) must be the pipeline's, word for word, in every family."""
    from transformers import AutoTokenizer

    from xkd import load_vocab
    from xkd.pipeline.tokenize import tokenize_seen
    from xkd.student.text import tokenize_words
    from xkd.vocab import build_vocab

    teacher = teachers[family]["mlm"]
    build_vocab([str(teacher)], tmp_path / "vocab", {"en": str(teacher)})
    student = tokenize_words(load_vocab(tmp_path / "vocab"), MIXED_TEXT, "en", MAX_LENGTH)
    pipeline = tokenize_seen(AutoTokenizer.from_pretrained(str(teacher)), MIXED_TEXT, MAX_LENGTH)
    for text, s, t in zip(MIXED_TEXT, student, pipeline):
        assert s.word.tolist() == t.word_index.tolist(), text
