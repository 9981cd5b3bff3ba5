"""The WebSocket upload protocol (docs/protocol.md): binary frames in, acks out.

Only the protocol lives here: check each frame (binary, not empty, within
chunk_size, the credit window and the declared size), hand its bytes to the
upload's writer (uploads.writer), send ``ready`` / ``ack`` / ``complete``,
and turn every refusal into an error message followed by its close code.
Admission, commits, finalization and release belong to the writer.

Each connection runs one session task: open the writer, send ready, run the
writer, close with the outcome. The consumer's message loop never waits for
it, so frames keep arriving and a revocation is acted on at once, even while
the session re-hashes a resumed prefix or finalizes.
"""

import asyncio
import json
import logging

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.utils import await_many_dispatch
from django.conf import settings

from uploads import budgets, logs, metrics
from uploads.exceptions import (
    DirectDriveXError,
    IdleTimeout,
    LeaseLost,
    NotUploading,
    ProtocolError,
    SizeExceeded,
    Unauthenticated,
    Unavailable,
    refusal_for,
)
from uploads.transports.dispatch import DirectDispatch
from uploads.writer import ClientGone, Reason, UploadWriter

log = logging.getLogger(__name__)

# Backoff while the channel layer is unreachable: the upload goes on meanwhile.
LAYER_RETRY_SECONDS = (0.5, 10.0)

# Revocations sent through the channel layer (uploads.services.slots.notify_holders), by code.
REVOCATIONS = {LeaseLost.code: LeaseLost, NotUploading.code: NotUploading}


