"""The cache format through its public API: round trips, exactness, lazy reads, keys, writers.

Real Parquet and Zarr files on disk; the data are synthetic rows with realistic statistics
(xkd.storage.synthetic) plus edge rows (nothing masked, no word starts).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import xkd
from xkd.cli import app
from xkd.errors import XkdError
from xkd.storage import (
    CacheWriter,
    DenseSpec,
    Ragged,
    cache_key,
    inspect_cache,
    outputs_json,
    verify_cache,
    write_shard_files,
)
from xkd.storage.synthetic import synthetic_rows

K = 4
ROWS = 90
ROW_GROUP = 40  # 3 row groups per shard, the last one short
DENSE = {
    "hidden.2": DenseSpec("hidden.2", "token", 8),
    "hidden.0": DenseSpec("hidden.0", "word", 4, "float32"),
    "cls": DenseSpec("cls", "row", 8),
    "class_logits": DenseSpec("class_logits", "row", 3, "float32"),
}
TEACHER = {"name": "synthetic", "weights_sha256": "ab" * 32, "tokenizer_sha256": "cd" * 32}
CORPUS = {"spec": "text:corpus.txt@en", "fingerprint": "ef" * 16}
VIEW = {"max_length": 128, "mask_prob": 0.15, "seed": 0, "mask_epochs": 1, "k": K}


def _as_rows(ragged: Ragged) -> list[np.ndarray]:
    return [ragged.row(i).copy() for i in range(len(ragged))]


def make_shard(shard_id: int) -> tuple[dict, dict]:
    """Synthetic rows plus the edge cases real corpora have, with text and pair columns."""
    rows, _ = synthetic_rows(shard_id, ROWS, k=K, first_example_id=1000 * shard_id, max_len=40)
    ids, words = _as_rows(rows["input_ids"]), _as_rows(rows["word_start"])
    masked, labels = _as_rows(rows["masked_positions"]), _as_rows(rows["labels"])
    topk_ids, topk_logits, lognorm = (_as_rows(rows[c]) for c in ("topk_ids", "topk_logits", "lognorm"))
    # Row 1: nothing masked (a short sentence can draw no mask); its loss is NaN.
    masked[1], labels[1] = masked[1][:0], labels[1][:0]
    topk_ids[1], topk_logits[1], lognorm[1] = topk_ids[1][:0], topk_logits[1][:0], lognorm[1][:0]
    rows["teacher_loss"][1] = np.nan
    # Row 2: no word starts, so word-aligned arrays have no entries for it.
    words[2][:] = False
    rows.update(
        input_ids=Ragged.from_rows(ids, np.uint32),
        word_start=Ragged.from_rows(words, np.bool_),
        masked_positions=Ragged.from_rows(masked, np.uint16),
        labels=Ragged.from_rows(labels, np.uint32),
        topk_ids=Ragged.from_rows(topk_ids, np.uint32),
        topk_logits=Ragged.from_rows(topk_logits, np.float16),
        lognorm=Ragged.from_rows(lognorm, np.float32),
    )
    rows["pair_id"] = np.arange(ROWS, dtype=np.int64) // 2 + 1000 * shard_id
    rows["side"] = np.array(["src", "tgt"] * (ROWS // 2), dtype=object)
    rows["class_label"] = (np.arange(ROWS) % 3).astype(np.int32)
    rows["text"] = np.array([f"sentence {shard_id}-{i} ünï" for i in range(ROWS)], dtype=object)
    rows["pair_text"] = np.array([f"वाक्य {shard_id}-{i}" for i in range(ROWS)], dtype=object)
    rng = np.random.default_rng(100 + shard_id)
    n_tokens, n_words = len(rows["input_ids"].values), int(rows["word_start"].values.sum())
    count = {"row": ROWS, "token": n_tokens, "word": n_words}
    dense = {n: rng.standard_normal((count[s.align], s.dim)).astype(s.dtype) for n, s in DENSE.items()}
    return rows, dense


def write_cache(root, shard_ids=(0, 1), planned=2, finish=True) -> dict:
    data = {}
    meta = {"teacher": TEACHER, "corpus": CORPUS, "view": VIEW, "outputs": outputs_json(K, DENSE, text=True)}
    with CacheWriter(root, cache_key(TEACHER, CORPUS, VIEW), meta, planned_shards=planned) as writer:
        for shard_id in shard_ids:
            rows, dense = data[shard_id] = make_shard(shard_id)
            writer.commit(write_shard_files(root, shard_id, rows, dense, DENSE, has_topk=True, has_text=True,
                                            row_group_size=ROW_GROUP))
        if finish:
            writer.finish()
    return data


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache") / "c"
    return root, write_cache(root)


def expected_examples(data: dict):
    """Per-example dicts computed from the input arrays, independently of the reader."""
    for shard_id in sorted(data):
        rows, dense = data[shard_id]
        token_ends = rows["input_ids"].offsets
        word_ends = np.concatenate([[0], np.cumsum([r.sum() for r in _as_rows(rows["word_start"])])])
        for i in range(ROWS):
            ex = {name: rows[name][i] for name in
                  ("example_id", "pair_id", "lang", "side", "mask_epoch", "teacher_loss", "class_label",
                   "text", "pair_text")}
            for name in ("input_ids", "word_start", "masked_positions", "labels", "lognorm"):
                ex[name] = rows[name].row(i)
            ex["topk_ids"] = rows["topk_ids"].row(i).reshape(-1, K)
            ex["topk_logits"] = rows["topk_logits"].row(i).reshape(-1, K)
            for name, spec in DENSE.items():
                ends = {"token": token_ends, "word": word_ends}.get(spec.align)
                ex[name] = dense[name][i] if ends is None else dense[name][ends[i]:ends[i + 1]]
            yield ex


def assert_same_example(got: dict, want: dict):
    assert set(got) == set(want)
    for name, value in want.items():
        if isinstance(value, np.ndarray):
            assert got[name].dtype == value.dtype, name
            assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_round_trip_of_every_column_and_dense_alignment(cache_dir):
    root, data = cache_dir
    cache = xkd.open_cache(root)
    assert len(cache) == 2 * ROWS
    assert cache.topk_k == K and cache.has_text and set(cache.dense_specs) == set(DENSE)
    got = list(cache.iter_examples())
    want = list(expected_examples(data))
    assert len(got) == len(want) == 2 * ROWS
    for g, w in zip(got, want):
        assert_same_example(g, w)
    # The edge rows really are edge rows.
    assert got[1]["topk_ids"].shape == (0, K) and np.isnan(got[1]["teacher_loss"])
    assert got[2]["hidden.0"].shape == (0, 4)


def test_examples_by_id_returns_exactly_that_example(cache_dir):
    root, data = cache_dir
    cache = xkd.open_cache(root)
    want = {int(ex["example_id"]): ex for ex in expected_examples(data)}
    for example_id in (0, 39, 40, 89, 1000, 1085):
        (got,) = cache.examples_by_id(example_id)
        assert_same_example(got, want[example_id])
    assert cache.examples_by_id(90) == [] and cache.examples_by_id(10**12) == []


def test_read_block_reads_only_its_row_group(cache_dir, tmp_path):
    """With row group 0's pages corrupted, row groups 1 and 2 still read: nothing else is touched."""
    import shutil

    root = tmp_path / "c"
    shutil.copytree(cache_dir[0], root)
    data = cache_dir[1]
    path = root / "shards" / "00001.parquet"
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [40, 40, 10]
    chunk = meta.row_group(0).column(meta.schema.to_arrow_schema().get_field_index("topk_ids"))
    with open(path, "r+b") as f:  # one bit, in the middle of row group 0's topk_ids pages
        f.seek(chunk.data_page_offset + chunk.total_compressed_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))

    cache = xkd.open_cache(root)
    want = [ex for ex in expected_examples(data) if ex["example_id"] >= 1000]
    block = cache.read_block(1, 1)
    assert block.num_rows == 40 and block.shard_id == 1
    assert block.dense["hidden.2"].shape[0] == sum(len(w["input_ids"]) for w in want[40:80])
    for i in range(block.num_rows):
        assert_same_example(block.example(i), want[40 + i])
    last = cache.read_block(1, 2, columns=["topk_ids", "topk_logits", "lognorm"], dense=())
    assert last.num_rows == 10 and last.dense == {}
    assert set(last.columns) == {"example_id", "topk_ids", "topk_logits", "lognorm"}
    np.testing.assert_array_equal(last.columns["topk_ids"].values,
                                  np.concatenate([w["topk_ids"].ravel() for w in want[80:]]))
    (found,) = cache.examples_by_id(1085)  # statistics lead it past row group 0
    assert_same_example(found, want[85])
    with pytest.raises(XkdError, match=r"shard 1 is damaged: 00001.parquet cannot be read"):
        cache.read_block(1, 0)


