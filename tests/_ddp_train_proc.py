"""Run by tests/test_ddp.py under torchrun (two gloo processes): every configuration of a
spec file is trained with train_student on this rank, and this rank's result (which holds
the sha256 of its final student and heads) is written to <out>/rank<r>.json.

One launch for all configurations: starting processes and the process group is most of the
cost of a tiny DDP run. `train_kwargs` is also what the test calls for the one-process
references, so both sides are trained from the very same arguments.

    python -m torch.distributed.run --nproc_per_node 2 ... tests/_ddp_train_proc.py SPEC.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def train_kwargs(run: dict, out: str, *, steps: int, grad_accum: int, lr: float) -> dict:
    """train_student's arguments for one configuration of the spec (see test_ddp.CONFIGS)."""
    from xkd.student.models import StudentConfig
    from xkd.student.trainer import TrainConfig

    return dict(
        method=run["method"], caches=run["caches"], vocab_dir=run["vocab"], out=out,
        # log_every 1: every step's losses are compared with the one-process run's.
        train=TrainConfig(out=out, steps=steps, grad_accum=grad_accum, lr=lr, log_every=1, seed=run["seed"]),
        batch_size=run["batch_size"], student=StudentConfig(**run["student"]),
        method_options=dict(run["options"]),
    )


def main(spec_path: str) -> None:
    import torch.distributed as dist

    from xkd.student.run import train_student

    spec = json.loads(Path(spec_path).read_text())
    for run in spec["runs"]:
        out = run["ddp_out"]
        result = train_student(**train_kwargs(run, out, steps=spec["steps"], grad_accum=1, lr=spec["lr"]))
        Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result, sort_keys=True))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
