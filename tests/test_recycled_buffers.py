"""Recycled buffers (xkd/storage/reader.py, RecycledBuffers): DirectArray.read's arrays and the
loader's batch values live in buffers that are handed out again once nothing references them.
A buffer handed out while something still used it would show as values changing under their
holder; the loader's batches, its current windows and the window read ahead all hold such
buffers at once."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_student_data import take

from xkd.storage import (
    CacheWriter,
    DenseSpec,
    open_cache,
    outputs_json,
    reader as reader_module,
    shard as shard_module,
    write_shard_files,
)
from xkd.storage.reader import DirectArray, RecycledBuffers
from xkd.storage.synthetic import synthetic_rows
from xkd.student.data import StreamConfig, StreamingDataset

MB = 1 << 20


def address(array: np.ndarray | torch.Tensor) -> int:
    return array.data_ptr() if isinstance(array, torch.Tensor) else array.__array_interface__["data"][0]


def kept_bytes(pool: RecycledBuffers) -> int:
    """Bytes the pool holds, handed out or free (no public count: the pool is a free list)."""
    return sum(len(buf) for buf in pool._buffers)


# What may hold a buffer's memory: made from the array `take` returned, which is then dropped.
HOLDERS = {
    "view": lambda a: a.view(np.float32).reshape(-1, 16),
    "slice": lambda a: a[64:128],
    "view of a slice": lambda a: a[64:].view(np.int32)[3:9],
    "torch.from_numpy": lambda a: torch.from_numpy(a.view(np.float32)),
    "tensor view of a tensor": lambda a: torch.from_numpy(a.view(np.float16))[10:30].view(torch.int16),
}


@pytest.mark.parametrize("holder", HOLDERS)
def test_a_buffer_is_not_handed_out_while_anything_made_from_it_lives(holder):
    pool = RecycledBuffers()
    first = pool.take(MB)
    home = address(first)
    first[:] = 7
    held = HOLDERS[holder](first)
    want = held.clone() if isinstance(held, torch.Tensor) else held.copy()
    del first
    for _ in range(3):  # taken, written over and dropped again: the held memory must not be among them
        other = pool.take(MB)
        assert not home <= address(other) < home + MB + MB // 8
        other[:] = 0
    assert (torch.equal(held, want) if isinstance(held, torch.Tensor) else np.array_equal(held, want))
    kept = pool.take(MB)  # one buffer handed out, so the next take cannot pick it
    del held
    assert address(pool.take(MB)) == home  # nothing holds it any more: recycled
    del kept


def test_a_tensor_kept_after_its_array_is_deleted_keeps_the_buffer():
    pool = RecycledBuffers()
    array = pool.take(MB).view(np.float32)
    array[:] = np.arange(len(array), dtype=np.float32)
    tensor = torch.from_numpy(array)
    home = address(array)
    del array
    taken = [pool.take(MB) for _ in range(3)]
    for other in taken:
        assert address(other) != home
        other[:] = 0xFF
    assert torch.equal(tensor, torch.arange(MB // 4, dtype=torch.float32))
    del tensor
    assert address(pool.take(MB)) == home


def test_direct_reads_keep_what_an_earlier_read_returned(monkeypatch, tmp_path):
    """DirectArray.read through its pool: an earlier read's rows, held as a slice and as a
    tensor, keep their values while later reads of other rows land in other buffers; once
    dropped, the next read of that size reuses the buffer."""
    monkeypatch.setattr(reader_module, "READ_BUFFERS", RecycledBuffers())  # a fresh one: no other test's free buffers
    monkeypatch.setattr(shard_module, "ZARR_CHUNK_BYTES", 64 * 256 * 2)  # several chunks
    data = np.random.default_rng(3).standard_normal((512, 256)).astype(np.float16)
    shard_module._write_zarr(tmp_path / "z", {"h": data}, {"h": DenseSpec("h", "row", 256)}, {"h": 512},
                             (np.zeros(0, np.int64), np.zeros(0, np.int64)))
    direct = DirectArray.of(tmp_path / "z" / "h")
    assert direct is not None
    rows = direct.read(0, 256)
    home = address(rows)
    part, tensor = rows[10:90], torch.from_numpy(rows[100:200])
    del rows
    later = [direct.read(256, 512), direct.read(128, 384)]
    assert all(address(r) != home for r in later)
    assert np.array_equal(part, data[10:90]) and np.array_equal(tensor.numpy(), data[100:200])
    assert np.array_equal(later[0], data[256:]) and np.array_equal(later[1], data[128:384])
    del part
    assert address(direct.read(0, 256)) != home  # the tensor still holds it
    del tensor
    assert address(direct.read(0, 256)) == home


@pytest.mark.parametrize("floor", [0, 4 * MB])
def test_free_bytes_kept_follow_the_bytes_in_use(floor):
    """Free buffers are kept up to the bytes in use, or the floor where that is more: after a
    burst of large buffers, a small working set does not keep the burst's memory."""
    pool = RecycledBuffers(floor=floor)
    burst = [pool.take(MB) for _ in range(16)]
    assert kept_bytes(pool) >= 16 * MB
    del burst
    small = pool.take(MB)  # reuses one of the burst's buffers
    in_use = len(small.base)
    assert kept_bytes(pool) - in_use <= max(in_use, floor)
    assert kept_bytes(pool) - in_use > max(in_use, floor) - 2 * MB  # and does not drop more than it must
    # A larger working set keeps more free bytes: with 8 buffers in use, the 5 free ones stay.
    held = [pool.take(MB) for _ in range(12)]
    del held[6:]
    held.append(pool.take(MB))
    size = len(small.base)
    assert kept_bytes(pool) - 8 * size == 5 * size > floor


