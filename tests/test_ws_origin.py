"""WebSocket handshakes: Origin judged as Django's CSRF check judges it, unknown paths refused without a fault.

The same origin is scheme, host and port of the server as the handshake
reached it (its Host header; ws is http, wss is https; X-Forwarded-Proto
counts when SECURE_PROXY_SSL_HEADER is configured), or an entry of
CSRF_TRUSTED_ORIGINS. Anything else is refused at the handshake, ticket or
not; no Origin at all (a script) goes on to ticket auth. In process through
the real ASGI stack for every case, and against Daphne (where a refused
handshake is an HTTP 403) for the main ones.
"""

import contextlib

import pytest
import websockets
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connections

from directdrivex.routing import application
from tests.support.live_backend import http_call, live_backend
from tests.support.live_server import LiveServer
from uploads.models import Slot
from uploads.services.uploads import upload_create
from uploads.tickets import ws_url

pytestmark = pytest.mark.django_db(transaction=True)

HOST = b"testserver"  # in ALLOWED_HOSTS under the test runner
WS_TIMEOUT = 20


@pytest.fixture
async def upload_path(alice):
    """The ws_url of an upload of alice's: the ticket admits it with or without an Origin."""
    upload, _slot = await database_sync_to_async(upload_create)(alice, filename="f.bin", size=10)
    yield await database_sync_to_async(ws_url)(upload)
    # The consumers' database thread keeps its connection; PostgreSQL could not drop the test database.
    await database_sync_to_async(connections.close_all)()


async def handshake(path: str, *headers: tuple[bytes, bytes], scheme: str | None = None) -> tuple[bool, object]:
    """Connect through the project's ASGI application; (True, ready message) or (False, close code)."""
    communicator = WebsocketCommunicator(application, path, headers=list(headers))
    if scheme is not None:
        # As a server that reports the scheme would (Daphne does not, so its handshakes are ws).
        communicator.scope["scheme"] = scheme
    try:
        connected, detail = await communicator.connect(timeout=5)
        if connected:
            detail = await communicator.receive_json_from(timeout=5)
        return connected, detail
    finally:
        with contextlib.suppress(Exception):
            await communicator.disconnect(timeout=5)


def origin(value: str) -> tuple[bytes, bytes]:
    return (b"origin", value.encode())


def host(value: bytes = HOST) -> tuple[bytes, bytes]:
    return (b"host", value)


# --- in process ------------------------------------------------------------------------


async def test_the_servers_own_origin_is_admitted(upload_path):
    connected, ready = await handshake(upload_path, host(), origin("http://testserver"))
    assert connected and ready["type"] == "ready"


async def test_a_script_without_origin_is_admitted_on_its_ticket(upload_path):
    connected, ready = await handshake(upload_path, host())
    assert connected and ready["type"] == "ready"


@pytest.mark.parametrize(
    "foreign",
    [
        "http://testserver:8000",  # same host, another port
        "https://testserver",  # same host, another scheme
        "http://other.testserver",  # a subdomain is another host
        "https://evil.example",
        "null",  # sandboxed frames, file: pages
    ],
)
async def test_a_foreign_origin_is_refused_at_the_handshake_even_with_a_ticket(upload_path, foreign):
    connected, _code = await handshake(upload_path, host(), origin(foreign))
    assert connected is False
    assert await database_sync_to_async(Slot.objects.active().count)() == 1  # only the reservation made by POST


async def test_a_host_outside_allowed_hosts_has_no_origin_of_its_own(upload_path):
    connected, _code = await handshake(upload_path, host(b"evil.example"), origin("http://evil.example"))
    assert connected is False


async def test_a_wss_handshake_has_the_https_origin(upload_path):
    connected, _ready = await handshake(upload_path, host(), origin("https://testserver"), scheme="wss")
    assert connected
    connected, _code = await handshake(upload_path, host(), origin("http://testserver"), scheme="wss")
    assert connected is False


