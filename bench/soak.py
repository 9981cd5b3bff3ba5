"""Soak (issue 16): the reference upload through a fault proxy that drops the connection at random offsets.

    .venv/bin/python bench/soak.py                                # 3,624,892,618 bytes, both transports, both backends
    .venv/bin/python bench/soak.py --size 300000000 --transport ws --backend local     # a quick one
    .venv/bin/python bench/soak.py --keep-file /tmp/soak-ref.bin --json /tmp/soak.json  # keep the file for the next run
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/ddx REDIS_URL=redis://127.0.0.1:6379/5 \\
        .venv/bin/python bench/soak.py                            # PostgreSQL (a scratch database per run) + Redis

Not part of CI: one run moves the whole reference file, several times over. For each transport (``ws``: the
reference client, ``python -m ddxclient upload … --max-retries 200``; ``tus``: tuspy, tests/faults/tus_client.py;
both started by tests/faults/cluster.py's ``Client``) and each storage backend (``local``: a folder; ``s3``: a
SeaweedFS, tests/support/seaweedfs.py, the one DIRECTDRIVEX_TEST_S3_ENDPOINT names or a ``weed mini`` of its own),
one run:

1. starts a fresh ``manage.py serve`` (tests/support/live_server.py; its own SQLite file, or a scratch PostgreSQL
   database when DATABASE_URL is set, Redis when REDIS_URL is) and a user with an API token;
2. puts tests/support/tcp_proxy.py's ``TcpProxy`` between the client and the server, and draws --disconnects
   byte offsets at random in (0, size), sorted. Before each, the proxy is told to stall exactly there
   (``stall_after``: counted in bytes forwarded from the client, re-sent bytes included); once it has
   stalled, every open connection is reset with RST (``reset()``), and the client resumes by itself;
3. samples the server's VmRSS / VmHWM every --sample seconds with the upload's durable offset (from the
   database), and on s3 the spool folder's size;
4. checks: the client exits 0, every planned disconnect happened, the API says the upload is complete with
   offset == size and the file's sha256, the one finished file read back from storage
   (tests/support/stored.py) has the file's sha256, the server's RSS growth is within the upload targets of
   docs/benchmarks.md (peak VmHWM minus the VmRSS right before the upload <= 32 MiB; the peak's growth from
   one third of the durable bytes to the end <= 8 MiB), and no slot is active once the client is done
   (``SELECT count(*) FROM uploads_slot WHERE released_at IS NULL``).

One line per run, then a summary; the exit status is 1 if any run failed. Elapsed is the client's wall time
(its own sha256 pass over the file included); MB/s (10^6 bytes/s) is timed by the server's log, from the first
``writer ready`` to ``upload.completed``, reconnections included. "extra" is what the proxy forwarded beyond
the file's size: bytes re-sent after the disconnects, plus the protocols' own (a few hundred KB at most:
HTTP requests, WebSocket frame headers, tus PATCH headers).
"""

import argparse
import contextlib
import json
import logging
import os
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.object_store import DurableOffset, tree_bytes  # noqa: E402
from bench.upload import (  # noqa: E402
    REFERENCE_SIZE,
    TARGET_GROWTH,
    TARGET_LATE_GROWTH,
    UPLOAD_COMPLETE,
    MiB,
    Sampler,
    log_count,
    log_seconds,
)
from tests.faults.cluster import INTERNAL_ERROR, Client, Source, Storage, line_around  # noqa: E402
from tests.support import seaweedfs, stored  # noqa: E402
from tests.support.files import file_sha256, write_random  # noqa: E402
from tests.support.live_backend import http_call  # noqa: E402
from tests.support.live_server import LiveServer, postgres_database  # noqa: E402
from tests.support.tcp_proxy import TcpProxy  # noqa: E402

log = logging.getLogger("bench.soak")

