"""Throughput and memory of stage one (bench name: cache_teachers).

    ./dev bench cache_teachers     # or: python bench/cache_teachers.py [--pairs N] [--no-docs]

Teacher: the real pretrained MiniLM (6 layers, hidden 384, bert-base-uncased vocab) with a
masked-LM head added (decoder tied to its embeddings, transform randomly initialised), so
that top-k applies. Corpus: English-Hindi pairs of ../shared/data/parallel/iitb-en-hi, both
sides. Outputs: top-8 + log-normaliser at 15% masked positions, [CLS] vectors.

Measures, on the same rows (same tokens, same masks), tokens per second of
  - the pipeline: `cache_teachers` on a warm one-worker LocalCluster (teacher loaded once
    by a warm-up run), planning, tokenizing, masking, inference, writing and committing
    the shards included;
  - (a) a bare forward loop over the very batches the pipeline builds, with the same
    model: encoder + MLM head at the masked positions, nothing else (the compute the
    outputs need; no tokenizing, masking, top-k, host transfer or writing);
  - (b) a naive Hugging Face loop: batches of 32 padded to max length 128, full logits at
    every position moved to the host, top-k and logsumexp on the host (numpy);
and the peak resident memory (sum over the client, nanny and worker processes, sampled every
50 ms) of the whole CLI on a corpus and on one 10x larger (a tiny teacher, so the larger run
stays short; shards of the same size, so memory should not grow).
Writes its table into docs/benchmarks.md under "## cache_teachers".
"""

from __future__ import annotations

import argparse
import datetime
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from xkd.names import parse_corpus, resolve_teacher  # noqa: E402
from xkd.pipeline import CacheTeachersOptions, cache_teachers  # noqa: E402
from xkd.pipeline.batching import PaddedBatch, length_buckets  # noqa: E402
from xkd.pipeline.corpus import Cleaning, plan_corpus  # noqa: E402
from xkd.pipeline.masking import MaskConfig  # noqa: E402
from xkd.pipeline.teachers import LoadedTeacher, Outputs, describe_teacher  # noqa: E402
from xkd.pipeline.work import View, build_rows  # noqa: E402

from conftest import PARALLEL, VOCABS, build_tiny_bert  # noqa: E402
from storage import machine, write_section  # noqa: E402  (bench/storage.py: shared report helpers)

IITB = PARALLEL / "iitb-en-hi"
TOKEN_BUDGET = 8192
NAIVE_BATCH, NAIVE_LENGTH = 32, 128
TARGET_BARE, TARGET_NAIVE, TARGET_RSS = 0.75, 2.0, 1.2


