"""Where and how training runs: the device, the processes (torchrun, DDP), the seeds, AMP and
the learning-rate schedule. Shared by train-student (trainer.py) and the commands that train
beside it, so that they choose a device and warm up the same way.

Several processes (torchrun, DDP): rank r trains on batches r, r + world, ... and DDP
averages the gradients of the student AND the method's heads (wrapped together as one
module), so a step equals one process accumulating the world's batches (--grad-accum). On
CUDA each rank trains on its own GPU, cuda:LOCAL_RANK.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from ..errors import BadInput


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


def resolve_device(device: str | None, world: int = 1) -> torch.device:
    """The device to train on: `device` if given, else CUDA when present, else CPU. A CUDA
    device without an index means this rank's own GPU (cuda:LOCAL_RANK) under DDP."""
    check_device(device)
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank() if world > 1 else torch.cuda.current_device())
    return chosen


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_steps(warmup: float, total: int) -> int:
    """--warmup in steps: a fraction of `total` when below 1, else a number of steps; at least 1."""
    return max(1, int(warmup * total) if warmup < 1 else int(warmup))


def linear_schedule(optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate rises linearly over the first `warmup` steps to the optimiser's own,
    then falls linearly to 0 at step `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def wrap_for_ranks(module: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """`module` under DDP when several processes train, else itself."""
    if world == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    # find_unused_parameters: a step's loss need not use every parameter (xd's loss
    # never uses the masked-LM head, an MBLM batch in one language freezes the other
    # branches, a method's head may serve one objective only), and which ones it skips
    # can change from step to step and differ between ranks. DDP then all-reduces zeros for a
    # parameter this rank did not use and leaves one no rank used without a gradient,
    # exactly as one process accumulating the same batches would.
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


def sum_over_ranks(totals: dict, world: int) -> dict:
    """A step's logged losses over the batches of every rank, as one process accumulating
    those batches logs them (each rank's share already divided by --grad-accum, so the
    sum over ranks is divided by the world size). Rank 0 alone would log a 1/world
    sample of the step. Ranks may report different terms (e.g. a gold-label term only
    for batches that have labels), hence objects rather than one tensor."""
    if world == 1:
        return totals
    gathered: list = [None] * world
    dist.all_gather_object(gathered, totals)
    names = dict.fromkeys(name for rank_totals in gathered for name in rank_totals)
    return {name: sum(t.get(name, 0.0) for t in gathered) / world for name in names}
