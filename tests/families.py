"""Tiny random-weight teachers of every encoder family, each with a real tokenizer of its
own convention (issue 13):

- bert: WordPiece (`##` continuations), the real mBERT vocabulary; token types;
- distilbert: WordPiece, the real mBERT vocabulary; no token types;
- roberta: byte-level BPE (`Ġ` word starts), the real roberta-base vocab.json/merges.txt;
- xlmr: SentencePiece Unigram (`▁` word starts, `<s> <pad>=1 </s> <unk>`, byte fallback),
  trained here with the `tokenizers` library on text the project writes (tests/toytask.py);
- mdeberta: the same Unigram model as a DebertaV2 tokenizer (`[CLS] [SEP] [PAD]=0`),
  relative positions in the model.

`build_family(kind, family, out)` saves a model directory that AutoModel/AutoTokenizer load.
"""

from __future__ import annotations

import json
import shutil
from functools import lru_cache
from pathlib import Path

import torch

from conftest import VOCABS

FAMILIES = ("bert", "distilbert", "roberta", "xlmr", "mdeberta")
# Text with punctuation, digits, CJK and three scripts, for word-boundary and round-trip checks.
MIXED_TEXT = [
    "The team won the match, 3-1, on 12 May 2024!",
    "El equipo ganó el partido (¡por fin!) en Madrid.",
    "टीम ने कल मैच जीता, और लोग खुश थे।",
    "東京は日本の首都です。北京是中国的首都。",
    "Prices rose 3.5% to $1,200 — a record.",
    "A rare 龘 and an emoji 🙂 (byte fallback).",
]


@lru_cache(maxsize=1)
def _training_text() -> tuple[str, ...]:
    """Sentences in English, Spanish and Hindi from the project's toy task, plus the mixed
    lines above but the last, so the Unigram model has pieces for every script it is tested
    on and none for 龘 or 🙂, which byte fallback spells."""
    import tempfile

    from toytask import write_toy_task

    texts: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        info = write_toy_task(tmp, train=200, test=10, parallel=200)
        for name, path in info["files"].items():
            if name.endswith((".tsv", ".txt")):
                for line in Path(path).read_text(encoding="utf-8").split("\n"):
                    texts += [field for field in line.split("\t") if field]
    return tuple(texts + MIXED_TEXT[:-1] * 3)  # not the last line: its characters must fall back to bytes


XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3, as in XLM-R; <mask> is last
DEBERTA_SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")  # ids 0-3, as in mDeBERTa-v3; [MASK] is last


@lru_cache(maxsize=2)
def unigram_tokenizer(specials: tuple[str, ...]):
    """A SentencePiece-style Unigram tokenizer (`tokenizers`): NFKC, ▁ before every word,
    byte fallback for characters it has no piece for; `specials` are ids 0-3, the fourth
    the unknown piece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def shell(model):
        tok = Tokenizer(model)
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="always"),
                                         decoders.ByteFallback()])
        return tok

    draft = shell(models.Unigram())
    draft.train_from_iterator(_training_text(), trainers.UnigramTrainer(
        vocab_size=1200, special_tokens=list(specials), unk_token=specials[3]))
    pieces = [tuple(p) for p in json.loads(draft.to_str())["model"]["vocab"]]
    have = {p for p, _ in pieces}
    floor = min(score for _, score in pieces if score < 0) - 10.0
    pieces += [(f"<0x{b:02X}>", floor) for b in range(256) if f"<0x{b:02X}>" not in have]
    tok = shell(models.Unigram(pieces, unk_id=3, byte_fallback=True))
    tok.add_special_tokens(list(specials))
    return tok


def family_tokenizer(family: str):
    """The family's real tokenizer (a transformers fast tokenizer)."""
    from transformers import BertTokenizer, DebertaV2TokenizerFast, DistilBertTokenizer, RobertaTokenizer, XLMRobertaTokenizerFast

    mbert = str(VOCABS / "bert-base-multilingual-cased.vocab.txt")
    if family == "bert":
        return BertTokenizer(vocab=mbert, do_lower_case=False)
    if family == "distilbert":
        return DistilBertTokenizer(vocab=mbert, do_lower_case=False)
    if family == "roberta":
        source = VOCABS / "roberta-base"
        return RobertaTokenizer(vocab=str(source / "vocab.json"), merges=str(source / "merges.txt"))
    if family == "xlmr":
        backend = unigram_tokenizer(XLMR_SPECIALS).__class__.from_str(unigram_tokenizer(XLMR_SPECIALS).to_str())
        backend.add_special_tokens(["<mask>"])
        return XLMRobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                       cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    if family == "mdeberta":
        from tokenizers import Tokenizer, processors

        backend = Tokenizer.from_str(unigram_tokenizer(DEBERTA_SPECIALS).to_str())
        backend.add_special_tokens(["[MASK]"])
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))])
        return DebertaV2TokenizerFast(tokenizer_object=backend, bos_token="[CLS]", eos_token="[SEP]", cls_token="[CLS]",
                                      sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def family_config(family: str, tokenizer, kind: str, num_labels: int = 2, hidden: int = 32, layers: int = 2,
                  heads: int = 2, init_range: float = 0.2):
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, RobertaConfig, XLMRobertaConfig

    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, initializer_range=init_range,
                  num_labels=num_labels)
    if kind == "classifier":
        common.update(id2label={i: f"class{i}" for i in range(num_labels)},
                      label2id={f"class{i}": i for i in range(num_labels)})
    if family == "distilbert":
        return DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=2 * hidden,
                                max_position_embeddings=256, **common)
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * hidden)
    if family == "bert":
        return BertConfig(max_position_embeddings=256, **sizes, **common)
    if family in ("roberta", "xlmr"):
        cls = RobertaConfig if family == "roberta" else XLMRobertaConfig
        # Positions start after the padding index (pad_token_id + 1), as in XLM-R and RoBERTa.
        return cls(max_position_embeddings=256 + tokenizer.pad_token_id + 1, type_vocab_size=1,
                   bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id, **sizes, **common)
    # mDeBERTa-v3: relative positions, no absolute position embeddings, no token types.
    return DebertaV2Config(max_position_embeddings=256, relative_attention=True, position_buckets=32,
                           pos_att_type=["p2c", "c2p"], position_biased_input=False, type_vocab_size=0,
                           max_relative_positions=-1, **sizes, **common)


def build_family(family: str, out: Path, kind: str = "mlm", seed: int = 0, **sizes) -> Path:
    """Save a random-weight `kind` ("mlm" | "classifier" | "encoder") model of `family`
    with its tokenizer to `out`."""
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    tokenizer = family_tokenizer(family)
    tokenizer.save_pretrained(out)
    if family in ("xlmr", "mdeberta"):
        # Loaded as XLMRobertaTokenizer / DebertaV2Tokenizer, transformers rebuilds the pipeline
        # from the class's defaults and drops the file's byte fallback and NFKC; the generic
        # class reads tokenizer.json as written, so the teacher really falls back to bytes.
        config_file = out / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    config = family_config(family, tokenizer, kind, **sizes)
    torch.manual_seed(seed)
    auto = {"mlm": AutoModelForMaskedLM, "classifier": AutoModelForSequenceClassification, "encoder": AutoModel}[kind]
    auto.from_config(config).eval().save_pretrained(out)
    return out
