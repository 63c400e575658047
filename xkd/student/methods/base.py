"""The method contract (docs/adding-a-method.md walks through it).

A method is a class registered under a name. It declares:
- `Config`: a frozen dataclass of its options. Every field is made with `option(...)`: a
  type, a default, one line of help and, where the paper gives one, the paper's value.
  `--option k=v` is parsed into it once (`parse_options`); an unknown name, a wrong type or
  a value out of range is a one-paragraph error listing the valid options.
- `plan_for(config, caches, student) -> Plan`: ONE pure function of the config, the caches'
  typed views and the student's shape. It checks the caches and says what the loader reads (columns, dense outputs, how
  languages mix) plus anything the method derives from the caches. Nothing changes it later.
- `build_student(...)`: the student model (default: a masked LM over the union vocab).
- `__init__(config, plan, vocab, total_steps)` and `build_heads(student)`: trainable heads
  the method owns (in `self.modules`, trained and all-reduced with the student).
- `collate(rows) -> batch` and `losses(batch, student, step) -> {"loss": ..., parts...}`,
  built from the leaf modules `student/losses.py` and `student/text.py`. Methods never
  import other methods.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from ...errors import BadInput
from ...options import check_memory
from ...sampling import positions_of
from ...segments import token_type_ids
from ...storage import CacheView, Ragged
from .. import losses as L
from ..data import padded_with_mask

# Options -----------------------------------------------------------------------------


def option(default, help: str, *, paper=None, choices: tuple | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False, used_when: dict | None = None):
    """A config field: its default, one line of help, the paper's value (if the paper gives
    one) and the values allowed (choices, or a range [low, high]; *_open excludes the end).
    `used_when` {other option: its values} says when the method reads this option at all (any
    one entry holding is enough): given while none holds, it is refused, not ignored."""
    return field(default=default, metadata={"help": help, "paper": paper, "choices": choices, "low": low,
                                            "high": high, "low_open": low_open, "high_open": high_open,
                                            "used_when": tuple((k, tuple(v)) for k, v in (used_when or {}).items())})


@dataclass(frozen=True)
class OptionSpec:
    """One option as `xkd methods` and docs/methods.md show it."""

    name: str
    type: Any
    default: Any
    help: str
    paper: Any = None
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    used_when: tuple = ()  # ((other option, (values, ...)), ...): read only when one of them holds

    @property
    def optional(self) -> bool:
        return _base_type(self.type)[1]

    @property
    def type_name(self) -> str:
        base, optional = _base_type(self.type)
        name = {bool: "bool", int: "int", float: "float", str: "str"}[base]
        return f"{name} or none" if optional else name

    @property
    def allowed(self) -> str:
        if self.choices:
            return " | ".join(str(c) for c in self.choices)
        if self.low is None and self.high is None:
            return ""
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = _num(self.low) if self.low is not None else "-inf"
        high = _num(self.high) if self.high is not None else "inf"
        return f"{left}{low}, {high}{right}"


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def show(value) -> str:
    """An option value as a user would type it."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return _num(value)


