"""`xkd evaluate --mode mlm`: how a student does on held-out caches, and against its teachers.

Per held-out cache (one teacher each): the student's MLM loss and accuracy on the gold
labels, the teacher's accuracy (its top-1 from the cached top-k), and the KL divergence from
teacher to student over {top-k tokens, the rest} (exact given the cached log-normaliser).
`mlm_accuracy_deviation_percent` averages the student's relative deviation from each
teacher's masked-LM accuracy, 100/n Σ (P_S − P_T)/P_T (positive: the student is better). It
has RDT's form but not its meaning: MergeDistill's RDT (Eq. 3) is on downstream task scores,
which `xkd evaluate --mode classify|tag` then `xkd rdt` compute (downstream.py, rdt.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import BadInput
from ..options import check_number
from ..storage.view import view_of
from ..student.data import _block_rows, _concat_rows, _remap_rows, _take_rows, num_rows
from ..student.export import evaluation_key, record_evaluation
from ..student.methods.base import collate_masked_lm, masked_log_probs
from ..student.models import Student
from ..student.run import open_caches, remap_tables
from ..student.targets import tail_kl
from .students import load_student, student_and_vocab


def run(values: dict) -> tuple[dict, str]:
    """The mode as `xkd evaluate` runs it: evaluate's parsed options -> (result, its lines)."""
    model, vocab = student_and_vocab(values)
    if not values["caches"]:
        raise BadInput("--mode mlm needs at least one --caches: held-out caches of the student's teachers.")
    from ..workspace import expand_cache_paths

    held_out = expand_cache_paths([str(c) for c in values["caches"]])
    result = evaluate_mlm(model, held_out, vocab, values["batch_size"], values["max_rows"], values["allow_incomplete"],
                          fetch=values["fetch_for"](held_out))
    lines = [f"{r['teacher']:<24} positions {r['masked_positions']:>8,}  mlm loss {r['mlm_loss']:.4f}  "
             f"acc {r['accuracy']:.4f} (teacher {r['teacher_accuracy']:.4f})  KL to teacher {r['kl_to_teacher']:.4f}"
             for r in result["per_cache"]]
    if result["mlm_accuracy_deviation_percent"] is not None:
        lines.append(f"MLM accuracy deviation from teachers {result['mlm_accuracy_deviation_percent']:+.2f}% "
                     "(positive: student better; MergeDistill's RDT is on task scores: xkd rdt)")
    return result, "\n".join(lines)


def iter_row_batches(cache, table, batch_size: int, columns, max_rows: int | None = None):
    """The cache's rows in order, remapped, in batches of `batch_size` rows."""
    pending, seen = [], 0
    for block in cache.iter_blocks(columns=columns, dense=()):
        rows = _remap_rows(_block_rows(block, np.arange(block.num_rows), 0), table)
        if max_rows is not None and seen + block.num_rows > max_rows:
            rows = _take_rows(rows, np.arange(max_rows - seen))
        seen += num_rows(rows)
        pending.append(rows)
        merged = _concat_rows(pending)
        while num_rows(merged) >= batch_size:
            yield _take_rows(merged, np.arange(batch_size))
            merged = _take_rows(merged, np.arange(batch_size, num_rows(merged)))
        pending = [merged] if num_rows(merged) else []
        if max_rows is not None and seen >= max_rows:
            break
    if pending:
        yield _concat_rows(pending)


@torch.inference_mode()
def evaluate_mlm(model_dir: str, caches: list[str], vocab_dir: str, batch_size: int = 32, max_rows: int | None = None,
                 allow_incomplete: bool = False, fetch=None) -> dict:
    from ..vocab import load_vocab

    check_number("--batch-size", batch_size, low=1)
    if max_rows is not None:
        check_number("--max-rows", max_rows, low=1)
    opened = open_caches(caches, allow_incomplete, fetch=fetch)  # refuse bad caches before loading the model
    vocab = load_vocab(vocab_dir)
    student = Student(load_student(model_dir, vocab))
    columns = ("example_id", "lang", "input_ids", "masked_positions", "labels", "topk_ids", "topk_logits", "lognorm")
    results = []
    for cache, table in zip(opened, remap_tables(opened, vocab)):
        if cache.topk_k is None:
            raise BadInput(f"{cache.path} holds no top-k: evaluate needs a masked-LM cache (cache-teachers --topk K).")
        nll = kl = correct = teacher_correct = n = 0.0
        for rows in iter_row_batches(cache, table, batch_size, columns, max_rows):
            batch = collate_masked_lm(rows, vocab.pad_id)
            if not len(batch["labels"]):
                continue
            logp = masked_log_probs(student, batch)
            labels = batch["labels"]
            nll += float(-logp.gather(1, labels[:, None]).sum())
            correct += float((logp.argmax(-1) == labels).sum())
            teacher_correct += float((batch["topk_ids"][:, 0] == labels).sum())
            kl += float(tail_kl(logp, batch["topk_ids"], batch["topk_logits"], batch["lognorm"]).sum())
            n += len(labels)
        if n == 0:
            raise BadInput(f"{cache.path} has no masked positions to evaluate on.")
        results.append({
            "cache": str(cache.path),
            "teacher": view_of(cache).teacher,
            "masked_positions": int(n),
            "mlm_loss": nll / n,
            "perplexity": math.exp(min(50.0, nll / n)),
            "accuracy": correct / n,
            "teacher_accuracy": teacher_correct / n,
            "kl_to_teacher": kl / n,
        })
    deviation = [100 * (r["accuracy"] - r["teacher_accuracy"]) / r["teacher_accuracy"]
                 for r in results if r["teacher_accuracy"] > 0]
    result = {"model": model_dir, "per_cache": results,
              "mlm_accuracy_deviation_percent": float(np.mean(deviation)) if deviation else None}
    # An xkd student keeps what it was measured on (evaluation.json, shown in its model card).
    record_evaluation(model_dir, evaluation_key("mlm", caches, max_rows=max_rows), result)
    return result
