"""Daphne, as DirectDriveX runs it: WebSocket size limits that fit the chunk size, transport backpressure,
and HTTP request bodies bounded at the transport.

Daphne queues every received frame for the application without bound, so a
client that ignores the credit window could grow the process by as much as it
sends before the consumer refuses it. ``BackpressureServer`` gives each
WebSocket connection a queue that stops reading the connection's socket while
its unprocessed frames cost more than one window, and reads again below half.
A frame costs its bytes plus FRAME_COST, what a queued message costs the
process whatever it carries, so a flood of empty or one-byte frames is held
back as surely as a flood of full ones.

Daphne also reads a whole HTTP request body before the application sees any
of it, and then queues all of it in memory. ``BoundedRequest`` holds every body
to ``DIRECTDRIVEX_MAX_REQUEST_BYTES`` while it arrives: a larger Content-Length
is answered ``413 request_too_large`` before a byte of the body is read, a
chunked body as soon as it passes the limit; the rest is discarded unstored.

The tus paths (``streams_request_body``) are the exception: their bodies are
files. ``BoundedRequest`` starts the application as soon as such a request's
headers are in and hands it each piece of the body as an ``http.request``
message the moment it arrives, through a ``TransportBackpressureQueue`` that
stops reading the socket while the application is about a window behind, the
same push-back as for WebSocket frames. A client that leaves mid-body is an
``http.disconnect``; a response sent before the body ended closes the
connection once the client had time to read it (``LINGER_SECONDS``). What one
read brings is one message, however many chunks of a chunked body it holds,
and reads shrink while chunks are tiny, so that a flood of one-byte chunks
neither costs a message per byte nor holds the event loop (``gather``).

Daphne writes every ``http.response.body`` message into the socket's
user-space buffer at once, without bound, so a download to a slow reader would
hold the whole file in memory. ``BackpressureRequest`` registers a push
producer on each HTTP response, which Twisted pauses while the transport's
write buffer is over its bufferSize (64 KiB) and resumes once it drained;
``BackpressureServer.handle_reply`` makes the application's ``send`` wait for
that, so a response holds at most about one message in memory. A client that
reads nothing for DIRECTDRIVEX_IDLE_SECONDS is disconnected.
"""

import asyncio
import ctypes
import ctypes.util
import json
import logging
import os
import sys
from functools import partial

# Daphne runs behind a TLS-terminating proxy (docs/deployment.md), never with
# its own ssl: endpoints, so Twisted need not load pyOpenSSL: 5 MiB less RSS
# per process. Must happen before Twisted is imported.
sys.modules.setdefault("OpenSSL", None)

from daphne.cli import CommandLineInterface  # noqa: E402
from daphne.http_protocol import HTTPFactory, WebRequest  # noqa: E402
from daphne.server import Server  # noqa: E402
from daphne.ws_protocol import WebSocketProtocol  # noqa: E402
from django.conf import settings  # noqa: E402
from twisted.internet import defer  # noqa: E402
from twisted.internet.interfaces import IPushProducer  # noqa: E402
from zope.interface import implementer  # noqa: E402

from uploads import budgets  # noqa: E402
from uploads.exceptions import RequestTooLarge  # noqa: E402
from uploads.logs import mask_share_tokens  # noqa: E402

log = logging.getLogger(__name__)

WEBSOCKET_READ_BYTES = 256 * 1024
# The same for a streamed (tus) request body: fewer, larger http.request messages.
STREAM_READ_BYTES = 256 * 1024
# A streamed body's reads while its chunks are tiny: Twisted de-chunks a whole read
# in one go, in Python, so 256 KiB of one-byte chunks (43,690 of them) would hold
# the event loop, and every other client of the process, for a quarter second per read.
CHUNKY_READ_BYTES = 16 * 1024
# More chunks than this in one read make the next reads CHUNKY_READ_BYTES.
CHUNKY_READ_PIECES = 64
# What one queued WebSocket message costs the process besides its payload: the
# message dict, the bytes object's header, the queue's slot, with the
# allocator's rounding (measured near 300 bytes; counted generously).
FRAME_COST = 1024
# Request line plus headers, and any one header line. Twisted's 16 KiB (HTTPChannel.totalHeadersSize,
# LineReceiver.MAX_LENGTH) answers a bare 400, or nothing, before the application sees the request: a
# filename of the documented 1-16,384 characters is up to 64 KiB of UTF-8, 87,384 base64 characters in
# tus's Upload-Metadata (tests/faults/test_filename_attacks.py found it). Parsed per connection, once.
MAX_HEADER_BYTES = 128 * 1024


