"""train-student: caches + vocab + method -> a trained Hugging Face student."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import BadInput
from ..storage import open_cache
from .data import StreamConfig, StreamingDataset
from .methods import get_method
from .models import StudentConfig, build_student
from .trainer import Trainer, TrainConfig, distributed_context, seed_everything


def open_caches(paths) -> list:
    if not paths:
        raise BadInput("--caches: give at least one cache directory (made by `xkd cache-teachers`).")
    return [open_cache(p) for p in paths]


def teacher_name(cache) -> str:
    return cache.manifest["teacher"]["name"]


def remap_tables(caches, vocab) -> list:
    """Each cache's teacher->student table from the vocab, with an error naming the teacher
    a vocab does not cover."""
    return [vocab.map_for(c.manifest) for c in caches]


def make_student(vocab, student: StudentConfig, init_from: str | None, teacher_for_init: str | None):
    if init_from:
        from ..vocab import student_from_teacher

        model, _ = student_from_teacher(init_from, vocab, teacher_for_init)
        return model
    return build_student(student, len(vocab.tokens), vocab.pad_id)


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

    rank, world = distributed_context()
    method_cls = get_method(method)
    opened = open_caches(caches)
    method_cls.check_caches(opened)
    vocab = load_vocab(vocab_dir)
    tables = remap_tables(opened, vocab)
    seed_everything(train.seed)
    model = make_student(vocab, student, init_from, init_teacher)
    impl = method_cls(dict(method_options or {}), vocab=vocab, total_steps=train.steps)
    impl.setup(model, opened)
    dataset = StreamingDataset(
        opened,
        StreamConfig(
            batch_size=batch_size, seed=train.seed, alpha=alpha, copies=copies,
            columns=impl.columns, dense=impl.dense, world_size=world, rank=rank,
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
