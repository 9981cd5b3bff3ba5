"""One connection's hold on an upload's bytes, whatever the transport brings them.

An ``UploadWriter`` owns, for the life of one connection: the writer grant
(slot + fencing generation), the part file and its flock, the running sha256,
the local lease deadline, durable commits, the fenced finalization and the
release. A transport (the WebSocket consumer today, an HTTP PATCH handler
later) feeds it bytes with :meth:`feed`, asks it to stop with :meth:`stop`,
and awaits :meth:`run`, the one sequential task that writes a batch, commits
when due and finalizes when the last byte lands. Nothing here waits for a
second task, so no wait cycle can form; every exit path goes through
:meth:`close`, which has a deadline and always lets go of the file.

Durability (spec, "WebSocket upload protocol" 4): offsets are committed
(fsync, then one fenced UPDATE that renews the lease) every COMMIT_BYTES or
COMMIT_SECONDS. A commit runs in a thread while the next batches are
written, but the sequence itself starts it, collects its outcome between
batches and waits for it when it must: before finalizing, and before writing
more once the written bytes lead the durable offset by ACK_LEAD_BYTES — so
acks never lead durability by more than that plus one batch. When the disk is
so slow that a commit takes longer than ACK_HOLD_SECONDS, acks are held back
to the durable offset itself until it recovers, so the 5 s bound holds there
too.
"""

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from django.conf import settings

from uploads import storage
from uploads.exceptions import (
    ChecksumMismatch,
    IdleTimeout,
    LeaseLost,
    NotUploading,
    UploadBusy,
)
from uploads.models import Slot
from uploads.ops import metrics
from uploads.services.calls import db_call
from uploads.services.grants import (
    WriterGrant,
    writer_admit,
    writer_check,
    writer_commit,
    writer_complete,
    writer_fail,
    writer_release,
    writer_rewind,
)
from uploads.services.progress import progress_event, publish

log = logging.getLogger(__name__)

# Durable-offset commits: the spec bounds durability at 64 MiB or 5 s behind an ack.
# A fast stream commits by bytes (about every 0.1 s at 300 MB/s); the time
# trigger is for slow clients, and leaves 4 s for a commit inside the bound.
COMMIT_BYTES = 32 * 1024 * 1024
COMMIT_SECONDS = 1.0
DURABILITY_SECONDS = 5.0
# Live progress for pages (uploads.services.progress): at most one event this often per upload.
PROGRESS_SECONDS = 1.0
# A commit slower than this means a struggling disk: acknowledge only durable bytes.
ACK_HOLD_SECONDS = 2.5
# Written (and so acknowledged) bytes never lead the durable offset by more than
# this plus one batch: the spec's 64 MiB, with room for a batch and a frame.
ACK_LEAD_BYTES = 56 * 1024 * 1024
# Everything a closing writer still does (final commit, release) fits in this;
# below Daphne's 10 s application_close_timeout after a disconnect.
CLOSE_SECONDS = 8.0


def lease_safety_seconds(lease_seconds: float) -> float:
    """How long before the lease we last renewed runs out the writer stops writing.

    A fifth of the lease: the margin covers a commit in flight and clock
    differences between processes, and still leaves a 5 s lease 4 s of
    writing between renewals (which come every quarter lease, or sooner with commits).
    """
    return lease_seconds / 5


def renew_interval(lease_seconds: float) -> float:
    """How often an idle writer renews its lease: well inside the local deadline (lease - lease/5)."""
    return min(10.0, lease_seconds / 4)


class ClientGone(Exception):
    """The transport's client went away: write what was received, make it durable, let go."""


class LocalLeaseExpired(Exception):
    """The writer thread refused to write: our lease may have been reclaimed meanwhile."""


@dataclass(frozen=True)
class Completed:
    """What a finished upload reports to its client."""

    upload_id: str
    size: int
    sha256: str


AckCallback = Callable[[int], Awaitable[None]]


