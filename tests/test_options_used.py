"""Issue 20: every option that is given is used, or refused.

An option that the other options make pointless (a mode-specific option in another mode, an
option that needs one not given, two that contradict, a device or amp that cannot apply) used
to be dropped silently, exit 0. Each case here is a real command on real inputs (a tiny
teacher, its cache made by the pipeline, a student trained for 2 steps, task files, a CSV
dataset) that runs to exit 0 once the offending option is removed; with it, the command must
stop before any work: exit 2, one paragraph naming the option and the one it conflicts with,
no traceback, and nothing written or changed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from xkd.cli import app
from xkd.vocab import build_vocab

from conftest import ROOT, TATOEBA, VOCABS, build_tiny_bert, cache_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NO_CUDA = not torch.cuda.is_available()


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def run_xkd(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "xkd.cli", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120)


def tree_sha(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def assert_refused(output: str, *names: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.split("\n") if "error:" in line]
    assert len(errors) == 1, output
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def write(path: Path, lines) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def setup(thread_client, tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    teacher = build_tiny_bert(root / "teacher", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=3)
    encoder = build_tiny_bert(root / "encoder", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=4,
                              kind="encoder")
    classifier = build_tiny_bert(root / "classifier", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=5,
                                 kind="classifier", num_labels=2)
    cache = cache_teacher(thread_client, root / "caches", teacher, TATOEBA, sides="src", max_pairs=12, topk=8, shard_size=12)
    build_vocab([str(teacher)], root / "vocab")
    student = root / "student"
    r = invoke("train-student", "--method", "mergedistill", "--caches", cache, "--vocab", root / "vocab", "--out", student,
               "--steps", 2, "--batch-size", 4, "--hidden", 32, "--layers", 1, "--heads", 2)
    assert r.exit_code == 0, r.output
    words = ["the game was won", "a tasty soup", "they scored a goal", "fresh bread and cheese",
             "the team lost", "a spicy curry", "he ran the race", "sweet apple pie"]
    topics = ["sports", "food"] * 4
    lines = write(root / "lines.en", words)
    mono = write(root / "mono.en", words[:2])
    task = {
        "train": write(root / "train.tsv", [f"{w}\t{t}" for w, t in zip(words, topics)]),
        "test": write(root / "test.tsv", [f"{w}\t{t}" for w, t in zip(words[:4], topics)]),
        "ids": write(root / "ids.tsv", [f"{w}\t{i % 2}" for i, w in enumerate(words)]),
    }
    (root / "cache-link").symlink_to(cache)  # a second path to the same cache
    return {"root": root, "teacher": teacher, "encoder": encoder, "classifier": classifier, "cache": cache,
            "cache_link": root / "cache-link", "vocab": root / "vocab", "student": student, "lines": lines, "mono": mono,
            "task": task,
            "scheduler": thread_client.scheduler.address}


# The base commands: each runs to exit 0 as it is (test_the_base_commands_run).
def mlm(s):
    return ["evaluate", s["student"], "--caches", s["cache"]]


def bitext(s):
    return ["evaluate", s["student"], "--mode", "bitext", "--src", f"{s['lines']}@en", "--tgt", f"{s['lines']}@en"]


def classify(s):
    return ["evaluate", s["teacher"], "--mode", "classify", "--train", f"labeled:{s['task']['train']}@en",
            "--test", f"labeled:{s['task']['test']}@en", "--epochs", 1, "--batch-size", 4, "--max-length", 16,
            "--out", s["root"] / "eval"]


def as_is(s):
    return ["evaluate", s["classifier"], "--mode", "classify", "--as-is", "--test", f"labeled:{s['task']['ids']}@en",
            "--out", s["root"] / "eval-as-is"]


def train(s, shape=True, method="mergedistill"):
    return ["train-student", "--method", method, "--caches", s["cache"], "--vocab", s["vocab"], "--steps", 2,
            "--batch-size", 4, *(["--hidden", 32, "--layers", 1, "--heads", 2] if shape else [])]


def cache(s, teacher="teacher"):
    return ["cache-teachers", "--teacher", s[teacher], "--corpus", TATOEBA, "--max-pairs", 4, "--scheduler", s["scheduler"]]


NOT_HERE = "cuda" if NO_CUDA else "cpu"  # mlm and bitext run on the CPU whatever --device says

# name: setup -> (a base command plus the option(s) it makes pointless, what the message names)
CASES = {
    "mlm --seeds": lambda s: ([*mlm(s), "--seeds", 3], ("--seeds", "--mode mlm", "classify")),
    "mlm --src": lambda s: ([*mlm(s), "--src", f"{s['lines']}@en"], ("--src", "--mode mlm", "bitext")),
    "mlm --device": lambda s: ([*mlm(s), "--device", NOT_HERE], ("--device", "--mode mlm")),
    "mlm --as-is": lambda s: ([*mlm(s), "--as-is"], ("--as-is", "--mode mlm")),
    "mlm --out": lambda s: ([*mlm(s), "--out", s["root"] / "never"], ("--out", "--mode mlm")),
    "bitext --caches": lambda s: ([*bitext(s), "--caches", s["cache"]], ("--caches", "--mode bitext", "mlm")),
    "bitext --device": lambda s: ([*bitext(s), "--device", NOT_HERE], ("--device", "--mode bitext")),
    "bitext --allow-incomplete": lambda s: ([*bitext(s), "--allow-incomplete"], ("--allow-incomplete", "--mode bitext")),
    "bitext --train": lambda s: ([*bitext(s), "--train", f"labeled:{s['task']['train']}@en"], ("--train", "--mode bitext")),
    "classify --max-rows": lambda s: ([*classify(s), "--max-rows", 2], ("--max-rows", "--mode classify")),
    "classify --pooling": lambda s: ([*classify(s), "--pooling", "cls"], ("--pooling", "--mode classify", "bitext")),
    "classify --caches": lambda s: ([*classify(s), "--caches", s["cache"]], ("--caches", "--mode classify")),
    "as-is --lr": lambda s: ([*as_is(s), "--lr", 1e-4], ("--lr", "--as-is")),
    "as-is --epochs": lambda s: ([*as_is(s), "--epochs", 2], ("--epochs", "--as-is")),
    "as-is --freeze-embeddings": lambda s: ([*as_is(s), "--freeze-embeddings"], ("--freeze-embeddings", "--as-is")),
    "--init-teacher without --init-from": lambda s: ([*train(s), "--init-teacher", s["teacher"]],
                                                     ("--init-teacher", "--init-from")),
    "--layers with --init-from": lambda s: ([*train(s, False), "--init-from", s["teacher"], "--layers", 3],
                                            ("--layers", "--init-from")),
    "--dropout with --init-from": lambda s: ([*train(s, False), "--init-from", s["teacher"], "--dropout", 0.3],
                                             ("--dropout", "--init-from")),
    "--architecture with --init-from": lambda s: ([*train(s, False), "--init-from", s["teacher"], "--architecture", "bert"],
                                                  ("--architecture", "--init-from")),
    "--amp fp16 on cpu": lambda s: ([*train(s), "--device", "cpu", "--amp", "fp16"], ("--amp fp16", "--device cpu")),
    "train --workspace with every path": lambda s: ([*train(s), "--workspace", s["root"] / "ws"],
                                                    ("--workspace", "--caches", "--out")),
    "--mask-prob with --no-mask": lambda s: ([*cache(s), "--no-mask", "--mask-prob", 0.5], ("--mask-prob", "--no-mask")),
    "--whole-word with --no-mask": lambda s: ([*cache(s), "--no-mask", "--whole-word"], ("--whole-word", "--no-mask")),
    "--seed with --mask-prob 0": lambda s: ([*cache(s), "--mask-prob", 0, "--seed", 7], ("--seed", "--mask-prob 0")),
    "--mask-epochs with --no-mask": lambda s: ([*cache(s), "--no-mask", "--mask-epochs", 1], ("--mask-epochs", "--no-mask")),
    "--hidden-positions without --hidden-layers": lambda s: ([*cache(s), "--hidden-positions", "word"],
                                                             ("--hidden-positions", "--hidden-layers")),
    "--split on files": lambda s: ([*cache(s), "--split", "test"], ("--split", "--corpus")),
    "--sides on one language": lambda s: (["cache-teachers", "--teacher", s["teacher"], "--corpus", f"text:{s['mono']}@en",
                                           "--scheduler", s["scheduler"], "--sides", "tgt"], ("--sides tgt", "--corpus")),
    "--whole-word with an unmasked encoder": lambda s: ([*cache(s, "encoder"), "--whole-word"], ("--whole-word", "--mask-prob")),
    "--seed with an unmasked encoder": lambda s: ([*cache(s, "encoder"), "--seed", 3], ("--seed 3", "--mask-prob")),
    "--workers with --scheduler": lambda s: ([*cache(s), "--workers", 2], ("--workers", "--scheduler")),
    "cache --workspace with --out": lambda s: ([*cache(s), "--workspace", s["root"] / "ws"], ("--workspace", "--out")),
    # a method option that only applies under another option's value (option(used_when=...))
    "-o lambda_end with lambda_schedule=constant": lambda s: (
        [*train(s), "-o", "lambda_schedule=constant", "-o", "lambda_end=0.5"], ("lambda_end", "lambda_schedule=constant")),
    "mlm -o mask_prob with source=cache": lambda s: ([*train(s, method="mlm"), "-o", "mask_prob=0.3"],
                                                     ("mask_prob", "source=cache", "source=text")),
    "mlm -o max_length with source=cache": lambda s: ([*train(s, method="mlm"), "-o", "max_length=64"],
                                                      ("max_length", "source=cache")),
    # options the caches or the other options give nothing to do
    "--copies with one cache per corpus": lambda s: ([*train(s), "--copies", "best"], ("--copies best", str(s["cache"]))),
    "--copies all with one cache per corpus": lambda s: ([*train(s), "--copies", "all"], ("--copies all",)),
    "--alpha with one language": lambda s: ([*train(s), "--alpha", 0.3], ("--alpha 0.3", "one language (en)")),
    "--stop-after beyond --steps": lambda s: ([*train(s), "--stop-after", 5], ("--stop-after 5", "--steps 2")),
    "--stop-after at --steps": lambda s: ([*train(s), "--stop-after", 2], ("--stop-after 2", "--steps 2")),
    "--save-every beyond --steps": lambda s: ([*train(s), "--save-every", 2], ("--save-every 2", "--steps 2")),
    "--keep-checkpoints without --save-every": lambda s: ([*train(s), "--keep-checkpoints", 5],
                                                          ("--keep-checkpoints", "--save-every")),
    # one cache twice: typed twice, or two paths to one directory
    "train --caches C C": lambda s: ([*train(s), "--caches", s["cache"]], ("--caches", str(s["cache"]), "twice")),
    "train --caches C LINK": lambda s: ([*train(s), "--caches", s["cache_link"]], ("--caches", str(s["cache_link"]),
                                                                                 str(s["cache"]))),
    "train --caches C C/../C": lambda s: ([*train(s), "--caches", Path(s["cache"]) / ".." / Path(s["cache"]).name],
                                          ("--caches", "one directory")),
    "evaluate --caches C C": lambda s: ([*mlm(s), "--caches", s["cache"]], ("--caches", str(s["cache"]), "twice")),
    "evaluate --caches C LINK": lambda s: ([*mlm(s), "--caches", s["cache_link"]], ("--caches", str(s["cache_link"]))),
}


@pytest.mark.parametrize("name", CASES)
def test_an_option_the_others_make_pointless_is_refused_before_any_work(setup, tmp_path, name):
    """Each case runs to exit 0 without its last option(s); with them it is refused: exit 2,
    one paragraph naming both options, nothing written, the student's files unchanged."""
    args, names = CASES[name](setup)
    if "--out" not in args and args[0] in ("train-student", "cache-teachers"):
        args = [*args, "--out", tmp_path / "out"]
    student_before = tree_sha(setup["student"])
    r = invoke(*args)
    assert r.exit_code == 2, (name, r.output)
    assert_refused(r.output, *names)
    assert not (tmp_path / "out").exists() and not (setup["root"] / "never").exists()
    assert not (setup["root"] / "ws").exists()
    assert tree_sha(setup["student"]) == student_before  # evaluate records nothing (evaluation.json)


