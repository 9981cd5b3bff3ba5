"""Several of a user's finished files as one ZIP, streamed: STORED, ZIP64 where needed, its length known up front.

``zip_response`` answers GET /files/zip/?id=…&id=… (the thin view in
uploads.views, in a request thread). The archive is built by zipstream-ng as
it is sent, never stored: a sized ``ZipStream`` of STORED members knows its
length before the first byte (Content-Length), and writes ZIP64 records for
a member or an archive past 4 GiB. It is a download like any other
(uploads.downloads): ONE download slot for the whole ZIP, held by a
DownloadHold (lease renewals, revocation, released exactly once) with no
upload of its own (``Slot.upload`` is null), the files read in BLOCK_BYTES
blocks in worker threads, the memory a few blocks whatever the sizes and
however slowly the client reads.

Members are the uploads' display names, in the order they were asked for,
a repeated name numbered (``name (2).ext``). Their dates are the moment
the ZIP is streamed: zipstream-ng dates data added with ``add()`` with the
current time and has no public way to set another (1.9), so the uploads'
``completed_at`` is not used. Two ZIPs of the same files therefore differ
in a few bytes: a ZIP has no ETag and answers no Range, and an interrupted
one is asked for again whole.

A file deleted while its ZIP streams ends the ZIP short at the next block,
when its reader finds it gone (the ZIP's slot belongs to no upload, so the
delete does not revoke it); the client sees a body shorter than its
Content-Length, a failed download, not a ZIP with a member missing.
"""

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator

import zipstream
from django.utils import timezone

from uploads import metrics, storage
from uploads.downloads import BLOCK_BYTES, DownloadHold, DownloadResponse, content_disposition, new_download_channel
from uploads.exceptions import InvalidRequest, NotComplete, UploadNotFound
from uploads.models import Slot, Upload
from uploads.services.slots import slot_admit

log = logging.getLogger(__name__)

# More would make one request hold that many files open, and a page of My files shows 25.
MAX_FILES = 100
# At most this many names are listed in a refusal; the rest are counted.
NAMES_IN_A_REFUSAL = 5


class FileShort(Exception):
    """A finished file ended before the size its row says (lost or cut by hand): the ZIP cannot be completed."""


def zip_response(user, upload_ids: Iterable[str], *, now=None) -> DownloadResponse:
    """The ZIP of ``user``'s finished uploads ``upload_ids``, streamed, or the named refusal.

    1. InvalidRequest: no id, or more than MAX_FILES different ones (repeats count once).
    2. UploadNotFound: any id unknown, malformed or another user's (all the same: nothing is said of others' files).
    3. NotComplete: any of them not finished.
    4. Every file opened: a missing one is a server fault (fsck finds it), raised as is before a slot is taken.
    5. DownloadSlotsExhausted (429, retry_after) from slot_admit: the ZIP needs one download slot.
    """
    uploads = _finished_uploads_of(user, upload_ids)
    files = _OpenFiles.of(uploads)
    try:
        # Members read their files only when the body pulls them: the ZIP is laid out before the slot is taken.
        stream = zipstream.ZipStream(sized=True, compress_type=zipstream.ZIP_STORED)
        names = member_names(upload.display_name for upload in uploads)
        for index, upload in enumerate(uploads):
            stream.add(files.blocks(index, upload.size), names[index], size=upload.size)
        length = len(stream)
        channel = new_download_channel()
        slot = slot_admit(Slot.Kind.DOWNLOAD, user, holder_channel=channel)
    except BaseException:
        files.close()
        raise
    log.info("zip download started user=%s slot=%s files=%s bytes=%s", user.pk, slot.pk, len(uploads), length)
    hold = DownloadHold(
        slot, channel, files, upload_id=None, user_id=user.pk, what="zip download", subject=f"files={len(uploads)}"
    )
    now = timezone.localtime(now or timezone.now())
    headers = {
        "Content-Type": "application/zip",
        "Content-Length": str(length),
        "Content-Disposition": content_disposition(f"directdrivex-{now:%Y%m%d-%H%M%S}-{len(uploads)}-files.zip"),
        # Made for this request from the user's own files: neither a shared cache nor the browser's keeps it.
        "Cache-Control": "private, no-store",
    }
    return DownloadResponse(hold, _body(hold, iter(stream), length), headers=headers)


def _finished_uploads_of(user, upload_ids: Iterable[str]) -> list[Upload]:
    wanted: list[uuid.UUID] = []
    unknown = 0
    for raw in dict.fromkeys(upload_ids):
        try:
            key = uuid.UUID(str(raw))
        except ValueError:
            unknown += 1
            continue
        if key not in wanted:  # the same id written otherwise (upper case, braces)
            wanted.append(key)
    if not wanted and not unknown:
        raise InvalidRequest("Select at least one file to download as a ZIP.")
    if len(wanted) + unknown > MAX_FILES:
        raise InvalidRequest(
            f"You selected {len(wanted) + unknown} files; one ZIP holds at most {MAX_FILES}. Select fewer files."
        )
    found = {upload.pk: upload for upload in Upload.objects.filter(owner=user, pk__in=wanted)}
    unknown += len(wanted) - len(found)
    if unknown:
        what = (
            "1 of the selected files no longer exists"
            if unknown == 1
            else f"{unknown} of the selected files no longer exist"
        )
        raise UploadNotFound(f"{what} (deleted meanwhile?). Nothing was downloaded: select the files again.")
    uploads = [found[key] for key in wanted]
    unfinished = [upload for upload in uploads if upload.status != Upload.Status.COMPLETE]
    if unfinished:
        listed = ", ".join(f"{upload.display_name} ({upload.status})" for upload in unfinished[:NAMES_IN_A_REFUSAL])
        more = len(unfinished) - NAMES_IN_A_REFUSAL
        listed += f" and {more} more" if more > 0 else ""
        raise NotComplete(f"Only finished files go into a ZIP, and these are not: {listed}. Nothing was downloaded.")
    return uploads


