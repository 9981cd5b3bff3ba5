"""GET / HEAD /api/uploads/<id>/content in process, through Django's ASGI handler: bytes, Range, conditionals, slots.

Requests go through ``ASGIHandler`` as Daphne would call it (scope, receive,
send), so the streamed body, the client's disconnect and the slot's release
in the body's ``finally`` are Django's real code paths. Finished uploads are
made through the services (upload_create, writer_admit, storage, writer_complete).
Every test commits (transactional): the body's database calls run in threads
of their own.
"""

import asyncio
import dataclasses
import hashlib
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from asgiref.sync import async_to_sync
from django.core.handlers.asgi import ASGIHandler
from rest_framework.authtoken.models import Token

from tests.conftest import finish_upload
from uploads import downloads, storage
from uploads.models import Slot
from uploads.ranges import http_date
from uploads.services.slots import slot_admit, slots_reset
from uploads.services.uploads import upload_create
from uploads.storage import local

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024 * 1024
DATA = os.urandom(3 * MiB + 12345)
SHA = hashlib.sha256(DATA).hexdigest()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    more_body_messages: int = 0
    extra: dict = field(default_factory=dict)

    def json(self):
        return json.loads(self.body)


async def _asgi_call(method: str, path: str, headers: dict[str, str], disconnect_after_bytes: int | None) -> Answer:
    handler = ASGIHandler()
    gone = asyncio.Event()
    request_sent = False

    async def receive():
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    answer = Answer(0, {}, b"")
    body = bytearray()

    async def send(message):
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = {name.decode().lower(): value.decode("latin-1") for name, value in message["headers"]}
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            if message.get("more_body"):
                answer.more_body_messages += 1
            if disconnect_after_bytes is not None and len(body) >= disconnect_after_bytes:
                gone.set()
                # A gone client's socket takes nothing more: wait to be cancelled.
                await asyncio.sleep(3600)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *((k.lower().encode(), v.encode()) for k, v in headers.items())],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    await asyncio.wait_for(handler(scope, receive, send), 60)
    answer.body = bytes(body)
    return answer


def fetch(user, upload_id, method: str = "GET", *, suffix: str = "", disconnect_after_bytes=None, **headers) -> Answer:
    """One request to the content URL of ``upload_id``, as ``user`` (token auth; None: anonymous)."""
    sent = {name.replace("_", "-"): value for name, value in headers.items()}
    if user is not None:
        token, _created = Token.objects.get_or_create(user=user)
        sent["Authorization"] = f"Token {token.key}"
    path = f"/api/uploads/{upload_id}/content{suffix}"
    return async_to_sync(_asgi_call)(method, path, sent, disconnect_after_bytes)


@pytest.fixture
def finished(alice):
    return finish_upload(alice, DATA, filename="data.bin", sha256=SHA)


def download_slots():
    return list(Slot.objects.filter(kind=Slot.Kind.DOWNLOAD).order_by("pk"))


def assert_refused(answer: Answer, status: int, code: str) -> dict:
    assert answer.status == status, answer.body[:500]
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["code"] == code
    assert body["detail"]
    return body


# --- the whole file --------------------------------------------------------------


def test_get_streams_the_whole_file_with_its_headers(alice, finished):
    answer = fetch(alice, finished.pk)

    assert answer.status == 200
    assert answer.body == DATA
    assert answer.headers["content-length"] == str(len(DATA))
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["content-disposition"] == "attachment; filename=\"data.bin\"; filename*=UTF-8''data.bin"
    assert answer.headers["accept-ranges"] == "bytes"
    assert answer.headers["etag"] == f'"{SHA}"'
    assert answer.headers["last-modified"] == http_date(finished.completed_at)
    assert answer.headers["cache-control"] == "private"
    assert "content-range" not in answer.headers


def test_the_body_streams_in_bounded_blocks(alice, finished):
    answer = fetch(alice, finished.pk)

    # Django splits each 1 MiB block into 64 KiB ASGI messages: many messages, never one holding the file.
    assert answer.more_body_messages >= len(DATA) // (64 * 1024)