def minilm_with_mlm_head(out: Path) -> Path:
    import torch
    import transformers
    from transformers import AutoTokenizer, BertForMaskedLM

    transformers.logging.set_verbosity_error()  # the load report lists the new head's weights: expected
    source = resolve_teacher("minilm").path
    torch.manual_seed(0)
    model = BertForMaskedLM.from_pretrained(source)  # the head's transform is new; its decoder is tied
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def write_pairs(directory: Path, name: str, n: int) -> str:
    """The first n iitb pairs (train, repeated if n exceeds it) as two line-aligned files."""
    directory.mkdir(parents=True, exist_ok=True)
    for lang in ("en", "hi"):
        # Split on b"\n" only, as the reader does: str.splitlines would also split on the
        # U+2028 and \x85 that some IITB lines contain and misalign the sides.
        lines = [line + b"\n" for line in (IITB / f"train.{lang}").read_bytes().rstrip(b"\n").split(b"\n")]
        reps = -(-n // len(lines))
        (directory / f"{name}.{lang}").write_bytes(b"".join((lines * reps)[:n]))
    return f"parallel:{directory / name}.en@en,{directory / name}.hi@hi"


def pipeline_run(client, teacher: Path, corpus: str, out: Path, threads: int) -> tuple[float, dict]:
    opts = CacheTeachersOptions(teachers=[str(teacher)], corpus=corpus, out=str(out), topk=8, sentence=("cls",),
                                shard_size=512, token_budget=TOKEN_BUDGET, cpu_threads=threads)
    start = time.perf_counter()
    result = cache_teachers(opts, client=client, log=io.StringIO())
    return time.perf_counter() - start, result["caches"][0]


def same_batches(teacher_dir: Path, corpus: str):
    """The rows and batches the pipeline builds for this corpus (one shard's worth each)."""
    spec = describe_teacher(resolve_teacher(str(teacher_dir)))
    teacher = LoadedTeacher(spec, "cpu", "fp32")
    view = View(128, MaskConfig(), "both", Outputs(topk=8, sentence=("cls",)), True, "fp32")
    plan = plan_corpus(parse_corpus(corpus), Cleaning(), 512)
    batches, tokens = [], 0
    for shard in plan.shards:
        rows = build_rows(shard.examples(), plan.langs, True, view, teacher)
        lengths = np.array([len(ids) for ids in rows.input_ids])
        tokens += int(lengths.sum())
        for b in length_buckets(lengths, TOKEN_BUDGET):
            batches.append(PaddedBatch.build(b, rows.input_ids, rows.word_start, rows.positions, rows.labels, rows.pad_id))
        last_rows = rows
    return teacher, batches, tokens, last_rows


def bare_forward(teacher, batches) -> float:
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            out = teacher.base(input_ids=torch.from_numpy(batch.input_ids),
                               attention_mask=torch.from_numpy(batch.attention_mask))
            teacher.head(out.last_hidden_state[torch.from_numpy(batch.masked_rows), torch.from_numpy(batch.masked_cols)])
    return time.perf_counter() - start


def naive_hf_loop(teacher, rows, n_rows: int) -> tuple[float, int]:
    """Padding to max length, full logits to the host, top-k and logsumexp there."""
    import torch

    start = time.perf_counter()
    tokens = 0
    with torch.inference_mode():
        for first in range(0, n_rows, NAIVE_BATCH):
            idx = range(first, min(first + NAIVE_BATCH, n_rows))
            ids = np.full((len(idx), NAIVE_LENGTH), rows.pad_id, dtype=np.int64)
            mask = np.zeros_like(ids)
            for i, r in enumerate(idx):
                ids[i, : len(rows.input_ids[r])] = rows.input_ids[r]
                mask[i, : len(rows.input_ids[r])] = 1
                tokens += len(rows.input_ids[r])
            logits = teacher.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
            host = logits.float().cpu().numpy()
            for i, r in enumerate(idx):
                at = host[i, rows.positions[r].astype(np.int64)]
                top = np.argpartition(-at, 8, axis=1)[:, :8]
                order = np.argsort(-np.take_along_axis(at, top, 1), axis=1)
                np.take_along_axis(top, order, 1)
                peak = at.max(axis=1, keepdims=True)
                _ = peak[:, 0] + np.log(np.exp(at - peak).sum(axis=1))
    return time.perf_counter() - start, tokens


def peak_rss_of_cli(args: list[str]) -> dict:
    """Run the CLI in a subprocess; peak of the summed RSS of its process tree, and of the
    largest single process, sampled every 50 ms."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "xkd.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    parent = psutil.Process(proc.pid)
    peak_total = peak_single = 0
    while proc.poll() is None:
        try:
            procs = [parent, *parent.children(recursive=True)]
            rss = [p.memory_info().rss for p in procs]
        except psutil.Error:
            continue
        peak_total, peak_single = max(peak_total, sum(rss)), max(peak_single, max(rss))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"cache-teachers failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    import json

    summary = json.loads(out.decode().strip().splitlines()[-1])["caches"][0]
    return {"total": peak_total, "single": peak_single, "rows": summary["rows"], "tokens": summary["tokens"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=400, help="pairs for the throughput runs")
    parser.add_argument("--naive-rows", type=int, default=128, help="rows for the naive loop (it is slow)")
    parser.add_argument("--rss-pairs", type=int, default=1000, help="pairs of the small corpus (the large one is 10x)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of pipeline and bare loop")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    import torch
    from distributed import Client, LocalCluster

    threads = torch.get_num_threads()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="xkd-bench-cache-"))
    try:
        say = lambda msg: print(f"cache_teachers bench: {msg}", file=sys.stderr, flush=True)  # noqa: E731
        teacher = minilm_with_mlm_head(work / "minilm-mlm")
        corpus = write_pairs(work / "corpus", "small", args.pairs)
        warmup = write_pairs(work / "corpus", "warmup", 32)

        model, batches, tokens, last_rows = same_batches(teacher, corpus)
        say(f"pipeline (warm one-worker LocalCluster) and bare forward, interleaved, best of {args.repeats} ...")
        pipe_times, bare_times = [], []
        with LocalCluster(host="127.0.0.1", n_workers=1, threads_per_worker=1, processes=True,
                          dashboard_address=None, silence_logs=logging.ERROR,
                          scheduler_kwargs={"dashboard_address": ":0"}) as cluster, Client(cluster) as client:
            pipeline_run(client, teacher, warmup, work / "warm", threads)
            bare_forward(model, batches[:2])  # first-call kernel set-up, as the warm-up run does for the worker
            for attempt in range(args.repeats):
                # A new output directory each time, so every run computes and writes every shard.
                seconds, info = pipeline_run(client, teacher, corpus, work / f"caches-{attempt}", threads)
                pipe_times.append(seconds)
                bare_times.append(bare_forward(model, batches))
        assert tokens == info["tokens"], (tokens, info["tokens"])
        pipe_s, bare_s = min(pipe_times), min(bare_times)
        say("naive HF loop ...")
        naive_s, naive_tokens = min(naive_hf_loop(model, last_rows, min(args.naive_rows, len(last_rows))) for _ in range(2))

        say("peak RSS, small and 10x corpus (tiny teacher) ...")
        tiny = build_tiny_bert(work / "tiny-mbert", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False)
        rss = {}
        for label, n in (("small", args.rss_pairs), ("large", 10 * args.rss_pairs)):
            spec = write_pairs(work / "corpus", f"rss-{label}", n)
            rss[label] = peak_rss_of_cli([
                "cache-teachers", "--teacher", str(tiny), "--corpus", spec, "--out", str(work / f"rss-{label}"),
                "--topk", "8", "--shard-size", "512", "--json",
            ])
            rss[label]["pairs"] = n
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rates = {"pipeline": info["tokens"] / pipe_s, "bare": tokens / bare_s, "naive": naive_tokens / naive_s}
    text = report(rates, info, rss, args, time.perf_counter() - started, threads)
    print(text)
    if not args.no_docs:
        write_section(text)
        say("wrote the '## cache_teachers' section of docs/benchmarks.md")
    return 0


def report(rates: dict, info: dict, rss: dict, args, seconds: float, threads: int) -> str:
    r_bare = rates["pipeline"] / rates["bare"]
    r_naive = rates["pipeline"] / rates["naive"]
    growth = rss["large"]["total"] / rss["small"]["total"]
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    mb = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = [
        "## cache_teachers",
        "",
        f"Run with `./dev bench cache_teachers` (bench/cache_teachers.py) on {datetime.date.today().isoformat()}, "
        f"{machine()}, CPU only, {threads} torch threads; {seconds:.0f} s. The machine was shared with other jobs "
        f"(load average {os.getloadavg()[1]:.1f} over the last 5 minutes), so the pipeline and the bare loop run "
        f"interleaved and each rate is the best of {args.repeats} runs (naive: best of 2); compare the ratios, not "
        "the absolute rates.",
        f"Teacher: MiniLM-L6-H384 (the pretrained `minilm`) with a masked-LM head, fp32. Corpus: {args.pairs} "
        f"IITB en-hi pairs, both sides: {info['rows']:,} rows, {info['tokens']:,} tokens, {info['masked']:,} masked "
        f"positions; top-8 + log-normaliser + [CLS]; token budget {TOKEN_BUDGET}, shards of 512 pairs.",
        "",
        "| loop | tokens/s | pipeline / this | target |",
        "|---|---:|---:|---|",
        f"| xkd cache-teachers (warm 1-worker LocalCluster; writes the cache) | {rates['pipeline']:,.0f} | 1.00x | |",
        f"| (a) bare forward over the same batches (encoder + MLM head at masked positions) | {rates['bare']:,.0f} "
        f"| {r_bare:.2f}x | >= {TARGET_BARE}x: {verdict(r_bare >= TARGET_BARE)} |",
        f"| (b) naive HF loop (pad to {NAIVE_LENGTH}, batch {NAIVE_BATCH}, full logits to host, top-k on host; "
        f"{args.naive_rows} rows) | {rates['naive']:,.0f} | {r_naive:.2f}x "
        f"| >= {TARGET_NAIVE}x: {verdict(r_naive >= TARGET_NAIVE)} |",
        "",
        "Peak resident memory of `xkd cache-teachers` (client + nanny + worker processes, summed; a tiny "
        "2-layer teacher with the mBERT vocabulary, top-8, shards of 512 pairs, both sides):",
        "",
        "| corpus | rows | tokens | peak RSS, all processes | largest process |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in ("small", "large"):
        r = rss[label]
        lines.append(f"| {r['pairs']:,} pairs | {r['rows']:,} | {r['tokens']:,} | {mb(r['total'])} | {mb(r['single'])} |")
    lines += [
        "",
        f"Growth for a 10x larger corpus: {growth:.2f}x (target < {TARGET_RSS}x: {verdict(growth < TARGET_RSS)}).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