TRANSPORTS = ("ws", "tus")
BACKENDS = ("local", "s3")
# How often the injector looks whether the proxy has stalled at its offset (the stall itself is exact).
POLL = 0.01
# The resume offset every connection (WebSocket) or PATCH (tus) starts from: uploads/transports/*.py.
WRITER_READY = re.compile(r"writer ready upload=\S+ user=\S+ offset=(\d+)")


@dataclass
class Run:
    """One transport and backend: what was done and what was found."""

    transport: str
    backend: str
    size: int
    expected_sha256: str
    planned: list[int] = field(default_factory=list)
    # Per disconnect, when the proxy reset the connections: (seconds since sampling began, bytes the proxy
    # had forwarded, the offset committed in the database then), to set beside ``samples``.
    disconnects: list[tuple[float, int, int]] = field(default_factory=list)
    returncode: int | None = None
    elapsed: float = 0.0
    upload_seconds: float | None = None
    forwarded: int = 0
    sessions: int = 0
    resumed_from: list[int] = field(default_factory=list)
    upload_id: str | None = None
    detail: dict = field(default_factory=dict)
    stored_sha256: list[str] = field(default_factory=list)
    idle_rss: int = 0
    peak_rss_sampled: int = 0
    peak_hwm: int = 0
    late_growth: int | None = None
    spool_peak: int | None = None
    slots_after_client: int | None = None
    slots_at_end: int | None = None
    internal_errors: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    server_log: str = ""
    # (seconds, VmRSS, VmHWM, offset committed in the database) every --sample seconds: in the JSON only.
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)

    @property
    def growth(self) -> int:
        # VmHWM rather than the sampled peak: it also catches a spike between two samples.
        return max(self.peak_hwm, self.peak_rss_sampled) - self.idle_rss

    @property
    def mb_s(self) -> float | None:
        return self.size / self.upload_seconds / 1e6 if self.upload_seconds else None

    @property
    def extra(self) -> int:
        return self.forwarded - self.size

    @property
    def sha256_equal(self) -> bool:
        return self.detail.get("sha256") == self.expected_sha256 and self.stored_sha256 == [self.expected_sha256]

    @property
    def passed(self) -> bool:
        return not self.failures


# --- the database ------------------------------------------------------------------------------------------


def active_slots(database_url: str) -> int:
    """Slots not released, read from the server's database (read-only for SQLite: the server may be writing)."""
    sql = "SELECT count(*) FROM uploads_slot WHERE released_at IS NULL"
    if database_url.startswith("sqlite:///"):
        path = database_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)) as connection:
            return connection.execute(sql).fetchone()[0]
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=10) as connection:
        return connection.execute(sql).fetchone()[0]


@contextlib.contextmanager
def run_database(label: str):
    """A fresh PostgreSQL database for one run when DATABASE_URL names a server, else None (the server's SQLite)."""
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        with postgres_database(url, label) as database_url:
            yield database_url
    else:
        yield None


# --- one run -----------------------------------------------------------------------------------------------


def inject(proxy: TcpProxy, client: Client, run: Run, sampler: Sampler) -> None:
    """Reset every connection through ``proxy`` once its forwarded bytes reach each planned offset.

    ``stall_after`` stops the bytes exactly at the offset, so the reset does not depend on how fast this
    loop polls; the stall lasts until the reset, a few milliseconds, too short for either client to time out.
    """
    for target in run.planned:
        proxy.stall_after(max(0, target - proxy.forwarded))
        while proxy.state != "stalled" and client.alive():
            time.sleep(POLL)
        if proxy.state != "stalled":
            log.warning("%s/%s: the client exited before the disconnect at %d", run.transport, run.backend, target)
            break
        proxy.reset()
        # The sampler's last reading of the committed offset (at most --sample seconds old): one connection
        # to the database stays with one thread.
        run.disconnects.append((time.monotonic() - sampler.started_at, proxy.forwarded, sampler.landed.last))
        log.info(
            "%s/%s: disconnect %d of %d: reset at %d bytes forwarded (offset committed in the database: %d)",
            run.transport, run.backend, len(run.disconnects), len(run.planned), *run.disconnects[-1][1:],
        )  # fmt: skip
    proxy.restore()


