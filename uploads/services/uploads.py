"""Uploads as the API and the operators see them: create, look up, list, cancel, delete, expire, repair.

Every change to an Upload row outside the writer's own path (uploads.services.grants) is here.
"""

import logging
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from uploads import storage
from uploads.exceptions import FileTooLarge, NotUploading, QuotaExceeded, UploadNotFound
from uploads.filenames import display_name, stored_original
from uploads.models import Slot, StoredPiece, Upload
from uploads.services.events import Event, record
from uploads.services.progress import progress_event, publish_now
from uploads.services.quota import quota_limit, quota_used
from uploads.services.slots import slot_admit, slots_revoke_for_upload

log = logging.getLogger(__name__)


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
    OSError if the storage refused to delete the bytes (read-only, an I/O
    error, a folder in the way): the upload has ended all the same, and
    `uploads fsck --repair` removes what is left (a leftover).
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
    record(Event(f"upload.{status}"), upload=upload.pk, user=upload.owner_id, reason=reason, size=upload.size)
    publish_now(upload.owner_id, progress_event(upload_id=upload.pk, offset=0, size=upload.size, status=status))
    # After commit: no file I/O inside the transaction. A writer still holding
    # the file open writes into an unlinked inode and is fenced at its next commit.
    _delete_bytes(upload)
    return True


def _delete_bytes(upload: Upload) -> None:
    try:
        storage.backend().delete(upload.storage_key)
    except (OSError, storage.StorageError):
        log.error(
            "bytes not deleted upload=%s user=%s; `uploads fsck --repair` removes them",
            upload.pk, upload.owner_id, exc_info=True,
        )  # fmt: skip
        raise


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
    expired = []
    for upload in idle:
        try:
            if upload_end(upload, Upload.Status.EXPIRED, Slot.ReleaseReason.EXPIRED, idle_since=cutoff, now=now):
                expired.append(upload)
        except OSError:
            # Expired all the same (logged, and left for fsck): one bad file must not stop the rest.
            expired.append(upload)
    return expired


def upload_delete(user, upload_id, *, now=None) -> None:
    """DELETE /api/uploads/<id>/: cancel an unfinished upload, delete anything else. Afterwards the bytes are gone.

    An upload that completes while we cancel it is then deleted as a finished
    one: a 204 always means no bytes are left. So the bytes go before the row:
    if the storage refuses (OSError, answered 500), the row stays for the
    client to DELETE again, and no file is left that no row accounts for.
    Downloads of the file stop at their next block (their slots are revoked,
    and the file they read is gone).
    """
    upload = upload_for(user, upload_id)
    if upload.status == Upload.Status.UPLOADING and upload_end(
        upload, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED, now=now
    ):
        return
    with transaction.atomic():
        slots_revoke_for_upload(upload, Slot.ReleaseReason.CANCELLED, NotUploading("The file was deleted."), now=now)
    _delete_bytes(upload)
    Upload.objects.filter(pk=upload.pk).delete()
    record(Event.UPLOAD_DELETED, upload=upload.pk, user=user.pk, size=upload.size, status=upload.status)
    publish_now(user.pk, progress_event(upload_id=upload.pk, offset=0, size=upload.size, status="deleted"))


def upload_rewind(upload_id, *, expected: int, to: int, now=None) -> bool:
    """Move an unfinished upload's durable offset back from ``expected`` to ``to``, the bytes its part file holds.

    For fsck, with the part file's flock held by the caller (or no part file):
    refused (False) if a writer holds a live slot or the offset moved meanwhile.
    The fencing generation is bumped, so a writer admitted with the old offset
    but not yet writing can commit nothing and reconnects (4410) to resume from
    ``to``. ``last_activity_at`` is left alone: a repair is not activity.
    """
    now = now or timezone.now()
    with transaction.atomic():
        # Slot rows first, then the upload row (uploads.services.slots).
        slots = list(Slot.objects.active().filter(upload_id=upload_id, kind=Slot.Kind.UPLOAD).select_for_update())
        if any(slot.holder_channel and slot.lease_expires_at > now for slot in slots):
            return False
        rewound = (
            Upload.objects.filter(pk=upload_id, status=Upload.Status.UPLOADING, offset=expected, offset__gt=to).update(
                offset=to, writer_generation=F("writer_generation") + 1
            )
            == 1
        )
        if rewound:
            # An object store's pieces past the new offset are no longer the upload's; from zero, nor its
            # multipart upload (abandoned now: the reaper aborts it after a lease and a margin).
            StoredPiece.objects.filter(upload_id=upload_id, end__gt=to).delete()
            if to == 0:  # a new multipart upload: its part numbers start again
                Upload.objects.filter(pk=upload_id).update(store_session="", hash_state=None, part_numbers=0)
    if rewound:
        log.error("durable offset rewound by fsck upload=%s from=%s to=%s", upload_id, expected, to)
    return rewound


