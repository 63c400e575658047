"""Deterministic BERT masking (docs/design.md, "Stage one", step 2).

The masks of a row depend only on (seed, example id, side, mask epoch) and the row's tokens,
never on the shard, the batch or the worker, so a retried or resumed shard masks exactly as
before and the bytes come out the same. Special tokens are never masked.

The masking itself (BERT's 80/10/10, whole-word selection) is xkd/masking.py, shared with
the students that mask text themselves.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import BadInput
from ..masking import choose_positions, corrupt

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


def row_rng(seed: int, example_id: int, side: str, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, example_id, SIDE_CODES[side], epoch])


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
    out = corrupt(rng, ids, positions, vocab.mask_id, vocab.size, vocab.special_ids)
    return out, positions.astype(np.uint16), labels.astype(np.uint32)
