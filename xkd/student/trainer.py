"""The training loop: knows optimisers, checkpoints and devices, and nothing of any method.

Exact resume: a checkpoint holds the model, the method's heads, optimiser, scheduler, every
RNG, and the loader's position (a tiny dict, see data.py). Restoring them all makes the
remaining steps see the same batches, dropout masks and learning rates, so a stopped and
resumed run ends with the same weights as an uninterrupted one.

A checkpoint also records the run's configuration (`run`: the options that shape the
result), and resume refuses another one: restoring a checkpoint under other options silently
kept the old schedule and method. Checkpoints are written atomically (temporary directory,
fsync, rename), the last `keep_checkpoints` are kept, and a damaged one is skipped on resume.
Next to each, train_summary.json says how far the run got (partial until it finishes), and
losses.png draws the loss terms logged so far in metrics.jsonl.

Several processes (torchrun, DDP): rank r trains on batches r, r + world, ... and DDP
averages the gradients of the student AND the method's heads (wrapped together as one
module), so a step equals one process accumulating the world's batches (--grad-accum). On
CUDA each rank trains on its own GPU, cuda:LOCAL_RANK.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import BadInput, XkdError
from ..options import check_memory, check_number, machine_memory, size_in_words
from ..storage.manifest import atomic_write_bytes, fsync_dir
from ..storage.untrusted import POLICY, parse_json, refuse_links, remove_tree
from .models import Student

WHOLE_TRAIN_OPTIONS = ("--steps", "--grad-accum", "--save-every", "--log-every", "--workers", "--stop-after",
                       "--keep-checkpoints")
WORKER_BYTES = 100 * 10**6  # the least a DataLoader worker process takes (it imports torch: ~300 MB here)


@dataclass
class TrainConfig:
    out: str
    steps: int
    lr: float = 5e-4
    warmup: float = 0.1  # fraction of steps (< 1) or a number of steps
    weight_decay: float = 0.01
    grad_accum: int = 1
    clip: float = 1.0
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    log_every: int = 10
    seed: int = 0
    amp: str = "auto"  # auto: bf16/fp16 autocast on CUDA, off on CPU | off | bf16 | fp16
    num_workers: int = 0
    stop_after: int = 0  # leave (with a checkpoint) after this many steps in this run; 0: run to --steps
    keep_checkpoints: int = 2  # the newest N checkpoints are kept (more than one: resume falls back past a damaged one)

    def __post_init__(self):
        # Every value a user can type, checked before anything is read: NaN and infinities
        # used to pass and train to a NaN loss that exited 0.
        for option, value, low, hint in (
            ("--steps", self.steps, 1, ""), ("--grad-accum", self.grad_accum, 1, ""),
            ("--lr", self.lr, 0, "the peak learning rate, e.g. 5e-4"),
            ("--warmup", self.warmup, 0, "a fraction of --steps below 1, or a number of steps"),
            ("--weight-decay", self.weight_decay, 0, "e.g. 0.01"), ("--clip", self.clip, 0, "0 turns clipping off"),
            ("--save-every", self.save_every, 0, "0: only at the end"), ("--log-every", self.log_every, 1, ""),
            ("--workers", self.num_workers, 0, "DataLoader worker processes; 0: load in the training process"),
            ("--stop-after", self.stop_after, 0, "0: run to --steps"), ("--keep-checkpoints", self.keep_checkpoints, 1, ""),
        ):
            # Counts are whole numbers: a float such as 1e22 steps used to pass
            check_number(option, value, low=low, hint=hint, whole=option in WHOLE_TRAIN_OPTIONS)
        # Warm-up is a fraction below 1 or a number of steps; more steps than the run has would
        # keep the learning rate below --lr to the end (1e30 trained the whole run at about 0).
        if self.warmup >= 1 and self.warmup > self.steps:
            raise BadInput(f"--warmup {self.warmup:g} steps is more than --steps {self.steps}: the learning rate would "
                           f"never reach --lr. Give at most {self.steps} steps, or a fraction of --steps below 1 "
                           "(e.g. 0.1).")
        # The loader numbers batches in 64-bit integers (run.py bounds the rows they hold, with the batch size)
        check_number("--steps", self.steps, low=1, high=(2**63 - 1) // self.grad_accum, whole=True,
                     hint=f"the loader counts --steps x --grad-accum {self.grad_accum} batches in 64-bit integers")
        # Each DataLoader worker is a process that imports torch and holds its own shuffle window
        check_memory("--workers", self.num_workers, self.num_workers * WORKER_BYTES,
                     f"{self.num_workers:,} DataLoader worker processes of at least {size_in_words(WORKER_BYTES)} each",
                     largest=machine_memory() // WORKER_BYTES)
        # numpy seeds its legacy generator from 32 bits, and the loader's plan seeds from non-negative ints
        check_number("--seed", self.seed, low=0, high=2**32 - 1)
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise BadInput(f"--amp must be auto, off, bf16 or fp16, not {self.amp!r}")


# Options that may change when a run is resumed: they decide how the run is carried out,
# not what it computes. Everything else a checkpoint records must match.
RESUMABLE_OPTIONS = ("--workers", "--stop-after", "--save-every", "--log-every", "--keep-checkpoints", "--device")


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def distributed_context() -> tuple[int, int]:
    """(rank, world size) under torchrun, (0, 1) otherwise; initialises the process group.

    On a GPU machine each rank first binds its own GPU, cuda:LOCAL_RANK: without that every
    rank of a node would allocate on cuda:0. The group then has NCCL for CUDA tensors and gloo
    for CPU ones (a run with --device cpu on a GPU machine still works); on CPU, gloo alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            if local_rank() >= torch.cuda.device_count():
                raise BadInput(f"LOCAL_RANK {local_rank()} has no GPU: this machine has {torch.cuda.device_count()}. "
                               "Start at most one process per GPU (torchrun --nproc_per_node).")
            torch.cuda.set_device(local_rank())
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def check_device(device: str | None) -> None:
    """One paragraph for a --device this machine cannot train on (checked before anything
    is read: torch's own error comes only at the first tensor moved, as a traceback)."""
    if device is None:
        return
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise BadInput(f"--device {device!r} is not a device: give cpu, cuda or cuda:N.") from None
    if chosen.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {device!r}: xkd runs on cpu or cuda, not {chosen.type}.")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {device}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                       f"CUDA build {torch.version.cuda or 'none'}). Give --device cpu, or leave --device out to use "
                       "a GPU when there is one.")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise BadInput(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                       f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")


def amp_dtype(amp: str, device) -> torch.dtype | None:
    """The autocast dtype that --amp gives on `device` (None: autocast off; a device None is
    the default one, CUDA when present). An --amp that cannot apply there is refused before
    anything is read, never dropped: fp16 needs CUDA's gradient scaler, and bf16 on CUDA a GPU
    that has it. CPU autocast runs bf16."""
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if amp == "off" or (amp == "auto" and device_type != "cuda"):
        return None
    on = f"--device {device}" if device is not None else "the default device (no CUDA GPU here)"
    if amp == "fp16" and device_type != "cuda":
        raise BadInput(f"--amp fp16 needs a CUDA device (fp16 trains with CUDA's gradient scaler), and training runs on "
                       f"{device_type} ({on}): give --amp bf16 (CPU autocast) or --amp off, or train on a GPU.")
    if amp == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BadInput(f"--amp bf16: the GPU of {on} has no bf16 support: give --amp fp16 or --amp off.")
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if amp == "fp16" else torch.bfloat16


def resolve_device(device: str | None, world: int) -> torch.device:
    """The device to train on: `device` if given, else CUDA when present, else CPU. A CUDA
    device without an index means this rank's own GPU (cuda:LOCAL_RANK) under DDP."""
    check_device(device)
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank() if world > 1 else torch.cuda.current_device())
    return chosen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain values only, so that a checkpoint loads with
    weights_only=True (numpy's own state tuple holds an ndarray, which that refuses)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_sha256(state: dict) -> str:
    """sha256 over a state dict's names, dtypes, shapes and bytes: two states have the same
    digest exactly when they are bitwise equal."""
    digest = hashlib.sha256()
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# Durable files ------------------------------------------------------------------------


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON under a temporary name, fsync, rename: a reader (or a kill) sees the old
    file or the new one, never half of one."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


class _ErrorKeepingFile:
    """A file torch.save writes through that remembers the OSError of a failed write: torch
    turns it into a RuntimeError without errno or path, so a full disk looked like a bug."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def _torch_save_durably(obj, path: Path) -> None:
    with open(path, "wb") as f:
        keeping = _ErrorKeepingFile(f)
        try:
            torch.save(obj, keeping)
        except RuntimeError:
            if keeping.error is not None:
                raise OSError(keeping.error.errno, keeping.error.strerror, str(path)) from None
            raise
        f.flush()
        os.fsync(f.fileno())


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be read back (truncated, or missing a part)."""


CHECKPOINT_KEYS = ("step", "model", "method", "optimizer", "scheduler", "rng", "loader")


def load_checkpoint(path: Path, map_location=None) -> dict:
    """A checkpoint's state, or DamagedCheckpoint saying why it cannot be used.

    Loaded with weights_only=True: a checkpoint holds only tensors and plain values (see
    _rng_state), so nothing in it needs unpickling code, and a file planted in a run directory
    someone else can write cannot run any (a full unpickle ran it before the configuration
    check could refuse the file). A file that asks for anything else is refused, not skipped:
    xkd did not write it."""
    file = path / "state.pt"
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a foreign file before refusing it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # The safe unpickler read something no torch.save of tensors and plain values writes
        # (a global to call, an opcode it does not allow): refused, not skipped as damaged,
        # which a crash cannot make (it truncates or tears the zip, a RuntimeError below).
        named = re.search(r"GLOBAL (\S+)|unrecognized function (\S+)|but got (\S+)", str(e))
        found = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        what = (f"asks to unpickle {next(g for g in named.groups() if g)}" if named
                else f"holds pickle content torch's safe loader refuses ({found.group(1) if found else _first_line(e)})")
        raise BadInput(
            f"--resume: {file} {what}, which no checkpoint written by xkd holds: xkd loads checkpoints as tensors and "
            f"plain values only, so that a file planted in a run directory cannot run code ({POLICY}). Either someone "
            f"else wrote it, or an older xkd did (it saved numpy's RNG state as an object): remove {path} (--resume "
            "then continues from the checkpoint before it), or start again with --overwrite."
        ) from None
    except Exception as e:  # noqa: BLE001 - any other failure to read it back means the file is damaged
        raise DamagedCheckpoint(f"{file} cannot be read: {type(e).__name__}: {_first_line(e)}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DamagedCheckpoint(f"{file} lacks {', '.join(missing)}")
    return state


def _first_line(error: Exception) -> str:
    return (str(error).strip().split("\n") or [""])[0][:160]


def _show(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def run_differences(saved: dict, now: dict) -> list[str]:
    """The options on which a checkpoint's recorded run and this run differ, one phrase each."""
    out = []
    other_method = saved.get("--method") != now.get("--method")
    for key in sorted(set(saved) | set(now)):
        if key in RESUMABLE_OPTIONS or saved.get(key) == now.get(key):
            continue
        if other_method and key.startswith("--option "):
            continue  # another method has other options: listing them all would bury the point
        out.append(f"{key} {_show(saved.get(key, '(not given)'))} in the checkpoint, {_show(now.get(key, '(not given)'))} now")
    return out


LOSS_CHART = "losses.png"
# Logged beside the losses but not losses: the schedule, the gradient, mergedistill's λ.
NOT_LOSSES = ("step", "lr", "grad_norm", "lambda")


def loss_series(metrics: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{loss name: (steps, values)} from metrics.jsonl, in the order the names first appear;
    torn or foreign lines are skipped (a killed run may leave half a line)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    try:
        lines = metrics.read_text(encoding="utf-8").split("\n")
    except OSError:
        return series
    for line in lines:
        try:
            record = parse_json(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            continue
        for name, value in record.items():
            if name not in NOT_LOSSES and isinstance(value, (int, float)) and math.isfinite(value):
                steps, values = series.setdefault(name, ([], []))
                steps.append(float(record["step"]))
                values.append(float(value))
    return series


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class DistillationModule(torch.nn.Module):
    """The student and the method's heads as ONE module: what DDP wraps.

    DDP all-reduces the gradients of the parameters of the module it wraps, and only of
    those, and only when the forward goes through it. Wrapping the student alone left the
    heads' gradients rank-local (the ranks' heads drifted apart); here the method's losses are
    the module's forward, so the student and every head are synchronised.

    `heads` is the method's own ModuleDict (`method.modules`), not a copy: the method keeps
    calling `self.modules[...]` inside `losses()` and trains the same parameters.
    """

    def __init__(self, student: Student, method):
        super().__init__()
        self.student = student
        self.heads = method.modules
        self.method = method  # a plain object (not a Module): holds no parameters of its own

    def forward(self, batch: dict, step: int) -> dict:
        losses = self.method.losses(batch, self.student, step)
        # Only "loss" is optimised, so only it leaves with its graph: DDP looks for unused
        # parameters from the forward's outputs, and a logged-only term that touched a
        # parameter the loss does not use would make DDP wait for a gradient that never comes.
        return {name: value if name == "loss" else value.detach() for name, value in losses.items()}


class Trainer:
    """`run` is the run's configuration: {"options": {option: value}, "paths": {option: path}}.
    The options are compared on resume (all but RESUMABLE_OPTIONS must match); the paths only
    help the message say which caches and vocab the checkpoint was trained with. `summary` is
    what train_summary.json starts with (the output dir, method, caches, ...)."""

    def __init__(self, model, method, dataset, config: TrainConfig, device: str | None = None, rank=0, world=1,
                 run: dict | None = None, summary: dict | None = None):
        self.config = config
        self.run = run or {"options": {}, "paths": {}}
        self.summary = summary or {}
        self._saved_step = None  # the step of the newest checkpoint on disk (written or resumed from)
        self._damaged: list[Path] = []  # checkpoints resume skipped; removed once training starts
        self._last: dict = {}  # the latest step's logged values (restored on resume)
        self.rank, self.world = rank, world
        self.device = resolve_device(device, world)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # tensors made without a device go to this rank's GPU
        self.model = model.to(self.device)
        self.student = Student(self.model)
        self.method = method
        self.module = DistillationModule(self.student, method).to(self.device)
        self.dataset = dataset
        self.out = Path(config.out)
        # The student's parameters, then the heads' (the order optimiser checkpoints rely on).
        params = [p for p in self.module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        # The fused kernel: on CPU, torch's default AdamW takes ~14x longer over a 290k-row
        # union embedding (bench/train.py), as long as the student's forward and backward.
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, fused=self.device.type in ("cpu", "cuda"),
        )
        warmup = int(config.warmup * config.steps) if config.warmup < 1 else int(config.warmup)
        self.scheduler = _schedule(self.optimizer, max(1, warmup), config.steps)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step = 0
        if world > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # find_unused_parameters: a step's loss need not use every parameter (xd's loss
            # never uses the masked-LM head, an MBLM batch in one language freezes the other
            # branches, a method's head may serve one objective only), and which ones it skips
            # can change from step to step and differ between ranks. DDP then all-reduces zeros for a
            # parameter this rank did not use and leaves one no rank used without a gradient,
            # exactly as one process accumulating the same batches would.
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=device_ids,
                                                                 find_unused_parameters=True)
        else:
            self.ddp = self.module

    def _amp_dtype(self):
        return amp_dtype(self.config.amp, self.device)

    # Checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary directories start with a dot)."""
        if not self.checkpoint_dir.is_dir():
            return []
        return sorted(p for p in self.checkpoint_dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit())

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def _check_finite_weights(self) -> None:
        """Never checkpoint NaN or infinite weights: resuming from them could only fail again."""
        for name, tensor in self.module.state_dict().items():
            if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
                self._stop(f"the weights became non-finite at step {self.step} (first: {name})")

    def save_checkpoint(self, loader_state: dict, last: dict | None = None) -> Path:
        """Write step-N atomically: a temporary directory, its files and itself fsynced, then
        renamed into place; then train_summary.json (partial) and the pruning of old ones. A
        kill at any instant leaves the previous checkpoints whole."""
        path = self.checkpoint_dir / f"step-{self.step:08d}"
        if self.rank != 0:
            return path
        self._check_finite_weights()
        tmp = self.checkpoint_dir / f".step-{self.step:08d}.tmp"
        remove_tree(tmp)
        tmp.mkdir(parents=True)
        try:
            self._write_state(tmp / "state.pt", loader_state, last or {})
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half checkpoint behind
            raise
        remove_tree(path)  # a damaged checkpoint of this step that resume skipped
        os.replace(tmp, path)
        fsync_dir(self.checkpoint_dir)
        self._saved_step = self.step
        self.write_summary(last or {}, checkpoint=path)
        self.write_loss_chart()
        for stale in self.checkpoints()[: -self.config.keep_checkpoints]:
            remove_tree(stale)
        return path

    def _write_state(self, file: Path, loader_state: dict, last: dict) -> None:
        _torch_save_durably(
            {
                "step": self.step,
                "model": self.model.state_dict(),
                "method": self.method.modules.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": _rng_state(),
                "loader": loader_state,
                "config": asdict(self.config),
                "run": self.run,
                "last": last,  # the step's losses: the summary of a resumed run with nothing left to do
            },
            file,
        )

    def write_loss_chart(self) -> None:
        """losses.png beside metrics.jsonl: every logged loss term against the step, redrawn
        at each checkpoint (so also at the end). A chart that cannot be drawn is a warning:
        it must never cost a run its checkpoint."""
        if self.rank != 0:
            return
        from ..chart import line_chart_png

        series = loss_series(self.out / "metrics.jsonl")
        if not series:
            return
        title = f"{self.out.resolve().name}: {self.summary.get('method') or 'training'} losses"
        try:
            line_chart_png(self.out / LOSS_CHART, title, series, x_label="step", y_label="loss")
        except (OSError, ValueError) as e:
            sys.stderr.write(f"xkd train-student: warning: {self.out / LOSS_CHART} was not drawn ({e}); training "
                             "goes on.\n")

    def write_summary(self, last: dict, checkpoint: Path | None = None, student_on_disk: bool = False, **extra) -> dict:
        """train_summary.json, atomically: complete JSON whenever the run is killed. It says
        `partial` (and how many steps are done) until the run has done all of --steps and the
        caller says the student's files are on disk (fsynced): the summary written with the
        last checkpoint must not claim a student that a full disk then failed to save.
        Returns the summary (every rank; rank 0 writes it)."""
        summary = {**self.summary, **extra, "steps": self.step, "steps_total": self.config.steps,
                   "partial": self.step < self.config.steps or not student_on_disk,
                   "final": {k: round(v, 6) for k, v in last.items()}}
        if checkpoint is None and self._saved_step == self.step:
            checkpoint = self.checkpoint_dir / f"step-{self.step:08d}"
        if checkpoint is not None:
            summary["checkpoint"] = str(checkpoint.relative_to(self.out))
        if self.rank == 0:
            write_json_atomic(self.out / "train_summary.json", summary)
        return summary

    def resume(self) -> None:
        """Continue from the newest readable checkpoint, if it was made under this run's
        configuration; a damaged one (unreadable, truncated) is skipped with one line."""
        self._refuse_links()
        found = self.checkpoints()
        if not found:
            raise BadInput(f"--resume: {self.checkpoint_dir} holds no checkpoint to resume from; start without --resume.")
        state, problems = None, []
        for path in reversed(found):
            try:
                state = load_checkpoint(path, self.device)
                break
            except DamagedCheckpoint as e:
                problems.append(str(e))
                self._damaged.append(path)
        if state is None:
            raise BadInput(f"--resume: every checkpoint in {self.checkpoint_dir} is damaged ({'; '.join(problems)}). "
                           "Start again with --overwrite.")
        if self.rank == 0:
            for damaged, problem in zip(self._damaged, problems):
                sys.stderr.write(f"xkd train-student: checkpoint {damaged.name} is damaged ({problem}); "
                                 f"resuming from {path.name}, the newest whole one before it.\n")
        self._check_same_run(state.get("run"), path)
        try:
            self.model.load_state_dict(state["model"])
            self.method.modules.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            self.dataset.load_state_dict(state["loader"])
            self.step = self._saved_step = int(state["step"])
            self._last = dict(state.get("last") or {})
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            raise BadInput(f"--resume: {path / 'state.pt'} does not fit this run ({type(e).__name__}: {_first_line(e)}); "
                           "it was not written by xkd for these options. Remove it, or start again with --overwrite.") from None

    def _check_same_run(self, saved: dict | None, path: Path) -> None:
        if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
            raise BadInput(f"--resume: {path} records no run configuration (an older xkd wrote it), so nothing says "
                           "it was trained with these options. Start again with --overwrite.")
        diffs = run_differences(saved["options"], self.run["options"])
        if not diffs:
            return
        paths = saved.get("paths") or {}
        was = [f"{key} {_show(paths[key])}" for key in ("--vocab", "--caches")
               if key in paths and any(d.startswith(key + " ") for d in diffs)]
        raise BadInput(
            f"--resume: {path} was trained under another configuration: {'; '.join(diffs)}. Resume with the options "
            f"it was trained with{' (it was trained with ' + ' and '.join(was) + ')' if was else ''}, or start a new run "
            f"in another --out (or this one, with --overwrite). Only {', '.join(RESUMABLE_OPTIONS)} may change on resume."
        )

    def _clean_checkpoint_dir(self) -> None:
        """Drop what a killed run left behind: temporary checkpoint directories, and the
        damaged checkpoints resume skipped (the next save of their step would replace them,
        and pruning must not keep them instead of good ones)."""
        self._refuse_links()
        if self.rank != 0 or not self.checkpoint_dir.is_dir():
            return
        for leftover in [*self.checkpoint_dir.glob(".step-*"), *self._damaged]:
            remove_tree(leftover)

    def _refuse_links(self) -> None:
        """A run directory holds only what xkd wrote, and xkd rewrites and prunes there: a link
        among its entries or its checkpoints is refused before anything is read or trained
        (a linked step directory used to be resumed from, trained to the end, and then fail
        the pruning with an error naming no path)."""
        if self.out.is_dir():
            refuse_links(self.out, sorted(p.name for p in self.out.iterdir()), "run")
        if self.checkpoint_dir.is_dir():
            refuse_links(self.checkpoint_dir, sorted(p.name for p in self.checkpoint_dir.iterdir()), "run")

    # Metrics ---------------------------------------------------------------------------
    def _truncate_metrics(self) -> None:
        """Drop lines a killed run logged after the checkpoint we resume from, and a line it
        was killed in the middle of writing."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").split("\n"):
            try:
                record = parse_json(line)
            except ValueError:
                continue  # an empty or torn line
            if isinstance(record, dict) and record.get("step", math.inf) <= self.step:
                kept.append(line)
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode("utf-8"))

    def _stop(self, what: str) -> None:
        """Leave with exit 1 naming the step and what went wrong; the checkpoints on disk
        (none of them with non-finite weights) are kept."""
        latest = self.latest_checkpoint()
        kept = (f"the last good checkpoint, {latest}, is kept (--resume continues from it)" if latest
                else "no checkpoint had been written (--save-every N keeps some)")
        raise XkdError(
            f"{what}; training stopped there and wrote nothing for it: {kept}. A non-finite loss usually means a "
            "learning rate too high for this student (--lr, --warmup), or teacher outputs that are not finite in a "
            "cache (xkd verify, xkd inspect)."
        )

    def _open_tensorboard(self):
        if self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # The loop --------------------------------------------------------------------------
    def train(self) -> dict:
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        self._clean_checkpoint_dir()
        self._truncate_metrics()
        # Its own generator: drawing worker seeds from the global RNG would shift every
        # dropout mask after a resume.
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=config.num_workers,
            persistent_workers=False, prefetch_factor=2 if config.num_workers else None,
            generator=torch.Generator().manual_seed(config.seed),
        )
        batches = iter(loader)
        tensorboard = self._open_tensorboard()
        metrics_file = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None
        self.module.train()
        start_step, start_time = self.step, time.time()
        last = self._last
        loader_state = self.dataset.state_dict()
        until = min(config.steps, start_step + config.stop_after) if config.stop_after else config.steps
        try:
            while self.step < until:
                totals: dict[str, float] = {}
                for micro in range(config.grad_accum):
                    batch = next(batches)
                    loader_state = batch.pop("loader_state")
                    batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    # Gradients synchronise across ranks only on the last micro-batch.
                    sync = micro == config.grad_accum - 1 or self.world == 1
                    ctx = self.ddp.no_sync() if not sync else contextlib.nullcontext()
                    with ctx, torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                        losses = self.ddp(batch, self.step)
                        loss = losses["loss"] / config.grad_accum
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                    for name, value in losses.items():
                        totals[name] = totals.get(name, 0.0) + float(value.detach()) / config.grad_accum
                # Over every rank's batches, so that all ranks stop together at a non-finite term.
                summed = self._sum_over_ranks(totals)
                self._check_finite_losses(summed)
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip)) if config.clip > 0 else 0.0
                # fp16's scaler skips steps with infinite gradients by design; otherwise a
                # non-finite gradient would write NaN into every weight it touches.
                if self.scaler is None and not math.isfinite(grad_norm):
                    self._stop(f"step {self.step + 1} of {config.steps}: every loss term is finite but the gradient "
                               f"norm is {grad_norm}")
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                last = {**summed, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}
                if metrics_file and (self.step % config.log_every == 0 or self.step == config.steps):
                    record = {"step": self.step, **{k: round(v, 6) for k, v in last.items()}}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if tensorboard:
                        for k, v in last.items():
                            tensorboard.add_scalar(k, v, self.step)
                    self._progress(start_step, start_time, last)
                if config.save_every and self.step % config.save_every == 0 and self.step < until:
                    self.save_checkpoint(loader_state, last)
            if self._saved_step != self.step:  # a resumed run with nothing left to do has its checkpoint
                self.save_checkpoint(loader_state, last)
        finally:
            if metrics_file:
                metrics_file.close()
            if tensorboard:
                tensorboard.close()
        if self.rank == 0:
            sys.stderr.write("\n")
        return {"steps": self.step, "final": {k: round(v, 6) for k, v in last.items()},
                "seconds": round(time.time() - start_time, 2), "weights_sha256": self.weights_sha256()}

    def _check_finite_losses(self, summed: dict) -> None:
        """Stop at the first step with a non-finite loss term, naming the step and the
        term(s) of the method's losses (a component such as 'kd' rather than their sum)."""
        bad = [name for name, value in summed.items() if not math.isfinite(value)]
        if not bad:
            return
        causes = [name for name in bad if name != "loss"] or bad
        terms = ", ".join(f"{name!r} ({summed[name]})" for name in causes)
        self._stop(f"step {self.step + 1} of {self.config.steps}: the method's loss term{'s' if len(causes) > 1 else ''} "
                   f"{terms} {'are' if len(causes) > 1 else 'is'} not finite")

    def weights_sha256(self) -> dict:
        """This rank's final weights as digests, under the checkpoint's keys: "model" (the
        student) and "method" (the method's heads). Under DDP every rank must report the same
        digests; comparing them is how a run (or a test) shows that no rank drifted."""
        return {"model": state_sha256(self.model.state_dict()),
                "method": state_sha256(self.method.modules.state_dict())}

    def _sum_over_ranks(self, totals: dict) -> dict:
        """A step's logged losses over the batches of every rank, as one process accumulating
        those batches logs them (each rank's share already divided by --grad-accum, so the
        sum over ranks is divided by the world size). Rank 0 alone would log a 1/world
        sample of the step. Ranks may report different terms (e.g. a gold-label term only
        for batches that have labels), hence objects rather than one tensor."""
        if self.world == 1:
            return totals
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, totals)
        names = dict.fromkeys(name for rank_totals in gathered for name in rank_totals)
        return {name: sum(t.get(name, 0.0) for t in gathered) / self.world for name in names}

    def _progress(self, start_step: int, start_time: float, last: dict) -> None:
        done = self.step - start_step
        elapsed = time.time() - start_time
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.config.steps - self.step) / rate if rate > 0 else 0.0
        shown = " ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("lr", "grad_norm"))
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"step {self.step}/{self.config.steps}  {shown}  | {rate:.2f} steps/s, ETA {_fmt_time(eta)}{end}")
        sys.stderr.flush()