class UploadWriter:
    """See the module docstring. Not thread-safe: one event loop drives it."""

    def __init__(self, user, upload_id: str, holder_channel: str):
        self.user = user
        self.upload_id = upload_id
        self.holder_channel = holder_channel
        self.grant: WriterGrant | None = None
        self.part: storage.PartWriter | None = None
        self.pending: deque[memoryview | bytes] = deque()
        self.received = self.written = self.durable = self.acked = 0
        self.lease_seconds = settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS
        self.idle_seconds = settings.DIRECTDRIVEX_IDLE_SECONDS
        self.batch_bytes = max(1, settings.DIRECTDRIVEX_WINDOW // 4)
        self._stop: Exception | None = None
        self._keep_pending = True
        # Set by stop(): the re-hash of a resumed prefix checks it between blocks.
        self._interrupt = threading.Event()
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Future] = set()  # disk operations running in threads on our fd
        self._commit_task: asyncio.Future | None = None  # the one commit in flight, collected by run()
        self._fenced = False  # someone else owns the upload now: never commit or release again
        self._released = False
        self._closed = False
        self._ready = False
        self._finished_digest: str | None = None
        self._last_commit_seconds = 0.0
        self._first_unsynced_at: float | None = None
        self._lease_deadline = 0.0
        self._last_byte_at = 0.0
        self._progress_at = 0.0
        self._progress_task: asyncio.Future | None = None

    # --- what the transport calls ---------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def closing(self) -> bool:
        return self._stop is not None or self._closed

    @property
    def size(self) -> int:
        return self.grant.size if self.grant else 0

    def feed(self, data: bytes) -> None:
        """Queue the next bytes of the file (the transport has checked window and size)."""
        self.pending.append(data)
        self.received += len(data)
        self._wake.set()

    def stop(self, refusal: Exception, *, keep_pending: bool) -> None:
        """Ask run() to end with ``refusal``: after writing what was received (keep_pending) or at once.

        The first request wins, except that an "at once" request (the upload was
        revoked) overrides a gentler one.
        """
        if self._stop is None:
            self._stop, self._keep_pending = refusal, keep_pending
        elif not keep_pending and self._keep_pending:
            self._stop, self._keep_pending = refusal, False
        if not self._keep_pending:
            self.pending.clear()
            self._fenced = self._fenced or isinstance(refusal, LeaseLost | NotUploading)
        self._interrupt.set()
        self._wake.set()

    async def open(self, *, holder_alive: Callable[[str], Awaitable[bool]]) -> int:
        """Admit this connection as the upload's writer and open its part file; returns the resume offset.

        ``holder_alive(channel)`` says whether the writer that holds the upload
        now is alive; a dead one is taken over at once instead of after its lease.
        """
        try:
            grant = await db_call(writer_admit, self.user, self.upload_id, self.holder_channel)
        except UploadBusy as busy:
            if not busy.holder_channel or await holder_alive(busy.holder_channel):
                raise
            log.warning("taking over from unresponsive holder=%s upload=%s", busy.holder_channel, self.upload_id)
            grant = await db_call(
                writer_admit, self.user, self.upload_id, self.holder_channel, dead_holder=busy.holder_channel
            )
        self.grant = grant
        self._renewed(time.monotonic())
        self._raise_if_stopped()
        finished = await self._in_thread(
            storage.backend().finished_digest, grant.storage_key, grant.size, self._interrupt
        )
        if finished is not None:
            # A writer was stopped between the atomic rename and the database
            # update (crash, reset): the verified file is in place; finish that.
            self.part = None
            self.received = self.written = self.durable = self.acked = grant.size
            self._finished_digest = finished
        else:
            await self._open_part()
        self._raise_if_stopped()
        self._ready = True
        self._last_byte_at = time.monotonic()
        return self.written

    async def run(self, send_ack: AckCallback) -> Completed:
        """Write, acknowledge, commit and finalize, in one sequence, until done or stopped."""
        while True:
            if self._stop is not None and not self._keep_pending:
                raise self._stop
            if self.written == self.size and not self.pending:
                return await self._finalize()
            if self._stop is not None and not self.pending:
                raise self._stop
            await self._collect_commit(wait=False)
            if self.pending:
                if self.written - self.durable >= ACK_LEAD_BYTES:
                    await self._commit()  # durability must catch up before more is written
                await self._write(self._take_batch())
                self._last_byte_at = time.monotonic()
                if self._commit_task is None and self._commit_due():
                    self._start_commit()
                await self._ack(send_ack)
                continue
            # Caught up with everything that arrived: say where we stand at once.
            if self._acks_held() and self.written > self.durable:
                await self._commit()
            await self._ack(send_ack)
            await self._wait_for_bytes_or_timer()

    async def close(self, reason: str) -> None:
        """Make what was written durable if we still may, free the slot, let go of the file. Idempotent.

        Bounded by CLOSE_SECONDS; the file is let go even if the database is down.
        """
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._interrupt.set()
        try:
            await asyncio.wait_for(self._settle(reason), CLOSE_SECONDS)
        except TimeoutError:
            log.error("writer close timed out upload=%s; the slot expires with its lease", self.upload_id)
        except Exception:
            log.exception("writer close failed upload=%s; the slot expires with its lease", self.upload_id)
        finally:
            if self._commit_task is not None and not self._commit_task.done():
                self._commit_task.cancel()  # its thread, if any, finishes on its own
            self._let_go_of_file()

    # --- opening ----------------------------------------------------------------

    async def _open_part(self):
        grant = self.grant
        try:
            self.part = await self._in_thread(
                storage.backend().open_part, grant.storage_key, grant.offset, self._interrupt
            )
        except storage.PartLocked:
            # A frozen or dying writer still holds the file: it must not share it.
            raise UploadBusy("Another process still holds this upload's file.", retry_after=2) from None
        except storage.PartShort as short:
            # Bytes promised durable are gone (disk loss, manual deletion): resume from what is there.
            self.grant = grant = await db_call(writer_rewind, grant, short.on_disk)
            self.part = await self._in_thread(
                storage.backend().open_part, grant.storage_key, grant.offset, self._interrupt
            )
        except storage.Interrupted:
            self._raise_if_stopped()
            raise
        # A DELETE may have ended the upload between our admission and the
        # open, which re-created the part file: make sure we still own it.
        try:
            await db_call(writer_check, grant)
        except NotUploading:
            self._let_go_of_file()
            await asyncio.to_thread(storage.backend().delete, grant.storage_key)
            raise
        self.received = self.written = self.durable = self.acked = grant.offset

    def _raise_if_stopped(self):
        if self._stop is not None:
            raise self._stop

    # --- the sequence -------------------------------------------------------------

    def _take_batch(self) -> list:
        # Bounded, so acks go out while the rest of the window is still arriving.
        batch, size = [], 0
        while self.pending and size < self.batch_bytes:
            frame = self.pending.popleft()
            batch.append(frame)
            size += len(frame)
        return batch

    async def _write(self, batch):
        try:
            self.written = await self._in_thread(self._append_guarded, batch)
        except LocalLeaseExpired:
            await self._commit()  # renews the lease, or raises LeaseLost if it was reclaimed
            self.written = await self._in_thread(self._append_guarded, batch)
        if self._first_unsynced_at is None:
            self._first_unsynced_at = time.monotonic()

    def _append_guarded(self, batch) -> int:
        # Checked in the writer thread, right before the write: a process that
        # wakes from a freeze past its lease writes nothing until it re-checks.
        if time.monotonic() >= self._lease_deadline:
            raise LocalLeaseExpired()
        return self.part.append(batch)

    def _commit_due(self) -> bool:
        if self.written - self.durable >= COMMIT_BYTES:
            return True
        if self._first_unsynced_at is not None and time.monotonic() - self._first_unsynced_at >= self._commit_after():
            return True
        return time.monotonic() >= self._lease_deadline - renew_interval(self.lease_seconds)

    def _commit_after(self) -> float:
        # Leave room for the commit itself inside the 5 s bound: after a 2 s
        # commit, the next one starts once the oldest unsynced byte is 1 s old.
        return max(0.0, min(COMMIT_SECONDS, DURABILITY_SECONDS - 1.5 * self._last_commit_seconds))

    def _acks_held(self) -> bool:
        """After a commit slower than ACK_HOLD_SECONDS only durable bytes are acknowledged."""
        return self._last_commit_seconds > ACK_HOLD_SECONDS

    async def _ack(self, send_ack: AckCallback):
        offset = self.durable if self._acks_held() else self.written
        if offset > self.acked and self._stop is None:
            self.acked = offset
            await send_ack(offset)

    def _start_commit(self):
        """Start fsync + fenced UPDATE of the current offset in a thread; run() collects the outcome."""
        offset, started = self.written, time.monotonic()
        self._first_unsynced_at = None  # bytes written from now on wait for the next commit
        self._commit_task = asyncio.ensure_future(self._commit_call(self.part, offset, started))
        self._commit_task.add_done_callback(self._commit_done)

    def _commit_done(self, task: asyncio.Future):
        self._wake.set()  # run() collects the outcome; a closing writer may never: mark it seen
        if not task.cancelled():
            task.exception()

    async def _commit_call(self, part: storage.PartWriter, offset: int, started: float) -> tuple[int, float]:
        moves = offset > self.durable
        if moves:
            await self._in_thread(part.sync)
        await db_call(writer_commit, self.grant, offset)
        if moves:  # a commit of new bytes, fsync + UPDATE; a mere lease renewal would flatter the histogram
            metrics.COMMIT_SECONDS.observe(time.monotonic() - started)
        return offset, started

    async def _collect_commit(self, *, wait: bool):
        """Take in the outcome of the commit in flight (raising its refusal), waiting for it if asked."""
        task = self._commit_task
        if task is None or (not wait and not task.done()):
            return
        if not task.done():
            await asyncio.wait({task})
        self._commit_task = None
        try:
            offset, started = task.result()
        except (LeaseLost, NotUploading):
            self._fenced = True
            raise
        if offset > self.durable:
            metrics.BYTES_RECEIVED.inc(offset - self.durable)  # once per commit, never per frame
        self.durable = max(self.durable, offset)
        self._last_commit_seconds = time.monotonic() - started
        self._renewed(started)
        self._publish_progress()

    def _publish_progress(self):
        """Tell the owner's pages the new durable offset: at most once a PROGRESS_SECONDS, never waited for."""
        now = time.monotonic()
        if now - self._progress_at < PROGRESS_SECONDS or (self._progress_task and not self._progress_task.done()):
            return
        self._progress_at = now
        event = progress_event(upload_id=self.grant.upload_id, offset=self.durable, size=self.size, status="uploading")
        self._progress_task = asyncio.ensure_future(publish(self.grant.user_id, event))

    async def _commit(self):
        """Commit now and wait for it (after the one in flight): makes everything written durable, renews."""
        await self._collect_commit(wait=True)
        self._start_commit()
        await self._collect_commit(wait=True)

    def _renewed(self, at: float):
        self._lease_deadline = at + self.lease_seconds - lease_safety_seconds(self.lease_seconds)

    async def _wait_for_bytes_or_timer(self):
        now = time.monotonic()
        idle_at = self._last_byte_at + self.idle_seconds
        if now >= idle_at:
            raise IdleTimeout(f"No bytes arrived for {self.idle_seconds} s; the slot was freed. Reconnect to resume.")
        wake_at = min(idle_at, now + renew_interval(self.lease_seconds))
        if self._first_unsynced_at is not None:
            wake_at = min(wake_at, self._first_unsynced_at + self._commit_after())
        self._wake.clear()
        if self.pending or self._stop is not None:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - now))
        except TimeoutError:
            if time.monotonic() < idle_at:
                await self._commit()  # makes the tail durable, or just renews the lease

    async def _finalize(self) -> Completed:
        """Verify, record offset = size (fenced, renewing the lease), rename, mark complete: in that order.

        Losing the lease at any step leaves the bytes for the next writer: after
        the rename it finds a verified, visible file and completes it. Only an
        ended upload (cancel, expire, delete) takes the bytes away.
        """
        grant = self.grant
        digest = self._finished_digest if self.part is None else self.part.hexdigest()
        if grant.sha256 and digest != grant.sha256:
            await db_call(writer_fail, grant)  # raises LeaseLost / NotUploading if we were fenced
            raise ChecksumMismatch(f"The bytes received hash to {digest}, not the declared {grant.sha256}.")
        if self.part is not None:
            await self._commit()
            try:
                await self._in_thread(self.part.finalize)
            except FileNotFoundError:
                await db_call(writer_check, grant)  # the part file vanished: a DELETE got there first
                raise
        try:
            await db_call(writer_complete, grant, sha256=digest)
        except NotUploading:
            # Cancelled, expired or deleted while we finalized: the file must not outlive its row.
            await asyncio.to_thread(storage.backend().delete, grant.storage_key)
            raise
        except LeaseLost:
            self._fenced = True
            raise
        self._released = True  # writer_complete released the slot
        return Completed(str(grant.upload_id), grant.size, digest)

    # --- cleanup -------------------------------------------------------------------

    async def _settle(self, reason: str):
        if self._commit_task is not None:
            await asyncio.wait({self._commit_task})
            with contextlib.suppress(Exception):
                await self._collect_commit(wait=True)  # fenced or failed: judged below
        await self._wait_inflight()
        grant = self.grant
        if grant is None or self._fenced:
            return
        if self.part is not None and self.written > self.durable:
            try:
                await self._in_thread(self.part.sync)
                await db_call(writer_commit, grant, self.written, timeout=CLOSE_SECONDS / 2)
                metrics.BYTES_RECEIVED.inc(self.written - self.durable)
                self.durable = self.written
            except (LeaseLost, NotUploading):
                return  # someone else owns the upload now; our bytes past durable are theirs to drop
            except Exception:
                # The resume point stays at the last durable offset; still try to free the slot.
                log.warning("final commit failed upload=%s", self.upload_id, exc_info=True)
        if not self._released:
            await db_call(writer_release, grant, reason, timeout=CLOSE_SECONDS / 2)
            self._released = True

    async def _in_thread(self, function, *args):
        """Run one disk operation in a thread; the part file is never closed under it."""
        future = asyncio.get_running_loop().run_in_executor(None, function, *args)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The thread runs on; a part it opens after we gave up must still be closed.
            future.add_done_callback(_close_orphan)
            raise

    async def _wait_inflight(self):
        if self._inflight:
            await asyncio.wait(set(self._inflight))

    def _let_go_of_file(self):
        part, self.part = self.part, None
        if part is None:
            return
        running = set(self._inflight)
        if not running:
            part.close()
            return

        # A thread still writes or fsyncs through this fd: closing it now could
        # let the number be reused under the thread's pwrite. Close when the last one ends.
        def close_when_idle(_future):
            running.discard(_future)
            if not running:
                part.close()

        for future in list(running):
            future.add_done_callback(close_when_idle)


def _close_orphan(future: asyncio.Future):
    if future.cancelled() or future.exception() is not None:
        return
    result = future.result()
    if isinstance(result, storage.PartWriter):
        result.close()


# Release reasons the transport passes to close(), re-exported so transports need not import models.
Reason = Slot.ReleaseReason
