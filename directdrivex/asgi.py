"""ASGI entry point: HTTP through Django, WebSockets through Channels.

Daphne does not run Django's system checks, so they run here: a bad
configuration stops the server at start-up with the check's message.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "directdrivex.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.core import checks  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402

from uploads.routing import websocket_urlpatterns  # noqa: E402
from uploads.ws_auth import websocket_auth_stack  # noqa: E402

_errors = [message for message in checks.run_checks() if message.is_serious()]
if _errors:
    raise ImproperlyConfigured("; ".join(str(message) for message in _errors))

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": websocket_auth_stack(URLRouter(websocket_urlpatterns)),
    }
)
