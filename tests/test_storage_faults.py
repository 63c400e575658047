"""Damaged caches and bad paths through the CLI: one clear paragraph naming the shard, file
and problem, a non-zero exit, and no traceback; the reader refuses the same damage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_storage import write_cache
from typer.testing import CliRunner

import xkd
from xkd.cli import app
from xkd.errors import XkdError
from xkd.storage import SCHEMA_VERSION


@pytest.fixture(scope="module")
def sound_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("sound") / "c"
    write_cache(root, shard_ids=(0, 1, 2), planned=3)
    return root


@pytest.fixture
def cache(sound_cache, tmp_path):
    """A private copy to damage."""
    root = tmp_path / "c"
    shutil.copytree(sound_cache, root)
    return root


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    # An unexpected exception would be a traceback for a user; typer.Exit is the clean path.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def flip_byte(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def assert_damage_reported(root, shard: int, *phrases):
    result = cli("verify", root)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"xkd verify: {root} is damaged.\n")
    assert f"shard {shard:05d}: " in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, (phrase, result.stderr)
    assert "Re-run the command that made the cache" in result.stderr
    others = [line for line in result.stderr.splitlines() if line.startswith("shard ") and f"{shard:05d}" not in line]
    assert others == []  # only the damaged shard is named
    report = json.loads(cli("verify", root, "--json").stdout.splitlines()[-1])
    assert report["ok"] is False and list(report["problems"]) == [str(shard)]
    return result


def test_truncated_shard_is_named_by_verify_and_refused_by_the_reader(cache):
    path = cache / "shards" / "00001.parquet"
    size = path.stat().st_size
    os.truncate(path, size // 2)
    assert_damage_reported(cache, 1, f"file 00001.parquet is truncated ({size // 2} of {size} bytes)")
    reader = xkd.open_cache(cache)
    assert len(list(reader.iter_examples(shards=[0, 2]))) == 180  # the sound shards still read
    damaged = rf"shard 1 is damaged: 00001.parquet has {size // 2} bytes, the manifest records {size}"
    with pytest.raises(XkdError, match=damaged):
        reader.read_block(1, 0)


def test_truncated_shard_through_the_real_command(cache):
    """The installed entry point, in its own process: stderr is the paragraph, not a traceback."""
    path = cache / "shards" / "00002.parquet"
    os.truncate(path, 100)
    proc = subprocess.run([sys.executable, "-m", "xkd.cli", "verify", str(cache)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert "shard 00002: file 00002.parquet is truncated (100 of" in proc.stderr


def test_flipped_byte_in_parquet_is_found_by_verify_and_the_reader(cache):
    path = cache / "shards" / "00000.parquet"
    flip_byte(path, path.stat().st_size // 2)
    assert_damage_reported(cache, 0, "file 00000.parquet is corrupted (sha256 differs from the manifest)")
    reader = xkd.open_cache(cache)
    with pytest.raises(XkdError, match=r"shard 0 is damaged: 00000.parquet cannot be read"):
        list(reader.iter_blocks(shards=[0]))


def test_flipped_byte_in_a_zarr_chunk_is_found_by_verify_and_the_reader(cache):
    chunk = cache / "shards" / "00002.zarr" / "hidden.2" / "c" / "0" / "0"
    flip_byte(chunk, chunk.stat().st_size // 2)
    assert_damage_reported(cache, 2, "file 00002.zarr/hidden.2/c/0/0 is corrupted")
    reader = xkd.open_cache(cache)
    assert len(list(reader.iter_blocks(shards=[2], dense=["cls"]))) == 3  # other arrays still read
    with pytest.raises(XkdError, match=r"shard 2 is damaged: 00002.zarr/hidden.2 cannot be read"):
        reader.read_block(2, 0)


@pytest.mark.parametrize("missing", ["00001.parquet", "00001.zarr"])
def test_missing_shard_file_is_named(cache, missing):
    target = cache / "shards" / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = assert_damage_reported(cache, 1, f"file {missing}")
    assert "is missing" in result.stderr
    with pytest.raises(XkdError, match=rf"shard 1 is listed as done but {missing} is missing"):
        xkd.open_cache(cache).read_block(1, 0)


def test_planned_shard_absent_from_a_complete_manifest_is_named(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["id"] != 1]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    result = cli("verify", cache)
    assert result.exit_code == 1
    assert "shards listed as planned but absent: 1." in result.stderr


def test_manifest_that_disagrees_with_its_shard_is_named(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][2]["rows"] += 1
    (cache / "manifest.json").write_text(json.dumps(manifest))
    assert_damage_reported(cache, 2, "it has 90 rows, the manifest says 91")


def test_manifest_from_a_future_schema_version_is_refused(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (cache / "manifest.json").write_text(json.dumps(manifest))
    for command in ("verify", "inspect"):
        result = cli(command, cache)
        assert result.exit_code == 1
        assert result.stderr == (
            f"xkd {command}: error: {cache / 'manifest.json'} was written with cache schema version "
            f"{SCHEMA_VERSION + 1}, but this xkd reads versions up to {SCHEMA_VERSION}. Upgrade xkd "
            "(pip install -U xkd) to read this cache.\n"
        )
    with pytest.raises(XkdError, match="schema version"):
        xkd.open_cache(cache)


def test_damaged_manifest_json_is_named(cache):
    (cache / "manifest.json").write_text('{"schema_version": 1, "shards": [')
    result = cli("inspect", cache)
    assert result.exit_code == 2  # a damaged cache is bad input
    assert f"{cache / 'manifest.json'} is not valid JSON" in result.stderr
    assert "Delete the cache directory and re-run the command that made it." in result.stderr


def test_path_that_is_not_a_cache(tmp_path, sound_cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("hello")
    cases = [
        (empty, f"{empty} is not an xkd cache: it has no manifest.json."),
        (a_file, f"{a_file} is not an xkd cache: it has no manifest.json."),
        (tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such directory."),
        # The parent of a cache: the error points at the cache inside.
        (sound_cache.parent, f"It contains caches: {sound_cache}."),
    ]
    for path, phrase in cases:
        for command in ("verify", "inspect"):
            result = cli(command, path)
            assert result.exit_code == 2, (command, path)
            assert result.stderr.startswith(f"xkd {command}: error: ") and phrase in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1  # one paragraph
