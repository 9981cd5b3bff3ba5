"""Filename attacks through a live server, over the JSON API and over tus: a name is only ever shown, never a path.

tests/test_filenames.py proves, unit by unit, what uploads.filenames makes of
a name. This is the end-to-end version against a real server (``manage.py
serve``): each hostile name — traversal with either separator, NUL, Windows
device names, a right-to-left override, 10,000 characters, double
extensions, leading dots and spaces, a bare ``/``, CR/LF, quotes and
semicolons that would break a header, control characters, long UTF-8,
emoji, a lone surrogate — is sent as ``filename`` to ``POST /api/uploads/``
(then the bytes over the WebSocket) and as the tus ``Upload-Metadata``
filename (then a PATCH). hypothesis adds names built from the same
fragments and from any text.

It proves, for each:

* the name is accepted exactly when docs/api.md says (1 to 16,384
  characters, no surrogate); a refusal is a 400 whose JSON names the field;
* accepted, the bytes are stored only under the server's random storage
  key in the storage's ``files/``: the whole storage folder and the
  server's work folder (on s3: the server's bucket prefix, its multipart
  uploads and the bucket's top level) are listed before and after, and the
  one new entry is ``files/<key>``; no path the name could point at (from
  the storage folder, the server's work folder or its working directory)
  appeared or changed;
* the display name (API and tus HEAD) has no path separator, control,
  format (bidi) or surrogate character; the download's
  ``Content-Disposition`` has no CR/LF, an ASCII ``filename`` fallback
  without separators, quotes or bidi characters, and an RFC 6266
  ``filename*=UTF-8''…`` that decodes to the display name;
* the downloaded bytes are the bytes sent, and the shared invariants
  (tests/faults/invariants.py) hold after every case.
"""

import asyncio
import base64
import hashlib
import http.client
import json
import logging
import os
import random
import re
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.conftest import scaled
from tests.faults.invariants import (
    OCTETS,
    Case,
    Sent,
    Target,
    check_case,
    live_target,
    metadata_value,
    unsafe_characters,
    walk,
)
from tests.faults.tally import TALLY
from tests.support import seaweedfs
from tests.support.live_server import ROOT
from tests.test_live_server import receive, stream, ws_connect

log = logging.getLogger(__name__)

MAX_FILENAME_CHARS = 16_384  # docs/api.md, POST /api/uploads/
SIZE = 3000
STORAGE_KEY = re.compile(r"[0-9a-f]{32}\Z")
# RFC 6266 with RFC 5987's attr-char for filename*; the fallback is a quoted-string of plain ASCII.
DISPOSITION = re.compile(
    r"attachment; filename=\"(?P<fallback>[^\"\\\r\n]*)\"; filename\*=UTF-8''(?P<star>[A-Za-z0-9!#$&+\-.^_`|~%]+)\Z"
)

ATTACKS = {
    "dotdot-slash": "../../etc/passwd",
    "dotdot-backslash": "..\\..\\win.ini",
    "deep-dotdot": "../" * 40 + "tmp/ddx-escaped.txt",
    "absolute": "/etc/shadow",
    "windows-path": "C:\\Windows\\system32\\cmd.exe",
    "unc-path": "\\\\server\\share\\payload.exe",
    "percent-encoded-dotdot": "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "nul": "report\x00.pdf",
    "nul-then-path": "safe.txt\x00/../../etc/passwd",
    "con": "CON",
    "con-txt": "con.txt",
    "nul-device": "NUL",
    "com1-double-extension": "COM1.tar.gz",
    "right-to-left-override": "invoice\u202efdp.exe",
    "bidi-isolates": "\u2066evil\u2069.txt",
    "zero-width": "pay\u200bment\u200d.exe",
    "10000-characters": "a" * 10_000,
    "16384-characters": "b" * MAX_FILENAME_CHARS,
    "16385-characters": "c" * (MAX_FILENAME_CHARS + 1),
    "dot-jpg-php": ".jpg.php",
    "photo-jpg-php": "photo.jpg.php",
    "leading-dots-and-spaces": " . .. .hidden.txt",
    "trailing-dots-and-spaces": "name.txt. . ",
    "slash": "/",
    "dotdot": "..",
    "crlf-header-injection": "evil\r\nContent-Type: text/html\r\n\r\n<script>.txt",
    "quote": 'my "quoted" file.txt',
    "quote-semicolon": 'a.txt"; filename="evil.exe',
    "semicolon-filename-star": "x.txt; filename*=UTF-8''evil.exe",
    "control-characters": "\x01\x07\x08\x1b[31mred\x7f\x85.txt",
    "long-utf8": "\u6587\u4ef6\u540d" * 1000,
    "emoji": "\U0001f600\U0001f389 party \U0001f468\u200d\U0001f469\u200d\U0001f467.txt",
    "blank": "   ",
    "empty": "",
    "lone-surrogate": "\ud800.txt",
}
# Over tus only as far as one header carries them: test_a_long_utf8_filename_within_the_documented_limit… has the rest.
TUS_TOO_LONG = {("16384-characters", "tus"), ("16385-characters", "tus")}


