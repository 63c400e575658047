"""Teachers of every encoder family cached exactly (issue 13): BERT and DistilBERT
(WordPiece), RoBERTa (byte-level BPE), XLM-R and mDeBERTa (SentencePiece Unigram with byte
fallback; mDeBERTa with relative positions and no token types). For each, what the cache
holds equals the teacher's own forward: the unmasked ids are the tokenizer's, top-k and the
log-normaliser are the model's MLM logits at the masked positions, hidden states and
sentence vectors are its encoder's, and a pair classifier's logits are its own on
tokenizer(a, b). Words follow the family's convention: `##` continuations for WordPiece,
`▁`/`Ġ` word starts for the others, on text with punctuation, digits, CJK and three scripts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cache_teacher
from families import FAMILIES, MIXED_TEXT, build_family

from xkd.storage import open_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_LENGTH = 40
TOPK = 5
PAIRS = [("The team won the match, 3-1.", "Los jugadores celebraron."), ("टीम ने मैच जीता।", "東京は日本の首都です。"),
         ("Prices rose 3.5% to $1,200.", "It rained all day in the city, and the final was put off until Monday.")]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: {"mlm": build_family(family, root / f"{family}-mlm", "mlm", seed=1),
                     "classifier": build_family(family, root / f"{family}-cls", "classifier", seed=2)}
            for family in FAMILIES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "mixed.txt"
    path.write_text("\n".join(MIXED_TEXT) + "\n", encoding="utf-8")
    return f"text:{path}@en"


def rows_of(cache, columns):
    out = []
    for block in cache.iter_blocks(columns=columns):
        for r in range(block.num_rows):
            out.append({c: block.columns[c].row(r) if hasattr(block.columns[c], "row") else block.columns[c][r]
                        for c in columns} | {name: block.dense_rows(name, r) for name in block.dense})
    return out


# What marks a word start in each family's pieces (None: WordPiece, where "##" marks the rest).
WORD_MARKER = {"bert": None, "distilbert": None, "roberta": "\u0120", "xlmr": "\u2581", "mdeberta": "\u2581"}


def convention_word_starts(family, tokenizer, ids: list[int]) -> list[bool]:
    """Word starts by the family's own spelling of its pieces: a WordPiece piece without
    "##"; a SentencePiece or byte-level piece with its marker, or the first piece after a
    special token; never a special token."""
    marker, specials = WORD_MARKER[family], set(tokenizer.all_special_ids)
    starts, after_special = [], True
    for token, i in zip(tokenizer.convert_ids_to_tokens(ids), ids):
        special = i in specials
        if special:
            starts.append(False)
        elif marker is None:
            starts.append(not token.startswith("##"))
        else:
            starts.append(token.startswith(marker) or after_special)
        after_special = special
    return starts


@pytest.mark.parametrize("family", FAMILIES)
def test_a_masked_lm_teacher_of_every_family_is_cached_as_it_computes(thread_client, teachers, corpus, tmp_path,
                                                                      family):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    teacher = teachers[family]["mlm"]
    cache = open_cache(cache_teacher(thread_client, tmp_path, teacher, corpus, max_length=MAX_LENGTH, topk=TOPK,
                                     mask_prob=0.25, whole_word=True, hidden_layers=[0, 2], hidden_positions="all",
                                     sentence=["cls", "pooled"]))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForMaskedLM.from_pretrained(str(teacher)).eval()
    columns = ("input_ids", "word_start", "masked_positions", "labels", "topk_ids", "topk_logits", "lognorm")
    rows = rows_of(cache, columns)
    assert len(rows) == len(MIXED_TEXT)
    masked_somewhere = 0
    for text, row in zip(MIXED_TEXT, rows):
        ids = row["input_ids"].astype(np.int64)
        positions = row["masked_positions"].astype(np.int64)
        unmasked = ids.copy()
        unmasked[positions] = row["labels"]
        assert unmasked.tolist() == tokenizer(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        starts = convention_word_starts(family, tokenizer, unmasked.tolist())
        assert row["word_start"].tolist() == starts, (family, tokenizer.convert_ids_to_tokens(unmasked.tolist()))
        # Whole-word masking: a masked word is masked in all its pieces.
        word = np.cumsum(starts) - 1
        masked_words = set(word[positions].tolist())
        real = np.array([i not in tokenizer.all_special_ids for i in unmasked.tolist()])
        assert set(np.flatnonzero(np.isin(word, list(masked_words)) & real).tolist()) == set(positions.tolist())
        masked_somewhere += len(positions)
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids)[None], output_hidden_states=True)
        logits = out.logits[0, positions].double()
        lognorm = torch.logsumexp(logits, -1).numpy()
        np.testing.assert_allclose(row["lognorm"], lognorm, rtol=1e-5, atol=1e-5)
        top = row["topk_ids"].reshape(len(positions), TOPK).astype(np.int64)
        assert (top[:, 0] == logits.argmax(-1).numpy()).all()
        gathered = np.take_along_axis(logits.numpy(), top, 1)
        np.testing.assert_allclose(row["topk_logits"].reshape(len(positions), TOPK), gathered,
                                   rtol=2.0**-10, atol=1e-4)  # fp16: 11 significant bits
        for layer in (0, 2):
            np.testing.assert_allclose(row[f"hidden.{layer}"], out.hidden_states[layer][0].numpy(), rtol=2.0**-10,
                                       atol=2e-3)
        np.testing.assert_allclose(row["cls"][0], out.hidden_states[-1][0, 0].numpy(), rtol=2.0**-10, atol=2e-3)
        mean = out.hidden_states[-1][0].mean(0).numpy()  # one unpadded row: the mean over its tokens
        np.testing.assert_allclose(row["pooled"][0], mean, rtol=2.0**-10, atol=2e-3)
    assert masked_somewhere > 5


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pair_classifier_of_every_family_is_cached_as_it_computes(thread_client, teachers, tmp_path, family):
    """Each family's own pair template and calling convention: token types for BERT only,
    RoBERTa/XLM-R's doubled separator, DistilBERT and mDeBERTa without token types."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher = teachers[family]["classifier"]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{a}\t{b}\n" for a, b in PAIRS), encoding="utf-8")
    cache = open_cache(cache_teacher(thread_client, tmp_path / "c", teacher, f"pairs:{path}@en", max_length=24,
                                     text=True))
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForSequenceClassification.from_pretrained(str(teacher)).eval()
    rows = rows_of(cache, ("input_ids", "segment_b"))
    for (a, b), row in zip(PAIRS, rows):
        enc = tokenizer(a, b, truncation=True, max_length=24, return_tensors="pt")
        assert row["input_ids"].tolist() == enc["input_ids"][0].tolist()
        sequence = enc.encodings[0].sequence_ids
        assert sequence[row["segment_b"]] == 1 and 1 not in sequence[: row["segment_b"]]
        with torch.no_grad():
            expected = model(**enc).logits[0].numpy()
        np.testing.assert_allclose(row["class_logits"][0], expected, rtol=2.0**-10, atol=1e-3)
