"""xd (XD: Cross-lingual Knowledge Distillation for Polyglot Sentence Embeddings, anonymous ICLR
2020 submission) with both targets: the loss from a cached batch equals the squared L2
distance to the teacher's outputs on the English sources run now (offline == online), a
student initialised from the teacher reproduces it on English (the source term starts at
zero), keep_source, training through the CLI, and clear errors.

Teachers: for class logits, a tiny real BERT (bert-base-uncased WordPiece) fine-tuned on the
bundled toy task with finetune-teacher; for sentence vectors, the real pretrained MiniLM
(mean pooling, normalised). The student vocab is MiniLM's (the same WordPiece as the tiny
teacher) united with mBERT's, Hindi routed to mBERT. Caches are made by the real pipeline
with the documented invocations (docs/methods.md, "xd")."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xkd import load_vocab, open_cache
from xkd.cli import app
from xkd.evaluation.finetune import FinetuneOptions, finetune_teacher
from xkd.student.data import StreamConfig, StreamingDataset
from xkd.student.methods import prepare
from xkd.student.models import Student, StudentConfig
from xkd.vocab import build_vocab

from conftest import ROOT, VOCABS, build_tiny_bert

TOY = ROOT / "xkd" / "data"
TOY_PAIRS = f"tsv:{TOY}/toy-en-hi.tsv@en,hi"
MBERT_VOCAB = str(VOCABS / "bert-base-multilingual-cased.vocab.txt")
TINY = StudentConfig(hidden=48, layers=2, heads=2, dropout=0.0)
# The documented cache-teachers invocations (docs/methods.md, "xd"), run in `setup` with
# --scheduler (the test's cluster) and --json added:
#   xkd cache-teachers --teacher CLASSIFIER --corpus tsv:xkd/data/toy-en-hi.tsv@en,hi --sides src --class-logits
#   xkd cache-teachers --teacher minilm --corpus tsv:xkd/data/toy-en-hi.tsv@en,hi --sides src --sentence pooled


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cache_cli(thread_client, out, *args) -> str:
    """A documented cache-teachers invocation, run through the CLI on the test's cluster."""
    r = CliRunner().invoke(app, ["cache-teachers", *map(str, args), "--out", str(out),
                                 "--scheduler", thread_client.scheduler.address, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])["caches"][0]["path"]


