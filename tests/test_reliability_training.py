"""Issue #11 for train-student and evaluate: nothing wrong gets in, nothing silently goes on.

Every bad input is one paragraph naming the option or file, exit 2, no traceback, and what
was trained before is unchanged (its files' sha256). A run that goes wrong (a non-finite
loss, a full disk) exits 1 and keeps its last good checkpoint. A run killed at any instant
(SIGKILL, a real subprocess, with and without DataLoader workers) resumes to the same bytes
as an uninterrupted run, and --resume refuses a checkpoint made under other options.

Caches are made by the real pipeline from tiny random-weight teachers with the real vocab
files (bert-base-uncased for English, mBERT for Hindi), as in test_train_student.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from xkd.cli import app
from xkd.vocab import build_vocab

from conftest import PARALLEL, ROOT, TATOEBA, VOCABS, build_tiny_bert, cache_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 10


def make_en_hi_setup(client, root: Path) -> dict:
    """An English cache from an uncased teacher and a Hindi one from an mBERT-vocabulary
    teacher (top-8), and their union vocab."""
    en = build_tiny_bert(root / "en-teacher", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=11)
    multi = build_tiny_bert(root / "hi-teacher", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False,
                            seed=12)
    caches = {
        "en": cache_teacher(client, root / "caches", en, TATOEBA, sides="src", max_pairs=32, topk=8, shard_size=16),
        "hi": cache_teacher(client, root / "caches", multi, TATOEBA, sides="tgt", max_pairs=16, topk=8, shard_size=16),
    }
    build_vocab([str(en), str(multi)], root / "vocab", lang_teacher={"en": str(en), "hi": str(multi)})
    return {"caches": caches, "vocab": str(root / "vocab"), "root": root, "teachers": {"en": en, "multi": multi}}


@pytest.fixture(scope="module")
def setup(thread_client, tmp_path_factory):
    """make_en_hi_setup's caches and vocab, and a second, larger union over the same teachers
    plus bert-base-cased's vocabulary (another vocab that still covers both caches)."""
    made = make_en_hi_setup(thread_client, tmp_path_factory.mktemp("reliability"))
    teachers = made["teachers"]
    build_vocab([str(teachers["en"]), str(teachers["multi"]), str(VOCABS / "bert-base-cased.vocab.txt")],
                made["root"] / "vocab2", lang_teacher={"en": str(teachers["en"]), "hi": str(teachers["multi"])})
    return {**made, "vocab2": str(made["root"] / "vocab2")}