def test_iter_blocks_with_selected_columns_and_dense(cache_dir):
    root, data = cache_dir
    cache = xkd.open_cache(root)
    want = list(expected_examples(data))
    blocks = list(cache.iter_blocks(columns=["labels"], dense=["hidden.0"]))
    assert [b.num_rows for b in blocks] == [40, 40, 10, 40, 40, 10]
    rows = [b.example(i) for b in blocks for i in range(b.num_rows)]
    for got, w in zip(rows, want):
        np.testing.assert_array_equal(got["labels"], w["labels"])
        np.testing.assert_array_equal(got["hidden.0"], w["hidden.0"])
        assert "hidden.2" not in got and "topk_ids" not in got


def test_reading_a_shard_that_was_never_committed_is_refused(tmp_path):
    root = tmp_path / "c"
    write_cache(root, shard_ids=(0,), planned=2, finish=False)
    rows, dense = make_shard(1)  # written but not committed, as a killed run leaves it
    write_shard_files(root, 1, rows, dense, DENSE, has_topk=True, has_text=True, row_group_size=ROW_GROUP)
    cache = xkd.open_cache(root)
    assert cache.shard_ids == [0] and len(cache) == ROWS
    assert [int(e["example_id"]) for e in cache.iter_examples(columns=["lang"], dense=())] == list(range(ROWS))
    assert cache.examples_by_id(1000) == []
    with pytest.raises(XkdError, match=r"has no finished shard 1; its finished shards are \[0\]"):
        cache.read_block(1, 0)
    # The finished shard is sound; the cache is incomplete, not ok (shard 1 was never committed).
    report = verify_cache(root)
    assert report["problems"] == {} and report["status"] == "incomplete" and report["missing_shards"] == [1]


