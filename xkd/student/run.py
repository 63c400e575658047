"""train-student: caches + vocab + method -> a trained Hugging Face student."""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

from ..durable import atomic_write_bytes, fsync_dir
from ..errors import BadInput, XkdError
from ..options import check_number, config_yaml, resume_record
from ..storage import open_cache
from ..storage.manifest import DirLock
from ..storage.remote import absolute, is_url
from . import export
from .data import StreamConfig, StreamingDataset
from .methods import method_config, prepare
from .options import DEFAULT_ALPHA, TrainStudentOptions
from .runtime import amp_dtype, check_device, distributed_context, seed_everything
from .trainer import Trainer

# What train-student writes in --out besides the student's own files; --overwrite removes these.
CONFIG_FILE = "config.yaml"
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "losses.png", "tensorboard", "train_summary.json", CONFIG_FILE)
# What a run has written in --out before its first checkpoint (with checkpoints/ holding no
# step-*): nothing to resume from and nothing to lose, so such an --out starts again at step 0.
BEFORE_FIRST_CHECKPOINT = ("checkpoints", "metrics.jsonl", "tensorboard", CONFIG_FILE)
# The lock of a run on its --out: one run per --out (docs/reliability.md, "One run, one output").
OUT_LOCK = ".lock"


def open_caches(paths, allow_incomplete: bool = False, warn=None, fetch=None) -> list:
    """Open caches to learn from or evaluate on. An incomplete one (a cache-teachers run not
    finished) is refused unless `allow_incomplete`; then `warn` is told what is missing.
    `fetch`: the local fetch cache (storage.fetch.FetchCache) of caches given as URLs."""
    if not paths:
        raise BadInput("--caches: give at least one cache directory (made by `xkd cache-teachers`).")
    opened = [open_cache(p, fetch=fetch) for p in paths]
    for cache in opened:
        if not allow_incomplete:
            cache.require_complete()
        elif not cache.complete:
            (warn or (lambda msg: sys.stderr.write(msg + "\n")))(
                f"xkd: warning: {cache.incomplete_message()} Using only {cache.finished_shards()} (--allow-incomplete).")
    return opened


def check_mixing_options(caches, alpha: float | None, copies: str | None) -> None:
    """--alpha weighs languages against each other and --copies chooses among several teachers'
    copies of one example (one corpus, one side: data._scan): given for caches with one language,
    or with no two caches of one corpus and side, they would change nothing."""
    from ..storage import view_of

    views = [view_of(c) for c in caches]
    languages = {lang for v in views for lang in v.languages}
    if alpha is not None and len(languages) == 1 and all(v.languages for v in views):
        raise BadInput(f"--alpha {alpha:g} weighs languages against each other, and the caches hold one language "
                       f"({languages.pop()}): it changes nothing. Leave --alpha out, or add caches of other languages.")
    keys = [(v.corpus, side) for v in views for side in set(v.sides)]
    if copies is not None and len(keys) == len(set(keys)):
        raise BadInput(f"--copies {copies} chooses among several teachers' copies of one example, and no two of the "
                       f"{len(views)} cache(s) given hold the same corpus and side ({', '.join(str(v.path) for v in views)}): "
                       "it changes nothing. Leave --copies out, or add another teacher's cache of the same corpus.")


def check_batch_size(batch_size: int, caches) -> None:
    """A batch holds at most the rows the caches hold: a larger one repeats rows within the
    batch, and one of 100000 on 120 rows died in the allocator. The rows are counted from
    the manifests, each shard's checked against its Parquet footer (Cache.parquet_file)."""
    for cache in caches:
        for shard_id in cache.shard_ids:
            cache.parquet_file(shard_id)
    rows = sum(len(c) for c in caches)
    if rows and batch_size > rows:  # no rows at all: the loader says so, naming the caches
        held = ", ".join(f"{c.path}: {len(c):,}" for c in caches[:4]) + (", ..." if len(caches) > 4 else "")
        raise BadInput(f"--batch-size {batch_size:,}: the caches hold {rows:,} rows in all ({held}), and a batch cannot "
                       f"hold more rows than the corpus: each would repeat about {batch_size // max(rows, 1):,} times. "
                       f"Give at most {rows:,}. Nothing was trained.")


