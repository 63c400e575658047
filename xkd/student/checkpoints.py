"""A training run's checkpoints: OUT/checkpoints/step-N, each a state.pt.

Exact resume: a checkpoint holds the model, the method's heads, optimiser, scheduler, every
RNG, and the loader's position (a tiny dict, see data.py). Restoring them all makes the
remaining steps see the same batches, dropout masks and learning rates, so a stopped and
resumed run ends with the same weights as an uninterrupted one.

A checkpoint also records the run's configuration (`run`: the options that shape the
result), and resume refuses another one: restoring a checkpoint under other options silently
kept the old schedule and method. Checkpoints are written atomically (temporary directory,
fsync, rename), the last `keep` are kept, and a damaged one is skipped on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from ..durable import fsync_dir
from ..errors import BadInput
from ..storage.untrusted import POLICY, refuse_links, remove_tree


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be read back (truncated, or missing a part)."""


CHECKPOINT_KEYS = ("step", "model", "method", "optimizer", "scheduler", "rng", "loader")


class Checkpoints:
    """The checkpoints of the run in `out`, oldest first. Rank 0 writes, prunes and cleans
    them; every rank reads them on resume."""

    def __init__(self, out: Path, rank: int, keep: int):
        self.out, self.rank, self.keep = out, rank, keep
        self.dir = out / "checkpoints"
        self.damaged: list[Path] = []  # checkpoints resume skipped; removed once training starts

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:08d}"

    def found(self) -> list[Path]:
        """Finished checkpoints, oldest first (temporary directories start with a dot)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("step-*") if p.is_dir() and p.name[5:].isdigit())

    def latest(self) -> Path | None:
        found = self.found()
        return found[-1] if found else None

    def save(self, step: int, state: dict) -> Path:
        """Write step-N atomically: a temporary directory, its files and itself fsynced, then
        renamed into place. A kill at any instant leaves the previous checkpoints whole."""
        path = self.path(step)
        tmp = self.dir / f".step-{step:08d}.tmp"
        remove_tree(tmp)
        tmp.mkdir(parents=True)
        try:
            _torch_save_durably(state, tmp / "state.pt")
            fsync_dir(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk leaves no half checkpoint behind
            raise
        remove_tree(path)  # a damaged checkpoint of this step that resume skipped
        os.replace(tmp, path)
        fsync_dir(self.dir)
        return path

    def prune(self) -> None:
        """Keep the newest `keep` (more than one: resume falls back past a damaged one)."""
        for stale in self.found()[: -self.keep]:
            remove_tree(stale)

    def newest_readable(self, map_location) -> tuple[dict, Path]:
        """(state, path) of the newest checkpoint that reads back; a damaged one (unreadable,
        truncated) is skipped with one line, and removed once training starts (clean)."""
        self.refuse_links()
        found = self.found()
        if not found:
            raise BadInput(f"--resume: {self.dir} holds no checkpoint to resume from; start without --resume.")
        state, problems = None, []
        for path in reversed(found):
            try:
                state = load_checkpoint(path, map_location)
                break
            except DamagedCheckpoint as e:
                problems.append(str(e))
                self.damaged.append(path)
        if state is None:
            raise BadInput(f"--resume: every checkpoint in {self.dir} is damaged ({'; '.join(problems)}). "
                           "Start again with --overwrite.")
        if self.rank == 0:
            for damaged, problem in zip(self.damaged, problems):
                sys.stderr.write(f"xkd train-student: checkpoint {damaged.name} is damaged ({problem}); "
                                 f"resuming from {path.name}, the newest whole one before it.\n")
        return state, path

    def clean(self) -> None:
        """Drop what a killed run left behind: temporary checkpoint directories, and the
        damaged checkpoints resume skipped (the next save of their step would replace them,
        and pruning must not keep them instead of good ones)."""
        self.refuse_links()
        if self.rank != 0 or not self.dir.is_dir():
            return
        for leftover in [*self.dir.glob(".step-*"), *self.damaged]:
            remove_tree(leftover)

    def refuse_links(self) -> None:
        """A run directory holds only what xkd wrote, and xkd rewrites and prunes there: a link
        among its entries or its checkpoints is refused before anything is read or trained
        (a linked step directory used to be resumed from, trained to the end, and then fail
        the pruning with an error naming no path)."""
        if self.out.is_dir():
            refuse_links(self.out, sorted(p.name for p in self.out.iterdir()), "run")
        if self.dir.is_dir():
            refuse_links(self.dir, sorted(p.name for p in self.dir.iterdir()), "run")


@contextlib.contextmanager
def fits_this_run(path: Path):
    """Around restoring a checkpoint's state: a part that does not fit this run's model,
    method or loader is one paragraph, not a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        raise BadInput(f"--resume: {path / 'state.pt'} does not fit this run ({type(e).__name__}: {_first_line(e)}); "
                       "it was not written by xkd for these options. Remove it, or start again with --overwrite.") from None


def check_same_run(saved: dict | None, now: dict, path: Path, resumable: tuple[str, ...]) -> None:
    """Refuse to resume from a checkpoint made under another configuration. `saved` and `now`
    are runs as the trainer records them ({"options": ..., "paths": ...}); the options named
    in `resumable` may differ."""
    if not isinstance(saved, dict) or not isinstance(saved.get("options"), dict):
        raise BadInput(f"--resume: {path} records no run configuration (an older xkd wrote it), so nothing says "
                       "it was trained with these options. Start again with --overwrite.")
    diffs = run_differences(saved["options"], now["options"], resumable)
    if not diffs:
        return
    paths = saved.get("paths") or {}
    was = [f"{key} {_show(paths[key])}" for key in ("--vocab", "--caches")
           if key in paths and any(d.startswith(key + " ") for d in diffs)]
    raise BadInput(
        f"--resume: {path} was trained under another configuration: {'; '.join(diffs)}. Resume with the options "
        f"it was trained with{' (it was trained with ' + ' and '.join(was) + ')' if was else ''}, or start a new run "
        f"in another --out (or this one, with --overwrite). Only {', '.join(resumable)} may change on resume."
    )


def run_differences(saved: dict, now: dict, resumable: tuple[str, ...]) -> list[str]:
    """The options on which a checkpoint's recorded run and this run differ, one phrase each
    (those in `resumable` are not compared)."""
    out = []
    other_method = saved.get("--method") != now.get("--method")
    for key in sorted(set(saved) | set(now)):
        if key in resumable or saved.get(key) == now.get(key):
            continue
        if other_method and key.startswith("--option "):
            continue  # another method has other options: listing them all would bury the point
        out.append(f"{key} {_show(saved.get(key, '(not given)'))} in the checkpoint, {_show(now.get(key, '(not given)'))} now")
    return out


def load_checkpoint(path: Path, map_location=None) -> dict:
    """A checkpoint's state, or DamagedCheckpoint saying why it cannot be used.

    Loaded with weights_only=True: a checkpoint holds only tensors and plain values (see
    rng_state), so nothing in it needs unpickling code, and a file planted in a run directory
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


def rng_state() -> dict:
    """Every RNG's state as tensors and plain values only, so that a checkpoint loads with
    weights_only=True (numpy's own state tuple holds an ndarray, which that refuses)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
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


def _first_line(error: Exception) -> str:
    return (str(error).strip().split("\n") or [""])[0][:160]


def _show(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
