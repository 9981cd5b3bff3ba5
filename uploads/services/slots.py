"""Slot services: the only code that admits, renews, releases, reaps and resets slots.

Concurrency rules (see docs/slots.md):

* Limits are enforced by partial unique constraints over active slots
  (uploads.models.Slot.Meta): admission picks a free index and inserts; a lost
  race is an IntegrityError (in a savepoint inside a caller's transaction), and
  we pick again.
* Fencing: granting or revoking a writer bumps ``Upload.writer_generation``;
  offset commits compare-and-swap on it (uploads.services.grants).
* Lock order is always slot rows, then upload rows, so that the reaper, a
  reset, a cancel and an offset commit cannot deadlock one another.
* Whether a slot's holder is alive has one answer, its lease
  (``slot_claim_writer`` says how it is used); notices sent to holders through
  the channel layer (``notify_holders``) only hurry a connection along.
"""

import asyncio
import logging
import math
import os
import random
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, F
from django.utils import timezone

from uploads.exceptions import (
    DirectDriveXError,
    DownloadSlotsExhausted,
    GlobalSlotsExhausted,
    LeaseLost,
    NotUploading,
    ShareDownloadSlotsExhausted,
    UploadBusy,
    UserDownloadSlotsExhausted,
    UserSlotsExhausted,
)
from uploads.models import Slot, Upload
from uploads.services.events import Event, record

log = logging.getLogger(__name__)

# Each retry means another process took the index we picked; with random
# picks among free indexes a handful of attempts is plenty.
ADMIT_ATTEMPTS = 10
# A busy upload's writer may be a connection of the same client that is still
# ending (it frees the slot within a second or two) as well as one that will
# write for hours: ask again soon rather than after the whole lease.
BUSY_RETRY_SECONDS = 2
# Longest a service waits for the channel layer to take its notices to holders
# (all of them together): a stalled Redis must not stall a DELETE, an admin
# action, a reaper pass or an admission. The fence stops the holders anyway.
NOTICE_SECONDS = 2.0


def holder_process() -> str:
    """Who holds a slot, as an operator would look for it: "host:pid" of this server process.

    Computed per call, not at import: a prefork server may have forked since.
    """
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class Limits:
    global_limit: int
    user_limit: int


# The refusal when the user's own slots, or everyone's, are taken: per kind.
EXHAUSTED = {
    Slot.Kind.UPLOAD: (UserSlotsExhausted, GlobalSlotsExhausted),
    Slot.Kind.DOWNLOAD: (UserDownloadSlotsExhausted, DownloadSlotsExhausted),
}


def slot_limits(kind: str) -> Limits:
    if kind == Slot.Kind.UPLOAD:
        return Limits(settings.DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS, settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS)
    return Limits(settings.DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS, settings.DIRECTDRIVEX_USER_DOWNLOAD_SLOTS)


def lease_duration() -> timedelta:
    return timedelta(seconds=settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS)


def _retry_after(slots, now: datetime) -> int:
    """Seconds until the earliest lease among ``slots`` runs out: the soonest one can be reclaimed.

    ``slots`` are rows as read by slot_admit: tuples ending in lease_expires_at.
    """
    lease = settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS
    if not slots:
        return 1
    earliest = min(row[-1] for row in slots)
    return max(1, min(lease, math.ceil((earliest - now).total_seconds())))


def _busy_retry_after(holders, now: datetime) -> int:
    """A busy upload: soon (BUSY_RETRY_SECONDS), or when the holder's lease runs out if that is sooner."""
    return min(BUSY_RETRY_SECONDS, _retry_after(list(holders), now))


