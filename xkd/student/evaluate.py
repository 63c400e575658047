"""`xkd evaluate`: how a student does on held-out caches, and against its teachers.

Per held-out cache (one teacher each): the student's MLM loss and accuracy on the gold
labels, the teacher's accuracy (its top-1 from the cached top-k), and the KL divergence from
teacher to student over {top-k tokens, the rest} (exact given the cached log-normaliser).
`mlm_accuracy_deviation_percent` averages the student's relative deviation from each
teacher's masked-LM accuracy, 100/n Σ (P_S − P_T)/P_T (positive: the student is better). It
has RDT's form but not its meaning: MergeDistill's RDT (Eq. 3) is on downstream task scores,
which `xkd evaluate --mode classify|tag` then `xkd rdt` compute (xkd/downstream.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInput
from ..options import check_number
from ..pooling import MODES as POOLINGS, pool_tokens
from ..storage.untrusted import parse_json
from ..storage.view import view_of
from .data import _block_rows, _concat_rows, _remap_rows, _take_rows, num_rows
from .export import evaluation_key, record_evaluation, trained_sentence_head
from .methods.base import collate_masked_lm, masked_log_probs
from .models import Student, check_model_dir, init_dir
from .run import open_caches, remap_tables
from .targets import tail_kl


def load_student(model_dir: str, vocab=None):
    """A trained student, after checking that its files are whole and (given `vocab`) that
    it was trained with that vocab: otherwise transformers fails deep inside with a
    deserialisation error, a "size mismatch", or an IndexError at the first batch."""
    from transformers import AutoModelForMaskedLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise BadInput(f"{model_dir} is not a saved student (no config.json): give the --out of train-student.")
    config = check_model_dir(path, "MODEL")
    if vocab is not None:
        check_student_vocab(path, config, vocab)
    try:
        return AutoModelForMaskedLM.from_pretrained(path).eval()
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().split("\n") or [""])[0][:200]
        raise BadInput(f"MODEL {model_dir} cannot be loaded as a masked-LM student ({type(e).__name__}: {first}). "
                       "Give the --out of a finished train-student run.") from None


def check_student_vocab(path: Path, config: dict, vocab) -> None:
    """The student's vocabulary is the union `vocab`: the same size and, where the student's
    train_summary.json records it, the same union (hash)."""
    try:
        summary = parse_json((path / "train_summary.json").read_text(encoding="utf-8"))
        summary = summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        summary = {}  # a student saved by other means: its size is all there is to compare
    trained_with = summary.get("vocab")
    use = f"--vocab {trained_with}" if trained_with else "the --vocab it was trained with"
    size = config.get("vocab_size")
    if size != vocab.size:
        raise BadInput(f"{path} was trained with a union vocab of {size:,} tokens, but --vocab {vocab.path} has "
                       f"{vocab.size:,}: evaluate with {use}." if isinstance(size, int) else
                       f"{path}/config.json gives no vocab_size; --vocab {vocab.path} has {vocab.size:,} tokens.")
    if summary.get("vocab_hash") not in (None, vocab.hash):
        raise BadInput(f"{path} was trained with another union vocab of the same size ({size:,} tokens, hash "
                       f"{summary['vocab_hash']}) than --vocab {vocab.path} ({vocab.size:,} tokens, hash {vocab.hash}): "
                       f"evaluate with {use}.")


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


def read_lines(spec: str) -> tuple[list[str], str]:
    """PATH@LANG -> (lines, lang), with a clear error for a missing file or language."""
    path, sep, lang = spec.rpartition("@")
    if not sep or not path or not lang:
        raise BadInput(f"{spec!r} must be PATH@LANG, e.g. tatoeba.hin-eng.hin@hi")
    if not Path(path).is_file():
        raise BadInput(f"{path} does not exist (or is not a file).")
    from ..lines import read_lines as file_lines
    from ..names import language_code

    lang = language_code(lang, spec)
    try:
        # "\n" only: splitlines() also splits at U+2028, U+0085 and the like inside a
        # sentence, which shifted every later line against its translation.
        lines = file_lines(path)
    except UnicodeDecodeError as e:
        raise BadInput(f"{path} is not UTF-8 text ({e}).") from None
    if not lines:
        raise BadInput(f"{path} is empty: bitext evaluation needs one sentence a line, line-aligned with the other side.")
    return lines, lang




@torch.inference_mode()
def sentence_vectors(model, vocab, texts: list[str], lang: str, pooling: str = "mean", batch_size: int = 64,
                     max_length: int = 128, projection=None) -> torch.Tensor:
    """L2-normalised sentence vectors from the student's encoder, text tokenized as in
    training (routed by language through the vocab), pooled and, given `projection` (an
    nn.Linear: xd's trained head), projected."""
    student = Student(model.eval())
    out = []
    for start in range(0, len(texts), batch_size):
        enc = vocab.encode(texts[start : start + batch_size], lang, max_length=max_length)
        ids, mask = torch.from_numpy(enc["input_ids"]), torch.from_numpy(enc["attention_mask"])
        hidden = student(input_ids=ids, attention_mask=mask, masked_flat=torch.zeros(0, dtype=torch.long)).last_hidden_state
        pooled = pool_tokens(hidden.float(), mask, pooling)
        if projection is not None:
            pooled = projection(pooled)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def evaluate_bitext(model_dir: str | None, vocab_dir: str, src: str, tgt: str, init_from: str | None = None,
                    pooling: str | None = None, max_lines: int | None = None, batch_size: int = 64) -> dict:
    """Bitext retrieval (Tatoeba-style similarity search): for each sentence, is its
    translation the nearest neighbour among all candidates? Accuracy in both directions.
    `pooling` None: as the student was trained (its sentence-transformers modules: pooling,
    then a trained projection), else mean; a pooling given is applied alone."""
    from ..vocab import load_vocab, student_from_teacher

    check_number("--batch-size", batch_size, low=1)
    if max_lines is not None:
        check_number("--max-rows", max_lines, low=1)
    if pooling is not None and pooling not in POOLINGS:
        raise BadInput(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}.")
    if (model_dir is None) == (init_from is None):
        raise BadInput("give either a trained student (MODEL) or --init-from TEACHER (the student before training).")
    src_lines, src_lang = read_lines(src)  # the text first: cheap to check, and no model is loaded for nothing
    tgt_lines, tgt_lang = read_lines(tgt)
    vocab = load_vocab(vocab_dir)
    if init_from:
        check_model_dir(init_dir(init_from), "--init-from")
        model = student_from_teacher(init_from, vocab)[0]
    else:
        model = load_student(model_dir, vocab)
    if len(src_lines) != len(tgt_lines):
        raise BadInput(f"{src} has {len(src_lines)} lines but {tgt} has {len(tgt_lines)}: bitext must be line-aligned.")
    if max_lines:
        src_lines, tgt_lines = src_lines[:max_lines], tgt_lines[:max_lines]
    given, projection = pooling, None
    if pooling is None:
        trained = trained_sentence_head(model_dir) if model_dir else None
        pooling, projection = trained if trained and trained[0] in POOLINGS else ("mean", None)
    a = sentence_vectors(model, vocab, src_lines, src_lang, pooling, batch_size, projection=projection)
    b = sentence_vectors(model, vocab, tgt_lines, tgt_lang, pooling, batch_size, projection=projection)
    sim = a @ b.T
    gold = torch.arange(len(src_lines))
    result = {
        "model": model_dir or f"init:{init_from}",
        "pairs": len(src_lines),
        f"accuracy_{src_lang}_to_{tgt_lang}": float((sim.argmax(1) == gold).float().mean()),
        f"accuracy_{tgt_lang}_to_{src_lang}": float((sim.argmax(0) == gold).float().mean()),
        "pooling": pooling,
        "projection": projection is not None,
    }
    if model_dir is not None:  # an xkd student keeps what it was measured on (evaluation.json, its model card)
        key = evaluation_key("bitext", [src, tgt], pooling=given, max_rows=max_lines)
        record_evaluation(model_dir, key, result)
    return result
