"""multikd (Cross-Lingual Text Classification with Multilingual Distillation and Zero-Shot-Aware
Training, Yang et al., 2022): one fine-tuned teacher per language, one language per batch, KD at
tau = 8 equal to a direct computation from that language's teacher run now (offline ==
online), the gold-label term only where labels exist, the MBLM student getting the batch's
language, training end to end through the CLI, and clear errors.

Teachers are tiny real BERTs fine-tuned on the bundled toy task with finetune-teacher: an
English one (bert-base-uncased WordPiece) on toy-en, a Hindi one (mBERT WordPiece) on toy-hi.
Caches are made by the real pipeline with the documented invocation (docs/methods.md,
"multikd"): `labeled:` corpora, so rows carry their gold class."""

from __future__ import annotations

import functools
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from xkd import load_vocab, open_cache
from xkd.cli import app
from xkd.errors import BadInput
from xkd.evaluation.finetune import FinetuneOptions, finetune_teacher
from xkd.pipeline import CacheTeachersOptions, cache_teachers
from xkd.student.data import StreamConfig, StreamingDataset
from xkd.student.methods import prepare
from xkd.student.models import Student, StudentConfig

from conftest import ROOT, VOCABS, build_tiny_bert

TOY = ROOT / "xkd" / "data"
TINY = StudentConfig(hidden=32, layers=2, heads=2, dropout=0.0)
LABELS = {0: "food", 1: "sports", 2: "weather"}
# The documented cache-teachers invocation (docs/methods.md, "multikd"), once per language;
# `cache` runs it with --scheduler (the test's cluster) and --json added:
#   xkd cache-teachers --teacher TEACHER_L --corpus labeled:xkd/data/toy-L.tsv@L --class-logits


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cache(thread_client, out, teacher, corpus) -> str:
    """The documented cache-teachers invocation, run through the CLI on the test's cluster."""
    r = CliRunner().invoke(app, ["cache-teachers", "--teacher", str(teacher), "--corpus", corpus, "--class-logits",
                                 "--out", str(out), "--scheduler", thread_client.scheduler.address, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])["caches"][0]["path"]


def teacher_for(root, lang, vocab_file, lowercase, seed):
    base = build_tiny_bert(root / f"base-{lang}", vocab_file, lowercase=lowercase, seed=seed, hidden=64)
    out = root / f"teacher-{lang}"
    finetune_teacher(FinetuneOptions(base=str(base), data=[f"{TOY}/toy-{lang}.tsv@{lang}"], out=str(out), epochs=6,
                                     lr=5e-3, batch_size=16), progress=lambda msg: None)
    return out


@pytest.fixture(scope="module")
def setup(thread_client, tmp_path_factory):
    from xkd.vocab import build_vocab

    root = tmp_path_factory.mktemp("multikd")
    en = teacher_for(root, "en", VOCABS / "bert-base-uncased.vocab.txt", True, 5)
    hi = teacher_for(root, "hi", VOCABS / "bert-base-multilingual-cased.vocab.txt", False, 6)
    build_vocab([str(en), str(hi)], root / "vocab", {"en": str(en), "hi": str(hi), "fr": str(hi)})
    unlabeled = root / "unlabeled.en"
    unlabeled.write_text("".join(line.split("\t")[0] + "\n" for line in (TOY / "toy-en.tsv").read_text().splitlines()[:24]))
    two_classes = root / "two-classes.tsv"
    two_classes.write_text("The match starts soon.\tsports\nIt will rain soon.\tweather\n")
    return {
        "root": root, "teachers": {"en": en, "hi": hi}, "vocab": str(root / "vocab"),
        "en": cache(thread_client, root / "caches", en, f"labeled:{TOY}/toy-en.tsv@en"),
        "hi": cache(thread_client, root / "caches", hi, f"labeled:{TOY}/toy-hi.tsv@hi"),
        "unlabeled": cache(thread_client, root / "caches", en, f"text:{unlabeled}@en"),
        "two_classes": cache(thread_client, root / "caches", en, f"labeled:{two_classes}@en"),
    }


