"""Deterministic BERT masking, word boundaries from real tokenizers, length buckets."""

from __future__ import annotations

import numpy as np
import pytest

from xkd.errors import BadInput
from xkd.pipeline.batching import length_buckets
from xkd.pipeline.masking import MaskConfig, Vocabulary, mask_row
from xkd.pipeline.tokenize import tokenize, word_starts

from conftest import VOCABS

SPECIALS = np.array([0, 100, 101, 102, 103])
VOCAB = Vocabulary(mask_id=103, size=30522, special_ids=SPECIALS)


def synthetic_row(rng, n_words=40, max_pieces=1):
    """[CLS] w w w ... [SEP] with each word 1..max_pieces tokens."""
    pieces = rng.integers(1, max_pieces + 1, size=n_words)
    word_index = np.concatenate([[-1], np.repeat(np.arange(n_words), pieces), [-1]])
    ids = rng.integers(1000, 30000, size=word_index.size)
    ids[0], ids[-1] = 101, 102
    return ids, word_index


@pytest.fixture(scope="module")
def uncased_tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab=str(VOCABS / "bert-base-uncased.vocab.txt"), do_lower_case=True)


def test_same_seed_same_masks_other_seed_epoch_side_or_example_differ():
    ids, word_index = synthetic_row(np.random.default_rng(0), 60)
    config = MaskConfig(prob=0.15, seed=7, epochs=2)
    first = mask_row(ids, word_index, config, VOCAB, 42, "src", 0)
    again = mask_row(ids, word_index, config, VOCAB, 42, "src", 0)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    others = [
        mask_row(ids, word_index, MaskConfig(prob=0.15, seed=8), VOCAB, 42, "src", 0),
        mask_row(ids, word_index, config, VOCAB, 42, "src", 1),
        mask_row(ids, word_index, config, VOCAB, 42, "tgt", 0),
        mask_row(ids, word_index, config, VOCAB, 43, "src", 0),
    ]
    for other in others:
        assert not np.array_equal(first[1], other[1]) or not np.array_equal(first[0], other[0])


def test_rate_and_80_10_10_proportions_and_specials_never_masked():
    rng = np.random.default_rng(1)
    config = MaskConfig(prob=0.15, seed=3)
    masked = candidates = n_mask = n_random = n_kept = 0
    for example_id in range(2000):
        ids, word_index = synthetic_row(rng, int(rng.integers(20, 60)))
        out, positions, labels = mask_row(ids, word_index, config, VOCAB, example_id, "mono", 0)
        assert np.array_equal(labels, ids[positions]) and np.all(np.diff(positions.astype(int)) > 0)
        assert np.all(word_index[positions] >= 0)  # never [CLS]/[SEP]
        unmasked = np.setdiff1d(np.arange(ids.size), positions)
        assert np.array_equal(out[unmasked], ids[unmasked])
        n_mask += int((out[positions] == VOCAB.mask_id).sum())
        kept = out[positions] == ids[positions]
        n_kept += int(kept.sum())
        n_random += int(((out[positions] != VOCAB.mask_id) & ~kept).sum())
        assert not np.isin(out[positions][~kept & (out[positions] != VOCAB.mask_id)], SPECIALS).any()
        masked += positions.size
        candidates += int((word_index >= 0).sum())
    assert masked / candidates == pytest.approx(0.15, abs=0.005)
    assert n_mask / masked == pytest.approx(0.8, abs=0.02)
    assert n_random / masked == pytest.approx(0.1, abs=0.015)
    assert n_kept / masked == pytest.approx(0.1, abs=0.015)


def test_whole_word_mode_masks_every_piece_of_a_chosen_word(uncased_tokenizer):
    texts = ["unbelievably tokenization hyperparameters outperformed counterrevolutionaries " * 3,
             "photosynthesis electroencephalography antidisestablishmentarianism is long " * 3]
    config = MaskConfig(prob=0.3, whole_word=True, seed=5)
    for example_id, (ids, word_index) in enumerate(tokenize(uncased_tokenizer, texts, 128)):
        assert (np.bincount(word_index[word_index >= 0]) > 1).any()  # some words really are split
        for epoch in range(5):
            _, positions, _ = mask_row(ids, word_index, config, VOCAB, example_id, "mono", epoch)
            chosen_words = set(word_index[positions])
            expected = np.flatnonzero(np.isin(word_index, list(chosen_words)))
            assert np.array_equal(np.sort(positions), expected)
            assert positions.size >= 1


def test_word_starts_from_a_real_tokenizer(uncased_tokenizer):
    [(ids, word_index)] = tokenize(uncased_tokenizer, ["Hello unbelievable tokenization world!"], 32)
    tokens = uncased_tokenizer.convert_ids_to_tokens(ids.tolist())
    assert tokens == ["[CLS]", "hello", "unbelievable", "token", "##ization", "world", "!", "[SEP]"]
    assert word_index.tolist() == [-1, 0, 1, 2, 2, 3, 4, -1]
    assert word_starts(word_index).tolist() == [False, True, True, True, False, True, True, False]
    [(short, _)] = tokenize(uncased_tokenizer, ["word " * 100], 16)
    assert short.size == 16 and short[-1] == uncased_tokenizer.sep_token_id


def test_no_masking_when_probability_is_zero():
    ids, word_index = synthetic_row(np.random.default_rng(2))
    out, positions, labels = mask_row(ids, word_index, MaskConfig(prob=0.0), VOCAB, 0, "mono", 0)
    assert np.array_equal(out, ids) and positions.size == 0 and labels.size == 0
    with pytest.raises(BadInput, match="--mask-prob"):
        MaskConfig(prob=1.5)


def test_length_buckets_respect_the_token_budget_and_cover_every_row_once():
    lengths = np.random.default_rng(4).integers(3, 120, size=500)
    batches = length_buckets(lengths, 1024)
    rows = np.concatenate(batches)
    assert np.array_equal(np.sort(rows), np.arange(500))
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= 1024
    assert len(length_buckets(np.array([5000, 10]), 1024)) == 2  # an over-long row gets its own batch
    # Sorting by length keeps padding small: under 10% of the computed tokens here.
    padded = sum(len(b) * lengths[b].max() for b in batches)
    assert lengths.sum() / padded > 0.9
