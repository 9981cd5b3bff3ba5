"""Downloads of finished files: the checks, the conditional and Range decision, the download slot, the streamed body.

``download_response`` answers GET and HEAD of ``/api/uploads/<id>/content``
(called by the thin view in uploads.api, in a request thread). A GET that
sends bytes holds a download slot (a Slot row of kind download) for as long
as its body streams: the body is an async generator that reads the file in
BLOCK_BYTES blocks in a thread, renews the slot's lease as it goes and
releases the slot in a ``finally`` when the last byte is out, the client goes
away (Django cancels the response and closes the generator) or the slot is
revoked (the file was deleted, an admin reset it). The server's memory stays
at a few blocks whatever the file size and however slowly the client reads:
directdrivex/server.py makes each ``send`` wait while the socket's write
buffer is full.

With DIRECTDRIVEX_ACCEL_REDIRECT set, a GET is answered with an
``X-Accel-Redirect`` below that nginx ``internal`` prefix and no body; nginx
then sends the bytes: from the storage folder, answering Range itself
(``local``), or from a short-lived presigned GET of the object, of the range
this server decided (``s3``; docs/deployment.md, "nginx in front").
"""

import asyncio
import contextlib
import logging
import re
import threading
import unicodedata
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpResponse, HttpResponseNotModified, StreamingHttpResponse

from uploads import metrics, ranges, storage
from uploads.exceptions import LeaseLost, NotComplete, RangeNotSatisfiable
from uploads.models import ShareLink, Slot, Upload
from uploads.services.calls import db_call
from uploads.services.shares import share_download_ended
from uploads.services.slots import slot_admit, slot_release, slot_renew
from uploads.services.uploads import upload_for

log = logging.getLogger(__name__)

