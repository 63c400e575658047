"""Corpus readers, cleaning and sharding (docs/design.md, "Stage one", step 1).

A corpus is read as a sequence of records in file order. Record i has position i (its
0-based line number, or its row index in a `datasets` dataset), and its example id IS that
position: stable across runs, cleaning options and teachers, so caches of one corpus made by
different teachers join on it.

Planning reads the whole corpus once, lazily (one record at a time), to fingerprint it,
apply the cleaning rules, count what is skipped and why, and remember where each shard
starts and ends (a byte offset per file) and the sha256 of those bytes. A shard task then
reads only its own byte range and checks it against that sha256 before it parses a line, so
no process ever holds the corpus, shard i always holds the same examples whichever worker
reads it, and a file that changed after planning (its cache key names the old bytes) fails
the shard naming the file instead of caching other text under the old key.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Iterator, NoReturn

from ..errors import BadInput
from ..lines import strip_line_end
from ..names import CorpusSpec, language_code, normalize_language
from ..readers import (
    cell_text,
    check_columns,
    check_label,
    class_id,
    class_names,
    dataset_class_id,
    dataset_class_names,
    load_hf_dataset,
    not_text,
    tab_fields,
)
from ..storage.shard import sha256_file

SAMPLE_FILE = "sample.en-hi.tsv"
SAMPLE_LANGS = ("en", "hi")

# Why a record was not used; each is counted in the plan and the run's summary.
SKIP_REASONS = ("empty", "invalid_utf8", "malformed", "length", "cap")
_HF_CHUNK = 1000


@dataclass(frozen=True)
class Cleaning:
    """Which records become examples. Lengths count whitespace-separated tokens on every side
    of a record, so the same examples survive whatever the teacher's tokenizer (MMKD keeps
    pairs of 10-128 tokens: min_tokens=10, max_tokens=128). max_pairs caps the examples of the
    corpus (one language pair per corpus): the first max_pairs kept records are used."""

    min_tokens: int = 0
    max_tokens: int = 0  # 0: no upper bound
    max_pairs: int = 0  # 0: no cap
    skip_bad_lines: bool = False  # invalid UTF-8 / malformed TSV lines: skip and count, or fail

    def __post_init__(self):
        for name in ("min_tokens", "max_tokens", "max_pairs"):
            if getattr(self, name) < 0:
                raise BadInput(f"--{name.replace('_', '-')} must be >= 0, not {getattr(self, name)}.")
        if self.max_tokens and self.min_tokens > self.max_tokens:
            raise BadInput(f"--min-tokens {self.min_tokens} is above --max-tokens {self.max_tokens}: nothing would be kept.")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Example:
    example_id: int
    texts: tuple[str, ...]  # (text,) for monolingual corpora, (src, tgt) for parallel ones
    label: int = -1
    texts_b: tuple[str, ...] = ()  # sentence pairs: each side's second segment, as texts; () otherwise


@dataclass(frozen=True)
class Cursor:
    """Where a record starts: its position, and its byte offset in each file (files only)."""

    position: int = 0
    offsets: tuple[int, ...] = ()


@dataclass
class Record:
    position: int
    cursor: Cursor
    texts: tuple[str, ...] | None
    reason: str = ""  # a SKIP_REASONS entry found while reading ("" if readable)
    detail: str = ""  # for the error message when bad lines are not skipped
    label: int = -1
    end: tuple[int, ...] = ()  # byte offset after the record, per file (files only)
    raw: tuple[bytes, ...] = ()  # the record's lines as read, per file (files only)
    texts_b: tuple[str, ...] = ()  # sentence pairs: the second segment of each side


# Sources -------------------------------------------------------------------------------


@dataclass
class Source:
    """A readable corpus: files (text, labeled, pairs, parallel, tsv, sample) or a `datasets`
    dataset. Picklable and small: shard tasks receive it and open the files themselves.

    Sentence pairs (`pairs:` files, or a dataset with two text columns) are one record each:
    an example is both segments, which every teacher reads as one input in its own pair
    template. A `pairs:` corpus of two files is parallel: line i of the second file is the
    translation of line i of the first, pair for pair (XNLI's translated training sets)."""

    kind: str
    langs: tuple[str, ...]
    paths: tuple[str, ...] = ()
    dataset: str = ""
    config: str = ""
    split: str = "train"
    spec: str = ""
    label_names: tuple[str, ...] = ()  # labeled files with class names: class id i is label_names[i]
    labels_sha256: str = ""  # sha256 of the labeled file the class names were read from
    columns: tuple[str, ...] = ()  # datasets: the text column(s) named in the spec (two: pairs)
    label_column: str = ""  # datasets: the label column named in the spec

    @property
    def parallel(self) -> bool:
        return len(self.langs) == 2

    @property
    def has_pairs(self) -> bool:
        return self.kind == "pairs" or (self.kind == "hf" and len(self.columns) == 2)

    def fingerprint(self, file_sha256: list[str] | None = None) -> str:
        """sha256 of the files' bytes (names and places do not count), or the dataset's own
        fingerprint (the `datasets` library's hash of its data and processing).
        `file_sha256`: the files' sha256 as planning read them (else the files are read)."""
        h = hashlib.sha256(f"{self.kind}\0".encode())
        if self.kind == "hf":
            h.update(f"{self._dataset._fingerprint}\0{self.split}".encode())
            if self.columns or self.label_column:  # which columns are read is part of what the corpus is
                h.update(f"\0{self.columns}\0{self.label_column}".encode())
            return h.hexdigest()
        for digest in file_sha256 or [sha256_file(Path(p)) for p in self.paths]:
            h.update(digest.encode() + b"\0")
        return h.hexdigest()

    def records(self, start: Cursor = Cursor()) -> Iterator[Record]:
        if self.kind == "hf":
            return self._hf_records(start)
        return self._file_records(start)

    # Files ------------------------------------------------------------------------------
    def _file_records(self, start: Cursor) -> Iterator[Record]:
        offsets = start.offsets or (0,) * len(self.paths)
        files = [open(p, "rb", buffering=1 << 20) for p in self.paths]
        try:
            for f, off in zip(files, offsets):
                f.seek(off)
            yield from self.records_from(files, start)
        finally:
            for f in files:
                f.close()

    def records_from(self, files: list, start: Cursor) -> Iterator[Record]:
        """Records from binary file objects positioned at `start` (open files, or a shard's
        checked bytes). Lines end at b"\\n" only (xkd.lines)."""
        split_tab = self.kind in ("tsv", "sample", "labeled", "pairs")
        offsets = list(start.offsets or (0,) * len(self.paths))
        position = start.position
        while True:
            lines = [f.readline() for f in files]
            ended = [not line for line in lines]
            if all(ended):
                return
            if any(ended):
                short, long_ = (0, 1) if ended[0] else (1, 0)
                raise BadInput(
                    f"parallel corpus {self.spec!r}: {self.paths[short]} has {position} lines but "
                    f"{self.paths[long_]} has more (line {position + 1} has no partner). The two files "
                    "must be line-aligned: line i of one is the translation of line i of the other."
                )
            cursor = Cursor(position, tuple(offsets))
            for i, line in enumerate(lines):
                offsets[i] += len(line)
            record = self._decode(position, cursor, lines, split_tab)
            record.end, record.raw = tuple(offsets), tuple(lines)
            yield record
            position += 1

    def _decode(self, position: int, cursor: Cursor, lines: list[bytes], split_tab: bool) -> Record:
        texts = []
        for path, raw in zip(self.paths, lines):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                detail = (
                    f"{path}, line {position + 1}: not valid UTF-8 (byte {e.start} of the line is "
                    f"0x{raw[e.start]:02x})"
                )
                return Record(position, cursor, None, "invalid_utf8", detail)
            if position == 0:
                text = text.removeprefix("\ufeff")
            texts.append(strip_line_end(text))
        if self.kind == "pairs":
            return self._decode_pairs(position, cursor, texts)
        if split_tab:
            fields, problem = tab_fields(texts[0], (2,), "text<TAB>label" if self.kind == "labeled" else "source<TAB>target")
            if problem:
                return Record(position, cursor, None, "malformed", f"{self.paths[0]}, line {position + 1}: {problem}")
            if self.kind == "labeled":
                label = class_id(fields[1].strip(), self.label_names, f"{self.paths[0]}, line {position + 1}")
                return Record(position, cursor, (fields[0].strip(),), label=label)
            texts = fields
        return Record(position, cursor, tuple(t.strip() for t in texts))

    def _decode_pairs(self, position: int, cursor: Cursor, lines: list[str]) -> Record:
        """text_a<TAB>text_b[<TAB>label] in each file; a label in the second file of a
        parallel pair corpus must be the first file's (the translation keeps the label)."""
        firsts, seconds, labels = [], [], []
        for path, line in zip(self.paths, lines):
            fields, problem = tab_fields(line, (2, 3), "text_a<TAB>text_b[<TAB>label]")
            if problem:
                return Record(position, cursor, None, "malformed", f"{path}, line {position + 1}: {problem}")
            firsts.append(fields[0].strip())
            seconds.append(fields[1].strip())
            labels.append(check_label(fields[2].strip(), f"{path}, line {position + 1}") if len(fields) == 3 else None)
        if labels[0] is None:
            if any(labels[1:]):
                return Record(position, cursor, None, "malformed",
                              f"{self.paths[1]}, line {position + 1}: has a label but {self.paths[0]} does not; the "
                              "first file carries the labels")
            return Record(position, cursor, tuple(firsts), texts_b=tuple(seconds))
        if any(other is not None and other != labels[0] for other in labels[1:]):
            return Record(position, cursor, None, "malformed",
                          f"{self.paths[1]}, line {position + 1}: label {labels[1]!r} differs from {labels[0]!r} in "
                          f"{self.paths[0]}; a translated pair keeps its label")
        label = class_id(labels[0], self.label_names, f"{self.paths[0]}, line {position + 1}")
        return Record(position, cursor, tuple(firsts), label=label, texts_b=tuple(seconds))

    # datasets ---------------------------------------------------------------------------
    def __getstate__(self):
        state = dict(self.__dict__)
        for cached in ("_dataset", "_columns"):
            state.pop(cached, None)  # workers re-open the dataset (memory-mapped, cheap)
        return state

    @cached_property
    def _dataset(self):
        return load_hf_dataset(self.dataset, self.config, self.split, f"--corpus {self.spec!r}")

    @cached_property
    def _columns(self) -> tuple[str, tuple[str, ...]]:
        """('translation', keys) | ('columns', names) | ('text', ('text',)): the dataset's own
        spelling of each language, which may differ in case from the normalised code."""
        ds = self._dataset
        names = ds.column_names
        if self.columns:
            check_columns(ds, (*self.columns, self.label_column), f"--corpus {self.spec!r}")
            return "columns", self.columns
        if "translation" in names:
            first = ds[0]["translation"] if len(ds) else {}
            keys = _keys_for(self.langs or tuple(first), first)
            if keys is None or len(keys) != 2:
                raise BadInput(
                    f"--corpus {self.spec!r}: its 'translation' column holds languages {sorted(first)}; "
                    "name the pair in the spec, e.g. hf:DATASET:en-hi."
                )
            return "translation", keys
        if self.langs and len(self.langs) == 2 and (keys := _keys_for(self.langs, names)) is not None:
            return "columns", keys
        if "text" in names:
            return "text", ("text",)
        raise BadInput(
            f"--corpus {self.spec!r}: the dataset's columns are {names}; xkd reads a 'translation' "
            "column ({lang: text}), two columns named by the languages of the spec, or a 'text' column."
        )

    @property
    def label_field(self) -> str:
        """datasets: the column labels are read from (the spec's, else "label" if any)."""
        return self.label_column or ("label" if "label" in self._dataset.column_names else "")

    def resolve_hf_langs(self) -> tuple[str, ...]:
        mode, keys = self._columns
        if mode == "text" or self.columns:
            return self.langs[:1] or (normalize_language(self.config) or "und" if len(self.config) <= 3 else "und",)
        return tuple(language_code(key, f"--corpus {self.spec!r}: the dataset's language") for key in keys)

    def _hf_records(self, start: Cursor) -> Iterator[Record]:
        ds = self._dataset
        mode, cols = self._columns
        label_column = self.label_field
        pairs = self.has_pairs
        for chunk_start in range(start.position, len(ds), _HF_CHUNK):
            batch = ds[chunk_start : chunk_start + _HF_CHUNK]
            n = len(next(iter(batch.values())))
            for j in range(n):
                position = chunk_start + j
                if mode == "translation":
                    pair = batch["translation"][j] or {}
                    if not isinstance(pair, dict):
                        raise not_text(self._where("translation", position), pair, "a {language: text} object")
                    texts = tuple(cell_text(pair.get(lang), self._where(f"translation.{lang}", position)) for lang in cols)
                else:
                    texts = tuple(cell_text(batch[c][j], self._where(c, position)) for c in cols)
                label = batch[label_column][j] if label_column else -1
                label = dataset_class_id(label, self.label_names,
                                         f"--corpus {self.spec!r}, column {label_column!r}, row {position}")
                if pairs:
                    yield Record(position, Cursor(position), texts[:1], label=label, texts_b=texts[1:])
                else:
                    yield Record(position, Cursor(position), texts, label=label)


    def _where(self, column: str, position: int) -> str:
        return f"--corpus {self.spec!r}: column {column!r}, row {position}"


def _keys_for(langs: tuple[str, ...], available) -> tuple[str, ...] | None:
    """Each language's key among `available` (dataset columns or translation keys), compared
    as normalised codes ("EN" finds "en"); None if one is missing."""
    by_code = {normalize_language(str(k)) or str(k): k for k in available}
    keys = tuple(by_code.get(normalize_language(lang) or lang) for lang in langs)
    return None if any(k is None for k in keys) else keys


# Labeled files -------------------------------------------------------------------------


def label_names_of(path: str, spec: str, n_fields: int = 2) -> tuple[tuple[str, ...], str]:
    """(the class names of a labeled file, sorted: class id i is names[i]; the sha256 of the
    bytes they were read from). The label is the last of `n_fields` tab-separated fields (2:
    text<TAB>label; 3: a pair and its label). Names are empty when the labels are class ids
    already. One streaming pass; lines the reader will reject (bad UTF-8, no tab) are left to
    it, so its message names them."""
    names: set[str] = set()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):  # binary lines end at b"\n" only, as xkd.lines reads
            digest.update(raw)
            try:
                fields = strip_line_end(raw.decode("utf-8")).split("\t")
            except UnicodeDecodeError:
                continue
            if len(fields) == n_fields:
                names.add(check_label(fields[-1].strip(), f"{path}, line {number}"))
    return class_names(names, f"--corpus {spec!r}: {path}"), digest.hexdigest()