def _base_type(tp) -> tuple[type, bool]:
    """(bool/int/float/str, whether None is allowed) of a field's annotation."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def option_specs(config_cls) -> list[OptionSpec]:
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in fields(config_cls):
        meta = dict(f.metadata)
        if "help" not in meta:
            raise TypeError(f"{config_cls.__name__}.{f.name}: make every config field with option(...)")
        out.append(OptionSpec(name=f.name, type=hints[f.name], default=None if f.default is MISSING else f.default, **meta))
    return out


def parse_bool(value, name: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("give true or false")


def _convert(spec: OptionSpec, value):
    base, optional = _base_type(spec.type)
    if optional and (value is None or str(value).strip().lower() in ("none", "")):
        return None
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        out = value
    elif base is bool:
        out = parse_bool(value, spec.name)
    elif base is int:
        text = str(value).strip()
        if isinstance(value, float) and value.is_integer():
            out = int(value)
        else:
            out = int(text)  # ValueError for "1.5", "abc"
    elif base is float:
        out = float(str(value).strip())
    else:
        out = str(value).strip()
    if isinstance(out, float) and not math.isfinite(out):
        raise ValueError("give a finite number")
    if spec.choices and out not in spec.choices:
        raise ValueError(f"choose {' or '.join(str(c) for c in spec.choices)}")
    if spec.low is not None and (out < spec.low or (spec.low_open and out == spec.low)):
        raise ValueError(f"give a value in {spec.allowed}")
    if spec.high is not None and (out > spec.high or (spec.high_open and out == spec.high)):
        raise ValueError(f"give a value in {spec.allowed}")
    if isinstance(out, int) and not isinstance(out, bool) and not -MAX_INT <= out <= MAX_INT:
        raise ValueError(f"give a whole number from {-MAX_INT:,} to {MAX_INT:,} (seeds and sizes go to torch and numpy as "
                         "64-bit integers)")
    return out


MAX_INT = 2**63 - 1  # any whole-number option, whatever its declared range: torch and numpy take int64


# Training holds each trainable parameter four times in fp32 (weight, gradient, Adam's two
# moments) and each frozen one once.
TRAINABLE_BYTES, FROZEN_BYTES = 16, 4


def check_head_memory(method: str, sizes: dict[str, int], trainable: int, frozen: int = 0) -> None:
    """One paragraph when a method's heads, sized by its options `sizes` (name -> value),
    cannot be trained in this machine's memory; called by build_heads before it allocates.
    The message names the largest of the options and the parameters they imply."""
    name = max(sizes, key=sizes.get)
    given = " ".join(f"-o {k}={v}" for k, v in sizes.items())
    check_memory(f"--option {name}={sizes[name]}", None, trainable * TRAINABLE_BYTES + frozen * FROZEN_BYTES,
                 f"--method {method}'s heads ({given}) hold {trainable:,} trainable parameters at {TRAINABLE_BYTES} bytes "
                 f"(fp32 weights, gradients and Adam's two moments) and {frozen:,} frozen ones at {FROZEN_BYTES}, which",
                 after="Give smaller head widths. Nothing was written.")


def describe_options(specs: list[OptionSpec]) -> str:
    return "; ".join(f"{s.name} ({s.type_name}, default {show(s.default)}{', ' + s.allowed if s.allowed else ''})"
                     for s in specs) or "none"


def parse_options(method: str, config_cls, given: dict) -> Any:
    """`--option k=v` pairs (strings, or typed values from Python) into the method's config.
    Every problem is one paragraph naming the option and listing the valid ones."""
    specs = {s.name: s for s in option_specs(config_cls)}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise BadInput(f"--option {', '.join(unknown)}: not an option of --method {method}. Its options: "
                       f"{describe_options(list(specs.values()))}.")
    values = {}
    for name, value in given.items():
        try:
            values[name] = _convert(specs[name], value)
        except ValueError as e:
            reason = str(e) if not str(e).startswith(("invalid literal", "could not convert")) else \
                f"give a{'n' if specs[name].type_name[0] in 'aeiou' else ''} {specs[name].type_name}"
            raise BadInput(f"--option {name}={value} for --method {method}: {reason} ({specs[name].help}; "
                           f"default {show(specs[name].default)}). Its options: "
                           f"{describe_options(list(specs.values()))}.") from None
    refuse_unused_options(method, specs, values)
    return config_cls(**values)


def refuse_unused_options(method: str, specs: dict, values: dict) -> None:
    """An option given while the options it depends on (its `used_when`, given or default)
    make the method skip it would be silently ignored: one paragraph instead."""
    for name in values:
        conditions = specs[name].used_when
        current = {other: values.get(other, specs[other].default) for other, _ in conditions}
        if not conditions or any(current[other] in allowed for other, allowed in conditions):
            continue
        wanted = " or ".join(f"{other}={'|'.join(show(v) for v in allowed)}" for other, allowed in conditions)
        here = ", ".join(f"{other}={show(value)}" for other, value in current.items())
        fix = " or ".join(f"-o {other}={show(allowed[0])}" for other, allowed in conditions)
        raise BadInput(f"--option {name}={show(values[name])} is not used by --method {method}: it applies only when "
                       f"{wanted}, and here {here}. Leave {name} out, or give {fix}.")


# Cache needs and the loader's plan ---------------------------------------------------


@dataclass(frozen=True)
class Need:
    """A cache output a method needs, and the cache-teachers option that produces it."""

    output: str  # "topk", "text", or a dense name ("cls", "pooled", "class_logits", "hidden.6", "hidden.*")
    option: str

    def present_in(self, cache: CacheView) -> bool:
        if self.output == "topk":
            return cache.topk_k is not None
        if self.output == "sample":
            return cache.sample_n is not None
        if self.output == "text":
            return cache.has_text
        if self.output.endswith(".*"):
            return any(n.startswith(self.output[:-1]) for n in cache.dense)
        return self.output in cache.dense


TEXT_NEED = Need("text", "--text (on by default; drop --no-text)")


# The teacher's distribution at masked positions, as the cache stores it (mergedistill's L_KD,
# tinybert's stage-1 L_pred): the renormalised top-k, the top-k plus its exact tail mass, or the
# draws (random-sampling KD, xkd/sampling.py).
KD_TARGETS = ("topk", "tail", "sampled")
KD_TARGET_HELP = ("teacher distribution: the renormalised top-k, top-k plus the exact tail mass, or N draws from the "
                  "full softmax (unbiased; needs cache-teachers --sample N)")
TOPK_COLUMNS = ("topk_ids", "topk_logits", "lognorm")
SAMPLE_COLUMNS = ("sample_ids", "sample_counts")


def check_kd_target(kd_target: str, temperature: float) -> None:
    """The tail's log-normaliser and the draws are those of softmax(z_T) at τ = 1."""
    if kd_target in ("tail", "sampled") and temperature != 1.0:
        why = "the cached log-normaliser is" if kd_target == "tail" else "the draws were made from the softmax"
        raise BadInput(f"--option kd_target={kd_target} needs temperature=1: {why} at τ = 1.")


