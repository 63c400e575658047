"""Stage one: read a corpus, run teachers over it on dask, and write exact caches.

Layers: corpus (readers, cleaning, shards) -> tokenize and masking (per teacher) -> batching
-> teachers (loading, inference) -> work (one shard) -> run (orchestration on dask).
See docs/pipeline.md.
"""

from .options import CacheTeachersOptions


def __getattr__(name: str):
    # The run (dask, torch) is imported when used: the CLI imports the options to build its parameters.
    if name in ("cache_teachers", "format_summary"):
        from . import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["CacheTeachersOptions", "cache_teachers", "format_summary"]
