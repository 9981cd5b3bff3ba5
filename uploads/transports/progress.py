"""Live progress of the signed-in user's uploads, for the pages: a WebSocket that forwards the user's progress events.

Whichever process writes an upload, its events reach every page of its owner
through the user's channel-layer group (uploads.services.progress).
"""

import contextlib
import json
import logging

from channels.generic.websocket import AsyncWebsocketConsumer

from uploads.exceptions import DirectDriveXError, Unauthenticated, Unavailable
from uploads.services.progress import user_group
from uploads.transports.dispatch import DirectDispatch

log = logging.getLogger(__name__)


class ProgressConsumer(DirectDispatch, AsyncWebsocketConsumer):
    """Live progress of the signed-in user's uploads, for the pages: ``{"type": "progress", ...}`` messages.

    Session only (a page on an allowed origin); whichever process writes an
    upload, its events reach every page of its owner through the user's
    channel-layer group (uploads.services.progress).
    """

    group: str | None = None

    async def connect(self):
        await self.accept()
        if self.scope.get("auth_error") is not None:  # the database could not say who is connecting
            await self._refuse(self.scope["auth_error"])
            return
        user = self.scope.get("user")
        if not getattr(user, "is_authenticated", False) or self.scope.get("auth_method") != "session":
            await self._refuse(Unauthenticated("Sign in: live progress is for pages with a session."))
            return
        try:
            await self.channel_layer.group_add(user_group(user.pk), self.channel_name)
        except Exception as error:
            log.warning("progress: channel layer unreachable: %r", error)
            await self._refuse(Unavailable("Live progress is unavailable right now; reload to see the state."))
            return
        self.group = user_group(user.pk)

    async def disconnect(self, code):
        if self.group is not None:
            with contextlib.suppress(Exception):
                await self.channel_layer.group_discard(self.group, self.channel_name)

    async def _refuse(self, refusal: DirectDriveXError):
        await self.send(text_data=json.dumps({"type": "error", **refusal.as_dict(ws=True)}))
        await self.close(code=refusal.close_code)

    async def upload_progress(self, event):
        await self.send(text_data=json.dumps({**event, "type": "progress"}))