def test_a_finished_download_held_a_slot_and_released_it_as_completed(alice, finished):
    fetch(alice, finished.pk)

    [slot] = download_slots()
    assert slot.user == alice
    assert slot.upload_id == finished.pk
    assert slot.released_at is not None
    assert slot.release_reason == Slot.ReleaseReason.COMPLETED


def test_a_file_uploaded_without_a_sha256_gets_a_strong_etag_of_its_own(alice):
    upload = finish_upload(alice, b"no digest declared")

    answer = fetch(alice, upload.pk)

    assert answer.status == 200
    assert answer.body == b"no digest declared"
    assert answer.headers["etag"] == f'"{upload.storage_key}"'


def test_any_accept_header_gets_the_bytes(alice, finished):
    answer = fetch(alice, finished.pk, Accept="application/octet-stream")

    assert answer.status == 200
    assert answer.body == DATA


# --- Range -----------------------------------------------------------------------


def test_bytes_0_0_is_206_with_the_first_byte(alice, finished):
    answer = fetch(alice, finished.pk, Range="bytes=0-0")

    assert answer.status == 206
    assert answer.body == DATA[:1]
    assert answer.headers["content-range"] == f"bytes 0-0/{len(DATA)}"
    assert answer.headers["content-length"] == "1"


def test_a_suffix_range_is_206_with_the_last_bytes(alice, finished):
    answer = fetch(alice, finished.pk, Range="bytes=-1000")

    assert answer.status == 206
    assert answer.body == DATA[-1000:]
    assert answer.headers["content-range"] == f"bytes {len(DATA) - 1000}-{len(DATA) - 1}/{len(DATA)}"


def test_an_open_ended_range_is_206_with_the_rest_of_the_file(alice, finished):
    start = 2 * MiB + 7
    answer = fetch(alice, finished.pk, Range=f"bytes={start}-")

    assert answer.status == 206
    assert answer.body == DATA[start:]
    assert answer.headers["content-length"] == str(len(DATA) - start)
    assert answer.headers["content-range"] == f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"


def test_a_range_past_the_end_is_416_with_the_file_length_and_takes_no_slot(alice, finished):
    answer = fetch(alice, finished.pk, Range=f"bytes={len(DATA)}-")

    assert_refused(answer, 416, "range_not_satisfiable")
    assert answer.headers["content-range"] == f"bytes */{len(DATA)}"
    assert download_slots() == []


def test_several_ranges_are_answered_with_the_whole_file(alice, finished):
    answer = fetch(alice, finished.pk, Range="bytes=0-0,10-20")

    assert answer.status == 200
    assert answer.body == DATA
    assert "content-range" not in answer.headers


def test_if_range_with_the_current_etag_honours_the_range(alice, finished):
    answer = fetch(alice, finished.pk, Range="bytes=0-9", If_Range=f'"{SHA}"')

    assert answer.status == 206
    assert answer.body == DATA[:10]


def test_if_range_with_the_last_modified_date_honours_the_range(alice, finished):
    answer = fetch(alice, finished.pk, Range="bytes=0-9", If_Range=http_date(finished.completed_at))

    assert answer.status == 206
    assert answer.body == DATA[:10]


def test_if_range_with_a_stale_etag_gets_the_whole_file(alice, finished):
    answer = fetch(alice, finished.pk, Range="bytes=0-9", If_Range='"' + "0" * 64 + '"')

    assert answer.status == 200
    assert answer.body == DATA


# --- conditionals and HEAD ------------------------------------------------------------


def test_if_none_match_with_the_etag_is_304_without_a_body_or_a_slot(alice, finished):
    answer = fetch(alice, finished.pk, If_None_Match=f'"{SHA}"')

    assert answer.status == 304
    assert answer.body == b""
    assert answer.headers["etag"] == f'"{SHA}"'
    assert answer.headers["last-modified"] == http_date(finished.completed_at)
    assert download_slots() == []


def test_if_none_match_with_another_etag_gets_the_file(alice, finished):
    answer = fetch(alice, finished.pk, If_None_Match='"something-else"')

    assert answer.status == 200
    assert answer.body == DATA


def test_head_answers_the_same_headers_without_a_body_or_a_slot(alice, finished):
    # The same request id on both: the answer echoes it (X-Request-ID), and all else must be equal too.
    get = fetch(alice, finished.pk, X_Request_ID="head-vs-get")
    Slot.objects.filter(kind=Slot.Kind.DOWNLOAD).delete()

    head = fetch(alice, finished.pk, "HEAD", X_Request_ID="head-vs-get")

    assert head.status == 200
    assert head.body == b""
    assert head.headers == get.headers
    assert download_slots() == []