# Helpers -------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train_args(setup, out, *extra, steps=STEPS, vocab=None):
    c = setup["caches"]
    return ["train-student", "--method", "mergedistill", "--caches", c["en"], "--caches", c["hi"],
            "--vocab", vocab or setup["vocab"], "--out", out, "--steps", steps, "--batch-size", 6, "--hidden", 32,
            "--layers", 2, "--heads", 2, "--lr", 3e-3, "--warmup", 0.2, "--log-every", 1, "--dropout", 0.1,
            "--seed", 3, *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def xkd_cmd(args) -> list[str]:
    return [sys.executable, "-m", "xkd.cli", *map(str, args)]


def run_xkd(args, timeout=300, **kw) -> subprocess.CompletedProcess:
    """The real `xkd` in its own process: exit codes, signals and tracebacks as a user sees them."""
    return subprocess.run(xkd_cmd(args), env=env(), capture_output=True, text=True, timeout=timeout, **kw)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_sha(root: Path) -> dict:
    """Every file under root (relative path -> sha256): a directory left exactly as it was."""
    root = Path(root)
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_paragraph(output: str, *names: str) -> str:
    """The error is one paragraph (one line on stderr) naming every one of `names`, with no
    traceback anywhere."""
    assert "Traceback" not in output, output
    errors = [line for line in output.split("\n") if "error:" in line]
    assert len(errors) == 1, output
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def metrics_steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().split("\n") if line]


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run every interrupted one must equal, byte for byte."""
    out = tmp_path_factory.mktemp("reference") / "student"
    r = invoke(*train_args(setup, out))
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def student(setup, tmp_path_factory):
    """A trained student (4 steps, a checkpoint every 2) that bad commands must leave alone."""
    out = tmp_path_factory.mktemp("trained") / "student"
    r = invoke(*train_args(setup, out, "--save-every", 2, steps=4))
    assert r.exit_code == 0, r.output
    return out


def assert_same_student(out: Path, reference: Path) -> None:
    assert sha256(out / "model.safetensors") == sha256(reference / "model.safetensors")
    a = json.loads((out / "train_summary.json").read_text())
    b = json.loads((reference / "train_summary.json").read_text())
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["partial"] is False and a["steps"] == STEPS
    assert metrics_steps(out) == metrics_steps(reference) == list(range(1, STEPS + 1))


# 1. Numeric options --------------------------------------------------------------------

TRAIN_BAD = [
    ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1e-3"), ("--weight-decay", "nan"), ("--weight-decay", "-0.1"),
    ("--warmup", "-1"), ("--warmup", "inf"), ("--dropout", "1.5"), ("--dropout", "1"), ("--dropout", "nan"),
    ("--dropout", "-0.1"), ("--alpha", "nan"), ("--alpha", "-0.5"), ("--alpha", "inf"), ("--clip", "nan"),
    ("--clip", "-1"), ("--batch-size", "0"), ("--batch-size", "-4"), ("--steps", "0"), ("--steps", "-5"),
    ("--grad-accum", "0"), ("--workers", "-1"), ("--save-every", "-1"), ("--log-every", "0"),
    ("--stop-after", "-2"), ("--keep-checkpoints", "0"), ("--hidden", "0"), ("--layers", "0"), ("--heads", "0"),
    ("--heads", "-2"), ("--embedding-dim", "-1"), ("--seed", "-1"),
]


@pytest.mark.parametrize("option,value", TRAIN_BAD)
def test_train_student_refuses_out_of_range_numbers_before_reading_anything(tmp_path, option, value):
    """The caches and vocab do not exist: an error about them would mean they were read first."""
    out = tmp_path / "out"
    r = invoke("train-student", "--method", "mergedistill", "--caches", tmp_path / "no-cache", "--vocab",
               tmp_path / "no-vocab", "--out", out, option, value)
    assert r.exit_code == 2, r.output
    line = assert_one_paragraph(r.output, option)
    assert "no-cache" not in line and "no-vocab" not in line
    assert not out.exists()


EVALUATE_BAD = [("--batch-size", "0"), ("--batch-size", "-3"), ("--max-rows", "0"), ("--max-rows", "-1")]


@pytest.mark.parametrize("mode", ["mlm", "bitext"])
@pytest.mark.parametrize("option,value", EVALUATE_BAD)
def test_evaluate_refuses_out_of_range_numbers_before_reading_anything(tmp_path, mode, option, value):
    where = (["--caches", tmp_path / "no-cache"] if mode == "mlm"
             else ["--src", f"{tmp_path / 'no-src'}@en", "--tgt", f"{tmp_path / 'no-tgt'}@hi"])
    r = invoke("evaluate", tmp_path / "no-model", "--vocab", tmp_path / "no-vocab", "--mode", mode, *where, option, value)
    assert r.exit_code == 2, r.output
    line = assert_one_paragraph(r.output, option)
    assert "no-" not in line


def test_device_cuda_without_cuda_is_one_paragraph(setup, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    r = invoke(*train_args(setup, out, "--device", "cuda", steps=2))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, "--device cuda", "--device cpu")
    assert not out.exists()
    r = invoke(*train_args(setup, out, "--device", "tpu9", steps=2))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, "--device")


# 2. A non-finite loss ------------------------------------------------------------------


def test_non_finite_loss_stops_at_once_with_exit_1_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    """--lr 1e30 is a valid number, and a sure way to blow up: the first update puts weights at
    ~1e30, and the next forward overflows to NaN. The run must stop at that step, name it and
    the loss terms, and leave only checkpoints with finite weights."""
    out = tmp_path / "diverged"
    r = invoke(*train_args(setup, out, "--lr", 1e30, "--warmup", 0, "--save-every", 1, steps=6))
    assert r.exit_code == 1, r.output
    line = assert_one_paragraph(r.output, "step 2 of 6", "'kd'", "'mlm'", "not finite", "step-00000001", "--lr")
    assert "nan" in line
    assert checkpoint_names(out) == ["step-00000001"]
    state = torch.load(out / "checkpoints" / "step-00000001" / "state.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if torch.is_floating_point(t))
    assert not (out / "model.safetensors").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["partial"] is True and summary["steps"] == 1 and summary["checkpoint"] == "checkpoints/step-00000001"
    assert metrics_steps(out) == [1]


# 3. Exact resume after SIGKILL, with and without DataLoader workers ---------------------


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.005)


@pytest.mark.parametrize("workers", [0, 2])
def test_run_killed_at_a_random_step_resumes_to_identical_weights(setup, reference, tmp_path, workers):
    """SIGKILL to the whole process group (the trainer and its loader workers) as soon as a
    random checkpoint is on disk: wherever the kill lands (a step, the next checkpoint's
    write, the summary), --resume ends with the reference's bytes."""
    kill_at = random.randint(1, STEPS - 4)
    out = tmp_path / "killed"
    args = train_args(setup, out, "--save-every", 1, "--workers", workers)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(xkd_cmd(args), env=env(), stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            wait_for(out / "checkpoints" / f"step-{kill_at:08d}", proc)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (kill_at, (tmp_path / "killed.log").read_text()[-2000:])
    # The summary written with each checkpoint is whole, partial, and names a checkpoint on disk.
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["partial"] is True and (out / summary["checkpoint"]).is_dir(), (kill_at, summary)
    assert summary["steps"] == int(summary["checkpoint"][-8:]) >= kill_at - 1
    assert len(checkpoint_names(out)) <= 3  # two kept (a third only mid-save)
    r = run_xkd(train_args(setup, out, "--save-every", 1, "--workers", workers, "--resume"))
    assert r.returncode == 0, (kill_at, r.stderr[-3000:])
    assert_same_student(out, reference)
    assert checkpoint_names(out) == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]


