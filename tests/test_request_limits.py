"""HTTP request bodies are bounded at the transport (DIRECTDRIVEX_MAX_REQUEST_BYTES, directdrivex/server.py).

Against real servers: a Content-Length over the limit is answered 413 before
any body byte is read, a chunked body as soon as it passes the limit, the
connection is closed, and a client that sends 512 MiB anyway does not grow
the server. Bodies within the limit reach the application, and Django's own
limit follows a raised transport limit.
"""

import http.client
import json
import socket
import threading

import pytest

from tests.support.live_backend import http_call, live_backend
from tests.support.live_server import LiveServer

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
LIMIT = 1 * MiB  # the default
HUGE = 512 * MiB
RSS_GROWTH_LIMIT = 32 * MiB
SOCKET_TIMEOUT = 60


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "limits") as value:
        yield value


@pytest.fixture(scope="module")
def server(backend, tmp_path_factory):
    with LiveServer(
        tmp_path_factory.mktemp("limits"), database_url=backend.database_url, redis_url=backend.redis_url
    ) as running:
        running.start()
        yield running


def open_request(server: LiveServer, head: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=SOCKET_TIMEOUT)
    sock.sendall(head.encode() + b"\r\n")
    return sock


def post_head(length_header: str, *extra: str) -> str:
    lines = ["POST /api/uploads/ HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", length_header, *extra]
    return "\r\n".join(lines) + "\r\n"


def read_answer(sock: socket.socket) -> tuple[int, dict, bool]:
    """The answer's status and JSON body, and whether the server then closed the connection."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = json.loads(response.read())
    try:
        closed = sock.recv(1) == b""
    except ConnectionResetError:
        closed = True
    return response.status, body, closed


def send_all_while_reading_the_answer(sock: socket.socket, block: bytes, count: int) -> tuple[int, dict, bool]:
    """Send ``block`` ``count`` times whatever the server says, as a hostile client would, while another
    thread reads the answer; stops sending only if the server cuts the connection."""
    outcome = {}

    def read():
        try:
            outcome["answer"] = read_answer(sock)
        except OSError as error:
            outcome["error"] = error

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(count):
            sock.sendall(block)
    except (BrokenPipeError, ConnectionResetError):
        pass
    reader.join(SOCKET_TIMEOUT)
    assert "answer" in outcome, outcome
    return outcome["answer"]


def assert_too_large(status: int, body: dict) -> None:
    assert status == 413
    assert body["code"] == "request_too_large"
    assert str(LIMIT) in body["detail"]


def assert_server_answers(server: LiveServer) -> None:
    answer = http_call(server, "GET", "/api/uploads/")
    assert (answer.status, answer.json()["code"]) == (401, "unauthenticated")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_512_mib_anonymous_post_is_refused_413_and_the_server_does_not_grow(server, chunked):
    block = b"x" * MiB
    if chunked:
        head = post_head("Transfer-Encoding: chunked")
        block = b"%x\r\n" % len(block) + block + b"\r\n"
    else:
        head = post_head(f"Content-Length: {HUGE}")
    before = server.rss()["VmHWM"]

    with open_request(server, head) as sock:
        status, body, closed = send_all_while_reading_the_answer(sock, block, HUGE // MiB)

    assert_too_large(status, body)
    assert closed
    assert server.rss()["VmHWM"] - before <= RSS_GROWTH_LIMIT
    assert_server_answers(server)


def test_a_client_that_sends_its_whole_body_before_reading_still_gets_the_413(server):
    # The refused body is read and dropped for a while, so the answer is not lost to a reset.
    size = 64 * MiB
    with open_request(server, post_head(f"Content-Length: {size}")) as sock:
        block = b"x" * MiB
        for _ in range(size // MiB):
            sock.sendall(block)
        status, body, closed = read_answer(sock)
    assert_too_large(status, body)
    assert closed
    assert_server_answers(server)


def test_a_content_length_over_the_limit_is_refused_before_any_body_byte_is_sent(server):
    with open_request(server, post_head(f"Content-Length: {LIMIT + 1}")) as sock:
        status, body, closed = read_answer(sock)
    assert_too_large(status, body)
    assert closed


def test_a_client_expecting_100_continue_gets_the_413_instead(server):
    with open_request(server, post_head(f"Content-Length: {HUGE}", "Expect: 100-continue")) as sock:
        status, body, closed = read_answer(sock)  # the first status line is the refusal, not "100 Continue"
    assert_too_large(status, body)
    assert closed


def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit(server):
    with open_request(server, post_head("Transfer-Encoding: chunked")) as sock:
        first, second = b"x" * LIMIT, b"y"
        sock.sendall(b"%x\r\n%s\r\n%x\r\n%s\r\n" % (len(first), first, len(second), second))
        # Nothing more is sent: the answer must come without the body's end.
        status, body, closed = read_answer(sock)
    assert_too_large(status, body)
    assert closed


def test_a_body_of_exactly_the_limit_reaches_the_api(server, backend):
    # JSON of exactly LIMIT bytes whose filename is too long: the view's own refusal proves it saw the body.
    skeleton = '{"filename": "%s", "size": 1}'
    body = (skeleton % ("a" * (LIMIT - len(skeleton % "")))).encode()
    assert len(body) == LIMIT
    answer = http_call(server, "POST", "/api/uploads/", body=body, token=backend.alice_token)
    assert answer.status == 400, answer.body[:300]
    assert answer.json()["code"] == "invalid"
    assert "filename" in answer.json()["errors"]


def test_a_raised_limit_raises_djangos_own_limit_with_it(backend, tmp_path):
    raised = 4 * MiB
    with LiveServer(
        tmp_path / "raised",
        database_url=backend.database_url,
        redis_url=backend.redis_url,
        DIRECTDRIVEX_MAX_REQUEST_BYTES=raised,
    ) as server:
        server.start()
        # 3 MiB: above Django's default DATA_UPLOAD_MAX_MEMORY_SIZE (2.5 MiB), within the raised limit.
        body = json.dumps({"filename": "a" * (3 * MiB), "size": 1}).encode()
        answer = http_call(server, "POST", "/api/uploads/", body=body, token=backend.alice_token)
        assert (answer.status, answer.json()["code"]) == (400, "invalid")
        assert "filename" in answer.json()["errors"]

        over = json.dumps({"filename": "a" * raised, "size": 1}).encode()
        answer = http_call(server, "POST", "/api/uploads/", body=over, token=backend.alice_token)
        assert (answer.status, answer.json()["code"]) == (413, "request_too_large")