def soak(args, transport: str, backend: str, src: Source, workdir: Path, s3: tuple[str, str] | None) -> Run:
    """One upload of ``src`` over ``transport`` into ``backend`` through the fault proxy, checked (see the module)."""
    name = f"{transport}-{backend}"
    rng = random.Random(f"{args.seed}-{name}")
    run = Run(transport, backend, src.size, src.sha256)
    run.planned = sorted(rng.randrange(1, src.size) for _ in range(args.disconnects))
    folder = workdir / name
    settings = {}
    if backend == "s3":
        endpoint, bucket = s3
        settings = Storage("s3", endpoint, bucket).settings(workdir, name, f"soak-{os.getpid()}-{name}/")
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(run_database(f"soak_{transport}_{backend}"))
        server = LiveServer(folder, database_url=database_url, redis_url=os.environ.get("REDIS_URL"), **settings)
        run.server_log = str(server.log_path)
        server.migrate()
        token = server.create_user("alice")
        server.start(timeout=60)
        stack.callback(server.stop)
        proxy = stack.enter_context(TcpProxy("127.0.0.1", server.port))
        landed = DurableOffset(server.env["DATABASE_URL"])
        stack.callback(landed.close)
        spool = Path(settings["DIRECTDRIVEX_SPOOL_DIR"]) if backend == "s3" else None
        time.sleep(args.settle)  # the idle size, once start-up's garbage is collected
        run.idle_rss = server.rss()["VmRSS"]
        sampler = Sampler(server.pid, landed, args.sample, gauge=(lambda: tree_bytes(spool)) if spool else None)
        sampler.start()
        log_start = server.log_path.stat().st_size
        started = time.monotonic()
        client = Client(transport, proxy.via(server.url), token, src, folder / "client.log")
        try:
            inject(proxy, client, run, sampler)
            run.returncode = client.wait(args.timeout)
        finally:
            client.kill()
            run.elapsed = time.monotonic() - started
            sampler.stop()
        run.forwarded = proxy.forwarded
        run.peak_hwm = server.rss()["VmHWM"]
        run.samples = sampler.samples
        run.peak_rss_sampled = max((sample[1] for sample in sampler.samples), default=0)
        profile = sampler.profile(src.size)
        if profile:
            run.late_growth = profile["hwm_end"] - profile["hwm_third"]
        if spool:
            run.spool_peak = sampler.gauge_peak
        check(run, server, token, client, log_start)
        shutil.rmtree(server.storage, ignore_errors=True)  # 3.4 GiB per run on local: not kept
    return run


