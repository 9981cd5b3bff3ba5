"""tus 1.0 against a real server (`manage.py serve`, Daphne): the public conformance checklist and the project's rules.

What a stock tus client (Uppy, tus-js-client, tuspy) relies on, request by
request, over real HTTP: discovery (OPTIONS), creation and
creation-with-upload, metadata parsing, PATCH and its refusals (409, 413, 415,
412, 404, 410, 460), HEAD, termination, expiry, a body cut off mid-way, the
takeover of a writer that still holds the upload (an earlier PATCH, or a
WebSocket writer), sessions with CSRF, CORS, and the JSON refusal body that
every answer under /api/ carries (docs/api.md, "Errors").

One server process serves the module, on the module's database: a fresh
PostgreSQL database (dropped afterwards) with the suite's Redis when the suite
runs with DATABASE_URL=postgres://… and REDIS_URL, otherwise a SQLite file and
the in-memory layer. A second process of the same deployment, with small
limits, answers the admission refusals (size, quota, slots). Requests are sent
with http.client, or over a raw socket where the test decides how the body
arrives (slowly, or cut off). Files are a few MiB of random bytes; what was
stored is judged by its sha256 (GET /api/uploads/<id>/content and the API's
own sha256) and by the part and finished files in the storage folder.
"""

import asyncio
import base64
import contextlib
import email.utils
import hashlib
import http.client
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import websockets

from tests.support.live_backend import Answer, http_call, live_backend
from tests.support.live_server import LiveServer
from tests.support.stored import stored_holding

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TUS_VERSION = "1.0.0"
OCTETS = "application/offset+octet-stream"
SOCKET_TIMEOUT = 30
WS_TIMEOUT = 20
# uploads.budgets.TAKEOVER_SECONDS: how long a HEAD or PATCH waits for an earlier holder to let go.
TAKEOVER_SECONDS = 5.0

# The module's server: generous slots (every test leaves unfinished uploads holding parked slots
# for a lease), a stated max size (OPTIONS announces it), and one origin allowed to call from a browser.
CORS_ORIGIN = "https://uppy.example"
MAX_FILE_SIZE = GiB
SERVER_SETTINGS = {
    "DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS": 200,
    "DIRECTDRIVEX_USER_UPLOAD_SLOTS": 100,
    "DIRECTDRIVEX_MAX_FILE_SIZE": MAX_FILE_SIZE,
    "DIRECTDRIVEX_CORS_ORIGINS": CORS_ORIGIN,
}
# The admission refusals, on a second process of the same deployment.
LIMITED_SETTINGS = {
    "DIRECTDRIVEX_MAX_FILE_SIZE": 10 * MiB,
    "DIRECTDRIVEX_USER_QUOTA": 6 * MiB,
    "DIRECTDRIVEX_USER_UPLOAD_SLOTS": 2,
}

# bob and carol with their tokens, and a signed-in session of alice's, in one manage.py run.
PEOPLE = """
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from rest_framework.authtoken.models import Token
for name in ("bob", "carol"):
    print("TOKEN", name, Token.objects.create(user=User.objects.create_user(name)).key)
alice = User.objects.get(username="alice")
session = SessionStore()
session["_auth_user_id"] = str(alice.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = alice.get_session_auth_hash()
session.create()
print("SESSION", session.session_key)
"""


@dataclass(frozen=True)
class People:
    alice: str  # tokens
    bob: str
    carol: str  # the limited server's user: its slot and quota refusals touch nobody else
    alice_session: str  # a session key


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """The module's database, migrated, with alice; PostgreSQL + Redis when the suite runs on them."""
    with live_backend(tmp_path_factory, "tus") as backend:
        yield backend


@pytest.fixture(scope="module")
def server(backend, tmp_path_factory):
    """The module's server (SERVER_SETTINGS), stopped at the end of the module."""
    live = LiveServer(
        tmp_path_factory.mktemp("tus-server"),
        database_url=backend.database_url,
        redis_url=backend.redis_url,
        **SERVER_SETTINGS,
    )
    with live:
        live.start()
        yield live


@pytest.fixture(scope="module")
def limited(server, tmp_path_factory):
    """A second process of the same deployment (database, storage, channel layer) with LIMITED_SETTINGS."""
    with server.sibling(tmp_path_factory.mktemp("tus-limited"), **LIMITED_SETTINGS) as live:
        live.start()
        yield live


@pytest.fixture(scope="module")
def people(backend, server) -> People:
    out = server.manage("shell", "-c", PEOPLE)
    tokens = {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("TOKEN ")}
    session = next(line.split()[1] for line in out.splitlines() if line.startswith("SESSION "))
    return People(backend.alice_token, tokens["bob"], tokens["carol"], session)


# --- tus requests ------------------------------------------------------------------------


def tus_call(
    server: LiveServer,
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    chunks: list[bytes] | None = None,
    headers: dict[str, str | None] | None = None,
    timeout: float = 60,
) -> Answer:
    """One tus request: ``Tus-Resumable: 1.0.0`` and, with a body, the tus content type, unless
    ``headers`` says otherwise (a None value leaves a header out). ``chunks`` is sent chunked."""
    sent: dict[str, str | None] = {"Tus-Resumable": TUS_VERSION}
    if token:
        sent["Authorization"] = f"Token {token}"
    if body is not None or chunks is not None:
        sent["Content-Type"] = OCTETS
    sent.update(headers or {})
    sent_headers = {name: value for name, value in sent.items() if value is not None}
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        if chunks is not None:
            connection.request(method, path, body=iter(chunks), headers=sent_headers, encode_chunked=True)
        else:
            connection.request(method, path, body=body, headers=sent_headers)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def metadata(**fields: str | None) -> str:
    """An Upload-Metadata header: ``key base64(value)`` pairs (a None value: the key alone)."""
    pairs = [
        name if value is None else f"{name} {base64.b64encode(value.encode()).decode()}"
        for name, value in fields.items()
    ]
    return ",".join(pairs)


def parsed_metadata(header: str) -> dict[str, str]:
    pairs = (pair.strip().partition(" ") for pair in header.split(",") if pair.strip())
    return {key: base64.b64decode(value).decode() for key, _, value in pairs}


