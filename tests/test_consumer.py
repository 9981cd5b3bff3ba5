"""The WebSocket upload protocol, end to end through the real ASGI stack (WebsocketCommunicator).

Every close code of the spec's table is provoked here; bytes on disk and rows
in the database are checked after each.
"""

import asyncio
import contextlib
import hashlib
import json
import random
import threading
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections
from django.test import Client
from django.utils import timezone

from directdrivex.routing import application
from tests.conftest import CONNECT_SECONDS
from tests.support import stored
from uploads import storage
from uploads.models import Slot, Upload
from uploads.services.grants import writer_admit
from uploads.services.slots import slot_release, slots_reset
from uploads.services.uploads import upload_create, upload_delete
from uploads.storage import local
from uploads.tickets import ticket_issue, ws_url

pytestmark = pytest.mark.django_db(transaction=True)

CHUNK = 1024
WINDOW = 8 * CHUNK


@pytest.fixture(autouse=True)
def small_frames(limits):
    limits(chunk_size=CHUNK, window=WINDOW)


OPENED: list[WebsocketCommunicator] = []


@pytest.fixture(autouse=True)
async def disconnect_everything():
    """End every connection a test opened, so no consumer is left for the event loop's teardown to cancel."""
    yield
    while OPENED:
        communicator = OPENED.pop()
        with contextlib.suppress(Exception):
            await communicator.disconnect(timeout=5)
    # Channels' shared database thread keeps its connection (CONN_MAX_AGE on SQLite, or one
    # borrowed from the pool on PostgreSQL until closed); close it,
    # or PostgreSQL refuses to drop the test database at the end of the run.
    await database_sync_to_async(connections.close_all)()


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def create(user, data: bytes, *, sha256: str | None = None) -> Upload:
    digest = hashlib.sha256(data).hexdigest() if sha256 is None else sha256
    upload, _slot = await database_sync_to_async(upload_create)(user, filename="f.bin", size=len(data), sha256=digest)
    return upload


async def refresh(upload: Upload) -> Upload:
    return await database_sync_to_async(Upload.objects.get)(pk=upload.pk)


async def active_slots(upload: Upload) -> int:
    return await database_sync_to_async(Slot.objects.active().filter(upload=upload).count)()


async def connect(path: str, headers=()) -> tuple[WebsocketCommunicator, dict]:
    communicator = WebsocketCommunicator(application, path, headers=list(headers))
    OPENED.append(communicator)
    connected, _subprotocol = await communicator.connect(timeout=CONNECT_SECONDS)
    assert connected
    return communicator, json.loads(await communicator.receive_from(timeout=5))


async def connect_ticket(upload: Upload):
    return await connect(await database_sync_to_async(ws_url)(upload))


async def expect_close(communicator: WebsocketCommunicator, code: str, close_code: int) -> dict:
    """Skip acks until the error message, then assert the close code that follows it."""
    while True:
        message = json.loads(await communicator.receive_from(timeout=5))
        if message["type"] != "ack":
            break
    assert message["type"] == "error", message
    assert message["code"] == code, message
    assert message["detail"]
    closed = await communicator.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": close_code}
    return message


async def send_range(communicator, data: bytes, start: int, end: int, acked: int) -> int:
    """Send data[start:end] honouring the window; returns the last acked offset seen."""
    sent = start
    while sent < end:
        frame = data[sent : min(end, sent + CHUNK)]
        while sent + len(frame) - acked > WINDOW:
            message = json.loads(await communicator.receive_from(timeout=5))
            assert message["type"] == "ack", message
            acked = message["offset"]
        await communicator.send_to(bytes_data=frame)
        sent += len(frame)
    return acked


async def finish(communicator) -> dict:
    while True:
        message = json.loads(await communicator.receive_from(timeout=10))
        if message["type"] != "ack":
            return message