# One read and one ASGI message per block: large enough that per-block costs
# (a thread hop, an event-loop round) are small against the bytes, small
# enough that a few of them in flight are nothing next to the process.
BLOCK_BYTES = 1024 * 1024
# RFC 5987 attr-char, beyond the letters, digits and "_.-~" that quote() always keeps.
_ATTR_CHAR_EXTRA = "!#$&+^`|"
_NOT_PLAIN_ASCII = re.compile(r'[^\x20-\x7e]|["\\%]')


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII ``filename`` for old clients and the exact name as ``filename*`` (RFC 6266).

    Django's content_disposition_header gives only ``filename*`` for a
    non-ASCII name; clients that do not read it would save the file unnamed.
    """
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_name = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    fallback = _NOT_PLAIN_ASCII.sub("_", ascii_name).strip() or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe=_ATTR_CHAR_EXTRA)}"


def modified_at(upload: Upload):
    """When the file's bytes last changed: its completion (a complete row without it, which no service writes,
    falls back to its creation)."""
    return upload.completed_at or upload.created_at


def etag_of(upload: Upload) -> str:
    """Strong: a finished file's bytes never change. The sha256 when known, else the file's unique storage key."""
    return ranges.strong_etag(upload.sha256 or upload.storage_key)


def _validators(upload: Upload) -> dict[str, str]:
    return {
        "ETag": etag_of(upload),
        "Last-Modified": ranges.http_date(modified_at(upload)),
        # Only the owner may read it: shared caches must not keep a copy.
        "Cache-Control": "private",
    }


def _file_headers(upload: Upload, decision: ranges.Decision) -> dict[str, str]:
    headers = {
        **_validators(upload),
        "Content-Type": "application/octet-stream",
        "Content-Disposition": content_disposition(upload.display_name),
        "Accept-Ranges": "bytes",
        "Content-Length": str(decision.byte_range.length if decision.byte_range else upload.size),
    }
    if decision.byte_range is not None:
        headers["Content-Range"] = decision.byte_range.content_range
    return headers


@dataclass(frozen=True)
class Downloader:
    """Who a download is for: the owner, signed in, or the visitors of one share link.

    The slot is the owner's either way (``user``); a link's downloads count
    against the per-user limit as one user of their own (slot_admit's ``share``).
    """

    user: object
    share: ShareLink | None = None

    def describe(self) -> str:
        # For log lines: a link is named by its id, never by its token.
        return f"user={self.user.pk}" + (f" share={self.share.pk}" if self.share else "")


def download_response(user, upload_id, request_headers: Mapping[str, str], *, head: bool = False):
    """The answer to GET (or HEAD) /api/uploads/<id>/content, or the named refusal.

    404 not_found (unknown or someone else's), 409 not_complete, 416 with
    Content-Range, 429 download_slots_exhausted. HEAD answers the same headers
    without a body and holds no slot.
    """
    upload = upload_for(user, upload_id)
    if upload.status != Upload.Status.COMPLETE:
        raise NotComplete(f"The upload is {upload.status}: there is nothing to download yet.")
    return _file_response(upload, Downloader(user), request_headers, head=head)


def share_download_response(link: ShareLink, request_headers: Mapping[str, str], *, head: bool = False):
    """The answer to GET (or HEAD) /s/<token>/download for a link that opens (uploads.services.shares.share_open).

    The same contract as the owner's download; what it sends is counted
    against the link when it ends (share_download_ended).
    """
    return _file_response(link.upload, Downloader(link.upload.owner, share=link), request_headers, head=head)


def _file_response(upload: Upload, who: Downloader, request_headers: Mapping[str, str], *, head: bool):
    accel_prefix = settings.DIRECTDRIVEX_ACCEL_REDIRECT
    # Behind X-Accel-Redirect to a file nginx answers Range itself; we still answer the conditionals.
    nginx_ranges = accel_prefix and not head and storage.backend().accel_answers_ranges
    decision = ranges.decide(
        size=upload.size,
        etag=etag_of(upload),
        last_modified=modified_at(upload),
        range_header=None if nginx_ranges else request_headers.get("Range"),
        if_range=request_headers.get("If-Range"),
        if_none_match=request_headers.get("If-None-Match"),
        if_modified_since=request_headers.get("If-Modified-Since"),
    )
    if decision.status == 304:
        return HttpResponseNotModified(headers=_validators(upload))
    if decision.status == 416:
        raise RangeNotSatisfiable(upload.size)
    headers = _file_headers(upload, decision)
    if head:
        return HttpResponse(status=decision.status, headers=headers)
    if accel_prefix:
        return _accel_redirect(who, upload, accel_prefix, headers, decision, request_headers)
    return _stream(who, upload, decision, headers)


def _accel_redirect(
    who: Downloader,
    upload: Upload,
    prefix: str,
    headers: dict[str, str],
    decision: ranges.Decision,
    request_headers: Mapping[str, str],
) -> HttpResponse:
    """No body: nginx gets the file where the backend says, below ``prefix``, and computes its length.

    nginx's status and Content-Range are those of what it sends (a 206 for a range).
    """
    # nginx, not this process, sends the bytes, so no slot can be held while
    # they flow; admitting one for an instant still refuses downloads with 429
    # once direct streams hold every slot (nginx bounds its own: limit_conn).
    slot = slot_admit(Slot.Kind.DOWNLOAD, who.user, upload=upload, share=who.share)
    slot_release(slot.pk, Slot.ReleaseReason.COMPLETED, generation=slot.generation)
    target = prefix + storage.backend().accel_path(upload.storage_key, headers)
    headers = {name: value for name, value in headers.items() if name not in ("Content-Length", "Content-Range")}
    headers["X-Accel-Redirect"] = target
    log.info("download handed to nginx upload=%s %s", upload.pk, who.describe())
    if who.share is not None:
        # What nginx will send, counted now: this process never sees its end (docs/sharing.md).
        first, length = _span(upload, decision, request_headers if storage.backend().accel_answers_ranges else None)
        if length:  # not a range nginx will refuse (416): that sends nothing
            share_download_ended(who.share, sent=length, reached_end=first + length == upload.size)
    return HttpResponse(headers=headers)


def _span(upload: Upload, decision: ranges.Decision, nginx_headers: Mapping[str, str] | None) -> tuple[int, int]:
    """(first byte, length) a response sends. With ``nginx_headers``, nginx answers the Range: decided here alike.

    (0, 0) for a range nginx will refuse with 416.
    """
    if nginx_headers is not None and nginx_headers.get("Range"):
        decision = ranges.decide(
            size=upload.size,
            etag=etag_of(upload),
            last_modified=modified_at(upload),
            range_header=nginx_headers.get("Range"),
            if_range=nginx_headers.get("If-Range"),
            if_none_match=None,
            if_modified_since=None,
        )
        if decision.status == 416:
            return 0, 0
    if decision.byte_range is not None:
        return decision.byte_range.first, decision.byte_range.length
    return 0, upload.size


def _stream(who: Downloader, upload: Upload, decision: ranges.Decision, headers: dict[str, str]) -> "DownloadResponse":
    first, length = _span(upload, decision, None)
    # Opened before the slot is taken: a missing file is a server fault (fsck
    # finds it), answered 500 with a log line, and must not cost a slot.
    reader = storage.backend().open_finished(upload.storage_key)
    try:
        channel = new_download_channel()
        slot = slot_admit(Slot.Kind.DOWNLOAD, who.user, upload=upload, share=who.share, holder_channel=channel)
    except BaseException:
        reader.close()
        raise
    log.info(
        "download started upload=%s %s slot=%s first=%s length=%s", upload.pk, who.describe(), slot.pk, first, length
    )
    hold = DownloadHold(
        slot, channel, reader, upload_id=upload.pk, user_id=who.user.pk, share=who.share,
        ends_at_eof=first + length == upload.size,
    )  # fmt: skip
    return DownloadResponse(hold, _body(hold, first, length), status=decision.status, headers=headers)


def new_download_channel() -> str:
    """A channel-layer name for the download, so that a revocation reaches it at once (notify_holders).

    The layer's default prefix, as the upload transports' channels have:
    channels-redis reads all of a process's channels of one prefix through one
    list, and only one receiver of the process reads at a time; a download
    waiting on a list of its own kept the writers' notices (stop, revoke) unread.
    """
    layer = get_channel_layer()
    return async_to_sync(layer.new_channel)() if layer is not None else ""


def renew_interval() -> float:
    """How often a download renews its slot's lease: well inside one lease."""
    return settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS / 3


class Closable(Protocol):
    """What a download reads from: one FinishedReader, or the several files of a ZIP (uploads.zips)."""

    def close(self) -> None: ...


class DownloadHold:
    """A streaming download's slot: renewed in the background, ended by a revocation, released exactly once.

    The renewals run in a task of their own (``keep``), not between blocks:
    a block can wait on a slow reader's socket far longer than a lease, and
    a download must not lose its slot (and its client the rest of the file)
    for reading slowly. ``revoked`` is set when a renewal finds the slot
    taken (a reset, a reap, a delete) or a revocation notice arrives on the
    slot's channel; the body stops at its next block.
    """

    def __init__(
        self,
        slot: Slot,
        channel: str,
        reader: Closable,
        *,
        upload_id,
        user_id,
        share: ShareLink | None = None,
        ends_at_eof: bool = False,
        what: str = "download",
        subject: str = "",
    ):
        self.slot = slot
        self.channel = channel
        self.reader = reader
        # How its log lines name it: "download ... upload=<id>", or a ZIP's "zip download ... files=<n>".
        self.what = what
        self.subject = subject or f"upload={upload_id}"
        # How the download ends, as far as it got: what the slot is released with.
        self.outcome = Slot.ReleaseReason.DISCONNECTED
        self.upload_id = upload_id
        self.user_id = user_id
        self.revoked = ""  # why, once revoked
        # A download through a share link is counted against it when it ends (share_download_ended):
        # the bytes it sent, and one download if it sent the file's last byte.
        self.share = share
        self.ends_at_eof = ends_at_eof
        self.sent = 0
        self._claim = threading.Lock()
        self._released = False

    async def keep(self) -> None:
        """Renew the lease every renew_interval() and listen for a revocation, until cancelled or revoked."""
        notice = asyncio.ensure_future(self._notice()) if self.channel else asyncio.Future()
        try:
            while not self.revoked:
                # The notice's task, or the next renewal, whichever comes first.
                await asyncio.wait({notice}, timeout=renew_interval())
                if notice.done():
                    return
                try:
                    # No deadline: a renewal waits for a slow database as long as it takes.
                    await db_call(slot_renew, self.slot.pk, self.slot.generation, timeout=None)
                except LeaseLost:
                    self._revoke("the slot was released by someone else (reset, reap or delete)")
                except Exception:
                    # The database is down: try again next time; a lost lease shows up then.
                    log.warning("%s lease not renewed %s slot=%s", self.what, self.subject, self.slot.pk, exc_info=True)
        finally:
            notice.cancel()

    async def _notice(self) -> None:
        layer = get_channel_layer()
        try:
            message = await layer.receive(self.channel)
        except Exception:  # a channel layer outage: the renewals still find a revocation
            log.warning("%s cannot hear revocations %s slot=%s", self.what, self.subject, self.slot.pk, exc_info=True)
            await asyncio.Event().wait()  # until cancelled
        self._revoke(message.get("detail", "revoked"))

    def _revoke(self, why: str) -> None:
        self.revoked = why
        log.warning("%s revoked %s user=%s slot=%s: %s", self.what, self.subject, self.user_id, self.slot.pk, why)

    def _first_release(self) -> bool:
        with self._claim:
            first, self._released = not self._released, True
            return first

    def _end(self) -> None:
        """In a thread: give the slot back and count what a share link's visitor got."""
        slot_release(self.slot.pk, self.outcome, generation=self.slot.generation)
        if self.share is not None and self.sent:
            reached_end = self.ends_at_eof and self.outcome == Slot.ReleaseReason.COMPLETED
            share_download_ended(self.share, sent=self.sent, reached_end=reached_end)

    async def release(self) -> None:
        """From the body, however it ended (``outcome`` says how); a cancellation does not stop the release."""
        if not self._first_release():
            return
        self.reader.close()  # descriptors (or an s3 reader's buffer): closing them does not block
        sent = self.sent
        release = asyncio.ensure_future(db_call(self._end, timeout=None))
        release.add_done_callback(lambda done: self._log_release(done, sent))
        # Shielded: a client that leaves as the body ends cancels this task here, and the release
        # must still happen (it goes on in its thread either way; the callback says how it went).
        with contextlib.suppress(Exception):  # the database is down: logged by the callback
            await asyncio.shield(release)

    def _log_release(self, release: asyncio.Future, sent: int) -> None:
        if release.cancelled() or release.exception() is not None:
            # The database is down: the slot is freed when its lease runs out.
            error = "cancelled" if release.cancelled() else repr(release.exception())
            log.warning("%s slot not released %s slot=%s: %s", self.what, self.subject, self.slot.pk, error)
            return
        log.info(
            "%s ended %s user=%s slot=%s reason=%s sent=%s",
            self.what, self.subject, self.user_id, self.slot.pk, self.outcome, sent,
        )  # fmt: skip

    def release_on_close(self) -> None:
        """From the response's close() (a thread), for a body that never ran or never reached its end.

        The client left before the body began (the view's response was dropped:
        directdrivex.handler closes it), or Django stopped the body where no
        cleanup of its own could run: the slot goes with the last outcome the
        body recorded.
        """
        if not self._first_release():
            return
        self.reader.close()
        try:
            self._end()
        except Exception:
            log.warning("%s slot not released %s slot=%s", self.what, self.subject, self.slot.pk, exc_info=True)
            return
        log.info("%s closed %s slot=%s reason=%s", self.what, self.subject, self.slot.pk, self.outcome)


class DownloadResponse(StreamingHttpResponse):
    """A streamed download that gives its slot back when it is closed, body or no body.

    Django closes every response it sent; one it dropped because the client
    left while the view ran is closed by directdrivex.handler.
    """

    def __init__(self, hold: DownloadHold, body, **kwargs):
        super().__init__(body, **kwargs)
        self.hold = hold
        self.body = body

    def __aiter__(self):
        # The body itself, not Django's two wrapping generators: Django closes what __aiter__ gives
        # it when the client leaves (aclosing), and closing a wrapper would leave the body suspended
        # until the garbage collector finalizes it, and its slot and file held until then.
        return self.body

    def close(self):
        try:
            self.hold.release_on_close()
        finally:
            super().close()


async def _body(hold: DownloadHold, first: int, length: int) -> AsyncIterator[bytes]:
    """The file's bytes ``first`` .. ``first + length - 1`` in blocks, holding the download slot until it ends.

    It ends short (the server then closes the connection: directdrivex.server)
    when the slot is revoked or the file deleted: a 204 to DELETE means no
    more of the file goes out, beyond the block already on its way.
    """
    position, remaining = first, length
    keeper = asyncio.ensure_future(hold.keep())
    # Inside the body, so that a body never started (the client left first) is never counted.
    metrics.CONNECTIONS_OPEN.labels("download").inc()
    try:
        while remaining:
            if hold.revoked:
                hold.outcome = Slot.ReleaseReason.RESET
                return
            try:
                # Disk reads block: never on the event loop.
                block = await asyncio.to_thread(hold.reader.read, position, min(BLOCK_BYTES, remaining))
            except storage.FileGone:
                log.warning("download file deleted upload=%s slot=%s at=%s", hold.upload_id, hold.slot.pk, position)
                hold.outcome = Slot.ReleaseReason.CANCELLED
                return
            if not block:
                # Shorter than its row says (lost or cut by hand): the client sees a short body.
                log.error("download file short upload=%s user=%s at=%s", hold.upload_id, hold.user_id, position)
                hold.outcome = Slot.ReleaseReason.ERROR
                return
            position += len(block)
            remaining -= len(block)
            hold.sent += len(block)
            if not remaining:
                # Before the last block is handed over: a client that has every byte may close the
                # connection while that send still waits, and Django then closes this body there.
                hold.outcome = Slot.ReleaseReason.COMPLETED
            yield block
            metrics.BYTES_SERVED.inc(len(block))  # per 1 MiB block, not per byte
    except Exception:
        # A read or database fault: Django logs it and drops the connection; the client sees a short body.
        hold.outcome = Slot.ReleaseReason.ERROR
        raise
    finally:
        # Nothing awaited before the release is claimed: a cancellation arriving here (the client
        # left as the body ended) must not skip it.
        keeper.cancel()
        metrics.CONNECTIONS_OPEN.labels("download").dec()
        await hold.release()
