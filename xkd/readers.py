"""The reading rules that the pipeline's corpora and evaluation's task data share, so that a
labeled line, a label or a dataset's column means the same whichever command reads it
(`xkd cache-teachers --corpus labeled:...` and `xkd evaluate --train labeled:...` alike).
A leaf: it imports nothing of xkd but errors and lines.

Messages name where the data came from with `source`, as the command was given it:
"--corpus 'hf:...'" for the pipeline, "--train 'labeled:...'" for task data.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import BadInput

# Line files -----------------------------------------------------------------------------


def text_lines(path, what: str, fix: str) -> list[str]:
    """The lines of a UTF-8 text file, split as every command splits lines (xkd.lines: on "\\n"
    only: splitlines() also splits at U+2028, U+0085 and the like inside a sentence or a
    token). A missing, non-UTF-8 or empty file is one paragraph naming it as `what` ("vocab
    file", "--src"); `fix` says what the file should hold."""
    from .lines import read_lines

    if not Path(path).is_file():
        raise BadInput(f"{what} {path} does not exist (or is not a file).")
    try:
        lines = read_lines(path)
    except UnicodeDecodeError as e:
        raise BadInput(f"{what} {path} is not UTF-8 (byte {e.start}). {fix}") from None
    if not lines:
        raise BadInput(f"{what} {path} is empty. {fix}")
    return lines


# Labeled lines --------------------------------------------------------------------------


def tab_fields(line: str, counts: tuple[int, ...], layout: str) -> tuple[list[str], str]:
    """(the tab-separated fields of a line, "" or what is wrong with their number). `counts`
    are the numbers of fields allowed, `layout` names them: "text<TAB>label"."""
    fields = line.split("\t")
    if len(fields) in counts:
        return fields, ""
    return fields, f"expected {' or '.join(map(str, counts))} tab-separated fields ({layout}), found {len(fields)}"


# Class labels ---------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
# The cache stores class ids as int32 (the class_label column); -1 means "no label".
MAX_CLASS_ID = 2**31 - 1


def _too_large(label: str | int, where: str) -> BadInput:
    return BadInput(f"{where}: label {label} is not a usable class id: class ids are 0, 1, ... up to at most "
                    f"{MAX_CLASS_ID:,} (the cache stores them as 32-bit integers). Labels are class names or ids of "
                    "a classification task; regression targets are not supported.")


def check_label(label: str, where: str) -> str:
    """A label as written in a labeled file: a class name, or a class id (an integer >= 0)."""
    if not label:
        raise BadInput(f"{where}: the label (after the tab) is empty. Each line is text<TAB>label, the label "
                       "a class name (e.g. sports) or a class id (0, 1, ...).")
    if label.isdigit():
        if int(label) > MAX_CLASS_ID:
            raise _too_large(label, where)
        return str(int(label))
    if _NUMBER.fullmatch(label):
        raise BadInput(f"{where}: label {label!r} is a number but not a class id (an integer >= 0). Labels are "
                       "class names (e.g. sports) or class ids 0, 1, ...; regression targets are not supported.")
    return label


def class_names(labels: set[str], where: str) -> tuple[str, ...]:
    """The class names of a corpus's labels (each as check_label returns it), sorted: class
    id i is names[i]; () when every label is a class id. A mix of both is refused, whether
    the labels come from a labeled file or a dataset's column: "1" in a column of names
    would silently become class 0."""
    ids = {n for n in labels if n.isdigit()}
    if ids and ids != labels:
        raise BadInput(
            f"{where} mixes class ids ({', '.join(sorted(ids, key=int)[:3])}) and class names "
            f"({', '.join(sorted(labels - ids)[:3])}) as labels. Use one kind: names (sports, food, ...; class id = "
            "position in sorted order) or ids 0, 1, ...."
        )
    return () if ids else tuple(sorted(labels))


def class_id(label: str, label_names: tuple[str, ...], where: str) -> int:
    label = check_label(label, where)
    if not label_names:
        return int(label)
    try:
        return label_names.index(label)
    except ValueError:
        raise BadInput(f"{where}: label {label!r} was not in the file when it was planned "
                       f"({', '.join(label_names)}); the file changed. Re-run the command.") from None


# datasets -------------------------------------------------------------------------------


def load_hf_dataset(dataset: str, config: str, split: str, source: str):
    """A local file (json, jsonl, csv, parquet), a directory written by save_to_disk, or a hub
    dataset (online, or already in the datasets cache)."""
    import datasets

    path = Path(dataset).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise BadInput(f"{source}: no split {split!r}; it has {sorted(ds)} (use --split).")
                ds = ds[split]
            return ds
        if path.is_file():
            builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(path.suffix.lstrip("."))
            if builder is None:
                raise BadInput(f"{source}: {path} is not a .json, .jsonl, .csv or .parquet file.")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        return datasets.load_dataset(dataset, config or None, split=split)
    except BadInput:
        raise
    except Exception as e:  # the datasets library raises many types; all mean "cannot load"
        raise BadInput(f"{source}: the dataset cannot be loaded ({type(e).__name__}: {e}).") from None


def check_columns(ds, columns, source: str) -> None:
    missing = [c for c in columns if c and c not in ds.column_names]
    if missing:
        raise BadInput(f"{source}: the dataset has no column {missing[0]!r}; its columns are {ds.column_names}.")


def cell_text(value, where: str) -> str:
    """A text column's value, stripped; a missing value is an empty text (skipped and counted
    as such). `where`: "<source>: column 'text', row 7"."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise not_text(where, value, "text")
    return value.strip()


def not_text(where: str, value, wanted: str) -> BadInput:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return BadInput(
        f"{where} holds {type(value).__name__} {shown}, not {wanted}. xkd reads the text columns as strings: write "
        "the texts as strings in the file, or name the text column(s) in the spec, e.g. hf:FILE?text=COLUMN."
    )


def dataset_class_id(value, label_names: tuple[str, ...], where: str) -> int:
    """A dataset's label as a class id: a class name or id written as text, an integer, or a
    float that is one (JSON readers give 2.0 for 2); None or -1 for no label."""
    if value is None:
        return -1
    if isinstance(value, str):  # a string column: class names (or ids written as text)
        return class_id(value.strip(), label_names, where)
    number = int(value) if isinstance(value, float) and value.is_integer() else value
    if not isinstance(number, int):  # bool is an int: False/True are classes 0/1
        raise BadInput(f"{where}: label {value!r} ({type(value).__name__}) is not a class id (an integer >= 0) or a "
                       "class name; regression targets and multi-label lists are not supported.")
    if number < -1 or number > MAX_CLASS_ID:
        raise _too_large(value, where)
    return int(number)


def dataset_class_names(ds, label_column: str, source: str) -> tuple[str, ...]:
    """A dataset's class names in class-id order: a ClassLabel column's, or the sorted values
    of a string label column (class names, as in labeled files); () for integer ids."""
    if not label_column:
        return ()
    feature = ds.features.get(label_column)
    if getattr(feature, "names", None):
        return tuple(feature.names)
    where = f"{source}, column {label_column!r}"
    if str(getattr(feature, "dtype", "")).startswith("float"):
        # A CSV column of ids with a gap reads as floats; 2.5 is no class id (int() would make it 2).
        fraction = next((v for v in ds[label_column] if v is not None and v == v and v % 1), None)
        if fraction is not None:
            check_label(str(fraction), where)  # refuses it, as the same label in a labeled file
    if getattr(feature, "dtype", "") not in ("string", "large_string"):
        return ()
    values = {check_label(str(v).strip(), where) for v in ds[label_column] if v is not None}
    return class_names(values, f"{source}: the dataset's column {label_column!r}")
