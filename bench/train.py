"""Speed and memory of stage two, training students from caches (bench name: train).

    ./dev bench train      # or: python bench/train.py [--no-docs] [--steps N] [--batch-size B] [--only dense]

Caches: synthetic shards (xkd.storage.synthetic, top-8, Zipf ids below each teacher's
vocabulary size) whose manifests name two real teachers' vocab files from
../shared/data/vocab (bert-base-uncased for English rows, mBERT cased for Hindi rows); the
union vocab is built from the same files by xkd.vocab.build_vocab, so the loader remaps every
id through a real teacher->union table, as train-student does.

(a) Loader throughput: StreamingDataset as train-student builds it (mergedistill's columns,
    remapping, mergedistill's collate into padded tensors) and bare (no remap, no collate),
    against a raw pyarrow scan of the same Parquet files and columns converted to numpy.
    Rows/s and MB/s of decoded top-k columns (ids uint32 + logits fp16 + log-normaliser fp32,
    52 bytes per masked position at k=8); best of interleaved repeats.
(b) Student step time: mergedistill from cached targets (loader + forward + backward +
    clipping + AdamW + schedule, the calls Trainer.train makes per step, with the optimiser
    and schedule the Trainer builds) against online KD: the same step plus a teacher forward
    on the same batch computing top-8 and the log-normaliser on the fly. Two teachers over
    mBERT's vocabulary, each 4x the student by one measure: 512 hidden / 4 layers (4x the
    parameters) and 256 hidden with the fewest layers that make its forward 4x the student's
    multiply-adds on these rows. Interleaved steps, medians.
(c) Peak RSS (VmHWM of a fresh child process) of a full loader epoch and of a short
    train-student run, over a cache and over one 10x larger.
(d) Dense teacher outputs (`--only dense` runs this part alone, about 8 minutes): a cache
    made by the real pipeline (a random-weight width-768 BertForMaskedLM over the mBERT
    vocab, hidden states and attention of 4 layers at every token), rewritten in each dense
    layout; bytes per token and Zarr's decode speed per layout; the tinybert loader against
    Zarr's own decode and np.load of the same arrays; 0, 1 and 2 DataLoader workers; peak
    RSS over synthetic dense shards and 10x as many.
Writes its tables into docs/benchmarks.md under "## train" (with --only dense, only the
"### Dense teacher outputs" part of it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
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

from xkd.storage import CacheWriter, Ragged, open_cache, outputs_json, write_shard_files  # noqa: E402
from xkd.storage.synthetic import synthetic_rows  # noqa: E402

from conftest import VOCABS  # noqa: E402
from storage import interleaved_best, machine, write_section  # noqa: E402  (bench/storage.py: shared report helpers)

K = 8
TOPK_BYTES_PER_MASKED = K * 4 + K * 2 + 4  # decoded uint32 ids, fp16 logits, fp32 log-normaliser
TEACHERS = {  # language -> (vocab file, tokenizer size): the name a manifest and the vocab share
    "en": (VOCABS / "bert-base-uncased.vocab.txt", 30522),
    "hi": (VOCABS / "bert-base-multilingual-cased.vocab.txt", 119547),
}
SIZE_RATIO = 4  # online teachers are this many times the student, by parameters or by forward FLOPs
STUDENT = dict(hidden=128, layers=2, heads=2)
LOADER_BATCH = 256
WARMUP_STEPS = 1
RSS_TRAIN_STEPS, RSS_TRAIN_BATCH = 5, 16
LOADER_EPOCHS = 3  # rows per loader pass, in epochs: amortises the windows read at an epoch's edge
TARGET_LOADER, TARGET_STEP, TARGET_RSS = 0.5, 0.5, 1.2


STARTED = time.perf_counter()


def say(msg: str) -> None:
    print(f"train bench [{time.perf_counter() - STARTED:4.0f} s]: {msg}", file=sys.stderr, flush=True)


# Caches and vocab -----------------------------------------------------------------------


def make_cache(root: Path, lang: str, shards: int, rows_per_shard: int, langs: tuple[str, ...], seed: int = 0):
    """A top-8 cache whose teacher is `lang`'s vocab file; ids below that vocabulary's size."""
    vocab_file, size = TEACHERS[lang]
    meta = {"teacher": {"name": str(vocab_file), "vocab_size": size}, "corpus": {"bench": root.name},
            "view": {}, "outputs": outputs_json(K, {})}
    with CacheWriter(root, f"bench-{root.name}", meta, planned_shards=shards) as writer:
        for s in range(shards):
            rows, _ = synthetic_rows(seed * 1000 + s, rows_per_shard, vocab=size, k=K,
                                     first_example_id=s * rows_per_shard, langs=langs)
            writer.commit(write_shard_files(root, s, rows, has_topk=True))
    return open_cache(root)


def build_union_vocab(out: Path):
    from xkd.vocab import build_vocab, load_vocab

    build_vocab([str(TEACHERS["en"][0]), str(TEACHERS["hi"][0])], out)
    return load_vocab(out)


def mergedistill(vocab, total_steps: int = 1000):
    from xkd.student.methods import Plan, get_method
    from xkd.student.methods.mergedistill import COLUMNS

    method = get_method("mergedistill")
    return method(method.Config(), Plan(columns=COLUMNS), vocab=vocab, total_steps=total_steps)


def dataset(caches, vocab, method, *, batch_size: int, remap: bool, collate: bool, columns=None, seed: int = 0):
    from xkd.student.data import StreamConfig, StreamingDataset
    from xkd.student.run import remap_tables

    return StreamingDataset(
        caches, StreamConfig(batch_size=batch_size, seed=seed, columns=tuple(columns or method.plan.columns)),
        remap_tables=remap_tables(caches, vocab) if remap else None,
        collate=method.collate if collate else None,
    )


# What a rejected optimisation measured, kept in the report so it is not tried again blindly.
PREFETCH_TRIED = (
    " Reading the next shuffle window in a background thread while the current one's batches are"
    " gathered was tried (2026-11-21, quiet machine, same passes): the train-student loader went from"
    " 0.45x to 0.41x of the raw scan and the bare one from 0.68x to 0.54x, because on two cores the"
    " thread competes with pyarrow's own decoding threads; it was not kept."
)


# (a) Loader throughput ------------------------------------------------------------------


def raw_scan(files: list[Path], columns: list[str]) -> tuple[int, int]:
    """Every row group of every file, the columns converted to numpy: (rows, masked positions)."""
    import pyarrow.parquet as pq

    rows = masked = 0
    for path in files:
        f = pq.ParquetFile(path)
        for rg in range(f.num_row_groups):
            table = f.read_row_group(rg, columns=columns)
            for name in table.column_names:
                col = table[name].combine_chunks()
                if hasattr(col, "offsets"):
                    offsets, _ = col.offsets.to_numpy(), col.values.to_numpy(zero_copy_only=False)
                    if name == "lognorm":
                        masked += int(offsets[-1] - offsets[0])
                else:
                    col.to_numpy(zero_copy_only=False)
            rows += table.num_rows
    return rows, masked


def loader_pass(make, n_rows: int) -> tuple[int, int, float]:
    """Batches from a fresh dataset until n_rows rows: (rows, masked positions, seconds spent
    building the dataset, i.e. its index scan)."""
    start = time.perf_counter()
    ds = make()
    built = time.perf_counter() - start
    rows = masked = 0
    for batch in ds:
        lognorm = batch["lognorm"]
        masked += len(lognorm.values) if isinstance(lognorm, Ragged) else len(lognorm)
        rows += len(batch["example_id"])
        if rows >= n_rows:
            break
    return rows, masked, built


def read_share(caches, vocab, method, n_rows: int) -> float:
    """Share of a train-student loader pass spent in Cache.read_block (Parquet pages to numpy,
    the raw scan's work), from one extra pass with the reads timed."""
    spent = [0.0]

    def timed(read):
        def read_block(*args, **kwargs):
            start = time.perf_counter()
            try:
                return read(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return read_block

    for cache in caches:
        cache.read_block = timed(cache.read_block)
    try:
        start = time.perf_counter()
        loader_pass(lambda: dataset(caches, vocab, method, batch_size=LOADER_BATCH, remap=True, collate=True), n_rows)
        return spent[0] / (time.perf_counter() - start)
    finally:
        for cache in caches:
            del cache.read_block


def bench_loader(caches, vocab, repeats: int) -> dict:
    method = mergedistill(vocab)
    files = sorted(p for c in caches for p in (c.path / "shards").glob("*.parquet"))
    columns = list(method.plan.columns)
    total = sum(len(c) for c in caches)
    counts = {}

    def run_raw():
        counts["raw"] = (*raw_scan(files, columns), 0.0)

    def run_loader(name, remap, collate):
        def make():
            return dataset(caches, vocab, method, batch_size=LOADER_BATCH, remap=remap, collate=collate)

        def run():
            counts[name] = loader_pass(make, LOADER_EPOCHS * total)
        return run

    fns = {
        "raw": run_raw,
        "bare": run_loader("bare", False, False),
        "train": run_loader("train", True, True),
    }
    loader_pass(lambda: dataset(caches, vocab, method, batch_size=LOADER_BATCH, remap=True, collate=True),
                LOADER_BATCH)  # warm-up: loads the compiled numba kernels
    times = interleaved_best(fns, repeats)
    reading = read_share(caches, vocab, method, LOADER_EPOCHS * total)
    out = {"read_share": reading, "rows": total, "masked": counts["raw"][1], "files": len(files),
           "bytes_on_disk": sum(p.stat().st_size for p in files)}
    for name, seconds in times.items():
        rows, masked, built = counts[name]
        out[name] = {"seconds": seconds, "rows_per_s": rows / seconds,
                     "mb_per_s": masked * TOPK_BYTES_PER_MASKED / 1e6 / seconds, "index_s": built}
    return out


# (b) Student step time ------------------------------------------------------------------


def teacher_config(hidden: int, layers: int, vocab_size: int = TEACHERS["hi"][1]):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, intermediate_size=4 * hidden, pad_token_id=0)


def forward_macs(config, tokens: float, masked: float) -> float:
    """Multiply-adds of a BERT masked-LM forward over `tokens` tokens with the MLM head at
    `masked` positions: dense layers (embeddings are lookups), head transform and decoder.
    Attention's score products add under 5% at these lengths and are left out."""
    per_layer = 4 * config.hidden_size**2 + 2 * config.hidden_size * config.intermediate_size
    decoder = config.hidden_size**2 + config.hidden_size * config.vocab_size
    return tokens * config.num_hidden_layers * per_layer + masked * decoder


def online_teacher_configs(student_config, cache) -> dict:
    """Two teachers over mBERT's vocabulary, each SIZE_RATIO x the student by one measure:
    BERT-Small's shape (512 hidden, 4 layers; parameters), and 256 hidden with the fewest
    layers whose forward over this cache's rows (tokens and masked positions per row, from
    the manifest) costs SIZE_RATIO x the student's multiply-adds."""
    totals = cache.manifest["totals"]
    tokens, masked = totals["tokens"] / totals["rows"], totals["masked"] / totals["rows"]
    student = forward_macs(student_config, tokens, masked)
    layers = 1
    while forward_macs(teacher_config(256, layers), tokens, masked) < SIZE_RATIO * student:
        layers += 1
    return {f"{SIZE_RATIO}x parameters": teacher_config(512, 4),
            f"{SIZE_RATIO}x forward FLOPs": teacher_config(256, layers)}


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class StepRunner:
    """One trainer, stepped either from cached targets or from a teacher run on each batch."""

    def __init__(self, cache, vocab, batch_size: int, out: Path):
        import torch

        from xkd.student.models import StudentConfig, build_student
        from xkd.student.options import TrainStudentOptions
        from xkd.student.trainer import Trainer

        torch.manual_seed(0)
        self.vocab = vocab
        self.method = mergedistill(vocab)
        self.model = build_student(StudentConfig(**STUDENT), vocab.size, vocab.pad_id)
        offline = dataset([cache], vocab, self.method, batch_size=batch_size, remap=True, collate=True)
        options = TrainStudentOptions(method="mergedistill", out=str(out), steps=1000)
        self.trainer = Trainer(self.model, self.method, offline, options, device="cpu")
        self.model.train()
        # Online KD reads what a teacher needs to see (its own ids, the masks), not the top-k.
        online_columns = [c for c in self.method.plan.columns if c not in ("topk_ids", "topk_logits", "lognorm")]
        online = dataset([cache], vocab, self.method, batch_size=batch_size, remap=False, collate=True,
                         columns=online_columns)
        self.batches = {"offline": iter(offline), "online": iter(online)}
        self.table = torch.from_numpy(vocab.map_for(cache.manifest).astype(np.int64))
        self.phases: dict[str, list[dict]] = {}
        self.shapes: list[tuple[int, int]] = []

    def step(self, name: str, teacher=None) -> float:
        """One optimiser step; returns its seconds and records where they went."""
        import torch

        t = self.trainer
        start = time.perf_counter()
        batch = next(self.batches["online" if teacher is not None else "offline"])
        batch.pop("loader_state")
        loaded = time.perf_counter()
        if teacher is not None:
            batch = self._teacher_targets(teacher, batch)
        taught = time.perf_counter()
        losses = t.ddp(batch, t.step)  # the trainer's module: the method's losses on the student
        losses["loss"].backward()
        params = [p for g in t.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, t.config.clip)
        backward = time.perf_counter()
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.scheduler.step()
        t.step += 1
        end = time.perf_counter()
        self.shapes.append((int(batch["attention_mask"].sum()), len(batch["masked_flat"])))
        self.phases.setdefault(name, []).append({
            "load": loaded - start, "teacher": taught - loaded, "forward+backward": backward - taught,
            "optimizer": end - backward, "total": end - start})
        return end - start

    def _teacher_targets(self, teacher, batch: dict) -> dict:
        """Top-k and log-normaliser from the teacher now, as cache-teachers would store them,
        in union ids; the student's inputs and labels remapped to union ids."""
        import torch

        with torch.no_grad():
            ids = batch["input_ids"]
            hidden = teacher.bert(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
            logits = teacher.cls(hidden.reshape(-1, hidden.shape[-1])[batch["masked_flat"]]).float()
            top = logits.topk(K, dim=-1)
            lognorm = torch.logsumexp(logits, dim=-1)
        return {**batch, "input_ids": self.table[ids], "labels": self.table[batch["labels"]],
                "topk_ids": self.table[top.indices], "topk_logits": top.values, "lognorm": lognorm}



def bench_steps(cache, vocab, batch_size: int, steps: int, out: Path) -> dict:
    import torch
    from transformers import BertForMaskedLM

    runner = StepRunner(cache, vocab, batch_size, out)
    configs = online_teacher_configs(runner.model.config, cache)
    torch.manual_seed(0)
    teachers = {name: BertForMaskedLM(config).eval() for name, config in configs.items()}
    variants = {"offline": None, **{f"online, {name}": t for name, t in teachers.items()}}
    for _ in range(WARMUP_STEPS):  # allocator, optimiser state, first window read
        for name, teacher in variants.items():
            runner.step(name, teacher)
    runner.phases.clear()
    runner.shapes.clear()
    order = list(variants)
    for i in range(steps):
        # Each round starts with another variant, so none always follows the same one (the
        # allocator's and caches' state after a teacher forward differs from after a step).
        for name in order[i % len(order):] + order[:i % len(order)]:
            say(f"step {i + 1}/{steps}: {name}")
            runner.step(name, variants[name])
    tokens, masked = (float(np.mean(v)) for v in zip(*runner.shapes))
    student_macs = forward_macs(runner.model.config, tokens, masked)
    result = {
        "batch_size": batch_size, "steps": steps, "tokens": tokens, "masked": masked,
        "threads": torch.get_num_threads(),
        "student_params": count_params(runner.model), "student_macs": student_macs, "union_size": vocab.size,
        "variants": {}, "teachers": {},
    }
    for name, t in teachers.items():
        result["teachers"][name] = {"hidden": t.config.hidden_size, "layers": t.config.num_hidden_layers,
                                    "params": count_params(t), "macs": forward_macs(t.config, tokens, masked)}
    for name, records in runner.phases.items():
        result["variants"][name] = {k: statistics.median(r[k] for r in records) for k in records[0]}
    return result


# (c) Peak RSS ---------------------------------------------------------------------------


def child_main(args) -> int:
    """Runs in a fresh process: a full loader epoch, or a short train-student run; prints
    its peak RSS as JSON."""
    from xkd.vocab import load_vocab

    def peak_mb() -> float:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child's would
        # start at this bench's own (teachers and all) peak.
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cache = open_cache(args.cache)
    result = {"rows_in_cache": len(cache)}
    if args.child == "dense":
        import importlib

        for module in ("xkd.student.data", "xkd.student.methods.tinybert"):  # imports before the baseline
            importlib.import_module(module)
        result["peak_mb_before"] = peak_mb()
        result["rows_read"] = dense_child(cache)
    elif args.child == "loader":
        vocab = load_vocab(args.vocab)
        ds = dataset([cache], vocab, mergedistill(vocab), batch_size=LOADER_BATCH, remap=True, collate=True)
        result["peak_mb_before"] = peak_mb()
        rows = 0
        for batch in ds:
            rows += len(batch["example_id"])
            if rows >= len(cache):
                break
        result["rows_read"] = rows
    else:
        from xkd.student.options import TrainStudentOptions
        from xkd.student.run import train_student

        result["peak_mb_before"] = peak_mb()
        summary = train_student(TrainStudentOptions(
            method="mergedistill", caches=[args.cache], vocab=args.vocab, out=args.out, steps=args.steps,
            log_every=args.steps, batch_size=args.batch_size, hidden=64, layers=2, heads=2, device="cpu",
        ))
        result["rows_read"] = summary["steps"] * args.batch_size
    result["peak_mb"] = peak_mb()
    print(json.dumps(result))
    return 0


def peak_rss(mode: str, cache: Path, vocab: Path, out: Path, steps: int = RSS_TRAIN_STEPS,
             batch_size: int = RSS_TRAIN_BATCH) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--cache", str(cache), "--vocab", str(vocab),
           "--out", str(out), "--steps", str(steps), "--batch-size", str(batch_size)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["seconds"] = time.perf_counter() - start
    return result


def bench_rss(work: Path, vocab_dir: Path, rows_per_shard: int, shards: int) -> dict:
    out = {}
    for scale in (1, 10):
        say(f"RSS: writing a cache of {scale * shards * rows_per_shard:,} rows")
        cache = make_cache(work / f"rss-x{scale}", "hi", scale * shards, rows_per_shard, ("en", "hi"), seed=7)
        for mode in ("loader", "train"):
            say(f"RSS: {mode} over {len(cache):,} rows")
            out[mode, scale] = peak_rss(mode, cache.path, vocab_dir, work / f"student-{mode}-x{scale}")
            files = (cache.path / "shards").rglob("*")
            out[mode, scale]["bytes_on_disk"] = sum(p.stat().st_size for p in files if p.is_file())
    return out



# (d) Dense teacher outputs --------------------------------------------------------------

DENSE_LAYERS = (1, 2, 3, 4)  # hidden states and attention of a 4-layer teacher
DENSE_BATCH, DENSE_EPOCHS = 64, 3
DENSE_LAYOUTS = {  # label -> (codec, attention layout); the first is what schema 1 wrote
    "schema 1: zstd-1, attention padded to max length": ("zstd", "padded"),
    "schema 2 default: raw + CRC32C, attention real keys only": ("none", "keys"),
    "lz4 + byte shuffle, real keys": ("lz4", "keys"),
    "zstd-1, real keys": ("zstd", "keys"),
}
DEFAULT_LAYOUT = "schema 2 default: raw + CRC32C, attention real keys only"
TARGET_DENSE_ZARR, TARGET_DENSE_NP = 0.6, 0.3
# x1 holds 8 one-row-group shards, one shuffle window: a smaller cache would fit in less than
# a window, and the x10 / x1 ratio would measure the window, not growth with the cache.
RSS_DENSE_ROWS, RSS_DENSE_SHARDS, RSS_DENSE_HEADS, RSS_DENSE_MAX_LENGTH = 250, 8, 12, 32


def build_dense_cache(work: Path, rows: int) -> Path:
    """The real pipeline: cache-teachers with a random-weight BertForMaskedLM of width 768
    (4 layers, 12 heads) over the real mBERT vocab, on IITB English lines. A finished cache
    in `work` (--dense-work) is reused: the same command resumes to the same cache."""
    import io

    from xkd.pipeline import CacheTeachersOptions, cache_teachers

    from conftest import PARALLEL, build_tiny_bert

    teacher = work / "dense-teacher"
    if not (teacher / "config.json").is_file():
        build_tiny_bert(teacher, VOCABS / "bert-base-multilingual-cased.vocab.txt",
                        lowercase=False, hidden=768, layers=4, heads=12, seed=3)
    corpus = f"parallel:{PARALLEL}/iitb-en-hi/train.en@en,{PARALLEL}/iitb-en-hi/train.hi@hi"
    result = cache_teachers(CacheTeachersOptions(
        teachers=[str(teacher)], corpus=corpus, out=str(work / "dense"), sides="src", max_pairs=rows, topk=K,
        hidden_layers=DENSE_LAYERS, hidden_positions="all", attention_layers=DENSE_LAYERS, max_length=128, text=False,
    ), log=io.StringIO())
    return Path(result["caches"][0]["path"])


def rewrite_layout(source: Path, out: Path, codec: str, layout: str) -> Path:
    """The same rows and values with every dense output in `codec` and attention in `layout`
    (schema 1's writer is this writer with codec zstd and attention padded)."""
    from xkd.storage.convert import rewrite_cache

    return rewrite_cache(source, out, codec=codec, attention_layout=layout)


def tinybert_for(cache, vocab, attention: bool):
    """tinybert stage 1 as train-student plans it for a 4-layer, 12-head student (layer map
    m -> m; no embedding term: the cache holds no hidden.0)."""
    from xkd.storage.view import view_of
    from xkd.student.methods import get_method, method_config
    from xkd.student.models import StudentConfig, student_shape

    cls = get_method("tinybert")
    config = method_config("tinybert", {"embedding_weight": "0", **({} if attention else {"attention_weight": "0"})})
    plan = cls.plan_for(config, [view_of(cache)], student_shape(StudentConfig(hidden=312, layers=4, heads=12), None))
    return cls(config, plan, vocab=vocab)


def dense_loader_pass(cache, vocab, method, n_rows: int, workers: int = 0) -> int:
    import torch

    from xkd.student.data import StreamConfig, StreamingDataset

    plan = method.plan
    ds = StreamingDataset([cache], StreamConfig(batch_size=DENSE_BATCH, columns=plan.columns, dense=plan.dense),
                          remap_tables=[vocab.map_for(cache.manifest)], collate=method.collate)
    batches = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers) if workers else ds
    rows = 0
    for batch in batches:
        rows += len(batch["example_id"])
        if rows >= n_rows:
            break
    return rows


def zarr_decode(cache, names) -> int:
    """Zarr's own read of whole arrays (every shard), as numpy: decoded bytes."""
    import zarr

    total = 0
    for shard in cache.shard_ids:
        group = zarr.open_group(str(cache.path / "shards" / f"{shard:05d}.zarr"), mode="r")
        for name in names:
            total += group[name][...].nbytes
    return total


def npy_load(files) -> int:
    return sum(np.load(f).nbytes for f in files)


def dense_bytes(cache) -> dict:
    """Bytes on disk per token: hidden states and attention (per layer), the rest."""
    tokens = cache.manifest["totals"]["tokens"]
    out = {"hidden": 0, "attn": 0, "other": 0}
    for shard in cache.manifest["shards"]:
        for name, size in shard["bytes_by_output"].items():
            out[name.split(".")[0] if name.startswith(("hidden.", "attn.")) else "other"] += size
    return {k: v / tokens for k, v in out.items()}


def bench_dense(work: Path, vocab_rows: int, repeats: int, keep: Path | None = None) -> dict:
    from xkd.vocab import build_vocab, load_vocab

    say(f"(d) dense: caching {vocab_rows:,} IITB rows with cache-teachers (width 768, 4 layers, 12 heads)")
    start = time.perf_counter()
    built = build_dense_cache(keep or work, vocab_rows)
    out = {"build_s": time.perf_counter() - start}
    build_vocab([str((keep or work) / "dense-teacher")], work / "dense-vocab")
    vocab = load_vocab(work / "dense-vocab")
    caches = {}
    for label, (codec, layout) in DENSE_LAYOUTS.items():
        say(f"(d) dense: rewriting as {label}")
        caches[label] = open_cache(rewrite_layout(built, work / f"dense-{codec}-{layout}", codec, layout))
    default = caches[DEFAULT_LAYOUT]
    out["rows"], out["tokens"] = len(default), default.manifest["totals"]["tokens"]
    out["bytes"] = {label: dense_bytes(c) for label, c in caches.items()}
    out["decode"] = {}
    for label, cache in caches.items():  # Zarr's own decode of every dense array, per layout
        names = list(cache.dense_specs)
        decoded = zarr_decode(cache, names)
        seconds = interleaved_best({"zarr": lambda cache=cache, names=names: zarr_decode(cache, names)}, repeats)["zarr"]
        out["decode"][label] = decoded / seconds / 1e9
    out["loader"] = {}
    for attention in (False, True):
        key = "hidden + attention" if attention else "hidden states"
        for label in (DEFAULT_LAYOUT, next(iter(DENSE_LAYOUTS))):
            cache = caches[label]
            method = tinybert_for(cache, vocab, attention)
            names = list(method.plan.dense)
            npy = work / f"npy-{len(names)}-{label[:8]}"
            npy.mkdir(exist_ok=True)
            files = []
            for shard in cache.shard_ids:
                for name in names:
                    files.append(npy / f"{shard}-{name}.npy")
                    np.save(files[-1], zarr_decode_one(cache, shard, name))
            decoded = zarr_decode(cache, names)
            n_rows = DENSE_EPOCHS * len(cache)
            dense_loader_pass(cache, vocab, method, DENSE_BATCH)  # numba kernels, page cache
            say(f"(d) dense: {key}, {label}")
            times = interleaved_best({
                "loader": lambda cache=cache, method=method, n_rows=n_rows: dense_loader_pass(cache, vocab, method, n_rows),
                "zarr": lambda cache=cache, names=names: [zarr_decode(cache, names) for _ in range(DENSE_EPOCHS)],
                "np.load": lambda files=files: [npy_load(files) for _ in range(DENSE_EPOCHS)],
            }, repeats)
            out["loader"][key, label] = {"decoded": decoded, "rows": n_rows, **times}
        method = tinybert_for(default, vocab, attention)
        out["loader"][key, "workers"] = {}
        for workers in (0, 1, 2):
            say(f"(d) dense: {key}, {workers} DataLoader workers")
            seconds = interleaved_best({"w": lambda method=method, workers=workers: dense_loader_pass(
                default, vocab, method, DENSE_EPOCHS * len(default), workers)}, max(1, repeats - 1))["w"]
            out["loader"][key, "workers"][workers] = DENSE_EPOCHS * len(default) / seconds
    return out


def zarr_decode_one(cache, shard: int, name: str) -> np.ndarray:
    import zarr

    return zarr.open_group(str(cache.path / "shards" / f"{shard:05d}.zarr"), mode="r")[name][...]


def make_dense_cache(root: Path, shards: int, rows_per_shard: int) -> Path:
    """Synthetic shards of dense outputs (xkd.storage.synthetic): hidden states of 2 layers
    (width 768) at every token and attention of 2 layers (12 heads, real keys only)."""
    from xkd.storage import DenseSpec

    specs = {**{f"hidden.{i}": DenseSpec(f"hidden.{i}", "token", 768) for i in (1, 2)},
             **{f"attn.{i}": DenseSpec(f"attn.{i}", "token", RSS_DENSE_HEADS * RSS_DENSE_MAX_LENGTH, layout="keys",
                                       heads=RSS_DENSE_HEADS) for i in (1, 2)}}
    meta = {"teacher": {"name": "synthetic", "num_heads": RSS_DENSE_HEADS}, "corpus": {"bench": root.name},
            "view": {"max_length": RSS_DENSE_MAX_LENGTH}, "outputs": outputs_json(K, specs)}
    with CacheWriter(root, f"bench-{root.name}", meta, planned_shards=shards) as writer:
        for s in range(shards):
            rows, dense = synthetic_rows(s, rows_per_shard, k=K, first_example_id=s * rows_per_shard,
                                         max_len=RSS_DENSE_MAX_LENGTH, dense_specs=specs, langs=("en",))
            writer.commit(write_shard_files(root, s, rows, dense, specs, has_topk=True))
    return root


def dense_child(cache) -> int:
    """One epoch of the loader over a dense cache, collated as tinybert collates (the child's work)."""
    import torch

    from xkd.student.data import StreamConfig, StreamingDataset
    from xkd.student.methods.tinybert import pair_places, token_places

    dense = tuple(sorted(cache.dense_specs))

    def collate(rows):
        lengths = rows["input_ids"].lengths()
        width = int(lengths.max())
        out = {"example_id": rows["example_id"], "token_index": torch.from_numpy(token_places(lengths, width)),
               "pair_index": torch.from_numpy(pair_places(lengths, width, RSS_DENSE_HEADS))}
        out.update({name: torch.from_numpy(rows[name].values) for name in dense})
        return out

    ds = StreamingDataset([cache], StreamConfig(batch_size=DENSE_BATCH, columns=("example_id", "input_ids"), dense=dense),
                          collate=collate)
    rows = 0
    for batch in ds:
        rows += len(batch["example_id"])
        if rows >= len(cache):
            break
    return rows


def bench_dense_rss(work: Path, shards: int, rows_per_shard: int) -> dict:
    out = {}
    for scale in (1, 10):
        say(f"(d) dense RSS: writing {scale * shards * rows_per_shard:,} synthetic dense rows")
        root = make_dense_cache(work / f"dense-rss-x{scale}", scale * shards, rows_per_shard)
        out[scale] = peak_rss("dense", root, work, work / f"dense-rss-out-{scale}")
        out[scale]["bytes_on_disk"] = sum(p.stat().st_size for p in (root / "shards").rglob("*") if p.is_file())
    return out


def dense_report(d: dict, rss: dict, repeats: int) -> str:
    labels = list(DENSE_LAYOUTS)
    lines = [
        "### Dense teacher outputs (tinybert)",
        "",
        f"Cache made by the real pipeline (`cache_teachers`, {d['build_s']:.0f} s): a random-weight BertForMaskedLM, "
        "width 768, 4 layers, 12 heads, over the real mBERT vocabulary, on the first "
        f"{d['rows']:,} IITB English lines ({d['tokens']:,} tokens), `--hidden-layers 1,2,3,4 --hidden-positions all "
        f"--attention-layers 1,2,3,4 --topk {K} --max-length 128`; its shards then rewritten with each layout below "
        "(same rows, same values). Run alone with `python bench/train.py --only dense`.",
        "",
        "(d1) Bytes on disk per token, per layer (4 layers of each), and Zarr's own decode of every dense array "
        f"(zarr.open_group(...)[name][...], every shard; best of {repeats}).",
        "",
        "| layout | hidden B/token/layer | attention B/token/layer | Zarr decode GB/s |",
        "|---|---:|---:|---:|",
    ]
    for label in labels:
        b = d["bytes"][label]
        lines.append(f"| {label} | {b['hidden'] / 4:,.0f} | {b['attn'] / 4:,.0f} | {d['decode'][label]:.2f} |")
    lines += [
        "",
        "Decoded, a hidden state is 1,536 B per token per layer (768 fp16); a padded attention vector 3,072 "
        "(12 heads x 128 keys); the real keys only, 24 x the row length on average over tokens.",
        "",
        f"(d2) The tinybert loader (StreamingDataset with tinybert stage 1's columns, dense outputs, remap and "
        f"collate: teacher states and attention kept packed as gathered, fp16, with the index arrays the losses "
        f"use to pick the student's matching entries), batches of {DENSE_BATCH}, {DENSE_EPOCHS} epochs per pass, "
        "page cache warm, against Zarr's own "
        "decode and np.load (the same arrays saved raw as .npy) of the arrays it reads, the same number of times; "
        f"best of {repeats} interleaved passes. GB/s counts decoded dense values (attention: stored values).",
        "",
        "| dense outputs | layout | loader rows/s | loader GB/s | Zarr GB/s | np.load GB/s | vs Zarr | vs np.load | "
        "target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    missed = []
    for key in ("hidden states", "hidden + attention"):
        for label in (DEFAULT_LAYOUT, labels[0]):
            r = d["loader"][key, label]
            per = DENSE_EPOCHS * r["decoded"] / 1e9
            vs_zarr, vs_np = r["zarr"] / r["loader"], r["np.load"] / r["loader"]
            ok = vs_zarr >= TARGET_DENSE_ZARR and vs_np >= TARGET_DENSE_NP
            target = ""
            if label == DEFAULT_LAYOUT:
                target = (f">= {TARGET_DENSE_ZARR}x Zarr: {met(vs_zarr >= TARGET_DENSE_ZARR)}; >= {TARGET_DENSE_NP}x "
                          f"np.load: {met(vs_np >= TARGET_DENSE_NP)}")
                if not ok:
                    missed.append((key, vs_zarr, vs_np))
            lines.append(f"| {key} | {label} | {r['rows'] / r['loader']:,.0f} | {per / r['loader']:.2f} | "
                         f"{per / r['zarr']:.2f} | {per / r['np.load']:.2f} | {vs_zarr:.2f}x | {vs_np:.2f}x | {target} |")
    lines += ["", DENSE_BEFORE]
    lines += ["", "(d3) DataLoader workers (schema 2 default layout), rows/s:", "",
              "| dense outputs | 0 workers | 1 worker | 2 workers |", "|---|---:|---:|---:|"]
    for key in ("hidden states", "hidden + attention"):
        w = d["loader"][key, "workers"]
        lines.append(f"| {key} | {w[0]:,.0f} | {w[1]:,.0f} | {w[2]:,.0f} |")
    ratio = rss[10]["peak_mb"] / rss[1]["peak_mb"]
    lines += [
        "",
        f"(d4) Peak RSS (VmHWM of a fresh process) of one loader epoch over synthetic dense shards "
        f"(xkd.storage.synthetic: hidden states of 2 layers, width 768, and attention of 2 layers, "
        f"{RSS_DENSE_HEADS} heads, real keys only; rows of up to {RSS_DENSE_MAX_LENGTH} tokens, "
        f"{rss[1]['rows_in_cache'] // RSS_DENSE_SHARDS:,} rows per shard, one row group each, "
        f"{RSS_DENSE_SHARDS} shards: one shuffle window), batches of 64, tinybert's collate, and over a cache 10x larger:",
        "",
        "| cache | rows | on disk | peak RSS after setup | peak RSS | x10 / x1 | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for scale in (1, 10):
        r = rss[scale]
        tail = f"{ratio:.2f}x | < {TARGET_RSS}x: {met(ratio < TARGET_RSS)}" if scale == 10 else " | "
        lines.append(f"| x{scale} | {r['rows_in_cache']:,} | {r['bytes_on_disk'] / 1e6:,.0f} MB | "
                     f"{r['peak_mb_before']:.0f} MB | {r['peak_mb']:.0f} MB | {tail} |")
    if missed:
        lines += ["", "Missed: " + "; ".join(f"{k}: {z:.2f}x of Zarr (target {TARGET_DENSE_ZARR}x), {n:.2f}x of np.load "
                                              f"(target {TARGET_DENSE_NP}x)" for k, z, n in missed) + ". " + DENSE_WHY]
    return "\n".join(lines) + "\n"


DENSE_BEFORE = (  # measured with the code and format this part replaced, kept so the change stays visible
    'Before this layout (schema 1 and the loader of 2026-11-29, same cache, same 3-epoch passes, measured '
    "separately): hidden states 1,645 rows/s (0.20 GB/s, 0.28x of Zarr's zstd decode, 0.03x of np.load); with"
    ' attention 330 rows/s (0.12 GB/s of decoded hidden states and padded attention). cProfile of that loader'
    ' (hidden states only, one epoch, 9.0 s under the profiler): 36% converting the padded fp16 batch to fp32'
    " in torch (CPU fp16 conversion ran at 0.25-0.34 GB/s here), 28% concatenating each window's row groups "
    "(a full copy of the window), 23% in Zarr's read (zstd-1 on fp16 states that compress by 8%, a fresh "
    "buffer per chunk, an event loop round trip per read); the loader's own per-row work was under 5%. "
    'Changed: dense values stay fp16 into the batch (the losses convert on the device), windows are gathered '
    'from their parts without concatenation, padding is one compiled copy into an uninitialised buffer, dense'
    ' chunks default to raw values + CRC32C read straight into place (reader.DirectArray), and attention '
    "keeps only each row's real keys. Then (same day) the padding went too: tinybert's losses take the teacher's "
    "states and maps packed as gathered and pick the student's matching entries by index "
    "(losses.packed_hidden_mse, packed_attention_mse), so no padded (batch, length, 768) or (batch, 12, length, "
    "length) teacher tensor is built. The table above is the first run with both changes, on a quiet machine; the "
    "run before the packed losses, on a machine other work shared, gave 5,245 rows/s (0.65x of Zarr) for hidden states "
    "and 1,856 (0.32x) with attention."
)

DENSE_WHY = (
    "Changed on 2026-12-06 (measured then on a machine shared with other benchmarks, load average 4-8): window "
    "and batch buffers are recycled (reader.RecycledBuffers: a buffer is handed "
    "out again once nothing references it), so chunk reads and gathers no longer fault in new pages; and the next "
    "shuffle window is read on a reader thread while the current window's batches are gathered (one window ahead "
    "at most; batches bit-identical, with workers and on resume). Both loaders side by side (separate processes, "
    "alternated, 3 rounds of 3 passes, hidden states, same load): CPU per 3-epoch pass 1.39-1.61 s before, "
    "1.04-1.22 s after; at a quieter moment (5 alternated passes), 0.92 s wall without the read ahead and 0.76 s "
    "with it, np.load 0.25 s. Peak RSS (d4) rose from 803/814 MB to 829/878 MB: free buffers are kept up to the "
    "bytes in use, and one window is read ahead. Why still short: per pass np.load reads the 1.08 GB once, one "
    "read() per array, unchecked; the loader reads 1.45 GB (the pass's last batch opens a fourth window: a "
    "quarter of the reads, for 24 rows), CRCs every byte and copies 1.08 GB into batches: on a quiet core about "
    "0.3 s readinto, 0.13 s CRC (google_crc32c, already hardware speed), 0.3 s gather and 0.15 s Parquet, collate "
    "and Python, 0.9 CPU-s, where the target needs 0.6 s wall; the read ahead hides the read only where a second "
    "core is free. Left to try: batches as views of a window stored in shuffled order, which needs the read "
    "itself to place each row (one copy where there are two now; Cache.read_block gives row groups in file order, "
    "so a change to the reader's interface). DataLoader workers are slower here, not faster: a batch of dense "
    "outputs is MBs, which a worker copies into shared memory and the main process maps back, per batch, on the "
    "same two cores that decode; and each worker reads every window it serves. On a machine with cores to spare "
    "for workers that trade changes."
)


# Report ---------------------------------------------------------------------------------


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(loader: dict, steps: dict, rss: dict, seconds: float, load: tuple[float, float], args) -> str:
    raw = loader["raw"]
    lines = [
        "## train",
        "",
        f"Run with `./dev bench train` (bench/train.py) on {datetime.date.today().isoformat()}, {machine()}; "
        f"{seconds:.0f} s. The machine was shared with other jobs (load average {load[0]:.1f} at the start, "
        f"{load[1]:.1f} at the end, over the last minute), so absolute numbers vary; every ratio compares runs "
        "interleaved in the same process. The ratios move with that load too: other jobs slow the loader's "
        "single-threaded part and the student's memory-bound passes more than pyarrow's multi-threaded "
        "decoding and the teachers' matmuls.",
        f"Caches: synthetic top-{K} shards (xkd.storage.synthetic) whose manifests name two real vocab files, "
        "bert-base-uncased (English rows, ids < 30,522) and mBERT cased (Hindi rows, ids < 119,547); the union "
        "vocab is built from the same files by `xkd.vocab.build_vocab`, so ids are remapped through real tables.",
        "",
        f"(a) Loader throughput over {loader['rows']:,} rows in {loader['files']} Parquet files "
        f"({loader['bytes_on_disk'] / 1e6:.0f} MB, {loader['masked']:,} masked positions), page cache warm; "
        f"loader batches of {LOADER_BATCH}, {LOADER_EPOCHS} epochs per pass; best of {args.repeats} interleaved "
        f"passes. MB/s counts decoded top-k columns ({TOPK_BYTES_PER_MASKED} bytes per masked position).",
        "",
        "| reader | rows/s | top-k MB/s | vs raw scan | target |",
        "|---|---:|---:|---:|---|",
        f"| raw pyarrow scan (read_row_group, same columns, to numpy) | {raw['rows_per_s']:,.0f} | "
        f"{raw['mb_per_s']:.0f} | 1.00x | |",
    ]
    names = {"train": "StreamingDataset as train-student builds it (remap + mergedistill collate)",
             "bare": "StreamingDataset, no remap, no collate"}
    for key in ("train", "bare"):
        r = loader[key]
        ratio = r["rows_per_s"] / raw["rows_per_s"]
        lines.append(f"| {names[key]} | {r['rows_per_s']:,.0f} | {r['mb_per_s']:.0f} | {ratio:.2f}x | "
                     f">= {TARGET_LOADER}x: {met(ratio >= TARGET_LOADER)} |")
    if min(loader[k]["rows_per_s"] for k in names) < TARGET_LOADER * raw["rows_per_s"]:
        lines += [
            "",
            f"Why the loader target is missed: reading (Cache.read_block, the raw scan's own work) is "
            f"{loader['read_share']:.0%} of a train-student loader pass; the rest is per-batch work the raw scan "
            "does not do: drawing each row's language and position, gathering the batch's rows from the shuffle "
            "windows (numba, one copy), remapping ids, padding into int64 tensors (numba), the collate's "
            "conversions to torch, and, where a language crosses into its next epoch near the end of a pass, a "
            "whole window read for a few rows. It is Python-level work per batch and per window on one core, "
            "where pyarrow decodes a row group's columns on both." + PREFETCH_TRIED,
        ]
    lines += [
        "",
        f"Building the dataset (its index scan of the `lang` column of every row group) took "
        f"{loader['train']['index_s'] * 1000:.0f} ms, outside the times above; it is paid once per run.",
        "",
    ]
    off = steps["variants"]["offline"]
    lines += [
        f"(b) Student step time, batch {steps['batch_size']} ({steps['tokens']:.0f} tokens, "
        f"{steps['masked']:.0f} masked positions on average), CPU (torch on {steps['threads']} threads), fp32, "
        f"medians of {steps['steps']} interleaved steps after {WARMUP_STEPS} warm-up "
        f"step{'s' if WARMUP_STEPS > 1 else ''} each. Student: BERT, "
        f"hidden {STUDENT['hidden']}, {STUDENT['layers']} layers, over the {steps['union_size']:,}-token union "
        f"vocab ({steps['student_params'] / 1e6:.1f}M parameters, {steps['student_macs'] / 1e9:.1f} G "
        "multiply-adds per forward). Teachers: BERT masked LMs over mBERT's 119,547-token vocabulary (random "
        "weights: speed does not depend on them), computing the full-vocabulary logits at the masked positions, "
        f"their top-{K} and log-normaliser, in fp32 under no_grad. Step = loader + (teacher) + forward + "
        "backward + clipping + AdamW + schedule, with the optimiser (fused AdamW) and schedule `Trainer` builds.",
        "",
        "| variant | teacher size vs student | step (s) | load | teacher | fwd+bwd | optimizer "
        "| offline / this | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
        f"| offline (cached top-{K}) | | {off['total']:.2f} | {off['load']:.3f} | | {off['forward+backward']:.2f} "
        f"| {off['optimizer']:.2f} | | |",
    ]
    for name, t in steps["teachers"].items():
        v = steps["variants"][f"online, {name}"]
        ratio = off["total"] / v["total"]
        size = (f"{t['hidden']} hidden, {t['layers']} layers: {t['params'] / steps['student_params']:.1f}x params, "
                f"{t['macs'] / steps['student_macs']:.1f}x forward FLOPs")
        lines.append(
            f"| online KD ({name}) | {size} | {v['total']:.2f} | {v['load']:.3f} | {v['teacher']:.2f} | "
            f"{v['forward+backward']:.2f} | {v['optimizer']:.2f} | {ratio:.2f}x | <= {TARGET_STEP}x: "
            f"{met(ratio <= TARGET_STEP)} |")
    online = {n: steps["variants"][f"online, {n}"] for n in steps["teachers"]}
    missed = [n for n, v in online.items() if off["total"] / v["total"] > TARGET_STEP]
    if missed:
        student_step = off["forward+backward"] + off["optimizer"]
        teacher_vs_student = {n: v["teacher"] / student_step for n, v in online.items()}
        student_rate = 3 * steps["student_macs"] / off["forward+backward"]
        rates = {n: student_rate / (steps["teachers"][n]["macs"] / online[n]["teacher"]) for n in missed}
        lines += [
            "",
            f"Why the step target is missed ({', '.join(missed)}): offline / online = S / (S + T), where S is the "
            "student's own step and T the teacher's forward, so it is at most 0.5 only when T >= S; measured "
            "T / S: " + ", ".join(f"{r:.2f} ({n})" for n, r in teacher_vs_student.items()) + ". The loader is "
            f"{off['load'] / off['total']:.1%} of the offline step. S is large for its FLOPs: the student's MLM "
            f"head scores every masked position against the whole {steps['union_size']:,}-token union vocabulary "
            f"(its {steps['masked']:.0f} x {steps['union_size']:,} fp32 logits are written, normalised, gathered "
            "and back-propagated in memory-bound passes) and its tied embedding gets a dense "
            f"{steps['union_size']:,} x {STUDENT['hidden']} gradient, while the teacher's forward is mostly "
            "dense matmuls: per second, the student's forward + backward (about 3x its forward's multiply-adds) "
            "does " + ", ".join(f"{r:.0%} ({n})" for n, r in rates.items()) + " of the multiply-adds the "
            "teacher's forward does. The optimizer (the Trainer's fused AdamW) is "
            f"{off['optimizer'] / off['total']:.0%} of S.",
        ]
    lines += [
        "",
        "(c) Peak resident memory (VmHWM of a fresh child process) over a cache and one 10x larger "
        "(mBERT-vocab teacher, English and Hindi rows interleaved, 512-row row groups). Loader: one full epoch "
        f"with remap + mergedistill collate, batches of {LOADER_BATCH}. train-student: "
        f"`xkd.student.run.train_student`, mergedistill, {RSS_TRAIN_STEPS} steps of {RSS_TRAIN_BATCH} rows, "
        "student hidden 64 / 2 layers (the union-vocab embedding dominates its memory). \"After setup\": "
        "imports done and, for the loader, the dataset built (its index scan included).",
        "",
        "| run | rows in cache | cache on disk | rows read | peak RSS after setup | peak RSS | x10 / x1 | target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, label in (("loader", "loader epoch"), ("train", "train-student")):
        ratio = rss[mode, 10]["peak_mb"] / rss[mode, 1]["peak_mb"]
        for scale in (1, 10):
            r = rss[mode, scale]
            tail = f"{ratio:.2f}x | < {TARGET_RSS}x: {met(ratio < TARGET_RSS)}" if scale == 10 else " | "
            lines.append(f"| {label}, x{scale} | {r['rows_in_cache']:,} | {r['bytes_on_disk'] / 1e6:.0f} MB | "
                         f"{r['rows_read']:,} | {r['peak_mb_before']:.0f} MB | {r['peak_mb']:.0f} MB | {tail} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-docs", action="store_true", help="print the tables only")
    parser.add_argument("--rows", type=int, default=5000, help="(a) rows per shard; 4 shards per language")
    parser.add_argument("--repeats", type=int, default=5, help="(a) interleaved passes")
    parser.add_argument("--steps", type=int, default=4, help="(b) measured steps per variant")
    parser.add_argument("--batch-size", type=int, default=16, help="(b) student batch")
    parser.add_argument("--rss-rows", type=int, default=4000, help="(c) rows per shard; 2 shards, then 20")
    parser.add_argument("--only", choices=("all", "dense"), default="all",
                        help="dense: only (d), written into its own part of the '## train' section")
    parser.add_argument("--dense-rows", type=int, default=3000, help="(d) IITB rows cached by the real pipeline")
    parser.add_argument("--dense-repeats", type=int, default=3, help="(d) interleaved passes")
    parser.add_argument("--dense-work", help="(d) keep the teacher and its pipeline-made cache here, reused when run again")
    parser.add_argument("--dense-rss-rows", type=int, default=RSS_DENSE_ROWS,
                        help="(d) synthetic rows per shard; 8 shards, then 80")
    parser.add_argument("--child", choices=("loader", "train", "dense"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)

    start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="xkd-bench-train-") as tmp:
        work = Path(tmp)
        if args.only == "all":
            say("building the union vocab (bert-base-uncased + mBERT cased)")
            vocab = build_union_vocab(work / "vocab")
            say("writing the loader caches")
            caches = [make_cache(work / f"loader-{lang}", lang, 4, args.rows, (lang,), seed=i)
                      for i, lang in enumerate(TEACHERS)]
            say("(a) loader throughput")
            loader = bench_loader(caches, vocab, args.repeats)
            say("(b) student steps, offline and online")
            steps = bench_steps(caches[1], vocab, args.batch_size, args.steps, work / "steps")
            say("(c) peak RSS")
            rss = bench_rss(work, work / "vocab", args.rss_rows, 2)
        dense = bench_dense(work, args.dense_rows, args.dense_repeats, Path(args.dense_work) if args.dense_work else None)
        dense_rss = bench_dense_rss(work, RSS_DENSE_SHARDS, args.dense_rss_rows)
    dense_text = dense_report(dense, dense_rss, args.dense_repeats)
    if args.only == "dense":
        print(dense_text)
        if not args.no_docs:
            write_subsection(dense_text)
            say("wrote the dense part of the '## train' section of docs/benchmarks.md")
        return 0
    text = report(loader, steps, rss, time.perf_counter() - start, (load_start, os.getloadavg()[0]), args)
    text += "\n" + dense_text
    print(text)
    if not args.no_docs:
        write_section(text)
        say("wrote the '## train' section of docs/benchmarks.md")
    return 0


def write_subsection(text: str, path: Path = ROOT / "docs" / "benchmarks.md") -> None:
    """Replace the dense part (from its ### heading to the next heading) of the '## train'
    section, or append it to that section; every other line stays as it is."""
    heading = text.splitlines()[0]
    lines = path.read_text().splitlines(keepends=True)
    train = next(i for i, line in enumerate(lines) if line.rstrip() == "## train")
    end = next((i for i in range(train + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    start = next((i for i in range(train, end) if lines[i].rstrip() == heading), None)
    if start is None:
        new = (lines[:end] + (["\n"] if lines[end - 1].strip() else []) + [text]
               + (["\n"] if end < len(lines) else []) + lines[end:])
    else:
        stop = next((i for i in range(start + 1, end) if lines[i].startswith(("### ", "## "))), end)
        new = lines[:start] + [text] + (["\n"] if stop < len(lines) else []) + lines[stop:]
    path.write_text("".join(new))


if __name__ == "__main__":
    sys.exit(main())
