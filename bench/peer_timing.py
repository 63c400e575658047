"""Time against the peer recipe, measured side by side (bench name: peer_timing).

    ./dev bench peer_timing   # or: python bench/peer_timing.py [--steps 30] [--repeats 3] [--rounds 2] [--no-docs]

Every run is a whole command in a subprocess, as a user types it: wall seconds, CPU seconds
(user + system of the child and the processes it waited for, resource.getrusage(RUSAGE_CHILDREN)),
the 1-minute load average when it started and ended, and the training loop's own seconds where
the command reports them (train-student's summary: the loop and its final checkpoint;
st_baseline.py --json: the loop), so that start-up shows apart from training. The two sides run
in turns, because this machine's other jobs move a single wall time 2-4x.

(1) Peer comparison, one student each. The cache and union vocab of experiments/minilm_en_hi.py
    (its own cache-teachers and build-vocab commands: the real MiniLM over the first --pairs
    IITB training pairs), made once; then, --repeats times, A then B: A = `xkd train-student
    --method xd --option target=pooled --init-from minilm` from that cache, B = the
    sentence-transformers recipe with Normalize (experiments/st_baseline.py --normalize), its
    MiniLM teacher online. Same student, pairs, steps, batch size, learning rate, warm-up.
    Medians per side and of the per-repeat ratios A/B; the cache's one-time cost beside them.
(2) Three students: one cache against three online runs, with a teacher several times the
    student's forward cost: a random-weight BERT-base-shaped sentence encoder (12 layers,
    hidden 768, 3072 intermediate; bert-base-uncased's WordPiece vocabulary; mean pooling,
    then Normalize). Its cost against the student's (MiniLM's encoder, 6 x 384) is stated two
    ways: multiply-adds per token, and forwards over the same 16 IITB sentences timed in turns.
    xkd: cache-teachers (sentence vectors only) over steps x batch-size pairs, so that each
    student reads each cached pair once, then three xd students (seeds 0, 1, 2; a learned
    projection 384 -> 768, xd's own). Online: three recipe runs (st_baseline.py --teacher
    that encoder --normalize; a Dense 384 -> 768 before Normalize) over the same pairs.
    Order per round: cache, A1, B1, A2, B2, A3, B3; --rounds rounds; totals per side, their
    ratio, medians over rounds.

Writes its tables into docs/benchmarks.md under "## peer_timing" and the same tables into
docs/results.md under "## Time, measured side by side" (experiments/minilm_en_hi.py keeps that
section on its re-runs). With the defaults, 61 minutes on 2 CPU cores shared with other jobs
(load average about 4, each command getting about one core; 2026-12-06), less on idle cores;
--steps 3 --pairs 200 --repeats 1 --rounds 1 checks the plumbing in about 6.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import minilm_en_hi as experiment  # noqa: E402  (its cache and vocab commands, its subprocess clock)
from train import forward_macs  # noqa: E402  (bench/train.py: multiply-adds of a BERT forward)

from xkd.names import resolve_teacher  # noqa: E402

from storage import machine, write_section  # noqa: E402  (bench/storage.py: shared report helpers)

XKD, BASELINE, IITB = experiment.XKD, experiment.BASELINE, experiment.IITB
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TEACHER_VOCAB = experiment.DATA / "vocab" / "bert-base-uncased.vocab.txt"
SEEDS = (0, 1, 2)  # the three students of part (2)
FORWARD_ROUNDS = 10
TARGET_THREE = 0.5  # issue 24: three students from one cache at most half the online runs' cost
RESULTS = ROOT / "docs" / "results.md"
RESULTS_HEADING = "## Time, measured side by side"

STARTED = time.perf_counter()


def say(msg: str) -> None:
    print(f"peer_timing bench [{time.perf_counter() - STARTED:4.0f} s]: {msg}", file=sys.stderr, flush=True)


def timed(argv: list, log: list) -> dict:
    """One command through the experiment's clock (wall, CPU, load at the end), plus the load
    at its start, the loop seconds the command reports and, of those, the online teacher's."""
    load = os.getloadavg()[0]
    result, entry = experiment.run(argv, log)
    result = result or {}
    return {**entry, "load_start": round(load, 1), "loop": result.get("seconds"), "teacher": result.get("teacher_seconds")}


