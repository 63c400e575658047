"""The `xkd` command: parses options, calls one function per command, prints the result.

No work happens here. Each command imports its layer lazily so `xkd --help` is instant.
Errors that users can act on (XkdError) print as one paragraph with exit code 1 (the work
failed) or 2 (bad usage or input); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import json
import sys
import types
import typing
from pathlib import Path
from typing import List, Optional

import typer

from .errors import XkdError, from_worker
from .evaluation import FINE_TUNING, MODES as EVALUATE_MODES
from .evaluation.downstream import EVALUATE_RECIPE
from .evaluation.finetune import FinetuneOptions
from .pipeline.options import CacheTeachersOptions
from .quiet import quiet_transformers_by_default
from .student.options import STUDENT_SHAPE, TrainStudentOptions

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Cross-lingual knowledge distillation: cache teachers once, train many students.",
)


def show(text: str, result: dict, as_json: bool) -> None:
    """A command's summary for a person, then, under --json, the object for a script."""
    typer.echo(text)
    if as_json:
        emit_json(result)


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


def declared_option(options_cls, name: str):
    """The typer parameter of option `name` as `options_cls` declares it: for another command
    that takes the same option (evaluate reads caches as train-student does)."""
    from .options import declared, default_of

    f, spec = next((f, spec) for f, spec in declared(options_cls) if f.name == name)
    return typer.Option(default_of(f), *spec.flags, help=spec.help)


# Caches on object storage (s3://, gs://, az://) are read through a bounded local directory.
CacheDirOpt = declared_option(TrainStudentOptions, "cache_dir")
CacheSizeOpt = declared_option(TrainStudentOptions, "cache_size")


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


AllowIncompleteOpt = declared_option(TrainStudentOptions, "allow_incomplete")


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
    refuse_unused_values(ctx.params, given_options(ctx), rules)


ConfigOpt = typer.Option(None, "--config", help="Replay a run: the config.yaml it wrote (options given here override the "
                         "file's).")


