"""The training loop: knows optimisers, devices and the method's losses, and nothing of any method.

A step runs the method's losses over --grad-accum micro-batches on every rank (runtime.py),
clips, steps the optimiser and the schedule, and stops at the first non-finite loss or
gradient. Around it, checkpoints.py saves and resumes exactly (a stopped and resumed run ends
with the same weights as an uninterrupted one, and resume refuses another configuration), and
report.py writes metrics.jsonl, the progress line, losses.png and train_summary.json.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import XkdError
from ..options import free_options
from .checkpoints import Checkpoints, check_same_run, fits_this_run, rng_state, set_rng_state, state_sha256
from .models import Student
from .options import TrainStudentOptions
from .report import Report
from .runtime import amp_dtype, linear_schedule, resolve_device, sum_over_ranks, warmup_steps, wrap_for_ranks

# Options that may change when a run is resumed (declared FREE): they decide how the run is
# carried out, not what it computes. Everything else a checkpoint records must match.
RESUMABLE_OPTIONS = free_options(TrainStudentOptions)


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

    def __init__(self, model, method, dataset, config: TrainStudentOptions, device: str | None = None, rank=0, world=1,
                 run: dict | None = None, summary: dict | None = None):
        self.config = config
        self.run = run or {"options": {}, "paths": {}}
        self._saved_step = None  # the step of the newest checkpoint on disk (written or resumed from)
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
        self.checkpoints = Checkpoints(self.out, rank, config.keep_checkpoints)
        self.report = Report(self.out, rank, config.steps, config.log_every, summary or {})
        # The student's parameters, then the heads' (the order optimiser checkpoints rely on).
        params = [p for p in self.module.parameters() if p.requires_grad]
        # The fused kernel: on CPU, torch's default AdamW takes ~14x longer over a 290k-row
        # union embedding (bench/train.py), as long as the student's forward and backward.
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
            lr=config.lr, fused=self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = linear_schedule(self.optimizer, warmup_steps(config.warmup, config.steps), config.steps)
        self.amp_dtype = amp_dtype(config.amp, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step = 0
        self.ddp = wrap_for_ranks(self.module, self.device, world)

    # Checkpoints (checkpoints.py writes and reads them) ------------------------------------
    def save_checkpoint(self, loader_state: dict, last: dict | None = None) -> Path:
        """step-N, atomically; then train_summary.json (partial), the loss chart and the
        pruning of old ones. A kill at any instant leaves the previous checkpoints whole."""
        if self.rank != 0:
            return self.checkpoints.path(self.step)
        self._check_finite_weights()
        path = self.checkpoints.save(self.step, {
            "step": self.step, "model": self.model.state_dict(), "method": self.method.modules.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None, "rng": rng_state(), "loader": loader_state,
            "config": asdict(self.config), "run": self.run,
            "last": last or {},  # the step's losses: the summary of a resumed run with nothing left to do
        })
        self._saved_step = self.step
        self.write_summary(last or {}, checkpoint=path)
        self.report.write_loss_chart()
        self.checkpoints.prune()
        return path

    def resume(self) -> None:
        """Continue from the newest readable checkpoint, if it was made under this run's
        configuration; a damaged one (unreadable, truncated) is skipped with one line."""
        state, path = self.checkpoints.newest_readable(self.device)
        check_same_run(state.get("run"), self.run, path, RESUMABLE_OPTIONS)
        with fits_this_run(path):
            self.model.load_state_dict(state["model"])
            self.method.modules.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            self.dataset.load_state_dict(state["loader"])
            self.step = self._saved_step = int(state["step"])
            self._last = dict(state.get("last") or {})

    def write_summary(self, last: dict, checkpoint: Path | None = None, student_on_disk: bool = False, **extra) -> dict:
        """train_summary.json (report.py), naming this step's checkpoint when it is on disk."""
        if checkpoint is None and self._saved_step == self.step:
            checkpoint = self.checkpoints.path(self.step)
        return self.report.write_summary(self.step, last, checkpoint, student_on_disk, **extra)

    # The loop --------------------------------------------------------------------------
    def train(self) -> dict:
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints.clean()
        # Its own generator: drawing worker seeds from the global RNG would shift every
        # dropout mask after a resume.
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=config.workers,
            persistent_workers=False, prefetch_factor=2 if config.workers else None,
            generator=torch.Generator().manual_seed(config.seed),
        )
        batches = iter(loader)
        self.report.start(self.step)
        self.module.train()
        last = self._last
        loader_state = self.dataset.state_dict()
        until = min(config.steps, self.step + config.stop_after) if config.stop_after else config.steps
        try:
            while self.step < until:
                totals, loader_state = self._forward_backward(batches)
                # Over every rank's batches, so that all ranks stop together at a non-finite term.
                summed = sum_over_ranks(totals, self.world)
                self._check_finite_losses(summed)
                grad_norm = self._optimizer_step()
                self.step += 1
                last = {**summed, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}
                self.report.log(self.step, last)
                if config.save_every and self.step % config.save_every == 0 and self.step < until:
                    self.save_checkpoint(loader_state, last)
            if self._saved_step != self.step:  # a resumed run with nothing left to do has its checkpoint
                self.save_checkpoint(loader_state, last)
        finally:
            self.report.close()
        return {"steps": self.step, "final": {k: round(v, 6) for k, v in last.items()},
                "seconds": self.report.finish(), "weights_sha256": self.weights_sha256()}

    def _forward_backward(self, batches) -> tuple[dict, dict]:
        """One step's --grad-accum micro-batches through the method's losses, their gradients
        accumulated. Returns the step's losses (each averaged over the micro-batches) and the
        loader's position after the last micro-batch."""
        accum, totals = self.config.grad_accum, {}
        for micro in range(accum):
            batch = next(batches)
            loader_state = batch.pop("loader_state")
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            # Gradients synchronise across ranks only on the last micro-batch.
            sync = micro == accum - 1 or self.world == 1
            ctx = self.ddp.no_sync() if not sync else contextlib.nullcontext()
            with ctx, torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                losses = self.ddp(batch, self.step)
                loss = losses["loss"] / accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for name, value in losses.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / accum
        return totals, loader_state

    def _optimizer_step(self) -> float:
        """Clip the gradients, step the optimiser and the schedule; returns the gradient norm."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.config.clip
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if clip > 0 else 0.0
        # fp16's scaler skips steps with infinite gradients by design; otherwise a
        # non-finite gradient would write NaN into every weight it touches.
        if self.scaler is None and not math.isfinite(grad_norm):
            self._stop(f"step {self.step + 1} of {self.config.steps}: every loss term is finite but the gradient "
                       f"norm is {grad_norm}")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return grad_norm

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

    def _check_finite_weights(self) -> None:
        """Never checkpoint NaN or infinite weights: resuming from them could only fail again."""
        for name, tensor in self.module.state_dict().items():
            if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
                self._stop(f"the weights became non-finite at step {self.step} (first: {name})")

    def _stop(self, what: str) -> None:
        """Leave with exit 1 naming the step and what went wrong; the checkpoints on disk
        (none of them with non-finite weights) are kept."""
        latest = self.checkpoints.latest()
        kept = (f"the last good checkpoint, {latest}, is kept (--resume continues from it)" if latest
                else "no checkpoint had been written (--save-every N keeps some)")
        raise XkdError(
            f"{what}; training stopped there and wrote nothing for it: {kept}. A non-finite loss usually means a "
            "learning rate too high for this student (--lr, --warmup), or teacher outputs that are not finite in a "
            "cache (xkd verify, xkd inspect)."
        )

    def weights_sha256(self) -> dict:
        """This rank's final weights as digests, under the checkpoint's keys: "model" (the
        student) and "method" (the method's heads). Under DDP every rank must report the same
        digests; comparing them is how a run (or a test) shows that no rank drifted."""
        return {"model": state_sha256(self.model.state_dict()),
                "method": state_sha256(self.method.modules.state_dict())}
