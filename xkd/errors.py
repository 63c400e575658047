"""The one error type users see.

A leaf module (it imports nothing), so every layer, storage included, can raise it without
depending on any other part of xkd. The CLI prints `str(error)` as one paragraph and exits
with `exit_code`: 2 for bad usage or bad input, 1 for a failure of the work.
"""


class XkdError(Exception):
    exit_code = 1


class BadInput(XkdError):
    """The user gave something unusable: a path, an option value, a file's content."""

    exit_code = 2


def from_worker(error: BaseException) -> XkdError | None:
    """An XkdError raised in a DataLoader worker process, as the training process gets it back:
    torch re-raises it with the worker's traceback as its message ("Caught BadInput in
    DataLoader worker process 0. Original Traceback ..."), and as a RuntimeError when the class
    cannot be rebuilt from one string. The user's paragraph is the last line's message; the
    class (resolved among xkd's own, never imported from elsewhere) gives the exit code."""
    import importlib
    import re

    text = str(error)
    if not text.startswith("Caught ") or "DataLoader worker process" not in text:
        return None
    found = re.search(r"\n(xkd(?:\.\w+)*)\.(\w+): (.*?)\s*\Z", text, re.DOTALL)
    if not found:
        return None
    try:
        cls = getattr(importlib.import_module(found.group(1)), found.group(2))
    except (ImportError, AttributeError):
        return None
    if not (isinstance(cls, type) and issubclass(cls, XkdError)):
        return None
    unwrapped = BadInput(found.group(3)) if issubclass(cls, BadInput) else XkdError(found.group(3))
    unwrapped.exit_code = cls.exit_code
    return unwrapped
