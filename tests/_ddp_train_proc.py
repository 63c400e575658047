"""What the DDP tests share (tests/test_ddp.py, and the DDP test of test_train_student.py).

As a script, run under torchrun (two gloo processes): every configuration of a spec file is
trained with train_student on this rank, and this rank's result (which holds the sha256 of
its final student and heads) is written to <ddp_out>/rank<r>.json. One launch for all
configurations: starting processes and the process group is most of the cost of a tiny DDP
run. `train_options` is also what test_ddp calls for the one-process references, so both sides
are trained from the very same arguments.

    python -m torch.distributed.run --nproc_per_node 2 ... tests/_ddp_train_proc.py SPEC.json

As a module: how a DDP run is compared with one process accumulating the same batches.
DDP and one process differ only in the order of floating-point reductions (how the gradient
sum is split between ranks and threads): a few float32 roundings per step, which the
optimiser carries into the weights. So the DDP update may differ from the one-process update
by a few epsilon of its size per step, and the logged losses by a few epsilon of theirs. A
real fault (an unsynchronised head, a lost batch) is an error of the order of the update.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

EPS = torch.finfo(torch.float32).eps
LOSS_RTOL = 64 * EPS
LOSS_ATOL = 1e-6  # metrics.jsonl rounds to 6 decimals


def update_rtol(steps: int) -> float:
    """The bound on update_error after `steps` optimiser steps."""
    return 8 * EPS * steps


def update_error(before: dict, single: dict, ddp: dict) -> tuple[float, str]:
    """|DDP update - one-process update| / |one-process update| over a whole state dict (all
    its tensors as one vector; in float64, where differences of float32 values are exact),
    and the tensor that differs most (for messages). A state whose update is zero must be
    matched exactly."""
    if not single:  # e.g. a method without heads
        return 0.0, ""
    diffs = {k: (ddp[k].double() - single[k].double()).norm() for k in single}
    update = torch.stack([(single[k].double() - before[k].double()).norm() for k in single]).norm()
    error = torch.stack(list(diffs.values())).norm()
    worst = max(diffs, key=lambda k: diffs[k])
    return float(error / update) if update > 0 else float(error), worst


def assert_same_metrics(single: list[dict], ddp: list[dict]) -> None:
    """The logged lines (metrics.jsonl) of both runs: the same steps, and every value (losses,
    learning rate, gradient norm) equal up to LOSS_RTOL, or the log's rounding."""
    import pytest  # here, not above: the torchrun script does not need it

    assert [m["step"] for m in ddp] == [m["step"] for m in single]
    for a, b in zip(single, ddp):
        assert a.keys() == b.keys(), a["step"]
        assert b == {k: pytest.approx(v, rel=LOSS_RTOL, abs=LOSS_ATOL) for k, v in a.items()}, a["step"]


def train_options(run: dict, out: str, *, steps: int, grad_accum: int, lr: float):
    """train_student's options for one configuration of the spec (see test_ddp.CONFIGS)."""
    from xkd.student.options import TrainStudentOptions

    return TrainStudentOptions(
        method=run["method"], caches=run["caches"], vocab=run["vocab"], out=out,
        # log_every 1: every step's losses are compared with the one-process run's.
        steps=steps, grad_accum=grad_accum, lr=lr, log_every=1, seed=run["seed"],
        batch_size=run["batch_size"], **run["student"], method_options=dict(run["options"]),
    )


def main(spec_path: str) -> None:
    import torch.distributed as dist

    from xkd.student.run import train_student

    spec = json.loads(Path(spec_path).read_text())
    for run in spec["runs"]:
        out = run["ddp_out"]
        print(f"[{sys.argv[0]}] training {run['name']}", file=sys.stderr, flush=True)  # which one, if it fails
        result = train_student(train_options(run, out, steps=spec["steps"], grad_accum=1, lr=spec["lr"]))
        Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
