"""mmkd (Multi-level Multilingual Knowledge Distillation, from "Multi-level Distillation of
Semantic Knowledge for Pre-training Multilingual Language Model", Li et al. 2022): an English
teacher taught to a multilingual student over parallel en-X pairs, at four levels:

    L = L_TLM + L_XWCL + L_SentA + alpha * L_StrucA            (eq. 6)

- TLM (token level, student only): [CLS] en [SEP] x [SEP], 15% of the tokens of both sides
  masked 80/10/10, gold-label cross-entropy (mean over masked tokens).
- XWCL (word level): 15% of the whole English words of the same concatenation masked
  80/10/10; the student's last-layer vector at each masked word's first sub-token is pulled
  to the teacher's vector of the same word (teacher saw the unmasked English sentence;
  cached word-first hidden states) with InfoNCE over the words of the sentence, dot-product
  similarity at temperature tau (eq. 1; averaged over the batch's masked words).
- SentA (sentence level): MSE between the L2-normalised student prediction
  q(g(c~)) of the translation's [CLS] and the L2-normalised frozen teacher projection g'(c) of
  the English [CLS] (eq. 2: summed over dimensions, averaged over the batch).
- StrucA (structure level): with separate heads, A = z z^T of the normalised teacher
  projections, A~ likewise of the student predictions; KL(softmax(A/tau) || softmax(A~/tau))
  row by row (eq. 5; torch's KLDivLoss with reduction "batchmean" over the B x B matrix,
  which equals the sum over rows of each row's KLDivLoss with its default "mean").

Words, not tokens, align teacher and student: the student tokenizes the English side with
the tokenizer its vocab routes English to, whose words (the tokenizer's pre-tokenized
words) are matched in order with the cache's word-aligned rows. See docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ...errors import BadInput
from ...masking import choose_words
from .. import losses as L
from ..text import (
    PURPOSE_XWCL,
    TEXT_COLUMNS,
    concat_pair,
    corrupt,
    epochs_of,
    flat_positions,
    mask_pairs,
    one_side_pairs,
    padded_ids,
    row_rng,
    tokenize_pairs,
)
from . import register
from .base import TEXT_NEED, Method, Need, Plan, check_head_memory, option, require, same_width

WORD_NEED = "--hidden-layers L --hidden-positions word"
WORD_HIDDEN_NEED = Need("hidden.*", WORD_NEED)
CLS_NEED = Need("cls", "--sentence cls")


# Which objectives read an option: given with all of them off, it would be ignored.
XWCL, STRUCA = {"xwcl": (True,)}, {"struca": (True,)}
MASKED = {"tlm": (True,), "xwcl": (True,)}  # the student-side masks
SENTENCE = {"senta": (True,), "struca": (True,)}  # the projector and predictor heads


@dataclass(frozen=True)
class Config:
    tlm: bool = option(True, "L_TLM: masked LM over [CLS] en [SEP] x [SEP]", paper=True)
    xwcl: bool = option(True, "L_XWCL: word-level InfoNCE to the teacher's word vectors", paper=True)
    senta: bool = option(True, "L_SentA: sentence alignment of projected [CLS] vectors", paper=True)
    struca: bool = option(True, "L_StrucA: structure alignment within the batch", paper=True)
    struca_weight: float = option(1.0, "α, the weight of L_StrucA (eq. 6)", low=0.0, used_when=STRUCA)
    xwcl_tau: float = option(0.1, "τ of XWCL's InfoNCE (the paper gives no value)", low=0.0, low_open=True, used_when=XWCL)
    struca_tau: float = option(0.1, "τ of StrucA's softmax (the paper gives no value)", low=0.0, low_open=True,
                               used_when=STRUCA)
    xwcl_similarity: str = option("dot", "XWCL similarity: dot product (the paper) or cosine", paper="dot",
                                  choices=("dot", "cosine"), used_when=XWCL)
    xwcl_layer: int | None = option(None, "teacher layer of the word vectors; none: the highest word-aligned one cached",
                                    low=0, used_when=XWCL)
    mask_prob: float = option(0.15, "share of tokens (TLM) and of English words (XWCL) masked", paper=0.15, low=0.0,
                              high=1.0, low_open=True, high_open=True, used_when=MASKED)
    mask_seed: int = option(0, "seed of the student-side masks", low=0, used_when=MASKED)
    max_length: int = option(128, "student tokens per side", paper=128, low=2)
    head_hidden: int = option(768, "hidden width of the projector and predictor MLPs", paper=768, low=1, used_when=SENTENCE)
    head_out: int = option(128, "output width of the projector and predictor MLPs", paper=128, low=1, used_when=SENTENCE)
    projector_seed: int = option(0, "seed of the frozen teacher projectors", low=0, used_when=SENTENCE)

    def __post_init__(self):
        if not (self.tlm or self.xwcl or self.senta or self.struca):
            raise BadInput("--method mmkd: every objective is off (tlm, xwcl, senta, struca); leave at least one on.")


@dataclass(frozen=True)
class MMKDPlan(Plan):
    word_layer: str | None = None  # the cached word-aligned hidden states XWCL reads
    word_width: int = 0
    cls_width: int = 0

    @property
    def sentence(self) -> bool:
        return self.cls_width > 0


def mlp(d_in: int, hidden: int, out: int) -> nn.Sequential:
    """The paper's 2-layer MLP head (it does not say more; BYOL's batch norm is left out so
    that a head's output for one example does not depend on the rest of the batch)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, out))


