"""tinybert (TinyBERT-style two-stage distillation, Jiao et al. 2019, as applied to
multilingual BERT in seeds/003): the student learns the teacher's predictions and its
intermediate representations.

Stage 1 (`stage=1`, pre-training distillation on the MLM task):

    L = pred_weight·L_pred + embedding_weight·L_embd + hidden_weight·Σ_m L_hidn(m)
        + attention_weight·Σ_m L_attn(m) [+ mlm_weight·L_mlm]

- L_pred: cross-entropy between the teacher's distribution at each masked position (from the
  cached top-k, as mergedistill reads it: `kd_target` topk or tail, `temperature`) and the
  student's softmax over the union vocabulary (eq. 2 of seeds/003).
- L_embd: MSE between W_e·E_S (the student's embedding output) and the teacher's `hidden.0`.
- L_hidn(m): MSE between W_h·H_S,m (student layer m) and the teacher's layer g(m); the layer
  map g is the paper's "every three layers" in general form, g(m) = m·T/S (12 -> 4: 3m), or
  explicit (`layer_map=1:3,2:6,...`). W_e and W_h are learned linear maps (method heads
  `embedding_projection`, `hidden_projection`, one W_h shared by all layers as in TinyBERT),
  present only when the student's width differs from the teacher's.
- L_attn(m): MSE between the student's attention probabilities at layer m and the teacher's at
  layer g(m), averaged over heads. Active only when the caches hold `attn.<layer>` outputs
  (see docs/methods.md for their layout); the pipeline does not write them yet.
- L_mlm: the gold-label MLM loss, off by default (the brief's objective is distillation only).

MSEs average over real tokens (and real query x key pairs), not padding.

Stage 2 (`stage=2`, fine-tuning distillation, the paper's "ft-distill"): the student is a
union-vocab sequence classifier; L_pred is the soft cross-entropy with the teacher's cached
class logits at `temperature` (default 1), plus the same intermediate losses when the cache
holds hidden states (and attention). seeds/003 finds that this stage can hurt zero-shot
cross-lingual transfer (section 4.4.2), so it is an option, never run implicitly.

The student reads exactly the token ids the teacher saw (the cache's input_ids, remapped 1:1
into the union vocab), so the cached token-aligned hidden states line up with its tokens.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import BadInput
from ..data import padded
from . import register
from ..models import classifier_student, is_classifier, quiet_transformers
from .base import Method, Need, check_options, collate_masked_lm, dense_dim, row_vectors
from .mergedistill import kd_tail, kd_topk
from .multikd import kd_cross_entropy

DEFAULTS = {
    "stage": "1", "layer_map": "uniform", "pred_weight": 1.0, "embedding_weight": 1.0, "hidden_weight": 1.0,
    "attention_weight": 1.0, "mlm_weight": 0.0, "temperature": 1.0, "kd_target": "topk",
}
HIDDEN_OPTION = "--hidden-layers 0,3,6,9,12 --hidden-positions all"  # a 12-layer teacher, 4-layer student
STAGE1_COLUMNS = ("example_id", "lang", "side", "input_ids", "masked_positions", "labels",
                  "topk_ids", "topk_logits", "lognorm")
STAGE2_COLUMNS = ("example_id", "lang", "side", "input_ids", "masked_positions", "labels", "class_label")


def parse_stage(options: dict | None) -> int:
    stage = str((options or {}).get("stage", "1")).strip()
    if stage not in ("1", "2"):
        raise BadInput(f"--option stage={stage}: choose 1 (pre-training distillation) or 2 (fine-tuning distillation).")
    return int(stage)


def layer_map(spec: str, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """Student layer m (1-based) -> teacher layer g(m). "uniform": g(m) = m·T/S (rounded
    down), the paper's 3m for a 12-layer teacher and a 4-layer student; or "m:g,m:g,..."."""
    spec = str(spec).strip()
    if spec == "uniform":
        return {m: m * teacher_layers // student_layers for m in range(1, student_layers + 1)}
    mapping = {}
    for item in spec.split(","):
        try:
            m, g = (int(x) for x in item.split(":"))
        except ValueError:
            raise BadInput(f"--option layer_map={spec}: give 'uniform' or student:teacher pairs, e.g. 1:3,2:6,3:9,4:12.") from None
        if not (1 <= m <= student_layers and 1 <= g <= teacher_layers):
            raise BadInput(f"--option layer_map={spec}: {m}:{g} is out of range; the student has layers 1..{student_layers}, "
                           f"the teacher 1..{teacher_layers} (layer 0, the embeddings, is always matched to the student's).")
        mapping[m] = g
    return dict(sorted(mapping.items()))


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor,
               projection: nn.Module | None = None) -> torch.Tensor:
    """MSE of (projected) student states against the teacher's over real tokens:
    Σ_tokens ||W·h_S − h_T||² / (n_tokens · d_T)."""
    if projection is not None:
        student = projection(student.float())
    mask = attention_mask.to(torch.float32)[:, :, None]
    return ((student.float() - teacher) ** 2 * mask).sum() / (mask.sum() * teacher.shape[-1]).clamp(min=1)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """MSE between attention maps (batch, heads, query, key) over real query x key pairs,
    averaged over heads (TinyBERT's 1/h Σ_heads MSE)."""
    mask = attention_mask.to(torch.float32)
    pairs = (mask[:, :, None] * mask[:, None, :])[:, None]
    return ((student.float() - teacher) ** 2 * pairs).sum() / (pairs.sum() * teacher.shape[1]).clamp(min=1)


