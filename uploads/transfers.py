"""Upload services: create, look up, cancel, delete, expire — every change to an Upload row.

Offsets, finalization and writer admission for the WebSocket consumer live
here too, so that the API, the consumer, the admin and the commands share them.
"""

import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import F, Sum
from django.utils import timezone

from uploads import storage
from uploads.exceptions import FileTooLarge, NotUploading, QuotaExceeded, UploadNotFound
from uploads.filenames import display_name, stored_original
from uploads.models import Slot, Upload, UserQuota
from uploads.slots import slot_admit, slots_revoke_for_upload

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


def upload_create(user, *, filename: str, size: int, sha256: str = "", now=None) -> tuple[Upload, Slot]:
    """Register an upload and hold an upload slot for it, or raise the named refusal.

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
            created_at=now,
            last_activity_at=now,
        )
        slot = slot_admit(Slot.Kind.UPLOAD, user, upload=upload, now=now)
    log.info("upload created upload=%s user=%s size=%s slot=%s", upload.pk, user.pk, size, slot.pk)
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


def uploads_of(user, status: str | None = None):
    uploads = Upload.objects.filter(owner=user).order_by("-created_at")
    if status:
        uploads = uploads.filter(status=status)
    return uploads


def upload_end(upload: Upload, status: str, reason: str, *, now=None) -> bool:
    """Stop an unfinished upload for good (cancelled, expired): slot released, writer fenced, bytes removed.

    Returns False if the upload had already left `uploading` (someone else ended it).
    """
    now = now or timezone.now()
    with transaction.atomic():
        slots_revoke_for_upload(upload, reason, NotUploading(f"The upload was {status}."), now=now)
        ended = (
            Upload.objects.filter(pk=upload.pk, status=Upload.Status.UPLOADING).update(
                status=status, writer_generation=F("writer_generation") + 1, last_activity_at=now
            )
            == 1
        )
    # After commit: no file I/O inside the transaction. A writer still holding
    # the file open writes into an unlinked inode and is fenced at its next commit.
    storage.delete(upload.storage_key)
    if ended:
        log.info("upload ended upload=%s user=%s status=%s", upload.pk, upload.owner_id, status)
    return ended


def upload_delete(user, upload_id, *, now=None) -> None:
    """DELETE /api/uploads/<id>/: cancel an unfinished upload, delete anything else."""
    upload = upload_for(user, upload_id)
    if upload.status == Upload.Status.UPLOADING:
        upload_end(upload, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED, now=now)
        return
    with transaction.atomic():
        slots_revoke_for_upload(upload, Slot.ReleaseReason.CANCELLED, NotUploading("The file was deleted."), now=now)
        Upload.objects.filter(pk=upload.pk).delete()
    storage.delete(upload.storage_key)
    log.info("upload deleted upload=%s user=%s", upload.pk, user.pk)
