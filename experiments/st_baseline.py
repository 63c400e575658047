"""The baseline a user would otherwise pick: sentence-transformers' multilingual distillation
(Reimers & Gurevych 2020), trained at the budget of the experiment's xkd xd student.

    python experiments/st_baseline.py --cache CACHE --vocab VOCAB --out DIR [--teacher minilm] \
        [--steps 100] [--batch-size 16] [--lr 1e-3] [--warmup 0.1] [--normalize] [--json]

The recipe: `losses.MSELoss` pulls the student's vector of the English source AND of its
translation onto the teacher's vector of the English source, the teacher running online on
every batch. Everything else is what `xkd train-student --method xd --option target=pooled
--init-from minilm` gets, so that only the recipe differs:
- the pairs: read back from the xkd cache's `text` / `pair_text` columns (the same cleaned pairs);
- the initial student: xkd's union-vocab student from MiniLM (`student_from_teacher`), wrapped
  as a SentenceTransformer (Transformer + mean Pooling);
- the tokenization: each language through its teacher's tokenizer (`Vocab.encode`), which no
  single Hugging Face tokenizer expresses, so the loss gets pre-tokenized features. That is
  also why the loop below is our own: SentenceTransformerTrainer tokenizes text itself;
- AdamW (weight decay 0.01 on matrices), linear warm-up and decay, gradient clipping at 1.0,
  the student in train mode (dropout), 128 tokens per text, as train-student does.
What stays the recipe's own: the teacher is the full SentenceTransformer (MiniLM with its
normalisation) run online, the student has no Normalize module (the recipe's student), and the
loss is MSELoss's element-wise mean (xkd's xd sums over the 384 dimensions: same minimum).
`--normalize` gives the student sentence-transformers' Normalize module, as the teacher has and
as xd normalises the student's vector for a normalising teacher: without it, the unit-length
targets can also be approached by shrinking the student's vectors, whatever their direction.
`--teacher` (an alias or a sentence-transformers directory; default minilm, the teacher the
xkd cache was made with in the experiment) is the online teacher; when its vectors are wider
than the student's, the student gets a Dense module (linear, with bias) from its pooled vector
to the teacher's width before Normalize, as xd learns a projection then.

The trained student is saved with `save_pretrained` (config.json + weights of the encoder, the
union tokenizer, the pooling config): `xkd evaluate DIR --mode bitext --vocab VOCAB` loads it
like a train-student output (its masked-LM head, unused by bitext retrieval, starts random).
Progress goes to stderr; with --json the last stdout line is a summary (the loop's seconds, and
of them the teacher's forwards, included).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from xkd.names import resolve_teacher
from xkd.student.models import quiet_transformers
from xkd.student.runtime import linear_schedule, warmup_steps
from xkd.vocab import load_vocab, student_from_teacher

MAX_LENGTH = 128  # xd's default max_length: student tokens per text


def read_pairs(cache: Path) -> tuple[list[tuple[str, str]], str, str]:
    """The cache's (source text, translation) pairs in cache order, and the two languages.
    Every row of a `--sides src` cache is a source sentence with its translation."""
    manifest = json.loads((cache / "manifest.json").read_text())
    tables = [pq.read_table(shard, columns=["lang", "text", "pair_text"]) for shard in sorted(cache.glob("shards/*.parquet"))]
    langs = {lang for t in tables for lang in t.column("lang").to_pylist()}
    if len(langs) != 1:
        raise SystemExit(f"{cache}: rows in {sorted(langs)}; expected one source language (--sides src).")
    src_lang = langs.pop()
    tgt_lang = next(lang for lang in manifest["corpus"]["langs"] if lang != src_lang)
    pairs = [p for t in tables for p in zip(t.column("text").to_pylist(), t.column("pair_text").to_pylist())]
    return pairs, src_lang, tgt_lang


def build_student(vocab, workdir: Path, normalize: bool, width: int):
    """xkd's initial student (union vocab, rows from MiniLM) as a SentenceTransformer, its
    vectors `width` wide. The Transformer module loads from a directory, so the student is
    saved there first."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    model, tokenizer = student_from_teacher("minilm", vocab)
    model.save_pretrained(workdir)
    tokenizer.save_pretrained(workdir)
    encoder = Transformer(str(workdir))
    own = encoder.get_embedding_dimension()
    modules = [encoder, Pooling(own, "mean")]
    if width != own:  # xd's projection: a linear map, no activation
        modules.append(Dense(own, width, activation_function=torch.nn.Identity()))
    return SentenceTransformer(modules=modules + ([Normalize()] if normalize else []), device="cpu")