def test_stop_after_an_odd_step_with_two_workers_resumes_to_identical_weights(setup, reference, tmp_path):
    """--stop-after 3 with 2 workers, resumed with other settings that may change on resume
    (--save-every, --log-every is the same, --keep-checkpoints): the reference's bytes."""
    out = tmp_path / "stopped"
    r = run_xkd(train_args(setup, out, "--workers", 2, "--save-every", 2, "--stop-after", 3))
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_names(out) == ["step-00000002", "step-00000003"]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["partial"] is True and summary["steps"] == 3 and summary["steps_total"] == STEPS
    r = run_xkd(train_args(setup, out, "--workers", 2, "--save-every", 4, "--keep-checkpoints", 3, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_student(out, reference)
    assert checkpoint_names(out) == ["step-00000004", "step-00000008", "step-00000010"]


# 4. What --resume and --out accept -------------------------------------------------------


def test_resume_refuses_a_checkpoint_made_under_other_options(setup, student):
    """Another method, learning rate, step count, method option, batch size or vocab: each
    is refused with the differences listed, and the trained student is left as it was."""
    before = tree_sha(student)
    cases = [
        (["--method", "mlm"], ["--method mergedistill in the checkpoint, mlm now"]),
        (["--lr", 1e-3], ["--lr 0.003 in the checkpoint, 0.001 now"]),
        (["--steps", 100], ["--steps 4 in the checkpoint, 100 now"]),
        (["--option", "lambda_start=0.5"], ["--option lambda_start"]),
        (["--batch-size", 4], ["--batch-size 6 in the checkpoint, 4 now"]),
        (["--vocab", setup["vocab2"]], ["--vocab", str(Path(setup["vocab"]).resolve())]),
    ]
    for change, names in cases:
        args = train_args(setup, student, "--save-every", 2, "--resume", steps=4)
        for i in range(0, len(change), 2):  # typer keeps the last of a repeated option
            args += change[i : i + 2]
        if change[0] == "--method":
            args[args.index("mergedistill")] = "mlm"
        r = invoke(*args)
        assert r.exit_code == 2, (change, r.output)
        line = assert_one_paragraph(r.output, "--resume", "another configuration", *names)
        if change[0] == "--vocab":  # both sizes, and the vocab to use
            from xkd import load_vocab

            assert f"{load_vocab(setup['vocab']).size} tokens" in line and f"{load_vocab(setup['vocab2']).size} tokens" in line
        assert tree_sha(student) == before, change
    # Options that only change how the run is carried out may change.
    r = invoke(*train_args(setup, student, "--save-every", 1, "--workers", 0, "--log-every", 3, "--keep-checkpoints", 5,
                           "--resume", steps=4))
    assert r.exit_code == 0, r.output
    assert "trained mergedistill for 4 steps" in r.output
    summary = json.loads((student / "train_summary.json").read_text())
    assert summary["partial"] is False and summary["steps"] == 4 and "loss" in summary["final"]


def test_out_that_holds_a_student_is_refused_unless_resume_or_overwrite(setup, student, tmp_path):
    before = tree_sha(student)
    r = invoke(*train_args(setup, student, steps=2))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, f"--out {student}", "--resume", "--overwrite")
    r = invoke(*train_args(setup, student, "--resume", "--overwrite", steps=4))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, "--resume", "--overwrite")
    assert tree_sha(student) == before
    # --overwrite: the old run's checkpoints (step 4, beyond this run's 3 steps) and metrics go,
    # so that a later --resume cannot pick them up; the result equals a run in a fresh dir.
    copy = tmp_path / "copy"
    shutil.copytree(student, copy)
    r = invoke(*train_args(setup, copy, "--overwrite", "--save-every", 1, steps=3))
    assert r.exit_code == 0, r.output
    assert checkpoint_names(copy) == ["step-00000002", "step-00000003"]
    assert metrics_steps(copy) == [1, 2, 3]
    fresh = tmp_path / "fresh"
    assert invoke(*train_args(setup, fresh, steps=3)).exit_code == 0
    assert sha256(copy / "model.safetensors") == sha256(fresh / "model.safetensors")


