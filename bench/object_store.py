"""bench/upload.py --backend s3: the run's SeaweedFS, what the bench reads of it, and the resume-on-another-host figure.

* ObjectStore: one `weed mini` for the run (tests/support/seaweedfs.py: free ports on 127.0.0.1, the test
  credentials, which make it check every signature), its bucket, the settings that point a server of ours
  at a prefix of it, and its process's CPU (shared by whichever peer is uploading, never counted as theirs).
* DurableOffset: the newest upload's durable offset read from the server's database, the "bytes landed"
  of the RSS sampler (nothing lands in a folder with s3).
* measure_resume: an upload started on server A up to an offset, A killed with SIGKILL, server B (its own
  spool folder, the same database and bucket) started, and the time from B's first contact to the
  upload taking bytes again: WebSocket connect -> ``ready``, or tus HEAD + PATCH -> the writer ready.
"""

import asyncio
import base64
import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import websockets

from tests.support import seaweedfs
from tests.support.live_server import LiveServer, proc_cpu_seconds, proc_status

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
# Python logging's default stamp (local time) and the server's logfmt stamp (UTC).
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
LOGFMT_TIME = re.compile(r"^time=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")


def tree_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder`` (the spool keeps a folder per process), 0 if it is gone."""
    total = 0
    for parent, _folders, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(parent, name)).st_size
    return total


class ObjectStore:
    """SeaweedFS for one run, in ``folder``; ``bucket`` made at start."""

    def __init__(self, folder: Path, bucket: str = seaweedfs.BUCKET):
        self.mini = seaweedfs.MiniServer(folder)
        self.bucket = bucket
        self.endpoint = ""
        self.client = None

    def start(self) -> str:
        self.endpoint = self.mini.start()
        seaweedfs.ensure_bucket(self.endpoint, self.bucket)
        self.client = seaweedfs.s3_client(self.endpoint)
        return self.endpoint

    def stop(self) -> None:
        self.mini.stop()

    @property
    def pid(self) -> int:
        return self.mini.process.pid

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss(self) -> int:
        return proc_status(self.pid)["VmRSS"]

    def credentials(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": seaweedfs.ACCESS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": seaweedfs.SECRET_ACCESS_KEY,
            "AWS_REGION": seaweedfs.REGION,
        }

    def server_settings(self, prefix: str, spool: Path) -> dict[str, str]:
        """The environment of a server of ours storing under ``prefix`` of the bucket, spooling in ``spool``."""
        return {
            "DIRECTDRIVEX_STORAGE_BACKEND": "s3",
            "DIRECTDRIVEX_S3_ENDPOINT_URL": self.endpoint,
            "DIRECTDRIVEX_S3_BUCKET": self.bucket,
            "DIRECTDRIVEX_S3_PREFIX": prefix,
            "DIRECTDRIVEX_S3_REGION": seaweedfs.REGION,
            "DIRECTDRIVEX_SPOOL_DIR": str(spool),
            **self.credentials(),
        }

    def object_sizes(self, prefix: str) -> dict[str, int]:
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = item["Size"]
        return found

    def object_size(self, key: str) -> int | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except self.client.exceptions.ClientError:
            return None


class DurableOffset:
    """Callable: the durable offset of the first upload created after this was made, in the database at ``url``.

    Read-only, from the bench's process (SQLite or PostgreSQL); the last value is kept when a read
    fails (SQLite busy). Uploads made earlier (the rounds before, on the same database) are ignored.
    """

    def __init__(self, url: str):
        self.url, self.last = url, 0
        self.connection = self._connect()
        mark = "?" if url.startswith("sqlite:///") else "%s"
        self.since = self.connection.execute("SELECT MAX(created_at) FROM uploads_upload").fetchone()[0]
        self.query = 'SELECT "offset" FROM uploads_upload'
        self.params: tuple = ()
        if self.since is not None:
            self.query += f" WHERE created_at > {mark}"
            self.params = (self.since,)
        self.query += " ORDER BY created_at LIMIT 1"

    def _connect(self):
        if self.url.startswith("sqlite:///"):
            import sqlite3

            path = self.url.removeprefix("sqlite:///")
            return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.1, check_same_thread=False)
        import psycopg

        return psycopg.connect(self.url, autocommit=True)

    def __call__(self) -> int:
        try:
            row = self.connection.execute(self.query, self.params).fetchone()
            self.last = int(row[0]) if row else 0
        except Exception:  # a busy database: keep the last value
            pass
        return self.last

    def close(self) -> None:
        self.connection.close()


# --- resume on another host ------------------------------------------------------------------


def log_stamp(line: str) -> float | None:
    """Epoch seconds of a server log line (logfmt stamps are UTC, logging's default ones local time)."""
    if match := LOGFMT_TIME.match(line):
        return datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
    if match := LOG_TIME.match(line):
        return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def first_log_time(log_path: Path, *markers: str, since: int = 0) -> float:
    with open(log_path, "rb") as handle:
        handle.seek(since)
        for line in handle.read().decode(errors="replace").splitlines():
            if all(marker in line for marker in markers) and (stamp := log_stamp(line)) is not None:
                return stamp
    raise RuntimeError(f"no line with {markers} in {log_path}")


def api(server: LiveServer, token: str, method: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        server.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"{}")


def ws_address(server: LiveServer, ws_url: str) -> str:
    return "ws://" + urlsplit(server.url).netloc + ws_url


def tus_metadata(**pairs: str) -> str:
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs.items())


