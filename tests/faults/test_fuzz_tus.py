"""Generated tus 1.0 request sequences against a real server: whatever a tus client sends, nothing breaks.

hypothesis writes sequences of requests on an upload and runs each against
one live server (``manage.py serve``, Daphne, its tus consumer): PATCHes with
the right, a stale, a future or an unreadable ``Upload-Offset``, bodies of 0,
1, chunk±1, window±1 bytes, the exact rest or one byte past it, the right or
another ``Content-Type``, any ``Tus-Resumable``; bodies sent whole, chunked,
with a ``Content-Length`` shorter than the body, or cut off by closing the
socket at a random point (and the next request sent at once, or once the
server has let go); HEAD, DELETE and OPTIONS; creations with
``Upload-Length`` missing, zero, unreadable or above the maximum,
``Upload-Defer-Length``, ``Upload-Metadata`` well-formed or not (no
filename, bad base64, not UTF-8, a key twice, a bad sha256 or fingerprint),
with and without a body (creation-with-upload, or one past its length, or of
another type); and two or three of PATCH, HEAD, DELETE (alice's and bob's)
on one upload at once, from threads.

Each request is judged against docs/tus.md as it is answered: a refusal
must be one that what was sent explains (412, 415, 400, 404, 409 with the
server's ``Upload-Offset``, 410, 413, 423 only while an earlier request may
still be letting go), an accepted PATCH answers 204 with exactly its new
offset, and every offset the server tells (204, 409, HEAD) lies between
what it last told and what it can have received since — after a cut body,
all of what was sent once the server has let go, and a HEAD never tells an
offset that can still move. A 204 DELETE leaves no byte, even with a PATCH
racing it. After the sequence, the upload is finished from the server's
offset, a PATCH after completion is answered 409 at the full length, and
the shared invariants (tests/faults/invariants.py) are checked: no internal
error anywhere, no byte past the declared size, no access for bob, the
stored and downloaded bytes equal the file, no slot left with a holder.
"""

import base64
import contextlib
import hashlib
import http.client
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import scaled
from tests.faults.invariants import (
    OCTETS,
    SETTLE_SECONDS,
    TUS_VERSION,
    Case,
    Sent,
    Target,
    assert_nothing_stored,
    check_case,
    live_target,
)
from tests.faults.tally import TALLY
from tests.support.bodies import CHUNKED_END, chunk, send_head
from tests.support.live_backend import Answer

log = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB
CHUNK = 64 * KiB
WINDOW = 256 * KiB
MAX_FILE_SIZE = 4 * MiB
SOCKET_TIMEOUT = 30
PAST_THE_END = 2 * WINDOW


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with live_target(
        tmp_path_factory, "fuzz_tus",
        DIRECTDRIVEX_CHUNK_SIZE=CHUNK, DIRECTDRIVEX_WINDOW=WINDOW, DIRECTDRIVEX_MAX_FILE_SIZE=MAX_FILE_SIZE,
    ) as live:  # fmt: skip
        yield live


# --- what a sequence is made of -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Patch:
    """A PATCH of the upload. ``offset``: right / behind / ahead / any literal header value / missing (None).

    ``length``: body bytes, or "rest" / "past" (the rest of the file, one
    byte more). ``body``: whole, chunked, short (Content-Length 1 to 100
    bytes below the body's length: the rest reaches the server as a next
    request), cut (the socket closed after ``cut`` of it; ``wait``: the next
    request only once the server has let go).
    """

    offset: str | None = "right"
    length: int | str = "rest"
    content_type: str | None = OCTETS
    version: str | None = TUS_VERSION
    body: str = "whole"
    cut: float = 0.5
    wait: bool = True
    junk: bool = False  # Upload-Length and Upload-Defer-Length too, which a PATCH must ignore


@dataclass(frozen=True)
class Head:
    version: str | None = TUS_VERSION


@dataclass(frozen=True)
class Delete:
    version: str | None = TUS_VERSION


@dataclass(frozen=True)
class Options:
    version: str | None = TUS_VERSION


@dataclass(frozen=True)
class Create:
    """Another upload's creation. ``length``: its Upload-Length (a literal, None for none); ``metadata``: a kind."""

    length: str | None
    metadata: str
    version: str | None = TUS_VERSION
    defer: bool = False
    body: str = "none"  # none / some (creation-with-upload) / past (longer than the length) / typed (not tus's type)