def frozen_projector(d_in: int, hidden: int, out: int, seed: int) -> nn.Sequential:
    """A teacher-side projector: seeded (the same weights in every run with this seed,
    whatever the global RNG state) and frozen (never in the optimiser)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = mlp(d_in, hidden, out)
    for p in head.parameters():
        p.requires_grad_(False)
    return head


@register
class MMKD(Method):
    name = "mmkd"
    paper = ("Multi-level Multilingual Knowledge Distillation (MMKD), from Multi-level Distillation of Semantic "
             "Knowledge for Pre-training Multilingual Language Model (Li et al. 2022)")
    Config = Config
    needs = (TEXT_NEED, WORD_HIDDEN_NEED, CLS_NEED)  # with every objective on

    @classmethod
    def plan_for(cls, config, caches, student):
        sentence = config.senta or config.struca
        require(cls.name, caches, [TEXT_NEED] + ([WORD_HIDDEN_NEED] if config.xwcl else []) + ([CLS_NEED] if sentence else []))
        pairs = one_side_pairs(caches, cls.name)
        word_layer = _word_layer(config, caches) if config.xwcl else None
        dense = ((word_layer,) if word_layer else ()) + (("cls",) if sentence else ())
        return MMKDPlan(columns=TEXT_COLUMNS, dense=dense, pairs=pairs, word_layer=word_layer,
                        word_width=same_width(cls.name, caches, word_layer) if word_layer else 0,
                        cls_width=same_width(cls.name, caches, "cls") if sentence else 0)

    def build_heads(self, student):
        c, plan = self.config, self.plan
        width = int(student.config.hidden_size)
        # One draw from the global RNG seeds every trainable head, each by its own offset, so
        # that a head starts the same whichever other objectives are switched on.
        base_seed = int(torch.randint(0, 2**31 - 1, ()))
        objectives = sum(1 for name in ("senta", "struca") if getattr(c, name))
        check_head_memory(self.name, {"head_hidden": c.head_hidden, "head_out": c.head_out},  # before allocating them
                          trainable=objectives * (c.head_hidden * (width + 3 * c.head_out) + 2 * c.head_out),
                          frozen=objectives * c.head_hidden * (plan.cls_width + c.head_out))

        def seeded(offset: int, build):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base_seed + offset)
                return build()

        if c.xwcl and plan.word_width != width:  # the paper's widths are equal; a learned map bridges them
            self.modules["xwcl_projection"] = seeded(0, lambda: nn.Linear(width, plan.word_width))
        for offset, name in enumerate(("senta", "struca")):
            if getattr(c, name):
                self.modules[f"{name}_projector"] = seeded(1 + 2 * offset, lambda: mlp(width, c.head_hidden, c.head_out))
                self.modules[f"{name}_predictor"] = seeded(2 + 2 * offset, lambda: mlp(c.head_out, c.head_hidden, c.head_out))
                self.modules[f"{name}_teacher_projector"] = frozen_projector(plan.cls_width, c.head_hidden, c.head_out,
                                                                             c.projector_seed + offset)

    # Batches ---------------------------------------------------------------------------
    def collate(self, rows):
        """Up to three stacked row blocks of one student forward: TLM inputs, XWCL inputs,
        and the translations alone ([CLS] x [SEP]); each block has one row per example."""
        vocab = self.vocab
        n = len(rows["example_id"])
        src, tgt = tokenize_pairs(vocab, rows, self.plan.pairs, self.config.max_length)
        if any(t is None for t in tgt):
            raise BadInput("mmkd: a cached row has no translation (empty pair_text); cache a parallel corpus with --sides src.")
        epochs = epochs_of(rows)
        blocks: list[list[np.ndarray]] = []
        batch: dict = {"example_id": torch.from_numpy(np.asarray(rows["example_id"]).astype(np.int64)),
                       "lang": list(rows["lang"])}
        tlm_positions = []
        if self.config.tlm:
            built = mask_pairs(vocab, src, tgt, rows["example_id"], epochs,
                               seed=self.config.mask_seed, prob=self.config.mask_prob)
            blocks.append([b[0] for b in built])
            tlm_positions = [b[1] for b in built]
            batch["tlm_labels"] = torch.from_numpy(np.concatenate([b[2] for b in built]).astype(np.int64))
        if self.config.xwcl:
            teacher = rows[self.plan.word_layer]
            inputs, queries, query_words, aligned = self._xwcl_rows(src, tgt, teacher.lengths(), rows["example_id"], epochs)
            xwcl_block = len(blocks)
            blocks.append(inputs)
            batch["teacher_words"], batch["teacher_word_mask"] = self._teacher_words(teacher, aligned)
            batch["xwcl_word"] = torch.from_numpy(np.concatenate(query_words).astype(np.int64))
        if self.plan.sentence:
            trans_block = len(blocks)
            blocks.append([t.ids for t in tgt])
            batch["teacher_cls"] = torch.from_numpy(np.asarray(rows["cls"].values, dtype=np.float32))
        input_ids, attention_mask = padded_ids([ids for block in blocks for ids in block], vocab.pad_id)
        width = input_ids.shape[1]
        batch["input_ids"], batch["attention_mask"] = input_ids, attention_mask
        empty = [np.zeros(0, np.int64)] * n
        batch["tlm_flat"] = torch.from_numpy(flat_positions(tlm_positions or empty, width)[0])
        if self.config.xwcl:
            flat, row_of = flat_positions(queries, width)
            batch["xwcl_flat"] = torch.from_numpy(flat + xwcl_block * n * width)
            batch["xwcl_row"] = torch.from_numpy(row_of)
        if self.plan.sentence:
            batch["translation_flat"] = torch.from_numpy((trans_block * n + np.arange(n, dtype=np.int64)) * width)
        return batch

    def _xwcl_rows(self, src, tgt, teacher_words: np.ndarray, example_ids, epochs):
        """Per row: the concatenation with 15% of the aligned English words masked, the
        positions of those words' first sub-tokens, their word numbers, and how many words
        align (the first min(student words, teacher words))."""
        inputs, queries, query_words, aligned = [], [], [], []
        for i in range(len(src)):
            pair = concat_pair(src[i], tgt[i], self.vocab.cls_id)
            n_aligned = min(src[i].n_words, int(teacher_words[i]))
            rng = row_rng(self.config.mask_seed, example_ids[i], epochs[i], PURPOSE_XWCL)
            words = choose_words(rng, n_aligned, self.config.mask_prob)
            positions = np.flatnonzero(np.isin(pair.word, words))  # every token of each chosen word (src only)
            inputs.append(corrupt(rng, pair.ids, positions, self.vocab))
            queries.append(_first_tokens(pair.word, words))
            query_words.append(words)
            aligned.append(n_aligned)
        return inputs, queries, query_words, np.array(aligned, dtype=np.int64)

    @staticmethod
    def _teacher_words(teacher, aligned: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's word vectors of each row, (B, W, D) float32, and which are the
        sentence's aligned words."""
        lengths = teacher.lengths()
        width = int(aligned.max()) if aligned.size else 0
        out = np.zeros((len(lengths), width, teacher.values.shape[1]), dtype=np.float32)
        mask = np.zeros((len(lengths), width), dtype=bool)
        for r, n in enumerate(aligned.tolist()):
            start = int(teacher.offsets[r])
            out[r, :n] = teacher.values[start : start + n]
            mask[r, :n] = True
        return torch.from_numpy(out), torch.from_numpy(mask)

    # Losses ----------------------------------------------------------------------------
    def losses(self, batch, student, step):
        c = self.config
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], masked_flat=batch["tlm_flat"])
        hidden = out.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        parts: dict[str, torch.Tensor] = {}
        if c.tlm:
            parts["tlm"] = L.gold_cross_entropy(out.logits, batch["tlm_labels"])
        if c.xwcl:
            vectors = flat[batch["xwcl_flat"]].float()
            if "xwcl_projection" in self.modules:
                vectors = self.modules["xwcl_projection"](vectors)
            parts["xwcl"] = L.word_infonce(vectors, batch["teacher_words"], batch["teacher_word_mask"], batch["xwcl_row"],
                                           batch["xwcl_word"], c.xwcl_tau, c.xwcl_similarity)
        if self.plan.sentence:
            cls = flat[batch["translation_flat"]].float()
            for name in ("senta", "struca"):
                if not getattr(c, name):
                    continue
                prediction = self.modules[f"{name}_predictor"](self.modules[f"{name}_projector"](cls))
                projection = self.modules[f"{name}_teacher_projector"](batch["teacher_cls"])
                parts[name] = (L.normalized_squared_distance(prediction, projection) if name == "senta"
                               else L.structure_kl(prediction, projection, c.struca_tau))
        weights = {"tlm": 1.0, "xwcl": 1.0, "senta": 1.0, "struca": c.struca_weight}  # eq. 6
        return {"loss": L.weighted_sum(parts, weights), **parts}