def max_message_size() -> int:
    """Daphne's message and frame limit: twice the chunk size, so an oversize frame
    reaches the consumer (and gets a clean 4400) instead of a TCP reset."""
    return 2 * settings.DIRECTDRIVEX_CHUNK_SIZE


def daphne_arguments(*, bind: str, port: int | None, fd: int | None = None) -> list[str]:
    limit = str(max_message_size())
    where = ["--fd", str(fd)] if fd is not None else ["-b", bind, "-p", str(port)]
    return [
        *where,
        "--websocket-max-message-size", limit,
        "--websocket-max-frame-size", limit,
        # Uploads of tens of GB may take longer than Daphne's default 24 h per connection.
        "--websocket_timeout", "-1",
        # Daphne's defaults, stated: the budgets of uploads.budgets are derived from them.
        "--application-close-timeout", str(budgets.APPLICATION_CLOSE_TIMEOUT),
        "--websocket_connect_timeout", str(budgets.HANDSHAKE_SECONDS),
        "directdrivex.asgi:application",
    ]  # fmt: skip


def _message_cost(message: dict) -> int:
    # websocket.receive carries "bytes" or "text"; http.request (a streamed tus body) "body".
    payload = message.get("bytes") or message.get("text") or message.get("body") or b""
    return len(payload) + FRAME_COST


class TransportBackpressureQueue(asyncio.Queue):
    """An application input queue that pauses the socket while its messages cost too much (see FRAME_COST).

    ``transport`` is what reads the socket: a WebSocket's, or the HTTP
    channel's while a tus body streams (Twisted's HTTPChannel resumes its
    transport only when a response drains or a request is done, neither of
    which happens while a body is still arriving).
    """

    def __init__(self, transport, high_water: int):
        super().__init__()
        self.transport = transport
        self.high_water = high_water
        self.low_water = high_water // 2
        self.queued_bytes = 0
        self.paused = False

    def _put(self, item):
        super()._put(item)
        self.queued_bytes += _message_cost(item)
        if not self.paused and self.queued_bytes > self.high_water:
            self.paused = True
            self.transport.pauseProducing()

    def _get(self):
        item = super()._get()
        self.queued_bytes -= _message_cost(item)
        if self.paused and self.queued_bytes <= self.low_water:
            self.paused = False
            self.transport.resumeProducing()
        return item


# After a 413, how long the rest of a refused body is read and dropped before the
# connection is cut. Closing a socket with unread data makes the kernel send a
# reset, which can destroy the 413 before a client that is still sending reads
# it; reading on (and discarding, so memory stays flat) lets it arrive first.
LINGER_SECONDS = 5


# Where tus bodies stream (uploads.transports.tus): the creation POST and the PATCHes.
TUS_PREFIX = b"/api/tus/"
STREAMED_METHODS = frozenset({b"POST", b"PATCH"})


def streams_request_body(method: bytes, path: bytes) -> bool:
    """Whether a request's body streams to the application as it arrives, unbounded (``path`` without its query).

    Only tus bodies do: they are the file. Every other body is held to
    DIRECTDRIVEX_MAX_REQUEST_BYTES and handed over whole, as Daphne does.
    """
    return method in STREAMED_METHODS and path.startswith(TUS_PREFIX)


class _StreamedContent:
    """What Daphne's ``process()`` finds as the request's stored body when the body streams instead.

    ``process()`` rewinds the stored body, starts the application, and stops
    there when the body is closed: so nothing is read from here, and each
    piece of the body goes to the application from handleContentChunk.
    """

    closed = True

    def seek(self, *_args) -> int:
        return 0

    def read(self, *_args) -> bytes:
        return b""

    def close(self) -> None:
        pass


def _refusal_bytes(limit: int) -> bytes:
    refusal = RequestTooLarge(f"The request body is larger than {limit} bytes, the most this server accepts.")
    body = json.dumps(refusal.as_dict()).encode()
    head = (
        b"HTTP/1.1 413 Content Too Large\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close\r\n\r\n"
    ) % len(body)
    return head + body


