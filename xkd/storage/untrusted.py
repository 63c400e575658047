"""Files xkd reads back from directories someone else may be able to write: a cache, a vocab,
a student run. Nothing read from them can run code, no link leads xkd out of them, and xkd
never deletes through a link. The policy, and why: docs/reliability.md, "Untrusted files".

Here, in storage, because every layer uses it and storage imports nothing of xkd but errors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import BadInput

POLICY = 'docs/reliability.md, "Untrusted files"'


def parse_json(text: str | bytes) -> object:
    """json.loads for text read from a file xkd may not have written. A document nested deeper than
    Python's stack (`[[[[...]]]]`) raises RecursionError in json; here it is a json.JSONDecodeError
    (a ValueError) like any other malformed file, so the caller's message names the file."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("arrays or objects nested too deeply to read", "", 0) from None


def is_inside(root: Path, path: Path) -> bool:
    """Whether `path`, every link and `..` resolved, is `root` or under it (`root` itself may be
    a link: the user named it)."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)


def require_inside(root: Path, path: Path, kind: str) -> Path:
    """`path` when it stays inside the `kind` directory `root`; else one paragraph naming it."""
    if not is_inside(root, path):
        raise BadInput(
            f"{path} leads to {os.path.realpath(path)}, outside the {kind} {root}: xkd does not follow links or `..` out "
            f"of a {kind}, since whoever can write the {kind} could point it at any file you can read ({POLICY}). "
            f"Replace the link with a copy of what it points to, or rebuild the {kind}."
        )
    return path


def refuse_links_out(root: Path, kind: str, under: Path | None = None) -> None:
    """Refuse any symbolic link under `under` (default: `root`) that leads outside `root`.
    Links are not descended into, so the walk costs one directory listing per directory."""
    for top, dirs, files in os.walk(under or root, followlinks=False):
        for name in (*dirs, *files):
            entry = Path(top) / name
            if entry.is_symlink():
                require_inside(root, entry, kind)


# What marks a directory xkd (or a model's author) wrote for something else: a cache written
# into one would mix with its files, and the owner's next --overwrite would delete the cache.
# Files only xkd writes, and a model's config beside its weights: a bare config.json or a
# checkpoints/ folder higher up (a home directory, a project) marks nothing.
OTHER_OUTPUTS = ((("xkd-vocab.json",), "a vocab"), (("xkd_student.json",), "a student"),
                 (("train_summary.json",), "a student run"),
                 (("config.json", "model.safetensors"), "a model (teacher or student)"),
                 (("config.json", "pytorch_model.bin"), "a model (teacher or student)"))


def refuse_out_inside_other_output(out: Path, option: str, markers=OTHER_OUTPUTS) -> None:
    """Refuse an `option` directory that is, or lies inside, a directory of another kind."""
    resolved = Path(out).resolve()
    for parent in (resolved, *resolved.parents):
        for files, kind in markers:
            if all((parent / name).exists() for name in files):
                raise BadInput(
                    f"{option} {out} is {'' if parent == resolved else 'inside '}{parent}, the directory of {kind} (it "
                    f"holds {' and '.join(files)}): what is written there would mix with its files, and rebuilding it "
                    f"(e.g. with --overwrite) would delete them. Give a directory of its own (e.g. caches/).")


def refuse_links(root: Path, names, kind: str) -> None:
    """Refuse any of `root`'s entries `names` that is a symbolic link, wherever it points: xkd
    writes and deletes there, and would change what the link points to."""
    for name in names:
        entry = root / name
        if entry.is_symlink():
            raise BadInput(
                f"{entry} is a symbolic link (to {os.readlink(entry)}) inside the {kind} directory, where xkd writes and "
                f"deletes: it never follows a link there, since pruning or rewriting through it would change files "
                f"outside the {kind} ({POLICY}). Remove the link, or move what it points to in its place."
            )


def remove_tree(path: Path) -> None:
    """Delete a directory tree, or a file. A link is removed itself, never what it points to
    (shutil.rmtree refuses a link with an error that names no path)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def load_id_table(path: Path, remedy: str) -> np.ndarray:
    """A 1-D integer .npy written by xkd (an id map), read without pickle. A damaged, truncated
    or foreign file is one paragraph naming it and saying `remedy`."""
    try:
        table = np.load(path, allow_pickle=False)
        problem = None if isinstance(table, np.ndarray) else "is not a single array"
    except ValueError as e:  # "Object arrays cannot be loaded when allow_pickle=False", a short read
        problem = ("holds pickled Python objects, which xkd never loads (unpickling can run code)" if "pickle" in str(e)
                   else f"is damaged ({e})")
    except (OSError, EOFError) as e:
        problem = f"cannot be read ({e})"
    if problem is None and (table.ndim != 1 or table.dtype.kind not in "iu"):
        problem = f"holds a {table.dtype} array of shape {table.shape}, not the 1-D integer table xkd writes"
    if problem is not None:
        raise BadInput(f"{path} {problem}; {remedy}")
    return table
