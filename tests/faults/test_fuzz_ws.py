"""Generated WebSocket message sequences against a real server: whatever a client sends, nothing breaks.

hypothesis writes programs for a hostile or clumsy client of the upload
protocol (docs/protocol.md) and runs each against one live server (``manage.py
serve``, Daphne) started with a small chunk size and window, so that every
limit is cheap to reach: binary frames of 0, 1, chunk-1, chunk, chunk+1,
2*chunk (Daphne's message limit), 2*chunk+1 and window±1 bytes; bursts that
put window-1, window, window+1 and window+chunk bytes in flight; JSON text
messages that are malformed, unknown, or sized around the message limit, and
text that is not UTF-8; frames before ``ready`` and after ``complete``; a
second connection to the upload while the first writes, then a resume; bob
connecting meanwhile; and closes at any point (1000, 1001, 4000, or the TCP
connection dropped without a close frame).

Each program is judged twice. Step by step, against the protocol: every close
the server decides must be one the frames sent explain (4400 for a bad frame
or text, 4413 past the size, a transport drop for what Daphne may not hand
on, 1000 / 4422 at the end), the error message must name it, an ack never
passes what was sent, and the next ``ready.offset`` must be where the kept
bytes end: every valid frame before the refused one, everything sent before
a clean close, at least every acknowledged byte after a dropped connection.
Then, after the program, the upload is finished from the server's offset
(which proves it stayed resumable), frames are sent after ``complete``, and
the shared invariants (tests/faults/invariants.py) are checked: no internal
error anywhere, no byte past the declared size, no access for bob, the
stored and downloaded bytes equal the file, no slot left held.
"""

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field

import pytest
import websockets
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import scaled
from tests.faults.invariants import (
    SETTLE_SECONDS,
    TRANSPORT_DROP,
    WS_TIMEOUT,
    Case,
    Sent,
    Target,
    check_case,
    foreign_websocket,
    live_target,
)
from tests.faults.tally import TALLY
from tests.test_live_server import receive, ws_connect

log = logging.getLogger(__name__)

KiB = 1024
CHUNK = 64 * KiB
WINDOW = 256 * KiB
# manage.py serve passes Daphne twice the chunk size as its message limit (directdrivex/server.py): a frame up
# to it reaches the consumer (and gets 4400), a larger one is dropped by Daphne with the TCP connection.
MAX_MESSAGE = 2 * CHUNK
# The file's bytes go on past its declared size, for the frames that try to go past it.
PAST_THE_END = 8 * CHUNK
# The error message that must come before each refusal's close code.
ERROR_CODES = {4400: {"protocol_error"}, 4413: {"size_exceeded"}, 4422: {"checksum_mismatch"}}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with live_target(tmp_path_factory, "fuzz_ws", DIRECTDRIVEX_CHUNK_SIZE=CHUNK, DIRECTDRIVEX_WINDOW=WINDOW) as live:
        yield live


# --- what a program is made of -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Frames:
    """Binary frames of these sizes, back to back, carrying the file's next bytes, without reading acks."""

    sizes: tuple[int, ...]


@dataclass(frozen=True)
class Burst:
    """Once everything is acknowledged, frames of up to a chunk putting window + ``beyond`` bytes in flight."""

    beyond: int


@dataclass(frozen=True)
class Pause:
    """Read until the server has acknowledged everything sent (it acks at once when it has written it all)."""


@dataclass(frozen=True)
class Text:
    """A text message: malformed, unknown or well-formed JSON, or any text; the protocol takes none."""

    payload: str


@dataclass(frozen=True)
class SizedText:
    """A JSON text message of exactly ``size`` bytes, around Daphne's message limit."""

    size: int


@dataclass(frozen=True)
class NotUtf8:
    """A text frame whose bytes are not UTF-8 (RFC 6455: the connection must fail)."""


@dataclass(frozen=True)
class Close:
    """The client ends the connection: ``normal`` 1000, ``going_away`` 1001, ``application`` 4000, ``abort`` (TCP)."""

    how: str


@dataclass(frozen=True)
class Second:
    """A second connection to the upload while the first is open; then ``keep`` the first, or ``switch``."""

    then: str