async def test_x_forwarded_proto_counts_only_when_secure_proxy_ssl_header_is_configured(upload_path, settings):
    forwarded = (b"x-forwarded-proto", b"https")
    connected, _code = await handshake(upload_path, host(), forwarded, origin("https://testserver"))
    assert connected is False  # anyone can send the header; only a configured proxy makes it mean TLS

    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    connected, _ready = await handshake(upload_path, host(), forwarded, origin("https://testserver"))
    assert connected
    connected, _code = await handshake(upload_path, host(), forwarded, origin("http://testserver"))
    assert connected is False


@pytest.mark.parametrize(
    ("trusted", "sent", "admitted"),
    [
        ("https://app.example", "https://app.example", True),
        ("https://app.example", "http://app.example", False),
        ("https://app.example", "https://app.example:8443", False),
        ("https://*.example.org", "https://upload.example.org", True),
        ("https://*.example.org", "http://upload.example.org", False),
    ],
)
async def test_csrf_trusted_origins_are_admitted_exactly_as_for_csrf(upload_path, settings, trusted, sent, admitted):
    settings.CSRF_TRUSTED_ORIGINS = [trusted]
    connected, _detail = await handshake(upload_path, host(), origin(sent))
    assert connected is admitted


@pytest.mark.parametrize("where", ["/ws/nothing/", "/ws/uploads/", "/ws/uploads/x/y/", "/"])
async def test_an_unknown_websocket_path_is_refused_at_the_handshake(where):
    connected, _code = await handshake(where, host())
    assert connected is False


# --- against Daphne ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "origin") as value:
        yield value


def live_upload_path(server: LiveServer, token: str) -> str:
    answer = http_call(server, "POST", "/api/uploads/", body=b'{"filename": "f.bin", "size": 10}', token=token)
    assert answer.status == 201, answer.body
    return answer.json()["ws_url"]


async def live_handshake(server: LiveServer, path: str, origin_sent: str | None, **headers: str) -> int | str:
    """The handshake's HTTP refusal status, or the first message of an admitted connection."""
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{server.port}{path}",
            origin=origin_sent,
            additional_headers=headers,
            open_timeout=WS_TIMEOUT,
            compression=None,
        ) as ws:
            return await ws.recv()
    except websockets.InvalidStatus as refused:
        return refused.response.status_code


@pytest.mark.slow
async def test_daphne_answers_a_foreign_origin_or_an_unknown_path_with_403_and_no_traceback(backend, tmp_path):
    with LiveServer(tmp_path / "server", database_url=backend.database_url, redis_url=backend.redis_url) as server:
        server.start()
        path = live_upload_path(server, backend.alice_token)
        own = f"http://127.0.0.1:{server.port}"

        assert '"type": "ready"' in await live_handshake(server, path, own)
        assert '"type": "ready"' in await live_handshake(server, path, None)  # a script
        for foreign in [f"http://127.0.0.1:{server.port + 1}", f"https://127.0.0.1:{server.port}"]:
            assert await live_handshake(server, path, foreign) == 403
        # localhost is in ALLOWED_HOSTS, but it is not the host this handshake reached.
        assert await live_handshake(server, path, f"http://localhost:{server.port}") == 403

        for unknown in ["/ws/nothing/", "/ws/uploads/", "/"]:
            assert await live_handshake(server, unknown, None) == 403
        log = server.log_path.read_text()
        assert "Traceback" not in log
        assert "Exception inside application" not in log


@pytest.mark.slow
async def test_daphne_behind_a_tls_proxy_admits_the_https_origin_and_trusted_origins(backend, tmp_path):
    with LiveServer(
        tmp_path / "server",
        database_url=backend.database_url,
        redis_url=backend.redis_url,
        SECURE_PROXY_SSL_HEADER="1",
        CSRF_TRUSTED_ORIGINS="https://app.example",
    ) as server:
        server.start()
        path = live_upload_path(server, backend.alice_token)
        own = f"https://127.0.0.1:{server.port}"

        assert '"type": "ready"' in await live_handshake(server, path, own, **{"X-Forwarded-Proto": "https"})
        assert await live_handshake(server, path, own) == 403  # not through the proxy: a plain ws handshake
        assert '"type": "ready"' in await live_handshake(server, path, "https://app.example")
        assert await live_handshake(server, path, "http://app.example") == 403
