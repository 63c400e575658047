"""Model families: one declaration each, in a module of this package (bert.py, xlm_roberta.py, ...).

A family is what transformers calls a model type, with what xkd must know about it that neither
config.json nor the tokenizer says: the aliases that name its checkpoints, whether its position
ids start after the pad id, which attribute of its masked LM is the MLM head, and how a random
student of it is built. Every module that needs one of these facts looks the family up here,
so adding a family is one module plus its tests (docs/architecture.md, "Adding a teacher
family"): the modules are found on import, in name order.

The word convention is declared too, but xkd reads a tokenizer's convention from its
tokenizer.json (a bare vocab file has no family, and a family may ship other tokenizers): the
declaration says which convention the family's checkpoints bring, and the tests hold each
family's tokenizers to it.

Plain data, a leaf: it imports nothing of xkd (pipeline, vocab, student and names all use it).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

# The subword conventions xkd has a canonical form for (xkd.vocab.canonical spells them so).
CONVENTIONS = ("wordpiece", "sentencepiece", "bytelevel")


@dataclass(frozen=True)
class Family:
    # Its own config.json model_type; train-student --architecture and MBLMConfig.family spell it so.
    name: str
    # Every config.json model_type it covers (name first): checkpoints that differ in nothing xkd reads.
    model_types: tuple[str, ...]
    # Its tokenizers' subword convention: "wordpiece" ("##" continuations), "sentencepiece"
    # ("▁" word starts) or "bytelevel" (byte-level BPE, "Ġ" word starts).
    convention: str
    # --teacher / --teachers aliases: (alias, Hugging Face model id) pairs.
    aliases: tuple[tuple[str, str], ...] = ()
    # Position ids start after the pad id (fairseq's make_positions: the k-th real token reads
    # row pad_id + 1 + k), so pad_id + 1 rows of the position table are no token's position.
    positions_after_pad: bool = False
    # The attribute of its ...ForMaskedLM that maps final hidden states to vocabulary logits;
    # None where no single module does (DistilBERT: three).
    mlm_head: str | None = None
    # A random student of this family (train-student --architecture NAME): the transformers
    # config and masked-LM class names; None: not a student architecture.
    student_classes: tuple[str, str] | None = None
    # Config values a random student sets beyond its shape, as (key, value) pairs.
    student_config: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        if self.convention not in CONVENTIONS:
            raise ValueError(f"family {self.name!r}: convention {self.convention!r} is none of {CONVENTIONS}")
        if self.model_types[:1] != (self.name,):
            raise ValueError(f"family {self.name!r}: model_types must start with its name, not {self.model_types}")


def _declared() -> tuple[Family, ...]:
    """Every module of this package's FAMILY, in module name order."""
    return tuple(importlib.import_module(f"{__name__}.{module.name}").FAMILY
                 for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name))


FAMILIES = _declared()
_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}
# alias -> model id (names.resolve_teacher)
TEACHER_ALIASES = {alias: model_id for family in FAMILIES for alias, model_id in family.aliases}
# train-student --architecture choices, bert (the default) first
STUDENT_ARCHITECTURES = tuple(sorted((f.name for f in FAMILIES if f.student_classes), key=lambda n: n != "bert"))
# Every attribute name an MLM head has in a declared family, for models known only by their modules
MLM_HEADS = tuple(dict.fromkeys(f.mlm_head for f in FAMILIES if f.mlm_head))


def family_of(model_type: str | None) -> Family | None:
    """The family that covers a config.json model_type (or a family's name), or None."""
    return _BY_MODEL_TYPE.get(model_type) if model_type else None


def positions_after_pad(model_type: str | None) -> bool:
    family = family_of(model_type)
    return family is not None and family.positions_after_pad


def position_offset(model_type: str | None, pad_id) -> int:
    """The rows of the position table that no token reads: pad_id + 1 where positions start
    after the pad id, else 0 (a model type no family declares included). `pad_id` is read only
    where it counts."""
    return int(pad_id) + 1 if positions_after_pad(model_type) else 0
