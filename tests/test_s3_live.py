"""Real faults against real servers on the s3 backend (issue 14): a host killed, a writer frozen, the store cut.

Each "host" is a `manage.py serve` process with its own storage folder and
its own spool folder: two hosts share only PostgreSQL, Redis and the bucket
(SeaweedFS, the session's `s3_server`; every test has its own prefix in it,
the `s3_storage` fixture). The bytes come from a file on disk; the finished
object is read back from the bucket itself, not through the server. Each
process keeps its own metrics (a PROMETHEUS_MULTIPROC_DIR of its own), so
``directdrivex_resume_bytes_read_total`` says what that host read back.

They need a database and a channel layer that two processes share, so they
run in the PostgreSQL + Redis stage and skip elsewhere.
"""

import asyncio
import contextlib
import hashlib
import http.client
import json
import logging
import os
import select
import signal
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.support.files import write_random
from tests.support.live_backend import Answer, http_call, live_backend
from tests.support.live_server import LiveServer
from tests.support.tcp_proxy import TcpProxy
from tests.test_live_faults import send_until
from tests.test_live_server import (
    WS_TIMEOUT,
    create_upload,
    diagnostics,
    freeze,
    messages_until_closed,
    receive,
    stream,
    upload_detail,
    wait_for,
    ws_connect,
)

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# uploads.storage.s3.part_size() for every file here: parts of 8 MiB.
PART = 8 * MiB
SIZE = 48 * MiB
LEASE_SECONDS = 5
METRICS_TOKEN = "s3-live-metrics-" + "m" * 32
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}
RESUME_BYTES_READ = "directdrivex_resume_bytes_read_total"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    database_url, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if not database_url.startswith(("postgres://", "postgresql://")):
        pytest.skip("two hosts share a database on the network: needs DATABASE_URL=postgres://… (the PG stage)")
    if not redis_url.startswith(("redis://", "rediss://")):
        pytest.skip("two hosts share a channel layer on the network: needs REDIS_URL=redis://… (the PG stage)")
    with live_backend(tmp_path_factory, "s3live") as backend:
        yield backend


@pytest.fixture
def hosts(backend, s3_storage, tmp_path):
    """``hosts("a", SETTING=value)``: a server process on a host of its own, on this test's bucket prefix.

    Its own storage folder, spool folder and metrics; PostgreSQL, Redis and
    the bucket shared with the other hosts. Stopped (woken first if frozen)
    at teardown.
    """
    with contextlib.ExitStack() as cleanup:

        def start(name: str, **settings) -> LiveServer:
            root = tmp_path / name
            server = LiveServer(
                root,
                database_url=backend.database_url,
                redis_url=backend.redis_url,
                storage_dir=root / "storage",
                DIRECTDRIVEX_SPOOL_DIR=root / "spool",
                DIRECTDRIVEX_METRICS_TOKEN=METRICS_TOKEN,
                PROMETHEUS_MULTIPROC_DIR=root / "prometheus",
                **settings,
            )
            cleanup.callback(server.stop)
            server.start(timeout=60)
            return server

        yield start


# --- what the bucket, the database and the metrics say ---------------------------------------------


def bucket_object(s3) -> tuple[str, int, str]:
    """The one finished object under the test's prefix: (ETag, size, sha256 of its bytes read from the bucket)."""
    listing = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=f"{s3.prefix}files/")
    names = [item["Key"] for item in listing.get("Contents", [])]
    assert len(names) == 1, names
    answer = s3.client.get_object(Bucket=s3.bucket, Key=names[0])
    digest, size = hashlib.sha256(), 0
    for block in answer["Body"].iter_chunks(4 * MiB):
        digest.update(block)
        size += len(block)
    return answer["ETag"], size, digest.hexdigest()


def multipart_uploads(s3) -> list[str]:
    listing = s3.client.list_multipart_uploads(Bucket=s3.bucket, Prefix=s3.prefix)
    return [f"{upload['Key']} {upload['UploadId']}" for upload in listing.get("Uploads", [])]


def active_slots(database_url: str, upload_id: str) -> int:
    import psycopg

    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as connection:
        (count,) = connection.execute(
            "SELECT count(*) FROM uploads_slot WHERE upload_id = %s AND released_at IS NULL", (uuid.UUID(upload_id),)
        ).fetchone()
    return count


