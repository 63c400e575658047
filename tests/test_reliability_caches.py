"""Issue #11, caches: nothing wrong gets in, nothing silently goes on.

A real cache (tiny random-weight teacher with the real bert-base-uncased vocab, real
Tatoeba pairs, four shards) is copied and damaged in each way a cache goes wrong: a shard's
manifest entry removed, shards not marked done or gone as a killed run leaves them, a Zarr
array's byte order edited, the Zarr group metadata truncated or corrupted, the manifest
without `shards` or not JSON. Every command that opens a cache (train-student, evaluate,
remap, verify, inspect) runs on each through the real CLI: one paragraph naming the file or
cache, the right exit code, no traceback, and nothing on disk changed by the attempt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xkd.cli import app
from xkd.pipeline import CacheTeachersOptions, cache_teachers

from conftest import TATOEBA, VOCABS, build_tiny_bert

SHARDS, SHARD_SIZE = 4, 15
STUDENT = ["--hidden", 32, "--layers", 1, "--heads", 2, "--batch-size", 4]


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    # Anything but a clean typer.Exit would be a traceback for a user.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().split("\n")[-1])


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def made(thread_client, tmp_path_factory):
    """The sound cache (by the real pipeline), a union vocab, and a student trained on it."""
    root = tmp_path_factory.mktemp("reliability")
    teacher = build_tiny_bert(root / "teacher", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=3)
    result = cache_teachers(CacheTeachersOptions(
        teachers=[str(teacher)], corpus=TATOEBA, out=str(root / "caches"), sides="src", topk=8, hidden_layers=(2,),
        max_pairs=SHARDS * SHARD_SIZE, shard_size=SHARD_SIZE), client=thread_client, log=io.StringIO())
    sound = Path(result["caches"][0]["path"])
    assert result["caches"][0]["shards"] == SHARDS
    vocab = root / "vocab"
    assert cli("build-vocab", "--teachers", teacher, "--out", vocab).exit_code == 0
    student = root / "student"
    trained = cli("train-student", "--method", "mergedistill", "--caches", sound, "--vocab", vocab, "--out", student,
                  "--steps", 2, *STUDENT)
    assert trained.exit_code == 0, trained.output
    return {"root": root, "sound": sound, "vocab": vocab, "student": student, "digest": tree_digest(sound)}


def copy_of(made, tmp_path) -> Path:
    """A private copy under the cache's own name, so the command its manifest quotes resumes it."""
    copy = tmp_path / "caches" / made["sound"].name
    shutil.copytree(made["sound"], copy)
    return copy


def edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def remove_entry(root):
    edit_manifest(root, lambda m: m.update(shards=[s for s in m["shards"] if s["id"] != 2]))


def killed(root):
    """What a run killed after committing two shards leaves: the manifest lists 0 and 1, the
    later shards' files are gone (or never written)."""
    edit_manifest(root, lambda m: m.update(shards=[s for s in m["shards"] if s["id"] < 2], complete=False))
    for shard in (2, 3):
        (root / "shards" / f"{shard:05d}.parquet").unlink()
        shutil.rmtree(root / "shards" / f"{shard:05d}.zarr")


def not_done(root):
    def edit(m):
        m["complete"] = False
        for s in m["shards"][1:]:
            s["state"] = "writing"
    edit_manifest(root, edit)


def byte_order(root):
    path = root / "shards" / "00001.zarr" / "hidden.2" / "zarr.json"
    path.write_text(path.read_text().replace('"endian": "little"', '"endian": "big"'))


def group_truncated(root):
    os.truncate(root / "shards" / "00000.zarr" / "zarr.json", 10)


def group_corrupted(root):
    path = root / "shards" / "00000.zarr" / "zarr.json"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash tells
    path.write_bytes(bytes(data))


def array_metadata_deleted(root):
    (root / "shards" / "00002.zarr" / "hidden.2" / "zarr.json").unlink()


