"""Real faults against real servers: database and channel layer cut mid-upload, a busy holder elsewhere.

A TcpProxy (tests/support/tcp_proxy.py) sits between a `manage.py serve`
process and PostgreSQL or Redis, and cuts or restores the network while an
upload streams. The database faults need a database on the network
(PostgreSQL), the channel-layer ones the Redis layer, and the cross-process
ping a layer that reaches other processes (Redis): each runs in the CI stage
that has it and says why it cannot run in the other.
"""

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest

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
    part_files,
    part_size,
    receive,
    stored_files,
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
    [stored] = stored_files(server)
    assert stored.read_bytes() == data


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
            [part] = wait_for(lambda: part_files(server), "the part file", 60)
            wait_for(lambda: part_size(part) >= 8 * MiB, "8 MiB in the part file", 60)
            database.cut()
            time.sleep(4)  # the client meets 4503 / 503 and keeps retrying
            assert client.poll() is None, "the client gave up during the outage\n" + log_path.read_text()
            database.restore()
            exit_code = client.wait(180)
        finally:
            if client.poll() is None:
                client.kill()
    assert exit_code == 0, log_path.read_text() + diagnostics(server)
    [stored] = stored_files(server)
    assert file_sha256(stored) == file_sha256(path)


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


async def test_a_holder_busy_re_hashing_on_another_process_answers_the_ping_and_is_not_taken_over(backend, servers):
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
