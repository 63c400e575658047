"""Quiet defaults for the libraries xkd drives, shared by the CLI and the demo."""

from __future__ import annotations

import os


def quiet_transformers_by_default() -> None:
    # transformers' load reports, notices and weight-loading bars drown xkd's own progress
    # lines; TRANSFORMERS_VERBOSITY=warning / HF_HUB_DISABLE_PROGRESS_BARS=0 bring them back.
    # Environment defaults, so they also reach dask workers started from here.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