def incomplete_summary(caches) -> dict:
    """What the summary JSON says of caches used although incomplete."""
    return {str(c.path): {k: c.completeness[k] for k in ("planned_shards", "missing_shards", "missing_rows")}
            for c in caches if not c.complete}


def remap_tables(caches, vocab, columns=None) -> list:
    """Each cache's teacher->student table from the vocab (an error names a teacher the vocab
    does not cover); None for a cache already materialised in this vocab (`xkd remap`), and
    for every cache when the loader reads no teacher ids (`columns` without input_ids, labels
    or top-k: xd and multikd read text and teacher outputs only). Such methods train a
    student whose vocabulary is its own (mBERT's, say) from caches of teachers of any family,
    as in MultiKD (Yang et al. 2022), where RoBERTa-family teachers train an mBERT student."""
    from ..vocab import needs_remap
    from ..vocab.vocabdir import ID_COLUMNS

    if columns is not None and not set(columns) & set(ID_COLUMNS):
        return [None] * len(caches)
    return [vocab.map_for(c.manifest) if needs_remap(c.manifest, vocab) else None for c in caches]


def train_student(opts: TrainStudentOptions, fetch=None) -> dict:
    """Train a student as `opts` says (the options were checked when it was made); `fetch`:
    the local fetch cache for caches given as URLs."""
    if opts.vocab is None or opts.out is None:
        raise BadInput("give --vocab and --out (the command line supplies them from the workspace).")
    method, caches, out = opts.method, list(opts.caches), opts.out
    alpha = DEFAULT_ALPHA if opts.alpha is None else opts.alpha
    copies = "all" if opts.copies is None else opts.copies
    student = opts.student_config()
    check_device(opts.device)
    amp_dtype(opts.amp, opts.device)  # an --amp that cannot apply on this device is refused, not dropped
    check_out(out, caches, opts.vocab, resume=opts.resume, overwrite=opts.overwrite, init_from=opts.init_from)
    config = method_config(method, opts.method_options)  # bad options fail before anything is opened
    rank, world = distributed_context()
    check_steps(opts, world)
    # Only now, when the options are sound: the lock (taken before --overwrite clears anything)
    # is held until the student is saved, and released if anything below fails.
    claim, start = claim_out(Path(out), resume=opts.resume, overwrite=opts.overwrite, rank=rank, world=world)
    try:
        opened, vocab = open_inputs(opts, rank, fetch)
        seed_everything(opts.seed)
        prepared = prepare(method, config, opened, vocab, student=student, init_from=opts.init_from,
                           init_teacher=opts.init_teacher, total_steps=opts.steps)
        model, impl, plan = prepared.model, prepared.method, prepared.plan
        tables = remap_tables(opened, vocab, plan.columns)
        check_batch_size(opts.batch_size, opened)  # after the method's own checks of the caches, before any batch
        dataset = StreamingDataset(
            opened,
            StreamConfig(
                batch_size=opts.batch_size, seed=opts.seed, alpha=alpha, copies=copies,
                columns=plan.columns, dense=plan.dense, mix=plan.mix, world_size=world, rank=rank,
            ),
            remap_tables=tables,
            collate=impl.collate,
        )
        out_dir = Path(out)
        base = summary_inputs(out_dir, method, opened, vocab, dataset.probs, opts.allow_incomplete)
        resolved = replace(opts, method_options=asdict(config))
        run = run_config(resolved, opened, vocab, alpha=alpha, copies=copies, world=world)
        trainer = Trainer(model, impl, dataset, opts, device=opts.device, rank=rank, world=world, run=run, summary=base)
        if start == "resume":
            trainer.resume()
        elif start == "replace" and rank == 0:
            clear_run_outputs(out_dir)  # only now: a run refused above leaves the old one whole
        if rank == 0:  # the resolved options, replayable with --config (rewritten on resume: FREE options may change)
            atomic_write_bytes(out_dir / CONFIG_FILE, config_yaml(resolved, "train-student"))
        summary = trainer.train()
        if rank == 0:
            save_trained_student(out_dir, model, impl, opened, vocab, opts.init_from)
        # Last, so that a complete summary means a complete student; the card then tells its numbers.
        result = trainer.write_summary(summary.pop("final"), student_on_disk=True, **summary)
        if rank == 0:
            export.write_model_card(out_dir)
        return result
    finally:
        claim.release()