def resume_bytes_read(server: LiveServer) -> float:
    """What this process's writers read back from storage to resume (its own metrics)."""
    answer = http_call(server, "GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert answer.status == 200, (answer.status, answer.body[:300])
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            if sample.name == RESUME_BYTES_READ and not sample.labels:
                return sample.value
    pytest.fail(f"no {RESUME_BYTES_READ} in {server.url}/metrics")


def durable_offset(server: LiveServer, token: str, upload_id: str) -> int:
    return upload_detail(server, token, upload_id)["offset"]


class OffsetWatch:
    """Polls the API's durable offset in a thread, so a test can say it never went back."""

    def __init__(self, server: LiveServer, token: str, upload_id: str):
        self.server, self.token, self.upload_id = server, token, upload_id
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, AssertionError, ValueError):
                answer = http_call(self.server, "GET", f"/api/uploads/{self.upload_id}/", token=self.token, timeout=5)
                if answer.status == 200:
                    self.seen.append(answer.json()["offset"])
            self._stop.wait(0.1)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(10)
        return self.seen


# --- clients -----------------------------------------------------------------------------------


async def admitted(server: LiveServer, ws_url: str, timeout: float = 3 * LEASE_SECONDS):
    """A writer connection that got ``ready``, and the refusals met on the way.

    As the protocol says: a busy upload (4409 busy) or a full server (4429)
    is tried again after ``retry_after`` seconds, until ``timeout``.
    """
    refusals, until = [], time.monotonic() + timeout
    while True:
        ws = await ws_connect(server, ws_url)
        message = await receive(ws)
        if message["type"] == "ready":
            return ws, message, refusals
        with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
            await asyncio.wait_for(ws.wait_closed(), WS_TIMEOUT)
        refusals.append((message, ws.close_code))
        assert (message.get("code"), ws.close_code) in (("busy", 4409), ("slots_exhausted", 4429)), refusals
        assert message["retry_after"] >= 1, message
        assert time.monotonic() < until, f"not admitted within {timeout}s: {refusals}"
        await asyncio.sleep(min(message["retry_after"], LEASE_SECONDS))


def tus_create(server: LiveServer, token: str, filename: str, size: int, sha256: str) -> str:
    import base64

    metadata = ",".join(
        f"{name} {base64.b64encode(value.encode()).decode()}"
        for name, value in (("filename", filename), ("sha256", sha256))
    )
    answer = http_call(
        server, "POST", "/api/tus/", token=token,
        headers={**TUS_HEADERS, "Upload-Length": str(size), "Upload-Metadata": metadata},
    )  # fmt: skip
    assert answer.status == 201, (answer.status, answer.body)
    return urlsplit(answer.headers["Location"]).path.rstrip("/").rsplit("/", 1)[1]


def tus_head(server: LiveServer, token: str, upload_id: str) -> Answer:
    return http_call(server, "HEAD", f"/api/tus/{upload_id}", token=token, headers=TUS_HEADERS)


