"""One connection's hold on an upload's bytes, whatever the transport brings them.

An ``UploadWriter`` owns, for the life of one connection: the writer grant
(slot + fencing generation), the part and its hold, the running sha256, the
local lease deadline, durable commits, the fenced finalization and the
release. A transport (uploads.transports: WebSocket frames, tus request
bodies) feeds it bytes with :meth:`feed`, asks it to stop with :meth:`stop`
(or :meth:`revoke`, when the upload was taken away), and awaits :meth:`run`,
the one sequential task that writes a batch, commits when due and finalizes
when the last byte lands. Nothing here waits for a second task, so no wait
cycle can form; every exit path goes through :meth:`close`, which has a
deadline and always lets go of the part.

Its life is a ``State``: ADMITTING until the grant and the part are in hand,
WRITING, DRAINING once asked to stop (what arrived is still written and made
durable), FINALIZING once every byte is in, then COMPLETE, or FENCED the
moment the upload belongs to someone else (a reap, reset, cancel, delete or a
newer writer: nothing is committed, released or deleted after that), and
CLOSING / CLOSED.

Durability (spec, "WebSocket upload protocol" 4): offsets are committed
(fsync, then one fenced UPDATE that renews the lease) every COMMIT_BYTES or
COMMIT_SECONDS. A commit runs in a thread while the next batches are
written, but the sequence itself starts it, collects its outcome between
batches and waits for it when it must: before finalizing, and before writing
more once the written bytes lead the durable offset by ACK_LEAD_BYTES — so
acks never lead durability by more than that plus one batch. Once a commit
has taken longer than ACK_HOLD_SECONDS (the one in flight included: a slow
disk is noticed while it is slow, not after), acks are held back to the
durable offset itself until commits are fast again, so the 5 s bound holds
there too.
"""

import asyncio
import contextlib
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from django.conf import settings