def open_inputs(opts: TrainStudentOptions, rank: int, fetch) -> tuple[list, object]:
    """The caches (only rank 0 warns of incomplete ones) and the vocab, opened and checked:
    the mixing options against the caches, and the vocab whole."""
    from ..vocab import load_vocab

    opened = open_caches(list(opts.caches), opts.allow_incomplete, warn=None if rank == 0 else (lambda msg: None), fetch=fetch)
    check_mixing_options(opened, opts.alpha, opts.copies)
    vocab = load_vocab(opts.vocab)
    vocab.check_whole()  # a damaged vocab would fail only at the save, after every step
    return opened, vocab


def check_steps(opts: TrainStudentOptions, world: int) -> None:
    """--steps must leave the rows the loader serves countable in 64 bits."""
    check_number("--steps", opts.steps, low=1, high=(2**63 - 1) // (opts.batch_size * opts.grad_accum * world), whole=True,
                 hint=f"the loader counts the rows it serves, --steps x --grad-accum x --batch-size x {world} process(es), "
                      "in 64-bit integers")


def summary_inputs(out_dir: Path, method: str, opened, vocab, languages: dict, allow_incomplete: bool) -> dict:
    """What the run's summary says of its inputs: where it writes, the method, caches and vocab,
    the languages' sampling probabilities, and the caches used although incomplete."""
    return {
        "out": str(out_dir),
        "method": method,
        "caches": [str(c.path) for c in opened],
        # evaluate checks a student against the vocab it was trained with, and names it
        "vocab": str(vocab.path.resolve()),
        "vocab_hash": vocab.hash,
        "languages": languages,
        **({"incomplete_caches": incomplete_summary(opened)} if allow_incomplete else {}),
    }


def save_trained_student(out_dir: Path, model, impl, opened, vocab, init_from: str | None) -> None:
    """The trained student's files in --out (rank 0): weights and config with the teachers' class
    names, its tokenizer, and the extras beside them."""
    from ..vocab import StudentTokenizer

    export.name_classes(model, impl, opened)  # the teachers' class names, not LABEL_0, in config.json
    # Routes each language as training did; AutoTokenizer gets the default route's (docs/vocab.md).
    save_student(model, StudentTokenizer.from_vocab(vocab, model.config), out_dir)
    # sentence-transformers files, xkd_student.json and the model card (docs/students.md)
    export.write_student_extras(out_dir, impl, model, opened, init_from=init_from, vocab=vocab)


