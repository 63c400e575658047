"""Issue 20, security: files xkd did not write never run code, and no link leads xkd out of a
cache, a vocab or a run, or makes it delete through a link (docs/reliability.md, "Untrusted
files").

The hostile files are real, written here: pickles whose unpickling would create a marker
file (each payload is first shown to create one when unpickled), links out of the directory.
Every test asserts that the marker never appears, that the refusal is one paragraph naming the
path, and that what the link points to is left as it was. Caches come from the real pipeline
with tiny random-weight teachers and the real vocab files, as in test_reliability_training.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reliability_training import assert_one_paragraph
from typer.testing import CliRunner

from xkd.cli import app
from xkd.errors import BadInput
from xkd.vocab import build_vocab, load_student_tokenizer, load_vocab, save_student_tokenizer

from conftest import ROOT, TATOEBA, VOCABS, build_tiny_bert, cache_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 6


@pytest.fixture(scope="module")
def setup(thread_client, tmp_path_factory):
    """Two caches, their union vocab (English and Hindi routed to different teachers), and a
    run stopped after 4 of 6 steps with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("security")
    en = build_tiny_bert(root / "en-teacher", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=11)
    multi = build_tiny_bert(root / "hi-teacher", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False,
                            seed=12)
    caches = [cache_teacher(thread_client, root / "caches", en, TATOEBA, sides="src", max_pairs=16, topk=8, shard_size=16),
              cache_teacher(thread_client, root / "caches", multi, TATOEBA, sides="tgt", max_pairs=16, topk=8,
                            shard_size=16)]
    build_vocab([str(en), str(multi)], root / "vocab", lang_teacher={"en": str(en), "hi": str(multi)})
    setup = {"root": root, "caches": caches, "vocab": root / "vocab", "run": root / "run"}
    r = invoke(*train_args(setup, setup["run"], "--stop-after", 4))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (setup["run"] / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    return setup


# Helpers -------------------------------------------------------------------------------


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train_args(setup, out, *extra, vocab=None):
    c = setup["caches"]
    return ["train-student", "--method", "mergedistill", "--caches", c[0], "--caches", c[1], "--vocab", vocab or setup["vocab"],
            "--out", out, "--steps", STEPS, "--batch-size", 4, "--hidden", 32, "--layers", 2, "--heads", 2,
            "--save-every", 2, "--log-every", 1, "--seed", 3, *extra]


def tree_sha(root: Path) -> dict:
    """Every file under root, links not followed (relative path -> sha256 or link target)."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            p = Path(top) / name
            if p.is_symlink():
                out[str(p.relative_to(root))] = "-> " + os.readlink(p)
            elif p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class CreatesMarker:
    """Unpickling this runs code: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def load_unsafely(data: bytes) -> None:
    """What a careless reader does: torch.load(weights_only=False), np.load(allow_pickle=True),
    pickle.loads."""
    if data.startswith(b"PK"):
        torch.load(io.BytesIO(data), weights_only=False)
    elif data.startswith(b"\x93NUMPY"):
        np.load(io.BytesIO(data), allow_pickle=True)
    else:
        pickle.loads(data)


def payload(tmp_path: Path, make) -> Path:
    """The marker path for a payload made by `make(marker)`, after showing that the payload is
    live: loaded carelessly, a twin of it does create its marker."""
    probe = tmp_path / "probe-marker"
    load_unsafely(make(probe))
    assert probe.exists(), "the test's payload does not run code: it would prove nothing"
    return tmp_path / "MARKER"


def copy_run(setup, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(setup["run"], out, symlinks=True)
    return out


# 1. Checkpoints: loaded as tensors and plain values only ---------------------------------


def whole_checkpoint_with(evil) -> dict:
    """A checkpoint with every key xkd needs, one of them an object that runs code."""
    return {"step": 4, "model": {}, "method": {}, "optimizer": {}, "scheduler": {}, "rng": evil, "loader": {},
            "run": {"options": {}}}


def torch_file(obj, **kw) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kw)
    return buffer.getvalue()


HOSTILE_CHECKPOINTS = {
    # torch's own zip format, the payload where the RNG state goes
    "torch zip": lambda m: torch_file(whole_checkpoint_with(CreatesMarker(m))),
    # a bare pickle, which torch.load reads through its legacy path
    "bare pickle": lambda m: pickle.dumps(CreatesMarker(m)),
    "protocol 0 pickle": lambda m: pickle.dumps(CreatesMarker(m), protocol=0),
    "protocol 5 pickle": lambda m: pickle.dumps(CreatesMarker(m), protocol=5),
    "torch zip, pickle protocol 4": lambda m: torch_file(whole_checkpoint_with(CreatesMarker(m)), pickle_protocol=4),
    # numpy's object arrays unpickle their items: an allow-list of numpy would let this through
    "numpy object array": lambda m: torch_file(whole_checkpoint_with(np.array([CreatesMarker(m), 1], dtype=object))),
}


@pytest.mark.parametrize("kind", HOSTILE_CHECKPOINTS)
def test_a_planted_checkpoint_never_runs_code_and_is_refused_naming_it(setup, tmp_path, kind):
    out = copy_run(setup, tmp_path)
    marker = payload(tmp_path, HOSTILE_CHECKPOINTS[kind])
    state = out / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(HOSTILE_CHECKPOINTS[kind](marker))
    before = tree_sha(out)
    r = invoke(*train_args(setup, out, "--resume"))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, state, "--overwrite")
    assert not marker.exists()
    assert tree_sha(out) == before


