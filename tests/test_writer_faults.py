"""Failure paths of the upload writer through the real ASGI stack: every exit closes, frees the slot, drops the flock.

Each test provokes one of the faults that used to leave a connection hanging,
a file locked or bytes destroyed (issue "Failure paths that keep the
promise"), and checks rows, bytes and close codes afterwards. Where a moment
must be caught (a rename in progress, a re-hash under way), the disk step is
held on a threading.Event; everything else is the real stack.
"""

import asyncio
import contextlib
import hashlib
import json
import threading
import time
from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import OperationalError, connections

from directdrivex.routing import application
from tests.conftest import CONNECT_SECONDS
from tests.support import stored
from tests.support.files import lock_is_free, open_descriptors
from tests.test_consumer import (  # noqa: F401 - autouse fixtures of the consumer tests apply here too
    CHUNK,
    OPENED,
    WINDOW,
    active_slots,
    connect_ticket,
    create,
    disconnect_everything,
    expect_close,
    finish,
    payload,
    refresh,
    send_range,
    small_frames,
)
from uploads import storage, writer
from uploads.exceptions import NotUploading
from uploads.models import Slot, Upload
from uploads.services import grants, uploads
from uploads.services.slots import slots_reset
from uploads.services.uploads import upload_delete, uploads_expire
from uploads.storage import local
from uploads.tickets import ws_url

pytestmark = pytest.mark.django_db(transaction=True)

GiB = 1024**3