def test_the_base_commands_run(setup, tmp_path):
    """The control: the base commands of the cases above are sound (exit 0), so a case is
    refused for its pointless option, not for anything else."""
    for args in (mlm(setup), bitext(setup), as_is(setup), [*cache(setup), "--no-mask", "--out", tmp_path / "caches"],
                 [*train(setup), "--device", "cpu", "--amp", "bf16", "--out", tmp_path / "student"],
                 [*train(setup, method="mlm"), "--out", tmp_path / "student-mlm"]):
        r = invoke(*args)
        assert r.exit_code == 0, (args, r.output)


def test_evaluate_without_model_asks_for_model_not_vocab(setup):
    """The real `xkd` in its own process: no MODEL is about MODEL, in mlm and bitext mode."""
    r = run_xkd("evaluate", "--caches", setup["cache"])
    assert r.returncode == 2, r.stderr
    line = assert_refused(r.stderr, "MODEL", "--mode mlm")
    assert "--vocab" not in line
    r = run_xkd("evaluate", "--mode", "bitext", "--src", f"{setup['lines']}@en", "--tgt", f"{setup['lines']}@en")
    assert r.returncode == 2, r.stderr
    line = assert_refused(r.stderr, "MODEL", "--init-from")
    assert "--vocab" not in line
    # A MODEL that is not there is about MODEL too, not about the --vocab its summary would name.
    missing = setup["root"] / "no-such-student"
    r = run_xkd("evaluate", missing, "--caches", setup["cache"])
    assert r.returncode == 2, r.stderr
    line = assert_refused(r.stderr, f"MODEL {missing}", "does not exist")
    assert "--vocab" not in line


