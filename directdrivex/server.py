"""Daphne, as DirectDriveX runs it: WebSocket size limits that fit the chunk size, plus transport backpressure.

Daphne queues every received frame for the application without bound, so a
client that ignores the credit window could grow the process by as much as it
sends before the consumer refuses it. ``BackpressureServer`` gives each
WebSocket connection a queue that stops reading the connection's socket while
its unprocessed frames exceed one window, and reads again below half.
"""

import asyncio
import logging
import sys
from functools import partial

# Daphne runs behind a TLS-terminating proxy (docs/deployment.md), never with
# its own ssl: endpoints, so Twisted need not load pyOpenSSL: 5 MiB less RSS
# per process. Must happen before Twisted is imported.
sys.modules.setdefault("OpenSSL", None)

from daphne.cli import CommandLineInterface  # noqa: E402
from daphne.server import Server  # noqa: E402
from daphne.ws_protocol import WebSocketProtocol  # noqa: E402
from django.conf import settings  # noqa: E402
from twisted.internet import defer  # noqa: E402

log = logging.getLogger(__name__)


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
        "directdrivex.asgi:application",
    ]  # fmt: skip


def _message_bytes(message: dict) -> int:
    payload = message.get("bytes") or message.get("text") or b""
    return len(payload)


class TransportBackpressureQueue(asyncio.Queue):
    """An application input queue that pauses the socket while it holds too many bytes."""

    def __init__(self, protocol: WebSocketProtocol, high_water: int):
        super().__init__()
        self.protocol = protocol
        self.high_water = high_water
        self.low_water = high_water // 2
        self.queued_bytes = 0
        self.paused = False

    def _put(self, item):
        super()._put(item)
        self.queued_bytes += _message_bytes(item)
        if not self.paused and self.queued_bytes > self.high_water:
            self.paused = True
            self.protocol.transport.pauseProducing()

    def _get(self):
        item = super()._get()
        self.queued_bytes -= _message_bytes(item)
        if self.paused and self.queued_bytes <= self.low_water:
            self.paused = False
            self.protocol.transport.resumeProducing()
        return item


class BackpressureServer(Server):
    def create_application(self, protocol, scope):
        if not isinstance(protocol, WebSocketProtocol):
            return super().create_application(protocol, scope)
        # Same as Daphne's create_application, with our queue in place of asyncio.Queue().
        assert "application_instance" not in self.connections[protocol]
        input_queue = TransportBackpressureQueue(protocol, settings.DIRECTDRIVEX_WINDOW)
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
        their slots (uploads.consumers runs that cleanup when cancelled).
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


def run(arguments: list[str]) -> None:
    """Run Daphne in this process (same PID: process managers and tests can signal it)."""
    DirectDriveXDaphne().run(arguments)
