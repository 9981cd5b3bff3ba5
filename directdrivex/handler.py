"""Django's ASGI handler, closing the responses it drops when a client leaves while the view runs.

Django's ``ASGIHandler`` cancels a request whose client disconnected. If
that happens while the view runs in its thread, the view still returns a
response, which nobody sends and nobody closes: whatever the response holds
(a download's slot and open file, uploads.downloads.DownloadResponse) stays
held until its lease runs out. Here the response is awaited under a shield,
and one that arrives after the cancellation is closed at once, in a thread
(``close()`` may touch the database), as Django closes every response it sends.
"""

import asyncio
import logging

from django.core.handlers.asgi import ASGIHandler

log = logging.getLogger(__name__)


class ClosingASGIHandler(ASGIHandler):
    async def get_response_async(self, request):
        response = asyncio.ensure_future(super().get_response_async(request))
        try:
            return await asyncio.shield(response)
        except asyncio.CancelledError:
            response.add_done_callback(_close_dropped)
            raise


def _close_dropped(response: asyncio.Future) -> None:
    if response.cancelled() or response.exception() is not None:
        return
    dropped = response.result()
    log.info("closing the response of a request whose client left: %s", type(dropped).__name__)
    future = asyncio.get_running_loop().run_in_executor(None, dropped.close)
    future.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("closing a dropped response failed", exc_info=future.exception())