def test_ls_of_a_workspace_that_does_not_exist_is_refused(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    r = run_xkd("ls", "--workspace", missing)
    assert r.returncode == 2, r.stdout + r.stderr
    assert_refused(r.stderr, str(missing), "does not exist")
    assert "caches (0)" not in r.stdout and not missing.exists()


def test_methods_name_with_markdown_is_refused():
    r = invoke("methods", "xd", "--markdown")
    assert r.exit_code == 2, r.output
    assert_refused(r.output, "NAME", "--markdown")


def test_build_vocab_workspace_with_out_is_refused(setup, tmp_path):
    r = invoke("build-vocab", "--teachers", setup["teacher"], "--out", tmp_path / "vocab", "--workspace", tmp_path / "ws")
    assert r.exit_code == 2, r.output
    assert_refused(r.output, "--workspace", "--out")
    assert not (tmp_path / "vocab").exists() and not (tmp_path / "ws").exists()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["evaluate", "finetune-teacher"])
def test_device_cuda_without_cuda_is_refused_before_fine_tuning(setup, tmp_path, command):
    task = setup["task"]
    if command == "evaluate":
        args = ["evaluate", setup["teacher"], "--mode", "classify", "--train", f"labeled:{task['train']}@en", "--test",
                f"labeled:{task['test']}@en", "--out", tmp_path / "out"]
    else:
        args = ["finetune-teacher", "--base", setup["teacher"], "--data", f"labeled:{task['train']}@en", "--out",
                tmp_path / "out"]
    r = invoke(*args, "--device", "cuda")
    assert r.exit_code == 2, r.output
    assert_refused(r.output, "--device cuda", "--device cpu")
    assert not (tmp_path / "out").exists()


