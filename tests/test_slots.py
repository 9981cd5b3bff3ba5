"""Slot services (uploads.services.slots): admission limits, release, lease expiry, reaping, resets, the summary."""

from datetime import timedelta

import pytest
from django.utils import timezone

from tests.conftest import make_user
from uploads.exceptions import (
    DownloadSlotsExhausted,
    GlobalSlotsExhausted,
    LeaseLost,
    UploadBusy,
    UserDownloadSlotsExhausted,
    UserSlotsExhausted,
)
from uploads.models import Slot, Upload
from uploads.services.slots import slot_admit, slot_release, slot_renew, slots_reap, slots_reset, slots_summary
from uploads.services.uploads import upload_create

UPLOAD = Slot.Kind.UPLOAD
DOWNLOAD = Slot.Kind.DOWNLOAD
LEASE = timedelta(seconds=60)


@pytest.fixture
def t0():
    return timezone.now()


@pytest.fixture
def users(db):
    """Four more users besides alice and bob, for the global limit."""
    return [make_user(name) for name in ("carol", "dave", "erin", "frank")]


def active_uploads(user=None):
    slots = Slot.objects.active().filter(kind=UPLOAD)
    return slots.filter(user=user) if user is not None else slots


def test_sixth_concurrent_slot_of_a_user_is_refused_with_retry_after(alice, t0):
    for _ in range(5):
        slot_admit(UPLOAD, alice, now=t0)

    with pytest.raises(UserSlotsExhausted) as refused:
        slot_admit(UPLOAD, alice, now=t0 + timedelta(seconds=10))

    assert refused.value.code == "user_slots_exhausted"
    assert refused.value.http_status == 429
    # The earliest lease runs out 60 s after t0, 50 s after the refusal.
    assert refused.value.retry_after == 50
    assert active_uploads(alice).count() == 5


def test_a_user_at_the_limit_does_not_block_other_users(alice, bob, t0):
    for _ in range(5):
        slot_admit(UPLOAD, alice, now=t0)

    slot = slot_admit(UPLOAD, bob, now=t0)

    assert slot.user == bob
    assert active_uploads().count() == 6


def test_twenty_first_slot_globally_is_refused_with_retry_after(alice, bob, users, t0):
    for user in [alice, bob, users[0], users[1]]:
        for _ in range(5):
            slot_admit(UPLOAD, user, now=t0)

    with pytest.raises(GlobalSlotsExhausted) as refused:
        slot_admit(UPLOAD, users[2], now=t0 + timedelta(seconds=1))

    assert refused.value.code == "global_slots_exhausted"
    assert refused.value.retry_after == 59
    assert active_uploads().count() == 20
    assert not active_uploads(users[2]).exists()


def test_small_limits_come_from_settings(alice, bob, limits, t0):
    limits(global_upload_slots=3, user_upload_slots=2)
    slot_admit(UPLOAD, alice, now=t0)
    slot_admit(UPLOAD, alice, now=t0)

    with pytest.raises(UserSlotsExhausted):
        slot_admit(UPLOAD, alice, now=t0)
    slot_admit(UPLOAD, bob, now=t0)
    with pytest.raises(GlobalSlotsExhausted):
        slot_admit(UPLOAD, bob, now=t0)

    assert active_uploads().count() == 3


def test_global_and_user_indexes_of_active_slots_are_distinct(alice, bob, limits, t0):
    limits(global_upload_slots=4, user_upload_slots=2)
    slots = [slot_admit(UPLOAD, user, now=t0) for user in (alice, alice, bob, bob)]

    assert sorted(slot.global_index for slot in slots) == [0, 1, 2, 3]
    assert sorted(slot.user_index for slot in slots if slot.user == alice) == [0, 1]
    assert sorted(slot.user_index for slot in slots if slot.user == bob) == [0, 1]


def test_release_frees_a_slot_for_the_next_admission(alice, t0):
    slots = [slot_admit(UPLOAD, alice, now=t0) for _ in range(5)]
    with pytest.raises(UserSlotsExhausted):
        slot_admit(UPLOAD, alice, now=t0)

    assert slot_release(slots[2].pk, Slot.ReleaseReason.CANCELLED, now=t0) is True
    again = slot_admit(UPLOAD, alice, now=t0)

    released = Slot.objects.get(pk=slots[2].pk)
    assert released.released_at == t0
    assert released.release_reason == Slot.ReleaseReason.CANCELLED
    assert again.user_index == slots[2].user_index
    assert active_uploads(alice).count() == 5