def test_head_with_a_range_answers_its_206_headers(alice, finished):
    head = fetch(alice, finished.pk, "HEAD", Range="bytes=-10")

    assert head.status == 206
    assert head.body == b""
    assert head.headers["content-length"] == "10"
    assert head.headers["content-range"] == f"bytes {len(DATA) - 10}-{len(DATA) - 1}/{len(DATA)}"


def test_a_non_ascii_filename_gets_an_ascii_fallback_and_the_exact_name(alice):
    upload = finish_upload(alice, b"bonjour", filename='Résumé "final" — 東京.txt')

    answer = fetch(alice, upload.pk)

    assert answer.status == 200
    assert answer.headers["content-disposition"] == (
        'attachment; filename="Resume _final_ _ __.txt"; '
        "filename*=UTF-8''R%C3%A9sum%C3%A9%20%22final%22%20%E2%80%94%20%E6%9D%B1%E4%BA%AC.txt"
    )


def test_content_disposition_keeps_rfc_5987_attr_chars_unescaped():
    assert downloads.content_disposition("a!#$&+^`|~b.bin") == (
        "attachment; filename=\"a!#$&+^`|~b.bin\"; filename*=UTF-8''a!#$&+^`|~b.bin"
    )
    assert downloads.content_disposition("東京") == "attachment; filename=\"__\"; filename*=UTF-8''%E6%9D%B1%E4%BA%AC"


# --- refusals --------------------------------------------------------------------------


def test_another_users_file_is_404(bob, finished):
    assert_refused(fetch(bob, finished.pk), 404, "not_found")
    assert_refused(fetch(bob, finished.pk, "HEAD"), 404, "not_found")
    assert download_slots() == []


def test_an_unknown_upload_is_404(alice):
    assert_refused(fetch(alice, "0b8c5a0e-0000-4000-8000-000000000000"), 404, "not_found")
    assert_refused(fetch(alice, "not-a-uuid"), 404, "not_found")


def test_an_unfinished_upload_is_409_not_complete(alice):
    upload, _slot = upload_create(alice, filename="half.bin", size=100)

    assert_refused(fetch(alice, upload.pk), 409, "not_complete")
    assert download_slots() == []


def test_no_credentials_is_401(finished):
    assert_refused(fetch(None, finished.pk), 401, "unauthenticated")


def test_the_content_path_with_a_trailing_slash_is_a_json_404(alice, finished):
    assert_refused(fetch(alice, finished.pk, suffix="/"), 404, "not_found")


def test_no_free_download_slot_is_429_with_retry_after(alice, bob, finished, limits):
    limits(global_download_slots=1)
    slot_admit(Slot.Kind.DOWNLOAD, bob)

    answer = fetch(alice, finished.pk)

    body = assert_refused(answer, 429, "download_slots_exhausted")
    assert int(answer.headers["retry-after"]) >= 1
    assert body["retry_after"] == int(answer.headers["retry-after"])
    assert Slot.objects.active().filter(kind=Slot.Kind.DOWNLOAD, user=alice).count() == 0


def test_head_needs_no_free_download_slot(alice, bob, finished, limits):
    limits(global_download_slots=1)
    slot_admit(Slot.Kind.DOWNLOAD, bob)

    assert fetch(alice, finished.pk, "HEAD").status == 200


def test_a_complete_upload_whose_file_is_missing_is_a_500_and_takes_no_slot(alice, finished):
    assert storage.backend().delete(finished.storage_key)

    assert_refused(fetch(alice, finished.pk), 500, "internal_error")
    assert download_slots() == []


@pytest.mark.local_storage
def test_a_symlink_planted_at_a_finished_path_is_never_followed(alice, finished, tmp_path):
    # Before, the download opened the link and served its target: any file the server could read.
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for download " * 100)
    path = local.final_path(finished.storage_key)
    path.unlink()
    path.symlink_to(secret)

    answer = fetch(alice, finished.pk)

    assert_refused(answer, 500, "internal_error")
    assert b"not for download" not in answer.body
    assert download_slots() == []


