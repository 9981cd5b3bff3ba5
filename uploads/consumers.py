"""The WebSocket upload protocol (docs/protocol.md): binary frames in, acks out.

The consumer only speaks the protocol. Admission, offset commits and
completion are service calls (uploads.transfers); bytes and hashing are
uploads.storage.PartFile, run in a worker thread so that disk writes and
sha256 never block the event loop that parses frames.

Flow control: the client may have at most ``window`` bytes beyond the last
ack in flight; frames wait in ``self.pending`` (bounded by the window) while
one batch at a time is written in a thread. Durability: every
COMMIT_BYTES or COMMIT_SECONDS the part file is fsynced and the offset is
committed with a fenced compare-and-swap that also renews the lease.
"""

import asyncio
import json
import logging
import time
from collections import deque

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from uploads import storage
from uploads.exceptions import (
    ChecksumMismatch,
    DirectDriveXError,
    InternalError,
    LeaseLost,
    ProtocolError,
    SizeExceeded,
    Unauthenticated,
    UploadBusy,
)
from uploads.models import Slot
from uploads.transfers import (
    WriterGrant,
    writer_admit,
    writer_commit,
    writer_complete,
    writer_fail,
    writer_release,
    writer_rewind,
)

log = logging.getLogger(__name__)

# Durable-offset commits: fsync + one fenced UPDATE, never per frame. The
# spec promises durability within 64 MiB or 5 s of an ack; we commit at half.
COMMIT_BYTES = 32 * 1024 * 1024
COMMIT_SECONDS = 2.5
# Stop writing this long before the lease we last renewed runs out, unless a
# commit renews it first: a process that was frozen past its lease must
# re-check with the database before it writes another byte.
LEASE_SAFETY_SECONDS = 5
# A writer that does not answer a ping within this is taken to be dead (its
# process crashed): the new connection takes over without waiting for the lease.
# Taking over from a writer that is merely frozen is still safe: it keeps the
# part file's lock (new writers get `busy`) and is fenced when it wakes.
HOLDER_PING_SECONDS = 2.0


class LocalLeaseExpired(Exception):
    """The writer thread refused to write: our lease may have been reclaimed."""


