"""The `xkd` command: parses options, calls one function per command, prints the result.

No work happens here. Each command imports its layer lazily so `xkd --help` is instant.
Errors that users can act on (XkdError) print as one paragraph with exit code 1 (the work
failed) or 2 (bad usage or input); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import XkdError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Cross-lingual knowledge distillation: cache teachers once, train many students.",
)


def emit_json(obj: dict) -> None:
    """The last line of stdout under --json: one object naming what the command wrote."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except XkdError as e:
            typer.echo(f"xkd {fn.__name__.replace('_cmd', '').replace('_', '-')}: error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; finished shards are kept and a re-run resumes.", err=True)
            raise typer.Exit(130) from None

    return wrapper


JsonOpt = typer.Option(False, "--json", help="Print one JSON object as the last line of stdout.")


@app.command("inspect")
@user_errors
def inspect_cmd(
    cache: Path = typer.Argument(..., help="A cache directory (holds manifest.json)."),
    as_json: bool = JsonOpt,
):
    """What a cache holds: rows, tokens, masked positions, outputs, bytes per position, languages."""
    from .storage import format_inspect, inspect_cache

    info = inspect_cache(cache)
    emit_json(info) if as_json else typer.echo(format_inspect(info))


@app.command("verify")
@user_errors
def verify_cmd(
    cache: Path = typer.Argument(..., help="A cache directory (holds manifest.json)."),
    as_json: bool = JsonOpt,
):
    """Check every shard's checksums, schema and offsets. Exits 1 naming each bad shard."""
    from .storage import format_problems, verify_cache

    report = verify_cache(cache)
    if as_json:
        emit_json(report)
    elif report["ok"]:
        typer.echo(f"{cache}: ok ({report['shards_checked']} shards, checksums, schema and offsets verified)")
    if not report["ok"]:
        typer.echo(
            f"xkd verify: {cache} is damaged.\n{format_problems(report)}\nRe-run the command that made the "
            "cache: it rewrites only the damaged or missing shards.",
            err=True,
        )
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
