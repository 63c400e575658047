"""Student inputs built from the raw text a cache stores (the `text` and `pair_text`
columns), for methods whose teacher never saw the student's input: TLM
(translation language modelling, Lample & Conneau 2019; MMKD's L_TLM) and the mlm baseline
over encoder caches (`mlm --option source=text`), and the whole-word masks of MMKD's XWCL.

Tokenizing: each side is tokenized as the student sees that language in training, by the
teacher tokenizer the vocab routes the language to, remapped into the union (as
`Vocab.tokenize`), keeping the tokenizer's word boundaries. Words are numbered as the
pipeline numbers them for word-aligned hidden states: runs of tokens with the same word id,
specials excluded. A pair becomes [CLS] src [SEP] tgt [SEP] (the translation's own [CLS] is
dropped); each side is truncated to `max_length` tokens before concatenation.

Masking is BERT's (xkd/masking.py, the same code the pipeline masks with), over union ids.
Whole-word masking chooses round(prob x words) whole words. Masks are a pure function of
(seed, example id, mask epoch, purpose) and the tokens, never of the batch, the step or the
worker, so a resumed run masks exactly as an uninterrupted one. The same example is masked
the same way on every pass over the data (static masking, as the cache's own masking is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BadInput
from ..masking import choose_positions, corrupt as bert_corrupt
from ..segments import second_segment_start, token_type_ids
from ..storage import Ragged
from ..vocab.words import word_marker, word_numbers
from .data import padded_with_mask

# One random stream per use, so that TLM and XWCL masks of one example are independent.
PURPOSE_TLM = 1
PURPOSE_XWCL = 2


@dataclass
class Tokens:
    """One text as the student sees it: union ids with [CLS]/[SEP], and the word number of
    each token (0, 1, ... in order; -1 at special tokens)."""

    ids: np.ndarray  # int64
    word: np.ndarray  # int64

    @property
    def n_words(self) -> int:
        return int(self.word.max()) + 1 if self.word.size and self.word.max() >= 0 else 0


def routed_tokenizer(vocab, lang: str | None):
    """(teacher slug, its fast tokenizer) that the vocab routes `lang` to."""
    slug = vocab.teacher_for(lang)
    tokenizer = vocab.teacher_tokenizer(slug)
    if not getattr(tokenizer, "is_fast", False):
        raise BadInput(
            f"the vocab {vocab.path} routes language {lang!r} to {slug}, whose tokenizer is not a fast (Rust) "
            "tokenizer, so it gives no word boundaries. Rebuild the vocab from a teacher with a tokenizer.json."
        )
    return slug, tokenizer


def tokenize_words(vocab, texts: list[str], lang: str | None, max_length: int) -> list[Tokens]:
    """`texts` tokenized by the teacher tokenizer routed for `lang`, remapped into the union,
    with word numbers."""
    from ..vocab import remap_lists

    if not texts:
        return []
    slug, tokenizer = routed_tokenizer(vocab, lang)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)
    specials = np.array(sorted(tokenizer.all_special_ids), dtype=np.int64)
    marker = word_marker(tokenizer)
    teacher_ids, words = [], []
    for encoding in encoded.encodings:
        ids = np.asarray(encoding.ids, dtype=np.int64)
        # The teacher pipeline's own word rule, so that word i here is the cache's word i.
        sequence = np.array([-1 if s is None else s for s in encoding.sequence_ids], dtype=np.int64)
        teacher_ids.append(ids)
        words.append(word_numbers(encoding, ~np.isin(ids, specials), sequence, marker))
    union = remap_lists(teacher_ids, vocab.map_for(slug), what=f"tokenize with teacher {slug}")
    return [Tokens(ids.astype(np.int64), word) for ids, word in zip(union, words)]


def tokenize_rows(vocab, texts, langs, max_length: int) -> list[Tokens]:
    """Per row, its text tokenized for its own language (one tokenizer call per language)."""
    out: list[Tokens | None] = [None] * len(texts)
    langs = np.asarray(langs, dtype=object)
    for lang in dict.fromkeys(langs.tolist()):
        rows = np.flatnonzero(langs == lang)
        for r, tokens in zip(rows, tokenize_words(vocab, [texts[r] for r in rows], lang, max_length)):
            out[r] = tokens
    return out


def concat_pair(src: Tokens, tgt: Tokens | None, cls_id: int) -> Tokens:
    """[CLS] src [SEP] tgt [SEP]; the translation's words are numbered after the source's,
    so src words keep their numbers."""
    if tgt is None or tgt.ids.size == 0:
        return src
    drop = 1 if tgt.ids[0] == cls_id else 0
    tail_word = np.where(tgt.word[drop:] >= 0, tgt.word[drop:] + src.n_words, -1)
    return Tokens(np.concatenate([src.ids, tgt.ids[drop:]]), np.concatenate([src.word, tail_word]))


def row_rng(seed: int, example_id: int, epoch: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(example_id), int(epoch), int(purpose)])


def corrupt(rng: np.random.Generator, ids: np.ndarray, positions: np.ndarray, vocab) -> np.ndarray:
    """BERT's 80/10/10 at `positions`, over the union vocabulary."""
    specials = np.array(sorted(vocab.special_ids.values()), dtype=np.int64)
    return bert_corrupt(rng, ids, positions, vocab.mask_id, vocab.size, specials)


