"""Releasing a slot in the admin of a real server ends a real upload's connection with 4410, and the client resumes.

A real server (``manage.py serve``), the reference client (``python -m
ddxclient``) uploading through a throttling proxy so that it is mid-upload
for a few seconds, and an operator who signs in to the admin over plain HTTP
(the login form, the CSRF cookie), watches the upload on the dashboard's JSON
and runs the "release selected slots" action. The notice reaches the consumer
through the channel layer: the in-memory one inside the single server process
on SQLite, Redis on the PostgreSQL stage.
"""

import hashlib
import html
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest

from tests.support import stored
from tests.support.live_backend import live_backend
from tests.support.live_server import ROOT, LiveServer
from tests.support.tcp_proxy import TcpProxy
from tests.test_downloads_live import RawDownload, download_slots, finished_upload

MiB = 1024 * 1024
SIZE = 24 * MiB
# The proxy lets THROTTLE_BYTES through every THROTTLE_SECONDS (about 5 MiB/s): the upload takes
# seconds, not milliseconds, so the operator finds it in the middle.
THROTTLE_BYTES = 256 * 1024
THROTTLE_SECONDS = 0.05
OPERATOR, PASSWORD = "operator", "operator-password-for-tests"
WAIT = 60


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """The module's database, migrated, with alice (and her token); PostgreSQL + Redis when the suite runs on them."""
    with live_backend(tmp_path_factory, "adminlive") as backend:
        yield backend


@pytest.fixture
def server(backend, tmp_path):
    server = LiveServer(
        tmp_path / "server",
        database_url=backend.database_url,
        redis_url=backend.redis_url,
        # The operator's browser talks plain HTTP to the test server: cookies without the Secure flag.
        SESSION_COOKIE_SECURE=0,
        CSRF_COOKIE_SECURE=0,
    )
    code = (
        "from django.contrib.auth.models import User;"
        f"User.objects.filter(username={OPERATOR!r}).exists() or "
        f"User.objects.create_superuser({OPERATOR!r}, 'operator@example.com', {PASSWORD!r})"
    )
    server.manage("shell", "-c", code)
    with server:
        server.start()
        yield server


class Throttle:
    """Lets ``THROTTLE_BYTES`` through the proxy every ``THROTTLE_SECONDS``, in a thread, until stopped."""

    def __init__(self, proxy: TcpProxy):
        self.proxy = proxy
        self.running = threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running.is_set():
            self.proxy.stall_after(THROTTLE_BYTES)
            time.sleep(THROTTLE_SECONDS)

    def stop(self):
        self.running.clear()
        self.thread.join(10)
        self.proxy.restore()


@pytest.fixture
def throttled(server):
    """The server behind a proxy that lets about 5 MiB/s through (``.proxy``; ``.stop()`` lets it flow freely)."""
    with TcpProxy("127.0.0.1", server.port) as proxy:
        throttle = Throttle(proxy)
        try:
            yield throttle
        finally:
            throttle.stop()


class AdminSession:
    """A staff member's browser: signs in with the admin's login form and posts with the CSRF token."""

    def __init__(self, server: LiveServer):
        self.server = server
        self.cookies = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))

    def get(self, path: str) -> tuple[int, str, str]:
        with self.opener.open(self.server.url + path, timeout=30) as response:
            return response.status, response.geturl(), response.read().decode()

    def post(self, path: str, fields: list[tuple[str, str]]) -> tuple[int, str, str]:
        body = urllib.parse.urlencode([*fields, ("csrfmiddlewaretoken", self.csrf_token())]).encode()
        request = urllib.request.Request(self.server.url + path, data=body, method="POST")
        with self.opener.open(request, timeout=30) as response:
            return response.status, response.geturl(), response.read().decode()

    def csrf_token(self) -> str:
        return next(cookie.value for cookie in self.cookies if cookie.name == "csrftoken")

    def log_in(self) -> None:
        self.get("/admin/login/")  # sets the CSRF cookie
        status, landed, page = self.post(
            "/admin/login/?next=/admin/", [("username", OPERATOR), ("password", PASSWORD), ("next", "/admin/")]
        )
        assert (status, urllib.parse.urlsplit(landed).path) == (200, "/admin/"), page[:2000]
        assert any(cookie.name == "sessionid" for cookie in self.cookies)

    def dashboard(self) -> dict:
        status, _landed, body = self.get("/admin/uploads/slot/dashboard/data/")
        assert status == 200
        return json.loads(body)


def wait_for(condition, what: str, diagnose=lambda: ""):
    deadline = time.monotonic() + WAIT
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {WAIT}s waiting for {what}\n{diagnose()}")
        time.sleep(0.05)
    return value