def common(args, seed: int) -> list:
    """What both sides share: steps, batch, learning rate, warm-up, seed."""
    return ["--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr, "--warmup", "0.1",
            "--log-every", 5, "--seed", seed, "--json"]


def xd_student(args, cache: str, vocab: Path, out: Path, seed: int, log: list) -> dict:
    entry = timed([XKD, "train-student", "--method", "xd", "--option", "target=pooled", "--caches", cache, "--vocab", vocab,
                   "--init-from", "minilm", *common(args, seed), "--out", out, "--overwrite"], log)
    # Its loop seconds include writing this resumable checkpoint (weights and optimiser state).
    entry["checkpoint_mb"] = experiment.dir_bytes(out / "checkpoints") / 1e6
    shutil.rmtree(out)  # about a GB a student, of no use here
    return entry


def recipe_student(args, cache: str, vocab: Path, out: Path, seed: int, log: list, teacher: str = "minilm") -> dict:
    entry = timed([sys.executable, BASELINE, "--cache", cache, "--vocab", vocab, "--teacher", teacher, "--normalize",
                   *common(args, seed), "--out", out], log)
    shutil.rmtree(out)
    return entry


# (1) Peer comparison -----------------------------------------------------------------------------


def peer(args, work: Path, log: list) -> dict:
    say(f"(1) the MiniLM cache over {args.pairs} IITB pairs and the union vocab, as experiments/minilm_en_hi.py makes them")
    load = os.getloadavg()[0]
    cache_info, cache_timing = experiment.cache_teacher(args, work, log)
    cache_timing = {**cache_timing, "load_start": round(load, 1)}
    vocab = experiment.build_vocab(work, log)
    runs: dict = {"xd": [], "recipe": []}
    for i in range(args.repeats):
        say(f"(1) repeat {i + 1} of {args.repeats}: A (xd), then B (recipe + Normalize)")
        runs["xd"].append(xd_student(args, cache_info["path"], vocab, work / f"peer-xd-{i}", 0, log))
        runs["recipe"].append(recipe_student(args, cache_info["path"], vocab, work / f"peer-recipe-{i}", 0, log))
    return {"cache": cache_timing, "rows": cache_info["rows"], "vocab": vocab, "runs": runs}


# (2) Three students, a BERT-base-size teacher ----------------------------------------------------


def build_teacher(out: Path) -> Path:
    """A random-weight BERT-base-shaped encoder with bert-base-uncased's WordPiece tokenizer,
    saved as a sentence-transformers directory: mean pooling, then Normalize, like MiniLM. The
    module files are MiniLM's own (sentence-transformers 5's layout), with this model's width."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=str(TEACHER_VOCAB), do_lower_case=True)  # vocab_file= is ignored in transformers 5
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **BERT_BASE)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    minilm = resolve_teacher("minilm").path
    shutil.copy(minilm / "modules.json", out / "modules.json")
    (out / "1_Pooling").mkdir()
    pooling = json.loads((minilm / "1_Pooling" / "config.json").read_text())
    (out / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "word_embedding_dimension": config.hidden_size}))
    # 128 tokens, as cache-teachers' --max-length and xd's student read.
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    return out


def english_batch(n: int, max_words: int) -> list[str]:
    """The first n IITB English training sentences with 3..max_words words (as the caches keep them)."""
    batch = []
    with open(IITB / "train.en", encoding="utf-8") as f:
        for line in f:
            if 3 <= len(line.split()) <= max_words:
                batch.append(line.strip())
                if len(batch) == n:
                    return batch
    return batch


def forward_cost(teacher_dir: Path, args) -> dict:
    """Teacher against student forward cost: multiply-adds per token from the configs, and
    forwards over the same batch of English sentences timed in turns (inference mode, each
    model with its own tokenizer). One torch thread: on shared cores a second thread's waits
    made the small student's forward erratic (936 ms once, 61 ms in a quieter minute)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    texts = english_batch(args.batch_size, args.max_words)
    models = {}
    for name, path in (("teacher", teacher_dir), ("student", resolve_teacher("minilm").path)):
        model = AutoModel.from_pretrained(str(path)).eval()
        inputs = AutoTokenizer.from_pretrained(str(path))(texts, padding=True, truncation=True, max_length=128,
                                                          return_tensors="pt")
        models[name] = (model, inputs)
    times: dict = {name: [] for name in models}
    with torch.inference_mode():
        for model, inputs in models.values():  # warm-up
            model(**inputs)
        for _ in range(FORWARD_ROUNDS):
            for name, (model, inputs) in models.items():
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    macs = {name: forward_macs(model.config, 1, 0) for name, (model, _) in models.items()}
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {"macs": macs, "seconds": seconds, "texts": len(texts),
            "tokens": int(models["teacher"][1]["attention_mask"].sum())}