def padded_ids(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id rows, right-padded to the longest row."""
    return padded_with_mask(Ragged.from_rows(rows, np.int64), pad_id)


def pair_languages(caches) -> tuple:
    """Per cache (a storage.CacheView), the (src, tgt) languages of a parallel corpus, else None."""
    return tuple(cache.pair for cache in caches)


def one_side_pairs(caches, method: str) -> tuple:
    """pair_languages, for methods whose teacher ran on one side of a parallel corpus (the
    English source) and whose student reads the other side from pair_text."""
    for cache in caches:
        if cache.pair is None or len(cache.sides) != 1 or cache.sides[0] not in ("src", "tgt"):
            raise BadInput(
                f"--method {method} needs a parallel corpus cached on the English side only, but {cache.path} holds "
                f"{'a monolingual corpus' if cache.pair is None else 'sides ' + ', '.join(cache.sides)}. Re-run "
                "cache-teachers with --corpus parallel:EN@en,X@x --sides src (the teacher sees the English side; the "
                "student reads the translation from pair_text)."
            )
    return pair_languages(caches)


def partner_languages(rows: dict, pairs: list[tuple[str, str] | None]) -> list[str | None]:
    """Per row, the language of its pair_text: the other side of its cache's corpus."""
    out = []
    for source, side in zip(rows["source"].tolist(), rows["side"].tolist()):
        pair = pairs[source]
        out.append(None if pair is None or side not in ("src", "tgt") else pair[1] if side == "src" else pair[0])
    return out


def tokenize_pairs(vocab, rows: dict, pairs, max_length: int) -> tuple[list[Tokens], list[Tokens | None]]:
    """Per row, its `text` (in the row's language) and its `pair_text` (in the partner
    language; None for a monolingual row or an empty pair_text)."""
    src = tokenize_rows(vocab, list(rows["text"]), list(rows["lang"]), max_length)
    tgt: list[Tokens | None] = [None] * len(src)
    pair_text = rows.get("pair_text")
    if pair_text is None:
        return src, tgt
    partner = partner_languages(rows, pairs)
    wanted = [i for i in range(len(src)) if pair_text[i] and partner[i] is not None]
    for i, tokens in zip(wanted, tokenize_rows(vocab, [pair_text[i] for i in wanted], [partner[i] for i in wanted], max_length)):
        tgt[i] = tokens
    return src, tgt


def mask_pairs(vocab, src: list[Tokens], tgt: list[Tokens | None], example_ids, epochs, *, seed: int,
               prob: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """TLM masking: per row (masked ids of [CLS] src [SEP] tgt [SEP], masked positions,
    original ids there), tokens of both sides being candidates."""
    out = []
    for i in range(len(src)):
        pair = concat_pair(src[i], tgt[i], vocab.cls_id)
        rng = row_rng(seed, example_ids[i], epochs[i], PURPOSE_TLM)
        positions = choose_positions(rng, pair.word, prob)
        out.append((corrupt(rng, pair.ids, positions, vocab), positions, pair.ids[positions]))
    return out


def epochs_of(rows: dict) -> np.ndarray:
    return np.asarray(rows["mask_epoch"], dtype=np.int64) if "mask_epoch" in rows else np.zeros(len(rows["example_id"]), np.int64)


def flat_positions(rows_positions: list[np.ndarray], width: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat index into a (rows, width) batch, row) of per-row positions, in row order."""
    row_of = np.repeat(np.arange(len(rows_positions), dtype=np.int64), [p.size for p in rows_positions])
    cols = np.concatenate(rows_positions).astype(np.int64) if rows_positions else np.zeros(0, np.int64)
    return row_of * width + cols, row_of


def collate_tlm(vocab, rows: dict, pairs, *, seed: int, prob: float, max_length: int) -> dict:
    """A masked-LM batch (the keys of `collate_masked_lm`) of TLM inputs built from text."""
    src, tgt = tokenize_pairs(vocab, rows, pairs, max_length)
    built = mask_pairs(vocab, src, tgt, rows["example_id"], epochs_of(rows), seed=seed, prob=prob)
    input_ids, attention_mask = padded_ids([b[0] for b in built], vocab.pad_id)
    masked_flat, row_of = flat_positions([b[1] for b in built], input_ids.shape[1])
    labels = np.concatenate([b[2] for b in built]) if built else np.zeros(0, np.int64)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "masked_flat": torch.from_numpy(masked_flat),
        "masked_row": torch.from_numpy(row_of),
        "labels": torch.from_numpy(labels.astype(np.int64)),
        "source": torch.from_numpy(np.asarray(rows["source"], dtype=np.int64)),
        "example_id": torch.from_numpy(np.asarray(rows["example_id"]).astype(np.int64)),
        "lang": list(rows["lang"]),
    }


# The cache columns these inputs are built from, and the cache-teachers option storing them.
TEXT_COLUMNS = ("example_id", "lang", "side", "mask_epoch", "text", "pair_text")


def encode_by_language(vocab, texts: list[str], langs: list[str], max_length: int,
                       texts_b: list[str] | None = None) -> dict:
    """Padded student inputs for texts (or sentence pairs: `texts_b`) as the student sees
    each row's language: the routed teacher's tokenizer and template, remapped into the
    union (one tokenizer call per language). Pairs add token_type_ids from the template."""
    from ..vocab import remap_lists

    ids: list[np.ndarray | None] = [None] * len(texts)
    segment_b = np.zeros(len(texts), dtype=np.int64)
    langs_arr = np.asarray(langs, dtype=object)
    for lang in dict.fromkeys(langs):
        rows = np.flatnonzero(langs_arr == lang)
        slug, tokenizer = routed_tokenizer(vocab, lang)
        encoded = tokenizer([texts[r] for r in rows], [texts_b[r] for r in rows] if texts_b is not None else None,
                            truncation=True, max_length=max_length, return_attention_mask=False,
                            return_token_type_ids=False)
        union = remap_lists(encoded["input_ids"], vocab.map_for(slug), what=f"tokenize with teacher {slug}")
        for r, row_ids in zip(rows, union):
            ids[r] = row_ids.astype(np.int64)
        if texts_b is not None:
            segment_b[rows] = [second_segment_start(e.sequence_ids) for e in encoded.encodings]
    input_ids, attention_mask = padded_ids(ids, vocab.pad_id)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if texts_b is not None:
        lengths = attention_mask.sum(1).numpy()
        batch["token_type_ids"] = torch.from_numpy(token_type_ids(lengths, segment_b, input_ids.shape[1]))
    return batch
