"""Is a saved model's weight file whole? Checked from headers and sizes alone (cheap), before
a teacher goes to the dask workers or a student is loaded: a truncated download otherwise
surfaces as a deserialisation traceback deep in transformers (or, on workers, as retries).
A leaf, shared by the pipeline (teachers) and the students; it imports nothing of xkd.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

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
            header = json.loads(f.read(n).decode("utf-8"))
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
            index = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            return file, f"it is not valid JSON ({e})"
        shards = set((index.get("weight_map") or {}).values()) if isinstance(index, dict) else set()
        missing = sorted(s for s in shards if not (path / str(s)).is_file())
        if missing:
            return file, f"it names weight files that are not there: {', '.join(missing[:3])}"
    return None
