"""A TCP proxy that tests put in front of PostgreSQL, Redis or a server to stall or cut the network on demand.

``TcpProxy(host, port)`` listens on 127.0.0.1 on a free port and forwards every
connection to ``host:port``. It runs its own event loop in a background thread,
so synchronous tests and async tests (whose loop is another one) drive it alike;
each control call returns once the change is in effect:

* ``stall()``: connections stay open but no byte moves in either direction, and
  new connections are accepted and then hang (they reach the target only after
  ``restore()``), like a network that stopped delivering.
* ``stall_after(n)``: forward ``n`` more bytes from clients to the target and
  stall at the next one: a deterministic way to freeze a transfer in its
  middle. ``stall_after(0, inbound=True)`` stalls at the target's first byte
  back: the request arrived, its answer is held (and lost, if a cut follows).
* ``cut()``: every connection is reset (RST, on both sides) and new ones are
  refused (ECONNREFUSED), like a crashed host or a pulled cable.
* ``restore()``: forward again; held bytes and held connections go on.
* ``reset()``: every open connection is reset (RST, on both sides), new ones are
  accepted and forwarded as before: a connection dropped by a middlebox.
* ``retarget(port)``: new connections go to ``port`` (of the same host); open ones
  stay where they are: a load balancer that moved a client to another server.
* ``limit(rate)``: bytes from clients to the target flow at no more than
  ``rate`` bytes a second, over all connections together (``None`` lifts it):
  a slow link.

The port stays reserved while cut (a bound, non-listening socket holds it), so
no other process can take it before ``restore()`` listens on it again.
"""

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CHUNK = 64 * 1024
# A control call that takes longer than this means the proxy's loop is wedged: fail the test, don't hang it.
CONTROL_TIMEOUT = 10


def _socket_on(port: int) -> socket.socket:
    # SO_REUSEADDR on every socket of ours: the holder and a listener may then share
    # the port, while a socket without it (anyone else's bind) is refused.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, port))
    return sock


