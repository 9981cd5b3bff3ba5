"""Upload throughput and memory benchmark: DirectDriveX (over WebSocket and over tus) against three baselines.

    .venv/bin/python bench/upload.py                      # 1 GiB, SQLite, in-memory channel layer
    .venv/bin/python bench/upload.py --size 3624892618    # the reference 3.38 GB case
    .venv/bin/python bench/upload.py --no-tus             # without the two tus-js-client peers (no Node needed)
    .venv/bin/python bench/upload.py --only ours_tus --only tus --tus-chunk-size default   # one PATCH per upload
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/ddx REDIS_URL=redis://127.0.0.1:6379/5 \\
        .venv/bin/python bench/upload.py                  # PostgreSQL (scratch database ddx_bench_<pid>) + Redis
    .venv/bin/python bench/upload.py --backend s3         # into an object store (SeaweedFS) against @tus/s3-store

Each round measures, on one file of random bytes:

* ours: ``manage.py serve`` (tests/support/live_server.py: the Daphne flags of make run, a temporary
  storage folder and database) receiving the file from the reference client (``python -m ddxclient
  upload``, a subprocess). Throughput is timed by the server's own log lines, from ``writer ready`` to
  ``upload.completed`` (admission, every frame, sha256, the durable commits and the atomic finish).
* ours_tus: the same server (a fresh one) receiving the file over tus 1.0 at ``/api/tus/`` from
  tus-js-client in Node (bench/tus/upload.mjs with ``--header 'Authorization: Token …'``, the file's
  sha256 declared in Upload-Metadata as the reference client declares it), in PATCHes of
  --tus-chunk-size bytes, the tus peer's client settings. Timed by the server's log from the first
  ``writer ready … transport=tus`` (the first PATCH's body begins) to ``upload.completed``.
* bare: bench/bare_consumer.py, a Channels consumer that only appends frames to a file, under the same
  Daphne (same flags, backpressure queue and channel layer), driven by the reference client's own
  sending loop (same frames, same window), timed by its ``bare ready`` / ``bare complete`` log lines.
* tus: a stock @tus/server 2 with @tus/file-store (bench/tus/server.mjs, Node, 127.0.0.1 only) receiving
  the file from tus-js-client in PATCHes of --tus-chunk-size bytes (4 MiB, or ``default``: tus-js-client's
  own chunkSize Infinity, one PATCH whose body is the whole file; bench/tus/upload.mjs), timed by
  its ``tus ready`` (upload created) / ``tus durable`` (last PATCH written, file fsynced once) log lines.
  The npm packages (versions pinned by bench/tus/package-lock.json) are installed with ``npm ci`` into
  --tus-cache (default ~/.cache/directdrivex-bench/tus) on first use and reused while the lock file is
  unchanged.
* disk: 1 MiB blocks read from the file and written to a new one in the same filesystem, fsync at the end.

Both tus-js-client peers use the same client settings, so ``ours_tus / tus`` compares the two servers
behind one client.

``--backend s3`` (issue 14) stores into an object store instead: one SeaweedFS (``weed mini``,
tests/support/seaweedfs.py) is started for the run; ours and ours_tus run with the s3 backend (a prefix
of their own per round, a spool folder in the work folder), and the tus peer is @tus/server with
@tus/s3-store on the same bucket, in parts of --tus-part-size (8 MiB, our part size up to 70 GiB), its
own spool (TMPDIR) in the work folder; bare and disk, local-disk peers, run only if --only names them.
The tus-js-client PATCHes default to one per upload: 4 MiB PATCHes are below S3's 5 MiB part minimum,
so @tus/s3-store would keep each as an "incomplete part" object and fetch it back at the next PATCH.
SeaweedFS's CPU (shared by whichever peer uploads) is printed apart and counted in no server's figure;
the spool folders' peak size is sampled like the bytes landed. Then, unless --no-resume, the resume on
another host (bench/object_store.py): an upload started on server A up to an offset at one eighth and
at seven eighths of the file (3 MiB past a part boundary, so a tail is read back), A killed with
SIGKILL, server B (its own spool, same database and bucket) started, and once A's slot lease has run
out (--resume-lease seconds for both), the time from B's first contact to taking bytes again.

The server's RSS is sampled from /proc every --sample seconds together with the bytes that have
landed, so RSS at one third of the upload and at its end can be compared. MB/s are 10^6 bytes/s.
"""

import argparse
import contextlib
import hashlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.object_store import DurableOffset, ObjectStore, measure_resume, tree_bytes  # noqa: E402
from tests.support.live_server import LiveServer, free_port, proc_cpu_seconds, proc_status  # noqa: E402

MiB = 1024 * 1024
GiB = 1024 * MiB
BLOCK = 64 * MiB
REFERENCE_SIZE = 3_624_892_618
# Python logging's default stamp (the tus peer writes it too), and the server's logfmt (uploads/logs.py).
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
LOGFMT_TIME = re.compile(r"^time=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")
# The server's one line per transition (uploads/services/events.py) that says an upload is complete.
UPLOAD_COMPLETE = "msg=upload.completed"
TUS_SOURCE = ROOT / "bench" / "tus"
TUS_FILES = ("package.json", "package-lock.json", "server.mjs", "upload.mjs")
DEFAULT_TUS_CACHE = Path.home() / ".cache" / "directdrivex-bench" / "tus"
TUS_CHUNK = 4 * MiB
# @tus/s3-store's part size with --backend s3: ours is max(8 MiB, size / 9,000) in whole MiB (uploads/storage/s3.py).
TUS_PART = 8 * MiB