def kd_target_need(kd_target: str, topk_option: str = "--topk 8") -> Need:
    return Need("sample", "--sample 16") if kd_target == "sampled" else Need("topk", topk_option)


def kd_target_why(kd_target: str) -> str:
    """What `require` names besides the method when the cache lacks the target's output."""
    return " --option kd_target=sampled" if kd_target == "sampled" else ""


def kd_target_columns(kd_target: str) -> tuple[str, ...]:
    return SAMPLE_COLUMNS if kd_target == "sampled" else TOPK_COLUMNS


def kd_term(kd_target: str, logits: torch.Tensor, logp: torch.Tensor, batch: dict, temperature: float) -> torch.Tensor:
    """The distillation cross-entropy at the batch's masked positions against the cached target.
    logits (M, V) the student's, logp their log-softmax (shared with the gold term)."""
    if kd_target == "sampled":
        return L.sampled_cross_entropy(logp, batch["sample_position"], batch["sample_ids"], batch["sample_weights"])
    lognorm = batch["lognorm"] if kd_target == "tail" else None
    return L.distillation_cross_entropy(logits, batch["topk_logits"], temperature, topk_ids=batch["topk_ids"],
                                        lognorm=lognorm, student_logp=logp)


def require(method: str, caches: list[CacheView], needs, why: str = "") -> None:
    """Every cache holds every need, or a one-paragraph error naming the missing output and
    the cache-teachers option that produces it."""
    for cache in caches:
        for need in needs:
            if not need.present_in(cache):
                raise BadInput(f"--method {method}{why} needs the cached output '{need.output}', which {cache.path} "
                               f"lacks. Re-run cache-teachers with {need.option} to produce it.")


def same_width(method: str, caches: list[CacheView], name: str) -> int:
    """The width of a dense output that every cache holding it must agree on."""
    dims = {c.dense[name].dim for c in caches if name in c.dense}
    if len(dims) != 1:
        raise BadInput(f"--method {method}: the caches' '{name}' outputs differ in width ({sorted(dims)}); give caches "
                       "whose teachers agree (the same classes, the same vector size).")
    return dims.pop()


@dataclass(frozen=True)
class Plan:
    """What the loader reads for a method, decided once from (config, caches). Methods that
    derive more from the caches subclass it with their own (frozen) fields."""

    columns: tuple[str, ...] | None = None  # Parquet columns (None: all)
    dense: tuple[str, ...] = ()  # dense outputs
    mix: str = "example"  # "example": languages mixed within a batch | "batch": one language per batch
    pairs: tuple = ()  # per cache: (src, tgt) languages of its parallel corpus, or None (methods reading text)
    notes: tuple[str, ...] = ()  # what the user should know (printed once)


# Methods -----------------------------------------------------------------------------


