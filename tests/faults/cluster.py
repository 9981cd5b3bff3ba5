"""A deployment of several server processes for the fault suite, the clients that upload to it, and its invariants.

A ``Cluster`` is what production runs on more than one host: ``manage.py
serve`` processes ("hosts") sharing one PostgreSQL database and one Redis,
and either one storage folder (``local``) or one bucket prefix with a spool
folder per host (``s3``, SeaweedFS), optionally behind nginx, with the slot
reaper running beside them (``manage.py slots reaper``) as docs/deployment.md
says. Every host keeps its own log, so a test can scan them for internal errors.

Clients are real ones in subprocesses, resuming by themselves: the reference
client (``python -m ddxclient``, WebSocket) and tuspy (tests/faults/tus_client.py).
The invariants are read from the database itself and from storage, never from
what the servers say about themselves.
"""

import contextlib
import hashlib
import http.client
import json
import logging
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

import psycopg

from tests.faults.tally import TALLY
from tests.support import seaweedfs, stored
from tests.support.files import write_random
from tests.support.live_backend import Backend, http_call
from tests.support.live_server import ROOT, LiveServer
from tests.support.nginx import Nginx

log = logging.getLogger(__name__)

MiB = 1024 * 1024
LEASE_SECONDS = 5
REAPER_INTERVAL = 1
METRICS_TOKEN = "faults-metrics-" + "m" * 32
CLIENT_TIMEOUT = 600

# What fsck may find after kill -9 of a writer, all bytes nobody will read: a tail or part the killed writer
# stored before its commit recorded it (leftover_part once the upload completed elsewhere, leftover_tail,
# abandoned_session, extra_parts). --repair deletes them; the reaper's hourly sweep does too.
CRASH_LEFTOVERS = {"leftover_part", "leftover_tail", "abandoned_session", "extra_parts"}

# What a host's log says when something went wrong inside it (logfmt level=ERROR, an uncaught
# traceback, Daphne's access log of a 500), as opposed to a refusal the protocol defines.
INTERNAL_ERROR = re.compile(r"level=(ERROR|CRITICAL)\b|^Traceback |\" 500 |status=500\b|code=1011\b", re.MULTILINE)


@dataclass(frozen=True)
class Storage:
    """Where a cluster's bytes live: ``local`` (one folder shared by every host) or ``s3`` (one bucket prefix)."""

    kind: str
    endpoint: str = ""
    bucket: str = ""

    def settings(self, root: Path, host: str, prefix: str) -> dict:
        if self.kind == "local":
            return {"DIRECTDRIVEX_STORAGE_BACKEND": "local"}
        return {
            "DIRECTDRIVEX_STORAGE_BACKEND": "s3",
            "DIRECTDRIVEX_S3_ENDPOINT_URL": self.endpoint,
            "DIRECTDRIVEX_S3_BUCKET": self.bucket,
            "DIRECTDRIVEX_S3_PREFIX": prefix,
            "DIRECTDRIVEX_S3_REGION": seaweedfs.REGION,
            "DIRECTDRIVEX_SPOOL_DIR": root / host / "spool",
            "AWS_ACCESS_KEY_ID": seaweedfs.ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": seaweedfs.SECRET_ACCESS_KEY,
        }


class Row(NamedTuple):
    id: uuid.UUID
    offset: int
    size: int
    status: str


@dataclass(frozen=True)
class Site:
    """What the deployments of one test module share: the database (and Redis), the storage backend and where
    on it their bytes go. Sharing them across the module's tests is what lets fsck check the whole site."""

    backend: Backend
    storage: Storage
    storage_dir: Path  # local: the one folder
    prefix: str  # s3: the one prefix of the bucket