def test_out_inside_a_cache_or_equal_to_an_input_is_refused(setup, tmp_path):
    en = Path(setup["caches"]["en"])
    before = {p: tree_sha(p) for p in (en, Path(setup["vocab"]))}
    for out, names in ((en / "student", ["inside the cache", str(en)]), (en, ["--caches"]),
                       (setup["vocab"], ["--vocab"]), (Path(setup["vocab"]) / "s", ["inside the vocab"])):
        r = invoke(*train_args(setup, out, steps=2))
        assert r.exit_code == 2, (out, r.output)
        assert_one_paragraph(r.output, f"--out {out}", *names)
    assert {p: tree_sha(p) for p in before} == before
    assert invoke("verify", en).exit_code == 0


def test_resume_falls_back_past_a_truncated_checkpoint(setup, reference, tmp_path):
    out = tmp_path / "fallback"
    r = invoke(*train_args(setup, out, "--save-every", 2, "--stop-after", 6))
    assert r.exit_code == 0, r.output
    state = out / "checkpoints" / "step-00000006" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    r = invoke(*train_args(setup, out, "--save-every", 2, "--resume"))
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    said = [line for line in r.output.split("\n") if "damaged" in line]
    assert len(said) == 1 and "step-00000006" in said[0] and "step-00000004" in said[0], r.output
    assert_same_student(out, reference)


