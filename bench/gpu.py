"""Throughput of both stages on a GPU (bench name: gpu). Without CUDA it prints one line and exits 0.

    ./dev bench gpu            # or: python bench/gpu.py [--quick] [--no-docs]   (~3-4 min; --quick ~1-2 min)
    python bench/gpu.py --device cpu --quick --no-docs    # smoke run of every phase on CPU, tiny teacher

Teacher: a BERT-base-size masked LM (hidden 768, 12 layers, 12 heads, intermediate 3072) with
random weights (speed does not depend on them) and the real mBERT cased WordPiece vocabulary
(119,547 tokens), fp16. Corpus: the English-Hindi pairs of ../shared/data (IITB train and val,
Tatoeba hin-eng), both sides, repeated to the size asked for.

(a) cache-teachers tokens/s: `cache_teachers` (xkd.pipeline) on a warm dask LocalCluster of one
    worker holding the GPU resource, as run.py starts one per GPU (teacher loaded by a warm-up
    run; planning, tokenizing, masking, inference, top-8 + log-normaliser, writing and
    committing the shards included), against a bare fp16 forward loop (encoder + MLM head at
    the masked positions) over the very batches the pipeline ran: rebuilt from the rows the
    pipeline wrote (input ids as the teacher saw them, masked positions), bucketed per shard
    with the same token budget. Target: pipeline >= 0.8x the bare loop. GPU utilisation
    (nvidia-smi, sampled in a thread) is the mean over each timed run.
(b) train-student steps/s through `xkd.student.run.train_student` with AMP (bf16 where the GPU
    has it, else fp16), for mergedistill (top-k only) and tinybert stage 1 with dense teacher
    outputs (hidden states of layers 0,3,6,9,12 at every token and attention maps of layers
    3,6,9,12), from caches this run builds with the teacher above. The trainer's own loop runs;
    the bench swaps in a DataLoader subclass that timestamps each `next()` the loop makes, so a
    step is the time between two `next()` calls and its data wait the time inside one (the
    trainer reads the loss and the gradient norm every step, which waits for the GPU, so
    while the loop waits for data the GPU has at most the optimiser step left to run).
    Target: data wait < 10% of the step. A method that misses it is measured again with
    DataLoader worker processes (--workers).
(c) (b) with 2 DDP processes (torchrun --nproc_per_node 2) when the machine has two GPUs.
Writes its tables into docs/benchmarks.md under "## gpu" (GPU runs only).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGET_PIPELINE = 0.8  # pipeline tokens/s over the bare forward loop's
TARGET_DATA_WAIT = 0.10  # share of a training step spent waiting for the loader
K = 8
LOADER_WORKERS = 4  # the --workers tried when a method waits too long for data
SAMPLE_EVERY_S = 0.2
DDP_TIMEOUT_S = 300  # the whole torchrun launch; a hung collective must not eat the device time
WARMUP_PAIRS = 64  # the run that loads the teacher into the worker before anything is timed

STARTED = time.perf_counter()


def say(msg: str) -> None:
    print(f"gpu bench [{time.perf_counter() - STARTED:4.0f} s]: {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sizes:
    """How much each phase does. GPU sizes are set for ~3-4 minutes on one H100/H200 (--quick:
    ~1-2 minutes, most of it fixed costs: processes, CUDA, loading), from the CPU side's rates
    measured here (tokenizing and masking ~30k tokens/s on one loaded core); CPU sizes only
    exercise the code paths."""

    teacher: dict  # hidden, layers, heads, intermediate
    student: dict  # StudentConfig fields
    pairs: int  # corpus of the timed cache-teachers runs (x2 rows: both sides)
    repeats: int  # interleaved pipeline / bare-loop runs; the best of each counts
    dense_pairs: int  # corpus of the cache with hidden states and attention (tinybert)
    steps: dict = field(default_factory=dict)  # method -> train-student --steps
    warmup_steps: int = 20  # first steps of each run left out (CUDA set-up, first windows read)
    batch_size: int = 64
    token_budget: int = 0  # 0: cache-teachers' default
    shard_size: int = 0  # 0: cache-teachers' default


BERT_BASE = dict(hidden=768, layers=12, heads=12, intermediate=3072)
# TinyBERT-4's shape; 12 heads as the teacher, which attention distillation needs head for head.
TINYBERT_4 = dict(hidden=312, layers=4, heads=12, intermediate=1200)
SIZES = {
    "gpu": Sizes(BERT_BASE, TINYBERT_4, pairs=40_000, repeats=2, dense_pairs=2_000,
                 steps={"mergedistill": 300, "tinybert": 150}),
    "gpu-quick": Sizes(BERT_BASE, TINYBERT_4, pairs=8_000, repeats=1, dense_pairs=500,
                       steps={"mergedistill": 60, "tinybert": 40}, warmup_steps=10),
    "cpu": Sizes(dict(hidden=64, layers=2, heads=2, intermediate=128), dict(hidden=32, layers=2, heads=2),
                 pairs=300, repeats=1, dense_pairs=40, steps={"mergedistill": 6, "tinybert": 6}, warmup_steps=2,
                 batch_size=8, token_budget=2048, shard_size=128),
}


# The teacher and the corpus ---------------------------------------------------------------


def build_teacher(out: Path, vocab_file: Path, shape: dict, gpu: bool) -> Path:
    """A random-weight BertForMaskedLM of `shape` with the real WordPiece vocabulary, saved
    with its tokenizer, in the dtype it will run in (fp16 on a GPU, fp32 on CPU)."""
    import torch
    import transformers
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    transformers.logging.disable_progress_bar()
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(vocab_file, out / "vocab.txt")
    tokenizer = BertTokenizer(vocab=str(out / "vocab.txt"), do_lower_case=False)  # mBERT is cased
    tokenizer.save_pretrained(out)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                        num_attention_heads=shape["heads"], intermediate_size=shape["intermediate"],
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    # Initialised on the GPU when benching one: 178M parameters take seconds on a CPU.
    with torch.device("cuda" if gpu else "cpu"):
        model = BertForMaskedLM(config)
    model.to(torch.float16 if gpu else torch.float32).eval().save_pretrained(out)
    return out


def corpus_lines() -> list[tuple[bytes, bytes]]:
    """Every English-Hindi pair of ../shared/data: IITB train and val, Tatoeba hin-eng."""
    from conftest import PARALLEL

    sources = [(PARALLEL / "iitb-en-hi" / f"{split}.en", PARALLEL / "iitb-en-hi" / f"{split}.hi")
               for split in ("train", "val")]
    sources.append((PARALLEL / "tatoeba" / "tatoeba.hin-eng.eng", PARALLEL / "tatoeba" / "tatoeba.hin-eng.hin"))
    pairs = []
    for en, hi in sources:
        # Split on b"\n" only, as the corpus reader does: str.splitlines would also split on
        # the U+2028 and \x85 that some IITB lines contain and misalign the sides.
        en_lines, hi_lines = (f.read_bytes().rstrip(b"\n").split(b"\n") for f in (en, hi))
        if len(en_lines) != len(hi_lines):
            raise RuntimeError(f"{en} and {hi} are not line-aligned ({len(en_lines)} vs {len(hi_lines)} lines)")
        pairs += zip(en_lines, hi_lines)
    return pairs


def write_corpus(directory: Path, name: str, n_pairs: int, pairs: list) -> str:
    """The first n_pairs pairs (all of them repeated as often as needed) as a corpus spec."""
    directory.mkdir(parents=True, exist_ok=True)
    chosen = (pairs * -(-n_pairs // len(pairs)))[:n_pairs]
    for side, lang in enumerate(("en", "hi")):
        (directory / f"{name}.{lang}").write_bytes(b"".join(p[side] + b"\n" for p in chosen))
    return f"parallel:{directory / name}.en@en,{directory / name}.hi@hi"


# GPU utilisation ------------------------------------------------------------------------


def visible_gpu_ids(count: int) -> list[str]:
    """nvidia-smi ids of CUDA devices 0..count-1 (CUDA_VISIBLE_DEVICES renumbers them)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[:count] if visible else [str(i) for i in range(count)]


