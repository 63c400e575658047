"""Failures that printed tracebacks (issue 20, "Still tracebacks"), through the real CLI.

Each is one paragraph with exit 1 (the work failed) or 2 (bad input), naming the path,
option, column or row at fault, and leaves what was cached or built before unchanged: a
full disk or file-size limit in the dask workers or at the manifest (stopped at once, not
retried shard after shard), and in build-vocab; teachers and --init-from checkpoints that
could not load (weights the safe loader refuses, auto_map code, unknown types, shapes that
do not match) refused before any worker or model loads them; labels that do not fit a class
id; hf text columns that are not text; `xkd rdt` on a JSON without its scores. Ctrl-C's
"kept N of M shards" is the manifest's N.

Full disks are simulated with the file-size limit (RLIMIT_FSIZE, inherited by the dask
worker processes; EFBIG takes the same path as ENOSPC and EDQUOT), and, where this user may
mount one, with a real small tmpfs (ENOSPC).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
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

from conftest import AS_FROM_A_TERMINAL, PARALLEL, ROOT, VOCABS, build_tiny_bert, cache_teacher, sigint_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGLISH = (PARALLEL / "tatoeba" / "tatoeba.hin-eng.eng").read_text(encoding="utf-8").split("\n")
runner = CliRunner()


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_xkd(*args, file_size_limit: int | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real `xkd` in its own process (and its dask workers): exit codes and tracebacks as a
    user sees them. `file_size_limit`: no file of it or its children may grow past this many
    bytes (a write beyond fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "xkd.cli", *map(str, args)], env=env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, preexec_fn=limit if file_size_limit else None)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_paragraph(output: str, code: int, returncode: int, *names) -> str:
    """The error is one line on stderr naming every one of `names`; no traceback anywhere, no
    worker's "Compute Failed" report."""
    assert returncode == code, output[-3000:]
    assert "Traceback" not in output and "Compute Failed" not in output, output[-3000:]
    errors = [line for line in output.split("\n") if "error:" in line]
    assert len(errors) == 1, output[-3000:]
    for name in names:
        assert str(name) in errors[0], (name, errors[0])
    return errors[0]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def manifest_shards(cache: Path) -> list[int]:
    return [s["id"] for s in json.loads((cache / "manifest.json").read_text())["shards"] if s["state"] == "done"]


def kept_files(cache: Path, shard_ids: list[int]) -> dict[str, str]:
    """sha256 of every file of these shards (00001.parquet, 00001.zarr/...)."""
    return {name: digest for name, digest in snapshot(cache / "shards").items()
            if re.match(r"\d+", name) and int(re.match(r"\d+", name).group(0)) in shard_ids}


def kept_count(error: str, cache: Path) -> int:
    found = re.search(r"Kept (\d+) of (\d+) shards in (\S+?)[;.]", error)
    assert found and Path(found.group(3)) == cache, error
    return int(found.group(1))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("teacher") / "tiny-mbert",
                           VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False, seed=2)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# 1. A full disk in cache-teachers: stopped at once, what was kept said as the manifest says it --

def mixed_corpus(tmp_path: Path) -> Path:
    """16 short sentences, then 16 of about 20 sentences each: shards 0-1 are small, 2-3 large."""
    long_lines = [" ".join(ENGLISH[100 + 20 * i: 120 + 20 * i]) for i in range(16)]
    return write_lines(tmp_path / "mixed.en", ENGLISH[:16] + long_lines)


@pytest.fixture
def tmpfs(tmp_path):
    """A 192 KiB tmpfs, where this user may mount one (root, outside most containers)."""
    where = tmp_path / "small-disk"
    where.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): the file-size limit case covers the same handler")
    yield where
    subprocess.run(["umount", str(where)], check=True)