def create(
    server: LiveServer,
    token: str,
    filename: str,
    size: int,
    *,
    sha256: str | None = None,
    fingerprint: str | None = None,
    body: bytes | None = None,
) -> tuple[str, Answer]:
    """POST /api/tus/ that must succeed: the new upload's id (from its Location) and the answer."""
    fields = {"filename": filename}
    if sha256 is not None:
        fields["sha256"] = sha256
    if fingerprint is not None:
        fields["fingerprint"] = fingerprint
    headers = {"Upload-Length": str(size), "Upload-Metadata": metadata(**fields)}
    answer = tus_call(server, "POST", "/api/tus/", token=token, body=body, headers=headers)
    assert answer.status == 201, (answer.status, answer.body[:500])
    assert answer.headers["Tus-Resumable"] == TUS_VERSION
    location = answer.headers["Location"]
    assert location.startswith(f"{server.url}/api/tus/"), location
    return location.rsplit("/", 1)[1], answer


def head(server: LiveServer, token: str, upload_id: str, **options) -> Answer:
    answer = tus_call(server, "HEAD", f"/api/tus/{upload_id}", token=token, **options)
    assert answer.headers.get("Tus-Resumable") == TUS_VERSION, answer.headers
    assert answer.body == b""
    return answer


def head_offset(server: LiveServer, token: str, upload_id: str) -> int:
    answer = head(server, token, upload_id)
    assert answer.status == 200, answer.status
    return int(answer.headers["Upload-Offset"])


def patch(server: LiveServer, token: str, upload_id: str, offset: int, data: bytes, **headers) -> Answer:
    sent = {"Upload-Offset": str(offset), **headers}
    answer = tus_call(server, "PATCH", f"/api/tus/{upload_id}", token=token, body=data, headers=sent)
    assert answer.headers.get("Tus-Resumable") == TUS_VERSION, (answer.status, answer.headers)
    return answer


def patched(server: LiveServer, token: str, upload_id: str, offset: int, data: bytes) -> int:
    """A PATCH that must succeed; the Upload-Offset it answers."""
    answer = patch(server, token, upload_id, offset, data)
    assert answer.status == 204, (answer.status, answer.body[:500])
    assert answer.body == b""
    return int(answer.headers["Upload-Offset"])


def assert_refusal(answer: Answer, status: int, code: str) -> dict:
    """A tus refusal: the status, Tus-Resumable, and the API's JSON body ``{"code", "detail"}``."""
    assert answer.status == status, (answer.status, answer.body[:500])
    assert answer.headers.get("Tus-Resumable") == TUS_VERSION, answer.headers
    assert answer.content_type.startswith("application/json"), answer.content_type
    body = answer.json()
    assert body["code"] == code, body
    assert isinstance(body["detail"], str) and body["detail"], body
    return body


def detail(server: LiveServer, token: str, upload_id: str) -> dict:
    answer = http_call(server, "GET", f"/api/uploads/{upload_id}/", token=token)
    assert answer.status == 200, (answer.status, answer.body[:500])
    return answer.json()


def content_sha256(server: LiveServer, token: str, upload_id: str) -> str:
    answer = http_call(server, "GET", f"/api/uploads/{upload_id}/content", token=token)
    assert answer.status == 200, (answer.status, answer.body[:500])
    return hashlib.sha256(answer.body).hexdigest()


def assert_complete(server: LiveServer, token: str, upload_id: str, data: bytes) -> None:
    """The upload is complete, its API sha256 and its stored bytes are those of ``data``."""
    sha256 = hashlib.sha256(data).hexdigest()
    upload = detail(server, token, upload_id)
    assert (upload["status"], upload["offset"], upload["size"]) == ("complete", len(data), len(data)), upload
    assert upload["sha256"] == sha256
    assert content_sha256(server, token, upload_id) == sha256


def http_date(value: str) -> datetime:
    parsed = email.utils.parsedate_to_datetime(value)
    assert parsed.tzinfo is not None, value
    return parsed


