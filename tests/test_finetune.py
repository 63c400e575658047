"""finetune-teacher and the labeled corpus it shares with cache-teachers: a tiny real BERT
learns the bundled toy task, the result loads as a Hugging Face classifier with its labels,
labels parse as names or ids, and bad input is one clear error with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xkd.cli import app
from xkd.errors import BadInput
from xkd.evaluation.finetune import split_held_out
from xkd.evaluation.tasks import read_tasks, task_labels
from xkd.names import parse_corpus
from xkd.pipeline.corpus import Cleaning, plan_corpus

from conftest import ROOT, VOCABS, build_tiny_bert

TOY = ROOT / "xkd" / "data"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("base") / "tiny", VOCABS / "bert-base-uncased.vocab.txt",
                           lowercase=True, kind="mlm", seed=5, hidden=64)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def toy_lines(name):
    return [line.split("\t") for line in (TOY / name).read_text(encoding="utf-8").splitlines()]


def test_the_toy_task_is_three_balanced_topics_in_three_languages():
    en, hi, fr = toy_lines("toy-en.tsv"), toy_lines("toy-hi.tsv"), toy_lines("toy-fr.tsv")
    assert (len(en), len(hi), len(fr)) == (90, 60, 30)
    for lines in (en, hi, fr):
        labels = [label for _, label in lines]
        assert {label: labels.count(label) for label in set(labels)} == {
            k: len(lines) // 3 for k in ("sports", "food", "weather")}
    pairs = toy_lines("toy-en-hi.tsv")
    # The parallel file pairs each Hindi sentence with the English one it translates.
    en_of = {text: label for text, label in en}
    assert [en_of[e] for e, _ in pairs] == [label for _, label in hi]
    assert [h for _, h in pairs] == [text for text, _ in hi]


def test_finetune_teacher_learns_the_toy_task_and_saves_a_loadable_classifier(tiny_base, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "clf"
    r = invoke("finetune-teacher", "--base", tiny_base, "--data", f"{TOY}/toy-en.tsv@en", "--out", out,
               "--epochs", 15, "--lr", 2e-3, "--batch-size", 8, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["labels"] == ["food", "sports", "weather"]
    assert (summary["train_examples"], summary["held_out_examples"]) == (72, 18)
    assert summary["epoch_losses"][-1] < 0.3 * summary["epoch_losses"][0]
    assert summary["accuracy"] > 0.4  # above chance (1/3) on sentences it never saw
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "food", 1: "sports", 2: "weather"}
    assert model.config.label2id == {"food": 0, "sports": 1, "weather": 2}
    lines = toy_lines("toy-en.tsv")
    held = split_held_out([len(lines)], 0.2, 0)[0]
    with torch.no_grad():
        enc = tokenizer([t for t, _ in lines], padding=True, return_tensors="pt")
        predicted = model(**enc).logits.argmax(-1).numpy()
    gold = np.array([model.config.label2id[label] for _, label in lines])
    assert (predicted[~held] == gold[~held]).mean() > 0.9  # it fits its training set
    assert (predicted[held] == gold[held]).mean() == pytest.approx(summary["accuracy"], abs=1e-4)
    saved = json.loads((out / "finetune_summary.json").read_text())
    assert saved["accuracy"] == summary["accuracy"]
    # Its config.yaml replays it: the same classifier, byte for byte
    r = invoke("finetune-teacher", "--config", out / "config.yaml", "--out", tmp_path / "again")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def read_labeled(items):
    tasks = read_tasks(items, "--data")
    return tasks, task_labels(tasks)


def test_labels_are_names_or_ids_and_several_files_share_one_class_list(tmp_path):
    tasks, labels = read_labeled([f"{TOY}/toy-en.tsv@en", f"labeled:{TOY}/toy-hi.tsv@hi"])
    assert labels == ["food", "sports", "weather"]
    assert [len(t) for t in tasks] == [90, 60] and [t.lang for t in tasks] == ["en", "hi"]
    assert tasks[0].labels[:3] == tasks[1].labels[:3] == ["sports", "food", "weather"]
    # A file missing a class still maps its names into the union of all files' classes.
    partial = tmp_path / "partial.tsv"
    partial.write_text("rain today\tweather\nfresh bread\tfood\n", encoding="utf-8")
    assert read_labeled([f"{TOY}/toy-en.tsv@en", f"{partial}@en"])[1] == ["food", "sports", "weather"]
    ids = tmp_path / "ids.tsv"
    ids.write_text("a\t0\nb\t2\nc\t1\n", encoding="utf-8")
    numbered, labels = read_labeled([f"{ids}@en"])
    assert labels == ["0", "1", "2"] and numbered[0].labels == ["0", "2", "1"]
    gaps = tmp_path / "gaps.tsv"
    gaps.write_text("a\t0\nb\t3\n", encoding="utf-8")
    assert read_labeled([f"{gaps}@en"])[1] == ["0", "1", "2", "3"]  # class id i stays class i
    with pytest.raises(BadInput, match="by name but .* by id"):
        read_labeled([f"{TOY}/toy-en.tsv@en", f"{ids}@en"])
    held = split_held_out([10, 5], 0.2, seed=4)
    assert held[0].sum() == 2 and held[1].sum() == 1
    assert all(np.array_equal(a, b) for a, b in zip(held, split_held_out([10, 5], 0.2, seed=4)))


def test_a_labeled_corpus_caches_gold_class_ids_and_names_them_in_the_manifest(tmp_path):
    plan = plan_corpus(parse_corpus(f"labeled:{TOY}/toy-hi.tsv@hi"), Cleaning(), shard_size=25)
    examples = [ex for shard in plan.shards for ex in shard.examples()]
    assert [s.size for s in plan.shards] == [25, 25, 10]
    names = plan.to_json()["labels"]
    assert names == ["food", "sports", "weather"] and plan.langs == ("hi",)
    assert [(ex.texts[0], names[ex.label]) for ex in examples] == [tuple(x) for x in toy_lines("toy-hi.tsv")]
    text_plan = plan_corpus(parse_corpus(f"text:{TOY}/sample.en-hi.tsv@en"), Cleaning(), shard_size=100)
    assert "labels" not in text_plan.to_json()


@pytest.mark.parametrize("content, message", [
    ("just text without a label\n", r"line 1: expected 2 tab-separated fields \(text<TAB>label\), found 1"),
    ("good\tfood\nsoup\t\n", "line 2: the label .* is empty"),
    ("good\tfood\nsoup\t0.5\n", "line 2: label '0.5' is a number but not a class id"),
    ("good\t-1\n", "label '-1' is a number but not a class id"),
    ("good\tfood\nsoup\t1\n", "mixes class ids .* and class names"),
    ("good\tfood\nsoup\tfood\n", "one class only"),
])
def test_bad_labeled_files_are_one_clear_error_with_exit_code_2(tiny_base, tmp_path, content, message):
    bad = tmp_path / "bad.tsv"
    bad.write_text(content, encoding="utf-8")
    r = invoke("finetune-teacher", "--base", tiny_base, "--data", f"{bad}@en", "--out", tmp_path / "o")
    assert r.exit_code == 2, r.output
    assert "finetune-teacher: error:" in r.output and "Traceback" not in r.output
    import re

    assert re.search(message, r.output), r.output
    assert not (tmp_path / "o").exists()


def test_missing_files_and_bad_options_are_exit_code_2(tiny_base, tmp_path):
    r = invoke("finetune-teacher", "--base", tiny_base, "--data", f"{tmp_path}/nope.tsv@en", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "nope.tsv does not exist" in r.output
    r = invoke("finetune-teacher", "--base", tiny_base, "--data", f"{TOY}/toy-en.tsv", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "must be PATH@LANG" in r.output
    r = invoke("finetune-teacher", "--base", tmp_path / "no-model", "--data", f"{TOY}/toy-en.tsv@en", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "no-model" in r.output
    r = invoke("finetune-teacher", "--base", tiny_base, "--data", f"{TOY}/toy-en.tsv@en", "--out", tmp_path / "o",
               "--held-out", 1.5)
    assert r.exit_code == 2 and "--held-out" in r.output
    with pytest.raises(BadInput, match="labeled:.*missing.tsv.*does not exist"):
        parse_corpus(f"labeled:{tmp_path}/missing.tsv@en")
