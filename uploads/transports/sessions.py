"""What both upload transports (websocket.py, tus.py) do around the writer the same way.

* Channel-layer messages for a connection (``layer_messages``): revocations
  (a reap, reset, cancel or delete took the upload: stop at once, keep
  nothing) and stop requests (a newer request wants the upload: write and
  commit what arrived, free the slot, end). A layer outage is retried with
  back-off; the upload goes on meanwhile.
* The end of a connection's session (``end_session``): wait for it until the
  transport's deadline after its client left (uploads.budgets), then cancel.
* How a refusal is logged (``log_refusal``): named ones at INFO, outages at
  WARNING, anything else with its traceback.
"""

import asyncio
import logging

from rest_framework.exceptions import APIException

from uploads import budgets
from uploads.exceptions import (
    DirectDriveXError,
    IdleTimeout,
    LeaseLost,
    NotUploading,
    TakenOver,
    Unavailable,
    refusal_for,
)
from uploads.writer import Reason, UploadWriter

log = logging.getLogger(__name__)

# Backoff while the channel layer is unreachable: the upload goes on meanwhile.
LAYER_RETRY_SECONDS = (0.5, 10.0)

# Revocations sent through the channel layer (uploads.services.slots.notify_holders), by code.
REVOCATIONS = {LeaseLost.code: LeaseLost, NotUploading.code: NotUploading}


async def layer_receive(layer, channel: str) -> dict:
    """The next channel-layer message for ``channel``, retrying (with back-off) while the layer is down."""
    delay = LAYER_RETRY_SECONDS[0]
    while True:
        try:
            return await layer.receive(channel)
        except Exception:
            log.warning("channel layer receive failed; retrying in %.1fs", delay, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(2 * delay, LAYER_RETRY_SECONDS[1])


def act_on_notice(writer: UploadWriter | None, event: dict) -> None:
    """Apply a holder notice (uploads.services.slots) to this connection's writer."""
    if writer is None:
        return
    if event["type"] == "upload.stop":
        writer.stop(TakenOver(event.get("detail")))
    else:
        writer.revoke(REVOCATIONS.get(event["code"], LeaseLost)(event["detail"]))


def release_reason(refusal: BaseException) -> str:
    """Why a writer that ends on ``refusal`` frees its slot (the slot's release reason)."""
    if isinstance(refusal, IdleTimeout):
        return Reason.IDLE
    if isinstance(refusal, TakenOver):
        return Reason.DISCONNECTED  # its client's newer request has the upload: the normal life of a retry
    return Reason.ERROR


def log_refusal(upload_id: str, error: BaseException) -> DirectDriveXError:
    """The refusal a client is told for ``error``, logged at the level it deserves."""
    refusal = refusal_for(error)
    if isinstance(error, DirectDriveXError):
        log.info("refused upload=%s code=%s detail=%s", upload_id, refusal.code, refusal.detail)
    elif isinstance(error, APIException):  # DRF's refusals of a tus request (authentication, validation)
        log.info("refused upload=%s status=%s detail=%s", upload_id, error.status_code, error.detail)
    elif isinstance(refusal, Unavailable):
        log.warning("upload=%s: backing service unavailable: %r", upload_id, error)
    else:
        log.error("upload session failed upload=%s", upload_id, exc_info=error)
    return refusal


async def end_session(session: asyncio.Future | None, end_by: float) -> None:
    """Wait for ``session`` to end, at most until ``end_by`` (the event loop's clock); then cancel it.

    Daphne's own cancellation comes later (uploads.budgets). A cancellation of
    ours (server shutdown) still lets the session finish its cleanup within
    the budget; a second one gives up at once. Never swallowed.
    """
    if session is None:
        return
    loop = asyncio.get_running_loop()
    cancelled = False
    while not session.done():
        remaining = end_by - loop.time()
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
