"""manifest.json: what a cache holds, and the only thing that makes a shard visible.

A shard exists for readers once the manifest lists it as done; files in shards/ that the
manifest does not list are leftovers of an interrupted run and are ignored (and replaced by
the resumed run). The manifest is replaced atomically (temp file, fsync, rename), and holds
no timestamps, so an interrupted-then-resumed run ends with the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import numpy as np

from ..durable import atomic_write_bytes
from ..errors import BadInput, XkdError
from .completeness import finish_command
from .remote import is_url
from .schema import ALIGNS, CODECS, LAYOUTS, MAX_SAMPLE, SCHEMA_VERSION, TOPK_CODECS
from .untrusted import parse_json

MANIFEST = "manifest.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
LOCK = ".lock"
SHARDS = "shards"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cache_key(teacher: dict, corpus: dict, view: dict) -> str:
    """The content-derived identity of a cache: same inputs, same key, same directory.

    Callers put in everything that changes the bytes: teacher weights hash and tokenizer
    hash, the corpus fingerprint, and the view (max length, masking, seed, k, outputs).
    """
    payload = canonical_json({"schema": SCHEMA_VERSION, "teacher": teacher, "corpus": corpus, "view": view})
    return hashlib.sha256(payload).hexdigest()[:16]


def manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write_bytes(root / MANIFEST, manifest_bytes(manifest))


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of the cache at `root`, or a clear error saying why it is not a cache.

    Everything readers rely on is checked here, once, so that a damaged or hand-edited
    manifest is one paragraph naming the file in every command, never a KeyError deep in
    a reader.
    """
    if is_url(root):
        return _check_manifest(root, f"{root}/{MANIFEST}", _remote_manifest_text(root))
    root = Path(root)
    if not root.exists():
        raise BadInput(f"{root}: no such directory. Give the path of a cache directory (one with a {MANIFEST}).")
    path = root / MANIFEST
    if not root.is_dir() or not path.is_file():
        hint = ""
        if root.is_dir():
            found = sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))[:5]
            if found:
                hint = " It contains caches: " + ", ".join(str(p) for p in found) + "."
        raise BadInput(f"{root} is not an xkd cache: it has no {MANIFEST}.{hint}")
    try:
        text = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path} cannot be read ({e.strerror or e}).") from None
    return _check_manifest(root, path, text)


def _remote_manifest_text(root: str) -> bytes:
    from .remote import Remote

    try:
        return Remote(root).get(MANIFEST)
    except FileNotFoundError:
        raise BadInput(f"{root} is not an xkd cache: the object store has no {root}/{MANIFEST}. Give the URL of a cache "
                       "(cache-teachers writes each one under --out as <teacher>-<key>; `xkd ls --workspace URL` "
                       "lists them).") from None


