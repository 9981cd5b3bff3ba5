"""Real faults against real servers: database and channel layer cut mid-upload, a busy holder elsewhere.

A TcpProxy (tests/support/tcp_proxy.py) sits between a `manage.py serve`
process and PostgreSQL or Redis, and cuts or restores the network while an
upload streams. The database faults need a database on the network
(PostgreSQL), the channel-layer ones the Redis layer, and the cross-process
holders a layer that reaches other processes (Redis): each runs in the CI
stage that has it and says why it cannot run in the other.
"""

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest
import websockets

from tests.support import stored
from tests.support.files import file_sha256, lock_is_free
from tests.support.live_backend import http_call, live_backend
from tests.support.live_server import ROOT, LiveServer
from tests.support.tcp_proxy import TcpProxy
from tests.test_live_server import (
    WS_TIMEOUT,
    api,
    create_upload,
    diagnostics,
    messages_until_closed,
    receive,
    stream,
    upload_detail,
    wait_for,
    ws_connect,
)

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
GiB = 1024 * MiB
LEASE_SECONDS = 5


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "faults") as backend:
        yield backend


def needs_postgres(backend):
    if not backend.postgres:
        pytest.skip("SQLite is a local file: there is no database connection to cut (the PostgreSQL stage runs this)")


def needs_redis(backend):
    if not backend.redis_url:
        pytest.skip("the in-memory channel layer has no connection to cut (the PostgreSQL + Redis stage runs this)")


def proxy_for(url: str) -> TcpProxy:
    parts = urlsplit(url)
    return TcpProxy(parts.hostname, parts.port or {"redis": 6379}.get(parts.scheme, 5432))


@pytest.fixture
def servers(tmp_path):
    started: list[LiveServer] = []

    def start(name: str = "server", **kwargs) -> LiveServer:
        server = LiveServer(tmp_path / name, **kwargs)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


async def send_until(ws, data: bytes, start: int, end: int, *, chunk: int, window: int) -> int:
    """Send data[start:end] within the window; returns the last acked offset."""
    view, sent, acked = memoryview(data), start, start
    while acked < end:
        while sent < end and sent + min(chunk, end - sent) - acked <= window:
            frame = view[sent : min(sent + chunk, end)]
            await ws.send(frame)
            sent += len(frame)
        message = await receive(ws)
        assert message["type"] == "ack", message
        acked = message["offset"]
    return acked


# --- the database goes away ----------------------------------------------------------------------


async def test_database_cut_mid_upload_is_4503_the_server_stays_up_and_the_upload_completes_after_restore(
    backend, servers
):
    needs_postgres(backend)
    token = backend.alice_token
    with proxy_for(backend.database_url) as database:
        server = servers(
            database_url=database.via(backend.database_url),
            redis_url=backend.redis_url,
            DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
        )
        data = os.urandom(24 * MiB)
        upload = create_upload(server, token, "db-cut.bin", data)

        async with ws_connect(server, upload["ws_url"]) as ws:
            ready = await receive(ws)
            acked = await send_until(ws, data, 0, 8 * MiB, chunk=ready["chunk_size"], window=ready["window"])
            database.cut()
            cut_at = time.monotonic()
            # Keep streaming: the next commit (at most a second away) meets the dead database.
            view = memoryview(data)
            for start in range(acked, acked + ready["window"], ready["chunk_size"]):
                await ws.send(view[start : start + ready["chunk_size"]])
            messages, close_code = await asyncio.wait_for(messages_until_closed(ws), 15)
        refused_after = time.monotonic() - cut_at

        errors = [message for message in messages if message["type"] == "error"]
        assert [error["code"] for error in errors] == ["unavailable"], messages
        assert errors[0]["retry_after"] >= 1
        assert close_code == 4503, (close_code, messages)
        assert refused_after < 15, refused_after
        assert server.process.poll() is None, "the server died\n" + diagnostics(server)
        # While the database is down the API says so too, as a JSON 503 with Retry-After.
        answer = http_call(server, "GET", f"/api/uploads/{upload['id']}/", token=token, timeout=30)
        assert answer.status == 503, (answer.status, answer.body)
        assert answer.json()["code"] == "unavailable"
        assert int(answer.headers["Retry-After"]) >= 1

        database.restore()
        detail = wait_for(lambda: _detail_when_up(server, token, upload["id"]), "the API to answer again", 30)
        assert detail["status"] == "uploading"
        async with ws_connect(server, detail["ws_url"]) as ws:
            ready = await receive(ws)
            assert ready["type"] == "ready", ready
            assert ready["offset"] <= 8 * MiB + ready["window"]
            complete = await stream(ws, data, ready["offset"], chunk=ready["chunk_size"], window=ready["window"])
            await asyncio.wait_for(ws.wait_closed(), WS_TIMEOUT)
            assert ws.close_code == 1000

    assert complete["sha256"] == hashlib.sha256(data).hexdigest()
    [key] = stored.finished_keys(server)
    assert stored.finished_sha256(key, server) == hashlib.sha256(data).hexdigest()


