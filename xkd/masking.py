"""BERT masking, once, for every part that masks: the pipeline (over a teacher's ids, before
the teacher runs) and the students that mask text themselves (TLM, XWCL, the mlm baseline
over raw text, over union ids). A leaf: imports nothing of xkd.

As in BERT's create_pretraining_data: round(prob x candidates) positions (at least one) are
chosen; in whole-word mode whole words are chosen in random order until that many tokens are
covered (a word that would overshoot is passed over, except as the first choice, so every
row with a candidate gets at least one mask); then each chosen position becomes [MASK] with
probability 0.8, a random non-special token with 0.1, and stays unchanged with 0.1.

Every function draws from the generator it is given, in a fixed order, so masks are a pure
function of the caller's seed material: a retried shard or a resumed run masks identically.
"""

from __future__ import annotations

import numpy as np


def random_tokens(rng: np.random.Generator, n: int, vocab_size: int, special_ids: np.ndarray) -> np.ndarray:
    """n token ids drawn uniformly from the vocabulary without its special tokens."""
    out = rng.integers(0, vocab_size, size=n)
    while (bad := np.isin(out, special_ids)).any():
        out[bad] = rng.integers(0, vocab_size, size=int(bad.sum()))
    return out


def choose_positions(rng: np.random.Generator, word_index: np.ndarray, prob: float, whole_word: bool = False) -> np.ndarray:
    """Sorted positions to mask. word_index: the word of each position, -1 where a position
    may not be masked (special tokens)."""
    candidates = np.flatnonzero(word_index >= 0)
    if not candidates.size or prob <= 0:
        return np.zeros(0, dtype=np.int64)
    target = max(1, int(round(candidates.size * prob)))
    if not whole_word:
        return np.sort(rng.choice(candidates, size=min(target, candidates.size), replace=False))
    # A word is a run of consecutive candidates with the same word index.
    words = np.split(candidates, np.flatnonzero(np.diff(word_index[candidates])) + 1)
    chosen: list[np.ndarray] = []
    covered = 0
    for w in rng.permutation(len(words)):
        if covered and covered + words[w].size > target:
            continue
        chosen.append(words[w])
        covered += words[w].size
        if covered >= target:
            break
    return np.sort(np.concatenate(chosen))


def choose_words(rng: np.random.Generator, n_words: int, prob: float) -> np.ndarray:
    """Sorted word numbers: round(prob x n_words), at least one, of words 0..n_words-1."""
    return choose_positions(rng, np.arange(n_words), prob)


def corrupt(rng: np.random.Generator, ids: np.ndarray, positions: np.ndarray, mask_id: int, vocab_size: int,
            special_ids: np.ndarray) -> np.ndarray:
    """BERT's 80/10/10 at `positions`: [MASK], a random non-special token, or unchanged."""
    out = ids.copy()
    action = rng.random(positions.size)
    out[positions[action < 0.8]] = mask_id
    to_random = positions[(action >= 0.8) & (action < 0.9)]
    out[to_random] = random_tokens(rng, to_random.size, vocab_size, special_ids)
    return out
