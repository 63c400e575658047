"""Fine-tuning a Hugging Face encoder with a fresh head on task data: `xkd finetune-teacher`
(a classifier teacher for xd, multikd and tinybert stage 2) and `xkd evaluate --mode
classify|tag` (the papers' zero-shot yardstick) share this loop.

The recipe (`Recipe`) is BERT's (Devlin et al. 2019), which every seed paper fine-tunes with:
AdamW, weight decay 0.01 except on biases and LayerNorm weights, linear warm-up over the
first 10% of steps then linear decay to 0 (train-student's schedule, student/runtime.py, as
is the choice of device), gradient norm clipped at 1.0. `freeze_embeddings`
keeps the embedding layers fixed (Soltan et al. 2021: "to prevent the change only in subset of
subwords that appear in the training data", which helps zero-shot transfer).

Data is task data (tasks.py): labeled single texts, sentence pairs or CoNLL tags. Each
language is tokenized as the model reads it (`TaskEncoder`): its own tokenizer and template
(pairs: BERT's [CLS] a [SEP] b [SEP] with token types, RoBERTa's <s> a </s></s> b </s>), or
for an xkd student, the union vocab's routing of that language. For tagging, a word's label
sits on its first sub-token, the other sub-tokens are not scored, and a word cut off by
--max-length is not predicted.

finetune-teacher holds a slice of each file out (`held_out`, drawn with the seed) and scores
it at the end. The model is tokenized and run as the pipeline runs a classifier teacher, so
the cached logits are those of the model evaluated here.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..options import check_number, check_options, config_yaml, option
from ..segments import takes_token_types
from .tasks import TaskSet, read_tasks, task_labels

IGNORED = -100  # transformers' label for positions the loss skips


@dataclass(frozen=True)
class Recipe:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 16
    max_length: int = 128  # tokens per example, special tokens included
    warmup: float = 0.1  # fraction of the optimiser steps
    weight_decay: float = 0.01
    freeze_embeddings: bool = False

    def __post_init__(self):
        check_number("--epochs", self.epochs, low=1, whole=True)
        check_number("--batch-size", self.batch_size, low=1, whole=True)
        check_number("--max-length", self.max_length, low=3, whole=True)
        check_number("--lr", self.lr, low=1e-12, hint="a positive learning rate")
        check_number("--warmup", self.warmup, low=0.0, high=1.0)
        check_number("--weight-decay", self.weight_decay, low=0.0)


# Tokenizing task data -----------------------------------------------------------------


@dataclass
class Encoded:
    """One language's task data as model inputs (unpadded, one array per example)."""

    lang: str
    ids: list[np.ndarray]
    types: list[np.ndarray] | None  # token type ids, where the tokenizer gives them (BERT)
    targets: list  # class id per example, or per token the label id (IGNORED: not scored)
    first_tokens: list[np.ndarray] = field(default_factory=list)  # tagging: each kept word's first sub-token


class TaskEncoder:
    """Tokenizes task data as a model reads it: with the model's own tokenizer, or (an xkd
    student) with the union vocab's routing: each language through its teacher's
    tokenizer, remapped into the union."""

    def __init__(self, tokenizer=None, vocab=None):
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.pad_id = vocab.pad_id if vocab is not None else (tokenizer.pad_token_id or 0)

    def _for(self, lang: str):
        if self.vocab is None:
            return self.tokenizer, None
        slug = self.vocab.teacher_for(lang)
        return self.vocab.teacher_tokenizer(slug), (slug, self.vocab.map_for(slug))

    def encode(self, data: TaskSet, labels: list[str], max_length: int) -> Encoded:
        tokenizer, table = self._for(data.lang)
        label_id = {name: i for i, name in enumerate(labels)}
        if data.kind == "conll":
            if not getattr(tokenizer, "is_fast", False):
                raise BadInput(f"{data.spec}: tagging needs a fast (Rust) tokenizer for word boundaries; the model's "
                               f"is {type(tokenizer).__name__}. Save it with a tokenizer.json.")
            enc = tokenizer(data.words, is_split_into_words=True, truncation=True, max_length=max_length)
        else:
            enc = tokenizer(data.texts, data.texts_b, truncation=True, max_length=max_length)
        ids = [np.asarray(row, dtype=np.int64) for row in enc["input_ids"]]
        if table is not None:
            from ..vocab import remap_lists

            slug, mapping = table
            ids = [row.astype(np.int64) for row in remap_lists(ids, mapping, what=f"tokenize with teacher {slug}")]
        types = [np.asarray(row, dtype=np.int64) for row in enc["token_type_ids"]] if "token_type_ids" in enc else None
        if data.kind != "conll":
            return Encoded(data.lang, ids, types, [label_id[label] for label in data.labels])
        targets, first_tokens = [], []
        for n, (row, tags) in enumerate(zip(ids, data.tags)):
            words = np.array([-1 if w is None else w for w in enc.word_ids(n)], dtype=np.int64)
            first = np.flatnonzero((words >= 0) & np.r_[True, words[1:] != words[:-1]])
            target = np.full(len(row), IGNORED, dtype=np.int64)
            target[first] = [label_id[tags[w]] for w in words[first]]
            targets.append(target)
            first_tokens.append(first)
        return Encoded(data.lang, ids, types, targets, first_tokens)