def test_mixing_and_checkpoint_options_run_where_they_have_work(setup, thread_client, tmp_path):
    """The controls of the refusals above: --copies with two teachers' caches of one corpus,
    --alpha with two languages, --stop-after below --steps, --keep-checkpoints with
    --save-every, and two caches of one corpus in two directories (not one cache twice)."""
    again = cache_teacher(thread_client, tmp_path / "again", setup["teacher"], TATOEBA, sides="src", max_pairs=12, topk=8,
                          shard_size=12)
    both = cache_teacher(thread_client, tmp_path / "both", setup["teacher"], TATOEBA, sides="both", max_pairs=6, topk=8,
                         shard_size=12)
    base = ["train-student", "--method", "mergedistill", "--vocab", setup["vocab"], "--batch-size", 4, "--hidden", 32,
            "--layers", 1, "--heads", 2]
    for name, (caches, args) in {
        "copies": ([setup["cache"], again], ["--copies", "best", "--steps", 2]),
        "alpha": ([both], ["--alpha", 0.3, "--steps", 2]),
        "stop-after, keep-checkpoints": ([setup["cache"]], ["--steps", 3, "--stop-after", 2, "--save-every", 1,
                                                            "--keep-checkpoints", 1]),
    }.items():
        r = invoke(*base, *[x for c in caches for x in ("--caches", c)], *args, "--out", tmp_path / name)
        assert r.exit_code == 0, (name, r.output)