def tus_patch(server: LiveServer, token: str, upload_id: str, offset: int, body: bytes) -> Answer:
    headers = {**TUS_HEADERS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
    return http_call(server, "PATCH", f"/api/tus/{upload_id}", body=body, token=token, headers=headers, timeout=120)


def tus_head_when_let_go(server: LiveServer, token: str, upload_id: str, timeout: float = 3 * LEASE_SECONDS):
    """HEAD, again after each 423's Retry-After (a holder that did not let go yet), until ``timeout``."""
    refusals, until = [], time.monotonic() + timeout
    while True:
        answer = tus_head(server, token, upload_id)
        if answer.status != 423:
            return answer, refusals
        refusals.append(answer.headers.get("Retry-After"))
        assert int(answer.headers["Retry-After"]) >= 1, answer.headers
        assert time.monotonic() < until, f"still 423 after {timeout}s: {refusals}"
        time.sleep(min(int(answer.headers["Retry-After"]), LEASE_SECONDS))


class HeldPatch:
    """A tus PATCH of ``length`` body bytes written by hand: the headers, then as much of the body as the test
    sends, when it sends it. ``send`` stops as soon as the server answers (or goes away)."""

    def __init__(self, server: LiveServer, token: str, upload_id: str, offset: int, length: int):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        self.sock.sendall(
            (
                f"PATCH /api/tus/{upload_id} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                f"Authorization: Token {token}\r\nTus-Resumable: 1.0.0\r\n"
                f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
                f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
            ).encode()
        )

    def send(self, data: bytes, timeout: float = 60) -> bool:
        """Send ``data``; False if the server answered or went away first."""
        view, until = memoryview(data), time.monotonic() + timeout
        while view:
            assert time.monotonic() < until, f"the server took no byte for {timeout}s"
            readable, writable, _ = select.select([self.sock], [self.sock], [], 1)
            if readable:
                return False
            if writable:
                try:
                    view = view[self.sock.send(view[: 256 * 1024]) :]
                except OSError:
                    return False
        return True

    def answer(self) -> Answer:
        response = http.client.HTTPResponse(self.sock)
        response.begin()
        return Answer(response.status, response.headers, response.read())

    def close(self) -> None:
        self.sock.close()


# --- 1. a host dies; the upload goes on on another host ------------------------------------------


async def test_a_websocket_upload_resumes_on_another_host_after_kill_9_without_resending_or_reading_back_parts(
    backend, hosts, s3_storage, tmp_path
):
    token = backend.alice_token
    host_a = hosts("a", DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS)
    host_b = hosts("b", DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS)
    path = tmp_path / "two-hosts.bin"
    sha256 = write_random(path, SIZE)
    data = path.read_bytes()
    upload = create_upload(host_a, token, path.name, data)

    ws_a = await ws_connect(host_a, upload["ws_url"])
    try:
        ready = await receive(ws_a)
        assert (ready["type"], ready["offset"]) == ("ready", 0), ready
        chunk, window = ready["chunk_size"], ready["window"]
        # Three parts and a half acknowledged; A commits them (the parts, and a tail for the half).
        acked = await send_until(ws_a, data, 0, 3 * PART + 4 * MiB, chunk=chunk, window=window)
        seen = await asyncio.to_thread(
            wait_for,
            lambda: (offset := durable_offset(host_a, token, upload["id"])) > 20 * MiB and offset,
            "A to commit past 20 MiB",
            15,
            interval=0.1,
        )
        # More bytes on their way, unacknowledged, when the host dies.
        for start in range(acked, acked + 2 * MiB, chunk):
            await ws_a.send(data[start : start + chunk])
        host_a.kill()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws_a.close(), 5)

    before = resume_bytes_read(host_b)
    detail = upload_detail(host_b, token, upload["id"])
    assert detail["status"] == "uploading", detail
    assert detail["offset"] >= seen, (detail, seen)  # nothing the API showed durable was lost
    ws_b, ready, refusals = await admitted(host_b, detail["ws_url"])
    try:
        # The server decides where the client resumes: the durable offset the API showed.
        assert (ready["type"], ready["offset"]) == ("ready", detail["offset"]), (ready, refusals)
        complete = await stream(ws_b, data, ready["offset"], chunk=ready["chunk_size"], window=ready["window"])
        await asyncio.wait_for(ws_b.wait_closed(), WS_TIMEOUT)
        assert ws_b.close_code == 1000
    finally:
        await ws_b.close()

    read_back = resume_bytes_read(host_b) - before
    log.info(
        "killed A at %d durable; B resumed at %d after %s, read back %d", seen, ready["offset"], refusals, read_back
    )
    assert complete["sha256"] == sha256, diagnostics(host_a, host_b)
    assert upload_detail(host_b, token, upload["id"])["status"] == "complete"
    _etag, size, stored_sha256 = await asyncio.to_thread(bucket_object, s3_storage)
    assert (size, stored_sha256) == (SIZE, sha256)
    # Committed parts were neither sent again nor read back: at most the tail after the last part.
    assert read_back < PART, f"host B read {read_back / MiB:.1f} MiB back to resume at {ready['offset'] / MiB} MiB"
    assert read_back == ready["offset"] % PART, (read_back, ready["offset"])
    assert active_slots(backend.database_url, upload["id"]) == 0
    assert multipart_uploads(s3_storage) == []


