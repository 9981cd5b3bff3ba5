"""tus 1.0 over HTTP (docs/tus.md): the same uploads, slots, quota and writer as the WebSocket protocol.

One consumer per HTTP request under ``/api/tus/``. Only the protocol lives
here: reading tus headers, answering with tus headers and statuses, and the
order of things. Creation is uploads.services.uploads.upload_create (as for
POST /api/uploads/), termination is upload_delete, and a PATCH body goes into
an ``UploadWriter`` (uploads.writer) exactly as WebSocket frames do: the
writer admits, commits every 32 MiB or 1 s, finalizes and releases.

The server (directdrivex.server) starts this consumer as soon as a POST's
or PATCH's headers are in and hands it the body piece by piece; the consumer
reads the next piece only while the writer has room (``wait_for_room``), so a
client sending faster than the disk is held back by TCP.

One writer per upload, without sticky sessions: a PATCH or HEAD for an upload
that an earlier request (any process, either transport) still holds asks that
holder through the channel layer to let go, waits up to
budgets.TAKEOVER_SECONDS for its final commit, and answers from the durable
offset, or 423 with Retry-After.
"""

import asyncio
import base64
import binascii
import io
import json
import logging
import re
import time

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.core.cache import cache
from django.core.handlers.asgi import ASGIRequest
from django.utils.http import http_date
from rest_framework.exceptions import MethodNotAllowed

from uploads import budgets, logs, metrics
from uploads.api_errors import refusal_parts
from uploads.exceptions import (
    DirectDriveXError,
    InvalidRequest,
    NotUploading,
    OffsetMismatch,
    SizeExceeded,
    TakenOver,
    TusVersionUnsupported,
    UnsupportedMediaType,
    UploadBusy,
    UploadNotFound,
)
from uploads.models import Upload
from uploads.serializers import UploadCreateSerializer
from uploads.services.calls import db_call
from uploads.services.grants import writer_ask_to_stop, writer_holder
from uploads.services.slots import BUSY_RETRY_SECONDS
from uploads.services.uploads import upload_create, upload_delete, upload_expires_at, upload_for
from uploads.transports.auth import http_request_user
from uploads.transports.sessions import act_on_notice, end_session, layer_receive, log_refusal, release_reason
from uploads.writer import ClientGone, Reason, UploadWriter

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,expiration"
OFFSET_OCTET_STREAM = "application/offset+octet-stream"
# Everything a browser client on another origin needs to read (DIRECTDRIVEX_CORS_ORIGINS).
EXPOSED_HEADERS = (
    "Location, Upload-Offset, Upload-Length, Upload-Metadata, Upload-Expires, Upload-Defer-Length, "
    "Tus-Resumable, Tus-Version, Tus-Extension, Tus-Max-Size, Retry-After"
)
ALLOWED_HEADERS = (
    "Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Metadata, Upload-Offset, "
    "Upload-Defer-Length, Upload-Concat, X-Requested-With, X-CSRFToken, X-Request-ID"
)
ALLOWED_METHODS = "POST, HEAD, PATCH, DELETE, OPTIONS"
# How often a request waiting for an earlier holder to let go looks again.
TAKEOVER_POLL_SECONDS = 0.1
# How long a PATCH counts as arriving at most (arrival_counted), should it never say it was admitted.
ARRIVAL_SECONDS = 2 * budgets.TAKEOVER_SECONDS
# tus metadata keys: no spaces or commas (tus 1.0, Upload-Metadata).
METADATA_KEY = re.compile(r"[^\s,]+\Z")
PATH = re.compile(r"/api/tus/(?:(?P<upload_id>[^/]+)/?)?\Z")


class BodyEnded(Exception):
    """The request body arrived whole: make it durable, answer, and keep the slot for the next PATCH."""


def parse_metadata(header: str) -> dict[str, str]:
    """tus ``Upload-Metadata``: comma-separated ``key base64value`` pairs (the value may be absent)."""
    metadata: dict[str, str] = {}
    for pair in header.split(","):
        pair = pair.strip()
        if not pair:
            continue
        key, _, encoded = pair.partition(" ")
        if not METADATA_KEY.match(key):
            raise InvalidRequest(f"Upload-Metadata key {key[:50]!r} is not a valid key.")
        if key in metadata:
            raise InvalidRequest(f"Upload-Metadata has the key {key[:50]!r} twice.")
        try:
            metadata[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"Upload-Metadata value of {key[:50]!r} is not base64 of UTF-8 text.") from None
    return metadata