def check(run: Run, server: LiveServer, token: str, client: Client, log_start: int) -> None:
    """What the database, the API, storage and the server's log say once the client is done."""
    fail = run.failures.append
    run.slots_after_client = active_slots(server.env["DATABASE_URL"])
    if run.returncode != 0:
        fail(f"client exited {run.returncode}")
        log.error("%s/%s client output:\n%s", run.transport, run.backend, client.output())
    if len(run.disconnects) != len(run.planned):
        fail(f"{len(run.disconnects)} of {len(run.planned)} disconnects injected")
    run.upload_id = client.upload_id
    if run.upload_id:
        answer = http_call(server, "GET", f"/api/uploads/{run.upload_id}/", token=token)
        run.detail = answer.json() if answer.status == 200 else {"http_status": answer.status}
    detail = run.detail
    if not (detail.get("status") == "complete" and detail.get("offset") == detail.get("size") == run.size):
        fail(f"API detail: status {detail.get('status')}, offset {detail.get('offset')}, size {detail.get('size')}")
    if detail.get("sha256") != run.expected_sha256:
        fail(f"API sha256 {detail.get('sha256')}")
    # Read back in blocks from storage itself, not from what the server says about it.
    run.stored_sha256 = [stored.finished_sha256(key, server) for key in stored.finished_keys(server)]
    if run.stored_sha256 != [run.expected_sha256]:
        fail(f"stored sha256 {run.stored_sha256}")
    if run.growth > TARGET_GROWTH:
        fail(f"RSS growth {run.growth / MiB:.1f} MiB > {TARGET_GROWTH / MiB:.0f} MiB")
    if run.late_growth is not None and run.late_growth > TARGET_LATE_GROWTH:
        fail(f"RSS growth from 1/3 on {run.late_growth / MiB:.1f} MiB > {TARGET_LATE_GROWTH / MiB:.0f} MiB")
    # Checked again after the read-back (seconds later): a slot still active then is leaked, not late.
    run.slots_at_end = active_slots(server.env["DATABASE_URL"])
    if run.slots_at_end:
        fail(f"{run.slots_at_end} active slot(s) at the end ({run.slots_after_client} when the client exited)")
    with contextlib.suppress(RuntimeError):
        run.upload_seconds = log_seconds(server.log_path, "writer ready", UPLOAD_COMPLETE, since=log_start, first=True)
    run.sessions = log_count(server.log_path, "writer ready", since=log_start)
    with open(server.log_path, "rb") as handle:
        handle.seek(log_start)
        text = handle.read().decode(errors="replace")
    if run.transport == "ws":
        # One connection per line; over tus every PATCH has one, too many to keep.
        run.resumed_from = [int(match.group(1)) for match in WRITER_READY.finditer(text)]
    run.internal_errors = [line_around(text, match.start()) for match in INTERNAL_ERROR.finditer(text)]
    for line in run.internal_errors[:20]:
        log.warning("%s/%s server log: %s", run.transport, run.backend, line)


# --- output ------------------------------------------------------------------------------------------------


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MiB:.1f}"


def result_line(run: Run) -> str:
    mb_s = f"{run.mb_s:.1f}" if run.mb_s else "-"
    upload = f"{run.upload_seconds:.1f}" if run.upload_seconds else "-"
    spool = f" spool peak {mib(run.spool_peak)} MiB" if run.spool_peak is not None else ""
    return (
        f"{run.transport:3} {run.backend:5} {run.size} B  disconnects {len(run.disconnects)}/{len(run.planned)}  "
        f"elapsed {run.elapsed:.1f} s  upload {upload} s  {mb_s} MB/s  extra {run.extra / 1e6:.1f} MB  "
        f"RSS growth {mib(run.growth)} MiB (from 1/3: {mib(run.late_growth)}){spool}  "
        f"slots at end {run.slots_at_end}  sha256 equal {'yes' if run.sha256_equal else 'no'}  "
        f"{'PASS' if run.passed else 'FAIL'}"
    )


def summary(runs: list[Run]) -> None:
    log.info("")
    log.info("=== summary: %d run(s), %d PASS, %d FAIL ===", len(runs), sum(r.passed for r in runs),
             sum(not r.passed for r in runs))  # fmt: skip
    for run in runs:
        log.info("%s", result_line(run))
        for failure in run.failures:
            log.info("    FAIL %s/%s: %s (server log: %s)", run.transport, run.backend, failure, run.server_log)
    log.info(
        "targets: RSS growth <= %d MiB and <= %d MiB from 1/3 of the bytes on (docs/benchmarks.md), "
        "0 active slots at the end, sha256 equal (API and storage)",
        TARGET_GROWTH // MiB, TARGET_LATE_GROWTH // MiB,
    )  # fmt: skip


def as_json(run: Run) -> dict:
    return {
        **asdict(run),
        "growth": run.growth,
        "mb_s": run.mb_s,
        "extra": run.extra,
        "sha256_equal": run.sha256_equal,
        "passed": run.passed,
    }


