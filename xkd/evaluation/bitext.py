"""`xkd evaluate --mode bitext`: bitext retrieval (Tatoeba-style similarity search) with a
student's sentence vectors, pooled and projected as it was trained, in both directions."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BadInput
from ..options import check_number
from ..pooling import MODES as POOLINGS, pool_tokens
from ..student.export import evaluation_key, record_evaluation, trained_sentence_head
from ..student.models import Student, check_model_dir, init_dir
from .students import load_student, student_and_vocab


def run(values: dict) -> tuple[dict, str]:
    """The mode as `xkd evaluate` runs it: evaluate's parsed options -> (result, its line)."""
    model, vocab = student_and_vocab(values)
    if not values["src"] or not values["tgt"]:
        raise BadInput("--mode bitext needs --src PATH@LANG and --tgt PATH@LANG.")
    result = evaluate_bitext(model, vocab, values["src"], values["tgt"], values["init_from"], values["pooling"],
                             values["max_rows"], batch_size=values["batch_size"])
    text = "  ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("accuracy")) + f"  ({result['pairs']} pairs)"
    return result, text


def read_lines(spec: str, option: str) -> tuple[list[str], str]:
    """PATH@LANG (given as `option`) -> (lines, lang), with a clear error for a missing file or language."""
    from ..names import language_code
    from ..readers import text_lines

    path, sep, lang = spec.rpartition("@")
    if not sep or not path or not lang:
        raise BadInput(f"{option} {spec!r} must be PATH@LANG, e.g. tatoeba.hin-eng.hin@hi")
    if not Path(path).is_file():  # before the language: the path is the likelier slip
        raise BadInput(f"{option} {path} does not exist (or is not a file).")
    lang = language_code(lang, spec)
    # Split as the other side is: a line split apart would shift every later line against its translation.
    return text_lines(path, option, "Bitext evaluation needs one sentence a line, line-aligned with the other side."), lang


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
    src_lines, src_lang = read_lines(src, "--src")  # the text first: cheap to check, and no model is loaded for nothing
    tgt_lines, tgt_lang = read_lines(tgt, "--tgt")
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