def no_shards(root):
    edit_manifest(root, lambda m: m.pop("shards"))


def bad_json(root):
    path = root / "manifest.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


MANIFEST, ZARR_ARRAY, ZARR_GROUP = "manifest.json", "shards/00001.zarr/hidden.2/zarr.json", "shards/00000.zarr/zarr.json"
# damage: (what the paragraph names: a file of the cache, or what is missing; verify's exit
# code and what it names; inspect's exit code). The commands that use a cache (train-student,
# evaluate, remap) refuse every one with exit 2. verify: 1 damaged, 3 incomplete, 2 unreadable.
CASES = {
    "entry-removed": (remove_entry, "1 of 4 shards is missing (shard 2, 15 rows)", 1,
                      "shards listed as planned but absent: 2. The manifest says the cache is complete", 0),
    "killed": (killed, "2 of 4 shards are missing (shards 2-3, 30 rows)", 3, "2 of 4 shards are missing", 0),
    "not-done": (not_done, "3 of 4 shards are missing (shards 1-3, 45 rows)", 3, "3 of 4 shards are missing", 0),
    "byte-order": (byte_order, ZARR_ARRAY, 1, "shard 00001: file 00001.zarr/hidden.2/zarr.json", 1),
    "group-truncated": (group_truncated, ZARR_GROUP, 1, "shard 00000: file 00000.zarr/zarr.json is truncated", 1),
    "group-corrupted": (group_corrupted, ZARR_GROUP, 1, "shard 00000: file 00000.zarr/zarr.json is corrupted", 1),
    "array-metadata-deleted": (array_metadata_deleted, "shards/00002.zarr/hidden.2/zarr.json", 1,
                               "shard 00002: file 00002.zarr/hidden.2/zarr.json is missing", 1),
    "no-shards": (no_shards, MANIFEST, 2, "manifest.json is not a valid xkd manifest: it has no `shards` list", 2),
    "bad-json": (bad_json, MANIFEST, 2, "manifest.json is not valid JSON", 2),
}


def paragraph(result, prefix: str) -> str:
    """stderr is one paragraph (one line) starting with `prefix`."""
    lines = [line for line in result.stderr.strip().split("\n") if line]
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_cache_is_refused_by_every_command(made, tmp_path, case):
    damage, names, verify_code, verify_names, inspect_code = CASES[case]
    root = copy_of(made, tmp_path)
    damage(root)
    incomplete = names.endswith("rows)")
    named = names if incomplete else str(root / names)
    before = tree_digest(root)
    users = {
        "train-student": ["train-student", "--method", "mergedistill", "--caches", root, "--vocab", made["vocab"],
                          "--out", tmp_path / "student", "--steps", 2, *STUDENT],
        "evaluate": ["evaluate", made["student"], "--vocab", made["vocab"], "--caches", root],
        "remap": ["remap", root, "--vocab", made["vocab"], "--out", tmp_path / "remapped"],
    }
    for command, args in users.items():
        result = cli(*args)
        assert result.exit_code == 2, (command, result.output)
        said = paragraph(result, f"xkd {command}: error: ")
        assert named in said, (command, said)
        if incomplete:  # what is missing, and the command that finishes it
            assert f"cache {root} is incomplete" in said and "`xkd cache-teachers --teacher" in said
        elif names == MANIFEST:
            assert "Delete the cache directory and re-run the command that made it" in said
        else:
            assert f"Run `xkd verify {root}`" in said and "it rewrites damaged shards" in said
    assert not (tmp_path / "student").exists() and not (tmp_path / "remapped").exists()

    verify = cli("verify", root)
    assert verify.exit_code == verify_code, verify.output
    assert verify_names in verify.stderr and verify.stdout == ""
    assert (verify.stderr.startswith(f"xkd verify: {root} is damaged.\n") if verify_code == 1
            else paragraph(verify, "xkd verify: "))
    inspect = cli("inspect", root)
    assert inspect.exit_code == inspect_code, inspect.output
    if inspect_code == 0:  # inspect reports; the incomplete state is part of the report
        assert "INCOMPLETE" in inspect.stdout and named in inspect.stdout
    else:
        assert named in paragraph(inspect, "xkd inspect: ")
    assert tree_digest(root) == before  # refusing changes nothing on disk
    assert tree_digest(made["sound"]) == made["digest"]


