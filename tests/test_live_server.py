"""Real servers (`manage.py serve`, Daphne in subprocesses): big uploads, kill -9, SIGSTOP past the lease, busy.

Every test starts its own server process(es) on the module's database: a
fresh PostgreSQL database (dropped afterwards) when the suite runs with
DATABASE_URL=postgres://…, with the suite's REDIS_URL passed on, so that the
servers use the Redis channel layer; otherwise a SQLite file and the
in-memory layer. The reference client (ddxclient) runs as a subprocess;
where the protocol itself is under test, a hand-written `websockets` client
drives it frame by frame. Each test has its own storage folder, so the bytes
on disk can be found by listing it.
"""

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets

from tests.support import stored
from tests.support.files import file_sha256, write_random
from tests.support.live_backend import http_call, live_backend
from tests.support.live_server import ROOT, LiveServer

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

MiB = 1024 * 1024
BIG_SIZE = 200 * MiB
# The shortest lease the configuration accepts: a healthy writer renews it in
# time (uploads.writer), and waiting one lease out fits a test.
LEASE_SECONDS = 5
CLIENT_TIMEOUT = 120
WS_TIMEOUT = 20
POLL = 0.002


@dataclass(frozen=True)
class BigFile:
    path: Path
    sha256: str
    size: int


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """The module's database, migrated, with alice; PostgreSQL + Redis when the suite runs on them."""
    with live_backend(tmp_path_factory, "live") as backend:
        yield backend


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> BigFile:
    path = tmp_path_factory.mktemp("big") / "random.bin"
    return BigFile(path, write_random(path, BIG_SIZE), BIG_SIZE)


@pytest.fixture
def start_server(backend, tmp_path):
    """Start a server on the module's database: ``start_server("a", SETTING=value)`` or
    ``start_server("b", sibling_of=a)`` for a second process sharing a's database and storage.
    Every server is stopped (woken first if frozen, killed if it will not stop) at teardown."""
    with contextlib.ExitStack() as cleanup:  # every stop() runs, even if one of them fails

        def start(name: str = "server", *, sibling_of: LiveServer | None = None, **settings) -> LiveServer:
            if sibling_of is not None:
                server = sibling_of.sibling(tmp_path / name, **settings)
            else:
                server = LiveServer(
                    tmp_path / name, database_url=backend.database_url, redis_url=backend.redis_url, **settings
                )
            cleanup.callback(server.stop)
            server.start()
            return server

        yield start