def features(vocab, texts: list[str], lang: str) -> dict:
    """Pre-tokenized input for the student: union ids, each language routed as in xkd."""
    enc = vocab.encode(texts, lang, max_length=MAX_LENGTH)
    return {"input_ids": torch.from_numpy(enc["input_ids"]), "attention_mask": torch.from_numpy(enc["attention_mask"])}


def batches(n: int, batch_size: int, seed: int):
    """Row indices, batch after batch: a fresh permutation each epoch (the xkd loader shuffles too)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def train(student, teacher, pairs, vocab, src_lang, tgt_lang, args, metrics) -> dict:
    """The training loop around sentence-transformers' MSELoss; returns the last step's loss and
    the seconds spent in the teacher's forwards (what an offline cache saves each run)."""
    from sentence_transformers.sentence_transformer.losses import MSELoss

    loss_fn = MSELoss(model=student)
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    # As train-student builds it (trainer.py): no decay on biases and LayerNorm weights, and
    # the fused kernel, without which AdamW over the 136k-row union embedding dominates a CPU step.
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=args.lr, fused=True)
    scheduler = linear_schedule(optimizer, warmup_steps(args.warmup, args.steps), args.steps)
    torch.manual_seed(args.seed)  # dropout masks
    student.train()
    teacher_seconds = 0.0
    for step, rows in enumerate(batches(len(pairs), args.batch_size, args.seed), start=1):
        src = [pairs[i][0] for i in rows]
        tgt = [pairs[i][1] for i in rows]
        # The recipe's teacher runs online: its vector of each English source, every step
        # (encode runs under inference_mode; the clone is an ordinary tensor the loss may keep).
        start = time.perf_counter()
        target = teacher.encode(src, batch_size=len(src), convert_to_tensor=True, show_progress_bar=False).clone()
        teacher_seconds += time.perf_counter() - start
        loss = loss_fn([features(vocab, src, src_lang), features(vocab, tgt, tgt_lang)], target)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if step % args.log_every == 0 or step == args.steps:
            record = {"step": step, "loss": round(loss.item(), 6), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
            metrics.write(json.dumps(record) + "\n")
            print(f"step {step}/{args.steps} loss {loss.item():.5f}", file=sys.stderr, flush=True)
        if step == args.steps:
            return {"loss": round(loss.item(), 6), "teacher_seconds": round(teacher_seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="an xkd cache of parallel pairs (cache-teachers --sides src)")
    parser.add_argument("--vocab", required=True, help="the union vocab the xkd students use")
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher", default="minilm", help="the online teacher: an alias or a sentence-transformers directory")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=float, default=0.1, help="a fraction of --steps below 1, or a number of steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--normalize", action="store_true", help="end the student with a Normalize module, as the teacher")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs, src_lang, tgt_lang = read_pairs(Path(args.cache))
    if len(pairs) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size}: the cache holds only {len(pairs)} pairs.")
    vocab = load_vocab(args.vocab)
    teacher = SentenceTransformer(str(resolve_teacher(args.teacher).path), device="cpu")
    # Loading the encoder without the masked-LM head it was saved with is the intent, not news.
    with tempfile.TemporaryDirectory() as init, quiet_transformers():
        student = build_student(vocab, Path(init), args.normalize, teacher.get_embedding_dimension())
    start = time.perf_counter()
    with open(out / "metrics.jsonl", "w") as metrics:
        final = train(student, teacher, pairs, vocab, src_lang, tgt_lang, args, metrics)
    seconds = time.perf_counter() - start
    with quiet_transformers():
        student.save_pretrained(str(out))
    teacher_seconds = final.pop("teacher_seconds")
    summary = {"out": str(out), "pairs": len(pairs), "steps": args.steps, "final": final, "seconds": round(seconds, 2),
               "teacher_seconds": teacher_seconds}
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
