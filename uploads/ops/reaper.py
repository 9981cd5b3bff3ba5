"""The reaper: one long-running process that reaps expired leases, expires idle uploads and prunes slot history.

`manage.py slots reaper` runs ``reaper_run``. Each pass calls the same services
as `slots reap`, `uploads expire` and `slots prune`, so several reapers (on one
host or many) may run at once: those services claim their rows with row locks
and compare-and-swap updates, and a row another reaper took is skipped, never
acted on twice (docs/operations.md, "The reaper").
"""

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections

from uploads import storage
from uploads.services.slots import slots_prune, slots_reap
from uploads.services.uploads import store_sweep, uploads_expire

# Named for what operators filter on (docs/operations.md), not for the module: a stable interface.
log = logging.getLogger("uploads.reaper")

# History is only for people looking at the admin: an hourly prune keeps the
# table small without a DELETE every few seconds.
PRUNE_INTERVAL = 3600.0
# Longest wait between attempts while the database is unreachable: a reaper
# that comes back at most a minute after the database does.
BACKOFF_CAP = 60.0


def default_interval() -> float:
    """A quarter of the lease: a stuck slot is reclaimed at most 1.25 leases after its last renewal."""
    return settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS / 4


def backoff(interval: float, failures: int) -> float:
    """Seconds to wait after ``failures`` failed passes in a row: doubling, capped at BACKOFF_CAP (or the interval)."""
    return min(interval * 2**failures, max(interval, BACKOFF_CAP))