@pytest.fixture
def run_client(tmp_path):
    """Start the reference client as a subprocess (output in a log file); killed at teardown if still running."""
    clients: list[subprocess.Popen] = []

    def run(server: LiveServer, token: str, path: Path, *options: str) -> subprocess.Popen:
        log_path = tmp_path / f"client-{len(clients)}.log"
        with open(log_path, "wb") as output:
            client = subprocess.Popen(
                [sys.executable, "-m", "ddxclient", "upload", str(path), "--server", server.url, "--token", token,
                 "--quiet", *options],
                cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        client.log_path = log_path
        clients.append(client)
        return client

    yield run
    for client in clients:
        if client.poll() is None:
            client.kill()  # SIGKILL: nothing can delay it
            client.wait(10)


# --- helpers -------------------------------------------------------------------------


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def diagnostics(*servers: LiveServer, client: subprocess.Popen | None = None) -> str:
    parts = [f"--- {server.log_path}\n{tail(server.log_path)}" for server in servers]
    if client is not None:
        parts.append(f"--- client\n{tail(client.log_path)}")
    return "\n".join(parts)


def api(server: LiveServer, token: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        server.url + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def upload_detail(server: LiveServer, token: str, upload_id: str) -> dict:
    status, body = api(server, token, "GET", f"/api/uploads/{upload_id}/")
    assert status == 200, (status, body)
    return body


def upload_named(server: LiveServer, token: str, filename: str) -> dict:
    """The one upload of alice's with this file name (each test uploads under its own name)."""
    status, body = api(server, token, "GET", "/api/uploads/")
    assert status == 200, (status, body)
    matches = [upload for upload in body if upload["filename"] == filename]
    assert len(matches) == 1, matches
    return matches[0]


def create_upload(server: LiveServer, token: str, filename: str, data: bytes) -> dict:
    body = {"filename": filename, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    status, created = api(server, token, "POST", "/api/uploads/", body)
    assert status == 201, (status, created)
    return created


def stored_files(server: LiveServer) -> list[Path]:
    return sorted((server.storage / "files").glob("*"))


def part_files(server: LiveServer) -> list[Path]:
    return sorted((server.storage / "partial").glob("*.part"))


def wait_for(condition, what: str, timeout: float = 30, *, interval: float = POLL, diagnose=lambda: ""):
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{diagnose()}")


def part_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def holds_database_lock(database_url: str) -> bool:
    """Whether another connection is inside a transaction right now."""
    if database_url.startswith("sqlite:"):
        probe = sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=0.2, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return False
        except sqlite3.OperationalError:
            return True
        finally:
            probe.close()
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as probe:
        (busy,) = probe.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'"
        ).fetchone()
    return busy > 0


def is_stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def freeze(server: LiveServer, database_url: str) -> float:
    """SIGSTOP the server at a moment it is in no database transaction; returns when it froze.

    A process frozen inside a transaction would hold a row lock (PostgreSQL) or
    the write lock (SQLite) and block every other process until it wakes: a
    real hazard, but not the one these tests are about, so we freeze between
    the writer's heartbeat commits.
    """
    for _attempt in range(50):
        server.signal(signal.SIGSTOP)
        wait_for(lambda: is_stopped(server.pid), "the server to stop", 5)
        frozen_at = time.monotonic()
        if not holds_database_lock(database_url):
            return frozen_at
        server.signal(signal.SIGCONT)
        time.sleep(0.05)
    pytest.fail("the server was inside a database transaction at every attempt to freeze it")


def read_unlocked(path: Path, timeout: float = WS_TIMEOUT) -> bytes:
    """The file's bytes, read under a shared flock: only once no writer holds its exclusive lock."""
    with open(path, "rb") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{path} is still locked by a writer after {timeout}s")
                time.sleep(0.01)
        try:
            return handle.read()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- a hand-written protocol client ---------------------------------------------------


def ws_connect(server: LiveServer, ws_url: str, headers: dict[str, str] | None = None):
    return websockets.connect(
        f"ws://127.0.0.1:{server.port}{ws_url}",
        compression=None,
        max_size=None,
        open_timeout=WS_TIMEOUT,
        close_timeout=5,
        ping_interval=None,  # a frozen server must not be declared dead by our keepalive
        additional_headers=headers,
    )


async def receive(ws) -> dict:
    raw = await asyncio.wait_for(ws.recv(), WS_TIMEOUT)
    assert isinstance(raw, str), f"the server sent a binary message of {len(raw)} bytes"
    return json.loads(raw)


async def refusal(ws) -> tuple[dict, int]:
    """The error message a refused connection gets, and its close code."""
    message = await receive(ws)
    assert message["type"] == "error", f"expected a refusal, got {message}"
    await asyncio.wait_for(ws.wait_closed(), WS_TIMEOUT)
    return message, ws.close_code


async def messages_until_closed(ws) -> tuple[list[dict], int]:
    """Every message until the server closes the connection, and the close code."""
    messages = []
    try:
        while True:
            messages.append(await receive(ws))
    except websockets.ConnectionClosed:
        return messages, ws.close_code
    except TimeoutError:
        pytest.fail(f"the server left the connection open {WS_TIMEOUT}s after sending {messages}")


async def stream(ws, data: bytes, start: int, *, chunk: int, window: int) -> dict:
    """Send ``data[start:]`` in frames of ``chunk`` within the window; return the ``complete`` message."""
    view = memoryview(data)
    sent = acked = start
    while True:
        while sent < len(data) and sent + min(chunk, len(data) - sent) - acked <= window:
            frame = view[sent : sent + chunk]
            await ws.send(frame)
            sent += len(frame)
        message = await receive(ws)
        if message["type"] == "complete":
            return message
        assert message["type"] == "ack", message
        acked = message["offset"]


# --- tests ------------------------------------------------------------------------------


def test_reference_client_uploads_200_mib_and_the_stored_bytes_match_its_sha256(
    backend, start_server, run_client, big_file, tmp_path
):
    server = start_server()
    path = tmp_path / "intact.bin"
    path.symlink_to(big_file.path)

    client = run_client(server, backend.alice_token, path)
    exit_code = client.wait(CLIENT_TIMEOUT)

    assert exit_code == 0, diagnostics(server, client=client)
    upload = upload_detail(server, backend.alice_token, upload_named(server, backend.alice_token, "intact.bin")["id"])
    assert upload["status"] == "complete"
    assert upload["offset"] == upload["size"] == big_file.size
    assert upload["sha256"] == big_file.sha256
    [key] = stored.finished_keys(server)
    assert stored.finished_sha256(key, server) == big_file.sha256
    assert stored.part_keys(server) == []


@pytest.mark.local_storage  # kills the server once the part file on disk holds enough bytes
def test_client_resumes_after_the_server_is_killed_at_a_random_byte_and_restarted(
    backend, start_server, run_client, big_file, tmp_path
):
    server = start_server(DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS)
    path = tmp_path / "crash.bin"
    path.symlink_to(big_file.path)
    kill_at = random.randint(big_file.size // 5, big_file.size * 4 // 5)
    log.info("killing the server once the part file holds %d bytes", kill_at)

    client = run_client(server, backend.alice_token, path, "--max-retries", "100")

    def client_alive():
        return diagnostics(server, client=client) if client.poll() is not None else ""

    [part] = wait_for(lambda: part_files(server), "the part file", diagnose=client_alive)
    wait_for(lambda: part_size(part) >= kill_at, f"{kill_at} bytes in the part file", diagnose=client_alive)
    server.kill()
    on_disk_at_crash = part_size(part)
    assert client.poll() is None, "the client gave up when the server died\n" + diagnostics(server, client=client)
    server.restart()

    # The dead writer's lease keeps the client out for up to one lease, so this
    # is the resume point the crash left: never past the bytes on disk.
    resume_point = upload_named(server, backend.alice_token, "crash.bin")
    assert resume_point["status"] == "uploading"
    assert 0 <= resume_point["offset"] <= on_disk_at_crash, (resume_point, on_disk_at_crash)

    exit_code = client.wait(CLIENT_TIMEOUT)

    assert exit_code == 0, f"killed at {on_disk_at_crash} bytes\n" + diagnostics(server, client=client)
    upload = upload_detail(server, backend.alice_token, resume_point["id"])
    assert upload["status"] == "complete"
    assert upload["offset"] == big_file.size
    assert upload["sha256"] == big_file.sha256
    [stored] = stored_files(server)
    assert file_sha256(stored) == big_file.sha256
    assert part_files(server) == []


# The frozen writer keeps its part file's flock (B is refused busy) and the part is read back under it.
@pytest.mark.local_storage
async def test_writer_frozen_past_its_lease_writes_nothing_after_waking_and_is_closed_with_4410(backend, start_server):
    token = backend.alice_token
    server_a = start_server("a", DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS)
    server_b = start_server("b", sibling_of=server_a)
    data = os.urandom(24 * MiB)
    upload = create_upload(server_a, token, "frozen.bin", data)
    before_freeze = 6 * MiB  # less than one window: A may take it all without acks
    marker = b"\xee" * (512 * 1024)  # sent only while A is frozen

    async with ws_connect(server_a, upload["ws_url"]) as writer_a:
        ready = await receive(writer_a)
        assert (ready["type"], ready["offset"]) == ("ready", 0)
        assert before_freeze <= ready["window"]
        view = memoryview(data)
        for start in range(0, before_freeze, ready["chunk_size"]):
            await writer_a.send(view[start : min(start + ready["chunk_size"], before_freeze)])
        [part] = part_files(server_a)
        await asyncio.to_thread(wait_for, lambda: part_size(part) == before_freeze, "A to write what it was sent", 10)
        # A's heartbeat makes them durable (then A is idle): B must resume exactly there.
        await asyncio.to_thread(
            wait_for,
            lambda: upload_detail(server_a, token, upload["id"])["offset"] == before_freeze,
            "A to commit what it wrote",
            10,
            interval=0.1,
        )

        frozen_at = await asyncio.to_thread(freeze, server_a, backend.database_url)
        await writer_a.send(marker)  # sits in A's socket buffer while A is frozen
        await writer_a.send(marker)
        # A's last renewal happened before the freeze: its lease has run out after this.
        await asyncio.sleep(max(0.0, frozen_at + LEASE_SECONDS + 1 - time.monotonic()))

        # B reclaims the expired slot, but the frozen A still holds the part file's lock.
        async with ws_connect(server_b, upload["ws_url"]) as writer_b:
            busy, busy_close = await refusal(writer_b)
        assert busy_close == 4409, busy
        assert busy["code"] == "busy"
        assert busy["retry_after"] >= 1

        server_a.signal(signal.SIGCONT)
        messages, close_code = await messages_until_closed(writer_a)

    errors = [message for message in messages if message["type"] == "error"]
    assert [error["code"] for error in errors] == ["lease_lost"], messages
    assert close_code == 4410, messages
    assert all(message["offset"] <= before_freeze for message in messages if message["type"] == "ack"), messages
    # Once A has let go of the file: exactly the bytes A had written before the freeze, none after.
    on_disk = await asyncio.to_thread(read_unlocked, part)
    assert len(on_disk) - before_freeze == 0, "bytes A wrote after it woke"
    assert hashlib.sha256(on_disk).hexdigest() == hashlib.sha256(data[:before_freeze]).hexdigest()
    assert server_a.process.poll() is None, "server A died\n" + diagnostics(server_a)

    resumable = upload_detail(server_b, token, upload["id"])
    assert (resumable["status"], resumable["offset"]) == ("uploading", before_freeze)
    async with ws_connect(server_b, resumable["ws_url"]) as writer_b:
        ready = await receive(writer_b)
        assert (ready["type"], ready["offset"]) == ("ready", before_freeze), diagnostics(server_a, server_b)
        complete = await stream(writer_b, data, ready["offset"], chunk=ready["chunk_size"], window=ready["window"])
        await asyncio.wait_for(writer_b.wait_closed(), WS_TIMEOUT)
        assert writer_b.close_code == 1000

    assert complete["sha256"] == hashlib.sha256(data).hexdigest()
    assert upload_detail(server_b, token, upload["id"])["status"] == "complete"
    [stored] = stored_files(server_b)
    assert stored.read_bytes() == data


async def test_second_writer_on_one_server_is_refused_busy_with_retry_after(backend, start_server):
    token = backend.alice_token
    server = start_server()
    data = os.urandom(3 * MiB)
    upload = create_upload(server, token, "two-writers.bin", data)

    async with ws_connect(server, upload["ws_url"]) as first:
        ready = await receive(first)
        assert (ready["type"], ready["offset"]) == ("ready", 0)

        async with ws_connect(server, upload["ws_url"]) as second:
            busy, busy_close = await refusal(second)
        assert busy_close == 4409, busy
        assert busy["code"] == "busy"
        assert busy["retry_after"] >= 1

        # The refused second writer disturbed nothing: the first one finishes.
        complete = await stream(first, data, 0, chunk=ready["chunk_size"], window=ready["window"])
        await asyncio.wait_for(first.wait_closed(), WS_TIMEOUT)
        assert first.close_code == 1000

    assert complete["sha256"] == hashlib.sha256(data).hexdigest()
    assert upload_detail(server, token, upload["id"])["status"] == "complete"
    [key] = stored.finished_keys(server)
    assert stored.finished_sha256(key, server) == hashlib.sha256(data).hexdigest()


async def test_server_shutdown_makes_received_bytes_durable_and_frees_the_slot(backend, start_server):
    token = backend.alice_token
    server = start_server()
    data = os.urandom(6 * MiB)  # acks come every 2 MiB (window / 4)
    upload = create_upload(server, token, "shutdown.bin", data)

    async with ws_connect(server, upload["ws_url"]) as ws:
        ready = await receive(ws)
        for start in range(0, 4 * MiB, ready["chunk_size"]):
            await ws.send(data[start : start + ready["chunk_size"]])
        while (await receive(ws))["offset"] < 4 * MiB:
            pass  # acks: every byte sent so far is written
        server.signal(signal.SIGTERM)  # what a process manager sends
        assert server.process.wait(WS_TIMEOUT) is not None
        with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
            await asyncio.wait_for(ws.recv(), WS_TIMEOUT)

    # The process is gone: the database alone says what it left behind.
    restarted = start_server("after", sibling_of=server)  # same database and storage
    detail = upload_detail(restarted, token, upload["id"])
    assert (detail["status"], detail["offset"]) == ("uploading", 4 * MiB)
    async with ws_connect(restarted, detail["ws_url"]) as ws:
        # Admitted at once: the shutdown released the slot instead of leaving it to expire.
        resumed = await receive(ws)
        assert (resumed["type"], resumed["offset"]) == ("ready", 4 * MiB)
        complete = await stream(ws, data, 4 * MiB, chunk=resumed["chunk_size"], window=resumed["window"])
    assert complete["sha256"] == hashlib.sha256(data).hexdigest()


async def test_client_that_ignores_acks_is_refused_and_the_server_stays_small(backend, start_server):
    """The spec's hostile client: it floods without reading acks. The window refuses it with
    4400 and transport backpressure keeps unprocessed frames from piling up in the process."""
    token = backend.alice_token
    server = start_server()
    size = 512 * MiB
    status, upload = api(server, token, "POST", "/api/uploads/", {"filename": "flood.bin", "size": size})
    assert status == 201, upload
    before = server.rss()["VmHWM"]

    async def flood() -> tuple[list[dict], int]:
        async with ws_connect(server, upload["ws_url"]) as ws:
            ready = await receive(ws)
            frame = os.urandom(ready["chunk_size"])
            with contextlib.suppress(websockets.ConnectionClosed):
                for _ in range(size // len(frame)):
                    await ws.send(frame)  # never waits for an ack
            return await messages_until_closed(ws)

    messages, close_code = await asyncio.wait_for(flood(), 120)

    growth = server.rss()["VmHWM"] - before
    assert growth <= 64 * MiB, f"the server grew by {growth / MiB:.1f} MiB"
    detail = upload_detail(server, token, upload["id"])
    if close_code == 1000:
        # The server kept up with the flood: acks never fell a window behind.
        assert (messages[-1]["type"], detail["status"]) == ("complete", "complete")
    else:
        # It fell behind: the frame past the window was refused, what fitted is the resume point.
        # The close code is 4400, or 1006 when the server gave up on a close handshake whose
        # answer sat behind megabytes of flood in the socket (the error message may then be
        # lost with the connection's unread bytes).
        assert close_code in (4400, 1006), messages[-3:]
        errors = [message for message in messages if message["type"] == "error"]
        assert all(error["code"] == "protocol_error" for error in errors), errors
        assert detail["status"] == "uploading"
        assert detail["offset"] < size


def _ws_handshake(server: LiveServer, ws_url: str) -> socket.socket:
    """A WebSocket opened by hand over a plain socket, so that the test writes raw frames as fast as it can."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=WS_TIMEOUT)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {ws_url} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _masked_binary_frames(payload: bytes, count: int) -> bytes:
    """``count`` client frames (FIN, binary, masked) each carrying ``payload`` (under 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return (bytes([0x82, 0x80 | len(payload)]) + mask + masked) * count


async def test_a_flood_of_tiny_frames_keeps_the_server_small_and_answering_others(backend, start_server):
    """A client that sends 1-byte frames as fast as it can (within the window's bytes, far past any sane
    frame count). Before, the transport counted payload bytes only: the process grew by 117-393 MiB
    and stalled every other request for 12-13 s. Empty frames are refused outright (4400)."""
    token = backend.alice_token
    server = start_server()
    status, upload = api(server, token, "POST", "/api/uploads/", {"filename": "tiny.bin", "size": 64 * MiB})
    assert status == 201, upload
    # One request first, so that code and threads are in place before we measure.
    assert api(server, token, "GET", f"/api/uploads/{upload['id']}/")[0] == 200
    before = server.rss()["VmRSS"]
    sock = _ws_handshake(server, upload["ws_url"])
    ready = json.loads(sock.recv(4096)[2:])  # one small text frame: 0x81, length, JSON
    assert ready["type"] == "ready", ready
    burst = _masked_binary_frames(b"x", 64 * 1024)  # 448 KiB of frames, one byte of the file each
    stop, sent = threading.Event(), [0]

    def flood():
        with contextlib.suppress(OSError):
            while not stop.is_set():
                sock.sendall(burst)
                sent[0] += 64 * 1024

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    latencies, peak = [], before
    until = time.monotonic() + 20
    while time.monotonic() < until:
        started = time.monotonic()
        answer = await asyncio.to_thread(http_call, server, "GET", f"/api/uploads/{upload['id']}/", token=token)
        latencies.append(time.monotonic() - started)
        assert answer.status == 200
        peak = max(peak, server.rss()["VmRSS"])
        await asyncio.sleep(0.25)
    stop.set()
    sock.close()
    flooder.join(10)

    growth = (peak - before) / MiB
    log.info(
        "tiny-frame flood: %d frames sent, growth %.1f MiB, slowest answer %.2f s", sent[0], growth, max(latencies)
    )
    assert sent[0] >= 100_000, sent[0]  # it did flood
    assert growth <= 64, f"the server grew by {growth:.1f} MiB under a flood of tiny frames"
    # Answered throughout (the bound is generous: a loaded 2-core machine, not a benchmark).
    assert max(latencies) < 5, latencies


async def test_an_empty_frame_is_a_protocol_error(backend, start_server):
    server = start_server()
    status, upload = api(server, backend.alice_token, "POST", "/api/uploads/", {"filename": "e.bin", "size": 10})
    assert status == 201, upload
    async with ws_connect(server, upload["ws_url"]) as ws:
        assert (await receive(ws))["type"] == "ready"
        await ws.send(b"")
        message, close_code = await refusal(ws)
    assert (message["code"], close_code) == ("protocol_error", 4400)
    assert "Empty binary frame" in message["detail"]
