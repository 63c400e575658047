"""The method registry.

A method is a class registered under a name. It declares what it needs from a cache (each
need names the cache-teachers option that produces it), builds its batches from cached
rows (`collate`), and computes named losses from a batch and the student (`losses`, whose
"loss" entry is optimised). The trainer knows nothing of any particular method, and no
method can load a teacher: it sees only what the cache holds.
"""

from __future__ import annotations

from ...errors import BadInput
from .base import Method, Need

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    _load_builtin()
    if name not in METHODS:
        raise BadInput(f"--method {name!r} is not a known method. Available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def available() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


def _load_builtin() -> None:
    # Importing a method module registers it; new methods add one line here.
    from . import mergedistill, mlm  # noqa: F401
    from . import mmkd  # noqa: F401
    from . import multikd, xd  # noqa: F401
    from . import tinybert  # noqa: F401


__all__ = ["METHODS", "Method", "Need", "available", "get_method", "register"]
