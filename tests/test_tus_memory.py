"""tus PATCH bodies against a real server (`manage.py serve`): memory stays flat, whatever the body (spec, "Memory").

The contract: during an upload a process grows by at most 32 MiB over its
idle size, and by at most 8 MiB between the first third of the 3.38 GB
reference upload and its end; a PATCH body sent faster than the server can
write it grows the process by at most 64 MiB, and the process keeps answering
its other clients meanwhile; a chunked body of one-byte chunks is bounded as
well (each queued piece is costed, directdrivex.server.FRAME_COST), its bytes
all land in order, and the process answers its other clients meanwhile too.

Each test starts its own server on the module's database (PostgreSQL + Redis
when the suite runs on them, else SQLite and the in-memory layer), uploads a
small file first so that code, threads and connections are in place, and then
takes the process's idle VmRSS. Growth is the highest VmRSS sampled every
20 ms during the work (and the rise of VmHWM) over that. Bodies are made on
the fly (tests.support.bodies: never held whole, never on the client's disk)
and written over a raw socket as fast as the socket takes them; the client
hashes what it sends, and the upload must complete with that sha256.

How the server is made slower than the client: it already is (a raw socket
over loopback takes bytes several times faster than the server hashes and
writes them), and in the flood test the writer is stopped outright for a few
seconds by a transaction of the test's own that holds the slot table
(tests.support.live_backend.slot_inserts_blocked): the writer's durable commit
(which renews the slot's lease) waits on it, and a writer 56 MiB ahead of
its last commit writes nothing more until it lands, as it would on a disk
whose fsync stalls. The client meanwhile sends as fast as TCP lets it.

The reference-size upload (3,624,892,618 bytes) takes 8-11 s on the 2-core
machine CI runs on (measured 346 MB/s on SQLite, 425 MB/s on PostgreSQL +
Redis; the test with its server about 15 s), so it runs in both CI stages
like the other slow tests; its 3.4 GB on disk are deleted when it ends.

Measured numbers are logged (``-o log_cli=true --log-cli-level=INFO`` shows
them) and repeated in assertion messages.
"""

import base64
import contextlib
import logging
import random
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.support.bodies import CHUNKED_END, Body, chunk, chunked_tiny, read_answer, send_head
from tests.support.live_backend import http_call, live_backend, slot_inserts_blocked
from tests.support.live_server import LiveServer, proc_status

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
REFERENCE_SIZE = 3_624_892_618
TUS = "1.0.0"
OCTETS = "application/offset+octet-stream"
# spec, "Memory".
UPLOAD_GROWTH_MIB = 32
LATE_GROWTH_MIB = 8
FLOOD_GROWTH_MIB = 64
# "The process keeps answering other clients": the slowest answer allowed during a flood.
ANSWER_SECONDS = 2.0
EXPECTED_STATUSES = {"OPTIONS /api/tus/": {204}, "GET /api/uploads/": {200}}
SOCKET_TIMEOUT = 120
SAMPLE_SECONDS = 0.02
# The s3 backend's spool: one part filling, three in flight.
SPOOL_PARTS = 4


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "tusmem") as backend:
        yield backend


@pytest.fixture
def server(backend, tmp_path):
    """A server of its own, warmed up; its storage (gigabytes, for the reference upload) is removed afterwards."""
    server = LiveServer(tmp_path / "server", database_url=backend.database_url, redis_url=backend.redis_url)
    try:
        server.start()
        warm_up(server, backend.alice_token)
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.storage, ignore_errors=True)


# --- helpers -----------------------------------------------------------------------------