@dataclass(frozen=True)
class Intruder:
    """bob, signed in, connects to alice's upload while her connection is open."""


@dataclass(frozen=True)
class Reconnect:
    """Close normally and connect again; with ``early`` > 0, send a frame of that size before ``ready`` comes."""

    early: int


TEXTS = [
    "",
    "{",
    "not json",
    "null",
    "[]",
    '{"type": "ack", "offset": 0}',
    '{"type": "ready"}',
    '{"type": "complete"}',
    '{"type": "hello"}',
    '{"type": "ack", "offset": -1}',
    '{"offset": 1e999}',
    '{"type": "error", "code": "internal_error"}',
    "[" * 5000,
]
FRAME_LIMITS = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, MAX_MESSAGE, MAX_MESSAGE + 1, WINDOW - 1, WINDOW, WINDOW + 1]
SIZE_LIMITS = [1, CHUNK - 1, CHUNK, CHUNK + 1, MAX_MESSAGE, WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW]

frame_sizes = st.one_of(st.sampled_from(FRAME_LIMITS), st.integers(1, CHUNK))
steps = st.one_of(
    st.builds(Frames, st.lists(frame_sizes, min_size=1, max_size=5).map(tuple)),
    st.builds(Burst, st.sampled_from([-1, 0, 1, CHUNK])),
    st.just(Pause()),
    st.builds(Text, st.one_of(st.sampled_from(TEXTS), st.text(max_size=40))),
    st.builds(SizedText, st.sampled_from([MAX_MESSAGE - 1, MAX_MESSAGE, MAX_MESSAGE + 1, WINDOW])),
    st.just(NotUtf8()),
    st.builds(Close, st.sampled_from(["normal", "going_away", "application", "abort"])),
    st.builds(Second, st.sampled_from(["keep", "switch"])),
    st.just(Intruder()),
    st.builds(Reconnect, st.sampled_from([0, 1, CHUNK])),
)


# --- the client ----------------------------------------------------------------------------------------------


@dataclass
class Kept:
    """Where the server's offset may be at the next ``ready``: one of ``values``, or within [low, high]."""

    values: set[int] = field(default_factory=set)
    low: int | None = None
    high: int | None = None

    def allows(self, offset: int) -> bool:
        return offset in self.values or (self.low is not None and self.low <= offset <= self.high)


@dataclass
class Conn:
    """One connection as the client knows it, and what the server must do given what was sent on it."""

    ws: object
    sent: int  # end of the valid bytes sent (from ready.offset on)
    acked: int  # the last ack read
    maybe: set[int] = field(default_factory=set)  # window refusals that may come: the offsets they would keep
    doom: tuple[int, int] | None = None  # (close code, offset kept): a refusal that must come
    drop_possible: bool = False  # something Daphne drops was sent


