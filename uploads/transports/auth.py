"""Who is connecting: WebSocket handshakes (Origin, session cookies, ws_url tickets) and tus requests.

* A connection with an ``Origin`` header must come from the server's own
  origin or a trusted one, judged as Django's CSRF check judges it; a foreign
  origin is refused at the handshake (Daphne answers HTTP 403), ticket or not.
* A connection without ``Origin`` is a script: only a ticket can admit it,
  never a session cookie alone (cookies without Origin could be replayed).
* A valid ticket sets the user and the one upload it admits
  (``scope["ticket_upload_id"]``); the consumer checks that id.
* The user is looked up in the service threads, with a deadline; a database
  outage becomes ``scope["auth_error"]``, answered by the consumer after it
  accepts (4503), never an HTTP 500 at the handshake.
* A tus request (``http_request_user``) is authenticated exactly as the JSON
  API authenticates it: DRF's token and session authentication, the session
  one with Django's CSRF check (X-CSRFToken, and Origin judged as for any
  unsafe request).
"""

import io
import logging
from importlib import import_module
from urllib.parse import parse_qs, urlsplit

from channels.middleware import BaseMiddleware
from channels.sessions import CookieMiddleware, SessionMiddleware
from django.conf import settings
from django.contrib.auth import get_user, get_user_model
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import DisallowedHost
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest
from django.utils.http import is_same_domain
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.request import Request

from uploads import budgets
from uploads.exceptions import Unauthenticated, Unavailable, refusal_for
from uploads.services.calls import db_call
from uploads.tickets import ticket_read

log = logging.getLogger(__name__)


def _origin(scope) -> str | None:
    return next((value.decode("latin-1") for name, value in scope.get("headers", []) if name == b"origin"), None)


def _has_origin(scope) -> bool:
    return _origin(scope) is not None


def _own_origin(scope) -> str | None:
    """The server's origin as this handshake reached it, or None when its Host is not in ALLOWED_HOSTS.

    Read through Django's own request, so the Host header (X-Forwarded-Host
    with USE_X_FORWARDED_HOST), ALLOWED_HOSTS and SECURE_PROXY_SSL_HEADER count
    exactly as they do for an HTTP request; ws is http and wss is https.
    """
    scheme = "https" if scope.get("scheme") == "wss" else "http"
    request = ASGIRequest(dict(scope, method="GET", scheme=scheme), io.BytesIO())
    try:
        host = request.get_host()
    except DisallowedHost:
        return None
    return f"{request.scheme}://{host}"


def origin_allowed(scope, origin: str) -> bool:
    """Django's CSRF Origin check (CsrfViewMiddleware._origin_verified) for a WebSocket handshake:
    scheme, host and port must equal the server's own origin, or be in CSRF_TRUSTED_ORIGINS
    (exactly, or under a ``scheme://*.domain`` entry)."""
    if origin == _own_origin(scope):
        return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in trusted:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    wildcards = (urlsplit(entry) for entry in trusted if "*" in entry)
    return any(
        entry.scheme == parts.scheme and is_same_domain(parts.netloc, entry.netloc.lstrip("*")) for entry in wildcards
    )


def _ticket_user(user_id: int):
    return get_user_model().objects.filter(pk=user_id, is_active=True).first()


def _session_user(session):
    """The session's user as Django's own auth sees it (backend, session hash), or AnonymousUser."""
    request = HttpRequest()
    request.session = session
    return get_user(request)


class ConnectionAuth(BaseMiddleware):
    """Who is connecting: a ticket's user, or the session's (only with an Origin), or nobody.

    The lookups run through uploads.services.calls (threads of their own, a
    deadline), not on the process's shared sync thread. A database that is
    down or saturated does not fail the handshake (Daphne would answer a bare
    HTTP 500 and log a traceback per attempt): ``scope["auth_error"]`` then
    holds the refusal, which the consumer sends after accepting, as the
    protocol's error message and close code (4503 with retry_after).
    """

    async def __call__(self, scope, receive, send):
        scope = dict(scope, ticket_upload_id=None, auth_method=None, auth_error=None, user=AnonymousUser())
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        ticket = (query.get("ticket") or [None])[0]
        claims = ticket_read(ticket) if ticket else None
        try:
            user = await db_call(_ticket_user, claims[0], timeout=budgets.AUTH_SECONDS) if claims else None
            if user is not None:
                scope["user"], scope["ticket_upload_id"], scope["auth_method"] = user, claims[1], "ticket"
            elif _has_origin(scope) and scope.get("cookies", {}).get(settings.SESSION_COOKIE_NAME):
                session_user = await db_call(_session_user, scope["session"], timeout=budgets.AUTH_SECONDS)
                if session_user.is_authenticated:
                    scope["user"], scope["auth_method"] = session_user, "session"
        except Exception as error:
            refusal = refusal_for(error)
            if not isinstance(refusal, Unavailable):
                raise
            log.warning("websocket auth: database unavailable for %s: %r", scope.get("path", "")[:200], error)
            scope["auth_error"] = refusal
        return await super().__call__(scope, receive, send)


async def refuse_handshake(scope, receive, send):
    """Refuse a WebSocket at its handshake (Daphne answers HTTP 403).

    A bare ASGI application, not a consumer: refusing costs no channel-layer
    channel, however many foreign or misdirected handshakes arrive.
    """
    message = await receive()
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close"})


class OriginCheck:
    """Refuses a handshake from a foreign Origin (see ``origin_allowed``); scripts (no Origin) pass to ticket auth."""

    def __init__(self, application):
        self.application = application

    async def __call__(self, scope, receive, send):
        origin = _origin(scope)
        if origin is not None and not origin_allowed(scope, origin):
            log.info("websocket refused: foreign origin %r for %s", origin[:200], scope.get("path", "")[:200])
            return await refuse_handshake(scope, receive, send)
        return await self.application(scope, receive, send)


def websocket_auth_stack(inner):
    # Channels' cookie and (lazy) session middleware, then our own lookup instead of its AuthMiddleware,
    # whose thread-sensitive, unguarded database call is what the handshake must not depend on.
    return OriginCheck(CookieMiddleware(SessionMiddleware(ConnectionAuth(inner))))


def _http_user(scope):
    request = ASGIRequest(dict(scope), io.BytesIO())
    engine = import_module(settings.SESSION_ENGINE)
    request.session = engine.SessionStore(request.COOKIES.get(settings.SESSION_COOKIE_NAME))
    request.user = get_user(request)  # what AuthenticationMiddleware would set; DRF's session auth reads it
    # DRF's refusals (a bad token: 401; the session's CSRF check: 403) are answered as the API answers them.
    return Request(request, authenticators=[TokenAuthentication(), SessionAuthentication()]).user


async def http_request_user(scope):
    """The user of a tus request (token, or session + CSRF), or raise why not (401, 403, 503)."""
    user = await db_call(_http_user, scope)
    if not getattr(user, "is_authenticated", False):
        raise Unauthenticated("Send Authorization: Token <key>, or sign in and send X-CSRFToken.")
    return user