class BoundedRequest(WebRequest):
    """Daphne's HTTP request with its body held to DIRECTDRIVEX_MAX_REQUEST_BYTES while it arrives.

    Twisted calls ``gotLength`` once the headers are in and before any body
    byte is read, then ``handleContentChunk`` for each piece of the body (after
    de-chunking), then ``requestReceived`` once the body is complete, which is
    when Daphne starts the application. A refused request never gets that far.
    """

    body_limit: int | None = None
    body_received = 0
    refused = False
    # The body goes to the application piece by piece (a tus upload), not whole.
    streaming = False
    body_complete = False
    _linger = None
    # The pieces of the current read of a streamed body, handed over as one message once the read is done.
    _gathered: list[bytes] | None = None
    _gathered_bytes = 0

    def gotLength(self, length):
        # Twisted gives the request its method and path only once the body is in;
        # the channel has parsed the request line already.
        method, target = self.channel._command, self.channel._path
        if streams_request_body(method, target.split(b"?", 1)[0]):
            self.start_streaming(method, target, self.channel._version)
            return
        self.body_limit = settings.DIRECTDRIVEX_MAX_REQUEST_BYTES
        if length is not None and length > self.body_limit:
            # No "100 Continue" for a body we will not read (Twisted sends it after gotLength).
            self.requestHeaders.removeHeader(b"Expect")
            self.refuse_too_large(f"Content-Length {length}")
            return
        super().gotLength(length)

    def start_streaming(self, method: bytes, target: bytes, version: bytes) -> None:
        """Start the application now, with the headers: the body follows as it arrives.

        What requestReceived would set once the body is in is set here, so
        that Daphne's process() builds the scope and a response can be written
        before the body ends (a refusal, or a client that lied about its length).
        """
        self.streaming = True
        self.method, self.uri, self.clientproto = method, target, version
        self.path = target.split(b"?", 1)[0]
        self.content = _StreamedContent()
        self.channel.transport.bufferSize = STREAM_READ_BYTES
        self.process()

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.body_received += len(data)
        if self.streaming:
            self.gather(data)
            return
        if self.body_limit is not None and self.body_received > self.body_limit:
            self.refuse_too_large(f"more than {self.body_limit} bytes of a chunked body")
            return
        super().handleContentChunk(data)

    def gather(self, data: bytes) -> None:
        """Add a piece of a streamed body to this read's message (one per read, not one per chunk).

        A chunked body hands over each chunk on its own: one message per
        one-byte chunk would cost the process a dict and a queue slot per byte
        and the event loop a turn of the consumer per byte.
        """
        if self.application_queue is None or self.finished:
            return
        if self._gathered is None:
            self._gathered, self._gathered_bytes = [], 0
            self.channel.callLater(0, self.hand_over_gathered)  # once Twisted is done with this read
        self._gathered.append(data)
        self._gathered_bytes += len(data)
        if self._gathered_bytes >= STREAM_READ_BYTES:
            self._put_body(b"".join(self._gathered))
            self._gathered.clear()
            self._gathered_bytes = 0

    def hand_over_gathered(self) -> None:
        """Queue what the last read brought (a single piece as it is), and size the next reads by how chunky it was."""
        gathered, self._gathered = self._gathered, None
        if gathered is None:
            return
        if self.channel is not None and self.channel.transport is not None:
            chunky = len(gathered) > CHUNKY_READ_PIECES
            self.channel.transport.bufferSize = CHUNKY_READ_BYTES if chunky else STREAM_READ_BYTES
        if gathered:
            self._put_body(b"".join(gathered))

    def _put_body(self, body: bytes) -> None:
        if self.application_queue is not None and not self.finished:
            self.application_queue.put_nowait({"type": "http.request", "body": body, "more_body": True})

    def requestReceived(self, command, path, version):
        if self.refused:
            return  # answered with 413 already: the application never sees this request
        if self.streaming:
            # The application started with the headers; this is the end of the body.
            self.hand_over_gathered()
            self.body_complete = True
            if self.application_queue is not None and not self.finished:
                self.application_queue.put_nowait({"type": "http.request", "body": b"", "more_body": False})
            return
        super().requestReceived(command, path, version)

    def finish(self):
        if self.streaming and not self.body_complete and not self._disconnected and self.channel is not None:
            # Answered before the body ended (a refusal, or the upload's end):
            # the rest of the body is read and dropped, not parsed as a next request.
            channel = self.channel
            channel.persistent = True  # requestDone must not close the socket under the unread body
            super().finish()
            self.linger_and_close(channel)
            return
        super().finish()

    def refuse_too_large(self, what: str) -> None:
        """Answer 413 at once, then drop whatever else the client sends until it goes or the linger ends."""
        self.refused = True
        channel = self.channel
        client = channel.transport.getPeer()
        log.info(
            "refused HTTP request body: %s, over the limit of %d bytes (%s %s from %s)",
            what, self.body_limit, channel._command.decode("latin-1"),
            channel._path.decode("latin-1")[:200], getattr(client, "host", client),
        )  # fmt: skip
        channel.transport.write(_refusal_bytes(self.body_limit))
        self.linger_and_close(channel)

    def linger_and_close(self, channel) -> None:
        """Close once what was written is sent, reading (into nothing) meanwhile: see LINGER_SECONDS."""
        channel.dataReceived = _discard
        getattr(channel.transport, "loseWriteConnection", channel.transport.loseConnection)()
        self._linger = channel.callLater(LINGER_SECONDS, channel.transport.abortConnection)

    def connectionLost(self, reason):
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        if self.streaming:
            self.hand_over_gathered()  # every byte that arrived goes before the http.disconnect
        super().connectionLost(reason)