@pytest.fixture(scope="module")
def setup(thread_client, minilm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("xd")
    base = build_tiny_bert(root / "base", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=5, hidden=64)
    classifier = root / "teacher-en"
    finetune_teacher(FinetuneOptions(base=str(base), data=[f"{TOY}/toy-en.tsv@en"], out=str(classifier), epochs=6,
                                     lr=5e-3, batch_size=16), progress=lambda msg: None)
    build_vocab([str(minilm_dir), MBERT_VOCAB], root / "vocab", {"en": str(minilm_dir), "hi": MBERT_VOCAB})
    return {
        "root": root, "classifier": classifier, "minilm": minilm_dir, "vocab": str(root / "vocab"),
        "class_cache": cache_cli(thread_client, root / "caches", "--teacher", classifier, "--corpus", TOY_PAIRS,
                                 "--sides", "src", "--class-logits"),
        "pooled_cache": cache_cli(thread_client, root / "caches", "--teacher", "minilm", "--corpus", TOY_PAIRS,
                                  "--sides", "src", "--sentence", "pooled"),
        "labeled_cache": cache_cli(thread_client, root / "caches", "--teacher", classifier, "--corpus",
                                   f"labeled:{TOY}/toy-en.tsv@en"),
    }


@functools.lru_cache(maxsize=None)
def vocab_at(path):
    return load_vocab(path)


@functools.lru_cache(maxsize=None)
def built_student(vocab_path, cache_path, init_from, target):
    """The student build_student makes (one per setting: initialising through the union vocab
    takes seconds); tests only run it."""
    torch.manual_seed(0)
    options = {"target": target} if target else {}
    return prepare("xd", options, [open_cache(cache_path)], vocab_at(vocab_path), student=TINY,
                   init_from=init_from).model.eval()


def prepared(setup, cache_key, init_from=None, batch_size=8, **options):
    """(method, model, student wrapper, first batch) as train-student builds them."""
    vocab = vocab_at(setup["vocab"])
    options = {k: str(v) for k, v in options.items()}
    caches = [open_cache(setup[cache_key])]
    model = built_student(setup["vocab"], setup[cache_key], init_from and str(init_from), options.get("target"))
    m = prepare("xd", options, caches, vocab, student=TINY, init_from=init_from and str(init_from), model=model).method
    ds = StreamingDataset(caches, StreamConfig(batch_size=batch_size, columns=m.plan.columns, dense=m.plan.dense),
                          remap_tables=[vocab.map_for(caches[0].manifest)], collate=m.collate)
    batch = next(iter(ds))
    batch.pop("loader_state")
    return m, model, Student(model), batch


def pairs_of(setup, cache_key, batch):
    c = open_cache(setup[cache_key])
    rows = [c.examples_by_id(int(e))[0] for e in batch["example_id"]]
    return [r["text"] for r in rows], [r["pair_text"] for r in rows]


def student_each(vocab, student, texts, lang, target, pooling=None):
    """The student run on one sentence at a time (no padding), tokenized as its vocab routes `lang`."""
    out = []
    with torch.no_grad():
        for text in texts:
            enc = {k: torch.from_numpy(v) for k, v in vocab.encode([text], lang, max_length=128).items()}
            if target == "class_logits":
                out.append(student(**enc).logits[0].float())
            else:
                hidden = student(**enc, masked_flat=torch.zeros(0, dtype=torch.long)).last_hidden_state[0].float()
                out.append(pooling(hidden.mean(0)))
    return torch.stack(out)


def squared(a, b):
    return float((a - b).pow(2).sum(-1).mean())


def test_the_documented_caches_hold_what_xd_reads(setup):
    c = open_cache(setup["class_cache"])
    assert c.manifest["view"]["sides"] == ["src"] and c.manifest["corpus"]["langs"] == ["en", "hi"]
    assert {n: (s.align, s.dim) for n, s in c.dense_specs.items()} == {"class_logits": ("row", 3)}
    row = next(c.iter_examples())
    assert row["lang"] == "en" and row["side"] == "src" and row["pair_text"]
    p = open_cache(setup["pooled_cache"])
    assert {n: (s.align, s.dim) for n, s in p.dense_specs.items()} == {"pooled": ("row", 384)}
    assert p.manifest["teacher"]["pooling"]["mode"] == "mean" and p.manifest["teacher"]["pooling"]["normalize"]


def test_class_logits_offline_equal_the_teacher_run_online(setup):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m, model, student, batch = prepared(setup, "class_cache", init_from=setup["classifier"])
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    assert model.config.id2label == {0: "food", 1: "sports", 2: "weather"}
    with torch.no_grad():
        offline = {k: float(v) for k, v in m.losses(batch, student, 0).items()}
    english, hindi = pairs_of(setup, "class_cache", batch)
    n = len(english)
    assert batch["input_ids"].shape[0] == 2 * n and batch["pair_lang"] == ["hi"] * n and batch["lang"] == ["en"] * n
    teacher = AutoModelForSequenceClassification.from_pretrained(setup["classifier"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup["classifier"])
    with torch.no_grad():
        online = teacher(**tokenizer(english, padding=True, return_tensors="pt")).logits.float()
    vocab = vocab_at(setup["vocab"])
    on_hindi = student_each(vocab, student, hindi, "hi", "class_logits")
    on_english = student_each(vocab, student, english, "en", "class_logits")
    rounded = online.half().float()  # the cache stores fp16
    assert offline["xd"] == pytest.approx(squared(on_hindi, rounded), rel=1e-4)
    assert offline["xd"] == pytest.approx(squared(on_hindi, online), rel=1e-2)
    assert offline["source"] == pytest.approx(squared(on_english, rounded), rel=1e-3, abs=1e-8)
    assert offline["loss"] == pytest.approx((offline["xd"] + offline["source"]) / 2, rel=1e-6)
    # The student starts as the teacher (its encoder through the union-vocab initialisation,
    # its pooler and classifier copied): on English it reproduces the teacher's logits.
    assert torch.allclose(on_english, online, atol=1e-4)
    assert offline["source"] < 1e-6 and offline["source"] < 1e-3 * offline["xd"]


def test_sentence_vectors_offline_equal_minilm_run_online_through_a_projection(setup):
    from transformers import AutoModel, AutoTokenizer

    m, model, student, batch = prepared(setup, "pooled_cache")
    assert type(model).__name__ == "BertForMaskedLM"
    assert m.plan.pooling == "mean" and m.plan.normalize and m.modules["projection"].weight.shape == (384, 48)
    with torch.no_grad():
        offline = {k: float(v) for k, v in m.losses(batch, student, 0).items()}
    english, hindi = pairs_of(setup, "pooled_cache", batch)
    teacher = AutoModel.from_pretrained(setup["minilm"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup["minilm"])
    with torch.no_grad():
        enc = tokenizer(english, padding=True, return_tensors="pt")
        hidden = teacher(**enc).last_hidden_state
        mask = enc["attention_mask"][:, :, None].float()
        online = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def head(vector):
        return torch.nn.functional.normalize(m.modules["projection"](vector), dim=-1)

    vocab = vocab_at(setup["vocab"])
    on_hindi = student_each(vocab, student, hindi, "hi", "pooled", head)
    on_english = student_each(vocab, student, english, "en", "pooled", head)
    assert offline["xd"] == pytest.approx(squared(on_hindi, online.half().float()), rel=1e-4)
    assert offline["xd"] == pytest.approx(squared(on_hindi, online), rel=1e-2)
    assert offline["source"] == pytest.approx(squared(on_english, online.half().float()), rel=1e-4)
    assert 0.1 < offline["xd"] < 4  # unit vectors: squared distances lie in [0, 4]


def test_a_student_initialised_from_minilm_matches_it_on_english_and_not_yet_on_hindi(setup):
    m, model, student, batch = prepared(setup, "pooled_cache", init_from="minilm")
    assert "projection" not in m.modules  # equal widths need no map
    with torch.no_grad():
        parts = {k: float(v) for k, v in m.losses(batch, student, 0).items()}
    assert parts["source"] < 1e-5  # fp16 storage of unit vectors
    assert parts["xd"] > 0.05


def test_keep_source_false_trains_on_translations_only(setup):
    full_m, _, student, full = prepared(setup, "class_cache", init_from=setup["classifier"])
    m, _, student, batch = prepared(setup, "class_cache", init_from=setup["classifier"], keep_source="false")
    n = len(batch["example_id"])
    assert batch["input_ids"].shape[0] == n
    with torch.no_grad():
        parts = {k: float(v) for k, v in m.losses(batch, student, 0).items()}
        both = {k: float(v) for k, v in full_m.losses(full, student, 0).items()}
    assert set(parts) == {"loss", "xd"} and parts["loss"] == parts["xd"]
    assert parts["xd"] == pytest.approx(both["xd"], rel=1e-5)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_student_xd_on_class_logits_from_the_teacher_itself(setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "xd-class"
    r = invoke("train-student", "--method", "xd", "--caches", setup["class_cache"], "--vocab", setup["vocab"],
               "--out", out, "--steps", 10, "--batch-size", 12, "--init-from", setup["classifier"],
               "--option", "target=class_logits", "--lr", 2e-3, "--log-every", 2, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 10 and set(summary["final"]) >= {"loss", "xd", "source"}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([x["xd"] for x in logged[-2:]]) < logged[0]["xd"], logged
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "food", 1: "sports", 2: "weather"}
    assert model.config.vocab_size == vocab_at(setup["vocab"]).size


def test_train_student_xd_on_sentence_vectors_with_a_small_random_student(setup, tmp_path):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "xd-pooled"
    r = invoke("train-student", "--method", "xd", "--caches", setup["pooled_cache"], "--vocab", setup["vocab"],
               "--out", out, "--steps", 6, "--batch-size", 8, "--hidden", 32, "--layers", 1, "--heads", 2,
               "--lr", 3e-3, "--log-every", 2, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary["final"]) >= {"loss", "xd", "source"}
    assert AutoModelForMaskedLM.from_pretrained(out).config.hidden_size == 32
    state = torch.load(out / "checkpoints" / "step-00000006" / "state.pt", weights_only=False)["method"]
    assert state["projection.weight"].shape == (384, 32)


def test_caches_xd_cannot_use_and_bad_options_are_clear_errors(setup, tmp_path):
    args = ("--vocab", setup["vocab"], "--out", tmp_path / "o", "--steps", 1, "--hidden", 32, "--layers", 1, "--heads", 2)
    r = invoke("train-student", "--method", "xd", "--caches", setup["class_cache"], "--option", "target=pooled", *args)
    assert r.exit_code == 2 and "needs the cached output 'pooled'" in r.output and "--sentence pooled" in r.output
    r = invoke("train-student", "--method", "xd", "--caches", setup["class_cache"], "--option", "keep_sauce=no", *args)
    assert r.exit_code == 2 and "keep_sauce" in r.output and "keep_source" in r.output
    r = invoke("train-student", "--method", "xd", "--caches", setup["class_cache"], "--option", "target=cls", *args)
    assert r.exit_code == 2 and "choose class_logits or pooled" in r.output
    r = invoke("train-student", "--method", "xd", "--caches", setup["labeled_cache"], *args)
    assert r.exit_code == 2 and "--sides src" in r.output and "monolingual" in r.output
    assert "Traceback" not in r.output