def _typer_type(tp):
    """A field's type as typer takes it: List[...] for tuples and lists, Optional[...] for X | None."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list):
        return List[args[0]]
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return Optional[_typer_type(inner[0])]
    return tp


def options_command(name: str, options_cls, rules=(), **cli_only):
    """Register command `name` with one parameter per field of `options_cls` (xkd/options.py),
    plus --config and the `cli_only` parameters (name: typer.Option). The decorated function
    is called as fn(ctx, opts, given, **cli_only values): `opts` merges the field defaults,
    the --config file and the flags typed, in that order; `given` maps what the user chose
    (typed, or set in the file to other than the default) to its flag, for `rules`
    (refuse_unused) and for options whose absence means something."""
    from .options import FREE, as_field_type, declared, default_of, read_config

    hints = typing.get_type_hints(options_cls)
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter("ctx", keyword, annotation=typer.Context)]
    for f, spec in declared(options_cls):
        default = None if spec.required else default_of(f)
        default = list(default) if isinstance(default, (tuple, dict)) else default
        params.append(inspect.Parameter(f.name, keyword, annotation=spec.typed_as or _typer_type(hints[f.name]),
                                        default=typer.Option(default, *spec.flags, help=spec.help + (
                                            " May change on --resume." if spec.resume == FREE else ""))))
    params.append(inspect.Parameter("config", keyword, annotation=Optional[Path], default=ConfigOpt))
    params += [inspect.Parameter(k, keyword, annotation=Optional[Path] if opt.default is None else type(opt.default),
                                 default=opt) for k, opt in cli_only.items()]

    def decorate(body):
        def command(ctx: typer.Context, **kwargs):
            typed = given_options(ctx)
            defaults = {f.name: default_of(f) for f, _ in declared(options_cls)}
            from_file = read_config(kwargs["config"], options_cls) if kwargs["config"] else {}
            values = {**defaults, **from_file}
            for f, spec in declared(options_cls):
                if f.name in typed:
                    value = kwargs[f.name]
                    values[f.name] = spec.parse(value, spec.flag) if spec.parse else as_field_type(value, hints[f.name],
                                                                                                     spec.flag)
            flags = {f.name: spec.flag for f, spec in declared(options_cls)}
            given = {**{k: flags[k] for k, v in from_file.items() if v != defaults[k]}, **typed}
            refuse_unused_values(values, given, rules)
            return body(ctx, options_cls(**values), given, **{k: kwargs[k] for k in cli_only})

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__, command.__doc__ = body.__name__, body.__doc__
        app.command(name)(user_errors(command))
        return body

    return decorate


def refuse_unused_values(values: dict, given: dict[str, str], rules) -> None:
    """refuse_unused over values already merged (defaults, --config file, flags)."""
    from .errors import BadInput

    for option, ignored, why in rules:
        if option in given and ignored(values, given):
            raise BadInput(f"{given[option]} {why(values) if callable(why) else why}")


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
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Also re-run this teacher (alias, HF model id or model "
                                          "dir, as cache-teachers takes it) on random rows of the cache, with their stored "
                                          "masks, and compare every stored output within its dtype's tolerance."),
    rows: Optional[int] = typer.Option(None, "--rows", help="With --teacher: rows to re-run, drawn across the finished "
                                       "shards (default 64)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="With --teacher: the seed of that draw (default 0)."),
    device: Optional[str] = typer.Option(None, "--device", help="With --teacher: auto | cpu | cuda (default auto: cuda if "
                                         "available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="With --teacher: compute dtype, auto | fp16 | bf16 | fp32 "
                                        "(auto: fp32 on CPU; on CUDA the cache's own fp16 or bf16, else fp32)."),
    as_json: bool = JsonOpt,
):
    """Check every shard's checksums, schema and offsets, and that no planned shard is missing;
    with --teacher, also re-run the teacher on --rows random rows and compare what the cache stores.
    Exits 1 naming each bad shard (or the first row and output that differ from the teacher's
    re-run), 3 if the finished shards are sound but the cache is incomplete."""
    from .errors import BadInput
    from .storage import format_verdict, verify_cache

    if teacher is None:
        given = [flag for flag, value in (("--rows", rows), ("--seed", seed), ("--device", device), ("--dtype", dtype))
                 if value is not None]
        if given:
            raise BadInput(f"{given[0]} applies to the re-run of a teacher, and --teacher is not given: give --teacher T "
                           f"(the teacher that made the cache), or leave {given[0]} out.")
    report = verify_cache(cache)
    rechecked = teacher is not None and report["status"] != "damaged"  # a damaged cache is reported as it is
    if rechecked:
        report["recheck"] = _recheck(cache, teacher, 64 if rows is None else rows, seed or 0, device or "auto",
                                     dtype or "auto")
        if not report["recheck"]["ok"]:
            report["ok"], report["status"] = False, "differs"
    if as_json:
        emit_json(report)
    else:
        if report["ok"]:
            typer.echo(f"{cache}: ok ({report['shards_checked']} shards, checksums, schema and offsets verified)")
        if rechecked and report["recheck"]["ok"]:  # an incomplete cache's finished shards too
            from .pipeline.recheck import format_recheck

            typer.echo(format_recheck(report["recheck"]))
    if report["status"] == "differs":
        from .pipeline.recheck import format_recheck

        typer.echo(f"xkd verify: {format_recheck(report['recheck'])}", err=True)
        raise typer.Exit(1)
    if not report["ok"]:
        typer.echo(f"xkd verify: {format_verdict(report)}", err=True)
        raise typer.Exit(1 if report["status"] == "damaged" else 3)


def _recheck(cache: str, teacher: str, rows: int, seed: int, device: str, dtype: str) -> dict:
    """verify --teacher's re-run, its progress on stderr every few seconds."""
    import time

    from .pipeline.recheck import recheck_cache

    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] >= 5 and done < total:
            typer.echo(f"xkd verify: re-ran {done} of {total} rows", err=True)
            last[0] = time.monotonic()

    return recheck_cache(cache, teacher, rows=rows, seed=seed, device=device, dtype=dtype, progress=progress)


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
    ("sample", lambda v, g: _unmasked(v),
     "draws at masked positions, and --no-mask or --mask-prob 0 turns masking off: leave --sample out, or give "
     "--mask-prob P above 0."),
    ("topk_codec", lambda v, g: v["topk"] == 0,
     "chooses how top-k is stored, and --topk 0 stores none: leave --topk-codec out, or give --topk K."),
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