def test_a_planted_checkpoint_behind_a_damaged_one_is_refused_in_a_real_process(setup, tmp_path):
    """The fallback past a truncated checkpoint loads the one before it the same safe way; in
    a real `xkd` process, as a user runs it."""
    out = copy_run(setup, tmp_path)
    marker = payload(tmp_path, HOSTILE_CHECKPOINTS["torch zip"])
    latest = out / "checkpoints" / "step-00000004" / "state.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    planted = out / "checkpoints" / "step-00000002" / "state.pt"
    planted.write_bytes(HOSTILE_CHECKPOINTS["torch zip"](marker))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "xkd.cli", *map(str, train_args(setup, out, "--resume"))], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert_one_paragraph(r.stderr, planted)
    assert not marker.exists()


def test_a_checkpoint_xkd_wrote_resumes_to_the_same_weights(setup, tmp_path):
    """The positive control: xkd's own checkpoints (RNG states as plain values) load safely
    and resume exactly."""
    out = copy_run(setup, tmp_path)
    assert invoke(*train_args(setup, out, "--resume")).exit_code == 0
    fresh = tmp_path / "fresh"
    assert invoke(*train_args(setup, fresh)).exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (fresh / "model.safetensors").read_bytes()


# 2. Links in a run: refused before anything is read or trained --------------------------


def elsewhere(tmp_path: Path, source: Path | None = None) -> Path:
    """A directory outside the run (a copy of `source`, or one file) that must stay as it is."""
    target = tmp_path / "elsewhere"
    if source is not None:
        shutil.copytree(source, target)
    else:
        target.mkdir()
        (target / "precious.txt").write_text("not xkd's\n")
    return target


RUN_LINKS = {
    # an old step linked in: it used to train to the end and fail the pruning, naming no path
    "an old step directory": lambda out, tmp: (out / "checkpoints" / "step-00000001",
                                               elsewhere(tmp, out / "checkpoints" / "step-00000002")),
    "the newest step directory": lambda out, tmp: (out / "checkpoints" / "step-00000005",
                                                   elsewhere(tmp, out / "checkpoints" / "step-00000004")),
    "a temporary checkpoint": lambda out, tmp: (out / "checkpoints" / ".step-00000006.tmp", elsewhere(tmp)),
    "the checkpoints directory": lambda out, tmp: (out / "checkpoints", elsewhere(tmp, out / "checkpoints")),
    "tokenizers/": lambda out, tmp: (out / "tokenizers", elsewhere(tmp)),
}


@pytest.mark.parametrize("case", RUN_LINKS)
def test_a_link_in_a_run_is_refused_at_resume_naming_it(setup, tmp_path, case):
    out = copy_run(setup, tmp_path)
    link, target = RUN_LINKS[case](out, tmp_path)
    if link.exists():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)
    before, outside = tree_sha(out), tree_sha(target)
    r = invoke(*train_args(setup, out, "--resume"))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, link, "symbolic link")
    assert tree_sha(out) == before, "nothing was trained"
    assert tree_sha(target) == outside


