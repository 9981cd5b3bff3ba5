"""WebSocket authentication: Origin validation, session cookies and ws_url tickets.

* A connection with an ``Origin`` header must come from an allowed host
  (channels' AllowedHostsOriginValidator; a foreign origin gets HTTP 403).
* A connection without ``Origin`` is a script: only a ticket can admit it,
  never a session cookie alone (cookies without Origin could be replayed).
* A valid ticket sets the user and the one upload it admits
  (``scope["ticket_upload_id"]``); the consumer checks that id.
"""

from urllib.parse import parse_qs

from channels.auth import AuthMiddlewareStack
from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import AllowedHostsOriginValidator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser

from uploads.tickets import ticket_read


def _has_origin(scope) -> bool:
    return any(name == b"origin" for name, _value in scope.get("headers", []))


@database_sync_to_async
def _active_user(user_id: int):
    return get_user_model().objects.filter(pk=user_id, is_active=True).first()


class TicketAuthMiddleware(BaseMiddleware):
    async def __call__(self, scope, receive, send):
        scope = dict(scope, ticket_upload_id=None, auth_method=None)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        ticket = (query.get("ticket") or [None])[0]
        claims = ticket_read(ticket) if ticket else None
        user = await _active_user(claims[0]) if claims else None
        if user is not None:
            scope["user"], scope["ticket_upload_id"], scope["auth_method"] = user, claims[1], "ticket"
        elif _has_origin(scope) and getattr(scope.get("user"), "is_authenticated", False):
            scope["auth_method"] = "session"
        else:
            scope["user"] = AnonymousUser()
        return await super().__call__(scope, receive, send)


class OriginValidatorAllowingScripts:
    """AllowedHostsOriginValidator for browsers; scripts (no Origin) pass to ticket auth."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        if _has_origin(scope):
            # Built per connection: the validator copies ALLOWED_HOSTS when it is made.
            return await AllowedHostsOriginValidator(self.application)(scope, receive, send)
        return await self.application(scope, receive, send)


def websocket_auth_stack(inner):
    return OriginValidatorAllowingScripts(AuthMiddlewareStack(TicketAuthMiddleware(inner)))
