"""Stage one: read a corpus, run teachers over it on dask, and write exact caches.

Layers: corpus (readers, cleaning, shards) -> tokenize and masking (per teacher) -> batching
-> teachers (loading, inference) -> work (one shard) -> run (orchestration on dask).
See docs/pipeline.md.
"""

from .run import CacheTeachersOptions, cache_teachers, format_summary

__all__ = ["CacheTeachersOptions", "cache_teachers", "format_summary"]
