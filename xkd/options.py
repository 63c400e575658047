"""Checking a numeric option's value, once for every command: a leaf (imports only errors).
Options are checked before anything is read or started, so that a NaN learning rate or a
zero token budget is one paragraph naming the option, not a NaN loss or a worker traceback."""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable

from .errors import BadInput


def check_number(option: str, value, *, low=None, high=None, high_open: bool = False, whole: bool = False,
                 hint: str = "") -> None:
    """One paragraph naming `option` unless `value` is a finite number (a whole one with
    `whole`) in [low, high] (or [low, high) with high_open)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not whole or isinstance(value, int))
    ok = ok and (low is None or value >= low) and (high is None or (value < high if high_open else value <= high))
    if ok:
        return
    kind = "whole number" if whole or isinstance(value, int) else "finite number"
    if high is None:
        wanted = f"a {kind} of at least {low}" if low is not None else f"a {kind}"
    else:
        wanted = f"a {kind} in [{low}, {high}{')' if high_open else ']'}"
    raise BadInput(f"{option} {value!r}: give {wanted}{' (' + hint + ')' if hint else ''}. Nothing was read or written.")


def machine_memory() -> int:
    """Bytes of physical memory on this machine: what a value's allocations are bounded by."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound known, nothing refused
        return 2**63 - 1


def size_in_words(n: float) -> str:
    """1234567890 -> "1.2 GB" (decimal units, as `df -H` and most users count)."""
    for unit in ("bytes", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"  # pragma: no cover


def check_memory(option: str, value, needed: float, how: str, *, largest=None, after: str = "Nothing was read or written.",
                 memory: int | None = None) -> None:
    """One paragraph naming `option` when what `value` implies, `needed` bytes (`how` says
    why), exceeds this machine's memory: such a value would die in the allocator with a
    traceback, or swap the machine to a halt, long after it was given. `largest` is the
    largest value that fits, named in the message as the bound; `value` None: `option` says
    it already ("--option head_hidden=10")."""
    memory = machine_memory() if memory is None else memory
    if needed <= memory:
        return
    bound = f" Give at most {largest:,}." if largest is not None else ""
    given = f"{option} {value!r}" if value is not None else option
    raise BadInput(f"{given}: {how} needs {size_in_words(needed)}, more than this machine's "
                   f"{size_in_words(memory)} of memory.{bound} {after}".rstrip())


# One declaration per option ------------------------------------------------------------
#
# Each command's options are one frozen dataclass whose fields are made with `option(...)`.
# That one declaration gives the CLI its parameter (cli.py builds the typer signature from
# it), the value checks (`check_options`, run when the dataclass is made, so the Python API
# gets them too), what a checkpoint records for --resume (`resume_record`) and what a run
# writes to config.yaml for --config to replay (`config_values`, `read_config`).

SAME = "same"  # a resumed run must give the same value: it decides what the run computes
FREE = "free"  # recorded, but a resumed run may change it: it decides how the run is carried out


@dataclass(frozen=True)
class Option:
    """How one field of a command's options is typed, checked, recorded and replayed."""

    flags: tuple[str, ...]  # ("--batch-size",) | ("--option", "-o") | ("--text/--no-text",)
    help: str = ""
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    whole: bool = False
    hint: str = ""
    choices: tuple | None = None
    resume: str | None = None  # SAME | FREE | None (not recorded in checkpoints)
    replay: bool = True  # written to config.yaml
    typed_as: Any = None  # the command line's type where it differs from the field's (e.g. "0,6,12")
    parse: Callable | None = None  # (text typed, flag) -> the field's value, with typed_as
    required: bool = False  # given on the command line or in --config

    @property
    def flag(self) -> str:
        return self.flags[0].split("/")[0]


def option(default, *flags: str, help: str = "", **how) -> Any:
    """A field of a command's options dataclass (see Option for `how`)."""
    spec = Option(flags=flags, help=help, **how)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"option": spec})
    return field(default=default, metadata={"option": spec})


def declared(cls_or_opts) -> list[tuple[Any, Option]]:
    """(dataclass field, Option) of every option, in declaration order."""
    return [(f, f.metadata["option"]) for f in fields(cls_or_opts) if "option" in f.metadata]


