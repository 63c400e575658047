"""Deterministic BERT masking (DESIGN.md, "Stage one", step 2).

The masks of a row depend only on (seed, example id, side, mask epoch) and the row's tokens,
never on the shard, the batch or the worker, so a retried or resumed shard masks exactly as
before and the bytes come out the same. Special tokens are never masked.

As in BERT's create_pretraining_data: round(prob * candidates) positions (at least one) are
chosen; in whole-word mode whole words are chosen in random order until that many tokens are
covered (a word that would overshoot is passed over, except as the first choice, so every
row with a candidate gets at least one mask); then each chosen position becomes [MASK] with
probability 0.8, a random non-special token with 0.1, and stays unchanged with 0.1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import BadInput

SIDE_CODES = {"mono": 0, "src": 1, "tgt": 2}


@dataclass(frozen=True)
class MaskConfig:
    prob: float = 0.15
    whole_word: bool = False
    epochs: int = 1
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.prob < 1.0:
            raise BadInput(f"--mask-prob must be in [0, 1), not {self.prob}.")
        if self.epochs < 1:
            raise BadInput(f"--mask-epochs must be at least 1, not {self.epochs}.")
        if self.seed < 0:
            raise BadInput(f"--seed must be >= 0, not {self.seed}.")

    @property
    def active(self) -> bool:
        return self.prob > 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Vocabulary:
    """What masking needs to know about a tokenizer."""

    mask_id: int
    size: int
    special_ids: np.ndarray  # sorted

    def random_tokens(self, rng: np.random.Generator, n: int) -> np.ndarray:
        out = rng.integers(0, self.size, size=n)
        while (bad := np.isin(out, self.special_ids)).any():
            out[bad] = rng.integers(0, self.size, size=int(bad.sum()))
        return out


def row_rng(seed: int, example_id: int, side: str, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, example_id, SIDE_CODES[side], epoch])


def choose_positions(rng: np.random.Generator, word_index: np.ndarray, prob: float, whole_word: bool) -> np.ndarray:
    """Sorted positions to mask. word_index: the word of each position, -1 for specials."""
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


def mask_row(
    ids: np.ndarray,
    word_index: np.ndarray,
    config: MaskConfig,
    vocab: Vocabulary,
    example_id: int,
    side: str,
    epoch: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masked input ids, masked positions, original ids there) for one row."""
    if not config.active:
        return ids, np.zeros(0, dtype=np.uint16), np.zeros(0, dtype=np.uint32)
    rng = row_rng(config.seed, example_id, side, epoch)
    positions = choose_positions(rng, word_index, config.prob, config.whole_word)
    labels = ids[positions]
    out = ids.copy()
    action = rng.random(positions.size)
    to_mask = positions[action < 0.8]
    to_random = positions[(action >= 0.8) & (action < 0.9)]
    out[to_mask] = vocab.mask_id
    out[to_random] = vocab.random_tokens(rng, to_random.size)
    return out, positions.astype(np.uint16), labels.astype(np.uint32)