def test_a_tus_upload_resumes_on_another_host_after_kill_9_from_the_offset_the_api_showed(
    backend, hosts, s3_storage, tmp_path
):
    token = backend.alice_token
    host_a = hosts("a", DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS)
    host_b = hosts("b", DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS)
    path = tmp_path / "two-hosts-tus.bin"
    sha256 = write_random(path, SIZE)
    data = path.read_bytes()
    upload_id = tus_create(host_a, token, path.name, SIZE, sha256)

    patch = HeldPatch(host_a, token, upload_id, 0, SIZE)
    try:
        # The body stops 2.5 parts in, then goes on: A commits in between, then dies mid-body.
        assert patch.send(data[: 2 * PART + 4 * MiB])
        seen = wait_for(
            lambda: (offset := durable_offset(host_a, token, upload_id)) > 16 * MiB and offset,
            "A to commit past 16 MiB",
            15,
            interval=0.1,
        )
        assert patch.send(data[2 * PART + 4 * MiB : 3 * PART + 4 * MiB])
        host_a.kill()
    finally:
        patch.close()

    before = resume_bytes_read(host_b)
    durable = durable_offset(host_b, token, upload_id)
    assert durable >= seen
    head, refusals = tus_head_when_let_go(host_b, token, upload_id)
    assert head.status == 200, (head.status, head.body, refusals)
    assert int(head.headers["Upload-Offset"]) == durable, (head.headers, durable)
    answer = tus_patch(host_b, token, upload_id, durable, data[durable:])
    assert (answer.status, answer.headers.get("Upload-Offset")) == (204, str(SIZE)), (answer.status, answer.body)

    read_back = resume_bytes_read(host_b) - before
    log.info("killed A at %d durable; B resumed at %d after 423s %s, read back %d", seen, durable, refusals, read_back)
    detail = upload_detail(host_b, token, upload_id)
    assert (detail["status"], detail["sha256"]) == ("complete", sha256)
    _etag, size, stored_sha256 = bucket_object(s3_storage)
    assert (size, stored_sha256) == (SIZE, sha256)
    assert read_back < PART, f"host B read {read_back / MiB:.1f} MiB back to resume at {durable / MiB} MiB"
    assert read_back == durable % PART, (read_back, durable)
    assert active_slots(backend.database_url, upload_id) == 0
    assert multipart_uploads(s3_storage) == []


# --- 2. a writer frozen past its lease ----------------------------------------------------------