def default_of(f) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def check_options(opts) -> None:
    """Every declared bound and choice, naming the option: a NaN learning rate or a zero
    token budget is one paragraph before anything is read or started."""
    for f, spec in declared(opts):
        value = getattr(opts, f.name)
        if spec.required and value in (None, (), [], ""):
            raise BadInput(f"{spec.flag} is required: give it on the command line or in the --config file.")
        if value is None:
            continue
        if spec.choices is not None and value not in spec.choices:
            raise BadInput(f"{spec.flag} must be one of {', '.join(map(str, spec.choices))}, not {value!r}.")
        if spec.low is not None or spec.high is not None or spec.whole:
            check_number(spec.flag, value, low=spec.low, high=spec.high, high_open=spec.high_open, whole=spec.whole,
                         hint=spec.hint)


def resume_record(opts) -> dict:
    """{flag: value} of every option a checkpoint records (SAME and FREE)."""
    return {spec.flag: getattr(opts, f.name) for f, spec in declared(opts) if spec.resume}


def free_options(cls) -> tuple[str, ...]:
    """The flags a resumed run may change."""
    return tuple(spec.flag for _, spec in declared(cls) if spec.resume == FREE)


def command_line(opts, names) -> list[str]:
    """The flags that give the options `names` of `opts` to its command, in declaration order:
    a switch as its flag (or its --no- form), a list option once per item or comma-joined
    where it is typed as one; None left out."""
    args = []
    for f, spec in declared(opts):
        value, flag = getattr(opts, f.name), spec.flag
        if f.name not in names or value is None:
            continue
        if isinstance(value, bool):
            negative = spec.flags[0].partition("/")[2]
            args += [flag] if value else ([negative] if negative else [])
        elif isinstance(value, (tuple, list)) and spec.parse is None:
            args += [a for item in value for a in (flag, str(item))]
        elif isinstance(value, (tuple, list)):
            args += [flag, ",".join(map(str, value)) or "none"]
        else:
            args += [flag, str(value)]
    return args


def _plain(value):
    """A value as YAML writes it: tuples as lists."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_values(opts) -> dict:
    """The resolved options a run writes to config.yaml, by field name."""
    return {f.name: _plain(getattr(opts, f.name)) for f, spec in declared(opts) if spec.replay}


def config_yaml(opts, command: str) -> bytes:
    import yaml

    head = (f"# The resolved options that made this output. Replay them with:\n"
            f"#   xkd {command} --config config.yaml [--out NEW] [more flags override the file]\n")
    return (head + yaml.safe_dump(config_values(opts), sort_keys=False, allow_unicode=True)).encode()


def read_config(path, cls) -> dict:
    """The options a --config file gives, by field name, in the field's type. Unknown names,
    wrong types and unreadable files are one paragraph naming the file and the key."""
    import yaml

    where = f"--config {path}"
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise BadInput(f"{where}: cannot read it ({e.strerror or e}). Give the config.yaml a run wrote.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise BadInput(f"{where}{line}: not YAML ({getattr(e, 'problem', None) or e}). Give the config.yaml a run wrote.") \
            from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise BadInput(f"{where}: holds a {type(data).__name__}, not a mapping of option names to values.")
    known = {f.name: (f, spec) for f, spec in declared(cls)}  # a file may give any option; runs write the replay ones
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = str(name).replace("-", "_")
        if key not in known:
            raise BadInput(f"{where}: {name!r} is not an option of this command (its options: {', '.join(known)}).")
        values[key] = as_field_type(value, hints[key], f"{where}: {name}")
    return values


def as_field_type(value, tp, where: str):
    """`value` (from YAML or the command line) in the field's type `tp`: lists become tuples
    where the field holds a tuple; a wrong type is one paragraph naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return as_field_type(value, inner[0], where) if len(inner) == 1 else value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise BadInput(f"{where}: give a list, not {value!r}.")
        return origin(as_field_type(v, args[0], where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise BadInput(f"{where}: give a mapping of names to values, not {value!r}.")
        return {str(k): v for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        wanted = {int: "a whole number", float: "a number", str: "text", bool: "true or false"}[tp]
        raise BadInput(f"{where}: give {wanted}, not {value!r}.")
    return value


def comma_list(value: str | None, flag: str, allowed=None, cast=str) -> tuple:
    """"0,6,12" -> (0, 6, 12): an option that takes a comma-separated list (repeats dropped)."""
    if value is None or value == "":
        return ()
    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        items = [cast(v) for v in items]
    except ValueError:
        raise BadInput(f"{flag} {value!r}: give a comma-separated list, e.g. {flag} 3,6.") from None
    if allowed is not None and (bad := [v for v in items if v not in allowed]):
        raise BadInput(f"{flag}: {bad} not allowed; choose from {', '.join(allowed)}.")
    return tuple(dict.fromkeys(items))
