"""The `xkd` command: parses options, calls one function per command, prints the result.

No work happens here. Each command imports its layer lazily so `xkd --help` is instant.
Errors that users can act on (XkdError) print as one paragraph with exit code 1 (the work
failed) or 2 (bad usage or input); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .downstream import EVALUATE_RECIPE
from .errors import XkdError, from_worker
from .quiet import quiet_transformers_by_default

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Cross-lingual knowledge distillation: cache teachers once, train many students.",
)


def emit_json(obj: dict) -> None:
    """The last line of stdout under --json: one object naming what the command wrote."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


# Operating-system errors are a class: a path that cannot be used (exit 2) or a disk that is
# full (exit 1), whichever command and whichever line met them. One paragraph, no traceback.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_BAD_PATH = {
    errno.EACCES: "give a path this user may write to, or change its permissions",
    errno.EPERM: "give a path this user may write to, or change its permissions",
    errno.EROFS: "give a path on a writable file system",
    errno.EEXIST: "a file stands where a directory is needed: give another path or move the file",
    errno.ENOTDIR: "a file stands where a directory is needed: give another path or move the file",
    errno.EISDIR: "a directory stands where a file is needed: give another path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "give a shorter path",
    errno.ELOOP: "a symbolic link loops: give another path",
    errno.ENOTEMPTY: "give an empty or a new directory",
}


def os_error_paragraph(e: OSError) -> tuple[str, int]:
    """(one paragraph, exit code) for an OSError: the path, the problem, what to do."""
    path = e.filename
    if path is not None and e.filename2 is not None:
        path = f"{path} -> {e.filename2}"
    reason = e.strerror or str(e) or type(e).__name__
    if e.errno in _FULL:
        advice, code = "the disk, a quota or a file-size limit is full: free space or write elsewhere, then run it again", 1
    elif e.errno in _BAD_PATH:
        advice, code = _BAD_PATH[e.errno], 2
    else:
        advice, code = "check the disk and the path, then run it again", 1
    where = f"{path}: " if path is not None else ""
    return f"{where}{reason} ({advice}). What was written before this error is kept.", code


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        name = fn.__name__.replace('_cmd', '').replace('_', '-')
        try:
            return fn(*args, **kwargs)
        except (XkdError, RuntimeError) as e:
            error = from_worker(e) or e  # raised in a DataLoader worker: its paragraph, not the worker's traceback
            if not isinstance(error, XkdError):
                raise
            typer.echo(f"xkd {name}: error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None
        except OSError as e:
            message, code = os_error_paragraph(e)
            typer.echo(f"xkd {name}: error: {message}", err=True)
            raise typer.Exit(code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; what was finished is kept (cache shards, checkpoints) and a re-run resumes "
                       "(train-student: with --resume).", err=True)
            raise typer.Exit(130) from None

    return wrapper


JsonOpt = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout.")
WorkspaceOpt = typer.Option(
    None, "--workspace", help="The workspace root holding caches/, vocabs/ and students/ (default: $XKD_HOME, else ./xkd-runs).")
# Caches on object storage (s3://, gs://, az://) are read through a bounded local directory.
CacheDirOpt = typer.Option(None, "--cache-dir", help="Caches given as URLs (s3://...): where their fetched bytes are kept "
                           "(default: $XDG_CACHE_HOME/xkd/remote, else ~/.cache/xkd/remote).")
CacheSizeOpt = typer.Option("20G", "--cache-size", help="Caches given as URLs: the most --cache-dir holds (e.g. 500M, 20G); "
                            "the least recently used bytes go first.")


def remote_fetch(option_caches: list[str], cache_dir, cache_size: str):
    """The local fetch cache for the caches that are URLs, None when all are local."""
    from .storage.fetch import FetchCache
    from .storage.remote import is_url

    if not any(is_url(c) for c in option_caches):
        return None
    return FetchCache(cache_dir, parse_size(cache_size, "--cache-size"))


def parse_size(value: str, option: str) -> int:
    from .errors import BadInput

    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    try:
        size = float(number) * units[unit]
    except ValueError:
        raise BadInput(f"{option} {value!r}: give a size such as 500M or 20G.") from None
    if not 2**20 <= size < 2**60:
        raise BadInput(f"{option} {value!r}: give at least 1M (a row group and a chunk must fit).")
    return int(size)


def _remote_only(option: str):
    """A rule for refuse_unused: an option about caches on object storage, with none given."""
    def unused(v, g):
        from .storage.remote import is_url

        return not any(is_url(c) for c in v.get("caches") or ())
    return (option, unused, "applies to caches given as URLs (s3://...), and every --caches here is a local directory: "
            f"leave --{option.replace('_', '-')} out.")


AllowIncompleteOpt = typer.Option(
    False, "--allow-incomplete",
    help="Use caches whose cache-teachers run has not finished (only their finished shards); says what is missing.")


# Every option that is given is used, or refused. Each command has one table of rules
# (OPTION, ignored(values, given), why or why(values)): when OPTION was typed and `ignored` holds, the run
# would silently not use it, so the command stops before any work with one paragraph saying
# why and what to do. `values` are the parsed options by parameter name; `given` maps the
# options typed on the command line (or set through the environment) to their flags.
def given_options(ctx: typer.Context) -> dict[str, str]:
    given = {}
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):  # by name: typer may bring its own click
            continue
        flags = [o for o in param.opts if o.startswith("--")] or [param.name.upper()]
        # --no-text is typed as itself, not as --text
        negative = getattr(param, "secondary_opts", None) and ctx.params.get(param.name) is False
        given[param.name] = param.secondary_opts[0] if negative else flags[0]
    return given