def upload_fail_lost(upload_id, storage_key: str, *, now=None) -> Upload | None:
    """A complete upload whose bytes are gone or wrong becomes failed; returns it, or None if it changed meanwhile.

    A compare-and-swap on status complete and the storage key. The user sees
    `failed`, the download answers 409, the quota counts it no more: the file
    must be uploaded again.
    """
    now = now or timezone.now()
    with transaction.atomic():
        upload = Upload.objects.select_for_update().filter(pk=upload_id, status=Upload.Status.COMPLETE).first()
        if upload is None or upload.storage_key != storage_key:
            return None
        Upload.objects.filter(pk=upload.pk).update(status=Upload.Status.FAILED, last_activity_at=now)
    log.error("complete upload marked failed by fsck upload=%s user=%s", upload.pk, upload.owner_id)
    # Integrators hear of it like any other failure (upload_failed), with fsck's reason.
    record(Event.UPLOAD_FAILED, upload=upload.pk, user=upload.owner_id, reason="fsck_bytes_lost", size=upload.size)
    publish_now(upload.owner_id, progress_event(upload_id=upload.pk, offset=0, size=upload.size, status="failed"))
    return upload


# --- an object store's leftovers (fsck and the reaper) ---------------------------------------

# A multipart upload or a tail no row records may belong to a writer that made it a moment ago and
# commits it with its next commit (seconds later): only those older than a lease and this are leftovers.
LEFTOVER_MARGIN = timedelta(minutes=5)


def store_leftover_cutoff(now: datetime) -> datetime:
    return now - timedelta(seconds=settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS) - LEFTOVER_MARGIN


def store_session_recorded(key: str, session: str) -> bool:
    return Upload.objects.filter(storage_key=key, status=Upload.Status.UPLOADING, store_session=session).exists()


def store_abort_abandoned(key: str, session: str) -> bool:
    """Abort a multipart upload no unfinished upload records (checked again now); True if it was aborted."""
    if store_session_recorded(key, session):
        return False
    storage.backend().abort_session(key, session)
    log.info("abandoned multipart upload aborted key=%s", key)
    return True


def store_delete_unrecorded_tail(key: str, name: str) -> bool:
    """Delete a tail object no commit records (checked again now); True if it was deleted."""
    if StoredPiece.objects.filter(upload__storage_key=key, kind=StoredPiece.Kind.TAIL, name=name).exists():
        return False
    storage.backend().delete_tail(name)
    return True


def store_sweep(*, now=None) -> int:
    """The reaper's pass over an object store: abort abandoned multipart uploads, delete unrecorded tails.

    Also empties this host's spool folders of server processes that are gone.

    Only what is older than ``store_leftover_cutoff``; returns how many were
    removed. A disk has nothing of the kind (0).
    """
    backend = storage.backend()
    if not backend.keeps_pieces:
        return 0
    backend.sweep_spool()  # this host's spool folders of processes that died (kill -9 leaves them)
    cutoff = store_leftover_cutoff(now or timezone.now())
    removed = 0
    for session in backend.sessions():
        if session.started < cutoff and store_abort_abandoned(session.key, session.session):
            removed += 1
    for key in backend.tail_keys():
        for name, (_size, written) in backend.tails(key).items():
            if written < cutoff and store_delete_unrecorded_tail(key, name):
                removed += 1
    return removed