def tus_request(server: LiveServer, token: str, method: str, path: str, headers: dict, body=None, length=None):
    """One tus request; ``body`` is an iterable of blocks of ``length`` bytes in all. Returns (status, headers)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    try:
        connection.putrequest(method, path)
        headers = {"Tus-Resumable": "1.0.0", "Authorization": f"Token {token}", **headers}
        if body is not None:
            headers.update({"Content-Type": "application/offset+octet-stream", "Content-Length": str(length)})
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        for block in body or ():
            connection.send(block)
        response = connection.getresponse()
        response.read()
        return response.status, response.headers
    finally:
        connection.close()


def file_blocks(path: Path, start: int, end: int, block: int = MiB):
    with open(path, "rb") as handle:
        handle.seek(start)
        while start < end:
            data = handle.read(min(block, end - start))
            if not data:
                raise RuntimeError(f"{path} is shorter than {end} bytes")
            start += len(data)
            yield data


def wait_durable(server: LiveServer, token: str, upload_id: str, offset: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api(server, token, "GET", f"/api/uploads/{upload_id}/")["offset"] >= offset:
            return
        time.sleep(0.1)
    raise RuntimeError(f"upload {upload_id} did not become durable up to {offset} within {timeout}s")


async def ws_start(server: LiveServer, token: str, source: Path, size: int, sha256: str, target: int):
    """Create an upload, send its first ``target`` bytes over the WebSocket and wait until they are durable.

    Returns (upload id, the open connection): A is killed with the connection still open, as in a crash.
    """
    info = await asyncio.to_thread(
        api, server, token, "POST", "/api/uploads/", {"filename": source.name, "size": size, "sha256": sha256}
    )
    ws = await websockets.connect(ws_address(server, info["ws_url"]), compression=None, max_size=MiB)
    ready = json.loads(await ws.recv())
    chunk, window, acked, sent = ready["chunk_size"], ready["window"], 0, 0
    for data in file_blocks(source, 0, target, chunk):
        while sent + len(data) - acked > window:
            message = json.loads(await ws.recv())
            acked = max(acked, message.get("offset", 0)) if message.get("type") == "ack" else acked
        await ws.send(data)
        sent += len(data)
    while acked < target:
        message = json.loads(await ws.recv())
        if message.get("type") == "ack":
            acked = max(acked, message["offset"])
    # Acked is written; durable comes with the next commit (after a second for the bytes that wait: a tail).
    await asyncio.to_thread(wait_durable, server, token, info["id"], target)
    return info["id"], ws


async def ws_resume(server: LiveServer, token: str, upload_id: str) -> dict:
    """Timed on server B: a fresh ticket (GET), then WebSocket connect -> ``ready``."""
    started = time.monotonic()
    info = await asyncio.to_thread(api, server, token, "GET", f"/api/uploads/{upload_id}/")
    connect = time.monotonic()
    async with websockets.connect(ws_address(server, info["ws_url"]), compression=None, max_size=MiB) as ws:
        message = json.loads(await ws.recv())
        ready = time.monotonic()
    if message.get("type") != "ready":
        raise RuntimeError(f"server B answered {message} instead of ready")
    return {
        "offset": message["offset"],
        "ticket_seconds": connect - started,
        "seconds": ready - connect,  # connect -> ready: the figure
    }


def tus_start(server: LiveServer, token: str, source: Path, size: int, sha256: str, target: int) -> str:
    """Create an upload over tus and PATCH its first ``target`` bytes (the answer says they are durable)."""
    status, headers = tus_request(
        server, token, "POST", "/api/tus/",
        {"Upload-Length": str(size), "Upload-Metadata": tus_metadata(filename=source.name, sha256=sha256)},
    )  # fmt: skip
    if status != 201:
        raise RuntimeError(f"tus POST answered {status}")
    path = urlsplit(headers["Location"]).path
    status, headers = tus_request(
        server, token, "PATCH", path, {"Upload-Offset": "0"}, file_blocks(source, 0, target), target
    )
    if status != 204 or int(headers["Upload-Offset"]) != target:
        raise RuntimeError(f"tus PATCH answered {status} at offset {headers.get('Upload-Offset')}")
    return path


def tus_resume(server: LiveServer, token: str, path: str, source: Path, size: int) -> dict:
    """Timed on server B: HEAD, then a PATCH of the rest from the offset it answered, until the writer is ready.

    The writer's ``writer ready`` log line is when the server starts taking the PATCH's body
    (admitted, the multipart upload, tails and sha256 state restored); the PATCH then carries the
    rest of the file, and its 204 means the server verified the declared sha256.
    """
    log_start = server.log_path.stat().st_size
    started = time.monotonic()
    status, headers = tus_request(server, token, "HEAD", path, {})
    head = time.monotonic() - started
    if status != 200:
        raise RuntimeError(f"tus HEAD on server B answered {status}")
    offset = int(headers["Upload-Offset"])
    patch_sent = time.time()
    status, headers = tus_request(
        server, token, "PATCH", path, {"Upload-Offset": str(offset)}, file_blocks(source, offset, size), size - offset
    )
    if status != 204 or int(headers["Upload-Offset"]) != size:
        raise RuntimeError(f"tus PATCH on server B answered {status} at offset {headers.get('Upload-Offset')}")
    upload_id = path.rstrip("/").rsplit("/", 1)[-1]
    writer_ready = first_log_time(server.log_path, "writer ready", upload_id, since=log_start)
    patch = max(0.0, writer_ready - patch_sent)
    return {"offset": offset, "head_seconds": head, "patch_seconds": patch, "seconds": head + patch}


def measure_resume(
    store: ObjectStore,
    workdir: Path,
    source: Path,
    size: int,
    sha256: str,
    database_url: str,
    *,
    transport: str,
    target: int,
    lease: int,
    prefix: str,
    server_env: dict,
) -> dict:
    """Start on A up to ``target``, kill -9 A, start B (own spool, same database and bucket), time the resume.

    Both servers get a ``lease``-second slot lease: a dead holder's slot is free once its lease runs
    out (docs/tus.md, docs/slots.md), and B is contacted only then, so the figure is B's own work.
    """
    folder = workdir / f"resume-{transport}-{target}"
    settings = {**server_env, "DIRECTDRIVEX_SLOT_LEASE_SECONDS": str(lease)}
    server_a = LiveServer(
        folder / "a", database_url=database_url, **settings, **store.server_settings(prefix, folder / "a" / "spool")
    )
    server_a.migrate()
    token = server_a.create_user(f"{transport}{target}")
    server_a.start()
    server_b = LiveServer(
        folder / "b", database_url=database_url, **settings, **store.server_settings(prefix, folder / "b" / "spool")
    )
    try:
        if transport == "ws":

            async def crash() -> str:
                upload_id, ws = await ws_start(server_a, token, source, size, sha256, target)
                server_a.kill()
                ws.transport.abort()
                return upload_id

            upload_id = asyncio.run(crash())
        else:
            path = tus_start(server_a, token, source, size, sha256, target)
            server_a.kill()
        killed = time.monotonic()
        server_b.start()
        time.sleep(max(0.0, killed + lease + 1 - time.monotonic()))
        if transport == "ws":
            figures = asyncio.run(ws_resume(server_b, token, upload_id))
            # The rest of the file, by the reference client (which checks the server's sha256 against its own).
            done = subprocess.run(
                [sys.executable, "-m", "ddxclient", "upload", str(source), "--resume", upload_id,
                 "--server", server_b.url, "--token", token, "--quiet"],
                cwd=ROOT, capture_output=True, text=True, timeout=3600,
            )  # fmt: skip
            if done.returncode:
                raise RuntimeError(f"ddxclient --resume exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        else:
            figures = tus_resume(server_b, token, path, source, size)
            upload_id = path.rstrip("/").rsplit("/", 1)[-1]
        if figures["offset"] != target:
            raise RuntimeError(f"server B resumed at {figures['offset']}, A had made {target} durable")
        finished = store.object_sizes(f"{prefix}files/")
        if sorted(finished.values()).count(size) < 1:
            raise RuntimeError(f"no finished object of {size} bytes under {prefix}files/: {finished}")
        figures.update(transport=transport, target=target, upload_id=upload_id)
        return figures
    finally:
        server_a.kill()
        server_b.stop()
