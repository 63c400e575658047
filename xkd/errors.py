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