def test_the_out_given_may_itself_be_a_link(setup, tmp_path):
    """A path the user names is the user's choice: an --out that is a link resumes."""
    out = copy_run(setup, tmp_path)
    link = tmp_path / "linked-run"
    link.symlink_to(out, target_is_directory=True)
    r = invoke(*train_args(setup, link, "--resume"))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]


# 3. A vocab's maps: never unpickled; damaged ones are one paragraph ---------------------


def copy_vocab(setup, tmp_path) -> tuple[Path, Path]:
    vocab = tmp_path / "vocab"
    shutil.copytree(setup["vocab"], vocab)
    return vocab, sorted((vocab / "maps").glob("*.npy"))[0]


def npy_bytes(array, **kw) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, **kw)
    return buffer.getvalue()


BAD_MAPS = {
    "object array that runs code": lambda m, good: npy_bytes(np.array([CreatesMarker(m), 1], dtype=object),
                                                             allow_pickle=True),
    "bare pickle": lambda m, good: pickle.dumps(CreatesMarker(m)),
    "truncated": lambda m, good: good[: len(good) // 2],
    "truncated header": lambda m, good: good[:40],
    "empty": lambda m, good: b"",
    "float array": lambda m, good: npy_bytes(np.zeros(10)),
    "2-D array": lambda m, good: npy_bytes(np.zeros((3, 3), dtype=np.int32)),
}


@pytest.mark.parametrize("case", BAD_MAPS)
def test_a_damaged_or_hostile_map_is_one_paragraph_naming_it(setup, tmp_path, case):
    vocab, map_file = copy_vocab(setup, tmp_path)
    marker = tmp_path / "MARKER"
    if "runs code" in case or "pickle" in case:
        marker = payload(tmp_path, lambda m: BAD_MAPS[case](m, b""))
    map_file.write_bytes(BAD_MAPS[case](marker, map_file.read_bytes()))
    r = invoke(*train_args(setup, tmp_path / "out", vocab=vocab))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, map_file, "xkd build-vocab")
    assert not marker.exists()


def link_out(path: Path, tmp_path: Path) -> Path:
    """Replace `path` by a link to an identical copy outside its directory."""
    copy = tmp_path / "outside" / path.name
    copy.parent.mkdir(exist_ok=True)
    (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.symlink_to(copy, target_is_directory=copy.is_dir())
    return copy


@pytest.mark.parametrize("entry", ["a map", "a teacher tokenizer", "a file of a teacher tokenizer", "vocab.txt"])
def test_a_link_out_of_a_vocab_is_refused_naming_it(setup, tmp_path, entry):
    """Even to identical bytes: train-student copies a teacher tokenizer into the student, so
    a link to any file the user can read would end up in a model they publish."""
    vocab, map_file = copy_vocab(setup, tmp_path)
    teacher = sorted((vocab / "teachers").iterdir())[0]
    path = {"a map": map_file, "a teacher tokenizer": teacher, "vocab.txt": vocab / "vocab.txt",
            "a file of a teacher tokenizer": sorted(teacher.iterdir())[0]}[entry]
    link_out(path, tmp_path)
    r = invoke(*train_args(setup, tmp_path / "out", vocab=vocab))
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, path, "outside the vocab")


def test_a_vocab_given_as_a_link_or_linking_inside_itself_loads(setup, tmp_path):
    vocab, map_file = copy_vocab(setup, tmp_path)
    inside = vocab / "kept" / map_file.name
    inside.parent.mkdir()
    shutil.move(map_file, inside)
    map_file.symlink_to(inside)
    given = tmp_path / "vocab-link"
    given.symlink_to(vocab, target_is_directory=True)
    slug = map_file.stem
    assert np.array_equal(load_vocab(given).map_for(slug), np.load(setup["vocab"] / "maps" / map_file.name))