class Client:
    """A program's client for one upload: connects, sends, reads, and checks each end against the protocol."""

    def __init__(self, target: Target, case: Case, upload: dict, stream: bytes, size: int, declared_ok: bool):
        self.target, self.case = target, case
        self.upload_id, self.ws_url = upload["id"], upload["ws_url"]
        self.stream, self.size = stream, size
        self.sha256 = hashlib.sha256(stream[:size]).hexdigest()
        self.end_code = 1000 if declared_ok else 4422
        self.conn: Conn | None = None
        self.kept: Kept | None = Kept({0})
        self.done: str | None = None  # "complete" or "failed"
        self.open: list = []  # every connection, closed at the end whatever happened
        self.history: list[str] = []

    def note(self, event: str) -> None:
        self.history.append(event)

    def fail(self, what: str) -> None:
        raise AssertionError(f"upload {self.upload_id} (size {self.size}): {what}\nhistory: {self.history}")

    # --- connecting ---

    async def ensure(self) -> Conn | None:
        """The open connection, or a new one; None once the upload is over (checked to be refused as such)."""
        if self.conn is None:
            await self.connect()
        return self.conn

    async def _dial(self):
        ws = await ws_connect(self.target.server, self.ws_url)
        self.open.append(ws)
        return ws

    async def connect(self, early: int = 0) -> None:
        """Connect until admitted (a busy refusal while the last connection lets go is retried)."""
        offset = None
        if early and self.done is None:
            # A frame before ready must carry the bytes at the offset ready will say: wait until no one holds the
            # upload, so that the API's offset is final.
            await self.no_holder()
            offset = self.api_offset()
            if not self.kept.allows(offset):
                self.fail(f"offset {offset} after the last connection, expected {self.kept}")
            early = min(early, self.size - offset)
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            ws = await self._dial()
            if early > 0 and offset is not None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(self.stream[offset : offset + early])
            message, code = await self.first_message(ws)
            if message.get("type") == "ready":
                self.admitted(ws, message, offset if early > 0 else None, early)
                return
            refusal = message.get("code")
            self.note(f"connect refused {code} {refusal}")
            if code == 4409 and refusal == "busy" and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # the last connection is letting go (docs/protocol.md: retry)
                continue
            ended = self.done or (self.kept is not None and self.kept.allows(self.size))
            if code == 4409 and refusal == "not_uploading" and ended:
                self.ended_elsewhere()
                return
            if code == 4400 and refusal == "protocol_error" and early > 0:
                self.kept = Kept({offset})  # the early frame came before ready: refused, nothing of it written
                early = 0
                continue
            self.fail(f"connection refused with {code} {message}")

    async def first_message(self, ws) -> tuple[dict, int | None]:
        try:
            message = await receive(ws)
        except websockets.ConnectionClosed:
            self.case.closed("a new connection", ws.close_code)
            self.fail(f"closed with {ws.close_code} before any message")
        if message.get("type") == "error":
            code = await self.closed_code(ws)
            self.case.closed(f"connect ({message.get('code')})", code)
            return message, code
        return message, None

    def admitted(self, ws, ready: dict, early_at: int | None, early: int) -> None:
        offset = ready["offset"]
        self.note(f"ready {offset}")
        if (ready["chunk_size"], ready["window"]) != (CHUNK, WINDOW):
            self.fail(f"ready says chunk {ready['chunk_size']} window {ready['window']}")
        if self.done is not None:
            self.fail(f"admitted to a {self.done} upload at {offset}")
        if not self.kept.allows(offset):
            self.fail(f"ready.offset {offset}, but the last connection kept {self.kept}")
        if early_at is not None and offset != early_at:
            self.fail(f"ready.offset {offset} moved from {early_at} with no writer")
        api = self.api_offset()
        if api != offset:
            self.fail(f"ready.offset {offset} but the API says {api}")
        self.conn = Conn(ws, offset, offset)
        self.kept = None
        if early_at is not None:
            # Before or after ready reached the server: refused (nothing kept of it), or written.
            self.conn.maybe.add(offset)
            self.account(self.conn, early)

    def ended_elsewhere(self) -> None:
        """The upload ended while no connection of ours watched (a close raced its completion)."""
        status = self.case.http("GET", f"/api/uploads/{self.upload_id}/").json()["status"]
        if status not in ("complete", "failed"):
            self.fail(f"not_uploading, yet the upload is {status}")
        if self.done is None:
            self.done = status
            if status != ("complete" if self.end_code == 1000 else "failed"):
                self.fail(f"the upload ended {status} with the declared sha256 {self.end_code}")
        self.note(f"over: {status}")

    def api_offset(self) -> int:
        answer = self.case.http("GET", f"/api/uploads/{self.upload_id}/")
        assert answer.status == 200, (answer.status, answer.body[:300])
        return answer.json()["offset"]

    async def no_holder(self) -> None:
        deadline = time.monotonic() + SETTLE_SECONDS
        while any(slot["holder"] for slot in self.target.db.active_slots(self.upload_id)):
            if time.monotonic() > deadline:
                self.fail("a closed connection still holds the slot")
            await asyncio.sleep(0.05)

    @staticmethod
    async def closed_code(ws) -> int | None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ws.wait_closed(), WS_TIMEOUT)
        return ws.close_code

    # --- sending ---

    def account(self, conn: Conn, size: int) -> None:
        """What a frame of ``size`` bytes at ``conn.sent`` makes the server do (docs/protocol.md, "Refusals")."""
        start = conn.sent
        if size > MAX_MESSAGE:
            conn.drop_possible = True
        if conn.doom is not None:
            return  # after a refused frame nothing more is written
        if size == 0 or CHUNK < size <= MAX_MESSAGE:
            conn.doom = (4400, start)
        elif size > MAX_MESSAGE:
            conn.doom = (TRANSPORT_DROP, start)
        else:
            if start + size - conn.acked > WINDOW:
                conn.maybe.add(start)  # beyond the window from the last ack read: the server may have acked more
            if start + size > self.size:
                conn.doom = (4413, start)
            else:
                conn.sent += size

    async def frames(self, sizes) -> None:
        conn = await self.ensure()
        if conn is None:
            return
        closed = False
        for size in sizes:
            start = conn.sent
            self.account(conn, size)
            self.note(f"frame {size} at {start}")
            try:
                await conn.ws.send(self.stream[start : start + size])
            except websockets.ConnectionClosed:
                closed = True  # the server closed first: judged by drain below
                break
        if conn.doom is not None or closed:
            await self.drain(conn)

    async def text(self, payload: str | bytes) -> None:
        conn = await self.ensure()
        if conn is None:
            return
        encoded = payload if isinstance(payload, bytes) else payload.encode()
        dropped = isinstance(payload, bytes) or len(encoded) > MAX_MESSAGE
        conn.drop_possible |= dropped
        if conn.doom is None:
            conn.doom = (TRANSPORT_DROP if dropped else 4400, conn.sent)
        self.note(f"text of {len(encoded)} bytes{' (not UTF-8)' if isinstance(payload, bytes) else ''}")
        with contextlib.suppress(websockets.ConnectionClosed):
            await conn.ws.send(encoded, text=True)
        await self.drain(conn)

    async def burst(self, beyond: int) -> None:
        await self.pause()
        conn = await self.ensure()
        if conn is None:
            return
        left = WINDOW + beyond - (conn.sent - conn.acked)
        sizes = []
        while left > 0:
            sizes.append(min(CHUNK, left))
            left -= sizes[-1]
        await self.frames(sizes)

    # --- reading ---

    def outcomes(self, conn: Conn) -> dict[int, set[int]]:
        """Close codes the server may decide on this connection, each with the offsets it may have kept."""
        out: dict[int, set[int]] = {}
        for offset in conn.maybe:
            out.setdefault(4400, set()).add(offset)
        if conn.doom is not None:
            out.setdefault(conn.doom[0], set()).add(conn.doom[1])
        if conn.sent == self.size:
            out.setdefault(self.end_code, set()).add(self.size)
        if conn.drop_possible:
            out[TRANSPORT_DROP] = set().union(*out.values(), {conn.sent})
        return out

    def read_ack(self, conn: Conn, message: dict) -> None:
        offset = message.get("offset")
        if not (isinstance(offset, int) and conn.acked <= offset <= conn.sent):
            self.fail(f"ack {message} with {conn.sent} sent and {conn.acked} acknowledged before")
        conn.acked = offset

    async def pause(self) -> None:
        conn = await self.ensure()
        if conn is None:
            return
        while conn.acked < conn.sent:
            try:
                message = await receive(conn.ws)
            except websockets.ConnectionClosed:
                self.server_closed(conn, [])
                return
            except TimeoutError:
                self.fail(f"no ack for all of {conn.sent} bytes within {WS_TIMEOUT}s (last {conn.acked})")
            if message.get("type") == "ack":
                self.read_ack(conn, message)
            else:
                await self.drain(conn, [message])
                return

    async def drain(self, conn: Conn, messages: list | None = None, why: str = "a refusal was due") -> None:
        """Read what the server sends until it closes (it must: a refusal is due, or the upload ended)."""
        messages = list(messages or [])
        deadline = time.monotonic() + WS_TIMEOUT
        with contextlib.suppress(websockets.ConnectionClosed, TimeoutError):  # closed, or judged open below
            while time.monotonic() < deadline:
                message = await receive(conn.ws)
                if message.get("type") == "ack":
                    self.read_ack(conn, message)
                else:
                    messages.append(message)
        if conn.ws.close_code is None:
            self.fail(f"{why} ({self.outcomes(conn)}), and the connection is still open: {messages}")
        self.server_closed(conn, messages)

    def server_closed(self, conn: Conn, messages: list[dict]) -> None:
        """The server closed ``conn``: the code must be one of its outcomes, with the message that goes with it."""
        code, outcomes = conn.ws.close_code, self.outcomes(conn)
        self.note(f"server closed {code} after {messages}")
        self.case.closed("a connection", code, drop_allowed=TRANSPORT_DROP in outcomes)
        if code not in outcomes:
            self.fail(f"closed with {code} {messages}; what was sent explains only {outcomes}")
        if code in ERROR_CODES and not any(m.get("code") in ERROR_CODES[code] for m in messages):
            self.fail(f"closed with {code} without the error message {ERROR_CODES[code]}: {messages}")
        if code == 1000:
            complete = next((m for m in messages if m.get("type") == "complete"), None)
            expected = {"type": "complete", "id": self.upload_id, "size": self.size, "sha256": self.sha256}
            if complete != expected:
                self.fail(f"closed 1000 with {messages}, expected {expected}")
        self.conn = None
        self.ended(code, outcomes[code])

    def ended(self, code: int, kept: set[int]) -> None:
        if code == 1000:
            self.done = "complete"
        elif code == 4422:
            self.done = "failed"
        self.kept = Kept(set(kept))

    # --- closing ---

    async def close(self, how: str) -> None:
        conn = self.conn
        if conn is None:
            return
        self.note(f"client close {how}")
        if how == "abort":
            conn.ws.transport.abort()
            await self.closed_code(conn.ws)
        else:
            await conn.ws.close({"normal": 1000, "going_away": 1001, "application": 4000}[how])
        if conn.ws.protocol.close_rcvd_then_sent:
            await self.drain(conn)  # the server had closed first: judge its code, with the messages before it
            return
        self.conn = None
        # Every valid byte sent before a close frame is written; a dropped connection keeps at least what was acked.
        outcomes = self.outcomes(conn)
        if conn.doom is None:
            outcomes.setdefault(0, set()).add(conn.sent)
        kept = Kept(set().union(*outcomes.values()))
        if how == "abort":
            kept.low, kept.high = conn.acked, (conn.doom[1] if conn.doom else conn.sent)
        self.kept = kept

    # --- the other steps ---

    async def second(self, then: str) -> None:
        first = await self.ensure()
        if first is None:
            return
        ws = await self._dial()
        message, code = await self.first_message(ws)
        self.note(f"second connection: {code} {message}")
        if message.get("type") == "ready":
            # Admitted: the first connection must be over (never two live writers), ended as its frames explain.
            await self.drain(first, why="a second connection was admitted while the first was open")
            self.admitted(ws, message, None, 0)
        elif (code, message.get("code")) == (4409, "not_uploading") and self.size in self.outcomes(first).get(
            self.end_code, ()
        ):
            await self.drain(first)  # the upload was just finished by the first connection
        elif (code, message.get("code")) != (4409, "busy"):
            self.fail(f"a second connection got {code} {message} while the first was open")
        if then == "switch" and self.conn is not None:
            await self.close("normal")
            await self.ensure()

    async def intruder(self) -> None:
        if await self.ensure() is None:
            return
        code, message = await foreign_websocket(self.target, self.upload_id)
        self.case.closed("bob's connection", code)
        if (code, message.get("code")) != (4404, "not_found"):
            self.fail(f"bob's connection to alice's upload got {code} {message}")

    async def reconnect(self, early: int) -> None:
        await self.close("normal")
        await self.connect(early)

    async def run(self, step) -> None:
        match step:
            case Frames(sizes):
                await self.frames(sizes)
            case Burst(beyond):
                await self.burst(beyond)
            case Pause():
                await self.pause()
            case Text(payload):
                await self.text(payload)
            case SizedText(size):
                await self.text(sized_json(size))
            case NotUtf8():
                await self.text(b'{"type": "\xff\xfe"}')
            case Close(how):
                await self.ensure()
                await self.close(how)
            case Second(then):
                await self.second(then)
            case Intruder():
                await self.intruder()
            case Reconnect(early):
                await self.reconnect(early)

    # --- the end ---

    async def finish(self) -> None:
        """Send the rest of the file from the server's offset until the upload ends (resumable whatever came)."""
        deadline = time.monotonic() + 60
        while self.done is None:
            if time.monotonic() > deadline:
                self.fail("the upload could not be finished in 60 s")
            conn = await self.ensure()
            if conn is None:
                continue
            while conn.sent < self.size and conn.doom is None:
                piece = min(CHUNK, self.size - conn.sent)
                if conn.sent + piece - conn.acked > WINDOW:
                    break
                start = conn.sent
                self.account(conn, piece)
                try:
                    await conn.ws.send(self.stream[start : start + piece])
                except websockets.ConnectionClosed:
                    break
            try:
                message = await receive(conn.ws)
            except websockets.ConnectionClosed:
                self.server_closed(conn, [])
                continue
            if message.get("type") == "ack":
                self.read_ack(conn, message)
            else:
                # complete, or an error: the server closes next. A frame right after complete must change nothing.
                if message.get("type") == "complete":
                    with contextlib.suppress(websockets.ConnectionClosed):
                        await conn.ws.send(b"late")
                await self.drain(conn, [message])
        TALLY.check("an upload stays resumable after every refusal and close")
        await self.after_the_end()

    async def after_the_end(self) -> None:
        """Connections to the finished (or failed) upload are refused not_uploading, frames or not."""
        for early in (False, True):
            ws = await self._dial()
            if early:
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(b"after the end")
            message, code = await self.first_message(ws)
            allowed = {(4409, "not_uploading")} | ({(4400, "protocol_error")} if early else set())
            if (code, message.get("code")) not in allowed:
                self.fail(f"a connection to the {self.done} upload got {code} {message}")

    async def close_all(self) -> None:
        for ws in self.open:
            with contextlib.suppress(Exception):
                await ws.close()


