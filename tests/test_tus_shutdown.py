"""A server stopped cleanly (SIGTERM) in the middle of a tus PATCH lets go of the upload before it exits.

Shutdown cancels every application (directdrivex.server.kill_all_applications).
The tus consumer must then stop reading the body, make what arrived durable
and free the slot within its budget, as when its client leaves: otherwise the
slot outlived the process and, after the restart, every HEAD waited out the
lease with 423 (about a minute), and a fast client's PATCH went on being
written during the shutdown.
"""

import json
import socket
import threading
import time

import pytest

from tests.support.live_backend import http_call, live_backend
from tests.support.live_server import LiveServer

MiB = 1024 * 1024
SIZE = 200 * MiB


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "tus-shutdown") as backend:
        yield backend


def slow_patch(port: int, token: str, upload_id: str, sent: list[int]) -> None:
    """A PATCH of SIZE bytes sent at about 8 MiB/s over a raw socket, until the server goes."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            (
                f"PATCH /api/tus/{upload_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n"
                "Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                f"Content-Length: {SIZE}\r\n\r\n"
            ).encode()
        )
        block = b"x" * MiB
        try:
            for _ in range(SIZE // MiB):
                sock.sendall(block)
                sent[0] += len(block)
                time.sleep(0.125)
        except OSError:
            pass  # the server stopped: what it kept is the point of the test


def test_sigterm_mid_patch_keeps_the_bytes_and_frees_the_upload_at_once(backend, tmp_path):
    server = LiveServer(tmp_path, database_url=backend.database_url, redis_url=backend.redis_url)
    token = backend.alice_token
    with server:
        server.start()
        created = http_call(
            server, "POST", "/api/uploads/", token=token, body=json.dumps({"filename": "x.bin", "size": SIZE}).encode()
        )
        upload_id = created.json()["id"]
        sent = [0]
        client = threading.Thread(target=slow_patch, args=(server.port, token, upload_id, sent), daemon=True)
        client.start()
        time.sleep(3)
        stopping = time.monotonic()
        server.stop()
        stopped_in = time.monotonic() - stopping
        sent_at_stop = sent[0]
        client.join(timeout=10)

        server.start()
        asked = time.monotonic()
        answer = http_call(server, "HEAD", f"/api/tus/{upload_id}", token=token, headers={"Tus-Resumable": "1.0.0"})
        answered_in = time.monotonic() - asked
        log = server.log_path.read_text()

    assert answer.status == 200, (answer.status, answer.body)
    assert answered_in < 2, f"HEAD waited {answered_in:.1f} s: the stopped process still held the upload"
    offset = int(answer.headers["Upload-Offset"])
    assert 0 < offset <= sent_at_stop, (offset, sent_at_stop)
    assert offset < SIZE / 2, "the body went on being written during the shutdown"
    assert stopped_in < 9, f"the shutdown took {stopped_in:.1f} s"
    assert "did not end in" not in log
