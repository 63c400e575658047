"""Nothing wrong gets in, nothing silently goes on (issue #11, items 2-4), through the real CLI.

Every bad input below exits 2 with one paragraph naming the option, file or spec, prints no
traceback, starts no worker and leaves a cache made before byte for byte unchanged. The
classes: numeric options of cache-teachers; damaged teacher directories and labels outside
a classifier's classes; Ctrl-C; language codes; CRLF vocab files; build-vocab over an
existing vocab; a row's text beyond what the teacher saw; one way to read lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xkd import load_vocab, open_cache
from xkd.cli import app
from xkd.errors import BadInput
from xkd.lines import read_lines, split_lines
from xkd.pipeline import CacheTeachersOptions, cache_teachers

from conftest import AS_FROM_A_TERMINAL, PARALLEL, ROOT, VOCABS, build_tiny_bert, requires_iitb, sigint_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TATOEBA = PARALLEL / "tatoeba"
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().split("\n")[-1])


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root, .lock included (so no writer even opened a cache)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def lines_of(path: Path, n: int) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:n]


def write_lines(path: Path, lines: list[str], end: str = "\n") -> Path:
    path.write_bytes("".join(line + end for line in lines).encode("utf-8"))
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """16 English sentences: a small text corpus."""
    return write_lines(tmp_path_factory.mktemp("corpus") / "c.en", lines_of(TATOEBA / "tatoeba.hin-eng.eng", 16))


@pytest.fixture(scope="module")
def made(thread_client, tiny_teachers, corpus, tmp_path_factory):
    """A cache made before the bad runs, under the root every bad run writes to."""
    root = tmp_path_factory.mktemp("caches")
    r = invoke("cache-teachers", "--teacher", tiny_teachers["multi"], "--corpus", f"text:{corpus}@en", "--out", root,
               "--shard-size", 8, "--scheduler", thread_client.scheduler.address)
    assert r.exit_code == 0, r.output
    return root


def refused(made: Path, args, *needles: str):
    """Run cache-teachers (local scheduler, as typed) with `args`; it must refuse them."""
    before = snapshot(made)
    r = invoke("cache-teachers", "--out", made, *args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output, r.output
    for needle in needles:
        assert needle in r.output, r.output
    assert snapshot(made) == before  # nothing cached before changed, and no cache was added
    return r


# 2. Numeric options are checked before anything starts ---------------------------------------

@pytest.mark.parametrize("option, value", [
    ("--cpu-threads", "-3"), ("--token-budget", "0"), ("--workers", "0"), ("--workers", "-2"),
    ("--mask-prob", "nan"), ("--mask-prob", "inf"), ("--mask-prob", "1"), ("--mask-prob", "-0.1"),
    ("--shard-size", "0"), ("--max-length", "2"), ("--topk", "-1"), ("--mask-epochs", "0"), ("--seed", "-1"),
    ("--min-tokens", "-1"), ("--max-tokens", "-2"), ("--max-pairs", "-5"),
])
def test_a_bad_number_is_refused_naming_the_option_before_any_worker_starts(made, tiny_teachers, corpus, option, value):
    r = refused(made, ["--teacher", tiny_teachers["multi"], "--corpus", f"text:{corpus}@en", option, value],
                f"xkd cache-teachers: error: {option} ")
    assert len(r.stderr.strip().split("\n")) == 1  # one paragraph


@pytest.mark.parametrize("option, value", [("--mask-prob", "abc"), ("--token-budget", "abc"), ("--cpu-threads", "1.5")])
def test_text_for_a_number_is_refused_by_the_parser_naming_the_option(made, tiny_teachers, corpus, option, value):
    refused(made, ["--teacher", tiny_teachers["multi"], "--corpus", f"text:{corpus}@en", option, value], option)


def test_the_python_api_checks_the_same_values(tiny_teachers, corpus, tmp_path):
    base = dict(teachers=[str(tiny_teachers["multi"])], corpus=f"text:{corpus}@en", out=str(tmp_path))
    for field, value, option in (("token_budget", "abc", "--token-budget"), ("mask_prob", float("nan"), "--mask-prob"),
                                 ("cpu_threads", 0, "--cpu-threads"), ("shard_size", 2.5, "--shard-size")):
        with pytest.raises(BadInput, match=f"^{option} "):
            cache_teachers(CacheTeachersOptions(**base, **{field: value}))
    assert not any(tmp_path.iterdir())


# 3. Damaged teachers, labels outside a classifier's classes, Ctrl-C -------------------------------

def _truncate_json(d):
    (d / "config.json").write_text((d / "config.json").read_text()[:40])
    return "config.json is not valid JSON"


def _no_hidden_size(d):
    config = json.loads((d / "config.json").read_text())
    del config["hidden_size"]
    (d / "config.json").write_text(json.dumps(config))
    return "config.json has no usable 'hidden_size'"


def _truncate_weights(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    return "model.safetensors is truncated or damaged: its header implies"


def _empty_weights(d):
    (d / "model.safetensors").write_bytes(b"")
    return "model.safetensors is truncated or damaged: it has 0 bytes"


@pytest.mark.parametrize("damage", [_truncate_json, _no_hidden_size, _truncate_weights, _empty_weights])
def test_a_damaged_teacher_directory_is_one_paragraph_naming_the_file(made, tiny_teachers, corpus, tmp_path, damage):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teachers["multi"], teacher)
    what = damage(teacher)
    r = refused(made, ["--teacher", teacher, "--corpus", f"text:{corpus}@en"], f"{teacher}/{what.split(' ')[0]}", what,
                "save the model again")
    assert len(r.stderr.strip().split("\n")) == 1


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny 3-class classifier (classes LABEL_0..2), and a copy whose classes have names."""
    root = tmp_path_factory.mktemp("clf")
    plain = build_tiny_bert(root / "plain", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, kind="classifier",
                            num_labels=3)
    named = shutil.copytree(plain, root / "named")
    config = json.loads((named / "config.json").read_text())
    config["id2label"] = {"0": "food", "1": "sports", "2": "weather"}
    config["label2id"] = {"food": 0, "sports": 1, "weather": 2}
    (named / "config.json").write_text(json.dumps(config))
    return {"plain": plain, "named": named}


