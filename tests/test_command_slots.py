"""`manage.py slots status|reap|reset|prune`: thin commands over uploads.services.slots, safe to rerun."""

import json
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from uploads.models import Slot, Upload
from uploads.services.slots import lease_duration, slot_admit, slot_release, slots_prune
from uploads.services.uploads import upload_create


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


# --- prune: released rows older than DIRECTDRIVEX_SLOT_HISTORY_DAYS ------------------


def released_days_ago(user, days: float, **admit) -> Slot:
    """A slot admitted and released ``days`` ago, as a finished transfer leaves it."""
    when = timezone.now() - timedelta(days=days)
    slot = slot_admit(Slot.Kind.DOWNLOAD, user, now=when, **admit)
    assert slot_release(slot.pk, Slot.ReleaseReason.COMPLETED, now=when)
    return slot


@pytest.fixture
def history(alice, bob):
    """Two released rows past the 7-day history, one inside it, and two active rows (one long stuck)."""
    old = [released_days_ago(alice, 30), released_days_ago(bob, 8)]
    recent = released_days_ago(alice, 6)
    live, _slot = upload_create(bob, filename="live.bin", size=10)
    # Admitted last: every admission reaps the expired leases of its kind.
    stuck = slot_admit(Slot.Kind.DOWNLOAD, alice, now=timezone.now() - timedelta(days=30))
    return {"old": {s.pk for s in old}, "kept": {recent.pk, stuck.pk, *live.slots.values_list("pk", flat=True)}}


def test_prune_deletes_released_rows_older_than_the_history_and_nothing_else(history):
    slots("prune")

    assert set(Slot.objects.values_list("pk", flat=True)) == history["kept"]
    assert active().count() == 2  # the stuck one too: reaping it is `slots reap`'s job, not prune's


def test_prune_dry_run_counts_and_changes_nothing(history):
    before = set(Slot.objects.values_list("pk", flat=True))

    slots("prune", "--dry-run")
    pruned = slots_prune(dry_run=True)

    assert set(Slot.objects.values_list("pk", flat=True)) == before
    assert pruned.count == len(history["old"])


def test_prune_is_safe_to_rerun(history):
    first = slots_prune()
    slots("prune")
    again = slots_prune()

    assert (first.count, again.count) == (len(history["old"]), 0)
    assert set(Slot.objects.values_list("pk", flat=True)) == history["kept"]


def test_prune_follows_the_history_setting(history, limits):
    limits(slot_history_days=10)

    assert slots_prune().count == 1  # only the 30-day-old row

    assert len(history["old"] & set(Slot.objects.values_list("pk", flat=True))) == 1


def test_prune_keeps_a_row_released_exactly_at_the_cutoff(alice, limits):
    limits(slot_history_days=7)
    slot = released_days_ago(alice, 7)
    released_at = Slot.objects.get(pk=slot.pk).released_at

    assert slots_prune(now=released_at + timedelta(days=7)).count == 0
    assert slots_prune(now=released_at + timedelta(days=7, microseconds=1)).count == 1
    assert not Slot.objects.filter(pk=slot.pk).exists()


def test_prune_deletes_in_batches_and_leaves_the_uploads(alice, monkeypatch):
    monkeypatch.setattr("uploads.services.slots.PRUNE_BATCH", 2)
    upload, slot = upload_create(alice, filename="a.bin", size=10, now=timezone.now() - timedelta(days=9))
    slot_release(slot.pk, Slot.ReleaseReason.DISCONNECTED, now=timezone.now() - timedelta(days=9))
    for _ in range(4):
        released_days_ago(alice, 9, upload=upload)

    assert slots_prune().count == 5

    assert not Slot.objects.exists()
    assert Upload.objects.get(pk=upload.pk).status == Upload.Status.UPLOADING


def test_reap_json_lists_what_it_reaped_for_scripts(stuck_and_live):
    stuck, _live = stuck_and_live

    dry = json.loads(slots("reap", "--dry-run", "--json"))
    done = json.loads(slots("reap", "--json"))
    again = json.loads(slots("reap", "--json"))

    assert (dry["action"], dry["dry_run"], [s["upload"] for s in dry["slots"]]) == ("reap", True, [str(stuck.pk)])
    assert (done["dry_run"], done["count"], [s["upload"] for s in done["slots"]]) == (False, 1, [str(stuck.pk)])
    assert again["count"] == 0 and again["slots"] == []
    assert not active(upload=stuck).exists()


def test_reset_json_lists_the_slots_it_released(alice, live_upload):
    document = json.loads(slots("reset", "--upload", str(live_upload.pk), "--json"))

    [slot] = document["slots"]
    assert (document["action"], document["count"]) == ("reset", 1)
    assert (slot["upload"], slot["kind"]) == (str(live_upload.pk), "upload")
    assert not active(upload=live_upload).exists()


def test_prune_json_counts_what_it_deleted(history):
    dry = json.loads(slots("prune", "--dry-run", "--json"))
    done = json.loads(slots("prune", "--json"))

    assert dry["dry_run"] is True and dry["count"] == done["count"] > 0
    assert json.loads(slots("prune", "--json"))["count"] == 0
    assert "cutoff" in done
