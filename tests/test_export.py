"""Trained students in the tools people already use (xkd/student/export.py, docs/students.md):
sentence-vector students load with `SentenceTransformer(DIR)` and give the vectors training
optimised (and that `xkd evaluate --mode bitext` compares), masked-LM students fill masks in
`pipeline("fill-mask")`, classifier students answer `pipeline("text-classification")` with
their teachers' class names; every student has a model card the hub reads, `xkd evaluate`
records its results in the student, and every run draws its loss curves (losses.png).

One tiny teacher (random weights, mBERT's real cased WordPiece) is a classifier with named
classes that also pools sentences the sentence-transformers way (mean, then Normalize); one
cache of it over the bundled toy English-Hindi pairs holds its sentence vectors, [CLS], class
logits, word-aligned hidden states and the text, so that every kind of student trains from
it for 3 steps. The union vocab is that teacher's alone, so the saved tokenizer splits every
language as training did (checked below on the texts used)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_chart import decode_png, plot_box

from xkd import load_vocab
from xkd.chart import LINE_COLORS
from xkd.evaluation.bitext import evaluate_bitext, sentence_vectors
from xkd.evaluation.students import load_student
from xkd.student import export
from xkd.student.options import TrainStudentOptions
from xkd.student.run import train_student

from conftest import ROOT, VOCABS, build_tiny_bert

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = ROOT / "xkd" / "data"
CLASSES = ["food", "sports", "weather"]
STEPS = 3
PAIRS = [line.rstrip("\n").split("\t") for line in (TOY / "toy-en-hi.tsv").read_text(encoding="utf-8").split("\n") if line]
TEXTS = {"en": [en for en, _ in PAIRS[:12]], "hi": [hi for _, hi in PAIRS[:12]]}
# Each student: method, options, student shape. "mean" has the teacher's width (no projection);
# "proj" is narrower, so xd trains a projection head to the teacher's 32 dimensions.
STUDENTS = {
    "mean": ("xd", {"target": "pooled"}, 32),
    "proj": ("xd", {"target": "pooled", "pooling": "cls", "normalize": "false"}, 16),
    "mmkd": ("mmkd", {"head_hidden": "16", "head_out": "8"}, 32),
    "mlm": ("mlm", {"source": "text"}, 32),
    "class": ("xd", {"target": "class_logits"}, 32),
    "tinybert2": ("tinybert", {"stage": "2", "embedding_weight": "0", "hidden_weight": "0", "attention_weight": "0"}, 32),
}


def sentence_teacher(root):
    """A tiny classifier with named classes whose directory also says, as sentence-transformers
    models do, that it pools by the mean and normalises (so the cached vectors are unit length)."""
    teacher = build_tiny_bert(root / "teacher", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False,
                              kind="classifier", seed=3, init_range=0.2)
    config = json.loads((teacher / "config.json").read_text())
    config["id2label"] = dict(enumerate(CLASSES))
    config["label2id"] = {name: i for i, name in enumerate(CLASSES)}
    (teacher / "config.json").write_text(json.dumps(config))
    (teacher / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (teacher / "1_Pooling").mkdir()
    (teacher / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                   "pooling_mode_mean_tokens": True}))
    return teacher


@pytest.fixture(scope="module")
def students(thread_client, tmp_path_factory):
    import io

    from xkd.pipeline import CacheTeachersOptions, cache_teachers
    from xkd.vocab import build_vocab

    root = tmp_path_factory.mktemp("export")
    teacher = sentence_teacher(root)
    build_vocab([str(teacher)], root / "vocab")
    cache = cache_teachers(CacheTeachersOptions(
        teachers=[str(teacher)], corpus=f"tsv:{TOY}/toy-en-hi.tsv@en,hi", out=str(root / "caches"), sides="src",
        sentence=("cls", "pooled"), class_logits=True, hidden_layers=(2,), hidden_positions="word"),
        client=thread_client, log=io.StringIO())["caches"][0]["path"]
    # Leftovers of an earlier sentence student in the directory the tinybert classifier is
    # trained into with --overwrite: they must not survive it.
    leftover = root / "tinybert2"
    leftover.mkdir()
    (leftover / "modules.json").write_text("[]")
    (leftover / "1_Pooling").mkdir()
    (leftover / "1_Pooling" / "config.json").write_text("{}")
    (leftover / "evaluation.json").write_text(json.dumps({"bitext:old": {"pairs": 1}}))
    out = {"root": root, "teacher": teacher, "vocab": str(root / "vocab"), "cache": cache}
    for name, (method, options, hidden) in STUDENTS.items():
        train_student(TrainStudentOptions(method=method, caches=[cache], vocab=out["vocab"], out=str(root / name),
                                          steps=STEPS, log_every=1, lr=1e-3, batch_size=8, hidden=hidden, layers=1,
                                          heads=2, dropout=0.0, method_options=options, overwrite=name == "tinybert2"))
        out[name] = root / name
    return out


def ids_agree(student_dir, vocab, texts, lang):
    """The saved tokenizer (what sentence-transformers and pipelines use) gives the ids training gave."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    saved = tokenizer(texts, truncation=True, max_length=128)["input_ids"]
    enc = vocab.encode(texts, lang, max_length=128)
    trained = [[int(i) for i in row[mask.astype(bool)]] for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return [list(s) for s in saved] == trained


def own_vectors(student_dir, texts, pooling):
    """The student's sentence vectors computed here: its encoder (AutoModel) on the ids the saved
    tokenizer gives, pooled by hand over the real tokens."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(student_dir))
    encoder = AutoModel.from_pretrained(str(student_dir)).eval()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    mask = enc["attention_mask"][:, :, None].float()
    return (hidden * mask).sum(1) / mask.sum(1)


def st_vectors(student_dir, texts):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(student_dir), device="cpu")
    return model.encode(texts, convert_to_tensor=True, batch_size=5).float()


def close(a, b):
    """Equal up to float32 rounding at the vectors' own scale."""
    return torch.allclose(a, b, rtol=0, atol=1e-5 * float(max(a.abs().max(), b.abs().max())))


def modules_of(student_dir):
    return [(m["path"], m["type"].rsplit(".", 1)[-1]) for m in json.loads((student_dir / "modules.json").read_text())]


def test_an_xd_sentence_student_gives_in_sentence_transformers_the_vectors_evaluate_compares(students):
    student = students["mean"]
    assert modules_of(student) == [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    pooling = json.loads((student / "1_Pooling" / "config.json").read_text())
    assert pooling == {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
                       "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}
    assert json.loads((student / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    vocab = load_vocab(students["vocab"])
    model = load_student(str(student), vocab)
    for lang, texts in TEXTS.items():
        assert ids_agree(student, vocab, texts, lang), f"the saved tokenizer splits {lang} unlike training"
        ours = torch.nn.functional.normalize(own_vectors(student, texts, "mean"), dim=-1)
        theirs = st_vectors(student, texts)
        evaluated = sentence_vectors(model, vocab, texts, lang, pooling="mean")  # what evaluate_bitext compares
        assert close(theirs, ours) and close(theirs, evaluated)
        assert not close(theirs, torch.nn.functional.normalize(own_vectors(student, texts, "cls"), dim=-1))


def test_a_trained_projection_head_is_a_dense_module_and_no_normalize_when_training_did_not(students, tmp_path):
    from safetensors.torch import load_file

    student = students["proj"]
    assert modules_of(student) == [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Dense", "Dense")]
    assert json.loads((student / "1_Pooling" / "config.json").read_text())["pooling_mode_cls_token"] is True
    # The projection as training left it, read from the last checkpoint's method state.
    state = torch.load(student / "checkpoints" / f"step-{STEPS:08d}" / "state.pt", weights_only=False)["method"]
    weight, bias = state["projection.weight"], state["projection.bias"]
    assert weight.shape == (32, 16)
    dense = load_file(str(student / "2_Dense" / "model.safetensors"))
    assert torch.equal(dense["linear.weight"], weight) and torch.equal(dense["linear.bias"], bias)
    texts = TEXTS["hi"]
    expected = own_vectors(student, texts, "cls") @ weight.T + bias
    assert close(st_vectors(student, texts), expected)
    # evaluate --mode bitext applies the same head by default: its vectors are these
    from xkd.student.export import trained_sentence_head

    vocab = load_vocab(students["vocab"])
    pooling, head = trained_sentence_head(student)
    assert pooling == "cls" and torch.equal(head.weight.detach(), weight)
    evaluated = sentence_vectors(load_student(str(student), vocab), vocab, texts, "hi", pooling, projection=head)
    assert close(evaluated, torch.nn.functional.normalize(expected, dim=-1))
    lines = tmp_path / "hi.txt"
    lines.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    report = evaluate_bitext(str(student), students["vocab"], f"{lines}@hi", f"{lines}@hi")
    assert report["pooling"] == "cls" and report["projection"] is True
    card = (student / "README.md").read_text()
    assert "2_Dense" in card


def test_an_mmkd_student_is_its_normalised_cls_in_sentence_transformers(students):
    student = students["mmkd"]
    assert modules_of(student) == [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    vocab = load_vocab(students["vocab"])
    model = load_student(str(student), vocab)
    texts = TEXTS["hi"]
    ours = torch.nn.functional.normalize(own_vectors(student, texts, "cls"), dim=-1)
    theirs = st_vectors(student, texts)
    assert close(theirs, ours) and close(theirs, sentence_vectors(model, vocab, texts, "hi", pooling="cls"))


def test_a_masked_lm_student_fills_masks_in_the_transformers_pipeline(students):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    student = students["mlm"]
    assert json.loads((student / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    assert not (student / "modules.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    assert tokenizer.mask_token_id == load_vocab(students["vocab"]).mask_id
    text = f"आज शहर में भारी {tokenizer.mask_token} हो रही है।"
    top = pipeline("fill-mask", model=str(student), device="cpu")(text)[0]
    model = AutoModelForMaskedLM.from_pretrained(str(student)).eval()
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, int((enc["input_ids"][0] == tokenizer.mask_token_id).nonzero())]
    probs = torch.softmax(logits, dim=-1)
    assert top["token"] == int(probs.argmax()) and top["score"] == pytest.approx(float(probs.max()), rel=1e-5)


@pytest.mark.parametrize("name", ["class", "tinybert2"])
def test_a_classifier_student_answers_the_pipeline_with_its_teachers_class_names(students, name):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    student = students[name]
    config = json.loads((student / "config.json").read_text())
    assert config["id2label"] == {"0": "food", "1": "sports", "2": "weather"}
    classify = pipeline("text-classification", model=str(student), device="cpu")
    model = AutoModelForSequenceClassification.from_pretrained(str(student)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(student))
    for text in TEXTS["hi"][:4]:
        with torch.no_grad():
            probs = torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits[0], dim=-1)
        [answer] = classify(text)
        assert answer["label"] == CLASSES[int(probs.argmax())]
        assert answer["score"] == pytest.approx(float(probs.max()), rel=1e-5)
    # What an earlier sentence student left in this --out is gone (it would make a classifier
    # load as a sentence embedder), and so are the earlier student's evaluations.
    if name == "tinybert2":
        assert not (student / "modules.json").exists() and not (student / "1_Pooling").exists()
        assert not (student / "evaluation.json").exists()


EXPECTED_CARDS = {  # library_name, pipeline_tag
    "mean": ("sentence-transformers", "sentence-similarity"), "proj": ("sentence-transformers", "sentence-similarity"),
    "mmkd": ("sentence-transformers", "sentence-similarity"), "mlm": ("transformers", "fill-mask"),
    "class": ("transformers", "text-classification"), "tinybert2": ("transformers", "text-classification"),
}


@pytest.mark.parametrize("name", list(STUDENTS))
def test_every_student_has_a_model_card_the_hub_reads(students, name):
    from huggingface_hub import ModelCard

    student = students[name]
    card = ModelCard.load(str(student / "README.md"))
    method = STUDENTS[name][0]
    library, tag = EXPECTED_CARDS[name]
    data = card.data.to_dict()
    assert data["library_name"] == library and data["pipeline_tag"] == tag
    assert data["language"] == ["en", "hi"]
    assert {"xkd", "knowledge-distillation", "cross-lingual", method} <= set(data["tags"])
    assert "base_model" not in data  # trained without --init-from
    summary = json.loads((student / "train_summary.json").read_text())
    body = card.text
    assert f"**{method}**" in body and str(students["teacher"]) in body and students["cache"] in body
    assert f"{STEPS} of {STEPS}" in body and f"loss {summary['final']['loss']:.4g}" in body
    for option, value in STUDENTS[name][1].items():
        assert f"`{option}={value}`" in body
    assert "## Tokenizer" in body


def test_base_model_is_the_init_from_hub_id_and_yaml_scalars_read_back(tmp_path):
    import yaml

    assert export.base_model_id("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert export.base_model_id(None) is None
    local = build_tiny_bert(tmp_path / "local", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True)
    assert export.base_model_id(str(local)) is None  # a local directory has no hub id
    meta = {"library_name": "transformers", "language": ["en", "no", "on", "zh-Hant"], "base_model": None,
            "tags": ["xkd", "1.5"], "datasets": []}
    assert yaml.safe_load(export.front_matter(meta).strip().strip("-")) == {k: v for k, v in meta.items() if v}


def test_the_card_says_for_which_languages_autotokenizer_reproduces_training(students, tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    for name in ("xkd_student.json", "train_summary.json", "config.json"):
        shutil.copy(students["mean"] / name, student / name)
    assert "union vocabulary's WordPiece" in export.model_card(student)  # no xkd_tokenizer.json: the plain union tokenizer
    (student / "xkd_tokenizer.json").write_text(json.dumps({"routes": {}, "default": "mbert",
                                                            "auto_tokenizer_exact_for": ["*"]}))
    assert "reproduces those token ids for every language" in export.model_card(student)
    (student / "xkd_tokenizer.json").write_text(json.dumps({
        "routes": {"en": "minilm", "hi": "mbert"}, "default": "mbert", "auto_tokenizer_exact_for": ["hi"],
        "auto_tokenizer_not_exact_for": ["en"]}))
    card = export.model_card(student)
    assert "reproduces those token ids for hi and every language not routed to another teacher; not for en" in card
    assert 'xkd.load_student_tokenizer(DIR)`, then `tok(texts, language="en")`' in card


def test_evaluate_records_its_results_in_the_student_and_its_card(students, tmp_path):
    from xkd.evaluation.downstream import TaskEvalOptions, evaluate_task

    student = students["mean"]
    src, tgt = tmp_path / "toy.en", tmp_path / "toy.hi"
    src.write_text("".join(en + "\n" for en, _ in PAIRS), encoding="utf-8")
    tgt.write_text("".join(hi + "\n" for _, hi in PAIRS), encoding="utf-8")
    bitext = evaluate_bitext(str(student), students["vocab"], f"{src}@en", f"{tgt}@hi")
    cls_pooled = evaluate_bitext(str(student), students["vocab"], f"{src}@en", f"{tgt}@hi", pooling="cls", max_lines=20)
    records = json.loads((student / "evaluation.json").read_text())
    assert records == {f"bitext:{src}@en,{tgt}@hi": bitext, f"bitext:{src}@en,{tgt}@hi pooling=cls max-rows=20": cls_pooled}
    card = (student / "README.md").read_text()
    assert "## Evaluation" in card and f"en→hi {bitext['accuracy_en_to_hi']:.4f}" in card

    classifier = students["class"]
    test = f"labeled:{TOY}/toy-hi.tsv@hi"
    result = evaluate_task(TaskEvalOptions(model=str(classifier), mode="classify", train=[], tests=[test], as_is=True,
                                           out=str(tmp_path / "eval")), progress=lambda msg: None)
    records = json.loads((classifier / "evaluation.json").read_text())
    assert list(records) == [f"classify:{test} as-is"]
    assert records[f"classify:{test} as-is"]["accuracy"] == result["accuracy"]
    assert f"accuracy hi {result['accuracy']['hi']:.4f}" in (classifier / "README.md").read_text()
    # A model that is not an xkd student (no train_summary.json) is evaluated, not written to.
    assert export.record_evaluation(students["teacher"], "bitext:x", bitext) is None
    assert not (students["teacher"] / "evaluation.json").exists()
    assert sorted(p.name for p in student.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_every_run_draws_its_loss_curves(students):
    for name in STUDENTS:
        image = decode_png(students[name] / "losses.png")
        logged = [json.loads(line) for line in (students[name] / "metrics.jsonl").read_text().splitlines()]
        losses = [k for k in logged[0] if k not in ("step", "lr", "grad_norm", "lambda")]
        assert len(logged) == STEPS and "loss" in losses
        assert image.shape[1] > 560 and image.shape[0] >= 220
        # One line per loss term, across the plot (the legend is right of it): also where terms
        # coincide (mlm's loss is its mlm term; xd's loss lies between two close terms).
        _, _, left, right = plot_box(image)
        for index, loss in enumerate(losses):
            columns = np.nonzero((image == LINE_COLORS[index]).all(axis=2))[1]
            plotted = columns[(columns >= left) & (columns <= right)]
            assert plotted.size and plotted.max() - plotted.min() > 400, (name, loss)


def test_sentence_files_are_removed_when_a_directory_holds_another_student(tmp_path):
    student = tmp_path / "s"
    student.mkdir()
    for name in export.SENTENCE_FILES:
        (student / name).write_text("{}")
    for module in ("1_Pooling", "2_Dense", "3_Normalize"):
        (student / module).mkdir()
    (student / "1_Pooling" / "config.json").write_text("{}")
    (student / "config.json").write_text("{}")
    export.remove_sentence_transformers(student)
    assert sorted(p.name for p in student.iterdir()) == ["config.json"]
    shutil.rmtree(student)