def slot_admit(
    kind: str, user, *, upload: Upload | None = None, share=None, holder_channel: str = "", now=None
) -> Slot:
    """Take a free slot of ``kind`` for ``user`` or raise the named *SlotsExhausted refusal.

    With ``share`` (a ShareLink; ``user`` is then the file's owner) the per-user
    limit counts the link's slots, not the owner's: everyone downloading through
    one link is one user, and none of them uses up the owner's own downloads.

    Expired leases of the kind are reclaimed first, so a crashed holder never
    blocks an admission for longer than one lease. The common case is two
    statements: one read of the kind's active slots, one INSERT that the
    partial unique constraints accept or refuse.
    """
    now = now or timezone.now()
    limits = slot_limits(kind)
    nested = transaction.get_connection().in_atomic_block
    if nested and upload is not None:
        # Inside the caller's transaction the reap below and our insert commit
        # together: lock the upload's own active slot first (slot rows first, as
        # everywhere). Otherwise two admissions that each reap the other's
        # upload's stuck slot then each wait, inserting, on the other's
        # uncommitted release in slot_one_writer_per_upload: a deadlock.
        list(Slot.objects.active().filter(upload=upload, kind=kind).select_for_update())
    reaped = False
    for _attempt in range(ADMIT_ATTEMPTS):
        # (global_index, user_id, share_id, user_index, lease_expires_at) of every active slot of the kind.
        active = list(
            Slot.objects.active()
            .filter(kind=kind)
            .values_list("global_index", "user_id", "share_id", "user_index", "lease_expires_at")
        )
        if not reaped and any(expires <= now for *_rest, expires in active):
            with transaction.atomic():  # committed before we insert, unless the caller holds a transaction
                _reap(kind=kind, now=now)
            reaped = True
            continue
        if share is not None:
            mine = [row for row in active if row[2] == share.pk]
        else:
            mine = [row for row in active if row[1] == user.pk and row[2] is None]
        taken = {row[3] for row in mine}
        free = [i for i in range(limits.user_limit) if i not in taken]
        if not free:
            refusal = ShareDownloadSlotsExhausted if share is not None else EXHAUSTED[kind][0]
            raise refusal(retry_after=_retry_after(mine, now))
        user_index = free[0]
        taken = {row[0] for row in active}
        free = [i for i in range(limits.global_limit) if i not in taken]
        if not free:
            raise EXHAUSTED[kind][1](retry_after=_retry_after(active, now))
        fields = {
            "kind": kind,
            "user": user,
            "upload": upload,
            "share": share,
            # Random, so that processes racing for the last few slots spread out.
            "global_index": random.choice(free),
            "user_index": user_index,
            "acquired_at": now,
            "lease_expires_at": now + lease_duration(),
            "generation": upload.writer_generation if upload else 0,
            "holder_channel": holder_channel,
            # A download is held by the process streaming it; an upload reserved by
            # POST has no holder until a connection claims it.
            "holder_process": holder_process() if holder_channel or kind == Slot.Kind.DOWNLOAD else "",
        }
        try:
            if nested:
                # A savepoint: losing the race for an index rolls back only this insert.
                with transaction.atomic():
                    slot = Slot.objects.create(**fields)
            else:
                slot = Slot.objects.create(**fields)  # one statement, atomic by itself
        except IntegrityError:
            # Which constraint refused us? Only an upload has one writer
            # (slot_one_writer_per_upload); a download of a file that others
            # download too lost a race for an index like any other slot.
            holder = Slot.objects.active().filter(upload=upload, kind=kind) if kind == Slot.Kind.UPLOAD else None
            if holder is not None and holder.exists():
                raise UploadBusy(retry_after=_busy_retry_after(holder.values_list("lease_expires_at"), now)) from None
            continue  # another process took that index between our read and our insert
        record(
            Event.SLOT_ADMITTED,
            kind=kind,
            slot=slot.pk,
            user=user.pk,
            upload=upload and upload.pk,
            generation=slot.generation,
            holder=fields["holder_process"] or None,
        )
        return slot
    # Every attempt lost a race: the slots are churning; ask the caller to come back at once.
    raise EXHAUSTED[kind][1](retry_after=1)


def slot_renew(slot_id: int, generation: int, *, now=None) -> datetime:
    """Extend a lease; raises LeaseLost if the slot was released, reaped or reset since."""
    now = now or timezone.now()
    expires = now + lease_duration()
    renewed = Slot.objects.active().filter(pk=slot_id, generation=generation).update(lease_expires_at=expires)
    if renewed != 1:
        raise LeaseLost()
    return expires


def slot_release(slot_id: int, reason: str, *, generation: int | None = None, now=None) -> bool:
    """Release a slot held by the caller. False if it was already released (by a reap or reset)."""
    now = now or timezone.now()
    slots = Slot.objects.active().filter(pk=slot_id)
    if generation is not None:
        slots = slots.filter(generation=generation)
    released = slots.update(released_at=now, release_reason=reason) == 1
    if released:
        # One primary-key read per release (not per frame): the line and the metric name the kind and the owner.
        row = Slot.objects.filter(pk=slot_id).values_list("kind", "user_id", "upload_id", "generation").first()
        # None only if the row was deleted since (its upload deleted at the same moment).
        kind, user_id, upload_id, gen = row or ("unknown", None, None, generation)
        record(
            Event.SLOT_RELEASED, kind=kind, slot=slot_id, user=user_id, upload=upload_id, generation=gen, reason=reason
        )
    return released