class UploadConsumer(AsyncWebsocketConsumer):
    grant: WriterGrant | None = None
    part: storage.PartFile | None = None
    closing = False
    accepting = True
    drain_task: asyncio.Task | None = None
    commit_task: asyncio.Task | None = None
    cleanup_task: asyncio.Task | None = None
    heartbeat_task: asyncio.Task | None = None
    written = durable = 0

    # --- connection lifecycle ------------------------------------------------

    async def connect(self):
        self.pending: deque[bytes] = deque()
        # Serializes commits (drain and heartbeat), so the offset only moves forward.
        self.commit_lock = asyncio.Lock()
        # Accept first: a refusal must reach the client as an error message and
        # a close code, not as a bare HTTP 403 at the handshake.
        await self.accept()
        try:
            await self._admit()
        except DirectDriveXError as refusal:
            await self.refuse(refusal)
        except Exception:
            log.exception("connect failed upload=%s", self.scope["url_route"]["kwargs"].get("upload_id"))
            await self.refuse(InternalError())

    async def _admit(self):
        upload_id = self.scope["url_route"]["kwargs"]["upload_id"]
        user = self.scope.get("user")
        if not getattr(user, "is_authenticated", False):
            raise Unauthenticated()
        if self.scope.get("auth_method") == "ticket" and self.scope.get("ticket_upload_id") != upload_id:
            raise Unauthenticated("This ticket is for another upload.")
        try:
            grant = await database_sync_to_async(writer_admit)(user, upload_id, self.channel_name)
        except UploadBusy as busy:
            if not busy.holder_channel or await self._holder_answers(busy.holder_channel):
                raise
            # The holder's process died (kill -9, crash): take over now, not after its lease.
            log.warning("taking over from unresponsive holder=%s upload=%s", busy.holder_channel, upload_id)
            grant = await database_sync_to_async(writer_admit)(
                user, upload_id, self.channel_name, dead_holder=busy.holder_channel
            )
        self.grant = grant
        self.chunk_size = settings.DIRECTDRIVEX_CHUNK_SIZE
        self.window = settings.DIRECTDRIVEX_WINDOW
        self.ack_every = max(1, self.window // 4)
        self.last_commit = time.monotonic()
        self.lease_deadline = self.last_commit + settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS - LEASE_SAFETY_SECONDS
        finished = await asyncio.to_thread(storage.finished_digest, grant.storage_key, grant.size)
        if finished is not None:
            # A crash came between the atomic rename and the database update: finish that.
            await self._send_ready(grant.size)
            await self._complete(finished)
            return
        self.grant = grant = await self._open_part(grant)
        self.received = self.written = self.durable = self.acked = grant.offset
        self.heartbeat_task = asyncio.ensure_future(self._heartbeat())
        await self._send_ready(grant.offset)
        if grant.offset == grant.size:  # every byte was already durable: only finalization was missing
            self.drain_task = asyncio.ensure_future(self._drain())

    async def _holder_answers(self, holder: str) -> bool:
        """Ping the writer that holds the upload, through the channel layer, on a private reply channel."""
        reply_to = await self.channel_layer.new_channel()
        await self.channel_layer.send(holder, {"type": "upload.ping", "reply_to": reply_to})
        try:
            await asyncio.wait_for(self.channel_layer.receive(reply_to), HOLDER_PING_SECONDS)
        except TimeoutError:
            return False
        return True

    async def upload_ping(self, event):
        """Another connection asks whether we are alive (see _holder_answers)."""
        await self.channel_layer.send(event["reply_to"], {"type": "upload.pong"})

    async def _open_part(self, grant: WriterGrant) -> WriterGrant:
        try:
            self.part = await asyncio.to_thread(storage.PartFile, grant.storage_key, grant.offset)
        except storage.PartFileLocked:
            # A frozen or dying writer still holds the file: it must not share it.
            raise UploadBusy("Another process still holds this upload's file.", retry_after=2) from None
        except storage.PartFileShort as short:
            # Bytes promised durable are gone (disk loss, manual deletion): resume from what is there.
            grant = await database_sync_to_async(writer_rewind)(grant, short.on_disk)
            self.part = await asyncio.to_thread(storage.PartFile, grant.storage_key, grant.offset)
        return grant

    async def _send_ready(self, offset: int):
        log.info("writer ready upload=%s user=%s offset=%s", self.grant.upload_id, self.grant.user_id, offset)
        await self.send_json({"type": "ready", "offset": offset, "chunk_size": self.chunk_size, "window": self.window})

    async def disconnect(self, code):
        await self._cleanup(Slot.ReleaseReason.DISCONNECTED)

    async def __call__(self, scope, receive, send):
        # Server shutdown cancels the application without websocket.disconnect:
        # release the slot on every exit path; a crash leaves the lease to expire.
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup(Slot.ReleaseReason.DISCONNECTED)

    # --- frames ----------------------------------------------------------------

    async def dispatch(self, message):
        if message["type"] == "websocket.receive":
            # The hot path, once per frame. Channels would first hop to the DB
            # thread to close stale connections; every DB call here goes through
            # database_sync_to_async, which does that itself.
            await self.websocket_receive(message)
            return
        await super().dispatch(message)

    async def receive(self, text_data=None, bytes_data=None):
        if self.closing or not self.accepting or self.grant is None:
            return  # after a refusal, frames still in flight are dropped
        if bytes_data is None:
            await self._refuse_frame(ProtocolError("Text message received where a binary frame was expected."))
            return
        size = len(bytes_data)
        if size > self.chunk_size:
            await self._refuse_frame(
                ProtocolError(f"Frame of {size} bytes is larger than chunk_size {self.chunk_size}.")
            )
            return
        if self.received + size - self.acked > self.window:
            await self._refuse_frame(
                ProtocolError(f"Window exceeded: {self.received + size - self.acked} bytes beyond the last ack.")
            )
            return
        if self.received + size > self.grant.size:
            await self._refuse_frame(
                SizeExceeded(f"Frame would end at byte {self.received + size}; the upload is {self.grant.size}.")
            )
            return
        if not size:
            return
        self.received += size
        self.pending.append(bytes_data)
        if self.drain_task is None:
            self.drain_task = asyncio.ensure_future(self._drain())

    async def _refuse_frame(self, refusal: DirectDriveXError):
        """The client broke the protocol: keep the valid frames it sent before this one, then refuse."""
        self.accepting = False
        if self.drain_task is not None:
            await self.drain_task
        await self.refuse(refusal)

    async def _drain(self):
        """Write pending frames in a thread, a quarter window per hop; ack, commit and finish as bytes land."""
        try:
            while self.pending and not self.closing:
                await self._write(self._next_batch())
                if self.closing:
                    break  # refused meanwhile: the error message must be the last one before the close
                if self.written - self.acked >= self.ack_every:
                    await self._send_ack()
                if self.written - self.durable >= COMMIT_BYTES or time.monotonic() - self.last_commit >= COMMIT_SECONDS:
                    self._commit_soon()
            if not self.closing and self.written == self.grant.size:
                await self._finish()
        except DirectDriveXError as refusal:
            await self.refuse(refusal)
        except Exception:
            log.exception("upload write failed upload=%s", self.grant.upload_id)
            await self.refuse(InternalError())
        finally:
            self.drain_task = None

    def _next_batch(self) -> list[bytes]:
        # Bounded, so acks go out while the rest of the window is still arriving.
        batch, size = [], 0
        while self.pending and size < self.ack_every:
            frame = self.pending.popleft()
            batch.append(frame)
            size += len(frame)
        return batch

    async def _write(self, batch):
        try:
            self.written = await asyncio.to_thread(self._append_guarded, batch)
        except LocalLeaseExpired:
            await self._commit()  # renews the lease, or raises LeaseLost if it was reclaimed
            self.written = await asyncio.to_thread(self._append_guarded, batch)

    def _append_guarded(self, batch) -> int:
        # Checked in the writer thread, right before the write: a process that
        # wakes from a freeze past its lease writes nothing until it re-checks.
        if time.monotonic() >= self.lease_deadline:
            raise LocalLeaseExpired()
        return self.part.append(batch)

    async def _send_ack(self):
        self.acked = self.written
        await self.send_json({"type": "ack", "offset": self.written})

    def _commit_soon(self):
        """Commit in the background: frames keep being written and acked while fsync and the DB run."""
        if self.commit_task is None or self.commit_task.done():
            self.commit_task = asyncio.ensure_future(self._commit_or_refuse())

    async def _commit_or_refuse(self):
        try:
            await self._commit()
        except DirectDriveXError as refusal:
            await self.refuse(refusal)
        except Exception:
            log.exception("offset commit failed upload=%s", self.grant and self.grant.upload_id)
            await self.refuse(InternalError())

    async def _settle_commit(self):
        """Wait for a background commit (it may have refused the connection meanwhile)."""
        task = self.commit_task
        if task is not None and task is not asyncio.current_task():
            await task

    async def _commit(self):
        """fsync, then one fenced UPDATE of offset + lease (never inside a transaction with the fsync)."""
        async with self.commit_lock:
            started = time.monotonic()
            offset = self.written
            await asyncio.to_thread(self.part.sync)
            await database_sync_to_async(writer_commit)(self.grant, offset)
            self.durable = offset
            self.last_commit = started
            self.lease_deadline = started + settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS - LEASE_SAFETY_SECONDS

    async def _heartbeat(self):
        """Keep the lease alive (and the offset durable) while the client is connected but slow or idle."""
        interval = max(1.0, min(COMMIT_SECONDS, settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS / 4))
        while not self.closing:
            await asyncio.sleep(interval)
            if self.drain_task is None and not self.closing:
                await self._commit_or_refuse()

    async def _finish(self):
        await self._settle_commit()
        if self.closing:
            return  # the commit found the lease lost or the upload gone, and said so
        await self._complete(self.part.hexdigest(), finalize=self.part.finalize)

    async def _complete(self, digest: str, finalize=None):
        """Verify, make the file durable and visible, then mark it complete: in that order."""
        grant = self.grant
        if grant.sha256 and digest != grant.sha256:
            await database_sync_to_async(writer_fail)(grant)
            raise ChecksumMismatch(f"The bytes received hash to {digest}, not the declared {grant.sha256}.")
        if finalize is not None:
            await asyncio.to_thread(finalize)
        try:
            await database_sync_to_async(writer_complete)(grant)
        except DirectDriveXError:
            # Cancelled or fenced while we finalized: the file must not outlive its row.
            await asyncio.to_thread(storage.delete, grant.storage_key)
            raise
        self.grant = None  # the slot is released; nothing left to clean up
        self.closing = True
        await self.send_json({"type": "complete", "id": str(grant.upload_id), "size": grant.size, "sha256": digest})
        await self.close(code=1000)

    # --- refusals and revocation -------------------------------------------------

    async def upload_revoke(self, event):
        """A reap, reset or cancel elsewhere took our slot (sent through the channel layer)."""
        error = {"type": "error", "code": event["code"], "detail": event["detail"]}
        await self._close_with(error, event["close_code"])

    async def refuse(self, refusal: DirectDriveXError):
        if self.grant is not None:
            log.info(
                "refused upload=%s user=%s code=%s detail=%s",
                self.grant.upload_id,
                self.grant.user_id,
                refusal.code,
                refusal.detail,
            )
        await self._close_with({"type": "error", **refusal.as_dict(ws=True)}, refusal.close_code)

    async def _close_with(self, message: dict, close_code: int):
        if self.closing:
            return
        self.closing = True
        self.pending.clear()
        await self.send_json(message)
        # Durable offset and slot are settled before the close code goes out, so
        # a client that reconnects at once finds the resume point and a free slot.
        await self._cleanup(Slot.ReleaseReason.ERROR)
        await self.close(code=close_code)

    async def send_json(self, message: dict):
        await self.send(text_data=json.dumps(message))

    async def _cleanup(self, reason: str):
        """Every exit path: finish writing what was received, make it durable if we still may, free the slot.

        Runs once, as a task of its own: when a server shutdown cancels the
        connection (Daphne then waits for it to end), the cleanup still finishes
        before the cancellation goes on. After a refusal ``pending`` is already
        empty, so nothing more is written.
        """
        if self.cleanup_task is None:
            self.cleanup_task = asyncio.ensure_future(self._settle(reason, caller=asyncio.current_task()))
        interrupted = False
        while True:
            try:
                await asyncio.shield(self.cleanup_task)
                break
            except asyncio.CancelledError:
                if self.cleanup_task.cancelled():
                    raise
                interrupted = True
        if interrupted:
            raise asyncio.CancelledError

    async def _settle(self, reason: str, caller: asyncio.Task | None):
        # ``caller`` (the drain, the heartbeat or a background commit that hit a
        # refusal) is waiting for us: neither cancel it nor wait for it.
        if self.heartbeat_task is not None:
            if self.heartbeat_task is not caller:
                self.heartbeat_task.cancel()
            self.heartbeat_task = None
        if self.drain_task is not None and self.drain_task is not caller:
            try:
                await self.drain_task
            except Exception:
                log.exception("drain failed during cleanup")
        if self.commit_task is not None and self.commit_task is not caller:
            await self.commit_task
        self.closing = True
        grant, part = self.grant, self.part
        self.grant = self.part = None
        try:
            if grant is not None and part is not None and self.written > self.durable:
                try:
                    await asyncio.to_thread(part.sync)
                    await database_sync_to_async(writer_commit)(grant, self.written)
                except LeaseLost:
                    pass  # someone else owns the upload now; our bytes past durable are theirs to drop
                except DirectDriveXError as refusal:
                    log.info("final commit refused upload=%s code=%s", grant.upload_id, refusal.code)
            if grant is not None:
                await database_sync_to_async(writer_release)(grant, reason)
        finally:
            if part is not None:
                await asyncio.to_thread(part.close)
