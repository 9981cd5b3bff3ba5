"""Several files as one ZIP from a real server (`manage.py serve`, Daphne): a member past 4 GiB (ZIP64), and flat
memory with one download slot held for a client that reads a 192 MiB ZIP slowly.

Finished uploads are made in a `manage.py shell` of the server's own
deployment (tests.test_downloads_live.finished_upload), except the 4 GiB one:
a sparse file where the local backend keeps finished files, and its row.
Clients are raw sockets signed in with a session cookie, so that how fast the
bytes are read is the test's choice; what they receive is checked with the
standard library's zipfile.
"""

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
import zipfile
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tests.support.live_backend import live_backend
from tests.support.live_server import LiveServer
from tests.test_downloads_live import finished_upload, wait_for
from uploads.storage import local

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
SOCKET_TIMEOUT = 30

# A finished upload whose file the test put in place itself (a sparse one): the row only.
COMPLETE_ROW = """
from django.contrib.auth.models import User
from django.utils import timezone
from uploads.models import Upload
upload = Upload.objects.create(
    owner=User.objects.get(username="alice"), original_filename={name!r}, display_name={name!r},
    size={size}, offset={size}, sha256={sha256!r}, storage_key={key!r},
    status=Upload.Status.COMPLETE, completed_at=timezone.now(),
)
print("UPLOAD", upload.pk)
"""

ZIP_SLOTS = """
import json
from uploads.models import Slot
rows = Slot.objects.filter(kind="download", upload__isnull=True).order_by("pk").values("released_at", "release_reason")
print("SLOTS", json.dumps([{"active": r["released_at"] is None, "reason": r["release_reason"]} for r in rows]))
"""


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "zip") as backend:
        yield backend


@pytest.fixture
def start_server(backend, tmp_path):
    with contextlib.ExitStack() as cleanup:

        def start(**settings) -> LiveServer:
            server = LiveServer(
                tmp_path / "server", database_url=backend.database_url, redis_url=backend.redis_url, **settings
            )
            cleanup.callback(server.stop)
            server.start()
            return server

        yield start


def session_cookie(server: LiveServer) -> str:
    return server.session_cookie("alice")


def zip_slots(server: LiveServer) -> list[dict]:
    """The download slots that belong to no one upload (ZIPs'), oldest first."""
    out = server.manage("shell", "-c", ZIP_SLOTS)
    return json.loads(next(line for line in out.splitlines() if line.startswith("SLOTS ")).removeprefix("SLOTS "))


