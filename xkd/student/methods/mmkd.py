"""mmkd (Multi-level Multilingual Knowledge Distillation, seeds/000): an English teacher
taught to a multilingual student over parallel en-X pairs, at four levels:

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInput
from . import register
from .base import TEXT_NEED, Method, Need, parse_bool
from .tlm import (
    PURPOSE_XWCL, TEXT_COLUMNS, choose_words, concat_pair, corrupt, epochs_of, flat_positions, mask_pairs,
    one_side_pairs, padded_ids, row_rng, tokenize_pairs,
)

OBJECTIVES = ("tlm", "xwcl", "senta", "struca")
# Options every method receives from train-student, whatever it is.
COMMON_OPTIONS = {"lambda_schedule", "lambda_start", "lambda_end", "temperature", "kd_target"}
DEFAULTS = {
    "tlm": "true", "xwcl": "true", "senta": "true", "struca": "true",
    "struca_weight": 1.0,  # alpha in eq. 6
    "xwcl_tau": 0.1, "struca_tau": 0.1,  # the paper gives no values
    "xwcl_similarity": "dot",  # the paper's; "cosine" normalises both vectors first
    "xwcl_layer": None,  # teacher layer of the word vectors; default: the highest word-aligned one cached
    "mask_prob": 0.15, "mask_seed": 0, "max_length": 128,
    "head_hidden": 768, "head_out": 128,  # the paper's projector/predictor sizes
    "projector_seed": 0,  # seeds the frozen teacher projectors
}
WORD_NEED = "--hidden-layers L --hidden-positions word"
WORD_HIDDEN_NEED = Need("hidden.*", WORD_NEED)
CLS_NEED = Need("cls", "--sentence cls")


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


def xwcl_loss(student_vectors, teacher_words, word_mask, query_row, query_word, tau: float,
              similarity: str = "dot") -> torch.Tensor:
    """InfoNCE (eq. 1): each query (a masked word's student vector, in the teacher's width)
    against the teacher vectors of every word of its own sentence; mean over queries."""
    if query_row.numel() == 0:
        return student_vectors.sum() * 0.0
    candidates = teacher_words[query_row]  # (Q, W, D)
    if similarity == "cosine":
        student_vectors, candidates = F.normalize(student_vectors, dim=-1), F.normalize(candidates, dim=-1)
    scores = torch.einsum("qd,qwd->qw", student_vectors, candidates) / tau
    scores = scores.masked_fill(~word_mask[query_row], float("-inf"))
    return F.cross_entropy(scores, query_word)


def senta_loss(student_prediction, teacher_projection) -> torch.Tensor:
    """Eq. 2: squared distance of the L2-normalised vectors, summed over dimensions, mean
    over the batch."""
    diff = F.normalize(student_prediction, dim=-1) - F.normalize(teacher_projection, dim=-1)
    return diff.pow(2).sum(-1).mean()


def struca_loss(student_prediction, teacher_projection, tau: float) -> torch.Tensor:
    """Eqs. 3-5: KL between row-softmaxed similarity matrices of normalised vectors."""
    z = F.normalize(teacher_projection, dim=-1)
    z_student = F.normalize(student_prediction, dim=-1)
    target = torch.softmax(z @ z.T / tau, dim=-1)
    log_q = torch.log_softmax(z_student @ z_student.T / tau, dim=-1)
    return F.kl_div(log_q, target, reduction="batchmean")


@register
class MMKD(Method):
    name = "mmkd"
    needs = (TEXT_NEED, WORD_HIDDEN_NEED, CLS_NEED)  # with every objective on (`xkd methods` lists them)
    columns = TEXT_COLUMNS

    @classmethod
    def check_caches(cls, caches) -> None:
        """Nothing yet: what a cache must hold depends on the objectives switched on, which
        only an instance knows; setup() checks exactly those."""

    def __init__(self, options, vocab=None, total_steps=1):
        super().__init__(options, vocab, total_steps)
        unknown = sorted(set(options) - set(DEFAULTS) - COMMON_OPTIONS)
        if unknown:
            raise BadInput(f"--option {', '.join(unknown)}: not an mmkd option. Its options: {', '.join(DEFAULTS)}.")
        o = {**DEFAULTS, **options}
        self.enabled = {name: parse_bool(o[name], name) for name in OBJECTIVES}
        if not any(self.enabled.values()):
            raise BadInput("mmkd: every objective is off (tlm, xwcl, senta, struca); leave at least one on.")
        self.struca_weight = float(o["struca_weight"])
        self.xwcl_tau, self.struca_tau = float(o["xwcl_tau"]), float(o["struca_tau"])
        self.xwcl_layer = None if o["xwcl_layer"] is None else int(o["xwcl_layer"])
        self.xwcl_similarity = str(o["xwcl_similarity"])
        if self.xwcl_similarity not in ("dot", "cosine"):
            raise BadInput(f"--option xwcl_similarity={self.xwcl_similarity}: choose dot (the paper) or cosine.")
        self.mask_prob, self.mask_seed, self.max_length = float(o["mask_prob"]), int(o["mask_seed"]), int(o["max_length"])
        self.head_hidden, self.head_out, self.projector_seed = int(o["head_hidden"]), int(o["head_out"]), int(o["projector_seed"])
        if self.xwcl_tau <= 0 or self.struca_tau <= 0:
            raise BadInput("mmkd: xwcl_tau and struca_tau must be positive.")
        self.needs = (TEXT_NEED,) + ((WORD_HIDDEN_NEED,) if self.enabled["xwcl"] else ()) + (
            (CLS_NEED,) if self.enabled["senta"] or self.enabled["struca"] else ())
        self.hidden_name: str | None = None
        self.pairs: list = []

    # Setup: what the caches hold, and the heads ---------------------------------------
    def setup(self, student, caches):
        # The base check reads only `needs` and `name`: here, the needs of this configuration.
        Method.check_caches.__func__(self, caches)
        self.pairs = one_side_pairs(caches, "mmkd")
        dense = []
        if self.enabled["xwcl"]:
            self.hidden_name = self._word_layer(caches)
            dense.append(self.hidden_name)
        if self.enabled["senta"] or self.enabled["struca"]:
            dense.append("cls")
        self.dense = tuple(dense)
        width = int(student.config.hidden_size)
        # One draw from the global RNG seeds every trainable head, each by its own offset, so
        # that a head starts the same whichever other objectives are switched on.
        base_seed = int(torch.randint(0, 2**31 - 1, ()))

        def seeded(offset: int, build):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(base_seed + offset)
                return build()

        if self.enabled["xwcl"]:
            teacher_width = caches[0].dense_specs[self.hidden_name].dim
            if teacher_width != width:  # the paper's widths are equal; a learned map bridges them
                self.modules["xwcl_projection"] = seeded(0, lambda: nn.Linear(width, teacher_width))
        if self.enabled["senta"] or self.enabled["struca"]:
            cls_width = self._same_dim(caches, "cls")
            for offset, name in enumerate(("senta", "struca")):
                if self.enabled[name]:
                    self.modules[f"{name}_projector"] = seeded(1 + 2 * offset, lambda: mlp(width, self.head_hidden, self.head_out))
                    self.modules[f"{name}_predictor"] = seeded(2 + 2 * offset, lambda: mlp(self.head_out, self.head_hidden, self.head_out))
                    self.modules[f"{name}_teacher_projector"] = frozen_projector(
                        cls_width, self.head_hidden, self.head_out, self.projector_seed + offset)

    def _word_layer(self, caches) -> str:
        def word_layers(cache):
            return {int(n.split(".", 1)[1]) for n, s in cache.dense_specs.items() if n.startswith("hidden.") and s.align == "word"}

        for cache in caches:
            layers = word_layers(cache)
            if not layers or (self.xwcl_layer is not None and self.xwcl_layer not in layers):
                what = f"hidden.{self.xwcl_layer}" if self.xwcl_layer is not None else "hidden.<layer>"
                raise BadInput(
                    f"--method mmkd (XWCL) needs the cached output '{what}' aligned to words, which {cache.path} lacks "
                    f"(it has: {', '.join(sorted(cache.dense_specs)) or 'no dense outputs'}). Re-run cache-teachers with "
                    f"{WORD_NEED} (L = the teacher's last layer), or turn XWCL off with --option xwcl=false."
                )
        layer = self.xwcl_layer if self.xwcl_layer is not None else max(word_layers(caches[0]))
        name = f"hidden.{layer}"
        self._same_dim(caches, name)
        return name

    @staticmethod
    def _same_dim(caches, name: str) -> int:
        dims = {c.dense_specs[name].dim for c in caches if name in c.dense_specs}
        if len(dims) != 1:
            raise BadInput(f"--method mmkd: the caches' '{name}' outputs differ in width ({sorted(dims)}); use caches of one teacher.")
        return dims.pop()

    # Batches ---------------------------------------------------------------------------
    def collate(self, rows):
        """Up to three stacked row blocks of one student forward: TLM inputs, XWCL inputs,
        and the translations alone ([CLS] x [SEP]); each block has one row per example."""
        vocab = self.vocab
        n = len(rows["example_id"])
        src, tgt = tokenize_pairs(vocab, rows, self.pairs, self.max_length)
        if any(t is None for t in tgt):
            raise BadInput("mmkd: a cached row has no translation (empty pair_text); cache a parallel corpus with --sides src.")
        epochs = epochs_of(rows)
        blocks: list[list[np.ndarray]] = []
        batch: dict = {"example_id": torch.from_numpy(np.asarray(rows["example_id"]).astype(np.int64)), "lang": list(rows["lang"])}
        tlm_positions = []
        if self.enabled["tlm"]:
            built = mask_pairs(vocab, src, tgt, rows["example_id"], epochs, seed=self.mask_seed, prob=self.mask_prob)
            blocks.append([b[0] for b in built])
            tlm_positions = [b[1] for b in built]
            batch["tlm_labels"] = torch.from_numpy(np.concatenate([b[2] for b in built]).astype(np.int64))
        if self.enabled["xwcl"]:
            teacher = rows[self.hidden_name]
            inputs, queries, query_words, aligned = self._xwcl_rows(src, tgt, teacher.lengths(), rows["example_id"], epochs)
            xwcl_block = len(blocks)
            blocks.append(inputs)
            batch["teacher_words"], batch["teacher_word_mask"] = self._teacher_words(teacher, aligned)
            batch["xwcl_word"] = torch.from_numpy(np.concatenate(query_words).astype(np.int64))
        if self.enabled["senta"] or self.enabled["struca"]:
            trans_block = len(blocks)
            blocks.append([t.ids for t in tgt])
            batch["teacher_cls"] = torch.from_numpy(np.asarray(rows["cls"].values, dtype=np.float32))
        input_ids, attention_mask = padded_ids([ids for block in blocks for ids in block], vocab.pad_id)
        width = input_ids.shape[1]
        batch["input_ids"], batch["attention_mask"] = input_ids, attention_mask
        empty = [np.zeros(0, np.int64)] * n
        batch["tlm_flat"] = torch.from_numpy(flat_positions(tlm_positions or empty, width)[0])
        if self.enabled["xwcl"]:
            flat, row_of = flat_positions(queries, width)
            batch["xwcl_flat"] = torch.from_numpy(flat + xwcl_block * n * width)
            batch["xwcl_row"] = torch.from_numpy(row_of)
        if self.enabled["senta"] or self.enabled["struca"]:
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
            rng = row_rng(self.mask_seed, example_ids[i], epochs[i], PURPOSE_XWCL)
            words = choose_words(rng, n_aligned, self.mask_prob)
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
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], masked_flat=batch["tlm_flat"])
        hidden = out.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        parts: dict[str, torch.Tensor] = {}
        if self.enabled["tlm"]:
            parts["tlm"] = F.cross_entropy(out.logits.float(), batch["tlm_labels"])
        if self.enabled["xwcl"]:
            vectors = flat[batch["xwcl_flat"]].float()
            if "xwcl_projection" in self.modules:
                vectors = self.modules["xwcl_projection"](vectors)
            parts["xwcl"] = xwcl_loss(vectors, batch["teacher_words"], batch["teacher_word_mask"], batch["xwcl_row"],
                                      batch["xwcl_word"], self.xwcl_tau, self.xwcl_similarity)
        if self.enabled["senta"] or self.enabled["struca"]:
            cls = flat[batch["translation_flat"]].float()
            teacher_cls = batch["teacher_cls"]
            for name in ("senta", "struca"):
                if not self.enabled[name]:
                    continue
                prediction = self.modules[f"{name}_predictor"](self.modules[f"{name}_projector"](cls))
                projection = self.modules[f"{name}_teacher_projector"](teacher_cls)
                parts[name] = senta_loss(prediction, projection) if name == "senta" else struca_loss(prediction, projection, self.struca_tau)
        total = sum(parts.get(name, 0.0) for name in ("tlm", "xwcl", "senta"))
        if "struca" in parts:
            total = total + self.struca_weight * parts["struca"]
        return {"loss": total, **parts}


def _first_tokens(word: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Position of the first token of each of `words` in a row's word numbering."""
    starts = np.flatnonzero((word >= 0) & np.concatenate([[True], word[1:] != word[:-1]]))
    first_of = dict(zip(word[starts].tolist(), starts.tolist()))
    return np.array([first_of[w] for w in words.tolist()], dtype=np.int64)