# Targets of issue 3 on this 2-core machine.
TARGET_RATIO, STRETCH_RATIO = 1.0, 1.3
# The project's goal against the peer: at least @tus/server's speed, at most 3 s of server CPU per GiB.
TARGET_TUS_RATIO = 1.0
TARGET_CPU_PER_GIB = 3.0
# Issue 13, ours over tus: tus-js-client (Node) into ours at least as fast as into @tus/server, at most
# 2 s of server CPU per GiB (sha256 and the durability bound kept).
TARGET_OURS_TUS_RATIO = 1.0
TARGET_OURS_TUS_CPU_PER_GIB = 2.0
# Every peer, in the order each round runs them; "ours" and "ours_tus" are the project's server.
KINDS = ("ours", "ours_tus", "bare", "tus", "disk")
NODE_KINDS = ("ours_tus", "tus")
# With --backend s3, unless --only says otherwise: bare and disk write to the local disk.
S3_KINDS = ("ours", "ours_tus", "tus")
# Issue 14: a resume on another host takes bytes again within a second, whatever the offset.
TARGET_RESUME_SECONDS = 1.0
RESUME_FRACTIONS = (1 / 8, 7 / 8)
TARGET_GROWTH = 32 * MiB
TARGET_LATE_GROWTH = 8 * MiB


def out(line: str = "") -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def mib(value: float) -> str:
    return f"{value / MiB:.1f} MiB"


# --- the file -------------------------------------------------------------------------