def sized_json(size: int) -> str:
    """A JSON text message of exactly ``size`` bytes."""
    head = '{"type": "ack", "pad": "'
    return head + "a" * (size - len(head) - 2) + '"}'


async def play(client: Client, program: list) -> None:
    try:
        for step in program:
            client.note(repr(step))
            await client.run(step)
        await client.finish()
    finally:
        await client.close_all()


# --- the test ------------------------------------------------------------------------------------------------


@settings(
    max_examples=scaled(10, 400),
    deadline=None,
    database=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    size=st.one_of(st.sampled_from(SIZE_LIMITS), st.integers(1, 3 * WINDOW)),
    declared=st.sampled_from(["none", "right", "wrong"]),
    seed=st.integers(0, 2**32 - 1),
    program=st.lists(steps, min_size=1, max_size=8),
)
@example(size=WINDOW + 1, declared="right", seed=1, program=[Burst(1), Frames((CHUNK + 1,)), Burst(0)])
@example(size=CHUNK, declared="none", seed=2, program=[Frames((CHUNK, 1)), Reconnect(CHUNK), Second("switch")])
@example(size=2 * WINDOW, declared="wrong", seed=3, program=[Frames((CHUNK, 0)), Close("abort"), Text("{")])
def test_generated_websocket_sequences_keep_every_invariant(target, size, declared, seed, program):
    TALLY.case("WebSocket message sequences")
    case = Case(target)
    stream = random.Random(seed).randbytes(size + PAST_THE_END)
    digest = hashlib.sha256(stream[:size] if declared == "right" else b"another file").hexdigest()
    body = {"filename": f"fuzz-{seed}.bin", "size": size} | ({} if declared == "none" else {"sha256": digest})
    created = case.http("POST", "/api/uploads/", body=json.dumps(body).encode())
    assert created.status == 201, (created.status, created.body[:300])
    upload = created.json()
    client = Client(target, case, upload, stream, size, declared_ok=declared != "wrong")
    try:
        asyncio.run(play(client, program))
    finally:
        log.info("upload %s: %s", upload["id"], client.history)
    assert client.done == ("failed" if declared == "wrong" else "complete"), client.history
    check_case(case, [Sent(upload["id"], stream[:size])], released={upload["id"]})
