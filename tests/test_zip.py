"""GET /files/zip/?id=…: several finished files as one streamed ZIP, in process through Django's ASGI handler.

Streamed answers go through ``ASGIHandler`` as Daphne would call it (scope,
receive, send), so the body, the client's disconnect and the slot's release
are Django's real code paths; refusals, which are redirects with a message
(or a 429 page), go through Django's test client. Finished uploads are made
through the services (tests.conftest.finish_upload). Every test commits
(transactional): the body's database calls run in threads of their own.
"""

import asyncio
import hashlib
import io
import os
import re
import uuid
import zipfile
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.messages import get_messages
from django.core.handlers.asgi import ASGIHandler
from django.test import Client
from django.urls import reverse

from tests.conftest import finish_upload
from uploads import storage, zips
from uploads.models import Slot
from uploads.services.slots import slot_admit
from uploads.services.uploads import upload_create

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024 * 1024
SMALL = b"a few bytes\n"
LARGE = os.urandom(3 * MiB + 17)
OTHER = os.urandom(200_000)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    # Active download slots, counted as the first bytes of the body arrived.
    slots_while_streaming: int | None = None


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def zip_url(ids) -> str:
    return reverse("files-zip") + "?" + urlencode([("id", str(upload_id)) for upload_id in ids])


def active_download_slots() -> list[Slot]:
    return list(Slot.objects.active().filter(kind=Slot.Kind.DOWNLOAD))


def zip_slots() -> list[Slot]:
    return list(Slot.objects.filter(kind=Slot.Kind.DOWNLOAD).order_by("pk"))


async def _asgi_get(path: str, query: str, cookie: str, disconnect_after_bytes: int | None, on_first_bytes) -> Answer:
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
            if not body and message.get("body"):
                answer.slots_while_streaming = await asyncio.to_thread(lambda: len(active_download_slots()))
                if on_first_bytes is not None:
                    await asyncio.to_thread(on_first_bytes)
            body.extend(message.get("body", b""))
            if disconnect_after_bytes is not None and len(body) >= disconnect_after_bytes:
                gone.set()
                # A gone client's socket takes nothing more: wait to be cancelled.
                await asyncio.sleep(3600)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"cookie", cookie.encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    await asyncio.wait_for(handler(scope, receive, send), 60)
    answer.body = bytes(body)
    return answer