class RawZip:
    """GET /files/zip/ over a plain socket, signed in with a session; the body is read only as fast as the test asks."""

    def __init__(self, server: LiveServer, cookie: str, ids: list[str], *, receive_buffer: int = 64 * 1024):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # A small receive window: the server's socket buffer, not ours, must hold what we have not read.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(SOCKET_TIMEOUT)
        self.sock.connect(("127.0.0.1", server.port))
        query = urlencode([("id", upload_id) for upload_id in ids])
        self.sock.sendall(f"GET /files/zip/?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(4096)
            assert data, f"the server closed the connection after {head!r}"
            head += data
        head, self.pending = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
        self.length = int(self.headers["content-length"])
        self.received = 0

    def read(self, count: int) -> bytes:
        """Up to ``count`` body bytes (b"": the server closed the connection)."""
        if self.pending:
            data, self.pending = self.pending[:count], self.pending[count:]
        else:
            data = self.sock.recv(count)
        self.received += len(data)
        return data

    def save(self, path: Path) -> None:
        """The rest of the body into ``path``, sparse: runs of zeros are skipped over, not written."""
        with open(path, "wb") as out:
            while self.received < self.length:
                data = self.read(1024 * 1024)
                assert data, f"the body ended at {self.received} of {self.length} bytes"
                if data == bytes(len(data)):
                    out.seek(len(data), os.SEEK_CUR)
                else:
                    out.write(data)
            out.truncate(self.received)

    def close(self):
        self.sock.close()


def member_sha256(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    # zipfile checks the member's CRC as it reaches its end.
    digest = hashlib.sha256()
    with archive.open(info) as member:
        while block := member.read(8 * MiB):
            digest.update(block)
    return digest.hexdigest()


# --- ZIP64 ------------------------------------------------------------------------------------


@pytest.mark.local_storage
def test_a_member_past_4_gib_comes_whole_in_a_zip64_archive(backend, start_server, storage_dir, tmp_path):
    server = start_server(storage_dir=storage_dir)
    size = 4 * GiB + MiB + 12345
    key = secrets.token_hex(16)
    path = local.final_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Sparse: a few random bytes at each end, a hole between (no 4 GiB written to the disk).
    with open(path, "wb") as sparse:
        sparse.truncate(size)
        sparse.write(os.urandom(4096))
        sparse.seek(size - 4096)
        sparse.write(os.urandom(4096))
    started = time.monotonic()
    # Its row says no sha256 (none was declared, none computed): hashing 4 GiB three times cost CI
    # 20 s a stage, and the member is compared with the file byte for byte below instead.
    out = server.manage("shell", "-c", COMPLETE_ROW.format(name="huge.bin", size=size, sha256="", key=key))
    huge_id = next(line.split()[1] for line in out.splitlines() if line.startswith("UPLOAD "))
    # After the big one: its local header starts past 4 GiB, which only ZIP64 can say.
    after_id, after_sha256 = finished_upload(server, 3 * MiB + 7, "after.bin")
    hashed = time.monotonic()

    answer = RawZip(server, session_cookie(server), [huge_id, after_id], receive_buffer=4 * MiB)
    try:
        assert answer.status == 200, answer.pending[:300]
        saved = tmp_path / "answer.zip"
        answer.save(saved)
    finally:
        answer.close()
    streamed = time.monotonic()

    assert answer.received == answer.length
    with zipfile.ZipFile(saved) as archive:
        huge, after = archive.infolist()
        assert (huge.filename, huge.file_size, huge.compress_type) == ("huge.bin", size, zipfile.ZIP_STORED)
        assert huge.file_size > 2**32
        assert (after.filename, after.file_size) == ("after.bin", 3 * MiB + 7)
        assert after.header_offset > 2**32
        assert member_sha256(archive, after) == after_sha256
        # zipfile checks the member's CRC-32 as it reaches its end; every byte is compared with the file's.
        with archive.open(huge) as member, open(path, "rb") as source:
            compared = 0
            while block := member.read(8 * MiB):
                assert block == source.read(len(block)), f"the member differs from the file within 8 MiB of {compared}"
                compared += len(block)
        assert compared == size
    checked = time.monotonic()
    log.info(
        "zip64: %.1f GiB; setting up %.1f s, streaming %.1f s, checking %.1f s",
        answer.length / GiB, hashed - started, streamed - hashed, checked - streamed,
    )  # fmt: skip
    slots = wait_for(lambda: (found := zip_slots(server)) and not found[0]["active"] and found, "the slot's release")
    assert slots == [{"active": False, "reason": "completed"}]


# --- a slow reader ---------------------------------------------------------------------------------


def test_a_slow_reader_of_a_192_mib_zip_holds_one_slot_and_grows_the_server_by_at_most_32_mib(
    backend, start_server, tmp_path
):
    server = start_server()
    cookie = session_cookie(server)
    # Six times the growth allowed: a server that read ahead of its client would show it.
    files = [finished_upload(server, 64 * MiB, f"part-{n}.bin") for n in range(3)]
    warm, _sha256 = finished_upload(server, 4 * MiB, "warm.bin")
    # One whole ZIP first, so that code, threads and buffers are in place before we measure.
    warm_up = RawZip(server, cookie, [warm])
    try:
        warm_up.save(tmp_path / "warm.zip")
    finally:
        warm_up.close()
    before = wait_for(lambda: (found := zip_slots(server)) and not found[-1]["active"] and found, "the warm-up's slot")
    idle = server.rss()["VmRSS"]

    reader = RawZip(server, cookie, [upload_id for upload_id, _sha256 in files])
    assert reader.status == 200
    assert reader.length > 192 * MiB
    peak = idle
    held = []
    checks_at = [reader.length // 3, 2 * reader.length // 3]
    # About 20 MB/s: some 10 s for the whole ZIP, while a server that did not wait for the
    # client would have read the files into its memory long before.
    target_rate = 20 * 1000 * 1000
    saved = tmp_path / "slow.zip"
    started = time.monotonic()
    next_sample = started
    try:
        with open(saved, "wb") as out:
            while reader.received < reader.length:
                if reader.received < target_rate * (time.monotonic() - started):
                    data = reader.read(64 * 1024)
                    assert data, f"the server ended the body at {reader.received} of {reader.length} bytes"
                    out.write(data)
                else:
                    time.sleep(0.005)
                if checks_at and reader.received >= checks_at[0]:
                    checks_at.pop(0)
                    held.append(zip_slots(server)[-1])
                if time.monotonic() >= next_sample:
                    peak = max(peak, server.rss()["VmRSS"])
                    next_sample += 0.25
    finally:
        reader.close()
    elapsed = time.monotonic() - started
    peak = max(peak, server.rss()["VmRSS"])

    growth = (peak - idle) / MiB
    log.info(
        "slow zip reader: %.0f MiB in %.1f s, server %.0f -> %.0f MiB RSS (+%.1f MiB)",
        reader.received / MiB, elapsed, idle / MiB, peak / MiB, growth,
    )  # fmt: skip
    assert elapsed >= 8
    assert growth <= 32, f"the server grew by {growth:.1f} MiB while a client read {reader.received / MiB:.0f} MiB"
    # The same one slot for the whole body, released once the last byte was out.
    assert held == [{"active": True, "reason": ""}] * 2
    slots = wait_for(lambda: (found := zip_slots(server)) and not found[-1]["active"] and found, "the slot's release")
    assert len(slots) == len(before) + 1
    assert slots[-1] == {"active": False, "reason": "completed"}
    with zipfile.ZipFile(saved) as archive:
        assert [member_sha256(archive, info) for info in archive.infolist()] == [sha256 for _id, sha256 in files]
