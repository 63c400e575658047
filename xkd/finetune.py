"""finetune-teacher: a Hugging Face sequence classifier fine-tuned on labelled text.

The classifier teachers of xd (one task-tuned teacher on English) and multikd (one teacher
per language) come from here, or from any other fine-tuned `…ForSequenceClassification`
checkpoint: `xkd cache-teachers --teacher DIR --class-logits` caches its class logits
either way (docs/methods.md, "classifier teachers").

Data: labeled files, `PATH@LANG`, one `text<TAB>label` a line, read by the pipeline's own
labeled-corpus reader (`labeled:PATH@LANG`), so labels parse exactly as a cached corpus's
`class_label` does. Labels are class names (class id = position in the sorted names of all
files) or class ids 0, 1, .... A slice of each file (`held_out`, drawn with the seed) is
kept out of training and scored at the end. The whole labelled set is held in memory: task
data, not a pretraining corpus.

The model is tokenized and run as the pipeline runs a classifier teacher (one sentence,
input ids and attention mask), so the cached logits are those of the model evaluated here.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput
from .names import language_code


@dataclass
class FinetuneOptions:
    base: str  # teacher alias, model id or model directory (xkd.names.resolve_teacher)
    data: list[str]  # PATH@LANG labeled files
    out: str
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 16
    max_length: int = 128
    held_out: float = 0.2  # fraction of each file kept out of training and scored
    seed: int = 0
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the optimiser steps
    device: str | None = None  # default: cuda when available

    def __post_init__(self):
        if not self.data:
            raise BadInput("--data: give at least one labeled file, PATH@LANG (a text<TAB>label a line).")
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise BadInput("--epochs and --batch-size must be at least 1, --max-length at least 2.")
        if not 0.0 <= self.held_out < 1.0:
            raise BadInput(f"--held-out {self.held_out}: give a fraction in [0, 1).")
        if self.lr <= 0:
            raise BadInput(f"--lr {self.lr}: give a positive learning rate.")


@dataclass
class LabeledSet:
    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    langs: list[str] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)


def _path_lang(item: str) -> tuple[str, str]:
    path, sep, lang = item.rpartition("@")
    if not sep or not path or not lang:
        raise BadInput(f"--data {item!r} must be PATH@LANG, e.g. xkd/data/toy-en.tsv@en (a text<TAB>label a line).")
    if not Path(path).is_file():
        raise BadInput(f"--data {item!r}: file {path} does not exist (or is not a file).")
    return path, language_code(lang, f"--data {item!r}")


def read_labeled(items: list[str]) -> LabeledSet:
    """Every example of the labeled files, labels as ids over the union of the files' classes."""
    from .names import CorpusSpec
    from .pipeline.corpus import Cleaning, plan_corpus

    per_file = []
    for item in items:
        path, lang = _path_lang(item)
        plan = plan_corpus(CorpusSpec("labeled", (path,), (lang,), spec=f"labeled:{item}"), Cleaning(), 1 << 30)
        examples = [ex for shard in plan.shards for ex in shard.examples()]
        per_file.append((item, lang, plan.source.label_names, examples))
    named = [item for item, _, names, _ in per_file if names]
    if named and len(named) != len(per_file):
        numbered = [item for item, _, names, _ in per_file if not names]
        raise BadInput(f"--data: {named[0]} labels classes by name but {numbered[0]} by id; use one kind in every file.")
    if named:
        label_names = sorted({n for _, _, names, _ in per_file for n in names})
    else:
        label_names = [str(i) for i in range(1 + max(ex.label for *_, examples in per_file for ex in examples))]
    data = LabeledSet(label_names=label_names)
    for _, lang, names, examples in per_file:
        for ex in examples:
            data.texts.append(ex.texts[0])
            data.labels.append(label_names.index(names[ex.label]) if names else ex.label)
            data.langs.append(lang)
    if len(label_names) < 2:
        raise BadInput(f"--data: the files name one class only ({label_names[0]}); a classifier needs at least 2.")
    return data


def split_held_out(langs: list[str], fraction: float, seed: int) -> np.ndarray:
    """Held-out mask: per language, round(fraction x its examples) drawn with the seed (at
    least one when fraction > 0 and the language has two or more examples)."""
    langs_arr = np.asarray(langs, dtype=object)
    held = np.zeros(len(langs), dtype=bool)
    if fraction <= 0:
        return held
    for i, lang in enumerate(sorted(set(langs))):
        rows = np.flatnonzero(langs_arr == lang)
        n = min(len(rows) - 1, max(1, round(fraction * len(rows))))
        if n > 0:
            held[np.random.default_rng([seed, i]).choice(rows, size=n, replace=False)] = True
    return held


def _batches(tokenizer, texts: list[str], max_length: int, batch_size: int):
    for start in range(0, len(texts), batch_size):
        yield tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_token_type_ids=False, return_tensors="pt")