class StopFlag:
    """A stop request that a signal handler may raise, and a sleep that ends as soon as one is.

    Not a threading.Event: its set() takes a lock that the main thread may be
    holding inside Event.wait() when the signal arrives, and a handler that
    waits for its own thread never returns. set() writes a byte into a pipe
    instead (no lock), which wakes the select() in wait(); a signal that lands
    between the flag check and select() has written its byte already. Any
    thread may call set() too.
    """

    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._stopped = False
        self.reason = ""

    def set(self, reason: str = "requested") -> None:
        if not self._stopped:
            self.reason = reason
        self._stopped = True
        with contextlib.suppress(BlockingIOError, OSError):  # a full pipe wakes select() just the same
            os.write(self._write, b"\0")

    def is_set(self) -> bool:
        return self._stopped

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds or until set(); True if stopped."""
        if not self._stopped and timeout > 0:
            # A signal interrupts select(); Python runs the handler (which writes
            # to the pipe) and retries, which then returns at once.
            select.select([self._read], [], [], timeout)
        return self._stopped

    def close(self) -> None:
        for fd in (self._read, self._write):
            with contextlib.suppress(OSError):
                os.close(fd)


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag, signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[StopFlag]:
    """Turn ``signals`` into ``stop.set()`` while the block runs (main thread only), then restore the old handlers.

    The handler only raises the flag: the statement or transaction in progress
    finishes, and the loop exits at its next check.
    """

    def handler(signum, _frame):
        stop.set(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


# What the log line of a pass says (the JSON line has the ids as well).
PASS_FIELDS = ("pass", "reaped", "expired", "pruned", "swept", "seconds")


@dataclass(frozen=True)
class ReaperPass:
    """What one pass did. ``None``: that step did not run (pruning is hourly; a stop or an error came first)."""

    number: int
    seconds: float
    reaped: tuple[int, ...] | None = None  # released slot ids
    expired: tuple[str, ...] | None = None  # expired upload ids
    pruned: int | None = None  # deleted history rows
    swept: int | None = None  # an object store's abandoned multipart uploads and tails removed (with pruning)
    error: str = ""
    retry_in: float | None = None

    def as_dict(self) -> dict:
        return {
            "pass": self.number,
            "reaped": None if self.reaped is None else len(self.reaped),
            "expired": None if self.expired is None else len(self.expired),
            "pruned": self.pruned,
            "swept": self.swept,
            "reaped_slots": list(self.reaped or ()),
            "expired_uploads": list(self.expired or ()),
            "seconds": round(self.seconds, 3),
            "error": self.error or None,
            "retry_in": self.retry_in,
        }


def reaper_pass(number: int = 1, *, prune: bool = True, stop: StopFlag | None = None) -> ReaperPass:
    """Reap expired leases, expire idle uploads and (if ``prune``) prune history, in that order.

    Reaping first: an idle upload's stuck slot is then already free when the
    upload expires. Each step is its own transaction(s); a stop request between
    steps skips the rest of the pass, never a transaction's second half. A
    database error propagates to the caller.
    """
    started = time.monotonic()
    expired = pruned = swept = None
    reaped = tuple(slot.pk for slot in slots_reap())
    if stop is None or not stop.is_set():
        expired = tuple(str(upload.pk) for upload in uploads_expire())
    if prune and (stop is None or not stop.is_set()):
        pruned = slots_prune().count
    if prune and (stop is None or not stop.is_set()):
        try:
            swept = store_sweep()
        except storage.StorageError as exc:  # the store's outage is not the database's: the next sweep retries
            log.warning("reaper: object store sweep failed: %s", _one_line(exc))
    return ReaperPass(number, time.monotonic() - started, reaped=reaped, expired=expired, pruned=pruned, swept=swept)


def _one_line(exc: Exception) -> str:
    """An exception as one log or JSON line (psycopg's messages span several)."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def reaper_run(
    stop: StopFlag,
    *,
    interval: float | None = None,
    prune_interval: float = PRUNE_INTERVAL,
    on_pass: Callable[[ReaperPass], None] | None = None,
) -> int:
    """Run passes every ``interval`` seconds until ``stop`` is set; returns the number of passes.

    The first pass prunes, later ones every ``prune_interval``. A pass that
    meets a database error (down, restarted, out of connections) is logged and
    retried with a doubling back-off; the loop never dies of it, nor of a
    disk error (uploads_expire logs an upload whose bytes it could not
    delete and goes on; anything else of the disk fails the pass). Connections
    are checked before and handed back after every pass, as Django does around
    a request, so a restarted PostgreSQL costs a failed pass, not a dead
    process.
    """
    interval = default_interval() if interval is None else interval
    log.info(
        "reaper.started", extra={"ddx": {"interval": interval, "prune_interval": prune_interval, "pid": os.getpid()}}
    )
    number = failures = 0
    next_prune = time.monotonic()
    while not stop.is_set():
        number += 1
        prune = time.monotonic() >= next_prune
        started = time.monotonic()
        try:
            # Checked before and handed back after the pass, as Django does around a request.
            close_old_connections()
            result = reaper_pass(number, prune=prune, stop=stop)
            close_old_connections()
        except (DatabaseError, OSError) as exc:
            # The database, or a disk the services delete from (read-only, an I/O error):
            # a failed pass, retried with back-off; a reaper that exits would restart into the same error.
            failures += 1
            delay = backoff(interval, failures)
            result = ReaperPass(number, time.monotonic() - started, error=_one_line(exc), retry_in=delay)
            log.warning(
                "reaper.pass_failed",
                extra={"ddx": {"pass": number, "error": result.error, "retry_in": delay, "failures": failures}},
            )
            # A broken connection must not be reused: hand every one back (to the pool) or close it.
            with contextlib.suppress(DatabaseError):
                connections.close_all()
        else:
            if failures:
                log.info("reaper.recovered", extra={"ddx": {"pass": number, "failures": failures}})
            failures, delay = 0, interval
            if result.pruned is not None:
                next_prune = time.monotonic() + prune_interval
            # One line per pass with its counts (a step that did not run is left out);
            # the services log a line for each slot and upload they changed.
            counts = result.as_dict()
            log.info("reaper.pass", extra={"ddx": {key: counts[key] for key in PASS_FIELDS}})
        if on_pass is not None:
            on_pass(result)
        stop.wait(delay)
    with contextlib.suppress(DatabaseError):
        connections.close_all()
        for connection in connections.all(initialized_only=True):
            # PostgreSQL: close the pool's connections too, so the server sees a clean goodbye, not a reset.
            close_pool = getattr(connection, "close_pool", None)
            if close_pool is not None:
                close_pool()
    log.info("reaper.stopped", extra={"ddx": {"passes": number, "reason": stop.reason or "requested"}})
    return number