def refuse_unused(ctx: typer.Context, rules) -> None:
    from .errors import BadInput

    given = given_options(ctx)
    for option, ignored, why in rules:
        if option in given and ignored(ctx.params, given):
            raise BadInput(f"{given[option]} {why(ctx.params) if callable(why) else why}")


def _workspace_unused(defaults: tuple[str, ...]):
    """--workspace only supplies defaults: a rule for when every option it would default is given."""
    flags = ", ".join("--" + d.replace("_", "-") for d in defaults)
    return ("workspace", lambda v, g: all(d in g for d in defaults),
            f"only supplies the defaults of {flags}, and {'all are' if len(defaults) > 1 else 'it is'} given: "
            "leave --workspace out, or leave out what it should supply.")


@app.command("inspect")
@user_errors
def inspect_cmd(
    cache: str = typer.Argument(..., help="A cache directory (holds manifest.json), or its URL (s3://bucket/prefix/...)."),
    as_json: bool = JsonOpt,
):
    """What a cache holds: rows, tokens, masked positions, outputs, bytes per position, languages,
    complete or not. Exits 1 if the checks every reader makes on open find damage."""
    from .storage import format_inspect, inspect_cache

    info = inspect_cache(cache)
    emit_json(info) if as_json else typer.echo(format_inspect(info))
    if info["damaged"]:
        typer.echo(f"xkd inspect: {info['damaged']}", err=True)
        raise typer.Exit(1)


@app.command("verify")
@user_errors
def verify_cmd(
    cache: str = typer.Argument(..., help="A cache directory (holds manifest.json), or its URL (s3://bucket/prefix/...)."),
    as_json: bool = JsonOpt,
):
    """Check every shard's checksums, schema and offsets, and that no planned shard is missing.
    Exits 1 naming each bad shard, 3 if the finished shards are sound but the cache is incomplete."""
    from .storage import format_verdict, verify_cache

    report = verify_cache(cache)
    if as_json:
        emit_json(report)
    elif report["ok"]:
        typer.echo(f"{cache}: ok ({report['shards_checked']} shards, checksums, schema and offsets verified)")
    if not report["ok"]:
        typer.echo(f"xkd verify: {format_verdict(report)}", err=True)
        raise typer.Exit(1 if report["status"] == "damaged" else 3)


def _corpus_kind(v: dict):
    from .names import parse_corpus

    return parse_corpus(v["corpus"], v["corpus_files"])


def _unmasked(v: dict) -> bool:
    return v["no_mask"] or v["mask_prob"] == 0


CACHE_TEACHERS_UNUSED = (
    ("mask_prob", lambda v, g: v["no_mask"] and v["mask_prob"] != 0,
     "contradicts --no-mask (which is --mask-prob 0): give one of them."),
    *((name, lambda v, g: _unmasked(v),
       f"applies to masking, which --no-mask or --mask-prob 0 turns off: leave {flag} out, or give --mask-prob P "
       "above 0.")
      for name, flag in (("whole_word", "--whole-word"), ("mask_epochs", "--mask-epochs"), ("seed", "--seed"))),
    ("hidden_positions", lambda v, g: not v["hidden_layers"],
     "chooses the positions of the hidden states that --hidden-layers stores, and --hidden-layers is not given: "
     "give --hidden-layers L1,L2 too, or leave --hidden-positions out."),
    ("split", lambda v, g: _corpus_kind(v).kind != "hf",
     "chooses a split of an hf: dataset (or of a named hub corpus read from the hub), and --corpus is not one: leave "
     "--split out."),
    ("split", lambda v, g: _corpus_kind(v).options.get("split", v["split"]) != v["split"],
     "contradicts the split=... that the --corpus spec names (the spec's wins): give the split once."),
    ("workers", lambda v, g: v["scheduler"] != "local",
     "sets the workers of the local cluster, and --scheduler names an existing one (its workers are its own): leave "
     "--workers out, or use --scheduler local."),
    _workspace_unused(("out",)),
)


