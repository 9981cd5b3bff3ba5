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
    ProtocolError,
    SizeExceeded,
    Unauthenticated,
)
from uploads.transports.dispatch import DirectDispatch
from uploads.transports.sessions import act_on_notice, end_session, layer_receive, log_refusal, release_reason
from uploads.writer import ClientGone, Reason, UploadWriter

log = logging.getLogger(__name__)


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
        return await layer_receive(self.channel_layer, self.channel_name)

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
        """Wait for the session to end within the budget (uploads.transports.sessions.end_session)."""
        if self.session is None:
            return
        self._end_within_budget()
        if self.writer is not None and not self.session.done():
            self.writer.stop(ClientGone())
        await end_session(self.session, self.end_by)

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
            await self._refuse(log_refusal(writer.upload_id, error))
        finally:
            await writer.close(reason, deadline=self.end_by)

    async def _refuse(self, refusal: DirectDriveXError):
        reason = release_reason(refusal)
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
        act_on_notice(self.writer, event)

    async def upload_stop(self, event):
        """A newer request for the upload asked us to let go (uploads.services.slots.ask_holders_to_stop)."""
        act_on_notice(self.writer, event)
