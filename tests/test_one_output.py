"""Issue #20, "one run, one output": two runs never share what they write, and nothing on disk
claims more than is there.

Concurrency is tested as a user meets it: two real `python -m xkd.cli` processes at once. To
make "the first run is still writing" certain rather than a matter of timing, the first run
is paused (SIGSTOP, as Ctrl-Z does) once a marker shows it holds its output (its lock file
naming its pid, its first metrics line or checkpoint), the second run is started and must be
refused naming that pid, and the first is then continued (SIGCONT) and must finish whole.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_reliability_training import assert_one_paragraph, env, make_en_hi_setup, train_args, tree_sha, xkd_cmd
from typer.testing import CliRunner

from xkd.cli import app
from xkd.storage.untrusted import refuse_out_inside_other_output
from xkd.vocab import build_vocab, load_vocab

from conftest import VOCABS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 10


@pytest.fixture(scope="module")
def setup(thread_client, tmp_path_factory):
    """An English and a Hindi cache and their union vocab, as in test_reliability_training.py."""
    return make_en_hi_setup(thread_client, tmp_path_factory.mktemp("one-output"))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def start(args) -> subprocess.Popen:
    return subprocess.Popen(xkd_cmd(args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180, every: float = 0.001):
    """Poll until `condition()` holds; fail (with the process's stderr) if it ends first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().split("\n") if line] if path.exists() else []


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def with_seed(args: list, seed: int) -> list:
    args = list(args)
    args[args.index("--seed") + 1] = seed
    return args


def assert_whole_student(out: Path, steps: int) -> None:
    s = summary(out)
    assert s["partial"] is False and s["steps"] == steps, s
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert metrics_steps(out) == list(range(1, steps + 1))


# 1. Two train-student runs into one --out ---------------------------------------------


def test_two_runs_started_at_once_into_one_out_one_is_refused_naming_the_other(setup, tmp_path):
    """Different seeds, started at the same instant into an empty --out: both used to pass the
    emptiness check and exit 0, the later one's student silently replacing the other's."""
    out = tmp_path / "shared"
    runs = [start(with_seed(train_args(setup, out, "--json", steps=30), seed)) for seed in (3, 4)]
    results = [finish(p) for p in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], [(c, e[-2000:]) for c, _, e in results]
    (winner, won), (loser, lost) = sorted(zip(runs, results), key=lambda pair: pair[1][0])
    assert_one_paragraph(lost[2], f"--out {out}", f"pid {winner.pid}", "another train-student run")
    assert_whole_student(out, 30)
    # What is in --out is the winner's run, whole: its final weights.
    assert summary(out)["weights_sha256"] == json.loads(won[1].strip().split("\n")[-1])["weights_sha256"]
    assert not (out / ".lock").exists()


def test_a_second_run_while_the_first_trains_is_refused_and_the_first_finishes_whole(setup, tmp_path):
    """--overwrite while the other trains used to remove its checkpoints and metrics under it;
    --resume while the original ran trained a second copy from its checkpoint; another seed
    into the same --out (once the first has written) says 'not empty' rather than who holds it.
    All three are tried, one after another, while one first run is held after its first
    checkpoint."""
    out = tmp_path / "busy"
    first = start(train_args(setup, out, "--save-every", 1, steps=STEPS))
    wait_for(lambda: any((out / "checkpoints").glob("step-*")), first, "the first checkpoint")
    first.send_signal(signal.SIGSTOP)
    try:
        before = tree_sha(out)
        for second, extra in (("--overwrite", ["--save-every", 1, "--overwrite"]),
                              ("--resume", ["--save-every", 1, "--resume"]), ("--seed", ["--save-every", 1])):
            args = with_seed(train_args(setup, out, *extra, steps=STEPS), 4 if second == "--seed" else 3)
            r = subprocess.run(xkd_cmd(args), env=env(), capture_output=True, text=True, timeout=300)
            assert r.returncode == 1, (second, r.stderr[-3000:])
            assert_one_paragraph(r.stderr, f"--out {out}", f"pid {first.pid}")
            assert tree_sha(out) == before, second  # the refused run touched nothing
    finally:
        first.send_signal(signal.SIGCONT)
    code, _, err = finish(first)
    assert code == 0, err[-3000:]
    assert_whole_student(out, STEPS)


def test_two_default_out_runs_at_once_get_two_numbers(setup, tmp_path):
    """The default --out is students/<method>-NNN. The first run is paused the moment it says
    which number it took, and the second runs meanwhile: both used to take the same number
    (its directory was made only when training began), and one student replaced the other."""
    ws = tmp_path / "ws"
    (ws / "students").mkdir(parents=True)
    (ws / "students" / "mergedistill-001").mkdir()  # an earlier run's
    c = setup["caches"]
    args = ["train-student", "--method", "mergedistill", "--caches", c["en"], "--caches", c["hi"], "--vocab",
            setup["vocab"], "--workspace", ws, "--steps", 4, "--batch-size", 6, "--hidden", 32, "--layers", 2,
            "--heads", 2, "--log-every", 1]
    first = start(args)
    said = next((line for line in first.stderr if "--out (workspace)" in line), None)
    assert said is not None, f"exit {first.wait()}"
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(xkd_cmd(args), env=env(), capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    code, _, err = finish(first)
    assert code == 0 and second.returncode == 0, (err[-2000:], second.stderr[-2000:])
    assert said.strip().endswith(str(ws / "students" / "mergedistill-002")), said
    assert second.stdout.strip().endswith(f"student: {ws / 'students' / 'mergedistill-003'}"), second.stdout
    for n in (2, 3):
        assert_whole_student(ws / "students" / f"mergedistill-00{n}", 4)
    # A default-out run refused before it writes leaves no empty numbered directory behind.
    r = invoke(*args, "--lr", "nan")
    assert r.exit_code == 2, r.output
    assert sorted(p.name for p in (ws / "students").iterdir()) == [f"mergedistill-00{i}" for i in (1, 2, 3)]


# 2. A run killed before its first checkpoint --------------------------------------------


def killed_before_first_checkpoint(setup, out: Path) -> None:
    run = start(train_args(setup, out, steps=200))
    wait_for(lambda: metrics_steps(out)[:1] == [1], run, "the first metrics line")
    run.kill()
    run.wait()
    assert not any((out / "checkpoints").glob("step-*"))


@pytest.mark.parametrize("how", ["--resume", "restart"])
def test_an_out_killed_before_its_first_checkpoint_starts_again_from_step_0(setup, tmp_path, how):
    """--resume said "start without --resume", and starting without it said "give --resume"."""
    out = tmp_path / "early"
    killed_before_first_checkpoint(setup, out)
    r = invoke(*train_args(setup, out, *(["--resume"] if how == "--resume" else []), steps=STEPS))
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output and "from step 0" in r.output and str(out) in r.output
    assert_whole_student(out, STEPS)


def test_resume_without_a_checkpoint_next_to_other_files_names_overwrite(setup, tmp_path):
    out = tmp_path / "other"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = tree_sha(out)
    r = invoke(*train_args(setup, out, "--resume", steps=STEPS))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, "--resume", str(out), "--overwrite", "notes.txt")
    assert tree_sha(out) == before


# 3. The summary never claims more than is on disk ---------------------------------------


def test_a_full_disk_at_the_final_save_leaves_a_partial_summary_and_resume_finishes(setup, tmp_path):
    """The file-size limit (RLIMIT_FSIZE, as in test_reliability_training.py) is lowered the
    instant the final save begins (its temporary directory appears), after the last checkpoint
    and its summary were written: that summary said partial: false, with no model.safetensors."""
    out = tmp_path / "full"
    run = start(train_args(setup, out, steps=STEPS))
    wait_for(lambda: (out / ".student.tmp").is_dir(), run, "the final save")
    limit = 256 << 10  # under the weights and the tokenizer, over the summary
    resource.prlimit(run.pid, resource.RLIMIT_FSIZE, (limit, limit))
    code, _, err = finish(run)
    assert code == 1, err[-3000:]
    assert_one_paragraph(err, str(out), "File too large")
    assert not (out / "model.safetensors").exists()
    s = summary(out)
    assert s["partial"] is True and s["steps"] == STEPS and (out / s["checkpoint"]).is_dir(), s
    r = invoke(*train_args(setup, out, "--resume", steps=STEPS))
    assert r.exit_code == 0, r.output
    assert_whole_student(out, STEPS)


# 4. A damaged vocab is refused before step 1 --------------------------------------------


def damage_map(vocab: Path):
    file = next((vocab / "maps").iterdir())
    file.write_bytes(file.read_bytes()[:-100])
    return file


def damage_teacher_tokenizer(vocab: Path):
    tokenizer = next((vocab / "teachers").iterdir())
    for file in tokenizer.iterdir():
        file.unlink()
    return tokenizer


def damage_union_tokenizer(vocab: Path):
    file = vocab / "tokenizer.json"
    file.write_text(file.read_text()[:1000])
    return file


def swap_two_tokens(vocab: Path):
    file = vocab / "vocab.txt"
    lines = file.read_text().split("\n")
    lines[2000], lines[2001] = lines[2001], lines[2000]
    file.write_text("\n".join(lines))
    return file


def map_out_of_range(vocab: Path):
    file = next((vocab / "maps").iterdir())
    table = np.load(file)
    table[5] = 10**8
    np.save(file, table, allow_pickle=False)
    return file


def meta_without_default(vocab: Path):
    file = vocab / "xkd-vocab.json"
    meta = json.loads(file.read_text())
    del meta["default_teacher"]
    file.write_text(json.dumps(meta))
    return file


def delete_one_tokenizer_file(vocab: Path):
    """tokenizer_config.json left alone still loads (as another tokenizer): only the recorded sha256 tells."""
    file = next((vocab / "teachers").iterdir()) / "tokenizer.json"
    file.unlink()
    return file


def add_a_file(vocab: Path):
    file = next((vocab / "teachers").iterdir()) / "added_tokens.json"
    file.write_text('{"zzz": 5}')
    return file


def edit_a_tokenizer_config(vocab: Path):
    file = next((vocab / "teachers").iterdir()) / "tokenizer_config.json"
    file.write_text(file.read_text().replace('"do_lower_case": true', '"do_lower_case": false'))
    return file


@pytest.mark.parametrize("damage", [damage_map, damage_teacher_tokenizer, damage_union_tokenizer, swap_two_tokens,
                                    map_out_of_range, meta_without_default, delete_one_tokenizer_file, add_a_file,
                                    edit_a_tokenizer_config])
def test_a_damaged_vocab_is_refused_before_step_1(setup, tmp_path, damage):
    vocab = tmp_path / "vocab"
    shutil.copytree(setup["vocab"], vocab)
    file = damage(vocab)
    out = tmp_path / "student"
    r = invoke(*train_args(setup, out, vocab=vocab, steps=STEPS))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, str(file))
    assert not out.exists()  # not one step trained, and no directory left behind


