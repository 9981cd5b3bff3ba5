"""Downloads from a real server (`manage.py serve`, Daphne): bytes and Range over TCP, the slot of a client that
goes away mid-stream, and flat memory for a client that reads slowly.

Finished uploads are made through the services in a `manage.py shell` of the
server's own deployment (upload_create, writer_admit, storage, writer_complete),
on the module's database: PostgreSQL + Redis when the suite runs on them.
Clients are raw sockets, so that how fast the bytes are read is the test's
choice, not a library's.
"""

import contextlib
import hashlib
import json
import logging
import socket
import threading
import time

import pytest

from tests.support.live_backend import http_call, live_backend, slot_inserts_blocked
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
SOCKET_TIMEOUT = 30

FINISH_UPLOAD = """
import hashlib
import random
from django.contrib.auth.models import User
from uploads import storage
from uploads.services.grants import writer_admit, writer_commit, writer_committed, writer_complete
from uploads.services.uploads import upload_create

user = User.objects.get(username={username!r})
size = {size}
block = random.Random(size).randbytes(4 * 1024 * 1024)
upload, _slot = upload_create(user, filename={filename!r}, size=size)
grant = writer_admit(user, upload.pk, "live-test-writer")
part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
digest = hashlib.sha256()


def commit():
    # As the writer commits (every 32 MiB): an object store's parts are recorded, its part numbers renewed.
    durable = part.sync()
    writer_commit(grant, durable.offset, hash_state=durable.hash_state, durable=durable)
    part.committed(durable)


try:
    while part.offset < size:
        piece = block[: min(len(block), size - part.offset)]
        part.append([piece])
        digest.update(piece)
        if part.offset % (32 * 1024 * 1024) == 0:
            commit()
    commit()
    part.finalize(writer_committed(grant))
finally:
    part.close()
writer_complete(grant, sha256=digest.hexdigest())
print("UPLOAD", upload.pk, digest.hexdigest())
"""

ACTIVE_DOWNLOAD_SLOTS = """
from uploads.models import Slot
print("ACTIVE", Slot.objects.active().filter(kind="download").count())
"""

DOWNLOAD_SLOTS = """
import json
from uploads.models import Slot
rows = Slot.objects.filter(kind="download", upload_id={upload_id!r}).order_by("pk")
rows = rows.values("released_at", "release_reason")
print("SLOTS", json.dumps([{{"active": r["released_at"] is None, "reason": r["release_reason"]}} for r in rows]))
"""


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "downloads") as backend:
        yield backend


@pytest.fixture
def start_server(backend, tmp_path):
    with contextlib.ExitStack() as cleanup:

        def start(name: str = "server", **settings) -> LiveServer:
            server = LiveServer(
                tmp_path / name, database_url=backend.database_url, redis_url=backend.redis_url, **settings
            )
            cleanup.callback(server.stop)
            server.start()
            return server

        yield start


def finished_upload(server: LiveServer, size: int, filename: str) -> tuple[str, str]:
    """A complete upload of alice's of ``size`` bytes (a repeated random block): its id and sha256."""
    out = server.manage("shell", "-c", FINISH_UPLOAD.format(username="alice", size=size, filename=filename))
    _word, upload_id, sha256 = next(line.split() for line in out.splitlines() if line.startswith("UPLOAD "))
    return upload_id, sha256


def download_slots(server: LiveServer, upload_id: str) -> list[dict]:
    """The download slot rows of one upload, oldest first."""
    out = server.manage("shell", "-c", DOWNLOAD_SLOTS.format(upload_id=upload_id))
    return json.loads(next(line for line in out.splitlines() if line.startswith("SLOTS ")).removeprefix("SLOTS "))


def active_download_slots(server: LiveServer) -> int:
    out = server.manage("shell", "-c", ACTIVE_DOWNLOAD_SLOTS)
    return int(next(line for line in out.splitlines() if line.startswith("ACTIVE ")).split()[1])