# The loader: batches equal with and without the window read ahead --------------------------

DENSE = {"hidden.1": DenseSpec("hidden.1", "token", 256), "cls": DenseSpec("cls", "row", 32, "float32")}
ROW_GROUP = 8


@pytest.fixture(scope="module")
def dense_cache(tmp_path_factory):
    """Two shards of hidden states (codec "none": read by DirectArray into the pool), each row
    group one language, so the loader's windows keep the read buffers themselves (no copy of
    a row group's rows is taken when all of them are wanted)."""
    root = tmp_path_factory.mktemp("dense") / "cache"
    meta = {"teacher": {"name": "t"}, "corpus": {}, "view": {}, "outputs": outputs_json(4, DENSE)}
    with CacheWriter(root, "key-dense", meta, planned_shards=2) as writer:
        first = 0
        for shard_id, n in enumerate((96, 80)):
            rows, dense = synthetic_rows(shard_id, n, vocab=500, k=4, first_example_id=first, max_len=40, dense_specs=DENSE)
            group = (np.arange(first, first + n) // ROW_GROUP) % 3
            rows["lang"] = np.where(group == 0, "hi", "en").astype(object)
            writer.commit(write_shard_files(root, shard_id, rows, dense, DENSE, has_topk=True, row_group_size=ROW_GROUP))
            first += n
        writer.finish()
    return root


def collate_sharing(rows):
    """The batch's dense values as tensors over the loader's own arrays (no copy): a buffer
    reused under a kept batch changes what the batch holds."""
    out = {"example_id": torch.from_numpy(rows["example_id"].astype(np.int64)), "source": torch.from_numpy(rows["source"])}
    for name in DENSE:
        out[name] = torch.from_numpy(rows[name].values)
        out[f"{name}.offsets"] = torch.from_numpy(rows[name].offsets)
    return out


def make_dataset(path):
    config = StreamConfig(batch_size=8, seed=11, shuffle_window=2, columns=("example_id", "input_ids"), dense=tuple(DENSE))
    return StreamingDataset([open_cache(path)], config, collate=collate_sharing)


def synchronous_batches(ds: StreamingDataset, n: int) -> list[dict]:
    """The loader's batches with each window read when a batch first needs it: __iter__ is
    what starts the reader thread; without it (ds._reader is None) _read_ahead does nothing."""
    assert ds._reader is None
    return take(ds._batches(0, 0, np.zeros(len(ds.langs), dtype=np.int64), 0, 1), n)


def reading_threads(ds: StreamingDataset) -> list[str]:
    """Records which thread reads each row group (the real read, spied on)."""
    cache, names = ds.caches[0], []
    read = cache.read_block

    def spy(*args, **kwargs):
        names.append(threading.current_thread().name)
        return read(*args, **kwargs)

    cache.read_block = spy
    return names


def assert_rows_hold_their_values(batches: list[dict], expected: dict) -> None:
    for i, batch in enumerate(batches):
        for b, example_id in enumerate(batch["example_id"].tolist()):
            for name in DENSE:
                off = batch[f"{name}.offsets"]
                got = batch[name][int(off[b]) : int(off[b + 1])].numpy()
                assert np.array_equal(got, expected[example_id][name]), (i, example_id, name)


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.keys() - {"loader_state"} == b.keys() - {"loader_state"}, i
        for name in a.keys() - {"loader_state"}:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (i, name)


def test_batches_are_identical_with_and_without_the_read_ahead(dense_cache):
    """Every batch kept until the end: a buffer recycled under a live batch, under the window
    batches still gather from, or under the window being read ahead, shows as changed values.
    Each row is checked against its values read independently (copied out of the pool), and
    whole batches against the loader's synchronous ones, in process and from 2 workers."""
    expected = {}
    for block in open_cache(dense_cache).iter_blocks(dense=tuple(DENSE)):
        for i, example_id in enumerate(block.columns["example_id"].tolist()):
            expected[example_id] = {name: block.dense_rows(name, i).copy() for name in DENSE}
    assert len(expected) == 176
    n = 60  # 480 rows: over two epochs of either language, 10+ windows each

    reference = make_dataset(dense_cache)
    threads = reading_threads(reference)
    sync = synchronous_batches(reference, n)
    assert threads and set(threads) == {threading.main_thread().name}
    assert_rows_hold_their_values(sync, expected)
    assert max(int(batch[name].numel()) * batch[name].element_size() for batch in sync for name in DENSE) >= 1 << 16

    ahead = make_dataset(dense_cache)
    threads = reading_threads(ahead)
    in_process = take(ahead, n)
    assert sum(name.startswith("xkd-window") for name in threads) > len(threads) // 2  # read ahead, mostly
    assert_rows_hold_their_values(in_process, expected)
    assert_same_batches(in_process, sync)

    loader = torch.utils.data.DataLoader(make_dataset(dense_cache), batch_size=None, num_workers=2)
    from_workers = take(loader, n)
    assert_rows_hold_their_values(from_workers, expected)
    assert_same_batches(from_workers, sync)
    assert_rows_hold_their_values(sync, expected)  # and the first batches, after all the rest were made
