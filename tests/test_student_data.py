"""The streaming loader: deterministic, exact resume, no duplicates across workers or
ranks, language sampling by temperature, best-copy selection."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from xkd.storage import CacheWriter, open_cache, outputs_json, write_shard_files
from xkd.storage.synthetic import synthetic_rows
from xkd.student.data import StreamConfig, StreamingDataset, language_probabilities, padded, padded_with_mask


def make_cache(root, *, rows_per_lang: dict, seed=0, loss=lambda ids, epoch: ids % 7, shards=2, row_group_size=16, name="t",
               corpus=None, epochs=1, k=4):
    """A cache whose rows have the given languages; example ids 0..N-1 in corpus order, each
    example `epochs` rows (mask epochs 0..epochs-1). `loss(example ids, mask epochs)` gives
    each row's teacher loss; `corpus` is the manifest's corpus block."""
    langs = [lang for lang, n in rows_per_lang.items() for _ in range(n)]
    total = len(langs)
    meta = {"teacher": {"name": name}, "corpus": corpus or {}, "view": {}, "outputs": outputs_json(k, {})}
    bounds = np.linspace(0, total, shards + 1).astype(int)
    with CacheWriter(root, f"key-{name}", meta, planned_shards=shards) as writer:
        for s in range(shards):
            lo, hi = bounds[s], bounds[s + 1]
            rows, _ = synthetic_rows(seed * 100 + s, (hi - lo) * epochs, vocab=500, k=k, first_example_id=lo, max_len=20)
            ids = np.repeat(np.arange(lo, hi), epochs)
            epoch = np.tile(np.arange(epochs), hi - lo)
            rows["example_id"] = ids.astype(np.uint64)
            rows["mask_epoch"] = epoch.astype(np.uint16)
            rows["lang"] = np.array([langs[i] for i in ids], dtype=object)
            rows["teacher_loss"] = np.asarray(loss(ids, epoch), dtype=np.float32)
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
    a = make_cache(tmp_path / "a", rows_per_lang={"en": 64}, seed=1, name="a", loss=lambda ids, epoch: ids % 7)
    # Teacher b is better on even example ids, worse on odd ones.
    b = make_cache(tmp_path / "b", rows_per_lang={"en": 64}, seed=2, name="b",
                   loss=lambda ids, epoch: ids % 7 + np.where(ids % 2 == 0, -0.5, 0.5))

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


# Several corpora, several teachers: MergeDistill's settings (top-8, alpha = 0.7) -------------


def corpus_block(lang, fingerprint=None):
    """A manifest corpus block as the pipeline writes it (see pipeline.corpus.CorpusPlan)."""
    return {"spec": f"text:{lang}.txt@{lang}", "kind": "text", "langs": [lang], "split": None,
            "fingerprint": fingerprint or f"fp-{lang}", "records": 0, "examples": 0, "skipped": {}}


def collate_records(rows):
    """Each streamed row as a comparable record: the cache it came from, its key, its content."""
    n = len(rows["example_id"])
    return {"rows": [
        (int(rows["source"][i]), int(rows["example_id"][i]), str(rows["side"][i]), int(rows["mask_epoch"][i]),
         str(rows["lang"][i]), float(rows["teacher_loss"][i]), rows["input_ids"].row(i).tobytes(),
         rows["topk_logits"].row(i).tobytes(), rows["lognorm"].row(i).tobytes())
        for i in range(n)
    ]}


def cache_records(caches):
    """Every row of every cache, read through the public per-example API, with its copy key
    (corpus fingerprint, example id, side, mask epoch)."""
    out = []
    for ci, cache in enumerate(caches):
        corpus = cache.manifest["corpus"]["fingerprint"]
        for ex in cache.iter_examples():
            record = (ci, int(ex["example_id"]), str(ex["side"]), int(ex["mask_epoch"]), str(ex["lang"]),
                      float(ex["teacher_loss"]), ex["input_ids"].tobytes(), ex["topk_logits"].tobytes(),
                      ex["lognorm"].tobytes())
            out.append(((corpus, *record[1:4]), record))
    return out


def expected_streams(caches, copies):
    """Per language, the rows one epoch must stream: every row ("all"), or per copy key the
    row with the lowest teacher loss, the earlier cache on ties ("best")."""
    records = cache_records(caches)
    if copies == "best":
        best = {}
        for key, record in records:  # caches in order: a later cache wins only if strictly lower
            if key not in best or record[5] < best[key][5]:
                best[key] = record
        chosen = list(best.values())
    else:
        chosen = [record for _, record in records]
    streams = {}
    for record in chosen:
        streams.setdefault(record[4], []).append(record)
    return streams


def examples_per_language(caches):
    """Distinct copy keys per language: what a language's share p_l counts."""
    keys = {}
    for key, record in cache_records(caches):
        keys.setdefault(record[4], set()).add(key)
    return {lang: len(k) for lang, k in keys.items()}