def predict(model, tokenizer, texts: list[str], max_length: int = 128, batch_size: int = 64) -> np.ndarray:
    """Class logits (n, num_labels), fp32, the model in eval mode."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for enc in _batches(tokenizer, texts, max_length, batch_size):
            out.append(model(**{k: v.to(device) for k, v in enc.items()}).logits.float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.config.num_labels), np.float32)


def accuracy(model, tokenizer, data: LabeledSet, rows: np.ndarray, max_length: int) -> dict:
    if rows.size == 0:
        return {"accuracy": None, "examples": 0, "per_language": {}}
    logits = predict(model, tokenizer, [data.texts[i] for i in rows], max_length)
    right = logits.argmax(1) == np.asarray(data.labels)[rows]
    langs = np.asarray(data.langs, dtype=object)[rows]
    per_language = {lang: round(float(right[langs == lang].mean()), 4) for lang in sorted(set(langs.tolist()))}
    return {"accuracy": round(float(right.mean()), 4), "examples": int(rows.size), "per_language": per_language}


def finetune_teacher(opts: FinetuneOptions, progress=None) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    from .names import resolve_teacher
    from .pipeline.tokenize import load_tokenizer

    say = progress or (lambda msg: sys.stderr.write(msg + "\n"))
    started = time.time()
    data = read_labeled(opts.data)
    resolved = resolve_teacher(opts.base)
    if resolved.path is None:
        raise BadInput(f"--base {opts.base!r}: fine-tuning needs the checkpoint locally (it resolved to the hub).")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(opts.seed)
    id2label = dict(enumerate(data.label_names))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(resolved.path), num_labels=len(id2label), id2label=id2label,
            label2id={name: i for i, name in id2label.items()}, ignore_mismatched_sizes=True, dtype=torch.float32,
        )
    except (ValueError, OSError) as e:  # not a model transformers can put a classification head on
        raise BadInput(f"--base {opts.base!r}: cannot be loaded as a sequence classifier ({e}).") from None
    tokenizer = load_tokenizer(resolved.path)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)

    held = split_held_out(data.langs, opts.held_out, opts.seed)
    train_rows, held_rows = np.flatnonzero(~held), np.flatnonzero(held)
    steps_per_epoch = math.ceil(len(train_rows) / opts.batch_size)
    total = steps_per_epoch * opts.epochs
    warmup = max(1, int(opts.warmup * total))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    say(f"finetune-teacher: {opts.base} -> {len(id2label)} classes ({', '.join(data.label_names)}); "
        f"{len(train_rows)} training and {len(held_rows)} held-out examples; {opts.epochs} epochs on {device}")
    before = accuracy(model, tokenizer, data, held_rows, opts.max_length)
    labels = torch.tensor(data.labels)
    order_rng = np.random.default_rng([opts.seed, 1])
    epoch_losses = []
    for epoch in range(opts.epochs):
        model.train()
        order = train_rows[order_rng.permutation(len(train_rows))]
        losses = []
        for start in range(0, len(order), opts.batch_size):
            rows = order[start : start + opts.batch_size]
            enc = tokenizer([data.texts[i] for i in rows], truncation=True, max_length=opts.max_length,
                            padding=True, return_token_type_ids=False, return_tensors="pt")
            out = model(**{k: v.to(device) for k, v in enc.items()}, labels=labels[rows].to(device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
        epoch_losses.append(round(float(np.mean(losses)), 6))
        say(f"finetune-teacher: epoch {epoch + 1}/{opts.epochs}  loss {epoch_losses[-1]:.4f}")
    after = accuracy(model, tokenizer, data, held_rows, opts.max_length)
    out_dir = Path(opts.out)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    counts = {lang: int(sum(1 for x in data.langs if x == lang)) for lang in sorted(set(data.langs))}
    summary = {
        "out": str(out_dir), "base": opts.base, "labels": data.label_names, "examples": counts,
        "train_examples": int(len(train_rows)), "held_out_examples": int(len(held_rows)),
        "accuracy_before": before["accuracy"], "accuracy": after["accuracy"], "per_language": after["per_language"],
        "epoch_losses": epoch_losses, "steps": total, "seconds": round(time.time() - started, 2),
        "options": asdict(opts),
    }
    (out_dir / "finetune_summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return summary


def format_summary(summary: dict) -> str:
    acc = summary["accuracy"]
    shown = "n/a (no held-out examples)" if acc is None else (
        f"{acc:.3f} (before: {summary['accuracy_before']:.3f}; "
        + ", ".join(f"{k} {v:.3f}" for k, v in summary["per_language"].items()) + ")")
    return (f"fine-tuned {summary['base']} on {summary['train_examples']} examples for {len(summary['epoch_losses'])} "
            f"epochs (loss {summary['epoch_losses'][0]:.4f} -> {summary['epoch_losses'][-1]:.4f}) in "
            f"{summary['seconds']}s\nheld-out accuracy {shown}\nclassifier: {summary['out']} "
            f"(labels {', '.join(summary['labels'])})")