@options_command("cache-teachers", CacheTeachersOptions, CACHE_TEACHERS_UNUSED, workspace=WorkspaceOpt, as_json=JsonOpt)
def cache_teachers_cmd(ctx, opts, given, workspace, as_json):
    """Run teachers over a corpus once and cache what students learn from (resumable)."""
    from .pipeline import cache_teachers, format_summary
    from .pipeline.run import Interrupted
    from .workspace import Workspace

    if "out" not in given:
        opts = dataclasses.replace(opts, out=str(Workspace.find(workspace).caches))
    try:
        result = cache_teachers(opts)
    except Interrupted as e:  # Ctrl-C: one line saying what was kept, not an error
        typer.echo(f"xkd cache-teachers: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    show(format_summary(result), result, as_json)


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
TRAIN_STUDENT_UNUSED = (
    ("init_teacher", lambda v, g: "init_from" not in g,
     "says which vocab teacher --init-from is, and --init-from is not given: give --init-from CHECKPOINT too, or "
     "leave --init-teacher out."),
    *((name, lambda v, g: "init_from" in g,
       f"shapes a random student, but --init-from starts from a checkpoint and keeps its shape, architecture and "
       f"dropout: leave --{name.replace('_', '-')} out, or leave --init-from out.") for name in STUDENT_SHAPE),
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


@options_command("train-student", TrainStudentOptions, TRAIN_STUDENT_UNUSED, workspace=WorkspaceOpt, as_json=JsonOpt)
def train_student_cmd(ctx, opts, given, workspace, as_json):
    """Train a student from cached teacher outputs, with any registered method."""
    from .student.run import train_student
    from .workspace import Workspace, default_caches, default_vocab, expand_cache_paths, remove_if_empty

    opts = dataclasses.replace(opts, caches=expand_cache_paths(list(opts.caches)))
    if not (opts.caches and opts.vocab and opts.out):
        ws = Workspace.find(workspace)
        say = lambda msg: typer.echo(f"train-student: {msg}", err=True)  # noqa: E731
        if opts.resume and opts.out is None:
            from .errors import BadInput

            raise BadInput("--resume continues a run: give its directory with --out (`xkd ls` lists the students).")
        if not opts.caches:
            opts = dataclasses.replace(opts, caches=default_caches(ws, opts.method, opts.method_options,
                                                                   opts.student_config(), opts.allow_incomplete))
            say("--caches (workspace): " + " ".join(opts.caches))
        if opts.vocab is None:
            opts = dataclasses.replace(opts, vocab=str(default_vocab(ws, list(opts.caches), say)))
            say(f"--vocab (workspace): {opts.vocab}")
        if opts.out is None:
            opts = dataclasses.replace(opts, out=str(ws.new_student_dir(opts.method)))
            say(f"--out (workspace): {opts.out}")
            ctx.call_on_close(functools.partial(remove_if_empty, Path(opts.out)))  # a run refused before writing: no husk
    result = train_student(opts, fetch=remote_fetch(list(opts.caches), opts.cache_dir, opts.cache_size))
    if as_json:
        emit_json(result)
    else:
        done = f"{result['steps']} of {result['steps_total']}" if result["partial"] else str(result["steps"])
        typer.echo(f"trained {opts.method} for {done} steps in {result['seconds']}s; final "
                   + ", ".join(f"{k} {v:.4g}" for k, v in result["final"].items()) + f"\nstudent: {opts.out}")


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


def _modes_reading(option: str) -> str:
    return " or ".join(name for name, mode in EVALUATE_MODES.items() if option in mode.options)


EVALUATE_UNUSED = (
    *((option, lambda v, g, option=option: v["mode"] in EVALUATE_MODES and option not in EVALUATE_MODES[v["mode"]].options,
       lambda v, option=option: f"is not used by --mode {v['mode']} (only --mode {_modes_reading(option)} reads it): "
       f"leave it out, or give --mode {_modes_reading(option).split(' or ')[0]}.")
      for option in sorted(set().union(*(mode.options for mode in EVALUATE_MODES.values())))),
    *((option, lambda v, g: v["as_is"],
       "is a fine-tuning option, and --as-is scores MODEL's own head without fine-tuning: leave one of them out.")
      for option in FINE_TUNING if option not in ("train", "seeds")),  # TaskEvalOptions refuses these two itself
    _remote_only("cache_dir"), _remote_only("cache_size"),
)


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="A trained student (the --out of train-student); classify/tag: any Hugging "
        "Face encoder directory (or an alias found offline, e.g. minilm)."),
    mode: str = typer.Option("mlm", "--mode", help=" | ".join(f"{name} ({m.help})" for name, m in EVALUATE_MODES.items()) + "."),
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
        "while fine-tuning (as in Soltan et al. 2021)."),
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

    if mode not in EVALUATE_MODES:
        raise BadInput(f"--mode must be one of {', '.join(EVALUATE_MODES)}, not {mode!r}.")
    refuse_unused(ctx, EVALUATE_UNUSED)
    chosen = EVALUATE_MODES[mode]
    result, text = chosen.run({**ctx.params, "fetch_for": lambda held_out: remote_fetch(held_out, cache_dir, cache_size)})
    if chosen.text_with_json or not as_json:
        typer.echo(text)
    if as_json:
        emit_json(result)


@app.command("rdt")
@user_errors
def rdt_cmd(
    student: List[str] = typer.Argument(..., help="The student's evaluation: the JSON `xkd evaluate --mode classify|tag --json` "
        "printed, or its results.json; several files (one per language) are merged."),
    teacher: List[str] = typer.Option(..., "--teacher", help="A teacher's evaluation on the same task, FILE or FILE@LANG,LANG "
        "(only those languages: a monolingual teacher). Repeatable."),
    metric: Optional[str] = typer.Option(None, "--metric",
                                         help="The score to compare (default: the one the evaluations report)."),
    as_json: bool = JsonOpt,
):
    """MergeDistill's RDT (relative deviation from teachers, Eq. 3) per language on task scores: positive when the
    student is better."""
    from .evaluation.rdt import format_rdt, rdt_from_files

    result = rdt_from_files(list(student), list(teacher), metric)
    show(format_rdt(result), result, as_json)


@options_command("finetune-teacher", FinetuneOptions, as_json=JsonOpt)
def finetune_teacher_cmd(ctx, opts, given, as_json):
    """Fine-tune a Hugging Face sequence classifier on labelled texts or sentence pairs: a classifier teacher for xd,
    multikd and tinybert stage 2."""
    from .evaluation.finetune import finetune_teacher, format_summary

    summary = finetune_teacher(opts)
    show(format_summary(summary), summary, as_json)


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