def streamed_by_language(ds, need: dict, max_batches=400):
    """Each language's rows in stream order, until each has at least need[lang] rows."""
    got = {lang: [] for lang in need}
    for b, batch in enumerate(iter(ds)):
        for record in batch["rows"]:
            got.setdefault(record[4], []).append(record)
        if all(len(got[lang]) >= n for lang, n in need.items()):
            return got
        assert b < max_batches, f"after {max_batches} batches, streamed {({l: len(r) for l, r in got.items()})}, needed {need}"


@pytest.fixture(scope="module")
def paper_caches(tmp_path_factory):
    """An English corpus (40 examples) and a Hindi one (24), example ids 0.. in each, two mask
    epochs, top-8, each cached by teachers A and B. Losses take few values, so that A wins
    some keys, B others, and some are ties."""
    root = tmp_path_factory.mktemp("paper")
    loss_a = lambda ids, epoch: (ids * 5 + epoch * 3) % 4  # noqa: E731
    loss_b = lambda ids, epoch: (ids * 3 + epoch) % 4  # noqa: E731
    make = lambda name, lang, n, seed, loss: make_cache(  # noqa: E731
        root / name, rows_per_lang={lang: n}, seed=seed, name=name, loss=loss, corpus=corpus_block(lang),
        epochs=2, k=8, row_group_size=8)
    return {
        "en_a": make("en_a", "en", 40, 1, loss_a), "hi_a": make("hi_a", "hi", 24, 2, loss_a),
        "en_b": make("en_b", "en", 40, 3, loss_b), "hi_b": make("hi_b", "hi", 24, 4, loss_b),
    }


LAYOUTS = {
    "2x2": ["en_a", "hi_a", "en_b", "hi_b"],  # both languages, both teachers
    "2+1": ["en_a", "en_b", "hi_a"],  # English by two teachers, Hindi by one (issue #10's repro)
}