def _check_manifest(root, path, text: bytes) -> dict:
    try:
        manifest = parse_json(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON ({e}). {_restore(root, None)}") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadInput(f"{path} has no integer schema_version: it is not an xkd manifest. {_restore(root, manifest)}")
    if version > SCHEMA_VERSION:
        raise XkdError(
            f"{path} was written with cache schema version {version}, but this xkd reads versions up "
            f"to {SCHEMA_VERSION}. Upgrade xkd (pip install -U xkd) to read this cache."
        )
    problem = manifest_problem(manifest)
    if problem:
        raise BadInput(f"{path} is not a valid xkd manifest: {problem}. {_restore(root, manifest)}")
    return manifest


def _restore(root: Path, manifest) -> str:
    """What to do about a bad manifest. xkd writes it only through atomic_write_bytes, so a
    bad one was changed by something else, and nothing in the shards can be trusted without
    it. The command that made the cache is quoted when the rest of the manifest records it."""
    command = None
    if isinstance(manifest, dict):
        try:
            command = finish_command(root, manifest)
        except Exception:  # a hint from a damaged manifest must never become another error
            command = None
    rerun = f" (`{command}`)" if command else ""
    return (
        "xkd only ever replaces the manifest atomically, so something else changed it, and without a sound "
        f"manifest the shards cannot be trusted. Delete the cache directory and re-run the command that made it{rerun}. "
        "(Or restore manifest.json from a copy, if you have one.)"
    )


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


# The most shards a cache may plan or hold. Commands build a list of the missing shard ids
# (completeness, verify's report), so an edited `planned_shards: 10**12` hung every command at
# 12 GB. A million shards hold two billion examples at the default --shard-size 2048, and
# cache-teachers refuses a plan with more (pipeline/run.py).
MAX_SHARDS = 10**6
# mask_epoch is stored as uint16: a cache cannot hold more maskings of one example.
MAX_MASK_EPOCHS = 2**16
# The most a compressed chunk expands when decoded: zstd's densest block (RLE, 4 bytes) holds
# 128 KiB, a 32768-fold expansion; lz4 stays under 256-fold.
MAX_EXPANSION = 2**16
# Tokens per row: segment starts are stored as uint16 (cache-teachers' --max-length bound).
MAX_LENGTH = 65535
# Token ids (top-k ids) are stored as uint32; no transformer is wider than 2**16.
MAX_TOKEN_ID = 2**32
MAX_WIDTH = 2**16


def _counts_problem(manifest: dict) -> str | None:
    """The manifest's numbers against each other and against the most a cache can hold.
    Nothing here reads a file: numbers that only the files can confirm (a shard's rows
    against its Parquet footer, a dense array's width against its chunks) are checked by the
    reader when it opens them."""
    planned = manifest.get("planned_shards")
    if planned is not None and planned > MAX_SHARDS:
        return f"`planned_shards` is {planned:,}, more than the {MAX_SHARDS:,} shards a cache can plan"
    corpus, view = manifest.get("corpus") or {}, manifest.get("view") or {}
    examples, records, shard_size = corpus.get("examples"), corpus.get("records"), view.get("shard_size")
    for where, value in (("corpus.examples", examples), ("corpus.records", records), ("view.shard_size", shard_size)):
        if value is not None and not _is_int(value, 1 if where == "view.shard_size" else 0):
            return f"`{where}` is {value!r}, not a count"
    if examples is not None and records is not None and examples > records:
        return f"`corpus.examples` is {examples:,}, more than the corpus's {records:,} records"
    if planned is not None and examples is not None and shard_size is not None:
        most = -(-examples // shard_size)  # each planned shard holds at least one example
        if planned > most:
            return (f"`planned_shards` is {planned:,}, but the corpus's {examples:,} examples in shards of {shard_size:,} "
                    f"make {most:,}")
    max_length = view.get("max_length")
    if max_length is not None and not (_is_int(max_length, 1) and max_length <= MAX_LENGTH):
        return f"`view.max_length` is {max_length!r}, not a token count from 1 to {MAX_LENGTH:,}"
    for name, spec in ((manifest.get("outputs") or {}).get("dense") or {}).items():
        # An attention output holds heads x max length values per token (padded, when read)
        if isinstance(spec, dict) and spec.get("layout") == "keys" and max_length is not None \
                and spec.get("dim") != spec.get("heads", 0) * max_length:
            return (f"`outputs.dense.{name}` has dim {spec.get('dim')!r}, not its {spec.get('heads')!r} heads x the "
                    f"view's max length {max_length}")
    epochs = (view.get("mask") or {}).get("epochs", 1) if isinstance(view.get("mask"), dict) else 1
    if not (_is_int(epochs, 1) and epochs <= MAX_MASK_EPOCHS):
        return f"`view.mask.epochs` is {epochs!r}, not a count from 1 to {MAX_MASK_EPOCHS:,} (mask_epoch is stored as uint16)"
    return _teacher_sizes_problem(manifest.get("teacher") or {}, (manifest.get("outputs") or {}).get("dense") or {})


def _teacher_sizes_problem(teacher: dict, dense: dict) -> str | None:
    """The teacher's sizes that readers size tables and heads by: its vocabulary (the map from
    its ids to the student's has a row per id) and its width (a method's projection to it)."""
    vocab = teacher.get("model_vocab_size")
    if vocab is not None and not (_is_int(vocab, 1) and vocab <= MAX_TOKEN_ID):
        return f"`teacher.model_vocab_size` is {vocab!r}, not a vocabulary size from 1 to {MAX_TOKEN_ID:,} (ids are uint32)"
    width = teacher.get("hidden_size")
    stored = {spec.get("dim") for name, spec in dense.items()  # hidden states and sentence vectors are teacher-wide
              if isinstance(spec, dict) and not name.startswith("attn.") and name != "class_logits"}
    if width is not None and not (_is_int(width, 1) and (width in stored if stored else width <= MAX_WIDTH)):
        bound = f"the width {sorted(stored)} of its dense outputs" if stored else f"a width from 1 to {MAX_WIDTH:,}"
        return f"`teacher.hidden_size` is {width!r}, not {bound}"
    return None


def _shard_counts_problem(where: str, record: dict, manifest: dict) -> str | None:
    """A finished shard's counts against each other, its file list and the view's numbers (see
    _counts_problem)."""
    if record["id"] >= MAX_SHARDS:
        return f"{where} has id {record['id']:,}, beyond the {MAX_SHARDS:,} shards a cache can hold"
    if record["masked"] > record["tokens"]:
        return f"{where} has {record['masked']:,} masked positions among only {record['tokens']:,} tokens"
    max_length = (manifest.get("view") or {}).get("max_length") or MAX_LENGTH  # checked by _counts_problem
    if record["tokens"] > record["rows"] * max_length:
        return (f"{where} has {record['tokens']:,} tokens, more than its {record['rows']:,} rows of at most "
                f"{max_length:,} tokens hold")
    in_langs = sum((record.get("langs") or {}).values())
    if in_langs > record["rows"]:  # at most: rows against the Parquet footer are the reader's check, below
        return f"{where} counts {in_langs:,} rows by language (`langs`), more than its {record['rows']:,} rows"
    # records 0 or absent: a writer outside the pipeline that did not count them (nothing is sized by the ids)
    ids, records = record.get("example_ids"), (manifest.get("corpus") or {}).get("records")
    if ids is not None and not (isinstance(ids, list) and len(ids) == 2 and all(_is_int(i) for i in ids)
                                and ids[0] <= ids[1] and (not records or ids[1] < records)):
        return (f"{where} has `example_ids` {ids!r}, not [first, last] of the corpus's "
                f"{f'{records:,} ' if records else ''}records")
    on_disk = sum(size for size, _ in record["files"].values())
    if record["bytes"] != on_disk:
        return f"{where} counts {record['bytes']:,} bytes, but its files add up to {on_disk:,}"
    return None  # rows: against the Parquet footer, by the reader and verify (a shard's damage, not the manifest's)


def manifest_problem(manifest: dict) -> str | None:
    """What is wrong with a parsed manifest's structure, in words; None if nothing."""
    for name in ("teacher", "corpus", "view", "outputs", "totals"):
        if manifest.get(name) is not None and not isinstance(manifest[name], dict):
            return f"`{name}` is not an object"
    planned = manifest.get("planned_shards")
    if planned is not None and not _is_int(planned):
        return f"`planned_shards` is {planned!r}, not a shard count"
    if not isinstance(manifest.get("complete", False), bool):
        return f"`complete` is {manifest['complete']!r}, not true or false"
    problem = _outputs_problem(manifest.get("outputs") or {}) or _counts_problem(manifest)  # counts: of sound outputs
    if problem:
        return problem
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        return "it has no `shards` list" if shards is None else "`shards` is not a list"
    seen: set[int] = set()
    for i, record in enumerate(shards):
        where = f"`shards` entry {i}"
        if not isinstance(record, dict):
            return f"{where} is not an object"
        if not _is_int(record.get("id")):
            return f"{where} has no shard id"
        where = f"the entry of shard {record['id']}"
        if record["id"] in seen:
            return f"shard {record['id']} is listed twice"
        seen.add(record["id"])
        if not isinstance(record.get("state"), str):
            return f"{where} has no state"
        for field in ("rows", "tokens", "masked", "bytes"):
            if not _is_int(record.get(field)):
                return f"{where} has no count `{field}`"
        if record["state"] != "done":
            continue  # only finished shards are read; an unfinished one counts as missing
        files = record.get("files")
        if not isinstance(files, dict) or not files or not isinstance(record.get("sha256"), str):
            return f"{where} lacks its file list or sha256"
        for name, entry in files.items():
            # A sha256 names the file's entry in a remote cache's local fetch cache (fetch.py): 64 hex
            # digits and nothing else, or an edited one could name a path outside that directory.
            if not (isinstance(entry, list) and len(entry) == 2 and _is_int(entry[0]) and isinstance(entry[1], str)
                    and _SHA256.fullmatch(entry[1])):
                return f"{where} records file {name} as {entry!r}, not [size, sha256 (64 hex digits)]"
            if name.startswith("/") or ".." in name.split("/"):
                return f"{where} names file {name}, which lies outside the cache"
        folder = record.get("dir")  # shards uploaded to object storage: shards/<id>-<digest>/ (shard.upload_shard)
        if folder is not None and folder != f"{record['id']:05d}-{record['sha256'][:16]}":
            return f"{where} names its folder {folder!r}, not {record['id']:05d}-<the first 16 digits of its sha256>"
        for field in ("bytes_by_output", "langs"):
            value = record.get(field)
            if value is not None and not (isinstance(value, dict) and all(_is_int(v) for v in value.values())):
                return f"{where} has a `{field}` that is not an object of counts"
        problem = _shard_counts_problem(where, record, manifest) or _dense_size_problem(where, record, manifest)
        if problem:
            return problem
    return None


def _dense_size_problem(where: str, record: dict, manifest: dict) -> str | None:
    """Each dense output's width against the bytes its files hold in this shard: a method
    sizes its heads by it (an edited dim of 10**9 allocated a 128 GB projection). An array
    holds at least rows (tokens; one word) x dim values, and no chunk expands more than
    MAX_EXPANSION-fold when decoded (uncompressed: not at all). The arrays' zarr.json must
    give the same width (Cache checks it on open)."""
    name_prefix = f"{record['id']:05d}.zarr/"
    for name, spec in ((manifest.get("outputs") or {}).get("dense") or {}).items():
        # a row holds at least one token, and a shard with rows at least one word
        entries = {"row": record["rows"], "token": record["tokens"], "word": min(record["rows"], 1)}[spec["align"]]
        if spec.get("layout", "padded") == "keys" or not entries:  # keys: heads x max length, bound above
            continue
        stored = sum(size for rel, (size, _) in record["files"].items() if rel.startswith(f"{name_prefix}{name}/"))
        expansion = 1 if spec.get("codec", "zstd") == "none" else MAX_EXPANSION
        needed = entries * spec["dim"] * np.dtype(spec["dtype"]).itemsize
        if needed > stored * expansion:
            return (f"`outputs.dense.{name}` has dim {spec['dim']:,}, but {where}'s {entries:,} {spec['align']}(s) of it "
                    f"would take {needed:,} bytes, more than its {stored:,} bytes of files can hold")
    return None


def _outputs_problem(outputs: dict) -> str | None:
    topk = outputs.get("topk")
    if topk is not None and not (isinstance(topk, dict) and _is_int(topk.get("k"), 1)):
        return f"`outputs.topk` is {topk!r}, not {{\"k\": K, ...}}"
    if topk is not None and topk.get("codec", "fp16") not in TOPK_CODECS:
        return f"`outputs.topk.codec` is {topk['codec']!r}, not one of {', '.join(TOPK_CODECS)}"
    sample = outputs.get("sample")
    if sample is not None and not (isinstance(sample, dict) and _is_int(sample.get("n"), 1) and sample["n"] <= MAX_SAMPLE
                                   and _is_int(sample.get("seed"), 0)):
        return f"`outputs.sample` is {sample!r}, not {{\"n\": N (1 to {MAX_SAMPLE}), \"seed\": S, ...}}"
    dense = outputs.get("dense") or {}
    if not isinstance(dense, dict):
        return "`outputs.dense` is not an object"
    for name, spec in dense.items():
        if not (isinstance(spec, dict) and spec.get("align") in ALIGNS and _is_int(spec.get("dim"), 1)
                and isinstance(spec.get("dtype"), str)):
            return f"`outputs.dense.{name}` is {spec!r}, not {{\"align\": row|token|word, \"dim\": N, \"dtype\": ...}}"
        try:
            np.dtype(spec["dtype"])
        except TypeError:
            return f"`outputs.dense.{name}` has dtype {spec['dtype']!r}, which is not a numpy dtype"
        if spec.get("codec", "zstd") not in CODECS:
            return f"`outputs.dense.{name}` has codec {spec['codec']!r}, not one of {', '.join(CODECS)}"
        layout = spec.get("layout", "padded")
        if layout not in LAYOUTS:
            return f"`outputs.dense.{name}` has layout {layout!r}, not one of {', '.join(LAYOUTS)}"
        if layout == "keys" and not (spec["align"] == "token" and _is_int(spec.get("heads"), 1)
                                     and spec["dim"] % spec["heads"] == 0):
            return f"`outputs.dense.{name}` has the keys layout without token alignment and heads dividing its dim"
    return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host still exists (another user's process counts): what a
    writer that died leaves behind, named after its pid, may then be removed or taken over."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirLock:
    """An exclusive, non-blocking lock on what one process writes (a cache, a student's
    --out, a vocab), held for as long as it writes: a second writer is refused, naming the
    first by its pid.

    flock is released by the kernel when the holder dies, even by SIGKILL, so a killed writer
    never leaves a stale lock behind. `refusal(holder)` is the message of the refusal
    ("pid N on HOST" is the holder). With `remove=True` the lock file is deleted on release
    (it would otherwise stay in a student's directory); acquire then checks that the file it
    locked is still the one at `path`, as a file unlinked by the previous holder between our
    open and our flock would give two holders.
    """

    def __init__(self, path: Path, refusal, *, remove: bool = False):
        self.path = Path(path)
        self._refusal = refusal
        self._remove = remove
        self._fd: int | None = None

    def acquire(self) -> "DirLock":
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise XkdError(self._refusal(self.holder())) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file we locked: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._fd = fd
        return self

    def _open(self) -> int:
        """Open (or create) the lock file itself, never what a link or a second name leads to:
        acquire writes "pid N on host" into it, which written through a planted link (or a hard
        link) would overwrite a file outside the run."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            fd = None
        if fd is not None:
            info = os.fstat(fd)
            if stat.S_ISREG(info.st_mode) and info.st_nlink <= 1:  # 0: the previous holder removed it (acquire retries)
                return fd
            os.close(fd)
        raise BadInput(
            f"{self.path} is a link or not a plain file, where xkd keeps its lock file; xkd writes into its lock, "
            "so it never opens one that leads elsewhere (writing through it would change a file outside this "
            f"directory). Check what {self.path} points to, remove it (rm {self.path}), and run again.")

    def holder(self) -> str:
        """Who holds the lock, as its file says ("unknown" in the instant before it says)."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            if self._remove:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


class CacheLock(DirLock):
    """The lock of a cache being written (cache-teachers, remap): one writer per cache."""

    def __init__(self, root: Path):
        root = Path(root)
        super().__init__(root / LOCK, lambda holder: (
            f"{root} is being written by another xkd process ({holder}). Two writers on one cache would "
            "interleave shards; wait for it to finish, or stop it and re-run (the re-run resumes)."))
