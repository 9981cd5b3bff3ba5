"""Fencing: a writer whose slot was reaped, reset or cancelled can change nothing any more.

Writers are admitted and commit through uploads.services.grants (writer_*); the slot
side is uploads.services.slots. Every stale call must raise the named refusal and leave
the slot and upload rows exactly as they were.
"""

from datetime import timedelta

import pytest
from django.forms.models import model_to_dict
from django.utils import timezone

from tests.conftest import write_part
from tests.support import stored
from uploads.exceptions import LeaseLost, NotUploading, UploadBusy
from uploads.models import Slot, Upload
from uploads.services.grants import writer_admit, writer_commit, writer_complete, writer_fail, writer_release
from uploads.services.slots import slot_renew, slots_reap, slots_reset
from uploads.services.uploads import upload_create, upload_delete

LEASE = timedelta(seconds=60)


@pytest.fixture
def t0():
    return timezone.now()


@pytest.fixture
def upload(alice, t0):
    upload, _slot = upload_create(alice, filename="big.iso", size=1000, now=t0)
    return upload


def rows(upload):
    """Everything a stale writer could touch: the upload row and all its slot rows."""
    return (
        model_to_dict(Upload.objects.get(pk=upload.pk)),
        [model_to_dict(slot) for slot in Slot.objects.filter(upload=upload).order_by("pk")],
    )


def test_the_first_writer_claims_the_slot_reserved_by_post(alice, upload, t0):
    reserved = Slot.objects.active().get(upload=upload)

    grant = writer_admit(alice, upload.pk, "chan-1", now=t0 + timedelta(seconds=5))

    slot = Slot.objects.active().get(upload=upload)
    assert grant.slot_id == reserved.pk == slot.pk
    assert slot.holder_channel == "chan-1"
    assert grant.generation == slot.generation == Upload.objects.get(pk=upload.pk).writer_generation == 1
    assert slot.lease_expires_at == grant.lease_expires_at == t0 + timedelta(seconds=5) + LEASE


def test_a_current_writer_commits_offset_and_renews_lease(alice, upload, t0):
    grant = writer_admit(alice, upload.pk, "chan-1", now=t0)

    expires = writer_commit(grant, 400, now=t0 + timedelta(seconds=30))

    assert expires == t0 + timedelta(seconds=30) + LEASE
    assert Upload.objects.get(pk=upload.pk).offset == 400
    assert Slot.objects.get(pk=grant.slot_id).lease_expires_at == expires


def test_a_second_writer_while_the_first_is_live_is_busy(alice, upload, t0):
    grant = writer_admit(alice, upload.pk, "chan-1", now=t0)
    before = rows(upload)

    with pytest.raises(UploadBusy) as early:
        writer_admit(alice, upload.pk, "chan-2", now=t0 + timedelta(seconds=45))
    with pytest.raises(UploadBusy) as late:
        writer_admit(alice, upload.pk, "chan-2", now=t0 + timedelta(seconds=59.5))

    # Ask again soon (the holder may be a connection that is ending), never after its lease.
    assert (early.value.retry_after, late.value.retry_after) == (2, 1)
    assert rows(upload) == before
    writer_commit(grant, 10, now=t0 + timedelta(seconds=46))


def test_after_reap_the_stale_writer_can_neither_renew_nor_commit(alice, upload, t0):
    grant = writer_admit(alice, upload.pk, "chan-1", now=t0)
    writer_commit(grant, 100, now=t0)
    later = t0 + LEASE + timedelta(seconds=1)
    assert [s.pk for s in slots_reap(now=later)] == [grant.slot_id]
    before = rows(upload)

    with pytest.raises(LeaseLost):
        slot_renew(grant.slot_id, grant.generation, now=later)
    with pytest.raises(LeaseLost):
        writer_commit(grant, 900, now=later)
    with pytest.raises(LeaseLost):
        writer_complete(grant, now=later)
    assert writer_release(grant, Slot.ReleaseReason.DISCONNECTED, now=later) is False

    assert rows(upload) == before
    assert before[0]["offset"] == 100
    assert before[0]["status"] == Upload.Status.UPLOADING


def test_after_a_takeover_the_old_writer_cannot_touch_the_new_writers_state(alice, upload, t0):
    old = writer_admit(alice, upload.pk, "chan-1", now=t0)
    writer_commit(old, 100, now=t0)
    later = t0 + LEASE + timedelta(seconds=1)
    new = writer_admit(alice, upload.pk, "chan-2", now=later)
    writer_commit(new, 300, now=later)
    before = rows(upload)

    with pytest.raises(LeaseLost):
        slot_renew(old.slot_id, old.generation, now=later)
    with pytest.raises(LeaseLost):
        slot_renew(new.slot_id, old.generation, now=later)
    with pytest.raises(LeaseLost):
        writer_commit(old, 999, now=later)
    with pytest.raises(LeaseLost):
        writer_complete(old, now=later)
    assert writer_release(old, Slot.ReleaseReason.DISCONNECTED, now=later) is False

    assert new.generation > old.generation
    assert rows(upload) == before
    assert Slot.objects.active().get(upload=upload).holder_channel == "chan-2"