def check_out(out: str, caches: list[str], vocab_dir: str, *, resume: bool, overwrite: bool,
              init_from: str | None = None) -> None:
    """--out, before anything is read: not an input (a cache, the vocab, the --init-from
    directory), inside one or holding one (a student written there would mix with what it
    learns from, and --overwrite would remove it), a directory that can be made and written,
    and not someone else's results unless --resume or --overwrite says what to do with them."""
    path = Path(out)
    if resume and overwrite:
        raise BadInput("--resume continues the run in --out and --overwrite replaces it: give one of them.")
    resolved = path.resolve()
    inputs = [*(("cache", "--caches", given) for given in caches), ("vocab", "--vocab", vocab_dir)]
    if init_from is not None and Path(init_from).is_dir():  # else a teacher's name, not a directory here
        inputs.append(("checkpoint", "--init-from", init_from))
    for what, option, given in inputs:
        if is_url(given):  # on object storage: no local --out can be it or lie inside it
            continue
        input_dir = Path(given).resolve()
        where = ("is" if resolved == input_dir else "is inside" if input_dir in resolved.parents
                 else "holds" if resolved in input_dir.parents else None)
        if where:
            raise BadInput(f"--out {out} {where} the {what} given with {option} {given}: the student would be written "
                           "among what it learns from (and --overwrite would remove or replace it). Give another --out "
                           "(e.g. students/NAME).")
    for parent in (resolved, *resolved.parents):
        if (parent / "manifest.json").is_file():
            raise BadInput(f"--out {out} is {'a' if parent == resolved else 'inside the'} cache directory {parent} "
                           "(it holds manifest.json): a student written there would mix with the cache. Give another "
                           "--out (e.g. students/NAME).")
    existing = next(p for p in (path, *path.parents, Path(".")) if p.exists() or p == Path("."))
    if not existing.is_dir():
        where = "is a file" if existing == path else f"is under {existing}, a file"
        raise BadInput(f"--out {out} {where}: give a directory (it is made if missing).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: {existing} is not writable by this user (permissions or a read-only file "
                       "system). Give a directory you can write to.")
    if resume and not path.is_dir():
        raise BadInput(f"--resume: {out} does not exist, so there is no run to continue; start without --resume.")


class OutClaim:
    """A run's hold on its --out: the lock (rank 0's), and whether this run made the directory
    (then it is removed again if the run leaves it empty, refused before writing anything)."""

    def __init__(self, out: Path, lock: DirLock | None, made: bool):
        self.out, self.lock, self.made = out, lock, made

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
        if self.made:
            try:
                self.out.rmdir()  # only when empty
            except OSError:
                pass


def lock_out(out: Path) -> DirLock:
    return DirLock(out / OUT_LOCK, lambda holder: (
        f"--out {out} is being written by another train-student run ({holder}). Two runs into one --out would "
        "overwrite each other's checkpoints and student, and one would be lost: wait for that run to finish (or "
        "stop it, then continue it with --resume), or give another --out."), remove=True)


def claim_out(out: Path, *, resume: bool, overwrite: bool, rank: int, world: int) -> tuple[OutClaim, str]:
    """Lock --out for this run, then decide from what it holds how the run starts: "resume",
    "fresh" or "replace" (remove the previous run's outputs first). The lock comes first, so
    that a second run is refused naming the first, and --overwrite clears nothing another run
    is writing. Under torchrun rank 0 alone locks and decides; every rank learns its decision,
    or its refusal, and raises the same error (ranks left waiting would hang)."""
    claim, start, refusal = OutClaim(out, None, False), None, None
    if rank == 0:
        try:
            claim.made = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            claim.lock = lock_out(out).acquire()
            start = out_start(out, resume=resume, overwrite=overwrite)
        except (XkdError, OSError) as e:  # an OSError too: the other ranks must not wait for rank 0
            claim.release()
            refusal = e
    if world > 1:
        import torch.distributed as dist

        shared = [start, refusal]
        dist.broadcast_object_list(shared, src=0)
        start, refusal = shared
    if refusal is not None:
        raise refusal
    return claim, start


def out_start(out: Path, *, resume: bool, overwrite: bool) -> str:
    """How a run starts in `out` (locked by it), or a refusal when that would lose a run."""
    entries = sorted(p.name for p in out.iterdir() if p.name != OUT_LOCK)
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    has_checkpoint = any((out / "checkpoints").glob("step-*"))
    # A run killed before its first checkpoint leaves these (and an atomic write's temporary file).
    before_first = not has_checkpoint and all(
        name in BEFORE_FIRST_CHECKPOINT or name.startswith(".metrics.jsonl.tmp-") for name in entries)
    say = lambda msg: sys.stderr.write(f"xkd train-student: {msg}\n")  # noqa: E731
    if resume:
        if has_checkpoint:
            return "resume"
        if entries and before_first:
            say(f"--resume: {out} holds no checkpoint, only what a run stopped before its first one wrote ({shown}); "
                "starting from step 0.")
            return "replace"
        if entries:
            raise BadInput(f"--resume: {out} holds no checkpoint (no {out / 'checkpoints'}/step-*) to resume from, but "
                           f"it holds {shown}: give --overwrite instead to replace it (its checkpoints and metrics are "
                           "removed), or another --out.")
        raise BadInput(f"--resume: {out} is empty, so there is no run to continue; start without --resume.")
    if not entries:
        return "fresh"
    if overwrite:
        return "replace"
    if before_first:
        say(f"{out} holds only what a run stopped before its first checkpoint wrote ({shown}); starting again from "
            "step 0.")
        return "replace"
    raise BadInput(f"--out {out} is not empty (it holds {shown}): give --resume to continue the run there, "
                   "--overwrite to replace it (its checkpoints and metrics are removed), or another --out.")