def test_exact_topk_probabilities_and_tail_mass(tmp_path):
    """p = exp(logit - lognorm) and tail = 1 - sum(p) from the cache equal the full softmax,
    to within what fp16 storage of the logits allows."""
    import torch

    vocab, k, hidden = 3000, 16, 64
    rows, _ = synthetic_rows(7, 60, vocab=vocab, k=k, max_len=48)
    n = len(rows["lognorm"].values)
    gen = torch.Generator().manual_seed(0)
    # An MLM head's logits: context . embedding, a log-frequency prior, and a per-position
    # sharpness so that some positions are confident and others flat.
    context = torch.randn(n, hidden, generator=gen)
    embedding = torch.randn(vocab, hidden, generator=gen) / hidden**0.5
    prior = -torch.log(torch.arange(1, vocab + 1, dtype=torch.float32))
    sharpness = torch.empty(n, 1).uniform_(0.5, 4.0, generator=gen)
    logits = (sharpness * (context @ embedding.T) + prior + 8.0).float()
    top = torch.topk(logits, k, dim=-1)
    lognorm = torch.logsumexp(logits, dim=-1)
    split = rows["lognorm"].offsets
    rows["topk_ids"] = Ragged(top.indices.numpy().astype(np.uint32).ravel(), split * k)
    rows["topk_logits"] = Ragged(top.values.numpy().astype(np.float16).ravel(), split * k)
    rows["lognorm"] = Ragged(lognorm.numpy(), split)
    root = tmp_path / "c"
    with CacheWriter(root, "exact", {"outputs": outputs_json(k, {})}) as writer:
        writer.commit(write_shard_files(root, 0, rows, has_topk=True))
        writer.finish()

    examples = list(xkd.open_cache(root).iter_examples())
    ids = np.concatenate([e["topk_ids"] for e in examples])
    stored = np.concatenate([e["topk_logits"] for e in examples])
    stored_lognorm = np.concatenate([e["lognorm"] for e in examples])
    assert stored.dtype == np.float16 and stored_lognorm.dtype == np.float32
    np.testing.assert_array_equal(ids, top.indices.numpy())
    np.testing.assert_array_equal(stored, top.values.numpy().astype(np.float16))
    np.testing.assert_array_equal(stored_lognorm, lognorm.numpy())

    p = np.exp(stored.astype(np.float64) - stored_lognorm[:, None].astype(np.float64))
    tail = 1.0 - p.sum(axis=1)
    full = torch.softmax(logits.double(), dim=-1).numpy()
    true_p = np.take_along_axis(full, ids.astype(np.int64), axis=1)
    true_tail = 1.0 - true_p.sum(axis=1)
    assert true_p[:, 0].min() < 0.1 and true_p[:, 0].max() > 0.9  # flat and confident positions
    assert true_tail.min() < 0.05 and true_tail.max() > 0.5

    # fp16 rounds a logit l by at most half an ulp, 2**(floor(log2|l|) - 11), which scales
    # p by at most exp(that); fp32 lognorm adds a few fp32 ulps of |lognorm|.
    exact = top.values.numpy().astype(np.float64)
    half_ulp = 2.0 ** (np.floor(np.log2(np.abs(exact))) - 11)
    lognorm_err = 4 * np.finfo(np.float32).eps * np.abs(lognorm.numpy().astype(np.float64))[:, None]
    p_bound = true_p * np.expm1(half_ulp + lognorm_err)
    assert np.all(np.abs(p - true_p) <= p_bound)
    assert np.all(np.abs(tail - true_tail) <= p_bound.sum(axis=1) + 1e-12)
    # The bound is tight, not a loose tolerance: observed errors reach most of it.
    assert np.max(np.abs(p - true_p) / p_bound) > 0.5


