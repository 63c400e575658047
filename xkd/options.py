"""Checking a numeric option's value, once for every command: a leaf (imports only errors).
Options are checked before anything is read or started, so that a NaN learning rate or a
zero token budget is one paragraph naming the option, not a NaN loss or a worker traceback."""

from __future__ import annotations

import math

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
