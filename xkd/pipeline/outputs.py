"""Dense teacher outputs, one declaration each: what a kind is called and how it is asked for,
the arrays it stores (name, alignment, width, dtype, codec, layout: storage.DenseSpec), what
it needs from the forward pass, how it is computed from it, what a teacher must have for it,
and the cache-teachers options that ask for it again (the command a manifest records).

The pipeline (teachers.py: the forward pass; work.py: scattering into rows; run.py: the
command) and storage (which writes and reads any DenseSpec) know no kind by name. Adding a
kind is one declaration, `register(OutputKind(...))`, here or in a module imported by the
workers; cache-teachers then takes it as `--output NAME`, the cache stores it, and a method
reads it by its array name (docs/pipeline.md, "Adding an output kind";
tests/test_output_registry.py adds one in the test file itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..storage import DenseSpec

if TYPE_CHECKING:  # pragma: no cover
    from .teachers import Outputs, TeacherSpec

# --hidden-positions: where hidden states are taken -> the arrays' alignment
HIDDEN_POSITIONS = {"all": "token", "word": "word", "cls": "row"}
SENTENCE_VECTORS = ("cls", "pooled")


@dataclass(frozen=True)
class Forward:
    """One forward pass of a teacher over a padded batch, as producers see it (tensors on the
    teacher's device)."""

    base: object  # the encoder's output: last_hidden_state, hidden_states, attentions, pooler_output
    logits: object  # a classifier's class logits (batch, labels); None for other kinds
    attention: object  # (batch, length) attention mask
    word_start: object  # (batch, length) bool: the first sub-token of each word
    pool: Callable  # the teacher's sentence pooling: pool(base, attention) -> (batch, width)

    @property
    def rows(self) -> int:
        return int(self.attention.shape[0])


@dataclass(frozen=True)
class OutputKind:
    """One kind of dense output. Producers return tensors whose first axis follows each
    array's alignment (a row per batch row, a token per real token in row-major order, a word
    per word start); they are stored in the array's dtype."""

    name: str
    wanted: Callable[["Outputs"], bool]
    arrays: Callable[["Outputs", "TeacherSpec"], list[DenseSpec]]
    produce: Callable[[Forward, "Outputs"], dict]
    check: Callable[["Outputs", "TeacherSpec"], "str | None"] = lambda outputs, teacher: None
    # The cache-teachers options (field: value) that ask for it again, from the view's recorded outputs
    options: Callable[[dict], dict] = lambda recorded: {}
    hidden_states: bool = False  # the forward pass must return every layer's states
    attentions: bool = False  # ... every layer's attention probabilities (eager attention)
    help: str = ""


KINDS: dict[str, OutputKind] = {}


def register(kind: OutputKind) -> OutputKind:
    if kind.name in KINDS and KINDS[kind.name] is not kind:
        raise ValueError(f"an output kind named {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def wanted(outputs: "Outputs") -> list[OutputKind]:
    return [kind for kind in KINDS.values() if kind.wanted(outputs)]


def dense_specs(outputs: "Outputs", teacher: "TeacherSpec") -> dict[str, DenseSpec]:
    """Every array the outputs ask for, as computed and stored."""
    return {spec.name: spec for kind in wanted(outputs) for spec in kind.arrays(outputs, teacher)}


def extra_kinds() -> list[str]:
    """Kinds asked for with `--output NAME` (those without options of their own)."""
    return sorted(name for name in KINDS if name not in BUILT_IN)


# The built-in kinds --------------------------------------------------------------------


def _hidden_produce(forward: Forward, outputs: "Outputs") -> dict:
    where = {"all": forward.attention.bool(), "word": forward.word_start}
    out = {}
    for layer in outputs.hidden_layers:
        states = forward.base.hidden_states[layer]
        out[f"hidden.{layer}"] = states[:, 0] if outputs.hidden_positions == "cls" \
            else states[where[outputs.hidden_positions]]
    return out


def _hidden_check(outputs: "Outputs", teacher: "TeacherSpec") -> str | None:
    bad = [layer for layer in outputs.hidden_layers if not 0 <= layer <= teacher.num_layers]
    return f"--hidden-layers {bad}: teacher {teacher.name!r} has layers 0 (embeddings) to {teacher.num_layers}." if bad else None


def _hidden_options(recorded: dict) -> dict:
    if not recorded.get("hidden_layers"):
        return {}
    return {"hidden_layers": tuple(recorded["hidden_layers"]), "hidden_positions": recorded.get("hidden_positions") or "all"}


HIDDEN = register(OutputKind(
    "hidden", wanted=lambda o: bool(o.hidden_layers),
    arrays=lambda o, t: [DenseSpec(f"hidden.{layer}", HIDDEN_POSITIONS[o.hidden_positions], t.hidden_size)
                         for layer in o.hidden_layers],
    produce=_hidden_produce, check=_hidden_check, options=_hidden_options, hidden_states=True,
    help="hidden states of --hidden-layers at --hidden-positions"))


def _attention_produce(forward: Forward, outputs: "Outputs") -> dict:
    import torch

    real = forward.attention.bool()
    out = {}
    for layer in outputs.attention_layers:
        maps = forward.base.attentions[layer - 1]  # (batch, heads, query, key)
        keys = torch.nn.functional.pad(maps, (0, outputs.attention_keys - maps.shape[-1]))
        per_query = keys.permute(0, 2, 1, 3).reshape(forward.rows, maps.shape[2], -1)
        out[f"attn.{layer}"] = per_query[real]
    return out


def _attention_check(outputs: "Outputs", teacher: "TeacherSpec") -> str | None:
    bad = [layer for layer in outputs.attention_layers if not 1 <= layer <= teacher.num_layers]
    return f"--attention-layers {bad}: teacher {teacher.name!r} has attention in layers 1 to {teacher.num_layers}." \
        if bad else None


# Computed per token as heads x max-length probabilities (keys zero-padded), stored in the
# "keys" layout: per row of n tokens only its n x heads x n real ones (storage/schema.py).
ATTENTION = register(OutputKind(
    "attention", wanted=lambda o: bool(o.attention_layers),
    arrays=lambda o, t: [DenseSpec(f"attn.{layer}", "token", t.num_heads * o.attention_keys, layout="keys",
                                   heads=t.num_heads) for layer in o.attention_layers],
    produce=_attention_produce, check=_attention_check, attentions=True,
    options=lambda r: {"attention_layers": tuple(r["attention_layers"])} if r.get("attention_layers") else {},
    help="attention probabilities of --attention-layers"))


SENTENCE = register(OutputKind(
    "sentence", wanted=lambda o: bool(o.sentence),
    arrays=lambda o, t: [DenseSpec(name, "row", t.hidden_size) for name in o.sentence],
    produce=lambda f, o: {name: f.base.last_hidden_state[:, 0] if name == "cls" else f.pool(f.base, f.attention)
                          for name in o.sentence},
    options=lambda r: {"sentence": tuple(r["sentence"])} if "sentence" in r else {},
    help="sentence vectors: [CLS] and the teacher's pooling (--sentence)"))


CLASS_LOGITS = register(OutputKind(
    "class_logits", wanted=lambda o: o.class_logits,
    arrays=lambda o, t: [DenseSpec("class_logits", "row", t.num_labels)],
    produce=lambda f, o: {"class_logits": f.logits},
    check=lambda o, t: None if t.kind == "classifier" else (
        f"teacher {t.name!r} is not a sequence classifier (no …ForSequenceClassification in its config.json), so it "
        "has no class logits. Drop --class-logits for it."),
    options=lambda r: {"class_logits": bool(r["class_logits"])} if "class_logits" in r else {},
    help="a classifier's class logits (--class-logits)"))

BUILT_IN = frozenset(KINDS)