def make_file(path: Path, size: int) -> None:
    """Random bytes, fast: one 64 MiB os.urandom block, XORed per block with a key made from the block's counter.

    No 4 KiB page and no long run repeats between blocks, so neither compression
    nor deduplication anywhere on the path can make the numbers look better.
    """
    started = time.monotonic()
    base = int.from_bytes(os.urandom(BLOCK), "little")
    written = 0
    with open(path, "wb") as handle:
        counter = 0
        while written < size:
            key = hashlib.sha512(counter.to_bytes(8, "little")).digest() * (BLOCK // 64)
            block = (base ^ int.from_bytes(key, "little")).to_bytes(BLOCK, "little")
            handle.write(block[: min(BLOCK, size - written)])
            written += min(BLOCK, size - written)
            counter += 1
    out(f"made {path} ({size} bytes) in {time.monotonic() - started:.1f}s")


# --- sampling -------------------------------------------------------------------------


class Sampler(threading.Thread):
    """(seconds, VmRSS, VmHWM, bytes landed) every ``interval`` seconds while an upload runs."""

    def __init__(self, pid: int, landed, interval: float, gauge=None):
        super().__init__(daemon=True)
        self.pid, self.landed, self.interval = pid, landed, interval
        self.samples: list[tuple[float, int, int, int]] = []
        # Optional: another size sampled with the same cadence, of which the peak is kept (a spool folder).
        self.gauge, self.gauge_peak = gauge, 0
        self.stop_event = threading.Event()
        self.started_at = time.monotonic()

    def run(self):
        while not self.stop_event.is_set():
            with contextlib.suppress(OSError, KeyError):
                status = proc_status(self.pid)
                self.samples.append(
                    (time.monotonic() - self.started_at, status["VmRSS"], status["VmHWM"], self.landed())
                )
            if self.gauge is not None:
                self.gauge_peak = max(self.gauge_peak, self.gauge())
            self.stop_event.wait(self.interval)

    def stop(self):
        self.stop_event.set()
        self.join()

    def profile(self, size: int) -> dict:
        """RSS and high-water mark once a third of the bytes had landed, and at the last sample before the end.

        ``hwm_end - hwm_third`` is the spec's "growth between the first third and the end":
        the peak may not rise once the process has seen a third of the upload.
        """
        during = [sample for sample in self.samples if sample[3] < size] or self.samples
        from_third = [sample for sample in self.samples if sample[3] >= size / 3]
        if not from_third:
            return {}
        return {
            "rss_third": from_third[0][1],
            "hwm_third": from_third[0][2],
            "rss_max_after_third": max(sample[1] for sample in from_third),
            "rss_end": during[-1][1],
            "hwm_end": self.samples[-1][2],
            "samples": len(self.samples),
        }


def dir_bytes(*folders: Path) -> int:
    total = 0
    for folder in folders:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(folder):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
    return total


def log_seconds(log_path: Path, start_marker: str, end_marker: str, *, since: int = 0, first: bool = False) -> float:
    """Seconds between the last ``start_marker`` line and the ``end_marker`` line after it.

    ``since``: read the log from this byte on (the lines of one round of a log that several rounds
    append to). ``first``: from the first ``start_marker`` line to the first ``end_marker`` after it
    (a tus upload in several PATCHes has one ``writer ready`` per PATCH).
    """
    start = end = None
    with open(log_path, "rb") as handle:
        handle.seek(since)
        text = handle.read().decode(errors="replace")
    for line in text.splitlines():
        if match := LOG_TIME.match(line):
            stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        elif match := LOGFMT_TIME.match(line):
            stamp = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f")
        else:
            continue
        if start_marker in line:
            if first and start is not None:
                continue
            start, end = stamp, None
        elif end_marker in line and start is not None:
            if first and end is not None:
                continue
            end = stamp
    if start is None or end is None:
        raise RuntimeError(f"no {start_marker!r} .. {end_marker!r} in {log_path}")
    return (end - start).total_seconds()


def thread_cpu(pid: int) -> float:
    """CPU seconds of the process's main thread (Daphne's event loop: Twisted, autobahn, Channels, the consumer)."""
    return proc_cpu_seconds_of(Path(f"/proc/{pid}/task/{pid}/stat"))


def proc_cpu_seconds_of(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class PySpy:
    """Optional: py-spy recording a server while it receives the upload (collapsed stacks)."""

    def __init__(self, binary: str | None, pid: int, output: Path, extra: tuple[str, ...] = ()):
        self.process = None
        if binary:
            # --threads roots every stack at its thread, so the event loop and the writer / DB threads separate.
            self.process = subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--threads",
                 *extra, "--output", str(output)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)

    def stop(self):
        if self.process:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(60)


# --- the three measurements -------------------------------------------------------------


def server_figures(pid: int, idle: dict, cpu_before: tuple, sampler: Sampler, size: int, seconds: float) -> dict:
    """``cpu_before`` is (process, main thread) CPU seconds before the upload."""
    after = proc_status(pid)
    cpu = proc_cpu_seconds(pid) - cpu_before[0]
    loop_cpu = thread_cpu(pid) - cpu_before[1]
    gib = size / GiB
    return {
        "seconds": seconds,
        "mb_s": size / seconds / 1e6,
        "idle_rss": idle["VmRSS"],
        "hwm_before": idle["VmHWM"],
        "peak_rss": after["VmHWM"],
        "rss_after": after["VmRSS"],
        "growth": after["VmHWM"] - idle["VmRSS"],
        "cpu_per_gib": cpu / gib,
        "loop_cpu_per_gib": loop_cpu / gib,
        "other_threads_cpu_per_gib": (cpu - loop_cpu) / gib,
        **sampler.profile(size),
    }


def measure_ours(args, workdir: Path, source: Path, size: int, database_url: str | None, tag: str) -> dict:
    """Our server over the WebSocket protocol, from the reference client (ddxclient)."""

    def client(server: LiveServer, token: str) -> tuple[list[str], Path]:
        command = [sys.executable, "-m", "ddxclient", "upload", str(source), "--server", server.url, "--token", token]
        return [*command, "--quiet"], ROOT

    def outcome(stdout: str) -> dict:
        # "complete <id> <size> bytes sha256 <hex>": the client checked the server's sha256 against its own.
        _word, upload_id, stored_size, *_rest = stdout.split()
        if int(stored_size) != size:
            raise RuntimeError(f"client reported {stored_size} bytes, expected {size}")
        return {"upload_id": upload_id}

    return measure_our_server(args, workdir, "ours", f"alice{tag}", size, database_url, client, outcome)


def measure_our_server(
    args, workdir: Path, name: str, username: str, size: int, database_url: str | None, client, outcome
) -> dict:
    """A fresh server of ours (the bench's database, storage and env) receiving one upload from ``client``.

    ``client(server, token)`` gives the client's command and folder; ``outcome(stdout)`` checks what it
    printed and returns figures of its own. Timed by the server's log: from the first ``writer ready``
    of this upload to ``upload.completed``.
    """
    settings = dict(args.server_env)
    store, spool, prefix = args.store, workdir / name / "spool", f"{args.store_prefix}{username}/"
    if store:
        settings.update(store.server_settings(prefix, spool))
    server = LiveServer(workdir / name, database_url=database_url, redis_url=os.environ.get("REDIS_URL"), **settings)
    server.migrate()
    token = server.create_user(username)
    server.start()
    landed = None
    try:
        time.sleep(args.settle)
        idle, cpu_before = server.rss(), (server.cpu_seconds(), thread_cpu(server.pid))
        store_cpu = store.cpu_seconds() if store else 0.0
        storage = server.storage
        log_start = server.log_path.stat().st_size
        if store:
            # Nothing lands in a folder: the durable offset from the database, and the spool's size.
            landed = DurableOffset(server.env["DATABASE_URL"])
            sampler = Sampler(server.pid, landed, args.sample, gauge=lambda: tree_bytes(spool))
        else:
            sampler = Sampler(server.pid, lambda: dir_bytes(storage / "partial", storage / "files"), args.sample)
        sampler.start()
        spy = PySpy(args.py_spy, server.pid, workdir / f"{username}.pyspy.txt", args.py_spy_args)
        command, folder = client(server, token)
        client_cpu, started = children_cpu(), time.monotonic()
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=3600)
        client_wall, client_cpu = time.monotonic() - started, children_cpu() - client_cpu
        spy.stop()
        sampler.stop()
        if done.returncode:
            raise RuntimeError(f"{command[:3]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        own = outcome(done.stdout)
        seconds = log_seconds(server.log_path, "writer ready", UPLOAD_COMPLETE, since=log_start, first=True)
        figures = server_figures(server.pid, idle, cpu_before, sampler, size, seconds)
        if store:
            figures.update(store_figures(store, store_cpu, size), spool_peak=sampler.gauge_peak)
            finished = store.object_sizes(f"{prefix}files/")
            if list(finished.values()) != [size]:
                raise RuntimeError(f"expected one finished object of {size} bytes, found {finished}")
        else:
            finished = list((storage / "files").iterdir())
            if [path.stat().st_size for path in finished] != [size]:
                raise RuntimeError(f"expected one finished file of {size} bytes, found {finished}")
        figures.update(client_wall=client_wall, client_cpu_per_gib=client_cpu / (size / GiB), **own)
        # Writer sessions: WebSocket connections, or tus PATCHes.
        figures["patches"] = log_count(server.log_path, "writer ready", since=log_start)
        return figures
    finally:
        if landed is not None:
            landed.close()
        server.stop()
        shutil.rmtree(server.storage, ignore_errors=True)
        shutil.rmtree(spool, ignore_errors=True)


def store_figures(store: ObjectStore, cpu_before: float, size: int) -> dict:
    """SeaweedFS's CPU during one upload (not the server's: shown apart) and its RSS after it."""
    return {"store_cpu_per_gib": (store.cpu_seconds() - cpu_before) / (size / GiB), "store_rss": store.rss()}


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server {process.args[:2]} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"server {process.args[:2]} did not listen in time")