# A method option read only under another option's value (declared with option(used_when=...)):
# given while that value is off, it is refused before any cache is read.
# (method, options, what the message names, the option with a value that makes it read: accepted)
METHOD_OPTIONS = [
    ("mmkd", ["tlm=false", "xwcl=false", "mask_seed=3"], ("mask_seed", "tlm=false", "xwcl=false"), ["tlm=false"]),
    ("mmkd", ["xwcl=false", "xwcl_tau=0.2"], ("xwcl_tau", "xwcl=false"), []),
    ("mmkd", ["struca=false", "struca_weight=2"], ("struca_weight", "struca=false"), []),
    ("mmkd", ["senta=false", "struca=false", "head_out=64"], ("head_out", "senta=false"), ["senta=false"]),
    ("tinybert", ["stage=2", "kd_target=tail"], ("kd_target", "stage=2"), ["stage=1"]),
    ("mmkd", ["tlm=false", "xwcl=false", "mask_prob=0.3"], ("mask_prob", "tlm=false"), ["xwcl=true"]),
    ("multikd", ["branch_layers=2"], ("branch_layers", "student=plain"), ["student=mblm"]),
    ("xd", ["target=class_logits", "pooling=cls"], ("pooling", "target=class_logits"), ["target=pooled"]),
    ("mergedistill", ["lambda_schedule=constant", "lambda_end=0"], ("lambda_end", "lambda_schedule=constant"), []),
]