@pytest.mark.parametrize("scope", ["upload", "user", "everything"])
def test_after_reset_the_writer_can_neither_renew_nor_commit(alice, upload, t0, scope):
    grant = writer_admit(alice, upload.pk, "chan-1", now=t0)
    writer_commit(grant, 250, now=t0)
    scopes = {"upload": {"upload": upload}, "user": {"user": alice}, "everything": {"everything": True}}
    # Well within the lease: only the reset takes it away.
    soon = t0 + timedelta(seconds=5)
    assert [s.pk for s in slots_reset(now=soon, **scopes[scope])] == [grant.slot_id]
    before = rows(upload)

    with pytest.raises(LeaseLost):
        slot_renew(grant.slot_id, grant.generation, now=soon)
    with pytest.raises(LeaseLost):
        writer_commit(grant, 500, now=soon)
    with pytest.raises(LeaseLost):
        writer_complete(grant, now=soon)

    assert rows(upload) == before
    assert before[0]["offset"] == 250
    assert before[1][0]["release_reason"] == Slot.ReleaseReason.RESET


def test_after_reset_a_new_writer_resumes_from_the_durable_offset(alice, upload, t0):
    grant = writer_admit(alice, upload.pk, "chan-1", now=t0)
    writer_commit(grant, 250, now=t0)
    slots_reset(upload=upload, now=t0)

    again = writer_admit(alice, upload.pk, "chan-2", now=t0)

    assert again.offset == 250
    assert again.generation > grant.generation


def test_after_cancel_the_writer_gets_not_uploading_and_changes_nothing(alice, upload, t0):
    grant = writer_admit(alice, upload.pk, "chan-1", now=t0)
    writer_commit(grant, 100, now=t0)
    upload_delete(alice, upload.pk, now=t0)
    before = rows(upload)

    with pytest.raises(NotUploading):
        writer_commit(grant, 200, now=t0)
    with pytest.raises(NotUploading):
        writer_complete(grant, now=t0)

    assert rows(upload) == before
    assert before[0]["status"] == Upload.Status.CANCELLED
    assert before[1][0]["release_reason"] == Slot.ReleaseReason.CANCELLED


def test_after_the_row_is_deleted_the_writer_gets_not_uploading(alice, upload, t0):
    grant = writer_admit(alice, upload.pk, "chan-1", now=t0)
    upload_delete(alice, upload.pk, now=t0)
    upload_delete(alice, upload.pk, now=t0)
    assert not Upload.objects.filter(pk=upload.pk).exists()

    with pytest.raises(NotUploading) as refused:
        writer_commit(grant, 200, now=t0)

    assert "deleted" in refused.value.detail
    assert not Upload.objects.filter(pk=upload.pk).exists()


def test_a_stale_writers_checksum_failure_fails_nothing_deletes_no_bytes_and_says_lease_lost(alice, upload, t0):
    old = writer_admit(alice, upload.pk, "chan-1", now=t0)
    later = t0 + LEASE
    slots_reap(now=later)
    write_part(upload.storage_key, b"x" * 100, upload.size)
    before, stored_before = rows(upload), stored.snapshot(upload.storage_key)
    assert stored_before != stored.snapshot("nothing-stored-here")  # the part's bytes are in it

    with pytest.raises(LeaseLost):
        writer_fail(old, now=later)

    assert rows(upload) == before
    assert stored.snapshot(upload.storage_key) == stored_before


def test_a_current_writers_checksum_failure_fails_the_upload_and_deletes_its_bytes(alice, upload, t0):
    grant = writer_admit(alice, upload.pk, "chan-1", now=t0)
    write_part(upload.storage_key, b"x" * 1000)

    writer_fail(grant, now=t0)

    upload.refresh_from_db()
    assert upload.status == Upload.Status.FAILED
    assert Slot.objects.get(pk=grant.slot_id).release_reason == Slot.ReleaseReason.FAILED
    assert stored.nothing_stored(upload.storage_key)


def test_complete_frees_the_slot_and_sets_the_offset_to_the_size(alice, upload, t0):
    grant = writer_admit(alice, upload.pk, "chan-1", now=t0)

    writer_complete(grant, now=t0 + timedelta(seconds=3))

    upload.refresh_from_db()
    assert (upload.status, upload.offset, upload.completed_at) == (
        Upload.Status.COMPLETE,
        1000,
        t0 + timedelta(seconds=3),
    )
    assert Slot.objects.get(pk=grant.slot_id).release_reason == Slot.ReleaseReason.COMPLETED
    with pytest.raises(NotUploading):
        writer_admit(alice, upload.pk, "chan-2", now=t0)