def source_for(spec: CorpusSpec, split: str = "train") -> Source:
    if spec.kind == "sample":
        path = resources.files("xkd") / "data" / SAMPLE_FILE
        return Source("sample", SAMPLE_LANGS, (str(path),), spec=spec.spec)
    if spec.kind == "hf":
        split = spec.options.get("split", split)  # the spec's own split= wins over --split
        source = Source("hf", spec.langs, dataset=spec.dataset, config=spec.config, split=split, spec=spec.spec,
                        columns=tuple(spec.options.get("columns", ())), label_column=spec.options.get("label", ""))
        source.langs = source.resolve_hf_langs()
        source.label_names = dataset_class_names(source._dataset, source.label_field, f"--corpus {source.spec!r}")
        return source
    if spec.kind in ("labeled", "pairs"):
        names, digest = label_names_of(spec.paths[0], spec.spec, n_fields=3 if spec.kind == "pairs" else 2)
        return Source(spec.kind, spec.langs, spec.paths, spec=spec.spec, label_names=names, labels_sha256=digest)
    return Source(spec.kind, spec.langs, spec.paths, spec=spec.spec)


# Cleaning, planning, shard reading ------------------------------------------------------


def judge(record: Record, cleaning: Cleaning) -> str:
    """'' to keep the record, else the reason it is skipped. Bad lines raise unless skipped."""
    if record.reason:
        if not cleaning.skip_bad_lines:
            raise BadInput(
                f"{record.detail}. Fix the file, or pass --skip-bad-lines to skip such lines (they are "
                "counted in the summary)."
            )
        return record.reason
    if any(not t for t in record.texts + record.texts_b):
        return "empty"
    if cleaning.min_tokens or cleaning.max_tokens:
        for text in record.texts + record.texts_b:
            n = len(text.split())
            if n < cleaning.min_tokens or (cleaning.max_tokens and n > cleaning.max_tokens):
                return "length"
    return ""


