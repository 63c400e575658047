"""Each teacher tokenizes its own copy of every example (docs/design.md, "Stage one", step 2).

Besides the ids, a row keeps its words: `word_index` gives the word of each token (-1 for
special tokens), from the fast tokenizer's word_ids. It drives whole-word masking and the
stored word-start flags, which align words (not tokens) across vocabularies.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..segments import second_segment_start
from ..storage.shard import sha256_file
from ..vocab.words import word_marker, word_numbers

# Files that define a tokenizer's behaviour, whichever of them a model directory has.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model",
)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # any failure here means the directory holds no usable tokenizer
        raise BadInput(f"teacher {path}: its tokenizer cannot be loaded ({type(e).__name__}: {e}).") from None
    if not getattr(tokenizer, "is_fast", False):
        raise BadInput(
            f"teacher {path}: xkd needs a fast (Rust) tokenizer for word boundaries, but this one is "
            f"{type(tokenizer).__name__}. Save the model with a tokenizer.json."
        )
    return tokenizer


def tokenizer_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (Path(path) / name).is_file():
            h.update(f"{name}\0{sha256_file(Path(path) / name)}\n".encode())
    return h.hexdigest()


def special_ids(tokenizer) -> dict[str, int | None]:
    return {
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
        "cls": tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,
        "sep": tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
        "mask": tokenizer.mask_token_id,
    }


def tokenize(tokenizer, texts: list[str], max_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, word_index) per text, truncated to max_length tokens with specials included."""
    return [(t.ids, t.word_index) for t in tokenize_seen(tokenizer, texts, max_length)]


@dataclass(frozen=True)
class Tokenized:
    """One input as a teacher reads it. `seen` is None when the tokens cover the whole text;
    where truncation dropped tokens, it is the text up to the end of the last token kept (the
    tokenizer's character offsets): all of the text the teacher saw and nothing it did not.
    For a sentence pair, `segment_b` is the position of the second segment's first token and
    `seen_b` is `seen` for the second segment; word numbers run on across both segments."""

    ids: np.ndarray
    word_index: np.ndarray
    seen: str | None = None
    segment_b: int = 0
    seen_b: str | None = None

    @property
    def truncated(self) -> bool:
        return self.seen is not None


def tokenize_seen(tokenizer, texts: list[str], max_length: int, texts_b: list[str] | None = None) -> list[Tokenized]:
    """Each text (or pair: `texts_b`) in the tokenizer's own template (BERT: [CLS] a [SEP] b
    [SEP]; RoBERTa: <s> a </s></s> b </s>), truncated to max_length tokens with specials
    included (the longer segment first, as transformers truncates pairs)."""
    if not texts:
        return []
    encoded = tokenizer(
        texts, texts_b, truncation=True, max_length=max_length, return_attention_mask=False,
        return_token_type_ids=False,
    )
    specials = np.array(sorted(tokenizer.all_special_ids), dtype=np.int64)
    marker = word_marker(tokenizer)
    out = []
    for n, encoding in enumerate(encoded.encodings):
        ids = np.asarray(encoding.ids, dtype=np.int64)
        sequence = np.array([-1 if s is None else s for s in encoding.sequence_ids], dtype=np.int64)
        word_index = word_numbers(encoding, ~np.isin(ids, specials), sequence, marker)
        truncated = bool(encoding.overflowing)
        if texts_b is None:
            out.append(Tokenized(ids, word_index, _seen(texts[n], encoding, word_index, sequence, 0, truncated)))
            continue
        out.append(Tokenized(ids, word_index, _seen(texts[n], encoding, word_index, sequence, 0, truncated),
                             second_segment_start(encoding.sequence_ids),
                             _seen(texts_b[n], encoding, word_index, sequence, 1, truncated)))
    return out


def _seen(text: str, encoding, word_index: np.ndarray, sequence: np.ndarray, segment: int, truncated: bool) -> str | None:
    if not truncated:
        return None
    end = max((stop for (_, stop), w, s in zip(encoding.offsets, word_index, sequence) if w >= 0 and s == segment),
              default=0)
    return text[:end]


def word_starts(word_index: np.ndarray) -> np.ndarray:
    """True at the first token of each word; False at specials and continuation tokens."""
    starts = word_index >= 0
    starts[1:] &= word_index[1:] != word_index[:-1]
    return starts