@pytest.mark.parametrize("disk", ["file-size-limit", "tmpfs"])
def test_a_full_disk_in_the_workers_stops_at_once_and_keeps_the_finished_shards(teacher, tmp_path, disk, request):
    corpus = mixed_corpus(tmp_path)
    out = request.getfixturevalue("tmpfs") if disk == "tmpfs" else tmp_path / "caches"
    limit = None if disk == "tmpfs" else 24_000  # over a small shard's files and the manifest, under a large shard's
    args = ["cache-teachers", "--teacher", teacher, "--corpus", f"text:{corpus}@en", "--out", out, "--shard-size", 8,
            "--hidden-layers", "0,1,2", "--workers", 1, "--cpu-threads", 1]
    first = run_xkd(*args, file_size_limit=limit)
    (cache,) = out.glob("tiny-mbert-*")
    why = "File too large" if disk == "file-size-limit" else "No space left on device"
    error = one_paragraph(first.stderr, 1, first.returncode, cache / "shards", why, "free space", "resumes")
    kept = manifest_shards(cache)
    assert kept_count(error, cache) == len(kept) and 0 < len(kept) < 4, error
    assert invoke("verify", cache).exit_code == 3  # what was kept is sound; the cache is incomplete
    if disk == "tmpfs":
        return
    before = kept_files(cache, kept)
    done = run_xkd(*args)  # space again: the same command resumes and finishes
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming, {len(kept)} of 4 shards already done" in done.stderr
    assert kept_files(cache, kept) == before
    assert invoke("verify", cache).exit_code == 0


def test_a_full_disk_at_the_manifest_reports_the_shards_the_manifest_holds(teacher, tmp_path):
    """The client's own write fails (the manifest grows past the limit while one-row shards
    stay under it): the paragraph counts what the manifest on disk holds, not the commit that
    failed."""
    corpus = write_lines(tmp_path / "c.en", ENGLISH[:24])
    out = tmp_path / "caches"
    r = run_xkd("cache-teachers", "--teacher", teacher, "--corpus", f"text:{corpus}@en", "--out", out, "--shard-size", 1,
                "--workers", 1, "--cpu-threads", 1, file_size_limit=10_000)
    (cache,) = out.glob("tiny-mbert-*")
    error = one_paragraph(r.stderr, 1, r.returncode, cache, "File too large")
    assert kept_count(error, cache) == len(manifest_shards(cache)) > 0
    assert invoke("verify", cache).exit_code == 3  # what is there is sound, and incomplete


# 2. Ctrl-C: the line's count is the manifest's ------------------------------------------------