class Cluster:
    def __init__(self, root: Path, site: Site, **settings):
        self.root = Path(root)
        self.site = site
        self.backend = site.backend
        self.storage = site.storage
        self.prefix = site.prefix
        self.settings = {
            "DIRECTDRIVEX_SLOT_LEASE_SECONDS": LEASE_SECONDS,
            "DIRECTDRIVEX_METRICS_TOKEN": METRICS_TOKEN,
            **settings,
        }
        self.hosts: dict[str, LiveServer] = {}
        self.reaper: subprocess.Popen | None = None
        self.nginx: Nginx | None = None
        self._stack = contextlib.ExitStack()
        self._log_marks: dict[Path, int] = {}

    # --- processes ----------------------------------------------------------------------------

    def host(self, name: str, *, start: bool = True, python_args: tuple[str, ...] = (), **settings) -> LiveServer:
        """A server process of this deployment on its own port, with its own log and spool folder."""
        server = LiveServer(
            self.root / name,
            database_url=self.backend.database_url,
            redis_url=self.backend.redis_url,
            storage_dir=self.site.storage_dir,  # shared: the local backend's one folder
            PROMETHEUS_MULTIPROC_DIR=self.root / name / "prometheus",
            **self.storage.settings(self.root, name, self.prefix),
            **{**self.settings, **settings},
        )
        server.python_args = list(python_args)
        self.hosts[name] = server
        self._stack.callback(server.stop)
        if start:
            server.start(timeout=60)
        return server

    def start_reaper(self) -> None:
        """The slot reaper beside the servers, as a deployment runs it: stuck leases are freed within a pass."""
        any_host = next(iter(self.hosts.values()))
        log_file = open(self.root / "reaper.log", "ab")  # noqa: SIM115 - the child's for its lifetime
        self.reaper = subprocess.Popen(
            [sys.executable, "manage.py", "slots", "reaper", "--interval", str(REAPER_INTERVAL)],
            cwd=ROOT, env=any_host.env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log_file.close()

        def stop_reaper():
            if self.reaper.poll() is None:
                self.reaper.terminate()
                try:
                    self.reaper.wait(15)
                except subprocess.TimeoutExpired:
                    self.reaper.kill()
                    self.reaper.wait(5)

        self._stack.callback(stop_reaper)

    def behind_nginx(self, *names: str) -> Nginx:
        """nginx (deploy/nginx.conf.template) load-balancing over the named hosts (all by default)."""
        upstreams = [self.hosts[name] for name in names or self.hosts]
        self.nginx = Nginx(self.root / "nginx", upstreams, static_root=self.root / "static")
        (self.root / "static").mkdir(exist_ok=True)
        self.nginx.start()
        self._stack.callback(self.nginx.stop)
        return self.nginx

    def close(self) -> None:
        self._stack.close()

    # --- users ----------------------------------------------------------------------------------

    def user(self, username: str) -> str:
        """A new user's API token."""
        return next(iter(self.hosts.values())).create_user(username)

    # --- what the database says -----------------------------------------------------------------

    def query(self, sql: str, *args) -> list[tuple]:
        with psycopg.connect(self.backend.database_url, autocommit=True, connect_timeout=10) as connection:
            return connection.execute(sql, args).fetchall()

    def active_slots(self) -> list[tuple]:
        """(id, kind, upload, holder process, lease expired?) of every slot not released."""
        return self.query(
            "SELECT id, kind, upload_id, holder_process, lease_expires_at <= now() FROM uploads_slot "
            "WHERE released_at IS NULL ORDER BY id"
        )

    def slots_held_by(self, pids: set[int]) -> list[tuple]:
        """Active slots whose holder is one of ``pids`` (holder_process is ``host:pid``)."""
        return [row for row in self.active_slots() if row[3] and int(row[3].rpartition(":")[2]) in pids]

    def settle_slots(self, *, dead: set[int] = frozenset(), timeout: float | None = None) -> list[tuple]:
        """Wait up to one lease and a reaper pass (plus slack) for every slot to be released; return what is left.

        With ``dead``, only the slots those (killed) processes held must go: the
        promise is that a crashed holder blocks nobody for more than one lease.
        """
        timeout = LEASE_SECONDS + 3 * REAPER_INTERVAL + 5 if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            left = self.slots_held_by(set(dead)) if dead else self.active_slots()
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        TALLY.check("no slot without a live holder one lease later")
        TALLY.leaked(len(left))
        return left

    def upload_row(self, filename: str) -> "Row | None":
        """The upload of ``filename`` as the database has it now (None before it is created)."""
        rows = self.query(
            'SELECT id, "offset", size, status FROM uploads_upload WHERE original_filename = %s', filename
        )
        return Row(*rows[0]) if rows else None

    def offset_of(self, filename: str) -> int:
        """The durable offset of the upload of ``filename`` (0 before it is created)."""
        row = self.upload_row(filename)
        return row.offset if row else 0

    def upload_rows(self) -> list[tuple]:
        """(id, status, size, offset, sha256) of every upload."""
        return self.query('SELECT id, status, size, "offset", sha256 FROM uploads_upload ORDER BY created_at')

    # --- what storage says ----------------------------------------------------------------------

    def finished_digests(self) -> Counter:
        """sha256 of every finished file (object) in storage, read back in blocks, counted."""
        host = next(iter(self.hosts.values()))
        return Counter(stored.finished_sha256(key, host) for key in stored.finished_keys(host))

    def leftovers(self) -> list[str]:
        """What unfinished uploads left in storage: part files (local); multipart uploads and tail objects (s3)."""
        if self.storage.kind == "local":
            return sorted(str(path) for path in (self.site.storage_dir / "partial").glob("*"))
        client = stored._server_backend(next(iter(self.hosts.values()))).where.client
        bucket = self.storage.bucket
        sessions = client.list_multipart_uploads(Bucket=bucket, Prefix=self.prefix).get("Uploads", [])
        tails = client.list_objects_v2(Bucket=bucket, Prefix=f"{self.prefix}tails/").get("Contents", [])
        return sorted(
            [f"multipart {item['Key']} {item['UploadId']} {item['Initiated']}" for item in sessions]
            + [f"tail {item['Key']} {item['Size']} {item['LastModified']}" for item in tails]
        )

    # --- what the logs say ----------------------------------------------------------------------

    def writers_of(self, upload_id: str) -> set[str]:
        """The hosts whose log says a writer of the upload started there (``writer ready upload=<id>``)."""
        needle = f"writer ready upload={upload_id} "
        return {name for name, server in self.hosts.items() if needle in server.log_path.read_text(errors="replace")}

    def internal_errors(self, *, explained: tuple[str, ...] = ()) -> list[str]:
        """Lines of the hosts' logs (since the last call) that report an internal error, not a refusal.

        ``explained``: texts of ERROR lines that the fault itself makes a host write, and only that fault
        (a process frozen in the middle of its close wakes past the close's budget and says so). They are
        counted apart, never as internal errors, and only where a test names them.
        """
        found = []
        for path in [server.log_path for server in self.hosts.values()] + [self.root / "reaper.log"]:
            if not path.exists():
                continue
            text = path.read_text(errors="replace")
            start = self._log_marks.get(path, 0)
            self._log_marks[path] = len(text)
            found += [f"{path.parent.name}: {m.group(0)} …{line_around(text, m.start())}" for m in
                      INTERNAL_ERROR.finditer(text, start)]  # fmt: skip
        expected = [line for line in found if any(text in line for text in explained)]
        found = [line for line in found if line not in expected]
        TALLY.check("no internal error in any host's log")
        TALLY.errors(len(found), explained=len(expected))
        return found

    def fsck(self, *, repair: bool = False) -> tuple[int, str]:
        """``uploads fsck --json`` (with ``--repair``): its exit code and its output (the JSON report, then its log)."""
        host = next(iter(self.hosts.values()))
        args = ["uploads", "fsck", "--json"] + (["--repair"] if repair else [])
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=host.env, capture_output=True, text=True, timeout=300
        )
        TALLY.check("fsck")
        return done.returncode, done.stdout + done.stderr

    def fsck_mends(self) -> list[str]:
        """fsck over the whole site; what a crash may leave (an unrecorded tail or part of a killed writer) is mended
        by ``--repair``, after which fsck finds nothing. Returns the kinds mended; anything else fails the test."""
        code, report = self.fsck()
        if code == 0:
            return []
        kinds = self.findings(report)
        assert set(kinds) <= CRASH_LEFTOVERS, report
        repaired_code, repaired = self.fsck(repair=True)
        assert repaired_code == 0, repaired
        again, report = self.fsck()
        assert again == 0, report
        TALLY.repaired(len(kinds))
        return kinds

    def findings(self, report: str) -> list[str]:
        """The kinds of what an fsck output found."""
        return [finding["kind"] for finding in json.loads(report[: report.rindex("}") + 1])["findings"]]