def accepted(name: str) -> bool:
    """docs/api.md: a string of 1 to 16,384 characters; surrogates refused (no database stores them)."""
    return 1 <= len(name) <= MAX_FILENAME_CHARS and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in name)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with live_target(tmp_path_factory, "fuzz_names") as live:
        # A plain name first, over each transport: what the server makes once for itself (the s3 backend's spool
        # folder of its process) is there before any attack, so only what an attack stores is new.
        for transport in ("api", "tus"):
            case, data = Case(live), random.randbytes(SIZE)
            answer, created = upload(case, "plain.txt", data, transport)
            assert answer.status == 201, (answer.status, answer.body[:300])
            check_case(case, [Sent(created["id"], data)])
        yield live


# --- where bytes could go ------------------------------------------------------------------------------


def storage_listing(target: Target) -> set[str]:
    """Every entry the server could have stored: its work folder (storage and spool included) and, on s3, every
    object and multipart upload under its prefix and the bucket's top level."""
    entries = {f"work:{path}" for path in walk(target.server.workdir)}
    entries |= {f"storage:{path}" for path in walk(target.server.storage)}
    if target.s3:
        env = target.server.env
        client, bucket = seaweedfs.s3_client(env["DIRECTDRIVEX_S3_ENDPOINT_URL"]), env["DIRECTDRIVEX_S3_BUCKET"]
        prefix = env["DIRECTDRIVEX_S3_PREFIX"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            entries |= {f"s3:{item['Key'].removeprefix(prefix)}" for item in page.get("Contents", [])}
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
        entries |= {f"s3-multipart:{item['Key'].removeprefix(prefix)}" for item in uploads}
        top = client.list_objects_v2(Bucket=bucket, Delimiter="/")
        entries |= {f"s3-top:{item['Prefix']}" for item in top.get("CommonPrefixes", [])}
        entries |= {f"s3-top:{item['Key']}" for item in top.get("Contents", [])}
    return entries


def pointed_at(target: Target, name: str) -> dict[str, tuple | None]:
    """What is at every path the name could point to, taken as a path from each folder a server might join it to."""
    if "\x00" in name or any(0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        return {}  # no file system path holds these
    found = {}
    # The folders the server writes into by design (and those above them, whose entries change with them):
    # an empty name, ".", or ".." lands there, and their times move with every upload. Any other path must not.
    layout = [os.path.normpath(target.server.storage / area) for area in ("", "files", "partial")]
    for base in (target.server.storage, target.server.storage / "files", target.server.storage / "partial",
                 target.server.workdir, ROOT):  # fmt: skip
        for form in (name, name.replace("\\", "/")):
            path = os.path.normpath(os.path.join(base, form))
            if any(folder == path or folder.startswith(path.rstrip(os.sep) + os.sep) for folder in layout):
                continue
            try:
                info = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                found[path] = None
            except OSError:  # a name too long for the file system: nothing can be there
                continue
            else:
                found[path] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return found


# --- the two ways in -----------------------------------------------------------------------------------------


def create_over_api(case: Case, name: str, data: bytes):
    body = json.dumps({"filename": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    answer = case.http("POST", "/api/uploads/", body=body.encode())
    return answer, (answer.json() if answer.status == 201 else None)


async def send_over_websocket(case: Case, created: dict, data: bytes) -> dict:
    async with ws_connect(case.target.server, created["ws_url"]) as ws:
        ready = await receive(ws)
        assert ready["type"] == "ready", ready
        done = await stream(ws, data, ready["offset"], chunk=ready["chunk_size"], window=ready["window"])
        await asyncio.wait_for(ws.wait_closed(), 20)
    case.closed("the upload's WebSocket", ws.close_code)
    assert ws.close_code == 1000, ws.close_code
    return done


def create_over_tus(case: Case, name: str, data: bytes):
    encoded = base64.b64encode(name.encode("utf-8", "surrogatepass")).decode()
    sha256 = base64.b64encode(hashlib.sha256(data).hexdigest().encode()).decode()
    headers = {"Upload-Length": str(len(data)), "Upload-Metadata": f"filename {encoded},sha256 {sha256}"}
    answer = case.tus("POST", "/api/tus/", headers=headers)
    created = None
    if answer.status == 201:
        created = {"id": answer.headers["Location"].rsplit("/", 1)[1]}
    return answer, created


def send_over_tus(case: Case, created: dict, data: bytes) -> None:
    headers = {"Upload-Offset": "0", "Content-Type": OCTETS}
    answer = case.tus("PATCH", f"/api/tus/{created['id']}", headers=headers, body=data)
    assert (answer.status, answer.headers.get("Upload-Offset")) == (204, str(len(data))), answer.body[:300]


def upload(case: Case, name: str, data: bytes, transport: str):
    """Create the upload over ``transport`` and, if it is accepted, send its bytes: (creation answer, created)."""
    if transport == "api":
        answer, created = create_over_api(case, name, data)
        if created is not None:
            done = asyncio.run(send_over_websocket(case, created, data))
            assert done["sha256"] == hashlib.sha256(data).hexdigest(), done
    else:
        answer, created = create_over_tus(case, name, data)
        if created is not None:
            send_over_tus(case, created, data)
    return answer, created


# --- the attack ----------------------------------------------------------------------------------------------


def attack(target: Target, name: str, transport: str, kind: str) -> None:
    """One name over one transport, judged as the module docstring says."""
    TALLY.case(kind)
    case = Case(target)
    data = random.randbytes(SIZE)
    before, aimed = storage_listing(target), pointed_at(target, name)
    answer, created = upload(case, name, data, transport)
    if not accepted(name):
        assert answer.status == 400, (answer.status, answer.body[:300])
        refusal = answer.json()
        assert refusal["code"] == "invalid", refusal
        assert "filename" in refusal.get("errors", {}) or "filename" in refusal["detail"], refusal
        assert storage_listing(target) == before, "a refused upload stored something"
        TALLY.check("a refused filename is a 400 naming the field, and stores nothing")
        check_case(case, [])
        return
    assert answer.status == 201, (answer.status, answer.body[:300])
    upload_id = created["id"]
    key = target.db.upload(upload_id)["storage_key"]

    assert STORAGE_KEY.match(key), key
    new = storage_listing(target) - before
    expected = {f"s3:files/{key}"} if target.s3 else {f"storage:files/{key}", f"work:storage/files/{key}"}
    assert new == expected, f"stored entries that appeared for {name[:80]!r}: {sorted(new)}"
    assert pointed_at(target, name) == aimed, "a path the name points at changed"
    TALLY.check("an attacked upload is stored only under a server-made key")

    shown = case.http("GET", f"/api/uploads/{upload_id}/").json()["filename"]
    assert_display_name_safe(shown)
    head = case.tus("HEAD", f"/api/tus/{upload_id}")
    assert metadata_value(head.headers["Upload-Metadata"], "filename") == shown, head.headers["Upload-Metadata"]
    content = case.http("GET", f"/api/uploads/{upload_id}/content")
    assert content.status == 200 and content.body == data, (content.status, len(content.body))
    assert_disposition_safe(content.headers.get_all("Content-Disposition"), shown)
    TALLY.check("a display name and its Content-Disposition are safe")
    check_case(case, [Sent(upload_id, data)], released={upload_id})


def assert_display_name_safe(shown: str) -> None:
    assert shown and len(shown) <= 255, shown
    assert unsafe_characters(shown) == [], (shown, unsafe_characters(shown))
    assert shown not in (".", "..") and not shown.startswith("."), shown


def assert_disposition_safe(values: list[str] | None, shown: str) -> None:
    assert values is not None and len(values) == 1, values
    value = values[0]
    assert "\r" not in value and "\n" not in value, value
    parts = DISPOSITION.match(value)
    assert parts, f"not attachment; filename=\"…\"; filename*=UTF-8''…: {value!r}"
    fallback = parts["fallback"]
    assert fallback and all(0x20 <= ord(ch) <= 0x7E for ch in fallback), fallback
    assert not set(fallback) & set('/\\"'), fallback
    assert unquote(parts["star"], errors="strict") == shown, (parts["star"], shown)


# --- the tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attack_name", "transport"),
    [(name, transport) for name in ATTACKS for transport in ("api", "tus") if (name, transport) not in TUS_TOO_LONG],
)
def test_a_hostile_filename_is_refused_or_only_shown_never_used_as_a_path(target, attack_name, transport):
    attack(target, ATTACKS[attack_name], transport, "filename attacks")


@pytest.mark.parametrize("characters", [6_100, 8_000])
def test_a_long_utf8_filename_within_the_documented_limit_is_answered_over_tus(target, characters):
    """Found by this suite: a name docs/api.md allows (1 to 16,384 characters) that tus could not carry.

    6,100 (8,000) Cyrillic letters are 12,200 (16,000) bytes of UTF-8, 16,277
    (21,345) characters of base64 in Upload-Metadata. Twisted, under Daphne,
    took at most 16,384 bytes of request line and headers
    (``HTTPChannel.totalHeadersSize``) and lines of at most 16,384 bytes
    (``LineReceiver.MAX_LENGTH``): past the first it answered a bare ``400``
    (no JSON body, no Tus-Resumable), past the second it closed without
    answering, before the tus consumer saw the request. directdrivex/server.py
    now takes headers of up to MAX_HEADER_BYTES (128 KiB: the longest name's
    base64 and the rest). The contract: every answer under /api/ is JSON with
    a code, every tus answer carries Tus-Resumable, and the same name is
    accepted by POST /api/uploads/.
    """
    case = Case(target)
    name = "\u0436" * characters
    data = random.randbytes(SIZE)
    TALLY.case("filename attacks")
    answer = created = gone = None
    try:
        answer, created = create_over_tus(case, name, data)
    except (http.client.RemoteDisconnected, ConnectionResetError) as error:
        gone = error
    assert gone is None, f"POST /api/tus/ with a {characters}-character filename: closed without an answer ({gone!r})"
    assert answer.headers.get("Tus-Resumable") == "1.0.0", (answer.status, dict(answer.headers), answer.body[:300])
    if answer.status != 201:
        assert answer.status == 400 and "filename" in answer.json().get("errors", {}), (answer.status, answer.body)
    check_case(case, [Sent(created["id"], data)] if created else [])


FRAGMENTS = ["..", "/", "\\", "\x00", "\u202e", "\u200b", "CON", "nul", ".", " ", "\r\n", '"', ";", "%2f", "\U0001f600",
             "\u6587", "a", ".php", "*", "?", ":", "|", "<", ">", "\x7f", "\ufeff", "\u0301"]  # fmt: skip
hostile_names = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12).map("".join),
    st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=200),
    st.text(min_size=0, max_size=3).map(lambda tail: "\ud800" + tail),
)


@settings(
    max_examples=scaled(4, 200),
    deadline=None,
    database=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(name=hostile_names, transport=st.sampled_from(["api", "tus"]))
def test_a_generated_filename_is_refused_or_only_shown_never_used_as_a_path(target, name, transport):
    log.info("name %r over %s", name, transport)
    attack(target, name, transport, "filename attacks (generated)")