def format_metadata(upload: Upload) -> str:
    pairs = {"filename": upload.display_name, "sha256": upload.sha256, "fingerprint": upload.fingerprint}
    return ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs.items() if value)


def _integer_header(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise InvalidRequest(f"{name} must be a non-negative integer, not {value[:50]!r}.")
    return int(value)


def _arrivals_key(upload_id: str) -> str:
    return f"tus-arriving:{upload_id}"


def _count_arrival(upload_id: str, delta: int) -> None:
    key = _arrivals_key(upload_id)
    cache.add(key, 0, timeout=ARRIVAL_SECONDS)
    if cache.incr(key, delta) < 0:  # its +1 expired first: a count below zero would hide the next arrival
        cache.set(key, 0, timeout=ARRIVAL_SECONDS)


# PATCHes of this process arriving, per upload: counted at once, before the cache hears of them.
_arriving_here: dict[str, int] = {}


async def arrival_counted(upload_id: str, delta: int) -> None:
    """Count a PATCH as arriving for ``upload_id`` (+1) until its writer is admitted or it ends (-1).

    Between a PATCH's headers and its writer's admission (authentication, a
    transaction or two) nothing in the database says it is coming; a HEAD in
    that gap would answer an offset the PATCH then moves. The count lives in
    Django's cache: Redis, which every process shares, in a deployment of
    several; the process's memory otherwise. Counted in this process first,
    without waiting for the cache, so that a HEAD here never misses a PATCH
    that reached the process before it. A courtesy with an expiry: a cache
    that fails, or a process that dies between the two, costs a HEAD at most
    ARRIVAL_SECONDS of waiting, never an answer.
    """
    left = _arriving_here.get(upload_id, 0) + delta
    if left > 0:
        _arriving_here[upload_id] = left
    else:
        _arriving_here.pop(upload_id, None)
    try:
        await sync_to_async(_count_arrival, thread_sensitive=False)(upload_id, delta)
    except Exception:
        log.warning("could not count a tus PATCH arriving for upload=%s", upload_id, exc_info=True)


async def arrivals_pending(upload_id: str) -> bool:
    if _arriving_here.get(upload_id):
        return True
    try:
        count = await sync_to_async(cache.get, thread_sensitive=False)(_arrivals_key(upload_id), 0)
    except Exception:
        log.warning("could not read the tus PATCHes arriving for upload=%s", upload_id, exc_info=True)
        return False
    return count > 0


async def _no_ack(_offset: int) -> None:
    """tus has no acknowledgements: the PATCH's answer says where the upload stands."""


class TusConsumer:
    """A Channels-style ASGI application for one request under /api/tus/ (see the module docstring)."""

    @classmethod
    def as_asgi(cls):
        async def app(scope, receive, send):
            await cls(scope, receive, send).handle()

        return app

    def __init__(self, scope, receive, send):
        self.scope, self.receive, self.send = scope, receive, send
        self.headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        self.method = scope["method"]
        self.writer: UploadWriter | None = None
        # Headers every refusal of this request carries (the upload's Location, its current offset).
        self.refusal_headers: dict[str, str] = {}
        self.session: asyncio.Future | None = None
        self.client_gone = False
        self.answered = False
        self.status: int | None = None  # what was answered, for the request's log line
        self.user_id: int | None = None
        self.channel_name = ""
        self._arrival: str | None = None  # the upload this PATCH is counted as arriving for (arrival_counted)
        # Asked by a newer request to let go (_asked_to_stop): why, and how many arrived messages are still fed.
        self._let_go: Exception | None = None
        self._drain = 0
        self._asked_to_let_go = asyncio.Event()
        # The event loop's time by which everything after the client left must be done (uploads.budgets).
        self.end_by: float | None = None

    # --- the request ------------------------------------------------------------------

    async def handle(self):
        self.request_id = logs.bind_connection(self.scope)  # every line of this request carries it
        started = time.monotonic()
        try:
            await self._handle()
        finally:
            # One line per request, as Django's requests get (uploads.logs.RequestIdMiddleware).
            details = {"method": self.method, "path": self.scope["path"], "status": self.status}
            details |= {"duration_ms": round((time.monotonic() - started) * 1000), "user": self.user_id}
            logs.http_log.info("request", extra={"ddx": details})

    async def _handle(self):
        match = PATH.match(self.scope["path"])
        try:
            if match is None:
                raise UploadNotFound("No such tus resource.")
            upload_id = match.group("upload_id")
            if self.method == "OPTIONS":
                return await self._options()
            handler = self._resource_methods(upload_id).get(self.method)
            if handler is None:
                return await self._not_allowed(upload_id)  # a browser opening a Location sends no tus header
            if self.headers.get("tus-resumable") != TUS_VERSION:
                raise TusVersionUnsupported()
            await handler()
        except ClientGone:
            pass  # nobody to answer; the writer kept what arrived
        except Exception as error:
            log_refusal((match and match.group("upload_id")) or "-", error)
            await self._refuse(error)

    def _resource_methods(self, upload_id: str | None) -> dict:
        if upload_id is None:
            return {"POST": self._create}
        return {
            "HEAD": lambda: self._head(upload_id),
            "PATCH": lambda: self._patch(upload_id),
            "DELETE": lambda: self._delete(upload_id),
        }

    async def _options(self):
        headers = {
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": EXTENSIONS,
            "Tus-Max-Size": str(settings.DIRECTDRIVEX_MAX_FILE_SIZE),
        }
        if self._cors_origin() and "access-control-request-method" in self.headers:
            headers |= {
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": "86400",
            }
        await self._answer(204, headers)

    async def _not_allowed(self, upload_id: str | None):
        allowed = "POST, OPTIONS" if upload_id is None else "HEAD, PATCH, DELETE, OPTIONS"
        await self._refuse(
            MethodNotAllowed(self.method, f"{self.method} is not allowed here; use {allowed}."), {"Allow": allowed}
        )

    # --- creation ---------------------------------------------------------------------

    async def _create(self):
        """POST /api/tus/: POST /api/uploads/ in tus headers; a body with it is written as by a PATCH."""
        user = await self._user()  # first, as in the API: a stranger learns nothing from the other refusals
        if "upload-defer-length" in self.headers:
            raise InvalidRequest("Upload-Defer-Length is not supported: admission and quota need the size.")
        length = _integer_header("Upload-Length", self.headers.get("upload-length"))
        if length is None:
            raise InvalidRequest("Upload-Length is required.")
        body_length = self._body_length()
        if body_length and self.headers.get("content-type") != OFFSET_OCTET_STREAM:
            raise UnsupportedMediaType()
        if body_length is not None and body_length > length:
            raise SizeExceeded(f"The body has {body_length} bytes; the upload is {length}.")
        fields = self._creation_fields(length)
        upload, _slot = await db_call(upload_create, user, **fields)
        location = self._location(upload.pk)
        headers = {"Location": location, "Upload-Expires": http_date(upload_expires_at(upload).timestamp())}
        if body_length == 0:
            return await self._answer(201, headers | {"Upload-Offset": "0"})
        # creation-with-upload: a refusal of the body still tells the client where its upload is.
        self.refusal_headers["Location"] = location
        offset = await self._write_body(user, str(upload.pk), 0)
        await self._answer(201, headers | {"Upload-Offset": str(offset)})

    def _creation_fields(self, length: int) -> dict:
        metadata = parse_metadata(self.headers.get("upload-metadata", ""))
        if "filename" not in metadata:
            raise InvalidRequest("Upload-Metadata must carry a filename.")
        given = {"filename": metadata["filename"], "size": length}
        given |= {key: metadata[key] for key in ("sha256", "fingerprint") if key in metadata}
        fields = UploadCreateSerializer(data=given)
        fields.is_valid(raise_exception=True)  # answered 400 invalid, field by field, as by POST /api/uploads/
        return fields.validated_data

    # --- HEAD, DELETE --------------------------------------------------------------------

    async def _head(self, upload_id: str):
        """The durable offset, once no earlier request can move it (see the module docstring)."""
        user = await self._user()
        deadline = asyncio.get_running_loop().time() + budgets.TAKEOVER_SECONDS
        await self._wait_until_let_go(user, upload_id, deadline, arrivals=True)
        upload = await db_call(upload_for, user, upload_id)
        if upload.status not in (Upload.Status.UPLOADING, Upload.Status.COMPLETE):
            raise NotUploading(f"The upload is {upload.status}.")
        headers = {
            "Upload-Offset": str(upload.size if upload.status == Upload.Status.COMPLETE else upload.offset),
            "Upload-Length": str(upload.size),
            "Cache-Control": "no-store",
        }
        if metadata := format_metadata(upload):
            headers["Upload-Metadata"] = metadata
        if upload.status == Upload.Status.UPLOADING:
            headers["Upload-Expires"] = http_date(upload_expires_at(upload).timestamp())
        await self._answer(200, headers)

    async def _delete(self, upload_id: str):
        """DELETE /api/uploads/<id>/: the writer is fenced and told first, the bytes are gone before the 204."""
        user = await self._user()
        await db_call(upload_delete, user, upload_id)
        await self._answer(204)

    # --- PATCH ---------------------------------------------------------------------------

    async def _patch(self, upload_id: str):
        await self._arriving(upload_id)  # before anything else: a HEAD from now on waits for this PATCH
        try:
            await self._patch_arrived(upload_id)
        finally:
            await self._admitted()

    async def _patch_arrived(self, upload_id: str):
        user = await self._user()
        if self.headers.get("content-type") != OFFSET_OCTET_STREAM:
            raise UnsupportedMediaType()
        claimed = _integer_header("Upload-Offset", self.headers.get("upload-offset"))
        if claimed is None:
            raise InvalidRequest("Upload-Offset is required.")
        offset = await self._write_body(user, upload_id, claimed)
        await self._answer(204, {"Upload-Offset": str(offset)})

    async def _write_body(self, user, upload_id: str, claimed: int) -> int:
        """Write this request's body at ``claimed`` through an UploadWriter; returns the durable offset after it.

        Answers (by raising) 409 on an offset mismatch and 413 for a body past
        the upload's length before a byte is written. The session runs as a
        task of its own, so that a notice (stop, revoke) is acted on while it
        waits on the disk or the database; the body is read meanwhile by
        ``_pump``, no faster than the writer writes.
        """
        layer = get_channel_layer()
        self.channel_name = await layer.new_channel() if layer is not None else ""
        notices = asyncio.ensure_future(self._listen(layer)) if layer is not None else None
        metrics.CONNECTIONS_OPEN.labels("upload").inc()
        try:
            self.session = asyncio.ensure_future(self._write_session(user, upload_id, claimed))
            return await asyncio.shield(self.session)
        except asyncio.CancelledError:
            # The server is shutting down, or Daphne gave up on a gone client: nothing more is read;
            # what arrived is made durable and the slot freed, within the budget.
            self._client_left()
            if self.writer is not None:
                self.writer.stop(ClientGone())
            await end_session(self.session, self.end_by)
            raise
        finally:
            if notices is not None:
                notices.cancel()
            metrics.CONNECTIONS_OPEN.labels("upload").dec()

    async def _write_session(self, user, upload_id: str, claimed: int) -> int:
        self.writer = writer = UploadWriter(user, upload_id, self.channel_name)
        reason, keep_slot = Reason.ERROR, False
        pump = None
        try:
            try:
                offset = await self._open_completed_or_taking_over(writer)
            finally:
                await self._admitted()  # a holder now, or never: HEADs go by the slot from here on
            self.refusal_headers["Upload-Offset"] = str(offset)
            if claimed != offset:
                raise OffsetMismatch(f"Upload-Offset is {claimed}; the upload's offset is {offset}.")
            body_length = self._body_length()
            if body_length is not None and offset + body_length > writer.size:
                raise SizeExceeded(f"The body would end at byte {offset + body_length}; the upload is {writer.size}.")
            log.info("writer ready upload=%s user=%s offset=%s transport=tus", upload_id, user.pk, offset)
            pump = asyncio.ensure_future(self._pump(writer))
            try:
                done = await writer.run(_no_ack)
                reason = Reason.COMPLETED
                return done.size
            except BodyEnded:
                offset = await writer.make_durable()
                reason, keep_slot = Reason.DISCONNECTED, True
                return offset
        except ClientGone:
            reason = Reason.DISCONNECTED
            raise
        except Exception as error:
            reason = release_reason(error)
            raise
        finally:
            if pump is not None:
                pump.cancel()
            await writer.close(reason, deadline=self.end_by, keep_slot=keep_slot)
            if writer.grant is not None and reason != Reason.COMPLETED:
                self.refusal_headers["Upload-Offset"] = str(writer.durable)  # what close() made durable

    async def _open_completed_or_taking_over(self, writer: UploadWriter) -> int:
        """The writer's resume offset; for a complete upload its size, with nothing held (any PATCH is then 409)."""
        try:
            return await self._open_taking_over(writer)
        except NotUploading:
            upload = await db_call(upload_for, writer.user, writer.upload_id)
            if upload.status != Upload.Status.COMPLETE:
                raise
            self.refusal_headers["Upload-Offset"] = str(upload.size)
            raise OffsetMismatch(f"The upload is complete: all {upload.size} bytes are in.") from None

    async def _open_taking_over(self, writer: UploadWriter) -> int:
        """Become the upload's writer, asking an earlier holder to let go; UploadBusy (423) if it does not in time.

        Admission first: in the usual case (the previous PATCH ended) nobody
        holds the upload, and the takeover costs nothing.
        """
        deadline = asyncio.get_running_loop().time() + budgets.TAKEOVER_SECONDS
        while True:
            try:
                return await writer.open()
            except UploadBusy:
                # Our own grant came with a part still held by a frozen process: that waits for its lease.
                if writer.grant is not None or asyncio.get_running_loop().time() >= deadline:
                    raise
            await self._wait_until_let_go(writer.user, writer.upload_id, deadline)

    async def _wait_until_let_go(self, user, upload_id: str, deadline: float, *, arrivals: bool = False) -> None:
        """Return once no earlier request holds the upload (asking its holder to let go), or raise UploadBusy.

        With ``arrivals`` (a HEAD), PATCHes that arrived but are not admitted
        yet count as holders too: their bytes would move the offset after it
        was answered.
        """
        asked = set()
        loop = asyncio.get_running_loop()
        while True:
            # Arrivals first: a PATCH that is admitted between the two reads is then in the slot table.
            arriving = arrivals and await arrivals_pending(upload_id)
            holder = await db_call(writer_holder, user, upload_id)
            if holder is None and not arriving:
                return
            if holder == self.channel_name:
                return  # that is us (a PATCH's own takeover, after its admission)
            # A PATCH still arriving is about to hold the upload: wait for it, then ask it like any other.
            if holder is not None and holder not in asked:
                asked.add(holder)
                await writer_ask_to_stop(holder)
            if loop.time() >= deadline:
                seconds = budgets.TAKEOVER_SECONDS
                raise UploadBusy(
                    f"An earlier request still writes this upload and did not let go in {seconds:g} s.",
                    retry_after=BUSY_RETRY_SECONDS,
                )
            await asyncio.sleep(TAKEOVER_POLL_SECONDS)

    async def _pump(self, writer: UploadWriter) -> None:
        """Feed the body to the writer as it arrives, reading no further while a window waits to be written."""
        window = settings.DIRECTDRIVEX_WINDOW
        while True:
            message = await self._next_message()
            if message is None:  # asked to let go, and what had arrived is fed
                writer.stop(self._let_go)
                return
            if message["type"] == "http.disconnect":
                self._client_left()
                writer.stop(ClientGone())
                return
            body = message.get("body", b"")
            if body and not writer.closing:
                end = writer.received + len(body)
                if end > writer.size:
                    writer.stop(SizeExceeded(f"The body goes on past byte {writer.size}, the upload's length."))
                    return
                writer.feed(body)
                await writer.wait_for_room(window)
            if not message.get("more_body", False):
                writer.stop(BodyEnded())
                return

    def _queue(self) -> asyncio.Queue | None:
        """The server's queue of this request's messages, what ``receive`` takes from (directdrivex.server)."""
        queue = getattr(self.receive, "__self__", None)
        return queue if isinstance(queue, asyncio.Queue) else None

    async def _next_message(self) -> dict | None:
        """The body's next message; once asked to let go, only those that had arrived by then, then None.

        A newer request (a HEAD, another PATCH) asks this one to let go
        (``upload.stop``): the bytes the server already holds for it are
        written and made durable, so that the offset the newer request then
        reads includes them; nothing that arrives later is read.
        """
        queue = self._queue()
        if self._let_go is not None:
            if queue is not None and self._drain > 0 and not queue.empty():
                self._drain -= 1
                return queue.get_nowait()
            return None
        if queue is not None and not queue.empty():
            return queue.get_nowait()  # the usual case while a body streams in: no task, no wait
        message = asyncio.ensure_future(self.receive())
        asked = asyncio.ensure_future(self._asked_to_let_go.wait())
        try:
            await asyncio.wait({message, asked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            asked.cancel()
            if not message.done():
                message.cancel()  # a queue's get gives up cleanly: no message is lost
        return message.result() if message.done() and not message.cancelled() else None

    def _asked_to_stop(self, event: dict) -> None:
        """``upload.stop`` from a newer request: let go once what has arrived is fed (``_next_message``)."""
        if self._let_go is not None:
            return
        queue = self._queue()
        self._drain = queue.qsize() if queue is not None else 0
        self._let_go = TakenOver(event.get("detail"))
        self._asked_to_let_go.set()

    async def _arriving(self, upload_id: str) -> None:
        self._arrival = upload_id
        await arrival_counted(upload_id, +1)

    async def _admitted(self) -> None:
        arrival, self._arrival = self._arrival, None
        if arrival is not None:
            await arrival_counted(arrival, -1)

    def _client_left(self) -> None:
        self.client_gone = True
        if self.end_by is None:
            self.end_by = asyncio.get_running_loop().time() + budgets.AFTER_DISCONNECT_SECONDS

    async def _listen(self, layer) -> None:
        while True:
            event = await layer_receive(layer, self.channel_name)
            if event["type"] == "upload.stop":
                self._asked_to_stop(event)
            else:
                act_on_notice(self.writer, event)  # the writer as it is now, not when the wait began

    # --- answers -------------------------------------------------------------------------

    async def _user(self):
        user = await http_request_user(self.scope)
        self.user_id = user.pk
        return user

    def _body_length(self) -> int | None:
        """The body's declared length: 0 for none, None for a chunked body of unknown length."""
        if "content-length" in self.headers:
            return _integer_header("Content-Length", self.headers["content-length"])
        return None if "chunked" in self.headers.get("transfer-encoding", "").lower() else 0

    def _location(self, upload_id) -> str:
        # Django's own view of the origin: ALLOWED_HOSTS, X-Forwarded-Host and SECURE_PROXY_SSL_HEADER
        # count as for any request (DisallowedHost is answered 400 bad_host).
        return ASGIRequest(dict(self.scope), io.BytesIO()).build_absolute_uri(f"/api/tus/{upload_id}")

    def _cors_origin(self) -> str | None:
        origin = self.headers.get("origin")
        return origin if origin and origin in settings.DIRECTDRIVEX_CORS_ORIGINS else None

    async def _refuse(self, error: BaseException, headers: dict | None = None):
        """Answer ``error`` as the JSON API would (uploads.api_errors), with tus's status where tus names one."""
        if self.client_gone or self.answered:
            return
        status, body, refusal_headers = refusal_parts(error)
        if isinstance(error, DirectDriveXError) and error.tus_status is not None:
            status = error.tus_status
        headers = {**refusal_headers, **self.refusal_headers, **(headers or {})}
        if isinstance(error, TusVersionUnsupported):
            headers["Tus-Version"] = TUS_VERSION
        if status == 401:
            headers.setdefault("WWW-Authenticate", "Token")  # as the API says it (docs/api.md)
        metrics.refusal_counted("tus", body["code"])
        await self._answer(status, headers, json.dumps(body).encode(), "application/json")

    async def _answer(self, status: int, headers: dict | None = None, body: bytes = b"", content_type: str = ""):
        if self.client_gone or self.answered:
            return
        self.answered, self.status = True, status
        headers = {"Tus-Resumable": TUS_VERSION, **(headers or {}), "Content-Length": str(len(body))}
        headers[logs.REQUEST_ID_HEADER] = self.request_id
        if content_type:
            headers["Content-Type"] = content_type
        if origin := self._cors_origin():
            headers |= {
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Expose-Headers": EXPOSED_HEADERS,
                "Vary": "Origin",
            }
        raw = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        await self.send({"type": "http.response.start", "status": status, "headers": raw})
        await self.send({"type": "http.response.body", "body": body})