async def test_upload_completes_with_verified_bytes_and_frees_its_slot(alice):
    data = payload(50_000)
    upload = await create(alice, data)
    communicator, ready = await connect_ticket(upload)
    assert ready == {"type": "ready", "offset": 0, "chunk_size": CHUNK, "window": WINDOW}

    await send_range(communicator, data, 0, len(data), 0)
    complete = await finish(communicator)

    assert complete == {
        "type": "complete",
        "id": str(upload.pk),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 1000}
    done = await refresh(upload)
    assert (done.status, done.offset, done.completed_at is not None) == ("complete", len(data), True)
    assert stored.finished_bytes(upload.storage_key) == data
    assert not stored.part_stored(upload.storage_key)
    assert await active_slots(upload) == 0


async def test_upload_without_declared_sha256_reports_the_digest_it_computed(alice):
    data = payload(3 * CHUNK + 5)
    upload = await create(alice, data, sha256="")
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, len(data), 0)
    assert (await finish(communicator))["sha256"] == hashlib.sha256(data).hexdigest()
    # Stored too: the API, the pages and the download ETag show the digest of what is on disk.
    assert (await refresh(upload)).sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("cut", [1, CHUNK - 1, CHUNK, 5 * CHUNK + 17, 20_000 - 1])
async def test_disconnect_at_any_byte_resumes_from_the_durable_offset(alice, cut):
    data = payload(20_000)
    upload = await create(alice, data)
    first, _ready = await connect_ticket(upload)
    await send_range(first, data, 0, cut, 0)
    await first.disconnect()

    # The disconnect made every written byte durable and freed the slot.
    assert (await refresh(upload)).offset == cut
    assert await active_slots(upload) == 0
    second, ready = await connect_ticket(upload)
    assert ready["offset"] == cut
    await send_range(second, data, cut, len(data), cut)
    assert (await finish(second))["type"] == "complete"
    assert stored.finished_bytes(upload.storage_key) == data


@pytest.mark.local_storage  # plants a part file on disk
async def test_bytes_past_the_durable_offset_are_dropped_on_reconnect(alice):
    data = payload(4 * CHUNK)
    upload = await create(alice, data)
    # A crash left bytes the server never committed: they must not be kept.
    storage.backend().prepare()
    local.part_path(upload.storage_key).write_bytes(b"x" * (3 * CHUNK))
    communicator, ready = await connect_ticket(upload)
    assert ready["offset"] == 0
    await send_range(communicator, data, 0, len(data), 0)
    assert (await finish(communicator))["type"] == "complete"
    assert local.final_path(upload.storage_key).read_bytes() == data


async def test_text_message_is_a_protocol_error_and_the_upload_stays_resumable(alice):
    data = payload(4 * CHUNK)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, CHUNK, 0)
    await communicator.send_to(text_data=json.dumps({"type": "hello"}))
    await expect_close(communicator, "protocol_error", 4400)
    after = await refresh(upload)
    assert (after.status, after.offset) == ("uploading", CHUNK)


async def test_frame_larger_than_chunk_size_is_refused_with_4400(alice):
    upload = await create(alice, payload(4 * CHUNK))
    communicator, _ready = await connect_ticket(upload)
    await communicator.send_to(bytes_data=b"a" * (CHUNK + 1))
    error = await expect_close(communicator, "protocol_error", 4400)
    assert str(CHUNK) in error["detail"]
    assert (await refresh(upload)).offset == 0


async def test_bytes_beyond_the_window_are_refused_with_4400(alice, monkeypatch):
    data = payload(2 * WINDOW)
    upload = await create(alice, data)
    # A stalled disk: nothing is written, so nothing is acknowledged.
    disk = threading.Event()
    real_append = stored.part_class().append

    def stalled_append(part, chunks):
        assert disk.wait(10)
        return real_append(part, chunks)

    monkeypatch.setattr(stored.part_class(), "append", stalled_append)
    communicator, _ready = await connect_ticket(upload)
    for start in range(0, WINDOW + CHUNK, CHUNK):  # one frame more than the window allows
        await communicator.send_to(bytes_data=data[start : start + CHUNK])
    await asyncio.sleep(0.2)  # the consumer sees every frame while nothing has been acknowledged
    disk.set()
    error = await expect_close(communicator, "protocol_error", 4400)
    assert "Window" in error["detail"]
    after = await refresh(upload)
    assert after.status == "uploading"
    # The frames within the window were valid: they are kept, the one past it is not.
    assert after.offset == WINDOW
    assert await database_sync_to_async(stored.part_bytes)(after) == data[:WINDOW]


