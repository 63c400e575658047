"""train-student's options: one declaration per flag (see xkd/options.py for what a
declaration gives). Light on purpose: the CLI imports it to build its parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BadInput
from ..families import STUDENT_ARCHITECTURES
from ..options import FREE, SAME, check_memory, check_options, machine_memory, option, size_in_words

AMP = ("auto", "off", "bf16", "fp16")
COPIES = ("all", "best")
DEFAULT_ALPHA = 0.7
WORKER_BYTES = 100 * 10**6  # the least a DataLoader worker process takes (it imports torch: ~300 MB here)
# The options that shape a random student (StudentConfig checks their values).
STUDENT_SHAPE = ("hidden", "layers", "heads", "embedding_dim", "dropout", "architecture")


@dataclass(frozen=True)
class TrainStudentOptions:
    """What `xkd train-student` takes. resume=SAME: a resumed run must give the same value;
    FREE: it may change (how the run is carried out, not what it computes)."""

    method: str = option(None, "--method", required=True, help="Distillation method (see `xkd methods`).")
    caches: tuple[str, ...] = option((), "--caches", help="Caches to learn from, directories or URLs (s3://...): several "
                                     "after one --caches, globs, or repeat it (default: the workspace caches the method can "
                                     "use, unless two corpora feed one teacher's language).")
    vocab: str | None = option(None, "--vocab", help="Vocab dir from `xkd build-vocab` over the caches' teachers (default: "
                               "the workspace vocab covering them, built if missing).")
    out: str | None = option(None, "--out", replay=False, help="Output dir: the student (HF format), checkpoints, metrics. "
                             "New or empty, unless --resume or --overwrite (default: the workspace's students/<method>-NNN).")
    steps: int = option(1000, "--steps", low=1, whole=True, resume=SAME, help="Optimiser steps.")
    batch_size: int = option(32, "--batch-size", low=1, whole=True, resume=SAME, help="Examples per batch (per rank).")
    grad_accum: int = option(1, "--grad-accum", low=1, whole=True, resume=SAME, help="Batches per optimiser step.")
    lr: float = option(5e-4, "--lr", low=0, hint="the peak learning rate, e.g. 5e-4", resume=SAME,
                       help="Peak learning rate.")
    warmup: float = option(0.1, "--warmup", low=0, hint="a fraction of --steps below 1, or a number of steps", resume=SAME,
                           help="Warm-up: a fraction of --steps (<1) or a step count.")
    weight_decay: float = option(0.01, "--weight-decay", low=0, hint="e.g. 0.01", resume=SAME, help="AdamW weight decay.")
    clip: float = option(1.0, "--clip", low=0, hint="0 turns clipping off", resume=SAME,
                         help="Gradient-norm clipping (0: off).")
    # numpy seeds its legacy generator from 32 bits, and the loader's plan seeds from non-negative ints
    seed: int = option(0, "--seed", low=0, high=2**32 - 1, whole=True, resume=SAME, help="Seed of weights, data order "
                       "and dropout.")
    save_every: int = option(0, "--save-every", low=0, whole=True, hint="0: only at the end", resume=FREE,
                             help="Checkpoint every N steps (0: only at the end).")
    log_every: int = option(10, "--log-every", low=1, whole=True, resume=FREE, help="Steps between metric lines.")
    amp: str = option("auto", "--amp", choices=AMP, resume=SAME, help="auto | off | bf16 | fp16 (auto: autocast on CUDA "
                      "only).")
    workers: int = option(0, "--workers", low=0, whole=True, resume=FREE,
                          hint="DataLoader worker processes; 0: load in the training process",
                          help="DataLoader worker processes.")
    resume: bool = option(False, "--resume", replay=False, help="Continue from the latest checkpoint in --out, made with "
                          "the same options (only those marked 'may change on --resume' may differ).")
    overwrite: bool = option(False, "--overwrite", replay=False, help="Replace the run in a non-empty --out: its "
                             "checkpoints and metrics are removed first.")
    keep_checkpoints: int = option(2, "--keep-checkpoints", low=1, whole=True, resume=FREE,
                                   help="Keep the newest N checkpoints (resume falls back past a damaged one).")
    stop_after: int = option(0, "--stop-after", low=0, whole=True, hint="0: run to --steps", resume=FREE, replay=False,
                             help="Leave after N steps of this run, with a checkpoint (time-limited jobs; continue with "
                             "--resume).")
    # None: not given, so a cache set that cannot use it (one language, one cache per corpus) is no error
    alpha: float | None = option(None, "--alpha", low=0, high=1, resume=SAME,
                                 hint="q_l ∝ p_l^alpha: 1 samples languages by size, 0 uniformly",
                                 help=f"Language smoothing: sample language l with q ∝ p_l^alpha (default {DEFAULT_ALPHA}).")
    copies: str | None = option(None, "--copies", choices=COPIES, resume=SAME, help="Several teachers per example: all "
                                "(default) | best (lowest teacher loss).")
    hidden: int = option(256, "--hidden", resume=SAME, help="Student hidden size.")
    layers: int = option(4, "--layers", resume=SAME, help="Student layers.")
    heads: int = option(4, "--heads", resume=SAME, help="Student attention heads.")
    embedding_dim: int = option(0, "--embedding-dim", resume=SAME, help="Reduced embedding size (0: = --hidden).")
    dropout: float = option(0.1, "--dropout", resume=SAME, help="Student dropout.")
    architecture: str = option("bert", "--architecture", resume=SAME, help=f"Random student: {' | '.join(STUDENT_ARCHITECTURES)} "
                               "(xlm-roberta: positions from the union's pad id, one token type). --init-from keeps the "
                               "checkpoint's.")
    init_from: str | None = option(None, "--init-from", resume=SAME, help="Start from this checkpoint (teacher alias or dir) "
                                   "through the union-vocab embedding initialisation.")
    init_teacher: str | None = option(None, "--init-teacher", resume=SAME, help="Which vocab teacher --init-from is "
                                      "(default: the same name).")
    method_options: dict = option({}, "--option", "-o", typed_as=list[str], parse=lambda items, flag: key_values(items),
                                  help="The method's own options, KEY=VALUE (repeatable; `xkd methods` lists them, e.g. "
                                  "-o lambda_start=0.9 -o temperature=2).")
    device: str | None = option(None, "--device", resume=FREE, help="cpu | cuda (default: cuda if available).")
    allow_incomplete: bool = option(False, "--allow-incomplete", help="Use caches whose cache-teachers run has not finished "
                                    "(only their finished shards); says what is missing.")
    cache_dir: str | None = option(None, "--cache-dir", help="Caches given as URLs (s3://...): where their fetched bytes "
                                   "are kept (default: $XDG_CACHE_HOME/xkd/remote, else ~/.cache/xkd/remote).")
    cache_size: str = option("20G", "--cache-size", help="Caches given as URLs: the most --cache-dir holds (e.g. 500M, 20G); "
                             "the least recently used bytes go first.")

    def __post_init__(self):
        object.__setattr__(self, "caches", tuple(str(c) for c in self.caches))
        check_options(self)
        # Warm-up is a fraction below 1 or a number of steps; more steps than the run has would
        # keep the learning rate below --lr to the end (1e30 trained the whole run at about 0).
        if self.warmup >= 1 and self.warmup > self.steps:
            raise BadInput(f"--warmup {self.warmup:g} steps is more than --steps {self.steps}: the learning rate would "
                           f"never reach --lr. Give at most {self.steps} steps, or a fraction of --steps below 1 "
                           "(e.g. 0.1).")
        # Each DataLoader worker is a process that imports torch and holds its own shuffle window
        check_memory("--workers", self.workers, self.workers * WORKER_BYTES,
                     f"{self.workers:,} DataLoader worker processes of at least {size_in_words(WORKER_BYTES)} each",
                     largest=machine_memory() // WORKER_BYTES)

    def student_config(self):
        """The random student's shape (models.StudentConfig checks it)."""
        from .models import StudentConfig

        return StudentConfig(**{name: getattr(self, name) for name in STUDENT_SHAPE})


def key_values(items) -> dict:
    """["k=v", ...] -> {k: v}: --option pairs, parsed into the method's Config later."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--option {item!r} must be KEY=VALUE, e.g. --option xwcl=false")
        key = key.strip().replace("-", "_")
        if key in out:
            raise BadInput(f"--option {key} is given twice ({out[key]!r} and {value!r}); give it once.")
        out[key] = value
    return out


