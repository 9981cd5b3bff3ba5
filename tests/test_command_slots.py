"""`manage.py slots status|reap|reset`: thin commands over uploads.slots, safe to rerun."""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from uploads.models import Slot, Upload
from uploads.slots import lease_duration, slot_admit
from uploads.transfers import upload_create


def slots(*args) -> str:
    out = StringIO()
    call_command("slots", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def long_ago():
    """An admission time whose lease has long run out."""
    return timezone.now() - 2 * lease_duration()


@pytest.fixture
def live_upload(bob):
    upload, _slot = upload_create(bob, filename="live.bin", size=10)
    return upload


@pytest.fixture
def stuck_upload(alice, long_ago):
    upload, _slot = upload_create(alice, filename="stuck.bin", size=10, now=long_ago)
    return upload


@pytest.fixture
def stuck_and_live(live_upload, alice, long_ago):
    """One stuck slot beside a live one. The live one comes first: every admission reaps expired leases."""
    stuck, _slot = upload_create(alice, filename="stuck.bin", size=10, now=long_ago)
    return stuck, live_upload


def active(**filters):
    return Slot.objects.active().filter(**filters)


def test_status_json_counts_active_stuck_and_per_user_slots(alice, bob, stuck_and_live):
    slot_admit(Slot.Kind.DOWNLOAD, alice)

    summary = json.loads(slots("status", "--json"))

    assert summary["upload"] == {"limit": 20, "active": 2, "stuck": 1, "by_user": {"alice": 1, "bob": 1}}
    assert summary["download"] == {"limit": 30, "active": 1, "stuck": 0, "by_user": {"alice": 1}}


def test_status_changes_nothing(stuck_and_live):
    before = list(Slot.objects.values_list("pk", "released_at", "lease_expires_at", "generation"))

    slots("status")

    assert list(Slot.objects.values_list("pk", "released_at", "lease_expires_at", "generation")) == before


def test_reap_releases_only_expired_slots_and_fences_their_writers(stuck_and_live):
    stuck_upload, live_upload = stuck_and_live
    generation = stuck_upload.writer_generation

    slots("reap")

    reaped = Slot.objects.get(upload=stuck_upload)
    assert reaped.released_at is not None
    assert reaped.release_reason == Slot.ReleaseReason.EXPIRED
    assert Upload.objects.get(pk=stuck_upload.pk).writer_generation == generation + 1
    assert active(upload=live_upload).count() == 1


def test_reap_dry_run_changes_nothing(stuck_upload):
    slots("reap", "--dry-run")

    assert active(upload=stuck_upload).count() == 1
    assert Upload.objects.get(pk=stuck_upload.pk).writer_generation == stuck_upload.writer_generation


def test_reap_is_safe_to_rerun(stuck_upload):
    slots("reap")
    released_at = Slot.objects.get(upload=stuck_upload).released_at

    slots("reap")

    assert Slot.objects.get(upload=stuck_upload).released_at == released_at
    assert Upload.objects.get(pk=stuck_upload.pk).writer_generation == stuck_upload.writer_generation + 1


def test_reset_user_releases_only_that_users_live_slots(alice, bob, live_upload):
    mine, _slot = upload_create(alice, filename="a.bin", size=10)

    slots("reset", "--user", "bob")

    assert active(user=bob).count() == 0
    assert Slot.objects.get(upload=live_upload).release_reason == Slot.ReleaseReason.RESET
    assert Upload.objects.get(pk=live_upload.pk).writer_generation == live_upload.writer_generation + 1
    assert active(upload=mine).count() == 1


def test_reset_upload_releases_only_that_uploads_slot(alice):
    first, _slot = upload_create(alice, filename="a.bin", size=10)
    second, _slot = upload_create(alice, filename="b.bin", size=10)

    slots("reset", "--upload", str(first.pk))

    assert active(upload=first).count() == 0
    assert active(upload=second).count() == 1


def test_reset_all_releases_every_active_slot(alice, stuck_and_live):
    slot_admit(Slot.Kind.DOWNLOAD, alice)

    slots("reset", "--all")

    assert active().count() == 0
    assert set(Slot.objects.values_list("release_reason", flat=True)) == {Slot.ReleaseReason.RESET}


def test_reset_dry_run_changes_nothing(stuck_and_live):
    _stuck, live_upload = stuck_and_live

    slots("reset", "--all", "--dry-run")

    assert active().count() == 2
    assert Upload.objects.get(pk=live_upload.pk).writer_generation == live_upload.writer_generation


def test_reset_is_safe_to_rerun(live_upload):
    slots("reset", "--all")

    slots("reset", "--all")

    assert Slot.objects.get(upload=live_upload).release_reason == Slot.ReleaseReason.RESET
    assert Upload.objects.get(pk=live_upload.pk).writer_generation == live_upload.writer_generation + 1


def test_reset_needs_exactly_one_scope(live_upload):
    with pytest.raises(CommandError):
        slots("reset")
    with pytest.raises(CommandError):
        slots("reset", "--all", "--user", "bob")

    assert active().count() == 1


@pytest.mark.parametrize("scope", [["--user", "nobody"], ["--upload", "not-a-uuid"], ["--upload", "0" * 32]])
def test_reset_of_an_unknown_user_or_upload_fails_and_changes_nothing(live_upload, scope):
    with pytest.raises(CommandError):
        slots("reset", *scope)

    assert active().count() == 1