def wait_for(condition, what: str, timeout: float = 30, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


class RawDownload:
    """A GET over a plain socket whose body is read only as fast as the test asks."""

    def __init__(self, server: LiveServer, token: str, upload_id: str, *, receive_buffer: int = 64 * 1024):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window: the server's socket buffer, not ours, must hold what we have not read.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(SOCKET_TIMEOUT)
        self.sock.connect(("127.0.0.1", server.port))
        self.sock.sendall(
            f"GET /api/uploads/{upload_id}/content HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {token}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(4096)
            assert data, f"the server closed the connection after {head!r}"
            head += data
        head, self.pending = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
        self.received = len(self.pending)
        self.digest = hashlib.sha256(self.pending)

    def read(self, count: int) -> int:
        """Read up to ``count`` body bytes (hashed, then dropped); how many came (0: the server closed it)."""
        data = self.sock.recv(count)
        self.received += len(data)
        self.digest.update(data)
        return len(data)

    def read_to_end(self) -> int:
        """Read until the server closes the connection (a body that ended short) or sends all it declared."""
        declared = int(self.headers["content-length"])
        with contextlib.suppress(ConnectionResetError):
            while self.received < declared and self.read(1024 * 1024):
                pass
        return self.received

    def close(self):
        self.sock.close()


# --- bytes over TCP ------------------------------------------------------------------


def test_the_whole_file_and_a_range_come_byte_exact_over_tcp(backend, start_server):
    server = start_server()
    upload_id, sha256 = finished_upload(server, 48 * MiB + 3, "exact.bin")
    path = f"/api/uploads/{upload_id}/content"

    whole = http_call(server, "GET", path, token=backend.alice_token)
    tail = http_call(server, "GET", path, token=backend.alice_token, headers={"Range": "bytes=-5"})
    head = http_call(server, "HEAD", path, token=backend.alice_token)

    assert whole.status == 200
    assert hashlib.sha256(whole.body).hexdigest() == sha256
    assert whole.headers["Content-Length"] == str(48 * MiB + 3)
    assert tail.status == 206
    assert tail.body == whole.body[-5:]
    assert tail.headers["Content-Range"] == f"bytes {48 * MiB - 2}-{48 * MiB + 2}/{48 * MiB + 3}"
    assert head.status == 200
    assert head.body == b""
    assert head.headers["Content-Length"] == str(48 * MiB + 3)
    # Released as the bodies end: the client may have every byte a moment before the server is done.
    reasons = wait_for(
        lambda: (found := [slot["reason"] for slot in download_slots(server, upload_id)]) and "" not in found and found,
        "both download slots released",
    )
    assert reasons == ["completed", "completed"]


# --- the slot of a client that goes away ------------------------------------------------


def test_a_client_that_disconnects_mid_stream_frees_its_download_slot(backend, start_server):
    server = start_server(DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS=1)
    upload_id, _sha256 = finished_upload(server, 256 * MiB, "leaver.bin")
    path = f"/api/uploads/{upload_id}/content"

    leaver = RawDownload(server, backend.alice_token, upload_id)
    assert leaver.status == 200
    while leaver.received < 4 * MiB:
        assert leaver.read(256 * 1024)
    # While it streams, the only slot is taken.
    refused = http_call(server, "GET", path, token=backend.alice_token)
    assert refused.status == 429, refused.body[:300]
    assert refused.json()["code"] == "download_slots_exhausted"
    assert int(refused.headers["Retry-After"]) >= 1
    assert download_slots(server, upload_id) == [{"active": True, "reason": ""}]

    leaver.close()

    slots = wait_for(
        lambda: (found := download_slots(server, upload_id)) and not found[0]["active"] and found, "the slot's release"
    )
    assert slots == [{"active": False, "reason": "disconnected"}]
    again = http_call(server, "GET", path, token=backend.alice_token, headers={"Range": "bytes=0-0"})
    assert again.status == 206


def test_short_downloads_whose_clients_leave_at_once_all_give_their_slots_back(backend, start_server):
    # A client with every byte of its range closes at once, often while the server is still ending
    # the body. Before, one such download in five kept its slot until the lease ran out (60 s): the
    # body's cleanup was left to the garbage collector, or cancelled before it released the slot.
    server = start_server(DIRECTDRIVEX_USER_DOWNLOAD_SLOTS=30)
    upload_id, _sha256 = finished_upload(server, 4 * MiB, "short.bin")
    path = f"/api/uploads/{upload_id}/content"
    for _ in range(20):
        answer = http_call(server, "GET", path, token=backend.alice_token, headers={"Range": "bytes=0-1048575"})
        assert (answer.status, len(answer.body)) == (206, MiB)

    slots = wait_for(
        lambda: (found := download_slots(server, upload_id)) and not any(slot["active"] for slot in found) and found,
        "every slot released",
        timeout=10,
    )
    assert {slot["reason"] for slot in slots} == {"completed"}


def test_a_client_that_stops_reading_is_disconnected_after_the_idle_time_and_its_slot_freed(backend, start_server):
    server = start_server(DIRECTDRIVEX_IDLE_SECONDS=2)
    upload_id, _sha256 = finished_upload(server, 64 * MiB, "stalled.bin")

    stalled = RawDownload(server, backend.alice_token, upload_id)
    assert stalled.status == 200
    try:
        # It reads nothing more but keeps its socket open: the server gives up on it.
        slots = wait_for(
            lambda: (found := download_slots(server, upload_id)) and not found[0]["active"] and found,
            "the stalled download's slot to be released",
        )
        assert slots == [{"active": False, "reason": "disconnected"}]
        # The server aborted the connection (a reset): the body ends short, at the latest there.
        with contextlib.suppress(ConnectionResetError):
            while stalled.read(1024 * 1024):
                pass
        assert stalled.received < 64 * MiB
    finally:
        stalled.close()


# --- many readers, slow readers ---------------------------------------------------------


def test_eight_parallel_ranged_downloads_of_one_file_all_succeed(backend, start_server):
    # What a download manager does: several ranges of one file at once. Before, a lost race
    # for a slot index was taken for "another connection is writing" (409 busy, final).
    # Room for a round's slots to be released while the next begins: only "busy" is under test.
    server = start_server(DIRECTDRIVEX_USER_DOWNLOAD_SLOTS=30)
    size = 8 * MiB
    upload_id, _sha256 = finished_upload(server, size, "parallel.bin")
    path = f"/api/uploads/{upload_id}/content"
    whole = http_call(server, "GET", path, token=backend.alice_token).body
    part = size // 8
    answers: list = []

    def fetch(index: int, barrier: threading.Barrier):
        first = index * part
        barrier.wait()
        answer = http_call(
            server, "GET", path, token=backend.alice_token, headers={"Range": f"bytes={first}-{first + part - 1}"}
        )
        answers.append((first, answer))

    for _round in range(12):
        barrier = threading.Barrier(8, timeout=30)
        threads = [threading.Thread(target=fetch, args=(index, barrier)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)

    statuses = sorted({answer.status for _first, answer in answers})
    assert statuses == [206], [(a.status, a.body[:200]) for _f, a in answers if a.status != 206]
    assert len(answers) == 96
    assert all(answer.body == whole[first : first + part] for first, answer in answers)
    wait_for(lambda: active_download_slots(server) == 0, "every download slot released")


def test_a_reader_that_pauses_longer_than_a_lease_still_gets_the_whole_file(backend, start_server):
    # Its body waits on the socket for 15 s, three leases; meanwhile other downloads are
    # admitted (each admission reclaims expired leases). Before, the lease was renewed only
    # between blocks: it was reclaimed while the block waited, and the body ended there.
    server = start_server(DIRECTDRIVEX_SLOT_LEASE_SECONDS=5)
    upload_id, sha256 = finished_upload(server, 96 * MiB, "pausing.bin")
    other_id, _ = finished_upload(server, MiB, "other.bin")
    reader = RawDownload(server, backend.alice_token, upload_id)
    try:
        while reader.received < 5 * MiB:
            assert reader.read(256 * 1024)
        paused_until = time.monotonic() + 15
        while time.monotonic() < paused_until:
            other = http_call(server, "GET", f"/api/uploads/{other_id}/content", token=backend.alice_token)
            assert other.status == 200
            time.sleep(1)
        assert reader.read_to_end() == 96 * MiB
    finally:
        reader.close()
    assert reader.digest.hexdigest() == sha256


# --- a download whose file or slot is taken away -----------------------------------------------


def test_a_delete_answered_204_ends_every_download_of_the_file_at_once(backend, start_server):
    delete_mid_download(backend, start_server())


def test_on_s3_a_delete_answered_204_ends_a_download_at_once(backend, start_server, s3_storage):
    # Its slot is revoked by the DELETE, and the object it reads in windows is gone (FileGone).
    delete_mid_download(backend, start_server())


def delete_mid_download(backend, server: LiveServer) -> None:
    upload_id, _sha256 = finished_upload(server, 256 * MiB, "deleted.bin")
    reader = RawDownload(server, backend.alice_token, upload_id)
    try:
        while reader.received < 4 * MiB:
            assert reader.read(256 * 1024)
        deleted = http_call(server, "DELETE", f"/api/uploads/{upload_id}/", token=backend.alice_token)
        assert deleted.status == 204
        at_204 = reader.received
        # The body ends short and the connection closes (a hang here times the test out).
        reader.read_to_end()
    finally:
        reader.close()
    after = (reader.received - at_204) / MiB
    # Only what was already on its way: the socket buffers and the block in flight.
    # (Before: the rest of the file, from the unlinked inode.)
    assert after <= 8, f"{after:.1f} MiB of a deleted file were sent after the 204"
    assert reader.received < 256 * MiB
    wait_for(lambda: active_download_slots(server) == 0, "no download slot held")


def test_a_download_abandoned_while_its_view_waits_for_the_database_frees_its_slot_at_once(backend, start_server):
    # The client leaves while the view waits to admit its slot; the view then admits it and
    # returns a response nobody sends. Before, nothing closed that response: the slot was
    # held until its lease ran out (60 s here).
    server = start_server()
    upload_id, _sha256 = finished_upload(server, 8 * MiB, "abandoned.bin")
    with slot_inserts_blocked(backend.database_url):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
        sock.sendall(
            f"GET /api/uploads/{upload_id}/content HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {backend.alice_token}\r\n\r\n".encode()
        )
        time.sleep(1)  # the view is waiting on the database now
        sock.close()
        time.sleep(1)  # Django has cancelled the request
    released = wait_for(
        lambda: (found := download_slots(server, upload_id)) and not found[0]["active"] and found,
        "the abandoned download's slot to be released",
        timeout=15,
    )
    assert released == [{"active": False, "reason": "disconnected"}]


# --- memory ---------------------------------------------------------------------------


def test_a_slow_reader_of_a_1_gib_file_grows_the_server_by_at_most_32_mib(backend, start_server):
    slow_reader_growth(backend, start_server(), GiB)


def test_on_s3_a_slow_reader_of_a_512_mib_file_grows_the_server_by_at_most_32_mib(backend, start_server, s3_storage):
    # One window (8 MiB) per download: the object is read with ranged GETs, never whole.
    slow_reader_growth(backend, start_server(), 512 * MiB)


def slow_reader_growth(backend, server: LiveServer, size: int) -> None:
    warm_id, _ = finished_upload(server, 8 * MiB, "warm.bin")
    upload_id, _sha256 = finished_upload(server, size, "slow.bin")
    # One whole download first, so that code, threads and buffers are in place before we measure.
    assert http_call(server, "GET", f"/api/uploads/{warm_id}/content", token=backend.alice_token).status == 200
    idle = server.rss()["VmRSS"]

    reader = RawDownload(server, backend.alice_token, upload_id)
    assert reader.status == 200
    assert reader.headers["content-length"] == str(size)
    peak = idle
    # About 8 MB/s for 30 s: 240 MiB read of the file; a server that did not
    # wait for the client would have buffered the rest of the file by then.
    started = time.monotonic()
    next_sample = started
    target_rate = 8 * 1000 * 1000
    try:
        while time.monotonic() - started < 30:
            allowed = target_rate * (time.monotonic() - started)
            if reader.received < allowed:
                assert reader.read(64 * 1024), "the server ended the body early"
            else:
                time.sleep(0.005)
            if time.monotonic() >= next_sample:
                peak = max(peak, server.rss()["VmRSS"])
                next_sample += 0.25
    finally:
        reader.close()
    peak = max(peak, server.rss()["VmRSS"])

    growth = (peak - idle) / MiB
    log.info("slow reader: %.0f MiB read, server %0.f -> %.0f MiB RSS", reader.received / MiB, idle / MiB, peak / MiB)
    assert reader.received >= 200 * MiB
    assert growth <= 32, f"the server grew by {growth:.1f} MiB while a client read {reader.received / MiB:.0f} MiB"
