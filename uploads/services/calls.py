"""Service calls from async code (writer, download bodies, connection auth): own threads, with a deadline.

They run in a small executor of their own, not in asgiref's one shared sync
thread (which Channels' dispatch hop and Django's sync views queue on): a call
stuck on a stalled database then holds one thread instead of every writer and
download of the process, and a busy shared thread never delays a lease
renewal. After every call the thread's connection is handed back (to the
pool, on PostgreSQL): such a thread may run again only seconds later, and idle
connections held per thread are what exhausted the database.
"""

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

from uploads.exceptions import Unavailable

log = logging.getLogger(__name__)

# One call may take this long before it is Unavailable (4503 / 503): a stalled
# database would otherwise hang its caller forever.
DB_CALL_SECONDS = 10.0

_executor: ThreadPoolExecutor | None = None


def _threads() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(
            max_workers=max(2, settings.DIRECTDRIVEX_DB_POOL_SIZE), thread_name_prefix="ddx-service-db"
        )
    return _executor


def _closing_connections(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    finally:
        connections.close_all()


async def db_call(function, *args, timeout: float | None = DB_CALL_SECONDS, undo: Callable | None = None, **kwargs):
    """Run a service function in a database thread; one that takes longer than ``timeout`` is Unavailable.

    ``timeout=None`` waits as long as the call takes. A call whose caller
    stops waiting (the deadline, or a cancellation: the client left) still
    runs to its end in its thread; ``undo``, if given, is then called in a
    database thread with what it returned, so that a grant or a slot nobody
    will use is given back at once rather than when its lease runs out.
    """
    call = asyncio.ensure_future(
        sync_to_async(_closing_connections, thread_sensitive=False, executor=_threads())(function, *args, **kwargs)
    )
    try:
        return await asyncio.wait_for(asyncio.shield(call), timeout)
    except TimeoutError:
        _undo_when_done(call, undo)
        raise Unavailable("The database did not answer in time.") from None
    except asyncio.CancelledError:
        _undo_when_done(call, undo)
        raise


def _undo_when_done(call: asyncio.Future, undo: Callable | None) -> None:
    def done(finished: asyncio.Future) -> None:
        if finished.cancelled() or finished.exception() is not None or undo is None:
            return
        result = finished.result()
        log.info("undoing a call nobody waited for: %s", getattr(undo, "__name__", undo))
        _threads().submit(_closing_connections, _logged(undo), result)

    call.add_done_callback(done)


def _logged(undo: Callable) -> Callable:
    def run(result):
        try:
            undo(result)
        except Exception:  # nobody waits for it: its failure is only a line (the lease frees what it held)
            log.warning("undo %s failed", getattr(undo, "__name__", undo), exc_info=True)

    return run
