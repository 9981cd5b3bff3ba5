"""The TCP fault proxy (tests/support/tcp_proxy.py) against an echo server, PostgreSQL and Redis.

"Hangs" is shown the way a client sees it: a short client timeout expires
while stalled, and the same request finishes once the proxy is restored. The
PostgreSQL and Redis tests skip when the service is unreachable, except under
CI=true, where they fail.
"""

import asyncio
import concurrent.futures
import os
import socket
import socketserver
import threading
import time
from urllib.parse import urlsplit

import pytest

from tests.support.live_server import free_port
from tests.support.tcp_proxy import TcpProxy

# Long enough for a forwarded byte on loopback, short enough to keep the suite quick.
HANG = 0.3
TIMEOUT = 10


class EchoServer(socketserver.ThreadingTCPServer):
    """Echoes every byte back until the client half-closes; counts the connections it saw."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.accepted = 0
        self.live = 0
        self.received = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def stop(self):
        self.shutdown()
        self.server_close()


class EchoHandler(socketserver.BaseRequestHandler):
    def handle(self):
        server = self.server
        with server.lock:
            server.accepted += 1
            server.live += 1
        try:
            while data := self.request.recv(65536):
                with server.lock:
                    server.received += len(data)
                self.request.sendall(data)
        except OSError:
            pass  # a reset from the proxy ends the connection like any other end
        finally:
            with server.lock:
                server.live -= 1


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.stop()


@pytest.fixture
def proxy(echo):
    with TcpProxy("127.0.0.1", echo.port) as proxy:
        yield proxy


def wait_until(condition, what: str):
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def connect(proxy: TcpProxy) -> socket.socket:
    sock = socket.create_connection(proxy.address, timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        block = sock.recv(size - len(data))
        if not block:
            break
        data += block
    return data


def nothing_arrives(sock: socket.socket) -> bool:
    sock.settimeout(HANG)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(TIMEOUT)
    return False


# --- against an echo server -------------------------------------------------------------


def test_bytes_pass_both_ways_and_the_connection_is_counted(proxy, echo):
    with connect(proxy) as sock:
        sock.sendall(b"hello through the proxy")
        assert receive_exactly(sock, 23) == b"hello through the proxy"
        assert (proxy.live, proxy.accepted, echo.accepted) == (1, 1, 1)
        assert proxy.forwarded == 23
    wait_until(lambda: proxy.live == 0, "the proxy to drop the closed connection")
    assert proxy.accepted == 1


def test_concurrent_connections_are_forwarded_independently(proxy, echo):
    socks = [connect(proxy) for _ in range(3)]
    payloads = [os.urandom(200_000) for _ in socks]
    for sock, payload in zip(socks, payloads, strict=True):
        sock.sendall(payload)
    for sock, payload in zip(socks, payloads, strict=True):
        assert receive_exactly(sock, len(payload)) == payload
    assert (proxy.live, echo.accepted) == (3, 3)
    for sock in socks:
        sock.close()


def test_a_half_close_reaches_the_target_and_the_answer_still_comes_back(proxy, echo):
    with connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert receive_exactly(sock, 64) == b"last words"  # then EOF: the echo server saw ours and closed
    wait_until(lambda: echo.live == 0 and proxy.live == 0, "both ends to close")


def test_stalled_proxy_holds_bytes_in_both_directions_until_restored_and_loses_none(proxy):
    with connect(proxy) as sock:
        sock.sendall(b"before")
        assert receive_exactly(sock, 6) == b"before"

        proxy.stall()
        sock.sendall(b"during the stall")
        assert nothing_arrives(sock)
        assert proxy.live == 1  # stalled, not closed

        proxy.restore()
        assert receive_exactly(sock, 16) == b"during the stall"


def test_stall_holds_the_targets_answers_too(proxy, echo):
    # The echo server answers the byte it got before the stall: the answer waits in the proxy.
    with connect(proxy) as sock:
        sock.sendall(b"x")
        assert receive_exactly(sock, 1) == b"x"
        proxy.stall_after(1)
        sock.sendall(b"yz")
        wait_until(lambda: proxy.state == "stalled", "the budget to run out")
        assert nothing_arrives(sock)
        proxy.restore()
        assert receive_exactly(sock, 2) == b"yz"


def test_stalled_proxy_accepts_new_connections_but_keeps_them_from_the_target(proxy, echo):
    proxy.stall()
    with connect(proxy) as sock:  # the handshake with the proxy succeeds...
        sock.sendall(b"anyone there?")
        assert nothing_arrives(sock)
        assert (proxy.accepted, proxy.live) == (1, 1)
        assert echo.accepted == 0  # ...but the target has not seen it

        proxy.restore()
        assert receive_exactly(sock, 13) == b"anyone there?"
        assert echo.accepted == 1


def test_stall_after_forwards_exactly_that_many_bytes_then_stalls_both_ways(proxy, echo):
    proxy.stall_after(4)
    with connect(proxy) as sock:
        sock.sendall(b"0123456789")
        wait_until(lambda: proxy.state == "stalled", "the fifth byte")
        wait_until(lambda: echo.received == 4, "the first 4 bytes at the target")
        assert proxy.forwarded == 4
        assert nothing_arrives(sock)  # the echo of those 4 is held too

        proxy.restore()
        assert receive_exactly(sock, 10) == b"0123456789"
        assert (proxy.forwarded, echo.received) == (10, 10)


def test_inbound_stall_after_lets_the_request_through_and_holds_the_answer(proxy, echo):
    proxy.stall_after(0, inbound=True)
    with connect(proxy) as sock:
        sock.sendall(b"request")
        wait_until(lambda: proxy.state == "stalled", "the first byte of the answer")
        assert echo.received == 7
        assert nothing_arrives(sock)

        proxy.restore()
        assert receive_exactly(sock, 7) == b"request"


def test_cut_resets_open_connections_on_both_sides(proxy, echo):
    with connect(proxy) as sock:
        sock.sendall(b"ping")
        assert receive_exactly(sock, 4) == b"ping"

        proxy.cut()

        assert proxy.live == 0
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    wait_until(lambda: echo.live == 0, "the echo server to lose its connection")


def test_cut_proxy_refuses_new_connections_until_restored_on_the_same_port(proxy):
    port = proxy.port
    proxy.cut()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=TIMEOUT)

    proxy.restore()

    assert proxy.port == port
    with connect(proxy) as sock:
        sock.sendall(b"back")
        assert receive_exactly(sock, 4) == b"back"


def test_cut_resets_connections_held_by_a_stall(proxy, echo):
    proxy.stall()
    with connect(proxy) as sock:
        wait_until(lambda: proxy.live == 1, "the proxy to hold the connection")
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
    assert echo.accepted == 0


def test_cut_port_cannot_be_taken_by_another_socket(proxy):
    proxy.cut()
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(proxy.address)


def test_unreachable_target_resets_the_client():
    with TcpProxy("127.0.0.1", free_port()) as proxy, connect(proxy) as sock:
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        wait_until(lambda: proxy.live == 0, "the proxy to drop the connection")


def test_closed_proxy_refuses_connections_and_control_calls(echo):
    with TcpProxy("127.0.0.1", echo.port) as proxy:
        address = proxy.address
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=TIMEOUT)
    with pytest.raises(RuntimeError):
        proxy.stall()
    proxy.close()  # closing twice is harmless


async def test_async_clients_use_the_proxy_from_their_own_event_loop(proxy):
    reader, writer = await asyncio.open_connection(*proxy.address)
    try:
        writer.write(b"async")
        assert await reader.readexactly(5) == b"async"

        proxy.stall()
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), HANG)

        proxy.restore()
        assert await asyncio.wait_for(reader.readexactly(4), TIMEOUT) == b"held"
    finally:
        writer.close()


def test_via_points_a_url_at_the_proxy(proxy):
    assert proxy.via("postgres://postgres@127.0.0.1:5432/ddx") == f"postgres://postgres@127.0.0.1:{proxy.port}/ddx"
    assert proxy.via("redis://127.0.0.1:6379/10") == f"redis://127.0.0.1:{proxy.port}/10"


# --- against the real services ----------------------------------------------------------------


def service_address(variable: str, default: str) -> tuple[str, int, str]:
    """host, port and path of the service the suite uses (its URL variable), or the local default."""
    url = os.environ.get(variable, "")
    if not url.startswith(("postgres", "redis")):
        url = default
    parts = urlsplit(url)
    return parts.hostname, parts.port, parts.path.lstrip("/")


def require(name: str, host: str, port: int) -> None:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as error:
        reason = f"{name} at {host}:{port} is unreachable ({error})"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run every test")
        pytest.skip(reason)


@pytest.fixture
def postgres_proxy():
    host, port, _database = service_address("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    require("PostgreSQL", host, port)
    with TcpProxy(host, port) as proxy:
        yield proxy


def postgres_through(proxy: TcpProxy):
    import psycopg

    # The maintenance database always exists; these tests only run SELECTs.
    return psycopg.connect(
        host=proxy.address[0], port=proxy.port, user="postgres", dbname="postgres", connect_timeout=5, autocommit=True
    )


def query(connection, sql: str = "SELECT 1"):
    return connection.execute(sql).fetchone()[0]


def query_in_flight(in_thread, connection, sql: str = "SELECT 1"):
    """Start ``sql`` in a thread and return once psycopg has sent it (the server's answer is awaited)."""
    from psycopg.pq import TransactionStatus

    pending = in_thread(query, connection, sql)
    wait_until(lambda: connection.info.transaction_status == TransactionStatus.ACTIVE, "the query to be sent")
    return pending


@pytest.fixture
def in_thread():
    """Run a blocking call in a thread; the test then checks whether it finished (it may hang on purpose)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        yield pool.submit


def test_postgres_query_works_through_the_proxy_hangs_while_stalled_and_finishes_on_restore(postgres_proxy, in_thread):
    with postgres_through(postgres_proxy) as connection:
        assert query(connection, "SELECT 41 + 1") == 42
        assert postgres_proxy.live == 1

        postgres_proxy.stall()
        pending = query_in_flight(in_thread, connection, "SELECT 'held'")
        with pytest.raises(concurrent.futures.TimeoutError):
            pending.result(HANG)

        postgres_proxy.restore()
        assert pending.result(TIMEOUT) == "held"
        assert query(connection) == 1


def test_postgres_query_fails_when_cut_and_a_new_connection_works_after_restore(postgres_proxy, in_thread):
    import psycopg

    with postgres_through(postgres_proxy) as connection:
        assert query(connection) == 1
        postgres_proxy.stall()
        pending = query_in_flight(in_thread, connection)
        with pytest.raises(concurrent.futures.TimeoutError):
            pending.result(HANG)

        postgres_proxy.cut()

        with pytest.raises(psycopg.OperationalError):
            pending.result(TIMEOUT)
        assert connection.closed or connection.broken
        with pytest.raises(psycopg.OperationalError):
            postgres_through(postgres_proxy)  # refused

    postgres_proxy.restore()
    with postgres_through(postgres_proxy) as connection:
        assert query(connection) == 1


def test_postgres_connection_attempt_hangs_while_stalled_and_completes_on_restore(postgres_proxy, in_thread):
    postgres_proxy.stall()
    pending = in_thread(postgres_through, postgres_proxy)
    with pytest.raises(concurrent.futures.TimeoutError):
        pending.result(HANG)

    postgres_proxy.restore()
    with pending.result(TIMEOUT) as connection:
        assert query(connection) == 1


@pytest.fixture
def redis_proxy():
    host, port, _database = service_address("REDIS_URL", "redis://127.0.0.1:6379/10")
    require("Redis", host, port)
    with TcpProxy(host, port) as proxy:
        yield proxy


def redis_through(proxy: TcpProxy):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    _host, _port, database = service_address("REDIS_URL", "redis://127.0.0.1:6379/10")
    # No retries inside redis-py: each call shows what the network did to that one attempt.
    return redis.Redis(
        host=proxy.address[0],
        port=proxy.port,
        db=int(database or 0),
        socket_timeout=HANG,
        socket_connect_timeout=TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )


def test_redis_commands_work_through_the_proxy_time_out_while_stalled_and_work_after_restore(redis_proxy):
    import redis

    client = redis_through(redis_proxy)
    try:
        assert client.ping() is True
        assert client.echo("through the proxy") == b"through the proxy"

        redis_proxy.stall()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()

        redis_proxy.restore()
        assert client.ping() is True  # redis-py dropped the timed-out connection and opens a new one
    finally:
        client.close()


def test_redis_fails_when_cut_and_reconnects_after_restore(redis_proxy):
    import redis

    client = redis_through(redis_proxy)
    try:
        assert client.ping() is True
        assert redis_proxy.live == 1

        redis_proxy.cut()
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()  # the reset connection, then a refused reconnect
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()

        redis_proxy.restore()
        assert client.ping() is True
    finally:
        client.close()