def _discard(data: bytes) -> None:
    pass


@implementer(IPushProducer)
class ResponseDrain:
    """Told by Twisted when an HTTP response's transport buffer is full (pause) and when it drained (resume).

    Twisted runs on Daphne's asyncio loop, so the event is set and cleared on
    the same thread the application awaits it on.
    """

    def __init__(self):
        self.drained = asyncio.Event()
        self.drained.set()

    def pauseProducing(self):
        self.drained.clear()

    def resumeProducing(self):
        self.drained.set()

    def stopProducing(self):
        # The connection is going: nothing will drain, and nothing waits any more.
        self.drained.set()


# Statuses Twisted has no reason phrase for (it would say "Unknown Status").
REASON_PHRASES = {423: b"Locked", 460: b"Checksum Mismatch"}


class BackpressureRequest(BoundedRequest):
    """A bounded request whose response body is written no faster than the client reads it."""

    _drain: ResponseDrain | None = None

    def setResponseCode(self, code, message=None):
        super().setResponseCode(code, message or REASON_PHRASES.get(code))

    def handle_reply(self, message):
        if message["type"] == "http.response.start" and self._drain is None and not self.finished:
            # Before the first byte of the response is buffered, so every pause is seen.
            self._drain = ResponseDrain()
            self.registerProducer(self._drain, True)
        super().handle_reply(message)

    async def wait_until_drained(self) -> None:
        """Return once the transport's write buffer is below its bound, or the connection is gone.

        A client that reads nothing for DIRECTDRIVEX_IDLE_SECONDS (as for an
        idle upload) has its connection aborted: otherwise it would pin the
        response, its open file and a block of memory for as long as it keeps
        the socket open. The application then sees an ordinary disconnect.
        """
        drain = self._drain
        if drain is None or drain.drained.is_set() or self.finished or self._disconnected:
            return
        idle = settings.DIRECTDRIVEX_IDLE_SECONDS
        try:
            await asyncio.wait_for(drain.drained.wait(), idle)
        except TimeoutError:
            client = self.channel.transport.getPeer() if self.channel is not None else None
            log.info(
                "HTTP client read nothing for %d s: connection aborted (%s %s from %s)",
                idle, self.method.decode("latin-1"), self.uri.decode("latin-1")[:200], getattr(client, "host", client),
            )  # fmt: skip
            if self.channel is not None:
                self.channel.transport.abortConnection()

    def _let_go_of_drain(self):
        if self._drain is not None:
            self._drain.stopProducing()
            self._drain = None
            if self.channel is not None:
                self.unregisterProducer()

    def finish(self):
        # Twisted logs an error for a request that finishes with a producer registered.
        self._let_go_of_drain()
        if self._ends_short() and self.channel is not None:
            # A body that stopped before its Content-Length (a download whose file
            # was deleted or whose slot was revoked): on a kept-alive connection the
            # client would wait for the missing bytes forever. Closing it after this
            # response tells the client at once that the body is incomplete.
            self.channel.persistent = False
        super().finish()

    def _ends_short(self) -> bool:
        declared = self.responseHeaders.getRawHeaders(b"content-length")
        if not declared or self.method == b"HEAD":
            return False
        try:
            return self.sentLength < int(declared[0])
        except ValueError:
            return False

    def connectionLost(self, reason):
        self._let_go_of_drain()
        super().connectionLost(reason)