def _revoke(slots: list[Slot], reason: str, now, error: DirectDriveXError) -> list[Slot]:
    """Release ``slots`` (already locked by the caller) and fence off their writers.

    Bumping writer_generation makes every later offset commit or renewal of the
    old holders fail; their connections are told after commit.
    """
    if not slots:
        return []
    ids = [slot.pk for slot in slots]
    Slot.objects.filter(pk__in=ids, released_at__isnull=True).update(released_at=now, release_reason=reason)
    upload_ids = sorted({slot.upload_id for slot in slots if slot.kind == Slot.Kind.UPLOAD and slot.upload_id})
    if upload_ids:
        Upload.objects.filter(pk__in=upload_ids).update(writer_generation=F("writer_generation") + 1)
    channels = [slot.holder_channel for slot in slots if slot.holder_channel]
    if channels:
        transaction.on_commit(lambda: notify_holders(channels, error))
    for slot in slots:
        # Logged, counted and signalled only if the caller's transaction commits (upload_end may roll back).
        record(
            Event.SLOT_REAPED if reason == Slot.ReleaseReason.EXPIRED else Event.SLOT_REVOKED,
            kind=slot.kind,
            slot=slot.pk,
            user=slot.user_id,
            upload=slot.upload_id,
            generation=slot.generation,
            reason=reason,
            holder=slot.holder_process or None,
            channel=slot.holder_channel or None,
        )
    return slots


def _reap(*, now, kind: str | None = None, dry_run: bool = False) -> list[Slot]:
    stuck = Slot.objects.stuck(now)
    if kind is not None:
        stuck = stuck.filter(kind=kind)
    if dry_run:
        return list(stuck.order_by("pk"))
    # skip_locked: a slot another transaction is reaping is not ours to wait for.
    locked = list(stuck.select_for_update(skip_locked=True).order_by("pk"))
    return _revoke(locked, Slot.ReleaseReason.EXPIRED, now, LeaseLost())


def slots_reap(*, dry_run: bool = False, now=None) -> list[Slot]:
    """Release every slot whose lease ran out; returns them (or, with dry_run, what would be)."""
    now = now or timezone.now()
    with transaction.atomic():
        return _reap(now=now, dry_run=dry_run)


def slots_reset(
    *, user=None, upload=None, ids=None, everything: bool = False, dry_run: bool = False, now=None
) -> list[Slot]:
    """Release every active slot in a scope and fence off its writers (admin repair)."""
    if not (everything or user is not None or upload is not None or ids is not None):
        raise ValueError("slots_reset needs a scope: everything, a user, an upload or slot ids.")
    now = now or timezone.now()
    scope = Slot.objects.active()
    if user is not None:
        scope = scope.filter(user=user)
    if upload is not None:
        scope = scope.filter(upload=upload)
    if ids is not None:
        scope = scope.filter(pk__in=ids)
    with transaction.atomic():
        if dry_run:
            return list(scope.order_by("pk"))
        locked = list(scope.select_for_update().order_by("pk"))
        return _revoke(locked, Slot.ReleaseReason.RESET, now, LeaseLost("An administrator reset this upload's slot."))


def slots_revoke_for_upload(upload: Upload, reason: str, error: DirectDriveXError, *, now=None) -> list[Slot]:
    """Inside the caller's transaction: release the upload's active slots and fence its writer."""
    now = now or timezone.now()
    locked = list(Slot.objects.active().filter(upload=upload).select_for_update().order_by("pk"))
    return _revoke(locked, reason, now, error)


def slots_revoke_for_share(share, reason: str, error: DirectDriveXError, *, now=None) -> list[Slot]:
    """Inside the caller's transaction: release the downloads going on through a share link, which stop at once."""
    now = now or timezone.now()
    locked = list(Slot.objects.active().filter(share=share).select_for_update().order_by("pk"))
    return _revoke(locked, reason, now, error)


def slots_summary(now=None) -> dict:
    """Counts per kind for GET /api/slots/ and `slots status`."""
    now = now or timezone.now()
    summary = {}
    for kind in Slot.Kind.values:
        active = Slot.objects.active().filter(kind=kind)
        per_user = active.values("user__username").annotate(n=Count("pk")).order_by("user__username")
        summary[kind] = {
            "limit": slot_limits(kind).global_limit,
            "active": active.count(),
            "stuck": active.filter(lease_expires_at__lte=now).count(),
            "by_user": {row["user__username"]: row["n"] for row in per_user},
        }
    return summary


