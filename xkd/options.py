"""Checking a numeric option's value, once for every command: a leaf (imports only errors).
Options are checked before anything is read or started, so that a NaN learning rate or a
zero token budget is one paragraph naming the option, not a NaN loss or a worker traceback."""

from __future__ import annotations

import math
import os

from .errors import BadInput


def check_number(option: str, value, *, low=None, high=None, high_open: bool = False, whole: bool = False,
                 hint: str = "") -> None:
    """One paragraph naming `option` unless `value` is a finite number (a whole one with
    `whole`) in [low, high] (or [low, high) with high_open)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not whole or isinstance(value, int))
    ok = ok and (low is None or value >= low) and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    kind = "whole number" if whole or isinstance(value, int) else "finite number"
    if high is None:
        wanted = f"a {kind} of at least {low}" if low is not None else f"a {kind}"
    else:
        wanted = f"a {kind} in [{low}, {high}{')' if high_open else ']'}"
    raise BadInput(f"{option} {value!r}: give {wanted}{' (' + hint + ')' if hint else ''}. Nothing was read or written.")


def machine_memory() -> int:
    """Bytes of physical memory on this machine: what a value's allocations are bounded by."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound known, nothing refused
        return 2**63 - 1


def size_in_words(n: float) -> str:
    """1234567890 -> "1.2 GB" (decimal units, as `df -H` and most users count)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"  # pragma: no cover


def check_memory(option: str, value, needed: float, how: str, *, largest=None, after: str = "Nothing was read or written.",
                 memory: int | None = None) -> None:
    """One paragraph naming `option` when what `value` implies, `needed` bytes (`how` says
    why), exceeds this machine's memory: such a value would die in the allocator with a
    traceback, or swap the machine to a halt, long after it was given. `largest` is the
    largest value that fits, named in the message as the bound; `value` None: `option` says
    it already ("--option head_hidden=10")."""
    memory = machine_memory() if memory is None else memory
    if needed <= memory:
        return
    bound = f" Give at most {largest:,}." if largest is not None else ""
    given = f"{option} {value!r}" if value is not None else option
    raise BadInput(f"{given}: {how} needs {size_in_words(needed)}, more than this machine's "
                   f"{size_in_words(memory)} of memory.{bound} {after}".rstrip())