# 5. build-vocab: one build per vocab, replaced in one step --------------------------------


def vocab_args(setup, out: Path, *teachers) -> list:
    return ["build-vocab", "--teachers", *teachers, "--out", out, "--overwrite"]


def test_two_build_vocab_overwrites_at_once_the_second_is_refused(setup, tmp_path):
    out = tmp_path / "vocab"
    shutil.copytree(setup["vocab"], out)
    old = tree_sha(out)
    lock = tmp_path / ".vocab.lock"
    first = start(vocab_args(setup, out, setup["teachers"]["en"], VOCABS / "bert-base-cased.vocab.txt"))
    wait_for(lambda: lock.exists() and f"pid {first.pid} " in lock.read_text(), first, "the vocab's lock")
    first.send_signal(signal.SIGSTOP)
    try:
        r = subprocess.run(xkd_cmd(vocab_args(setup, out, setup["teachers"]["multi"])), env=env(), capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 1, r.stderr[-3000:]
        assert_one_paragraph(r.stderr, str(out), f"pid {first.pid}")
        assert tree_sha(out) == old
    finally:
        first.send_signal(signal.SIGCONT)
    code, _, err = finish(first)
    assert code == 0, err[-3000:]
    load_vocab(out).check_whole()
    assert load_vocab(out).teachers[1]["name"].endswith("bert-base-cased.vocab.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab"]  # no lock, no temporary directory left


def test_build_vocab_killed_while_replacing_leaves_the_old_or_the_new_vocab_whole(setup, tmp_path):
    """The old vocab used to be deleted in place before the new one was renamed in: killed
    meanwhile, half a vocab. Many files in the old vocab make its deletion last long enough
    to kill the build during it; the kill comes when the first of them is gone."""
    out = tmp_path / "vocab"
    shutil.copytree(setup["vocab"], out)
    (out / "extra").mkdir()
    for i in range(4000):
        (out / "extra" / f"{i}.txt").write_text("x")
    old = tree_sha(out)
    new_teachers = [setup["teachers"]["en"], VOCABS / "bert-base-cased.vocab.txt"]
    build_vocab([str(t) for t in new_teachers], tmp_path / "reference")
    new = tree_sha(tmp_path / "reference")
    shutil.rmtree(tmp_path / "reference")

    def extra_left() -> int:
        return sum(len(os.listdir(d / "extra")) for d in tmp_path.iterdir() if (d / "extra").is_dir())

    run = start(vocab_args(setup, out, *new_teachers))
    wait_for(lambda: extra_left() < 4000, run, "the old vocab's deletion", every=0)
    run.kill()
    run.wait()
    assert tree_sha(out) in (old, new)
    assert tree_sha(out) == new  # the swap comes before the old one's deletion
    # The next build removes what the killed one left (its pid is gone), and keeps the vocab.
    r = subprocess.run(xkd_cmd(vocab_args(setup, out, *new_teachers)), env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_sha(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vocab"]


def test_a_live_builds_temporary_directory_is_not_removed(setup, tmp_path):
    """Stale temporary directories are removed only when their pid is gone."""
    out = tmp_path / "vocab"
    live = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / f".vocab.tmp-{live.pid}").mkdir()
        build_vocab([str(setup["teachers"]["en"])], out)
        assert (tmp_path / f".vocab.tmp-{live.pid}").is_dir()
    finally:
        live.kill()
        live.wait()


# 6. remap --out where the copy would mix with its inputs -----------------------------------


def test_remap_out_inside_the_vocab_or_a_cache_is_refused(setup, tmp_path):
    cache, vocab = Path(setup["caches"]["en"]), Path(setup["vocab"])
    before = {cache: tree_sha(cache), vocab: tree_sha(vocab)}
    for out in (vocab / "copy", vocab, cache / "copy", cache / "shards" / "copy", cache.parent,
                Path(setup["caches"]["hi"]) / "copy"):
        r = invoke("remap", cache, "--vocab", vocab, "--out", out)
        assert r.exit_code == 2, (out, r.output)
        assert_one_paragraph(r.output, f"--out {out}")
    assert {cache: tree_sha(cache), vocab: tree_sha(vocab)} == before
    assert not (cache.parent / "manifest.json").exists() and not (vocab / "copy").exists()


# 7. train-student --out never is, holds or lies inside an input ----------------------------


def test_out_that_is_inside_or_holds_an_input_is_refused_even_with_overwrite(setup, tmp_path):
    init = tmp_path / "holder" / "init"
    shutil.copytree(setup["teachers"]["en"], init)
    caches, vocab = [Path(c) for c in setup["caches"].values()], Path(setup["vocab"])
    before = {p: tree_sha(p) for p in (init, vocab, *caches)}
    cases = {init: "--init-from", init / "s": "--init-from", init.parent: "--init-from",
             caches[0].parent: "--caches", vocab.parent: "--caches", tmp_path / "v" / "..": "--init-from"}
    for out, option in cases.items():
        r = invoke("train-student", "--method", "mergedistill", "--caches", caches[0], "--caches", caches[1],
                   "--vocab", vocab, "--init-from", init, "--out", out, "--steps", 2, "--batch-size", 4, "--overwrite")
        assert r.exit_code == 2, (out, r.output)
        assert_one_paragraph(r.output, f"--out {out}", option)
    assert {p: tree_sha(p) for p in before} == before
    shutil.copytree(vocab, tmp_path / "vocab-holder" / "vocab")
    r = invoke(*train_args(setup, tmp_path / "vocab-holder", vocab=tmp_path / "vocab-holder" / "vocab", steps=2))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, "holds the vocab", "--vocab")


def test_remap_out_into_a_directory_that_is_not_a_cache_is_refused(setup, tmp_path):
    cache, vocab = Path(setup["caches"]["en"]), Path(setup["vocab"])
    student = tmp_path / "student"
    student.mkdir()
    (student / "xkd_student.json").write_text("{}")
    teacher = tmp_path / "teacher"
    shutil.copytree(setup["teachers"]["en"], teacher)
    for out in (student, teacher):
        before = tree_sha(out)
        r = invoke("remap", cache, "--vocab", vocab, "--out", out)
        assert r.exit_code == 2, (out, r.output)
        assert_one_paragraph(r.output, f"--out {out}", "not a cache")
        assert tree_sha(out) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert invoke("remap", cache, "--vocab", vocab, "--out", empty).exit_code == 0
    assert invoke("remap", cache, "--vocab", vocab, "--out", empty).exit_code == 0  # a remap resumed or kept


def test_cache_teachers_out_in_another_output_is_refused_and_build_vocab_never_deletes_a_cache(setup, tmp_path):
    vocab = tmp_path / "vocab"
    shutil.copytree(setup["vocab"], vocab)
    student = tmp_path / "student"
    (student / "checkpoints").mkdir(parents=True)
    (student / "train_summary.json").write_text("{}")  # what a run writes with its first checkpoint
    teacher = setup["teachers"]["en"]
    for out in (vocab, vocab / "caches", student / "caches", Path(teacher) / "caches"):
        r = invoke("cache-teachers", "--teacher", teacher, "--corpus", "sample", "--out", out, "--max-pairs", 4)
        assert r.exit_code == 2, (out, r.output)
        assert_one_paragraph(r.output, f"--out {out}")
        assert out == vocab or not out.exists()  # nothing written
    # A project folder with a bare config.json or checkpoints/ (no weights beside it) marks no model or run.
    project = tmp_path / "project"
    (project / "checkpoints").mkdir(parents=True)
    (project / "config.json").write_text("{}")
    refuse_out_inside_other_output(project / "caches", "--out")
    # A cache that got into a vocab anyway (copied there) is never deleted by a rebuild.
    shutil.copytree(setup["caches"]["en"], vocab / "caches" / "en")
    before = tree_sha(vocab)
    r = invoke(*vocab_args(setup, vocab, setup["teachers"]["en"]))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, f"--out {vocab}", "manifest.json")
    assert tree_sha(vocab) == before
