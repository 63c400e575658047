"""`xkd cache-teachers`: plan, then run one dask task per (teacher, shard), commit as they finish.

The client (this process) validates everything first (teachers resolve and can produce what
is asked, the corpus reads cleanly), so bad input fails before any work starts. It then opens
one CacheWriter per teacher (the single manifest owner; it holds the cache's lock), submits
the shards the manifest does not list as done, and commits each record as its task finishes.
Workers read their own slice of the corpus and load each teacher once per process.

Cache directory: OUT/<teacher slug>-<key>, where key = cache_key(teacher identity, corpus
identity, view). The same command therefore finds and resumes its cache, and any setting
that changes the bytes gives another directory.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from ..errors import BadInput, XkdError
from ..names import parse_corpus, resolve_teacher
from ..options import check_memory, check_number, command_line, config_yaml, machine_memory, size_in_words
from ..storage import CacheWriter, cache_key, outputs_json, read_manifest
from ..storage.manifest import MAX_SHARDS
from ..storage.remote import RemoteUnavailable, is_url, join, location
from ..storage.untrusted import refuse_out_inside_other_output
from .corpus import Cleaning, CorpusPlan, plan_corpus
from .masking import MaskConfig
from .options import CacheTeachersOptions
from .outputs import KINDS, SENTENCE_VECTORS, extra_kinds
from .teachers import (
    Outputs,
    TeacherLoadFailed,
    TeacherSpec,
    describe_teacher,
    resolve_compute,
)
from .work import ShardTask, View, process_shard

DEFAULT_TOPK = 8
CONFIG_FILE = "config.yaml"
DEFAULT_MASK_PROB = 0.15
TASK_RETRIES = 2


class _InterruptedSyncNoise(logging.Filter):
    """Ctrl-C that lands while distributed's `sync` is still creating its future makes the
    cancel callback it schedules fail on the event loop (NameError: free variable 'future',
    distributed.utils.sync, 2026.8), and tornado logs that with a traceback. The interrupt
    itself is handled (one line, shards kept); only that one record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, NameError) and "'future'" in str(error))


def quiet_interrupted_sync() -> None:
    logger = logging.getLogger("tornado.application")
    if not any(isinstance(f, _InterruptedSyncNoise) for f in logger.filters):
        logger.addFilter(_InterruptedSyncNoise())


class Interrupted(XkdError):
    """Ctrl-C: the message says what was kept and how to resume (exit code 130, as shells use)."""

    exit_code = 130


def check_options(opts: "CacheTeachersOptions") -> None:
    """Refuse every unusable option value, naming the option and what to give instead. The
    CLI's parser already refuses text for a number; the Python API gets the same checks."""
    unknown = [name for name in opts.extra_outputs if name not in extra_kinds()]
    if unknown:
        known = ", ".join(extra_kinds()) or "none is registered"
        raise BadInput(f"--output {unknown[0]}: no such output kind (kinds taken with --output: {known}; hidden states, "
                       "attention, sentence vectors and class logits have options of their own: see --help).")
    if opts.cpu_threads is not None and opts.scheduler == "local":
        # More torch threads than cores only contend, and 1,000,000 killed every worker with a
        # MemoryError (a thread pool that size): a local cluster's workers share this machine's cores.
        check_number("--cpu-threads", opts.cpu_threads, low=1, high=usable_cpus(), whole=True,
                     hint=f"this machine has {usable_cpus()} usable cores; leave it out to share them among the workers")
    if not is_url(opts.out):
        refuse_out_inside_other_output(Path(opts.out), "--out")
    check_implied_memory(opts)


# The least a row of a shard takes in a worker's memory while the shard is built: its column
# entries and its token, word-start, position and label arrays (numpy headers alone are ~100
# bytes each), before any teacher output.
ROW_BYTES = 512
# The least a local dask worker process takes: it imports torch and loads the teacher.
WORKER_BYTES = 100 * 10**6