def test_keep_checkpoints_prunes_old_ones(setup, tmp_path):
    out = tmp_path / "kept"
    r = invoke(*train_args(setup, out, "--save-every", 1, "--keep-checkpoints", 3, steps=5))
    assert r.exit_code == 0, r.output
    assert checkpoint_names(out) == ["step-00000003", "step-00000004", "step-00000005"]


# 5. Filesystem and damaged-input errors --------------------------------------------------


def out_commands(setup, out):
    """Every command that writes an --out, pointed at `out`."""
    c, teacher = setup["caches"], setup["teachers"]["en"]
    return {
        "train-student": train_args(setup, out, steps=2),
        "build-vocab": ["build-vocab", "--teachers", VOCABS / "bert-base-uncased.vocab.txt", "--out", out],
        "remap": ["remap", c["en"], "--vocab", setup["vocab"], "--out", out],
        "cache-teachers": ["cache-teachers", "--teacher", teacher, "--corpus", TATOEBA, "--max-pairs", 4, "--out", out],
    }


@pytest.mark.parametrize("command", ["train-student", "build-vocab", "remap", "cache-teachers"])
def test_out_that_is_a_file_or_under_one_is_one_paragraph(setup, tmp_path, command):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    for out in (blocker, blocker / "sub"):
        r = invoke(*out_commands(setup, out)[command])
        assert r.exit_code == 2, (out, r.output)
        assert_one_paragraph(r.output, str(blocker))
    assert blocker.read_text() == "keep me\n"


def drop_root_write_override() -> list[str]:
    """Root writes through directory permissions (CAP_DAC_OVERRIDE): run the command without
    that capability so that a read-only directory is read-only, as for any other user."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: cannot make a directory read-only for the command")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.mark.parametrize("command", ["train-student", "build-vocab"])
def test_read_only_out_is_one_paragraph(setup, tmp_path, command):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / "out"
        r = subprocess.run(drop_root_write_override() + xkd_cmd(out_commands(setup, out)[command]), env=env(),
                           capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    assert r.returncode == 2, r.stderr[-3000:]
    assert_one_paragraph(r.stderr, str(locked))
    assert list(locked.iterdir()) == []


def test_full_disk_exits_1_and_keeps_the_checkpoints_written_before(setup, reference, tmp_path):
    """The file-size limit (RLIMIT_FSIZE; Python ignores SIGXFSZ) makes the first checkpoint
    write of the resumed run fail as a full disk does, with the errno of a full file system
    (EFBIG; ENOSPC and EDQUOT take the same path). The checkpoints before it are untouched,
    no half-written one is left, and a later --resume ends with the reference's bytes."""
    import resource

    out = tmp_path / "full"
    r = invoke(*train_args(setup, out, "--save-every", 2, "--stop-after", 2))
    assert r.exit_code == 0, r.output
    before = tree_sha(out / "checkpoints")
    limit = 8 << 20  # well under a checkpoint (~55 MB), well over everything else written

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(xkd_cmd(train_args(setup, out, "--save-every", 2, "--resume")), env=env(), capture_output=True,
                       text=True, timeout=300, preexec_fn=small_disk)
    assert r.returncode == 1, r.stderr[-3000:]
    assert_one_paragraph(r.stderr, str(out / "checkpoints"), "File too large", "free space", "kept")
    assert tree_sha(out / "checkpoints") == before
    r = invoke(*train_args(setup, out, "--save-every", 2, "--resume"))
    assert r.exit_code == 0, r.output
    assert_same_student(out, reference)


@pytest.fixture
def truncated_student(student, tmp_path):
    """A copy of the trained student's files with model.safetensors cut short."""
    copy = tmp_path / "truncated"
    copy.mkdir()
    for file in student.iterdir():
        if file.is_file():
            shutil.copy(file, copy / file.name)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    return copy