def _detail_when_up(server: LiveServer, token: str, upload_id: str) -> dict | None:
    try:
        status, body = api(server, token, "GET", f"/api/uploads/{upload_id}/")
    except OSError:
        return None
    if status != 200:
        time.sleep(0.2)
        return None
    return body


def test_reference_client_resumes_by_itself_after_the_database_comes_back(backend, servers, tmp_path):
    needs_postgres(backend)
    path = tmp_path / "db-outage.bin"
    with open(path, "wb") as handle:
        for _ in range(64):
            handle.write(os.urandom(MiB))
    with proxy_for(backend.database_url) as database:
        server = servers(
            database_url=database.via(backend.database_url),
            redis_url=backend.redis_url,
            DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
            # A slow stream, so that the outage lands in its middle.
            DIRECTDRIVEX_WINDOW=MiB,
            DIRECTDRIVEX_CHUNK_SIZE=256 * 1024,
        )
        log_path = tmp_path / "client.log"
        with open(log_path, "wb") as output:
            client = subprocess.Popen(
                [sys.executable, "-m", "ddxclient", "upload", str(path), "--server", server.url,
                 "--token", backend.alice_token, "--quiet", "--max-retries", "100"],
                cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            wait_for(lambda: stored.part_keys(server), "the part", 60)
            wait_for(lambda: durable_offset(server, backend.alice_token, path.name) >= 8 * MiB, "8 MiB durable", 60)
            database.cut()
            time.sleep(4)  # the client meets 4503 / 503 and keeps retrying
            assert client.poll() is None, "the client gave up during the outage\n" + log_path.read_text()
            database.restore()
            exit_code = client.wait(180)
        finally:
            if client.poll() is None:
                client.kill()
    assert exit_code == 0, log_path.read_text() + diagnostics(server)
    [key] = stored.finished_keys(server)
    assert stored.finished_sha256(key, server) == file_sha256(path)


def durable_offset(server: LiveServer, token: str, filename: str) -> int:
    """The durable offset of the upload of ``filename`` (0 before it exists)."""
    status, body = api(server, token, "GET", "/api/uploads/")
    assert status == 200, (status, body)
    return max((upload["offset"] for upload in body if upload["filename"] == filename), default=0)


# --- the channel layer goes away -------------------------------------------------------------


async def test_redis_cut_mid_upload_does_not_drop_the_connection(backend, servers):
    needs_redis(backend)
    token = backend.alice_token
    with proxy_for(backend.redis_url) as redis:
        server = servers(database_url=backend.database_url, redis_url=redis.via(backend.redis_url))
        data = os.urandom(32 * MiB)
        upload = create_upload(server, token, "redis-cut.bin", data)
        async with ws_connect(server, upload["ws_url"]) as ws:
            ready = await receive(ws)
            chunk, window = ready["chunk_size"], ready["window"]
            acked = await send_until(ws, data, 0, 8 * MiB, chunk=chunk, window=window)
            redis.cut()
            acked = await send_until(ws, data, acked, 16 * MiB, chunk=chunk, window=window)
            await asyncio.sleep(3)  # the consumer's channel-layer receive fails and retries meanwhile
            acked = await send_until(ws, data, acked, 24 * MiB, chunk=chunk, window=window)
            redis.restore()
            complete = await stream(ws, data, acked, chunk=chunk, window=window)
            await asyncio.wait_for(ws.wait_closed(), WS_TIMEOUT)
            assert ws.close_code == 1000

    assert complete["sha256"] == hashlib.sha256(data).hexdigest()
    assert upload_detail(server, token, upload["id"])["status"] == "complete"
    assert server.process.poll() is None


# --- a live holder on another process ---------------------------------------------------------


# A sparse part file planted on disk, re-hashed under its flock (s3 saves the hash state: no re-hash).
@pytest.mark.local_storage
async def test_a_holder_busy_re_hashing_on_another_process_is_not_taken_over(backend, servers):
    needs_redis(backend)
    token = backend.alice_token
    server_a = servers("a", database_url=backend.database_url, redis_url=backend.redis_url)
    server_b = servers(
        "b", database_url=backend.database_url, redis_url=backend.redis_url, storage_dir=server_a.storage
    )
    prefix = 2 * GiB
    upload = create_upload(server_a, token, "busy-rehash.bin", b"x")
    # A resume point deep into a big file: its writer re-hashes two sparse GiB (seconds) before ready.
    (server_a.storage / "partial").mkdir(parents=True, exist_ok=True)
    key = server_a.manage(
        "shell",
        "-c",
        "from uploads.models import Upload;"
        f"Upload.objects.filter(pk='{upload['id']}').update(size={prefix + 1}, offset={prefix}, sha256='');"
        f"print('KEY', Upload.objects.get(pk='{upload['id']}').storage_key)",
    )
    key = next(line.split()[1] for line in key.splitlines() if line.startswith("KEY "))
    with open(server_a.storage / "partial" / f"{key}.part", "wb") as handle:
        handle.truncate(prefix)

    part = server_a.storage / "partial" / f"{key}.part"
    async with ws_connect(server_a, upload["ws_url"]) as first:
        await asyncio.to_thread(wait_for, lambda: not lock_is_free(part), "A to re-hash under the file's lock", 20)
        async with ws_connect(server_b, upload["ws_url"]) as second:
            messages, close_code = await messages_until_closed(second)
        assert close_code == 4409, messages
        assert [m["code"] for m in messages if m["type"] == "error"] == ["busy"], messages
        ready = await asyncio.wait_for(receive(first), 60)
        assert (ready["type"], ready["offset"]) == ("ready", prefix), ready
        await first.send(b"x")
        messages, close_code = await messages_until_closed(first)
    assert close_code == 1000, messages
    assert messages[-1]["type"] == "complete"


# --- the database down when a writer connects -------------------------------------------------------


async def test_a_database_down_at_the_handshake_is_4503_with_retry_after_not_a_500(backend, servers):
    # Before: the ticket's user lookup ran in the auth middleware with no error handling;
    # Daphne answered the handshake with HTTP 500 (a browser sees 1006) and logged a traceback.
    needs_postgres(backend)
    with proxy_for(backend.database_url) as database:
        server = servers(database_url=database.via(backend.database_url), redis_url=backend.redis_url)
        data = os.urandom(MiB)
        upload = create_upload(server, backend.alice_token, "down-at-connect.bin", data)
        database.cut()
        async with ws_connect(server, upload["ws_url"]) as ws:
            messages, close_code = await messages_until_closed(ws)
        database.restore()

        assert close_code == 4503, messages
        [error] = messages
        assert (error["type"], error["code"]) == ("error", "unavailable")
        assert error["retry_after"] >= 1
        log = server.log_path.read_text(errors="replace")
        assert "Exception inside application" not in log and "Traceback" not in log, log[-3000:]
        # Once it is back, the same ticket connects and the upload completes.
        detail = wait_for(lambda: _detail_when_up(server, backend.alice_token, upload["id"]), "the database", 30)
        async with ws_connect(server, detail["ws_url"]) as ws:
            ready = await receive(ws)
            complete = await stream(ws, data, ready["offset"], chunk=ready["chunk_size"], window=ready["window"])
    assert complete["sha256"] == hashlib.sha256(data).hexdigest()


# --- a live writer on a busy process --------------------------------------------------------------


async def test_a_live_writer_whose_process_is_busy_is_not_taken_over_from_another_process(backend, servers):
    # Server A's handshakes are slow: the pages' sessions cannot be read (the test locks the
    # session table), as when a burst of handshakes waits on a saturated pool. Before, those
    # lookups ran on the process's one shared sync thread, and so did the hop every consumer
    # message took: the newcomer on B pinged A's writer, the answer queued behind them, the 2 s
    # verdict expired, B revoked A's live writer (4410, its tail lost) and then met the file's
    # lock (4409). The lease is the one answer now, renewed from threads of the writer's own.
    needs_postgres(backend)
    needs_redis(backend)
    import psycopg

    server_a = servers("a", database_url=backend.database_url, redis_url=backend.redis_url)
    server_b = servers(
        "b", database_url=backend.database_url, redis_url=backend.redis_url, storage_dir=server_a.storage
    )
    session = server_a.manage("shell", "-c", SIGNED_IN_SESSION)
    session_key = next(line.split()[1] for line in session.splitlines() if line.startswith("SESSION "))
    page = {"Origin": f"http://127.0.0.1:{server_a.port}", "Cookie": f"sessionid={session_key}"}
    data = os.urandom(24 * MiB)
    upload = create_upload(server_a, backend.alice_token, "busy-process.bin", data)
    async with ws_connect(server_a, upload["ws_url"]) as writer:
        ready = await receive(writer)
        chunk, window = ready["chunk_size"], ready["window"]
        acked = await send_until(writer, data, 0, 4 * MiB, chunk=chunk, window=window)
        with psycopg.connect(backend.database_url) as locker:
            locker.execute("LOCK TABLE django_session IN ACCESS EXCLUSIVE MODE")

            async def page_connects():
                with contextlib.suppress(Exception):
                    async with ws_connect(server_a, "/ws/progress/", headers=page) as ws:
                        await messages_until_closed(ws)

            pages = [asyncio.ensure_future(page_connects()) for _ in range(4)]
            await asyncio.sleep(1)  # A's pages are waiting on the session table now
            async with ws_connect(server_b, upload["ws_url"]) as newcomer:
                messages, close_code = await messages_until_closed(newcomer)
            assert close_code == 4409, messages
            assert [m["code"] for m in messages] == ["busy"], messages
            # A's writer goes on writing meanwhile.
            acked = await send_until(writer, data, acked, 8 * MiB, chunk=chunk, window=window)
            await asyncio.sleep(3)  # longer than any ping verdict
            locker.rollback()
        await asyncio.gather(*pages)
        complete = await stream(writer, data, acked, chunk=chunk, window=window)
    assert complete["sha256"] == hashlib.sha256(data).hexdigest()


SIGNED_IN_SESSION = """
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
user = User.objects.get(username="alice")
session = SessionStore()
session["_auth_user_id"] = str(user.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = user.get_session_auth_hash()
session.create()
print("SESSION", session.session_key)
"""


# --- revocations against a stalled channel layer --------------------------------------------------


async def test_a_delete_answers_at_once_while_redis_is_stalled_and_the_fence_stops_the_writer(backend, servers):
    # Before: the revocation notice waited for Redis (30 s, the socket timeout) inside the DELETE.
    needs_redis(backend)
    with proxy_for(backend.redis_url) as redis:
        server = servers(database_url=backend.database_url, redis_url=redis.via(backend.redis_url))
        data = os.urandom(32 * MiB)
        upload = create_upload(server, backend.alice_token, "stalled-redis.bin", data)
        async with ws_connect(server, upload["ws_url"]) as ws:
            ready = await receive(ws)
            chunk, window = ready["chunk_size"], ready["window"]
            acked = await send_until(ws, data, 0, 8 * MiB, chunk=chunk, window=window)
            redis.stall()
            started = time.monotonic()
            answer = await asyncio.to_thread(
                http_call, server, "DELETE", f"/api/uploads/{upload['id']}/", token=backend.alice_token, timeout=60
            )
            took = time.monotonic() - started
            # The notice cannot arrive; the writer's next commit is fenced and it closes by itself.
            view = memoryview(data)
            with contextlib.suppress(websockets.ConnectionClosed):
                for start in range(acked, acked + window, chunk):
                    await ws.send(view[start : start + chunk])
            messages, close_code = await asyncio.wait_for(messages_until_closed(ws), 30)
            redis.restore()
    assert answer.status == 204, answer.body
    assert took < 10, f"DELETE took {took:.1f}s against a stalled Redis"
    assert close_code == 4409, messages
    assert [m["code"] for m in messages if m["type"] == "error"] == ["not_uploading"], messages
    assert stored.part_keys(server) == [] and stored.finished_keys(server) == []


async def test_a_takeover_that_reaps_while_redis_is_stalled_is_admitted_not_left_holding_a_slot(backend, servers):
    # A writer whose process died holds the upload's slot with a lease that ran out. The newcomer's
    # admission reaps it and tells its holder through Redis, which is stalled. Before, the notice
    # waited 30 s inside the admission, the admission's 10 s deadline answered 4503, and the grant
    # it then got held a fresh slot for a lease.
    needs_redis(backend)
    with proxy_for(backend.redis_url) as redis:
        server = servers(
            database_url=backend.database_url,
            redis_url=redis.via(backend.redis_url),
            DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
        )
        data = os.urandom(2 * MiB)
        upload = create_upload(server, backend.alice_token, "reap-stalled.bin", data)
        server.manage(
            "shell",
            "-c",
            "from datetime import timedelta; from django.utils import timezone;"
            "from django.contrib.auth.models import User; from uploads.models import Slot;"
            "from uploads.services.grants import writer_admit;"
            f"grant = writer_admit(User.objects.get(username='alice'), {upload['id']!r}, 'specific.dead!writer');"
            "Slot.objects.filter(pk=grant.slot_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))",
        )
        redis.stall()
        started = time.monotonic()
        async with ws_connect(server, upload["ws_url"]) as ws:
            ready = await receive(ws)
            admitted_after = time.monotonic() - started
            assert ready["type"] == "ready", ready
            complete = await stream(ws, data, ready["offset"], chunk=ready["chunk_size"], window=ready["window"])
        redis.restore()
    assert admitted_after < 8, admitted_after
    assert complete["sha256"] == hashlib.sha256(data).hexdigest()


# --- cleanup inside Daphne's budget ---------------------------------------------------------------


async def test_a_client_that_leaves_while_the_database_stalls_is_cleaned_up_before_daphne_gives_up(backend, servers):
    # The writer is stuck in a commit (the database stalls, the lease runs out locally) when the
    # client leaves. Daphne cancels such an application 10 s after the disconnect, logging that it
    # "took too long to shut down and was killed", and again every second. Before, the session
    # gave itself 15 s and the writer's close 8 s after whatever was in progress: Daphne killed it.
    needs_postgres(backend)
    with proxy_for(backend.database_url) as database:
        server = servers(
            database_url=database.via(backend.database_url),
            redis_url=backend.redis_url,
            DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
        )
        data = os.urandom(24 * MiB)
        upload = create_upload(server, backend.alice_token, "stalled-db.bin", data)
        async with ws_connect(server, upload["ws_url"]) as ws:
            ready = await receive(ws)
            chunk, window = ready["chunk_size"], ready["window"]
            acked = await send_until(ws, data, 0, 4 * MiB, chunk=chunk, window=window)
            database.stall()
            view, sent, until = memoryview(data), acked, time.monotonic() + LEASE_SECONDS + 1
            while time.monotonic() < until and sent < acked + window:
                await ws.send(view[sent : sent + chunk])
                sent += chunk
                await asyncio.sleep(0.2)
        # The client is gone; the writer waits on the stalled database.
        await asyncio.sleep(14)
        log = server.log_path.read_text(errors="replace")
        # It comes back as a restarted database does: the stalled connections are reset.
        database.cut()
        database.restore()
        assert "took too long to shut down and was killed" not in log, log[-4000:]
        assert "did not end in" in log or "ran out of time" in log, log[-4000:]
        assert server.process.poll() is None
        # The slot expires with its lease; the upload resumes from what was durable and completes.
        detail = wait_for(lambda: _detail_when_up(server, backend.alice_token, upload["id"]), "the database", 30)
        assert detail["status"] == "uploading"

        async def resume():
            async with ws_connect(server, detail["ws_url"]) as ws:
                ready = await receive(ws)
                if ready["type"] != "ready":
                    return None
                return await stream(ws, data, ready["offset"], chunk=ready["chunk_size"], window=ready["window"])

        complete = None
        for _attempt in range(20):
            complete = await resume()
            if complete is not None:
                break
            await asyncio.sleep(1)
    assert complete is not None and complete["sha256"] == hashlib.sha256(data).hexdigest()
