"""Writer grants: what one connection may write to an upload, and every change it makes to the upload row.

A connection is admitted as the upload's single writer (``writer_admit``) and
gets a ``WriterGrant``: the fencing generation it must present at every later
call. Offset commits, rewinds, completion, failure and release are
compare-and-swaps on that generation (docs/slots.md, "Fencing"), so a writer
whose slot was reaped, reset or cancelled changes nothing.
"""

import logging
import uuid
from dataclasses import dataclass, replace
from datetime import datetime

from django.db import transaction
from django.db.models.functions import Greatest
from django.utils import timezone

from uploads import storage
from uploads.exceptions import LeaseLost, NotUploading, TakenOver
from uploads.models import Slot, StoredPiece, Upload
from uploads.services.events import Event, record
from uploads.services.progress import progress_event, publish_now
from uploads.services.slots import (
    ask_holders_to_stop,
    slot_claim_writer,
    slot_park,
    slot_release,
    slot_renew,
    slot_writer_holder,
)
from uploads.services.uploads import upload_for

log = logging.getLogger(__name__)


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
    # The sha256 state committed with ``offset`` (None: the part is hashed again on open).
    hash_state: bytes | None = None
    # What an object store's writer resumes from (uploads.storage.base.Committed); empty on a disk.
    store_session: str = ""
    pieces: tuple[storage.Piece, ...] = ()
    part_numbers: int = 0  # the highest part number an earlier writer may have used
    reserved: int = 0  # the highest one reserved for this writer

    def committed(self) -> storage.Committed:
        return storage.Committed(
            offset=self.offset,
            hash_state=self.hash_state,
            session=self.store_session,
            pieces=self.pieces,
            numbers=self.part_numbers,
            reserved=self.reserved,
        )


def _pieces(upload_id) -> tuple[storage.Piece, ...]:
    return tuple(
        storage.Piece(row.kind, row.start, row.end, number=row.number or 0, etag=row.etag, name=row.name)
        for row in StoredPiece.objects.filter(upload_id=upload_id).order_by("start", "kind")
    )


def writer_admit(user, upload_id, holder_channel: str, *, now=None) -> WriterGrant:
    """Admit a connection as the upload's single writer, or raise the named refusal.

    The grant is a compare-and-swap on ``status = uploading`` and the
    generation read here, so it can never succeed on an upload that a cancel,
    expiry or delete ended meanwhile. The resume offset is read after that
    swap, in the same transaction: a commit of the previous writer that landed
    between our first read and our lock is in it (no earlier writer can move
    it any more), so the new writer never resumes before a durable byte. The
    upload's idle clock is not touched: only bytes that land count as activity.
    """
    now = now or timezone.now()
    with transaction.atomic():
        upload = upload_for(user, upload_id)
        if upload.status != Upload.Status.UPLOADING:
            raise NotUploading(f"The upload is {upload.status}.")
        slot = slot_claim_writer(upload, holder_channel, now=now)
        offset, hash_state, session, numbers = Upload.objects.values_list(
            "offset", "hash_state", "store_session", "part_numbers"
        ).get(pk=upload.pk)
        # An object store's parts are numbered above every number an earlier writer may have used;
        # the first few are reserved here, under the new generation, before any part is sent.
        reserved = numbers + storage.backend().part_numbers_ahead
        if reserved != numbers:
            Upload.objects.filter(pk=upload.pk).update(part_numbers=reserved)
        pieces = _pieces(upload.pk) if session else ()
    record(
        Event.WRITER_ADMITTED,
        upload=upload.pk,
        user=user.pk,
        slot=slot.pk,
        generation=slot.generation,
        offset=offset,
    )
    return WriterGrant(
        upload_id=upload.pk,
        user_id=user.pk,
        slot_id=slot.pk,
        generation=slot.generation,
        offset=offset,
        size=upload.size,
        sha256=upload.sha256,
        storage_key=upload.storage_key,
        lease_expires_at=slot.lease_expires_at,
        hash_state=bytes(hash_state) if hash_state is not None else None,
        store_session=session,
        pieces=pieces,
        part_numbers=numbers,
        reserved=reserved,
    )


def _fenced_upload(grant: WriterGrant):
    return Upload.objects.filter(pk=grant.upload_id, status=Upload.Status.UPLOADING, writer_generation=grant.generation)


def _why_fenced(grant: WriterGrant):
    """The refusal for a writer whose compare-and-swap changed nothing."""
    status = Upload.objects.filter(pk=grant.upload_id).values_list("status", flat=True).first()
    if status != Upload.Status.UPLOADING:
        return NotUploading("The upload was deleted." if status is None else f"The upload is {status}.")
    return LeaseLost()


def writer_commit(
    grant: WriterGrant,
    offset: int,
    *,
    hash_state: bytes | None = None,
    durable: storage.Durable | None = None,
    now=None,
) -> datetime:
    """Record ``offset`` (fsynced by the caller) as durable, with the sha256 state after it; renew the lease.

    Compare-and-swap on the fencing generation: a writer whose slot was reaped,
    reset or cancelled changes nothing and gets LeaseLost / NotUploading. The
    upload's ``last_activity_at`` moves only when the offset does (bytes
    landed), so a silent connection's heartbeat never keeps an upload from
    expiring. Returns the new lease expiry.

    ``durable`` (an object store's sync) records, in the same transaction, the
    store's upload, the parts sent, the tails that now hold the rest (replacing
    the ones before) and the part numbers to keep reserved.
    """
    now = now or timezone.now()
    with transaction.atomic():
        # Lock order: slot row first, then upload row (see uploads.services.slots).
        try:
            expires = slot_renew(grant.slot_id, grant.generation, now=now)
        except LeaseLost:
            raise _why_fenced(grant) from None
        if durable is not None and durable.session:
            _record_pieces(grant, durable, now)
        # The durable offset only moves forward here (writer_rewind is the one way back).
        previous = _fenced_upload(grant).filter(offset__lt=offset).values_list("offset", "last_activity_at").first()
        advanced = 0
        if previous is not None:
            was, since = previous
            rate = _rate(offset - was, since, now)
            advanced = (
                _fenced_upload(grant)
                .filter(offset=was)
                .update(offset=offset, hash_state=hash_state, last_activity_at=now, bytes_per_second=rate)
            )
        if advanced != 1 and not _fenced_upload(grant).exists():
            raise _why_fenced(grant)
    return expires