@pytest.mark.parametrize("method, options, names, read", METHOD_OPTIONS)
def test_a_method_option_that_its_other_options_turn_off_is_refused(setup, tmp_path, method, options, names, read):
    from xkd.student.methods import method_config

    r = invoke(*train(setup, method=method), *[x for o in options for x in ("-o", o)], "--out", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert_refused(r.output, "--option", f"--method {method}", "not used", *names)
    assert not (tmp_path / "out").exists()
    method_config(method, dict(o.split("=") for o in [*read, options[-1]]))  # where it is read, it is accepted


@pytest.mark.parametrize("args, names", [
    (["cache-teachers", "--topk", 8, "--topk", 4], ("--topk 8", "--topk 4")),
    (["cache-teachers", "--text", "--no-text"], ("--text", "--no-text")),
    (["cache-teachers", "--max-length=64", "--max-length", 32], ("--max-length 64", "--max-length 32")),
    (["train-student", "--steps", 3], ("--steps 2", "--steps 3")),  # the base command gives --steps 2
    (["train-student", "--seed", 1, "--seed", 1], ("--seed 1",)),
    (["train-student", "--lr", 1e-3, "--lr=2e-3"], ("--lr 0.001", "--lr 2e-3")),
    (["evaluate", "--mode", "mlm", "--mode", "bitext"], ("--mode mlm", "--mode bitext")),
    (["build-vocab", "--out", "{tmp}/a", "--out", "{tmp}/b"], ("--out {tmp}/a", "--out {tmp}/b")),
])
def test_a_single_valued_option_given_twice_is_refused(setup, tmp_path, args, names):
    """The real `xkd`: click keeps the last value of a repeated option; xkd refuses it, naming
    the option and both values, before anything is read (the rest of the command is sound)."""
    rest = {"cache-teachers": cache(setup)[1:] + ["--out", tmp_path / "out"],
            "train-student": train(setup)[1:] + ["--out", tmp_path / "out"],
            "evaluate": [setup["student"], "--caches", setup["cache"]],
            "build-vocab": ["--teachers", setup["teacher"]]}[args[0]]
    r = run_xkd(args[0], *rest, *[str(a).format(tmp=tmp_path) for a in args[1:]])
    assert r.returncode == 2, r.stdout + r.stderr
    assert_refused(r.stderr, "given twice", *[n.format(tmp=tmp_path) for n in names])
    assert not any((tmp_path / name).exists() for name in ("out", "a", "b"))


# hf: labels follow the labeled-file rule ------------------------------------------------


def csv(path: Path, labels) -> Path:
    words = ["the game was won", "a tasty soup", "they scored a goal", "fresh bread", "the team lost", "spicy curry"]
    return write(path, ["text,label", *(f"{w},{label}" for w, label in zip(words, labels))])


@pytest.mark.parametrize("labels, names", [
    (["1", "x", "1", "x", "1", "x"], ("mixes class ids (1) and class names (x)",)),
    (["sports", "0", "sports", "food", "0", "food"], ("mixes class ids (0) and class names (food, sports)",)),
    (["0", "1", "2.5", "0", "1", "0"], ("'2.5'", "not a class id")),
])
def test_hf_labels_are_refused_as_a_labeled_file_with_the_same_labels_is(setup, tmp_path, labels, names):
    """The same labels in a labeled: file and in an hf: CSV: both refused, the same way, by
    evaluate, finetune-teacher and cache-teachers (a CSV read by the datasets library)."""
    data = csv(tmp_path / "data.csv", labels)
    tsv = write(tmp_path / "data.tsv", [f"text {i}\t{label}" for i, label in enumerate(labels)])
    hf = f"hf:{data}@en?text=text&label=label"
    for spec in (hf, f"labeled:{tsv}@en"):
        r = invoke("evaluate", setup["teacher"], "--mode", "classify", "--train", spec, "--test", spec, "--epochs", 1,
                   "--max-length", 16, "--out", tmp_path / "eval")
        assert r.exit_code == 2, (spec, r.output)
        assert_refused(r.output, *names)
        r = invoke("finetune-teacher", "--base", setup["teacher"], "--data", spec, "--out", tmp_path / "teacher",
                   "--epochs", 1, "--max-length", 16)
        assert r.exit_code == 2, (spec, r.output)
        assert_refused(r.output, *names)
        r = invoke("cache-teachers", "--teacher", setup["classifier"], "--corpus", spec, "--scheduler", setup["scheduler"],
                   "--out", tmp_path / "caches")
        assert r.exit_code == 2, (spec, r.output)
        assert_refused(r.output, *names)
    assert not any((tmp_path / d).exists() for d in ("eval", "teacher", "caches"))



@pytest.mark.parametrize("command", ["train-student", "cache-teachers"])
@pytest.mark.parametrize("text, said", [
    ("seed: 1\nno_such_option: 1\n", "'no_such_option' is not an option of this command"),
    ("seed: ten\n", "seed: give a whole number, not 'ten'"),
    ("- a list\n", "holds a list, not a mapping"),
    ("seed: [1\n", "line 2: not YAML"),
    (None, "cannot read it"),
])
def test_a_config_file_that_cannot_be_replayed_is_one_paragraph_naming_it(tmp_path, command, text, said):
    config = tmp_path / "config.yaml"
    if text is not None:
        config.write_text(text)
    r = invoke(command, "--config", config, "--out", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert f"--config {config}" in assert_refused(r.output, said)
    assert not (tmp_path / "out").exists()
