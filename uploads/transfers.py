"""Upload services: create, look up, cancel, delete, expire — every change to an Upload row.

Offsets, finalization and writer admission for the WebSocket consumer live
here too, so that the API, the consumer, the admin and the commands share them.
"""

import logging
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from uploads import storage
from uploads.events import Event, record
from uploads.exceptions import FileTooLarge, LeaseLost, NotUploading, QuotaExceeded, UploadNotFound
from uploads.filenames import display_name, stored_original
from uploads.models import Slot, Upload, UserQuota
from uploads.progress import progress_event, publish_now
from uploads.slots import slot_admit, slot_claim_writer, slot_release, slot_renew, slots_revoke_for_upload

log = logging.getLogger(__name__)


def quota_limit(user) -> int:
    override = UserQuota.objects.filter(user=user).values_list("max_bytes", flat=True).first()
    return settings.DIRECTDRIVEX_USER_QUOTA if override is None else override


def quota_used(user) -> int:
    """Bytes of finished files plus the declared size of unfinished uploads."""
    used = Upload.objects.filter(owner=user).counting_toward_quota().aggregate(total=Sum("size"))["total"]
    return used or 0


def upload_expires_at(upload: Upload):
    return upload.last_activity_at + timedelta(seconds=settings.DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS)


def upload_create(
    user, *, filename: str, size: int, sha256: str = "", fingerprint: str = "", now=None
) -> tuple[Upload, Slot]:
    """Register an upload and hold an upload slot for it, or raise the named refusal.

    ``fingerprint`` is the client's opaque tag for its file, stored as given.
    Nothing is kept when a refusal is raised: the row and the slot are one transaction.
    """
    now = now or timezone.now()
    maximum = settings.DIRECTDRIVEX_MAX_FILE_SIZE
    if size > maximum:
        raise FileTooLarge(f"The file is {size} bytes; the largest accepted is {maximum} bytes.")
    with transaction.atomic():
        # Serialize one user's quota checks (PostgreSQL; SQLite's IMMEDIATE
        # transactions are serialized already), so two parallel POSTs cannot
        # both fit into the same remaining quota.
        get_user_model().objects.select_for_update().filter(pk=user.pk).exists()
        limit, used = quota_limit(user), quota_used(user)
        if used + size > limit:
            raise QuotaExceeded(
                f"The upload needs {size} bytes but only {max(0, limit - used)} of your {limit}-byte quota are free."
            )
        upload = Upload.objects.create(
            owner=user,
            original_filename=stored_original(filename),
            display_name=display_name(filename),
            size=size,
            sha256=sha256,
            fingerprint=fingerprint,
            created_at=now,
            last_activity_at=now,
        )
        slot = slot_admit(Slot.Kind.UPLOAD, user, upload=upload, now=now)
        record(
            Event.UPLOAD_STARTED,
            upload=upload.pk,
            user=user.pk,
            slot=slot.pk,
            generation=slot.generation,
            size=size,
            filename=upload.display_name,
        )
    return upload, slot


def upload_for(user, upload_id) -> Upload:
    """The user's upload; other users' uploads are indistinguishable from missing ones."""
    try:
        key = uuid.UUID(str(upload_id))
    except ValueError:
        raise UploadNotFound() from None
    upload = Upload.objects.filter(pk=key, owner=user).first()
    if upload is None:
        raise UploadNotFound()
    return upload


def uploads_of(user, status: str | None = None, *, after: tuple[datetime, uuid.UUID] | None = None):
    """The user's uploads, newest first, optionally of one status and only those after the position ``after``.

    The order is total, (created_at, id) descending, so that a position is a
    keyset cursor: an upload created meanwhile is newer than any position, so
    the pages after it neither skip nor repeat anything.
    """
    uploads = Upload.objects.filter(owner=user).order_by("-created_at", "-id")
    if status:
        uploads = uploads.filter(status=status)
    if after is not None:
        created_at, upload_id = after
        uploads = uploads.filter(Q(created_at__lt=created_at) | Q(created_at=created_at, id__lt=upload_id))
    return uploads