def member_names(names: Iterable[str]) -> list[str]:
    """The members' names: each display name as it is, a repeated one numbered "name (2).ext", "name (3).ext", ….

    Compared without case: Windows and macOS would extract "A.txt" and "a.txt" to one file.
    """
    taken: set[str] = set()
    members = []
    for name in names:
        candidate, number = name, 1
        while candidate.casefold() in taken:
            number += 1
            candidate = _numbered(name, number)
        taken.add(candidate.casefold())
        members.append(candidate)
    return members


def _numbered(name: str, number: int) -> str:
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > 16:
        return f"{name} ({number})"
    if stem.lower().endswith(".tar"):  # "logs (2).tar.gz", not "logs.tar (2).gz"
        stem, extension = stem[:-4], f"{stem[-3:]}.{extension}"
    return f"{stem} ({number}).{extension}"


class _OpenFiles:
    """The ZIP's finished files, all opened before its slot is taken, each closed exactly once.

    A file is closed as soon as its member is sent (an s3 reader keeps a window
    of up to 8 MiB until closed: a hundred of them must not add up), the rest
    when the download ends (DownloadHold closes this). Both can happen at once,
    from a worker thread and from the event loop, hence the lock: a descriptor
    closed twice could close another file that reused its number.
    """

    def __init__(self, readers: list[storage.FinishedReader]):
        self._readers: list[storage.FinishedReader | None] = list(readers)
        self._lock = threading.Lock()

    @classmethod
    def of(cls, uploads: list[Upload]) -> "_OpenFiles":
        files = cls([])
        try:
            for upload in uploads:
                files._readers.append(storage.backend().open_finished(upload.storage_key))
        except BaseException:
            files.close()
            raise
        return files

    def blocks(self, index: int, size: int) -> Iterator[bytes]:
        """The ``size`` bytes of file ``index`` in BLOCK_BYTES blocks (zipstream-ng runs this in the body's thread)."""
        reader = self._readers[index]
        position = 0
        try:
            while position < size:
                block = reader.read(position, min(BLOCK_BYTES, size - position))
                if not block:
                    raise FileShort(f"member {index} ends at {position} of {size} bytes")
                position += len(block)
                yield block
        finally:
            self._close(index)

    def _close(self, index: int) -> None:
        with self._lock:
            reader, self._readers[index] = self._readers[index], None
        if reader is not None:
            reader.close()

    def close(self) -> None:
        for index in range(len(self._readers)):
            self._close(index)


async def _body(hold: DownloadHold, chunks: Iterator[bytes], length: int) -> AsyncIterator[bytes]:
    """The ZIP's ``length`` bytes as zipstream-ng makes them, holding the download slot until they end.

    zipstream-ng's generator is synchronous and reads the files as it goes:
    each next chunk is pulled in a worker thread (never on the event loop, and
    not on the one thread that sync_to_async shares). The ZIP ends short (the
    server then closes the connection) when the slot is revoked, a file is
    deleted meanwhile, or a file is shorter than its row.
    """
    keeper = asyncio.ensure_future(hold.keep())
    # Inside the body, so that a body never started (the client left first) is never counted.
    metrics.CONNECTIONS_OPEN.labels("download").inc()
    try:
        while True:
            if hold.revoked:
                hold.outcome = Slot.ReleaseReason.RESET
                return
            try:
                chunk = await asyncio.to_thread(next, chunks, None)
            except storage.FileGone:
                log.warning("zip download file deleted user=%s slot=%s at=%s", hold.user_id, hold.slot.pk, hold.sent)
                hold.outcome = Slot.ReleaseReason.CANCELLED
                return
            except FileShort as short:
                log.error("zip download file short user=%s slot=%s: %s", hold.user_id, hold.slot.pk, short)
                hold.outcome = Slot.ReleaseReason.ERROR
                return
            if chunk is None:
                return
            hold.sent += len(chunk)
            if hold.sent == length:
                # Before the last chunk is handed over: a client that has every byte may close the
                # connection while that send still waits, and Django then closes this body there.
                hold.outcome = Slot.ReleaseReason.COMPLETED
            yield chunk
            metrics.BYTES_SERVED.inc(len(chunk))
    except Exception:
        # A read, ZIP or database fault: Django logs it and drops the connection; the client sees a short ZIP.
        hold.outcome = Slot.ReleaseReason.ERROR
        raise
    finally:
        # Nothing awaited before the release is claimed (as in uploads.downloads._body).
        keeper.cancel()
        metrics.CONNECTIONS_OPEN.labels("download").dec()
        await hold.release()