def test_releasing_twice_or_with_another_generation_changes_nothing(alice, t0):
    slot = slot_admit(UPLOAD, alice, now=t0)

    assert slot_release(slot.pk, Slot.ReleaseReason.ERROR, generation=slot.generation + 1, now=t0) is False
    assert Slot.objects.get(pk=slot.pk).released_at is None
    assert slot_release(slot.pk, Slot.ReleaseReason.COMPLETED, now=t0) is True
    assert slot_release(slot.pk, Slot.ReleaseReason.ERROR, now=t0 + LEASE) is False

    released = Slot.objects.get(pk=slot.pk)
    assert (released.released_at, released.release_reason) == (t0, Slot.ReleaseReason.COMPLETED)


def test_an_expired_lease_is_reclaimed_by_the_next_admission(alice, t0):
    stale = [slot_admit(UPLOAD, alice, now=t0) for _ in range(5)]
    later = t0 + LEASE

    fresh = slot_admit(UPLOAD, alice, now=later)

    assert fresh.lease_expires_at == later + LEASE
    for slot in stale:
        slot.refresh_from_db()
        assert slot.released_at == later
        assert slot.release_reason == Slot.ReleaseReason.EXPIRED
    assert list(active_uploads(alice)) == [fresh]


def test_a_lease_is_live_until_its_last_second(alice, t0):
    for _ in range(5):
        slot_admit(UPLOAD, alice, now=t0)

    with pytest.raises(UserSlotsExhausted) as refused:
        slot_admit(UPLOAD, alice, now=t0 + LEASE - timedelta(seconds=1))

    assert refused.value.retry_after == 1
    assert active_uploads(alice).count() == 5


def test_the_slot_held_by_post_expires_with_its_lease(alice, t0):
    upload, slot = upload_create(alice, filename="a.bin", size=10, now=t0)

    assert slots_reap(now=t0 + LEASE - timedelta(seconds=1)) == []
    reaped = slots_reap(now=t0 + LEASE)

    assert [s.pk for s in reaped] == [slot.pk]
    slot.refresh_from_db()
    assert slot.release_reason == Slot.ReleaseReason.EXPIRED
    upload.refresh_from_db()
    # The upload stays resumable; only its writer generation moved, fencing any holder.
    assert upload.status == Upload.Status.UPLOADING
    assert upload.writer_generation == 1


def test_reap_dry_run_reports_without_releasing(alice, t0):
    slot = slot_admit(UPLOAD, alice, now=t0)

    found = slots_reap(dry_run=True, now=t0 + LEASE)

    assert [s.pk for s in found] == [slot.pk]
    assert Slot.objects.get(pk=slot.pk).released_at is None


def test_reap_takes_only_expired_slots_of_every_kind(alice, bob, t0):
    old_upload = slot_admit(UPLOAD, alice, now=t0)
    old_download = slot_admit(DOWNLOAD, bob, now=t0)
    young = slot_admit(UPLOAD, bob, now=t0 + timedelta(seconds=30))

    reaped = slots_reap(now=t0 + LEASE)

    assert sorted(s.pk for s in reaped) == sorted([old_upload.pk, old_download.pk])
    assert list(Slot.objects.active()) == [young]
    assert slots_reap(now=t0 + LEASE) == []


def test_renew_extends_the_lease_of_a_live_slot(alice, t0):
    slot = slot_admit(UPLOAD, alice, now=t0)

    expires = slot_renew(slot.pk, slot.generation, now=t0 + timedelta(seconds=50))

    assert expires == t0 + timedelta(seconds=110)
    assert Slot.objects.get(pk=slot.pk).lease_expires_at == expires
    assert slots_reap(now=t0 + LEASE) == []


def test_renew_of_a_released_slot_raises_lease_lost(alice, t0):
    slot = slot_admit(UPLOAD, alice, now=t0)
    slot_release(slot.pk, Slot.ReleaseReason.DISCONNECTED, now=t0)

    with pytest.raises(LeaseLost):
        slot_renew(slot.pk, slot.generation, now=t0 + timedelta(seconds=1))

    assert Slot.objects.get(pk=slot.pk).lease_expires_at == t0 + LEASE