def upload_end(upload: Upload, status: str, reason: str, *, idle_since=None, now=None) -> bool:
    """Stop an unfinished upload for good (cancelled, expired): slot released, writer fenced, bytes removed.

    With ``idle_since``, only if the upload has seen no activity since then.
    Returns False, changing nothing, if the upload had already left `uploading`
    (someone else ended or completed it) or was active after ``idle_since``.
    """
    now = now or timezone.now()
    with transaction.atomic():
        slots_revoke_for_upload(upload, reason, NotUploading(f"The upload was {status}."), now=now)
        candidate = Upload.objects.filter(pk=upload.pk, status=Upload.Status.UPLOADING)
        if idle_since is not None:
            candidate = candidate.filter(last_activity_at__lt=idle_since)
        if candidate.update(status=status, writer_generation=F("writer_generation") + 1, last_activity_at=now) != 1:
            # Not ours to end: undo the revocation too (and the notification queued with it).
            transaction.set_rollback(True)
            return False
    # After commit: no file I/O inside the transaction. A writer still holding
    # the file open writes into an unlinked inode and is fenced at its next commit.
    storage.delete(upload.storage_key)
    record(Event(f"upload.{status}"), upload=upload.pk, user=upload.owner_id, reason=reason, size=upload.size)
    publish_now(upload.owner_id, progress_event(upload_id=upload.pk, offset=0, size=upload.size, status=status))
    return True


def uploads_expire(*, dry_run: bool = False, now=None) -> list[Upload]:
    """Expire unfinished uploads idle for DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS: slot freed, bytes deleted.

    Returns what was expired (or, with dry_run, what would be). An upload that
    moved on after it was listed (a writer committed, someone cancelled) is left alone.
    """
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS)
    idle = list(Upload.objects.idle_since(cutoff).order_by("last_activity_at"))
    if dry_run:
        return idle
    return [
        upload
        for upload in idle
        if upload_end(upload, Upload.Status.EXPIRED, Slot.ReleaseReason.EXPIRED, idle_since=cutoff, now=now)
    ]


def upload_delete(user, upload_id, *, now=None) -> None:
    """DELETE /api/uploads/<id>/: cancel an unfinished upload, delete anything else. Afterwards the bytes are gone.

    An upload that completes while we cancel it is then deleted as a finished
    one: a 204 always means no bytes are left.
    """
    upload = upload_for(user, upload_id)
    if upload.status == Upload.Status.UPLOADING and upload_end(
        upload, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED, now=now
    ):
        return
    with transaction.atomic():
        slots_revoke_for_upload(upload, Slot.ReleaseReason.CANCELLED, NotUploading("The file was deleted."), now=now)
        Upload.objects.filter(pk=upload.pk).delete()
    storage.delete(upload.storage_key)
    record(Event.UPLOAD_DELETED, upload=upload.pk, user=user.pk, size=upload.size, status=upload.status)
    publish_now(user.pk, progress_event(upload_id=upload.pk, offset=0, size=upload.size, status="deleted"))


@dataclass(frozen=True)
class WriterGrant:
    """What a connection may write: the fencing token it must present at every commit."""

    upload_id: uuid.UUID
    user_id: int
    slot_id: int
    generation: int
    offset: int
    size: int
    sha256: str
    storage_key: str
    lease_expires_at: datetime