def classifier_from_student(path: str, vocab, num_labels: int):
    """Stage 2 from a stage-1 student (a train-student output directory): its encoder, already
    over the union vocab, under a fresh classification head (and pooler)."""
    from transformers import AutoModelForSequenceClassification

    size = int(json.loads((Path(path) / "config.json").read_text()).get("vocab_size") or 0)
    if size != vocab.size:
        raise BadInput(f"--init-from {path}: this student has a {size}-token vocabulary, but --vocab has {vocab.size}; "
                       "give the union vocab it was trained with.")
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    return model.eval()


def unpack_attention(ragged, width: int, heads: int, max_length: int) -> torch.Tensor:
    """A cached token-aligned `attn.<layer>` (per query token: heads x max_length values,
    head-major, keys zero-padded to max_length) as (batch, heads, width, width) maps."""
    dense = padded(ragged, 0, dtype=torch.float32)
    dense = dense.reshape(dense.shape[0], width, heads, max_length)
    return dense[..., :width].permute(0, 2, 1, 3).contiguous()


@register
class TinyBERT(Method):
    name = "tinybert"
    # What `xkd methods` shows; stage-specific checks happen in setup.
    needs = (Need("topk", "--topk 8 (stage 1)"), Need("hidden.*", HIDDEN_OPTION),
             Need("attn.*", "--attention-layers 3,6,9,12 (optional: turns on L_attn)"),
             Need("class_logits", "--class-logits (stage 2)"))

    @classmethod
    def check_caches(cls, caches):
        """Which outputs are needed depends on the stage and weights, known in setup."""

    @classmethod
    def build_student(cls, vocab, config, init_from, init_teacher, caches, options=None):
        if parse_stage(options) == 1:
            return super().build_student(vocab, config, init_from, init_teacher, caches, options)
        for cache in caches:
            if "class_logits" not in cache.dense_specs:
                raise BadInput(f"--method tinybert --option stage=2 distils class logits, which {cache.path} lacks. "
                               "Cache a fine-tuned classifier teacher with --class-logits.")
        num_labels = dense_dim(caches, "class_logits", cls.name)
        if init_from and (Path(init_from) / "train_summary.json").is_file():
            return classifier_from_student(init_from, vocab, num_labels)
        return classifier_student(vocab, config, init_from, init_teacher, num_labels)

    def __init__(self, options, vocab=None, total_steps=1):
        super().__init__(options, vocab, total_steps)
        o = check_options(self.name, options, DEFAULTS)
        self.stage = parse_stage(o)
        self.layer_map_spec = o["layer_map"]
        try:
            self.weights = {k: float(o[f"{k}_weight"]) for k in ("pred", "embedding", "hidden", "attention", "mlm")}
            self.temperature = float(o["temperature"])
        except ValueError as e:
            raise BadInput(f"--method tinybert: loss weights and temperature must be numbers ({e}).") from None
        self.kd_target = o["kd_target"]
        if self.kd_target not in ("topk", "tail"):
            raise BadInput(f"--kd-target must be 'topk' or 'tail', not {self.kd_target!r}")
        if self.kd_target == "tail" and self.temperature != 1.0:
            raise BadInput("--kd-target tail needs --temperature 1: the cached log-normaliser is for τ = 1.")
        self.columns = STAGE1_COLUMNS if self.stage == 1 else STAGE2_COLUMNS
        self.map: dict[int, int] = {}
        self.use_embedding = self.use_hidden = self.use_attention = False
        self.attention_heads = 0
        self.attention_note = ""

    def setup(self, student, caches):
        if self.stage == 1:
            for cache in caches:
                if self.weights["pred"] and cache.topk_k is None:
                    raise BadInput(f"--method tinybert (stage 1) needs the cached top-k predictions, which {cache.path} "
                                   "lacks. Re-run cache-teachers with --topk 8 (or set --option pred_weight=0).")
            if not self.weights["pred"]:
                self.columns = tuple(c for c in STAGE1_COLUMNS if c not in ("topk_ids", "topk_logits", "lognorm"))
            if is_classifier(student):
                raise BadInput("--method tinybert stage 1 trains a masked LM, but the student is a sequence classifier.")
        else:
            if not is_classifier(student):
                raise BadInput("--method tinybert --option stage=2 trains a sequence classifier; build the student with "
                               "TinyBERT.build_student(..., options={'stage': '2'}) (train-student does).")
            self.dense = ("class_logits",)
        teacher_layers = {int((c.manifest.get("teacher") or {}).get("num_layers") or 0) for c in caches}
        if len(teacher_layers) != 1 or 0 in teacher_layers:
            raise BadInput(f"--method tinybert: the caches' teachers differ in depth ({sorted(teacher_layers)}); "
                           "distil from caches of one teacher.")
        student_layers = int(student.config.num_hidden_layers)
        self.map = layer_map(self.layer_map_spec, student_layers, teacher_layers.pop())
        has_hidden = all(any(n.startswith("hidden.") for n in c.dense_specs) for c in caches)
        # Stage 1 is defined by its intermediate losses; stage 2 adds them only where cached.
        intermediate = self.stage == 1 or has_hidden
        self.use_embedding = intermediate and self.weights["embedding"] > 0
        self.use_hidden = intermediate and self.weights["hidden"] > 0
        wanted = ([0] if self.use_embedding else []) + (list(self.map.values()) if self.use_hidden else [])
        self._check_hidden(caches, wanted)
        names = [f"hidden.{layer}" for layer in dict.fromkeys(wanted)]
        width = int(student.config.hidden_size)
        for key, use, layer in (("embedding_projection", self.use_embedding, 0),
                                ("hidden_projection", self.use_hidden, next(iter(self.map.values()), None))):
            if use and layer is not None:
                teacher_width = dense_dim(caches, f"hidden.{layer}", self.name)
                if teacher_width != width:
                    self.modules[key] = nn.Linear(width, teacher_width)
        attn = [f"attn.{g}" for g in dict.fromkeys(self.map.values())]
        cached_attn = all(all(a in c.dense_specs for a in attn) for c in caches) and bool(attn)
        self.use_attention = intermediate and self.weights["attention"] > 0 and cached_attn
        if intermediate and self.weights["attention"] > 0 and not cached_attn:
            layers = ",".join(str(g) for g in dict.fromkeys(self.map.values()))
            self.attention_note = ("attention distillation is off: the caches hold no attn.<layer> outputs; "
                                   f"re-run cache-teachers with --attention-layers {layers} to turn it on")
            warnings.warn(f"--method tinybert: {self.attention_note}.", stacklevel=2)
        if self.use_attention:
            self._setup_attention(student, caches, attn)
            names += attn
        self.dense = tuple(dict.fromkeys(list(self.dense) + names))

    def _check_hidden(self, caches, layers: list[int]) -> None:
        if not layers:
            return
        need = ",".join(str(layer) for layer in sorted(set(layers)))
        for cache in caches:
            missing = [layer for layer in sorted(set(layers)) if f"hidden.{layer}" not in cache.dense_specs]
            if missing:
                raise BadInput(
                    f"--method tinybert needs the teacher's hidden states of layers {need} (layer map "
                    f"{self.map}, student layer: teacher layer; 0 = embeddings) at every token, but {cache.path} lacks "
                    f"layer(s) {missing}. Re-run cache-teachers with --hidden-layers {need} --hidden-positions all, or "
                    "change --option layer_map=..., or set embedding_weight=0 / hidden_weight=0."
                )
            wrong = [f"hidden.{layer}" for layer in layers if cache.dense_specs[f"hidden.{layer}"].align != "token"]
            if wrong:
                raise BadInput(f"--method tinybert needs hidden states at every token, but {cache.path} holds {wrong[0]} "
                               f"per {cache.dense_specs[wrong[0]].align}. Re-run cache-teachers with --hidden-layers {need} "
                               "--hidden-positions all.")

    def _setup_attention(self, student, caches, names: list[str]) -> None:
        max_lengths = {int((c.manifest.get("view") or {}).get("max_length") or 0) for c in caches}
        dims = {c.dense_specs[n].dim for c in caches for n in names}
        if len(max_lengths) != 1 or len(dims) != 1 or 0 in max_lengths or next(iter(dims)) % next(iter(max_lengths)):
            raise BadInput(f"--method tinybert: the caches' attn.<layer> outputs are not heads x max_length wide "
                           f"(widths {sorted(dims)}, max lengths {sorted(max_lengths)}).")
        self.attention_max_length = max_lengths.pop()
        self.attention_heads = dims.pop() // self.attention_max_length
        student_heads = int(student.config.num_attention_heads)
        if student_heads != self.attention_heads:
            raise BadInput(f"--method tinybert: attention distillation matches heads one to one, but the teacher has "
                           f"{self.attention_heads} heads and the student {student_heads}. Give the student --heads "
                           f"{self.attention_heads}, or --option attention_weight=0.")
        if hasattr(student, "set_attn_implementation"):
            student.set_attn_implementation("eager")  # sdpa does not return attention maps

    def collate(self, rows):
        batch = collate_masked_lm(rows, self.vocab.pad_id)
        if self.stage == 2:
            batch["teacher_logits"] = row_vectors(rows, "class_logits")
            batch["class_label"] = torch.from_numpy(np.asarray(rows["class_label"]).astype(np.int64))
        if self.use_embedding:
            batch["hidden.0"] = padded(rows["hidden.0"], 0, dtype=torch.float32)
        if self.use_hidden:
            for g in dict.fromkeys(self.map.values()):
                batch[f"hidden.{g}"] = padded(rows[f"hidden.{g}"], 0, dtype=torch.float32)
        if self.use_attention:
            width = batch["input_ids"].shape[1]
            for g in dict.fromkeys(self.map.values()):
                batch[f"attn.{g}"] = unpack_attention(rows[f"attn.{g}"], width, self.attention_heads,
                                                      self.attention_max_length)
        return batch

    def prediction_loss(self, out, batch) -> dict:
        if self.stage == 2:
            return {"pred": kd_cross_entropy(out.logits, batch["teacher_logits"], self.temperature)}
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        parts = {}
        if self.weights["pred"]:
            if self.kd_target == "tail":
                parts["pred"] = kd_tail(logp, batch["topk_ids"], batch["topk_logits"], batch["lognorm"])
            else:
                scaled = torch.log_softmax(out.logits.float() / self.temperature, dim=-1)
                parts["pred"] = kd_topk(scaled, batch["topk_ids"], batch["topk_logits"], self.temperature)
        if self.weights["mlm"]:
            parts["mlm"] = F.nll_loss(logp, batch["labels"])
        return parts

    def losses(self, batch, student, step):
        inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=self.use_embedding or self.use_hidden,
                      output_attentions=self.use_attention)
        if self.stage == 1:
            inputs["masked_flat"] = batch["masked_flat"]
        out = student(**inputs)
        parts = self.prediction_loss(out, batch)
        mask = batch["attention_mask"]
        if self.use_embedding:
            parts["embedding"] = hidden_mse(out.hidden_states[0], batch["hidden.0"], mask,
                                            self.modules["embedding_projection"] if "embedding_projection" in self.modules else None)
        if self.use_hidden:
            projection = self.modules["hidden_projection"] if "hidden_projection" in self.modules else None
            parts["hidden"] = sum(hidden_mse(out.hidden_states[m], batch[f"hidden.{g}"], mask, projection)
                                  for m, g in self.map.items())
        if self.use_attention:
            parts["attention"] = sum(attention_mse(out.attentions[m - 1], batch[f"attn.{g}"], mask)
                                     for m, g in self.map.items())
        total = sum(self.weights[name] * value for name, value in parts.items())
        return {"loss": total, **parts}