class UtilisationSampler:
    """Each GPU's utilisation (percent of the sample period in which a kernel ran) every
    SAMPLE_EVERY_S in a thread, from `nvidia-smi --query-gpu`; samples carry wall-clock
    times, so any window (a run, or the steps of a child process) can be averaged afterwards,
    over the GPUs that window used. Without nvidia-smi every mean is None."""

    def __init__(self, gpu_ids: list[str]):
        self.command = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"]
        self.gpu_ids = list(gpu_ids)  # nvidia-smi's ids of CUDA devices 0, 1, ...
        self.available = bool(gpu_ids) and shutil.which("nvidia-smi") is not None
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            try:
                out = subprocess.run(self.command, capture_output=True, text=True, timeout=5).stdout
                values = {index.strip(): float(util) for index, util in
                          (line.split(",") for line in out.strip().splitlines())}
            except (OSError, subprocess.TimeoutExpired, ValueError):
                continue  # one lost sample; the mean is over those that came back
            if values:
                self.samples.append((time.time(), values))

    def __enter__(self):
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self, start: float, end: float, devices: int = 1) -> float | None:
        """Mean utilisation of CUDA devices 0..devices-1 over the samples taken in [start, end]."""
        wanted = self.gpu_ids[:devices]
        inside = [values[i] for t, values in self.samples if start <= t <= end for i in wanted if i in values]
        return sum(inside) / len(inside) if inside else None


class NoSampler:
    def mean(self, start: float, end: float, devices: int = 1) -> None:
        return None


# (a) cache-teachers against a bare forward loop -------------------------------------------


@contextlib.contextmanager
def one_worker_cluster(gpu: bool):
    """A warm dask cluster as cache-teachers starts on one GPU (xkd/pipeline/run.py,
    Cluster.start): one worker process, one thread, holding the GPU resource its tasks ask for."""
    from distributed import Client, LocalCluster

    with LocalCluster(host="127.0.0.1", n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR, resources={"GPU": 1} if gpu else None,
                      scheduler_kwargs={"dashboard_address": ":0"}) as cluster, Client(cluster) as client:
        yield client