@app.command("cache-teachers")
@user_errors
def cache_teachers_cmd(
    ctx: typer.Context,
    teacher: List[str] = typer.Option(..., "--teacher", help="Alias (bert-base, mbert, muril, xlmr, minilm), HF model id or "
        "model dir; repeat for several."),
    corpus: str = typer.Option(..., "--corpus", help="A corpus name (sample, opus-en-hi) or spec: text:PATH@LANG, "
        "labeled:PATH@LANG (text<TAB>label), parallel:SRC@L1,TGT@L2, tsv:PATH@L1,L2, hf:DATASET[:CONFIG]."),
    out: Optional[str] = typer.Option(None, "--out", help="Cache root, a directory or an object-store URL (s3://bucket/prefix): "
        "each teacher's cache is OUT/<teacher>-<key> (default: the workspace's caches/)."),
    corpus_files: Optional[str] = typer.Option(None, "--corpus-files", help="Read a named hub corpus from local files: SRC,TGT "
        "or one TSV (e.g. opus-en-hi offline)."),
    split: str = typer.Option("train", "--split", help="Split of an hf: dataset."),
    topk: Optional[int] = typer.Option(None, "--topk", help="Store the top-k logits and log-normaliser at masked positions "
        "(masked LMs; default 8; 0: off)."),
    mask_prob: Optional[float] = typer.Option(None, "--mask-prob", help="Masking probability (default 0.15 for masked LMs, 0 "
        "otherwise)."),
    no_mask: bool = typer.Option(False, "--no-mask", help="Teachers see unmasked text (same as --mask-prob 0)."),
    whole_word: bool = typer.Option(False, "--whole-word", help="Mask whole words."),
    mask_epochs: int = typer.Option(1, "--mask-epochs", help="Cache this many maskings of each example."),
    seed: int = typer.Option(0, "--seed", help="Masking seed."),
    max_length: int = typer.Option(128, "--max-length", help="Tokens per row, special tokens included."),
    hidden_layers: Optional[str] = typer.Option(None, "--hidden-layers", help="Store hidden states of these layers, e.g. 0,6,12 "
        "(0: embeddings)."),
    hidden_positions: str = typer.Option("all", "--hidden-positions", help="all | word (first sub-token of each word) | cls."),
    attention_layers: Optional[str] = typer.Option(None, "--attention-layers", help="Store the attention probabilities of these "
        "layers (1-based): per token, each head's probabilities over the row's real keys (TinyBERT; large)."),
    sentence: Optional[str] = typer.Option(None, "--sentence", help="Sentence vectors to store: cls,pooled (pooled follows the "
        "model's pooling config; default for encoders; 'none': none)."),
    class_logits: Optional[bool] = typer.Option(None, "--class-logits/--no-class-logits", help="Store class logits (default on "
        "for sequence classifiers)."),
    output: List[str] = typer.Option([], "--output", help="Store an output kind registered in xkd/pipeline/outputs.py that has "
        "no option of its own (repeatable; docs/pipeline.md, \"Adding an output kind\")."),
    sides: str = typer.Option("both", "--sides", help="Parallel corpora: which sides the teacher runs on: src | tgt | both."),
    text: bool = typer.Option(True, "--text/--no-text", help="Store each row's raw text and its pair's text."),
    min_tokens: int = typer.Option(0, "--min-tokens", help="Keep records whose every side has at least this many whitespace "
        "tokens (MMKD: 10)."),
    max_tokens: int = typer.Option(0, "--max-tokens", help="... and at most this many (MMKD: 128; 0: no bound)."),
    max_pairs: int = typer.Option(0, "--max-pairs", help="Cap the examples of the corpus (one language pair) to the first N "
        "kept (0: no cap)."),
    skip_bad_lines: bool = typer.Option(False, "--skip-bad-lines", help="Skip and count invalid UTF-8 or malformed lines "
        "instead of stopping."),
    shard_size: int = typer.Option(2048, "--shard-size", help="Examples per shard (the unit of work, retry and resume)."),
    token_budget: int = typer.Option(16384, "--token-budget", help="Padded tokens per batch (rows x longest row; "
        "length-bucketed)."),
    dtype: str = typer.Option("auto", "--dtype", help="Compute dtype: auto (fp16 on CUDA, fp32 on CPU) | fp16 | bf16 | fp32."),
    scheduler: str = typer.Option("local", "--scheduler", help="local (a LocalCluster) or a dask scheduler address "
        "tcp://host:port."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Local workers (default: one per GPU, else 1)."),
    cpu_threads: Optional[int] = typer.Option(None, "--cpu-threads", help="Torch threads per worker on CPU (default: cores / "
        "local workers)."),
    workspace: Optional[Path] = WorkspaceOpt,
    as_json: bool = JsonOpt,
):
    """Run teachers over a corpus once and cache what students learn from (resumable)."""
    refuse_unused(ctx, CACHE_TEACHERS_UNUSED)
    from .pipeline import CacheTeachersOptions, cache_teachers, format_summary
    from .pipeline.run import Interrupted, parse_list
    from .workspace import Workspace

    out = out or Workspace.find(workspace).caches
    opts = CacheTeachersOptions(
        teachers=list(teacher), corpus=corpus, out=str(out), corpus_files=corpus_files, split=split, topk=topk,
        mask_prob=0.0 if no_mask else mask_prob, whole_word=whole_word, mask_epochs=mask_epochs, seed=seed,
        max_length=max_length, hidden_layers=parse_list(hidden_layers, "--hidden-layers", cast=int),
        hidden_positions=hidden_positions, attention_layers=parse_list(attention_layers, "--attention-layers", cast=int),
        sentence=None if sentence is None else parse_list("" if sentence == "none" else sentence, "--sentence",
                                                          ("cls", "pooled")),
        class_logits=class_logits, extra_outputs=tuple(output), sides=sides, text=text, min_tokens=min_tokens,
        max_tokens=max_tokens,
        max_pairs=max_pairs, skip_bad_lines=skip_bad_lines, shard_size=shard_size, token_budget=token_budget,
        dtype=dtype, scheduler=scheduler, workers=workers, cpu_threads=cpu_threads,
    )
    try:
        result = cache_teachers(opts)
    except Interrupted as e:  # Ctrl-C: one line saying what was kept, not an error
        typer.echo(f"xkd cache-teachers: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    typer.echo(format_summary(result))
    if as_json:
        emit_json(result)


BUILD_VOCAB_UNUSED = (_workspace_unused(("out",)),)


@app.command("build-vocab")
@user_errors
def build_vocab_cmd(
    ctx: typer.Context,
    teachers: List[str] = typer.Option(..., "--teachers", help="Teachers: alias, model id, model/tokenizer dir, or a bare vocab "
        "file. Give several after one --teachers, or repeat it."),
    more: Optional[List[str]] = typer.Argument(None, help="More teachers (after --teachers A B ...).", show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="The vocab directory to write (default: the workspace's "
        "vocabs/<teacher>+<teacher>)."),
    lang_teacher: List[str] = typer.Option([], "--lang-teacher", help="Tokenize language LANG with TEACHER's tokenizer: "
        "LANG=TEACHER (repeatable)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different vocab already in --out (an identical one is "
        "kept without it)."),
    workspace: Optional[Path] = WorkspaceOpt,
    as_json: bool = JsonOpt,
):
    """The union of the teachers' vocabularies, teacher->student id maps, and a student tokenizer."""
    refuse_unused(ctx, BUILD_VOCAB_UNUSED)
    from .vocab.build import build_vocab, format_summary, parse_lang_teacher
    from .workspace import Workspace

    teachers = [*teachers, *(more or [])]
    out = out or Workspace.find(workspace).vocab_dir_for(teachers)
    try:
        summary = build_vocab(teachers, out, parse_lang_teacher(lang_teacher),
                              progress=lambda msg: typer.echo(f"build-vocab: {msg}", err=True), overwrite=overwrite)
    except OSError as e:
        if e.filename is None:  # a failed write() names no file: it was writing the vocab in --out
            e.filename = str(out)
        raise
    emit_json(summary) if as_json else typer.echo(format_summary(summary))


@app.command("remap")
@user_errors
def remap_cmd(
    cache: str = typer.Argument(..., help="A teacher cache (teacher vocabulary ids): a directory or a URL (s3://...)."),
    vocab: Path = typer.Option(..., "--vocab", help="A vocab dir from build-vocab that includes the cache's teacher."),
    out: str = typer.Option(..., "--out", help="Where to write the union-vocab copy (a cache; passes xkd verify): a "
                            "directory or a URL."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="The cache's teacher in the vocab, if its manifest does not "
        "identify it."),
    as_json: bool = JsonOpt,
):
    """Write a copy of a cache with input ids, labels and top-k ids in the union vocabulary."""
    from .vocab import remap_cache

    summary = remap_cache(cache, vocab, out, teacher, progress=lambda msg: typer.echo(f"remap: {msg}", err=True))
    if as_json:
        emit_json(summary)
    else:
        typer.echo(f"{out}: {summary['rows']:,} rows of {summary['teacher']} in the union vocab "
                   f"({summary['rows_written_now']:,} written now)")


# With --init-from the student is the checkpoint, its shape and dropout included.
_STUDENT_SHAPE = ("hidden", "layers", "heads", "embedding_dim", "dropout", "architecture")
TRAIN_STUDENT_UNUSED = (
    ("init_teacher", lambda v, g: "init_from" not in g,
     "says which vocab teacher --init-from is, and --init-from is not given: give --init-from CHECKPOINT too, or "
     "leave --init-teacher out."),
    *((name, lambda v, g: "init_from" in g,
       f"shapes a random student, but --init-from starts from a checkpoint and keeps its shape, architecture and "
       f"dropout: leave --{name.replace('_', '-')} out, or leave --init-from out.") for name in _STUDENT_SHAPE),
    ("stop_after", lambda v, g: 1 <= v["steps"] <= v["stop_after"],
     lambda v: f"{v['stop_after']} leaves after that many steps of this run, and --steps {v['steps']} ends the run "
               "first, so it changes nothing: leave --stop-after out, or give fewer steps than --steps."),
    ("save_every", lambda v, g: 1 <= v["steps"] <= v["save_every"],
     lambda v: f"{v['save_every']} never comes before --steps {v['steps']} ends the run (the final checkpoint is written "
               "anyway): leave --save-every out, or give fewer steps than --steps."),
    # A fresh run without --save-every writes one checkpoint (the final one, or --stop-after's),
    # so there is nothing to prune; a resumed run prunes those of the runs before it.
    ("keep_checkpoints", lambda v, g: v["save_every"] == 0 and not v["resume"],
     "prunes the checkpoints written every --save-every steps, and --save-every is 0: this run writes one checkpoint. "
     "Leave --keep-checkpoints out, or give --save-every N."),
    _workspace_unused(("caches", "vocab", "out")),
    _remote_only("cache_dir"), _remote_only("cache_size"),
)


@app.command("train-student")
@user_errors
def train_student_cmd(
    ctx: typer.Context,
    method: str = typer.Option(..., "--method", help="Distillation method (see `xkd methods`)."),
    caches: List[str] = typer.Option([], "--caches", help="Caches to learn from, directories or URLs (s3://...): several after "
        "one --caches, globs, or repeat it (default: the workspace caches the method can use, when they are one corpus)."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="Vocab dir from `xkd build-vocab` over the caches' teachers "
        "(default: the workspace vocab covering them, built if missing)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output dir: the student (HF format), checkpoints, metrics. New or "
        "empty, unless --resume or --overwrite (default: the workspace's students/<method>-NNN)."),
    steps: int = typer.Option(1000, "--steps"),
    batch_size: int = typer.Option(32, "--batch-size", help="Examples per batch (per rank)."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Batches per optimiser step."),
    lr: float = typer.Option(5e-4, "--lr"),
    warmup: float = typer.Option(0.1, "--warmup", help="Warm-up: a fraction of --steps (<1) or a step count."),
    weight_decay: float = typer.Option(0.01, "--weight-decay"),
    clip: float = typer.Option(1.0, "--clip", help="Gradient-norm clipping (0: off)."),
    seed: int = typer.Option(0, "--seed"),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (0: only at the end)."),
    log_every: int = typer.Option(10, "--log-every"),
    amp: str = typer.Option("auto", "--amp", help="auto | off | bf16 | fp16 (auto: autocast on CUDA only)."),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out (made with the same "
        "options; only --workers, --stop-after, --save-every, --log-every, --keep-checkpoints and --device may change)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in a non-empty --out: its checkpoints and "
        "metrics are removed first."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="Keep the newest N checkpoints (resume falls back past a "
        "damaged one)."),
    stop_after: int = typer.Option(0, "--stop-after", help="Leave after N steps of this run, with a checkpoint (time-limited "
        "jobs; continue with --resume)."),
    alpha: float = typer.Option(0.7, "--alpha", help="Language smoothing: sample language l with q ∝ p_l^alpha."),
    copies: str = typer.Option("all", "--copies", help="Several teachers per example: all | best (lowest teacher loss)."),
    hidden: int = typer.Option(256, "--hidden", help="Student hidden size."),
    layers: int = typer.Option(4, "--layers"),
    heads: int = typer.Option(4, "--heads"),
    embedding_dim: int = typer.Option(0, "--embedding-dim", help="Reduced embedding size (0: = --hidden)."),
    dropout: float = typer.Option(0.1, "--dropout"),
    architecture: str = typer.Option("bert", "--architecture", help="Random student: bert | xlm-roberta (XLM-R: positions from "
        "the union's pad id, one token type). --init-from keeps the checkpoint's."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="Start from this checkpoint (teacher alias or dir) "
        "through the union-vocab embedding initialisation."),
    init_teacher: Optional[str] = typer.Option(None, "--init-teacher", help="Which vocab teacher --init-from is (default: the "
        "same name)."),
    option: List[str] = typer.Option([], "--option", "-o", help="The method's own options, KEY=VALUE (repeatable; `xkd methods` "
        "lists them, e.g. -o lambda_start=0.9 -o temperature=2)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda if available)."),
    allow_incomplete: bool = AllowIncompleteOpt,
    cache_dir: Optional[Path] = CacheDirOpt,
    cache_size: str = CacheSizeOpt,
    workspace: Optional[Path] = WorkspaceOpt,
    as_json: bool = JsonOpt,
):
    """Train a student from cached teacher outputs, with any registered method."""
    refuse_unused(ctx, TRAIN_STUDENT_UNUSED)
    given = given_options(ctx)
    from .student.models import StudentConfig
    from .student.run import train_student
    from .student.trainer import TrainConfig
    from .workspace import Workspace, default_caches, default_vocab, expand_cache_paths, remove_if_empty

    method_options = parse_key_values(option)
    student = StudentConfig(hidden=hidden, layers=layers, heads=heads, embedding_dim=embedding_dim, dropout=dropout,
                            architecture=architecture)
    caches = expand_cache_paths([str(c) for c in caches])
    if not (caches and vocab and out):
        ws = Workspace.find(workspace)
        say = lambda msg: typer.echo(f"train-student: {msg}", err=True)  # noqa: E731
        if resume and out is None:
            from .errors import BadInput

            raise BadInput("--resume continues a run: give its directory with --out (`xkd ls` lists the students).")
        if not caches:
            caches = default_caches(ws, method, method_options, student, allow_incomplete)
            say("--caches (workspace): " + " ".join(caches))
        if vocab is None:
            vocab = Path(default_vocab(ws, caches, say))
            say(f"--vocab (workspace): {vocab}")
        if out is None:
            out = ws.new_student_dir(method)
            say(f"--out (workspace): {out}")
            ctx.call_on_close(functools.partial(remove_if_empty, out))  # a run refused before writing leaves no husk
    result = train_student(
        method=method, caches=list(caches), vocab_dir=str(vocab), out=str(out),
        train=TrainConfig(out=str(out), steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay,
                          grad_accum=grad_accum, clip=clip, save_every=save_every, log_every=log_every,
                          seed=seed, amp=amp, num_workers=workers, stop_after=stop_after,
                          keep_checkpoints=keep_checkpoints),
        batch_size=batch_size,
        student=student,
        # None: not given, so a cache set that cannot use it (one language, one cache per corpus) is no error
        init_from=init_from, init_teacher=init_teacher, alpha=alpha if "alpha" in given else None,
        copies=copies if "copies" in given else None,
        method_options=method_options, resume=resume, overwrite=overwrite, device=device, allow_incomplete=allow_incomplete,
        fetch=remote_fetch(caches, cache_dir, cache_size),
    )
    if as_json:
        emit_json(result)
    else:
        done = f"{result['steps']} of {result['steps_total']}" if result["partial"] else str(result["steps"])
        typer.echo(f"trained {method} for {done} steps in {result['seconds']}s; final "
                   + ", ".join(f"{k} {v:.4g}" for k, v in result["final"].items()) + f"\nstudent: {out}")


def parse_key_values(items: List[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            from .errors import BadInput

            raise BadInput(f"--option {item!r} must be KEY=VALUE, e.g. --option xwcl=false")
        key = key.strip().replace("-", "_")
        if key in out:
            from .errors import BadInput

            raise BadInput(f"--option {key} is given twice ({out[key]!r} and {value!r}); give it once.")
        out[key] = value
    return out


METHODS_UNUSED = (("name", lambda v, g: v["markdown"],
                   "is not used with --markdown, which prints the options tables of every method: give one of them."),)


@app.command("methods")
@user_errors
def methods_cmd(
    ctx: typer.Context,
    name: Optional[str] = typer.Argument(None, help="One method (default: all)."),
    markdown: bool = typer.Option(False, "--markdown", help="The options tables of docs/methods.md, as Markdown."),
):
    """List the registered distillation methods: what each needs from a cache, and its options."""
    refuse_unused(ctx, METHODS_UNUSED)
    from .student.methods import available, get_method
    from .student.methods.catalog import describe, markdown as as_markdown

    if markdown:
        typer.echo(as_markdown())
        return
    names = [get_method(name).name] if name else available()
    typer.echo("\n\n".join(describe(n) for n in names))


# The options each evaluate mode reads (MODEL, --mode and --json: every mode). mlm and bitext
# run on the CPU, so --device is classify/tag's only.
_FINE_TUNING = ("train", "seeds", "seed", "epochs", "lr", "warmup", "weight_decay", "freeze_embeddings")
EVALUATE_MODE_OPTIONS = {
    "mlm": {"vocab", "caches", "batch_size", "max_rows", "allow_incomplete", "cache_dir", "cache_size"},
    "bitext": {"vocab", "src", "tgt", "init_from", "pooling", "batch_size", "max_rows"},
    "classify": {"vocab", "test", "max_length", "out", "device", "batch_size", "as_is", *_FINE_TUNING},
    "tag": {"vocab", "test", "max_length", "out", "device", "batch_size", "as_is", *_FINE_TUNING},
}


def _modes_reading(option: str) -> str:
    return " or ".join(m for m, used in EVALUATE_MODE_OPTIONS.items() if option in used)


EVALUATE_UNUSED = (
    *((option, lambda v, g, option=option: v["mode"] in EVALUATE_MODE_OPTIONS
       and option not in EVALUATE_MODE_OPTIONS[v["mode"]] | {"model", "mode", "as_json"},
       lambda v, option=option: f"is not used by --mode {v['mode']} (only --mode {_modes_reading(option)} reads it): "
       f"leave it out, or give --mode {_modes_reading(option).split(' or ')[0]}.")
      for option in sorted(set().union(*EVALUATE_MODE_OPTIONS.values()))),
    *((option, lambda v, g: v["as_is"],
       "is a fine-tuning option, and --as-is scores MODEL's own head without fine-tuning: leave one of them out.")
      for option in _FINE_TUNING if option not in ("train", "seeds")),  # TaskEvalOptions refuses these two itself
    _remote_only("cache_dir"), _remote_only("cache_size"),
)


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="A trained student (the --out of train-student); classify/tag: any Hugging "
        "Face encoder directory (or an alias found offline, e.g. minilm)."),
    mode: str = typer.Option("mlm", "--mode", help="mlm (loss, accuracy, KL to teachers) | bitext (retrieval accuracy) | "
        "classify (fine-tune and score sequence classification, zero-shot across languages) | tag (the same for CoNLL tagging: "
        "span F1 or accuracy)."),
    vocab: Optional[Path] = typer.Option(None, "--vocab", help="The vocab dir the student was trained with (default: the one "
        "its train_summary.json names)."),
    caches: List[str] = typer.Option([], "--caches", help="mlm mode: held-out caches, directories or URLs (one teacher each; "
        "several after one --caches, or globs)."),
    src: Optional[str] = typer.Option(None, "--src", help="bitext mode: PATH@LANG, a sentence a line."),
    tgt: Optional[str] = typer.Option(None, "--tgt", help="bitext mode: PATH@LANG, line-aligned with --src."),
    init_from: Optional[str] = typer.Option(None, "--init-from", help="bitext mode: evaluate the untrained student initialised "
        "from this teacher instead of MODEL."),
    pooling: Optional[str] = typer.Option(None, "--pooling", help="bitext mode: mean | cls sentence vectors (default: as the "
                                          "student was trained, its sentence-transformers pooling and projection; else mean)."),
    train: List[str] = typer.Option([], "--train", help="classify/tag: data to fine-tune on, labeled:PATH@LANG, pairs:PATH@LANG "
        "or conll:PATH@LANG (repeatable)."),
    test: List[str] = typer.Option([], "--test", help="classify/tag: a test set, one per language, same kinds as --train "
        "(repeatable)."),
    seeds: int = typer.Option(1, "--seeds", help="classify/tag: fine-tune N times (seeds --seed ... --seed+N-1); report mean "
        "and std."),
    seed: int = typer.Option(0, "--seed", help="classify/tag: the first seed."),
    epochs: int = typer.Option(EVALUATE_RECIPE.epochs, "--epochs", help="classify/tag: fine-tuning epochs."),
    lr: float = typer.Option(EVALUATE_RECIPE.lr, "--lr", help="classify/tag: peak learning rate (AdamW, linear warm-up and "
        "decay)."),
    warmup: float = typer.Option(EVALUATE_RECIPE.warmup, "--warmup", help="classify/tag: warm-up, a fraction of the steps."),
    weight_decay: float = typer.Option(EVALUATE_RECIPE.weight_decay, "--weight-decay", help="classify/tag: AdamW weight decay."),
    max_length: int = typer.Option(EVALUATE_RECIPE.max_length, "--max-length", help="classify/tag: tokens per example, special "
        "tokens included."),
    freeze_embeddings: bool = typer.Option(False, "--freeze-embeddings", help="classify/tag: keep the embedding layers fixed "
        "while fine-tuning (seeds/003)."),
    as_is: bool = typer.Option(False, "--as-is", help="classify/tag: score MODEL's own classification head, no fine-tuning (a "
        "distilled task student: xd, multikd, tinybert stage 2)."),
    out: Optional[Path] = typer.Option(None, "--out", help="classify/tag: where results.json and the PNG chart go (default: "
        "eval/MODEL_NAME-MODE)."),
    device: Optional[str] = typer.Option(None, "--device", help="classify/tag: cpu | cuda (default: cuda if available)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", help="Evaluate on at most this many rows (lines) per cache "
        "(file)."),
    allow_incomplete: bool = AllowIncompleteOpt,
    cache_dir: Optional[Path] = CacheDirOpt,
    cache_size: str = CacheSizeOpt,
    as_json: bool = JsonOpt,
):
    """Evaluate a model: masked-LM quality against held-out caches, bitext retrieval, or the papers'
    yardstick: fine-tune on one language's task data and score every language (docs/evaluation.md)."""
    from .errors import BadInput

    if mode not in EVALUATE_MODE_OPTIONS:
        raise BadInput(f"--mode must be one of {', '.join(EVALUATE_MODE_OPTIONS)}, not {mode!r}.")
    refuse_unused(ctx, EVALUATE_UNUSED)
    if mode in ("classify", "tag"):
        from .downstream import TaskEvalOptions, evaluate_task, format_result
        from .finetune import Recipe

        if model is None:
            raise BadInput(f"--mode {mode} needs MODEL: a Hugging Face encoder directory (a student, a teacher, ...).")
        recipe = Recipe(epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, warmup=warmup,
                        weight_decay=weight_decay, freeze_embeddings=freeze_embeddings)
        result = evaluate_task(TaskEvalOptions(str(model), mode, list(train), list(test), recipe, seeds, seed,
                                               str(vocab) if vocab else None, str(out) if out else None, device, as_is))
        typer.echo(format_result(result))
        if as_json:
            emit_json(result)
        return
    if model is None and (mode == "mlm" or init_from is None):
        raise BadInput(f"--mode {mode} needs MODEL: a trained student (the --out of train-student)"
                       + (", or --init-from TEACHER for the student before training." if mode == "bitext" else "."))
    if model is not None and vocab is None and not Path(model).is_dir():  # else: "needs --vocab", about the wrong thing
        raise BadInput(f"MODEL {model}: {'is not a directory' if Path(model).exists() else 'does not exist'}; --mode "
                       f"{mode} evaluates a trained student: give its directory (the --out of train-student).")
    if vocab is None and model is not None:
        from .workspace import trained_vocab

        vocab = trained_vocab(model)
    if vocab is None and model is None:
        raise BadInput("--init-from needs --vocab: the union vocab the student is made over (xkd build-vocab).")
    if vocab is None:
        raise BadInput(f"--mode {mode} needs --vocab: the vocab dir the student was trained with (an xkd student's "
                       "train_summary.json names it; this MODEL's does not, or its vocab has moved).")
    if mode == "bitext":
        from .student.evaluate import evaluate_bitext

        if not src or not tgt:
            raise BadInput("--mode bitext needs --src PATH@LANG and --tgt PATH@LANG.")
        result = evaluate_bitext(str(model) if model else None, str(vocab), src, tgt, init_from, pooling, max_rows,
                                 batch_size=batch_size)
        emit_json(result) if as_json else typer.echo(
            "  ".join(f"{k} {v:.4f}" for k, v in result.items() if k.startswith("accuracy")) + f"  ({result['pairs']} pairs)")
        return
    if not caches:
        raise BadInput("--mode mlm needs at least one --caches: held-out caches of the student's teachers.")
    from .student.evaluate import evaluate_mlm
    from .workspace import expand_cache_paths

    held_out = expand_cache_paths([str(c) for c in caches])
    result = evaluate_mlm(str(model), held_out, str(vocab), batch_size, max_rows, allow_incomplete,
                          fetch=remote_fetch(held_out, cache_dir, cache_size))
    if as_json:
        emit_json(result)
        return
    for r in result["per_cache"]:
        typer.echo(f"{r['teacher']:<24} positions {r['masked_positions']:>8,}  mlm loss {r['mlm_loss']:.4f}  "
                   f"acc {r['accuracy']:.4f} (teacher {r['teacher_accuracy']:.4f})  KL to teacher {r['kl_to_teacher']:.4f}")
    if result["mlm_accuracy_deviation_percent"] is not None:
        typer.echo(f"MLM accuracy deviation from teachers {result['mlm_accuracy_deviation_percent']:+.2f}% "
                   "(positive: student better; MergeDistill's RDT is on task scores: xkd rdt)")


@app.command("rdt")
@user_errors
def rdt_cmd(
    student: List[str] = typer.Argument(..., help="The student's evaluation: the JSON `xkd evaluate --mode classify|tag --json` "
        "printed, or its results.json; several files (one per language) are merged."),
    teacher: List[str] = typer.Option(..., "--teacher", help="A teacher's evaluation on the same task, FILE or FILE@LANG,LANG "
        "(only those languages: a monolingual teacher). Repeatable."),
    metric: Optional[str] = typer.Option(None, "--metric", help="The score to compare (default: the one the evaluations report)."
        "The score to compare (default: the one the evaluations report)."),
    as_json: bool = JsonOpt,
):
    """MergeDistill's RDT (relative deviation from teachers, Eq. 3) per language on task scores: positive when the
    student is better."""
    from .downstream import format_rdt, rdt_from_files

    result = rdt_from_files(list(student), list(teacher), metric)
    typer.echo(format_rdt(result))
    if as_json:
        emit_json(result)


@app.command("finetune-teacher")
@user_errors
def finetune_teacher_cmd(
    base: str = typer.Option(..., "--base", help="Model to fine-tune: alias (minilm, mbert, ...), HF model id or model dir."),
    data: List[str] = typer.Option(..., "--data", help="Labeled file [labeled:]PATH@LANG (text<TAB>label a line) or sentence "
        "pairs pairs:PATH@LANG (text_a<TAB>text_b<TAB>label); repeat for several."),
    out: Path = typer.Option(..., "--out", help="Where to save the classifier (HF format, with its tokenizer and labels)."),
    epochs: int = typer.Option(3, "--epochs"),
    lr: float = typer.Option(5e-5, "--lr"),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length", help="Tokens per example, special tokens included."),
    held_out: float = typer.Option(0.2, "--held-out", help="Fraction of each file kept out of training and scored (0: none)."),
    seed: int = typer.Option(0, "--seed"),
    freeze_embeddings: bool = typer.Option(False, "--freeze-embeddings", help="Keep the embedding layers fixed (seeds/003)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda if available)."),
    as_json: bool = JsonOpt,
):
    """Fine-tune a Hugging Face sequence classifier on labelled texts or sentence pairs: a classifier teacher for xd,
    multikd and tinybert stage 2."""
    from .finetune import FinetuneOptions, finetune_teacher, format_summary

    summary = finetune_teacher(FinetuneOptions(
        base=base, data=list(data), out=str(out), epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length,
        held_out=held_out, seed=seed, freeze_embeddings=freeze_embeddings, device=device,
    ))
    typer.echo(format_summary(summary))
    if as_json:
        emit_json(summary)


@app.command("ls")
@user_errors
def ls_cmd(
    workspace: Optional[str] = typer.Option(None, "--workspace", help="The workspace root (default: $XKD_HOME, else "
                                            "./xkd-runs), or an object-store URL whose caches to list (URL/caches/*, URL/*)."),
    as_json: bool = JsonOpt,
):
    """What the workspace holds: caches (teacher, corpus, rows, outputs, size, complete), vocabs
    (teachers, size) and students (method, caches, steps, final losses, evaluation results)."""
    from .workspace import Workspace, describe, format_listing

    info = describe(Workspace.find(workspace))
    emit_json(info) if as_json else typer.echo(format_listing(info))


def repeated_option(argv: list[str]) -> tuple[str, str] | None:
    """(command, one paragraph) when an option that takes one value is given twice: click would
    keep the last one silently. Options that take several (--caches, -o, --teacher) may repeat."""
    # By attribute, not isinstance: typer may bring its own click.
    name = next((t for t in argv if not t.startswith("-")), None)
    command = getattr(typer.main.get_command(app), "commands", {}).get(name)
    if command is None:
        return None
    params = {opt: p for p in command.params if p.param_type_name == "option" and not p.multiple and p.nargs == 1
              for opt in (*p.opts, *p.secondary_opts)}
    takes_value = {opt for opt, p in params.items() if not p.is_flag and not p.count}
    seen: dict[str, str] = {}
    tokens = iter(argv[argv.index(name) + 1:])
    for token in tokens:
        if token == "--":
            break
        flag, has_value, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if flag not in params:
            continue
        if flag in takes_value and not has_value:
            value = next(tokens, "")
        typed = f"{flag} {value}" if flag in takes_value else flag
        param = params[flag].name
        if param in seen:
            return name, (f"{seen[param].split(' ')[0]} is given twice ({seen[param]} and {typed}): it takes one value, "
                          "and the last one would silently win. Give it once.")
        seen[param] = typed
    return None


def main() -> None:
    from .workspace import spread_multi_value_options

    quiet_transformers_by_default()
    argv = spread_multi_value_options(sys.argv[1:])
    if repeated := repeated_option(argv):
        typer.echo(f"xkd {repeated[0]}: error: {repeated[1]}", err=True)
        raise SystemExit(2)
    app(args=argv, prog_name="xkd")


if __name__ == "__main__":
    main()