def test_verify_json_says_incomplete_with_the_counts(made, tmp_path):
    root = copy_of(made, tmp_path)
    killed(root)
    result = cli("verify", root, "--json")
    assert result.exit_code == 3  # sound so far, but incomplete: neither ok (0) nor damaged (1)
    report = last_json(result)
    assert report["status"] == "incomplete" and report["complete"] is False and report["ok"] is False
    assert (report["planned_shards"], report["shards_checked"], report["missing_shards"], report["missing_rows"]) == (
        SHARDS, 2, [2, 3], 2 * SHARD_SIZE)
    assert report["problems"] == {} and report["finish"].startswith("xkd cache-teachers --teacher ")
    text = cli("verify", root)
    assert text.stdout == "" and "Its 2 finished shards are sound" in text.stderr
    info = last_json(cli("inspect", root, "--json"))
    assert info["complete"] is False and info["missing_shards"] == [2, 3] and info["missing_rows"] == 2 * SHARD_SIZE
    sound = cli("verify", made["sound"], "--json")
    assert sound.exit_code == 0 and last_json(sound)["status"] == "ok"
    assert ("(key " in cli("inspect", made["sound"]).stdout.split("\n")[0]
            and ", complete)" in cli("inspect", made["sound"]).stdout)


def test_allow_incomplete_trains_and_evaluates_saying_what_is_missing(made, tmp_path):
    root = copy_of(made, tmp_path)
    killed(root)
    before = tree_digest(root)
    out = tmp_path / "student"
    result = cli("train-student", "--method", "mergedistill", "--caches", root, "--vocab", made["vocab"], "--out", out,
                 "--steps", 2, *STUDENT, "--allow-incomplete", "--json")
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.split("\n") if line.startswith("xkd: warning: ")]
    assert len(warning) == 1 and f"cache {root} is incomplete: 2 of 4 shards are missing (shards 2-3, 30 rows)" in warning[0]
    assert "Using only its 2 finished shards (--allow-incomplete)" in warning[0] and "xkd cache-teachers" in warning[0]
    summary = last_json(result)
    assert summary["incomplete_caches"] == {str(root): {"planned_shards": 4, "missing_shards": [2, 3], "missing_rows": 30}}
    assert (out / "config.json").is_file()
    evaluated = cli("evaluate", out, "--vocab", made["vocab"], "--caches", root, "--allow-incomplete")
    assert evaluated.exit_code == 0 and "2 of 4 shards are missing" in evaluated.stderr
    assert tree_digest(root) == before