def measure_bare(args, workdir: Path, source: Path, size: int, tag: str) -> dict:
    folder = workdir / "bare"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "bare.log"
    env = {**os.environ, **args.server_env}
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "bench/bare_consumer.py", "serve", "--port", str(port), "--dir", str(folder)],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(port, server)
        time.sleep(args.settle)
        idle, cpu_before = proc_status(server.pid), (proc_cpu_seconds(server.pid), thread_cpu(server.pid))
        sampler = Sampler(server.pid, lambda: dir_bytes(folder), args.sample)
        sampler.start()
        spy = PySpy(args.py_spy, server.pid, workdir / f"bare{tag}.pyspy.txt", args.py_spy_args)
        client_cpu, started = children_cpu(), time.monotonic()
        done = subprocess.run(
            [sys.executable, "bench/bare_consumer.py", "send", "--server", f"http://127.0.0.1:{port}", str(source)],
            cwd=ROOT, capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        client_wall, client_cpu = time.monotonic() - started, children_cpu() - client_cpu
        spy.stop()
        sampler.stop()
        if done.returncode:
            raise RuntimeError(f"bare sender exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        seconds = log_seconds(log_path, "bare ready", "bare complete")
        figures = server_figures(server.pid, idle, cpu_before, sampler, size, seconds)
        if dir_bytes(folder) != size:
            raise RuntimeError(f"bare consumer wrote {dir_bytes(folder)} bytes, expected {size}")
        figures.update(client_wall=client_wall, client_cpu_per_gib=client_cpu / (size / GiB))
        return figures
    finally:
        stop_process(server)
        shutil.rmtree(folder, ignore_errors=True)


def stop_process(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tus_install(cache: Path) -> Path:
    """bench/tus installed into ``cache`` (``npm ci``), reused while package.json and the lock file are unchanged.

    The scripts are copied next to node_modules on every run: Node resolves ES
    module imports from the script's own folder, and the repository must not
    grow a node_modules.
    """
    npm = shutil.which("npm")
    cache.mkdir(parents=True, exist_ok=True)
    lock = hashlib.sha256(b"".join((TUS_SOURCE / name).read_bytes() for name in TUS_FILES[:2])).hexdigest()
    stamp = cache / ".installed"
    if not (cache / "node_modules").is_dir() or not stamp.exists() or stamp.read_text() != lock:
        for name in TUS_FILES[:2]:
            shutil.copyfile(TUS_SOURCE / name, cache / name)
        out(f"installing bench/tus into {cache} (npm ci) ...")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--omit=optional", "--loglevel=error"],
            cwd=cache, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode:
            raise SystemExit(f"npm ci in {cache} failed (--no-tus runs without it):\n{done.stdout}\n{done.stderr}")
        stamp.write_text(lock)
    for name in TUS_FILES[2:]:
        shutil.copyfile(TUS_SOURCE / name, cache / name)
    return cache


def measure_tus(args, workdir: Path, source: Path, size: int, tag: str) -> dict:
    folder = workdir / "tus"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "tus.log"
    store, env = args.store, dict(os.environ)
    if store:
        # @tus/s3-store spools each part in os.tmpdir(): a folder of its own, sampled like ours.
        server_args = ["--store", "s3", "--endpoint", store.endpoint, "--bucket", store.bucket,
                       "--part-size", str(args.tus_part_size)]  # fmt: skip
        env.update(store.credentials(), TMPDIR=str(folder))
    else:
        server_args = ["--dir", str(folder), *(["--no-fsync"] if args.tus_no_fsync else [])]
    with open(log_path, "ab") as log:
        server = subprocess.Popen(
            ["node", "server.mjs", "--port", str(port), *server_args],
            cwd=args.tus_home, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(port, server)
        time.sleep(args.settle)
        idle, cpu_before = proc_status(server.pid), (proc_cpu_seconds(server.pid), thread_cpu(server.pid))
        store_cpu = store.cpu_seconds() if store else 0.0
        if store:
            # Nothing lands where the bench can count it cheaply; the spool's peak is the figure.
            sampler = Sampler(server.pid, lambda: 0, args.sample, gauge=lambda: tree_bytes(folder))
        else:
            sampler = Sampler(server.pid, lambda: dir_bytes(folder), args.sample)
        sampler.start()
        client_cpu, started = children_cpu(), time.monotonic()
        done = subprocess.run(
            ["node", "upload.mjs", "--endpoint", f"http://127.0.0.1:{port}/files/",
             "--chunk-size", chunk_argument(args.tus_chunk_size), str(source)],
            cwd=args.tus_home, capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        client_wall, client_cpu = time.monotonic() - started, children_cpu() - client_cpu
        sampler.stop()
        if done.returncode:
            raise RuntimeError(f"tus-js-client exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        seconds = log_seconds(log_path, "tus ready", "tus durable")
        figures = server_figures(server.pid, idle, cpu_before, sampler, size, seconds)
        # Without the final fsync (what @tus/file-store alone promises): up to the last byte written.
        figures["mb_s_unsynced"] = size / log_seconds(log_path, "tus ready", "tus finished") / 1e6
        if store:
            figures.update(store_figures(store, store_cpu, size), spool_peak=sampler.gauge_peak)
            key = json.loads(done.stdout.strip().splitlines()[-1])["url"].rstrip("/").rsplit("/", 1)[-1]
            if store.object_size(key) != size:
                raise RuntimeError(f"expected an object {key} of {size} bytes, found {store.object_size(key)}")
        else:
            stored = [path for path in folder.iterdir() if path.suffix != ".json"]
            if [path.stat().st_size for path in stored] != [size]:
                raise RuntimeError(f"expected one tus file of {size} bytes, found {stored}")
        figures.update(
            client_wall=client_wall, client_cpu_per_gib=client_cpu / (size / GiB), chunk_size=args.tus_chunk_size
        )
        return figures
    finally:
        stop_process(server)
        shutil.rmtree(folder, ignore_errors=True)


def chunk_argument(chunk_size: int) -> str:
    """upload.mjs's --chunk-size: 0 is tus-js-client's default (Infinity: one PATCH per attempt)."""
    return str(chunk_size) if chunk_size else "default"


def chunk_label(chunk_size: int) -> str:
    return f"{mib(chunk_size)} PATCHes" if chunk_size else "one PATCH (chunkSize default)"


def parse_chunk_size(text: str) -> int:
    if text.lower() in ("default", "infinity", "0"):
        return 0
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("a positive number of bytes, or 'default'")
    return value


def measure_ours_tus(args, workdir: Path, source: Path, size: int, database_url: str | None, tag: str) -> dict:
    """Our server over tus (/api/tus/), from tus-js-client in Node with the tus peer's chunk size."""

    def client(server: LiveServer, token: str) -> tuple[list[str], Path]:
        return [
            "node", "upload.mjs", "--endpoint", f"{server.url}/api/tus/",
            "--header", f"Authorization: Token {token}", "--metadata", f"sha256={args.source_sha256}",
            "--chunk-size", chunk_argument(args.tus_chunk_size), str(source),
        ], args.tus_home  # fmt: skip

    def outcome(stdout: str) -> dict:
        # The declared sha256 was verified by the server before it answered the last PATCH (460 otherwise).
        url = json.loads(stdout.strip().splitlines()[-1])["url"]
        return {"upload_id": url.rstrip("/").rsplit("/", 1)[-1], "chunk_size": args.tus_chunk_size}

    return measure_our_server(args, workdir, "ours_tus", f"tus{tag}", size, database_url, client, outcome)


def log_count(log_path: Path, marker: str, *, since: int = 0) -> int:
    with open(log_path, "rb") as handle:
        handle.seek(since)
        return sum(marker in line for line in handle.read().decode(errors="replace").splitlines())


def measure_disk(workdir: Path, source: Path, size: int) -> dict:
    target = workdir / "disk.bin"
    buffer = bytearray(MiB)
    started = time.monotonic()
    with open(source, "rb", buffering=0) as reader, open(target, "wb", buffering=0) as writer:
        while count := reader.readinto(buffer):
            view = memoryview(buffer)[:count]
            while view:
                view = view[writer.write(view) :]
        os.fsync(writer.fileno())
    seconds = time.monotonic() - started
    target.unlink()
    return {"seconds": seconds, "mb_s": size / seconds / 1e6}


# --- PostgreSQL scratch database ------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(url: str | None):
    """A new database next to DATABASE_URL's (``<name>_bench_<pid>``), dropped afterwards; None for SQLite."""
    if not url or not url.startswith(("postgres://", "postgresql://")):
        yield None
        return
    import psycopg

    parts = urlsplit(url)
    name = f"{(parts.path.lstrip('/') or 'ddx')}_bench_{os.getpid()}"
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- report ---------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(rounds: list[dict], size: int, backend: str = "local") -> dict:
    kinds = [kind for kind in KINDS if kind in rounds[0]]
    s3 = backend == "s3"

    def median(kind, key):
        values = [r[kind][key] for r in rounds if kind in r and key in r[kind]]
        return statistics.median(values) if values else None

    def ratio(numerator, denominator, key="mb_s"):
        return statistics.median(r[numerator][key] / max(r[denominator][key], 1e-9) for r in rounds)

    summary = {"size": size, "rounds": len(rounds), "backend": backend}
    out()
    out(f"=== summary: {size} bytes ({size / GiB:.2f} GiB), median of {len(rounds)} round(s) ===")
    for kind in kinds:
        mb_s, seconds = median(kind, "mb_s"), median(kind, "seconds")
        line = f"{kind:8} {mb_s:8.1f} MB/s  {seconds:7.2f} s"
        if kind != "disk":
            line += (
                f"  server CPU {median(kind, 'cpu_per_gib'):5.2f} s/GiB"
                f" (loop thread {median(kind, 'loop_cpu_per_gib'):4.2f},"
                f" other threads {median(kind, 'other_threads_cpu_per_gib'):4.2f})"
                f"  client CPU {median(kind, 'client_cpu_per_gib'):5.2f} s/GiB"
                f"  client wall {median(kind, 'client_wall'):7.2f} s"
            )
        if kind == "tus" and not s3:
            line += f"  (without the final fsync {median(kind, 'mb_s_unsynced'):.1f} MB/s)"
        if kind == "ours_tus":
            line += f"  ({median(kind, 'patches'):.0f} PATCH(es))"
        out(line)
        if median(kind, "store_cpu_per_gib") is not None:
            out(f"{'':8} SeaweedFS CPU {median(kind, 'store_cpu_per_gib'):5.2f} s/GiB (not counted above), "
                f"spool peak {mib(median(kind, 'spool_peak'))}")  # fmt: skip
        summary[kind] = {key: median(kind, key) for key in rounds[0][kind] if key != "upload_id"}
    # (numerator, denominator, summary key of the MB/s ratio; the CPU and growth ratios are prefixed)
    pairs = [("ours", other, other) for other in ("bare", "tus", "disk")]
    pairs += [("ours_tus", other, f"ours_tus_{other}") for other in ("tus", "ours", "disk")]
    for numerator, denominator, key in pairs:
        if numerator not in kinds or denominator not in kinds:
            continue
        summary[f"ratio_{key}"] = mb_ratio = ratio(numerator, denominator)
        line = f"{numerator} / {denominator}: {mb_ratio:.2f}x MB/s"
        if denominator != "disk":
            cpu = ratio(numerator, denominator, "cpu_per_gib")
            growth = statistics.median(r[numerator]["growth"] / max(r[denominator]["growth"], 1) for r in rounds)
            summary[f"cpu_ratio_{key}"], summary[f"growth_ratio_{key}"] = cpu, growth
            line += f", {cpu:.2f}x server CPU per GiB, {growth:.2f}x peak RSS growth"
        out(line)
    for kind in kinds:
        if kind == "disk":
            continue
        s = summary[kind]
        out(
            f"{kind:8} RSS: idle {mib(s['idle_rss'])}, HWM before upload {mib(s['hwm_before'])}, "
            f"peak (VmHWM) {mib(s['peak_rss'])}, growth {mib(s['growth'])}, after {mib(s['rss_after'])}"
        )
        if "rss_third" in s:
            out(
                f"{kind:8} RSS at 1/3 of the bytes {mib(s['rss_third'])} (VmHWM {mib(s['hwm_third'])}), "
                f"max RSS from 1/3 on {mib(s['rss_max_after_third'])}, "
                f"at the end {mib(s['rss_end'])} (VmHWM {mib(s['hwm_end'])})"
            )
    out()
    if "ours" in kinds:
        ours = summary["ours"]
        if "ratio_bare" in summary:
            value = summary["ratio_bare"]
            out(f"target ours >= {TARGET_RATIO:.1f}x bare consumer: {value:.2f}x {verdict(value >= TARGET_RATIO)}"
                f" (stretch {STRETCH_RATIO:.1f}x: {verdict(value >= STRETCH_RATIO)})")  # fmt: skip
        if "ratio_tus" in summary:
            value = summary["ratio_tus"]
            label = chunk_label(rounds[0]["tus"]["chunk_size"])
            out(f"target ours >= {TARGET_TUS_RATIO:.1f}x {tus_label(s3)} ({label}): "
                f"{value:.2f}x {verdict(value >= TARGET_TUS_RATIO)}")  # fmt: skip
        cpu = ours["cpu_per_gib"]
        out(f"target server CPU <= {TARGET_CPU_PER_GIB:.1f} s/GiB: {cpu:.2f} {verdict(cpu <= TARGET_CPU_PER_GIB)}")
        # The peak itself is not a target: it is the idle size (which grows with what the server imports)
        # plus the growth, and the spec bounds the growth.
        out(f"peak server RSS (idle + growth, not a target): {mib(ours['peak_rss'])}")
        growth = ours["growth"]
        out(f"target RSS growth <= {mib(TARGET_GROWTH)}: {mib(growth)} {verdict(growth <= TARGET_GROWTH)}")
        if "rss_third" in ours:
            late = ours["hwm_end"] - ours["hwm_third"]
            summary["late_growth"] = late
            out(f"target peak RSS growth from 1/3 of the bytes to the end <= {mib(TARGET_LATE_GROWTH)}: {mib(late)} "
                f"{verdict(late <= TARGET_LATE_GROWTH)}")  # fmt: skip
    if "ours_tus" in kinds:
        ours_tus = summary["ours_tus"]
        label = chunk_label(rounds[0]["ours_tus"]["chunk_size"])
        if "ratio_ours_tus_tus" in summary:
            value = summary["ratio_ours_tus_tus"]
            out(f"target tus-js-client (Node, {label}) -> ours over tus >= {TARGET_OURS_TUS_RATIO:.1f}x "
                f"-> {tus_label(s3)}: {value:.2f}x {verdict(value >= TARGET_OURS_TUS_RATIO)}")  # fmt: skip
        cpu = ours_tus["cpu_per_gib"]
        # Issue 13's 2.0 s/GiB is for the local disk; issue 14's bound for the object store is 3.0, as over WebSocket.
        bound = TARGET_CPU_PER_GIB if s3 else TARGET_OURS_TUS_CPU_PER_GIB
        out(f"target ours over tus server CPU <= {bound:.1f} s/GiB (sha256, durability): "
            f"{cpu:.2f} {verdict(cpu <= bound)}")  # fmt: skip
        growth = ours_tus["growth"]
        out(f"target ours over tus RSS growth <= {mib(TARGET_GROWTH)}: {mib(growth)} "
            f"{verdict(growth <= TARGET_GROWTH)}")  # fmt: skip
        if "rss_third" in ours_tus:
            late = ours_tus["hwm_end"] - ours_tus["hwm_third"]
            summary["ours_tus_late_growth"] = late
            out(f"target ours over tus peak RSS growth from 1/3 of the bytes to the end <= {mib(TARGET_LATE_GROWTH)}: "
                f"{mib(late)} {verdict(late <= TARGET_LATE_GROWTH)}")  # fmt: skip
    return summary


def tus_label(s3: bool) -> str:
    return "@tus/server + @tus/s3-store" if s3 else "@tus/server"


def report_resume(results: list[dict]) -> dict:
    """One line per resume on server B, and the target: under a second at every offset."""
    out()
    out("=== resume on another host (server A killed with SIGKILL; B: own spool, same database and bucket) ===")
    for r in results:
        if r["transport"] == "ws":
            detail = (f"WebSocket connect -> ready {r['seconds'] * 1000:6.0f} ms"
                      f" (fresh ticket GET {r['ticket_seconds'] * 1000:.0f} ms before it)")  # fmt: skip
        else:
            detail = (f"tus HEAD {r['head_seconds'] * 1000:.0f} ms + PATCH -> writer ready"
                      f" {r['patch_seconds'] * 1000:.0f} ms = {r['seconds'] * 1000:6.0f} ms")  # fmt: skip
        out(f"{r['transport']:3} at offset {r['target']:>12} ({mib(r['target'])}): {detail}")
    worst = max(r["seconds"] for r in results)
    out(f"target resume on another host < {TARGET_RESUME_SECONDS:.1f} s at every offset: worst {worst * 1000:.0f} ms "
        f"{verdict(worst < TARGET_RESUME_SECONDS)}")  # fmt: skip
    return {"resume": results, "resume_worst_seconds": worst}


def resume_offset(size: int, fraction: float, part: int = TUS_PART) -> int:
    """An offset near ``fraction`` of the file, 3 MiB past a part boundary: a resume reads back a tail."""
    return int(size * fraction) // part * part + 3 * MiB


def parse_env(items: list[str]) -> dict[str, str]:
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--server-env wants NAME=VALUE, got {item!r}")
        pairs[name] = value
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size", type=int, default=GiB, help=f"bytes to upload (default 1 GiB; {REFERENCE_SIZE} is the reference)"
    )
    parser.add_argument(
        "--file", type=Path, help="use (or create, with --keep-file) this file instead of a temporary one"
    )
    parser.add_argument("--keep-file", action="store_true", help="keep the generated file for the next run")
    parser.add_argument("--workdir", type=Path, help="where servers keep their storage (default: a temporary folder)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat every peer this many times, interleaved; medians reported"
    )
    parser.add_argument(
        "--only", choices=KINDS, action="append", help=f"run only these peers (repeatable; all: {', '.join(KINDS)})"
    )
    parser.add_argument(
        "--no-tus", action="store_true", help="leave out the tus-js-client peers, ours_tus and tus (no Node needed)"
    )
    parser.add_argument(
        "--backend", choices=("local", "s3"), default="local",
        help="where ours stores: the local disk (default), or s3: a SeaweedFS started for the run, "
        "against @tus/server + @tus/s3-store on the same bucket",
    )  # fmt: skip
    parser.add_argument(
        "--tus-chunk-size", type=parse_chunk_size, default=None, metavar="BYTES|default",
        help="tus-js-client's PATCH size for ours_tus and tus (4 MiB; with --backend s3 'default'); 'default' is "
        "its own chunkSize Infinity: one PATCH whose body is the whole file",
    )  # fmt: skip
    parser.add_argument(
        "--tus-part-size", type=int, default=TUS_PART, help="@tus/s3-store's partSize with --backend s3 (8 MiB)"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="with --backend s3, leave out the resume-on-another-host figure"
    )
    parser.add_argument(
        "--resume-lease", type=int, default=10,
        help="slot lease (s) of the resume servers: B is contacted once A's lease has run out (default 10)",
    )  # fmt: skip
    parser.add_argument(
        "--tus-cache", type=Path, default=DEFAULT_TUS_CACHE, help=f"where bench/tus is installed ({DEFAULT_TUS_CACHE})"
    )
    parser.add_argument(
        "--tus-no-fsync", action="store_true", help="the tus server skips its one fsync at the end (stock file store)"
    )
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="NAME=VALUE",
        help="extra environment for ours, ours_tus and bare (not tus), e.g. MALLOC_ARENA_MAX=2",
    )  # fmt: skip
    parser.add_argument("--sample", type=float, default=0.2, help="RSS sampling interval in seconds (default 0.2)")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds before measuring idle RSS")
    parser.add_argument(
        "--py-spy", metavar="PATH", help="record each Python server with this py-spy binary (raw stacks in workdir)"
    )
    parser.add_argument(
        "--py-spy-args", default="", metavar="ARGS", help="extra py-spy record options, e.g. '--gil' or '--idle'"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    args.server_env = parse_env(args.server_env)
    args.py_spy_args = tuple(shlex.split(args.py_spy_args))
    s3 = args.backend == "s3"
    if args.tus_chunk_size is None:
        args.tus_chunk_size = 0 if s3 else TUS_CHUNK
    default_kinds = S3_KINDS if s3 else KINDS
    kinds = [
        kind for kind in KINDS if kind in (args.only or default_kinds) and not (args.no_tus and kind in NODE_KINDS)
    ]
    args.store, args.store_prefix = None, ""

    out(f"DirectDriveX upload benchmark, {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    database = "PostgreSQL" if (os.environ.get("DATABASE_URL") or "").startswith("postgres") else "SQLite"
    layer = "Redis" if os.environ.get("REDIS_URL") else "in-memory"
    out(f"database: {database}, channel layer: {layer}, storage: {args.backend}, server env: {args.server_env}")
    node_kinds = [kind for kind in kinds if kind in NODE_KINDS]
    if node_kinds and not (shutil.which("node") and shutil.which("npm")):
        if args.only:
            raise SystemExit(f"--only {' / '.join(node_kinds)} needs node and npm on PATH")
        out("node or npm not found: the tus-js-client peers are left out (--no-tus says so explicitly)")
        kinds = [kind for kind in kinds if kind not in NODE_KINDS]
    if not kinds:
        raise SystemExit("no peer left to run")
    if any(kind in NODE_KINDS for kind in kinds):
        args.tus_home = tus_install(args.tus_cache)
        out(f"tus-js-client: {chunk_label(args.tus_chunk_size)}")

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ddx-bench-")))
        workdir.mkdir(parents=True, exist_ok=True)
        source = args.file or workdir / "upload.bin"
        if source.exists():
            if source.stat().st_size != args.size:
                raise SystemExit(f"{source} has {source.stat().st_size} bytes, not --size {args.size}")
            out(f"reusing {source}")
        else:
            make_file(source, args.size)
            if not args.keep_file:  # only a file this run made is deleted
                stack.callback(source.unlink, missing_ok=True)
        if s3:
            args.store = ObjectStore(workdir / "seaweedfs")
            stack.callback(args.store.stop)
            out(f"SeaweedFS (weed mini) answering on {args.store.start()}, bucket {args.store.bucket}, "
                f"pid {args.store.pid}")  # fmt: skip
            args.store_prefix = f"bench-{os.getpid()}/"
            if "tus" in kinds:
                out(f"@tus/s3-store: parts of {mib(args.tus_part_size)}")
        if "ours_tus" in kinds or (s3 and not args.no_resume):
            # Declared in Upload-Metadata as the reference client declares it; the server verifies it.
            with open(source, "rb") as handle:
                args.source_sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
        database_url = stack.enter_context(scratch_database(os.environ.get("DATABASE_URL")))
        rounds = []
        for number in range(1, args.rounds + 1):
            figures: dict = {}
            for kind in kinds:
                out(f"round {number}: {kind} (load {os.getloadavg()[0]:.2f}) ...")
                tag = str(number)
                if kind == "ours":
                    figures[kind] = measure_ours(args, workdir, source, args.size, database_url, tag)
                elif kind == "ours_tus":
                    figures[kind] = measure_ours_tus(args, workdir, source, args.size, database_url, tag)
                elif kind == "bare":
                    figures[kind] = measure_bare(args, workdir, source, args.size, tag)
                elif kind == "tus":
                    figures[kind] = measure_tus(args, workdir, source, args.size, tag)
                else:
                    figures[kind] = measure_disk(workdir, source, args.size)
                out(f"round {number}: {kind} {figures[kind]['mb_s']:.1f} MB/s in {figures[kind]['seconds']:.2f} s")
            rounds.append(figures)
        summary = report(rounds, args.size, args.backend)
        if s3 and not args.no_resume:
            results = []
            for transport in ("ws", "tus"):
                for fraction in RESUME_FRACTIONS:
                    target = resume_offset(args.size, fraction)
                    out(f"resume: {transport} at {target} (load {os.getloadavg()[0]:.2f}) ...")
                    results.append(
                        measure_resume(
                            args.store, workdir, source, args.size, args.source_sha256,
                            database_url or f"sqlite:///{workdir / 'resume.sqlite3'}",
                            transport=transport, target=target, lease=args.resume_lease,
                            prefix=f"{args.store_prefix}resume-{transport}-{target}/", server_env=args.server_env,
                        )
                    )  # fmt: skip
            summary.update(report_resume(results))
        summary["server_env"] = args.server_env
        summary["all_rounds"] = rounds
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