def bitext_files(tmp_path, n=6):
    src, tgt = tmp_path / "src.en", tmp_path / "tgt.hi"
    tatoeba = PARALLEL / "tatoeba"
    src.write_text("\n".join((tatoeba / "tatoeba.hin-eng.eng").read_text().split("\n")[:n]) + "\n")
    tgt.write_text("\n".join((tatoeba / "tatoeba.hin-eng.hin").read_text().split("\n")[:n]) + "\n")
    return f"{src}@en", f"{tgt}@hi"


def test_truncated_model_safetensors_is_one_paragraph_naming_the_file(setup, student, truncated_student, tmp_path):
    before = tree_sha(student)
    weights = truncated_student / "model.safetensors"
    src, tgt = bitext_files(tmp_path)
    for args in (
        ["evaluate", truncated_student, "--vocab", setup["vocab"], "--caches", setup["caches"]["en"]],
        ["evaluate", truncated_student, "--vocab", setup["vocab"], "--mode", "bitext", "--src", src, "--tgt", tgt],
        ["evaluate", "--init-from", truncated_student, "--vocab", setup["vocab"], "--mode", "bitext", "--src", src,
         "--tgt", tgt],
        # no --hidden/--layers/...: --init-from keeps the checkpoint's shape (refused together, issue 20)
        ["train-student", "--method", "mergedistill", "--caches", setup["caches"]["en"], "--vocab", setup["vocab"],
         "--out", tmp_path / "from-truncated", "--steps", 2, "--batch-size", 6, "--init-from", truncated_student],
    ):
        r = invoke(*args)
        assert r.exit_code == 2, (args, r.output)
        assert_one_paragraph(r.output, str(weights), "damaged")
    assert not (tmp_path / "from-truncated").exists()
    assert tree_sha(student) == before


def test_evaluating_with_another_vocab_names_both_sizes_and_the_vocab_to_use(setup, student, tmp_path):
    from xkd import load_vocab

    before = tree_sha(student)
    trained, other = load_vocab(setup["vocab"]), load_vocab(setup["vocab2"])
    src, tgt = bitext_files(tmp_path)
    for args in (["--caches", setup["caches"]["en"]], ["--mode", "bitext", "--src", src, "--tgt", tgt]):
        r = invoke("evaluate", student, "--vocab", setup["vocab2"], *args)
        assert r.exit_code == 2, r.output
        assert_one_paragraph(r.output, f"{trained.size:,}", f"{other.size:,}", str(Path(setup["vocab"]).resolve()))
    assert tree_sha(student) == before
    # and with the right one it works
    r = invoke("evaluate", student, "--vocab", setup["vocab"], "--mode", "bitext", "--src", src, "--tgt", tgt)
    assert r.exit_code == 0, r.output


def test_empty_bitext_files_are_one_paragraph(setup, student, tmp_path):
    empty_src, empty_tgt = tmp_path / "empty.en", tmp_path / "empty.hi"
    empty_src.write_text("")
    empty_tgt.write_text("")
    r = invoke("evaluate", student, "--vocab", setup["vocab"], "--mode", "bitext", "--src", f"{empty_src}@en",
               "--tgt", f"{empty_tgt}@hi")
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, str(empty_src), "empty")


def test_bitext_lines_split_on_newline_only(setup, student, tmp_path):
    """A U+2028 inside a sentence is not a line break: splitting there shifted every later line
    against its translation (here: a line-count mismatch instead of 2 pairs)."""
    src, tgt = tmp_path / "s.en", tmp_path / "t.hi"
    src.write_text("one\u2028sentence\nanother one\n")
    tgt.write_text("एक वाक्य\nएक और\n")
    r = invoke("evaluate", student, "--vocab", setup["vocab"], "--mode", "bitext", "--src", f"{src}@en",
               "--tgt", f"{tgt}@hi", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().split("\n")[-1])["pairs"] == 2