def clear_run_outputs(out: Path) -> None:
    """--overwrite: remove the previous run's checkpoints and metrics (never other files), so
    that a later --resume cannot pick up a checkpoint of the old run."""
    for name in RUN_OUTPUTS:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def run_config(opts: TrainStudentOptions, opened, vocab, *, alpha, copies, world) -> dict:
    """What a checkpoint records of the run, keyed by option: resume refuses a checkpoint whose
    options differ (those declared FREE may change). Caches and the vocab are compared by
    identity (cache key and shards; vocab size and hash), not by path, so that moved
    directories still resume; their paths are kept for the message. `opts.method_options`
    is the method's resolved config."""
    init_from = opts.init_from
    if init_from and Path(init_from).exists():
        init_from = str(Path(init_from).resolve())
    recorded = resume_record(opts)
    if opts.architecture == "bert":  # the default, left out so that checkpoints from before the option resume
        del recorded["--architecture"]
    options = {
        "--method": opts.method,
        **{f"--option {k}": v for k, v in opts.method_options.items()},
        "--caches": [f"{(c.manifest.get('teacher') or {}).get('name')} (key {c.manifest.get('key') or absolute(c.path)}, "
                     f"{len(c.shard_ids)} shards)" for c in opened],
        "--vocab": f"{vocab.size} tokens (hash {vocab.hash})",
        **recorded,
        "--init-from": init_from,
        "--alpha": alpha,
        "--copies": copies,
        "processes (torchrun)": world,
    }
    return {"options": options,
            "paths": {"--vocab": str(vocab.path.resolve()), "--caches": [absolute(c.path) for c in opened]}}


def save_student(model, tokenizer, out: Path) -> None:
    """The student in Hugging Face format. Written in a temporary directory, each file fsynced
    and renamed into --out: a failure (a full disk) leaves the previous student's files whole."""
    tmp = out / ".student.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        # safetensors reports a failed write as SafetensorError("... (os error 28)"): an OSError
        # for what it is, so that the CLI says "disk full" instead of printing a traceback.
        found = None if isinstance(e, OSError) else re.search(r"os error (\d+)", str(e))
        if found:
            raise OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(out)) from None
        raise
    from ..vocab.student_tokenizer import TOKENIZERS

    stale_routes = not (tmp / TOKENIZERS).exists() and (out / TOKENIZERS).is_dir()
    for file in sorted(tmp.iterdir()):
        if file.is_dir():  # tokenizers/ of a multi-route student: swapped whole, the old one removed after
            for inner in sorted(file.rglob("*")):
                if inner.is_file():
                    with open(inner, "rb") as f:
                        os.fsync(f.fileno())
            old = out / f".{file.name}.old"
            if old.exists():
                shutil.rmtree(old)
            if (out / file.name).exists():
                os.replace(out / file.name, old)
            os.replace(file, out / file.name)
            shutil.rmtree(old, ignore_errors=True)
            continue
        with open(file, "rb") as f:
            os.fsync(f.fileno())
        os.replace(file, out / file.name)
    if stale_routes:
        shutil.rmtree(out / TOKENIZERS)  # an earlier student's routes: this tokenizer routes to one teacher
    fsync_dir(out)
    tmp.rmdir()
