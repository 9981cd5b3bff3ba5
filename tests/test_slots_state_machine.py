"""The slot state machine, explored by hypothesis through the services, checked against the rows after every step.

A small model (plain Python) predicts what each service call must do: admit
or refuse (and with which named refusal), renew or LeaseLost, release or not,
which slots a reap or a reset takes, and which generation fences which writer.
After every step the invariants are checked on the database rows themselves,
and the rows are compared with the model.

Each example runs inside its own savepoint, rolled back in teardown, so every
example starts from an empty database with the same three users.
"""

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from django.db import transaction
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import make_user
from uploads import exceptions
from uploads.models import Slot, Upload
from uploads.services.grants import writer_admit, writer_commit, writer_complete
from uploads.services.slots import (
    BUSY_RETRY_SECONDS,
    slot_admit,
    slot_release,
    slot_renew,
    slots_reap,
    slots_reset,
)
from uploads.services.uploads import upload_create, upload_delete

UPLOAD = Slot.Kind.UPLOAD
DOWNLOAD = Slot.Kind.DOWNLOAD
GLOBAL_UPLOADS = 4
USER_UPLOADS = 2
GLOBAL_DOWNLOADS = 3
USER_DOWNLOADS = 2
LEASE = timedelta(seconds=30)
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
# Three users, so that two of them can fill the global limit while the third is refused.
USERS = ("alice", "bob", "carol")


@dataclass
class ModelSlot:
    kind: str
    user: str
    upload: object  # the Upload's pk, or None for a download slot
    expires: datetime
    generation: int
    holder: str = ""
    reason: str = ""  # empty while active

    @property
    def active(self):
        return not self.reason


@dataclass
class ModelUpload:
    owner: str
    size: int
    status: str = Upload.Status.UPLOADING
    offset: int = 0
    generation: int = 0


class SlotStateMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        # Rolled back in teardown: the next example starts from empty tables.
        self.atomic = transaction.atomic()
        self.atomic.__enter__()
        self.users = {name: make_user(name) for name in USERS}
        self.now = T0
        self.slots: dict[int, ModelSlot] = {}
        self.uploads: dict[object, ModelUpload] = {}
        self.grants = []  # every WriterGrant ever issued, current or stale
        self.channels = 0
        self.seen_generations: dict[object, int] = {}
        self.seen_released: dict[int, tuple] = {}

    def teardown(self):
        transaction.set_rollback(True)
        self.atomic.__exit__(None, None, None)

    # --- the model ---------------------------------------------------------

    def active(self, kind=None):
        return {pk: s for pk, s in self.slots.items() if s.active and (kind is None or s.kind == kind)}

    def revoke(self, pks, reason):
        """What uploads.services.slots._revoke does: release, then bump each upload's fencing generation once."""
        for pk in pks:
            self.slots[pk].reason = reason
        for upload in {self.slots[pk].upload for pk in pks if self.slots[pk].kind == UPLOAD}:
            if upload is not None:
                self.uploads[upload].generation += 1

    def stuck(self, kind=None):
        return sorted(pk for pk, s in self.active(kind).items() if s.expires <= self.now)

    def expected_refusal(self, kind, user):
        """The refusal an admission must raise after reclaiming expired leases, or None if it must succeed."""
        alive = [s for pk, s in self.active(kind).items() if pk not in self.stuck(kind)]
        if kind == DOWNLOAD:
            if sum(s.user == user for s in alive) >= USER_DOWNLOADS:
                return exceptions.UserDownloadSlotsExhausted
            return exceptions.DownloadSlotsExhausted if len(alive) >= GLOBAL_DOWNLOADS else None
        if sum(s.user == user for s in alive) >= USER_UPLOADS:
            return exceptions.UserSlotsExhausted
        if len(alive) >= GLOBAL_UPLOADS:
            return exceptions.GlobalSlotsExhausted
        return None

    def record(self, slot: Slot, kind: str, user: str, upload=None) -> None:
        """A slot just admitted by POST or for a download: unclaimed, generation 0, a full lease."""
        assert slot.pk not in self.slots
        self.slots[slot.pk] = ModelSlot(kind=kind, user=user, upload=upload, expires=self.now + LEASE, generation=0)

    def is_current(self, grant) -> bool:
        """A writer may still write: its slot is active with its generation, and so is its upload."""
        slot, upload = self.slots.get(grant.slot_id), self.uploads[grant.upload_id]
        return (
            slot is not None
            and slot.active
            and slot.generation == grant.generation
            and upload.status == Upload.Status.UPLOADING
            and upload.generation == grant.generation
        )

    def why_fenced(self, upload_pk):
        upload = self.uploads[upload_pk]
        return exceptions.LeaseLost if upload.status == Upload.Status.UPLOADING else exceptions.NotUploading

    # --- rules -------------------------------------------------------------

    @initialize()
    def start_near_the_limits(self):
        """alice at her limit with a live writer, bob with one upload: 3 of 4 upload slots taken.

        Starting near the limits (and with fencing in play) makes every later step
        likely to hit a refusal, a takeover or a reclaim rather than an empty table.
        """
        self.admit("alice", UPLOAD, 1000)
        self.admit("alice", UPLOAD, 2000)
        self.admit("bob", UPLOAD, 3000)
        self.connect(next(iter(self.uploads)))
        assert len(self.active(UPLOAD)) == 3 and len(self.grants) == 1

    @rule(user=st.sampled_from(USERS), kind=st.sampled_from([UPLOAD, DOWNLOAD]), size=st.integers(1, 10_000))
    def admit(self, user, kind, size):
        """POST /api/uploads/ (the upload and its slot, one transaction), or a download slot."""

        def call():
            if kind == UPLOAD:
                return upload_create(self.users[user], filename="f.bin", size=size, now=self.now)
            return slot_admit(DOWNLOAD, self.users[user], now=self.now)

        expected = self.expected_refusal(kind, user)
        if expected is not None:
            with pytest.raises(expected) as refused:
                call()
            assert type(refused.value) is expected  # the user's limit, or everyone's: the detail says which
            assert 1 <= refused.value.retry_after <= LEASE.total_seconds()
            return  # one transaction: nothing kept, not even the reap
        stuck = self.stuck(kind)
        result = call()
        self.revoke(stuck, Slot.ReleaseReason.EXPIRED)
        if kind == UPLOAD:
            upload, slot = result
            self.uploads[upload.pk] = ModelUpload(owner=user, size=size)
            self.record(slot, kind, user, upload.pk)
        else:
            self.record(result, kind, user)

    @precondition(lambda self: self.uploads)
    @rule(data=st.data())
    def claim_writer(self, data):
        """A WebSocket connection asks to become the upload's writer (uploads.services.grants.writer_admit)."""
        unfinished = [p for p, u in self.uploads.items() if u.status == Upload.Status.UPLOADING]
        # Mostly unfinished uploads (the interesting ones), sometimes any (cancelled, complete, deleted).
        anything = data.draw(st.integers(0, 3)) == 0
        self.connect(data.draw(st.sampled_from(unfinished if unfinished and not anything else list(self.uploads))))

    def connect(self, pk):
        upload = self.uploads[pk]
        self.channels += 1
        channel = f"test.channel-{self.channels}"

        def claim():
            return writer_admit(self.users[upload.owner], pk, channel, now=self.now)

        if upload.status != Upload.Status.UPLOADING:
            with pytest.raises(exceptions.UploadNotFound if upload.status is None else exceptions.NotUploading):
                claim()
            return
        current = next((p for p, s in self.active(UPLOAD).items() if s.upload == pk), None)
        if current is not None and self.slots[current].holder and self.slots[current].expires > self.now:
            with pytest.raises(exceptions.UploadBusy) as refused:
                claim()
            # Soon, never past the live holder's lease (the one answer to "is it alive?").
            left = math.ceil((self.slots[current].expires - self.now).total_seconds())
            assert refused.value.retry_after == min(BUSY_RETRY_SECONDS, left)
            return
        if current is not None and self.slots[current].holder:
            previous = current  # its holder's lease ran out: taken over
            current = None
        else:
            previous = None
        if current is None:
            # A fresh admission: it must fit the limits once the old holder and every expired lease are gone.
            after_takeover = {p for p in self.active(UPLOAD) if p != previous}
            alive = [self.slots[p] for p in after_takeover if p not in self.stuck(UPLOAD)]
            if sum(s.user == upload.owner for s in alive) >= USER_UPLOADS:
                with pytest.raises(exceptions.UserSlotsExhausted):
                    claim()
                return
            if len(alive) >= GLOBAL_UPLOADS:
                with pytest.raises(exceptions.GlobalSlotsExhausted):
                    claim()
                return
        grant = claim()
        if previous is not None:
            self.revoke([previous], Slot.ReleaseReason.EXPIRED)
        upload.generation += 1
        if current is None:
            self.revoke([p for p in self.stuck(UPLOAD) if p != previous], Slot.ReleaseReason.EXPIRED)
            assert grant.slot_id not in self.slots
            self.slots[grant.slot_id] = ModelSlot(
                UPLOAD, upload.owner, pk, self.now + LEASE, upload.generation, channel
            )
        else:
            # The slot reserved by POST is claimed in place, whatever its lease said.
            assert grant.slot_id == current
            slot = self.slots[current]
            slot.holder, slot.generation, slot.expires = channel, upload.generation, self.now + LEASE
        assert (grant.generation, grant.offset) == (upload.generation, upload.offset)
        self.grants.append(grant)

    @precondition(lambda self: self.grants)
    @rule(data=st.data(), percent=st.integers(0, 100), finish=st.integers(0, 3))
    def write(self, data, percent, finish):
        """A writer, current or stale, commits an offset (writer_commit) or, now and then, completes."""
        # Mostly the newest grant of an unfinished upload (likely current), sometimes any (likely stale).
        newest = {grant.upload_id: grant for grant in self.grants}
        newest = [g for pk, g in newest.items() if self.uploads[pk].status == Upload.Status.UPLOADING]
        grant = data.draw(st.sampled_from(self.grants if not newest or data.draw(st.integers(0, 2)) == 0 else newest))
        offset = grant.size * percent // 100
        if not self.is_current(grant):
            with pytest.raises(self.why_fenced(grant.upload_id)):
                if finish == 0:
                    writer_complete(grant, now=self.now)
                else:
                    writer_commit(grant, offset, now=self.now)
            return
        upload, slot = self.uploads[grant.upload_id], self.slots[grant.slot_id]
        if finish == 0:
            writer_complete(grant, now=self.now)
            slot.reason = Slot.ReleaseReason.COMPLETED
            upload.status, upload.offset = Upload.Status.COMPLETE, upload.size
        else:
            assert writer_commit(grant, offset, now=self.now) == self.now + LEASE
            # The durable offset never moves back through a commit.
            upload.offset, slot.expires = max(upload.offset, offset), self.now + LEASE

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), stale=st.sampled_from([0, -1, 1]))
    def renew(self, data, stale):
        pk = data.draw(st.sampled_from(sorted(self.slots)))
        slot = self.slots[pk]
        generation = slot.generation + stale
        if not (slot.active and stale == 0):
            with pytest.raises(exceptions.LeaseLost):
                slot_renew(pk, generation, now=self.now)
            return
        assert slot_renew(pk, generation, now=self.now) == self.now + LEASE
        slot.expires = self.now + LEASE

    @precondition(lambda self: self.slots)
    @rule(
        data=st.data(),
        fenced=st.sampled_from(["none", "current", "stale"]),
        reason=st.sampled_from([Slot.ReleaseReason.DISCONNECTED, Slot.ReleaseReason.ERROR]),
    )
    def release(self, data, fenced, reason):
        pk = data.draw(st.sampled_from(sorted(self.slots)))
        slot = self.slots[pk]
        generation = {"none": None, "current": slot.generation, "stale": slot.generation - 1}[fenced]
        released = slot_release(pk, reason, generation=generation, now=self.now)
        assert released == (slot.active and fenced != "stale")
        if released:
            slot.reason = reason

    # Around the lease's end, where "expired" flips (lease_expires_at <= now is stuck), and past it.
    @rule(seconds=st.sampled_from([1, 5, 29, 30, 31, 61]))
    def advance_clock(self, seconds):
        self.now += timedelta(seconds=seconds)

    @rule(dry_run=st.booleans())
    def reap(self, dry_run):
        expected = self.stuck()
        reaped = slots_reap(dry_run=dry_run, now=self.now)
        assert sorted(slot.pk for slot in reaped) == expected
        if not dry_run:
            self.revoke(expected, Slot.ReleaseReason.EXPIRED)

    @rule(data=st.data(), scope=st.sampled_from(["user", "upload", "everything"]), dry_run=st.booleans())
    def reset(self, data, scope, dry_run):
        if scope == "upload" and not self.uploads:
            scope = "everything"
        if scope == "user":
            name = data.draw(st.sampled_from(USERS))
            kwargs, expected = {"user": self.users[name]}, [p for p, s in self.active().items() if s.user == name]
        elif scope == "upload":
            pk = data.draw(st.sampled_from(list(self.uploads)))
            if self.uploads[pk].status is None:
                return  # the row is gone: nothing to pass
            upload = Upload.objects.get(pk=pk)
            kwargs, expected = {"upload": upload}, [p for p, s in self.active().items() if s.upload == pk]
        else:
            kwargs, expected = {"everything": True}, list(self.active())
        reset = slots_reset(dry_run=dry_run, now=self.now, **kwargs)
        assert sorted(slot.pk for slot in reset) == sorted(expected)
        if not dry_run:
            self.revoke(expected, Slot.ReleaseReason.RESET)

    @precondition(lambda self: any(u.status is not None for u in self.uploads.values()))
    @rule(data=st.data())
    def delete_upload(self, data):
        """DELETE /api/uploads/<id>/: an unfinished upload is cancelled, anything else deleted."""
        pk = data.draw(st.sampled_from([p for p, u in self.uploads.items() if u.status]))
        upload = self.uploads[pk]
        upload_delete(self.users[upload.owner], pk, now=self.now)
        mine = [p for p, s in self.active().items() if s.upload == pk]
        if upload.status == Upload.Status.UPLOADING:
            self.revoke(mine, Slot.ReleaseReason.CANCELLED)
            upload.status = Upload.Status.CANCELLED
            upload.generation += 1
        else:
            # The row goes, and its slots' history with it (on_delete=CASCADE).
            upload.status = None
            for p in [p for p, s in self.slots.items() if s.upload == pk]:
                del self.slots[p]

    # --- invariants, on the rows ---------------------------------------------

    @invariant()
    def limits_hold_in_the_rows(self):
        active = list(Slot.objects.active())
        uploads = [s for s in active if s.kind == UPLOAD]
        downloads = [s for s in active if s.kind == DOWNLOAD]
        assert len(uploads) <= GLOBAL_UPLOADS
        assert len(downloads) <= GLOBAL_DOWNLOADS
        for name, user in self.users.items():
            mine = [s for s in uploads if s.user_id == user.pk]
            assert len(mine) <= USER_UPLOADS, name
            assert len({s.user_index for s in mine}) == len(mine), name
            assert all(0 <= s.user_index < USER_UPLOADS for s in mine), name
            theirs = [s for s in downloads if s.user_id == user.pk]
            assert len({s.user_index for s in theirs}) == len(theirs) <= USER_DOWNLOADS, name
        writers = [s.upload_id for s in uploads]
        assert len(set(writers)) == len(writers), "two active upload slots for one upload"
        for kind, limit in ((UPLOAD, GLOBAL_UPLOADS), (DOWNLOAD, GLOBAL_DOWNLOADS)):
            indexes = [s.global_index for s in active if s.kind == kind]
            assert len(set(indexes)) == len(indexes)
            assert all(0 <= i < limit for i in indexes)

    @invariant()
    def released_rows_have_reasons_and_never_come_back(self):
        assert not Slot.objects.active().exclude(release_reason="").exists()
        assert not Slot.objects.released().filter(release_reason="").exists()
        released = {
            pk: (at, reason)
            for pk, at, reason in Slot.objects.released().values_list("pk", "released_at", "release_reason")
        }
        for pk, before in self.seen_released.items():
            if self.slots.get(pk) is not None:
                assert released.get(pk) == before, f"slot {pk} changed after its release"
        self.seen_released = released

    @invariant()
    def at_most_one_current_writer_per_upload(self):
        """Only a grant whose generation is the upload's and whose slot is active can still write."""
        generations = dict(Upload.objects.values_list("pk", "writer_generation"))
        live = dict(Slot.objects.active().values_list("pk", "generation"))
        for pk, generation in generations.items():
            current = [g for g in self.grants if g.upload_id == pk and g.generation == generation and g.slot_id in live]
            assert len(current) <= 1, current
            assert generation >= self.seen_generations.get(pk, 0), "a fencing generation went backwards"
        # An active upload slot always carries its upload's current generation.
        for slot in Slot.objects.active().filter(kind=UPLOAD):
            assert slot.generation == generations[slot.upload_id], slot
        self.seen_generations = generations

    @invariant()
    def rows_match_the_model(self):
        rows = {
            slot.pk: ModelSlot(
                kind=slot.kind,
                user=slot.user.username,
                upload=slot.upload_id,
                expires=slot.lease_expires_at,
                generation=slot.generation,
                holder=slot.holder_channel,
                reason=slot.release_reason,
            )
            for slot in Slot.objects.select_related("user")
        }
        assert rows == self.slots
        uploads = {
            upload.pk: (upload.status, upload.offset, upload.writer_generation) for upload in Upload.objects.all()
        }
        expected = {pk: (u.status, u.offset, u.generation) for pk, u in self.uploads.items() if u.status is not None}
        assert uploads == expected


@pytest.mark.django_db
def test_slot_state_machine_keeps_its_invariants(limits):
    limits(
        global_upload_slots=GLOBAL_UPLOADS,
        user_upload_slots=USER_UPLOADS,
        global_download_slots=GLOBAL_DOWNLOADS,
        user_download_slots=USER_DOWNLOADS,
        slot_lease_seconds=int(LEASE.total_seconds()),
    )
    run_state_machine_as_test(
        SlotStateMachine,
        settings=hypothesis_settings(
            max_examples=50,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