@pytest.mark.parametrize("wakes", ["mid_upload", "after_completion"])
async def test_a_writer_frozen_past_its_lease_adds_nothing_to_the_object_and_is_refused_when_it_wakes(
    backend, hosts, s3_storage, tmp_path, wakes
):
    """A is frozen past its lease holding unacknowledged bytes that would fill its next part; B takes over the
    same multipart upload. A wakes while B is mid-upload, or after B completed the object."""
    token = backend.alice_token
    host_a = hosts("a", DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS)
    host_b = hosts("b", DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS)
    path = tmp_path / "stale.bin"
    sha256 = write_random(path, 40 * MiB)
    data = path.read_bytes()
    upload = create_upload(host_a, token, path.name, data)
    before_freeze = PART + 4 * MiB  # a part and a tail
    # Sent only to the frozen A: they would fill its second part, had A the right to send it.
    marker = b"\xee" * (PART - 4 * MiB)

    ws_a = await ws_connect(host_a, upload["ws_url"])
    marker_sent = None
    try:
        ready = await receive(ws_a)
        chunk, window = ready["chunk_size"], ready["window"]
        await send_until(ws_a, data, 0, before_freeze, chunk=chunk, window=window)
        await asyncio.to_thread(
            wait_for,
            lambda: durable_offset(host_a, token, upload["id"]) == before_freeze,
            "A to commit what it acknowledged",
            10,
            interval=0.1,
        )
        frozen_at = await asyncio.to_thread(freeze, host_a, backend.database_url)

        async def send_marker():
            for start in range(0, len(marker), chunk):
                await ws_a.send(marker[start : start + chunk])

        # In A's socket (or our buffers, once its socket is full) while A is frozen.
        marker_sent = asyncio.ensure_future(send_marker())
        await asyncio.sleep(max(0.0, frozen_at + LEASE_SECONDS + 1 - time.monotonic()))

        async def wake_a():
            host_a.signal(signal.SIGCONT)
            # A wakes with the marker to write; its client even sends more on the connection it kept.
            with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):
                await asyncio.wait_for(marker_sent, WS_TIMEOUT)
                for _frame in range(2 * MiB // chunk):
                    await ws_a.send(b"\xdd" * chunk)
            return await asyncio.wait_for(messages_until_closed(ws_a), 2 * WS_TIMEOUT)

        ws_b, ready_b, refusals = await admitted(host_b, upload["ws_url"])
        try:
            assert (ready_b["type"], ready_b["offset"]) == ("ready", before_freeze), (ready_b, refusals)
            chunk_b, window_b = ready_b["chunk_size"], ready_b["window"]
            acked_b = before_freeze
            if wakes == "mid_upload":
                # B has sent A's would-be second part and more, its parts recorded, when A wakes.
                acked_b = await send_until(ws_b, data, acked_b, 3 * PART, chunk=chunk_b, window=window_b)
                messages, close_code = await wake_a()
            complete = await stream(ws_b, data, acked_b, chunk=chunk_b, window=window_b)
            await asyncio.wait_for(ws_b.wait_closed(), WS_TIMEOUT)
            assert ws_b.close_code == 1000
        finally:
            await ws_b.close()
        assert complete["sha256"] == sha256
        etag, size, stored_sha256 = await asyncio.to_thread(bucket_object, s3_storage)
        assert (size, stored_sha256) == (len(data), sha256)
        if wakes == "after_completion":
            messages, close_code = await wake_a()
    finally:
        if marker_sent is not None:
            marker_sent.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws_a.close(), 5)

    refusals_a = [(message["code"], close_code) for message in messages if message["type"] == "error"]
    log.info("A woke %s: %s; B admitted after %s", wakes, refusals_a, refusals)
    assert all(m["offset"] <= before_freeze for m in messages if m["type"] == "ack"), messages
    # Whatever A did after waking landed nowhere: the object is the one B completed, byte for byte.
    await asyncio.sleep(2)
    assert await asyncio.to_thread(bucket_object, s3_storage) == (etag, len(data), sha256)
    assert upload_detail(host_b, token, upload["id"])["status"] == "complete"
    assert active_slots(backend.database_url, upload["id"]) == 0
    assert multipart_uploads(s3_storage) == []
    assert host_a.process.poll() is None, "host A died\n" + diagnostics(host_a)
    if wakes == "mid_upload":
        assert refusals_a == [("lease_lost", 4410)], messages
    else:
        # Both rows of the protocol's table fit: the slot was reclaimed while A wrote (4410), and the
        # upload was complete by the time A woke (4409 not_uploading); which one A meets first is a race.
        assert refusals_a in ([("lease_lost", 4410)], [("not_uploading", 4409)]), messages


# --- 3. the object store goes away mid-upload --------------------------------------------------------


@pytest.fixture
def store_proxy(s3_storage):
    parts = urlsplit(s3_storage.endpoint)
    with TcpProxy(parts.hostname, parts.port) as proxy:
        yield proxy


