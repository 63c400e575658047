"""What `xkd verify CACHE --teacher T` costs, and how far wrong teachers land from its tolerances
(bench name: verify).

    ./dev bench verify     # or: python bench/verify.py [--pairs N] [--repeats R] [--tolerance-rows N] [--no-docs]

Two teachers, each caching Tatoeba's English-Hindi pairs (both sides) with the real pipeline:
  - minilm: the real pretrained MiniLM (xkd.names.resolve_teacher("minilm"), an encoder; its
    default outputs, `cls` and `pooled`);
  - mlm: a random BertForMaskedLM (bert-base-uncased vocabulary, width 256, 4 layers; built as
    tests/conftest.py build_tiny_bert does, wide enough that its forward is not negligible), with
    top-8, --sample 8 and the hidden states of layers 0 and 4.

Cost. Per teacher, in turns (A B A B ..., so that other jobs' load falls on both sides alike),
--repeats times: (A) cache-teachers making the whole cache on a warm one-worker LocalCluster
(the teacher already loaded there by a warm-up run, as bench/cache_teachers.py does): the
baseline, as time per row; the teacher's load alone (describe_teacher + LoadedTeacher); and
(B) recheck_cache in this process on N = 64, 256, 1000 and all rows of that cache (fp32, CPU;
each call loads the teacher anew, as the command does). Medians of wall and CPU seconds (user +
system of this process and of the cluster's worker processes). Then once per teacher: a
re-check of all rows with every outermost torch module call timed (global forward hooks), which
splits it into the time before the first forward (resolve, hash, load, read rows), the
forward passes and the rest (comparison); and the whole CLI command in a subprocess (Python
start, imports and the integrity check included; CPU of the child process), with and without
--teacher.

Tolerance. recheck_cache's largest difference / tolerance over --tolerance-rows rows, for the
right teacher, a re-saved copy of it, another checkpoint of the architecture (mlm: another
seed; minilm: a random initialisation of its config), and the right weights with 1% and 0.1%
noise (of the matrix's own spread) on one matrix (layer 1's feed-forward output), against an
fp32 cache and one computed in fp16 (cache-teachers --dtype fp16; the re-run is fp32 on CPU).
Writes its tables into docs/benchmarks.md under "## verify".
"""

from __future__ import annotations

import argparse
import datetime
import io
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from xkd.names import resolve_teacher  # noqa: E402
from xkd.pipeline import CacheTeachersOptions, cache_teachers  # noqa: E402
from xkd.pipeline.recheck import recheck_cache  # noqa: E402
from xkd.pipeline.teachers import LoadedTeacher, describe_teacher  # noqa: E402

from conftest import TATOEBA, VOCABS, build_tiny_bert  # noqa: E402
from storage import machine, write_section  # noqa: E402  (bench/storage.py: shared report helpers)

ROW_COUNTS = (64, 256, 1000)  # and all rows
OPTIONS = {
    "minilm": {},  # an encoder's defaults: cls and pooled
    "mlm": {"topk": 8, "sample": 8, "hidden_layers": (0, 4)},
}
MLM_SHAPE = {"hidden": 256, "layers": 4, "heads": 4}
SHARD_SIZE = 512
NOISED_LAYER = 1