def slot_park(slot_id: int, generation: int, *, now=None) -> bool:
    """A writer ends its request but its client will be back (a tus PATCH that ended): keep the slot for it.

    The slot stays active, unclaimed (no holder channel) and leased for one
    more lease, exactly like the slot POST /api/uploads/ reserves: the next
    request of the upload claims it without competing for a slot again, and a
    client that never comes back frees it when the lease runs out. A
    compare-and-swap on the generation: False if the slot was taken meanwhile.
    """
    now = now or timezone.now()
    parked = (
        Slot.objects.active()
        .filter(pk=slot_id, generation=generation)
        .update(holder_channel="", holder_process="", lease_expires_at=now + lease_duration())
    )
    return parked == 1


async def ask_holders_to_stop(channels: list[str], error: DirectDriveXError) -> None:
    """Ask live writers, through the channel layer, to let go: write and commit what arrived, free the slot, end.

    Unlike a revocation nothing is fenced: a holder that never hears this keeps
    its upload until it ends or its lease runs out. Sent by a request that
    wants the upload itself (a tus PATCH or HEAD, uploads.transports.tus),
    from its own event loop (Channels' in-memory layer is not thread-safe), and
    waits at most NOTICE_SECONDS for the layer.
    """
    await _notify(channels, "upload.stop", error)


def notify_holders(channels: list[str], error: DirectDriveXError) -> None:
    """Tell the holders of revoked slots, through the channel layer, to stop with ``error``'s code.

    A courtesy that makes a connection close at once instead of at its next
    commit or renewal: the revocation itself is the generation bump (the
    fence), which needs no message to arrive. So the notices go out together
    and the caller (a DELETE, an admin action, a reaper pass, an admission
    that reaps) waits at most NOTICE_SECONDS for all of them, however stalled
    the channel layer is.
    """
    if channels:
        async_to_sync(_notify)(channels, "upload.revoke", error)


async def _notify(channels: list[str], kind: str, error: DirectDriveXError) -> None:
    layer = get_channel_layer()
    if layer is None or not channels:
        return
    message = {"type": kind, **error.as_dict(ws=True), "close_code": error.close_code}
    try:
        await _send_all(layer, channels, message)
    except Exception:  # the holders may be long gone, the layer down: the fence (or the lease) stops them anyway
        log.warning("could not send %s to holders=%s", kind, ",".join(channels), exc_info=True)


async def _send_all(layer, channels: list[str], message: dict) -> None:
    sends = [asyncio.ensure_future(layer.send(channel, message)) for channel in channels]
    _done, pending = await asyncio.wait(sends, timeout=NOTICE_SECONDS)
    for send in pending:
        send.cancel()
    failed = [channel for channel, send in zip(channels, sends, strict=True) if send in pending or send.exception()]
    if failed:
        log.warning("holders not notified within %ss: %s", NOTICE_SECONDS, ",".join(failed))


def slot_writer_holder(upload: Upload, *, now=None) -> Slot | None:
    """Inside the caller's transaction: the upload's active writer slot, locked, as the lease judges it.

    A slot whose holder's lease ran out is released as ``expired`` and the
    upload's generation bumped (the fence; ``upload.writer_generation`` follows
    it), and None is returned: nothing of that holder can move the offset any
    more. A live holder's slot, or the unclaimed one POST or a parked PATCH
    left, is returned as it is.
    """
    now = now or timezone.now()
    current = Slot.objects.active().filter(upload=upload, kind=Slot.Kind.UPLOAD).select_for_update().first()
    if current is None or not current.holder_channel or current.lease_expires_at > now:
        return current
    _revoke([current], Slot.ReleaseReason.EXPIRED, now, LeaseLost())
    upload.writer_generation += 1  # _revoke bumped it, under the row lock we now hold
    return None


