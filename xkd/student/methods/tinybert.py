"""tinybert (TinyBERT-style two-stage distillation, Jiao et al. 2019, as applied to
multilingual BERT in "Limitations of Knowledge Distillation for Zero-shot Transfer
Learning", Soltan et al. 2021): the student learns the teacher's predictions and its
intermediate representations.

Stage 1 (`stage=1`, pre-training distillation on the MLM task):

    L = pred_weight·L_pred + embedding_weight·L_embd + hidden_weight·Σ_m L_hidn(m)
        + attention_weight·Σ_m L_attn(m) + gold_weight·L_gold

- L_pred: cross-entropy between the teacher's distribution at each masked position (from the
  cache, as mergedistill reads it: `kd_target` topk, tail or sampled, `temperature`) and the
  student's softmax over the union vocabulary (eq. 2 of Soltan et al. 2021), times τ² (Hinton et al.'s
  rule, losses.distillation_cross_entropy; the identity at the paper's τ = 1).
- L_embd: MSE between W_e·E_S (the student's embedding output) and the teacher's `hidden.0`.
- L_hidn(m): MSE between W_h·H_S,m (student layer m) and the teacher's layer g(m); the layer
  map g is the paper's "every three layers" in general form, g(m) = m·T/S (12 -> 4: 3m), or
  explicit (`layer_map=1:3,2:6,...`). W_e and W_h are learned linear maps (method heads
  `embedding_projection`, `hidden_projection`, one W_h shared by all layers as in TinyBERT),
  present only when the student's width differs from the teacher's.
- L_attn(m): MSE between the student's attention probabilities at layer m and the teacher's at
  layer g(m), averaged over heads. Active only when the caches hold `attn.<layer>` outputs
  (cache-teachers --attention-layers; layout in docs/methods.md). The student's maps are
  taken BEFORE attention dropout (models.use_pre_dropout_attention), as the teacher's were
  cached in inference mode: Hugging Face returns post-dropout maps in training mode, whose
  rows do not sum to 1 and would pull the student towards noise.
- L_gold: the standard cross-entropy with the gold labels (Soltan et al. 2021, sec. 3.2: "a
  combination of distillation losses in addition to the standard cross-entropy loss", in both
  stages): the masked tokens' original ids in stage 1, the class labels in stage 2 (rows
  without a label, class_label -1, do not count). Weight `gold_weight`.

MSEs average over real tokens (and real query x key pairs), not padding.

Stage 2 (`stage=2`, fine-tuning distillation, the paper's "ft-distill"): the student is a
union-vocab sequence classifier; L_pred is the soft cross-entropy with the teacher's cached
class logits at `temperature` (default 1; times τ² as in stage 1), plus L_gold on the class labels, plus the same
intermediate losses when the cache holds hidden states (and attention). Soltan et al. (2021) find that this
stage can hurt zero-shot cross-lingual transfer (section 4.4.2), so it is an option, never run implicitly.

The student reads exactly the token ids the teacher saw (the cache's input_ids, remapped 1:1
into the union vocab), so the cached token-aligned hidden states line up with its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numba import njit
from torch import nn

from ...errors import BadInput
from ...storage.untrusted import parse_json
from .. import losses as L
from ..data import padded
from ..models import classifier_student, quiet_transformers, use_pre_dropout_attention
from . import register
from .base import (
    KD_TARGET_HELP,
    KD_TARGETS,
    Method,
    Need,
    Plan,
    check_kd_target,
    class_orders,
    collate_masked_lm,
    gold_order_of,
    in_student_class_order,
    kd_target_columns,
    kd_target_need,
    kd_target_why,
    kd_term,
    model_inputs,
    option,
    require,
    same_width,
    with_pair_columns,
)

HIDDEN_OPTION = "--hidden-layers 0,3,6,9,12 --hidden-positions all"  # a 12-layer teacher, 4-layer student
STAGE1_COLUMNS = ("example_id", "lang", "side", "input_ids", "masked_positions", "labels")
STAGE2_COLUMNS = ("example_id", "lang", "side", "input_ids", "masked_positions", "labels", "class_label")


@dataclass(frozen=True)
class Config:
    stage: int = option(1, "1: pre-training distillation (masked LM); 2: fine-tuning distillation (classifier)",
                        choices=(1, 2))
    layer_map: str = option("uniform", "student layer -> teacher layer: uniform (g(m) = m·T/S) or pairs such as 1:3,2:6",
                            paper="uniform")
    pred_weight: float = option(1.0, "weight of L_pred (teacher predictions)", paper=1.0, low=0.0)
    embedding_weight: float = option(1.0, "weight of L_embd", paper=1.0, low=0.0)
    hidden_weight: float = option(1.0, "weight of Σ_m L_hidn(m)", paper=1.0, low=0.0)
    attention_weight: float = option(1.0, "weight of Σ_m L_attn(m) (when attention is cached)", paper=1.0, low=0.0)
    gold_weight: float = option(1.0, "weight of the gold-label cross-entropy (masked tokens / class labels)",
                                paper=1.0, low=0.0)
    temperature: float = option(1.0, "τ of L_pred (the term is scaled by τ²)", paper=1.0, low=0.0, low_open=True)
    kd_target: str = option("topk", f"stage 1 L_pred {KD_TARGET_HELP}", paper="topk", choices=KD_TARGETS,
                            used_when={"stage": (1,)})

    def __post_init__(self):
        check_kd_target(self.kd_target, self.temperature)


@dataclass(frozen=True)
class TinyBERTPlan(Plan):
    layer_map: tuple = ()  # ((student layer m, teacher layer g(m)), ...)
    embedding: bool = False  # L_embd on
    hidden: bool = False  # L_hidn on
    attention: bool = False  # L_attn on
    teacher_width: int = 0
    attention_heads: int = 0
    attention_max_length: int = 0
    classes: int = 0  # stage 2
    # Stage 2: the student's class names, and per cache how the teacher's logits and the
    # corpus's gold ids map into that order (methods/base.py class_orders, gold_order_of).
    label_names: tuple | None = None
    logit_order: tuple = ()
    gold_order: tuple = ()


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
            raise BadInput(f"--option layer_map={spec}: give 'uniform' or student:teacher pairs, "
                           "e.g. 1:3,2:6,3:9,4:12.") from None
        if not (1 <= m <= student_layers and 1 <= g <= teacher_layers):
            raise BadInput(f"--option layer_map={spec}: {m}:{g} is out of range; the student has layers 1..{student_layers}, "
                           f"the teacher 1..{teacher_layers} (layer 0, the embeddings, is always matched to the student's).")
        mapping[m] = g
    return dict(sorted(mapping.items()))


def unpack_attention(ragged, width: int, heads: int, max_length: int) -> torch.Tensor:
    """A batch's cached `attn.<layer>` as (batch, heads, width, width) maps, zeros outside each
    row's real (query, key) pairs, in the stored dtype (attention_mse computes in fp32).

    Two layouts arrive: the loader's packed one (values 1-D: per row of n tokens, per query
    token, per head, its n keys; storage.schema "keys"), and the per-token padded one
    (values (tokens, heads x max_length), head-major, keys zero-padded to max_length), which
    is what Cache.iter_examples gives."""
    if ragged.values.ndim == 1:
        lengths = ragged.lengths()
        tokens = np.rint(np.sqrt(lengths / heads)).astype(np.int64)
        if np.any(tokens * tokens * heads != lengths):
            raise ValueError(f"packed attention rows are not n x {heads} heads x n values")
        out = np.zeros((len(lengths), heads, width, width), dtype=ragged.values.dtype)
        if len(ragged.values):
            _unpack_keys(ragged.values.view(np.uint16) if ragged.values.itemsize == 2 else ragged.values,
                         ragged.offsets, tokens, heads, out.view(np.uint16) if out.itemsize == 2 else out)
        return torch.from_numpy(out)
    dense = padded(ragged, 0, dtype=torch.float32)
    dense = dense.reshape(dense.shape[0], width, heads, max_length)
    return dense[..., :width].permute(0, 2, 1, 3).contiguous()


def token_places(lengths: np.ndarray, width: int) -> np.ndarray:
    """Each real token's place in a (rows, width) padded batch, flattened, row by row: where
    the packed teacher states of packed_hidden_mse sit among the student's."""
    lengths = np.asarray(lengths, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows * width + (np.arange(int(lengths.sum()), dtype=np.int64) - starts)


def pair_places(lengths: np.ndarray, width: int, heads: int) -> np.ndarray:
    """Each packed attention value's place (row r, query q, head h, key k: the cache's
    "keys" order) in the flattened (rows, heads, width, width) student maps."""
    lengths = np.asarray(lengths, dtype=np.int64)
    out = np.empty(int((lengths**2).sum()) * heads, dtype=np.int64)
    _pair_places(lengths, width, heads, out)
    return out


@njit(cache=True, nogil=True)
def _pair_places(lengths, width, heads, out):
    i = 0
    for r in range(lengths.size):
        n = lengths[r]
        for q in range(n):
            for h in range(heads):
                base = ((r * heads + h) * width + q) * width
                for k in range(n):
                    out[i] = base + k
                    i += 1


@njit(cache=True, nogil=True)
def _unpack_keys(values, offsets, tokens, heads, out):
    """Packed rows (query, head, key) into out[row, head, query, :n]."""
    for r in range(tokens.size):
        n = tokens[r]
        src = offsets[r]
        for q in range(n):
            for h in range(heads):
                out[r, h, q, :n] = values[src : src + n]
                src += n


@register
class TinyBERT(Method):
    name = "tinybert"
    paper = ("TinyBERT-style two-stage distillation (Jiao et al. 2019) for mBERT, as in Limitations of Knowledge "
             "Distillation for Zero-shot Transfer Learning (Soltan et al. 2021)")
    Config = Config
    reads_sentence_pairs = True  # stage 2 on XNLI/PAWS-X: the cached pair ids, token types from segment_b
    needs = (kd_target_need("topk", "--topk 8 (stage 1)"), kd_target_need("sampled"), Need("hidden.*", HIDDEN_OPTION),
             Need("attn.*", "--attention-layers 3,6,9,12 (optional: turns on L_attn)"),
             Need("class_logits", "--class-logits (stage 2)"))

    @classmethod
    def plan_for(cls, config, caches, student):
        columns = STAGE1_COLUMNS if config.stage == 1 else STAGE2_COLUMNS
        dense: list[str] = []
        classes, label_names, logit_order, gold_order = 0, None, (), ()
        if config.stage == 1 and config.pred_weight:
            columns += kd_target_columns(config.kd_target)
            need = kd_target_need(config.kd_target, "--topk 8 (or set --option pred_weight=0)")
            require(cls.name, caches, [need], " (stage 1)" + kd_target_why(config.kd_target))
        if config.stage == 2:
            for cache in caches:
                if "class_logits" not in cache.dense:
                    raise BadInput(f"--method tinybert --option stage=2 distils class logits, which {cache.path} lacks. "
                                   "Cache a fine-tuned classifier teacher with --class-logits.")
            classes = same_width(cls.name, caches, "class_logits")
            dense.append("class_logits")
            label_names, logit_order = class_orders(cls.name, caches)
            gold_order = tuple(gold_order_of(cls.name, cache, label_names) for cache in caches)
        depths = {c.teacher_layers for c in caches}
        if len(depths) != 1 or 0 in depths:
            raise BadInput(f"--method tinybert: the caches' teachers differ in depth ({sorted(depths)}); "
                           "distil from caches of one teacher.")
        mapping = layer_map(config.layer_map, student.layers, depths.pop())
        has_hidden = all(any(n.startswith("hidden.") for n in c.dense) for c in caches)
        # Stage 1 is defined by its intermediate losses; stage 2 adds them only where cached.
        intermediate = config.stage == 1 or has_hidden
        embedding = intermediate and config.embedding_weight > 0
        hidden = intermediate and config.hidden_weight > 0
        wanted = ([0] if embedding else []) + (list(mapping.values()) if hidden else [])
        _check_hidden(caches, wanted, mapping)
        dense += [f"hidden.{layer}" for layer in dict.fromkeys(wanted)]
        teacher_width = same_width(cls.name, caches, f"hidden.{wanted[0]}") if wanted else 0
        attn = [f"attn.{g}" for g in dict.fromkeys(mapping.values())]
        cached_attn = bool(attn) and all(a in c.dense for c in caches for a in attn)
        attention = intermediate and config.attention_weight > 0 and cached_attn
        notes = ()
        if intermediate and config.attention_weight > 0 and not cached_attn:
            notes = ("attention distillation is off: the caches hold no attn.<layer> outputs; re-run cache-teachers with "
                     f"--attention-layers {','.join(str(g) for g in dict.fromkeys(mapping.values()))} to turn it on",)
        heads = max_length = 0
        if attention:
            heads, max_length = _attention_shape(caches, attn, student.heads)
            dense += attn
        return TinyBERTPlan(columns=with_pair_columns(cls.name, caches, columns), dense=tuple(dense), notes=notes,
                            layer_map=tuple(mapping.items()), embedding=embedding, hidden=hidden, attention=attention,
                            teacher_width=teacher_width, attention_heads=heads, attention_max_length=max_length, classes=classes,
                            label_names=label_names, logit_order=logit_order, gold_order=gold_order)

    @classmethod
    def build_student(cls, config, plan, vocab, student, init_from, init_teacher):
        if config.stage == 1:
            model = super().build_student(config, plan, vocab, student, init_from, init_teacher)
        elif init_from and (Path(init_from) / "train_summary.json").is_file():
            model = classifier_from_student(init_from, vocab, plan.classes)
        else:
            names = list(plan.label_names) if plan.label_names and len(plan.label_names) == plan.classes else None
            model = classifier_student(vocab, student, init_from, init_teacher, plan.classes, names)
        if plan.attention:
            use_pre_dropout_attention(model)
        return model

    def build_heads(self, student):
        width = int(student.config.hidden_size)
        if self.plan.teacher_width and self.plan.teacher_width != width:
            if self.plan.embedding:
                self.modules["embedding_projection"] = nn.Linear(width, self.plan.teacher_width)
            if self.plan.hidden:
                self.modules["hidden_projection"] = nn.Linear(width, self.plan.teacher_width)  # one W_h for all layers

    def collate(self, rows):
        plan = self.plan
        batch = collate_masked_lm(rows, self.vocab.pad_id)
        if self.config.stage == 2:
            logits, gold = in_student_class_order(rows, plan.logit_order, plan.gold_order)
            batch["teacher_logits"], batch["class_label"] = logits, torch.from_numpy(gold)
        # Teacher states and maps stay packed as the loader gathered them (real tokens, real
        # query x key pairs; fp16 as stored): the losses pick the student's matching entries
        # by index, so no padded teacher tensor is ever built (docs/benchmarks.md, dense).
        lengths = rows["input_ids"].lengths()
        width = batch["input_ids"].shape[1]
        for name in plan.dense:
            if name.startswith(("hidden.", "attn.")):
                values = rows[name].values
                expected = lengths.sum() if name.startswith("hidden.") else (lengths**2).sum() * plan.attention_heads
                if len(values) != expected:
                    raise BadInput(f"the cached {name} does not match the rows' tokens ({len(values)} entries for "
                                   f"{expected}); run xkd verify on the cache.")
                batch[name] = torch.from_numpy(values)
        if plan.embedding or plan.hidden:
            batch["token_index"] = torch.from_numpy(token_places(lengths, width))
        if plan.attention:
            batch["pair_index"] = torch.from_numpy(pair_places(lengths, width, plan.attention_heads))
        return batch

    def prediction_losses(self, out, batch) -> dict:
        c = self.config
        logits = out.logits.float()
        parts = {}
        if c.stage == 2:
            parts["pred"] = L.distillation_cross_entropy(logits, batch["teacher_logits"], c.temperature)
            labelled = batch["class_label"] >= 0
            if c.gold_weight and bool(labelled.any()):
                parts["gold"] = L.gold_cross_entropy(logits[labelled], batch["class_label"][labelled])
            return parts
        logp = torch.log_softmax(logits, dim=-1)  # once, for both terms: (M, V) over the union vocab
        if c.pred_weight:
            parts["pred"] = kd_term(c.kd_target, logits, logp, batch, c.temperature)
        if c.gold_weight:
            parts["gold"] = L.gold_nll(logp, batch["labels"])
        return parts

    def losses(self, batch, student, step):
        plan, c = self.plan, self.config
        inputs = dict(model_inputs(batch), output_hidden_states=plan.embedding or plan.hidden,
                      output_attentions=plan.attention)
        if c.stage == 1:
            inputs["masked_flat"] = batch["masked_flat"]
        out = student(**inputs)
        parts = self.prediction_losses(out, batch)
        mapping = dict(plan.layer_map)
        places = batch.get("token_index")
        if plan.embedding:
            projection = self.modules["embedding_projection"] if "embedding_projection" in self.modules else None
            parts["embedding"] = L.packed_hidden_mse(out.hidden_states[0], batch["hidden.0"], places, projection)
        if plan.hidden:
            projection = self.modules["hidden_projection"] if "hidden_projection" in self.modules else None
            parts["hidden"] = sum(L.packed_hidden_mse(out.hidden_states[m], batch[f"hidden.{g}"], places, projection)
                                  for m, g in mapping.items())
        if plan.attention:
            parts["attention"] = sum(L.packed_attention_mse(out.attentions[m - 1], batch[f"attn.{g}"], batch["pair_index"])
                                     for m, g in mapping.items())
        weights = {"pred": c.pred_weight, "gold": c.gold_weight, "embedding": c.embedding_weight,
                   "hidden": c.hidden_weight, "attention": c.attention_weight}
        return {"loss": L.weighted_sum(parts, weights), **parts}


def _check_hidden(caches, layers: list[int], mapping: dict) -> None:
    if not layers:
        return
    need = ",".join(str(layer) for layer in sorted(set(layers)))
    for cache in caches:
        missing = [layer for layer in sorted(set(layers)) if f"hidden.{layer}" not in cache.dense]
        if missing:
            raise BadInput(
                f"--method tinybert needs the teacher's hidden states of layers {need} (layer map {mapping}, student "
                f"layer: teacher layer; 0 = embeddings) at every token, but {cache.path} lacks layer(s) {missing}. "
                f"Re-run cache-teachers with --hidden-layers {need} --hidden-positions all, or change --option "
                "layer_map=..., or set embedding_weight=0 / hidden_weight=0."
            )
        wrong = [f"hidden.{layer}" for layer in layers if cache.dense[f"hidden.{layer}"].align != "token"]
        if wrong:
            raise BadInput(f"--method tinybert needs hidden states at every token, but {cache.path} holds {wrong[0]} "
                           f"per {cache.dense[wrong[0]].align}. Re-run cache-teachers with --hidden-layers {need} "
                           "--hidden-positions all.")


def _attention_shape(caches, names: list[str], student_heads: int) -> tuple[int, int]:
    """(heads, max_length) of the cached attention maps, which the student must match head for head."""
    max_lengths = {c.max_length for c in caches}
    dims = {c.dense[n].dim for c in caches for n in names}
    if len(max_lengths) != 1 or len(dims) != 1 or 0 in max_lengths or next(iter(dims)) % next(iter(max_lengths)):
        raise BadInput(f"--method tinybert: the caches' attn.<layer> outputs are not heads x max_length wide "
                       f"(widths {sorted(dims)}, max lengths {sorted(max_lengths)}).")
    max_length = max_lengths.pop()
    heads = dims.pop() // max_length
    if student_heads != heads:
        raise BadInput(f"--method tinybert: attention distillation matches heads one to one, but the teacher has "
                       f"{heads} heads and the student {student_heads}. Give the student --heads {heads}, or "
                       "--option attention_weight=0.")
    return heads, max_length


def classifier_from_student(path: str, vocab, num_labels: int):
    """Stage 2 from a stage-1 student (a train-student output directory): its encoder, already
    over the union vocab, under a fresh classification head (and pooler)."""
    from transformers import AutoModelForSequenceClassification

    size = int(parse_json((Path(path) / "config.json").read_text()).get("vocab_size") or 0)
    if size != vocab.size:
        raise BadInput(f"--init-from {path}: this student has a {size}-token vocabulary, but --vocab has {vocab.size}; "
                       "give the union vocab it was trained with.")
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=torch.float32)
    return model.eval()