def three_students(args, vocab: Path, work: Path, log: list) -> dict:
    say("(2) building the BERT-base-size teacher and timing its forward against the student's")
    teacher = str(build_teacher(work / "bert-base-random"))
    cost = forward_cost(Path(teacher), args)
    pairs = args.steps * args.batch_size
    corpus = f"parallel:{IITB}/train.en@en,{IITB}/train.hi@hi"
    rounds = []
    for r in range(args.rounds):
        say(f"(2) round {r + 1} of {args.rounds}: cache-teachers over {pairs} pairs, then A, B three times")
        out = work / f"three-{r}"
        load = os.getloadavg()[0]
        cached, entry = experiment.run([XKD, "cache-teachers", "--teacher", teacher, "--corpus", corpus,
                                        "--out", out / "caches", "--sides", "src", "--max-pairs", pairs, "--min-tokens", 3,
                                        "--max-tokens", args.max_words, "--sentence", "pooled", "--shard-size", 1024,
                                        "--json"], log)
        cache = cached["caches"][0]["path"]
        runs = {"cache": {**entry, "load_start": round(load, 1), "loop": None, "teacher": None}, "xd": [], "recipe": []}
        for seed in SEEDS:
            runs["xd"].append(xd_student(args, cache, vocab, out / f"xd-{seed}", seed, log))
            runs["recipe"].append(recipe_student(args, cache, vocab, out / f"recipe-{seed}", seed, log, teacher))
        rounds.append(runs)
    return {"cost": cost, "pairs": pairs, "rounds": rounds}


# Report --------------------------------------------------------------------------------------

RUN_TABLE = ["| run | wall s | CPU s | loop s | of it, online teacher s | load at start | load at end |",
             "|---|---:|---:|---:|---:|---:|---:|"]


