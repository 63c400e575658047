"""Is a saved model's weight file whole? Checked from headers and sizes alone (cheap), before
a teacher goes to the dask workers or a student is loaded: a truncated download otherwise
surfaces as a deserialisation traceback deep in transformers (or, on workers, as retries).
A leaf, shared by the pipeline (teachers) and the students; it imports nothing of xkd but the
JSON parser for untrusted files (storage.untrusted, itself a leaf).
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

from .storage.untrusted import parse_json

# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                      "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


def safetensors_problem(file: Path) -> str | None:
    """A .safetensors file is an 8-byte header length, a JSON header giving each tensor's
    dtype, shape and byte range, then the data: why the file cannot be whole, or None."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"it has {size} bytes, less than its 8-byte header length"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return f"its header should take {n:,} bytes but the file has {size:,}"
        try:
            header = parse_json(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"its header is not valid JSON ({e})"
    end = 0
    try:
        for tensor, info in header.items():
            if tensor == "__metadata__":
                continue
            begin, stop = (int(x) for x in info["data_offsets"])
            width = SAFETENSORS_DTYPES.get(info["dtype"])
            if width is not None and stop - begin != width * math.prod(int(d) for d in info["shape"]):
                return (f"tensor {tensor!r} has {stop - begin} bytes in the header, but its dtype and shape need "
                        f"{width * math.prod(info['shape'])}")
            end = max(end, stop)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        return f"its header does not describe tensors ({type(e).__name__}: {e})"
    if size != 8 + n + end:
        return f"its header implies {8 + n + end:,} bytes, the file has {size:,}"
    return None


def torch_bin_problem(file: Path) -> str | None:
    """A PyTorch .bin file: a zip archive keeps its directory at the end, so a truncated one
    has none; a legacy (pre-zip) file must at least be more than a stub."""
    if zipfile.is_zipfile(file):
        try:
            with zipfile.ZipFile(file) as z:
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            return f"its zip directory cannot be read ({e})"
        return None
    if file.stat().st_size < 1024:  # neither a zip (torch >= 1.6) nor big enough for legacy weights
        return f"it has {file.stat().st_size} bytes: not a PyTorch weights file"
    return None


def weights_problem(path: Path) -> tuple[Path, str] | None:
    """The first weight file of a saved-model directory that cannot be whole, and why; an
    index (*.index.json) must name files that are there. None when all look whole."""
    path = Path(path)
    for file in sorted(path.glob("*.safetensors")):
        if (problem := safetensors_problem(file)) is not None:
            return file, problem
    for file in sorted(path.glob("pytorch_model*.bin")):
        if (problem := torch_bin_problem(file)) is not None:
            return file, problem
    for file in sorted(path.glob("*.index.json")):
        try:
            index = parse_json(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return file, f"it is not valid JSON ({e})"
        shards = set((index.get("weight_map") or {}).values()) if isinstance(index, dict) else set()
        outside = sorted(str(s) for s in shards if not _inside(path, path / str(s)))
        if outside:  # transformers would load (and unpickle) whatever the entry points to
            return file, (f"it names weight files outside {path}: {', '.join(outside[:3])}; a model's weights are "
                          "loaded from its own directory only")
        missing = sorted(s for s in shards if not (path / str(s)).is_file())
        if missing:
            return file, f"it names weight files that are not there: {', '.join(missing[:3])}"
    return None


def _inside(root: Path, path: Path) -> bool:
    root, path = root.resolve(), path.resolve()
    return path == root or root in path.parents


def _index_listed(path: Path) -> list[Path]:
    """The weight files an index (*.index.json) lists: a sharded model's, whatever their names."""
    listed = set()
    for file in path.glob("*.index.json"):
        try:
            index = parse_json(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue  # weights_problem names a damaged index
        if isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
            listed.update(path / str(name) for name in index["weight_map"].values())
    return sorted(listed)


def loaded_weight_files(path: Path) -> list[Path]:
    """The weight files transformers loads from a saved-model directory: the safetensors ones
    when there are any (it then ignores *.bin), else the PyTorch ones."""
    path = Path(path)
    found = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    return sorted({*found, *(f for f in _index_listed(path) if f.is_file() and _inside(path, f))})


def safe_load_problem(path: Path) -> tuple[Path, str] | None:
    """The first weight file the safe loaders refuse, and why (a clause): safetensors' own header parser,
    and torch.load(weights_only=True), which refuses a pickle naming anything but tensors and
    plain containers (any other object could run code as it is unpickled). Cheap: a header, or
    a memory-mapped load. Checked before a model is loaded, so a refusal is one paragraph here
    rather than a traceback deep in transformers (or, on dask workers, one per retry)."""
    for file in loaded_weight_files(path):
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), "np"):
                    pass
            else:
                import torch

                torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
        except Exception as e:  # each loader raises its own types; all mean "refused"
            message = str(e)
            unsupported = re.search(r"Unsupported global: [^\n.]*", message)
            reason = unsupported.group(0) if unsupported else (message.strip().split("\n")[0] or type(e).__name__)
            if file.suffix == ".safetensors":
                return file, f"the safetensors loader refuses it ({reason})"
            return file, (f"the safe loader (torch.load with weights_only) refuses it ({reason}): it holds Python "
                          "objects besides tensors, and unpickling them could run code, so xkd does not load it")
    return None


def custom_code_problem(path: Path) -> tuple[Path, str] | None:
    """The file of a saved-model directory that asks for the model's own Python code
    (`auto_map` in config.json or tokenizer_config.json: transformers' trust_remote_code),
    and what it names. xkd never runs such code, and loading the model without it would build
    another model than its author meant; asked first, transformers would also prompt on stdin."""
    for name in ("config.json", "tokenizer_config.json"):
        file = Path(path) / name
        try:
            config = parse_json(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent or unreadable: the readers of the file say so
            continue
        if isinstance(config, dict) and config.get("auto_map"):
            auto_map = config["auto_map"]
            named = ", ".join(f"{k}: {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) else str(auto_map)
            return file, named
    return None


def _size(config: dict, *names: str) -> int:
    """The first of `names` config.json gives as a positive whole number; 0 if none."""
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def config_size_problem(path: Path, config: dict) -> str | None:
    """config.json's sizes against what the weight files can hold, in words, or None.

    transformers builds a model from its config, allocating every matrix, before it loads
    the weights into it: a config claiming a vocab_size of 10**9, a hidden_size of 10**6 or
    num_labels of 10**9 died in the allocator (or swapped the machine to a halt). So every
    number that sizes a matrix counts: the embeddings (vocab, positions and token types x
    embedding width), per distinct layer four width x width attention matrices and two
    width x intermediate ones, and the classifier head (num_labels x width). No weight takes
    less than half a byte (4-bit packing)."""
    files = loaded_weight_files(path)
    if not files:
        return None  # no weights: the readers of the directory say so
    stored = sum(f.stat().st_size for f in files)
    width = _size(config, "hidden_size", "dim", "d_model")
    embedding = _size(config, "embedding_size") or width
    layers = _size(config, "num_hidden_groups", "num_hidden_layers", "n_layers")
    intermediate = _size(config, "intermediate_size", "hidden_dim", "d_ff", "ffn_dim")  # DistilBERT: hidden_dim
    matrices = [(f"vocab_size {_size(config, 'vocab_size'):,}", _size(config, "vocab_size"), embedding),
                (f"max_position_embeddings {_size(config, 'max_position_embeddings', 'n_positions'):,}",
                 _size(config, "max_position_embeddings", "n_positions"), embedding),
                (f"type_vocab_size {_size(config, 'type_vocab_size'):,}", _size(config, "type_vocab_size"), embedding),
                (f"num_labels {_size(config, 'num_labels'):,}", _size(config, "num_labels"), width),
                (f"{layers:,} layer(s) of 4 x width", layers * 4 * width, width),
                (f"{layers:,} layer(s) of 2 x intermediate_size {intermediate:,}", layers * 2 * intermediate, width)]
    implied = sum(rows * columns for _, rows, columns in matrices)
    if implied <= 2 * stored:
        return None
    largest = sorted((rows * columns, f"{what} x width {columns:,}") for what, rows, columns in matrices if rows)[::-1]
    return (f"its config.json describes a model of at least {implied:,} weights (largest: "
            f"{'; '.join(what for _, what in largest[:3])}), but its weight files hold {stored:,} bytes, at most "
            f"{2 * stored:,} weights: the config does not belong to these weights")


def load_error_reason(error: Exception) -> str:
    """A transformers load failure in one line: its first line, or what it means where that
    line points at a report transformers logged (and xkd keeps quiet)."""
    message = str(error).strip()
    if "ignore_mismatched_sizes" in message:
        return "the shapes of its weights differ from those its config.json describes"
    return f"{type(error).__name__}: {message.split(chr(10))[0]}" if message else type(error).__name__