@dataclass(frozen=True)
class ShardSlice:
    """What a shard task needs to read its examples: where they start and end, how many
    there are, and proof of what the plan read there: the sha256 of each file's bytes from
    `start` to `end` (files), or the dataset's fingerprint (`datasets`)."""

    shard_id: int
    source: Source
    cleaning: Cleaning
    start: Cursor
    size: int
    end: Cursor = Cursor()  # just after the shard's last example
    sha256: tuple[str, ...] = ()  # per file, of the bytes start.offsets[i]:end.offsets[i]
    fingerprint: str = ""  # the corpus fingerprint the plan (and so the cache key) was made from

    def examples(self) -> list[Example]:
        """The shard's examples, parsed from bytes checked against the plan before anything
        else happens, so a changed file can never put other text under this cache's key."""
        if self.source.kind == "hf":
            self._check_dataset()
            records = self.source.records(self.start)
        else:
            records = self.source.records_from([io.BytesIO(b) for b in self.checked_bytes()], self.start)
        out = []
        for record in records:
            if len(out) == self.size:
                break
            if not judge(record, self.cleaning):
                out.append(Example(record.position, record.texts, record.label, record.texts_b))
        if len(out) != self.size:
            raise BadInput(
                f"corpus {self.source.spec!r} changed while it was being cached: shard {self.shard_id} "
                f"should hold {self.size} examples but only {len(out)} were read. Re-run the command."
            )
        return out

    def checked_bytes(self) -> list[bytes]:
        """Each file's bytes of this shard, read once and checked against the plan's sha256
        (a shard's bytes, like its examples, are held in memory anyway)."""
        out = []
        for path, begin, end, digest in zip(self.source.paths, self.start.offsets, self.end.offsets, self.sha256):
            try:
                with open(path, "rb") as f:
                    f.seek(begin)
                    data = f.read(end - begin)
            except OSError as e:
                raise BadInput(f"{path} cannot be read any more ({e.strerror}); {self._advice()}") from None
            if len(data) != end - begin or hashlib.sha256(data).hexdigest() != digest:
                raise BadInput(
                    f"{path} changed after the run read it: lines {self.start.position + 1}-{self.end.position} "
                    f"(bytes {begin}-{end}), which shard {self.shard_id} holds, are not the bytes the cache key "
                    f"was made from. Nothing was cached for this shard; {self._advice()}"
                )
            out.append(data)
        return out

    def _check_dataset(self) -> None:
        if self.fingerprint and self.source.fingerprint() != self.fingerprint:
            raise BadInput(
                f"dataset {self.source.dataset} changed after the run read it (its fingerprint differs), so shard "
                f"{self.shard_id} would not hold what the cache key was made from. Nothing was cached for this "
                f"shard; {self._advice()}"
            )

    def _advice(self) -> str:
        return ("restore the corpus and re-run the same command to resume this cache, or re-run it with the corpus "
                "as it is now to cache that (a new cache; shards cached so far stay where they are).")


