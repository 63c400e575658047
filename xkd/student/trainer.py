"""The training loop: knows optimisers, checkpoints and devices, and nothing of any method.

Exact resume: a checkpoint holds the model, the method's heads, optimiser, scheduler, every
RNG, and the loader's position (a tiny dict, see data.py). Restoring them all makes the
remaining steps see the same batches, dropout masks and learning rates, so a stopped and
resumed run ends with the same weights as an uninterrupted one.

Several processes (torchrun, DDP): rank r trains on batches r, r + world, ... and DDP
averages the gradients of the student AND the method's heads (wrapped together as one
module), so a step equals one process accumulating the world's batches (--grad-accum). On
CUDA each rank trains on its own GPU, cuda:LOCAL_RANK.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..errors import BadInput
from .models import Student


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

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1:
            raise BadInput("--steps and --grad-accum must be at least 1")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise BadInput(f"--amp must be auto, off, bf16 or fp16, not {self.amp!r}")


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


def resolve_device(device: str | None, world: int) -> torch.device:
    """The device to train on: `device` if given, else CUDA when present, else CPU. A CUDA
    device without an index means this rank's own GPU (cuda:LOCAL_RANK) under DDP."""
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank() if world > 1 else torch.cuda.current_device())
    return chosen


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    def __init__(self, model, method, dataset, config: TrainConfig, device: str | None = None, rank=0, world=1):
        self.config = config
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
        amp = self.config.amp
        if amp == "off" or (amp == "auto" and self.device.type != "cuda"):
            return None
        if amp == "fp16":
            return torch.float16
        if amp == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16

    # Checkpoints ------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self, loader_state: dict) -> Path:
        if self.rank != 0:
            return self.checkpoint_dir
        path = self.checkpoint_dir / f"step-{self.step:08d}"
        tmp = self.checkpoint_dir / f".step-{self.step:08d}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(
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
            },
            tmp / "state.pt",
        )
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir.glob("step-*")) if self.checkpoint_dir.is_dir() else []
        return found[-1] if found else None

    def resume(self) -> None:
        path = self.latest_checkpoint()
        if path is None:
            raise BadInput(f"--resume: {self.checkpoint_dir} holds no checkpoint to resume from.")
        state = torch.load(path / "state.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.method.modules.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.dataset.load_state_dict(state["loader"])
        self.step = state["step"]
        self._truncate_metrics()

    # Metrics ---------------------------------------------------------------------------
    def _truncate_metrics(self) -> None:
        """Drop lines a killed run logged after the checkpoint we resume from."""
        path = self.out / "metrics.jsonl"
        if self.rank != 0 or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in kept))

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
        last = {}
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
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                params = [p for g in self.optimizer.param_groups for p in g["params"]]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip)) if config.clip > 0 else 0.0
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.step += 1
                last = {**self._sum_over_ranks(totals), "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm}
                if metrics_file and (self.step % config.log_every == 0 or self.step == config.steps):
                    record = {"step": self.step, **{k: round(v, 6) for k, v in last.items()}}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if tensorboard:
                        for k, v in last.items():
                            tensorboard.add_scalar(k, v, self.step)
                    self._progress(start_step, start_time, last)
                if config.save_every and self.step % config.save_every == 0 and self.step < until:
                    self.save_checkpoint(loader_state)
            self.save_checkpoint(loader_state)
        finally:
            if metrics_file:
                metrics_file.close()
            if tensorboard:
                tensorboard.close()
        if self.rank == 0:
            sys.stderr.write("\n")
        return {"steps": self.step, "final": {k: round(v, 6) for k, v in last.items()},
                "seconds": round(time.time() - start_time, 2), "weights_sha256": self.weights_sha256()}

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
