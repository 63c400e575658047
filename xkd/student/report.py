"""What a training run tells as it goes: metrics.jsonl, tensorboard (when installed), the
progress line on stderr, losses.png and train_summary.json.

The loop calls it at a few points: `start` once the loader runs, `log` after every step (it
keeps every --log-every-th), `close` and `finish` at the end; the trainer writes the chart
and the summary with each checkpoint. Only rank 0 writes; every rank returns the summary.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from ..durable import atomic_write_bytes
from ..storage.untrusted import parse_json

LOSS_CHART = "losses.png"
# Logged beside the losses but not losses: the schedule, the gradient, mergedistill's λ.
NOT_LOSSES = ("step", "lr", "grad_norm", "lambda")


class Report:
    """`summary` is what train_summary.json starts with (the output dir, method, caches, ...)."""

    def __init__(self, out: Path, rank: int, steps: int, log_every: int, summary: dict):
        self.out, self.rank, self.steps, self.log_every, self.summary = out, rank, steps, log_every, summary
        self.metrics_file = self.tensorboard = None
        self.start_step, self.start_time = 0, time.time()

    def start(self, step: int) -> None:
        """Training starts (or resumes) at `step`: metrics.jsonl loses what a killed run logged
        after it, and metrics.jsonl and tensorboard are opened for appending."""
        self._truncate_metrics(step)
        self.tensorboard = self._open_tensorboard()
        self.metrics_file = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None
        self.start_step, self.start_time = step, time.time()

    def log(self, step: int, last: dict) -> None:
        """The values of the step just done, on every --log-every-th step and the last one."""
        if not self.metrics_file or not (step % self.log_every == 0 or step == self.steps):
            return
        record = {"step": step, **{k: round(v, 6) for k, v in last.items()}}
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.tensorboard:
            for k, v in last.items():
                self.tensorboard.add_scalar(k, v, step)
        self._progress(step, last)

    def close(self) -> None:
        if self.metrics_file:
            self.metrics_file.close()
        if self.tensorboard:
            self.tensorboard.close()

    def finish(self) -> float:
        """Ends the progress line; returns the seconds since `start`."""
        if self.rank == 0:
            sys.stderr.write("\n")
        return round(time.time() - self.start_time, 2)

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

    def write_summary(self, step: int, last: dict, checkpoint: Path | None, student_on_disk: bool, **extra) -> dict:
        """train_summary.json, atomically: complete JSON whenever the run is killed. It says
        `partial` (and how many steps are done) until the run has done all of --steps and the
        caller says the student's files are on disk (fsynced): the summary written with the
        last checkpoint must not claim a student that a full disk then failed to save.
        Returns the summary (every rank; rank 0 writes it)."""
        summary = {**self.summary, **extra, "steps": step, "steps_total": self.steps,
                   "partial": step < self.steps or not student_on_disk,
                   "final": {k: round(v, 6) for k, v in last.items()}}
        if checkpoint is not None:
            summary["checkpoint"] = str(checkpoint.relative_to(self.out))
        if self.rank == 0:
            write_json_atomic(self.out / "train_summary.json", summary)
        return summary

    def _truncate_metrics(self, step: int) -> None:
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
            if isinstance(record, dict) and record.get("step", math.inf) <= step:
                kept.append(line)
        atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode("utf-8"))

    def _open_tensorboard(self):
        if self.rank != 0:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _progress(self, step: int, last: dict) -> None:
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.steps - step) / rate if rate > 0 else 0.0
        shown = " ".join(f"{k} {v:.4g}" for k, v in last.items() if k not in ("lr", "grad_norm"))
        end = "\r" if sys.stderr.isatty() else "\n"
        sys.stderr.write(f"step {step}/{self.steps}  {shown}  | {rate:.2f} steps/s, ETA {_fmt_time(eta)}{end}")
        sys.stderr.flush()


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON under a temporary name, fsync, rename: a reader (or a kill) sees the old
    file or the new one, never half of one."""
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


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
