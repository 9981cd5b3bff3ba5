"""Share links on a real server (`manage.py serve`): the public page and its download, without an account.

The owner makes links through the API with a token; visitors are plain HTTP
clients with no credentials (raw sockets where the test must read slowly or
cut the body). Runs on the suite's database: PostgreSQL + Redis (and the s3
backend) in CI's second stage.
"""

import contextlib
import hashlib
import json
import logging
import random
import socket
import time

import pytest

from tests.support.live_backend import http_call, live_backend
from tests.support.live_server import LiveServer
from tests.test_downloads_live import finished_upload, wait_for

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
SOCKET_TIMEOUT = 30
# Headers whose values differ per request whatever the link: the rest must be the same for every closed link.
PER_REQUEST = {"date", "x-request-id", "set-cookie"}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "shares") as backend:
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


def share(server: LiveServer, backend, upload_id: str, **body) -> dict:
    answer = http_call(
        server, "POST", f"/api/uploads/{upload_id}/shares/", body=json.dumps(body).encode(), token=backend.alice_token
    )
    assert answer.status == 201, answer.body
    link = answer.json()
    link["path"] = "/s/" + link["url"].rsplit("/s/", 1)[1]
    link["token"] = link["path"].removeprefix("/s/")
    return link


def links_of(server: LiveServer, backend, upload_id: str) -> dict[int, dict]:
    answer = http_call(server, "GET", f"/api/uploads/{upload_id}/shares/", token=backend.alice_token)
    return {link["id"]: link for link in answer.json()}


class RawGet:
    """A GET over a plain socket, read only as fast as the test asks (the body is hashed, not kept)."""

    def __init__(self, server: LiveServer, path: str, headers: dict[str, str] | None = None):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(4096)
            assert data, f"closed after {head!r}"
            head += data
        head, pending = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {name.lower(): value.strip() for name, value in (line.split(":", 1) for line in lines[1:])}
        self.body = bytearray(pending)

    def read(self, count: int) -> int:
        data = self.sock.recv(count)
        self.body += data
        return len(data)

    def close(self):
        self.sock.close()


def test_a_visitor_without_an_account_sees_the_file_downloads_it_and_resumes_it(backend, start_server):
    server = start_server()
    size = 24 * MiB + 5
    upload_id, sha256 = finished_upload(server, size, "report 2026.pdf")
    link = share(server, backend, upload_id, max_downloads=2)

    page = http_call(server, "GET", link["path"])
    assert page.status == 200
    text = page.body.decode()
    assert "report 2026.pdf" in text and sha256 in text and f"{size:,}" in text
    assert f'href="{link["path"]}/download"' in text
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert page.headers["Cache-Control"] == "no-store"
    assert "noindex" in page.headers["X-Robots-Tag"]

    # A download cut after 4 MiB, then resumed from where it stopped with Range + If-Range.
    first = RawGet(server, link["path"] + "/download")
    assert first.status == 200 and first.headers["content-length"] == str(size)
    assert first.headers["referrer-policy"] == "no-referrer"
    etag = first.headers["etag"]
    while len(first.body) < 4 * MiB:
        assert first.read(256 * 1024)
    first.close()
    got = bytes(first.body)
    rest = http_call(
        server, "GET", link["path"] + "/download", headers={"Range": f"bytes={len(got)}-", "If-Range": etag}
    )
    assert rest.status == 206, rest.body[:300]
    assert rest.headers["Content-Range"] == f"bytes {len(got)}-{size - 1}/{size}"
    assert hashlib.sha256(got + rest.body).hexdigest() == sha256
    # The cut download and its resumption are one download: only the request that sent the last byte counted.
    counted = wait_for(
        lambda: (found := links_of(server, backend, upload_id)[link["id"]])["downloads"] and found, "count"
    )
    assert counted["downloads"] == 1 and counted["status"] == "active"

    # A HEAD, a conditional GET that is answered 304 and a range that stops short count nothing.
    assert http_call(server, "HEAD", link["path"] + "/download").status == 200
    assert http_call(server, "GET", link["path"] + "/download", headers={"If-None-Match": etag}).status == 304
    assert http_call(server, "GET", link["path"] + "/download", headers={"Range": "bytes=0-99"}).status == 206
    whole = http_call(server, "GET", link["path"] + "/download")
    assert whole.status == 200 and hashlib.sha256(whole.body).hexdigest() == sha256
    used = wait_for(
        lambda: (found := links_of(server, backend, upload_id)[link["id"]])["downloads"] == 2 and found, "2"
    )
    assert used["status"] == "used_up"
    # Used up: the page and the download are the closed link's 404 from now on.
    assert http_call(server, "GET", link["path"]).status == 404
    assert http_call(server, "GET", link["path"] + "/download", headers={"Range": "bytes=0-0"}).status == 404


def _signature(answer) -> tuple:
    return (
        answer.status,
        answer.body,
        sorted(name.lower() for name in answer.headers if name.lower() not in PER_REQUEST),
    )


