"""Caches on object storage, against a real S3 server (SeaweedFS on loopback, tests/s3server.py):
cache-teachers writes to s3://, verify and inspect read there, and a student trained from the
remote cache is byte-identical to one trained from a local copy of it."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from xkd import open_cache
from xkd.storage.fetch import FetchCache
from xkd.storage.remote import Remote
from xkd.vocab import build_vocab

from conftest import TATOEBA, VOCABS, build_tiny_bert, cache_teacher
from s3server import unique_prefix_url


def run_xkd(*args, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "xkd.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def download(url: str, dest: Path) -> Path:
    """A plain copy of every object under `url` into `dest` (what `aws s3 sync` would make)."""
    remote = Remote(url)
    for name in remote.list():
        path = dest / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(remote.get(name))
    return dest


@pytest.fixture(scope="module")
def remote_setup(s3_server, tmp_path_factory):
    """Two tiny teachers (English uncased, mBERT for Hindi) cached straight to the object store by
    the real pipeline on a LocalCluster of two worker processes, each in a working directory of
    its own, so nothing a worker writes locally can be seen by the client (a worker's paths are
    not the client's); hidden states at every token too, so dense arrays travel as well; the
    union vocab."""
    from distributed import Client, LocalCluster

    root = tmp_path_factory.mktemp("remote")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in s3_server.env.items():  # before the workers start: they inherit it
            mp.setenv(name, value)
        url = unique_prefix_url("remote-setup")
        cluster = LocalCluster(host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
        workdirs = client.run(_own_working_directory, str(root / "workers"))
        en = build_tiny_bert(root / "en", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=11, init_range=1.0)
        hi = build_tiny_bert(root / "hi", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False, seed=12,
                             init_range=1.0)
        caches = [
            cache_teacher(client, f"{url}/caches", en, TATOEBA, sides="src", max_pairs=60, topk=8, shard_size=25,
                          hidden_layers=(1, 2)),
            cache_teacher(client, f"{url}/caches", hi, TATOEBA, sides="tgt", max_pairs=40, topk=8, shard_size=25),
        ]
        client.close()
        cluster.close()
        build_vocab([str(en), str(hi)], root / "vocab", lang_teacher={"en": str(en), "hi": str(hi)})
        yield {"url": url, "caches": caches, "vocab": root / "vocab", "root": root, "env": dict(s3_server.env),
               "workdirs": workdirs}


def _own_working_directory(base: str) -> str:
    path = Path(base) / f"worker-{os.getpid()}"
    path.mkdir(parents=True)
    os.chdir(path)
    return str(path)


def test_cache_teachers_writes_the_object_store_and_nothing_local(remote_setup, tmp_path):
    for cache in remote_setup["caches"]:
        assert cache.startswith(remote_setup["url"] + "/caches/")
        names = Remote(cache).list()
        assert "manifest.json" in names and ".lock" not in names  # the lease is released
        manifest = json.loads(Remote(cache).get("manifest.json"))
        assert manifest["complete"]
        # every object is a listed shard file: no leftovers of attempts
        listed = {f"shards/{s['dir']}/{rel}" for s in manifest["shards"] for rel in s["files"]}
        assert set(names) - {"manifest.json", "config.yaml"} == listed
        # the run's options, replayable with --config, beside the manifest
        assert yaml.safe_load(Remote(cache).get("config.yaml"))["corpus"] == manifest["corpus"]["spec"]
    assert not Path("s3:").exists()  # the old bug: a local directory named after the URL
    # the workers ran in directories of their own, and left nothing there: each shard went up from a
    # temporary directory the worker removed after its upload
    assert len(set(remote_setup["workdirs"].values())) == 2
    for workdir in remote_setup["workdirs"].values():
        assert [p.name for p in Path(workdir).iterdir()] == []


def test_verify_and_inspect_read_the_remote_cache(remote_setup):
    env = remote_setup["env"]
    for cache in remote_setup["caches"]:
        proc = run_xkd("verify", cache, "--json", env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "ok"
        proc = run_xkd("inspect", cache, env=env)
        assert proc.returncode == 0, proc.stderr
    proc = run_xkd("ls", "--workspace", remote_setup["url"], "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    listed = sorted(c["path"] for c in json.loads(proc.stdout.strip().splitlines()[-1])["caches"])
    assert listed == sorted(remote_setup["caches"])


def test_remote_reads_equal_local_reads_of_a_copy(remote_setup, tmp_path):
    """Every column and dense array of every row group, read through the fetch cache, equals
    what the local reader reads from a plain copy of the objects."""
    fetch = FetchCache(tmp_path / "fetch", limit=2**30)
    for i, url in enumerate(remote_setup["caches"]):
        local = open_cache(download(url, tmp_path / f"copy{i}"))
        remote = open_cache(url, fetch=fetch)
        assert remote.shard_ids == local.shard_ids and len(remote) == len(local)
        for a, b in zip(remote.iter_blocks(), local.iter_blocks(), strict=True):
            assert a.columns.keys() == b.columns.keys() and a.dense.keys() == b.dense.keys()
            for name in a.columns:
                x, y = a.columns[name], b.columns[name]
                if hasattr(x, "values"):
                    assert np.array_equal(x.values, y.values) and np.array_equal(x.offsets, y.offsets), name
                else:
                    assert np.array_equal(x, y), name
            for name in a.dense:
                assert a.dense[name].dtype == b.dense[name].dtype
                assert np.array_equal(a.dense[name], b.dense[name]), name
    assert fetch.misses and fetch.size() <= 2**30


def test_student_trained_from_s3_is_byte_identical_to_one_from_a_local_copy(remote_setup, tmp_path):
    env = remote_setup["env"]
    local = [str(download(url, tmp_path / f"copy{i}")) for i, url in enumerate(remote_setup["caches"])]
    common = ["--method", "mergedistill", "--vocab", remote_setup["vocab"], "--steps", "5", "--batch-size", "8",
              "--hidden", "32", "--layers", "2", "--heads", "2", "--seed", "3", "--workers", "2", "--json"]
    a = run_xkd("train-student", "--caches", *remote_setup["caches"], "--out", tmp_path / "from-s3",
                "--cache-dir", tmp_path / "fetch", "--cache-size", "64M", *common, env=env)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_xkd("train-student", "--caches", *local, "--out", tmp_path / "from-local", *common, env=env)
    assert b.returncode == 0, b.stderr[-3000:]
    weights = "model.safetensors"
    assert (tmp_path / "from-s3" / weights).read_bytes() == (tmp_path / "from-local" / weights).read_bytes()
    assert json.loads(a.stdout.strip().splitlines()[-1])["final"] == json.loads(b.stdout.strip().splitlines()[-1])["final"]
    # evaluate reads the held-out caches the same way: the same numbers from the URL and the copy
    scores = []
    for caches in (remote_setup["caches"], local):
        proc = run_xkd("evaluate", tmp_path / "from-s3", "--caches", *caches, "--vocab", remote_setup["vocab"], "--json",
                       *(["--cache-dir", tmp_path / "fetch-eval"] if caches is not local else []), env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        scores.append([{k: v for k, v in r.items() if k != "cache"}
                       for r in json.loads(proc.stdout.strip().splitlines()[-1])["per_cache"]])
    assert scores[0] == scores[1]


def test_remap_from_and_to_the_object_store(remote_setup, tmp_path):
    """A union-vocab copy written from a remote cache to another remote prefix verifies, and holds
    the rows a local remap of a local copy holds."""
    env = remote_setup["env"]
    source = remote_setup["caches"][1]
    target = unique_prefix_url("remap-target")
    proc = run_xkd("remap", source, "--vocab", remote_setup["vocab"], "--out", target, "--json", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run_xkd("verify", target, env=env).returncode == 0
    local = run_xkd("remap", download(source, tmp_path / "copy"), "--vocab", remote_setup["vocab"], "--out",
                    tmp_path / "union", "--json", env=env)
    assert local.returncode == 0, local.stderr[-3000:]
    a, b = open_cache(target, fetch=FetchCache(tmp_path / "fetch")), open_cache(tmp_path / "union")
    for x, y in zip(a.iter_blocks(), b.iter_blocks(), strict=True):
        for name in ("input_ids", "topk_ids", "labels"):
            assert np.array_equal(x.columns[name].values, y.columns[name].values), name


def test_ddp_ranks_stream_from_s3_as_from_a_local_copy(remote_setup, tmp_path):
    """Two torchrun ranks on gloo, sharing one --cache-dir, train from the object store the student
    they train from a local copy of it, bit for bit."""
    env = {**remote_setup["env"], "OMP_NUM_THREADS": "1"}
    local = [str(download(url, tmp_path / f"copy{i}")) for i, url in enumerate(remote_setup["caches"])]
    common = ["--method", "mergedistill", "--vocab", remote_setup["vocab"], "--steps", "3", "--batch-size", "4",
              "--hidden", "32", "--layers", "2", "--heads", "2", "--seed", "5", "--device", "cpu"]
    outs = []
    for name, caches, extra in (("s3", remote_setup["caches"], ["--cache-dir", tmp_path / "fetch"]), ("local", local, [])):
        out = tmp_path / f"ddp-{name}"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                               "127.0.0.1", "--master_port", str(port), "-m", "xkd.cli", "train-student", "--caches",
                               *caches, "--out", str(out), *map(str, common), *map(str, extra)],
                              capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        outs.append((out / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("folder", ["../../outside", "00000-0000000000000000", "/tmp"])
def test_a_shard_folder_other_than_its_digest_is_refused(remote_setup, tmp_path, folder):
    """A shard's folder comes from the manifest: one that is not <id>-<its digest> (a path out of the
    cache, another shard's name) is a damaged manifest, refused before any file is opened."""
    copy = download(remote_setup["caches"][1], tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["shards"][0]["dir"] != folder
    manifest["shards"][0]["dir"] = folder
    (copy / "manifest.json").write_text(json.dumps(manifest))
    proc = run_xkd("verify", copy)
    assert proc.returncode == 2, proc.stderr
    assert "names its folder" in proc.stderr


def test_a_file_digest_that_is_not_a_sha256_is_refused(remote_setup, tmp_path):
    """A file's sha256 names its entry in the local fetch cache: an edited one that is a path (here,
    out of --cache-dir) is a damaged manifest, refused before anything is fetched or written."""
    url = unique_prefix_url("planted-digest")
    source = Remote(remote_setup["caches"][1])
    target = Remote(url)
    for name in source.list():
        target.put(name, source.get(name))
    manifest = json.loads(target.get("manifest.json"))
    rel = sorted(manifest["shards"][0]["files"])[0]
    manifest["shards"][0]["files"][rel][1] = "../../../../" + str(tmp_path / "planted")
    target.put("manifest.json", json.dumps(manifest).encode())
    proc = run_xkd("verify", url, env=remote_setup["env"])
    assert proc.returncode == 2, proc.stderr
    assert "64 hex digits" in proc.stderr
    with pytest.raises(Exception, match="not a sha256"):
        FetchCache(tmp_path / "fetch").object(target, f"shards/x/{rel}", 1, "../../../../" + str(tmp_path / "planted"))
    assert not list(tmp_path.glob("planted*"))
