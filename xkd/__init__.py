"""xkd: cross-lingual knowledge distillation from cached teacher outputs.

The public Python API (docs/design.md, "Python API"): open_cache, load_vocab, remap, load_student_tokenizer.
Imported lazily so that `import xkd` stays light.
"""

__version__ = "0.1.0"
__all__ = ["open_cache", "load_vocab", "remap", "load_student_tokenizer", "__version__"]


def __getattr__(name):
    if name == "open_cache":
        from .storage import open_cache

        return open_cache
    if name == "load_vocab":
        from .vocab import load_vocab

        return load_vocab
    if name == "remap":
        from .vocab import remap

        return remap
    if name == "load_student_tokenizer":
        from .vocab import load_student_tokenizer

        return load_student_tokenizer
    raise AttributeError(f"module 'xkd' has no attribute {name!r}")