def test_ctrl_c_during_a_commit_says_the_number_of_shards_the_manifest_holds(teacher, tmp_path):
    """Ctrl-C while the client is writing the manifest (held there: its temporary file is made a
    FIFO no one reads, as a stalled disk would hold it): that commit did not happen, and the
    line says so."""
    corpus = write_lines(tmp_path / "c.en", ENGLISH[:400])
    out = tmp_path / "caches"
    proc = subprocess.Popen([*AS_FROM_A_TERMINAL, "cache-teachers", "--teacher", str(teacher), "--corpus",
                             f"text:{corpus}@en", "--out", str(out), "--shard-size", "1", "--workers", "1",
                             "--cpu-threads", "1"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        stalled = None
        while proc.poll() is None and time.time() < deadline and stalled is None:
            for manifest in out.glob("*/manifest.json"):
                try:
                    if len(json.loads(manifest.read_text())["shards"]) >= 5:
                        os.mkfifo(manifest.with_name(f".manifest.json.tmp-{proc.pid}"))
                        stalled = manifest
                except (ValueError, KeyError, FileExistsError):  # mid-write: try again
                    pass
            time.sleep(0.02)
        assert stalled is not None and proc.poll() is None, "the run ended before it could be interrupted"
        held = len(json.loads(stalled.read_text())["shards"])
        time.sleep(2)  # the next commit is now waiting on the FIFO
        assert len(json.loads(stalled.read_text())["shards"]) == held
        state = sigint_state(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (state, stderr[-3000:])
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    kept = re.fullmatch(r"xkd cache-teachers: interrupted; kept (\d+) of 400 shards in (\S+)\. "
                        r"Run the same command again to resume\.", stderr.strip().split("\n")[-1])
    assert kept and Path(kept.group(2)) == stalled.parent, stderr[-3000:]
    assert int(kept.group(1)) == len(manifest_shards(stalled.parent)) == held


# 3. Teachers that cannot load: refused on the client, or stopped at the first worker ----------

def pickled_weights(d: Path) -> str:
    """pytorch_model.bin whose pickle names a callable: torch.load(weights_only=True) refuses it."""
    from safetensors.torch import load_file

    state = dict(load_file(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    state["extra"] = _Gadget()
    torch.save(state, d / "pytorch_model.bin")
    return "pytorch_model.bin"


class _Gadget:
    def __reduce__(self):
        return (print, ("this must never run",))


def unknown_dtype_in_safetensors(d: Path) -> str:
    """A header whose sizes add up but which names a dtype safetensors does not have."""
    data = bytearray((d / "model.safetensors").read_bytes())
    at = 8 + data[8:].index(b'"F32"')
    data[at:at + 5] = b'"X32"'
    (d / "model.safetensors").write_bytes(bytes(data))
    return "model.safetensors"


def auto_map_in_config(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                               "AutoModelForMaskedLM": "modeling_evil.EvilForMaskedLM"})
    (d / "config.json").write_text(json.dumps(config))
    return "config.json"


def auto_map_in_tokenizer(d: Path) -> str:
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return "tokenizer_config.json"


def unknown_model_type(d: Path) -> str:
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "no-such-model"
    (d / "config.json").write_text(json.dumps(config))
    return "config.json"


def shapes_unlike_the_weights(d: Path) -> str:
    """config.json twice as wide as the weights: whole files, but transformers cannot load them."""
    config = json.loads((d / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128)
    (d / "config.json").write_text(json.dumps(config))
    return ""


@pytest.fixture(scope="module")
def made(thread_client, teacher, tmp_path_factory) -> dict:
    """A cache and a union vocab made before the refused runs, under the roots they write to."""
    root = tmp_path_factory.mktemp("made")
    corpus = write_lines(root / "c.en", ENGLISH[:16])
    cache = Path(cache_teacher(thread_client, root / "caches", teacher, f"text:{corpus}@en", shard_size=8))
    build_vocab([str(teacher)], root / "vocab")
    return {"root": root, "corpus": corpus, "cache": cache, "vocab": root / "vocab"}


# What each refusal says: the weights hold code, or the model asks to run its own.
WHY = {pickled_weights: "the safe loader", unknown_dtype_in_safetensors: "the safetensors loader refuses",
       auto_map_in_config: "auto_map", auto_map_in_tokenizer: "auto_map", unknown_model_type: "no-such-model",
       shapes_unlike_the_weights: "shapes"}


@pytest.mark.parametrize("damage", [pickled_weights, unknown_dtype_in_safetensors, auto_map_in_config,
                                    auto_map_in_tokenizer])
def test_a_teacher_that_cannot_load_is_refused_before_any_worker_starts(made, teacher, tmp_path, damage, capfd):
    bad = shutil.copytree(teacher, tmp_path / "teacher")
    file = damage(bad)
    before = snapshot(made["root"])
    r = invoke("cache-teachers", "--teacher", bad, "--corpus", f"text:{made['corpus']}@en", "--out",
               made["root"] / "caches")
    one_paragraph(r.output, 2, r.exit_code, bad / file, WHY[damage])
    assert "Do you wish to run the custom code" not in r.output  # transformers' prompt on stdin
    assert "this must never run" not in r.output + capfd.readouterr().out
    assert snapshot(made["root"]) == before


def test_a_teacher_the_workers_cannot_load_stops_the_run_at_the_first_shard(made, teacher, tmp_path):
    bad = shutil.copytree(teacher, tmp_path / "teacher")
    shapes_unlike_the_weights(bad)
    before = snapshot(made["root"])
    r = run_xkd("cache-teachers", "--teacher", bad, "--corpus", f"text:{made['corpus']}@en", "--out",
                made["root"] / "caches", "--shard-size", 2, "--workers", 1, "--cpu-threads", 1)
    error = one_paragraph(r.stderr, 2, r.returncode, f"cannot be loaded from {bad}", "shapes", "Kept 0 of 8 shards")
    assert "damaged" in error
    (cache,) = (made["root"] / "caches").glob("teacher-*")
    assert manifest_shards(cache) == []
    assert {k: v for k, v in snapshot(made["root"]).items() if not k.startswith(f"caches/{cache.name}")} == before


# 4. --init-from a checkpoint that cannot load ------------------------------------------------

@pytest.mark.parametrize("damage", [pickled_weights, unknown_dtype_in_safetensors, auto_map_in_config,
                                    auto_map_in_tokenizer, unknown_model_type, shapes_unlike_the_weights])
def test_init_from_a_checkpoint_that_cannot_load_is_one_paragraph(made, teacher, tmp_path, damage, capfd):
    bad = shutil.copytree(teacher, tmp_path / "checkpoint")
    file = damage(bad)
    before = snapshot(made["root"])
    out = tmp_path / "student"
    r = invoke("train-student", "--method", "mlm", "--caches", made["cache"], "--vocab", made["vocab"], "--out", out,
               "--steps", 2, "--batch-size", 4, "--init-from", bad)
    one_paragraph(r.output, 2, r.exit_code, bad / file if file else bad, WHY[damage])
    src = write_lines(tmp_path / "src.en", ENGLISH[:4])
    r = invoke("evaluate", "--init-from", bad, "--vocab", made["vocab"], "--mode", "bitext", "--src", f"{src}@en",
               "--tgt", f"{src}@en")
    one_paragraph(r.output, 2, r.exit_code, bad / file if file else bad, WHY[damage])
    assert "this must never run" not in r.output + capfd.readouterr().out
    assert not out.exists() and snapshot(made["root"]) == before


# 5. Labels that are no class id, text columns that are no text ------------------------------

def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


LABEL_CASES = {
    # name: (rows or lines, what the paragraph names)
    "digits-1e23": ("labeled", [f"sentence {i}\t{10**23 if i == 5 else i % 2}" for i in range(8)], "line 6"),
    "int32-overflow": ("labeled", [f"sentence {i}\t{2**31 if i == 2 else 0}" for i in range(8)], "line 3"),
    "float-1e23": ("hf", [{"text": f"sentence {i}", "label": 1e23 if i == 3 else 1} for i in range(8)], "row 3"),
    "int-2**40": ("hf", [{"text": f"sentence {i}", "label": 2**40 if i == 4 else 1} for i in range(8)], "row 4"),
    "nan": ("hf", [{"text": f"sentence {i}", "label": float("nan") if i == 2 else 1} for i in range(8)], "row 2"),
    "negative": ("hf", [{"text": f"sentence {i}", "label": -7 if i == 6 else 1} for i in range(8)], "row 6"),
    "list": ("hf", [{"text": f"sentence {i}", "label": [1, 2]} for i in range(8)], "row 0"),
}


@pytest.mark.parametrize("case", LABEL_CASES)
def test_a_label_that_is_no_class_id_is_refused_when_read(made, teacher, tmp_path, case):
    kind, rows, where = LABEL_CASES[case]
    if kind == "labeled":
        corpus, path = f"labeled:{write_lines(tmp_path / 'l.tsv', rows)}@en", tmp_path / "l.tsv"
    else:
        corpus, path = f"hf:{jsonl(tmp_path / 'l.jsonl', rows)}", tmp_path / "l.jsonl"
    before = snapshot(made["root"])
    r = invoke("cache-teachers", "--teacher", teacher, "--corpus", corpus, "--out", made["root"] / "caches")
    error = one_paragraph(r.output, 2, r.exit_code, path, where)
    assert "class id" in error and ("column 'label'" in error or kind == "labeled")
    assert snapshot(made["root"]) == before


TEXT_CASES = {
    "ints": ([{"text": i} for i in range(8)], "column 'text', row 0 holds int"),
    "lists": ([{"text": ["a", "b"]} for _ in range(8)], "column 'text', row 0 holds list"),
    "floats": ([{"text": 0.5 + i} for i in range(8)], "column 'text', row 0 holds float"),
    "objects": ([{"text": {"a": "b"}} for _ in range(8)], "column 'text', row 0 holds dict"),
    "translation-int": ([{"translation": {"en": "hello", "hi": 7}} for _ in range(8)],
                        "column 'translation.hi', row 0 holds int"),
}


@pytest.mark.parametrize("case", TEXT_CASES)
def test_an_hf_text_column_that_is_not_text_is_refused_naming_the_column_and_row(made, teacher, tmp_path, case):
    rows, named = TEXT_CASES[case]
    path = jsonl(tmp_path / "c.jsonl", rows)
    before = snapshot(made["root"])
    r = invoke("cache-teachers", "--teacher", teacher, "--corpus", f"hf:{path}", "--out", made["root"] / "caches")
    one_paragraph(r.output, 2, r.exit_code, path, named)
    assert snapshot(made["root"]) == before


# 6. xkd rdt on a JSON without its scores ------------------------------------------------------

RDT_CASES = {
    "no scores under the metric": {"metric": "accuracy", "mode": "classify"},
    "a number, not per language": {"metric": "accuracy", "accuracy": 0.8},
    "metric not a name": {"metric": ["accuracy"], "accuracy": {"en": 0.8}},
    "a score that is text": {"metric": "accuracy", "accuracy": {"en": "high"}},
    "a score that is NaN": {"metric": "accuracy", "accuracy": {"en": float("nan")}},
}


@pytest.mark.parametrize("case", RDT_CASES)
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_rdt_on_a_json_without_its_scores_is_one_paragraph(tmp_path, case, side):
    good = {"metric": "accuracy", "accuracy": {"en": 0.8, "hi": 0.6}, "mode": "classify", "model": "m"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(RDT_CASES[case]))
    (tmp_path / "good.json").write_text(json.dumps(good))
    student, teacher = (bad, tmp_path / "good.json") if side == "student" else (tmp_path / "good.json", bad)
    r = invoke("rdt", student, "--teacher", teacher)
    one_paragraph(r.output, 2, r.exit_code, bad, "STUDENT" if side == "student" else "--teacher")


def test_rdt_on_a_directory_says_it_is_a_directory(tmp_path):
    r = invoke("rdt", tmp_path, "--teacher", tmp_path)
    one_paragraph(r.output, 2, r.exit_code, tmp_path, "is a directory")


# 7. build-vocab on a full disk ----------------------------------------------------------------

def test_build_vocab_on_a_full_disk_is_one_paragraph_naming_out(made, teacher, tmp_path):
    before = snapshot(made["vocab"])
    out = tmp_path / "vocab"
    for target in (out, made["vocab"]):  # a new vocab, and one rebuilt where the same vocab stands
        r = run_xkd("build-vocab", "--teachers", teacher, "--out", target, file_size_limit=200_000)
        one_paragraph(r.stderr, 1, r.returncode, target, "File too large", "free space")
    assert not (out / "xkd-vocab.json").exists()
    assert snapshot(made["vocab"]) == before


# 8. JSON nested deeper than Python's stack, in any JSON file xkd reads --------------------------

DEEP = "[" * 200_000 + "]" * 200_000  # json raises RecursionError on it, not a JSONDecodeError


def deep_json_case(made, teacher, tmp_path, case) -> tuple[Path, list, int]:
    """(the file made deep, the command that reads it, its exit code)."""
    if case in ("manifest", "xkd-vocab.json"):
        copy = shutil.copytree(made["cache"] if case == "manifest" else made["vocab"], tmp_path / "copy")
        vocab = copy if case == "xkd-vocab.json" else made["vocab"]
        command = ["train-student", "--method", "mlm", "--caches", copy if case == "manifest" else made["cache"],
                   "--vocab", vocab, "--out", tmp_path / "student", "--steps", 2, "--batch-size", 4, "--hidden", 32,
                   "--layers", 1, "--heads", 2]
        return copy / ("manifest.json" if case == "manifest" else "xkd-vocab.json"), command, 2
    model = shutil.copytree(teacher, tmp_path / "model")
    if case == "teacher config.json":
        return model / "config.json", ["cache-teachers", "--teacher", model, "--corpus", f"text:{made['corpus']}@en",
                                       "--out", tmp_path / "caches"], 2
    if case in ("train_summary.json", "xkd_student.json"):  # unreadable: evaluated as a model saved by other means
        (model / "train_summary.json").write_text("{}")  # a student: evaluate records its result and redraws its card
        return model / case, ["evaluate", model, "--caches", made["cache"], "--vocab", made["vocab"]], 0
    if case == "rdt":
        return tmp_path / "student.json", ["rdt", tmp_path / "student.json", "--teacher", tmp_path / "student.json"], 2
    (tmp_path / "ws" / "students" / "a").mkdir(parents=True)  # ls --workspace: a student without its summary
    return tmp_path / "ws" / "students" / "a" / "train_summary.json", ["ls", "--workspace", tmp_path / "ws"], 0


@pytest.mark.parametrize("case", ["manifest", "xkd-vocab.json", "teacher config.json", "train_summary.json",
                                  "xkd_student.json", "rdt", "ls"])
def test_json_nested_too_deeply_is_a_damaged_file_not_a_traceback(made, teacher, tmp_path, case):
    file, command, code = deep_json_case(made, teacher, tmp_path, case)
    file.write_text(DEEP)
    before = snapshot(made["root"])
    r = run_xkd(*command, timeout=120)
    assert r.returncode == code and "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    if code == 2:
        one_paragraph(r.stderr, 2, r.returncode, file, "nested too deeply")
    assert snapshot(made["root"]) == before
    if case == "manifest":  # verify and inspect read it the same way
        for other in ("verify", "inspect"):
            one_paragraph(run_xkd(other, file.parent).stderr, 2, 2, file, "nested too deeply")


def test_load_student_tokenizer_on_json_nested_too_deeply_raises_bad_input(tmp_path):
    from xkd import load_student_tokenizer
    from xkd.errors import BadInput

    (tmp_path / "xkd_tokenizer.json").write_text(DEEP)
    with pytest.raises(BadInput, match="xkd_tokenizer.json is not valid JSON"):
        load_student_tokenizer(tmp_path)


# 9. Damage found in a DataLoader worker while training ----------------------------------------

def test_damage_found_in_a_dataloader_worker_is_the_readers_paragraph(made, tmp_path):
    """A flipped byte in the input_ids page of shard 1: the loader's scan (main process) reads
    other columns, so the damage is found by a DataLoader worker reading its batch. torch
    re-raises it in the training process wrapped in the worker's traceback; the user sees the
    reader's one paragraph and exit 2, as with --workers 0."""
    from test_remote_faults import flip_byte, parquet_page_byte

    cache = shutil.copytree(made["cache"], tmp_path / "cache")
    (parquet,) = (cache / "shards").rglob("00001.parquet")
    data = parquet.read_bytes()
    parquet.write_bytes(flip_byte(data, parquet_page_byte(data, "input_ids")))
    r = run_xkd("train-student", "--method", "mlm", "--caches", cache, "--vocab", made["vocab"], "--out",
                tmp_path / "student", "--steps", 8, "--batch-size", 4, "--hidden", 32, "--layers", 1, "--heads", 2,
                "--workers", 2, timeout=180)
    error = one_paragraph(r.stderr, 2, r.returncode, cache, "shard 1 is damaged", "00001.parquet")
    assert "DataLoader worker process" not in r.stderr + r.stdout, r.stderr[-3000:]
    assert "Traceback" not in r.stdout and "xkd verify" in error
    assert not (tmp_path / "student" / "model.safetensors").exists()