def test_a_slug_that_climbs_out_of_the_vocab_is_refused(setup, tmp_path):
    vocab, map_file = copy_vocab(setup, tmp_path)
    shutil.copy(map_file, tmp_path / "planted.npy")  # a valid table: only where it is makes it wrong
    meta = json.loads((vocab / "xkd-vocab.json").read_text())
    meta["teachers"][0]["slug"] = "../../planted"
    (vocab / "xkd-vocab.json").write_text(json.dumps(meta))
    with pytest.raises(BadInput, match="outside the vocab"):
        load_vocab(vocab).map_for("../../planted")


# 4. A student's tokenizer routes stay inside the student directory ----------------------


@pytest.fixture(scope="module")
def student_tokenizer_dir(setup, tmp_path_factory):
    """A student tokenizer with a second route (Hindi) under tokenizers/."""
    out = tmp_path_factory.mktemp("student-tok") / "student"
    save_student_tokenizer(load_vocab(setup["vocab"]), out)
    info = json.loads((out / "xkd_tokenizer.json").read_text())
    routed = [slug for slug, entry in info["tokenizers"].items() if entry["dir"] != "."]
    assert routed, info
    return out, routed[0], next(lang for lang, slug in info["routes"].items() if slug == routed[0])


def tampered_student(student_tokenizer_dir, tmp_path, change) -> tuple[Path, Path]:
    source, slug, _ = student_tokenizer_dir
    out = tmp_path / "student"
    shutil.copytree(source, out)
    info_file = out / "xkd_tokenizer.json"
    info = json.loads(info_file.read_text())
    change(info["tokenizers"][slug], out, slug)
    info_file.write_text(json.dumps(info))
    return out, info_file


def route_to(directory: str):
    def change(entry, out, slug):
        shutil.copytree(out / entry["dir"], (out / directory).resolve())
        entry["dir"] = directory
    return change


def route_through_a_link(entry, out, slug):
    link_out(out / entry["dir"], out.parent)


def map_outside(entry, out, slug):
    np.save(out.parent / "planted.npy", np.arange(10, dtype=np.int32))
    entry.update(ids="teacher", map="../../../planted.npy")


ROUTES = {
    "../ out of the student": route_to("../elsewhere"),
    "tokenizers/../../ out of the student": route_to("tokenizers/../../elsewhere"),
    "a link out of the student": route_through_a_link,
    "a map out of the student": map_outside,
}


@pytest.mark.parametrize("case", ROUTES)
def test_a_route_out_of_the_student_directory_is_refused(student_tokenizer_dir, tmp_path, case):
    out, info_file = tampered_student(student_tokenizer_dir, tmp_path, ROUTES[case])
    with pytest.raises(BadInput, match="outside the student directory") as refused:
        load_student_tokenizer(out)
    assert str(out) in str(refused.value)


def test_an_absolute_route_is_refused(student_tokenizer_dir, tmp_path):
    outside = tmp_path / "absolute"

    def change(entry, out, slug):
        shutil.copytree(out / entry["dir"], outside)
        entry["dir"] = str(outside)
    out, info_file = tampered_student(student_tokenizer_dir, tmp_path, change)
    with pytest.raises(BadInput, match="outside the student directory"):
        load_student_tokenizer(out)


def test_a_route_map_that_would_run_code_is_refused(student_tokenizer_dir, tmp_path):
    marker = payload(tmp_path, lambda m: npy_bytes(np.array([CreatesMarker(m)], dtype=object), allow_pickle=True))

    def change(entry, out, slug):
        (out / entry["dir"] / "union_ids.npy").write_bytes(
            npy_bytes(np.array([CreatesMarker(marker)], dtype=object), allow_pickle=True))
        entry.update(ids="teacher", map="union_ids.npy")
    out, info_file = tampered_student(student_tokenizer_dir, tmp_path, change)
    tokenizer = load_student_tokenizer(out)
    with pytest.raises(BadInput, match="pickled") as refused:
        tokenizer("नमस्ते", language=student_tokenizer_dir[2])
    assert "union_ids.npy" in str(refused.value)
    assert not marker.exists()


def test_an_untouched_student_tokenizer_loads_and_routes(student_tokenizer_dir, setup):
    tokenizer = load_student_tokenizer(student_tokenizer_dir[0])
    vocab = load_vocab(setup["vocab"])
    assert tokenizer("नमस्ते दुनिया", language="hi")["input_ids"] == vocab.tokenize("नमस्ते दुनिया", "hi").tolist()