def collate(data: Encoded, rows: np.ndarray, pad_id: int, with_targets: bool = True) -> dict:
    """Padded torch inputs for the given examples (and their labels)."""
    import torch

    width = max(len(data.ids[r]) for r in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    if data.types is not None:
        batch["token_type_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
    tagging = bool(data.first_tokens)
    if with_targets and tagging:
        batch["labels"] = torch.full((len(rows), width), IGNORED, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(data.ids[r])
        batch["input_ids"][i, :n] = torch.from_numpy(data.ids[r])
        batch["attention_mask"][i, :n] = 1
        if data.types is not None:
            batch["token_type_ids"][i, :n] = torch.from_numpy(data.types[r])
        if with_targets and tagging:
            batch["labels"][i, :n] = torch.from_numpy(data.targets[r])
    if with_targets and not tagging:
        batch["labels"] = torch.tensor([data.targets[r] for r in rows], dtype=torch.long)
    return batch


# Training and prediction --------------------------------------------------------------


def _inputs(model, batch: dict, device) -> dict:
    types = takes_token_types(model.config)
    return {k: v.to(device) for k, v in batch.items() if k != "token_type_ids" or types}


def fit(model, train: list[Encoded], recipe: Recipe, pad_id: int, seed: int, device, say=None) -> list[float]:
    """Fine-tune `model` in place on the examples of every Encoded (shuffled together);
    return the mean loss of each epoch."""
    import torch

    from ..student.runtime import linear_schedule

    say = say or (lambda msg: None)
    examples = [(d, r) for d, data in enumerate(train) for r in range(len(data.ids))]
    if recipe.freeze_embeddings:
        for p in model.base_model.embeddings.parameters():
            p.requires_grad_(False)
    steps_per_epoch = math.ceil(len(examples) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    # --warmup is a fraction of the steps here, 1.0 included (all of them); train-student's
    # runtime.warmup_steps reads a value of 1 or more as a number of steps.
    warmup = max(1, int(recipe.warmup * total))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([
        {"params": [p for n, p in trainable if p.ndim >= 2], "weight_decay": recipe.weight_decay},
        {"params": [p for n, p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ], lr=recipe.lr)
    scheduler = linear_schedule(optimizer, warmup, total)
    order_rng = np.random.default_rng([seed, 1])
    epoch_losses = []
    for epoch in range(recipe.epochs):
        model.train()
        order = order_rng.permutation(len(examples))
        losses = []
        for start in range(0, len(order), recipe.batch_size):
            # Files may be tokenized differently (a union vocab routes each language to its own
            # teacher's tokenizer), so each file's share of a batch is collated on its own;
            # the batch loss is their mean weighted by rows.
            picked = [examples[i] for i in order[start : start + recipe.batch_size]]
            loss = 0.0
            for d in sorted({d for d, _ in picked}):
                rows = np.array([r for dd, r in picked if dd == d])
                out = model(**_inputs(model, collate(train[d], rows, pad_id), device))
                loss = loss + out.loss * (len(rows) / len(picked))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        epoch_losses.append(round(float(np.mean(losses)), 6))
        say(f"epoch {epoch + 1}/{recipe.epochs}  loss {epoch_losses[-1]:.4f}")
    model.eval()
    return epoch_losses


def predict(model, data: Encoded, pad_id: int, device, batch_size: int = 64) -> list[np.ndarray]:
    """Per example, its logits: (classes,) for a sequence, (kept words, classes) for tags."""
    import torch

    model.eval()
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(data.ids), batch_size):
            rows = np.arange(start, min(start + batch_size, len(data.ids)))
            logits = model(**_inputs(model, collate(data, rows, pad_id, with_targets=False), device)).logits.float().cpu()
            for i, r in enumerate(rows):
                out.append(logits[i, data.first_tokens[r]].numpy() if data.first_tokens else logits[i].numpy())
    return out


# finetune-teacher ---------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneOptions:
    """What `xkd finetune-teacher` takes: one declaration per flag (xkd/options.py)."""

    base: str = option(None, "--base", required=True, help="Model to fine-tune: alias (minilm, mbert, ...), HF model id or "
                       "model dir.")
    data: tuple[str, ...] = option((), "--data", help="Labeled file [labeled:]PATH@LANG (text<TAB>label a line) or "
                                   "sentence pairs pairs:PATH@LANG (text_a<TAB>text_b<TAB>label); repeat for several.")
    out: str = option(None, "--out", required=True, replay=False, help="Where to save the classifier (HF format, with its "
                      "tokenizer and labels).")
    epochs: int = option(3, "--epochs", help="Passes over the training examples.")
    lr: float = option(5e-5, "--lr", help="Peak learning rate.")
    batch_size: int = option(16, "--batch-size", help="Examples per batch.")
    max_length: int = option(128, "--max-length", help="Tokens per example, special tokens included.")
    held_out: float = option(0.2, "--held-out", low=0.0, high=1.0, high_open=True, hint="a fraction",
                             help="Fraction of each file kept out of training and scored (0: none).")
    seed: int = option(0, "--seed", help="Seed of the head, the held-out split and the data order.")
    weight_decay: float = option(0.01, "--weight-decay", help="AdamW weight decay.")
    warmup: float = option(0.1, "--warmup", help="Warm-up, a fraction of the steps.")
    freeze_embeddings: bool = option(False, "--freeze-embeddings", help="Keep the embedding layers fixed (as in Soltan et "
                                     "al. 2021).")
    device: str | None = option(None, "--device", help="cpu | cuda (default: cuda if available).")

    def __post_init__(self):
        object.__setattr__(self, "data", tuple(self.data))
        if not self.data:
            raise BadInput("--data: give at least one labeled file, PATH@LANG (a text<TAB>label a line).")
        check_options(self)
        _ = self.recipe  # builds the Recipe, whose own checks validate the numbers
        from ..student.runtime import check_device

        check_device(self.device)  # --device cuda without CUDA: one paragraph now, not a traceback after reading

    @property
    def recipe(self) -> Recipe:
        names = {f.name for f in fields(Recipe)}
        return Recipe(**{k: v for k, v in asdict(self).items() if k in names})


def split_held_out(sizes: list[int], fraction: float, seed: int) -> list[np.ndarray]:
    """Per file, a held-out mask: round(fraction x its examples) drawn with the seed (at
    least one when fraction > 0 and the file has two or more examples)."""
    out = []
    for i, n_rows in enumerate(sizes):
        held = np.zeros(n_rows, dtype=bool)
        n = min(n_rows - 1, max(1, round(fraction * n_rows))) if fraction > 0 else 0
        if n > 0:
            held[np.random.default_rng([seed, i]).choice(n_rows, size=n, replace=False)] = True
        out.append(held)
    return out


def _subset(data: Encoded, rows: np.ndarray) -> Encoded:
    pick = rows.tolist()
    return Encoded(data.lang, [data.ids[r] for r in pick], None if data.types is None else [data.types[r] for r in pick],
                   [data.targets[r] for r in pick], [data.first_tokens[r] for r in pick] if data.first_tokens else [])


def _accuracy(model, held: list[Encoded], pad_id: int, device) -> dict:
    right: dict[str, list[bool]] = {}
    for data in held:
        for logits, target in zip(predict(model, data, pad_id, device), data.targets):
            right.setdefault(data.lang, []).append(int(logits.argmax()) == target)
    every = [x for values in right.values() for x in values]
    if not every:
        return {"accuracy": None, "examples": 0, "per_language": {}}
    return {"accuracy": round(float(np.mean(every)), 4), "examples": len(every),
            "per_language": {lang: round(float(np.mean(v)), 4) for lang, v in sorted(right.items())}}


def finetune_teacher(opts: FinetuneOptions, progress=None) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    from ..names import resolve_teacher
    from ..pipeline.tokenize import load_tokenizer
    from ..student.runtime import resolve_device

    say = progress or (lambda msg: sys.stderr.write(msg + "\n"))
    started = time.time()
    tasks = read_tasks(opts.data, "--data")
    if any(t.kind == "conll" for t in tasks):
        raise BadInput("--data: finetune-teacher trains sequence classifiers (labeled: or pairs: files); tagging data "
                       "(conll:) is for xkd evaluate --mode tag.")
    labels = task_labels(tasks)
    resolved = resolve_teacher(opts.base)
    if resolved.path is None:
        raise BadInput(f"--base {opts.base!r}: fine-tuning needs the checkpoint locally (it resolved to the hub).")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(opts.seed)
    id2label = dict(enumerate(labels))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(resolved.path), num_labels=len(id2label), id2label=id2label,
            label2id={name: i for i, name in id2label.items()}, ignore_mismatched_sizes=True, dtype=torch.float32,
        )
    except (ValueError, OSError) as e:  # not a model transformers can put a classification head on
        raise BadInput(f"--base {opts.base!r}: cannot be loaded as a sequence classifier ({e}).") from None
    tokenizer = load_tokenizer(resolved.path)
    device = resolve_device(opts.device)
    model.to(device)
    recipe = opts.recipe
    encoder = TaskEncoder(tokenizer)
    encoded = [encoder.encode(t, labels, recipe.max_length) for t in tasks]
    held = split_held_out([len(e.ids) for e in encoded], opts.held_out, opts.seed)
    train = [_subset(e, np.flatnonzero(~h)) for e, h in zip(encoded, held)]
    scored = [_subset(e, np.flatnonzero(h)) for e, h in zip(encoded, held)]
    n_train, n_held = sum(len(e.ids) for e in train), sum(len(e.ids) for e in scored)
    say(f"finetune-teacher: {opts.base} -> {len(labels)} classes ({', '.join(labels)}); {n_train} training and "
        f"{n_held} held-out examples; {recipe.epochs} epochs on {device}")
    before = _accuracy(model, scored, encoder.pad_id, device)
    epoch_losses = fit(model, train, recipe, encoder.pad_id, opts.seed, device,
                       say=lambda msg: say(f"finetune-teacher: {msg}"))
    after = _accuracy(model, scored, encoder.pad_id, device)
    out_dir = Path(opts.out)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    summary = {
        "out": str(out_dir), "base": opts.base, "labels": labels, "examples": examples_per_language(tasks),
        "pairs": tasks[0].kind == "pairs", "train_examples": n_train, "held_out_examples": n_held,
        "accuracy_before": before["accuracy"], "accuracy": after["accuracy"], "per_language": after["per_language"],
        "epoch_losses": epoch_losses, "steps": math.ceil(n_train / recipe.batch_size) * recipe.epochs,
        "seconds": round(time.time() - started, 2), "options": asdict(opts),
    }
    (out_dir / "finetune_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (out_dir / "config.yaml").write_bytes(config_yaml(opts, "finetune-teacher"))  # replayable with --config
    return summary


def examples_per_language(tasks: list[TaskSet]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tasks:
        counts[t.lang] = counts.get(t.lang, 0) + len(t)
    return dict(sorted(counts.items()))


def format_summary(summary: dict) -> str:
    acc = summary["accuracy"]
    shown = "n/a (no held-out examples)" if acc is None else (
        f"{acc:.3f} (before: {summary['accuracy_before']:.3f}; "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary["per_language"].items()) + ")")
    return (f"fine-tuned {summary['base']} on {summary['train_examples']} examples for {len(summary['epoch_losses'])} "
            f"epochs (loss {summary['epoch_losses'][0]:.4f} -> {summary['epoch_losses'][-1]:.4f}) in "
            f"{summary['seconds']}s\nheld-out accuracy {shown}\nclassifier: {summary['out']} "
            f"(labels {', '.join(summary['labels'])})")