class BoundedHTTPFactory(HTTPFactory):
    """Daphne's HTTP factory, with ``BackpressureRequest`` (bounded body, drained response) for every request."""

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = BackpressureRequest
        # The limits live on the HTTP/1.1 channel inside Twisted's protocol wrapper (which forwards only
        # requestFactory and factory); Daphne runs no HTTP/2, so that channel is the one that parses.
        protocol._channel.totalHeadersSize = protocol._channel.MAX_LENGTH = MAX_HEADER_BYTES
        return protocol


def _masked_action(action_logger, protocol, action, details):
    """Daphne's access log line, with share-link tokens masked as in every line of ours (uploads.logs)."""
    if isinstance(details.get("path"), str):
        details = {**details, "path": mask_share_tokens(details["path"])}
    action_logger(protocol, action, details)


class BackpressureServer(Server):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.action_logger is not None:
            # Daphne writes its access log (stdout) itself, outside Python's logging: a token there
            # would be readable by whoever reads the logs.
            self.action_logger = partial(_masked_action, self.action_logger)

    @property
    def http_factory(self):
        return self._http_factory

    @http_factory.setter
    def http_factory(self, _daphne_factory):
        # Daphne's run() builds its HTTPFactory inline, with no hook to pass
        # another: this is the one place to put ours (bounded request bodies) in.
        self._http_factory = BoundedHTTPFactory(self)

    async def handle_reply(self, protocol, message):
        await super().handle_reply(protocol, message)
        if isinstance(protocol, BackpressureRequest):
            # The application's next send (the next block of a download) waits
            # here while the client has not read what is already buffered.
            await protocol.wait_until_drained()

    def create_application(self, protocol, scope):
        if isinstance(protocol, WebSocketProtocol):
            # Read uploads in 256 KiB instead of Twisted's 64 KiB: a third of the
            # reads (and Python calls through autobahn) per frame.
            protocol.transport.bufferSize = WEBSOCKET_READ_BYTES
            transport = protocol.transport
        elif getattr(protocol, "streaming", False):
            transport = protocol.channel.transport
        else:
            return super().create_application(protocol, scope)
        # Same as Daphne's create_application, with our queue in place of asyncio.Queue().
        assert "application_instance" not in self.connections[protocol]
        input_queue = TransportBackpressureQueue(transport, settings.DIRECTDRIVEX_WINDOW)
        scope.setdefault("asgi", {"version": "3.0"})
        application_instance = self.application(
            scope=scope, receive=input_queue.get, send=partial(self.handle_reply, protocol)
        )
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(
            application_instance, loop=asyncio.get_event_loop()
        )
        return input_queue

    def kill_all_applications(self):
        """At shutdown, cancel every application and make the reactor wait for them to end.

        Daphne's own version stops with a KeyError at the first connection that
        has no application (the HTTP request that was upgraded to a WebSocket), so
        shutdown did not wait for uploads to make their bytes durable and free
        their slots (uploads.transports.websocket runs that cleanup when cancelled).
        """
        wait_for = []
        for details in self.connections.values():
            application = details.get("application_instance")
            if application is not None and not application.done():
                application.cancel()
                wait_for.append(application)
        log.info("shutdown: waiting for %d application instance(s)", len(wait_for))
        waiting = defer.Deferred.fromFuture(asyncio.gather(*wait_for, return_exceptions=True))
        waiting.addErrback(lambda _failure: None)
        return waiting


class DirectDriveXDaphne(CommandLineInterface):
    server_class = BackpressureServer


# glibc's mallopt parameter for the most malloc arenas (malloc.h).
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> bool:
    """Cap glibc's malloc arenas at MALLOC_ARENAS, before the process starts its threads.

    glibc gives each thread that allocates its own arena (up to 8 per core) and
    keeps what it frees there: the s3 backend's part senders (botocore reads
    each part in 1 MiB buffers) grew a server by 35-44 MiB over a 512 MiB
    upload, against 20-26 MiB with two arenas, at the same speed and CPU
    (docs/benchmarks.md). The threads mostly wait on the network or hold the
    GIL, so two arenas cost no contention worth measuring. An explicit
    MALLOC_ARENA_MAX in the environment wins; False where there is no glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS))
    except (OSError, AttributeError):
        return False


def run(arguments: list[str]) -> None:
    """Run Daphne in this process (same PID: process managers and tests can signal it)."""
    DirectDriveXDaphne().run(arguments)
