"""xd ("XD: Cross-lingual Knowledge Distillation for Polyglot Sentence Embeddings", an ICLR
2020 submission): a task-tuned teacher's outputs on the English side of parallel pairs are
the targets of the student's outputs on the translations (section 2.3, steps 1-4):

    L_xd = mean over pairs of || f_S(translation) - f_T(English) ||^2        (the paper's "L2")

With `keep_source` (default true) the student also reads the English source and matches the
same teacher output, so English is not forgotten (section 3.3.1: "We also include English
so that the model does not forget its original English performance"):

    L = (L_xd + L_source) / 2  = the squared distance averaged over the 2B student inputs.

Two targets (`--option target=...`):
- class_logits (the paper): the teacher is a fine-tuned sequence classifier cached with
  `--class-logits`; the student is a union-vocab sequence classifier (`--init-from` the
  teacher itself gives the paper's "same model as teacher and student": its encoder through
  the union-vocab embedding initialisation, its pooler and classifier copied).
- pooled (multilingual sentence-embedding distillation): the teacher's cached sentence
  vectors (`--sentence pooled`); the student is the default union-vocab masked LM, pooled the
  way the teacher pools (read from the cache manifest: mean over the attention mask for
  MiniLM, then L2-normalised when the teacher normalises). When the widths differ a learned
  linear map (a method head, `projection`) takes the student's pooled vector to the
  teacher's width before normalisation.

The teacher ran on the cached rows' `text` (the row's language); the student tokenizes that
text and the row's `pair_text` (the other language of the cache's parallel corpus) itself,
each as the union vocab routes its language (`Vocab.tokenize`). See docs/methods.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInput
from ...pooling import MODES as POOLING_MODES, pool_tokens
from .. import losses as L
from ..models import classifier_student
from ..text import encode_by_language, one_side_pairs, partner_languages
from . import register
from .base import TEXT_NEED, Method, Need, Plan, model_inputs, option, require, row_vectors, same_width, with_pair_columns

TARGET_NEEDS = {"class_logits": Need("class_logits", "--class-logits"), "pooled": Need("pooled", "--sentence pooled")}
COLUMNS = ("example_id", "lang", "side", "text", "pair_text")
POOLED = {"target": ("pooled", None)}


@dataclass(frozen=True)
class Config:
    target: str | None = option(None, "what to distil: the teacher's class logits (the paper) or its sentence vectors; "
                                "none: whichever every cache holds", paper="class_logits", choices=tuple(TARGET_NEEDS))
    keep_source: bool = option(True, "also match the teacher on the English source, so English is not forgotten",
                               paper=True)
    max_length: int = option(128, "student tokens per text", low=2)
    # target=none may turn out pooled: plan_for refuses these when the caches make it class_logits
    pooling: str | None = option(None, "target=pooled: the student's pooling; none: the teacher's", choices=POOLING_MODES,
                                 used_when=POOLED)
    normalize: bool | None = option(None, "target=pooled: L2-normalise the student's vector; none: as the teacher does",
                                    used_when=POOLED)


@dataclass(frozen=True)
class XDPlan(Plan):
    target: str = "class_logits"
    width: int = 0  # the teacher output's width (classes or vector size)
    pooling: str = "mean"
    normalize: bool = False
    label_names: tuple | None = None


@register
class XD(Method):
    name = "xd"
    paper = "XD: Cross-lingual Knowledge Distillation for Polyglot Sentence Embeddings (ICLR 2020 submission)"
    Config = Config
    reads_sentence_pairs = True  # XNLI, PAWS-X: the translated pair against the English pair's logits
    needs = (TEXT_NEED, Need("class_logits", "--class-logits, for target=class_logits"),
             Need("pooled", "--sentence pooled, for target=pooled"))

    @classmethod
    def plan_for(cls, config, caches, student):
        require(cls.name, caches, [TEXT_NEED])
        target = config.target or _held_by_all(caches)
        require(cls.name, caches, [TARGET_NEEDS[target]], f" --option target={target}")
        pairs = one_side_pairs(caches, cls.name)
        pooling, normalize = "mean", False
        if target != "pooled" and (config.pooling is not None or config.normalize is not None):
            raise BadInput(f"--method xd --option pooling/normalize apply to target=pooled, and the caches give "
                           f"target={target} (every cache holds it): leave them out, or give --option target=pooled.")
        if target == "pooled":
            teacher = _teacher_pooling(caches)
            mode = teacher.get("mode", "mean")
            pooling = config.pooling or (mode if mode in POOLING_MODES else "mean")
            normalize = bool(teacher.get("normalize")) if config.normalize is None else config.normalize
        labels = next((c.teacher_labels or c.corpus_labels for c in caches if c.teacher_labels or c.corpus_labels), None)
        return XDPlan(columns=with_pair_columns(cls.name, caches, COLUMNS), dense=(target,), pairs=pairs,
                      target=target, width=same_width(cls.name, caches, target), pooling=pooling, normalize=normalize,
                      label_names=labels)

    @classmethod
    def build_student(cls, config, plan, vocab, student, init_from, init_teacher):
        if plan.target == "pooled":
            return super().build_student(config, plan, vocab, student, init_from, init_teacher)
        names = list(plan.label_names) if plan.label_names and len(plan.label_names) == plan.width else None
        return classifier_student(vocab, student, init_from, init_teacher, plan.width, names)

    def build_heads(self, student):
        if self.plan.target == "pooled" and int(student.config.hidden_size) != self.plan.width:
            self.modules["projection"] = nn.Linear(int(student.config.hidden_size), self.plan.width)

    def collate(self, rows):
        n = len(rows["example_id"])
        partner = partner_languages(rows, self.plan.pairs)
        missing = [i for i in range(n) if not rows["pair_text"][i] or partner[i] is None]
        if missing:
            raise BadInput(f"--method xd: example {int(rows['example_id'][missing[0]])} has no translation (empty "
                           "pair_text); cache a parallel corpus with --sides src.")
        texts, langs = list(rows["pair_text"]), list(partner)
        texts_b = list(rows["pair_text_b"]) if "pair_text_b" in rows else None  # sentence pairs
        if self.config.keep_source:
            texts += list(rows["text"])
            langs += list(rows["lang"])
            texts_b = texts_b + list(rows["text_b"]) if texts_b is not None else None
        return {
            **encode_by_language(self.vocab, texts, langs, self.config.max_length, texts_b),
            "teacher": row_vectors(rows, self.plan.target),
            "example_id": torch.from_numpy(np.asarray(rows["example_id"]).astype(np.int64)),
            "lang": list(rows["lang"]),
            "pair_lang": list(partner),
        }

    def student_vectors(self, batch, student) -> torch.Tensor:
        """The student's outputs for every input row of the batch: translations, then sources."""
        if self.plan.target == "class_logits":
            return student(**model_inputs(batch)).logits.float()
        out = student(**model_inputs(batch), masked_flat=torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device))
        vectors = pool_tokens(out.last_hidden_state.float(), batch["attention_mask"], self.plan.pooling)
        if "projection" in self.modules:
            vectors = self.modules["projection"](vectors)
        return F.normalize(vectors, p=2, dim=-1) if self.plan.normalize else vectors

    def losses(self, batch, student, step):
        vectors = self.student_vectors(batch, student)
        teacher = batch["teacher"]
        n = teacher.shape[0]
        parts = {"xd": L.squared_distance(vectors[:n], teacher)}
        if not self.config.keep_source:
            return {"loss": parts["xd"], **parts}
        parts["source"] = L.squared_distance(vectors[n:], teacher)
        return {"loss": L.weighted_sum(parts, {"xd": 0.5, "source": 0.5}), **parts}


def _held_by_all(caches) -> str:
    for target in ("class_logits", "pooled"):
        if caches and all(target in c.dense for c in caches):
            return target
    raise BadInput(
        "--method xd distils class logits (cache-teachers --class-logits) or sentence vectors "
        "(--sentence pooled), but the caches hold neither in every cache: "
        + "; ".join(f"{c.path}: {', '.join(sorted(c.dense)) or 'no dense outputs'}" for c in caches)
    )


def _teacher_pooling(caches) -> dict:
    poolings = {json.dumps(c.pooling, sort_keys=True) for c in caches}
    if len(poolings) != 1:
        raise BadInput("--method xd --option target=pooled: the caches' teachers pool sentences differently "
                       f"({sorted(poolings)}); use caches of one teacher, or set --option pooling=... normalize=...")
    return json.loads(poolings.pop())
