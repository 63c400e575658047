"""`xkd evaluate --mode classify|tag` and `xkd rdt` (issue 12) on the project's own toy task
(tests/toytask.py: single texts, sentence pairs, NER and POS tags in English and Spanish).

What evaluate reports is checked against an independent computation: fine-tuned with a
learning rate of 1e-12 the model is its initial self, so the test rebuilds it (the same seed
gives the same fresh head), runs it through the model's own tokenizer, and scores it with the
paper's metric itself. Then the zero-shot protocol end to end: a pair classifier teacher, xd
on a parallel corpus of pairs, both evaluated with one command each, and RDT per language."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xkd.cli import app
from xkd.evaluation.metrics import bio_spans

from conftest import VOCABS, build_tiny_bert
from toytask import write_toy_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FROZEN = ["--lr", "1e-12", "--epochs", "1"]  # fine-tuning that leaves the model as it was


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def last_json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    task = write_toy_task(root / "task", train=160, test=40, langs=("en", "es"), parallel=0)
    base = build_tiny_bert(root / "base", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False, seed=5,
                           hidden=64, init_range=0.2)
    return {"root": root, "dir": task["dir"], "base": base}


def spec(toy, kind, task, lang, split):
    return f"{kind}:{toy['dir']}/{task}.{lang}.{split}.{'conll' if kind == 'conll' else 'tsv'}@{lang}"


def rows(path):
    return [line.split("\t") for line in open(path, encoding="utf-8").read().split("\n") if line]


def fresh_model(base, labels, seed, auto):
    """The model evaluate starts from for `seed`: the encoder as saved, a fresh head."""
    torch.manual_seed(seed)
    id2label = dict(enumerate(labels))
    return auto.from_pretrained(str(base), num_labels=len(labels), id2label=id2label,
                                label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True).eval()


@pytest.mark.parametrize("task, kind", [("pairs", "pairs"), ("classify", "labeled")])
def test_classify_reports_the_accuracy_of_the_model_it_fine_tuned(toy, tmp_path, task, kind):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "eval"
    result = last_json(invoke("evaluate", toy["base"], "--mode", "classify", "--train", spec(toy, kind, task, "en", "train"),
                              "--test", spec(toy, kind, task, "en", "test"), "--test", spec(toy, kind, task, "es", "test"),
                              "--seeds", 2, "--seed", 7, *FROZEN, "--out", out, "--json"))
    assert result["metric"] == "accuracy" and result["seeds"] == 2 and result["zero_shot"] == ["es"]
    tokenizer = AutoTokenizer.from_pretrained(str(toy["base"]))
    for lang in ("en", "es"):
        data = rows(f"{toy['dir']}/{task}.{lang}.test.tsv")
        labels = result["labels"]
        expected = []
        for seed in (7, 8):
            model = fresh_model(toy["base"], labels, seed, AutoModelForSequenceClassification)
            texts_b = [r[1] for r in data] if kind == "pairs" else None
            enc = tokenizer([r[0] for r in data], texts_b, padding=True, truncation=True, max_length=128,
                            return_tensors="pt")
            with torch.no_grad():
                predicted = model(**enc).logits.argmax(-1).numpy()
            expected.append(float(np.mean([labels[p] == r[-1] for p, r in zip(predicted, data)])))
        assert result["per_seed"][lang] == pytest.approx(expected, abs=1e-9)
        assert result["accuracy"][lang] == pytest.approx(np.mean(expected))
        assert result["std"][lang] == pytest.approx(np.std(expected, ddof=1))
    # What --json printed is what results.json holds; the chart is a PNG.
    assert json.loads((out / "results.json").read_text()) == result
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tag_mode_scores_first_sub_tokens_with_conll_span_f1_and_pos_accuracy(toy, tmp_path):
    """NER: span F1 over BIO spans; POS: token accuracy. --max-length 10 cuts sentences, so
    words past the cut are scored as the docs say: "O" for NER, wrong for POS."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(toy["base"]))
    for task, metric in (("ner", "f1"), ("pos", "accuracy")):
        result = last_json(invoke("evaluate", toy["base"], "--mode", "tag", "--train", spec(toy, "conll", task, "en", "train"),
                                  "--test", spec(toy, "conll", task, "es", "test"), *FROZEN, "--max-length", 10,
                                  "--seed", 3, "--out", tmp_path / task, "--json"))
        assert result["metric"] == metric
        sentences = [[line.split("\t") for line in block.split("\n")]
                     for block in open(f"{toy['dir']}/{task}.es.test.conll", encoding="utf-8").read().strip().split("\n\n")]
        model = fresh_model(toy["base"], result["labels"], 3, AutoModelForTokenClassification)
        gold, predicted = [], []
        for sentence in sentences:
            words, tags = [w for w, _ in sentence], [t for _, t in sentence]
            enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=10, return_tensors="pt")
            with torch.no_grad():
                best = model(**enc).logits[0].argmax(-1).tolist()
            first = {}
            for position, word in enumerate(enc.word_ids(0)):
                if word is not None and word not in first:
                    first[word] = position
            cut = "O" if metric == "f1" else None
            predicted.append([result["labels"][best[first[w]]] if w in first else cut for w in range(len(words))])
            gold.append(tags)
        if metric == "f1":  # conlleval: micro-averaged over spans of type, start and end
            g = [(i, s) for i, tags in enumerate(gold) for s in bio_spans(tags)]
            p = [(i, s) for i, tags in enumerate(predicted) for s in bio_spans(tags)]
            correct = len(set(g) & set(p))
            precision, recall = correct / max(1, len(p)), correct / max(1, len(g))
            expected = 2 * precision * recall / (precision + recall) if correct else 0.0
        else:
            pairs = [(a, b) for gs, ps in zip(gold, predicted) for a, b in zip(gs, ps)]
            expected = sum(a == b for a, b in pairs) / len(pairs)
        assert result[metric]["es"] == pytest.approx(expected, abs=1e-9)
        assert any(len(s) > 8 for s in sentences)  # the cut is exercised