def check_implied_memory(opts: "CacheTeachersOptions") -> None:
    """What the counts imply, against this machine's memory, before anything is read: a
    worker builds a whole shard's rows at once (--shard-size examples x sides x --mask-epochs
    maskings), so --mask-epochs 100000000 died in a worker's allocator after the corpus was
    read; and each local worker is a process of its own."""
    sides = 1 if opts.sides in ("src", "tgt") else 2  # "both": two on a parallel corpus, one on a monolingual one
    rows = opts.shard_size * sides * opts.mask_epochs
    option, value, per_unit = (("--mask-epochs", opts.mask_epochs, opts.shard_size * sides) if opts.mask_epochs > 1
                               else ("--shard-size", opts.shard_size, sides * opts.mask_epochs))
    check_memory(option, value, rows * ROW_BYTES,
                 f"a shard, built in one worker's memory at once, of --shard-size {opts.shard_size:,} examples x {sides} "
                 f"side(s) x --mask-epochs {opts.mask_epochs:,} = {rows:,} rows of at least {ROW_BYTES} bytes",
                 largest=machine_memory() // (ROW_BYTES * per_unit))
    if opts.workers is not None and opts.scheduler == "local":
        check_memory("--workers", opts.workers, opts.workers * WORKER_BYTES,
                     f"{opts.workers:,} local worker processes of at least {size_in_words(WORKER_BYTES)} each",
                     largest=machine_memory() // WORKER_BYTES)


@dataclass
class Job:
    """One teacher's cache in this run."""

    teacher: TeacherSpec
    view: View
    root: Path | str  # a URL for a cache on object storage
    key: str
    meta: dict
    writer: CacheWriter | None = None
    todo: list[int] | None = None


def teacher_slug(name: str) -> str:
    base = Path(name).name if name.startswith((".", "/", "~")) or Path(name).exists() else name.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "teacher"


def outputs_for(spec: TeacherSpec, opts: CacheTeachersOptions) -> Outputs:
    topk = DEFAULT_TOPK if opts.topk is None and spec.kind == "mlm" else (opts.topk or 0)
    sentence = opts.sentence if opts.sentence is not None else (SENTENCE_VECTORS if spec.kind == "encoder" else ())
    class_logits = opts.class_logits if opts.class_logits is not None else spec.kind == "classifier"
    attention_layers = tuple(sorted(opts.attention_layers))
    outputs = Outputs(topk, tuple(sorted(opts.hidden_layers)), opts.hidden_positions, tuple(sentence), class_logits,
                      attention_layers, opts.max_length if attention_layers else 0, tuple(sorted(set(opts.extra_outputs))),
                      opts.sample, opts.topk_codec if topk else "fp16")
    spec.check_outputs(outputs, opts.max_length)
    return outputs


def mask_for(spec: TeacherSpec, opts: CacheTeachersOptions) -> MaskConfig:
    prob = opts.mask_prob if opts.mask_prob is not None else (DEFAULT_MASK_PROB if spec.kind == "mlm" else 0.0)
    if prob > 0 and spec.special_ids.get("mask") is None:
        raise BadInput(f"teacher {spec.name!r} has no mask token; give --mask-prob 0 for it.")
    config = MaskConfig(prob, opts.whole_word, opts.mask_epochs, opts.seed)
    if not config.active and config.epochs > 1:
        raise BadInput(f"--mask-epochs {config.epochs} needs masking: without it every epoch would be the same row.")
    if not config.active and opts.sample:
        raise BadInput(f"--sample {opts.sample} draws at masked positions, and teacher {spec.name!r} sees unmasked text: "
                       "give --mask-prob above 0 (0.15 is BERT's), or leave --sample out.")
    return config


def cache_values(meta: dict) -> dict | None:
    """The cache-teachers options (field: value, all but --out) that make, or finish, the cache
    described by `meta`, resolved for its teacher: every setting that enters the cache key is
    given explicitly, so defaults that change between versions do not change the key. Recorded
    in the cache twice: as the command in its manifest (`made_by`; storage.completeness adds
    --out) and as its config.yaml (what --config replays). None when `meta` says too little."""
    teacher = (meta.get("teacher") or {}).get("name")
    corpus, view = meta.get("corpus") or {}, meta.get("view") or {}
    if not teacher or not corpus.get("spec") or not view:
        return None
    mask, outputs, cleaning = view.get("mask") or {}, view.get("outputs") or {}, view.get("cleaning") or {}
    sides = view.get("sides") or []
    values = {
        "teachers": (str(teacher),), "corpus": str(corpus["spec"]),
        # a named corpus read from local files
        "corpus_files": ",".join(map(str, corpus["paths"])) if ":" not in str(corpus["spec"]) and corpus.get("kind")
        not in ("hf", "sample") and corpus.get("paths") else None,
        "split": corpus.get("split") or None, "shard_size": view.get("shard_size"), "max_length": view.get("max_length"),
        "mask_prob": mask.get("prob"), "whole_word": bool(mask.get("whole_word")),
        "mask_epochs": mask.get("epochs") if mask.get("epochs", 1) != 1 else None,
        "seed": mask.get("seed") or None, "topk": outputs.get("topk"), "topk_codec": outputs.get("topk_codec"),
        "sample": outputs.get("sample"),
        "extra_outputs": tuple(outputs.get("extra") or ()),
        "sides": ("both" if len(sides) == 2 else str(sides[0])) if sides and "mono" not in sides else None,
        "text": None if view.get("text") is not False else False,
        **{name: cleaning.get(name) or None for name in ("min_tokens", "max_tokens", "max_pairs")},
        "skip_bad_lines": bool(cleaning.get("skip_bad_lines")), "dtype": view.get("compute_dtype") or None,
    }
    for kind in KINDS.values():  # each dense output kind says which options ask for it (outputs.py)
        values.update(kind.options(outputs))
    return {name: value for name, value in values.items() if value is not None}


def made_by(meta: dict) -> list[str]:
    """The command (all but --out) that makes or finishes the cache `meta` describes."""
    values = cache_values(meta)
    return [] if values is None else ["xkd", "cache-teachers", *command_line(CacheTeachersOptions(**values), values)]


def plan_job(spec: TeacherSpec, plan: CorpusPlan, opts: CacheTeachersOptions, compute_dtype: str) -> Job:
    outputs = outputs_for(spec, opts)
    view = View(opts.max_length, mask_for(spec, opts), opts.sides, outputs, opts.text, compute_dtype)
    parallel = plan.source.parallel
    view_json = {**view.to_json(parallel), "cleaning": plan.cleaning.to_json(), "shard_size": plan.shard_size}
    corpus_identity = {"fingerprint": plan.fingerprint, "langs": list(plan.langs), "split": plan.to_json()["split"]}
    key = cache_key(spec.identity(), corpus_identity, view_json)
    dense = outputs.dense_specs(spec)
    meta = {
        "teacher": spec.to_json(),
        "corpus": {**plan.to_json(), "paths": list(plan.source.paths)},
        "view": view_json,
        "outputs": outputs_json(outputs.topk or None, dense, text=opts.text, pairs=plan.source.has_pairs,
                                topk_codec=outputs.topk_codec, sample=outputs.sample, sample_seed=view.mask.seed),
    }
    meta["made_by"] = {"args": made_by(meta), "out": "parent"}
    root = join(location(opts.out), f"{teacher_slug(spec.name)}-{key}")
    return Job(spec, view, root, key, meta)


# The cluster -----------------------------------------------------------------------------


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Cluster:
    """A dask client: a LocalCluster we start (and stop), or an existing scheduler."""

    def __init__(self, scheduler: str, workers: int | None, client=None, cpu_threads: int | None = None):
        self.client = client
        self.cpu_threads = cpu_threads
        self.own_client = client is None
        self.cluster = None
        self.scheduler = scheduler
        self.workers = workers
        self.local = client is None and scheduler == "local"

    def device_type(self) -> str:
        if self.local:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return "cuda" if any("GPU" in (w.get("resources") or {}) for w in info.values()) else "cpu"

    def connect(self) -> None:
        """An existing scheduler is reached first (to learn its devices); a local cluster is
        started only once there is work."""
        if self.client is not None or self.local:
            return
        from distributed import Client

        quiet_interrupted_sync()
        try:
            self.client = Client(self.scheduler, timeout=15)
        except (OSError, TimeoutError) as e:
            raise BadInput(f"--scheduler {self.scheduler}: no dask scheduler answers there ({e}).") from None
        try:
            self.client.wait_for_workers(1, timeout=60)
        except TimeoutError:
            raise XkdError(f"--scheduler {self.scheduler}: the scheduler has no workers (waited 60 s).") from None

    def start(self, device_type: str) -> None:
        if self.client is not None:
            return
        from distributed import Client, LocalCluster

        gpus = 0
        if device_type == "cuda":
            import torch

            gpus = torch.cuda.device_count()
        n = self.workers or max(gpus, 1)
        if n < 1:
            raise BadInput(f"--workers must be at least 1, not {n}.")
        # Ctrl-C at a terminal goes to the whole process group, and every worker would print a
        # KeyboardInterrupt traceback. Workers are started from the cluster's event-loop thread
        # (restarted ones too); created while this thread blocks SIGINT, that thread and every
        # process it starts keep it blocked, so Ctrl-C reaches only this process. A Ctrl-C
        # meanwhile stays pending here and is delivered once the mask is restored.
        block = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
        if block:
            # multiprocessing's resource tracker, started on first use, unblocks SIGINT in the
            # thread that starts it, which would be the event-loop thread: start it from here.
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if block else None
        try:
            self.cluster = LocalCluster(
                host="127.0.0.1", n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.ERROR, resources={"GPU": 1} if gpus else None,
                # No dashboard, and the scheduler's HTTP endpoint on a free port: 8787 may be taken.
                scheduler_kwargs={"dashboard_address": ":0"},
            )
        finally:
            if block:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.client = Client(self.cluster)
        quiet_interrupted_sync()

    def torch_threads(self) -> int | None:
        """Torch threads per worker: dask starts workers with OMP_NUM_THREADS=1, which would
        leave a CPU teacher on one core. A local cluster shares the cores among its workers;
        on other clusters only an explicit --cpu-threads changes the workers' setting."""
        if self.cpu_threads:
            return self.cpu_threads
        if not self.local:
            return None
        return max(1, usable_cpus() // (self.workers or 1))

    def close(self) -> None:
        if self.own_client and self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


# A file system that refuses a write refuses the next shard's too: a full disk or quota, a
# file-size limit, no permission, a read-only mount. Retrying would only repeat it shard after shard.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
WRITE_REFUSED = DISK_FULL | {errno.EACCES, errno.EPERM, errno.EROFS}


def run_on_worker(task: ShardTask, local_gpus: bool) -> dict:
    """The dask task: on a local GPU cluster, worker i uses GPU i (worker names are 0..n-1 and
    survive a restart by the nanny). What running again cannot help comes back as a result,
    not an exception, so dask does not retry it and the client reports it as one paragraph
    instead of worker tracebacks: bad input for this shard (a corpus file that changed), and,
    stopping the whole run, a teacher that does not load or a file system that refuses writes."""
    if local_gpus:
        from distributed import get_worker

        os.environ["XKD_CUDA_DEVICE"] = str(int(get_worker().name))
    try:
        return process_shard(task)
    except TeacherLoadFailed as e:
        return {"stop": str(e)}
    except BadInput as e:
        return {"bad_input": str(e)}
    except RemoteUnavailable as e:  # already retried for XKD_REMOTE_RETRY_SECONDS: every other shard would wait as long
        return {"unavailable": str(e)}
    except OSError as e:
        if e.errno not in WRITE_REFUSED:
            raise
        # Errors of write() name no file (zarr's and pyarrow's): the shard was going to its cache's shards/.
        return {"write_refused": {"errno": e.errno, "strerror": e.strerror or os.strerror(e.errno),
                                  "path": e.filename or str(join(task.cache_root, "shards"))}}


# Progress ------------------------------------------------------------------------------


class Progress:
    def __init__(self, log: TextIO, shards: int, examples: int, every_s: float = 1.0):
        self.log, self.shards, self.examples, self.every_s = log, shards, examples, every_s
        self.done_shards = self.done_examples = self.tokens = 0
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, examples: int, tokens: int) -> None:
        self.done_shards += 1
        self.done_examples += examples
        self.tokens += tokens
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done_shards == self.shards:
            self.last = now
            self.log.write(self.line(now) + "\n")
            self.log.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done_examples / elapsed
        left = (self.examples - self.done_examples) / rate if rate else float("nan")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left == left else "?"
        return (
            f"cache-teachers: shards {self.done_shards}/{self.shards}  examples {self.done_examples:,}/"
            f"{self.examples:,}  {self.tokens / elapsed:,.0f} tokens/s  ETA {eta}"
        )


# The command -----------------------------------------------------------------------------


def cache_teachers(opts: CacheTeachersOptions, client=None, log: TextIO | None = None) -> dict:
    """Cache every teacher's outputs over the corpus; returns what was written (the --json
    object). `client`: an existing dask Client to run on (else opts.scheduler decides).
    Progress goes to `log` (default: stderr)."""
    log = log or sys.stderr
    t_start = time.perf_counter()
    check_options(opts)
    corpus_spec = parse_corpus(opts.corpus, opts.corpus_files)
    cleaning = Cleaning(opts.min_tokens, opts.max_tokens, opts.max_pairs, opts.skip_bad_lines)
    specs = [describe_teacher(resolve_teacher(name)) for name in dict.fromkeys(opts.teachers)]
    cluster = Cluster(opts.scheduler, opts.workers, client, opts.cpu_threads)
    jobs: list[Job] = []
    interrupted = False
    try:
        cluster.connect()
        device_type = cluster.device_type()
        compute_dtype = resolve_compute(opts.dtype, device_type)
        check_teacher_outputs(specs, opts)  # before reading the corpus
        log.write(f"cache-teachers: reading corpus {opts.corpus!r} ...\n")
        plan = plan_corpus(corpus_spec, cleaning, opts.shard_size, opts.split)
        check_plan(plan, opts)
        skipped = ", ".join(f"{n:,} {r}" for r, n in plan.skipped.items() if n) or "none"
        log.write(f"cache-teachers: {plan.examples:,} examples in {len(plan.shards)} shards (skipped: {skipped})\n")
        for spec in specs:
            check_labels(spec, plan)
        jobs = [plan_job(spec, plan, opts, compute_dtype) for spec in specs]
        with ExitStack() as stack:
            open_caches(stack, jobs, plan, opts, log)
            if any(job.todo for job in jobs):
                cluster.start(device_type)
                failures = run_tasks(cluster, jobs, plan, opts, device_type, log)
                if failures:
                    raise failures
            for job in jobs:
                job.writer.finish()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        try:
            cluster.close()
        except KeyboardInterrupt:  # a second Ctrl-C while the cluster stops
            interrupted = True
    if interrupted:
        raise Interrupted(interrupted_message(jobs))
    return summarize(jobs, plan, time.perf_counter() - t_start)


def check_teacher_outputs(specs: list[TeacherSpec], opts: CacheTeachersOptions) -> None:
    """Refuse outputs a teacher cannot produce, and masking flags when no teacher is masked."""
    for spec in specs:
        outputs_for(spec, opts)
        mask_for(spec, opts)
    unused = [flag for flag, value in (("--whole-word", opts.whole_word), (f"--seed {opts.seed}", opts.seed))
              if value]
    if unused and not any(mask_for(spec, opts).active for spec in specs):
        raise BadInput(f"{unused[0]} applies to masking, and no teacher is masked (--no-mask or --mask-prob 0; "
                       "encoders and classifiers default to --mask-prob 0): give --mask-prob P above 0, or leave "
                       f"{unused[0].split()[0]} out.")


def check_plan(plan: CorpusPlan, opts: CacheTeachersOptions) -> None:
    """Refuse a corpus plan the options cannot cache: too many shards, or --sides on a one-language corpus."""
    if len(plan.shards) > MAX_SHARDS:  # readers refuse a manifest planning more (storage/manifest.py)
        raise BadInput(f"--shard-size {opts.shard_size:,} cuts the corpus's {plan.examples:,} examples into "
                       f"{len(plan.shards):,} shards, more than the {MAX_SHARDS:,} a cache can hold: give --shard-size "
                       f"{-(-plan.examples // MAX_SHARDS):,} or more. Nothing was written.")
    if opts.sides != "both" and not plan.source.parallel:
        raise BadInput(f"--sides {opts.sides} chooses a side of a parallel corpus, and --corpus {opts.corpus!r} has one "
                       f"language ({', '.join(plan.langs)}): leave --sides out.")


def open_caches(stack: ExitStack, jobs: list[Job], plan: CorpusPlan, opts: CacheTeachersOptions, log: TextIO) -> None:
    """Open each job's CacheWriter (held on `stack`), write the run's config.yaml into it, and set
    `job.todo` to the shards its manifest does not list as done, saying what is resumed or rewritten."""
    for job in jobs:
        job.writer = stack.enter_context(CacheWriter(job.root, job.key, job.meta, len(plan.shards)))
        # The run's resolved options, replayable with --config (beside the manifest, under its lock)
        if (values := cache_values(job.meta)) is not None:
            job.writer.put(CONFIG_FILE, config_yaml(CacheTeachersOptions(**values), "cache-teachers"))
        for shard_id, problems in sorted(job.writer.damaged.items()):
            log.write(f"cache-teachers: {job.root}: shard {shard_id} is damaged ({'; '.join(problems)}); rewriting it\n")
        done = job.writer.done_shards()
        job.todo = [s.shard_id for s in plan.shards if s.shard_id not in done]
        if len(done):
            log.write(f"cache-teachers: {job.root}: resuming, {len(done)} of {len(plan.shards)} shards already done\n")


def kept_shards(jobs: list[Job]) -> str:
    """"N of M shards in ROOT" per opened cache, N as its manifest on disk lists them: what a
    re-run finds. The writer's copy in memory may be one ahead (a Ctrl-C inside a commit, a
    manifest write that failed), so it is not counted."""
    kept = []
    for job in jobs:
        if job.writer is None:
            continue
        try:
            shards = read_manifest(job.root)["shards"]
        except (XkdError, OSError) as e:
            kept.append(f"an unknown number of {job.writer.planned_shards} shards in {job.root} (its manifest cannot "
                        f"be read: {e})")
            continue
        done = sum(1 for s in shards if s.get("state") == "done")
        kept.append(f"{done} of {job.writer.planned_shards} shards in {job.root}")
    return "; ".join(kept)


def interrupted_message(jobs: list[Job]) -> str:
    """One line: what Ctrl-C left behind, and how to go on."""
    kept = kept_shards(jobs)
    if not kept:
        return "interrupted before any shard was cached; nothing was written."
    return f"interrupted; kept {kept}. Run the same command again to resume."


def write_refused_error(jobs: list[Job], job: Job, shard_id: int, errno_: int, strerror: str, path: str) -> XkdError:
    """One paragraph for a write the file system refused (in a worker or in this process's
    commit): the path, why, what to do, and what is kept."""
    where = f"{path}: {strerror} while writing shard {shard_id} of teacher {job.teacher.name!r}"
    kept = f"Kept {kept_shards(jobs)}; the shards not listed there are not cached."
    if errno_ in DISK_FULL:
        return XkdError(f"{where} (the disk, a quota or a file-size limit is full: free space or give another --out, "
                        f"then run the same command again: it resumes). {kept}")
    return BadInput(f"{where} (give an --out this user may write to, on a writable file system; the same command "
                    f"then resumes). {kept}")


def check_labels(spec: TeacherSpec, plan: CorpusPlan) -> None:
    """A labeled corpus cached by a classifier: every label must be one of its classes, or
    the cached rows would pair the teacher's logits with a class it does not have (found
    only when a student trains)."""
    if spec.kind != "classifier" or not plan.label_count:
        return
    where = f"--corpus {plan.source.spec!r}"
    names = plan.source.label_names
    named_teacher = spec.labels and not all(n == f"LABEL_{i}" for i, n in enumerate(spec.labels))
    if names and named_teacher:
        unknown = [n for n in names if n not in spec.labels]
        if unknown:
            raise BadInput(
                f"{where}: its labels include {', '.join(repr(n) for n in unknown[:3])}, which teacher "
                f"{spec.name!r} does not have (its classes, from config.json id2label: {', '.join(spec.labels)}). "
                "Label the corpus with the teacher's classes, or cache it with a classifier fine-tuned on these."
            )
    elif plan.label_count > spec.num_labels:
        what = f"{len(names)} class names ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names \
            else f"class ids up to {plan.label_count - 1}"
        raise BadInput(
            f"{where}: its labels are {what}, but teacher {spec.name!r} is a classifier with {spec.num_labels} "
            f"classes (ids 0-{spec.num_labels - 1}). Label the corpus with the teacher's classes, or cache it with "
            "a classifier fine-tuned on these."
        )


def run_tasks(cluster: Cluster, jobs: list[Job], plan: CorpusPlan, opts, device_type: str, log) -> XkdError | None:
    """Submit every shard still to do; commit each as it finishes. Returns the error to raise
    if some shards failed (after committing all that succeeded)."""
    from distributed import as_completed

    client = cluster.client
    run_id = uuid.uuid4().hex[:8]
    local_gpus = cluster.local and device_type == "cuda"
    origin, tasks, every_future = {}, {}, []

    def submit(job: Job, shard_id: int, attempt: int = 0):
        task = tasks.setdefault((job.key, shard_id), ShardTask(
            str(job.root), job.teacher, job.view, plan.shards[shard_id], device_type, opts.token_budget,
            cluster.torch_threads()))
        future = client.submit(
            run_on_worker, task, local_gpus, key=f"xkd-{job.key}-{shard_id:05d}-{run_id}-{attempt}", pure=False,
            retries=TASK_RETRIES, priority=len(jobs) - jobs.index(job),  # one teacher at a time, mostly
            resources={"GPU": 1} if device_type == "cuda" else None,
        )
        origin[future.key] = (job, shard_id, attempt)
        every_future.append(future)
        return future

    submitted = [submit(job, shard_id) for job in jobs for shard_id in job.todo]
    progress = Progress(log, len(submitted), sum(plan.shards[s].size for job in jobs for s in job.todo))
    failed = []
    stop = None  # an error every other shard would meet too: end the run at once
    pending = as_completed(submitted)
    try:
        for future in pending:
            job, shard_id, attempt = origin[future.key]
            error = future.exception() if future.status == "error" else None
            if error is None:
                try:
                    result = future.result()
                except Exception as e:  # the result was lost with its worker before we fetched it
                    error = e
                else:
                    if "bad_input" in result:  # the same input would fail again: no retry
                        failed.append((job, shard_id, BadInput(result["bad_input"])))
                        continue
                    stop = run_ending_error(jobs, job, shard_id, result) or commit_shard(jobs, job, shard_id, result)
                    if stop is not None:
                        break
                    progress.update(result["examples"], result["record"]["tokens"])
                    continue
                # The shard's files are a pure function of the task: running it again is safe.
                if attempt < TASK_RETRIES:
                    pending.add(submit(job, shard_id, attempt + 1))
                    continue
            failed.append((job, shard_id, error))
    except KeyboardInterrupt:
        client.cancel(every_future)
        raise
    if stop is not None:
        client.cancel(every_future)
        return stop
    return failed_shards_error(failed)


def run_ending_error(jobs: list[Job], job: Job, shard_id: int, result: dict) -> XkdError | None:
    """The error that ends the run, when a worker's result reports one that every other shard
    would meet too (see run_on_worker); None for a result to commit."""
    if "stop" in result:
        return BadInput(f"{result['stop']} Kept {kept_shards(jobs)}.")
    if "unavailable" in result:  # its message says what is kept and how to resume
        return XkdError(result["unavailable"])
    if "write_refused" in result:
        refused = result["write_refused"]
        return write_refused_error(jobs, job, shard_id, refused["errno"], refused["strerror"], refused["path"])
    return None


def commit_shard(jobs: list[Job], job: Job, shard_id: int, result: dict) -> XkdError | None:
    """Commit a finished shard's record to its cache; a write the file system refuses is the
    error that ends the run (returned), any other OSError propagates."""
    try:
        job.writer.commit(result["record"])
    except OSError as e:
        if e.errno not in WRITE_REFUSED:
            raise
        return write_refused_error(jobs, job, shard_id, e.errno, e.strerror or os.strerror(e.errno),
                                   e.filename or str(job.root))
    return None


def failed_shards_error(failed: list[tuple[Job, int, BaseException]]) -> XkdError | None:
    """One paragraph for the shards that failed (counted, the first one named), or None when none did."""
    if not failed:
        return None
    job, shard_id, error = failed[0]
    if isinstance(error, BadInput):  # its message says what to do; a plain re-run would not help
        return BadInput(f"{len(failed)} shard(s) not cached (finished shards are kept). First: teacher "
                        f"{job.teacher.name!r}, shard {shard_id}: {error}")
    what = str(error) if isinstance(error, XkdError) else f"{type(error).__name__}: {error}"
    return XkdError(
        f"{len(failed)} shard(s) failed; finished shards are kept and re-running the command resumes. "
        f"First failure: teacher {job.teacher.name!r}, shard {shard_id}: {what}"
    )


def summarize(jobs: list[Job], plan: CorpusPlan, seconds: float) -> dict:
    caches = []
    for job in jobs:
        manifest = job.writer.manifest
        totals = manifest["totals"]
        caches.append({
            "path": str(job.root),
            "teacher": job.teacher.name,
            "kind": job.teacher.kind,
            "key": job.key,
            "complete": bool(manifest["complete"]),
            "shards": len(manifest["shards"]),
            "shards_run": len(job.todo),
            "rows": totals["rows"],
            "tokens": totals["tokens"],
            "masked": totals["masked"],
            "bytes": totals["bytes"],
            "bytes_per_masked_position": round(totals["bytes"] / totals["masked"], 2) if totals["masked"] else None,
            "bytes_per_token": round(totals["bytes"] / totals["tokens"], 2) if totals["tokens"] else None,
            # Rows whose text had more tokens than --max-length (the teacher saw the first ones).
            "truncated_rows": sum(s.get("truncated_rows", 0) for s in manifest["shards"]),
        })
    return {
        "caches": caches,
        "corpus": {"spec": plan.source.spec, "records": plan.records, "examples": plan.examples,
                   "skipped": dict(plan.skipped)},
        "seconds": round(seconds, 2),
    }


def format_summary(result: dict) -> str:
    corpus = result["corpus"]
    skipped = ", ".join(f"{n:,} {r}" for r, n in corpus["skipped"].items() if n) or "none"
    lines = [f"corpus {corpus['spec']}: {corpus['examples']:,} examples of {corpus['records']:,} records "
             f"(skipped: {skipped}); {result['seconds']:.1f} s"]
    for c in result["caches"]:
        per_masked = f"{c['bytes_per_masked_position']} bytes per masked position, " if c["masked"] else ""
        truncated = (f"; {c['truncated_rows']:,} rows truncated to --max-length (their text is stored up to "
                     "the last token the teacher saw)") if c["truncated_rows"] else ""
        lines.append(
            f"{c['teacher']} ({c['kind']}): {c['rows']:,} rows, {c['tokens']:,} tokens, {c['masked']:,} masked "
            f"positions, {c['bytes']:,} bytes ({per_masked}{c['bytes_per_token']} per token); "
            f"{c['shards_run']} of {c['shards']} shards run this time{truncated}\n  cache: {c['path']}"
        )
    return "\n".join(lines)