def cache_options(teacher: Path, corpus: str, out: Path, sizes: Sizes, gpu: bool, **outputs):
    """cache-teachers' options for this bench: its defaults but for top-8, the dtype and sizes."""
    import torch

    from xkd.pipeline import CacheTeachersOptions

    defaults = CacheTeachersOptions(teachers=[], corpus="")
    return CacheTeachersOptions(
        teachers=[str(teacher)], corpus=corpus, out=str(out), topk=K, dtype="fp16" if gpu else "fp32",
        token_budget=sizes.token_budget or defaults.token_budget, shard_size=sizes.shard_size or defaults.shard_size,
        # On CPU the worker would otherwise keep dask's one thread (OMP_NUM_THREADS=1).
        cpu_threads=None if gpu else torch.get_num_threads(), **outputs)


def pipeline_run(client, teacher: Path, corpus: str, out: Path, sizes: Sizes, gpu: bool, **outputs) -> dict:
    """One `cache_teachers` run on the warm cluster; its summary, seconds and wall-clock window."""
    from xkd.pipeline import cache_teachers

    opts = cache_options(teacher, corpus, out, sizes, gpu, **outputs)
    wall, start = time.time(), time.perf_counter()
    result = cache_teachers(opts, client=client, log=io.StringIO())
    seconds = time.perf_counter() - start
    return {**result["caches"][0], "seconds": seconds, "window": (wall, wall + seconds),
            "token_budget": opts.token_budget, "shard_size": opts.shard_size}


def pipeline_batches(cache_path: str, token_budget: int, pad_id: int) -> tuple[list, int]:
    """The batches the pipeline ran, rebuilt from the rows it wrote: each shard's rows in row
    order (the stored input ids are the masked ids the teacher saw), cut by the same
    length_buckets and token budget, so the bare loop computes on the same padded tensors."""
    from xkd.pipeline.batching import PaddedBatch, length_buckets
    from xkd.storage import open_cache

    cache = open_cache(cache_path)
    batches, tokens = [], 0
    for shard_id in cache.shard_ids:
        ids, starts, positions, labels = [], [], [], []
        for block in cache.iter_blocks(columns=["input_ids", "word_start", "masked_positions", "labels"], dense=(),
                                       shards=[shard_id]):
            cols = block.columns
            for i in range(block.num_rows):
                ids.append(cols["input_ids"].row(i).astype(np.int64))
                starts.append(cols["word_start"].row(i))
                positions.append(cols["masked_positions"].row(i).astype(np.int64))
                labels.append(cols["labels"].row(i).astype(np.int64))
        lengths = np.array([len(row) for row in ids], dtype=np.int64)
        tokens += int(lengths.sum())
        for rows in length_buckets(lengths, token_budget):
            batches.append(PaddedBatch.build(rows, ids, starts, positions, labels, pad_id))
    return batches, tokens


def shard_breakdown(spec, corpus: str, out: Path, sizes: Sizes, gpu: bool) -> dict:
    """Where a worker's time goes: the first shard of the corpus run in this process by the
    worker's own function (work.process_shard: read, tokenize + mask, inference, write), with
    the view the pipeline plans; its timing and token count."""
    from xkd.names import parse_corpus
    from xkd.pipeline.corpus import Cleaning, plan_corpus
    from xkd.pipeline.run import plan_job
    from xkd.pipeline.work import ShardTask, process_shard

    opts = cache_options(Path(spec.path), corpus, out, sizes, gpu)
    plan = plan_corpus(parse_corpus(opts.corpus), Cleaning(), opts.shard_size)
    view = plan_job(spec, plan, opts, opts.dtype).view
    task = ShardTask(str(out), spec, view, plan.shards[0], "cuda" if gpu else "cpu", opts.token_budget,
                     opts.cpu_threads)
    done = process_shard(task)
    return {**done["timing"], "tokens": done["record"]["tokens"], "rows": done["record"]["rows"]}


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(teacher, batches) -> tuple[float, tuple[float, float]]:
    """Encoder + MLM head at the masked positions over every batch, inputs copied to the
    device in the loop as the pipeline copies them; nothing else (no top-k, no host copies
    of results, no tokenizing or writing). Seconds and wall-clock window."""
    import torch

    device = teacher.device
    synchronize(device)
    wall, start = time.time(), time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            ids = torch.from_numpy(batch.input_ids).to(device, non_blocking=True)
            mask = torch.from_numpy(batch.attention_mask).to(device, non_blocking=True)
            rows = torch.from_numpy(batch.masked_rows).to(device, non_blocking=True)
            cols = torch.from_numpy(batch.masked_cols).to(device, non_blocking=True)
            hidden = teacher.base(input_ids=ids, attention_mask=mask).last_hidden_state
            teacher.head(hidden[rows, cols])
    synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, (wall, wall + seconds)


