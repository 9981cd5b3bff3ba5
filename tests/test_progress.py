"""Live progress for pages (/ws/progress/): the owner's pages hear offsets and status changes, nobody else."""

import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator, WebsocketCommunicator
from rest_framework.authtoken.models import Token

from directdrivex.routing import application
from tests.conftest import CONNECT_SECONDS
from tests.test_consumer import (  # noqa: F401 - autouse fixtures of the consumer tests apply here too
    CHUNK,
    OPENED,
    connect_ticket,
    create,
    disconnect_everything,
    finish,
    payload,
    send_range,
    session_cookie,
    small_frames,
)
from uploads.services.uploads import upload_delete

pytestmark = pytest.mark.django_db(transaction=True)


async def page(user) -> WebsocketCommunicator:
    """A signed-in page listening for progress, as a browser on the server's own origin opens it."""
    cookie = await database_sync_to_async(session_cookie)(user)
    headers = [(b"host", b"testserver"), (b"origin", b"http://testserver"), (b"cookie", cookie)]
    communicator = WebsocketCommunicator(application, "/ws/progress/", headers=headers)
    OPENED.append(communicator)
    connected, _subprotocol = await communicator.connect(timeout=CONNECT_SECONDS)
    assert connected
    assert await communicator.receive_nothing(0.2), "a signed-in page is not refused"
    return communicator


async def events_until(communicator, status: str) -> list[dict]:
    events = []
    while not events or events[-1]["status"] != status:
        events.append(json.loads(await communicator.receive_from(timeout=5)))
    return events


async def test_the_owners_page_hears_the_durable_offset_and_the_completion(alice):
    listening = await page(alice)
    data = payload(9 * CHUNK)
    upload = await create(alice, data)
    writer, _ready = await connect_ticket(upload)
    await send_range(writer, data, 0, len(data), 0)
    assert (await finish(writer))["type"] == "complete"

    events = await events_until(listening, "complete")
    assert all(event["type"] == "progress" and event["id"] == str(upload.pk) for event in events), events
    assert events[-1] == {"type": "progress", "id": str(upload.pk), "offset": len(data), "size": len(data),
                          "status": "complete"}  # fmt: skip
    offsets = [event["offset"] for event in events]
    assert offsets == sorted(offsets)


async def test_another_users_page_hears_nothing(alice, bob):
    bobs_page = await page(bob)
    data = payload(3 * CHUNK)
    upload = await create(alice, data)
    writer, _ready = await connect_ticket(upload)
    await send_range(writer, data, 0, len(data), 0)
    assert (await finish(writer))["type"] == "complete"

    assert await bobs_page.receive_nothing(0.5)


async def test_a_cancel_elsewhere_reaches_the_page(alice):
    listening = await page(alice)
    upload = await create(alice, payload(3 * CHUNK))
    await database_sync_to_async(upload_delete)(alice, upload.pk)

    [event] = await events_until(listening, "cancelled")
    assert (event["id"], event["status"]) == (str(upload.pk), "cancelled")


async def test_without_a_session_the_page_socket_is_refused_with_4401(alice):
    communicator = WebsocketCommunicator(application, "/ws/progress/")
    OPENED.append(communicator)
    assert (await communicator.connect(timeout=CONNECT_SECONDS))[0]
    error = json.loads(await communicator.receive_from(timeout=5))
    assert (error["type"], error["code"]) == ("error", "unauthenticated")
    assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


# --- across processes (the Redis layer) --------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    from tests.support.live_backend import live_backend

    with live_backend(tmp_path_factory, "progress") as backend:
        yield backend