def test_fine_tuning_the_real_minilm_learns_english_topics_and_transfers_partly(toy, minilm_dir, tmp_path):
    """The recipe works on a real pretrained encoder: MiniLM (English) fine-tuned on the
    English topics is near perfect on English test sentences; Spanish, zero-shot, sits
    between chance (4 classes: 0.25) and English, through the words the languages share."""
    result = last_json(invoke("evaluate", "minilm", "--mode", "classify",  # an alias, resolved offline
                              "--train", spec(toy, "labeled", "classify", "en", "train"),
                              "--test", spec(toy, "labeled", "classify", "en", "test"),
                              "--test", spec(toy, "labeled", "classify", "es", "test"),
                              "--lr", "1e-4", "--epochs", 2, "--batch-size", 16, "--out", tmp_path / "e", "--json"))
    accuracy = result["accuracy"]
    assert accuracy["en"] >= 0.9 and accuracy["en"] > accuracy["es"], accuracy
    assert result["epoch_losses"][0][-1] < result["epoch_losses"][0][0]
    assert result["zero_shot"] == ["es"] and "std" not in result


def test_a_pair_student_is_evaluated_zero_shot_and_rdt_compares_it_with_its_teacher(toy, thread_client, tmp_path):
    """The issue's "done when": a pair classifier teacher (finetune-teacher on English pairs),
    xd on the parallel English-Spanish pairs, then one evaluate command per model and xkd rdt."""
    teacher = tmp_path / "teacher"
    assert invoke("finetune-teacher", "--base", toy["base"], "--data", spec(toy, "pairs", "pairs", "en", "train"),
                  "--out", teacher, "--epochs", 2, "--lr", "3e-3", "--held-out", 0).exit_code == 0
    corpus = f"pairs:{toy['dir']}/pairs.en.train.tsv@en,{toy['dir']}/pairs.es.train.tsv@es"
    cached = last_json(invoke("cache-teachers", "--teacher", teacher, "--corpus", corpus, "--sides", "src",
                              "--class-logits", "--out", tmp_path / "caches", "--scheduler", thread_client.scheduler.address,
                              "--json"))
    cache = cached["caches"][0]["path"]
    assert invoke("build-vocab", "--teachers", teacher, "--out", tmp_path / "vocab").exit_code == 0
    student = tmp_path / "student"
    last_json(invoke("train-student", "--method", "xd", "--caches", cache, "--vocab", tmp_path / "vocab",
                     "--init-from", teacher, "--steps", 6, "--batch-size", 8, "--lr", "1e-3", "--out", student, "--json"))
    common = ["--mode", "classify", "--train", spec(toy, "pairs", "pairs", "en", "train"),
              "--test", spec(toy, "pairs", "pairs", "en", "test"), "--test", spec(toy, "pairs", "pairs", "es", "test"),
              "--epochs", 1, "--lr", "1e-3", "--batch-size", 16, "--json"]
    on_student = invoke("evaluate", student, *common, "--out", tmp_path / "s")
    on_teacher = invoke("evaluate", teacher, *common, "--out", tmp_path / "t")
    student_result, teacher_result = last_json(on_student), last_json(on_teacher)
    assert student_result["tokenized_with"] == str(tmp_path / "vocab")  # the student's training vocab, found itself
    assert teacher_result["tokenized_with"] == "model"
    (tmp_path / "student.json").write_text(on_student.stdout)
    r = invoke("rdt", tmp_path / "student.json", "--teacher", tmp_path / "t" / "results.json", "--json")
    rdt = last_json(r)
    for lang in ("en", "es"):
        s, t = student_result["accuracy"][lang], teacher_result["accuracy"][lang]
        assert rdt["per_language"][lang]["teacher"] == pytest.approx(100 * (s - t) / t)
        assert f"{lang} " in r.stdout
    assert rdt["rdt"] == pytest.approx(np.mean([100 * (student_result["accuracy"][x] - teacher_result["accuracy"][x])
                                                / teacher_result["accuracy"][x] for x in ("en", "es")]))
    # --as-is scores the distilled student's own head (papers 001-003 score task students so):
    # the accuracy of its logits on the Spanish pairs, run here through the union vocab.
    as_is = last_json(invoke("evaluate", student, "--mode", "classify", "--as-is", "--test",
                             spec(toy, "pairs", "pairs", "es", "test"), "--out", tmp_path / "as-is", "--json"))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from xkd import load_vocab

    model = AutoModelForSequenceClassification.from_pretrained(str(student)).eval()
    vocab, tokenizer = load_vocab(tmp_path / "vocab"), AutoTokenizer.from_pretrained(str(teacher))
    data = rows(f"{toy['dir']}/pairs.es.test.tsv")
    right = 0
    with torch.no_grad():
        for a, b, label in data:
            ids = torch.from_numpy(vocab.encode([a], "es", [b])["input_ids"])
            types = torch.tensor([tokenizer(a, b)["token_type_ids"]])
            right += model.config.id2label[int(model(input_ids=ids, token_type_ids=types).logits.argmax())] == label
    assert as_is["as_is"] and as_is["accuracy"]["es"] == pytest.approx(right / len(data))
    # One student file per language merges into one student (in-language protocols).
    en_only, es_only = dict(student_result, accuracy={"en": student_result["accuracy"]["en"]}), as_is
    (tmp_path / "en.json").write_text(json.dumps(en_only))
    (tmp_path / "es.json").write_text(json.dumps(es_only))
    merged = last_json(invoke("rdt", tmp_path / "en.json", tmp_path / "es.json", "--teacher",
                              tmp_path / "t" / "results.json", "--json"))
    assert merged["student_scores"] == {"en": student_result["accuracy"]["en"], "es": as_is["accuracy"]["es"]}
    # A monolingual teacher: only its language counts (the paper's Table 2).
    only_en = last_json(invoke("rdt", tmp_path / "student.json", "--teacher", f"{tmp_path / 't' / 'results.json'}@en",
                               "--json"))
    assert only_en["languages"] == ["en"] and only_en["pairs"] == 1