class Method:
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # the seed paper, for `xkd methods` and the docs
    Config: ClassVar[type]
    needs: ClassVar[tuple[Need, ...]] = ()  # every output it may need (what `xkd methods` lists)
    reads_sentence_pairs: ClassVar[bool] = False  # plan_for adds pair columns (with_pair_columns)

    def __init__(self, config, plan: Plan, vocab=None, total_steps: int = 1):
        self.config = config
        self.plan = plan
        self.vocab = vocab
        self.total_steps = max(1, total_steps)
        self.modules = torch.nn.ModuleDict()  # method-owned trainable heads, trained with the student

    @classmethod
    def plan_for(cls, config, caches: list[CacheView], student) -> Plan:
        """Check the caches and decide what the loader reads. `student` is the student's
        shape (models.StudentShape: layers, hidden, heads), for methods that map layers."""
        raise NotImplementedError

    @classmethod
    def build_student(cls, config, plan: Plan, vocab, student, init_from: str | None, init_teacher: str | None):
        """The student model. Default: a masked LM over the union vocab, random or initialised
        from a checkpoint through the union-vocab embedding rule."""
        from ..models import build_student

        if init_from:
            from ...vocab import student_from_teacher

            return student_from_teacher(init_from, vocab, init_teacher)[0]
        return build_student(student, vocab.size, vocab.pad_id)

    def build_heads(self, student) -> None:
        """Create method-owned heads once the student is known (default: none)."""

    def collate(self, rows: dict) -> dict:
        raise NotImplementedError

    def losses(self, batch: dict, student, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


# Shared student-side conveniences ----------------------------------------------------


def lambda_at(schedule: str, start: float, end: float, step: int, total: int) -> float:
    """Weight of the distillation term at optimiser step `step` (0-based) of `total`.
    "anneal" moves linearly from start (first step) to end (last step): teacher annealing
    (Clark et al. 2019), as MergeDistill does; "constant" keeps start."""
    if schedule == "constant":
        return start
    return start + (end - start) * min(1.0, step / max(1, total - 1))


# Sentence pairs -------------------------------------------------------------------------

# The column that carries each column's second segment when a cache holds sentence pairs.
PAIR_COMPANIONS = {"input_ids": "segment_b", "text": "text_b", "pair_text": "pair_text_b"}


def with_pair_columns(method: str, caches: list[CacheView], columns: tuple[str, ...]) -> tuple[str, ...]:
    """`columns`, plus their second-segment companions when the caches hold sentence pairs
    (a method that reads pairs calls this in plan_for). Pair and single-text caches in one
    run would give the student two kinds of input for one task: refused."""
    kinds = {cache.has_pairs for cache in caches}
    if len(kinds) > 1:
        pairs = next(c.path for c in caches if c.has_pairs)
        single = next(c.path for c in caches if not c.has_pairs)
        raise BadInput(f"--method {method}: {pairs} holds sentence pairs but {single} holds single texts; train on "
                       "caches of one kind (a pair task's caches, or a single-text task's).")
    if not kinds or not kinds.pop():
        return columns
    return columns + tuple(PAIR_COMPANIONS[c] for c in columns if c in PAIR_COMPANIONS)


def model_inputs(batch: dict) -> dict:
    """What a student's forward takes from a batch: ids, mask, and token types for pairs."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def collate_masked_lm(rows: dict, pad_id: int) -> dict:
    """Padded student inputs plus everything at masked positions, flattened in row order.
    Sentence pairs (rows with segment_b) get token type ids as the teacher's tokenizer gave them."""
    input_ids, attention_mask = padded_with_mask(rows["input_ids"], pad_id)
    width = input_ids.shape[1]
    masked: Ragged = rows["masked_positions"]
    row_of = np.repeat(np.arange(len(input_ids)), masked.lengths())
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "masked_flat": torch.from_numpy(row_of * width + masked.values.astype(np.int64)),
        "masked_row": torch.from_numpy(row_of),
        "labels": torch.from_numpy(rows["labels"].values.astype(np.int64)),
        "source": torch.from_numpy(rows["source"]),
        "example_id": torch.from_numpy(rows["example_id"].astype(np.int64)),
        "lang": list(rows["lang"]),
    }
    if "segment_b" in rows:
        lengths = attention_mask.sum(1).numpy()
        batch["token_type_ids"] = torch.from_numpy(token_type_ids(lengths, rows["segment_b"], width))
    n_masked = len(masked.values)
    if "topk_ids" in rows:
        k = len(rows["topk_ids"].values) // max(1, n_masked) if n_masked else 1
        batch["topk_ids"] = torch.from_numpy(rows["topk_ids"].values.astype(np.int64).reshape(n_masked, k))
        batch["topk_logits"] = torch.from_numpy(rows["topk_logits"].values.astype(np.float32).reshape(n_masked, k))
        batch["lognorm"] = torch.from_numpy(rows["lognorm"].values.astype(np.float32))
    if "sample_ids" in rows:
        counts = rows["sample_counts"].values.astype(np.int64)
        n = int(counts.sum()) // n_masked if n_masked else 1
        batch["sample_ids"] = torch.from_numpy(rows["sample_ids"].values.astype(np.int64))
        batch["sample_position"] = torch.from_numpy(positions_of(counts, n))
        batch["sample_weights"] = torch.from_numpy((counts / n).astype(np.float32))
    return batch