class UploadConsumer(DirectDispatch, AsyncWebsocketConsumer):
    writer: UploadWriter | None = None
    session: asyncio.Task | None = None
    client_gone = False
    # The event loop's time by which everything after a disconnect must be done (budgets).
    end_by: float | None = None

    # --- lifecycle ----------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        # AsyncConsumer.__call__, with two changes: the channel-layer receive
        # survives a layer outage (the upload does not need the layer to go on),
        # and every exit — disconnect, refusal, server shutdown — ends the
        # session within budgets.AFTER_DISCONNECT_SECONDS.
        self.scope = scope
        # Every line logged for this connection, here and in the services it calls, says who and which connection.
        logs.bind_connection(scope)
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.base_send = send
        metrics.CONNECTIONS_OPEN.labels("upload").inc()
        try:
            await await_many_dispatch([receive, self._layer_receive], self.dispatch)
        except StopConsumer:
            pass
        finally:
            try:
                await self._end_session()
            finally:
                metrics.CONNECTIONS_OPEN.labels("upload").dec()

    async def _layer_receive(self):
        delay = LAYER_RETRY_SECONDS[0]
        while True:
            try:
                return await self.channel_layer.receive(self.channel_name)
            except Exception:
                log.warning("channel layer receive failed; retrying in %.1fs", delay, exc_info=True)
                await asyncio.sleep(delay)
                delay = min(2 * delay, LAYER_RETRY_SECONDS[1])

    async def connect(self):
        # Accept first: a refusal must reach the client as an error message and
        # a close code, not as a bare HTTP 403 (or 500) at the handshake.
        await self.accept()
        upload_id = self.scope["url_route"]["kwargs"]["upload_id"]
        self.writer = UploadWriter(self.scope.get("user"), upload_id, self.channel_name)
        self.session = asyncio.ensure_future(self._session())

    async def disconnect(self, code):
        self.client_gone = True
        self._end_within_budget()
        if self.writer is not None:
            # Write what was received; the session then makes it durable and frees the slot.
            self.writer.stop(ClientGone())

    def _end_within_budget(self) -> None:
        if self.end_by is None:
            self.end_by = asyncio.get_running_loop().time() + budgets.AFTER_DISCONNECT_SECONDS

    async def _end_session(self):
        """Wait for the session to end, at most until ``end_by``; then cancel it.

        Daphne's own cancellation comes later (uploads.budgets). A cancellation
        of ours (server shutdown) still lets the session finish its cleanup
        within the budget; a second one gives up at once. Never swallowed.
        """
        session = self.session
        if session is None:
            return
        self._end_within_budget()
        if self.writer is not None and not session.done():
            self.writer.stop(ClientGone())
        loop = asyncio.get_running_loop()
        cancelled = False
        while not session.done():
            remaining = self.end_by - loop.time()
            if remaining <= 0:
                log.error("upload session did not end in %ss; cancelling it", budgets.AFTER_DISCONNECT_SECONDS)
                session.cancel()
                break
            try:
                await asyncio.wait({session}, timeout=remaining)
            except asyncio.CancelledError:
                if cancelled:
                    session.cancel()
                    raise
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    # --- the session ----------------------------------------------------------------

    async def _session(self):
        writer = self.writer
        reason = Reason.ERROR
        try:
            self._authorize()
            offset = await writer.open()
            await self._send_json(
                {
                    "type": "ready",
                    "offset": offset,
                    "chunk_size": settings.DIRECTDRIVEX_CHUNK_SIZE,
                    "window": settings.DIRECTDRIVEX_WINDOW,
                }
            )
            log.info("writer ready upload=%s user=%s offset=%s", writer.upload_id, writer.user.pk, offset)
            done = await writer.run(self._send_ack)
            reason = Reason.COMPLETED
            await self._send_json({"type": "complete", "id": done.upload_id, "size": done.size, "sha256": done.sha256})
            await self.close(code=1000)
        except ClientGone:
            reason = Reason.DISCONNECTED
        except Exception as error:
            refusal = refusal_for(error)
            if isinstance(error, DirectDriveXError):
                log.info("refused upload=%s code=%s detail=%s", writer.upload_id, refusal.code, refusal.detail)
            elif isinstance(refusal, Unavailable):
                log.warning("upload=%s: backing service unavailable: %r", writer.upload_id, error)
            else:
                log.exception("upload session failed upload=%s", writer.upload_id)
            await self._refuse(refusal)
        finally:
            await writer.close(reason, deadline=self.end_by)

    async def _refuse(self, refusal: DirectDriveXError):
        reason = Reason.IDLE if isinstance(refusal, IdleTimeout) else Reason.ERROR
        if self.client_gone:
            await self.writer.close(reason, deadline=self.end_by)
            return
        metrics.refusal_counted("websocket", refusal.code)  # answered, so counted: a client that left hears none
        await self._send_json({"type": "error", **refusal.as_dict(ws=True)})
        # Durable offset and slot are settled before the close code goes out, so
        # a client that reconnects at once finds the resume point and a free slot.
        await self.writer.close(reason, deadline=self.end_by)
        await self.close(code=refusal.close_code)

    async def close(self, code=None, reason=None):
        metrics.websocket_closed(code)
        await super().close(code=code, reason=reason)

    def _authorize(self):
        # The database could not say who is connecting (uploads.transports.auth).
        if self.scope.get("auth_error") is not None:
            raise self.scope["auth_error"]
        user = self.scope.get("user")
        if not getattr(user, "is_authenticated", False):
            raise Unauthenticated()
        if self.scope.get("auth_method") == "ticket" and self.scope.get("ticket_upload_id") != self.writer.upload_id:
            raise Unauthenticated("This ticket is for another upload.")

    # --- messages ---------------------------------------------------------------------

    async def dispatch(self, message):
        if message["type"] == "websocket.receive":
            # The hot path, once per frame.
            self._frame(message.get("bytes"), message.get("text"))
            return
        await super().dispatch(message)

    def _frame(self, data: bytes | None, text: str | None):
        writer = self.writer
        if writer is None or writer.closing:
            return  # after a refusal, frames still in flight are dropped
        if data is None:
            self._refuse_frame(ProtocolError("Text message received where a binary frame was expected."))
            return
        size = len(data)
        chunk_size, window = settings.DIRECTDRIVEX_CHUNK_SIZE, settings.DIRECTDRIVEX_WINDOW
        if not writer.ready:
            self._refuse_frame(ProtocolError("A binary frame arrived before the server sent ready."))
        elif not size:
            # Carries nothing and costs a message: a flood of them is the only use.
            self._refuse_frame(ProtocolError("Empty binary frame: every frame must carry bytes of the file."))
        elif size > chunk_size:
            self._refuse_frame(ProtocolError(f"Frame of {size} bytes is larger than chunk_size {chunk_size}."))
        elif writer.received + size - writer.acked > window:
            ahead = writer.received + size - writer.acked
            self._refuse_frame(ProtocolError(f"Window exceeded: {ahead} bytes beyond the last ack."))
        elif writer.received + size > writer.size:
            end = writer.received + size
            self._refuse_frame(SizeExceeded(f"Frame would end at byte {end}; the upload is {writer.size}."))
        else:
            writer.feed(data)

    def _refuse_frame(self, refusal: DirectDriveXError):
        """The client broke the protocol: keep the valid frames it sent before this one, then refuse."""
        self.writer.stop(refusal)

    async def _send_ack(self, offset: int):
        await self._send_json({"type": "ack", "offset": offset})

    async def _send_json(self, message: dict):
        if not self.client_gone:
            await self.send(text_data=json.dumps(message))

    async def upload_revoke(self, event):
        """A reap, reset, cancel or delete elsewhere took our slot (uploads.services.slots.notify_holders)."""
        if self.writer is None:
            return
        self.writer.revoke(REVOCATIONS.get(event["code"], LeaseLost)(event["detail"]))
