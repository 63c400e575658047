"""The streaming loader: deterministic, exact resume, no duplicates across workers or
ranks, language sampling by temperature, best-copy selection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from xkd.storage import CacheWriter, open_cache, outputs_json, write_shard_files
from xkd.storage.synthetic import synthetic_rows
from xkd.student.data import StreamConfig, StreamingDataset, language_probabilities


def make_cache(root, *, rows_per_lang: dict, seed=0, loss=lambda ids: ids % 7, shards=2, row_group_size=16, name="t"):
    """A cache whose rows have the given languages; example ids 0..N-1 in corpus order."""
    langs = [lang for lang, n in rows_per_lang.items() for _ in range(n)]
    total = len(langs)
    meta = {"teacher": {"name": name}, "corpus": {}, "view": {}, "outputs": outputs_json(4, {})}
    bounds = np.linspace(0, total, shards + 1).astype(int)
    with CacheWriter(root, f"key-{name}", meta, planned_shards=shards) as writer:
        for s in range(shards):
            lo, hi = bounds[s], bounds[s + 1]
            rows, _ = synthetic_rows(seed * 100 + s, hi - lo, vocab=500, k=4, first_example_id=lo, max_len=20)
            rows["lang"] = np.array(langs[lo:hi], dtype=object)
            rows["teacher_loss"] = loss(np.arange(lo, hi)).astype(np.float32)
            writer.commit(write_shard_files(root, s, rows, has_topk=True, row_group_size=row_group_size))
    return open_cache(root)


def take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def ids_of(batches):
    return [b["example_id"].tolist() for b in batches]


def collate_ids(rows):
    return {"example_id": torch.from_numpy(rows["example_id"].astype(np.int64)),
            "lang": list(rows["lang"]), "source": torch.from_numpy(rows["source"])}


@pytest.fixture(scope="module")
def two_lang_cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("c") / "cache", rows_per_lang={"en": 300, "hi": 60})


def dataset(caches, **kw):
    kw.setdefault("batch_size", 8)
    return StreamingDataset(caches if isinstance(caches, list) else [caches], StreamConfig(**kw), collate=collate_ids)


def test_deterministic_given_seed(two_lang_cache):
    a = ids_of(take(dataset(two_lang_cache, seed=3), 20))
    b = ids_of(take(dataset(two_lang_cache, seed=3), 20))
    c = ids_of(take(dataset(two_lang_cache, seed=4), 20))
    assert a == b
    assert a != c


def test_one_language_epoch_visits_every_row_once(tmp_path):
    cache = make_cache(tmp_path / "c", rows_per_lang={"en": 96}, row_group_size=8)
    ds = dataset(cache, batch_size=8, shuffle_window=3, seed=1)
    seen = sum(ids_of(take(ds, 12)), [])  # 96 rows: exactly one epoch
    assert sorted(seen) == list(range(96))
    assert seen != list(range(96))  # and shuffled
    second = sum(ids_of(take(dataset(cache, batch_size=8, shuffle_window=3, seed=1), 24)[12:]), [])
    assert sorted(second) == list(range(96)) and second != seen  # next epoch, new order


def test_resume_from_state_is_exact(two_lang_cache):
    full = take(dataset(two_lang_cache, seed=5), 30)
    state = full[11]["loader_state"]
    resumed = dataset(two_lang_cache, seed=5)
    resumed.load_state_dict(state)
    assert ids_of(take(resumed, 18)) == ids_of(full[12:])


def test_dataloader_workers_neither_duplicate_nor_drop(two_lang_cache):
    single = ids_of(take(dataset(two_lang_cache, seed=2), 16))
    loader = torch.utils.data.DataLoader(dataset(two_lang_cache, seed=2), batch_size=None, num_workers=2)
    assert ids_of(take(loader, 16)) == single


def test_ranks_split_batches_between_them(two_lang_cache):
    single = ids_of(take(dataset(two_lang_cache, seed=2), 12))
    rank0 = ids_of(take(dataset(two_lang_cache, seed=2, world_size=2, rank=0), 6))
    rank1 = ids_of(take(dataset(two_lang_cache, seed=2, world_size=2, rank=1), 6))
    assert [b for pair in zip(rank0, rank1) for b in pair] == single


def test_language_frequencies_follow_alpha(two_lang_cache):
    alpha = 0.5
    q = language_probabilities({"en": 300, "hi": 60}, alpha)
    assert q["hi"] == pytest.approx((60 / 360) ** alpha / ((60 / 360) ** alpha + (300 / 360) ** alpha))
    batches = take(dataset(two_lang_cache, seed=0, alpha=alpha, batch_size=50), 80)
    langs = [l for b in batches for l in b["lang"]]
    share = langs.count("hi") / len(langs)
    n = len(langs)
    assert abs(share - q["hi"]) < 4 * np.sqrt(q["hi"] * (1 - q["hi"]) / n)  # 4 sigma
    # alpha = 1 reproduces the data's proportions; hi is then visibly rarer.
    assert q["hi"] > 60 / 360


def test_one_language_per_batch_mode(two_lang_cache):
    for batch in take(dataset(two_lang_cache, seed=0, mix="batch"), 10):
        assert len(set(batch["lang"])) == 1


def test_best_copy_keeps_the_lower_loss_teacher(tmp_path):
    a = make_cache(tmp_path / "a", rows_per_lang={"en": 64}, seed=1, name="a", loss=lambda ids: ids % 7)
    # Teacher b is better on even example ids, worse on odd ones.
    b = make_cache(tmp_path / "b", rows_per_lang={"en": 64}, seed=2, name="b",
                   loss=lambda ids: ids % 7 + np.where(ids % 2 == 0, -0.5, 0.5))

    def sources(copies, batches):
        ds = dataset([a, b], copies=copies, batch_size=16, seed=0)
        return [(s, e) for batch in take(ds, batches) for s, e in zip(batch["source"].tolist(), batch["example_id"].tolist())]

    assert sorted(sources("all", 8)) == sorted([(0, i) for i in range(64)] + [(1, i) for i in range(64)])
    assert sorted(sources("best", 4)) == sorted((1 if i % 2 == 0 else 0, i) for i in range(64))


def test_best_copy_ties_go_to_the_earlier_cache(tmp_path):
    a = make_cache(tmp_path / "a", rows_per_lang={"en": 32}, seed=1, name="a")
    b = make_cache(tmp_path / "b", rows_per_lang={"en": 32}, seed=2, name="b")
    ds = dataset([a, b], copies="best", batch_size=16, seed=0)
    assert {s for batch in take(ds, 2) for s in batch["source"].tolist()} == {0}
