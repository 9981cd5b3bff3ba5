"""The ASGI application: HTTP through Django (tus through its consumer), WebSockets through Channels.

Tests import it from here; servers import directdrivex.asgi, which runs the
system checks first.
"""

import django
from channels.routing import ProtocolTypeRouter, URLRouter
from django.conf import settings
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler
from django.urls import re_path

from directdrivex.handler import ClosingASGIHandler

# Django must be set up (as get_asgi_application does it) before importing code that uses models.
django.setup(set_prefix=False)
# Django's handler, closing the responses it drops (directdrivex.handler).
django_asgi_app = ClosingASGIHandler()
if settings.DEBUG:
    # Daphne serves no static files: under make run, let Django serve the admin's CSS.
    # In production a proxy serves STATIC_ROOT (manage.py collectstatic; docs/deployment.md).
    django_asgi_app = ASGIStaticFilesHandler(django_asgi_app)

from uploads.routing import http_urlpatterns, websocket_urlpatterns  # noqa: E402
from uploads.transports.auth import refuse_handshake, websocket_auth_stack  # noqa: E402

# Any other WebSocket path is refused at the handshake (Daphne answers 403);
# without this route, URLRouter raises and Daphne answers 500 with a traceback.
unknown_websocket_path = re_path(r"", refuse_handshake)

application = ProtocolTypeRouter(
    {
        # tus bodies stream into their consumer (uploads.transports.tus); every other request is Django's.
        "http": URLRouter([*http_urlpatterns, re_path(r"", django_asgi_app)]),
        "websocket": websocket_auth_stack(URLRouter([*websocket_urlpatterns, unknown_websocket_path])),
    }
)
