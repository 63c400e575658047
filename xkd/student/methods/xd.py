"""xd (XD, cross-lingual knowledge distillation, seeds/002): a task-tuned teacher's outputs on
the English side of parallel pairs are the targets of the student's outputs on the
translations (section 2.3, steps 1-4):

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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInput
from ...pooling import MODES as POOLING_MODES, pool_tokens
from . import register
from ..models import classifier_student, is_classifier
from .base import TEXT_NEED, Method, Need, check_options, dense_dim, parse_bool, row_vectors
from .tlm import one_side_pairs, padded_ids, partner_languages, tokenize_by_language

TARGETS = ("class_logits", "pooled")
TARGET_NEEDS = {"class_logits": "--class-logits", "pooled": "--sentence pooled"}
DEFAULTS = {"target": None, "keep_source": "true", "max_length": 128, "pooling": None, "normalize": None}


def squared_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """|| s - t ||^2 summed over dimensions, averaged over examples."""
    return (student - teacher).pow(2).sum(-1).mean()


def resolve_target(options: dict | None, caches) -> str:
    target = (options or {}).get("target")
    if target is None:
        if caches and all("class_logits" in c.dense_specs for c in caches):
            return "class_logits"
        if caches and all("pooled" in c.dense_specs for c in caches):
            return "pooled"
        raise BadInput(
            "--method xd distils class logits (cache-teachers --class-logits) or sentence vectors "
            "(--sentence pooled), but the caches hold neither in every cache: "
            + "; ".join(f"{c.path}: {', '.join(sorted(c.dense_specs)) or 'no dense outputs'}" for c in caches)
        )
    if target not in TARGETS:
        raise BadInput(f"--option target={target}: choose class_logits or pooled.")
    return target


@register
class XD(Method):
    name = "xd"
    # The text, and one of the two targets (shown by `xkd methods`; which one is checked once
    # the target is known).
    needs = (TEXT_NEED, Need("class_logits", "--class-logits, for target=class_logits"),
             Need("pooled", "--sentence pooled, for target=pooled"))
    columns = ("example_id", "lang", "side", "text", "pair_text")

    @classmethod
    def check_caches(cls, caches):
        for cache in caches:
            if not TEXT_NEED.present_in(cache):
                raise BadInput(f"--method xd needs the cached output 'text', which {cache.path} lacks. "
                               f"Re-run cache-teachers with {TEXT_NEED.option}.")

    def __init__(self, options, vocab=None, total_steps=1):
        super().__init__(options, vocab, total_steps)
        o = check_options(self.name, options, DEFAULTS)
        self.target_option = o["target"]
        self.keep_source = parse_bool(o["keep_source"], "keep_source")
        self.max_length = int(o["max_length"])
        if o["pooling"] is not None and o["pooling"] not in POOLING_MODES:
            raise BadInput(f"--option pooling={o['pooling']}: choose {', '.join(POOLING_MODES)}.")
        self.pooling_option = o["pooling"]
        self.normalize_option = None if o["normalize"] is None else parse_bool(o["normalize"], "normalize")
        self.target = None
        self.pooling, self.normalize = "mean", False
        self.pairs: list = []

    @classmethod
    def build_student(cls, vocab, config, init_from, init_teacher, caches, options=None):
        target = resolve_target(options, caches)
        if target == "pooled":
            return super().build_student(vocab, config, init_from, init_teacher, caches, options)
        return classifier_student(vocab, config, init_from, init_teacher, dense_dim(caches, "class_logits", cls.name),
                                  _label_names(caches))

    def setup(self, student, caches):
        self.target = resolve_target({"target": self.target_option} if self.target_option else None, caches)
        need = Need(self.target, TARGET_NEEDS[self.target])
        for cache in caches:
            if not need.present_in(cache):
                raise BadInput(f"--method xd --option target={self.target} needs the cached output '{self.target}', which "
                               f"{cache.path} lacks. Re-run cache-teachers with {need.option}.")
        self.pairs = one_side_pairs(caches, "xd")
        self.dense = (self.target,)
        width = dense_dim(caches, self.target, self.name)
        if self.target == "class_logits":
            if not is_classifier(student) or int(student.config.num_labels) != width:
                raise BadInput(
                    f"--method xd --option target=class_logits trains a sequence classifier with {width} classes, but "
                    f"the student is a {type(student).__name__}. Build it with XD.build_student(..., options="
                    "{'target': 'class_logits'}) (train-student does)."
                )
            return
        if is_classifier(student):
            raise BadInput("--method xd --option target=pooled trains the masked-LM student's encoder, but the student "
                           "is a sequence classifier; build it with options {'target': 'pooled'}.")
        pooling = _teacher_pooling(caches)
        mode = pooling.get("mode", "mean")
        self.pooling = self.pooling_option or (mode if mode in POOLING_MODES else "mean")
        self.normalize = bool(pooling.get("normalize")) if self.normalize_option is None else self.normalize_option
        student_width = int(student.config.hidden_size)
        if student_width != width:
            self.modules["projection"] = nn.Linear(student_width, width)

    def collate(self, rows):
        n = len(rows["example_id"])
        partner = partner_languages(rows, self.pairs)
        missing = [i for i in range(n) if not rows["pair_text"][i] or partner[i] is None]
        if missing:
            raise BadInput(f"--method xd: example {int(rows['example_id'][missing[0]])} has no translation (empty "
                           "pair_text); cache a parallel corpus with --sides src.")
        texts, langs = list(rows["pair_text"]), list(partner)
        if self.keep_source:
            texts += list(rows["text"])
            langs += list(rows["lang"])
        input_ids, attention_mask = padded_ids(tokenize_by_language(self.vocab, texts, langs, self.max_length),
                                               self.vocab.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "teacher": row_vectors(rows, self.target),
            "example_id": torch.from_numpy(np.asarray(rows["example_id"]).astype(np.int64)),
            "lang": list(rows["lang"]),
            "pair_lang": list(partner),
        }

    def student_vectors(self, batch, student) -> torch.Tensor:
        """The student's outputs for every input row of the batch: translations, then sources."""
        if self.target == "class_logits":
            return student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      masked_flat=torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device))
        vectors = pool_tokens(out.last_hidden_state.float(), batch["attention_mask"], self.pooling)
        if "projection" in self.modules:
            vectors = self.modules["projection"](vectors)
        return F.normalize(vectors, p=2, dim=-1) if self.normalize else vectors

    def losses(self, batch, student, step):
        vectors = self.student_vectors(batch, student)
        teacher = batch["teacher"]
        n = teacher.shape[0]
        parts = {"xd": squared_distance(vectors[:n], teacher)}
        if self.keep_source:
            parts["source"] = squared_distance(vectors[n:], teacher)
            return {"loss": (parts["xd"] + parts["source"]) / 2, **parts}
        return {"loss": parts["xd"], **parts}


def _teacher_pooling(caches) -> dict:
    poolings = {json.dumps((c.manifest.get("teacher") or {}).get("pooling") or {}, sort_keys=True) for c in caches}
    if len(poolings) != 1:
        raise BadInput("--method xd --option target=pooled: the caches' teachers pool sentences differently "
                       f"({sorted(poolings)}); use caches of one teacher, or set --option pooling=... normalize=...")
    return json.loads(poolings.pop())


def _label_names(caches) -> list[str] | None:
    """The class names a cached labeled corpus or its teacher gives, if any (for the saved
    student's id2label)."""
    for cache in caches:
        names = (cache.manifest.get("corpus") or {}).get("labels")
        if names:
            return list(names)
    return None