def test_labels_outside_the_classifier_teachers_classes_are_caught_when_caching(made, classifier, tmp_path):
    ids = write_lines(tmp_path / "ids.tsv", [f"sentence number {i}\t{i % 5}" for i in range(10)])
    refused(made, ["--teacher", classifier["plain"], "--corpus", f"labeled:{ids}@en"],
            f"--corpus 'labeled:{ids}@en'", "class ids up to 4", "with 3 classes")
    names = write_lines(tmp_path / "names.tsv", ["rice for dinner\tfood", "a long trip abroad\ttravel"])
    refused(made, ["--teacher", classifier["named"], "--corpus", f"labeled:{names}@en"],
            f"--corpus 'labeled:{names}@en'", "'travel'", "food, sports, weather")


def test_labels_within_the_classes_still_cache(thread_client, classifier, tmp_path):
    names = write_lines(tmp_path / "names.tsv", ["rice for dinner\tfood", "it rains today\tweather"])
    r = invoke("cache-teachers", "--teacher", classifier["named"], "--corpus", f"labeled:{names}@en", "--out", tmp_path,
               "--scheduler", thread_client.scheduler.address)
    assert r.exit_code == 0, r.output


@requires_iitb
def test_ctrl_c_prints_one_line_saying_what_was_kept_and_how_to_resume(thread_client, tiny_teachers, tmp_path):
    """A terminal's Ctrl-C: SIGINT to the whole process group, local dask workers included."""
    out = tmp_path / "out"
    iitb = PARALLEL / "iitb-en-hi"
    args = ["cache-teachers", "--teacher", str(tiny_teachers["multi"]), "--corpus",
            f"parallel:{iitb}/train.en@en,{iitb}/train.hi@hi", "--out", str(out), "--max-pairs", "600",
            "--shard-size", "4", "--workers", "1", "--cpu-threads", "1", "--dtype", "fp32"]
    proc = subprocess.Popen([*AS_FROM_A_TERMINAL, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:
            manifests = list(out.glob("*/manifest.json"))
            if manifests and json.loads(manifests[0].read_text() or "{}").get("shards"):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        state = sigint_state(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (state, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = stderr.strip().split("\n")
    assert [line for line in lines if "interrupted" in line] == lines[-1:], stderr
    kept = re.fullmatch(r"xkd cache-teachers: interrupted; kept (\d+) of 150 shards in (\S+)\. "
                        r"Run the same command again to resume\.", lines[-1])
    assert kept, lines[-1]
    root = Path(kept.group(2))
    assert len(json.loads((root / "manifest.json").read_text())["shards"]) == int(kept.group(1)) > 0
    verify = invoke("verify", root, "--json")
    assert last_json(verify)["problems"] == {}, verify.output
    local = args.index("--workers")  # the local cluster's option: refused with --scheduler (issue 20)
    resumed = invoke(*args[:local], *args[local + 2:], "--scheduler", thread_client.scheduler.address)  # resumed
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming, {kept.group(1)} of 150 shards already done" in resumed.stderr
    assert invoke("verify", root).exit_code == 0


# 4. Small holes -----------------------------------------------------------------------------

def test_language_codes_are_normalised_and_bad_ones_refused(made, thread_client, tiny_teachers, tmp_path):
    en = write_lines(tmp_path / "c.en", lines_of(TATOEBA / "tatoeba.cmn-eng.eng", 6))
    zh = write_lines(tmp_path / "c.zh", lines_of(TATOEBA / "tatoeba.cmn-eng.cmn", 6))
    common = ["--teacher", tiny_teachers["multi"], "--out", tmp_path / "caches", "--scheduler",
              thread_client.scheduler.address, "--json"]
    first = invoke("cache-teachers", "--corpus", f"parallel:{en}@EN,{zh}@zh_hant_tw", *common)
    assert first.exit_code == 0, first.output
    [info] = last_json(first)["caches"]
    cache = open_cache(info["path"])
    assert cache.manifest["corpus"]["langs"] == ["en", "zh-Hant-TW"]
    assert {r["lang"] for r in cache.iter_examples()} == {"en", "zh-Hant-TW"}
    again = invoke("cache-teachers", "--corpus", f"parallel:{en}@en,{zh}@ZH-Hant-tw", *common)
    assert again.exit_code == 0, again.output
    assert last_json(again)["caches"][0]["path"] == info["path"]  # one language, one cache
    assert last_json(again)["caches"][0]["shards_run"] == 0

    for spec in (f"text:{en}@../../x y", f"text:{en}@e n", f"tsv:{en}@en,12"):
        refused(made, ["--teacher", tiny_teachers["multi"], "--corpus", spec], f"--corpus {spec!r}",
                "is not a language code")


def tiny_vocab(path: Path, words: list[str]) -> Path:
    return write_lines(path, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])


def test_build_vocab_normalises_and_checks_lang_teacher(tmp_path):
    a = tiny_vocab(tmp_path / "a.vocab.txt", ["the", "cat", "##s"])
    r = invoke("build-vocab", "--teachers", a, "--out", tmp_path / "v", "--lang-teacher", f"EN={a}", "--json")
    assert r.exit_code == 0, r.output
    assert last_json(r)["routes"] == {"en": "a"} and load_vocab(tmp_path / "v").teacher_for("En") == "a"
    bad = invoke("build-vocab", "--teachers", a, "--out", tmp_path / "w", "--lang-teacher", f"x y={a}")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    assert "--lang-teacher 'x y=" in bad.output and "is not a language code" in bad.output
    assert not (tmp_path / "w").exists()


def test_a_crlf_vocab_file_reads_like_the_same_file_with_lf(tmp_path):
    lf, crlf = tmp_path / "lf" / "bert.vocab.txt", tmp_path / "crlf" / "bert.vocab.txt"
    for path, end in ((lf, "\n"), (crlf, "\r\n")):
        path.parent.mkdir()
        write_lines(path, read_lines(VOCABS / "bert-base-uncased.vocab.txt"), end)
    for path in (lf, crlf):
        r = invoke("build-vocab", "--teachers", path, "--out", path.parent / "vocab")
        assert r.exit_code == 0, r.output
    assert (lf.parent / "vocab" / "vocab.txt").read_bytes() == (crlf.parent / "vocab" / "vocab.txt").read_bytes()
    assert not any(t.endswith("\r") for t in load_vocab(crlf.parent / "vocab").tokens)


def test_build_vocab_keeps_an_identical_vocab_and_refuses_a_different_one(tmp_path):
    a = tiny_vocab(tmp_path / "a.vocab.txt", ["the", "cat", "##s"])
    b = tiny_vocab(tmp_path / "b.vocab.txt", ["le", "chat", "##s"])
    out = tmp_path / "v"
    assert invoke("build-vocab", "--teachers", a, "--out", out).exit_code == 0
    before = snapshot(out)
    other = invoke("build-vocab", "--teachers", b, "--out", out)
    assert other.exit_code == 2 and "Traceback" not in other.output
    assert f"--out {out} already holds a different vocab" in other.output and "--overwrite" in other.output
    assert snapshot(out) == before
    same = invoke("build-vocab", "--teachers", a, "--out", out, "--json")
    assert same.exit_code == 0 and last_json(same)["reused"] is True, same.output
    assert "already holds this vocab" in same.stderr and snapshot(out) == before
    replaced = invoke("build-vocab", "--teachers", b, "--out", out, "--overwrite", "--json")
    assert replaced.exit_code == 0 and last_json(replaced)["reused"] is False
    assert load_vocab(out).teacher_names == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.vocab.txt", "b.vocab.txt", "v"]  # no temp dirs left


def test_a_row_stores_the_text_its_teacher_saw_and_the_summary_counts_truncated_rows(thread_client, tiny_teachers, tmp_path):
    from transformers import AutoTokenizer

    huge = " ".join(["the cat sat on the mat"] * 40_000)  # about 1 MB
    en = write_lines(tmp_path / "c.en", ["A short sentence.", huge])
    hi = write_lines(tmp_path / "c.hi", lines_of(TATOEBA / "tatoeba.hin-eng.hin", 2))
    r = invoke("cache-teachers", "--teacher", tiny_teachers["multi"], "--corpus", f"parallel:{en}@en,{hi}@hi",
               "--out", tmp_path / "caches", "--max-length", 16, "--no-mask", "--scheduler",
               thread_client.scheduler.address, "--json")
    assert r.exit_code == 0, r.output
    [info] = last_json(r)["caches"]
    assert info["truncated_rows"] == 1 and "1 rows truncated to --max-length" in r.stdout
    rows = {(int(row["example_id"]), row["side"]): row for row in open_cache(info["path"]).iter_examples()}
    cut = rows[1, "src"]["text"]
    # 14 tokens between [CLS] and [SEP], each a whole word here: the first 14 words.
    assert cut == " ".join(huge.split(" ")[:14])
    assert rows[1, "tgt"]["pair_text"] == cut  # the pair's text is cut the same way
    tokenizer = AutoTokenizer.from_pretrained(tiny_teachers["multi"])
    assert tokenizer(cut)["input_ids"] == rows[1, "src"]["input_ids"].tolist()  # exactly what the teacher saw
    assert rows[0, "src"]["text"] == "A short sentence."
    assert rows[1, "tgt"]["text"] == lines_of(TATOEBA / "tatoeba.hin-eng.hin", 2)[1]


def test_every_reader_splits_lines_on_newline_only(tmp_path):
    from xkd.names import parse_corpus
    from xkd.pipeline.corpus import Cleaning, plan_corpus
    from xkd.vocab.teachers import read_vocab_txt

    tricky = ["one\u2028still one", "two\u0085still two", "three\x0cstill three", "four\rstill four"]
    raw = "\ufeff" + "".join(f"{line}\r\n" for line in tricky)
    assert split_lines(raw.removeprefix("\ufeff")) == tricky
    path = tmp_path / "c.txt"
    path.write_bytes(raw.encode("utf-8"))
    assert read_lines(path) == tricky
    plan = plan_corpus(parse_corpus(f"text:{path}@en"), Cleaning(), 10)
    assert [ex.texts[0] for shard in plan.shards for ex in shard.examples()] == [t.strip() for t in tricky]
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes("".join(f"{t}\r\n" for t in ["[PAD]", "[UNK]", "a\u2028b"]).encode("utf-8"))
    assert read_vocab_txt(vocab) == ["[PAD]", "[UNK]", "a\u2028b"]
