"""What every method shares: declaring needs, checking caches against them, and the
student-side conveniences (masked-position logits, λ schedules)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...errors import BadInput
from ...storage import Cache, Ragged
from ..data import padded_with_mask


@dataclass(frozen=True)
class Need:
    """A cache output a method needs, and the cache-teachers option that produces it."""

    output: str  # "topk", "text", or a dense name ("cls", "pooled", "class_logits", "hidden.6")
    option: str

    def present_in(self, cache: Cache) -> bool:
        if self.output == "topk":
            return cache.topk_k is not None
        if self.output == "text":
            return cache.has_text
        if self.output.endswith(".*"):
            return any(n.startswith(self.output[:-1]) for n in cache.dense_specs)
        return self.output in cache.dense_specs


class Method:
    name: str = ""
    needs: tuple[Need, ...] = ()
    columns: tuple[str, ...] | None = None  # Parquet columns to read (None: all)
    dense: tuple[str, ...] = ()  # dense outputs to read
    mix: str = "example"  # "example": languages mixed within a batch; "batch": one language per batch

    def __init__(self, options: dict, vocab=None, total_steps: int = 1):
        self.options = options
        self.vocab = vocab
        self.total_steps = max(1, total_steps)
        self.modules = torch.nn.ModuleDict()  # method-owned trainable heads, trained with the student

    @classmethod
    def check_caches(cls, caches: list[Cache]) -> None:
        for cache in caches:
            for need in cls.needs:
                if not need.present_in(cache):
                    raise BadInput(
                        f"--method {cls.name} needs the cached output '{need.output}', which {cache.path} lacks. "
                        f"Re-run cache-teachers with {need.option} to produce it."
                    )

    @classmethod
    def build_student(cls, vocab, config, init_from: str | None, init_teacher: str | None, caches: list[Cache],
                      options: dict | None = None):
        """The student model this method trains. Default: a masked LM over the union vocab,
        random or initialised from a checkpoint through the union-vocab embedding rule.
        Methods that train classifiers or multi-branch students override this; `options` are
        the method's options (the same dict its __init__ receives), e.g. xd's target."""
        from ..models import build_student

        if init_from:
            from ...vocab import student_from_teacher

            return student_from_teacher(init_from, vocab, init_teacher)[0]
        return build_student(config, vocab.size, vocab.pad_id)

    def setup(self, student, caches: list[Cache]) -> None:
        """Build method-owned heads once the student and caches are known (default: none)."""

    def collate(self, rows: dict) -> dict:
        raise NotImplementedError

    def losses(self, batch: dict, student, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def parse_bool(value, name: str) -> bool:
    """A boolean --option value."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise BadInput(f"--option {name}={value}: give true or false.")


def lambda_at(schedule: str, start: float, end: float, step: int, total: int) -> float:
    """Weight of the distillation term at `step`. "anneal" moves linearly from start to end
    over training (teacher annealing, Clark et al. 2019, as MergeDistill does);
    "constant" keeps start."""
    if schedule == "constant":
        return start
    if schedule == "anneal":
        return start + (end - start) * min(1.0, step / max(1, total - 1))
    raise BadInput(f"--lambda-schedule must be 'anneal' or 'constant', not {schedule!r}")


def collate_masked_lm(rows: dict, pad_id: int) -> dict:
    """Padded student inputs plus everything at masked positions, flattened in row order."""
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
    n_masked = len(masked.values)
    if "topk_ids" in rows:
        k = len(rows["topk_ids"].values) // max(1, n_masked) if n_masked else 1
        batch["topk_ids"] = torch.from_numpy(rows["topk_ids"].values.astype(np.int64).reshape(n_masked, k))
        batch["topk_logits"] = torch.from_numpy(rows["topk_logits"].values.astype(np.float32).reshape(n_masked, k))
        batch["lognorm"] = torch.from_numpy(rows["lognorm"].values.astype(np.float32))
    return batch


def masked_log_probs(student, batch: dict) -> torch.Tensor:
    """Student log-probabilities over its whole vocabulary at the batch's masked positions,
    (M, V). `student` is a models.Student (or DDP around one)."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     masked_flat=batch["masked_flat"]).logits
    return torch.log_softmax(logits.float(), dim=-1)


TEXT_NEED = Need("text", "--text (on by default; drop --no-text)")
# Options every method receives from train-student, whatever it is.
COMMON_OPTIONS = {"lambda_schedule", "lambda_start", "lambda_end", "temperature", "kd_target"}


def check_options(method: str, options: dict, defaults: dict) -> dict:
    unknown = sorted(set(options) - set(defaults) - COMMON_OPTIONS)
    if unknown:
        raise BadInput(f"--option {', '.join(unknown)}: not an option of {method}. Its options: {', '.join(defaults)}.")
    return {**defaults, **{k: v for k, v in options.items() if k in defaults}}


def dense_dim(caches, name: str, method: str) -> int:
    dims = {c.dense_specs[name].dim for c in caches if name in c.dense_specs}
    if len(dims) != 1:
        raise BadInput(f"--method {method}: the caches' '{name}' outputs differ in width ({sorted(dims)}); "
                       "give caches whose teachers agree (the same classes, the same vector size).")
    return dims.pop()


def row_vectors(rows: dict, name: str) -> torch.Tensor:
    """A row-aligned dense output (one vector per row) as an fp32 (rows, dim) tensor."""
    ragged = rows[name]
    if not np.all(ragged.lengths() == 1):
        raise BadInput(f"the cached '{name}' output is not one vector per row; re-run cache-teachers.")
    return torch.from_numpy(np.asarray(ragged.values, dtype=np.float32).reshape(len(ragged.lengths()), -1))