@dataclass
class CorpusPlan:
    source: Source
    cleaning: Cleaning
    shard_size: int
    fingerprint: str
    examples: int
    records: int
    skipped: dict[str, int]
    shards: list[ShardSlice] = field(default_factory=list)
    label_count: int = 0  # classes the kept examples' labels range over (0: unlabelled)

    @property
    def langs(self) -> tuple[str, ...]:
        return self.source.langs

    def to_json(self) -> dict:
        """The manifest's corpus block (identity and what was kept)."""
        return {
            "spec": self.source.spec,
            "kind": self.source.kind,
            "langs": list(self.langs),
            "split": self.source.split if self.source.kind == "hf" else None,
            "fingerprint": self.fingerprint,
            "records": self.records,
            "examples": self.examples,
            "skipped": dict(self.skipped),
            "pairs": self.source.has_pairs,
            **({"labels": list(self.source.label_names)} if self.source.label_names or self.source.kind in ("labeled", "pairs")
               else {}),
        }


def _refuse_empty(spec: CorpusSpec, source: Source, records: int, skipped: dict[str, int]) -> NoReturn:
    """Refuse a corpus of which cleaning kept nothing, saying how many records were read and why each was skipped."""
    where = ", ".join(source.paths) or f"dataset {source.dataset}"
    counts = ", ".join(f"{n} {r}" for r, n in skipped.items() if n) or "it has no lines"
    raise BadInput(
        f"corpus {spec.spec!r} ({where}) yields no examples: {records} records read ({counts}). "
        "Check the files, or loosen --min-tokens/--max-tokens."
    )