# --- main --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reference_file(keep: Path | None, workdir: Path, size: int):
    """The file to upload and its sha256: ``keep`` reused if it has ``size`` bytes (made and kept if missing)."""
    path = keep or workdir / "soak.bin"
    if path.exists():
        if path.stat().st_size != size:
            raise SystemExit(f"{path} has {path.stat().st_size} bytes, not --size {size}")
        started = time.monotonic()
        digest = file_sha256(path)
        log.info("reusing %s (%d bytes, sha256 %s, hashed in %.1f s)", path, size, digest, time.monotonic() - started)
    else:
        started = time.monotonic()
        digest = write_random(path, size)
        log.info("wrote %s (%d random bytes, sha256 %s) in %.1f s", path, size, digest, time.monotonic() - started)
    try:
        yield Source(path, size, digest)
    finally:
        if keep is None:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def object_store(backends: list[str]):
    """(endpoint, bucket) of the S3 server when an s3 run is asked for, else None."""
    if "s3" not in backends:
        yield None
        return
    # boto3 in this process (the read-back of tests/support/stored.py) signs with the test credentials;
    # a developer's profile or session token must not win.
    for variable in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(variable, None)
    os.environ.update(AWS_ACCESS_KEY_ID=seaweedfs.ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY=seaweedfs.SECRET_ACCESS_KEY)
    with seaweedfs.s3_server() as (endpoint, bucket):
        log.info("S3: %s, bucket %s", endpoint, bucket)
        yield endpoint, bucket


def choices(value: str, every: tuple[str, ...]) -> list[str]:
    return list(every) if value == "all" else [value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=(*TRANSPORTS, "all"), default="all")
    parser.add_argument("--backend", choices=(*BACKENDS, "all"), default="all")
    parser.add_argument("--disconnects", type=int, default=5, help="connection resets per upload (default 5)")
    parser.add_argument("--size", type=int, default=REFERENCE_SIZE, help=f"bytes (default {REFERENCE_SIZE})")
    parser.add_argument("--keep-file", type=Path, metavar="PATH", help="reuse this file, or make it and keep it")
    parser.add_argument("--seed", default=None, help="seed of the disconnect offsets (default: a random one, logged)")
    parser.add_argument("--sample", type=float, default=0.5, help="RSS sampling interval in seconds (default 0.5)")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before the RSS baseline")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one client may take (default 3600)")
    parser.add_argument("--workdir", type=Path, help="keep servers' logs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in environment variables."
    args.seed = args.seed or os.urandom(4).hex()
    transports, backends = choices(args.transport, TRANSPORTS), choices(args.backend, BACKENDS)

    database = "PostgreSQL" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "SQLite"
    layer = "Redis" if os.environ.get("REDIS_URL") else "in-memory"
    log.info(
        "DirectDriveX soak, %s, %d CPUs, load %.2f; %d bytes, %d disconnects per upload, seed %s; %s, %s layer",
        f"{datetime.now():%Y-%m-%d %H:%M}", os.cpu_count(), os.getloadavg()[0], args.size, args.disconnects,
        args.seed, database, layer,
    )  # fmt: skip
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ddx-soak-")))
        workdir.mkdir(parents=True, exist_ok=True)
        src = stack.enter_context(reference_file(args.keep_file, workdir, args.size))
        s3 = stack.enter_context(object_store(backends))
        for backend in backends:
            for transport in transports:
                log.info("%s/%s: starting (load %.2f)", transport, backend, os.getloadavg()[0])
                try:
                    run = soak(args, transport, backend, src, workdir, s3)
                except Exception as error:  # a server that would not start, say: the other runs still go
                    log.exception("%s/%s: the run broke off", transport, backend)
                    run = Run(transport, backend, src.size, src.sha256, failures=[f"broke off: {error!r}"])
                runs.append(run)
                log.info("%s", result_line(run))
    summary(runs)
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "runs": [as_json(run) for run in runs]}, indent=2))
    return 0 if all(run.passed for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
