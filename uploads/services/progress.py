"""Live upload progress for pages: events on a per-user channel-layer group, whichever process writes.

A writer publishes its durable offset as it commits, and the services publish
status changes (complete, cancelled, expired, failed, deleted) after commit;
``ProgressConsumer`` (uploads.transports.websocket) forwards the owner's events to the
pages that listen. Events are best effort: a channel layer that is down loses
some, never an upload (the database stays the truth, and a page that
reconnects reads it again).
"""

import asyncio
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

log = logging.getLogger(__name__)

EVENT_TYPE = "upload.progress"


def user_group(user_id: int) -> str:
    return f"uploads.user.{user_id}"


def progress_event(*, upload_id, offset: int, size: int, status: str) -> dict:
    return {"type": EVENT_TYPE, "id": str(upload_id), "offset": offset, "size": size, "status": status}


# A channel layer that does not answer within this loses the event: a service
# (DELETE, completion) never waits longer for it.
PUBLISH_SECONDS = 2.0


async def publish(user_id: int, event: dict) -> None:
    """Send ``event`` to the user's pages; a channel-layer failure is logged, never raised."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await asyncio.wait_for(layer.group_send(user_group(user_id), event), PUBLISH_SECONDS)
    except Exception:
        log.warning("could not publish progress upload=%s user=%s", event.get("id"), user_id, exc_info=True)


def publish_now(user_id: int, event: dict) -> None:
    """From synchronous code (services, after their transaction committed).

    In a thread started by sync_to_async (API requests, writer database calls)
    this runs ``publish`` on the server's event loop, where the channel layer
    lives, for at most PUBLISH_SECONDS.
    """
    try:
        async_to_sync(publish)(user_id, event)
    except RuntimeError:
        # Called from inside an event loop's thread: async_to_sync refuses; pages then miss this event.
        log.warning("progress event dropped (called from an event loop) upload=%s", event.get("id"))