async def test_frame_past_the_declared_size_is_refused_whole_with_4413(alice):
    data = payload(2 * CHUNK + 10)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, 2 * CHUNK, 0)
    await communicator.send_to(bytes_data=b"z" * 11)  # one byte too many
    await expect_close(communicator, "size_exceeded", 4413)

    after = await refresh(upload)
    assert (after.status, after.offset) == ("uploading", 2 * CHUNK)
    assert await database_sync_to_async(stored.part_bytes)(after) == data[: 2 * CHUNK]
    resumed, ready = await connect_ticket(upload)
    assert ready["offset"] == 2 * CHUNK
    await send_range(resumed, data, 2 * CHUNK, len(data), 2 * CHUNK)
    assert (await finish(resumed))["type"] == "complete"


async def test_checksum_mismatch_fails_the_upload_and_removes_its_bytes(alice):
    data = payload(3 * CHUNK)
    upload = await create(alice, data, sha256="0" * 64)
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, len(data), 0)
    error = await expect_close(communicator, "checksum_mismatch", 4422)
    assert hashlib.sha256(data).hexdigest() in error["detail"]
    assert (await refresh(upload)).status == "failed"
    assert stored.nothing_stored(upload.storage_key)
    assert await active_slots(upload) == 0


async def test_second_connection_while_the_first_writes_is_busy_with_retry_after(alice):
    upload = await create(alice, payload(4 * CHUNK))
    first, _ready = await connect_ticket(upload)
    second, error = await connect_ticket(upload)
    assert (error["type"], error["code"]) == ("error", "busy")
    assert error["retry_after"] >= 1
    assert await second.receive_output(timeout=5) == {"type": "websocket.close", "code": 4409}
    # The first writer is unaffected.
    await first.send_to(bytes_data=b"a" * CHUNK)
    await first.disconnect()
    assert (await refresh(upload)).offset == CHUNK


async def test_writer_whose_process_died_blocks_its_upload_until_its_lease_runs_out_then_is_taken_over(alice):
    data = payload(2 * CHUNK)
    upload = await create(alice, data)
    # A writer admitted by a process that then died: nobody renews its lease any more.
    dead = await database_sync_to_async(writer_admit)(alice, upload.pk, "specific.crashed-process!writer")

    # Its lease is the one answer to "is it alive?": until it runs out, a newcomer is told to come back soon.
    blocked, error = await connect_ticket(upload)
    assert (error["code"], error["retry_after"]) == ("busy", 2)
    assert await blocked.receive_output(timeout=5) == {"type": "websocket.close", "code": 4409}

    expired = timezone.now() - timedelta(seconds=1)
    await database_sync_to_async(Slot.objects.filter(pk=dead.slot_id).update)(lease_expires_at=expired)
    communicator, ready = await connect_ticket(upload)
    assert ready["type"] == "ready"
    taken_over = await database_sync_to_async(Slot.objects.get)(pk=dead.slot_id)
    assert taken_over.release_reason == "expired"
    await send_range(communicator, data, 0, len(data), 0)
    assert (await finish(communicator))["type"] == "complete"


async def test_slot_reset_while_writing_closes_the_writer_with_lease_lost(alice):
    data = payload(6 * CHUNK)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, 2 * CHUNK, 0)
    await database_sync_to_async(slots_reset)(upload=upload)
    await expect_close(communicator, "lease_lost", 4410)
    assert (await refresh(upload)).status == "uploading"
    # Reconnecting resumes from what was durable.
    resumed, ready = await connect_ticket(upload)
    assert ready["offset"] <= 2 * CHUNK
    await send_range(resumed, data, ready["offset"], len(data), ready["offset"])
    assert (await finish(resumed))["type"] == "complete"