def session_key_for(server, username: str) -> str:
    code = (
        "from django.contrib.auth import get_user_model;"
        "from django.contrib.sessions.backends.db import SessionStore;"
        f"u=get_user_model().objects.get(username={username!r});"
        "s=SessionStore();"
        "s['_auth_user_id']=str(u.pk);"
        "s['_auth_user_backend']='django.contrib.auth.backends.ModelBackend';"
        "s['_auth_user_hash']=u.get_session_auth_hash();"
        "s.create();"
        "print('SESSION', s.session_key)"
    )
    out = server.manage("shell", "-c", code)
    return next(line.split()[1] for line in out.splitlines() if line.startswith("SESSION "))


@pytest.mark.slow
async def test_a_page_on_one_process_hears_an_upload_written_by_another(backend, tmp_path):
    if not backend.redis_url:
        pytest.skip("the in-memory channel layer reaches one process only (the PostgreSQL + Redis stage runs this)")
    import hashlib
    import os

    import websockets

    from tests.support.live_server import LiveServer
    from tests.test_live_server import create_upload, receive, stream, ws_connect

    shared = {"database_url": backend.database_url, "redis_url": backend.redis_url}
    writer_side = LiveServer(tmp_path / "a", **shared)
    page_side = LiveServer(tmp_path / "b", storage_dir=writer_side.storage, **shared)
    with writer_side, page_side:
        writer_side.start()
        page_side.start()
        cookie = f"sessionid={session_key_for(page_side, 'alice')}"
        async with websockets.connect(
            f"ws://127.0.0.1:{page_side.port}/ws/progress/",
            origin=f"http://127.0.0.1:{page_side.port}",
            additional_headers={"Cookie": cookie},
        ) as listening:
            data = os.urandom(8 * 1024 * 1024)
            upload = create_upload(writer_side, backend.alice_token, "elsewhere.bin", data)
            async with ws_connect(writer_side, upload["ws_url"]) as ws:
                ready = await receive(ws)
                complete = await stream(ws, data, 0, chunk=ready["chunk_size"], window=ready["window"])
            events = []
            while not events or events[-1]["status"] != "complete":
                events.append(await receive(listening))
    assert (events[-1]["id"], events[-1]["offset"]) == (upload["id"], len(data))
    assert complete["sha256"] == hashlib.sha256(data).hexdigest()


async def tus_patch(user, upload, pieces: list[bytes], offset: int = 0) -> dict:
    """A tus PATCH through the ASGI application, its body in ``pieces`` as the server hands it over."""
    token = await database_sync_to_async(lambda: Token.objects.get_or_create(user=user)[0].key)()
    headers = [
        (b"host", b"testserver"),
        (b"authorization", f"Token {token}".encode()),
        (b"tus-resumable", b"1.0.0"),
        (b"upload-offset", str(offset).encode()),
        (b"content-type", b"application/offset+octet-stream"),
        (b"content-length", str(sum(map(len, pieces))).encode()),
    ]
    scope = {
        "type": "http", "method": "PATCH", "path": f"/api/tus/{upload.pk}", "query_string": b"", "headers": headers,
        "scheme": "http", "server": ("testserver", 80), "client": ("127.0.0.1", 5000),
    }  # fmt: skip
    request = ApplicationCommunicator(application, scope)
    for index, piece in enumerate(pieces):
        await request.send_input({"type": "http.request", "body": piece, "more_body": index < len(pieces) - 1})
    start = await request.receive_output(timeout=10)
    await request.receive_output(timeout=5)  # the (empty) body
    return {name.decode(): value.decode() for name, value in start["headers"]} | {"status": start["status"]}


async def test_a_page_hears_an_upload_written_over_tus_as_over_websocket(alice):
    """Live progress is the writer's, whatever the transport: the same events for a tus PATCH."""
    listening = await page(alice)
    data = payload(9 * CHUNK)
    upload = await create(alice, data)
    answer = await tus_patch(alice, upload, [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)])
    assert (answer["status"], answer["upload-offset"]) == (204, str(len(data)))

    events = await events_until(listening, "complete")
    assert events[-1] == {"type": "progress", "id": str(upload.pk), "offset": len(data), "size": len(data),
                          "status": "complete"}  # fmt: skip