def _reset(sock: socket.socket | None) -> None:
    """Close with RST instead of FIN: linger on, timeout 0."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Connection:
    """One client connection and its upstream twin, forwarding both ways while the proxy flows."""

    def __init__(self, proxy: "TcpProxy", client: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.reset = False
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self.proxy._flowing.wait()  # a stalled proxy holds new connections here
            self.upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.upstream.setblocking(False)
            await loop.sock_connect(self.upstream, self.proxy.target)
            for sock in (self.client, self.upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with asyncio.TaskGroup() as pumps:
                pumps.create_task(self._pump(self.client, self.upstream, outbound=True))
                pumps.create_task(self._pump(self.upstream, self.client, outbound=False))
        except* OSError as errors:
            # A reset or a refused target on one side: the other side learns it the same way.
            log.debug("proxy %d: connection failed: %r", self.proxy.port, errors.exceptions[0])
            self.reset = True
        finally:
            close = _reset if self.reset else socket.socket.close
            for sock in (self.client, self.upstream):
                if sock is not None:
                    close(sock)

    async def _pump(self, source: socket.socket, sink: socket.socket, *, outbound: bool) -> None:
        loop = asyncio.get_running_loop()
        flowing = self.proxy._flowing
        while True:
            # Not reading while stalled leaves the bytes in the kernel: the sender feels the stall as TCP does.
            await flowing.wait()
            data = await loop.sock_recv(source, CHUNK)
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)  # pass the half-close on; the other direction goes on
                return
            while data:
                await flowing.wait()  # bytes read just before a stall wait for restore()
                piece = self.proxy._take(data, outbound=outbound)
                if piece and outbound and self.proxy._rate:
                    await asyncio.sleep(self.proxy._pace(len(piece)))
                if piece:
                    await loop.sock_sendall(sink, piece)
                    data = data[len(piece) :]


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target_host:target_port``, with faults on demand (see the module)."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._holder = _socket_on(0)
        self.port: int = self._holder.getsockname()[1]
        self.accepted = 0  # connections accepted since the start (held ones included)
        self.forwarded = 0  # bytes forwarded from clients to the target
        self.state = "forwarding"
        self._connections: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._budget: int | None = None  # stall_after(): bytes left to forward before stalling
        self._budget_inbound = False  # whether that budget counts bytes from the target, not to it
        self._rate: int | None = None  # limit(): bytes a second from clients to the target
        self._paced_until = 0.0  # when the bytes sent so far under that limit will have "arrived"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()
        self._call(self._start)

    # --- what tests use -----------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return HOST, self.port

    @property
    def live(self) -> int:
        """Connections open now (forwarding, stalled or held before reaching the target)."""
        return len(self._connections)

    def via(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (user, path and query kept)."""
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@{HOST}:{self.port}" if userinfo else f"{HOST}:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    def stall(self) -> None:
        self._call(self._stall)

    def stall_after(self, nbytes: int, *, inbound: bool = False) -> None:
        """Forward ``nbytes`` more bytes from clients to the target (over all connections; with ``inbound``,
        from the target to clients) and stall when one more comes."""
        self._call(self._stall_after, nbytes, inbound)

    def cut(self) -> None:
        self._call(self._cut)

    def reset(self) -> None:
        self._call(self._reset_connections)

    def limit(self, rate: int | None) -> None:
        self._call(self._limit, rate)

    def retarget(self, port: int) -> None:
        self._call(self._retarget, port)

    def restore(self) -> None:
        self._call(self._restore)

    def close(self) -> None:
        if self.state == "closed":
            return
        self._call(self._cut)
        self.state = "closed"
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)
        self._loop.close()
        self._holder.close()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- inside the proxy's loop ----------------------------------------------------------

    def _call(self, function, *args):
        if self.state == "closed":
            raise RuntimeError("the proxy is closed")
        if threading.current_thread() is self._thread:
            raise RuntimeError("control calls come from outside the proxy's own loop")
        return asyncio.run_coroutine_threadsafe(function(*args), self._loop).result(CONTROL_TIMEOUT)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._listen()

    def _listen(self) -> None:
        if self._listener is not None:
            return
        self._listener = _socket_on(self.port)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self._accepting = self._loop.create_task(self._accept(self._listener))

    async def _accept(self, listener: socket.socket) -> None:
        while True:
            client, _address = await self._loop.sock_accept(listener)
            client.setblocking(False)
            self.accepted += 1
            connection = _Connection(self, client)
            self._connections.add(connection)
            connection.task = self._loop.create_task(connection.run())
            connection.task.add_done_callback(lambda _task, c=connection: self._connections.discard(c))

    def _take(self, data: bytes, *, outbound: bool) -> bytes:
        """What of ``data`` may go out now: all of it, what is left of a stall_after() budget, or nothing."""
        if not self._flowing.is_set():
            return b""  # another pump stalled the proxy since this one woke up
        if self._budget is not None and self._budget_inbound != outbound:
            if self._budget == 0:
                self._stall_now()
                return b""
            data = data[: self._budget]
            self._budget -= len(data)
        if outbound:
            self.forwarded += len(data)
        return data

    def _pace(self, nbytes: int) -> float:
        """Seconds to wait before sending ``nbytes`` under limit(): the link is busy until earlier bytes passed."""
        now = asyncio.get_running_loop().time()
        self._paced_until = max(now, self._paced_until) + nbytes / self._rate
        return max(0.0, self._paced_until - nbytes / self._rate - now)

    async def _retarget(self, port: int) -> None:
        self.target = (self.target[0], port)

    async def _limit(self, rate: int | None) -> None:
        self._rate = rate
        self._paced_until = 0.0

    def _stall_now(self) -> None:
        self._budget = None
        self._flowing.clear()
        self.state = "stalled"
        log.debug("proxy %d: stalled", self.port)

    async def _stall(self) -> None:
        self._listen()
        self._stall_now()

    async def _stall_after(self, nbytes: int, inbound: bool) -> None:
        await self._restore()
        self._budget, self._budget_inbound = max(nbytes, 0), inbound

    async def _cut(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._listener is not None:
            _reset(self._listener)  # connections still in its backlog are reset with it
            self._listener = None
        await self._reset_connections()
        self._budget = None
        self.state = "cut"

    async def _reset_connections(self) -> None:
        connections = list(self._connections)
        for connection in connections:
            connection.reset = True
            connection.task.cancel()
        await asyncio.gather(*(connection.task for connection in connections), return_exceptions=True)
        log.debug("proxy %d: reset %d connections", self.port, len(connections))

    async def _restore(self) -> None:
        self._listen()
        self._budget = None
        self._flowing.set()
        self.state = "forwarding"
        log.debug("proxy %d: forwarding to %s:%d", self.port, *self.target)