class RawPatch:
    """A PATCH over a plain socket: its head at once, its body as fast (or slowly, or partly) as the test sends it."""

    def __init__(self, server: LiveServer, token: str, upload_id: str, offset: int, length: int):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
        self.sock.sendall(
            f"PATCH /api/tus/{upload_id} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Token {token}\r\nTus-Resumable: {TUS_VERSION}\r\nContent-Type: {OCTETS}\r\n"
            f"Upload-Offset: {offset}\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        self.sent = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def send_slowly(self, data: bytes, stop: threading.Event, *, piece: int = 16 * KiB, pause: float = 0.02):
        """Send ``data`` a piece at a time until it is all sent, ``stop`` is set, or the server cuts us off."""
        with contextlib.suppress(OSError):
            for start in range(0, len(data), piece):
                if stop.is_set():
                    return
                self.send(data[start : start + piece])
                time.sleep(pause)

    def response_status(self) -> int | None:
        """The status of the answer, or None if the connection ended without one."""
        received = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in received:
                more = self.sock.recv(4096)
                if not more:
                    break
                received += more
        if not received.startswith(b"HTTP/1.1 "):
            return None
        return int(received.split(b" ", 2)[1])

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def slow_patch(server: LiveServer, token: str, upload_id: str, data: bytes, *, writing_after: int):
    """A PATCH of ``data`` sent slowly from a thread, yielded once ``writing_after`` bytes are out."""
    slow = RawPatch(server, token, upload_id, 0, len(data))
    stop = threading.Event()
    sender = threading.Thread(target=slow.send_slowly, args=(data, stop), daemon=True)
    sender.start()
    try:
        while slow.sent < writing_after:
            time.sleep(0.05)
        yield slow
    finally:
        stop.set()
        sender.join(10)


def cut_off_patch(server: LiveServer, token: str, upload_id: str, data: bytes, sent: int) -> int:
    """A PATCH for all of ``data`` whose client sends its first ``sent`` bytes and goes away; returns ``sent``."""
    raw = RawPatch(server, token, upload_id, 0, len(data))
    raw.send(data[:sent])
    raw.close()
    return raw.sent


def wait_for(condition, what: str, timeout: float = 10, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def ws_connect(server: LiveServer, ws_url: str):
    return websockets.connect(
        f"ws://127.0.0.1:{server.port}{ws_url}",
        compression=None,
        max_size=None,
        open_timeout=WS_TIMEOUT,
        close_timeout=5,
        ping_interval=None,
    )


async def ws_receive(ws) -> dict:
    raw = await asyncio.wait_for(ws.recv(), WS_TIMEOUT)
    assert isinstance(raw, str), f"the server sent a binary message of {len(raw)} bytes"
    return json.loads(raw)


async def ws_send_until_acked(ws, data: bytes, start: int, end: int, chunk: int) -> int:
    """Send ``data[start:end]`` (less than a window) and wait for the ack of all of it; returns ``end``."""
    for offset in range(start, end, chunk):
        await ws.send(data[offset : min(offset + chunk, end)])
    while (message := await ws_receive(ws))["offset"] < end:
        assert message["type"] == "ack", message
    return end


async def ws_messages_until_closed(ws) -> tuple[list[dict], int]:
    messages = []
    try:
        while True:
            messages.append(await ws_receive(ws))
    except websockets.ConnectionClosed:
        return messages, ws.close_code


# --- discovery ----------------------------------------------------------------------------


def test_options_announces_version_extensions_and_max_size_without_credentials(server):
    answer = tus_call(server, "OPTIONS", "/api/tus/", headers={"Tus-Resumable": None})

    assert answer.status in (200, 204), (answer.status, answer.body[:300])
    assert answer.headers["Tus-Resumable"] == TUS_VERSION
    assert TUS_VERSION in [version.strip() for version in answer.headers["Tus-Version"].split(",")]
    extensions = {extension.strip() for extension in answer.headers["Tus-Extension"].split(",")}
    required = {"creation", "creation-with-upload", "termination", "expiration"}
    assert required <= extensions <= required | {"checksum"}, extensions
    assert answer.headers["Tus-Max-Size"] == str(MAX_FILE_SIZE)


# --- creation -------------------------------------------------------------------------------


def test_creation_answers_201_with_location_and_expiry_and_the_upload_is_listed_with_its_fingerprint(server, people):
    data = os.urandom(100 * KiB)
    sha256 = hashlib.sha256(data).hexdigest()
    before = datetime.now(UTC)

    upload_id, answer = create(
        server, people.alice, "created.bin", len(data), sha256=sha256, fingerprint="created.bin:102400:1700000000"
    )

    assert answer.headers["Location"] == f"{server.url}/api/tus/{upload_id}"
    assert uuid.UUID(upload_id)
    expires = http_date(answer.headers["Upload-Expires"])  # the default DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS: 1 day
    assert before + timedelta(hours=23) < expires < before + timedelta(hours=25), expires
    assert answer.body == b""
    listed = http_call(server, "GET", "/api/uploads/?status=uploading", token=people.alice)
    assert listed.status == 200
    [upload] = [upload for upload in listed.json() if upload["id"] == upload_id]
    assert upload["filename"] == "created.bin"
    assert upload["fingerprint"] == "created.bin:102400:1700000000"
    assert (upload["size"], upload["offset"], upload["status"]) == (len(data), 0, "uploading")
    assert detail(server, people.alice, upload_id)["sha256"] == sha256
    resumable = head(server, people.alice, upload_id)
    assert resumable.status == 200
    assert (resumable.headers["Upload-Offset"], resumable.headers["Upload-Length"]) == ("0", str(len(data)))
    told = parsed_metadata(resumable.headers["Upload-Metadata"])
    assert (told["filename"], told["sha256"], told["fingerprint"]) == ("created.bin", sha256, upload["fingerprint"])

    # The whole tus round trip: the upload completes with the declared sha256.
    assert patched(server, people.alice, upload_id, 0, data) == len(data)
    assert_complete(server, people.alice, upload_id, data)


@pytest.mark.parametrize(
    ("headers", "what"),
    [
        ({"Upload-Length": "10", "Upload-Metadata": metadata(filetype="text/plain")}, "no filename"),
        ({"Upload-Length": "10", "Upload-Metadata": metadata(filename="a.bin", sha256="ab" * 31 + "zz")}, "bad sha256"),
        ({"Upload-Length": "10", "Upload-Metadata": metadata(filename="a.bin", sha256="abc")}, "short sha256"),
        ({"Upload-Defer-Length": "1", "Upload-Metadata": metadata(filename="a.bin")}, "deferred length"),
        ({"Upload-Metadata": metadata(filename="a.bin")}, "no Upload-Length"),
        ({"Upload-Length": "-5", "Upload-Metadata": metadata(filename="a.bin")}, "negative Upload-Length"),
        ({"Upload-Length": "ten", "Upload-Metadata": metadata(filename="a.bin")}, "Upload-Length not a number"),
        ({"Upload-Length": "0", "Upload-Metadata": metadata(filename="a.bin")}, "empty file"),
        ({"Upload-Length": "10", "Upload-Metadata": "filename not*base64!"}, "value not base64"),
        ({"Upload-Length": "10", "Upload-Metadata": metadata(filename="a.bin") + ",filename Yi5iaW4="}, "key twice"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_creation_that_cannot_be_admitted_as_asked_is_400_invalid_and_creates_nothing(server, people, headers, what):
    before = http_call(server, "GET", "/api/uploads/?limit=1000", token=people.alice).json()

    answer = tus_call(server, "POST", "/api/tus/", token=people.alice, headers=headers)

    assert_refusal(answer, 400, "invalid")
    assert "Location" not in answer.headers
    after = http_call(server, "GET", "/api/uploads/?limit=1000", token=people.alice).json()
    assert len(after) == len(before), f"{what}: an upload was created"


def test_a_metadata_key_without_a_value_is_accepted(server, people):
    header = metadata(filename="flagged.bin", is_confidential=None, filetype="application/octet-stream")

    answer = tus_call(
        server, "POST", "/api/tus/", token=people.alice, headers={"Upload-Length": "3", "Upload-Metadata": header}
    )

    assert answer.status == 201, (answer.status, answer.body[:500])
    upload_id = answer.headers["Location"].rsplit("/", 1)[1]
    assert detail(server, people.alice, upload_id)["filename"] == "flagged.bin"


def test_creation_over_the_largest_file_size_is_413_file_too_large(limited, people):
    headers = {"Upload-Length": str(10 * MiB + 1), "Upload-Metadata": metadata(filename="huge.bin")}

    answer = tus_call(limited, "POST", "/api/tus/", token=people.carol, headers=headers)

    assert_refusal(answer, 413, "file_too_large")


def test_creation_over_the_quota_is_413_quota_exceeded(limited, people):
    headers = {"Upload-Length": str(8 * MiB), "Upload-Metadata": metadata(filename="over-quota.bin")}

    answer = tus_call(limited, "POST", "/api/tus/", token=people.carol, headers=headers)

    assert_refusal(answer, 413, "quota_exceeded")


def test_creation_past_the_users_slot_limit_is_429_with_retry_after(limited, people):
    headers = {"Upload-Length": "10", "Upload-Metadata": metadata(filename="slot.bin")}
    for _ in range(LIMITED_SETTINGS["DIRECTDRIVEX_USER_UPLOAD_SLOTS"]):
        assert tus_call(limited, "POST", "/api/tus/", token=people.carol, headers=headers).status == 201

    answer = tus_call(limited, "POST", "/api/tus/", token=people.carol, headers=headers)

    assert_refusal(answer, 429, "user_slots_exhausted")
    assert int(answer.headers["Retry-After"]) >= 1


def test_a_creation_body_longer_than_upload_length_is_413_and_creates_nothing(server, people):
    before = http_call(server, "GET", "/api/uploads/?limit=1000", token=people.alice).json()
    headers = {"Upload-Length": "10", "Upload-Metadata": metadata(filename="long-body.bin")}

    answer = tus_call(server, "POST", "/api/tus/", token=people.alice, body=b"x" * 11, headers=headers)

    assert_refusal(answer, 413, "size_exceeded")
    assert len(http_call(server, "GET", "/api/uploads/?limit=1000", token=people.alice).json()) == len(before)


# --- creation-with-upload -------------------------------------------------------------------


def test_creation_with_part_of_the_file_answers_its_offset_and_a_patch_finishes_it(server, people):
    data = os.urandom(3 * MiB + 5)
    first = 2 * MiB + 1

    upload_id, answer = create(
        server, people.alice, "with-part.bin", len(data), sha256=hashlib.sha256(data).hexdigest(), body=data[:first]
    )

    assert answer.headers["Upload-Offset"] == str(first)
    assert head_offset(server, people.alice, upload_id) == first
    assert detail(server, people.alice, upload_id)["offset"] == first
    assert patched(server, people.alice, upload_id, first, data[first:]) == len(data)
    assert_complete(server, people.alice, upload_id, data)


def test_the_whole_file_in_the_creation_post_completes_the_upload(server, people):
    data = os.urandom(2 * MiB + 17)

    upload_id, answer = create(
        server, people.alice, "in-one-post.bin", len(data), sha256=hashlib.sha256(data).hexdigest(), body=data
    )

    assert answer.headers["Upload-Offset"] == str(len(data))
    # Answered after finalization: complete at once, not "soon".
    assert_complete(server, people.alice, upload_id, data)


# --- PATCH -----------------------------------------------------------------------------------


def test_patches_answer_204_with_the_new_offset_and_the_last_one_only_after_finalization(server, people):
    data = os.urandom(3 * MiB)
    upload_id, _ = create(server, people.alice, "patches.bin", len(data), sha256=hashlib.sha256(data).hexdigest())

    assert patched(server, people.alice, upload_id, 0, data[:MiB]) == MiB
    assert head_offset(server, people.alice, upload_id) == MiB == detail(server, people.alice, upload_id)["offset"]
    assert patched(server, people.alice, upload_id, MiB, data[MiB : 2 * MiB]) == 2 * MiB
    assert patched(server, people.alice, upload_id, 2 * MiB, data[2 * MiB :]) == len(data)

    # Right after the last 204, with no wait: verified, complete, visible.
    assert_complete(server, people.alice, upload_id, data)
    done = head(server, people.alice, upload_id)
    assert done.status == 200
    assert done.headers["Upload-Offset"] == done.headers["Upload-Length"] == str(len(data))
    assert done.headers["Cache-Control"] == "no-store"
    # A complete upload takes no more bytes: its offset is its length (docs/tus.md), so a client learns it is done.
    late = patch(server, people.alice, upload_id, len(data), b"x")
    assert_refusal(late, 409, "offset_mismatch")
    assert late.headers["Upload-Offset"] == str(len(data))


def test_a_chunked_patch_body_is_written_as_it_arrives(server, people):
    data = os.urandom(2 * MiB + 3)
    upload_id, _ = create(server, people.alice, "chunked.bin", len(data))
    pieces = [data[start : min(start + 100 * KiB, MiB)] for start in range(0, MiB, 100 * KiB)]

    answer = tus_call(
        server, "PATCH", f"/api/tus/{upload_id}", token=people.alice, chunks=pieces, headers={"Upload-Offset": "0"}
    )

    assert answer.status == 204, (answer.status, answer.body[:500])
    assert answer.headers["Upload-Offset"] == str(MiB)
    assert head_offset(server, people.alice, upload_id) == MiB
    rest = [data[MiB:]]
    answer = tus_call(
        server, "PATCH", f"/api/tus/{upload_id}", token=people.alice, chunks=rest, headers={"Upload-Offset": str(MiB)}
    )
    assert answer.status == 204, (answer.status, answer.body[:500])
    assert_complete(server, people.alice, upload_id, data)


def test_a_patch_at_another_offset_is_409_with_the_servers_offset(server, people):
    data = os.urandom(MiB)
    upload_id, _ = create(server, people.alice, "mismatch.bin", len(data))
    assert patched(server, people.alice, upload_id, 0, data[:1000]) == 1000

    behind = patch(server, people.alice, upload_id, 0, data[:1000])
    ahead = patch(server, people.alice, upload_id, 2000, data[2000:3000])

    for answer in (behind, ahead):
        assert_refusal(answer, 409, "offset_mismatch")
        assert answer.headers["Upload-Offset"] == "1000"
    assert head_offset(server, people.alice, upload_id) == 1000
    assert patched(server, people.alice, upload_id, 1000, data[1000:]) == len(data)
    assert_complete(server, people.alice, upload_id, data)


def test_a_patch_body_past_upload_length_is_413_and_writes_nothing(server, people):
    data = os.urandom(MiB)
    upload_id, _ = create(server, people.alice, "too-long.bin", len(data))
    assert patched(server, people.alice, upload_id, 0, data[:1000]) == 1000

    answer = patch(server, people.alice, upload_id, 1000, data[1000:] + b"one byte too many")

    assert_refusal(answer, 413, "size_exceeded")
    assert head_offset(server, people.alice, upload_id) == 1000
    assert detail(server, people.alice, upload_id)["offset"] == 1000
    assert patched(server, people.alice, upload_id, 1000, data[1000:]) == len(data)
    assert_complete(server, people.alice, upload_id, data)


def test_a_patch_of_another_content_type_is_415(server, people):
    upload_id, _ = create(server, people.alice, "media-type.bin", 10)

    answer = patch(server, people.alice, upload_id, 0, b"0123456789", **{"Content-Type": "application/octet-stream"})

    assert_refusal(answer, 415, "unsupported_media_type")
    assert head_offset(server, people.alice, upload_id) == 0


def test_a_request_without_or_with_another_tus_resumable_is_412_with_tus_version(server, people):
    upload_id, _ = create(server, people.alice, "version.bin", 10)

    for version in (None, "0.2.2"):
        for answer in (
            patch(server, people.alice, upload_id, 0, b"0123456789", **{"Tus-Resumable": version}),
            tus_call(
                server,
                "POST",
                "/api/tus/",
                token=people.alice,
                headers={"Tus-Resumable": version, "Upload-Length": "1", "Upload-Metadata": metadata(filename="v")},
            ),
        ):
            assert_refusal(answer, 412, "tus_version_unsupported")
            assert TUS_VERSION in answer.headers["Tus-Version"]
    assert head_offset(server, people.alice, upload_id) == 0


def test_another_users_upload_and_an_unknown_one_are_the_same_404(server, people):
    upload_id, _ = create(server, people.alice, "alices.bin", 10)
    unknown = str(uuid.uuid4())

    bobs_patch = patch(server, people.bob, upload_id, 0, b"0123456789")
    unknown_patch = patch(server, people.bob, unknown, 0, b"0123456789")
    bobs_delete = tus_call(server, "DELETE", f"/api/tus/{upload_id}", token=people.bob)
    not_an_id = patch(server, people.bob, "not-an-upload-id", 0, b"0123456789")

    assert assert_refusal(bobs_patch, 404, "not_found") == assert_refusal(unknown_patch, 404, "not_found")
    assert assert_refusal(bobs_delete, 404, "not_found") == unknown_patch.json()
    assert assert_refusal(not_an_id, 404, "not_found") == unknown_patch.json()
    for answer in (head(server, people.bob, upload_id), head(server, people.bob, unknown)):
        assert answer.status == 404
        assert "Upload-Offset" not in answer.headers
    # alice's upload was not touched.
    assert head_offset(server, people.alice, upload_id) == 0
    assert detail(server, people.alice, upload_id)["status"] == "uploading"


def test_a_declared_sha256_that_the_bytes_do_not_match_is_460_and_the_upload_fails(server, people):
    data = os.urandom(MiB)
    upload_id, _ = create(server, people.alice, "mismatch-sha.bin", len(data), sha256="0" * 64)
    assert patched(server, people.alice, upload_id, 0, data[: MiB // 2]) == MiB // 2

    answer = patch(server, people.alice, upload_id, MiB // 2, data[MiB // 2 :])

    assert_refusal(answer, 460, "checksum_mismatch")
    assert detail(server, people.alice, upload_id)["status"] == "failed"
    assert stored_holding(server, data) == []
    assert http_call(server, "GET", f"/api/uploads/{upload_id}/content", token=people.alice).status == 409


# --- cancel, termination, expiry ---------------------------------------------------------------


def test_delete_of_an_unfinished_upload_cancels_it_and_then_patch_and_head_are_410(server, people):
    data = os.urandom(MiB)
    upload_id, _ = create(server, people.alice, "cancelled.bin", len(data))
    assert patched(server, people.alice, upload_id, 0, data[: MiB // 2]) == MiB // 2
    assert len(stored_holding(server, data)) == 1

    deleted = tus_call(server, "DELETE", f"/api/tus/{upload_id}", token=people.alice)

    assert deleted.status == 204, (deleted.status, deleted.body[:500])
    assert deleted.headers["Tus-Resumable"] == TUS_VERSION
    assert stored_holding(server, data) == []  # gone before the 204
    assert detail(server, people.alice, upload_id)["status"] == "cancelled"
    assert_refusal(patch(server, people.alice, upload_id, MiB // 2, data[MiB // 2 :]), 410, "not_uploading")
    assert head(server, people.alice, upload_id).status == 410


def test_termination_of_a_finished_upload_deletes_it_and_its_bytes(server, people):
    data = os.urandom(MiB)
    upload_id, _ = create(server, people.alice, "terminated.bin", len(data), body=data)
    assert_complete(server, people.alice, upload_id, data)
    assert len(stored_holding(server, data)) == 1

    deleted = tus_call(server, "DELETE", f"/api/tus/{upload_id}", token=people.alice)

    assert deleted.status == 204, (deleted.status, deleted.body[:500])
    assert deleted.headers["Tus-Resumable"] == TUS_VERSION
    assert stored_holding(server, data) == []
    assert head(server, people.alice, upload_id).status == 404
    assert http_call(server, "GET", f"/api/uploads/{upload_id}/", token=people.alice).status == 404
    assert_refusal(patch(server, people.alice, upload_id, 0, data), 404, "not_found")


def test_an_expired_upload_is_410_and_its_bytes_are_gone(server, people, tmp_path):
    data = os.urandom(MiB)
    upload_id, answer = create(server, people.alice, "expired.bin", len(data), body=data[:1000])
    assert answer.headers["Upload-Offset"] == "1000"
    assert http_date(head(server, people.alice, upload_id).headers["Upload-Expires"]) > datetime.now(UTC)
    time.sleep(1.1)  # idle for longer than the expiry below

    # The operators' command, on the same deployment, with a one-second expiry.
    out = server.sibling(tmp_path / "expire", DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS=1).manage("uploads", "expire")

    assert upload_id in out, out
    assert detail(server, people.alice, upload_id)["status"] == "expired"
    assert head(server, people.alice, upload_id).status == 410
    assert_refusal(patch(server, people.alice, upload_id, 1000, data[1000:]), 410, "not_uploading")
    assert stored_holding(server, data) == []


# --- HEAD -----------------------------------------------------------------------------------------


def test_head_tells_offset_length_metadata_and_expiry_and_is_not_cached(server, people):
    data = os.urandom(MiB)
    upload_id, _ = create(server, people.alice, "headed.bin", len(data), fingerprint="fp-1")
    assert patched(server, people.alice, upload_id, 0, data[:12345]) == 12345

    answer = head(server, people.alice, upload_id)

    assert answer.status == 200
    assert answer.headers["Upload-Offset"] == "12345" == str(detail(server, people.alice, upload_id)["offset"])
    assert answer.headers["Upload-Length"] == str(len(data))
    assert parsed_metadata(answer.headers["Upload-Metadata"]) == {"filename": "headed.bin", "fingerprint": "fp-1"}
    assert http_date(answer.headers["Upload-Expires"]) > datetime.now(UTC) + timedelta(hours=23)
    assert answer.headers["Cache-Control"] == "no-store"


# --- a body that does not arrive whole ------------------------------------------------------------


def test_a_body_cut_off_mid_way_keeps_the_bytes_that_arrived(server, people):
    data = os.urandom(4 * MiB)
    upload_id, _ = create(server, people.alice, "cut-off.bin", len(data), sha256=hashlib.sha256(data).hexdigest())
    sent = cut_off_patch(server, people.alice, upload_id, data, 3 * MiB // 2)
    # Once the server has dealt with the gone client (the resume point moved), the bytes are there.
    kept = wait_for(lambda: detail(server, people.alice, upload_id)["offset"], "the cut-off bytes to be durable")

    offset = head_offset(server, people.alice, upload_id)

    log.info("cut off after %d bytes sent: the upload resumes at %d", sent, offset)
    assert 0 < offset <= sent
    assert offset == kept
    assert patched(server, people.alice, upload_id, offset, data[offset:]) == len(data)
    assert_complete(server, people.alice, upload_id, data)


def test_a_head_right_after_a_cut_off_body_shows_the_bytes_that_arrived(server, people):
    """What a tus client does after a network error (tus-js-client's first retry delay is 0): HEAD at once.
    The PATCH's head and bytes reached the server before the HEAD was sent."""
    data = os.urandom(4 * MiB)
    upload_id, _ = create(server, people.alice, "cut-off-head.bin", len(data), sha256=hashlib.sha256(data).hexdigest())
    sent = cut_off_patch(server, people.alice, upload_id, data, 3 * MiB // 2)

    offset = head_offset(server, people.alice, upload_id)
    time.sleep(1)
    later = head_offset(server, people.alice, upload_id)

    log.info("cut off after %d bytes sent: the first HEAD said %d, one a second later %d", sent, offset, later)
    assert 0 < offset <= sent, f"the HEAD answered {offset} for a body whose first {sent} bytes had arrived"
    assert later == offset, "the offset moved after a HEAD answered it"
    assert patched(server, people.alice, upload_id, offset, data[offset:]) == len(data)
    assert_complete(server, people.alice, upload_id, data)


def test_a_head_takes_over_from_a_slow_patch_and_the_offset_it_answers_stays_put(server, people):
    data = os.urandom(4 * MiB)
    upload_id, _ = create(server, people.alice, "slow.bin", len(data), sha256=hashlib.sha256(data).hexdigest())
    with slow_patch(server, people.alice, upload_id, data, writing_after=512 * KiB) as slow:
        started = time.monotonic()
        taken = head(server, people.alice, upload_id)
        waited = time.monotonic() - started
        time.sleep(2)  # the slow client goes on sending meanwhile, if the server still reads it
        again = head(server, people.alice, upload_id)

    assert taken.status == 200, taken.status
    assert waited < TAKEOVER_SECONDS + 1, f"the HEAD waited {waited:.1f} s"
    offset = int(taken.headers["Upload-Offset"])
    log.info("taken over after %d bytes sent, at offset %d, in %.2f s", slow.sent, offset, waited)
    assert 0 < offset <= slow.sent
    assert again.status == 200
    assert int(again.headers["Upload-Offset"]) == offset, "the offset moved after a HEAD answered it"
    assert slow.response_status() in (423, None)
    slow.close()
    assert patched(server, people.alice, upload_id, offset, data[offset:]) == len(data)
    assert_complete(server, people.alice, upload_id, data)


def test_a_patch_takes_over_from_a_slow_patch_and_continues_from_the_durable_offset(server, people):
    data = os.urandom(3 * MiB)
    upload_id, _ = create(server, people.alice, "slow-then-patch.bin", len(data))
    with slow_patch(server, people.alice, upload_id, data, writing_after=256 * KiB) as slow:
        # A client retrying from what it believes: the server's durable offset is at most what was sent.
        # The stale claim (0) is answered 409 with the offset the slow PATCH left behind.
        started = time.monotonic()
        mismatch = patch(server, people.alice, upload_id, 0, data[:10])
        waited = time.monotonic() - started

    assert_refusal(mismatch, 409, "offset_mismatch")
    assert waited < TAKEOVER_SECONDS + 1, f"the PATCH waited {waited:.1f} s"
    offset = int(mismatch.headers["Upload-Offset"])
    assert 0 < offset <= slow.sent
    assert slow.response_status() in (423, None)
    slow.close()
    assert head_offset(server, people.alice, upload_id) == offset
    assert patched(server, people.alice, upload_id, offset, data[offset:]) == len(data)
    assert_complete(server, people.alice, upload_id, data)


def test_a_head_takes_over_while_a_download_streams_from_the_same_server(server, people):
    """A download in progress must not deafen the process's writers: the HEAD's stop request reaches
    the slow PATCH through the channel layer although another request of the process listens on it."""
    downloaded = os.urandom(16 * MiB)
    download_id, _ = create(server, people.alice, "downloaded.bin", len(downloaded), body=downloaded)
    reader = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)  # it reads nothing: the body waits
    reader.settimeout(SOCKET_TIMEOUT)
    reader.connect(("127.0.0.1", server.port))
    reader.sendall(
        f"GET /api/uploads/{download_id}/content HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Token {people.alice}\r\n\r\n".encode()
    )
    assert reader.recv(64 * KiB).startswith(b"HTTP/1.1 200 "), "the download did not start"
    data = os.urandom(8 * MiB)  # longer to send slowly than a HEAD waits for its holder
    upload_id, _ = create(server, people.alice, "slow-beside-download.bin", len(data))
    try:
        with slow_patch(server, people.alice, upload_id, data, writing_after=256 * KiB) as slow:
            started = time.monotonic()
            taken = head(server, people.alice, upload_id)
            waited = time.monotonic() - started
            time.sleep(1)
            again = head(server, people.alice, upload_id)
    finally:
        reader.close()

    assert taken.status == 200, taken.status
    assert waited < TAKEOVER_SECONDS + 1, f"the HEAD waited {waited:.1f} s"
    offset = int(taken.headers["Upload-Offset"])
    assert 0 < offset < len(data), f"the slow PATCH was not stopped: offset {offset}"
    assert int(again.headers["Upload-Offset"]) == offset
    assert slow.response_status() in (423, None)
    slow.close()
    assert patched(server, people.alice, upload_id, offset, data[offset:]) == len(data)
    assert_complete(server, people.alice, upload_id, data)


# --- tus and the WebSocket protocol on one upload ------------------------------------------------


async def test_a_tus_head_stops_a_websocket_writer_and_a_patch_finishes_its_upload(server, people):
    data = os.urandom(4 * MiB)
    upload = await asyncio.to_thread(
        http_call,
        server,
        "POST",
        "/api/uploads/",
        token=people.alice,
        body=json.dumps({"filename": "ws-then-tus.bin", "size": len(data)}).encode(),
    )
    assert upload.status == 201, upload.body[:500]
    upload_id, ws_url = upload.json()["id"], upload.json()["ws_url"]

    async with ws_connect(server, ws_url) as ws:
        ready = await ws_receive(ws)
        assert (ready["type"], ready["offset"]) == ("ready", 0)
        acked = await ws_send_until_acked(ws, data, 0, 2 * MiB, ready["chunk_size"])
        taken = await asyncio.to_thread(head, server, people.alice, upload_id)
        messages, close_code = await ws_messages_until_closed(ws)

    assert taken.status == 200
    assert int(taken.headers["Upload-Offset"]) == acked  # everything it wrote was made durable on the way out
    assert [message["code"] for message in messages if message["type"] == "error"] == ["busy"], messages
    assert close_code == 4409
    offset = int(taken.headers["Upload-Offset"])
    assert await asyncio.to_thread(patched, server, people.alice, upload_id, offset, data[offset:]) == len(data)
    await asyncio.to_thread(assert_complete, server, people.alice, upload_id, data)


async def test_a_tus_patch_stops_a_websocket_writer_and_continues_from_the_durable_offset(server, people):
    data = os.urandom(4 * MiB)
    upload_id, _ = await asyncio.to_thread(
        create, server, people.alice, "ws-then-patch.bin", len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    ws_url = (await asyncio.to_thread(detail, server, people.alice, upload_id))["ws_url"]

    async with ws_connect(server, ws_url) as ws:
        ready = await ws_receive(ws)
        assert (ready["type"], ready["offset"]) == ("ready", 0)
        acked = await ws_send_until_acked(ws, data, 0, 3 * MiB, ready["chunk_size"])
        taken = await asyncio.to_thread(patched, server, people.alice, upload_id, acked, data[acked:])
        messages, close_code = await ws_messages_until_closed(ws)

    assert taken == len(data)
    assert [message["code"] for message in messages if message["type"] == "error"] == ["busy"], messages
    assert close_code == 4409
    await asyncio.to_thread(assert_complete, server, people.alice, upload_id, data)


async def test_an_upload_started_over_tus_is_finished_over_websocket(server, people):
    data = os.urandom(3 * MiB)
    sha256 = hashlib.sha256(data).hexdigest()
    upload_id, answer = await asyncio.to_thread(
        create, server, people.alice, "tus-then-ws.bin", len(data), sha256=sha256, body=data[: MiB + 7]
    )
    assert answer.headers["Upload-Offset"] == str(MiB + 7)
    ws_url = (await asyncio.to_thread(detail, server, people.alice, upload_id))["ws_url"]

    async with ws_connect(server, ws_url) as ws:
        ready = await ws_receive(ws)
        assert (ready["type"], ready["offset"]) == ("ready", MiB + 7)
        for start in range(ready["offset"], len(data), ready["chunk_size"]):
            await ws.send(data[start : start + ready["chunk_size"]])
        messages, close_code = await ws_messages_until_closed(ws)

    assert close_code == 1000, messages
    assert messages[-1] == {"type": "complete", "id": upload_id, "size": len(data), "sha256": sha256}
    await asyncio.to_thread(assert_complete, server, people.alice, upload_id, data)


# --- who may call ----------------------------------------------------------------------------------


def test_a_session_with_its_csrf_token_from_the_same_origin_may_create_and_patch(server, people):
    csrf = "a" * 32
    page = {
        "Authorization": None,
        "Cookie": f"sessionid={people.alice_session}; csrftoken={csrf}",
        "X-CSRFToken": csrf,
        "Origin": server.url,
    }
    data = os.urandom(1000)
    created = tus_call(
        server,
        "POST",
        "/api/tus/",
        headers={**page, "Upload-Length": str(len(data)), "Upload-Metadata": metadata(filename="session.bin")},
    )
    assert created.status == 201, (created.status, created.body[:500])
    upload_id = created.headers["Location"].rsplit("/", 1)[1]

    answer = tus_call(server, "PATCH", f"/api/tus/{upload_id}", body=data, headers={**page, "Upload-Offset": "0"})

    assert answer.status == 204, (answer.status, answer.body[:500])
    assert_complete(server, people.alice, upload_id, data)


def test_a_session_without_its_csrf_token_is_403(server, people):
    upload_id, _ = create(server, people.alice, "csrf.bin", 10)
    cookie = {"Cookie": f"sessionid={people.alice_session}; csrftoken={'b' * 32}", "Origin": server.url}

    posted = tus_call(
        server,
        "POST",
        "/api/tus/",
        headers={**cookie, "Upload-Length": "10", "Upload-Metadata": metadata(filename="csrf.bin")},
    )
    patched_ = tus_call(
        server, "PATCH", f"/api/tus/{upload_id}", body=b"0123456789", headers={**cookie, "Upload-Offset": "0"}
    )

    assert_refusal(posted, 403, "permission_denied")
    assert_refusal(patched_, 403, "permission_denied")
    assert head_offset(server, people.alice, upload_id) == 0


def test_no_credentials_or_a_bad_token_is_401(server, people):
    upload_id, _ = create(server, people.alice, "anonymous.bin", 10)
    creation = {"Upload-Length": "10", "Upload-Metadata": metadata(filename="anonymous.bin")}

    for token in (None, "not-a-token"):
        assert_refusal(tus_call(server, "POST", "/api/tus/", token=token, headers=creation), 401, "unauthenticated")
        assert_refusal(patch(server, token, upload_id, 0, b"0123456789"), 401, "unauthenticated")
        assert_refusal(tus_call(server, "DELETE", f"/api/tus/{upload_id}", token=token), 401, "unauthenticated")
        anonymous_head = head(server, token, upload_id)
        assert anonymous_head.status == 401
        assert "Upload-Offset" not in anonymous_head.headers
    assert detail(server, people.alice, upload_id)["status"] == "uploading"


# --- CORS --------------------------------------------------------------------------------------------


def test_an_allowed_origin_gets_cors_answers_that_expose_the_tus_headers(server, people):
    upload_id, _ = create(server, people.alice, "cors.bin", 10)
    preflight_headers = {
        "Tus-Resumable": None,
        "Origin": CORS_ORIGIN,
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type,authorization",
    }

    for path in ("/api/tus/", f"/api/tus/{upload_id}"):
        preflight = tus_call(server, "OPTIONS", path, headers=preflight_headers)
        assert preflight.status in (200, 204), (preflight.status, preflight.body[:300])
        assert preflight.headers["Access-Control-Allow-Origin"] == CORS_ORIGIN
        methods = {method.strip() for method in preflight.headers["Access-Control-Allow-Methods"].split(",")}
        assert {"POST", "PATCH", "HEAD", "DELETE"} <= methods, methods
        allowed = {name.strip().lower() for name in preflight.headers["Access-Control-Allow-Headers"].split(",")}
        assert {"tus-resumable", "upload-offset", "upload-length", "upload-metadata", "content-type"} <= allowed
        assert "authorization" in allowed

    created = tus_call(
        server,
        "POST",
        "/api/tus/",
        token=people.alice,
        body=b"12345",
        headers={"Origin": CORS_ORIGIN, "Upload-Length": "10", "Upload-Metadata": metadata(filename="cors2.bin")},
    )
    assert created.status == 201, (created.status, created.body[:500])
    assert created.headers["Access-Control-Allow-Origin"] == CORS_ORIGIN
    exposed = {name.strip().lower() for name in created.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"location", "upload-offset", "upload-length", "tus-resumable", "upload-expires"} <= exposed
    refused = patch(server, people.alice, upload_id, 3, b"x", Origin=CORS_ORIGIN)
    assert_refusal(refused, 409, "offset_mismatch")
    assert refused.headers["Access-Control-Allow-Origin"] == CORS_ORIGIN  # a browser may read why


def test_another_origin_gets_no_cors_headers(server, people):
    upload_id, _ = create(server, people.alice, "no-cors.bin", 10)
    other = "https://elsewhere.example"

    preflight = tus_call(
        server,
        "OPTIONS",
        f"/api/tus/{upload_id}",
        headers={"Tus-Resumable": None, "Origin": other, "Access-Control-Request-Method": "PATCH"},
    )
    headed = head(server, people.alice, upload_id, headers={"Origin": other})

    for answer in (preflight, headed):
        assert not [name for name in answer.headers if name.lower().startswith("access-control-")], answer.headers


# --- the edges of the endpoint ---------------------------------------------------------------------


def test_an_unknown_path_under_the_endpoint_is_a_json_404(server, people):
    for method in ("HEAD", "PATCH", "POST", "GET"):
        answer = tus_call(server, method, "/api/tus/a/b", token=people.alice, body=b"" if method != "HEAD" else None)
        assert answer.status == 404, (method, answer.status, answer.body[:300])
        assert answer.headers["Tus-Resumable"] == TUS_VERSION
        if method != "HEAD":
            assert_refusal(answer, 404, "not_found")


def test_a_method_tus_does_not_define_is_405_with_allow(server, people):
    upload_id, _ = create(server, people.alice, "get.bin", 10)

    on_upload = tus_call(server, "GET", f"/api/tus/{upload_id}", token=people.alice)
    on_endpoint = tus_call(server, "PUT", "/api/tus/", token=people.alice, body=b"")

    assert_refusal(on_upload, 405, "method_not_allowed")
    assert {"HEAD", "PATCH", "DELETE", "OPTIONS"} <= {
        method.strip() for method in on_upload.headers["Allow"].split(",")
    }
    assert_refusal(on_endpoint, 405, "method_not_allowed")
    assert {"POST", "OPTIONS"} <= {method.strip() for method in on_endpoint.headers["Allow"].split(",")}


def test_a_plain_get_of_an_upload_url_is_405_not_a_version_refusal(server, people):
    """A browser or script opening the Location sends no Tus-Resumable: the method is what is wrong
    (spec, "HTTP API": wrong methods are 405 method_not_allowed on every path under /api/)."""
    upload_id, _ = create(server, people.alice, "plain-get.bin", 10)

    answer = tus_call(server, "GET", f"/api/tus/{upload_id}", token=people.alice, headers={"Tus-Resumable": None})

    assert_refusal(answer, 405, "method_not_allowed")
    assert {"HEAD", "PATCH", "DELETE", "OPTIONS"} <= {method.strip() for method in answer.headers["Allow"].split(",")}