@dataclass(frozen=True)
class Together:
    """Requests on the upload at once, each from its own thread: patch, cut, head, delete, bob_patch, bob_head."""

    ops: tuple[str, ...]


VERSIONS = [TUS_VERSION, TUS_VERSION, TUS_VERSION, None, "0.2.2", "1.0", "2.0.0"]
OFFSETS = ["right", "right", "right", "behind", "ahead", None, "abc", "-1", "1.5", "0x10", "\u00b2", ""]
LENGTHS = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, WINDOW - 1, WINDOW, WINDOW + 1, "rest", "past"]
TYPES = [OCTETS, OCTETS, OCTETS, None, "application/octet-stream", f"{OCTETS}; charset=utf-8", "text/plain"]
METADATA = ["good", "good", "none", "empty", "no_filename", "bad_base64", "not_utf8", "twice", "key_only",
            "bad_key", "bad_sha256", "long_fingerprint", "nul_fingerprint", "with_filetype"]  # fmt: skip
CREATE_LENGTHS = [None, "0", "-1", "abc", "1.0", str(MAX_FILE_SIZE + 1), "99999999999999999999999", "1", "65537"]

bodies = {
    "length": st.one_of(st.sampled_from(LENGTHS), st.integers(0, 2 * WINDOW)),
    "body": st.sampled_from(["whole", "whole", "chunked", "short", "cut", "cut"]),
    "cut": st.floats(0, 0.99),
    "wait": st.booleans(),
    "junk": st.booleans(),
}
# Any header may be wrong...
patches = st.builds(
    Patch,
    offset=st.one_of(st.sampled_from(OFFSETS), st.integers(0, 3 * WINDOW).map(str)),
    content_type=st.sampled_from(TYPES),
    version=st.sampled_from(VERSIONS),
    **bodies,
)
# ... but most PATCHes are a client's own, whose bodies the server takes: the paths that write (cut, chunked,
# short, past the end) are where bytes can go wrong.
writing_patches = st.builds(Patch, **bodies)
# PATCHes most often: a DELETE ends the sequence's upload, and HEADs come with every cut and race anyway.
steps = st.one_of(
    writing_patches,
    writing_patches,
    patches,
    st.builds(Head, st.sampled_from(VERSIONS)),
    st.builds(Delete, st.sampled_from(VERSIONS)),
    st.builds(Options, st.sampled_from(VERSIONS)),
    st.builds(
        Create,
        length=st.one_of(st.sampled_from(CREATE_LENGTHS), st.integers(1, 2 * CHUNK).map(str)),
        metadata=st.sampled_from(METADATA),
        version=st.sampled_from(VERSIONS),
        defer=st.booleans(),
        body=st.sampled_from(["none", "none", "some", "past", "typed"]),
    ),
    st.builds(
        Together,
        st.lists(
            st.sampled_from(["patch", "patch", "cut", "head", "head", "delete", "bob_patch", "bob_head"]),
            min_size=2,
            max_size=3,
        ).map(tuple),
    ),
)


# --- requests ----------------------------------------------------------------------------------------------


def b64(value: str | bytes) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


NOT_UTF8 = base64.b64encode(b"caf\xe9.txt").decode()


def metadata_header(kind: str, filename: str) -> str | None:
    """An Upload-Metadata header of the given kind (None: no header at all)."""
    good = f"filename {b64(filename)}"
    return {
        "good": good,
        "none": None,
        "empty": "",
        "no_filename": f"filetype {b64('application/pdf')}",
        "bad_base64": "filename !!not-base64!!",
        "not_utf8": f"filename {NOT_UTF8}",
        "twice": f"{good},{good}",
        "key_only": "filename",
        "bad_key": f"file\u00e9name {b64(filename)}",
        "bad_sha256": f"{good},sha256 {b64('xyz')}",
        "long_fingerprint": f"{good},fingerprint {b64('f' * 257)}",
        "nul_fingerprint": f"{good},fingerprint {b64('a' + chr(0))}",
        "with_filetype": f"{good},filetype {b64('image/png')},fingerprint {b64('mine')}",
    }[kind]


