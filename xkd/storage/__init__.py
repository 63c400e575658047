"""The cache format (docs/design.md, "The cache"). Imports nothing else of xkd but the leaves
xkd.errors and xkd.durable."""

from .completeness import completeness, finish_command
from .inspect import format_inspect, inspect_cache
from .manifest import cache_key, read_manifest
from .reader import Block, Cache, open_cache
from .schema import SCHEMA_VERSION, DenseSpec, Ragged
from .shard import write_shard_files
from .verify import format_problems, format_verdict, verify_cache
from .view import CacheView, corpus_identity, view_of
from .writer import CacheWriter, outputs_json

__all__ = [
    "SCHEMA_VERSION", "Block", "Cache", "CacheView", "CacheWriter", "corpus_identity", "DenseSpec", "Ragged", "cache_key",
    "completeness", "finish_command", "format_inspect", "format_problems", "format_verdict", "inspect_cache",
    "open_cache", "outputs_json",
    "read_manifest", "verify_cache", "view_of", "write_shard_files",
]