def test_unknown_expired_revoked_and_used_up_links_look_the_same(backend, start_server):
    server = start_server()
    upload_id, _sha256 = finished_upload(server, MiB, "closed.bin")
    expired = share(server, backend, upload_id, expires_in=1)
    revoked = share(server, backend, upload_id)
    used = share(server, backend, upload_id, max_downloads=1)
    assert http_call(server, "GET", used["path"] + "/download").status == 200
    assert http_call(server, "DELETE", f"/api/shares/{revoked['id']}/", token=backend.alice_token).status == 204
    unknown_path = "/s/" + "A" * 43
    wait_for(lambda: links_of(server, backend, upload_id)[used["id"]]["status"] == "used_up", "used up")
    wait_for(lambda: links_of(server, backend, upload_id)[expired["id"]]["status"] == "expired", "expired", timeout=5)

    for suffix in ("", "/download"):
        answers = {
            name: http_call(server, "GET", path + suffix)
            for name, path in [
                ("unknown", unknown_path),
                ("expired", expired["path"]),
                ("revoked", revoked["path"]),
                ("used up", used["path"]),
                ("malformed", "/s/not-a-token"),
            ]
        }
        signatures = {name: _signature(answer) for name, answer in answers.items()}
        reference = signatures["unknown"]
        assert reference[0] == 404
        assert b"This link does not work" in reference[1]
        for name, signature in signatures.items():
            assert signature == reference, f"{name} link{suffix} differs from an unknown one"
        assert answers["unknown"].headers["Referrer-Policy"] == "no-referrer"


def _try(server: LiveServer, path: str, password: str, *, address: str | None = None):
    # As a browser sends it with Referrer-Policy: no-referrer: Origin null, and no CSRF cookie.
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Origin": "null"}
    if address:
        headers["X-Forwarded-For"] = address
    return http_call(server, "POST", path, body=f"password={password}".encode(), headers=headers)


def _addresses(count: int) -> list[str]:
    # Fresh ones per run: the throttles' counters live in Redis, which outlives a run's database.
    return [f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}" for _ in range(count)]


def test_a_password_guards_page_and_download_and_wrong_tries_are_throttled(backend, start_server):
    server = start_server(
        DIRECTDRIVEX_SHARE_PASSWORD_ATTEMPTS=3,
        DIRECTDRIVEX_SHARE_LINK_PASSWORD_ATTEMPTS=5,
        DIRECTDRIVEX_TRUSTED_PROXIES="127.0.0.1",
    )
    upload_id, sha256 = finished_upload(server, 2 * MiB, "secret-plans.txt")
    link = share(server, backend, upload_id, password="correct horse")
    assert link["password"] is True

    form = http_call(server, "GET", link["path"])
    assert form.status == 200
    assert b'name="password"' in form.body and b"secret-plans" not in form.body and sha256.encode() not in form.body
    locked = http_call(server, "GET", link["path"] + "/download")
    assert locked.status == 403 and b"secret-plans" not in locked.body

    one, two, three, four, five, six = _addresses(6)
    wrong = _try(server, link["path"], "Correct horse", address=one)
    assert wrong.status == 403 and b"not the password" in wrong.body
    right = _try(server, link["path"], "correct horse", address=two)
    assert right.status == 303 and right.headers["Location"] == link["path"]
    unlock = right.headers["Set-Cookie"]
    assert f"Path={link['path']}" in unlock and "HttpOnly" in unlock
    cookie = unlock.split(";", 1)[0]
    page = http_call(server, "GET", link["path"], headers={"Cookie": cookie})
    assert page.status == 200 and sha256.encode() in page.body
    body = http_call(server, "GET", link["path"] + "/download", headers={"Cookie": cookie})
    assert body.status == 200 and hashlib.sha256(body.body).hexdigest() == sha256
    # The unlock opens this link only.
    other = share(server, backend, upload_id, password="correct horse")
    assert http_call(server, "GET", other["path"] + "/download", headers={"Cookie": cookie}).status == 403

    # Per address: the fourth wrong try within a minute from one address is refused unchecked.
    for _ in range(2):
        assert _try(server, link["path"], "guess", address=one).status == 403
    throttled = _try(server, link["path"], "correct horse", address=one)
    assert throttled.status == 429 and int(throttled.headers["Retry-After"]) >= 1
    assert b"Too many wrong passwords" in throttled.body
    # Per link: five wrong tries from any addresses close it to everyone for the hour, the owner's
    # right password included (the page says why and for how long).
    for address in (three, four):
        assert _try(server, link["path"], "guess", address=address).status == 403
    closed = _try(server, link["path"], "correct horse", address=five)
    assert closed.status == 429 and b"for this link" in closed.body
    # An unlocked browser is not affected, and another link is not either.
    assert http_call(server, "GET", link["path"], headers={"Cookie": cookie}).status == 200
    assert _try(server, other["path"], "correct horse", address=six).status == 303


