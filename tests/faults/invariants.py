"""What must hold after every generated case of the fuzz suite, checked against a live server, and that server.

The fuzzers (test_fuzz_ws.py, test_fuzz_tus.py) and the filename attacks
(test_filename_attacks.py) each run one real ``manage.py serve`` process per
module (``live_target``) and call ``check_case`` after every case. It proves,
from the outside and from the database and storage themselves (never from
what the server says about itself):

1. zero internal errors: no HTTP 5xx, no WebSocket close 1011 / 4500 / 4503 or
   any code the spec does not list (a transport drop only where Daphne must
   drop), no new line in the server's log matching ``cluster.INTERNAL_ERROR``;
2. zero bytes past a declared size: the offset (API and row) is at most the
   size, the part in storage holds at most the size (and at least the
   durable offset), a finished file is exactly the size (its sha256 is that
   of the bytes sent);
3. zero cross-user access: bob gets 404 for alice's upload over the API
   (detail, content, DELETE) and over tus (HEAD, PATCH, DELETE), is refused
   over WebSocket, and alice's upload is unchanged by his attempts;
4. a completed upload's sha256 — the API's, the stored file's and the
   downloaded bytes' — equals that of the bytes the client sent;
5. no slot is left held once the connections are closed: within the server's
   disconnect budget no slot of the upload names a holder (a slot parked for
   a tus client's next PATCH, or reserved by a creation, has no holder and
   expires with its lease);
6. a DELETE answered 204 leaves none of the upload's bytes in storage.

The invariants are checked after the case is over, and each check is counted
in the tally (``TALLY.check``) as it is made.
"""

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import sqlite3
import time
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import websockets

from tests.faults.cluster import INTERNAL_ERROR, line_around
from tests.faults.tally import TALLY
from tests.support import stored
from tests.support.live_backend import Answer, Backend, http_call, live_backend
from tests.support.live_server import LiveServer
from tests.test_live_server import receive, ws_connect
from uploads.storage import Area
from uploads.storage.local import PART_SUFFIX

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
OCTETS = "application/offset+octet-stream"
# How long a closed connection may take to let go of its slot: the server's whole cleanup after a client
# leaves fits in uploads/budgets.py's 9 s (docs/protocol.md, "Refusals"), plus slack for a loaded machine.
SETTLE_SECONDS = 15
WS_TIMEOUT = 20

# The close codes the spec lists (spec.md, "WebSocket upload protocol"), less the two that report a server
# fault: 4500 internal_error and 4503 unavailable (the database is local and up: unavailable is a fault here).
LISTED_CLOSE_CODES = {1000, 4400, 4401, 4404, 4408, 4409, 4410, 4413, 4422, 4429}
INTERNAL_CLOSE_CODES = {1011, 4500, 4503}
# Daphne drops the TCP connection (the client sees 1006, no close frame) for a frame it must not hand on:
# larger than its --websocket-max-message-size (spec.md, "Running the server"), or text that is not UTF-8.
TRANSPORT_DROP = 1006

# Every test module's server: slots enough that reserved and parked slots (each held for a lease) never
# refuse a case, a lease long enough that a loaded two-core machine renews it in time.
FUZZ_SETTINGS = {
    "DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS": 1000,
    "DIRECTDRIVEX_USER_UPLOAD_SLOTS": 1000,
    "DIRECTDRIVEX_SLOT_LEASE_SECONDS": 20,
}

# bob, his token and a signed-in session of his, in one manage.py run (each run costs a second or two).
BOB = """
from django.contrib.auth.models import User
from django.contrib.sessions.backends.db import SessionStore
from rest_framework.authtoken.models import Token
bob = User.objects.create_user("bob")
print("TOKEN", Token.objects.create(user=bob).key)
session = SessionStore()
session["_auth_user_id"] = str(bob.pk)
session["_auth_user_backend"] = "django.contrib.auth.backends.ModelBackend"
session["_auth_user_hash"] = bob.get_session_auth_hash()
session.create()
print("SESSION", session.session_key)
"""


# --- the database, read by the test itself ----------------------------------------------------------


