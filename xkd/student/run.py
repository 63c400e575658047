"""train-student: caches + vocab + method -> a trained Hugging Face student."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadInput
from ..storage import open_cache
from .data import StreamConfig, StreamingDataset
from .methods import method_config, prepare
from .models import StudentConfig
from .trainer import Trainer, TrainConfig, distributed_context, seed_everything


def open_caches(paths) -> list:
    if not paths:
        raise BadInput("--caches: give at least one cache directory (made by `xkd cache-teachers`).")
    return [open_cache(p) for p in paths]


def remap_tables(caches, vocab) -> list:
    """Each cache's teacher->student table from the vocab (an error names a teacher the vocab
    does not cover); None for a cache already materialised in this vocab (`xkd remap`)."""
    from ..vocab import needs_remap

    return [vocab.map_for(c.manifest) if needs_remap(c.manifest, vocab) else None for c in caches]


def train_student(
    *,
    method: str,
    caches: list[str],
    vocab_dir: str,
    out: str,
    train: TrainConfig,
    batch_size: int,
    student: StudentConfig = StudentConfig(),
    init_from: str | None = None,
    init_teacher: str | None = None,
    alpha: float = 0.7,
    copies: str = "all",
    method_options: dict | None = None,
    resume: bool = False,
    device: str | None = None,
) -> dict:
    from ..vocab import load_vocab

    config = method_config(method, method_options or {})  # bad options fail before anything is opened
    rank, world = distributed_context()
    opened = open_caches(caches)
    vocab = load_vocab(vocab_dir)
    seed_everything(train.seed)
    prepared = prepare(method, config, opened, vocab, student=student, init_from=init_from,
                       init_teacher=init_teacher, total_steps=train.steps)
    model, impl, plan = prepared.model, prepared.method, prepared.plan
    tables = remap_tables(opened, vocab)
    dataset = StreamingDataset(
        opened,
        StreamConfig(
            batch_size=batch_size, seed=train.seed, alpha=alpha, copies=copies,
            columns=plan.columns, dense=plan.dense, mix=plan.mix, world_size=world, rank=rank,
        ),
        remap_tables=tables,
        collate=impl.collate,
    )
    trainer = Trainer(model, impl, dataset, train, device=device, rank=rank, world=world)
    if resume:
        trainer.resume()
    summary = trainer.train()
    out_dir = Path(out)
    result = {
        "out": str(out_dir),
        "method": method,
        "caches": [str(c.path) for c in opened],
        "languages": dataset.probs,
        **summary,
    }
    if rank == 0:
        model.save_pretrained(out_dir)
        vocab.student_tokenizer().save_pretrained(out_dir)
        (out_dir / "train_summary.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result
