"""The reference client's retry decisions: what it does on each close code and HTTP status, and against real faults.

Two kinds of servers:

* A fake DirectDriveX (the ``websockets`` library, in a thread) that speaks
  the real protocol and refuses each connection as the test scripts it:
  ``ready``, maybe some bytes, then an error message and close code X; the
  next connection completes. The client runs in this process (``main()``),
  with its waits between retries recorded instead of slept.
* Real servers (``manage.py serve``) with real faults: stopped for a while,
  a stalled network, a database cut away, a bad token. The client runs as a
  subprocess, as users run it.

Killing the server and restarting it at once is tests/test_live_server.py's.
"""

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import websockets
from websockets.sync.server import serve

import ddxclient.uploader
from ddxclient.__main__ import main
from ddxclient.uploader import EXIT_FAILED, EXIT_REFUSED, FIRST_BACKOFF, retry_after
from tests.support import stored
from tests.support.live_backend import live_backend
from tests.support.live_server import ROOT, LiveServer
from tests.support.tcp_proxy import TcpProxy

KiB = 1024
MiB = 1024 * KiB
UPLOAD_ID = "0b5e8a52-6f7c-4f0e-9d43-8a1c2e3f4a5b"
CHUNK = 64 * KiB
WINDOW = 256 * KiB
FAKE_SIZE = 1 * MiB
FAKE_TIMEOUT = 5  # the client's --timeout against the fake: nothing there should ever take that long


# --- a fake server with scripted refusals -----------------------------------------------


@dataclass
class Refuse:
    """How one connection ends: after ``take`` bytes, error message ``code`` (if any), then ``close``.

    ``close`` is a close code, "drop" (the TCP connection goes without a close
    frame: the client sees 1006) or "hold" (no close at all). ``keep`` is where
    the next ``ready`` resumes (the bytes past it were not durable); ``status``
    is what the upload becomes (what the GET says next).
    """

    close: int | str
    code: str | None = None
    retry_after: float | None = None
    take: int = 0
    keep: int | None = None
    status: str = "uploading"


@dataclass
class Answer:
    """An HTTP answer to the next GET /api/uploads/<id>/ (or to the next WebSocket handshake)."""

    status: int
    body: dict | str
    retry_after: str | None = None


class FakeServer:
    """GET /api/uploads/<id>/ and /ws/uploads/<id>/ for one upload of ``data``, refusing as scripted."""

    def __init__(self, data: bytes, refusals=(), answers=(), handshakes=()):
        self.data = data
        self.received = bytearray()
        self.status = "uploading"
        self.refusals = list(refusals)
        self.answers = list(answers)
        self.handshakes = list(handshakes)
        self.connections = 0  # WebSocket connections that got past the handshake
        self.gets = 0
        self.server = serve(
            self.handle, "127.0.0.1", 0, process_request=self.http, compression=None, max_size=2 * CHUNK
        )
        self.url = f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.thread.join(10)

    def http(self, connection, request):
        if request.path.startswith("/ws/"):
            if not self.handshakes:
                return None  # go on with the WebSocket handshake
            return self.respond(connection, self.handshakes.pop(0))
        self.gets += 1
        if request.path != f"/api/uploads/{UPLOAD_ID}/":
            return self.respond(connection, Answer(404, {"code": "not_found", "detail": "No such upload."}))
        if self.answers:
            return self.respond(connection, self.answers.pop(0))
        detail = {
            "id": UPLOAD_ID,
            "filename": "fake.bin",
            "size": len(self.data),
            "offset": len(self.received),
            "status": self.status,
            "sha256": hashlib.sha256(self.received).hexdigest() if self.status == "complete" else None,
            "ws_url": f"/ws/uploads/{UPLOAD_ID}/?ticket=t{self.gets}",
        }
        return self.respond(connection, Answer(200, detail))

    @staticmethod
    def respond(connection, answer: Answer):
        body = answer.body if isinstance(answer.body, str) else json.dumps(answer.body)
        response = connection.respond(answer.status, body)
        if answer.retry_after is not None:
            response.headers["Retry-After"] = answer.retry_after
        return response

    def handle(self, ws):
        self.connections += 1
        refusal = self.refusals.pop(0) if self.refusals else None
        ws.send(json.dumps({"type": "ready", "offset": len(self.received), "chunk_size": CHUNK, "window": WINDOW}))
        if refusal is None:
            self.take(ws, len(self.data) - len(self.received))
            digest = hashlib.sha256(self.received).hexdigest()
            self.status = "complete"
            ws.send(json.dumps({"type": "complete", "id": UPLOAD_ID, "size": len(self.received), "sha256": digest}))
            ws.close(1000)
            return
        self.take(ws, refusal.take)
        if refusal.keep is not None:
            del self.received[refusal.keep :]
        self.status = refusal.status
        if refusal.code is not None:
            message = {"type": "error", "code": refusal.code, "detail": f"scripted {refusal.code}"}
            if refusal.retry_after is not None:
                message["retry_after"] = refusal.retry_after
            ws.send(json.dumps(message))
        if refusal.close == "drop":
            ws.socket.shutdown(socket.SHUT_WR)  # the TCP connection ends (FIN) without a close frame
            # Reading on until the client goes: a socket closed with the client's frames still
            # arriving answers them with a RST, and a RST can destroy the error message that waits,
            # unread, in the client's receive queue (the client then never learns its retry_after).
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                while True:
                    ws.recv(timeout=10)
        elif refusal.close == "hold":
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    ws.recv()  # until the client gives up on the close and goes
        else:
            ws.close(refusal.close)

    def take(self, ws, count: int):
        """Receive ``count`` more bytes of the file, acking every frame."""
        goal = len(self.received) + count
        while len(self.received) < goal:
            frame = ws.recv()
            assert isinstance(frame, bytes), frame
            self.received += frame
            ws.send(json.dumps({"type": "ack", "offset": len(self.received)}))