def writer_admit(user, upload_id, holder_channel: str, *, dead_holder: str = "", now=None) -> WriterGrant:
    """Admit a connection as the upload's single writer, or raise the named refusal.

    ``dead_holder``: the channel of a previous writer found dead by the caller;
    its slot is taken over at once instead of waiting for its lease to run out.
    The grant is a compare-and-swap on ``status = uploading`` and the
    generation read here, so it can never succeed on an upload that a cancel,
    expiry or delete ended meanwhile. The upload's idle clock is not touched:
    only bytes that land count as activity.
    """
    now = now or timezone.now()
    with transaction.atomic():
        upload = upload_for(user, upload_id)
        if upload.status != Upload.Status.UPLOADING:
            raise NotUploading(f"The upload is {upload.status}.")
        slot = slot_claim_writer(upload, holder_channel, dead_holder=dead_holder, now=now)
    record(
        Event.WRITER_ADMITTED,
        upload=upload.pk,
        user=user.pk,
        slot=slot.pk,
        generation=slot.generation,
        offset=upload.offset,
        taken_over=dead_holder or None,
    )
    return WriterGrant(
        upload_id=upload.pk,
        user_id=user.pk,
        slot_id=slot.pk,
        generation=slot.generation,
        offset=upload.offset,
        size=upload.size,
        sha256=upload.sha256,
        storage_key=upload.storage_key,
        lease_expires_at=slot.lease_expires_at,
    )


def _fenced_upload(grant: WriterGrant):
    return Upload.objects.filter(pk=grant.upload_id, status=Upload.Status.UPLOADING, writer_generation=grant.generation)


def _why_fenced(grant: WriterGrant):
    """The refusal for a writer whose compare-and-swap changed nothing."""
    status = Upload.objects.filter(pk=grant.upload_id).values_list("status", flat=True).first()
    if status != Upload.Status.UPLOADING:
        return NotUploading("The upload was deleted." if status is None else f"The upload is {status}.")
    return LeaseLost()


def writer_commit(grant: WriterGrant, offset: int, *, now=None) -> datetime:
    """Record ``offset`` (already fsynced by the caller) as durable and renew the lease.

    Compare-and-swap on the fencing generation: a writer whose slot was reaped,
    reset or cancelled changes nothing and gets LeaseLost / NotUploading. The
    upload's ``last_activity_at`` moves only when the offset does (bytes
    landed), so a silent connection's heartbeat never keeps an upload from
    expiring. Returns the new lease expiry.
    """
    now = now or timezone.now()
    with transaction.atomic():
        # Lock order: slot row first, then upload row (see uploads.slots).
        try:
            expires = slot_renew(grant.slot_id, grant.generation, now=now)
        except LeaseLost:
            raise _why_fenced(grant) from None
        # The durable offset only moves forward here (writer_rewind is the one way back).
        previous = _fenced_upload(grant).filter(offset__lt=offset).values_list("offset", "last_activity_at").first()
        advanced = 0
        if previous is not None:
            was, since = previous
            rate = _rate(offset - was, since, now)
            advanced = (
                _fenced_upload(grant)
                .filter(offset=was)
                .update(offset=offset, last_activity_at=now, bytes_per_second=rate)
            )
        if advanced != 1 and not _fenced_upload(grant).exists():
            raise _why_fenced(grant)
    return expires


def _rate(moved: int, since: datetime, now: datetime) -> int:
    """Bytes per second between two offset commits; the first commit after a pause counts from the pause."""
    seconds = (now - since).total_seconds()
    return round(moved / seconds) if seconds > 0 else 0


def writer_check(grant: WriterGrant) -> None:
    """Raise NotUploading / LeaseLost unless ``grant`` is still the upload's current writer."""
    if not _fenced_upload(grant).exists():
        raise _why_fenced(grant)


def writer_rewind(grant: WriterGrant, offset: int, *, now=None) -> WriterGrant:
    """Move the durable offset back to ``offset`` because the bytes past it are gone from disk.

    Only the current writer may do it (fenced); the upload stays resumable from there.
    """
    now = now or timezone.now()
    if _fenced_upload(grant).filter(offset__gt=offset).update(offset=offset, last_activity_at=now) != 1:
        raise _why_fenced(grant)
    log.error(
        "durable offset rewound upload=%s user=%s from=%s to=%s", grant.upload_id, grant.user_id, grant.offset, offset
    )
    return replace(grant, offset=offset)