def tinybert_layers(teacher_layers: int, student_layers: int) -> tuple[list[int], list[int]]:
    """Hidden-state and attention layers tinybert stage 1 reads for this student: layer 0
    (embeddings) and g(m) = m·T/S for m = 1..S (its default uniform layer map)."""
    mapped = [m * teacher_layers // student_layers for m in range(1, student_layers + 1)]
    return [0, *mapped], mapped


def bench_cache_teachers(teacher: Path, work: Path, sizes: Sizes, gpu: bool, sampler) -> dict:
    from xkd.names import resolve_teacher
    from xkd.pipeline.teachers import describe_teacher, get_teacher

    pairs = corpus_lines()
    corpus = write_corpus(work / "corpus", "timed", sizes.pairs, pairs)
    warmup = write_corpus(work / "corpus", "warmup", WARMUP_PAIRS, pairs)
    dense_corpus = write_corpus(work / "corpus", "dense", sizes.dense_pairs, pairs)
    hidden_layers, attention_layers = tinybert_layers(sizes.teacher["layers"], sizes.student["layers"])
    runs, bare, breakdown = [], [], None
    with one_worker_cluster(gpu) as client:
        say("cache-teachers warm-up run (loads the teacher into the worker)")
        pipeline_run(client, teacher, warmup, work / "warm", sizes, gpu)
        model = batches = None
        for attempt in range(sizes.repeats):
            say(f"cache-teachers over {sizes.pairs:,} pairs, run {attempt + 1} of {sizes.repeats}")
            # A new output directory each time, so that every run computes and writes every shard.
            run = pipeline_run(client, teacher, corpus, work / f"caches-{attempt}", sizes, gpu)
            run["gpu_util"] = sampler.mean(*run["window"])
            runs.append(run)
            if model is None:
                spec = describe_teacher(resolve_teacher(str(teacher)))
                # The process-wide copy a worker loads (process_shard below finds the same one).
                model = get_teacher(spec, "cuda:0" if gpu else "cpu", "fp16" if gpu else "fp32")
                batches, tokens = pipeline_batches(run["path"], run["token_budget"], model.pad_id)
                if tokens != run["tokens"]:
                    raise RuntimeError(f"the rebuilt batches hold {tokens} tokens, the cache {run['tokens']}")
                bare_forward(model, batches[:2])  # first-call kernel set-up, as the warm-up run does for the worker
                say("one shard of the same corpus through the worker's process_shard, in this process")
                breakdown = shard_breakdown(spec, corpus, work / "breakdown", sizes, gpu)
            say(f"bare forward over the same {len(batches):,} batches")
            seconds, window = bare_forward(model, batches)
            bare.append({"seconds": seconds, "tokens": tokens, "batches": len(batches),
                         "gpu_util": sampler.mean(*window)})
        del batches
        say(f"cache-teachers with hidden states {hidden_layers} and attention {attention_layers} "
            f"over {sizes.dense_pairs:,} pairs (the tinybert cache)")
        dense = pipeline_run(client, teacher, dense_corpus, work / "dense", sizes, gpu,
                             hidden_layers=tuple(hidden_layers), hidden_positions="all",
                             attention_layers=tuple(attention_layers))
        dense["gpu_util"] = sampler.mean(*dense["window"])
    return {"runs": runs, "bare": bare, "dense": dense, "breakdown": breakdown, "hidden_layers": hidden_layers,
            "attention_layers": attention_layers}


# (b) train-student steps and data wait ----------------------------------------------------


class LoaderClock:
    """When the training loop asked its DataLoader for each batch and when it got it, and the
    batch's rows and real tokens."""

    def __init__(self):
        self.asked: list[float] = []
        self.got: list[float] = []
        self.wall: list[float] = []
        self.rows: list[int] = []
        self.tokens: list[int] = []

    def next_from(self, batches):
        wall, asked = time.time(), time.perf_counter()
        batch = next(batches)
        self.got.append(time.perf_counter())
        self.asked.append(asked)
        self.wall.append(wall)
        self.rows.append(len(batch["input_ids"]))
        self.tokens.append(int(batch["attention_mask"].sum()))
        return batch

    def summary(self, warmup: int) -> dict:
        """Steps warmup .. n-2: step i lasts from the loop's i-th request to its next one (the
        last request has no next, so the last step is left out too)."""
        last = len(self.asked) - 1
        if last - warmup < 1:
            raise RuntimeError(f"{len(self.asked)} batches asked for: too few to time steps after {warmup} "
                               "warm-up steps")
        steps = range(warmup, last)
        seconds = self.asked[last] - self.asked[warmup]
        wait = sum(self.got[i] - self.asked[i] for i in steps)
        return {"steps": len(steps), "seconds": seconds, "steps_per_s": len(steps) / seconds,
                "step_ms": 1000 * seconds / len(steps), "wait_ms": 1000 * wait / len(steps),
                "wait_share": wait / seconds, "rows_per_s": sum(self.rows[i] for i in steps) / seconds,
                "tokens_per_s": sum(self.tokens[i] for i in steps) / seconds,
                "window": (self.wall[warmup], self.wall[last])}


@contextlib.contextmanager
def clocked_data_loaders(clock: LoaderClock):
    """While inside, every torch DataLoader (the trainer makes one per run) is one whose
    iterator reports each batch to `clock`. The trainer's loop itself is unchanged."""
    import torch.utils.data

    plain = torch.utils.data.DataLoader

    class ClockedBatches:
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            return self

        def __next__(self):
            return clock.next_from(self.batches)

    class ClockedDataLoader(plain):
        def __iter__(self):
            return ClockedBatches(super().__iter__())

    torch.utils.data.DataLoader = ClockedDataLoader
    try:
        yield clock
    finally:
        torch.utils.data.DataLoader = plain


def amp_for(gpu: bool) -> str:
    import torch

    if not gpu:
        return "off"  # autocast on CPU is not what a CPU run would use
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def train_run(run: dict) -> dict:
    """One train_student run as described by `run` (a JSON-able dict, so that torchrun's
    processes get the same ones); its timed steps."""
    import torch

    from xkd.student.options import TrainStudentOptions
    from xkd.student.run import train_student

    clock = LoaderClock()
    # Under torchrun ("auto") the trainer picks this rank's GPU itself; touching the current
    # device before that would open a context on GPU 0 from every rank.
    known_gpu = run["device"].startswith("cuda")
    before = 0
    if known_gpu:
        torch.cuda.set_device(run["device"])
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()  # what this process held already (the bench's teacher)
    with clocked_data_loaders(clock):
        train_student(TrainStudentOptions(
            method=run["method"], caches=[run["cache"]], vocab=run["vocab"], out=run["out"], steps=run["steps"],
            amp=run["amp"], log_every=run["steps"], workers=run["workers"], batch_size=run["batch_size"],
            **run["student"], device=None if run["device"] == "auto" else run["device"], overwrite=True,
        ))
    result = clock.summary(run["warmup_steps"])
    if run["device"] != "cpu" and torch.cuda.is_available():
        result["peak_gpu_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
    return result


def train_runs(caches: dict, vocab: Path, work: Path, sizes: Sizes, gpu: bool, workers: int = 0,
               device: str | None = None, tag: str = "") -> list[dict]:
    return [{
        "method": method, "cache": str(caches[method]), "vocab": str(vocab),
        "out": str(work / f"student-{method}{tag}"),
        "steps": sizes.steps[method], "warmup_steps": sizes.warmup_steps, "amp": amp_for(gpu), "workers": workers,
        "batch_size": sizes.batch_size, "student": sizes.student,
        "device": device or ("cuda:0" if gpu else "cpu"),
    } for method in sizes.steps]


def run_safely(what: str, fn, *args) -> dict:
    """A phase's result, or {"error": ...}: on scarce device time one failed run must not
    cost the others."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the table and on stderr, then the next run goes on
        traceback.print_exc()
        say(f"{what} FAILED: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}


def bench_training(caches: dict, vocab: Path, work: Path, sizes: Sizes, gpu: bool, sampler) -> list[dict]:
    def measured(what: str, run: dict) -> dict:
        result = run_safely(what, train_run, run)
        if "window" in result:
            result["gpu_util"] = sampler.mean(*result["window"])
        rows.append({**run, "processes": 1, **result})
        return result

    rows = []
    for run in train_runs(caches, vocab, work, sizes, gpu):
        say(f"train-student --method {run['method']}: {run['steps']} steps of {run['batch_size']} rows, "
            f"--amp {run['amp']}")
        result = measured(f"train-student {run['method']}", run)
        if result.get("wait_share", 0) >= TARGET_DATA_WAIT:
            again = {**run, "workers": LOADER_WORKERS, "out": run["out"] + f"-workers{LOADER_WORKERS}"}
            say(f"train-student --method {run['method']} --workers {LOADER_WORKERS} (data wait "
                f"{result['wait_share']:.0%} with none)")
            measured(f"train-student {run['method']} --workers {LOADER_WORKERS}", again)
    return rows


# (c) DDP -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_child(spec_path: str) -> int:
    """Runs under torchrun: this rank's train_student runs; its timings to <out>/rank<r>.json
    after each run. A failure is not caught: the other rank would wait in a collective for
    this one, and torchrun ends both when one fails."""
    import torch.distributed as dist

    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ.get("RANK", "0"))
    results = {}
    for run in spec["runs"]:
        results[run["method"]] = train_run(run)
        Path(spec["out"], f"rank{rank}.json").write_text(json.dumps(results))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def bench_ddp(caches: dict, vocab: Path, work: Path, sizes: Sizes, gpu: bool, sampler, nproc: int = 2) -> list[dict]:
    """Both methods on `nproc` processes in one torchrun launch (starting the processes and
    their process group is paid once). Each rank trains on its own batches of the same size,
    so rows/s is summed over ranks; a step lasts as long as the slowest rank's."""
    out = work / "ddp"
    out.mkdir(parents=True, exist_ok=True)
    # On CUDA, each rank takes cuda:LOCAL_RANK (device "auto"); on CPU, gloo.
    runs = train_runs(caches, vocab, out, sizes, gpu, device="auto" if gpu else "cpu", tag="-ddp")
    spec = out / "spec.json"
    spec.write_text(json.dumps({"runs": runs, "out": str(out)}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"  # two processes share the cores
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), __file__, "--ddp-child", str(spec)]
    say(f"DDP: torchrun --nproc_per_node {nproc}, both methods")
    log = out / "torchrun.log"
    with open(log, "wb") as f:
        # A session of its own, so that a launch past its time is ended with its workers.
        launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = launcher.wait(timeout=DDP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGTERM)
            returncode = launcher.wait()
            say(f"DDP: torchrun ran past {DDP_TIMEOUT_S} s and was stopped")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) if (out / f"rank{r}.json").exists() else {}
             for r in range(nproc)]
    rows = []
    for run in runs:
        per_rank = [r.get(run["method"]) or {"error": "no result"} for r in ranks]
        errors = [r["error"] for r in per_rank if "error" in r]
        if errors:
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            rows.append({**run, "processes": nproc, "error": f"{errors[0]}; torchrun exited {returncode}"})
            continue
        slowest = max(per_rank, key=lambda r: r["step_ms"])
        window = (min(r["window"][0] for r in per_rank), max(r["window"][1] for r in per_rank))
        rows.append({**run, "processes": nproc, **slowest,
                     "rows_per_s": sum(r["rows_per_s"] for r in per_rank),
                     "tokens_per_s": sum(r["tokens_per_s"] for r in per_rank),
                     "wait_share": max(r["wait_share"] for r in per_rank),
                     "wait_ms": max(r["wait_ms"] for r in per_rank),
                     "peak_gpu_gib": max((r.get("peak_gpu_gib") or 0) for r in per_rank) or None,
                     "gpu_util": sampler.mean(*window, devices=nproc)})
    return rows