# --- the slot while streaming -----------------------------------------------------------


def test_a_client_that_goes_away_mid_stream_frees_its_slot(alice, finished):
    answer = fetch(alice, finished.pk, disconnect_after_bytes=64 * 1024)

    assert answer.status == 200
    assert len(answer.body) < len(DATA)
    [slot] = download_slots()
    assert slot.released_at is not None
    assert slot.release_reason == Slot.ReleaseReason.DISCONNECTED


def test_a_download_whose_slot_is_reset_stops_short(alice, finished, monkeypatch):
    # Renew after every block, and reset the slot as the first block goes out.
    monkeypatch.setattr(downloads, "renew_interval", lambda: 0)
    blocks = downloads._body

    async def reset_after_first_block(*args, **kwargs):
        first = True
        async for block in blocks(*args, **kwargs):
            yield block
            if first:
                first = False
                await asyncio.to_thread(slots_reset, everything=True)

    monkeypatch.setattr(downloads, "_body", reset_after_first_block)

    answer = fetch(alice, finished.pk)

    assert answer.status == 200
    assert len(answer.body) < len(DATA)
    assert answer.body == DATA[: len(answer.body)]
    [slot] = download_slots()
    assert slot.release_reason == Slot.ReleaseReason.RESET


# --- X-Accel-Redirect -------------------------------------------------------------------


@pytest.mark.local_storage
def test_with_accel_redirect_nginx_is_told_where_the_file_is_and_no_body_is_sent(alice, finished, settings):
    settings.DIRECTDRIVEX_ACCEL_REDIRECT = "/_protected/"

    answer = fetch(alice, finished.pk, Range="bytes=0-0")

    assert answer.status == 200
    assert answer.body == b""
    assert answer.headers["x-accel-redirect"] == f"/_protected/{finished.storage_key}"
    assert (local.root() / "files" / finished.storage_key).is_file()
    assert answer.headers["content-disposition"] == "attachment; filename=\"data.bin\"; filename*=UTF-8''data.bin"
    assert answer.headers["etag"] == f'"{SHA}"'
    assert answer.headers["accept-ranges"] == "bytes"
    assert answer.headers["cache-control"] == "private"
    # nginx computes the length (and the range) of what it sends.
    assert answer.headers["content-length"] == "0"
    assert "content-range" not in answer.headers
    assert Slot.objects.active().filter(kind=Slot.Kind.DOWNLOAD).count() == 0


def test_with_accel_redirect_the_refusals_are_the_same(alice, bob, finished, settings, limits):
    settings.DIRECTDRIVEX_ACCEL_REDIRECT = "/_protected/"
    unfinished, _slot = upload_create(alice, filename="half.bin", size=100)

    assert_refused(fetch(bob, finished.pk), 404, "not_found")
    assert_refused(fetch(alice, unfinished.pk), 409, "not_complete")
    assert fetch(alice, finished.pk, If_None_Match=f'"{SHA}"').status == 304
    limits(global_download_slots=1)
    slot_admit(Slot.Kind.DOWNLOAD, bob)
    assert_refused(fetch(alice, finished.pk), 429, "download_slots_exhausted")


# --- X-Accel-Redirect on s3: nginx proxies a presigned GET of the range the server decided -----------


def accel_target(answer: Answer, s3) -> tuple[list[str], str]:
    """The redirect's segments before the object's path, and the presigned URL on the store."""
    redirect = answer.headers["x-accel-redirect"]
    assert redirect.startswith("/_protected/s3/"), redirect
    path, _, query = redirect.removeprefix("/_protected/s3/").partition("?")
    before, marker, rest = path.partition(f"/{s3.bucket}/")
    return before.split("/"), f"{s3.endpoint}/{marker.strip('/')}/{rest}?{query}"