async def test_delete_while_writing_removes_bytes_and_closes_with_not_uploading(alice):
    data = payload(6 * CHUNK)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, 2 * CHUNK, 0)
    await database_sync_to_async(upload_delete)(alice, upload.pk)
    await expect_close(communicator, "not_uploading", 4409)
    assert (await refresh(upload)).status == "cancelled"
    assert stored.nothing_stored(upload.storage_key)


async def test_connecting_to_a_finished_upload_is_not_uploading(alice):
    data = payload(CHUNK)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, len(data), 0)
    assert (await finish(communicator))["type"] == "complete"
    again, error = await connect_ticket(upload)
    assert error["code"] == "not_uploading"
    assert await again.receive_output(timeout=5) == {"type": "websocket.close", "code": 4409}


async def test_no_free_slot_on_reconnect_is_slots_exhausted_with_retry_after(alice, bob, limits):
    limits(global_upload_slots=1)
    upload = await create(alice, payload(CHUNK))
    # alice's reserved slot goes away (e.g. she disconnected) and bob takes the only slot.
    slot = await database_sync_to_async(Slot.objects.active().get)(upload=upload)
    await database_sync_to_async(slot_release)(slot.pk, Slot.ReleaseReason.DISCONNECTED)
    await create(bob, payload(CHUNK))
    communicator, error = await connect_ticket(upload)
    assert (error["code"], error["retry_after"] >= 1) == ("slots_exhausted", True)
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4429}


@pytest.mark.local_storage  # plants a part file shorter than the offset on disk
async def test_part_file_shorter_than_the_durable_offset_resumes_from_what_is_on_disk(alice):
    data = payload(4 * CHUNK)
    upload = await create(alice, data)
    # The row promises 3 chunks but only 1 survived on disk (disk loss, a hand-deleted file).
    await database_sync_to_async(Upload.objects.filter(pk=upload.pk).update)(offset=3 * CHUNK)
    storage.backend().prepare()
    local.part_path(upload.storage_key).write_bytes(data[:CHUNK])
    communicator, ready = await connect_ticket(upload)
    assert ready["offset"] == CHUNK
    assert (await refresh(upload)).offset == CHUNK
    await send_range(communicator, data, CHUNK, len(data), CHUNK)
    assert (await finish(communicator))["type"] == "complete"
    assert local.final_path(upload.storage_key).read_bytes() == data


@pytest.mark.local_storage  # a full disk injected into LocalPart
async def test_disk_failure_is_an_internal_error_and_the_upload_stays_resumable(alice, monkeypatch):
    data = payload(4 * CHUNK)
    upload = await create(alice, data)

    def disk_full(part, chunks):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local.LocalPart, "append", disk_full)
    communicator, _ready = await connect_ticket(upload)
    await communicator.send_to(bytes_data=data[:CHUNK])
    await expect_close(communicator, "internal_error", 4500)
    assert (await refresh(upload)).status == "uploading"
    assert await active_slots(upload) == 0

    monkeypatch.undo()
    resumed, ready = await connect_ticket(upload)
    await send_range(resumed, data, ready["offset"], len(data), ready["offset"])
    assert (await finish(resumed))["type"] == "complete"


async def test_crash_after_the_atomic_rename_is_completed_on_reconnect(alice):
    data = payload(3 * CHUNK)
    upload = await create(alice, data)
    # The file reached files/ but the process died before the row said complete.
    stored.plant_finished(upload.storage_key, data)
    communicator, ready = await connect_ticket(upload)
    assert ready["offset"] == len(data)
    complete = json.loads(await communicator.receive_from(timeout=5))
    assert (complete["type"], complete["sha256"]) == ("complete", hashlib.sha256(data).hexdigest())
    done = await refresh(upload)
    assert (done.status, done.offset) == ("complete", len(data))
    assert await active_slots(upload) == 0


async def test_no_ticket_and_no_session_is_unauthenticated(alice):
    upload = await create(alice, payload(CHUNK))
    communicator, error = await connect(f"/ws/uploads/{upload.pk}/")
    assert error["code"] == "unauthenticated"
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


