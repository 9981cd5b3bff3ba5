"""Service calls from async code (the upload writer, download bodies): in threads of their own, each with a deadline.

They run in a small executor of their own, not in Channels' single shared
database thread: a call stuck on a stalled database then holds one thread
instead of every writer and download of the process. After every call the
thread's connection is handed back (to the pool, on PostgreSQL): such a thread
may run again only seconds later, and idle connections held per thread are
what exhausted the database.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

from uploads.exceptions import Unavailable

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


async def db_call(function, *args, timeout: float | None = DB_CALL_SECONDS, **kwargs):
    """Run a service function in a database thread; one that takes longer than ``timeout`` is Unavailable.

    ``timeout=None`` waits as long as the call takes.
    """
    call = sync_to_async(_closing_connections, thread_sensitive=False, executor=_threads())
    try:
        return await asyncio.wait_for(call(function, *args, **kwargs), timeout)
    except TimeoutError:
        raise Unavailable("The database did not answer in time.") from None