@pytest.fixture
def waits(monkeypatch):
    """The client's waits between retries, in seconds, recorded instead of slept."""
    recorded: list[float] = []

    async def pause(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr(ddxclient.uploader, "pause", pause)
    return recorded


@pytest.fixture
def fake_file(tmp_path) -> tuple[Path, bytes]:
    data = os.urandom(FAKE_SIZE)
    path = tmp_path / "fake.bin"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def fake(fake_file):
    """``fake(refusals=[...], answers=[...], handshakes=[...])``: a fake server for the test's file."""
    servers = []

    def start(**script) -> FakeServer:
        servers.append(FakeServer(fake_file[1], **script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def run_client(server: FakeServer, path: Path, *options: str) -> int:
    """The client's exit code for resuming the fake's upload of ``path``."""
    argv = ["upload", str(path), "--server", server.url, "--token", "t", "--resume", UPLOAD_ID, "--quiet"]
    return main([*argv, "--timeout", str(FAKE_TIMEOUT), *options])


RETRYABLE_ENDINGS = [
    pytest.param(Refuse(4408, "idle_timeout"), id="4408-idle_timeout"),
    pytest.param(Refuse(4409, "busy", retry_after=1), id="4409-busy"),
    pytest.param(Refuse(4410, "lease_lost"), id="4410-lease_lost"),
    pytest.param(Refuse(4429, "slots_exhausted", retry_after=3), id="4429-slots_exhausted"),
    pytest.param(Refuse(4500, "internal_error"), id="4500-internal_error"),
    pytest.param(Refuse(4503, "unavailable", retry_after=5), id="4503-unavailable"),
    pytest.param(Refuse(4503), id="4503-without-message"),
    pytest.param(Refuse(4503, "a_code_from_the_future"), id="4503-unknown-code"),
    pytest.param(Refuse(1001), id="1001-going-away"),
    pytest.param(Refuse("drop"), id="1006-dropped"),
    pytest.param(Refuse(1011), id="1011-server-error"),
    pytest.param(Refuse(1012), id="1012-restart"),
    pytest.param(Refuse(1013), id="1013-try-later"),
    pytest.param(Refuse("drop", "unavailable", retry_after=5), id="error-then-lost-close"),
    pytest.param(Refuse("drop", "internal_error"), id="internal_error-then-lost-close"),
]


@pytest.mark.parametrize("ending", RETRYABLE_ENDINGS)
def test_client_reconnects_after_a_retryable_ending_and_completes(fake, fake_file, waits, ending):
    path, data = fake_file
    ending.take = 3 * CHUNK
    server = fake(refusals=[ending])

    exit_code = run_client(server, path)

    assert exit_code == 0
    assert server.connections == 2
    assert bytes(server.received) == data
    assert server.status == "complete"
    assert len(waits) == 1
    if ending.retry_after is not None:
        assert waits == [ending.retry_after]  # the server's retry_after, not the backoff


FINAL_ENDINGS = [
    pytest.param(Refuse(4400, "protocol_error"), id="4400-protocol_error"),
    pytest.param(Refuse(4400), id="4400-without-message"),
    pytest.param(Refuse(4404, "not_found"), id="4404-not_found"),
    pytest.param(Refuse(4409, "not_uploading", status="cancelled"), id="4409-not_uploading"),
    pytest.param(Refuse(4413, "size_exceeded"), id="4413-size_exceeded"),
    pytest.param(Refuse(4422, "checksum_mismatch", status="failed"), id="4422-checksum_mismatch"),
    pytest.param(Refuse("drop", "checksum_mismatch", status="failed"), id="checksum_mismatch-then-lost-close"),
    pytest.param(Refuse(4499, "a_code_from_the_future"), id="unknown-4499"),
    pytest.param(Refuse(1008), id="1008-policy-violation"),
]


@pytest.mark.parametrize("ending", FINAL_ENDINGS)
def test_client_stops_with_exit_3_after_a_final_refusal(fake, fake_file, waits, ending):
    path, _data = fake_file
    server = fake(refusals=[ending])

    exit_code = run_client(server, path)

    assert exit_code == EXIT_REFUSED
    assert server.connections == 1


def test_client_resumes_from_ready_offset_not_from_what_it_sent(fake, fake_file, waits):
    path, data = fake_file
    # The server took 5 chunks but only 2 became durable: the next ready says 2 chunks.
    server = fake(refusals=[Refuse(4500, "internal_error", take=5 * CHUNK, keep=2 * CHUNK)])

    assert run_client(server, path) == 0

    assert bytes(server.received) == data


def test_client_that_lost_the_complete_message_finds_the_upload_complete(fake, fake_file, waits):
    path, data = fake_file
    # Every byte arrived and the upload finished, but the connection went before "complete".
    server = fake(refusals=[Refuse("drop", take=FAKE_SIZE, status="complete")])

    assert run_client(server, path) == 0

    assert server.connections == 1
    assert bytes(server.received) == data


def test_client_waits_for_a_close_that_never_comes_then_reconnects(fake, fake_file, waits):
    path, data = fake_file
    server = fake(refusals=[Refuse("hold", "internal_error", take=CHUNK)])

    assert run_client(server, path, "--timeout", "1.5") == 0  # the longest the client waits for the close

    assert server.connections == 2
    assert bytes(server.received) == data


def test_expired_ticket_is_retried_at_once_with_a_fresh_one(fake, fake_file, waits):
    path, data = fake_file
    server = fake(refusals=[Refuse(4401, "unauthenticated")])

    assert run_client(server, path) == 0

    assert waits == [0]
    assert bytes(server.received) == data


def test_a_fresh_ticket_refused_too_is_final(fake, fake_file, waits):
    path, _data = fake_file
    server = fake(refusals=[Refuse(4401, "unauthenticated"), Refuse(4401, "unauthenticated")])

    assert run_client(server, path) == EXIT_REFUSED

    assert server.connections == 2


def test_tickets_that_expire_one_after_the_other_are_each_renewed(fake, fake_file, waits):
    path, data = fake_file
    server = fake(refusals=[Refuse(4401, "unauthenticated", take=2 * CHUNK) for _ in range(2)])

    assert run_client(server, path) == 0

    assert server.connections == 3
    assert bytes(server.received) == data


def test_retry_counter_restarts_whenever_the_offset_advanced(fake, fake_file, waits):
    path, data = fake_file
    # Six faults, each after some progress: more than --max-retries in all, never two in a row without progress.
    server = fake(refusals=[Refuse(4500, "internal_error", take=2 * CHUNK) for _ in range(6)])

    assert run_client(server, path, "--max-retries", "2") == 0

    assert server.connections == 7
    assert bytes(server.received) == data
    assert len(waits) == 6
    assert all(wait <= FIRST_BACKOFF for wait in waits), "every fault was a first retry"


def test_client_gives_up_with_exit_4_after_max_retries_without_progress(fake, fake_file, waits):
    path, _data = fake_file
    server = fake(refusals=[Refuse(4500, "internal_error") for _ in range(10)])

    assert run_client(server, path, "--max-retries", "3") == EXIT_FAILED

    assert server.connections == 4  # the first try and three retries
    assert len(waits) == 3
    # Exponential with jitter (each wait in [half, all] of 0.5 s, 1 s, 2 s): the third is longer than the first.
    for attempt, wait in enumerate(waits, start=1):
        assert FIRST_BACKOFF * 2 ** (attempt - 1) / 2 <= wait <= FIRST_BACKOFF * 2 ** (attempt - 1)
    assert waits[2] > waits[0]


RETRYABLE_ANSWERS = [
    pytest.param(Answer(503, {"code": "unavailable", "detail": "db down", "retry_after": 9}, "4"), 4, id="503"),
    pytest.param(Answer(503, {"code": "unavailable", "detail": "db down", "retry_after": 9}), 9, id="503-body-only"),
    pytest.param(Answer(429, {"code": "throttled", "detail": "slow down"}, "2"), 2, id="429"),
    pytest.param(Answer(409, {"code": "busy", "detail": "another writer"}, "1"), 1, id="409-busy"),
    pytest.param(Answer(408, {"code": "timeout", "detail": "too slow"}), None, id="408"),
    pytest.param(Answer(500, {"code": "internal_error", "detail": "bug"}), None, id="500"),
    pytest.param(Answer(502, "<html>Bad Gateway</html>"), None, id="502-not-json"),
]


@pytest.mark.parametrize(("answer", "expected_wait"), RETRYABLE_ANSWERS)
def test_client_retries_a_retryable_http_answer_honouring_retry_after(fake, fake_file, waits, answer, expected_wait):
    path, data = fake_file
    server = fake(answers=[answer])

    assert run_client(server, path) == 0

    assert server.gets == 2
    assert bytes(server.received) == data
    assert len(waits) == 1
    if expected_wait is not None:
        assert waits == [expected_wait]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(Answer(401, {"code": "unauthenticated", "detail": "bad token"}), id="401"),
        pytest.param(Answer(403, {"code": "permission_denied", "detail": "no"}), id="403"),
        pytest.param(Answer(404, {"code": "not_found", "detail": "No such upload."}), id="404"),
        pytest.param(Answer(400, {"code": "invalid", "detail": "bad"}), id="400"),
        pytest.param(Answer(409, {"code": "not_complete", "detail": "not yet"}), id="409-not-busy"),
        pytest.param(Answer(413, {"code": "request_too_large", "detail": "big"}), id="413"),
    ],
)
def test_client_stops_with_exit_3_on_a_final_http_answer(fake, fake_file, waits, answer):
    path, _data = fake_file
    server = fake(answers=[answer])

    assert run_client(server, path) == EXIT_REFUSED

    assert (server.gets, server.connections, waits) == (1, 0, [])


def test_client_retries_a_websocket_handshake_answered_503(fake, fake_file, waits):
    path, data = fake_file
    server = fake(handshakes=[Answer(503, {"code": "unavailable", "detail": "db down"}, "3")])

    assert run_client(server, path) == 0

    assert waits == [3]
    assert bytes(server.received) == data


def test_client_stops_with_exit_3_on_a_websocket_handshake_answered_403(fake, fake_file, waits):
    path, _data = fake_file
    server = fake(handshakes=[Answer(403, "Forbidden")])

    assert run_client(server, path) == EXIT_REFUSED

    assert (server.connections, waits) == (0, [])


def test_client_that_cannot_read_its_file_fails_with_exit_4(fake, tmp_path, waits):
    server = fake()

    assert run_client(server, tmp_path / "missing.bin") == EXIT_FAILED

    assert server.gets == 0


def test_retry_after_reads_seconds_and_http_dates_within_bounds():
    assert retry_after("7") == 7
    assert retry_after(2.5) == 2.5
    assert retry_after("-3") == 0
    assert retry_after("99999") == ddxclient.uploader.MAX_RETRY_AFTER
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past: at once
    assert 0 < retry_after(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 120))) <= 120
    assert retry_after("soon") is None
    assert retry_after(None) is None
    assert retry_after(True) is None