@pytest.mark.parametrize("mangle", ["tampered", "other_upload", "expired"])
async def test_bad_ticket_is_unauthenticated(alice, settings, mangle):
    upload = await create(alice, payload(CHUNK))
    other = await create(alice, payload(CHUNK + 1))
    ticket = ticket_issue(alice.pk, upload.pk)
    if mangle == "tampered":
        ticket = ticket[:-2] + ("AA" if not ticket.endswith("AA") else "BB")
    elif mangle == "other_upload":
        ticket = ticket_issue(alice.pk, other.pk)
    else:
        settings.DIRECTDRIVEX_TICKET_MAX_AGE = -1
    communicator, error = await connect(f"/ws/uploads/{upload.pk}/?ticket={ticket}")
    assert error["code"] == "unauthenticated"
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


async def test_another_users_upload_is_not_found(alice, bob):
    upload = await create(alice, payload(CHUNK))
    bobs_ticket = ticket_issue(bob.pk, upload.pk)  # a validly signed ticket, but not alice's
    communicator, error = await connect(f"/ws/uploads/{upload.pk}/?ticket={bobs_ticket}")
    assert error["code"] == "not_found"
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4404}


async def test_unknown_upload_is_not_found(alice):
    missing = "00000000-0000-0000-0000-000000000000"
    communicator, error = await connect(f"/ws/uploads/{missing}/?ticket={ticket_issue(alice.pk, missing)}")
    assert error["code"] == "not_found"
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4404}


def session_cookie(user) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def test_session_cookie_from_an_allowed_origin_is_admitted(alice):
    data = payload(CHUNK)
    upload = await create(alice, data)
    cookie = await database_sync_to_async(session_cookie)(alice)
    # Same origin as the server the handshake reached (its Host header), as a browser sends it.
    headers = [(b"host", b"testserver"), (b"origin", b"http://testserver"), (b"cookie", cookie)]
    communicator, ready = await connect(f"/ws/uploads/{upload.pk}/", headers=headers)
    assert ready["type"] == "ready"
    await send_range(communicator, data, 0, len(data), 0)
    assert (await finish(communicator))["type"] == "complete"


async def test_session_cookie_without_origin_is_not_enough(alice):
    upload = await create(alice, payload(CHUNK))
    cookie = await database_sync_to_async(session_cookie)(alice)
    communicator, error = await connect(f"/ws/uploads/{upload.pk}/", headers=[(b"cookie", cookie)])
    assert error["code"] == "unauthenticated"
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


async def test_foreign_origin_is_refused_at_the_handshake_even_with_a_ticket(alice):
    upload = await create(alice, payload(CHUNK))
    path = await database_sync_to_async(ws_url)(upload)
    communicator = WebsocketCommunicator(application, path, headers=[(b"origin", b"https://evil.example")])
    OPENED.append(communicator)
    connected, _code = await communicator.connect(timeout=CONNECT_SECONDS)
    # Closed before accept: Daphne answers such a handshake with HTTP 403.
    assert connected is False
    assert await active_slots(upload) == 1  # only the reservation made by POST


async def test_slot_is_released_when_the_connection_ends(alice):
    data = payload(4 * CHUNK)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)
    slot = await database_sync_to_async(Slot.objects.active().get)(upload=upload)
    assert slot.holder_channel
    await communicator.disconnect()
    released = await database_sync_to_async(Slot.objects.get)(pk=slot.pk)
    assert (released.released_at is not None, released.release_reason) == (True, "disconnected")


def test_daphne_limits_leave_room_for_a_full_chunk(settings):
    from directdrivex.server import daphne_arguments

    arguments = daphne_arguments(bind="127.0.0.1", port=8000)
    limit = int(arguments[arguments.index("--websocket-max-message-size") + 1])
    assert limit >= 2 * settings.DIRECTDRIVEX_CHUNK_SIZE
    assert int(arguments[arguments.index("--websocket-max-frame-size") + 1]) == limit