def writer_complete(grant: WriterGrant, *, sha256: str = "", now=None) -> None:
    """The bytes are verified and durably in place: mark the upload complete and free its slot.

    ``sha256`` is the digest of the bytes received; it is stored when the
    client declared none, so every finished upload can show (and serve as its
    ETag) the digest of what is on disk.
    """
    now = now or timezone.now()
    with transaction.atomic():
        if not slot_release(grant.slot_id, Slot.ReleaseReason.COMPLETED, generation=grant.generation, now=now):
            raise _why_fenced(grant)
        done = _fenced_upload(grant).update(
            offset=grant.size,
            status=Upload.Status.COMPLETE,
            sha256=grant.sha256 or sha256,
            completed_at=now,
            last_activity_at=now,
        )
        if done != 1:
            raise _why_fenced(grant)
    record(
        Event.UPLOAD_COMPLETED,
        upload=grant.upload_id,
        user=grant.user_id,
        slot=grant.slot_id,
        generation=grant.generation,
        size=grant.size,
        sha256=grant.sha256 or sha256,
    )
    event = progress_event(upload_id=grant.upload_id, offset=grant.size, size=grant.size, status="complete")
    publish_now(grant.user_id, event)


def writer_fail(grant: WriterGrant, *, now=None) -> None:
    """The bytes did not match the declared sha256: the upload becomes failed and its slot is freed.

    A writer fenced off meanwhile fails nothing and deletes nothing (the bytes
    belong to whoever holds the upload now): it gets LeaseLost / NotUploading,
    so its client hears why it really stopped.
    """
    now = now or timezone.now()
    with transaction.atomic():
        failed = _fenced_upload(grant).update(status=Upload.Status.FAILED, last_activity_at=now) == 1
        if failed:
            slot_release(grant.slot_id, Slot.ReleaseReason.FAILED, generation=grant.generation, now=now)
    if not failed:
        log.warning("stale writer's checksum failure ignored upload=%s user=%s", grant.upload_id, grant.user_id)
        raise _why_fenced(grant)
    storage.delete(grant.storage_key)
    record(
        Event.UPLOAD_FAILED,
        upload=grant.upload_id,
        user=grant.user_id,
        slot=grant.slot_id,
        generation=grant.generation,
        reason="checksum_mismatch",
        size=grant.size,
    )
    publish_now(grant.user_id, progress_event(upload_id=grant.upload_id, offset=0, size=grant.size, status="failed"))


def writer_release(grant: WriterGrant, reason: str, *, now=None) -> bool:
    """The connection ends without finishing: free the slot; the upload stays resumable."""
    return slot_release(grant.slot_id, reason, generation=grant.generation, now=now)


@dataclass(frozen=True)
class QuotaSummary:
    """A user's quota in bytes: ``used`` by finished files, ``reserved`` by unfinished uploads, the rest ``free``."""

    limit: int
    used: int
    reserved: int

    @property
    def free(self) -> int:
        # A quota lowered below what is already stored leaves nothing free, not a negative number.
        return max(0, self.limit - self.used - self.reserved)


def quota_summary(user) -> QuotaSummary:
    """The quota as upload_create counts it (quota_used, quota_limit), split into finished and reserved bytes.

    One aggregate over the rows quota_used sums, so used + reserved always
    equals quota_used even while an upload completes between two reads.
    """
    counted = Upload.objects.filter(owner=user).counting_toward_quota()
    sums = counted.aggregate(
        used=Sum("size", filter=Q(status=Upload.Status.COMPLETE)),
        reserved=Sum("size", filter=Q(status=Upload.Status.UPLOADING)),
    )
    return QuotaSummary(limit=quota_limit(user), used=sums["used"] or 0, reserved=sums["reserved"] or 0)