class Database:
    """Read-only queries on the server's database, SQLite or PostgreSQL; SQL written with ``%s`` placeholders."""

    def __init__(self, url: str):
        self.url = url
        self.sqlite = url.startswith("sqlite:")
        self._postgres = None  # one connection for the module: a case makes dozens of queries

    def rows(self, sql: str, *args) -> list[tuple]:
        if self.sqlite:
            connection = sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=10)
            try:
                return connection.execute(sql.replace("%s", "?"), args).fetchall()
            finally:
                connection.close()
        if self._postgres is None:
            import psycopg

            self._postgres = psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        return self._postgres.execute(sql, args).fetchall()

    def close(self) -> None:
        if self._postgres is not None:
            self._postgres.close()
            self._postgres = None

    def key(self, upload_id: str):
        """An upload id as the database keeps it: Django stores a UUID as 32 hex digits in SQLite."""
        return uuid.UUID(upload_id).hex if self.sqlite else upload_id

    def upload(self, upload_id: str) -> dict | None:
        found = self.rows(
            'SELECT status, size, "offset", sha256, storage_key FROM uploads_upload WHERE id = %s', self.key(upload_id)
        )
        if not found:
            return None
        return dict(zip(("status", "size", "offset", "sha256", "storage_key"), found[0], strict=True))

    def active_slots(self, upload_id: str) -> list[dict]:
        found = self.rows(
            "SELECT id, holder_channel, lease_expires_at FROM uploads_slot "
            "WHERE upload_id = %s AND kind = 'upload' AND released_at IS NULL",
            self.key(upload_id),
        )
        return [
            {"id": slot, "holder": holder, "lease_expires_at": _timestamp(expires)} for slot, holder, expires in found
        ]

    def stored_end(self, upload_id: str) -> int:
        """Where the pieces recorded for the upload's part end (the s3 backend's ledger); 0 for none."""
        found = self.rows('SELECT MAX("end") FROM uploads_storedpiece WHERE upload_id = %s', self.key(upload_id))
        return found[0][0] or 0


def _timestamp(value) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value).replace(tzinfo=UTC)  # SQLite: naive text in UTC


# --- the module's server -------------------------------------------------------------------------------


@dataclass
class Target:
    """One module's live server and what the checks need: alice's and bob's credentials, the database."""

    server: LiveServer
    backend: Backend
    bob: str  # bob's token
    bob_cookie: str  # a Cookie header signing bob in
    db: Database
    lease_seconds: int
    log_mark: int = 0

    @property
    def alice(self) -> str:
        return self.backend.alice_token

    @property
    def s3(self) -> bool:
        return self.server.env.get("DIRECTDRIVEX_STORAGE_BACKEND") == "s3"


@contextlib.contextmanager
def live_target(tmp_path_factory, label: str, **settings) -> Iterator[Target]:
    """A fresh database (PostgreSQL + Redis when the suite runs on them) and one server with FUZZ_SETTINGS.

    On the s3 backend (DIRECTDRIVEX_TEST_STORAGE=s3, tests/conftest.py) the
    server gets a bucket prefix and a spool folder of its own, so that what it
    stores can be listed apart from every other module's.
    """
    with live_backend(tmp_path_factory, label) as backend:
        workdir = tmp_path_factory.mktemp(f"{label}-server")
        own = {}
        if os.environ.get("DIRECTDRIVEX_STORAGE_BACKEND") == "s3":
            own = {
                "DIRECTDRIVEX_S3_PREFIX": f"{label}/{uuid.uuid4().hex}/",
                "DIRECTDRIVEX_SPOOL_DIR": workdir / "spool",
            }
        values = {**FUZZ_SETTINGS, **own, **settings}
        server = LiveServer(workdir, database_url=backend.database_url, redis_url=backend.redis_url, **values)
        with server, concurrent.futures.ThreadPoolExecutor(1) as beside:
            made = beside.submit(server.manage, "shell", "-c", BOB)  # while the server starts: a second less to wait
            server.start(timeout=60)
            out = made.result()
            bob = next(line.split()[1] for line in out.splitlines() if line.startswith("TOKEN "))
            session = next(line.split()[1] for line in out.splitlines() if line.startswith("SESSION "))
            database = Database(backend.database_url)
            target = Target(
                server, backend, bob, f"sessionid={session}", database, int(values["DIRECTDRIVEX_SLOT_LEASE_SECONDS"])
            )
            try:
                yield target
                # Whatever the last case left behind is judged too.
                assert new_log_errors(target) == []
            finally:
                database.close()


# --- what a case saw ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """What one generated case saw: every HTTP status and WebSocket close code, with what it answered."""

    target: Target
    problems: list[str] = field(default_factory=list)

    def answered(self, what: str, answer: Answer | int) -> Answer | int:
        status = answer if isinstance(answer, int) else answer.status
        if status >= 500:
            body = b"" if isinstance(answer, int) else answer.body[:300]
            self.problems.append(f"{what} answered {status} {body!r}")
        return answer

    def closed(self, what: str, code: int | None, *, drop_allowed: bool = False) -> None:
        """A close the server decided (not one the client asked for)."""
        if code in INTERNAL_CLOSE_CODES:
            self.problems.append(f"{what} closed with {code}, a server fault")
        elif code == TRANSPORT_DROP and drop_allowed:
            return
        elif code not in LISTED_CLOSE_CODES:
            self.problems.append(f"{what} closed with {code}, a code the spec does not list")

    def http(self, method: str, path: str, *, token: str | None = None, **options) -> Answer:
        """``http_call`` as alice (unless ``token``), its status recorded."""
        answer = http_call(self.target.server, method, path, token=token or self.target.alice, **options)
        self.answered(f"{method} {path}", answer)
        return answer

    def tus(self, method: str, path: str, *, token: str | None = None, headers: dict | None = None, **options):
        """A tus request: ``Tus-Resumable: 1.0.0`` unless ``headers`` says otherwise (None leaves a header out)."""
        sent = {"Tus-Resumable": TUS_VERSION, **(headers or {})}
        sent = {name: value for name, value in sent.items() if value is not None}
        return self.http(method, path, token=token, headers=sent, **options)