def zip_get(user, ids, *, disconnect_after_bytes=None, on_first_bytes=None) -> Answer:
    """GET the ZIP of ``ids`` as ``user``, signed in with a session cookie, through the ASGI handler."""
    client = signed_in(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    path, _, query = zip_url(ids).partition("?")
    return async_to_sync(_asgi_get)(path, query, cookie, disconnect_after_bytes, on_first_bytes)


def members(body: bytes) -> dict[str, str]:
    """Each member's name and sha256, read back with the standard library (which checks each CRC)."""
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert archive.testzip() is None
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_STORED}
        return {info.filename: hashlib.sha256(archive.read(info)).hexdigest() for info in archive.infolist()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_stored_files(storage_dir) -> int:
    """Descriptors of this process open on files of the storage folder (the local backend's readers)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        count += target.startswith(str(storage_dir))
    return count


def refusal(response) -> str:
    """The one message a refused ZIP leaves for My files, checking it is a 303 there."""
    assert response.status_code == 303, response.content[:300]
    assert response["Location"] == reverse("files")
    [message] = get_messages(response.wsgi_request)
    assert message.level_tag == "error"
    return message.message


@pytest.fixture
def three(alice):
    """A small file, a few MiB of random bytes, and another file of the same name as the first."""
    return [
        finish_upload(alice, SMALL, filename="notes.txt"),
        finish_upload(alice, LARGE, filename="data.bin"),
        finish_upload(alice, OTHER, filename="notes.txt"),
    ]


# --- the ZIP -------------------------------------------------------------------------------


def test_three_files_come_as_one_stored_zip_with_their_bytes_and_unique_names(alice, three):
    answer = zip_get(alice, [upload.pk for upload in three])

    assert answer.status == 200
    assert members(answer.body) == {"notes.txt": sha(SMALL), "data.bin": sha(LARGE), "notes (2).txt": sha(OTHER)}
    with zipfile.ZipFile(io.BytesIO(answer.body)) as archive:
        assert archive.namelist() == ["notes.txt", "data.bin", "notes (2).txt"]  # in the order asked for
    assert answer.headers["content-length"] == str(len(answer.body))
    assert answer.headers["content-type"] == "application/zip"
    assert answer.headers["cache-control"] == "private, no-store"
    assert re.fullmatch(
        r"attachment; filename=\"directdrivex-\d{8}-\d{6}-3-files\.zip\"; "
        r"filename\*=UTF-8''directdrivex-\d{8}-\d{6}-3-files\.zip",
        answer.headers["content-disposition"],
    ), answer.headers["content-disposition"]


def test_the_zip_holds_one_download_slot_while_it_streams_and_releases_it_as_completed(alice, three):
    answer = zip_get(alice, [upload.pk for upload in three])

    assert answer.slots_while_streaming == 1
    [slot] = zip_slots()
    assert slot.user == alice
    assert slot.upload is None  # one slot for the whole ZIP, not one per file
    assert slot.release_reason == Slot.ReleaseReason.COMPLETED
    assert active_download_slots() == []


def test_repeated_ids_count_once(alice, three):
    answer = zip_get(alice, [three[1].pk] * 150 + [str(three[1].pk).upper()])

    assert answer.status == 200
    assert members(answer.body) == {"data.bin": sha(LARGE)}


def test_member_names_are_numbered_without_regard_to_case_and_keep_double_extensions():
    names = ["a.txt", "A.TXT", "a (2).txt", "logs.tar.gz", "logs.tar.gz", "README", "README"]

    assert zips.member_names(names) == [
        "a.txt",
        "A (2).TXT",
        "a (2) (2).txt",
        "logs.tar.gz",
        "logs (2).tar.gz",
        "README",
        "README (2)",
    ]


# --- the slot -------------------------------------------------------------------------------


def test_a_client_that_goes_away_mid_zip_frees_the_slot(alice, three, storage_dir):
    answer = zip_get(alice, [upload.pk for upload in three], disconnect_after_bytes=64 * 1024)

    assert answer.status == 200
    assert len(answer.body) < int(answer.headers["content-length"])
    [slot] = zip_slots()
    assert slot.release_reason == Slot.ReleaseReason.DISCONNECTED
    assert open_stored_files(storage_dir) == 0


def test_no_free_download_slot_is_429_with_retry_after_and_nothing_held(alice, three, settings, storage_dir):
    settings.DIRECTDRIVEX_USER_DOWNLOAD_SLOTS = 1
    held = slot_admit(Slot.Kind.DOWNLOAD, alice)

    response = signed_in(alice).get(zip_url([upload.pk for upload in three]))

    assert response.status_code == 429
    assert int(response["Retry-After"]) >= 1
    assert b"No download slot is free" in response.content
    assert [slot.pk for slot in active_download_slots()] == [held.pk]
    # The files opened before the slot was asked for are closed again.
    assert open_stored_files(storage_dir) == 0


def test_a_file_deleted_while_the_zip_streams_ends_it_short_and_frees_the_slot(alice, three):
    def delete_the_last_file():
        assert storage.backend().delete(three[2].storage_key)

    answer = zip_get(alice, [upload.pk for upload in three], on_first_bytes=delete_the_last_file)

    assert answer.status == 200
    assert len(SMALL) + len(LARGE) < len(answer.body) < int(answer.headers["content-length"])
    [slot] = zip_slots()
    assert slot.release_reason == Slot.ReleaseReason.CANCELLED


# --- refusals: back to My files with a message, nothing streamed ----------------------------------


def test_another_users_file_is_refused_as_if_it_did_not_exist(alice, bob, three):
    bobs = finish_upload(bob, b"bob's", filename="bob.txt")

    response = signed_in(alice).get(zip_url([three[0].pk, bobs.pk]))

    message = refusal(response)
    assert "1 of the selected files no longer exists" in message
    assert "bob.txt" not in message
    assert zip_slots() == []


def test_an_unknown_or_malformed_id_is_refused(alice, three):
    response = signed_in(alice).get(zip_url([three[0].pk, uuid.uuid4(), "not-a-uuid"]))

    assert "2 of the selected files no longer exist" in refusal(response)
    assert zip_slots() == []


def test_an_unfinished_upload_is_refused_by_name(alice, three):
    unfinished, _slot = upload_create(alice, filename="half.bin", size=100)

    response = signed_in(alice).get(zip_url([three[0].pk, unfinished.pk]))

    assert "half.bin (uploading)" in refusal(response)
    assert zip_slots() == []


def test_more_than_100_files_are_refused(alice, three):
    response = signed_in(alice).get(zip_url([three[0].pk] + [uuid.uuid4() for _ in range(100)]))

    assert "You selected 101 files; one ZIP holds at most 100" in refusal(response)
    assert zip_slots() == []


def test_no_file_selected_is_refused(alice):
    assert "Select at least one file" in refusal(signed_in(alice).get(reverse("files-zip")))


def test_the_refusal_is_shown_on_my_files(alice, three):
    client = signed_in(alice)

    page = client.get(zip_url([uuid.uuid4()]), follow=True)

    assert page.redirect_chain == [(reverse("files"), 303)]
    assert b"no longer exists" in page.content


def test_signed_out_is_sent_to_sign_in(three):
    response = Client().get(zip_url([three[0].pk]))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert zip_slots() == []
