"""multikd (MultiKD, Yang et al. AAAI 2022, seeds/001): several monolingual teachers, each
fine-tuned on the task in its language, taught to one multilingual student.

Each step samples a supervised language l, a batch of that language (`mix = "batch"`), and
distils from that language's teacher (its cached class logits; one cache per teacher):

    L_KD = -1/N sum_i softmax(z_T,i / tau) . log softmax(z_S,i / tau)      (eqs. 1-3)

with tau = 8 (the paper's temperature for all distillation experiments; `temperature`).
Eq. 3 has no tau^2 factor, nor does TextBrewer's cross-entropy KD loss that the paper trains
with, so none is applied by default; `t2=true` multiplies by tau^2 (Hinton et al.'s scaling,
which keeps gradient sizes comparable across temperatures).

Gold labels: where a row carries a class label (`class_label` >= 0: a cached `labeled:`
corpus), the batch also reports `label`, the cross-entropy of the student's logits (tau = 1)
with the gold class; it is added to the loss with weight `label_weight` (default 0: the
paper's MultiKD objective is eq. 3 alone; MultiTrain, its label-only baseline, is not this
method).

Student (`student=`): `plain`, a union-vocab sequence classifier (from `--init-from`
through the union-vocab embedding initialisation, or random), or `mblm`, the same
classifier turned into MBLM (xkd.student.mblm, docs/mblm.md) with one branch per supervised
language (the languages of the caches, in the order the caches are given) over the bottom
`branch_layers` (K = 4) layers. The batch's language goes to MBLM's forward (`lang=`), which
detaches the other branches in training; a zero-shot language goes through all branches at
inference.

The student tokenizes each row's text itself, as the union vocab routes its language
(`Vocab.tokenize`), i.e. exactly as it will see that language at inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import BadInput
from . import register
from ..models import classifier_student, is_classifier
from .base import TEXT_NEED, Method, Need, check_options, dense_dim, parse_bool, row_vectors
from .tlm import padded_ids, tokenize_by_language

STUDENTS = ("plain", "mblm")
DEFAULTS = {
    "student": "plain", "branch_layers": 4,  # K, the paper's depth of the language branches
    "temperature": 8.0, "t2": "false", "label_weight": 0.0, "max_length": 128,
}


def cache_languages(cache) -> list[str]:
    """The languages of a cache's rows: a monolingual corpus's language, or the languages of
    the sides a parallel corpus was cached on."""
    langs = list((cache.manifest.get("corpus") or {}).get("langs") or [])
    sides = list((cache.manifest.get("view") or {}).get("sides") or ["mono"])
    return [langs[1] if side == "tgt" else langs[0] for side in sides if langs]


def supervised_languages(caches) -> list[str]:
    """Every language the caches hold, in the order of the caches (MBLM's branch order)."""
    return list(dict.fromkeys(lang for cache in caches for lang in cache_languages(cache)))


def check_label_ids(caches) -> None:
    """A labeled corpus numbers its classes by sorted name; the teacher numbers them as its
    config's id2label does. Where both are known they must agree, or gold labels and teacher
    logits would name different classes."""
    for cache in caches:
        names = (cache.manifest.get("corpus") or {}).get("labels")
        config_file = Path(str((cache.manifest.get("teacher") or {}).get("path") or "")) / "config.json"
        if not names or not config_file.is_file():
            continue
        label2id = {str(name): int(i) for i, name in (json.loads(config_file.read_text()).get("id2label") or {}).items()}
        if not set(names) & set(label2id):
            continue  # the teacher's classes are unnamed (LABEL_0, ...): nothing to compare
        wrong = [(i, name, label2id.get(name)) for i, name in enumerate(names) if label2id.get(name) != i]
        if wrong:
            i, name, theirs = wrong[0]
            raise BadInput(
                f"--method multikd: in {cache.path} the corpus labels class {i} {name!r} (its classes, sorted: "
                f"{', '.join(names)}) but the teacher's config gives {name!r} the id {theirs}. Label the file with "
                "the teacher's class ids (0, 1, ...), or with names covering all of the teacher's classes."
            )


@register
class MultiKD(Method):
    name = "multikd"
    needs = (Need("class_logits", "--class-logits (on by default for sequence classifiers)"), TEXT_NEED)
    columns = ("example_id", "lang", "class_label", "text")
    dense = ("class_logits",)
    mix = "batch"  # each step: one language, one teacher

    def __init__(self, options, vocab=None, total_steps=1):
        super().__init__(options, vocab, total_steps)
        o = check_options(self.name, options, DEFAULTS)
        self.student_kind = _student_kind(o)
        self.temperature = float(o["temperature"])
        if self.temperature <= 0:
            raise BadInput(f"--temperature {self.temperature}: give a positive temperature (the paper's is 8).")
        self.t2 = parse_bool(o["t2"], "t2")
        self.label_weight = float(o["label_weight"])
        self.max_length = int(o["max_length"])
        self.pass_lang = False

    @classmethod
    def build_student(cls, vocab, config, init_from, init_teacher, caches, options=None):
        o = check_options(cls.name, dict(options or {}), DEFAULTS)
        num_labels = dense_dim(caches, "class_logits", cls.name)
        names = next((list(n) for c in caches if (n := (c.manifest.get("corpus") or {}).get("labels"))), None)
        model = classifier_student(vocab, config, init_from, init_teacher, num_labels, names)
        if _student_kind(o) == "plain":
            return model
        from ..mblm import MBLMForSequenceClassification

        if model.config.model_type != "bert":
            raise BadInput(f"--option student=mblm: MBLM branches are BERT layers, but the student is a "
                           f"{model.config.model_type}; use a BERT student (no --embedding-dim) or student=plain.")
        layers = int(o["branch_layers"])
        if layers > model.config.num_hidden_layers:
            raise BadInput(f"--option branch_layers={layers}: the student has {model.config.num_hidden_layers} layers; "
                           f"give branch_layers between 1 and {model.config.num_hidden_layers} (the paper: 4 of 12).")
        return MBLMForSequenceClassification.from_bert(model, supervised_languages(caches), branch_layers=layers)

    def setup(self, student, caches):
        dense_dim(caches, "class_logits", self.name)
        check_label_ids(caches)
        if not is_classifier(student):
            raise BadInput(f"--method multikd trains a sequence classifier, but the student is a {type(student).__name__}; "
                           "build it with MultiKD.build_student (train-student does).")
        self.pass_lang = student.config.model_type == "xkd-mblm"

    def collate(self, rows):
        texts, langs = list(rows["text"]), list(rows["lang"])
        input_ids, attention_mask = padded_ids(tokenize_by_language(self.vocab, texts, langs, self.max_length),
                                               self.vocab.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "teacher_logits": row_vectors(rows, "class_logits"),
            "class_label": torch.from_numpy(np.asarray(rows["class_label"], dtype=np.int64)),
            "example_id": torch.from_numpy(np.asarray(rows["example_id"]).astype(np.int64)),
            "lang": langs,
        }

    def losses(self, batch, student, step):
        langs = batch["lang"]
        extra = {"lang": langs[0] if len(set(langs)) == 1 else list(langs)} if self.pass_lang else {}
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits.float()
        parts = {"kd": kd_cross_entropy(logits, batch["teacher_logits"], self.temperature, self.t2)}
        labelled = batch["class_label"] >= 0
        total = parts["kd"]
        if bool(labelled.any()):
            parts["label"] = F.cross_entropy(logits[labelled], batch["class_label"][labelled])
            if self.label_weight:
                total = total + self.label_weight * parts["label"]
        return {"loss": total, **parts}


def kd_cross_entropy(student_logits, teacher_logits, tau: float, t2: bool = False) -> torch.Tensor:
    """Eq. 3: -1/N sum_i softmax(z_T/tau) . log softmax(z_S/tau) (times tau^2 with t2)."""
    target = torch.softmax(teacher_logits.float() / tau, dim=-1)
    loss = -(target * torch.log_softmax(student_logits.float() / tau, dim=-1)).sum(-1).mean()
    return loss * tau**2 if t2 else loss


def _student_kind(options: dict) -> str:
    kind = str(options["student"])
    if kind not in STUDENTS:
        raise BadInput(f"--option student={kind}: choose plain (a sequence classifier) or mblm (multi-branch, "
                       "one branch per supervised language).")
    layers = int(options["branch_layers"])
    if layers < 1:
        raise BadInput(f"--option branch_layers={layers}: give at least 1 (the paper uses 4).")
    return kind