def tus_headers(token: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Token {token}", "Tus-Resumable": TUS, **headers}


def create(server: LiveServer, token: str, length: int, filename: str) -> str:
    metadata = "filename " + base64.b64encode(filename.encode()).decode()
    answer = http_call(
        server, "POST", "/api/tus/", token=token,
        headers={"Tus-Resumable": TUS, "Upload-Length": str(length), "Upload-Metadata": metadata},
    )  # fmt: skip
    assert answer.status == 201, (answer.status, answer.body)
    return answer.headers["Location"].rsplit("/api/tus/", 1)[1]


def detail(server: LiveServer, token: str, upload_id: str) -> dict:
    answer = http_call(server, "GET", f"/api/uploads/{upload_id}/", token=token)
    assert answer.status == 200, (answer.status, answer.body)
    return answer.json()


def open_patch(server: LiveServer, token: str, upload_id: str, offset: int, **headers: str) -> socket.socket:
    """A PATCH whose head is sent; the caller writes the body on the socket and reads the answer."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
    sent = tus_headers(token, **{"Content-Type": OCTETS, "Upload-Offset": str(offset), **headers})
    send_head(sock, "PATCH", f"/api/tus/{upload_id}", {"Host": f"127.0.0.1:{server.port}", **sent})
    return sock


def patch(server: LiveServer, token: str, upload_id: str, body: Body, length: int | None = None, on_piece=None):
    """PATCH the next ``length`` bytes of ``body`` (all that is left by default) with a Content-Length."""
    length = body.left if length is None else length
    offset = body.given
    with open_patch(server, token, upload_id, offset, **{"Content-Length": str(length)}) as sock:
        for piece in body.pieces(length):
            sock.sendall(piece)
            if on_piece is not None:
                on_piece()
        return read_answer(sock)


def warm_up(server: LiveServer, token: str) -> None:
    """One small upload end to end, and the calls the probes make: code, threads and connections in place."""
    body = Body(2 * MiB, seed=1)
    upload_id = create(server, token, body.size, "warm-up.bin")
    status, headers, answer = patch(server, token, upload_id, body)
    assert (status, headers.get("upload-offset")) == (204, str(body.size)), answer
    for probe in probes(server, token).values():
        probe()
    time.sleep(0.5)


def probes(server: LiveServer, token: str) -> dict:
    """What another client asks meanwhile: tus discovery (async, no database) and the upload list (a Django view)."""
    return {
        "OPTIONS /api/tus/": lambda: http_call(server, "OPTIONS", "/api/tus/", timeout=60),
        "GET /api/uploads/": lambda: http_call(server, "GET", "/api/uploads/?limit=5", token=token, timeout=60),
    }


class Sampler(threading.Thread):
    """The server's VmRSS every SAMPLE_SECONDS, until stopped: ``peak(since, until)`` over a stretch of time.

    With ``spool`` (the s3 backend's spool folder), also the bytes in it: ``spool_peak``.
    """

    def __init__(self, pid: int, spool: Path | None = None):
        super().__init__(daemon=True)
        self.pid = pid
        self.spool = spool
        self.samples: list[tuple[float, int]] = []
        self.spool_peak = 0
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic(), proc_status(self.pid)["VmRSS"]))
            if self.spool is not None:
                self.spool_peak = max(self.spool_peak, folder_bytes(self.spool))
            time.sleep(SAMPLE_SECONDS)

    def peak(self, since: float = 0.0, until: float = float("inf")) -> int:
        return max((rss for at, rss in self.samples if since <= at <= until), default=0)

    def stop(self):
        self.stopping.set()
        self.join(5)


class Prober(threading.Thread):
    """Another client: every probe in turn, back to back with a short pause, timing each answer."""

    def __init__(self, calls: dict):
        super().__init__(daemon=True)
        self.calls = calls
        self.answers: list[tuple[str, float, float, int]] = []  # (probe, when, seconds, status)
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            for name, call in self.calls.items():
                started = time.monotonic()
                try:
                    status = call().status
                except OSError:
                    status = 0
                self.answers.append((name, started, time.monotonic() - started, status))
            self.stopping.wait(0.1)

    def stop(self):
        self.stopping.set()
        self.join(120)

    def slowest(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max((seconds for _name, at, seconds, _status in self.answers if since <= at <= until), default=0.0)

    def summary(self) -> str:
        parts = []
        for name in self.calls:
            times = sorted(seconds for probe, _at, seconds, _status in self.answers if probe == name)
            if times:
                parts.append(
                    f"{name}: {len(times)} answers, median {times[len(times) // 2]:.2f} s, slowest {times[-1]:.2f} s"
                )
        return "; ".join(parts)

    def statuses(self) -> dict[str, set[int]]:
        return {name: {status for probe, _at, _s, status in self.answers if probe == name} for name in self.calls}


def unread_bytes(server_port: int) -> int:
    """The most bytes any connection to ``server_port`` has waiting unread in the server's receive queue
    (Recv-Q of its established loopback sockets, /proc/net/tcp): what the server has not read yet."""
    local = f"0100007F:{server_port:04X}"
    unread = -1
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "01":  # ESTABLISHED
                unread = max(unread, int(fields[4].split(":")[1], 16))
    return unread


def mib(value: float) -> float:
    return value / MiB


def folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += path.stat().st_size if path.is_file() else 0
    return total


def spool_of(server: LiveServer) -> Path | None:
    """The s3 backend's spool folder of ``server``; None on a folder backend."""
    if server.env.get("DIRECTDRIVEX_STORAGE_BACKEND") != "s3":
        return None
    return Path(server.env["DIRECTDRIVEX_SPOOL_DIR"])


# --- 1. the reference upload -------------------------------------------------------------


def test_reference_upload_keeps_the_server_flat(backend, server):
    """One PATCH of the spec's 3,624,892,618 bytes: <= 32 MiB over idle, <= 8 MiB from the first third to the end,
    and the upload completes with the sha256 the client computed while sending."""
    token = backend.alice_token
    upload_id = create(server, token, REFERENCE_SIZE, "reference.bin")
    idle = server.rss()
    body = Body(REFERENCE_SIZE)
    third = {}

    def on_piece():
        if not third and body.given >= REFERENCE_SIZE // 3:
            third.update(server.rss(), at=time.monotonic())

    spool = spool_of(server)
    sampler = Sampler(server.pid, spool)
    sampler.start()
    cpu_before, started = server.cpu_seconds(), time.monotonic()
    try:
        status, headers, answer = patch(server, token, upload_id, body, on_piece=on_piece)
    finally:
        seconds = time.monotonic() - started
        sampler.stop()
    end = server.rss()
    cpu = server.cpu_seconds() - cpu_before

    growth = mib(sampler.peak() - idle["VmRSS"])
    hwm_growth = mib(end["VmHWM"] - idle["VmHWM"])
    late_sampled = mib(sampler.peak(since=third["at"]) - sampler.peak(until=third["at"]))
    late_hwm = mib(end["VmHWM"] - third["VmHWM"])
    figures = (
        f"{REFERENCE_SIZE:,} bytes in {seconds:.1f} s ({REFERENCE_SIZE / seconds / 1e6:.0f} MB/s, server CPU "
        f"{cpu / (REFERENCE_SIZE / GiB):.2f} s/GiB); idle VmRSS {mib(idle['VmRSS']):.1f} MiB, growth {growth:.1f} MiB "
        f"(VmHWM +{hwm_growth:.1f}; at one third {mib(third['VmRSS'] - idle['VmRSS']):.1f} MiB); "
        f"from the first third to the end: {late_sampled:+.1f} MiB sampled peak, {late_hwm:+.1f} MiB VmHWM"
        + (f"; spool peak {mib(sampler.spool_peak):.1f} MiB" if spool is not None else "")
    )
    log.info("reference tus upload: %s", figures)
    assert (status, headers.get("upload-offset")) == (204, str(REFERENCE_SIZE)), (status, answer, figures)
    assert growth <= UPLOAD_GROWTH_MIB and hwm_growth <= UPLOAD_GROWTH_MIB, figures
    assert max(late_sampled, late_hwm) <= LATE_GROWTH_MIB, figures
    if spool is not None:
        # The s3 backend: the part filling and at most three on their way to the store (uploads.storage.s3).
        assert 0 < sampler.spool_peak <= SPOOL_PARTS * 8 * MiB, figures
    stored = detail(server, token, upload_id)
    assert (stored["status"], stored["sha256"]) == ("complete", body.sha256), figures
    assert http_call(server, "DELETE", f"/api/uploads/{upload_id}/", token=token).status == 204


# --- 2. a body sent faster than the server writes it ------------------------------------------


STALL_AFTER = 128 * MiB
STALL_SECONDS = 5.0  # under the writer's database call deadline (uploads.services.calls.DB_CALL_SECONDS, 10 s)
HELD_AFTER = 2.0  # by then the writer is a commit lead and two windows ahead, and the client must be held


def test_a_patch_faster_than_the_writer_is_held_back_and_others_are_answered(backend, server):
    """The client writes a 512 MiB body as fast as TCP takes it; after 128 MiB the writer stops for 5 s
    (its commit waits on a lock). The client must be held back by TCP, the process stay within 64 MiB
    of idle and answer other clients, and the upload complete with the client's sha256."""
    token = backend.alice_token
    size = 512 * MiB
    upload_id = create(server, token, size, "flood.bin")
    idle = server.rss()
    body = Body(size)
    answer: dict = {}
    reached_stall = threading.Event()
    progress: list[tuple[float, int]] = []

    def flood():
        def on_piece():
            progress.append((time.monotonic(), body.given))
            if body.given >= STALL_AFTER:
                reached_stall.set()

        try:
            status, headers, text = patch(server, token, upload_id, body, on_piece=on_piece)
            answer.update(status=status, headers=headers, body=text)
        except OSError as error:
            answer["error"] = error
        finally:
            reached_stall.set()

    sampler, prober = Sampler(server.pid), Prober(probes(server, token))
    sampler.start()
    prober.start()
    started = time.monotonic()
    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        assert reached_stall.wait(60), "the client never got 128 MiB out"
        with slot_inserts_blocked(backend.database_url):
            stall_began = time.monotonic()
            time.sleep(HELD_AFTER)
            sent_when_held = body.given
            unread = unread_bytes(server.port)  # the upload's connection: the others have nothing waiting
            time.sleep(STALL_SECONDS - HELD_AFTER)
            sent_at_release = body.given
            stall_ended = time.monotonic()
        flooder.join(SOCKET_TIMEOUT)
    finally:
        prober.stop()
        sampler.stop()
    elapsed = time.monotonic() - started

    growth = mib(sampler.peak() - idle["VmRSS"])
    hwm_growth = mib(server.rss()["VmHWM"] - idle["VmHWM"])
    sent_before_stall = next((sent for at, sent in reversed(progress) if at <= stall_began), 0)
    during_stall = [answer for answer in prober.answers if stall_began <= answer[1] <= stall_ended]
    figures = (
        f"{size / MiB:.0f} MiB in {elapsed:.1f} s with a {STALL_SECONDS:.0f} s stall; idle VmRSS "
        f"{mib(idle['VmRSS']):.1f} MiB, growth {growth:.1f} MiB (VmHWM +{hwm_growth:.1f}); client sent "
        f"{mib(sent_before_stall):.0f} MiB before the stall, {mib(sent_when_held - sent_before_stall):.1f} MiB in "
        f"its first {HELD_AFTER:.0f} s, {mib(sent_at_release - sent_when_held):.1f} MiB in the rest; server "
        f"Recv-Q {unread} bytes; answers to others ({len(during_stall)} during the stall, slowest "
        f"{prober.slowest(stall_began, stall_ended):.2f} s): {prober.summary()}"
    )
    log.info("tus flood: %s", figures)
    assert "error" not in answer, (answer, figures)
    assert (answer["status"], answer["headers"].get("upload-offset")) == (204, str(size)), (answer, figures)
    assert growth <= FLOOD_GROWTH_MIB and hwm_growth <= FLOOD_GROWTH_MIB, figures
    # Held back by TCP while the writer could not write: nothing more left the client, and the
    # server left what had arrived unread in its socket (its transport was paused).
    assert sent_at_release - sent_when_held <= 1 * MiB, figures
    assert unread > 0, figures
    # Answered throughout, the stall included.
    assert during_stall, figures
    assert prober.statuses() == EXPECTED_STATUSES, prober.answers
    assert prober.slowest() <= ANSWER_SECONDS, figures
    stored = detail(server, token, upload_id)
    assert (stored["status"], stored["sha256"]) == ("complete", body.sha256), figures


# --- 3. a chunked body of one-byte chunks ---------------------------------------------------------


TINY_SECONDS = 8.0
TINY_BURST = 64 * 1024  # bytes of the file per write: 384 KiB on the wire


def test_a_chunked_body_of_one_byte_chunks_stays_bounded_and_lands_whole(backend, server):
    """A chunked PATCH of one-byte chunks sent as fast as possible for 8 s (then chunks of every size up to
    100 kB, then its end): the process stays within 64 MiB of idle and answers others; the body's
    bytes are all there, in order (the offset, then the sha256 once the rest is sent)."""
    token = backend.alice_token
    size = 32 * MiB
    upload_id = create(server, token, size, "tiny-chunks.bin")
    idle = server.rss()
    body = Body(size)
    sizes = random.Random(7)
    counts = {"tiny": 0, "other": 0}

    sampler, prober = Sampler(server.pid), Prober(probes(server, token))
    sampler.start()
    prober.start()
    started = time.monotonic()
    try:
        with open_patch(server, token, upload_id, 0, **{"Transfer-Encoding": "chunked"}) as sock:
            until = started + TINY_SECONDS
            while time.monotonic() < until and body.given < size // 2:
                payload = bytes(body.read(TINY_BURST))
                sock.sendall(chunked_tiny(payload))
                counts["tiny"] += len(payload)
            tiny_seconds = time.monotonic() - started
            for _ in range(200):
                payload = bytes(body.read(sizes.randint(1, 100_000)))
                sock.sendall(chunk(payload))
                counts["other"] += 1
            sock.sendall(CHUNKED_END)
            status, headers, answer = read_answer(sock)
    finally:
        prober.stop()
        sampler.stop()
    seconds = time.monotonic() - started

    growth = mib(sampler.peak() - idle["VmRSS"])
    hwm_growth = mib(server.rss()["VmHWM"] - idle["VmHWM"])
    figures = (
        f"{counts['tiny']:,} one-byte chunks sent in {tiny_seconds:.1f} s, then {counts['other']} chunks of "
        f"1 B-100 kB ({body.given:,} bytes), answered after {seconds:.1f} s ({counts['tiny'] / seconds:,.0f} "
        f"one-byte chunks/s through the server); idle VmRSS {mib(idle['VmRSS']):.1f} MiB, growth {growth:.1f} MiB "
        f"(VmHWM +{hwm_growth:.1f}); answers to others: {prober.summary()}"
    )
    log.info("tus one-byte chunks: %s", figures)
    assert (status, headers.get("upload-offset")) == (204, str(body.given)), (status, answer, figures)
    assert counts["tiny"] >= 100_000, figures  # it did send many tiny chunks
    assert growth <= FLOOD_GROWTH_MIB and hwm_growth <= FLOOD_GROWTH_MIB, figures

    # The rest in one ordinary PATCH: the upload completes with the sha256 of every byte sent, in order.
    status, headers, answer = patch(server, token, upload_id, body)
    assert (status, headers.get("upload-offset")) == (204, str(size)), (status, answer)
    stored = detail(server, token, upload_id)
    assert (stored["status"], stored["sha256"]) == ("complete", body.sha256), figures

    # And the process answered its other clients meanwhile.
    assert prober.statuses() == EXPECTED_STATUSES, prober.answers
    assert prober.slowest() <= ANSWER_SECONDS, figures
