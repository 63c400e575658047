"""Dense outputs in schema 2: per-output codecs read by the direct chunk reader, attention
stored as only each row's real keys, and schema-1 caches still reading as they did.

tests/data/v1-dense-cache was written by the schema-1 writer (zstd chunks, attention padded
to max_length) before schema 2 existed; tests/data/v1-dense-cache.expected.npz holds what the
schema-1 reader returned for it, row by row. Schema-2 caches here hold the same rows and
values, rewritten by today's writer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

import xkd
from xkd.cli import app
from xkd.errors import XkdError
from xkd.storage import DenseSpec, Ragged, shard as shard_module, verify_cache
from xkd.storage.reader import DirectArray
from xkd.storage.schema import pack_keys, unpack_keys
from xkd.student.data import StreamConfig, StreamingDataset, padded_dense
from xkd.student.methods.tinybert import unpack_attention

DATA = Path(__file__).parent / "data"
V1 = DATA / "v1-dense-cache"
HEADS, MAX_LENGTH = 2, 16  # the fixture's teacher


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> Path:
    """A copy of the schema-1 fixture (commands may write a lock next to it)."""
    out = tmp_path_factory.mktemp("v1") / "cache"
    shutil.copytree(V1, out)
    return out


def rewrite(source: Path, out: Path, codec: str = "none", layout: str = "keys") -> Path:
    """The same rows and values as `source`, written by today's writer with `codec` and
    attention in `layout` (row groups of 4 rows: several per shard)."""
    from xkd.storage.convert import rewrite_cache

    return rewrite_cache(source, out, codec=codec, attention_layout=layout, row_group_size=4)


@pytest.fixture(scope="module")
def v2(v1, tmp_path_factory) -> Path:
    return rewrite(v1, tmp_path_factory.mktemp("v2") / "cache")


def expected_rows() -> list[dict]:
    stored = np.load(DATA / "v1-dense-cache.expected.npz")
    rows: dict[int, dict] = {}
    for key in stored.files:
        i, name = key.split("/", 1)
        rows.setdefault(int(i), {})[name] = stored[key]
    return [rows[i] for i in sorted(rows)]


def assert_rows_equal(cache: Path) -> None:
    expected = expected_rows()
    got = list(xkd.open_cache(cache).iter_examples())
    assert len(got) == len(expected) == 14
    for row, want in zip(got, expected):
        assert set(row) == set(want)
        for name, value in want.items():
            value_got = np.asarray(row[name])
            assert value_got.dtype == value.dtype and value_got.shape == value.shape, name
            assert np.array_equal(value_got, value, equal_nan=value.dtype.kind == "f"), name


def test_a_schema_1_cache_reads_as_the_schema_1_reader_read_it(v1):
    assert xkd.open_cache(v1).manifest["schema_version"] == 1
    assert_rows_equal(v1)
    assert verify_cache(v1)["status"] == "ok"


def test_schema_2_stores_only_real_keys_and_reads_the_same_values(v1, v2):
    cache = xkd.open_cache(v2)
    assert cache.manifest["schema_version"] == 2
    assert cache.dense_specs["attn.2"].layout == "keys" and cache.dense_specs["hidden.0"].codec == "none"
    assert_rows_equal(v2)
    # Per row of n tokens, n x heads x n values; the schema-1 array held tokens x heads x 16.
    lengths = [len(r["input_ids"]) for r in expected_rows()]
    stored = sum(zarr.open_group(str(v2 / "shards" / f"{s:05d}.zarr"), mode="r")["attn.2"].shape[0] for s in (0, 1))
    assert stored == sum(n * n * HEADS for n in lengths) < sum(n * HEADS * MAX_LENGTH for n in lengths)
    assert verify_cache(v2)["status"] == "ok"


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_every_codec_round_trips_exactly(v1, tmp_path, codec):
    cache = rewrite(v1, tmp_path / codec, codec=codec)
    assert_rows_equal(cache)
    # Only codec "none" is read directly; the others go through zarr.
    assert xkd.open_cache(cache).direct_array(0, "hidden.0") is None


def test_packed_and_padded_attention_unpack_to_the_same_maps():
    rng = np.random.default_rng(0)
    lengths = np.array([3, 5, 1])
    padded = np.zeros((lengths.sum(), HEADS, MAX_LENGTH), np.float16)
    reference = np.zeros((3, HEADS, 5, 5), np.float16)  # (row, head, query, key)
    t = 0
    for r, n in enumerate(lengths):
        maps = rng.random((HEADS, n, n)).astype(np.float16)
        reference[r, :, :n, :n] = maps
        padded[t:t + n, :, :n] = maps.transpose(1, 0, 2)
        t += n
    padded = padded.reshape(len(padded), -1)
    packed = pack_keys(padded, lengths, HEADS)
    assert packed.size == (lengths**2).sum() * HEADS
    assert np.array_equal(unpack_keys(packed, lengths, HEADS, MAX_LENGTH), padded)
    token_offsets = np.concatenate([[0], np.cumsum(lengths)])
    key_offsets = np.concatenate([[0], np.cumsum(lengths**2 * HEADS)])
    from_packed = unpack_attention(Ragged(packed, key_offsets), 5, HEADS, MAX_LENGTH)
    from_padded = unpack_attention(Ragged(padded, token_offsets), 5, HEADS, MAX_LENGTH)
    assert from_packed.dtype == torch.float16
    assert np.array_equal(from_packed.numpy(), reference)
    assert np.array_equal(from_padded.numpy(), reference.astype(np.float32))


def test_padded_dense_pads_with_zeros_in_the_stored_dtype():
    values = np.arange(1, 13, dtype=np.float16).reshape(6, 2)
    ragged = Ragged(values, np.array([0, 1, 1, 6]))
    out = padded_dense(ragged, 7)
    expected = np.zeros((3, 7, 2), np.float16)
    expected[0, :1], expected[2, :5] = values[:1], values[1:]
    assert out.dtype == torch.float16 and np.array_equal(out.numpy(), expected)
    out = padded_dense(ragged)  # the longest row's width
    assert out.shape == (3, 5, 2) and np.array_equal(out.numpy(), expected[:, :5])


@pytest.mark.parametrize("cache_name", ["v1", "v2", "both"])
def test_the_loader_gathers_each_rows_values_in_both_layouts(v1, v2, cache_name):
    """The loader's hidden states and packed attention, padded as tinybert pads them, equal
    each row's values from iter_examples (the schema-1 reader's, see the fixture)."""
    paths = {"v1": [v1], "v2": [v2], "both": [v1, v2]}[cache_name]
    caches = [xkd.open_cache(p) for p in paths]
    dense = ("hidden.0", "hidden.2", "attn.2")
    ds = StreamingDataset(caches, StreamConfig(batch_size=5, columns=("example_id", "input_ids"), dense=dense))
    reference = {(int(r["example_id"])): r for r in expected_rows()}
    seen = 0
    for batch, _ in zip(ds, range(6)):
        lengths = batch["input_ids"].lengths()
        width = int(lengths.max())
        hidden = padded_dense(batch["hidden.0"], width).numpy()
        words = padded_dense(batch["hidden.2"]).numpy()
        maps = unpack_attention(batch["attn.2"], width, HEADS, MAX_LENGTH).numpy()
        for b, example_id in enumerate(batch["example_id"].tolist()):
            want, n = reference[example_id], lengths[b]
            assert np.array_equal(hidden[b, :n], want["hidden.0"]) and not hidden[b, n:].any()
            assert np.array_equal(words[b, :len(want["hidden.2"])], want["hidden.2"])
            cube = want["attn.2"].reshape(n, HEADS, MAX_LENGTH)
            assert np.array_equal(maps[b, :, :n, :n], cube[:, :, :n].transpose(1, 0, 2))
            assert not maps[b, :, n:].any() and not maps[b, :, :, n:].any()
            seen += 1
    assert seen == 30


def test_direct_reads_equal_zarrs_across_chunk_boundaries(monkeypatch, tmp_path):
    """Spans that start and end inside chunks, cover whole ones, and end at the short last
    chunk: the direct reader returns what zarr returns."""
    monkeypatch.setattr(shard_module, "ZARR_CHUNK_BYTES", 7 * 3 * 2)  # 7 rows of 3 fp16 per chunk
    rng = np.random.default_rng(1)
    data = rng.standard_normal((50, 3)).astype(np.float16)
    shard_module._write_zarr(tmp_path / "z", {"h": data}, {"h": DenseSpec("h", "row", 3)}, {"h": 50},
                             (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    direct = DirectArray.of(tmp_path / "z" / "h")
    assert direct is not None and direct.chunk_rows < 50
    array = zarr.open_array(str(tmp_path / "z" / "h"), mode="r")
    for start, stop in [(0, 50), (0, 1), (3, 4), (5, 22), (direct.chunk_rows, 2 * direct.chunk_rows), (44, 50), (10, 10)]:
        got = direct.read(start, stop)
        assert np.array_equal(got, array[start:stop]) and np.array_equal(got, data[start:stop])


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_raw_chunks_fail_the_reader_and_verify(v2, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(v2, cache)
    chunk = cache / "shards" / "00001.zarr" / "attn.2" / "c" / "0"
    if damage == "flip":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 3] ^= 0x01
        chunk.write_bytes(bytes(data))
    elif damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[:-6])
    else:
        chunk.unlink()
    with pytest.raises(XkdError, match=r"shard 1 is damaged: 00001.zarr/attn.2 cannot be read"):
        list(xkd.open_cache(cache).iter_blocks(shards=[1]))
    assert len(list(xkd.open_cache(cache).iter_blocks(shards=[1], dense=["hidden.0"]))) == 2  # other arrays read
    result = CliRunner().invoke(app, ["verify", str(cache)])
    assert result.exit_code == 1 and "00001.zarr/attn.2/c/0" in result.output + str(result.stderr)
