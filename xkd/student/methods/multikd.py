"""multikd (MultiKD, from "Cross-Lingual Text Classification with Multilingual Distillation
and Zero-Shot-Aware Training", Yang et al. 2022): several monolingual teachers, each
fine-tuned on the task in its language, taught to one multilingual student.

Each step samples a supervised language l, a batch of that language (`mix = "batch"`), and
distils from that language's teacher (its cached class logits; one cache per teacher):

    L_KD = -1/N sum_i softmax(z_T,i / tau) . log softmax(z_S,i / tau)      (eqs. 1-3)

with tau = 8 (the paper's temperature for all distillation experiments; `temperature`).
Eq. 3 has no tau^2 factor, nor does TextBrewer's cross-entropy KD loss that the paper trains
with, so by default (`t2=false`) the factor that losses.distillation_cross_entropy applies (its
one rule, tau^2, as for every method) is divided out again: at the paper's tau = 8 it would make
the loss 64 times larger. `t2=true` keeps it (Hinton et al.'s scaling, which keeps gradient
sizes comparable across temperatures).

Gold labels: where a row carries a class label (`class_label` >= 0: a cached `labeled:`
corpus), the batch also reports `label`, the cross-entropy of the student's logits (tau = 1)
with the gold class; it is added to the loss with weight `label_weight` (default 0: the
paper's MultiKD objective is eq. 3 alone; MultiTrain, its label-only baseline, is not this
method).

Student (`student=`): `plain`, a union-vocab sequence classifier (from `--init-from`
through the union-vocab embedding initialisation, or random), or `mblm`, the same
classifier (BERT or XLM-R) turned into MBLM (xkd.student.mblm, docs/mblm.md) with one branch per supervised
language (the languages of the caches, in the order the caches are given) over the bottom
`branch_layers` (K = 4) layers. The batch's language goes to MBLM's forward (`lang=`), which
detaches the other branches in training; a zero-shot language goes through all branches at
inference.

Class order: each teacher numbers its classes as its config's id2label does, and hub
fine-tunes of one task do not always agree. The plan compares the teachers' class names:
where they name the same classes in another order, each cache's logits (and a labeled
corpus's gold ids) are permuted into the first cache's order; where the names differ, it is
an error. Teachers whose classes are unnamed (LABEL_0, ...) are taken to agree.

The student tokenizes each row's text itself, as the union vocab routes its language
(`Vocab.tokenize`), i.e. exactly as it will see that language at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import BadInput
from .. import losses as L
from ..models import classifier_student
from ..text import encode_by_language
from . import register
from .base import (
    TEXT_NEED,
    Method,
    Need,
    Plan,
    class_orders,
    gold_order_of,
    in_student_class_order,
    model_inputs,
    option,
    require,
    same_width,
    with_pair_columns,
)

NEEDS = (Need("class_logits", "--class-logits (on by default for sequence classifiers)"), TEXT_NEED)
COLUMNS = ("example_id", "lang", "class_label", "text")


@dataclass(frozen=True)
class Config:
    student: str = option("plain", "plain: a sequence classifier; mblm: multi-branch, one branch per supervised language",
                          choices=("plain", "mblm"))
    branch_layers: int = option(4, "student=mblm: K, the bottom layers replicated per language", paper=4, low=1,
                                used_when={"student": ("mblm",)})
    temperature: float = option(8.0, "τ of the soft cross-entropy (eq. 3)", paper=8.0, low=0.0, low_open=True)
    t2: bool = option(False, "multiply the KD term by τ² (Hinton et al.); eq. 3 has no such factor", paper=False)
    label_weight: float = option(0.0, "weight of the gold-label cross-entropy where rows carry labels (0: eq. 3 alone)",
                                 paper=0.0, low=0.0)
    max_length: int = option(128, "student tokens per text", low=2)


@dataclass(frozen=True)
class MultiKDPlan(Plan):
    languages: tuple = ()  # the supervised languages, in cache order (MBLM's branch order)
    width: int = 0  # classes
    label_names: tuple | None = None  # class names in the student's (the first cache's) order
    logit_order: tuple = ()  # per cache: the teacher's class index for each student class, or None (same order)
    gold_order: tuple = ()  # per cache: the student's class id for each of the corpus's label ids, or None


@register
class MultiKD(Method):
    name = "multikd"
    paper = ("MultiKD with the MBLM student, from Cross-Lingual Text Classification with Multilingual Distillation and "
             "Zero-Shot-Aware Training (Yang et al. 2022)")
    Config = Config
    reads_sentence_pairs = True  # XNLI, PAWS-X: each language's teacher reads its own pairs
    needs = NEEDS

    @classmethod
    def plan_for(cls, config, caches, student):
        require(cls.name, caches, NEEDS)
        width = same_width(cls.name, caches, "class_logits")
        names, logit_order = class_orders(cls.name, caches)
        gold_order = tuple(gold_order_of(cls.name, cache, names) for cache in caches)
        languages = tuple(dict.fromkeys(lang for cache in caches for lang in cache.languages))
        return MultiKDPlan(columns=with_pair_columns(cls.name, caches, COLUMNS), dense=("class_logits",), mix="batch",
                           languages=languages, width=width, label_names=names, logit_order=logit_order,
                           gold_order=gold_order)

    @classmethod
    def build_student(cls, config, plan, vocab, student, init_from, init_teacher):
        names = list(plan.label_names) if plan.label_names and len(plan.label_names) == plan.width else None
        model = classifier_student(vocab, student, init_from, init_teacher, plan.width, names)
        if config.student == "plain":
            return model
        from ..mblm import FAMILIES, MBLMForSequenceClassification

        if model.config.model_type not in FAMILIES:
            raise BadInput(f"--option student=mblm: MBLM branches are BERT layers, but the student is a "
                           f"{model.config.model_type}; use a BERT or XLM-R student (no --embedding-dim) or "
                           "student=plain.")
        if config.branch_layers > model.config.num_hidden_layers:
            raise BadInput(f"--option branch_layers={config.branch_layers}: the student has "
                           f"{model.config.num_hidden_layers} layers; give branch_layers between 1 and "
                           f"{model.config.num_hidden_layers} (the paper: 4 of 12).")
        return MBLMForSequenceClassification.from_bert(model, list(plan.languages), branch_layers=config.branch_layers)

    def __init__(self, config, plan, vocab=None, total_steps=1):
        super().__init__(config, plan, vocab, total_steps)
        self.pass_lang = config.student == "mblm"

    def collate(self, rows):
        texts, langs = list(rows["text"]), list(rows["lang"])
        texts_b = list(rows["text_b"]) if "text_b" in rows else None  # sentence pairs
        logits, gold = in_student_class_order(rows, self.plan.logit_order, self.plan.gold_order)
        return {
            **encode_by_language(self.vocab, texts, langs, self.config.max_length, texts_b),
            "teacher_logits": logits,
            "class_label": torch.from_numpy(gold),
            "example_id": torch.from_numpy(np.asarray(rows["example_id"]).astype(np.int64)),
            "lang": langs,
        }

    def losses(self, batch, student, step):
        c = self.config
        langs = batch["lang"]
        extra = {"lang": langs[0] if len(set(langs)) == 1 else list(langs)} if self.pass_lang else {}
        logits = student(**model_inputs(batch), **extra).logits.float()
        kd = L.distillation_cross_entropy(logits, batch["teacher_logits"], c.temperature)
        parts = {"kd": kd if c.t2 else kd / c.temperature**2}  # eq. 3 has no τ²
        weights = {"kd": 1.0}
        labelled = batch["class_label"] >= 0
        if bool(labelled.any()):
            parts["label"] = L.gold_cross_entropy(logits[labelled], batch["class_label"][labelled])
            weights["label"] = c.label_weight
        return {"loss": L.weighted_sum(parts, weights), **parts}