def line_around(text: str, index: int) -> str:
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text[start : end if end >= 0 else None][:300]


# --- clients ---------------------------------------------------------------------------------------


@dataclass
class Source:
    """A file of random bytes on disk and its sha256."""

    path: Path
    size: int
    sha256: str


def source(folder: Path, name: str, size: int) -> Source:
    path = Path(folder) / name
    return Source(path, size, write_random(path, size))


class Client:
    """A real client in a subprocess uploading one file and resuming by itself after any interruption.

    ``ws``: the reference client (python -m ddxclient, WebSocket). ``tus``: tuspy
    (tests/faults/tus_client.py). Both print ``complete <upload id> <size> …`` at the end.
    """

    # Every client started and not yet killed: tests/faults/conftest.py kills what a failed test left running.
    started: "set[Client]" = set()

    def __init__(self, transport: str, url: str, token: str, src: Source, log_path: Path, *args: str):
        self.transport, self.src, self.log_path = transport, src, Path(log_path)
        if transport == "ws":
            command = [sys.executable, "-m", "ddxclient", "upload", str(src.path), "--server", url, "--token", token,
                       "--quiet", "--max-retries", "200", "--timeout", "20", *args]  # fmt: skip
        elif transport == "tus":
            command = [sys.executable, "-m", "tests.faults.tus_client", url, token, str(src.path), *args]
        else:
            raise ValueError(transport)
        with open(self.log_path, "wb") as output:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
        Client.started.add(self)

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float = CLIENT_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(f"{self.transport} client still running after {timeout}s:\n{self.output()}") from None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    @property
    def upload_id(self) -> str | None:
        found = re.search(r"^complete (\S+) ", self.output(), re.MULTILINE)
        return found.group(1) if found else None

    def kill(self) -> None:
        if self.alive():
            self.process.kill()
            self.process.wait(5)
        Client.started.discard(self)


def verify_upload(cluster: Cluster, server: LiveServer, token: str, upload_id: str, src: Source) -> None:
    """The upload is complete, the API says the client's size and sha256, and storage holds exactly those bytes."""
    answer = http_call(server, "GET", f"/api/uploads/{upload_id}/", token=token)
    detail = answer.json() if answer.status == 200 else {}
    intact = (
        detail.get("status") == "complete"
        and detail.get("size") == detail.get("offset") == src.size
        and detail.get("sha256") == src.sha256
        and cluster.finished_digests()[src.sha256] >= 1
    )
    TALLY.upload(src.size, intact=intact)
    assert intact, (answer.status, detail, src, cluster.finished_digests())


def download_sha256(base_url: str, path: str, token: str) -> tuple[int, str]:
    """GET ``path`` (streamed, in blocks): the status and the sha256 of the body."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("GET", path, headers={"Authorization": f"Token {token}"})
        response = connection.getresponse()
        digest = hashlib.sha256()
        while block := response.read(MiB):
            digest.update(block)
        return response.status, digest.hexdigest()
    finally:
        connection.close()


def wait_for(condition, what: str, timeout: float = 60, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