def med(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_rows(label: str, runs: list[dict]) -> list[str]:
    return [f"| {label} {i + 1} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {num(r['loop'])} | {num(r.get('teacher'))} | "
            f"{r['load_start']} | {r['load']} |" for i, r in enumerate(runs)]


def median_row(label: str, runs: list[dict]) -> str:
    return (f"| **median {label}** | **{med(runs, 'seconds'):.1f}** | **{med(runs, 'cpu_seconds'):.1f}** | "
            f"{num(med(runs, 'loop'))} | {num(med(runs, 'teacher'))} | | |")


def where_time_goes(xd: list[dict], recipe: list[dict]) -> str:
    """Medians of what each command's wall time is made of, from its own report of its loop."""
    def startup(runs):
        return med([{"s": r["seconds"] - r["loop"]} for r in runs if r["loop"] is not None], "s")

    return (f"Where the time goes (medians): start-up and saving (wall s − loop s) xd {num(startup(xd))} s, recipe "
            f"{num(startup(recipe))} s; the loop xd {num(med(xd, 'loop'))} s (with writing its "
            f"{med(xd, 'checkpoint_mb'):.0f} MB resumable checkpoint: weights and AdamW state), recipe "
            f"{num(med(recipe, 'loop'))} s, of which its online teacher's forwards {num(med(recipe, 'teacher'))} s.")


def peer_report(p: dict, args) -> list[str]:
    xd, recipe, cache = p["runs"]["xd"], p["runs"]["recipe"], p["cache"]
    ratio = {key: statistics.median(a[key] / b[key] for a, b in zip(xd, recipe)) for key in ("seconds", "cpu_seconds")}
    return [
        f"### One student each: xd against the recipe, alternated ({args.repeats} repeats)",
        "",
        f"The MiniLM teacher (the real one) over the first {args.pairs} IITB training pairs ({p['rows']} cached rows), the "
        f"union vocab and the commands of experiments/minilm_en_hi.py; {args.steps} steps of {args.batch_size}, lr "
        f"{args.lr}, warm-up 0.1, seed 0, both sides. A: `xkd train-student --method xd --option target=pooled "
        "--init-from minilm`; B: `python experiments/st_baseline.py --normalize` (sentence-transformers' MSELoss, "
        "the MiniLM teacher online, Normalize on the student). Run in turns A B A B ...; loop s is the training loop as the "
        "command reports it (train-student: with its final checkpoint), the rest of wall s is start-up and saving.",
        "",
        *RUN_TABLE,
        *run_rows("A: xd", xd),
        *run_rows("B: recipe + Normalize", recipe),
        median_row("A: xd", xd),
        median_row("B: recipe + Normalize", recipe),
        "",
        f"A/B per repeat, median: **{ratio['seconds']:.2f}x wall, {ratio['cpu_seconds']:.2f}x CPU**. "
        + where_time_goes(xd, recipe) + " The cache, paid once for any number of students: cache-teachers "
        f"{cache['seconds']:.1f} s wall, {cache['cpu_seconds']:.1f} s CPU (load {cache['load_start']} -> {cache['load']}).",
    ]


def three_report(t: dict, args) -> list[str]:
    cost = t["cost"]
    macs = cost["macs"]["teacher"] / cost["macs"]["student"]
    timed_ratio = cost["seconds"]["teacher"] / cost["seconds"]["student"]
    totals = []
    for runs in t["rounds"]:
        xkd = {k: runs["cache"][k] + sum(r[k] for r in runs["xd"]) for k in ("seconds", "cpu_seconds")}
        online = {k: sum(r[k] for r in runs["recipe"]) for k in ("seconds", "cpu_seconds")}
        loads = [runs["cache"]["load_start"]] + [r[k] for r in runs["xd"] + runs["recipe"] for k in ("load_start", "load")]
        totals.append({"xkd": xkd, "online": online, "load": (min(loads), max(loads)),
                       "ratio": {k: xkd[k] / online[k] for k in xkd}})
    ratio = {k: statistics.median(r["ratio"][k] for r in totals) for k in ("seconds", "cpu_seconds")}
    met = "met" if max(ratio.values()) <= TARGET_THREE else "MISSED"
    xd = [r for runs in t["rounds"] for r in runs["xd"]]
    recipe = [r for runs in t["rounds"] for r in runs["recipe"]]
    caches = [runs["cache"] for runs in t["rounds"]]
    lines = [
        f"### Three students: one cache against three online runs ({args.rounds} rounds)",
        "",
        "Teacher: a random-weight BERT-base-shaped sentence encoder (12 layers, hidden 768, 12 heads, intermediate 3072; "
        "bert-base-uncased's WordPiece vocabulary; mean pooling, then Normalize). Its forward costs "
        f"**{macs:.1f}x** the student's (MiniLM's encoder, 6 layers, hidden 384) in multiply-adds per token, and "
        f"**{timed_ratio:.1f}x** timed: {cost['seconds']['teacher'] * 1000:.0f} ms against "
        f"{cost['seconds']['student'] * 1000:.0f} ms for one batch of {cost['texts']} IITB English sentences "
        f"({cost['tokens']} teacher tokens), medians of {FORWARD_ROUNDS} forwards in turns on one torch thread. xkd: "
        f"`xkd cache-teachers --sentence pooled` over the first {t['pairs']} IITB pairs ({args.steps} steps x "
        f"{args.batch_size}: each student reads each cached pair once), then three `train-student --method xd --option "
        "target=pooled --init-from minilm` runs (seeds 0, 1, 2; xd learns a projection 384 -> 768). Online: three "
        "`st_baseline.py --teacher DIR --normalize` runs (seeds 0, 1, 2; a Dense 384 -> 768 before Normalize), the "
        f"teacher run on every batch. Same pairs, student, steps, batch size, lr {args.lr}. Order in each round: cache, "
        "A1, B1, A2, B2, A3, B3.",
        "",
        "| round | xkd: cache + 3 x xd, wall s | CPU s | online: 3 x recipe, wall s | CPU s | xkd / online, wall | CPU | "
        "load (min - max) |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(totals):
        lines.append(f"| {i + 1} | {r['xkd']['seconds']:.0f} | {r['xkd']['cpu_seconds']:.0f} | {r['online']['seconds']:.0f} | "
                     f"{r['online']['cpu_seconds']:.0f} | {r['ratio']['seconds']:.2f}x | {r['ratio']['cpu_seconds']:.2f}x | "
                     f"{r['load'][0]} - {r['load'][1]} |")
    lines += [
        f"| **median** | | | | | **{ratio['seconds']:.2f}x** | **{ratio['cpu_seconds']:.2f}x** | |",
        "",
        f"Target <= {TARGET_THREE}x: {met}. " + where_time_goes(xd, recipe) + " cache-teachers: "
        f"{med(caches, 'seconds'):.1f} s wall, {med(caches, 'cpu_seconds'):.1f} s CPU. The runs:",
        "",
        *RUN_TABLE,
    ]
    for i, runs in enumerate(t["rounds"]):
        lines += run_rows(f"round {i + 1}: cache-teachers", [runs["cache"]])
        lines += run_rows(f"round {i + 1}: A xd", runs["xd"]) + run_rows(f"round {i + 1}: B recipe", runs["recipe"])
    lines += [median_row("A: xd", xd), median_row("B: recipe + Normalize", recipe)]
    return lines


def report(p: dict, t: dict, seconds: float, load: tuple[float, float], args) -> list[str]:
    return [
        f"Run with `./dev bench peer_timing --steps {args.steps} --repeats {args.repeats} --rounds {args.rounds}` "
        f"(bench/peer_timing.py) on {datetime.date.today().isoformat()}, {machine()}; {seconds / 60:.0f} min. The "
        f"machine was shared with other jobs (load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, over "
        "the last minute), so the two sides of every comparison ran in turns, and CPU s (user + system of the "
        "command and the processes it waited for) is given beside wall s; compare ratios, not absolute seconds.",
        "",
        *peer_report(p, args),
        "",
        *three_report(t, args),
        "",
    ]


def write_results(body: list[str]) -> None:
    """The same tables in docs/results.md: replace the section under RESULTS_HEADING, or put it
    before the hand-written '## Reading the numbers'."""
    text = "\n".join([RESULTS_HEADING, "", "Written by `./dev bench peer_timing` (docs/benchmarks.md, \"## peer_timing\").",
                      "", *body])
    current = RESULTS.read_text()
    if RESULTS_HEADING + "\n" in current:
        write_section(text, RESULTS)
    else:
        at = current.index(experiment.HAND_WRITTEN)
        RESULTS.write_text(current[:at] + text + "\n" + current[at:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000, help="(1): IITB training pairs the MiniLM cache holds")
    parser.add_argument("--steps", type=int, default=30, help="training steps per student, both parts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", default="1e-3")
    parser.add_argument("--max-words", type=int, default=24, help="longest side of a cached pair, in words")
    parser.add_argument("--repeats", type=int, default=3, help="(1): A B pairs")
    parser.add_argument("--rounds", type=int, default=2, help="(2): rounds of cache + three students against three online runs")
    parser.add_argument("--no-docs", action="store_true", help="print the tables only")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    log: list = []
    with tempfile.TemporaryDirectory(prefix="xkd-bench-peer-") as tmp:
        work = Path(tmp)
        p = peer(args, work, log)
        t = three_students(args, p["vocab"], work, log)
    body = report(p, t, time.perf_counter() - STARTED, (load_start, os.getloadavg()[0]), args)
    text = "\n".join(["## peer_timing", "", *body])
    print(text)
    if not args.no_docs:
        write_section(text)
        write_results(body)
        say("wrote '## peer_timing' in docs/benchmarks.md and '" + RESULTS_HEADING + "' in docs/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