def test_reset_of_a_user_releases_only_their_slots(alice, bob, t0):
    mine = [slot_admit(UPLOAD, alice, now=t0), slot_admit(DOWNLOAD, alice, now=t0)]
    theirs = slot_admit(UPLOAD, bob, now=t0)

    reset = slots_reset(user=alice, now=t0)

    assert sorted(s.pk for s in reset) == sorted(s.pk for s in mine)
    assert set(Slot.objects.filter(pk__in=[s.pk for s in mine]).values_list("release_reason", flat=True)) == {"reset"}
    assert list(Slot.objects.active()) == [theirs]


def test_reset_of_an_upload_fences_its_writer(alice, t0):
    upload, _slot = upload_create(alice, filename="a.bin", size=10, now=t0)
    other, other_slot = upload_create(alice, filename="b.bin", size=10, now=t0)

    slots_reset(upload=upload, now=t0)

    assert Upload.objects.get(pk=upload.pk).writer_generation == upload.writer_generation + 1
    assert Upload.objects.get(pk=other.pk).writer_generation == other.writer_generation
    assert list(Slot.objects.active()) == [other_slot]


def test_reset_everything_and_its_dry_run(alice, bob, t0):
    slots = [slot_admit(UPLOAD, alice, now=t0), slot_admit(UPLOAD, bob, now=t0)]

    assert len(slots_reset(everything=True, dry_run=True, now=t0)) == 2
    assert Slot.objects.active().count() == 2
    assert sorted(s.pk for s in slots_reset(everything=True, now=t0)) == sorted(s.pk for s in slots)
    assert not Slot.objects.active().exists()
    assert slots_reset(everything=True, now=t0) == []


def test_reset_without_a_scope_is_refused(alice, t0):
    slot_admit(UPLOAD, alice, now=t0)

    with pytest.raises(ValueError):
        slots_reset(now=t0)

    assert Slot.objects.active().count() == 1


def test_an_upload_never_holds_two_active_upload_slots(alice, t0):
    upload, slot = upload_create(alice, filename="a.bin", size=10, now=t0)

    with pytest.raises(UploadBusy) as refused:
        slot_admit(UPLOAD, alice, upload=upload, now=t0 + timedelta(seconds=20))

    # Soon, not after the whole lease: the slot in the way may be freed any moment.
    assert refused.value.retry_after == 2
    assert list(Slot.objects.active()) == [slot]


def test_download_slots_have_a_per_user_limit_under_the_global_one(alice, bob, limits, t0):
    limits(global_download_slots=7, user_download_slots=4)
    alices = [slot_admit(DOWNLOAD, alice, now=t0) for _ in range(4)]

    with pytest.raises(UserDownloadSlotsExhausted) as mine:
        slot_admit(DOWNLOAD, alice, now=t0)
    bobs = [slot_admit(DOWNLOAD, bob, now=t0) for _ in range(3)]
    with pytest.raises(DownloadSlotsExhausted) as everyones:
        slot_admit(DOWNLOAD, bob, now=t0)

    # One code for downloads either way (the spec's); the detail says whose limit it is.
    assert (mine.value.code, everyones.value.code) == ("download_slots_exhausted", "download_slots_exhausted")
    assert "You already have" in mine.value.detail
    assert not isinstance(everyones.value, UserDownloadSlotsExhausted)
    assert sorted(slot.user_index for slot in alices) == [0, 1, 2, 3]
    assert sorted(slot.user_index for slot in bobs) == [0, 1, 2]
    # Upload slots are counted apart.
    slot_admit(UPLOAD, alice, now=t0)


def test_summary_counts_limits_active_stuck_and_users(alice, bob, staff):
    now = timezone.now()
    slot_admit(UPLOAD, alice, now=now)
    slot_admit(UPLOAD, alice, now=now)
    slot_admit(UPLOAD, bob, now=now)
    slot_admit(DOWNLOAD, staff, now=now)
    released = slot_admit(UPLOAD, staff, now=now)
    slot_release(released.pk, Slot.ReleaseReason.COMPLETED, now=now)
    # Admitted last and in the past, so no admission reaped it: stuck until the reaper runs.
    slot_admit(UPLOAD, bob, now=now - 2 * LEASE)

    summary = slots_summary(now=now)

    assert summary == {
        "upload": {"limit": 20, "active": 4, "stuck": 1, "by_user": {"alice": 2, "bob": 2}},
        "download": {"limit": 30, "active": 1, "stuck": 0, "by_user": {"staff": 1}},
    }