def _word_layer(config, caches) -> str:
    def word_layers(cache):
        return {int(n.split(".", 1)[1]) for n, s in cache.dense.items() if n.startswith("hidden.") and s.align == "word"}

    for cache in caches:
        layers = word_layers(cache)
        if not layers or (config.xwcl_layer is not None and config.xwcl_layer not in layers):
            what = f"hidden.{config.xwcl_layer}" if config.xwcl_layer is not None else "hidden.<layer>"
            raise BadInput(
                f"--method mmkd (XWCL) needs the cached output '{what}' aligned to words, which {cache.path} lacks "
                f"(it has: {', '.join(sorted(cache.dense)) or 'no dense outputs'}). Re-run cache-teachers with "
                f"{WORD_NEED} (L = the teacher's last layer), or turn XWCL off with --option xwcl=false."
            )
    layer = config.xwcl_layer if config.xwcl_layer is not None else max(word_layers(caches[0]))
    return f"hidden.{layer}"


def _first_tokens(word: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Position of the first token of each of `words` in a row's word numbering."""
    starts = np.flatnonzero((word >= 0) & np.concatenate([[True], word[1:] != word[:-1]]))
    first_of = dict(zip(word[starts].tolist(), starts.tolist()))
    return np.array([first_of[w] for w in words.tolist()], dtype=np.int64)