def test_cache_key_follows_teacher_corpus_and_view():
    key = cache_key(TEACHER, CORPUS, VIEW)
    assert len(key) == 16 and int(key, 16) >= 0
    reordered = (dict(reversed(TEACHER.items())), dict(reversed(CORPUS.items())), dict(reversed(VIEW.items())))
    assert cache_key(*reordered) == key == cache_key(dict(TEACHER), dict(CORPUS), dict(VIEW))
    changed = [
        cache_key({**TEACHER, "tokenizer_sha256": "00" * 32}, CORPUS, VIEW),
        cache_key({**TEACHER, "weights_sha256": "00" * 32}, CORPUS, VIEW),
        cache_key(TEACHER, {**CORPUS, "fingerprint": "00" * 16}, VIEW),
        cache_key(TEACHER, CORPUS, {**VIEW, "seed": 1}),
        cache_key(TEACHER, CORPUS, {**VIEW, "k": K + 1}),
        cache_key(TEACHER, CORPUS, {**VIEW, "mask_epochs": 2}),
    ]
    assert len({key, *changed}) == len(changed) + 1


def test_reopening_with_another_key_is_refused(cache_dir):
    root, _ = cache_dir
    before = (root / "manifest.json").read_bytes()
    other = cache_key(TEACHER, CORPUS, {**VIEW, "seed": 1})
    with pytest.raises(XkdError) as err:
        with CacheWriter(root, other, {}):
            pass
    message = str(err.value)
    assert str(root) in message and cache_key(TEACHER, CORPUS, VIEW) in message and other in message
    assert (root / "manifest.json").read_bytes() == before
    with CacheWriter(root, cache_key(TEACHER, CORPUS, VIEW), {}):  # the refusal released the lock
        pass


def test_second_writer_on_one_cache_is_refused_naming_the_first(tmp_path):
    root = tmp_path / "c"
    with CacheWriter(root, "k1", {}) as first:
        with pytest.raises(XkdError, match=rf"being written by another xkd process \(pid {os.getpid()} on "):
            with CacheWriter(root, "k1", {}):
                pass
        assert first.manifest["key"] == "k1"
    with CacheWriter(root, "k1", {}):  # released on exit
        pass


def test_resumed_writer_skips_done_shards_and_forgets_damaged_ones(tmp_path):
    root = tmp_path / "c"
    data = write_cache(root, shard_ids=(0, 1), planned=3, finish=False)
    key = cache_key(TEACHER, CORPUS, VIEW)
    with CacheWriter(root, key, {}, planned_shards=3) as writer:
        assert writer.done_shards() == {0, 1} and writer.damaged == {}
        assert not writer.manifest["complete"]
    parquet = root / "shards" / "00001.parquet"
    size = parquet.stat().st_size
    with open(parquet, "r+b") as f:
        f.truncate(size - 10)
    with CacheWriter(root, key, {}, planned_shards=3) as writer:
        assert writer.done_shards() == {0}
        assert writer.damaged == {1: [f"file 00001.parquet is truncated ({size - 10} of {size} bytes)"]}
        rows, dense = data[1]
        writer.commit(write_shard_files(root, 1, rows, dense, DENSE, has_topk=True, has_text=True,
                                        row_group_size=ROW_GROUP))
        assert writer.done_shards() == {0, 1} and not writer.manifest["complete"]
    assert parquet.stat().st_size == size
    report = verify_cache(root)  # the finished shards are sound; shard 2 is still to do
    assert report["problems"] == {} and report["status"] == "incomplete" and report["missing_shards"] == [2]