# 5. Lock files: never written through a link ----------------------------------------------


def plant_link(link: Path, victim: Path) -> Path:
    victim.write_text("not xkd's\n")
    link.symlink_to(victim)
    return victim


def test_a_lock_planted_as_a_link_is_refused_and_never_written_through(setup, tmp_path):
    from xkd.storage.writer import CacheWriter

    run = copy_run(setup, tmp_path)
    vocab = tmp_path / "vocab"
    shutil.copytree(setup["vocab"], vocab)
    cache = tmp_path / "cache"
    cases = {"run": (run / ".lock", lambda: invoke(*train_args(setup, run, "--resume"))),
             "vocab": (tmp_path / ".vocab.lock",
                       lambda: invoke("build-vocab", "--teachers", VOCABS / "bert-base-cased.vocab.txt", "--out", vocab,
                                      "--overwrite"))}
    for name, (lock, command) in cases.items():
        victim = plant_link(lock, tmp_path / f"victim-{name}.txt")
        r = command()
        assert r.exit_code == 2, (name, r.output)
        assert_one_paragraph(r.output, lock)
        assert victim.read_text() == "not xkd's\n", name
        lock.unlink()
    # the cache writer's lock (cache-teachers, remap)
    cache.mkdir()
    lock = cache / ".lock"
    victim = plant_link(lock, tmp_path / "victim-cache.txt")
    with pytest.raises(BadInput, match=str(lock)):
        with CacheWriter(cache, "key", {}):
            pass
    assert victim.read_text() == "not xkd's\n"


# 6. A student's model files are loaded from inside it only ---------------------------------


@pytest.mark.parametrize("entry", ["model.safetensors", "config.json"])
def test_a_link_out_of_a_student_is_refused_when_it_is_loaded(setup, tmp_path, entry):
    out = copy_run(setup, tmp_path)
    assert invoke(*train_args(setup, out, "--resume")).exit_code == 0
    outside = tmp_path / f"outside-{entry}"
    shutil.move(out / entry, outside)
    (out / entry).symlink_to(outside)
    before = tree_sha(out)
    for args in (["evaluate", out, "--caches", setup["caches"][0], "--vocab", setup["vocab"], "--max-rows", 8],
                 ["train-student", "--method", "mergedistill", "--caches", setup["caches"][0], "--vocab", setup["vocab"],
                  "--init-from", out, "--out", tmp_path / "next", "--steps", 2, "--batch-size", 4]):
        r = invoke(*args)
        assert r.exit_code == 2, (args[0], r.output)
        assert_one_paragraph(r.output, out / entry, "outside the student directory")
    assert tree_sha(out) == before and not (tmp_path / "next").exists()


# 7. Weights an index lists are checked like the others, and stay in the model's directory ---


@pytest.mark.parametrize("listed", ["../outside_evil.bin", "weights-00001-of-00001.bin"])
def test_a_pickle_reached_through_a_weight_index_never_runs(setup, tmp_path, listed):
    marker = payload(tmp_path, lambda m: pickle.dumps(CreatesMarker(m)))
    teacher = tmp_path / "models" / "teacher"
    shutil.copytree(setup["root"] / "en-teacher", teacher)
    (teacher / "model.safetensors").unlink()
    (teacher / listed).write_bytes(pickle.dumps(CreatesMarker(marker)))
    (teacher / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"bert.embeddings": listed}}))
    r = invoke("cache-teachers", "--teacher", teacher, "--corpus", "sample", "--out", tmp_path / "caches",
               "--max-pairs", 4)
    assert r.exit_code == 2, r.output
    assert_one_paragraph(r.output, teacher)
    assert not marker.exists() and not (tmp_path / "caches").exists()
    # build-vocab reads a teacher's tokenizer (and sizes its weight files): nothing is unpickled
    r = invoke("build-vocab", "--teachers", teacher, "--out", tmp_path / "vocab")
    assert r.exit_code in (0, 2) and "Traceback" not in r.output, r.output
    assert not marker.exists()