METADATA_REFUSED = {"none", "empty", "no_filename", "bad_base64", "not_utf8", "twice", "key_only", "bad_key",
                    "bad_sha256", "long_fingerprint", "nul_fingerprint"}  # fmt: skip


def read_response(sock: socket.socket) -> Answer:
    response = http.client.HTTPResponse(sock)
    response.begin()
    try:
        return Answer(response.status, response.msg, response.read())
    finally:
        response.close()


def send_patch(
    target: Target, token: str, upload_id: str, headers: dict, payload: bytes, *, body: str, cut: int = 0
) -> Answer | None:
    """A PATCH over a plain socket, its body sent from a thread while the answer is read (a refusal may come
    before the body is read). ``cut``: close the socket after that many bytes, and read nothing."""
    sock = socket.create_connection(("127.0.0.1", target.server.port), timeout=SOCKET_TIMEOUT)
    try:
        sent = {"Host": f"127.0.0.1:{target.server.port}", "Authorization": f"Token {token}", **headers}
        if body == "chunked":
            sent["Transfer-Encoding"] = "chunked"
            wire = b"".join(chunk(payload[i : i + CHUNK // 3]) for i in range(0, len(payload), CHUNK // 3))
            wire += CHUNKED_END
        else:
            short = min(len(payload), 1 + len(payload) % 100) if body == "short" else 0
            sent["Content-Length"] = str(len(payload) - short)
            wire = payload
        send_head(sock, "PATCH", f"/api/tus/{upload_id}", {k: v for k, v in sent.items() if v is not None})
        if body == "cut":
            with contextlib.suppress(OSError):
                sock.sendall(payload[:cut])
            return None
        sender = threading.Thread(target=_send_quietly, args=(sock, wire), daemon=True)
        sender.start()
        answer = read_response(sock)
        sender.join(SOCKET_TIMEOUT)
        return answer
    finally:
        sock.close()


def _send_quietly(sock: socket.socket, wire: bytes) -> None:
    with contextlib.suppress(OSError):  # the server answered early and closed: the answer is what counts
        sock.sendall(wire)


# --- the client ----------------------------------------------------------------------------------------------


class TusFuzzClient:
    """One sequence's client: sends each request, judges its answer, and keeps what the server may hold."""

    def __init__(self, target: Target, case: Case, upload_id: str, stream: bytes, size: int, declared_ok: bool):
        self.target, self.case = target, case
        self.upload_id, self.path = upload_id, f"/api/tus/{upload_id}"
        self.stream, self.size, self.declared_ok = stream, size, declared_ok
        self.low = self.high = 0  # the server's offset is within [low, high]; once told, low == high
        self.settling = False  # an earlier request may still be letting go: a 423 is possible
        self.extra: list[Sent] = []
        self.history: list[str] = []

    def fail(self, what: str) -> None:
        raise AssertionError(f"upload {self.upload_id} (size {self.size}): {what}\nhistory: {self.history}")

    def status(self) -> str:
        row = self.target.db.upload(self.upload_id)
        return row["status"] if row else "gone"

    def told(self, offset: int, what: str, *, final: bool = True) -> None:
        """The server told an offset: it must be where what it was sent can have brought it.

        ``final``: nothing sent earlier can move it any more (a HEAD waits for
        every earlier request; a refused PATCH does not: an earlier PATCH still
        arriving, e.g. one whose client cut its body, may be admitted after it).
        """
        if not self.low <= offset <= self.high:
            self.fail(f"{what} told offset {offset}; it can only be within [{self.low}, {self.high}]")
        self.low = offset
        if final or not self.settling:
            self.high = offset

    def expect(self, what: str, answer: Answer | None, allowed: set[int]) -> Answer | None:
        if answer is None:
            return None
        self.case.answered(what, answer)
        self.history.append(f"{what} -> {answer.status} {answer.body[:120]!r}")
        if answer.status not in allowed:
            self.fail(f"{what} answered {answer.status} {answer.body[:300]!r}; expected one of {sorted(allowed)}")
        if answer.headers.get("Tus-Resumable") != TUS_VERSION:
            self.fail(f"{what} answered without Tus-Resumable: {dict(answer.headers)}")
        # Every refusal carries {"code", "detail"} (docs/tus.md); a HEAD's answer has no body to carry it in.
        head = what.startswith("HEAD") or what.endswith("head")
        if answer.status >= 400 and not head and not answer.content_type.startswith("application/json"):
            self.fail(f"{what}: a refusal without its JSON body: {answer.body[:300]!r}")
        if answer.status >= 400 and not head and not answer.json().get("code"):
            self.fail(f"{what}: a refusal without its code: {answer.body[:300]!r}")
        return answer

    # --- the steps ---

    def options(self, step: Options) -> None:
        answer = self.case.tus("OPTIONS", "/api/tus/", headers={"Tus-Resumable": step.version})
        self.expect(f"OPTIONS ({step.version})", answer, {204})
        told = (answer.headers.get("Tus-Version"), answer.headers.get("Tus-Max-Size"))
        if told != (TUS_VERSION, str(MAX_FILE_SIZE)) or "creation" not in answer.headers.get("Tus-Extension", ""):
            self.fail(f"OPTIONS told {dict(answer.headers)}")

    def head(self, step: Head = Head()) -> Answer:
        status = self.status()
        answer = self.case.tus("HEAD", self.path, headers={"Tus-Resumable": step.version})
        if step.version != TUS_VERSION:
            allowed = {412}
        else:
            allowed = {"uploading": {200}, "complete": {200}, "gone": {404}}.get(status, {410})
            allowed |= {423} if self.settling else set()
        self.expect(f"HEAD ({step.version}, {status})", answer, allowed)
        if answer.status == 200:
            offset = int(answer.headers["Upload-Offset"])
            if answer.headers["Upload-Length"] != str(self.size) or answer.headers.get("Cache-Control") != "no-store":
                self.fail(f"HEAD told {dict(answer.headers)}")
            if self.status() == "complete":
                if offset != self.size:
                    self.fail(f"HEAD of the complete upload told offset {offset}")
                self.low = self.high = self.size
            else:
                self.told(offset, "HEAD")
            self.settling = False
            # A HEAD never tells an offset that can still move: the next one says the same.
            again = self.case.tus("HEAD", self.path)
            if again.status == 200 and int(again.headers["Upload-Offset"]) != offset:
                self.fail(f"HEAD told {offset}, the next HEAD {again.headers['Upload-Offset']}")
        return answer

    def delete(self, step: Delete) -> None:
        status, key = self.status(), self.storage_key()
        answer = self.case.tus("DELETE", self.path, headers={"Tus-Resumable": step.version})
        allowed = {412} if step.version != TUS_VERSION else ({404} if status == "gone" else {204})
        self.expect(f"DELETE ({step.version}, {status})", answer, allowed)
        if answer.status == 204:
            assert_nothing_stored(self.target, key, self.upload_id)
            self.settling = False

    def storage_key(self) -> str | None:
        row = self.target.db.upload(self.upload_id)
        return row["storage_key"] if row else None

    def patch(self, step: Patch) -> None:
        status = self.status()
        if self.low != self.high and step.offset == "right":
            claimed = self.high  # what a client that counted its own bytes would claim after a cut
        else:
            claimed = {"right": self.low, "behind": self.low - 1, "ahead": self.low + 1}.get(step.offset, self.low)
        claimed = max(claimed, 0)
        rest = self.size - claimed
        length = max({"rest": rest, "past": rest + 1}.get(step.length, step.length), 0)
        payload = self.stream[claimed : claimed + length]
        length = len(payload)
        header = str(claimed) if step.offset in ("right", "behind", "ahead") else step.offset
        headers = {"Tus-Resumable": step.version, "Content-Type": step.content_type, "Upload-Offset": header}
        if step.junk:
            headers |= {"Upload-Length": "1", "Upload-Defer-Length": "1"}
        declared = len(payload) - (min(length, 1 + length % 100) if step.body == "short" else 0)
        # Every refusal what was sent explains (docs/tus.md, "Refusals"); the server may give any of them.
        refusals = set()
        if step.version != TUS_VERSION:
            refusals.add(412)
        if step.content_type != OCTETS:
            refusals.add(415)
        if header is None or not (header.isascii() and header.isdigit()):
            refusals.add(400)
        refusals |= {"gone": {404}, "cancelled": {410}, "failed": {410}, "complete": {409}}.get(status, set())
        if status == "uploading" and self.low == self.high and header != str(self.low):
            refusals.add(409)
        if status == "uploading" and self.low != self.high:
            refusals.add(409)  # after a cut, the client's count may be ahead of what was kept
        past = claimed + (declared if step.body != "chunked" else length) > self.size
        if past:
            refusals.add(413)
        # After a cut the client cannot know whether all of its bytes were kept: its count may be accepted.
        accepted = status == "uploading" and (not refusals or (refusals == {409} and self.low != self.high))
        allowed = set(refusals) | ({204} if accepted else set())
        if accepted and claimed + declared == self.size and not self.declared_ok:
            allowed.add(460)
        if self.settling:
            allowed.add(423)
        what = f"PATCH {header!r} +{length} {step.body} ({step.version}, {step.content_type}, {status})"
        cut = int(len(payload) * step.cut) if step.body == "cut" else 0
        if step.body == "cut" and length == 0:
            step = replace(step, body="whole")
        answer = send_patch(self.target, self.target.alice, self.upload_id, headers, payload, body=step.body, cut=cut)
        if answer is None:
            self.cut_off(what, claimed, cut, could_write=accepted, sure=not refusals, wait=step.wait)
            return
        self.expect(what, answer, allowed)
        self.after_patch(answer, claimed, declared, length, step.body)

    def after_patch(self, answer: Answer, claimed: int, declared: int, length: int, body: str) -> None:
        told = answer.headers.get("Upload-Offset")
        status = answer.status
        if status == 204:
            written = declared if body != "chunked" else length
            if told != str(claimed + written):
                self.fail(f"204 told Upload-Offset {told}, expected {claimed + written}")
            if not self.low <= claimed <= self.high:
                self.fail(f"a PATCH at {claimed} was accepted; the offset was within [{self.low}, {self.high}]")
            self.low = self.high = claimed + written
            if claimed + written == self.size and self.status() != "complete":
                self.fail(f"the PATCH that brought the last byte answered 204, the upload is {self.status()}")
        elif status == 409 and told is not None:
            full = self.status() == "complete"
            if full and told != str(self.size):
                self.fail(f"409 on the complete upload told Upload-Offset {told}, not its length")
            if not full:
                self.told(int(told), "a 409", final=False)
        elif status == 413 and body == "chunked" and told is not None:
            # The piece that passes the length is refused; the pieces before it are kept.
            self.high = self.size
            self.told(int(told), "a chunked 413", final=False)
        elif status == 413 and told is not None:
            self.told(int(told), "a 413 (nothing written)", final=False)
        elif status == 460 and self.status() != "failed":
            self.fail(f"460 checksum_mismatch, yet the upload is {self.status()}")

    def cut_off(self, what: str, claimed: int, cut: int, *, could_write: bool, sure: bool, wait: bool) -> None:
        """The socket closed after ``cut`` body bytes: the server keeps what arrived of an accepted body."""
        self.history.append(f"{what} cut after {cut} bytes{' (then wait)' if wait else ''}")
        if could_write and claimed == self.high:
            self.high = claimed + cut
        self.settling = True
        if not wait:
            return
        deadline = time.monotonic() + SETTLE_SECONDS
        while any(slot["holder"] for slot in self.target.db.active_slots(self.upload_id)):
            if time.monotonic() > deadline:
                self.fail(f"{what}: the server still holds the upload {SETTLE_SECONDS}s after the client left")
            time.sleep(0.05)
        if self.status() != "uploading":
            return
        # Let go: everything that arrived is durable now; the next HEAD tells all of it.
        answer = self.head()
        if answer.status == 200 and sure:
            TALLY.check("a body cut off keeps every byte that arrived")
            if int(answer.headers["Upload-Offset"]) != claimed + cut:
                self.fail(f"{what}: {cut} bytes arrived, the upload kept {answer.headers['Upload-Offset']}")

    def create(self, step: Create) -> None:
        name = f"created-{random.getrandbits(32):08x}.bin"
        metadata = metadata_header(step.metadata, name)
        length = int(step.length) if step.length and step.length.isdigit() else None
        body = b""
        if step.body in ("some", "typed"):
            body = self.stream[: max(1, (length or 1) // 2)]
        elif step.body == "past":
            body = self.stream[: (length or 0) + 1]
        headers = {
            "Tus-Resumable": step.version,
            "Upload-Length": step.length,
            "Upload-Metadata": metadata,
            "Upload-Defer-Length": "1" if step.defer else None,
            "Content-Type": {"none": None, "typed": "text/plain"}.get(step.body, OCTETS),
        }
        refusals = set()
        if step.version != TUS_VERSION:
            refusals.add(412)
        if step.defer or length is None or length == 0 or step.metadata in METADATA_REFUSED:
            refusals.add(400)
        if length is not None and length > MAX_FILE_SIZE:
            refusals.add(413)
        if step.body == "typed":
            refusals.add(415)
        if length is not None and len(body) > length:
            refusals.add(413)
        answer = self.case.tus(
            "POST", "/api/tus/", headers=headers,
            body=body if step.body != "none" else None,
        )  # fmt: skip
        what = f"POST {step}"
        self.expect(what, answer, refusals or {201})
        if answer.status == 201:
            location = answer.headers["Location"]
            if not location.startswith(f"{self.target.server.url}/api/tus/"):
                self.fail(f"{what}: Location {location}")
            if answer.headers.get("Upload-Offset") != str(len(body)):
                self.fail(f"{what}: Upload-Offset {answer.headers.get('Upload-Offset')} for a {len(body)}-byte body")
            self.extra.append(Sent(location.rsplit("/", 1)[1], self.stream[:length]))

    def together(self, step: Together) -> None:
        """The requests at once, from threads; then what they did must add up."""
        if self.low != self.high or self.settling:
            self.head()
        status_before, key = self.status(), self.storage_key()
        offset, results = self.low, {}
        start = threading.Barrier(len(step.ops))

        length = min(CHUNK, self.size - offset)

        def run(index: int, op: str) -> None:
            start.wait()
            payload = self.stream[offset : offset + length]
            headers = {"Tus-Resumable": TUS_VERSION, "Content-Type": OCTETS, "Upload-Offset": str(offset)}
            who = self.target.bob if op.startswith("bob_") else self.target.alice
            try:
                if op in ("patch", "cut", "bob_patch"):
                    results[index] = send_patch(
                        self.target, who, self.upload_id, headers, payload,
                        body="cut" if op == "cut" else "whole", cut=length // 2,
                    )  # fmt: skip
                elif op in ("head", "bob_head"):
                    results[index] = self.case.tus("HEAD", self.path, token=who)
                else:
                    results[index] = self.case.tus("DELETE", self.path)
            except Exception as error:  # judged below, in the test's thread
                errors.append(f"{op}: {error!r}")

        errors: list[str] = []
        threads = [threading.Thread(target=run, args=(i, op)) for i, op in enumerate(step.ops)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SOCKET_TIMEOUT * 2)
        if errors or any(thread.is_alive() for thread in threads):
            self.fail(f"together {step.ops}: requests that got no answer: {errors or 'still running'}")
        deleted = False
        told = []
        for index, op in enumerate(step.ops):
            allowed = {
                "patch": {204, 409, 410, 423, 404, 460},
                "head": {200, 404, 410, 423},
                "delete": {204, 404},
                "bob_patch": {404},
                "bob_head": {404},
            }.get(op, set())
            answer = self.expect(f"together {step.ops}: {op}", results.get(index), allowed)
            deleted |= op == "delete" and answer.status == 204
            if answer is not None and answer.status == 204 and op == "patch":
                told.append(int(answer.headers["Upload-Offset"]))
                if told[-1] != offset + length:
                    self.fail(f"together: a PATCH of {length} bytes at {offset} answered 204 with {told[-1]}")
            if answer is not None and answer.status == 200 and op == "head":
                seen = int(answer.headers["Upload-Offset"])
                if not offset <= seen <= offset + length and status_before == "uploading":
                    self.fail(f"together: HEAD told {seen}, the PATCHes at {offset} carried {length} bytes")
        self.settling = True
        if status_before == "uploading":
            # At most one PATCH's body lands at this offset: a second one finds the offset moved (409).
            self.high = max(self.high, min(self.size, offset + CHUNK))
        if deleted:
            # A 204 DELETE means the bytes are gone, whatever raced it.
            assert_nothing_stored(self.target, key, self.upload_id)
            return
        status = self.status()
        if status == "complete":
            self.low = self.high = self.size
        elif status == "uploading":
            answer = self.head()
            if answer.status == 200 and any(value > self.low for value in told):
                self.fail(f"PATCHes answered 204 with {told}, then HEAD told {self.low}")

    def run(self, step) -> None:
        match step:
            case Patch():
                self.patch(step)
            case Head():
                self.head(step)
            case Delete():
                self.delete(step)
            case Options():
                self.options(step)
            case Create():
                self.create(step)
            case Together():
                self.together(step)

    def finish(self) -> None:
        """Send the rest from the server's offset until the upload is complete (or failed, or was deleted)."""
        deadline = time.monotonic() + 60
        while self.status() == "uploading":
            if time.monotonic() > deadline:
                self.fail("the upload could not be finished in 60 s")
            answer = self.head()
            if answer.status != 200:
                time.sleep(0.2)
                continue
            offset = self.low
            headers = {"Tus-Resumable": TUS_VERSION, "Content-Type": OCTETS, "Upload-Offset": str(offset)}
            payload = self.stream[offset : self.size]
            answer = send_patch(self.target, self.target.alice, self.upload_id, headers, payload, body="whole")
            allowed = {204} if self.declared_ok else {460}
            self.expect(f"finishing PATCH at {offset}", answer, allowed | {423})
            self.after_patch(answer, offset, len(payload), len(payload), "whole")
        TALLY.check("an upload stays resumable after every refusal and cut")
        if self.status() == "complete":
            # A PATCH after the end is told the whole length; a HEAD tells it too.
            headers = {"Tus-Resumable": TUS_VERSION, "Content-Type": OCTETS, "Upload-Offset": str(self.size)}
            late = send_patch(self.target, self.target.alice, self.upload_id, headers, b"late", body="whole")
            self.expect("PATCH after completion", late, {409})
            if late.headers.get("Upload-Offset") != str(self.size):
                self.fail(f"PATCH after completion told {late.headers.get('Upload-Offset')}")
            self.head()


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
    size=st.one_of(st.sampled_from([1, CHUNK - 1, CHUNK, CHUNK + 1, WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW]),
                   st.integers(1, 3 * WINDOW)),
    declared=st.sampled_from(["none", "right", "wrong"]),
    seed=st.integers(0, 2**32 - 1),
    program=st.lists(steps, min_size=1, max_size=8),
)  # fmt: skip
@example(size=WINDOW + 1, declared="right", seed=1, program=[Patch(length=WINDOW, body="cut", wait=False), Patch()])
@example(size=2 * WINDOW, declared="none", seed=4, program=[Patch(length=WINDOW + 1, body="cut", cut=0.7), Patch()])
@example(size=CHUNK, declared="wrong", seed=2, program=[Together(("patch", "delete", "bob_patch")), Head()])
@example(size=2 * WINDOW, declared="none", seed=3, program=[Patch(length="past", body="chunked"), Patch(offset="abc")])
def test_generated_tus_sequences_keep_every_invariant(target, size, declared, seed, program):
    TALLY.case("tus request sequences")
    case = Case(target)
    stream = random.Random(seed).randbytes(size + PAST_THE_END)
    fields = {"filename": f"fuzz-{seed}.bin"}
    if declared != "none":
        fields["sha256"] = hashlib.sha256(stream[:size] if declared == "right" else b"another file").hexdigest()
    metadata = ",".join(f"{key} {b64(value)}" for key, value in fields.items())
    created = case.tus("POST", "/api/tus/", headers={"Upload-Length": str(size), "Upload-Metadata": metadata})
    assert created.status == 201, (created.status, created.body[:300])
    upload_id = created.headers["Location"].rsplit("/", 1)[1]
    client = TusFuzzClient(target, case, upload_id, stream, size, declared_ok=declared != "wrong")
    try:
        for step in program:
            client.history.append(repr(step))
            client.run(step)
        client.finish()
    finally:
        log.info("upload %s: %s", upload_id, client.history)
    ended = client.status()
    assert ended in ({"complete"} if declared != "wrong" else {"failed"}) | {"cancelled", "gone"}, client.history
    check_case(case, [Sent(upload_id, stream[:size]), *client.extra])