async def eventually(condition, what: str, timeout: float = 5.0):
    """Poll ``condition`` (a function, sync or async) until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"not within {timeout}s: {what}")


class Gate:
    """Holds a disk step (in its worker thread) until the test opens the gate."""

    def __init__(self):
        self.reached = threading.Event()
        self.opened = threading.Event()

    def hold(self):
        self.reached.set()
        assert self.opened.wait(20), "the test never opened the gate"

    async def wait_reached(self):
        assert await asyncio.to_thread(self.reached.wait, 10), "the writer never reached the gate"


def hold_method(monkeypatch, cls, name: str) -> Gate:
    """Make ``cls.name`` wait at a gate the first time it runs, then do its real work."""
    gate, real = Gate(), getattr(cls, name)

    def held(self, *args, **kwargs):
        if not gate.reached.is_set():
            gate.hold()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, held)
    return gate


async def sparse_resume_point(upload: Upload, offset: int) -> None:
    """A part file of ``offset`` bytes (sparse: instant to make, about a second per GiB to re-hash)."""
    storage.backend().prepare()
    with open(local.part_path(upload.storage_key), "wb") as handle:
        handle.truncate(offset)
    await database_sync_to_async(Upload.objects.filter(pk=upload.pk).update)(offset=offset, size=offset + CHUNK)


async def opened_without_reading(upload: Upload) -> WebsocketCommunicator:
    """A connection whose handshake is done; the test reads (or not) what the server sends."""
    communicator = WebsocketCommunicator(application, await database_sync_to_async(ws_url)(upload))
    OPENED.append(communicator)
    connected, _subprotocol = await communicator.connect(timeout=CONNECT_SECONDS)
    assert connected
    return communicator


# --- a refusal while the last bytes land -------------------------------------------


@pytest.mark.parametrize("revoke", ["reset", "delete"])
async def test_revocation_while_the_last_bytes_land_closes_at_once_and_frees_file_and_slot(alice, monkeypatch, revoke):
    data = payload(6 * CHUNK)
    upload = await create(alice, data)
    gate = hold_method(monkeypatch, stored.part_class(), "sync")  # the finalizing commit's fsync
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, len(data), 0)
    await gate.wait_reached()

    if revoke == "reset":
        await database_sync_to_async(slots_reset)(upload=upload)
    else:
        await database_sync_to_async(upload_delete)(alice, upload.pk)
    gate.opened.set()

    code, close_code = ("lease_lost", 4410) if revoke == "reset" else ("not_uploading", 4409)
    await expect_close(communicator, code, close_code)
    assert stored.part_released(upload.storage_key)
    assert await active_slots(upload) == 0
    after = await refresh(upload)
    if revoke == "reset":
        # The bytes stay for the next writer; nothing was completed by a fenced writer.
        assert after.status == "uploading"
        assert not stored.finished_stored(upload.storage_key)
    else:
        assert after.status == "cancelled"
        assert stored.nothing_stored(upload.storage_key)


async def test_database_error_during_a_commit_is_unavailable_with_retry_after_and_the_upload_resumes(
    alice, monkeypatch
):
    data = payload(6 * CHUNK)
    upload = await create(alice, data)
    real_commit = grants.writer_commit

    def database_gone(grant, offset, **kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(writer, "writer_commit", database_gone)
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, len(data), 0)

    error = await expect_close(communicator, "unavailable", 4503)
    assert error["retry_after"] >= 1
    assert stored.part_released(upload.storage_key)
    assert (await refresh(upload)).status == "uploading"

    monkeypatch.setattr(writer, "writer_commit", real_commit)
    resumed, ready = await connect_ticket(upload)
    await send_range(resumed, data, ready["offset"], len(data), ready["offset"])
    assert (await finish(resumed))["sha256"] == hashlib.sha256(data).hexdigest()


# --- a client that leaves during a long re-hash -----------------------------------------


# A re-hash of a resumed part happens only where the hash state is not saved: a part file planted on disk.
@pytest.mark.local_storage
async def test_client_gone_during_a_long_resume_rehash_lets_go_of_the_file_and_the_next_connection_is_admitted(
    alice,
):
    upload = await create(alice, payload(1), sha256="")
    await sparse_resume_point(upload, 2 * GiB)  # about two seconds of sha256
    part = local.part_path(upload.storage_key)

    first = await opened_without_reading(upload)
    await eventually(lambda: not lock_is_free(part), "the re-hash to hold the file")
    await first.disconnect()

    # Let go within moments, not when the re-hash would have ended (and never, before the fix).
    await eventually(lambda: lock_is_free(part), "the file's lock to be released", 1.5)
    await eventually(lambda: _no_holder(upload), "the slot to be released")
    second = await opened_without_reading(upload)
    ready = json.loads(await second.receive_from(timeout=30))  # after its own re-hash
    assert (ready["type"], ready["offset"]) == ("ready", 2 * GiB)


async def _no_holder(upload) -> bool:
    return not await database_sync_to_async(
        Slot.objects.active().filter(upload=upload).exclude(holder_channel="").exists
    )()


@pytest.mark.local_storage  # a part file planted on disk, re-hashed under its flock
async def test_a_live_holder_busy_re_hashing_is_not_taken_over(alice):
    upload = await create(alice, payload(1), sha256="")
    await sparse_resume_point(upload, 2 * GiB)
    part = local.part_path(upload.storage_key)

    first = await opened_without_reading(upload)
    await eventually(lambda: not lock_is_free(part), "the re-hash to hold the file")

    second, error = await connect_ticket(upload)
    assert (error["type"], error["code"]) == ("error", "busy")
    assert await second.receive_output(timeout=5) == {"type": "websocket.close", "code": 4409}

    # The first connection was left alone: it finishes its re-hash and is ready to write.
    ready = json.loads(await first.receive_from(timeout=30))
    assert (ready["type"], ready["offset"]) == ("ready", 2 * GiB)
    await first.send_to(bytes_data=b"q" * CHUNK)
    assert (await finish(first))["type"] == "complete"


async def sparse_finished_file(upload: Upload, size: int) -> None:
    """A finished file of ``size`` bytes in place (sparse), as a writer stopped after its rename leaves it."""
    storage.backend().prepare()
    with open(local.final_path(upload.storage_key), "wb") as handle:
        handle.truncate(size)
    await database_sync_to_async(Upload.objects.filter(pk=upload.pk).update)(offset=size, size=size)


@pytest.mark.local_storage  # a sparse 2 GiB finished file planted on disk, watched through its descriptors
@pytest.mark.parametrize("stop", ["reset", "text frame", "disconnect"])
async def test_a_stop_during_the_rehash_of_a_finished_file_ends_with_its_own_code(alice, stop, caplog):
    upload = await create(alice, payload(1), sha256="")
    await sparse_finished_file(upload, 2 * GiB)  # about two seconds of sha256
    communicator = await opened_without_reading(upload)
    final = local.final_path(upload.storage_key)
    await eventually(lambda: open_descriptors([final]), "the writer to be re-hashing the finished file")

    if stop == "reset":
        await database_sync_to_async(slots_reset)(upload=upload)
        await expect_close(communicator, "lease_lost", 4410)
    elif stop == "text frame":
        await communicator.send_to(text_data="{}")
        await expect_close(communicator, "protocol_error", 4400)
    else:
        await communicator.disconnect()
        await eventually(lambda: _no_holder(upload), "the slot to be released", 1.5)

    # Not a server fault: no 4500, no traceback (before, every one of them was 4500 with a traceback).
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    after = await refresh(upload)
    assert (after.status, after.offset) == ("uploading", 2 * GiB)


async def _has_holder(upload) -> bool:
    return await database_sync_to_async(Slot.objects.active().filter(upload=upload).exclude(holder_channel="").exists)()


# The race of a part file renamed into files/ between the look for a finished file and the part's open.
@pytest.mark.local_storage
async def test_a_part_made_visible_by_a_fenced_writer_just_before_the_open_is_completed_not_rewound(alice, monkeypatch):
    # The previous writer made every byte durable, then its lease was reclaimed; it
    # wakes up and renames the part into place between our look for a finished
    # file and our open of the part. Before, the open made an empty part anew and
    # the durable offset was rewound to 0: every byte was to be sent again.
    data = payload(3 * CHUNK)
    upload = await create(alice, data)
    stale = await database_sync_to_async(grants.writer_admit)(alice, upload.pk, "specific.stale!writer")
    part = storage.backend().open_part(stale.storage_key, storage.Committed(), 1 << 40)
    part.append([data])
    part.sync()
    await database_sync_to_async(grants.writer_commit)(stale, len(data))
    await database_sync_to_async(slots_reset)(upload=upload)  # the stale writer is fenced now
    real_digest = type(storage.backend()).finished_digest

    def then_the_stale_writer_renames(backend, key, size, interrupt=None, hash_state=None):
        digest = real_digest(backend, key, size, interrupt, hash_state)
        if part.fd >= 0:
            part.finalize()  # what the fenced writer does next, before it learns it was fenced
            part.close()
        return digest

    monkeypatch.setattr(type(storage.backend()), "finished_digest", then_the_stale_writer_renames)
    communicator, ready = await connect_ticket(upload)

    assert (ready["type"], ready["offset"]) == ("ready", len(data))
    complete = await finish(communicator)
    assert (complete["type"], complete["sha256"]) == ("complete", hashlib.sha256(data).hexdigest())
    assert local.final_path(upload.storage_key).read_bytes() == data
    assert not local.part_path(upload.storage_key).exists()


@pytest.mark.local_storage
async def test_a_symlink_planted_at_the_part_path_is_a_server_fault_and_its_target_is_not_touched(alice, tmp_path):
    target = tmp_path / "outside.conf"
    target.write_bytes(b"important settings\n" * 100)
    data = payload(2 * CHUNK)
    upload = await create(alice, data)
    storage.backend().prepare()
    local.part_path(upload.storage_key).symlink_to(target)

    communicator = await opened_without_reading(upload)
    await expect_close(communicator, "internal_error", 4500)

    # Before: the writer opened the link and truncated its target to the durable offset (0).
    assert target.read_bytes() == b"important settings\n" * 100
    after = await refresh(upload)
    assert after.status == "uploading"  # resumable once an operator repairs the folder (uploads fsck)
    assert await active_slots(upload) == 0 or not await _has_holder(upload)


# --- finalization under a lost lease or a delete --------------------------------------------


async def test_reset_during_finalize_keeps_the_verified_bytes_and_the_next_writer_completes(alice, monkeypatch):
    data = payload(5 * CHUNK + 3)
    upload = await create(alice, data)
    gate = hold_method(monkeypatch, stored.part_class(), "finalize")
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, len(data), 0)
    await gate.wait_reached()
    await database_sync_to_async(slots_reset)(upload=upload)
    gate.opened.set()

    await expect_close(communicator, "lease_lost", 4410)
    after = await refresh(upload)
    assert (after.status, after.offset) == ("uploading", len(data))
    assert stored.finished_bytes(upload.storage_key) == data  # verified, visible, kept

    resumed, ready = await connect_ticket(upload)
    assert ready["offset"] == len(data)
    complete = await finish(resumed)
    assert (complete["type"], complete["sha256"]) == ("complete", hashlib.sha256(data).hexdigest())
    assert (await refresh(upload)).status == "complete"
    assert await active_slots(upload) == 0


async def test_a_visible_file_that_does_not_match_the_declared_sha256_is_never_completed(alice):
    data = payload(3 * CHUNK)
    upload = await create(alice, data)
    # A finished file that is not these bytes (a damaged disk, a hand-copied file).
    stored.plant_finished(upload.storage_key, data[:-1] + b"!")
    communicator, ready = await connect_ticket(upload)
    assert ready["offset"] == len(data)
    await expect_close(communicator, "checksum_mismatch", 4422)
    assert (await refresh(upload)).status == "failed"
    assert not stored.finished_stored(upload.storage_key)


async def test_delete_during_finalize_answers_only_once_the_bytes_are_gone(alice, monkeypatch):
    data = payload(5 * CHUNK)
    upload = await create(alice, data)
    gate = hold_method(monkeypatch, stored.part_class(), "finalize")
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, len(data), 0)
    await gate.wait_reached()

    await database_sync_to_async(upload_delete)(alice, upload.pk)  # the API's DELETE: 204 from here on
    assert stored.nothing_stored(upload.storage_key)
    gate.opened.set()

    await expect_close(communicator, "not_uploading", 4409)
    assert not stored.finished_stored(upload.storage_key)
    assert (await refresh(upload)).status == "cancelled"
    assert await active_slots(upload) == 0


def test_delete_racing_completion_deletes_the_finished_upload(alice, monkeypatch):
    data = payload(3 * CHUNK)
    upload, _slot = uploads.upload_create(alice, filename="race.bin", size=len(data))
    grant = grants.writer_admit(alice, upload.pk, "specific.writer!1")
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    part.append([data])
    durable = part.sync()
    grants.writer_commit(grant, durable.offset, hash_state=durable.hash_state, durable=durable)
    part.committed(durable)
    part.finalize(grants.writer_committed(grant))
    part.close()
    real_end = uploads.upload_end

    def completes_first(*args, **kwargs):
        # The writer's completion commits between DELETE's read and its cancel.
        grants.writer_complete(grant)
        return real_end(*args, **kwargs)

    monkeypatch.setattr(uploads, "upload_end", completes_first)
    upload_delete(alice, upload.pk)

    assert not Upload.objects.filter(pk=upload.pk).exists()
    assert stored.nothing_stored(upload.storage_key)


# --- admission racing a cancel ---------------------------------------------------------------


@pytest.mark.parametrize("round_", range(6))
async def test_connection_racing_delete_never_leaves_an_active_slot_or_a_file(alice, round_):
    data = payload(4 * CHUNK)
    upload = await create(alice, data)
    communicator = WebsocketCommunicator(application, await database_sync_to_async(ws_url)(upload))
    OPENED.append(communicator)

    def delete_in_a_thread_of_its_own():
        try:
            upload_delete(alice, upload.pk)
        finally:
            connections.close_all()  # or PostgreSQL cannot drop the test database at the end

    delete = asyncio.to_thread(delete_in_a_thread_of_its_own)
    if round_ % 2:
        await asyncio.sleep(0.001 * round_)
    connected, _deleted = await asyncio.gather(communicator.connect(), delete)
    assert connected[0]
    with contextlib.suppress(Exception):
        first = json.loads(await communicator.receive_from(timeout=5))
        if first["type"] == "ready":
            await communicator.send_to(bytes_data=data[:CHUNK])
    await communicator.disconnect()

    async def settled():
        return await active_slots(upload) == 0 and not stored.part_stored(upload.storage_key)

    await eventually(settled, "no active slot and no part file for the cancelled upload")
    assert (await refresh(upload)).status == "cancelled"


# --- idle writers ----------------------------------------------------------------------------


async def test_idle_writer_is_closed_with_4408_its_slot_freed_and_the_upload_can_still_expire(alice, limits):
    limits(idle_seconds=4, slot_lease_seconds=5)  # renewals every 1.25 s while idle
    data = payload(4 * CHUNK)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)
    await send_range(communicator, data, 0, CHUNK, 0)
    assert json.loads(await communicator.receive_from(timeout=5)) == {"type": "ack", "offset": CHUNK}
    await eventually(lambda: _durable(upload, CHUNK), "the byte to be committed")
    last_byte = (await refresh(upload)).last_activity_at

    error = await expect_close(communicator, "idle_timeout", 4408)
    assert "4 s" in error["detail"]
    after = await refresh(upload)
    assert (after.status, after.offset) == ("uploading", CHUNK)
    assert after.last_activity_at == last_byte, "a heartbeat moved the idle clock"
    assert await active_slots(upload) == 0
    reasons = await database_sync_to_async(
        lambda: list(Slot.objects.filter(upload=upload).values_list("release_reason", flat=True))
    )()
    assert reasons == [Slot.ReleaseReason.IDLE]

    later = last_byte + timedelta(seconds=settings.DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS + 1)
    expired = await database_sync_to_async(uploads_expire)(now=later)
    assert [u.pk for u in expired] == [upload.pk]


async def _durable(upload, offset) -> bool:
    return (await refresh(upload)).offset == offset


# --- acks and durability --------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 3, 5, 7])
async def test_the_last_byte_before_a_pause_is_acknowledged(alice, frames):
    data = payload(8 * CHUNK)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)
    for start in range(0, frames * CHUNK, CHUNK):
        await communicator.send_to(bytes_data=data[start : start + CHUNK])
    acked = 0
    while acked < frames * CHUNK:  # the client now pauses: it must learn where it stands
        message = json.loads(await communicator.receive_from(timeout=5))
        assert message["type"] == "ack", message
        acked = message["offset"]
    assert acked == frames * CHUNK


async def test_on_a_slow_disk_acks_are_held_back_to_what_is_durable(alice, monkeypatch):
    # Scaled down so the test is quick: commits are due after 50 ms, and one
    # slower than 0.2 s (every fsync here takes 0.3 s) counts as a slow disk.
    monkeypatch.setattr(writer, "COMMIT_SECONDS", 0.05)
    monkeypatch.setattr(writer, "ACK_HOLD_SECONDS", 0.2)
    real_sync = stored.part_class().sync

    def slow_sync(part, checkpoint=None):
        time.sleep(0.3)
        return real_sync(part, checkpoint)

    monkeypatch.setattr(stored.part_class(), "sync", slow_sync)
    data = payload(10 * WINDOW)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)

    sent = acked = 0
    acks = []  # (acked offset, durable offset when the ack arrived)
    while True:
        while sent < len(data) and sent + CHUNK - acked <= WINDOW:
            await communicator.send_to(bytes_data=data[sent : sent + CHUNK])
            sent += CHUNK
            await asyncio.sleep(0.005)  # a client slower than the disk's first commit is due
        message = json.loads(await communicator.receive_from(timeout=10))
        if message["type"] == "complete":
            break
        assert message["type"] == "ack", message
        acked = message["offset"]
        acks.append((acked, (await refresh(upload)).offset))
    # Once the first (slow) commit is done, no ack runs ahead of the durable offset.
    after_first_commit = [(ack, durable) for ack, durable in acks if durable > 0]
    assert len(after_first_commit) >= 3, acks
    assert all(ack <= durable for ack, durable in after_first_commit), acks


async def test_acks_stop_running_ahead_while_the_first_commit_is_still_slow(alice, monkeypatch):
    # A disk that turns slow before any commit told the writer so: its first fsync
    # takes 3 s, and every write a little while, so that bytes keep waiting to be
    # written (the writer never idles into a commit of its own meanwhile).
    monkeypatch.setattr(writer, "COMMIT_SECONDS", 0.05)
    monkeypatch.setattr(writer, "ACK_HOLD_SECONDS", 0.2)
    real_sync, real_append, first_sync = stored.part_class().sync, stored.part_class().append, {}

    def slow_first_sync(part, checkpoint=None):
        if not first_sync:
            first_sync["started"] = time.monotonic()
            time.sleep(3)
            durable = real_sync(part, checkpoint)
            first_sync["done"] = time.monotonic()
            return durable
        return real_sync(part, checkpoint)

    def slow_append(part, chunks):
        time.sleep(0.01)
        return real_append(part, chunks)

    monkeypatch.setattr(stored.part_class(), "sync", slow_first_sync)
    monkeypatch.setattr(stored.part_class(), "append", slow_append)
    data = payload(40 * WINDOW)
    upload = await create(alice, data)
    communicator, _ready = await connect_ticket(upload)

    sent = acked = 0
    acks = []  # (when, offset)
    while True:
        while sent < len(data) and sent + CHUNK - acked <= WINDOW:
            await communicator.send_to(bytes_data=data[sent : sent + CHUNK])
            sent += CHUNK
        message = json.loads(await communicator.receive_from(timeout=10))
        if message["type"] == "complete":
            break
        acked = message["offset"]
        acks.append((time.monotonic(), acked))

    # Nothing was durable during the slow commit: once it had run past ACK_HOLD_SECONDS
    # (0.3 s of slack for the loop), no further ack may promise bytes.
    promised = [offset for when, offset in acks if first_sync["started"] + 0.5 < when < first_sync["done"]]
    assert promised == [], acks
    assert acks[-1][1] == len(data)


def test_the_lease_margin_scales_so_that_a_five_second_lease_leaves_time_to_write():
    for lease in (5, 8, 60, 600):
        margin = writer.lease_safety_seconds(lease)
        renew = writer.renew_interval(lease)
        assert 0 < margin < lease
        # An idle writer renews at least twice before it would stop writing.
        assert 2 * renew <= lease - margin, lease


def test_writer_admission_racing_cancel_never_grants_an_ended_upload(alice):
    """Real threads, real connections: on PostgreSQL the two transactions interleave for real."""
    outcomes = []
    for round_ in range(20):
        upload, _slot = uploads.upload_create(alice, filename=f"race-{round_}.bin", size=10)
        barrier = threading.Barrier(2)
        results: dict[str, object] = {}

        def admit(upload=upload, barrier=barrier, results=results):
            try:
                barrier.wait(5)
                results["admit"] = grants.writer_admit(alice, upload.pk, f"specific.writer!{upload.pk}")
            except Exception as refusal:
                results["admit"] = refusal
            finally:
                connections.close_all()

        def cancel(upload=upload, barrier=barrier, results=results):
            try:
                barrier.wait(5)
                results["cancel"] = upload_delete(alice, upload.pk)
            finally:
                connections.close_all()

        threads = [threading.Thread(target=admit), threading.Thread(target=cancel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

        assert Upload.objects.get(pk=upload.pk).status == Upload.Status.CANCELLED
        assert not Slot.objects.active().filter(upload=upload).exists(), f"round {round_}: {results}"
        grant = results["admit"]
        if isinstance(grant, grants.WriterGrant):
            # Admitted before the cancel committed: fenced off now, it can change nothing.
            with pytest.raises(NotUploading):
                grants.writer_check(grant)
        outcomes.append(type(grant).__name__)
    assert outcomes  # which side won varies per round and backend; every round held the invariant