@pytest.fixture
def source(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "released-mid-upload.bin"
    data = os.urandom(SIZE)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def run_client(tmp_path):
    """``run_client(url, token, path)``: the reference client as a subprocess, as users run it; killed at teardown."""
    started = []

    def run(url: str, token: str, path: Path):
        log_path = tmp_path / "client.log"
        with open(log_path, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "ddxclient", "upload", str(path), "--server", url, "--token", token, "--quiet"],
                cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        started.append(process)
        return process, log_path

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_releasing_a_live_uploads_slot_in_the_admin_closes_it_with_4410_and_the_client_completes(
    server, throttled, backend, source, run_client
):
    path, sha256 = source
    operator = AdminSession(server)
    operator.log_in()
    client, client_log = run_client(throttled.proxy.via(server.url), backend.alice_token, path)

    def diagnose():
        return f"--- client\n{client_log.read_text(errors='replace')[-3000:]}\n--- server\n{server_log()}"

    def server_log():
        return server.log_path.read_text(errors="replace")[-4000:]

    def writing():
        rows = [row for row in operator.dashboard()["in_progress"] if row["filename"] == path.name]
        return rows[0] if rows and rows[0]["connected"] and SIZE // 4 <= rows[0]["offset"] < SIZE * 3 // 4 else None

    # The operator sees the upload on the dashboard, connected, with bytes arriving, a quarter of the way in.
    row = wait_for(writing, "the upload to be a quarter of the way in, on the dashboard", diagnose)
    assert row["bytes_per_second"] is not None, row
    assert row["holder_process"] and row["holder_channel"]
    upload_id, slot_id = row["upload"], row["id"]

    status, _landed, page = operator.post(
        "/admin/uploads/slot/", [("action", "release_selected"), ("_selected_action", str(slot_id))]
    )

    # Full speed again at once: the throttle stalls both directions between its slices, and the
    # server's close frame must not wait there while the client's close reply queues behind a
    # window of throttled frames (past Daphne's 1 s close-handshake timeout, autobahn's, the server drops the TCP
    # connection, the proxy passes that on as a reset, and the client sees 1006 instead of 4410).
    throttled.stop()
    assert status == 200
    messages = [html.unescape(m) for m in re.findall(r'<li class="success">(.*?)</li>', page, re.S)]
    assert any("Released 1 slot(s). 1 live connection(s) were told to stop" in m for m in messages), messages
    assert client.wait(WAIT * 2) == 0, diagnose()
    log = client_log.read_text(errors="replace")
    # The consumer sent the error message and closed with 4410; the client reconnected and resumed. The
    # detail is the reset's own, carried by the channel-layer notice: a writer that merely found itself
    # fenced at its next commit would have said LeaseLost's default sentence instead.
    assert "lease_lost (4410): An administrator reset this upload's slot." in log, log
    assert f"complete {upload_id} {SIZE} bytes sha256 {sha256}" in log, log
    finished = stored.finished_keys(server)
    assert [stored.finished_sha256(key, server) for key in finished] == [sha256]
    history = [
        (release["id"], release["release_reason"])
        for release in operator.dashboard()["recent_releases"]
        if release["upload"] == upload_id
    ]
    # Newest first: the resumed connection's slot completed; the one the operator released was reset.
    assert history[-1] == (slot_id, "reset")
    assert history[0][1] == "completed" and len(history) == 2, history
    assert stored.part_keys(server) == []


def test_releasing_a_downloads_slot_in_the_admin_ends_its_stream_at_once(server, backend):
    # Before, the stream noticed only at its next lease renewal (a third of a lease away),
    # and went on sending the file until then.
    operator = AdminSession(server)
    operator.log_in()
    upload_id, _sha256 = finished_upload(server, 256 * MiB, "released.bin")
    reader = RawDownload(server, backend.alice_token, upload_id)
    try:
        while reader.received < 4 * MiB:
            assert reader.read(256 * 1024)
        out = server.manage("shell", "-c", ACTIVE_DOWNLOAD_SLOT.format(upload_id=upload_id))
        slot_id = next(line.split()[1] for line in out.splitlines() if line.startswith("SLOT "))
        status, _landed, _page = operator.post(
            "/admin/uploads/slot/", [("action", "release_selected"), ("_selected_action", slot_id)]
        )
        assert status == 200
        at_release = reader.received
        reader.read_to_end()  # the body ends short and the connection closes
    finally:
        reader.close()
    after = (reader.received - at_release) / MiB
    assert after <= 8, f"{after:.1f} MiB were sent after the operator released the slot"
    assert reader.received < 256 * MiB
    assert [slot["reason"] for slot in download_slots(server, upload_id)] == ["reset"]


ACTIVE_DOWNLOAD_SLOT = """
from uploads.models import Slot
print("SLOT", Slot.objects.active().get(kind="download", upload_id={upload_id!r}).pk)
"""