def new_log_errors(target: Target) -> list[str]:
    """Lines of the server's log that report an internal error, written since the last call."""
    path = target.server.log_path
    if not path.exists():
        return []
    with open(path, "rb") as log_file:
        log_file.seek(target.log_mark)
        new = log_file.read()
    new = new[: new.rfind(b"\n") + 1]  # whole lines only: a line still being written is read next time
    target.log_mark += len(new)
    text = new.decode(errors="replace")
    return [line_around(text, match.start()) for match in INTERNAL_ERROR.finditer(text)]


# --- the checks ----------------------------------------------------------------------------------------------


@dataclass
class Sent:
    """An upload a case made: its id and the bytes of its file (what a complete upload must hold)."""

    upload_id: str
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def check_case(case: Case, uploads: list[Sent], *, released: set[str] = frozenset()) -> None:
    """Every invariant of the module docstring, for the uploads of one finished case; then they are deleted.

    ``released``: uploads whose slot must be gone altogether (a WebSocket
    writer was admitted and is closed: it releases, it does not park).
    """
    no_internal_errors(case)  # what the case provoked
    for sent in uploads:
        settled_slots(case.target, sent.upload_id, released=sent.upload_id in released)
    for sent in uploads:
        stored_within_size(case, sent)
        no_cross_user_access(case, sent.upload_id)
    for sent in uploads:
        delete_leaves_nothing(case, sent.upload_id)
    no_internal_errors(case)  # what the checks' own requests provoked


def no_internal_errors(case: Case) -> None:
    internal = case.problems + new_log_errors(case.target)
    case.problems = []
    TALLY.check("no internal error (HTTP 5xx, close 1011/4500/4503 or unlisted, server log)")
    TALLY.errors(len(internal))
    assert internal == [], internal


