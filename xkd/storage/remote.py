"""Caches on object storage: cache locations given as URLs (s3://bucket/prefix, gs://, az://).

The client is obstore (object_store, in Rust): it reads credentials and the endpoint from the
standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION; GOOGLE_* and AZURE_* for the others), retries transient errors with
exponential backoff, and does conditional writes (If-None-Match: * to create, If-Match: ETag
to replace), which the manifest commit relies on (writer.py). Why this client and not s3fs or
pyarrow's S3FileSystem: docs/benchmarks.md, "## remote".

An object store has no rename and no directories: an object appears whole when its PUT
completes, or not at all. Everything else (what is visible, who may write) is decided by the
manifest and the lease object (writer.py).
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

from ..errors import BadInput, XkdError

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$")
WILDCARD = re.compile(r"[*?\[]")  # a glob: --caches patterns, local or on object storage
# How long one request is retried (with exponential backoff) before the error is the run's:
# a restarting server comes back within it; one that stays down ends the command.
RETRY_SECONDS_ENV = "XKD_REMOTE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120


def is_url(location) -> bool:
    """A location on object storage (any scheme but file://), as opposed to a local path."""
    match = _URL.match(str(location))
    return bool(match) and match.group(1).lower() != "file"


def location(value) -> "str | Path":
    """A cache location as given: a URL stays a string (without a trailing slash), anything
    else is a local path (file:// URLs included)."""
    text = str(value)
    if is_url(text):
        return text.rstrip("/")
    match = _URL.match(text)
    return Path(match.group(2) if match else text)


def absolute(location) -> str:
    """A location as recorded for later runs: a URL as it is, a path resolved."""
    return str(location).rstrip("/") if is_url(location) else str(Path(location).resolve())


def join(root, *names: str) -> "str | Path":
    """`root`/`names`, for a URL or a local path."""
    if is_url(root):
        return "/".join([str(root).rstrip("/"), *names])
    return Path(root).joinpath(*names)


def short_error(e: BaseException) -> str:
    """The first line of a client error: obstore's errors carry a page of debug output."""
    text = str(e).strip().split("\n", 1)[0]
    return text[:300] + ("..." if len(text) > 300 else "")


class Remote:
    """One prefix of an object store (a cache's root), addressed by names relative to it.

    Picklable by its URL: dask ships it to workers, which open their own client.
    """

    def __init__(self, url: str):
        match = _URL.match(url)
        if not match or not match.group(2).split("/", 1)[0]:
            raise BadInput(f"{url}: not an object-store URL; give scheme://bucket/prefix, e.g. s3://my-bucket/caches.")
        self.url = url.rstrip("/")
        self._store = None
        self._pid = 0

    def __reduce__(self):
        return (Remote, (self.url,))

    def __repr__(self) -> str:
        return f"Remote({self.url!r})"

    def child(self, name: str) -> str:
        return f"{self.url}/{name}"

    @property
    def store(self):
        # One client per process: a forked DataLoader worker opens its own rather than use
        # connections (and a runtime) its parent made.
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = _open_store(self.url), os.getpid()
        return self._store

    # Reads ------------------------------------------------------------------------
    def get(self, name: str) -> bytes:
        """The whole object; FileNotFoundError when it does not exist."""
        import obstore

        return self._call(name, lambda: obstore.get(self.store, name).bytes().to_bytes())

    def get_range(self, name: str, start: int, end: int) -> bytes:
        import obstore

        return self._call(name, lambda: obstore.get_range(self.store, name, start=start, end=end).to_bytes())

    def size(self, name: str) -> int | None:
        """The object's size, None when it does not exist."""
        import obstore

        try:
            return int(self._call(name, lambda: obstore.head(self.store, name))["size"])
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> dict[str, int]:
        """Every object under `prefix` (names relative to the root) and its size."""
        import obstore

        def listing():
            return {meta["path"]: int(meta["size"]) for batch in obstore.list(self.store, prefix=prefix or None)
                    for meta in batch}
        return self._call(prefix or "/", listing)

    def folders(self, prefix: str = "") -> list[str]:
        """The names of the "folders" directly under `prefix` (common prefixes, no slash)."""
        import obstore

        listing = self._call(prefix or "/", lambda: obstore.list_with_delimiter(self.store, prefix or None))
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in listing["common_prefixes"]]

    # Writes -----------------------------------------------------------------------
    def put(self, name: str, data: "bytes | Path") -> None:
        """Write an object whole (a local file is streamed, in parts when large)."""
        import obstore

        self._call(name, lambda: obstore.put(self.store, name, Path(data) if isinstance(data, Path) else data))

    def create(self, name: str, data: bytes) -> str | None:
        """Write `name` only if no object has that name (If-None-Match: *). Its ETag, or None
        when an object is already there."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            return self._call(name, lambda: obstore.put(self.store, name, data, mode="create"))["e_tag"]
        except (AlreadyExistsError, PreconditionError):
            return None

    def replace(self, name: str, data: bytes, etag: str) -> str | None:
        """Replace `name` only if it is still the object with `etag` (If-Match). Its new
        ETag, or None when another writer replaced or removed it since."""
        import obstore
        from obstore.exceptions import NotFoundError, PreconditionError

        try:
            return self._call(name, lambda: obstore.put(self.store, name, data, mode={"e_tag": etag}))["e_tag"]
        except (PreconditionError, NotFoundError, FileNotFoundError):
            return None

    def get_with_etag(self, name: str) -> tuple[bytes, str] | None:
        """The object and its ETag (for a later `replace`), None when it does not exist."""
        import obstore

        def fetch():
            result = obstore.get(self.store, name)
            return result.bytes().to_bytes(), result.meta["e_tag"]
        try:
            return self._call(name, fetch)
        except FileNotFoundError:
            return None

    def delete(self, names: list[str]) -> None:
        import obstore

        for start in range(0, len(names), 1000):  # S3's DeleteObjects takes up to 1,000 keys
            batch = names[start:start + 1000]
            self._call(batch[0], lambda b=batch: obstore.delete(self.store, b))

    # Errors -----------------------------------------------------------------------
    def _call(self, name: str, request):
        """Run one request (the client has already retried transient errors with backoff):
        a missing object is FileNotFoundError; a store that refuses or stays unreachable is
        one paragraph naming the object."""
        from obstore.exceptions import (
            AlreadyExistsError,
            NotFoundError,
            PermissionDeniedError,
            PreconditionError,
            UnauthenticatedError,
        )

        try:
            return request()
        except (NotFoundError, FileNotFoundError):  # obstore raises the builtin for a GET of a missing object
            raise FileNotFoundError(f"{self.url}/{name}") from None
        except (AlreadyExistsError, PreconditionError):
            raise
        except (PermissionDeniedError, UnauthenticatedError) as e:
            raise BadInput(f"{self.url}/{name}: the object store refused access ({short_error(e)}). Check the credentials "
                           "in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or your cloud's equivalents).") from None
        except Exception as e:  # connection refused, timeouts, 5xx: retried by the client until RETRY_SECONDS
            if "169.254.169.254" in str(e):  # no credentials in the environment: the client asked the cloud's metadata
                raise BadInput(f"{self.url}/{name}: no object-store credentials were found: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a server other than AWS) in the "
                               "environment of every process that reads or writes the cache (dask workers "
                               "included).") from None
            raise RemoteUnavailable(self.url, name, e) from None


class RemoteUnavailable(XkdError):
    """The object store did not answer a request within the retry window."""

    def __init__(self, url: str, name: str, error: BaseException):
        seconds = retry_seconds()
        super().__init__(
            f"{url}/{name}: the object store did not answer ({short_error(error)}), retried with backoff for up to "
            f"{seconds:.0f} s. Check that it is up and that AWS_ENDPOINT_URL points at it; then run the same command "
            f"again: what was already written is kept, and the run resumes. ({RETRY_SECONDS_ENV} sets how long to retry.)")


def retry_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS)))
    except ValueError:
        raise BadInput(f"{RETRY_SECONDS_ENV}={os.environ[RETRY_SECONDS_ENV]!r}: give a number of seconds.") from None


def _open_store(url: str):
    try:
        from obstore.store import from_url
    except ImportError:  # pragma: no cover
        raise BadInput(f"{url}: reading or writing caches on object storage needs obstore (pip install obstore).") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or ""
    seconds = retry_seconds()
    retry = {"max_retries": 1000, "retry_timeout": datetime.timedelta(seconds=seconds),
             "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                         "max_backoff": datetime.timedelta(seconds=5), "base": 2.0}}
    # A plain-http endpoint (a local server, a test) is the user's explicit choice.
    client = {"allow_http": True} if endpoint.startswith("http://") else {}
    try:
        return from_url(url, client_options=client, retry_config=retry)
    except Exception as e:
        raise BadInput(f"{url}: cannot open this object store ({short_error(e)}). Supported: s3://, gs://, az:// "
                       "(with credentials in the standard environment variables).") from None


def glob_urls(pattern: str, marker: str) -> list[str]:
    """The URLs matching `pattern` (wildcards * ? [..] within a path component) under which an
    object `marker` exists (manifest.json: caches), sorted."""
    import fnmatch

    scheme, rest = str(pattern).rstrip("/").split("://", 1)
    bucket, _, path = rest.partition("/")
    bucket_remote = Remote(f"{scheme}://{bucket}")
    found = [""]
    for part in [p for p in path.split("/") if p]:
        if not WILDCARD.search(part):
            found = [f"{f}{part}/" for f in found]
            continue
        found = [f"{f}{name}/" for f in found for name in bucket_remote.folders(f) if fnmatch.fnmatchcase(name, part)]
    return sorted(f"{scheme}://{bucket}/{f.rstrip('/')}" for f in found
                  if bucket_remote.size(f"{f}{marker}") is not None)