@functools.lru_cache(maxsize=None)
def vocab_at(path):
    return load_vocab(path)


def batches(setup, m, cache_keys, n=1, batch_size=8, mix=None):
    caches = [open_cache(setup[k]) for k in cache_keys]
    vocab = vocab_at(setup["vocab"])
    ds = StreamingDataset(caches, StreamConfig(batch_size=batch_size, columns=m.plan.columns, dense=m.plan.dense,
                                               mix=mix or m.plan.mix),
                          remap_tables=[vocab.map_for(c.manifest) for c in caches], collate=m.collate)
    out = []
    for batch in ds:
        batch.pop("loader_state")
        out.append(batch)
        if len(out) == n:
            return out


def prepared(setup, cache_keys=("en", "hi"), **options):
    vocab = vocab_at(setup["vocab"])
    options = {k: str(v) for k, v in options.items()}
    caches = [open_cache(setup[k]) for k in cache_keys]
    torch.manual_seed(0)
    ready = prepare("multikd", options, caches, vocab, student=TINY)
    model = ready.model.eval()
    return ready.method, model, Student(model)


@functools.lru_cache(maxsize=None)
def online_teacher(path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def teacher_logits(path, texts):
    model, tokenizer = online_teacher(str(path))
    with torch.no_grad():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.float()


def texts_of(setup, key, batch):
    c = open_cache(setup[key])
    rows = [c.examples_by_id(int(e))[0] for e in batch["example_id"]]
    return [r["text"] for r in rows], [int(r["class_label"]) for r in rows]


def student_each(setup, student, texts, lang):
    vocab = vocab_at(setup["vocab"])
    out = []
    with torch.no_grad():
        for text in texts:
            enc = {k: torch.from_numpy(v) for k, v in vocab.encode([text], lang, max_length=128).items()}
            out.append(student(**enc).logits[0].float())
    return torch.stack(out)


def test_the_documented_caches_hold_gold_labels_and_each_teachers_logits(setup):
    for lang in ("en", "hi"):
        c = open_cache(setup[lang])
        assert c.manifest["corpus"]["labels"] == ["food", "sports", "weather"]
        assert {n: (s.align, s.dim) for n, s in c.dense_specs.items()} == {"class_logits": ("row", 3)}
        rows = list(c.iter_examples())
        lines = [line.split("\t") for line in (TOY / f"toy-{lang}.tsv").read_text().splitlines()]
        assert [(r["text"], LABELS[int(r["class_label"])]) for r in rows] == [tuple(x) for x in lines]
        online = teacher_logits(setup["teachers"][lang], [r["text"] for r in rows[:12]])
        cached = torch.from_numpy(np.stack([r["class_logits"].reshape(-1) for r in rows[:12]]).astype(np.float32))
        assert torch.allclose(cached, online.half().float(), atol=1e-3)
    assert (open_cache(setup["unlabeled"]).read_table(0, 0, ["class_label"])["class_label"].to_numpy() == -1).all()


def test_kd_at_temperature_8_offline_equals_the_batch_languages_teacher_online(setup):
    m, model, student = prepared(setup)
    assert m.config.temperature == 8.0 and m.plan.mix == "batch" and not m.config.t2 and m.config.label_weight == 0.0
    seen = set()
    for batch in batches(setup, m, ("en", "hi"), n=6):
        lang = batch["lang"][0]
        assert batch["lang"] == [lang] * len(batch["lang"])  # one language, so one teacher, per batch
        seen.add(lang)
        texts, gold = texts_of(setup, lang, batch)
        assert batch["class_label"].tolist() == gold
        with torch.no_grad():
            offline = {k: float(v) for k, v in m.losses(batch, student, 0).items()}
        z_t = teacher_logits(setup["teachers"][lang], texts)
        z_s = student_each(setup, student, texts, lang)
        p_t = torch.softmax(z_t.half().float() / 8, -1)
        direct = float(-(p_t * torch.log_softmax(z_s / 8, -1)).sum(-1).mean())
        assert offline["kd"] == pytest.approx(direct, rel=1e-4)
        unrounded = float(-(torch.softmax(z_t / 8, -1) * torch.log_softmax(z_s / 8, -1)).sum(-1).mean())
        assert offline["kd"] == pytest.approx(unrounded, rel=1e-3)
        assert offline["label"] == pytest.approx(float(F.cross_entropy(z_s, torch.tensor(gold))), rel=1e-4)
        assert offline["loss"] == offline["kd"]  # label_weight 0: the paper's eq. 3 alone
    assert seen == {"en", "hi"}
    # The student tokenizes each language as its teacher did (the vocab routes en and hi to them).
    vocab = vocab_at(setup["vocab"])
    c = open_cache(setup["hi"])
    row = next(c.iter_examples())
    assert np.array_equal(vocab.tokenize([row["text"]], "hi")[0], vocab.remap(row["input_ids"], c.manifest))


def test_t2_scaling_and_the_label_weight(setup):
    m, _, student = prepared(setup)
    batch = batches(setup, m, ("en", "hi"))[0]
    with torch.no_grad():
        base = {k: float(v) for k, v in m.losses(batch, student, 0).items()}
        m2, _, _ = prepared(setup, t2="true", label_weight=0.5, temperature=2)
        scaled = {k: float(v) for k, v in m2.losses(batch, student, 0).items()}
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach()
    eq3 = -(torch.softmax(batch["teacher_logits"] / 2, -1) * torch.log_softmax(logits / 2, -1)).sum(-1).mean()
    assert scaled["kd"] == pytest.approx(4 * float(eq3), rel=1e-5)  # τ² · eq. 3 at τ = 2
    assert scaled["label"] == pytest.approx(base["label"], rel=1e-6)
    assert scaled["loss"] == pytest.approx(scaled["kd"] + 0.5 * scaled["label"], rel=1e-6)


def test_the_label_term_exists_only_where_rows_have_labels(setup):
    m, _, student = prepared(setup, cache_keys=("unlabeled",), label_weight=1)
    batch = batches(setup, m, ("unlabeled",))[0]
    assert (batch["class_label"] == -1).all()
    with torch.no_grad():
        parts = {k: float(v) for k, v in m.losses(batch, student, 0).items()}
    assert set(parts) == {"loss", "kd"} and parts["loss"] == parts["kd"]
    # A batch mixing labelled and unlabelled rows scores the labelled ones only.
    m, _, student = prepared(setup, cache_keys=("en", "unlabeled"), label_weight=1)
    for batch in batches(setup, m, ("en", "unlabeled"), n=4, batch_size=16, mix="example"):
        has = batch["class_label"] >= 0
        if has.any() and not has.all():
            break
    else:
        pytest.fail("no mixed batch drawn")
    with torch.no_grad():
        parts = m.losses(batch, student, 0)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert float(parts["label"]) == pytest.approx(float(F.cross_entropy(logits[has], batch["class_label"][has])), rel=1e-5)


def test_the_mblm_student_has_a_branch_per_language_and_trains_only_the_batchs(setup):
    m, model, student = prepared(setup, student="mblm", branch_layers=1)
    assert type(model).__name__ == "MBLMForSequenceClassification"
    assert model.config.branch_languages == ["en", "hi"] and model.config.branch_layers == 1
    assert model.config.id2label == LABELS and m.pass_lang
    batch = next(b for b in batches(setup, m, ("en", "hi"), n=4) if b["lang"][0] == "en")
    model.train()
    m.losses(batch, student, 0)["loss"].backward()
    en_branch, hi_branch = model.mblm.branches
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in en_branch.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in hi_branch.parameters())
    model.zero_grad()
    model.eval()
    with pytest.raises(BadInput, match="branch_layers=4: the student has 2 layers"):
        prepared(setup, student="mblm")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_train_student_multikd_with_mblm_end_to_end_and_zero_shot_french(setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    import xkd.student.mblm  # noqa: F401  (registers MBLM with the Auto classes)

    out = tmp_path / "student"
    r = invoke("train-student", "--method", "multikd", "--caches", setup["en"], "--caches", setup["hi"],
               "--vocab", setup["vocab"], "--out", out, "--steps", 12, "--batch-size", 8,
               "--init-from", setup["teachers"]["hi"], "--option", "student=mblm", "--option", "branch_layers=1",
               "--lr", 3e-3, "--log-every", 2, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12 and set(summary["final"]) >= {"loss", "kd", "label"}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([x["kd"] for x in logged[-3:]]) < np.mean([x["kd"] for x in logged[:3]]), logged
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(model).__name__ == "MBLMForSequenceClassification"
    assert model.config.branch_languages == ["en", "hi"] and model.config.id2label == LABELS
    french = [line.split("\t")[0] for line in (TOY / "toy-fr.tsv").read_text().splitlines()]
    enc = {k: torch.from_numpy(v) for k, v in vocab_at(setup["vocab"]).encode(french, "fr").items()}
    with torch.no_grad():
        logits = model(**enc, lang="fr").logits  # zero-shot: through every branch
    assert logits.shape == (30, 3) and torch.isfinite(logits).all()


def test_the_temperature_defaults_to_8_unless_given(setup):
    assert prepared(setup)[0].config.temperature == 8.0
    assert prepared(setup, temperature=2)[0].config.temperature == 2.0
    r = invoke("train-student", "--method", "multikd", "--caches", setup["en"], "--vocab", setup["vocab"],
               "--out", setup["root"] / "t", "--steps", 1, "--hidden", 32, "--layers", 1, "--heads", 2,
               "--option", "temperature=-1")
    assert r.exit_code == 2 and "temperature=-1" in r.output and "(0, inf)" in r.output and "Traceback" not in r.output


def reordered_teacher(source, out, order):
    """`source` with its classes renumbered: new class j is old class order[j] (id2label and
    the classifier's rows permuted together), so it computes the same function."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(source)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[list(order)])
        model.classifier.bias.copy_(model.classifier.bias[list(order)])
    model.config.id2label = {j: names[i] for j, i in enumerate(order)}
    model.config.label2id = {name: j for j, name in model.config.id2label.items()}
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def test_teachers_ordering_classes_differently_are_permuted_by_class_name(setup, thread_client, tmp_path):
    """A hub fine-tune may number the same classes in another order. The student's targets
    must still name the same classes: the permuted teacher's logits come back in the first
    teacher's order, equal to the original teacher's, and gold labels follow the names."""
    order = (2, 0, 1)
    hi2 = reordered_teacher(setup["teachers"]["hi"], tmp_path / "hi-reordered", order)
    permuted = cache(thread_client, tmp_path / "caches", hi2, f"labeled:{TOY}/toy-hi.tsv@hi")
    assert [open_cache(permuted).manifest["teacher"]["labels"][j] for j in range(3)] == [LABELS[i] for i in order]
    setup = {**setup, "hi_permuted": permuted}
    original = {int(r["example_id"]): np.asarray(r["class_logits"]).reshape(-1) for r in open_cache(setup["hi"]).iter_examples()}
    labels = {int(r["example_id"]): int(r["class_label"]) for r in open_cache(setup["hi"]).iter_examples()}
    m, _, _ = prepared(setup, cache_keys=("en", "hi_permuted"))
    assert m.plan.label_names == tuple(LABELS[i] for i in range(3))
    [batch] = [b for b in batches(setup, m, ("en", "hi_permuted"), n=6) if b["lang"][0] == "hi"][:1]
    for i, example in enumerate(batch["example_id"].tolist()):
        assert torch.equal(batch["teacher_logits"][i], torch.from_numpy(original[example].astype(np.float32)))
        assert int(batch["class_label"][i]) == labels[example]  # the corpus's names, in the student's order
    # The permuted teacher first: its order is the student's, English logits and labels follow it.
    m, _, _ = prepared(setup, cache_keys=("hi_permuted", "en"))
    assert m.plan.label_names == tuple(LABELS[i] for i in order)
    english = {int(r["example_id"]): r for r in open_cache(setup["en"]).iter_examples()}
    [batch] = [b for b in batches(setup, m, ("hi_permuted", "en"), n=6) if b["lang"][0] == "en"][:1]
    for i, example in enumerate(batch["example_id"].tolist()):
        want = np.asarray(english[example]["class_logits"], dtype=np.float32).reshape(-1)[list(order)]
        assert torch.equal(batch["teacher_logits"][i], torch.from_numpy(want))
        assert int(batch["class_label"][i]) == order.index(int(english[example]["class_label"]))


def test_teachers_naming_other_classes_are_refused(setup, thread_client, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(setup["teachers"]["hi"])
    model.config.id2label = {0: "food", 1: "sports", 2: "politics"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(setup["teachers"]["hi"]).save_pretrained(tmp_path / "other")
    other = cache(thread_client, tmp_path / "caches", tmp_path / "other", f"text:{TOY}/toy-fr.tsv@fr")
    r = invoke("train-student", "--method", "multikd", "--caches", setup["en"], "--caches", other, "--vocab",
               setup["vocab"], "--out", tmp_path / "o", "--steps", 1, "--hidden", 32, "--layers", 1, "--heads", 2)
    assert r.exit_code == 2 and "classes differ" in r.output and "politics" in r.output and "weather" in r.output
    assert "Traceback" not in r.output


def test_bad_students_options_and_caches_are_clear_errors(setup, thread_client, tmp_path):
    args = ("--vocab", setup["vocab"], "--out", tmp_path / "o", "--steps", 1, "--hidden", 32, "--layers", 1, "--heads", 2)
    r = invoke("train-student", "--method", "multikd", "--caches", setup["en"], "--option", "student=big", *args)
    assert r.exit_code == 2 and "student=big" in r.output and "mblm" in r.output
    r = invoke("train-student", "--method", "multikd", "--caches", setup["en"], "--option", "tau=8", *args)
    assert r.exit_code == 2 and "tau" in r.output and "temperature" in r.output
    # Classes numbered by the corpus (sorted names: sports 0, weather 1) are the teacher's
    # sports 1 and weather 2: gold labels are renumbered by name, never taken as they are.
    m, _, _ = prepared(setup, cache_keys=("two_classes",))
    batch = batches(setup, m, ("two_classes",), batch_size=2)[0]
    texts = {int(r["example_id"]): r["text"] for r in open_cache(setup["two_classes"]).iter_examples()}
    named = {texts[e]: LABELS[int(c)] for e, c in zip(batch["example_id"].tolist(), batch["class_label"].tolist())}
    assert named == {"The match starts soon.": "sports", "It will rain soon.": "weather"}
    no_logits = cache_teachers(CacheTeachersOptions(teachers=[str(setup["teachers"]["en"])], out=str(tmp_path / "c"),
                                                    corpus=f"labeled:{TOY}/toy-en.tsv@en", class_logits=False,
                                                    sentence=("cls",)), client=thread_client, log=io.StringIO())
    r = invoke("train-student", "--method", "multikd", "--caches", no_logits["caches"][0]["path"], *args)
    assert r.exit_code == 2 and "needs the cached output 'class_logits'" in r.output and "--class-logits" in r.output