def settled_slots(target: Target, upload_id: str, *, released: bool) -> None:
    """Within SETTLE_SECONDS no slot of the upload has a holder (``released``: no active slot at all)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        active = target.db.active_slots(upload_id)
        held = active if released else [slot for slot in active if slot["holder"]]
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    TALLY.check("no slot held once the connections are closed")
    TALLY.leaked(len(held))
    assert held == [], f"upload {upload_id}: slots still held {SETTLE_SECONDS}s after its connections closed: {held}"
    # A reserved or parked slot is no one's: it must run out with one lease (plus the clocks' slack).
    latest = datetime.now(UTC) + timedelta(seconds=target.lease_seconds + 5)
    assert all(slot["lease_expires_at"] <= latest for slot in active), (upload_id, active)


def stored_within_size(case: Case, sent: Sent) -> None:
    """Offsets and stored bytes within the declared size; a complete upload holds exactly the bytes sent."""
    target, upload_id = case.target, sent.upload_id
    row = target.db.upload(upload_id)
    if row is None:
        return  # deleted by the case itself: delete_leaves_nothing judged its 204 there
    size, key = row["size"], row["storage_key"]
    detail = case.http("GET", f"/api/uploads/{upload_id}/")
    assert detail.status == 200, (detail.status, detail.body[:300])
    shown = detail.json()
    assert shown["size"] == size == len(sent.data), (shown, row, len(sent.data))
    assert 0 <= row["offset"] <= size and 0 <= shown["offset"] <= size, (shown, row)
    finished, parts = stored.finished_keys(target.server), stored.part_keys(target.server)
    status = row["status"]
    if key in parts:
        part = target.server.storage / Area.PARTIAL / f"{key}{PART_SUFFIX}"
        held = target.db.stored_end(upload_id) if target.s3 else part.stat().st_size
        assert held <= size, f"upload {upload_id}: the part holds {held} bytes of a {size}-byte upload"
        # And the other way: what the offset says is durable is there to resume from.
        assert status != "uploading" or held >= row["offset"], (upload_id, row, held)
    else:
        assert status != "uploading" or row["offset"] == 0, (upload_id, row, "durable bytes without a part")
    TALLY.check("no byte past a declared size")
    if status == "complete":
        assert key in finished, (upload_id, row, "complete without its file")
        digest = stored.finished_sha256(key, target.server)
        content = case.http("GET", f"/api/uploads/{upload_id}/content")
        intact = (
            shown["sha256"] == row["sha256"] == digest == sent.sha256
            and shown["offset"] == size
            and content.status == 200
            and hashlib.sha256(content.body).hexdigest() == sent.sha256
        )
        TALLY.upload(size, intact=intact)
        TALLY.check("a complete upload holds exactly the bytes sent")
        assert intact, (upload_id, shown, row, digest, sent.sha256, content.status, len(content.body))
    else:
        assert key not in finished, (upload_id, row, "a finished file of an unfinished upload")
    if status in ("cancelled", "failed", "expired"):
        assert key not in parts, (upload_id, row, "the bytes of a dead upload are still stored")


def no_cross_user_access(case: Case, upload_id: str) -> None:
    """bob cannot see, read, write, delete or connect to alice's upload, and his attempts change nothing."""
    target = case.target
    before = target.db.upload(upload_id)
    offset = before["offset"] if before else 0
    tried = {
        "GET detail": case.http("GET", f"/api/uploads/{upload_id}/", token=target.bob).status,
        "GET content": case.http("GET", f"/api/uploads/{upload_id}/content", token=target.bob).status,
        "DELETE": case.http("DELETE", f"/api/uploads/{upload_id}/", token=target.bob).status,
        "tus HEAD": case.tus("HEAD", f"/api/tus/{upload_id}", token=target.bob).status,
        "tus PATCH": case.tus(
            "PATCH",
            f"/api/tus/{upload_id}",
            token=target.bob,
            body=b"bob's bytes",
            headers={"Upload-Offset": str(offset), "Content-Type": OCTETS},
        ).status,
        "tus DELETE": case.tus("DELETE", f"/api/tus/{upload_id}", token=target.bob).status,
    }
    code, message = asyncio.run(foreign_websocket(target, upload_id))
    case.closed("bob's WebSocket", code)
    tried["WebSocket"] = (code, message.get("code"))
    after = target.db.upload(upload_id)
    TALLY.check("no cross-user access")
    assert all(status == 404 for name, status in tried.items() if name != "WebSocket"), tried
    assert tried["WebSocket"] == (4404, "not_found"), tried
    assert after == before, f"bob's attempts changed alice's upload: {before} -> {after}"


async def foreign_websocket(target: Target, upload_id: str) -> tuple[int | None, dict]:
    """bob, signed in (his session cookie, from the server's own origin), opens alice's upload's WebSocket."""
    headers = {"Cookie": target.bob_cookie, "Origin": target.server.url}
    message: dict = {}
    async with ws_connect(target.server, f"/ws/uploads/{upload_id}/", headers) as ws:
        with contextlib.suppress(websockets.ConnectionClosed):
            message = await receive(ws)
            await asyncio.wait_for(ws.wait_closed(), WS_TIMEOUT)
    return ws.close_code, message


def delete_leaves_nothing(case: Case, upload_id: str) -> None:
    """alice deletes the upload (cancel, then delete if it is not finished): each 204 leaves no byte stored."""
    target = case.target
    row = target.db.upload(upload_id)
    if row is None:
        return
    for _ in range(2):
        answer = case.http("DELETE", f"/api/uploads/{upload_id}/")
        if answer.status == 404:
            break
        assert answer.status == 204, (answer.status, answer.body[:300])
        assert_nothing_stored(target, row["storage_key"], upload_id)


def assert_nothing_stored(target: Target, key: str, upload_id: str) -> None:
    TALLY.check("a 204 DELETE leaves no byte stored")
    leftover = [
        name for name in (*stored.part_keys(target.server), *stored.finished_keys(target.server)) if name == key
    ]
    assert leftover == [], f"upload {upload_id}: bytes of {key} still stored after a 204"


# --- names a server shows -----------------------------------------------------------------------------------


def unsafe_characters(name: str) -> list[str]:
    """Characters of a display name that could make it a path or disguise it: separators, control, format."""
    return [ch for ch in name if ch in "/\\" or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


def metadata_value(header: str, key: str) -> str | None:
    """The decoded value of ``key`` in a tus Upload-Metadata header."""
    for pair in header.split(","):
        name, _, encoded = pair.strip().partition(" ")
        if name == key:
            return base64.b64decode(encoded).decode()
    return None


def walk(root: Path) -> set[str]:
    """Every path under ``root`` (files and folders), relative to it."""
    if not root.exists():
        return set()
    return {str(path.relative_to(root)) for path in root.rglob("*")}
