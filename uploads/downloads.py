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
``X-Accel-Redirect`` to the file under that nginx ``internal`` prefix and no
body; nginx then sends the bytes and answers Range itself (docs/api.md,
"Downloads").
"""

import asyncio
import logging
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Mapping
from urllib.parse import quote

from django.conf import settings
from django.http import HttpResponse, HttpResponseNotModified, StreamingHttpResponse

from uploads import ranges, storage
from uploads.exceptions import LeaseLost, NotComplete, RangeNotSatisfiable
from uploads.models import Slot, Upload
from uploads.ops import metrics
from uploads.services.calls import db_call
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


def download_response(user, upload_id, request_headers: Mapping[str, str], *, head: bool = False):
    """The answer to GET (or HEAD) /api/uploads/<id>/content, or the named refusal.

    404 not_found (unknown or someone else's), 409 not_complete, 416 with
    Content-Range, 429 download_slots_exhausted. HEAD answers the same headers
    without a body and holds no slot.
    """
    upload = upload_for(user, upload_id)
    if upload.status != Upload.Status.COMPLETE:
        raise NotComplete(f"The upload is {upload.status}: there is nothing to download yet.")
    accel_prefix = settings.DIRECTDRIVEX_ACCEL_REDIRECT
    decision = ranges.decide(
        size=upload.size,
        etag=etag_of(upload),
        last_modified=modified_at(upload),
        # Behind X-Accel-Redirect nginx answers Range itself; we still answer the conditionals.
        range_header=None if accel_prefix and not head else request_headers.get("Range"),
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
        return _accel_redirect(user, upload, accel_prefix, headers)
    return _stream(user, upload, decision, headers)


def _accel_redirect(user, upload: Upload, prefix: str, headers: dict[str, str]) -> HttpResponse:
    """No body: nginx serves the file at ``prefix`` + its storage key (under files/) and computes its length."""
    # nginx, not this process, sends the bytes, so no slot can be held while
    # they flow; admitting one for an instant still refuses downloads with 429
    # once direct streams hold every slot (nginx bounds its own: limit_conn).
    slot = slot_admit(Slot.Kind.DOWNLOAD, user, upload=upload)
    slot_release(slot.pk, Slot.ReleaseReason.COMPLETED, generation=slot.generation)
    headers = {name: value for name, value in headers.items() if name != "Content-Length"}
    headers["X-Accel-Redirect"] = prefix + storage.backend().accel_path(upload.storage_key)
    log.info("download handed to nginx upload=%s user=%s", upload.pk, user.pk)
    return HttpResponse(headers=headers)


def _stream(user, upload: Upload, decision: ranges.Decision, headers: dict[str, str]) -> StreamingHttpResponse:
    first, length = (decision.byte_range.first, decision.byte_range.length) if decision.byte_range else (0, upload.size)
    # Opened before the slot is taken: a missing file is a server fault (fsck
    # finds it), answered 500 with a log line, and must not cost a slot.
    handle = storage.backend().open_finished(upload.storage_key)
    try:
        slot = slot_admit(Slot.Kind.DOWNLOAD, user, upload=upload)
    except BaseException:
        handle.close()
        raise
    log.info(
        "download started upload=%s user=%s slot=%s first=%s length=%s", upload.pk, user.pk, slot.pk, first, length
    )
    body = _body(handle, first, length, slot, upload_id=upload.pk, user_id=user.pk)
    return StreamingHttpResponse(body, status=decision.status, headers=headers)


async def _db(function, *args, **kwargs):
    # No deadline: a body waits for its renewal or release as long as the database takes.
    return await db_call(function, *args, timeout=None, **kwargs)


def renew_interval() -> float:
    """How often a streaming body renews its slot's lease: well inside one lease."""
    return settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS / 3


async def _body(
    handle: storage.FinishedReader, first: int, length: int, slot: Slot, *, upload_id, user_id
) -> AsyncIterator[bytes]:
    """The file's bytes ``first`` .. ``first + length - 1`` in blocks, holding ``slot`` until it ends."""
    position, remaining = first, length
    reason = Slot.ReleaseReason.DISCONNECTED
    renew_at = time.monotonic() + renew_interval()
    # Inside the body, so that a body never started (the client left first) is never counted.
    metrics.CONNECTIONS_OPEN.labels("download").inc()
    try:
        while remaining:
            # Disk reads block: never on the event loop.
            block = await asyncio.to_thread(handle.read, position, min(BLOCK_BYTES, remaining))
            if not block:
                # Shorter than its row says (lost or cut by hand): the client sees a short body.
                log.error("download file short upload=%s user=%s at=%s", upload_id, user_id, position)
                reason = Slot.ReleaseReason.ERROR
                return
            yield block
            metrics.BYTES_SERVED.inc(len(block))  # per 1 MiB block, not per byte
            position += len(block)
            remaining -= len(block)
            if time.monotonic() >= renew_at:
                # A body that cannot renew its lease (the slot was revoked: the file
                # deleted, an admin reset) stops; its client sees a short body.
                await _db(slot_renew, slot.pk, slot.generation)
                renew_at = time.monotonic() + renew_interval()
        reason = Slot.ReleaseReason.COMPLETED
    except LeaseLost:
        log.warning("download slot revoked upload=%s user=%s slot=%s at=%s", upload_id, user_id, slot.pk, position)
        reason = Slot.ReleaseReason.RESET
    except Exception:
        # A read or database fault: Django logs it and drops the connection; the client sees a short body.
        reason = Slot.ReleaseReason.ERROR
        raise
    finally:
        handle.close()
        metrics.CONNECTIONS_OPEN.labels("download").dec()
        await _release(slot, reason, upload_id=upload_id, user_id=user_id, sent=position - first)


async def _release(slot: Slot, reason: str, *, upload_id, user_id, sent: int) -> None:
    release = asyncio.ensure_future(_db(slot_release, slot.pk, reason, generation=slot.generation))
    try:
        # Shielded: a second cancellation (Daphne's, 10 s after a disconnect)
        # must not stop the release half-way; it finishes in its thread regardless.
        await asyncio.shield(release)
    except asyncio.CancelledError:
        log.warning("download cancelled while releasing upload=%s user=%s slot=%s", upload_id, user_id, slot.pk)
        raise
    except Exception:
        # The database is down: the slot is freed when its lease runs out.
        log.warning("download slot not released upload=%s user=%s slot=%s", upload_id, user_id, slot.pk, exc_info=True)
        return
    log.info("download ended upload=%s user=%s slot=%s reason=%s sent=%s", upload_id, user_id, slot.pk, reason, sent)