# Measuring ---------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of every live process under it (the
    LocalCluster's nanny and worker)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def timed(fn, *args):
    """(wall seconds, CPU seconds, fn(*args))."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn(*args)
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


class ForwardClock:
    """Wall time inside outermost torch module calls (the network's forward passes), by module
    class, and when the first began: global forward hooks, kept only for one breakdown run."""

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.depth, self.began, self.first = 0, 0.0, None
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.handles = [register_module_forward_pre_hook(self._enter), register_module_forward_hook(self._leave)]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _enter(self, module, args):
        if self.depth == 0:
            self.began = time.perf_counter()
            self.first = self.first or self.began
        self.depth += 1

    def _leave(self, module, args, output):
        self.depth -= 1
        if self.depth == 0:
            name = type(module).__name__
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self.began
            self.calls[name] = self.calls.get(name, 0) + 1


def median_of(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


# Teachers and caches -----------------------------------------------------------------------


def make_cache(client, teacher: str, name: str, out: Path, pairs: int, dtype: str = "fp32") -> dict:
    opts = CacheTeachersOptions(teachers=[teacher], corpus=TATOEBA, out=str(out), sides="both", max_pairs=pairs,
                                shard_size=SHARD_SIZE, dtype=dtype, **OPTIONS[name])
    return cache_teachers(opts, client=client, log=io.StringIO())["caches"][0]


def copy_extras(src: Path, out: Path) -> None:
    """A teacher directory's files other than its weights and config (tokenizer, pooling)."""
    for f in src.iterdir():
        if f.name == "config.json" or f.name.endswith(".safetensors") or (out / f.name).exists():
            continue
        (shutil.copytree if f.is_dir() else shutil.copy)(f, out / f.name)


def variant(src: Path, out: Path, kind: str, noise: float = 0.0, fresh_seed: int | None = None, **save) -> Path:
    """Teacher `src` saved anew by transformers: as it is, with `noise` x its own spread added to
    one matrix (layer NOISED_LAYER's feed-forward output), or re-initialised from its config."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    auto = transformers.AutoModelForMaskedLM if kind == "mlm" else transformers.AutoModel
    if fresh_seed is not None:
        torch.manual_seed(fresh_seed)
        model = auto.from_config(transformers.AutoConfig.from_pretrained(src))
    else:
        model = auto.from_pretrained(src)
    if noise:
        with torch.no_grad():
            weight = model.base_model.encoder.layer[NOISED_LAYER].output.dense.weight
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * noise)
    model.save_pretrained(out, **save)
    copy_extras(src, out)
    return out


def variants(teachers: dict[str, str], work: Path) -> dict[str, dict[str, str]]:
    """Per teacher: the right one and the four wrong-or-not ones the tolerance table runs."""
    out = {}
    for name, path in teachers.items():
        kind = "mlm" if name == "mlm" else "encoder"
        src, root = Path(path), work / f"variants-{name}"
        if name == "mlm":
            other = build_tiny_bert(root / "other", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=2,
                                    init_range=0.2, **MLM_SHAPE)
        else:
            other = variant(src, root / "other", kind, fresh_seed=2)
        out[name] = {
            "right": str(src),
            "resaved": str(variant(src, root / "resaved", kind, max_shard_size="20MB")),  # sharded: other files, other hash
            "other": str(other),
            "noise 1%": str(variant(src, root / "noise-1", kind, noise=1e-2)),
            "noise 0.1%": str(variant(src, root / "noise-0.1", kind, noise=1e-3)),
        }
    return out


# The runs ----------------------------------------------------------------------------------


def load_teacher(teacher: str) -> None:
    LoadedTeacher(describe_teacher(resolve_teacher(teacher)), "cpu", "fp32")


def recheck(cache: str, teacher: str, rows: int, seen: dict) -> dict:
    """recheck_cache on CPU; `seen` keeps the largest difference / tolerance of the right teacher's
    runs (and whether any failed), which the report states."""
    report = recheck_cache(cache, teacher, rows=rows, device="cpu")
    output, top = max(report["outputs"].items(), key=lambda kv: kv[1]["worst"]["ratio"])
    if top["worst"]["ratio"] > seen.get("ratio", -1.0):
        seen.update(ratio=float(top["worst"]["ratio"]), output=output, rows=report["rows"])
    seen["failed"] = seen.get("failed", 0) + (not report["ok"])
    return report


def cost_runs(client, teachers: dict[str, str], work: Path, args, say) -> tuple[dict, dict]:
    """A (cache-teachers), load, B (re-check of each N) per teacher, in turns, --repeats times."""
    runs: dict = {name: {"make": [], "load": [], **{n: [] for n in (*ROW_COUNTS, "all")}, "right": {}} for name in teachers}
    caches: dict = {}
    for name, teacher in teachers.items():
        make_cache(client, teacher, name, work / "warm", 32)  # the worker loads the teacher once
    for repeat in range(args.repeats):
        for name, teacher in teachers.items():
            say(f"repeat {repeat + 1} of {args.repeats}: {name}: cache-teachers, load, re-checks ...")
            wall, cpu, info = timed(make_cache, client, teacher, name, work / f"caches-{repeat}", args.pairs)
            runs[name]["make"].append((wall, cpu))
            if name not in caches:
                caches[name] = info
            wall, cpu, _ = timed(load_teacher, teacher)
            runs[name]["load"].append((wall, cpu))
            for n in (*ROW_COUNTS, "all"):
                rows = info["rows"] if n == "all" else n
                wall, cpu, _ = timed(recheck, info["path"], teacher, rows, runs[name]["right"])
                runs[name][n].append((wall, cpu))
        if repeat:  # the first repeat's caches are the ones the rest of the bench reads
            shutil.rmtree(work / f"caches-{repeat}", ignore_errors=True)
    return runs, caches


def breakdown(cache: dict, teacher: str, rows: int, seen: dict) -> dict:
    """One re-check of `rows` rows with the forward passes timed."""
    start = time.perf_counter()
    with ForwardClock() as clock:
        report = recheck(cache["path"], teacher, rows, seen)
    total = time.perf_counter() - start
    before = (clock.first or start) - start
    forward = sum(clock.seconds.values())
    return {"rows": report["rows"], "total": total, "before": before, "forward": forward, "rest": total - before - forward,
            "calls": clock.calls, "seconds": clock.seconds, "values": sum(o["values"] for o in report["outputs"].values())}


# What the command imports before it can load a BERT: its own start (the integrity-only run imports no torch)
IMPORTS = "import torch, transformers, xkd.pipeline.recheck; from transformers import BertModel"


def cli_run(args: list[str]) -> dict:
    """`python ARGS` in a subprocess (the whole command: `-m xkd.cli ...`): wall and its CPU
    seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"xkd {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return {"wall": wall, "cpu": cpu}


def tolerance_table(client, teachers: dict[str, str], caches: dict, work: Path, args, say) -> dict:
    """Per teacher, cache dtype and variant: (largest ratio, its output, ok)."""
    table: dict = {}
    teacher_variants = variants(teachers, work)
    for name, teacher in teachers.items():
        say(f"tolerance: {name}: an fp16 cache, then {len(teacher_variants[name])} teachers against each cache ...")
        fp16 = make_cache(client, teacher, name, work / "caches-fp16", args.pairs, dtype="fp16")
        for dtype, cache in (("fp32", caches[name]), ("fp16", fp16)):
            for label, path in teacher_variants[name].items():
                report = recheck_cache(cache["path"], path, rows=args.tolerance_rows, device="cpu")
                output, top = max(report["outputs"].items(), key=lambda kv: kv[1]["worst"]["ratio"])
                table[(name, dtype, label)] = {"ratio": float(top["worst"]["ratio"]), "output": output, "ok": report["ok"],
                                               "rows": report["rows"], "differing": report["differing_rows"]}
    return table


# The report --------------------------------------------------------------------------------


def describe_cache(name: str, info: dict) -> str:
    what = ("the real MiniLM-L6-H384 (`minilm`, an encoder): `cls` and `pooled`" if name == "minilm" else
            f"a random BertForMaskedLM (bert-base-uncased vocabulary, width {MLM_SHAPE['hidden']}, {MLM_SHAPE['layers']} "
            "layers): top-8, `--sample 8`, hidden states of layers 0 and 4")
    return f"{name}: {what}; {info['rows']:,} rows, {info['tokens']:,} tokens, {info.get('masked', 0):,} masked positions"


def cost_lines(runs: dict, caches: dict, cli: dict) -> list[str]:
    lines = [
        "| teacher | run | rows | wall s | CPU s | ms per row (wall) | / cache-teachers for those rows |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in runs:
        total = caches[name]["rows"]
        make_wall, make_cpu = median_of(runs[name]["make"])
        per_row = make_wall / total
        lines.append(f"| {name} | (A) cache-teachers, warm cluster | {total:,} | {make_wall:.2f} | {make_cpu:.2f} | "
                     f"{1e3 * per_row:.2f} | 1.00x |")
        load_wall, load_cpu = median_of(runs[name]["load"])
        lines.append(f"| {name} | teacher load alone (describe + LoadedTeacher) | | {load_wall:.2f} | {load_cpu:.2f} | | |")
        for n in (*ROW_COUNTS, "all"):
            rows = total if n == "all" else min(n, total)
            wall, cpu = median_of(runs[name][n])
            lines.append(f"| {name} | (B) recheck_cache, {'all' if n == 'all' else n} rows | {rows:,} | {wall:.2f} | "
                         f"{cpu:.2f} | {1e3 * wall / rows:.2f} | {wall / (per_row * rows):.1f}x |")
        for label, key in (("`xkd verify CACHE` (integrity only)", "plain"), ("`xkd verify CACHE --teacher T --rows 64`",
                                                                               "teacher"),
                           ("`python -c` importing torch, transformers' BERT and xkd's re-check, nothing else", "imports")):
            lines.append(f"| {name} | CLI once: {label} | {64 if key == 'teacher' else ''} | {cli[name][key]['wall']:.2f} | "
                         f"{cli[name][key]['cpu']:.2f} | | |")
    return lines


def marginal_lines(runs: dict, caches: dict) -> list[str]:
    out = []
    for name in runs:
        total = caches[name]["rows"]
        first, last = median_of(runs[name][ROW_COUNTS[0]])[0], median_of(runs[name]["all"])[0]
        marginal = (last - first) / (total - ROW_COUNTS[0])
        per_row = median_of(runs[name]["make"])[0] / total
        out.append(f"{name}: {1e3 * marginal:.2f} ms a row beyond the first {ROW_COUNTS[0]} (all rows less {ROW_COUNTS[0]} "
                   f"rows, medians), {marginal / per_row:.1f}x cache-teachers' {1e3 * per_row:.2f} ms a row")
    return out


def right_line(runs: dict) -> str:
    said = []
    for name in runs:
        seen = runs[name]["right"]
        verdict = "all passed" if not seen["failed"] else f"**{seen['failed']} FAILED**"
        said.append(f"{name}: {verdict}; the largest difference {seen['ratio']:.3g} of its tolerance ({seen['output']}, in a "
                    f"re-check of {seen['rows']:,} rows)")
    return "Every re-check above is of the teacher that made the cache: " + "; ".join(said) + "."


def dominant_lines(runs: dict, cli: dict, parts: dict) -> list[str]:
    """What dominates, said from the measurements: in process, at the fewest and at all rows; and the CLI's start."""
    out = []
    names = {"before": "resolving, hashing and loading the teacher and reading the rows", "forward": "the forward passes",
             "rest": "the comparison"}
    for (name, _), p in parts.items():
        top = max(names, key=lambda k: p[k])
        out.append(f"{name}, {p['rows']:,} rows in process: most of the time goes to {names[top]} "
                   f"({100 * p[top] / p['total']:.0f}%).")
    for name in cli:
        extra = cli[name]["teacher"]["wall"] - median_of(runs[name][ROW_COUNTS[0]])[0]
        out.append(f"{name}, the CLI with --rows {ROW_COUNTS[0]}: {cli[name]['teacher']['wall']:.1f} s, of which "
                   f"{extra:.1f} s more than the in-process re-check of as many rows; importing torch and transformers "
                   f"alone takes {cli[name]['imports']['wall']:.1f} s and the integrity check's whole command "
                   f"{cli[name]['plain']['wall']:.1f} s.")
    return out


def breakdown_lines(parts: dict) -> list[str]:
    lines = [
        "| teacher | rows | re-check wall s | before the first forward (resolve, hash, load, read rows) | forward passes "
        "(outermost module calls) | comparison and the rest |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for (name, _), p in parts.items():
        calls = ", ".join(f"{cls} x{n}: {p['seconds'][cls]:.2f} s" for cls, n in p["calls"].items())
        before, forward, rest = (f"{p[k]:.2f} s ({100 * p[k] / p['total']:.0f}%)" for k in ("before", "forward", "rest"))
        lines.append(f"| {name} | {p['rows']:,} | {p['total']:.2f} | {before} | {forward}: {calls} | {rest} |")
    return lines


LABELS = ("right", "resaved", "other", "noise 1%", "noise 0.1%")
LABEL_TEXT = {
    "right": "the teacher that made the cache",
    "resaved": "a re-saved copy (sharded safetensors: another hash)",
    "other": "another checkpoint (mlm: seed 2; minilm: its config initialised at random)",
    "noise 1%": f"1% noise on one matrix (layer {NOISED_LAYER + 1}'s feed-forward output)",
    "noise 0.1%": "0.1% noise on that matrix",
}


def tolerance_lines(table: dict, teachers: list[str]) -> list[str]:
    columns = [(name, dtype) for name in teachers for dtype in ("fp32", "fp16")]
    lines = [
        "| teacher given | " + " | ".join(f"{name}, {dtype} cache" for name, dtype in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label in LABELS:
        cells = []
        for key in columns:
            r = table[(*key, label)]
            verdict = "pass" if r["ok"] else f"**fails** ({r['differing']}/{r['rows']} rows)"
            cells.append(f"{r['ratio']:.3g} ({r['output']}): {verdict}")
        lines.append(f"| {LABEL_TEXT[label]} | " + " | ".join(cells) + " |")
    return lines


def report(runs: dict, caches: dict, cli: dict, parts: dict, table: dict, args, seconds: float, loads: dict,
           threads: int) -> str:
    lines = [
        "## verify",
        "",
        f"Run with `./dev bench verify` (bench/verify.py) on {datetime.date.today().isoformat()}, {machine()}, CPU only, "
        f"{threads} torch threads; {seconds:.0f} s. The machine was shared with other jobs (load average "
        f"{loads['start']:.1f} at the start, {loads['end']:.1f} at the end, over the last 5 minutes), so (A) and (B) run "
        f"in turns and each number is the median of {args.repeats} runs; CPU seconds are user + system of this "
        "process and the cluster's worker (CLI: of the child process). Compare the ratios, not the absolute times.",
        f"Caches (Tatoeba en-hi, {args.pairs:,} pairs, both sides, shards of {SHARD_SIZE} pairs, fp32):",
        "",
        *[f"- {describe_cache(name, caches[name])}." for name in caches],
        "",
        "Cost of the re-check against the cache-teachers run that made the rows (its time per row x the rows "
        "re-checked). recheck_cache loads the teacher on every call (as the command does); the cluster had loaded it "
        "before (A) began, so (A) is the per-row cost of making rows and (B) includes one load:",
        "",
        *cost_lines(runs, caches, cli),
        "",
        "Per-row cost once the teacher is loaded: " + "; ".join(marginal_lines(runs, caches)) + ".",
        "",
        right_line(runs),
        "",
        f"Where a re-check of {ROW_COUNTS[0]} rows and of every row goes (one run each, with every outermost torch module "
        "call timed by global forward hooks):",
        "",
        *breakdown_lines(parts),
        "",
        *[f"- {line}" for line in dominant_lines(runs, cli, parts)],
        "",
        f"How far each teacher lands from the tolerances: the largest difference / tolerance over every output of "
        f"{args.tolerance_rows} rows (its output), and the verdict (exit 1 with rows differing of rows re-run). The "
        "fp16 cache is cache-teachers --dtype fp16 on CPU over the same pairs; the re-run is fp32 on CPU in every "
        "column, so the fp16 columns' tolerances carry fp16's unit roundoff (2^-11 against fp32's 2^-24):",
        "",
        *tolerance_lines(table, list(caches)),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1000, help="Tatoeba pairs cached (both sides: twice the rows)")
    parser.add_argument("--repeats", type=int, default=3, help="turns of (A) and (B)")
    parser.add_argument("--tolerance-rows", type=int, default=256, help="rows re-checked per tolerance-table cell")
    parser.add_argument("--no-docs", action="store_true", help="print the section only")
    args = parser.parse_args()
    import torch
    from distributed import Client, LocalCluster

    say = lambda msg: print(f"verify bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    threads = torch.get_num_threads()
    loads = {"start": os.getloadavg()[1]}
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="xkd-bench-verify-"))
    try:
        teachers = {"minilm": str(resolve_teacher("minilm").path),
                    "mlm": str(build_tiny_bert(work / "mlm", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True,
                                               seed=1, init_range=0.2, **MLM_SHAPE))}
        with LocalCluster(host="127.0.0.1", n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR, scheduler_kwargs={"dashboard_address": ":0"}) as cluster, \
                Client(cluster) as client:
            runs, caches = cost_runs(client, teachers, work, args, say)
            say("breakdown of a re-check of 64 rows and of every row ...")
            parts = {(name, n): breakdown(caches[name], teacher, n or caches[name]["rows"], runs[name]["right"])
                     for name, teacher in teachers.items() for n in (ROW_COUNTS[0], 0)}
            table = tolerance_table(client, teachers, caches, work, args, say)
        say("the CLI, once each ...")
        cli = {name: {"plain": cli_run(["-m", "xkd.cli", "verify", caches[name]["path"]]),
                      "teacher": cli_run(["-m", "xkd.cli", "verify", caches[name]["path"], "--teacher", teacher, "--rows",
                                          "64"]),
                      "imports": cli_run(["-c", IMPORTS])}
               for name, teacher in teachers.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    loads["end"] = os.getloadavg()[1]
    text = report(runs, caches, cli, parts, table, args, time.perf_counter() - started, loads, threads)
    print(text)
    if not args.no_docs:
        write_section(text)
        say("wrote the '## verify' section of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
