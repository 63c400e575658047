"""Evaluation: how good a model is. One module per `xkd evaluate --mode`, and MODES, the
table that declares them:

    mlm.py         --mode mlm: a student's masked-LM loss, accuracy and KL to its teachers, on held-out caches
    bitext.py      --mode bitext: bitext retrieval accuracy with the student's sentence vectors
    downstream.py  --mode classify|tag: fine-tune on one language's task data, score every language
    students.py    MODEL and --vocab of mlm and bitext, and loading a trained student
    rdt.py         `xkd rdt`: MergeDistill's relative deviation from teachers, from classify|tag results
    finetune.py    the fine-tuning loop and recipe (downstream's, and `xkd finetune-teacher`)
    tasks.py       task data: labeled:, pairs:, conll: and hf: specs
    metrics.py     span F1 (conlleval), token accuracy, RDT: pure Python

`xkd evaluate` looks --mode up in MODES, refuses every option that mode does not read, runs
it and prints what it returns. A new mode is a module with `run(values) -> (result, text)`
and one entry here. A mode's module is imported only when it runs: they load torch, and
`xkd --help` should not.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Callable

# classify and tag's fine-tuning options: --as-is (no fine-tuning) reads none of them.
FINE_TUNING = ("train", "seeds", "seed", "epochs", "lr", "warmup", "weight_decay", "freeze_embeddings")


@dataclass(frozen=True)
class Mode:
    """One `xkd evaluate --mode`. Options are evaluate's parameter names; MODEL, --mode and
    --json belong to every mode."""

    help: str  # what it measures, in --mode's help
    options: frozenset[str]  # what it reads besides MODEL: every other option is refused
    run: Callable[[dict], tuple[dict, str]]  # evaluate's parsed options by name -> (result, the text printed)
    text_with_json: bool = False  # --json prints the text too, then the JSON (else the JSON alone)


def _module_run(module: str) -> Callable[[dict], tuple[dict, str]]:
    """`run` of xkd/evaluation/<module>.py, imported when the mode runs."""

    def run(values: dict) -> tuple[dict, str]:
        return import_module(f"{__name__}.{module}").run(values)

    return run


_TASK_OPTIONS = frozenset({"vocab", "test", "max_length", "out", "device", "batch_size", "as_is", *FINE_TUNING})

# mlm and bitext run on the CPU, so --device is classify/tag's only.
MODES: dict[str, Mode] = {
    "mlm": Mode("loss, accuracy, KL to teachers",
                frozenset({"vocab", "caches", "batch_size", "max_rows", "allow_incomplete", "cache_dir", "cache_size"}),
                _module_run("mlm")),
    "bitext": Mode("retrieval accuracy",
                   frozenset({"vocab", "src", "tgt", "init_from", "pooling", "batch_size", "max_rows"}),
                   _module_run("bitext")),
    "classify": Mode("fine-tune and score sequence classification, zero-shot across languages", _TASK_OPTIONS,
                     _module_run("downstream"), text_with_json=True),
    "tag": Mode("the same for CoNLL tagging: span F1 or accuracy", _TASK_OPTIONS, _module_run("downstream"),
                text_with_json=True),
}