# Report ---------------------------------------------------------------------------------------


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def percent(value) -> str:
    return "n/a" if value is None else f"{value:.0f}%"


def device_description(gpu: bool) -> str:
    import torch

    from storage import machine  # bench/storage.py: shared report helpers

    if not gpu:
        return f"CPU only (smoke run), torch {torch.__version__}; host: {machine()}"
    props = torch.cuda.get_device_properties(0)
    driver = ""
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--id=" + visible_gpu_ids(1)[0], "--query-gpu=driver_version",
                                "--format=csv,noheader"], capture_output=True, text=True)
        driver = f", driver {query.stdout.strip()}" if query.returncode == 0 and query.stdout.strip() else ""
    count = torch.cuda.device_count()
    return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB; {count} GPU{'s' if count > 1 else ''} visible), "
            f"CUDA {torch.version.cuda}{driver}, torch {torch.__version__}; host: {machine()}")


def what_is_measured() -> list[str]:
    """The section's standing description (what, how to run, the targets), for the GPU sizes."""
    full, quick = SIZES["gpu"], SIZES["gpu-quick"]
    t, st = full.teacher, full.student
    hidden, attention = tinybert_layers(t["layers"], st["layers"])
    return [
        "Measured by `./dev bench gpu` (bench/gpu.py, sized for 3-4 minutes on one H100/H200; `--quick` for 1-2 "
        "minutes; `--no-docs` prints the tables without writing this section). Without a CUDA GPU it prints one "
        "line and exits 0. `python bench/gpu.py --device cpu --quick --no-docs` runs every phase for a few steps "
        "on CPU with a tiny teacher, to check the code paths (about 2 minutes on 2 cores).",
        "",
        f"- (a) cache-teachers tokens/s. Teacher: a BERT-base-size masked LM (hidden {t['hidden']}, {t['layers']} "
        f"layers, {t['heads']} heads, intermediate {t['intermediate']}; random weights, the real mBERT cased "
        f"vocabulary) in fp16, top-{K} + log-normaliser, over the English-Hindi pairs of ../shared/data (IITB "
        f"train and val, Tatoeba) repeated to {full.pairs:,} pairs ({quick.pairs:,} with --quick), both sides. "
        "The pipeline (`cache_teachers` on a warm one-worker dask LocalCluster whose worker holds the GPU "
        "resource, as cache-teachers starts one per GPU; it writes the cache) against a bare fp16 forward loop "
        "(encoder + MLM head at the masked positions) over the same batches, rebuilt from the rows the pipeline "
        f"wrote and cut with the same token budget. Target: pipeline >= {TARGET_PIPELINE}x the bare loop. One "
        "shard is also run through the worker's own function in the bench process, timed step by step.",
        f"- (b) train-student steps/s through `train_student` with AMP (bf16 where the GPU has it), student "
        f"hidden {st['hidden']}, {st['layers']} layers, {st['heads']} heads, batches of {full.batch_size}: "
        f"mergedistill (top-{K} only) and tinybert stage 1 with dense teacher outputs (hidden states of layers "
        f"{','.join(map(str, hidden))} at every token, attention of layers {','.join(map(str, attention))}), from "
        "caches built by the teacher above in the same run. The trainer's own loop runs, with each DataLoader "
        f"`next()` it makes timed. Target: data wait < {TARGET_DATA_WAIT:.0%} of a step; a method that misses it "
        f"is measured again with `--workers {LOADER_WORKERS}`.",
        "- (c) (b) on 2 DDP processes (torchrun --nproc_per_node 2) when the machine has two GPUs; skipped on one.",
        "- GPU utilisation: nvidia-smi's utilization.gpu (the share of time a kernel ran), sampled every "
        f"{SAMPLE_EVERY_S} s in a thread, mean over each timed part.",
    ]