def slot_claim_writer(upload: Upload, holder_channel: str, *, now=None) -> Slot:
    """Make ``holder_channel`` the upload's only writer, with a fresh fencing generation.

    Runs inside the caller's transaction. Is the upload's current holder
    alive? One answer, the lease, and nothing else:

    1. A holder is alive while its slot's lease has not run out. Its writer
       renews the lease with every durable commit and, while idle, every
       quarter lease, from the writer's own task through its own database
       threads (uploads.services.calls), never through the process's shared
       sync thread, so a busy process does not make a live writer look dead.
    2. A writer stops writing a fifth of a lease before the lease it last
       renewed runs out, unless a renewal extends it (uploads.writer): a
       process that froze wakes up unable to write until it asks again.
    3. A live holder is never taken over by force: the newcomer is refused
       UploadBusy (409 / 4409 ``busy``) with a short ``retry_after``. (A tus
       request asks it to let go first: ask_holders_to_stop.)
    4. A holder whose lease ran out is taken over at once: its slot is
       released as ``expired`` and the upload's generation bumped, which is the
       fence: every later commit, renewal, completion or failure of the old
       holder is a compare-and-swap on the old generation and changes nothing.
       A crashed holder therefore blocks its upload for at most one lease.
    5. The old holder is told through the channel layer (notify_holders, after
       commit, with a deadline) so that its connection closes now; nothing
       depends on that notice arriving.
    6. The part file's lock (the local backend's flock) is not a liveness
       verdict: it only keeps a frozen process's open file from being shared,
       and a newcomer that meets it is told ``busy`` too.

    Takes over the slot reserved by POST /api/uploads/ if it is unclaimed,
    reclaims one whose lease ran out, or admits a new one.
    """
    now = now or timezone.now()
    current = slot_writer_holder(upload, now=now)
    if current is not None and current.holder_channel:
        raise UploadBusy(retry_after=_busy_retry_after([(current.lease_expires_at,)], now))
    # A new generation fences off every earlier writer of this upload. A
    # compare-and-swap on the status and the generation we read: a cancel,
    # expiry or delete that committed meanwhile makes it change nothing.
    granted = Upload.objects.filter(
        pk=upload.pk, status=Upload.Status.UPLOADING, writer_generation=upload.writer_generation
    ).update(writer_generation=F("writer_generation") + 1)
    if granted != 1:
        status = Upload.objects.filter(pk=upload.pk).values_list("status", flat=True).first()
        if status != Upload.Status.UPLOADING:
            raise NotUploading("The upload was deleted." if status is None else f"The upload is {status}.")
        raise UploadBusy("Another connection was admitted at the same moment.", retry_after=1)
    upload.writer_generation += 1
    if current is None:
        return slot_admit(Slot.Kind.UPLOAD, upload.owner, upload=upload, holder_channel=holder_channel, now=now)
    claimed = (
        Slot.objects.active()
        .filter(pk=current.pk, holder_channel="")
        .update(
            holder_channel=holder_channel,
            holder_process=holder_process(),
            generation=upload.writer_generation,
            lease_expires_at=now + lease_duration(),
        )
    )
    if claimed != 1:  # pragma: no cover - the row lock above makes this unreachable on PostgreSQL
        raise UploadBusy(retry_after=1)
    current.refresh_from_db()
    return current


# Rows deleted per statement: short transactions, so that on SQLite (one writer
# at a time) admissions never queue behind a long prune.
PRUNE_BATCH = 1000


@dataclass(frozen=True)
class SlotHistoryPruned:
    """What slots_prune found (and, unless it was a dry run, deleted): released rows older than ``cutoff``."""

    cutoff: datetime
    count: int


def slots_prune(*, dry_run: bool = False, now=None) -> SlotHistoryPruned:
    """Delete released slot rows whose release is older than DIRECTDRIVEX_SLOT_HISTORY_DAYS.

    Active rows are never touched: the filter is on released_at, and a released
    row never becomes active again, so no other service changes the rows we
    delete and no lock is needed. Safe to rerun: a second run finds nothing.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.DIRECTDRIVEX_SLOT_HISTORY_DAYS)
    old = Slot.objects.released().filter(released_at__lt=cutoff)
    if dry_run:
        return SlotHistoryPruned(cutoff=cutoff, count=old.count())
    deleted = 0
    while True:
        # Oldest first by primary key: the oldest rows come first in the pk
        # index, so each batch is found without scanning the recent history.
        batch = list(old.order_by("pk").values_list("pk", flat=True)[:PRUNE_BATCH])
        if not batch:
            break
        deleted += Slot.objects.released().filter(pk__in=batch, released_at__lt=cutoff).delete()[0]
    log.info("slot history pruned rows=%s cutoff=%s", deleted, cutoff.isoformat())
    return SlotHistoryPruned(cutoff=cutoff, count=deleted)