@pytest.mark.parametrize("copies", ["best", "all"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_copies_stream_exactly_the_chosen_rows_of_every_corpus(paper_caches, layout, copies):
    caches = [paper_caches[name] for name in LAYOUTS[layout]]
    expected = expected_streams(caches, copies)
    assert sorted(expected) == ["en", "hi"]
    assert {r[0] for rows in expected.values() for r in rows} == set(range(len(caches)))  # every cache wins some
    ds = StreamingDataset(caches, StreamConfig(batch_size=16, seed=3, alpha=0.7, copies=copies), collate=collate_records)
    assert ds.langs == ["en", "hi"]
    epochs = 2
    streamed = streamed_by_language(ds, {lang: epochs * len(rows) for lang, rows in expected.items()})
    for lang, rows in expected.items():
        n = len(rows)
        want = sorted(rows)
        assert len(set(want)) == n
        for e in range(epochs):  # each epoch streams each chosen row exactly once, nothing else
            assert sorted(streamed[lang][e * n : (e + 1) * n]) == want, (lang, e)
    assert ds.rows == {lang: len(rows) for lang, rows in expected.items()}


def test_best_copy_breaks_ties_toward_the_earlier_cache_per_corpus(paper_caches):
    caches = [paper_caches[name] for name in LAYOUTS["2x2"]]
    expected = expected_streams(caches, "best")
    losses = {}
    for key, record in cache_records(caches):
        losses.setdefault(key, []).append((record[5], record[0]))
    tied = {key for key, ls in losses.items() if len(ls) == 2 and ls[0][0] == ls[1][0]}
    won_by_later = {key for key, ls in losses.items() if len(ls) == 2 and ls[1][0] < ls[0][0]}
    assert tied and won_by_later  # the fixture has both
    ds = StreamingDataset(caches, StreamConfig(batch_size=16, seed=0, copies="best"), collate=collate_records)
    streamed = streamed_by_language(ds, {lang: len(rows) for lang, rows in expected.items()})
    first = {lang: rows[: len(expected[lang])] for lang, rows in streamed.items()}
    corpus_of = {ci: c.manifest["corpus"]["fingerprint"] for ci, c in enumerate(caches)}
    source = {(corpus_of[r[0]], r[1], r[2], r[3]): r[0] for rows in first.values() for r in rows}
    assert len(source) == len(losses)
    assert all(source[key] == losses[key][0][1] for key in tied)  # earlier cache of that corpus
    assert all(source[key] == losses[key][1][1] for key in won_by_later)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_language_shares_count_examples_not_copies(paper_caches, layout):
    caches = [paper_caches[name] for name in LAYOUTS[layout]]
    examples = examples_per_language(caches)
    total = sum(examples.values())
    q = {lang: (n / total) ** 0.7 for lang, n in examples.items()}
    q = {lang: v / sum(q.values()) for lang, v in q.items()}
    lang_sequences = []
    for copies in ("all", "best"):
        ds = StreamingDataset(caches, StreamConfig(batch_size=16, seed=5, alpha=0.7, copies=copies), collate=collate_records)
        assert ds.examples == examples
        assert ds.probs == pytest.approx(q, rel=1e-12)
        lang_sequences.append([r[4] for batch in take(ds, 30) for r in batch["rows"]])
    # The plan depends on the shares only: "all" and "best" train on the same language mix.
    assert lang_sequences[0] == lang_sequences[1]


def test_issue_10_repro_best_keeps_hindi(tmp_path):
    """English cached by two teachers, Hindi by one, 32 examples each, ids 0..31 in both."""
    en_a = make_cache(tmp_path / "en_a", rows_per_lang={"en": 32}, seed=1, name="en_a", corpus=corpus_block("en"))
    en_b = make_cache(tmp_path / "en_b", rows_per_lang={"en": 32}, seed=2, name="en_b", corpus=corpus_block("en"))
    hi_a = make_cache(tmp_path / "hi_a", rows_per_lang={"hi": 32}, seed=3, name="hi_a", corpus=corpus_block("hi"))
    every = dataset([en_a, en_b, hi_a], copies="all")
    best = dataset([en_a, en_b, hi_a], copies="best")
    assert every.rows == {"en": 64, "hi": 32}
    assert best.rows == {"en": 32, "hi": 32}
    assert every.examples == best.examples == {"en": 32, "hi": 32}
    assert every.probs == pytest.approx({"en": 0.5, "hi": 0.5}) and best.probs == pytest.approx({"en": 0.5, "hi": 0.5})
    # Two English corpora never compete either, though their ids and language coincide.
    other = make_cache(tmp_path / "en_other", rows_per_lang={"en": 32}, seed=4, name="o",
                       corpus=corpus_block("en", fingerprint="fp-en-2"))
    assert dataset([en_a, other], copies="best").rows == {"en": 64}


def test_best_copy_over_real_caches_of_two_corpora(tiny_teachers, thread_client, tmp_path):
    """The real pipeline: English cached by two teachers (with different --max-pairs, so their
    manifests' corpus blocks differ in counts but not in identity), Hindi by one."""
    from xkd.pipeline import CacheTeachersOptions, cache_teachers

    from conftest import PARALLEL

    def run(teacher, corpus, n):
        opts = CacheTeachersOptions(teachers=[str(teacher)], corpus=corpus, out=str(tmp_path / "caches"),
                                    max_pairs=n, topk=8, shard_size=16)
        return open_cache(cache_teachers(opts, client=thread_client, log=io.StringIO())["caches"][0]["path"])

    en = f"text:{PARALLEL}/tatoeba/tatoeba.hin-eng.eng@en"
    hi = f"text:{PARALLEL}/tatoeba/tatoeba.hin-eng.hin@hi"
    caches = [run(tiny_teachers["en"], en, 24), run(tiny_teachers["multi"], en, 16), run(tiny_teachers["multi"], hi, 20)]
    assert caches[0].manifest["corpus"]["fingerprint"] == caches[1].manifest["corpus"]["fingerprint"]
    examples = examples_per_language(caches)
    assert examples == {"en": len(caches[0]), "hi": len(caches[2])}  # the second English cache adds no example
    for copies in ("best", "all"):
        expected = expected_streams(caches, copies)
        ds = StreamingDataset(caches, StreamConfig(batch_size=8, seed=1, copies=copies, columns=(
            "example_id", "side", "mask_epoch", "lang", "teacher_loss", "input_ids", "topk_logits", "lognorm")),
            collate=collate_records)
        streamed = streamed_by_language(ds, {lang: len(rows) for lang, rows in expected.items()})
        for lang, rows in expected.items():
            assert sorted(streamed[lang][: len(rows)]) == sorted(rows), (copies, lang)
        assert ds.examples == examples


# Resume with DataLoader workers (issue #11) ----------------------------------------------------


def collate_tensors(rows):
    input_ids, mask = padded_with_mask(rows["input_ids"], 0)
    return {"example_id": torch.from_numpy(rows["example_id"].astype(np.int64)), "input_ids": input_ids,
            "attention_mask": mask, "labels": padded(rows["labels"], -100),
            "topk_ids": padded(rows["topk_ids"], 0), "topk_logits": padded(rows["topk_logits"], 0, dtype=torch.float32),
            "lognorm": padded(rows["lognorm"], 0, dtype=torch.float32), "source": torch.from_numpy(rows["source"]),
            "lang": list(rows["lang"])}


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.keys() == b.keys(), i
        for name in a:
            if isinstance(a[name], torch.Tensor):
                assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), (i, name)
            else:
                assert a[name] == b[name], (i, name)


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_resume_with_dataloader_workers_is_exact(two_lang_cache, stop):
    n = 8
    make = lambda: StreamingDataset([two_lang_cache], StreamConfig(batch_size=8, seed=9), collate=collate_tensors)  # noqa: E731
    loader = lambda ds, workers: torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)  # noqa: E731
    full = take(loader(make(), 2), n)
    assert_same_batches(take(loader(make(), 0), n), full)
    state = full[stop - 1]["loader_state"]
    for workers in (0, 1, 2):
        ds = make()
        ds.load_state_dict(state)
        assert_same_batches(take(loader(ds, workers), n - stop), full[stop:])