def test_freeze_embeddings_keeps_the_embedding_layers_and_trains_the_rest(toy):
    """Limitations of Knowledge Distillation for Zero-shot Transfer Learning (Soltan et al., 2021)
    fine-tunes with the embedding layers frozen: they end bit-identical, the
    encoder and the head move."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from xkd.evaluation.finetune import Recipe, TaskEncoder, fit
    from xkd.evaluation.tasks import read_tasks, task_labels

    data = read_tasks([spec(toy, "pairs", "pairs", "en", "train")], "--train")
    labels = task_labels(data)
    encoder = TaskEncoder(AutoTokenizer.from_pretrained(str(toy["base"])))
    encoded = [encoder.encode(data[0], labels, 32)]
    for freeze in (True, False):
        model = fresh_model(toy["base"], labels, 0, AutoModelForSequenceClassification)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        fit(model, encoded, Recipe(epochs=1, lr=1e-3, batch_size=32, freeze_embeddings=freeze), encoder.pad_id, 0,
            torch.device("cpu"))
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        embeddings = {n for n in before if ".embeddings." in n}
        assert (embeddings & changed == set()) is freeze
        assert "classifier.weight" in changed and any(".encoder.layer.0." in n for n in changed)


def test_bad_task_input_is_one_paragraph_and_exit_2(toy, tmp_path):
    base, train = toy["base"], spec(toy, "labeled", "classify", "en", "train")
    test = spec(toy, "labeled", "classify", "en", "test")
    cases = [
        (["--mode", "tag", "--train", train, "--test", test], "--mode tag reads conll"),
        (["--mode", "classify", "--train", train, "--test", test, "--test", test], "two --test files are in en"),
        (["--mode", "classify", "--train", train, "--test", spec(toy, "pairs", "pairs", "en", "test")],
         "mix single texts .* and sentence pairs"),
        (["--mode", "classify", "--train", train], "needs --train SPEC .* and at least one --test"),
        (["--mode", "classify", "--train", f"labeled:{tmp_path}/missing.tsv@en", "--test", test], "missing.tsv does not exist"),
        (["--mode", "classify", "--train", train, "--test", test, "--seeds", 0], "--seeds 0"),
        (["--mode", "classify", "--train", train, "--test", test, "--lr", "nan"], "--lr nan"),
        (["--mode", "classify", "--as-is", "--test", test], "--as-is: MODEL .* is a BertForMaskedLM"),
        (["--mode", "classify", "--as-is", "--train", train, "--test", test], "--train and --seeds do not apply"),
    ]
    unseen = tmp_path / "unseen.tsv"
    unseen.write_text("a tasty soup\tcooking\n", encoding="utf-8")
    cases.append((["--mode", "classify", "--train", train, "--test", f"labeled:{unseen}@es"], "label.*cooking.*not"))
    import re

    for args, message in cases:
        r = invoke("evaluate", base, *args, "--out", tmp_path / "never")
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output and re.search(message, r.output), (args, r.output)
    assert not (tmp_path / "never").exists()
    r = invoke("rdt", tmp_path / "nope.json", "--teacher", tmp_path / "nope.json")
    assert r.exit_code == 2 and "does not exist" in r.output


def test_hf_task_specs_read_a_datasets_dataset_with_its_split_and_tag_names(toy, tmp_path):
    """hf: task specs (what docs/evaluation.md uses for XNLI, PAWS-X, WikiANN): here a
    DatasetDict saved to disk, its ClassLabel tag ids read back as names."""
    import datasets

    from xkd.evaluation.tasks import read_task

    sentences = [block.split("\n") for block in
                 open(f"{toy['dir']}/ner.en.test.conll", encoding="utf-8").read().strip().split("\n\n")]
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    columns = {"tokens": [[line.split("\t")[0] for line in s] for s in sentences],
               "ner_tags": [[names.index(line.split("\t")[1]) for line in s] for s in sentences]}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(tmp_path / "ds")
    data = read_task(f"hf:{tmp_path / 'ds'}@en?tokens=tokens&tags=ner_tags&split=test", "--test")
    assert data.mode == "tag" and data.lang == "en"
    assert data.words == columns["tokens"]
    assert data.tags == [[line.split("\t")[1] for line in s] for s in sentences]
    pairs = rows(f"{toy['dir']}/pairs.es.test.tsv")
    sequence = datasets.Dataset.from_dict({"premise": [r[0] for r in pairs], "hypothesis": [r[1] for r in pairs],
                                           "label": [["different", "same"].index(r[2]) for r in pairs]},
                                          features=datasets.Features({"premise": datasets.Value("string"),
                                                                      "hypothesis": datasets.Value("string"),
                                                                      "label": datasets.ClassLabel(names=["different", "same"])}))
    datasets.DatasetDict({"validation": sequence}).save_to_disk(tmp_path / "xnli-like")
    data = read_task(f"hf:{tmp_path / 'xnli-like'}@es?text=premise,hypothesis&label=label&split=validation", "--test")
    assert (data.kind, data.lang) == ("pairs", "es")
    assert list(zip(data.texts, data.texts_b, data.labels)) == [tuple(r) for r in pairs]