def _record_pieces(grant: WriterGrant, durable: storage.Durable, now: datetime) -> None:
    """The object store's side of a commit, under the fence (the UPDATE locks the upload row first)."""
    updated = (
        _fenced_upload(grant)
        .filter(offset__lte=durable.offset)
        .update(store_session=durable.session, part_numbers=Greatest("part_numbers", durable.numbers))
    )
    if updated != 1:
        if not _fenced_upload(grant).exists():
            raise _why_fenced(grant)
        return  # an older checkpoint than the one recorded: its pieces add nothing
    StoredPiece.objects.filter(upload_id=grant.upload_id, kind=StoredPiece.Kind.TAIL).delete()
    StoredPiece.objects.bulk_create(
        [
            StoredPiece(
                upload_id=grant.upload_id,
                kind=piece.kind,
                start=piece.start,
                end=piece.end,
                number=piece.number or None,
                etag=piece.etag,
                name=piece.name,
                generation=grant.generation,
                created_at=now,
            )
            for piece in durable.pieces
        ],
        # A part recorded by a commit whose answer was lost comes again with the next one.
        ignore_conflicts=True,
    )


def writer_committed(grant: WriterGrant) -> storage.Committed:
    """What the database holds for the upload now, if ``grant`` is still its writer: what a completion may use."""
    with transaction.atomic():
        row = _fenced_upload(grant).values_list("offset", "hash_state", "store_session", "part_numbers").first()
        if row is None:
            raise _why_fenced(grant)
        offset, hash_state, session, numbers = row
        return storage.Committed(
            offset=offset,
            hash_state=bytes(hash_state) if hash_state is not None else None,
            session=session,
            pieces=_pieces(grant.upload_id),
            numbers=numbers,
        )


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
    with transaction.atomic():
        moved = _fenced_upload(grant).filter(offset__gt=offset).update(offset=offset, last_activity_at=now)
        if moved != 1:
            raise _why_fenced(grant)
        # An object store's pieces past the new offset are no longer the upload's; from zero, nor its session.
        StoredPiece.objects.filter(upload_id=grant.upload_id, end__gt=offset).delete()
        ahead = storage.backend().part_numbers_ahead
        if offset == 0:  # a new multipart upload: its part numbers start again (reserved anew)
            _fenced_upload(grant).update(store_session="", hash_state=None, part_numbers=ahead)
    log.error(
        "durable offset rewound upload=%s user=%s from=%s to=%s", grant.upload_id, grant.user_id, grant.offset, offset
    )
    if offset == 0:
        return replace(grant, offset=0, pieces=(), store_session="", hash_state=None, part_numbers=0, reserved=ahead)
    return replace(grant, offset=offset, pieces=tuple(piece for piece in grant.pieces if piece.end <= offset))


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
    storage.backend().delete(grant.storage_key)
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


def writer_release(grant: WriterGrant, reason: str, *, part_numbers: int | None = None, now=None) -> bool:
    """The connection ends without finishing: free the slot; the upload stays resumable.

    ``part_numbers``: the highest part number the writer used; the numbers it
    reserved beyond it go back, so that many short writers (a tus client's
    PATCHes) do not use up the store's 10,000.
    """
    with transaction.atomic():
        _give_back_numbers(grant, part_numbers)
        return slot_release(grant.slot_id, reason, generation=grant.generation, now=now)


def writer_park(grant: WriterGrant, *, part_numbers: int | None = None, now=None) -> bool:
    """The connection ends between two requests of one client (a tus PATCH): keep the slot for its next one.

    See uploads.services.slots.slot_park. False if the slot was taken meanwhile.
    """
    with transaction.atomic():
        _give_back_numbers(grant, part_numbers)
        return slot_park(grant.slot_id, grant.generation, now=now)


def _give_back_numbers(grant: WriterGrant, used: int | None) -> None:
    # Only the current writer (fenced), and never below what it was admitted above.
    if used is not None and grant.reserved:
        _fenced_upload(grant).filter(part_numbers__gt=max(used, grant.part_numbers)).update(
            part_numbers=max(used, grant.part_numbers)
        )


def writer_holder(user, upload_id, *, now=None) -> str | None:
    """The channel of the upload's live writer, or None when nothing can move its offset any more.

    A holder whose lease ran out is fenced off here (its slot reaped, the
    generation bumped), so that an offset read after this call cannot move
    under a frozen process that wakes up. Raises UploadNotFound for unknown
    and other users' uploads.
    """
    with transaction.atomic():
        current = slot_writer_holder(upload_for(user, upload_id), now=now)
    return current.holder_channel if current is not None and current.holder_channel else None


async def writer_ask_to_stop(channel: str) -> None:
    """Ask the upload's live writer to let go (it commits what arrived and frees its slot). From an event loop."""
    await ask_holders_to_stop([channel], TakenOver())