def _check_labels_unchanged(source: Source, file_sha256: list[str]) -> None:
    """The class names were read from the first file before this pass: refuse when its bytes have changed since."""
    if source.labels_sha256 and file_sha256[0] != source.labels_sha256:
        raise BadInput(f"{source.paths[0]} changed while it was being read (its class names were read from other "
                       "bytes). Re-run the command once the file is no longer being written.")


def plan_corpus(spec: CorpusSpec, cleaning: Cleaning, shard_size: int, split: str = "train") -> CorpusPlan:
    """One lazy pass: fingerprint, clean, count, and cut into shards of `shard_size` examples.

    The fingerprint (hence the cache key) and each shard's sha256 come from the bytes this
    pass reads, so they describe one version of the files, whatever happens to them later."""
    if shard_size < 1:
        raise BadInput(f"--shard-size must be at least 1, not {shard_size}.")
    source = source_for(spec, split)
    files = [hashlib.sha256() for _ in source.paths]  # whole files
    skipped = {reason: 0 for reason in SKIP_REASONS}
    starts: list[Cursor] = []
    ends: list[Cursor] = []
    digests: list[tuple[str, ...]] = []
    shard = gap = None  # hashes of the current shard's bytes, through its last example / beyond it
    kept = records = 0
    max_label = -1
    for record in source.records():
        records += 1
        for h, line in zip(files, record.raw):
            h.update(line)
        reason = judge(record, cleaning)
        if not reason and cleaning.max_pairs and kept >= cleaning.max_pairs:
            reason = "cap"
        if reason:
            skipped[reason] += 1
            # Skipped lines between two examples of a shard are part of its bytes; after its
            # last example they are not, and the shard does not know yet which this is.
            if shard is not None:
                gap = gap or [h.copy() for h in shard]
                for h, line in zip(gap, record.raw):
                    h.update(line)
            continue
        if kept % shard_size == 0:
            if shard is not None:
                digests.append(tuple(h.hexdigest() for h in shard))
            starts.append(record.cursor)
            ends.append(record.cursor)
            shard = [hashlib.sha256() for _ in source.paths]
        elif gap is not None:
            shard = gap
        gap = None
        for h, line in zip(shard, record.raw):
            h.update(line)
        ends[-1] = Cursor(record.position + 1, record.end)
        max_label = max(max_label, record.label)
        kept += 1
    if kept == 0:
        _refuse_empty(spec, source, records, skipped)
    digests.append(tuple(h.hexdigest() for h in shard))
    file_sha256 = [h.hexdigest() for h in files]
    _check_labels_unchanged(source, file_sha256)
    fingerprint = source.fingerprint(file_sha256 if source.paths else None)
    sizes = [min(shard_size, kept - i * shard_size) for i in range(len(starts))]
    shards = [ShardSlice(i, source, cleaning, start, size, end, digest, fingerprint)
              for i, (start, size, end, digest) in enumerate(zip(starts, sizes, ends, digests))]
    label_count = len(source.label_names) if source.label_names else max_label + 1
    return CorpusPlan(source, cleaning, shard_size, fingerprint, kept, records, skipped, shards, label_count)