def placeholder_section() -> str:
    """What docs/benchmarks.md holds under "## gpu" until a GPU run replaces it."""
    not_yet = "Not yet run on a GPU. On a machine with one: `./dev bench gpu` (or `./dev bench gpu --quick`)."
    return "\n".join(["## gpu", "", *what_is_measured(), "", not_yet]) + "\n"


def breakdown_lines(b: dict) -> list[str]:
    steps = {"read (and teacher lookup)": b["read_load_s"], "tokenize + mask": b["tokenize_mask_s"],
             "inference (forward, top-k, log-normaliser, copies to the host)": b["infer_s"],
             "write (assemble, Parquet + Zarr, fsync)": b["write_s"]}
    total = sum(steps.values())
    shown = "; ".join(f"{name} {seconds:.2f} s ({seconds / total:.0%})" for name, seconds in steps.items())
    return [f"Where a worker's time goes: one shard ({b['rows']:,} rows, {b['tokens']:,} tokens) run in the bench "
            f"process by the worker's own `process_shard`: {shown}; {b['tokens'] / total:,.0f} tokens/s. A worker "
            "runs one shard at a time and these steps one after another: its device computes only during "
            "inference.", ""]


def report(cache: dict, training: list[dict], ddp: list[dict] | str, args, sizes: Sizes, gpu: bool,
           seconds: float) -> str:
    """The "## gpu" section: the standing description, then this run's tables."""
    best = min(cache["runs"], key=lambda r: r["seconds"])
    bare = min(cache["bare"], key=lambda r: r["seconds"])
    pipe_rate, bare_rate = best["tokens"] / best["seconds"], bare["tokens"] / bare["seconds"]
    ratio = pipe_rate / bare_rate
    dense = cache["dense"]
    teacher = sizes.teacher
    precision = "fp16" if gpu else "fp32"
    command = " ".join(["./dev bench gpu", *args.argv])
    lines = [
        "## gpu",
        "",
        *what_is_measured(),
        "",
        f"Run with `{command}` on {datetime.date.today().isoformat()}, {device_description(gpu)}; {seconds:.0f} s.",
        "",
        f"(a) cache-teachers. Teacher: BERT masked LM, hidden {teacher['hidden']}, {teacher['layers']} layers, "
        f"{teacher['heads']} heads, intermediate {teacher['intermediate']}, mBERT vocabulary, {precision}. Corpus: "
        f"{sizes.pairs:,} pairs, both sides: {best['rows']:,} rows, {best['tokens']:,} tokens, {best['masked']:,} "
        f"masked positions; top-{K} + log-normaliser; token budget {best['token_budget']:,}, shards of "
        f"{best['shard_size']:,} pairs ({best['shards']} shards), {bare['batches']:,} batches. Best of "
        f"{len(cache['runs'])} interleaved run{'s' if len(cache['runs']) > 1 else ''} each.",
        "",
        "| loop | tokens/s | GPU utilisation | pipeline / this | target |",
        "|---|---:|---:|---:|---|",
        f"| xkd cache-teachers (warm 1-worker LocalCluster; writes the cache) | {pipe_rate:,.0f} | "
        f"{percent(best['gpu_util'])} | 1.00x | |",
        f"| bare {precision} forward over the same batches (encoder + MLM head at masked positions) | "
        f"{bare_rate:,.0f} | {percent(bare['gpu_util'])} | {ratio:.2f}x | >= {TARGET_PIPELINE}x: "
        f"{met(ratio >= TARGET_PIPELINE)} |",
        f"| xkd cache-teachers with dense outputs (the tinybert cache below; {dense['rows']:,} rows) | "
        f"{dense['tokens'] / dense['seconds']:,.0f} | {percent(dense['gpu_util'])} | | |",
        "",
        *breakdown_lines(cache["breakdown"]),
        f"The tinybert cache stores, besides top-{K}, hidden states of layers {cache['hidden_layers']} at every "
        f"token and attention of layers {cache['attention_layers']}: {dense['bytes'] / dense['tokens'] / 1024:.1f} "
        f"KiB per token on disk ({dense['bytes'] / 2**20:,.0f} MiB for {dense['tokens']:,} tokens), against "
        f"{best['bytes'] / best['tokens']:.1f} bytes per token for top-{K} alone.",
        "",
    ]
    student = sizes.student
    all_rows = training + (ddp if isinstance(ddp, list) else [])
    lines += [
        f"(b) train-student through `train_student` (the trainer's own loop), AMP {all_rows[0]['amp']}, student BERT "
        f"hidden {student['hidden']}, {student['layers']} layers, {student['heads']} heads over the teacher's "
        f"vocabulary (a one-teacher union), batches of {sizes.batch_size} rows per process; mergedistill from the "
        f"top-{K} cache of (a), tinybert (stage 1, default uniform layer map) from the dense one. Each run: "
        f"{', '.join(f'{m} {s} steps' for m, s in sizes.steps.items())}, the first {sizes.warmup_steps} left out; "
        "step = time between two DataLoader `next()` calls of the loop, data wait = time inside one.",
        "",
        "| method | processes | loader workers | steps/s | step (ms) | data wait (ms) | data wait share | rows/s "
        "| tokens/s | GPU utilisation | peak GPU memory | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in all_rows:
        name = row["method"] + (" (DDP)" if row["processes"] > 1 else "")
        if "error" in row:
            lines.append(f"| {name} | {row['processes']} | {row['workers']} | failed: {row['error']} "
                         "| | | | | | | | |")
            continue
        memory = f"{row['peak_gpu_gib']:.1f} GiB" if row.get("peak_gpu_gib") else "n/a"
        lines.append(
            f"| {name} | {row['processes']} | {row['workers']} | {row['steps_per_s']:.1f} | {row['step_ms']:.1f} | "
            f"{row['wait_ms']:.1f} | {row['wait_share']:.1%} | {row['rows_per_s']:,.0f} | {row['tokens_per_s']:,.0f} | "
            f"{percent(row.get('gpu_util'))} | {memory} | < {TARGET_DATA_WAIT:.0%}: "
            f"{met(row['wait_share'] < TARGET_DATA_WAIT)} |")
    lines += ["", f"(c) DDP: {ddp}" if isinstance(ddp, str) else
              "(c) DDP rows: steps/s and data wait of the slowest rank, rows/s and tokens/s summed over ranks, "
              "GPU utilisation averaged over the GPUs."]
    return "\n".join(lines) + "\n"


# Main -----------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller corpus and fewer steps (~1 min on a GPU)")
    parser.add_argument("--no-docs", action="store_true", help="print the tables only")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: a smoke run of every phase with a tiny teacher (never written to the docs)")
    parser.add_argument("--no-ddp", action="store_true", help="leave out (c)")
    parser.add_argument("--ddp-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for the report
    args.sizes = "cpu" if args.device == "cpu" else ("gpu-quick" if args.quick else "gpu")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))  # conftest: the shared data's paths
    sys.path.insert(0, str(ROOT / "bench"))  # storage: the shared report helpers
    if args.ddp_child:
        return ddp_child(args.ddp_child)
    import torch

    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        print(f"gpu bench: no CUDA GPU here (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
              "nothing measured, docs/benchmarks.md left as it is.")
        return 0
    import transformers

    from conftest import VOCABS
    from storage import write_section

    transformers.logging.set_verbosity_error()
    sizes = SIZES[args.sizes]
    started = time.perf_counter()
    sampler = UtilisationSampler(visible_gpu_ids(torch.cuda.device_count())) if gpu else NoSampler()
    work = Path(tempfile.mkdtemp(prefix="xkd-bench-gpu-"))
    try:
        with sampler if gpu else contextlib.nullcontext():
            say(f"building the teacher ({sizes.teacher})")
            teacher = build_teacher(work / "teacher", VOCABS / "bert-base-multilingual-cased.vocab.txt", sizes.teacher,
                                    gpu)
            cache = bench_cache_teachers(teacher, work, sizes, gpu, sampler)
            say("building the union vocab of the teacher")
            from xkd.vocab import build_vocab

            build_vocab([str(teacher)], work / "vocab")
            caches = {"mergedistill": cache["runs"][-1]["path"], "tinybert": cache["dense"]["path"]}
            training = bench_training(caches, work / "vocab", work, sizes, gpu, sampler)
            if args.no_ddp:
                ddp = "left out (--no-ddp)."
            elif gpu and torch.cuda.device_count() < 2:
                ddp = f"skipped: this machine has {torch.cuda.device_count()} GPU; 2 DDP processes need two."
                say(f"DDP {ddp}")
            else:
                ddp = bench_ddp(caches, work / "vocab", work, sizes, gpu, sampler)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(cache, training, ddp, args, sizes, gpu, time.perf_counter() - started)
    print(text)
    failed = [row for row in training + (ddp if isinstance(ddp, list) else []) if "error" in row]
    if failed:
        say(f"{len(failed)} run(s) failed; docs/benchmarks.md left as it is")
        return 1
    if not gpu:
        say("a CPU smoke run: docs/benchmarks.md left as it is")
    elif not args.no_docs:
        write_section(text)
        say("wrote the '## gpu' section of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