from uploads import budgets, metrics, storage
from uploads.exceptions import ChecksumMismatch, IdleTimeout, LeaseLost, NotUploading, Unavailable, UploadBusy
from uploads.models import Slot
from uploads.services.calls import DB_CALL_SECONDS, db_call
from uploads.services.grants import (
    WriterGrant,
    writer_admit,
    writer_check,
    writer_commit,
    writer_committed,
    writer_complete,
    writer_fail,
    writer_park,
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
# Frames smaller than this are copied into one buffer instead of queued one by
# one: a client sending tiny frames costs the queue bytes, not an object per frame.
COALESCE_BYTES = 64 * 1024


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


class State(enum.Enum):
    """Where a writer is in its life (see the module docstring)."""

    ADMITTING = "admitting"  # getting the grant and opening the part: no byte is accepted yet
    WRITING = "writing"  # ready: bytes are written, committed and acknowledged
    DRAINING = "draining"  # asked to stop: what arrived is written and made durable, then run() ends
    FINALIZING = "finalizing"  # every byte is in: verify, make durable and visible, mark complete
    COMPLETE = "complete"  # the upload is complete; completing it released the slot
    FENCED = "fenced"  # someone else owns the upload now: commit, release and delete nothing
    CLOSING = "closing"  # close(): the tail is made durable and the slot freed
    CLOSED = "closed"  # nothing held


# States after which nothing of the connection's is to be settled by close().
SETTLED = frozenset({State.COMPLETE, State.FENCED})


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


def _release_unused(grant: WriterGrant) -> None:
    """A grant that arrived after its connection stopped waiting for it: give its slot back at once."""
    writer_release(grant, Slot.ReleaseReason.DISCONNECTED)


class UploadWriter:
    """See the module docstring. Not thread-safe: one event loop drives it."""

    def __init__(self, user, upload_id: str, holder_channel: str):
        self.user = user
        self.upload_id = upload_id
        self.holder_channel = holder_channel
        self.state = State.ADMITTING
        self.grant: WriterGrant | None = None
        self.part: storage.PartWriter | None = None
        self.pending: deque[bytes | bytearray] = deque()
        self.received = self.written = self.durable = self.acked = 0
        self.lease_seconds = settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS
        self.idle_seconds = settings.DIRECTDRIVEX_IDLE_SECONDS
        self.batch_bytes = max(1, settings.DIRECTDRIVEX_WINDOW // 4)
        # Why run() is to end, once stop() or revoke() asked it to.
        self._stop: Exception | None = None
        # Set by stop() and revoke(): a long re-hash in a thread checks it between blocks.
        self._interrupt = threading.Event()
        self._wake = asyncio.Event()
        # Set whenever queued bytes were written (or the writer stops): a transport without a
        # credit window (tus) reads its body no faster than this (wait_for_room).
        self._room = asyncio.Event()
        self._inflight: set[asyncio.Future] = set()  # disk operations running in threads on our part
        self._commit_task: asyncio.Future | None = None  # the one commit in flight, collected by run()
        self._commit_started = 0.0
        self._finished_digest: str | None = None  # a finished file found in place at open
        self._last_commit_seconds = 0.0
        self._first_unsynced_at: float | None = None
        self._lease_deadline = 0.0
        self._last_byte_at = 0.0
        self._progress_at = 0.0
        self._progress_task: asyncio.Future | None = None

    # --- what the transport calls ---------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the transport may take bytes: the writer was admitted and its part opened."""
        return self.state is not State.ADMITTING

    @property
    def closing(self) -> bool:
        """Whether the writer is on its way out: bytes arriving now are dropped."""
        return self._stop is not None or self.state in (State.FENCED, State.CLOSING, State.CLOSED)

    @property
    def size(self) -> int:
        return self.grant.size if self.grant else 0

    def feed(self, data: bytes) -> None:
        """Queue the next bytes of the file (the transport has checked window and size)."""
        last = self.pending[-1] if self.pending else None
        if len(data) < COALESCE_BYTES and isinstance(last, bytearray) and len(last) < COALESCE_BYTES:
            last += data
        elif len(data) < COALESCE_BYTES:
            self.pending.append(bytearray(data))
        else:
            self.pending.append(data)
        self.received += len(data)
        self._wake.set()

    @property
    def queued(self) -> int:
        """Bytes received and not yet written."""
        return self.received - self.written

    async def wait_for_room(self, limit: int) -> None:
        """Return once at most ``limit`` bytes wait to be written, or the writer is on its way out.

        The flow control of a transport whose client has no credit window (a
        tus body): it stops reading its client meanwhile, which the server
        turns into TCP backpressure (directdrivex.server).
        """
        while self.queued > limit and not self.closing:
            self._room.clear()
            await self._room.wait()

    def stop(self, refusal: Exception) -> None:
        """Ask run() to end with ``refusal`` once what was received is written (the first ask wins).

        What was written is made durable by :meth:`make_durable` or :meth:`close`.
        """
        if self._stop is None:
            self._stop = refusal
        if self.state is State.WRITING:
            self.state = State.DRAINING
        self._interrupt.set()
        self._wake.set()
        self._room.set()

    def revoke(self, refusal: LeaseLost | NotUploading) -> None:
        """The upload was taken away (reset, reap, cancel, delete): end with ``refusal`` at once, keeping nothing."""
        self._stop = refusal
        self.pending.clear()
        if self.state not in (State.COMPLETE, State.CLOSED):
            self.state = State.FENCED
        self._interrupt.set()
        self._wake.set()
        self._room.set()

    async def open(self) -> int:
        """Admit this connection as the upload's writer and open its part; returns the resume offset.

        1. Ask for the grant (uploads.services.grants.writer_admit): a live
           holder means UploadBusy. A grant that arrives after we stopped
           waiting (deadline, cancellation) is released at once.
        2. If the upload's finished file is already in place (a writer stopped
           between making it visible and the database update), finish that.
        3. Otherwise open the part at the durable offset. If the part is
           shorter than that, look for the finished file once more (a fenced
           writer may have made it visible between 2 and 3) before giving the
           missing bytes up and resuming from what is there.
        """
        self.grant = await db_call(writer_admit, self.user, self.upload_id, self.holder_channel, undo=_release_unused)
        self._renewed(time.monotonic())
        self._raise_if_stopped()
        if not await self._finished_in_place():
            await self._open_part()
        self._raise_if_stopped()
        self.state = State.WRITING
        self._last_byte_at = time.monotonic()
        return self.written

    async def run(self, send_ack: AckCallback) -> Completed:
        """Write, acknowledge, commit and finalize, in one sequence, until done or stopped."""
        while True:
            if self.state is State.FENCED:
                raise self._stop or LeaseLost()
            if self.written == self.size and not self.pending:
                return await self._finalize()
            if self._stop is not None and not self.pending:
                raise self._stop
            await self._collect_commit(wait=False)
            if self.pending:
                if self.written - self.durable >= ACK_LEAD_BYTES:
                    await self._commit()  # durability must catch up before more is written
                await self._write(self._take_batch())
                self._room.set()
                self._last_byte_at = time.monotonic()
                if self._commit_task is None and self._commit_due():
                    self._start_commit(full=False)
                await self._ack(send_ack)
                continue
            # Caught up with everything that arrived: say where we stand at once.
            if self._acks_held() and self.written > self.durable:
                await self._commit()
            await self._ack(send_ack)
            await self._wait_for_bytes_or_timer()

    async def make_durable(self) -> int:
        """After run() ended on a stop: commit everything written, or raise why not; returns the durable offset.

        For a transport that answers only once the bytes are durable (a tus
        PATCH's 204). Raises LeaseLost / NotUploading if the upload was taken
        away meanwhile, Unavailable if the database did not answer.
        """
        if self.state in SETTLED or self.part is None:
            return self.durable
        if self.written > self.durable or self._commit_task is not None:
            await self._commit()
        return self.durable

    async def close(self, reason: str, *, deadline: float | None = None, keep_slot: bool = False) -> None:
        """Make what was written durable if we still may, free the slot, let go of the part. Idempotent.

        With ``keep_slot`` the slot is parked for the client's next request
        instead of freed (uploads.services.grants.writer_park). Bounded by
        ``deadline`` (the event loop's clock; the transport's disconnect
        budget) or else by budgets.CLOSE_SECONDS; the part is let go even if
        the database is down, and the slot then expires with its lease.
        """
        if self.state in (State.CLOSING, State.CLOSED):
            return
        if self.state not in SETTLED:
            self.state = State.CLOSING
        self._wake.set()
        self._room.set()
        self._interrupt.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budgets.CLOSE_SECONDS if deadline is None else deadline
        try:
            await asyncio.wait_for(self._settle(reason, deadline, keep_slot), max(0.0, deadline - loop.time()))
        except TimeoutError:
            log.error("writer close ran out of time upload=%s; the slot expires with its lease", self.upload_id)
        except Unavailable as outage:
            log.warning("writer close: %s upload=%s; the slot expires with its lease", outage.detail, self.upload_id)
        except Exception:
            log.exception("writer close failed upload=%s; the slot expires with its lease", self.upload_id)
        finally:
            if self._commit_task is not None and not self._commit_task.done():
                self._commit_task.cancel()  # its thread, if any, finishes on its own
            self._let_go_of_part()
            self.state = State.CLOSED

    # --- opening ----------------------------------------------------------------

    async def _finished_in_place(self) -> bool:
        grant = self.grant
        digest = await self._interruptible(
            storage.backend().finished_digest, grant.storage_key, grant.size, self._interrupt, grant.hash_state
        )
        if digest is None:
            return False
        self.part = None
        self.received = self.written = self.durable = self.acked = grant.size
        self._finished_digest = digest
        return True

    async def _open_part(self):
        grant = self.grant
        try:
            self.part = await self._interruptible(
                storage.backend().open_part, grant.storage_key, grant.committed(), grant.size, self._interrupt
            )
        except storage.PartLocked:
            # A frozen or dying writer still holds the file: it must not share it.
            raise UploadBusy("Another process still holds this upload's file.", retry_after=2) from None
        except storage.PartShort as short:
            if await self._finished_in_place():
                return
            # Bytes promised durable are gone (disk loss, manual deletion): resume from what is there.
            self.grant = grant = await db_call(writer_rewind, grant, short.on_disk)
            self.part = await self._interruptible(
                storage.backend().open_part, grant.storage_key, grant.committed(), grant.size, self._interrupt
            )
        # A DELETE may have ended the upload between our admission and the
        # open, which then made an empty part anew: make sure we still own it.
        try:
            await db_call(writer_check, grant)
        except NotUploading:
            self._let_go_of_part()
            await asyncio.to_thread(storage.backend().delete, grant.storage_key)
            raise
        self.received = self.written = self.durable = self.acked = grant.offset
        metrics.RESUME_BYTES_READ.inc(self.part.bytes_read_back)

    async def _interruptible(self, function, *args):
        """A disk operation that stop() or revoke() may interrupt: then it ends with their refusal."""
        try:
            return await self._in_thread(function, *args)
        except storage.Interrupted:
            self._raise_if_stopped()
            raise

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
        """Only durable bytes are acknowledged while commits are slow: the last one, or the one in flight."""
        if self._last_commit_seconds > ACK_HOLD_SECONDS:
            return True
        return self._commit_task is not None and time.monotonic() - self._commit_started > ACK_HOLD_SECONDS

    async def _ack(self, send_ack: AckCallback):
        offset = self.durable if self._acks_held() else self.written
        if offset > self.acked and self._stop is None:
            self.acked = offset
            await send_ack(offset)

    def _start_commit(self, *, full: bool = True):
        """Start sync + fenced UPDATE of a checkpoint in a thread; run() collects the outcome.

        Called only between writes (run() is the one sequence that appends), so
        the checkpoint's hash state is exactly that of its offset. A commit due
        by bytes need not cover every byte: an object store stops at its last
        whole part (no tail object) unless the bytes after it are getting old.
        """
        self._commit_started = time.monotonic()
        checkpoint = self.part.checkpoint(full)
        since = checkpoint.since
        if not full and since is not None and self._commit_started - since >= self._commit_after():
            checkpoint = self.part.checkpoint(True)
        # Bytes written from now on (and any the checkpoint left out) wait for the next commit.
        self._first_unsynced_at = checkpoint.since
        self._commit_task = asyncio.ensure_future(self._commit_call(self.part, checkpoint, self._commit_started))
        self._commit_task.add_done_callback(self._commit_done)

    def _commit_done(self, task: asyncio.Future):
        self._wake.set()  # run() collects the outcome; a closing writer may never: mark it seen
        if not task.cancelled():
            task.exception()

    async def _commit_call(
        self, part: storage.PartWriter, checkpoint: storage.Checkpoint, started: float
    ) -> tuple[int, float]:
        moves = checkpoint.offset > self.durable
        if not moves:  # a mere lease renewal
            await db_call(writer_commit, self.grant, self.durable)
            return self.durable, started
        try:
            durable = await self._in_thread(part.sync, checkpoint)
        except FileNotFoundError:
            await db_call(writer_check, self.grant)  # the upload was deleted or taken: say so, not a fault
            raise
        await self._record(part, durable, self.grant, DB_CALL_SECONDS)
        # A commit of new bytes, sync + UPDATE; a mere lease renewal would flatter the histogram.
        metrics.COMMIT_SECONDS.observe(time.monotonic() - started)
        return durable.offset, started

    async def _record(self, part: storage.PartWriter, durable: storage.Durable, grant, timeout: float) -> None:
        """The fenced UPDATE that records what ``part.sync`` made durable."""
        try:
            state = durable.hash_state
            await db_call(writer_commit, grant, durable.offset, hash_state=state, durable=durable, timeout=timeout)
        except (LeaseLost, NotUploading):
            # Fenced (a writer that froze past its lease and woke up, say): what that sync just stored is
            # recorded nowhere and known to no one else. Gone now, so a stale writer lands no byte anywhere.
            await self._in_thread(part.fenced, durable)
            raise
        part.committed(durable)

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
        except (LeaseLost, NotUploading) as refusal:
            self._fenced(refusal)
            raise
        if offset > self.durable:
            metrics.BYTES_RECEIVED.inc(offset - self.durable)  # once per commit, never per frame
        self.durable = max(self.durable, offset)
        self._last_commit_seconds = time.monotonic() - started
        self._renewed(started)
        self._publish_progress()

    def _fenced(self, refusal: LeaseLost | NotUploading) -> None:
        """A compare-and-swap of ours changed nothing: the upload is someone else's now."""
        if self.state is not State.CLOSED:
            self.state = State.FENCED
        if self._stop is None:
            self._stop = refusal
        self._room.set()

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
        """Verify, record offset = size (fenced, renewing the lease), make visible, mark complete: in that order.

        Losing the lease at any step leaves the bytes for the next writer: after
        the file became visible it finds a verified file in place and completes
        it. Only an ended upload (cancel, expire, delete) takes the bytes away.
        """
        self.state = State.FINALIZING
        grant = self.grant
        digest = self._finished_digest if self.part is None else self.part.hexdigest()
        if grant.sha256 and digest != grant.sha256:
            try:
                await db_call(writer_fail, grant)
            except (LeaseLost, NotUploading) as refusal:  # fenced: the bytes are the new owner's to judge
                self._fenced(refusal)
                raise
            raise ChecksumMismatch(f"The bytes received hash to {digest}, not the declared {grant.sha256}.")
        if self.part is not None:
            await self._commit()
            # Made from what the database recorded (fenced: a writer taken over stops here).
            committed = await db_call(writer_committed, grant)
            try:
                await self._in_thread(self.part.finalize, committed)
            except FileNotFoundError:
                await db_call(writer_check, grant)  # the part vanished: a DELETE got there first
                raise
        try:
            await db_call(writer_complete, grant, sha256=digest)
        except NotUploading as refusal:
            # Cancelled, expired or deleted while we finalized: the file must not outlive its row.
            self._fenced(refusal)
            await asyncio.to_thread(storage.backend().delete, grant.storage_key)
            raise
        except LeaseLost as refusal:
            self._fenced(refusal)
            raise
        self.state = State.COMPLETE  # writer_complete released the slot
        return Completed(str(grant.upload_id), grant.size, digest)

    # --- cleanup -------------------------------------------------------------------

    async def _settle(self, reason: str, deadline: float, keep_slot: bool):
        if self._commit_task is not None:
            await asyncio.wait({self._commit_task})
            with contextlib.suppress(Exception):
                await self._collect_commit(wait=True)  # fenced or failed: judged below
        await self._wait_inflight()
        grant = self.grant
        if grant is None or self.state in SETTLED:
            return
        loop = asyncio.get_running_loop()
        part = self.part
        if part is not None and self.written > self.durable:
            try:
                checkpoint = part.checkpoint()  # no append runs any more (_wait_inflight)
                durable = await self._in_thread(part.sync, checkpoint)
                # Half of what is left, so that the release below gets its turn too.
                timeout = max(0.0, (deadline - loop.time()) / 2)
                await self._record(part, durable, grant, timeout)
                metrics.BYTES_RECEIVED.inc(durable.offset - self.durable)
                self.durable = durable.offset
            except (LeaseLost, NotUploading):
                return  # someone else owns the upload now; our bytes past durable are theirs to drop
            except Exception:
                # The resume point stays at the last durable offset; still try to free the slot.
                log.warning("final commit failed upload=%s", self.upload_id, exc_info=True)
        if self.state is State.FENCED:
            return
        numbers = part.numbers_used if part is not None else None
        if keep_slot and self.durable == self.written:
            await db_call(writer_park, grant, part_numbers=numbers, timeout=max(0.0, deadline - loop.time()))
        else:
            await db_call(writer_release, grant, reason, part_numbers=numbers, timeout=max(0.0, deadline - loop.time()))

    async def _in_thread(self, function, *args):
        """Run one disk or store operation in a thread; the part is never closed under it."""
        future = asyncio.get_running_loop().run_in_executor(None, function, *args)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The thread runs on; a part it opens after we gave up must still be closed.
            future.add_done_callback(_close_orphan)
            raise
        except storage.StoreUnavailable as outage:
            # The object store is down: a server-side outage like a lost database (4503 / 503), resumable.
            raise Unavailable(
                "The server cannot reach its object store right now; resume shortly.", retry_after=outage.retry_after
            ) from outage

    async def _wait_inflight(self):
        if self._inflight:
            await asyncio.wait(set(self._inflight))

    def _let_go_of_part(self):
        part, self.part = self.part, None
        if part is None:
            return
        running = set(self._inflight)
        if not running:
            part.close()
            return

        # A thread still writes or fsyncs through this part: closing it now could
        # let its descriptor be reused under the thread's write. Close when the last one ends.
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