async def test_the_store_cut_mid_upload_is_4503_with_retry_after_and_the_upload_completes_once_it_is_back(
    backend, hosts, s3_storage, store_proxy, tmp_path
):
    token = backend.alice_token
    server = hosts(
        "a",
        DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
        DIRECTDRIVEX_S3_ENDPOINT_URL=store_proxy.via(s3_storage.endpoint),
    )
    path = tmp_path / "store-cut.bin"
    sha256 = write_random(path, 40 * MiB)
    data = path.read_bytes()
    upload = create_upload(server, token, path.name, data)
    watch = OffsetWatch(server, token, upload["id"])
    try:
        async with ws_connect(server, upload["ws_url"]) as ws:
            ready = await receive(ws)
            chunk, window = ready["chunk_size"], ready["window"]
            acked = await send_until(ws, data, 0, PART + 4 * MiB, chunk=chunk, window=window)
            await asyncio.to_thread(
                wait_for, lambda: watch.seen and watch.seen[-1] >= PART, "a commit past the first part", 10
            )
            store_proxy.cut()
            cut_at = time.monotonic()
            # Keep streaming: the next part and the next commit meet the missing store.
            with contextlib.suppress(websockets.ConnectionClosed):
                for start in range(acked, acked + window, chunk):
                    await ws.send(data[start : start + chunk])
            messages, close_code = await asyncio.wait_for(messages_until_closed(ws), 30)
        refused_after = time.monotonic() - cut_at
        durable_after = durable_offset(server, token, upload["id"])
        slots_after = active_slots(backend.database_url, upload["id"])
    finally:
        seen = watch.stop()
        store_proxy.restore()

    log.info("store cut: refused after %.1fs, offsets seen %s, durable after %d", refused_after, seen, durable_after)
    errors = [message for message in messages if message["type"] == "error"]
    assert [error["code"] for error in errors] == ["unavailable"], messages
    assert errors[0]["retry_after"] >= 1, errors
    assert close_code == 4503, (close_code, messages)
    assert refused_after < 20, refused_after
    # Nothing durable was given up: the offset only ever moved forward.
    assert seen == sorted(seen) and durable_after >= max(seen) >= PART, (seen, durable_after)
    assert slots_after == 0, "the refused writer kept its slot"
    assert server.process.poll() is None, "the server died\n" + diagnostics(server)

    detail = upload_detail(server, token, upload["id"])
    async with ws_connect(server, detail["ws_url"]) as ws:
        ready = await receive(ws)
        assert (ready["type"], ready["offset"]) == ("ready", durable_after), ready
        complete = await stream(ws, data, ready["offset"], chunk=ready["chunk_size"], window=ready["window"])
        await asyncio.wait_for(ws.wait_closed(), WS_TIMEOUT)
        assert ws.close_code == 1000
    assert complete["sha256"] == sha256
    _etag, size, stored_sha256 = await asyncio.to_thread(bucket_object, s3_storage)
    assert (size, stored_sha256) == (len(data), sha256)
    assert active_slots(backend.database_url, upload["id"]) == 0


def test_a_tus_patch_whose_store_is_cut_answers_503_with_retry_after_and_a_retry_completes(
    backend, hosts, s3_storage, store_proxy, tmp_path
):
    token = backend.alice_token
    server = hosts(
        "a",
        DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
        DIRECTDRIVEX_S3_ENDPOINT_URL=store_proxy.via(s3_storage.endpoint),
    )
    path = tmp_path / "store-cut-tus.bin"
    sha256 = write_random(path, 40 * MiB)
    data = path.read_bytes()
    upload_id = tus_create(server, token, path.name, len(data), sha256)
    patch = HeldPatch(server, token, upload_id, 0, len(data))
    try:
        assert patch.send(data[: PART + 4 * MiB])
        committed = wait_for(
            lambda: (offset := durable_offset(server, token, upload_id)) >= PART and offset,
            "a commit",
            10,
            interval=0.1,
        )
        store_proxy.cut()
        patch.send(data[PART + 4 * MiB :])  # until the server answers
        answer = patch.answer()
    finally:
        patch.close()
    durable_after = durable_offset(server, token, upload_id)
    slots_after = active_slots(backend.database_url, upload_id)
    store_proxy.restore()

    log.info(
        "tus store cut: %s %s, committed %d before, durable after %d",
        answer.status,
        answer.body,
        committed,
        durable_after,
    )
    assert answer.status == 503, (answer.status, answer.body)
    assert json.loads(answer.body)["code"] == "unavailable"
    assert int(answer.headers["Retry-After"]) >= 1, answer.headers
    assert durable_after >= committed
    assert slots_after == 0, "the refused PATCH kept its slot"

    head, refusals = tus_head_when_let_go(server, token, upload_id)
    assert (head.status, int(head.headers["Upload-Offset"])) == (200, durable_after), (head.status, refusals)
    answer = tus_patch(server, token, upload_id, durable_after, data[durable_after:])
    assert (answer.status, answer.headers.get("Upload-Offset")) == (204, str(len(data))), answer.body
    assert upload_detail(server, token, upload_id)["sha256"] == sha256
    _etag, size, stored_sha256 = bucket_object(s3_storage)
    assert (size, stored_sha256) == (len(data), sha256)
    assert active_slots(backend.database_url, upload_id) == 0