def test_on_s3_accel_redirect_names_a_presigned_get_and_the_servers_validators(alice, s3_storage, settings):
    upload = finish_upload(alice, DATA, filename="data.bin", sha256=SHA)
    settings.DIRECTDRIVEX_ACCEL_REDIRECT = "/_protected/"

    answer = fetch(alice, upload.pk)

    assert (answer.status, answer.body, answer.headers["content-length"]) == (200, b"", "0")
    segments, url = accel_target(answer, s3_storage)
    assert segments == [quote(f'"{SHA}"', safe=""), quote(http_date(upload.completed_at), safe="")]
    assert urlsplit(url).path == f"/{s3_storage.bucket}/{s3_storage.prefix}files/{upload.storage_key}"
    # Short-lived: nginx uses it at once.
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["300"]
    # The bucket is private: the object only answers the signed URL.
    with urllib.request.urlopen(url, timeout=10) as signed:
        assert signed.read() == DATA
    unsigned = urllib.request.Request(url.partition("?")[0])
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(unsigned, timeout=10)
    assert refused.value.code == 403
    assert answer.headers["etag"] == f'"{SHA}"'
    assert answer.headers["content-disposition"] == "attachment; filename=\"data.bin\"; filename*=UTF-8''data.bin"
    assert Slot.objects.active().filter(kind=Slot.Kind.DOWNLOAD).count() == 0


def test_on_s3_accel_redirect_carries_the_range_the_server_decided(alice, s3_storage, settings):
    upload = finish_upload(alice, DATA, filename="data.bin", sha256=SHA)
    settings.DIRECTDRIVEX_ACCEL_REDIRECT = "/_protected/"

    ranged = fetch(alice, upload.pk, Range="bytes=10-19", If_Range=f'"{SHA}"')
    stale = fetch(alice, upload.pk, Range="bytes=10-19", If_Range='"0123"')
    several = fetch(alice, upload.pk, Range="bytes=0-0,5-9")
    past_the_end = fetch(alice, upload.pk, Range=f"bytes={len(DATA)}-")

    segments, url = accel_target(ranged, s3_storage)
    assert segments[0] == "bytes=10-19"
    assert "content-range" not in ranged.headers
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": segments[0]}), timeout=10) as part:
        assert (part.status, part.read()) == (206, DATA[10:20])
    # If-Range judged by the server (the store knows nothing of our ETag): no range, the whole file.
    assert len(accel_target(stale, s3_storage)[0]) == 2
    assert len(accel_target(several, s3_storage)[0]) == 2
    assert_refused(past_the_end, 416, "range_not_satisfiable")


# --- the s3 backend's reader: ranged GETs pinned to the object ------------------------------------


def test_the_s3_reader_fetches_what_a_small_range_needs_then_growing_windows(alice, s3_storage):
    upload = finish_upload(alice, DATA)
    reader = storage.backend().open_finished(upload.storage_key)
    gets = []

    class CountingClient:
        def get_object(self, **params):
            gets.append(params["Range"])
            return s3_storage.client.get_object(**params)

    reader.where = dataclasses.replace(reader.where, client=CountingClient())
    try:
        assert reader.read(5, 10) == DATA[5:15]
        assert reader.read(15, 1) == DATA[15:16]
        assert gets == ["bytes=5-14", "bytes=15-34"]
        whole = b"".join(reader.read(position, MiB) for position in range(0, len(DATA), MiB))
        assert whole == DATA
        assert reader.read(len(DATA), MiB) == b""
    finally:
        reader.close()
    assert gets[2:] == ["bytes=0-1048575", "bytes=1048576-3145727", f"bytes=3145728-{len(DATA) - 1}"]


def test_the_s3_reader_ends_with_file_gone_once_the_object_is_deleted_or_replaced(alice, s3_storage):
    upload = finish_upload(alice, DATA)
    deleted = storage.backend().open_finished(upload.storage_key)
    replaced_upload = finish_upload(alice, DATA)
    replaced = storage.backend().open_finished(replaced_upload.storage_key)
    try:
        assert deleted.read(0, MiB) == DATA[:MiB]
        assert replaced.read(0, MiB) == DATA[:MiB]
        storage.backend().delete(upload.storage_key)
        s3_storage.client.put_object(
            Bucket=s3_storage.bucket, Key=f"{s3_storage.prefix}files/{replaced_upload.storage_key}", Body=b"other"
        )
        with pytest.raises(storage.FileGone):
            deleted.read(3 * MiB, MiB)
        with pytest.raises(storage.FileGone):
            replaced.read(3 * MiB, MiB)
    finally:
        deleted.close()
        replaced.close()