def masked_logits(student, batch: dict) -> torch.Tensor:
    """Student logits over its whole vocabulary at the batch's masked positions, (M, V) fp32.
    `student` is a models.Student (or DDP around one)."""
    return student(**model_inputs(batch), masked_flat=batch["masked_flat"]).logits.float()


def masked_log_probs(student, batch: dict) -> torch.Tensor:
    """log softmax of masked_logits, (M, V)."""
    return torch.log_softmax(masked_logits(student, batch), dim=-1)


def row_vectors(rows: dict, name: str) -> torch.Tensor:
    """A row-aligned dense output (one vector per row) as an fp32 (rows, dim) tensor."""
    ragged = rows[name]
    if not np.all(ragged.lengths() == 1):
        raise BadInput(f"the cached '{name}' output is not one vector per row; re-run cache-teachers.")
    return torch.from_numpy(np.asarray(ragged.values, dtype=np.float32).reshape(len(ragged.lengths()), -1))


# Class names across teachers and corpora ----------------------------------------------


def _unnamed(names) -> bool:
    return names is None or all(n == f"LABEL_{i}" for i, n in enumerate(names))


def class_orders(method: str, caches) -> tuple[tuple | None, tuple]:
    """(the student's class names, per cache the teacher's index of each student class or
    None): the first named teacher's order is the student's; another teacher naming the
    same classes in another order is permuted into it; other names are an error."""
    named = [c for c in caches if not _unnamed(c.teacher_labels)]
    if not named:
        return None, (None,) * len(caches)
    reference = named[0].teacher_labels
    orders = []
    for cache in caches:
        names = cache.teacher_labels
        if _unnamed(names) or sorted(names) != sorted(reference):
            raise BadInput(
                f"--method {method}: the teachers' classes differ. {named[0].path} names its classes "
                f"{', '.join(reference)}; {cache.path} names "
                f"{', '.join(names) if not _unnamed(names) else 'none (LABEL_0, ...)'}. Distil from teachers "
                "fine-tuned on the same classes (their config.json id2label name them; any order is fine)."
            )
        orders.append(None if tuple(names) == tuple(reference) else tuple(names.index(n) for n in reference))
    return tuple(reference), tuple(orders)


def gold_order_of(method: str, cache, names) -> tuple | None:
    """A labeled corpus numbers its classes by sorted name: map those ids to the student's.
    None where the corpus is unlabeled, or its names are the class ids themselves."""
    if not cache.corpus_labels or names is None or not set(cache.corpus_labels) & set(names):
        return None
    unknown = [n for n in cache.corpus_labels if n not in names]
    if unknown:
        raise BadInput(
            f"--method {method}: {cache.path} labels rows {unknown[0]!r}, which is not a class of the teachers "
            f"({', '.join(names)}). Label the corpus with the teachers' class names (or their ids 0, 1, ...)."
        )
    order = tuple(names.index(n) for n in cache.corpus_labels)
    return None if order == tuple(range(len(order))) else order


def in_student_class_order(rows: dict, logit_orders: tuple, gold_orders: tuple) -> tuple[torch.Tensor, np.ndarray]:
    """The rows' cached class logits (fp32) and gold class ids (-1: none), each source cache's
    permuted into the student's class order (class_orders, gold_order_of)."""
    logits = row_vectors(rows, "class_logits")
    gold = np.asarray(rows["class_label"], dtype=np.int64).copy()
    for source in np.unique(rows["source"]):
        here = np.flatnonzero(rows["source"] == source)
        order, gold_order = logit_orders[source], gold_orders[source]
        if order is not None:
            logits[here] = logits[here][:, list(order)]
        if gold_order is not None:
            labelled = here[gold[here] >= 0]
            gold[labelled] = np.asarray(gold_order)[gold[labelled]]
    return logits, gold