# --- real servers, real faults ---------------------------------------------------------------

LEASE_SECONDS = 5  # the shortest the configuration accepts: a test can wait one out
REAL_SIZE = 32 * MiB
CLIENT_TIMEOUT = 180
WAIT = 60


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """The module's database, migrated, with alice; PostgreSQL + Redis when the suite runs on them."""
    with live_backend(tmp_path_factory, "client") as backend:
        yield backend


@pytest.fixture
def start_server(backend, tmp_path):
    """``start_server(DATABASE_URL=…, SETTING=value)``: a server on the module's database, stopped at teardown."""
    with contextlib.ExitStack() as cleanup:

        def start(name: str = "server", *, database_url: str | None = None, **settings) -> LiveServer:
            server = LiveServer(
                tmp_path / name,
                database_url=database_url or backend.database_url,
                redis_url=backend.redis_url,
                DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
                **settings,
            )
            cleanup.callback(server.stop)
            server.start()
            return server

        yield start


@pytest.fixture
def proxies():
    """``proxies(host, port)``: TCP fault proxies, closed at teardown."""
    with contextlib.ExitStack() as cleanup:

        def start(host: str, port: int) -> TcpProxy:
            return cleanup.enter_context(TcpProxy(host, port))

        yield start


@dataclass
class Client:
    process: subprocess.Popen
    log_path: Path

    def retries(self) -> int:
        """How many retries the client has announced so far (its log: one warning per retry)."""
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count("; retrying in ")

    def log(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-40:])