def test_inspect_json_matches_the_data_written(cache_dir):
    root, data = cache_dir
    result = CliRunner().invoke(app, ["inspect", str(root), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.strip().splitlines()[-1])
    all_rows = [data[s][0] for s in sorted(data)]
    rows = sum(len(r["example_id"]) for r in all_rows)
    tokens = sum(len(r["input_ids"].values) for r in all_rows)
    masked = sum(len(r["masked_positions"].values) for r in all_rows)
    on_disk = sum(p.stat().st_size for p in (root / "shards").rglob("*") if p.is_file())
    langs = {}
    for r in all_rows:
        for lang in r["lang"]:
            langs[lang] = langs.get(lang, 0) + 1
    assert (info["rows"], info["tokens"], info["masked"], info["shards"]) == (rows, tokens, masked, 2)
    assert info["bytes"] == on_disk
    assert sum(b["bytes"] for b in info["bytes_by_output"].values()) == on_disk
    assert info["languages"] == langs and info["complete"] is True
    assert info["outputs"] == ["topk", "class_logits", "cls", "hidden.0", "hidden.2"] and info["topk_k"] == K
    assert info["bytes_per_masked_position"] == round(on_disk / masked, 3)
    assert info["bytes_per_token"] == round(on_disk / tokens, 3)
    topk = info["bytes_by_output"]["topk_ids"]
    assert topk["per_masked_position"] == round(topk["bytes"] / masked, 3) and topk["bytes"] > 0
    for name in ("topk_ids", "topk_logits", "lognorm", "input_ids", "hidden.2", "cls", "metadata"):
        assert info["bytes_by_output"][name]["bytes"] > 0, name
    assert info == inspect_cache(root) | {"cache": str(root)}

    text = CliRunner().invoke(app, ["inspect", str(root)])
    assert text.exit_code == 0
    assert f"rows       {rows:,} in 2 shards" in text.stdout and f"masked     {masked:,} positions" in text.stdout
    assert "top-k k=4" in text.stdout and "topk_logits" in text.stdout


def test_verify_passes_on_a_sound_cache(cache_dir):
    root, _ = cache_dir
    result = CliRunner().invoke(app, ["verify", str(root)])
    assert result.exit_code == 0 and result.stderr == ""
    assert "ok (2 shards, checksums, schema and offsets verified)" in result.stdout
    report = json.loads(CliRunner().invoke(app, ["verify", str(root), "--json"]).stdout.splitlines()[-1])
    assert report == {"cache": str(root), "ok": True, "status": "ok", "shards_checked": 2, "problems": {},
                      "missing_shards": [], "missing_rows": 0, "planned_shards": 2, "complete": True,
                      "marked_complete": True, "finish": report["finish"]}


def test_same_inputs_give_the_same_bytes(cache_dir, tmp_path):
    root, _ = cache_dir
    again = tmp_path / "again"
    write_cache(again)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name != ".lock")
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file() and p.name != ".lock")
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_shards_use_the_budgeted_encodings(cache_dir):
    """Encoding options name leaf columns; a misspelt one is silently ignored by pyarrow."""
    meta = pq.ParquetFile(cache_dir[0] / "shards" / "00000.parquet").metadata
    group = meta.row_group(0)
    chunks = {group.column(i).path_in_schema.split(".")[0]: group.column(i) for i in range(group.num_columns)}
    for name in ("teacher_loss", "input_ids", "labels", "topk_ids", "topk_logits", "lognorm"):
        assert "BYTE_STREAM_SPLIT" in chunks[name].encodings, name
    for name in ("lang", "side"):
        assert "RLE_DICTIONARY" in chunks[name].encodings, name
    assert {c.compression for c in chunks.values()} == {"ZSTD"}
    assert chunks["example_id"].statistics.has_min_max and chunks["input_ids"].statistics is None