def test_the_quoted_command_finishes_the_cache_byte_for_byte(made, tmp_path):
    """The command the refusal quotes, run as a user would paste it, resumes the killed cache
    (only the missing shards) and ends with the same bytes as the uninterrupted run."""
    root = copy_of(made, tmp_path)
    killed(root)
    command = last_json(cli("verify", root, "--json"))["finish"]
    refusal = cli("train-student", "--method", "mergedistill", "--caches", root, "--vocab", made["vocab"],
                  "--out", tmp_path / "s", "--steps", 1)
    assert f"`{command}`" in refusal.stderr
    argv = shlex.split(command)
    assert argv[:2] == ["xkd", "cache-teachers"]
    proc = subprocess.run([sys.executable, "-m", "xkd.cli", *argv[1:], "--workers", "1", "--cpu-threads", "1"],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 of 4 shards run this time" in proc.stdout
    assert cli("verify", root).exit_code == 0
    finished = {k: v for k, v in tree_digest(root).items() if k != ".lock"}
    assert finished == {k: v for k, v in made["digest"].items() if k != ".lock"}


# Other ways a manifest goes wrong: each is one paragraph naming manifest.json and what is
# wrong in it, exit 2, in every command that opens the cache.
MANIFEST_EDITS = {
    "shards-not-a-list": (lambda m: m.update(shards={}), "`shards` is not a list"),
    "entry-without-files": (lambda m: m["shards"][1].pop("files"), "the entry of shard 1 lacks its file list"),
    "entry-id-a-string": (lambda m: m["shards"][0].update(id="0"), "`shards` entry 0 has no shard id"),
    "shard-listed-twice": (lambda m: m["shards"].append(m["shards"][0]), "shard 0 is listed twice"),
    "dense-spec-broken": (lambda m: m["outputs"]["dense"]["hidden.2"].update(align="diagonal"), "`outputs.dense.hidden.2`"),
    "planned-not-a-number": (lambda m: m.update(planned_shards="four"), "`planned_shards` is 'four'"),
    "file-outside-the-cache": (lambda m: m["shards"][0]["files"].update({"../../x": [1, "0" * 64]}), "lies outside the cache"),
    "top-level-list": ("[]", "has no integer schema_version"),
    "empty-file": ("", "is not valid JSON"),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_malformed_manifest_is_one_paragraph_everywhere(made, tmp_path, case):
    edit, problem = MANIFEST_EDITS[case]
    root = copy_of(made, tmp_path)
    if isinstance(edit, str):
        (root / "manifest.json").write_text(edit)
    else:
        edit_manifest(root, edit)
    before = tree_digest(root)
    for args in (["train-student", "--method", "mergedistill", "--caches", root, "--vocab", made["vocab"],
                  "--out", tmp_path / "student", "--steps", 1, *STUDENT],
                 ["evaluate", made["student"], "--vocab", made["vocab"], "--caches", root],
                 ["remap", root, "--vocab", made["vocab"], "--out", tmp_path / "remapped"],
                 ["verify", root], ["inspect", root]):
        result = cli(*args)
        assert result.exit_code == 2, (args[0], result.output)
        said = paragraph(result, f"xkd {args[0]}: error: {root / 'manifest.json'} ")
        assert problem in said and "Delete the cache directory and re-run the command that made it" in said, said
    assert tree_digest(root) == before


def test_a_gap_in_the_shards_is_missing_even_without_a_plan(made, tmp_path):
    """A manifest without planned_shards (edited, or an old writer's) still cannot hide a
    shard: ids count up from 0, so a gap below the last finished shard is missing."""
    root = copy_of(made, tmp_path)
    edit_manifest(root, lambda m: (m.pop("planned_shards"), m.update(shards=[s for s in m["shards"] if s["id"] != 1])))
    result = cli("train-student", "--method", "mergedistill", "--caches", root, "--vocab", made["vocab"],
                 "--out", tmp_path / "student", "--steps", 1, *STUDENT)
    assert result.exit_code == 2
    said = paragraph(result, "xkd train-student: error: ")
    assert "does not say how many were planned; shards 1 below the last finished one are missing" in said
    verify = last_json(cli("verify", root, "--json"))
    assert verify["status"] == "damaged" and verify["missing_shards"] == [1]  # it says complete: edited


def test_the_writer_never_marks_a_cache_complete_with_a_shard_missing(made, tmp_path):
    """finish() is what makes readers trust a cache; it refuses while planned shards are not done."""
    from xkd.errors import XkdError
    from xkd.storage import CacheWriter, read_manifest

    root = copy_of(made, tmp_path)
    killed(root)
    manifest = read_manifest(root)
    meta = {k: manifest[k] for k in ("teacher", "corpus", "view", "outputs")}
    with CacheWriter(root, manifest["key"], meta, planned_shards=SHARDS) as writer:
        with pytest.raises(XkdError, match=r"cannot mark the cache complete: 2 of 4 planned shards are not written"):
            writer.finish()
    assert read_manifest(root)["complete"] is False