@pytest.fixture
def client(tmp_path):
    """``client(url, token, path, *options)``: the reference client as a subprocess; killed at teardown."""
    started: list[Client] = []

    def run(url: str, token: str, path: Path, *options: str) -> Client:
        log_path = tmp_path / f"client-{len(started)}.log"
        with open(log_path, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "ddxclient", "upload", str(path), "--server", url, "--token", token,
                 "--quiet", *options],
                cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        started.append(Client(process, log_path))
        return started[-1]

    yield run
    for each in started:
        if each.process.poll() is None:
            each.process.kill()
            each.process.wait(10)


@pytest.fixture(scope="module")
def real_file(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("real") / "source.bin"
    data = os.urandom(REAL_SIZE)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def named_copy(real_file, tmp_path: Path, name: str) -> Path:
    """The real file under a name of the test's own (uploads are found by file name)."""
    path = tmp_path / name
    path.symlink_to(real_file[0])
    return path


def api(server: LiveServer, token: str, method: str, path: str) -> tuple[int, object]:
    request = urllib.request.Request(server.url + path, method=method, headers={"Authorization": f"Token {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def uploads_named(server: LiveServer, token: str, filename: str) -> list[dict]:
    status, body = api(server, token, "GET", "/api/uploads/")
    assert status == 200, (status, body)
    return [upload for upload in body if upload["filename"] == filename]


def stored_sha256(server: LiveServer) -> list[str]:
    return sorted(stored.finished_sha256(key, server) for key in stored.finished_keys(server))


def wait_for(condition, what: str, diagnose=lambda: ""):
    deadline = time.monotonic() + WAIT
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what}\n{diagnose()}")
        time.sleep(0.01)
    return value


def finished(client: Client, *servers: LiveServer) -> int:
    try:
        return client.process.wait(CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        logs = "\n".join(f"--- {server.log_path}\n{server.log_path.read_text()[-3000:]}" for server in servers)
        pytest.fail(f"the client did not finish in {CLIENT_TIMEOUT}s\n--- client\n{client.log()}\n{logs}")


@pytest.mark.slow
def test_client_resumes_by_itself_after_the_server_was_stopped_for_a_while(
    start_server, proxies, client, real_file, backend, tmp_path
):
    server = start_server()
    front = proxies("127.0.0.1", server.port)
    front.stall_after(REAL_SIZE // 3)  # freezes the upload a third of the way in
    path = named_copy(real_file, tmp_path, "stopped.bin")
    uploading = client(front.via(server.url), backend.alice_token, str(path))
    wait_for(lambda: front.state == "stalled", "a third of the file to pass", uploading.log)

    server.stop()  # SIGTERM: what a deployment does to restart the service
    front.cut()  # the client's connection is reset, and every reconnect is refused: nothing listens
    wait_for(lambda: uploading.retries() >= 3, "three refused retries", uploading.log)
    assert uploading.process.poll() is None, uploading.log()
    server.restart()
    [resume_point] = uploads_named(server, backend.alice_token, "stopped.bin")
    assert 0 < resume_point["offset"] < REAL_SIZE  # the client will go on from the middle, not start over
    front.restore()

    assert finished(uploading, server) == 0, uploading.log()
    [upload] = uploads_named(server, backend.alice_token, "stopped.bin")
    assert (upload["status"], upload["size"]) == ("complete", REAL_SIZE)
    assert stored_sha256(server) == [real_file[1]]


@pytest.mark.slow
def test_client_gives_up_on_a_stalled_connection_and_finishes_once_the_network_is_back(
    start_server, proxies, client, real_file, backend, tmp_path
):
    server = start_server()
    front = proxies("127.0.0.1", server.port)
    front.stall_after(REAL_SIZE // 2)
    path = named_copy(real_file, tmp_path, "stalled.bin")
    uploading = client(front.via(server.url), backend.alice_token, str(path), "--timeout", "2")
    wait_for(lambda: front.state == "stalled", "half the file to pass", uploading.log)
    stalled_with = front.accepted

    # Nothing moves, and nothing is closed either: only the client's own watchdog can notice.
    wait_for(lambda: front.accepted > stalled_with, "the client to reconnect by itself", uploading.log)
    front.restore()

    assert finished(uploading, server) == 0, uploading.log()
    [upload] = uploads_named(server, backend.alice_token, "stalled.bin")
    assert upload["status"] == "complete"
    assert stored_sha256(server) == [real_file[1]]


@pytest.mark.slow
def test_client_waits_out_a_database_outage_in_the_middle_of_an_upload(
    backend, start_server, proxies, client, real_file, tmp_path
):
    if not backend.postgres:
        pytest.skip("the database outage is a PostgreSQL connection cut by a proxy (the suite runs on SQLite)")
    database = urlsplit(backend.database_url)
    database_proxy = proxies(database.hostname, database.port or 5432)
    # A request gives up on the pool after 1 s instead of 5: the outage shows sooner, the test is shorter.
    server = start_server(database_url=database_proxy.via(backend.database_url), DIRECTDRIVEX_DB_POOL_TIMEOUT=1)
    front = proxies("127.0.0.1", server.port)
    front.stall_after(REAL_SIZE // 3)
    path = named_copy(real_file, tmp_path, "outage.bin")
    uploading = client(front.via(server.url), backend.alice_token, str(path), "--timeout", "20")
    wait_for(lambda: front.state == "stalled", "a third of the file to pass", uploading.log)

    database_proxy.cut()  # every database connection of the server is reset; new ones are refused
    front.restore()
    # The writer cannot commit, the client reconnects, the API cannot answer: the client keeps retrying.
    wait_for(lambda: uploading.retries() >= 2, "two retries during the outage", uploading.log)
    assert uploading.process.poll() is None, uploading.log()
    database_proxy.restore()

    assert finished(uploading, server) == 0, uploading.log()
    [upload] = uploads_named(server, backend.alice_token, "outage.bin")
    assert upload["status"] == "complete"
    assert stored_sha256(server) == [real_file[1]]


@pytest.mark.slow
def test_client_whose_post_answer_was_lost_carries_on_with_the_upload_it_created(
    start_server, proxies, client, real_file, backend, tmp_path
):
    server = start_server()
    front = proxies("127.0.0.1", server.port)
    front.stall_after(0, inbound=True)  # the POST reaches the server; its answer is held...
    path = named_copy(real_file, tmp_path, "lost-answer.bin")
    uploading = client(front.via(server.url), backend.alice_token, str(path))
    wait_for(lambda: front.state == "stalled", "the server to answer the POST", uploading.log)
    [created] = uploads_named(server, backend.alice_token, "lost-answer.bin")

    front.cut()  # ...and lost with the connection
    front.restore()

    assert finished(uploading, server) == 0, uploading.log()
    [upload] = uploads_named(server, backend.alice_token, "lost-answer.bin")  # no second upload
    assert (upload["id"], upload["status"]) == (created["id"], "complete")
    assert stored_sha256(server) == [real_file[1]]


@pytest.mark.slow
def test_client_with_a_bad_token_is_refused_with_exit_3_and_creates_nothing(
    start_server, client, real_file, backend, tmp_path
):
    server = start_server()
    path = named_copy(real_file, tmp_path, "bad-token.bin")

    refused = client(server.url, "not-a-token", path)

    assert finished(refused, server) == EXIT_REFUSED, refused.log()
    assert uploads_named(server, backend.alice_token, "bad-token.bin") == []


@pytest.mark.slow
def test_client_resuming_an_unknown_upload_is_refused_with_exit_3(start_server, client, real_file, backend, tmp_path):
    server = start_server()
    path = named_copy(real_file, tmp_path, "unknown.bin")

    refused = client(server.url, backend.alice_token, path, "--resume", UPLOAD_ID)

    assert finished(refused, server) == EXIT_REFUSED, refused.log()