def test_download_slots_of_a_link_are_its_own_and_a_revoke_stops_a_running_download(backend, start_server):
    server = start_server(DIRECTDRIVEX_USER_DOWNLOAD_SLOTS=1)
    upload_id, _sha256 = finished_upload(server, 128 * MiB, "popular.iso")
    link = share(server, backend, upload_id)
    slow = RawGet(server, link["path"] + "/download")
    assert slow.status == 200
    while len(slow.body) < 2 * MiB:
        assert slow.read(256 * 1024)
    try:
        refused = http_call(server, "GET", link["path"] + "/download")
        assert refused.status == 429, refused.body[:300]
        assert refused.json()["code"] == "download_slots_exhausted"
        assert "link" in refused.json()["detail"]
        assert int(refused.headers["Retry-After"]) >= 1
        # The owner's own download is not held up by the link's visitors.
        own = http_call(
            server,
            "GET",
            f"/api/uploads/{upload_id}/content",
            token=backend.alice_token,
            headers={"Range": "bytes=0-9"},
        )
        assert own.status == 206

        assert http_call(server, "DELETE", f"/api/shares/{link['id']}/", token=backend.alice_token).status == 204
        # The running download ends short, at once: the link's slot was revoked with it.
        deadline = time.monotonic() + 20
        with contextlib.suppress(ConnectionResetError):
            while time.monotonic() < deadline and slow.read(1024 * 1024):
                pass
        assert len(slow.body) < 128 * MiB
    finally:
        slow.close()
    assert http_call(server, "GET", link["path"] + "/download").status == 404


def test_the_token_never_reaches_the_servers_log_lines(backend, start_server):
    server = start_server()
    upload_id, _sha256 = finished_upload(server, MiB, "logged.bin")
    link = share(server, backend, upload_id, password="pw")
    open_link = share(server, backend, upload_id)
    http_call(server, "GET", link["path"])
    _try(server, link["path"], "wrong")
    http_call(server, "GET", open_link["path"])
    http_call(server, "GET", open_link["path"] + "/download")
    http_call(server, "GET", open_link["path"] + "/download/extra")  # Django's "Not Found: <path>" line
    http_call(server, "DELETE", f"/api/shares/{open_link['id']}/", token=backend.alice_token)
    http_call(server, "GET", open_link["path"])
    server.stop()
    lines = server.log_path.read_text()
    for token in (link["token"], open_link["token"]):
        assert token not in lines
        assert token[:12] not in lines
    assert "/s/[token]" in lines
    assert f"share={open_link['id']}" in lines
    assert "msg=share.created" in lines and "msg=share.used" in lines and "msg=share.revoked" in lines


# On a folder in both of CI's stages: what is under test is the link (its accounting, resume, memory);
# streaming from the object store has its own memory test (tests/test_downloads_live.py), and 2 GiB
# written to SeaweedFS and read back would cost CI a minute more.
@pytest.mark.local_storage
def test_a_multi_gb_file_through_a_link_comes_whole_after_a_cut_with_flat_server_memory(backend, start_server):
    server = start_server()
    size = 2 * GiB + 12345
    upload_id, sha256 = finished_upload(server, size, "dataset.tar")
    link = share(server, backend, upload_id, max_downloads=1)
    warm = http_call(server, "GET", link["path"] + "/download", headers={"Range": "bytes=0-1048575"})
    assert warm.status == 206
    idle = server.rss()["VmRSS"]
    peak = idle
    digest = hashlib.sha256()

    def read(answer: RawGet, stop_at: int) -> int:
        nonlocal peak
        got, next_sample = 0, time.monotonic()
        digest.update(answer.body)
        got += len(answer.body)
        while got < stop_at:
            data = answer.sock.recv(4 * MiB)
            if not data:
                break
            digest.update(data)
            got += len(data)
            if time.monotonic() >= next_sample:
                peak = max(peak, server.rss()["VmRSS"])
                next_sample += 0.25
        return got

    first = RawGet(server, link["path"] + "/download")
    assert first.status == 200 and first.headers["content-length"] == str(size)
    cut_at = read(first, 700 * MiB + 7)
    first.close()
    rest = RawGet(server, link["path"] + "/download", {"Range": f"bytes={cut_at}-", "If-Range": first.headers["etag"]})
    assert rest.status == 206 and rest.headers["content-range"] == f"bytes {cut_at}-{size - 1}/{size}"
    got = read(rest, size - cut_at)
    rest.close()
    peak = max(peak, server.rss()["VmRSS"])

    assert cut_at + got == size
    assert digest.hexdigest() == sha256
    growth = (peak - idle) / MiB
    log.info("a %d-byte file through a link: server %.0f -> %.0f MiB RSS", size, idle / MiB, peak / MiB)
    assert growth <= 32, f"the server grew by {growth:.1f} MiB sending {size / GiB:.1f} GiB through a link"
    # The one download the link allowed is the resumed one: the link is used up now.
    used = wait_for(lambda: (found := links_of(server, backend, upload_id)[link["id"]])["downloads"] and found, "count")
    assert (used["downloads"], used["status"]) == (1, "used_up")
