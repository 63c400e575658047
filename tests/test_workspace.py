"""The workspace (xkd/workspace.py): the three commands of docs/design.md
("Command-line contract") work as typed, defaults are taken only when there is one candidate,
and `xkd ls` shows what is there.

The hub is unreachable here, so, as the issue allows, the corpus is given locally through
XKD_OPUS_EN_HI and the teacher aliases are replaced by local teacher directories named like
them (tiny random-weight BERTs with the real bert-base-uncased, mBERT and bert-base-cased
vocabularies; the last stands in for MuRIL, whose vocabulary is not available offline).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xkd.cli import app
from xkd.workspace import Workspace, spread_multi_value_options

from conftest import PARALLEL, VOCABS, build_tiny_bert, cache_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

XKD = [sys.executable, "-m", "xkd.cli"]


def first_lines(path: Path, n: int) -> str:
    return "\n".join(path.read_text(encoding="utf-8").split("\n")[:n]) + "\n"


def run(args, cwd, env) -> subprocess.CompletedProcess:
    return subprocess.run([*XKD, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def cli(args, cwd):
    """The CLI in this process, with the argument spreading main() applies."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(app, spread_multi_value_options([str(a) for a in args]))
    finally:
        os.chdir(old)


def error_paragraph(result) -> str:
    """The one error paragraph of a refused command (progress lines above it are fine)."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.split("\n") if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    """A fresh directory where the three commands were run as typed (local teachers and corpus)."""
    home = tmp_path_factory.mktemp("fresh")
    teachers = home / "teachers"
    build_tiny_bert(teachers / "bert-base", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=1)
    build_tiny_bert(teachers / "mbert", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False, seed=2)
    build_tiny_bert(teachers / "muril", VOCABS / "bert-base-cased.vocab.txt", lowercase=False, seed=3)
    (home / "opus.en").write_text(first_lines(PARALLEL / "tatoeba" / "tatoeba.hin-eng.eng", 48), encoding="utf-8")
    (home / "opus.hi").write_text(first_lines(PARALLEL / "tatoeba" / "tatoeba.hin-eng.hin", 48), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("XKD_HOME",)}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", XKD_OPUS_EN_HI="opus.en,opus.hi")
    results = {
        "cache": run(["cache-teachers", "--teacher", "teachers/bert-base", "--corpus", "opus-en-hi", "--workers", "1"],
                     home, env),
        "vocab": run(["build-vocab", "--teachers", "teachers/mbert", "teachers/muril"], home, env),
        # --steps and the student's size only keep the test short; caches, vocab and out are the defaults
        "train": run(["train-student", "--method", "mergedistill", "--steps", "2", "--batch-size", "8", "--hidden", "32",
                      "--layers", "1", "--heads", "2"], home, env),
        # --vocab defaults to the one the student's summary names; the result is recorded beside it
        "evaluate": run(["evaluate", "xkd-runs/students/mergedistill-001", "--mode", "bitext", "--src", "opus.en@en",
                         "--tgt", "opus.hi@hi", "--json"], home, env),
        "ls": run(["ls", "--json"], home, env),
    }
    for name, r in results.items():
        assert r.returncode == 0, f"{name}: {r.stdout}\n{r.stderr}"
    return home, env, results


def test_the_three_commands_work_as_typed_in_a_fresh_directory(typed):
    home, _, results = typed
    ws = home / "xkd-runs"
    caches = sorted((ws / "caches").iterdir())
    assert [c.name.split("-")[0] for c in caches] == ["bert"] and (caches[0] / "manifest.json").is_file()
    assert (ws / "vocabs" / "mbert+muril" / "xkd-vocab.json").is_file()
    student = ws / "students" / "mergedistill-001"
    summary = json.loads((student / "train_summary.json").read_text())
    assert summary["caches"] == [str(Path("xkd-runs/caches") / caches[0].name)]
    # mbert+muril does not cover the cache's teacher, so train-student built the vocab of the
    # caches' teachers, and said so
    assert Path(summary["vocab"]) == (ws / "vocabs" / "bert-base").resolve()
    assert "building xkd-runs/vocabs/bert-base" in results["train"].stderr
    assert "--out (workspace): xkd-runs/students/mergedistill-001" in results["train"].stderr
    assert (student / "config.json").is_file()


def test_ls_lists_caches_vocabs_and_students(typed):
    home, _, results = typed
    listing = json.loads(results["ls"].stdout.strip().split("\n")[-1])
    assert listing["workspace"] == "xkd-runs"
    [cache] = listing["caches"]
    manifest = json.loads((Path(home / cache["path"]) / "manifest.json").read_text())
    assert cache["rows"] == manifest["totals"]["rows"] == 96  # 48 pairs, both sides
    assert cache["complete"] is True and cache["outputs"] == ["top-8"] and cache["languages"] == ["en", "hi"]
    assert cache["bytes"] == sum(f.stat().st_size for f in Path(home / cache["path"]).rglob("*") if f.is_file())
    assert {tuple(v["teachers"]) for v in listing["vocabs"]} == {("teachers/mbert", "teachers/muril"),
                                                                 (str((home / "teachers" / "bert-base").resolve()),)}
    [student] = listing["students"]
    assert student["method"] == "mergedistill" and student["steps"] == 2 and student["status"] == "finished"
    summary = json.loads((home / student["path"] / "train_summary.json").read_text())
    assert student["final"] == summary["final"] and set(student["final"]) >= {"loss", "kd", "mlm"}
    evaluated = json.loads(results["evaluate"].stdout.strip().split("\n")[-1])
    [(key, recorded)] = student["evaluation"].items()
    assert key.startswith("bitext:") and recorded["accuracy_en_to_hi"] == evaluated["accuracy_en_to_hi"]
    text = cli(["ls"], home)
    assert text.exit_code == 0 and "mergedistill-001: mergedistill on bert-base-" in text.output
    assert "96 rows, top-8" in text.output and "complete" in text.output
    assert f"{key}: accuracy_en_to_hi {evaluated['accuracy_en_to_hi']:.4g}" in text.output


def test_a_second_run_is_numbered_and_explicit_paths_still_rule(typed, tmp_path):
    home, _, _ = typed
    work = tmp_path / "copy"
    shutil.copytree(home, work, symlinks=True)
    tiny = ["--steps", "1", "--batch-size", "4", "--hidden", "32", "--layers", "1", "--heads", "2"]
    r = cli(["train-student", "--method", "mlm", *tiny], work)
    assert r.exit_code == 0, r.output
    assert (work / "xkd-runs" / "students" / "mlm-001" / "train_summary.json").is_file()
    r = cli(["train-student", "--method", "mlm", *tiny], work)
    assert r.exit_code == 0 and (work / "xkd-runs" / "students" / "mlm-002").is_dir()
    cache = next((work / "xkd-runs" / "caches").iterdir())
    r = cli(["train-student", "--method", "mlm", "--caches", cache, "--vocab", work / "xkd-runs" / "vocabs" / "bert-base",
             "--out", work / "elsewhere", *tiny], work)
    assert r.exit_code == 0, r.output
    assert (work / "elsewhere" / "train_summary.json").is_file() and not (work / "xkd-runs" / "students" / "mlm-003").exists()


def test_ambiguous_defaults_are_one_paragraph_listing_the_candidates(typed, tmp_path, thread_client):
    home, _, _ = typed
    work = tmp_path / "copy"
    shutil.copytree(home, work, symlinks=True)
    ws = work / "xkd-runs"
    tiny = ["--steps", "1", "--batch-size", "4", "--hidden", "32", "--layers", "1", "--heads", "2"]
    # two vocabs cover the cache's teacher
    r = cli(["build-vocab", "--teachers", work / "teachers" / "bert-base", work / "teachers" / "mbert"], work)
    assert r.exit_code == 0, r.output
    assert (ws / "vocabs" / "bert-base+mbert").is_dir()
    message = error_paragraph(cli(["train-student", "--method", "mlm", *tiny], work))
    assert "--vocab DIR" in message and "vocabs/bert-base+mbert" in message and "vocabs/bert-base," in message
    shutil.rmtree(ws / "vocabs" / "bert-base+mbert")
    # caches of two corpora
    (work / "other.en").write_text(first_lines(PARALLEL / "tatoeba" / "tatoeba.deu-eng.eng", 12), encoding="utf-8")
    cache_teacher(thread_client, ws / "caches", work / "teachers" / "bert-base", f"text:{work / 'other.en'}@en")
    message = error_paragraph(cli(["train-student", "--method", "mlm", *tiny], work))
    assert "2 corpora" in message and "--caches DIR [DIR ...]" in message
    assert "opus-en-hi" in message and "other.en" in message
    # several after one --caches, and a quoted glob, pick both
    r = cli(["train-student", "--method", "mlm", "--caches", *sorted((ws / "caches").iterdir()), *tiny], work)
    assert r.exit_code == 0, r.output
    r = cli(["train-student", "--method", "mlm", "--caches", str(ws / "caches" / "bert-base-*"), *tiny], work)
    assert r.exit_code == 0, r.output
    summary = json.loads((ws / "students" / "mlm-002" / "train_summary.json").read_text())
    assert sorted(summary["caches"]) == sorted(str(p) for p in (ws / "caches").iterdir())
    assert "matches no file" in error_paragraph(
        cli(["train-student", "--method", "mlm", "--caches", str(ws / "caches" / "nothing-*"), *tiny], work))


def test_one_teacher_per_language_each_over_its_own_corpus_is_one_training_set(typed, tmp_path, thread_client):
    """MergeDistill's own setup, typed with every default: an English teacher cached over an
    English corpus, a Hindi one over a Hindi corpus. Their corpora cover different languages,
    so train-student takes both caches; only a second corpus of a language one teacher already
    has is a choice it asks for."""
    home, _, _ = typed
    teachers = home / "teachers"
    work = tmp_path / "merge"
    work.mkdir()
    tatoeba = PARALLEL / "tatoeba"
    (work / "wiki.en").write_text(first_lines(tatoeba / "tatoeba.hin-eng.eng", 16), encoding="utf-8")
    (work / "wiki.hi").write_text(first_lines(tatoeba / "tatoeba.hin-eng.hin", 16), encoding="utf-8")
    # --scheduler: the test's in-process dask worker, not a worker process per command (~20 s each)
    scheduler = ["--scheduler", thread_client.scheduler.address]
    for teacher, corpus in (("bert-base", "text:wiki.en@en"), ("muril", "text:wiki.hi@hi")):
        r = cli(["cache-teachers", "--teacher", teachers / teacher, "--corpus", corpus, *scheduler], work)
        assert r.exit_code == 0, r.output
    r = cli(["build-vocab", "--teachers", teachers / "bert-base", teachers / "muril"], work)
    assert r.exit_code == 0, r.output
    tiny = ["--steps", "2", "--batch-size", "8", "--hidden", "32", "--layers", "1", "--heads", "2"]
    r = cli(["train-student", "--method", "mergedistill", *tiny], work)
    assert r.exit_code == 0, r.output
    ws = work / "xkd-runs"
    summary = json.loads((ws / "students" / "mergedistill-001" / "train_summary.json").read_text())
    caches = sorted((ws / "caches").iterdir())
    assert len(caches) == 2 and sorted((work / c).resolve() for c in summary["caches"]) == [c.resolve() for c in caches]
    assert set(summary["languages"]) == {"en", "hi"}
    assert Path(summary["vocab"]).resolve() == (ws / "vocabs" / "bert-base+muril").resolve()
    # the Hindi teacher over a second Hindi corpus: which Hindi rows to learn from is the user's choice
    (work / "news.hi").write_text(first_lines(tatoeba / "tatoeba.hin-eng.hin", 28).split("\n", 16)[16], encoding="utf-8")
    r = cli(["cache-teachers", "--teacher", teachers / "muril", "--corpus", "text:news.hi@hi", *scheduler], work)
    assert r.exit_code == 0, r.output
    message = error_paragraph(cli(["train-student", "--method", "mergedistill", *tiny], work))
    assert f"teacher {teachers / 'muril'}, language hi: 2 corpora" in message and "--caches DIR [DIR ...]" in message
    assert "wiki.hi@hi" in message and "news.hi@hi" in message and "wiki.en@en" not in message
    assert not (ws / "students" / "mergedistill-002").exists()


def test_a_method_the_caches_cannot_serve_names_why(typed, tmp_path):
    home, _, _ = typed
    message = error_paragraph(cli(["train-student", "--method", "xd", "--steps", "1"], home))
    assert "no cache in xkd-runs/caches suits --method xd" in message
    assert "xkd methods xd" in message
    assert "--resume continues a run: give its directory with --out" in error_paragraph(
        cli(["train-student", "--method", "mlm", "--resume"], home))
    empty = tmp_path / "empty"
    empty.mkdir()
    message = error_paragraph(cli(["train-student", "--method", "mlm"], empty))
    assert "holds no cache" in message and "xkd cache-teachers" in message
    assert "not a known method" in error_paragraph(cli(["train-student", "--method", "nosuch"], empty))
    assert "not an option of --method mlm" in error_paragraph(cli(["train-student", "--method", "mlm", "-o", "x=1"], empty))


def test_the_workspace_root_is_the_option_then_xkd_home_then_xkd_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("XKD_HOME", raising=False)
    assert Workspace.find().root == Path("xkd-runs")
    monkeypatch.setenv("XKD_HOME", str(tmp_path / "home"))
    assert Workspace.find().root == tmp_path / "home"
    assert Workspace.find(tmp_path / "opt").root == tmp_path / "opt"
    (tmp_path / "file").write_text("x")
    from xkd.errors import BadInput

    with pytest.raises(BadInput, match="is a file"):
        Workspace.find(tmp_path / "file")


def test_several_values_after_one_flag_become_repeated_flags():
    assert spread_multi_value_options(["train-student", "--caches", "a", "b", "c", "--steps", "3"]) == [
        "train-student", "--caches", "a", "--caches", "b", "--caches", "c", "--steps", "3"]
    assert spread_multi_value_options(["evaluate", "M", "--caches", "a", "--caches", "b"]) == [
        "evaluate", "M", "--caches", "a", "--caches", "b"]
    assert spread_multi_value_options(["x", "--caches", "a", "--", "b"]) == ["x", "--caches", "a", "--", "b"]
