"""Unfinished uploads idle for DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS expire: slot freed, bytes deleted, quota back."""

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from tests.conftest import write_part
from tests.support import stored
from uploads.models import Slot, Upload
from uploads.services.grants import writer_admit, writer_commit
from uploads.services.quota import quota_used
from uploads.services.uploads import upload_create, upload_end, uploads_expire
from uploads.storage import local

pytestmark = pytest.mark.django_db


@pytest.fixture
def day(limits):
    limits(upload_expiry_seconds=86400)
    return timedelta(seconds=86400)


def idle_upload(user, name: str, *, idle_for: timedelta) -> Upload:
    upload, _slot = upload_create(user, filename=name, size=100, now=timezone.now() - idle_for)
    write_part(upload.storage_key, b"x" * 10, upload.size)
    return upload


def test_idle_upload_expires_with_its_bytes_slot_and_quota(alice, day):
    stale = idle_upload(alice, "stale.bin", idle_for=day + timedelta(minutes=1))
    fresh = idle_upload(alice, "fresh.bin", idle_for=day - timedelta(minutes=1))

    expired = uploads_expire()

    assert [upload.pk for upload in expired] == [stale.pk]
    assert Upload.objects.get(pk=stale.pk).status == "expired"
    assert stored.nothing_stored(stale.storage_key)
    assert not Slot.objects.active().filter(upload=stale).exists()
    assert Upload.objects.get(pk=fresh.pk).status == "uploading"
    assert stored.part_stored(fresh.storage_key)
    assert quota_used(alice) == fresh.size


def test_dry_run_lists_and_changes_nothing(alice, day):
    stale = idle_upload(alice, "stale.bin", idle_for=day * 2)
    assert [upload.pk for upload in uploads_expire(dry_run=True)] == [stale.pk]
    assert Upload.objects.get(pk=stale.pk).status == "uploading"
    assert stored.part_stored(stale.storage_key)


def test_upload_written_to_after_it_was_listed_does_not_expire(alice, day):
    stale = idle_upload(alice, "stale.bin", idle_for=day * 2)
    cutoff = timezone.now() - day
    assert [upload.pk for upload in uploads_expire(dry_run=True)] == [stale.pk]  # listed as idle...
    grant = writer_admit(alice, stale.pk, "specific.writer!1")
    writer_commit(grant, 10)  # ...then a writer shows up before it is expired

    assert upload_end(stale, Upload.Status.EXPIRED, Slot.ReleaseReason.EXPIRED, idle_since=cutoff) is False
    assert Upload.objects.get(pk=stale.pk).status == "uploading"
    assert Slot.objects.get(pk=grant.slot_id).released_at is None  # the writer keeps its slot and generation
    assert Upload.objects.get(pk=stale.pk).writer_generation == grant.generation
    assert stored.part_stored(stale.storage_key)


def test_ending_an_upload_that_already_completed_changes_nothing(alice):
    upload, slot = upload_create(alice, filename="done.bin", size=10)
    Upload.objects.filter(pk=upload.pk).update(status=Upload.Status.COMPLETE, offset=10)
    stored.plant_finished(upload.storage_key, b"y" * 10)

    assert upload_end(upload, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED) is False
    assert stored.finished_bytes(upload.storage_key) == b"y" * 10  # a finished file is never lost
    assert Slot.objects.get(pk=slot.pk).released_at is None


def test_expire_command_is_safe_to_rerun(alice, day):
    stale = idle_upload(alice, "stale.bin", idle_for=day * 2)
    call_command("uploads", "expire")
    call_command("uploads", "expire")
    assert Upload.objects.get(pk=stale.pk).status == "expired"
    assert Slot.objects.get(upload=stale).release_reason == "expired"


def test_expire_json_lists_the_expired_uploads(alice, day):
    stale = idle_upload(alice, "stale.bin", idle_for=day * 2)
    fresh = idle_upload(alice, "fresh.bin", idle_for=day / 2)
    out = StringIO()

    call_command("uploads", "expire", "--json", stdout=out)

    document = json.loads(out.getvalue())
    assert (document["action"], document["dry_run"], document["count"]) == ("expire", False, 1)
    listed = [(u["id"], u["filename"], u["user"]) for u in document["uploads"]]
    assert listed == [(str(stale.pk), "stale.bin", alice.pk)]
    assert Upload.objects.get(pk=fresh.pk).status == "uploading"


@pytest.mark.local_storage  # a folder planted where the local layout keeps the part
def test_an_upload_whose_bytes_cannot_be_deleted_still_expires_and_the_others_go_on(alice, day, caplog):
    # A folder where the part file should be: unlink() fails (EISDIR), as on a
    # read-only or failing disk. Before, the error stopped the whole pass after the
    # first upload's expiry had committed (and the reaper crash-looped).
    blocked = idle_upload(alice, "blocked.bin", idle_for=day + timedelta(minutes=2))
    local.part_path(blocked.storage_key).unlink()
    local.part_path(blocked.storage_key).mkdir()
    other = idle_upload(alice, "other.bin", idle_for=day + timedelta(minutes=1))

    expired = uploads_expire()

    assert [upload.pk for upload in expired] == [blocked.pk, other.pk]
    assert Upload.objects.get(pk=blocked.pk).status == Upload.Status.EXPIRED
    assert Upload.objects.get(pk=other.pk).status == Upload.Status.EXPIRED
    assert not local.part_path(other.storage_key).exists()
    assert local.part_path(blocked.storage_key).is_dir()  # left for `uploads fsck --repair`
    [line] = [r for r in caplog.records if r.getMessage().startswith("bytes not deleted")]
    assert str(blocked.pk) in line.getMessage()
