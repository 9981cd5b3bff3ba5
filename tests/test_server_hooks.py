"""Each hook of directdrivex/server.py against the Daphne (and Twisted) it hooks into.

The server replaces or wraps a handful of Daphne's internals, which no public
API promises to keep. requirements.txt pins Daphne to one minor version; these
tests say, hook by hook, what of Daphne's the hook relies on, so that an
upgrade that moves one fails here, by name, instead of silently turning a
protection off. What each hook then does for a client is tested against a real
server in the test named in its docstring.
"""

import inspect
from importlib.metadata import version

from daphne import server as daphne_server
from daphne.http_protocol import WebRequest
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import tcp
from twisted.protocols import basic
from twisted.web import http

from directdrivex import server
from uploads import budgets


def test_daphne_is_the_minor_version_the_hooks_were_written_against():
    major, minor = version("daphne").split(".")[:2]
    assert (int(major), int(minor)) == (4, 2)


def test_the_command_line_passes_the_limits_and_the_budgets_daphne_is_told():
    """Hook: daphne_arguments. Daphne must take each flag and hand it to its Server under the expected name."""
    parsed = server.DirectDriveXDaphne().parser.parse_args(server.daphne_arguments(bind="127.0.0.1", port=8000))

    assert parsed.websocket_max_message_size == parsed.websocket_max_frame_size == server.max_message_size()
    assert parsed.websocket_timeout == -1
    assert parsed.application_close_timeout == budgets.APPLICATION_CLOSE_TIMEOUT
    assert parsed.websocket_connect_timeout == budgets.HANDSHAKE_SECONDS
    # The CLI hands them to the server class we give it.
    assert server.DirectDriveXDaphne.server_class is server.BackpressureServer
    run = inspect.getsource(daphne_server.Server.__init__)
    for name in ("application_close_timeout", "websocket_connect_timeout", "websocket_handshake_timeout"):
        assert name in run, name


def test_the_budgets_match_how_daphne_cancels_a_disconnected_application():
    """uploads.budgets: Daphne checks once a second and cancels after application_close_timeout (and again)."""
    checker = inspect.getsource(daphne_server.Server.application_checker)
    assert "time.time() - disconnected > self.application_close_timeout" in checker
    assert "application_instance.cancel()" in checker
    assert "reactor.callLater(1, self.application_checker)" in checker
    assert budgets.DAPHNE_CHECK_SECONDS == 1
    assert budgets.CLOSE_SECONDS < budgets.AFTER_DISCONNECT_SECONDS < budgets.APPLICATION_CLOSE_TIMEOUT
    assert budgets.AUTH_SECONDS < budgets.HANDSHAKE_SECONDS


def test_our_http_factory_replaces_the_one_run_builds():
    """Hook: BackpressureServer.http_factory (a property whose setter ignores Daphne's factory).

    Daphne's run() builds its HTTPFactory inline and assigns it: that assignment is where ours
    goes in. Behaviour: tests/test_request_limits.py (413 before the body is read).
    """
    assert "self.http_factory = HTTPFactory(self)" in inspect.getsource(daphne_server.Server.run)
    instance = server.BackpressureServer.__new__(server.BackpressureServer)
    instance.http_factory = object()
    assert isinstance(instance.http_factory, server.BoundedHTTPFactory)


def test_the_header_limits_are_the_attributes_twisteds_channel_checks():
    """Hook: BoundedHTTPFactory.buildProtocol sets HTTPChannel.totalHeadersSize and LineReceiver.MAX_LENGTH.

    Behaviour: tests/faults/test_filename_attacks.py (a tus filename of the documented length is answered).
    """
    assert "self._receivedHeaderSize > self.totalHeadersSize" in inspect.getsource(http.HTTPChannel)
    # A header line longer than MAX_LENGTH: the LineReceiver HTTPChannel is.
    assert issubclass(http.HTTPChannel, basic.LineReceiver)
    assert "self.MAX_LENGTH" in inspect.getsource(basic.LineReceiver.dataReceived)
    assert http.HTTPChannel.totalHeadersSize < server.MAX_HEADER_BYTES
    assert http.HTTPChannel.MAX_LENGTH < server.MAX_HEADER_BYTES
    built = server.BoundedHTTPFactory(object()).buildProtocol(("127.0.0.1", 1))
    assert isinstance(built._channel, http.HTTPChannel)
    assert built._channel.totalHeadersSize == built._channel.MAX_LENGTH == server.MAX_HEADER_BYTES


def test_bounded_requests_hook_the_twisted_request_steps_daphne_uses():
    """Hooks: BoundedRequest.gotLength / handleContentChunk / requestReceived, and the parsed request line.

    Twisted calls them in this order for every request, and keeps the request
    line on the channel until the body is in. Behaviour: tests/test_request_limits.py.
    """
    assert issubclass(server.BoundedRequest, WebRequest)
    for name in ("gotLength", "handleContentChunk", "requestReceived"):
        assert callable(getattr(http.Request, name)), name
    line = inspect.getsource(http.HTTPChannel.lineReceived)
    assert "self._command = command" in line and "self._path = request" in line
    # A refused request never reaches the application: Twisted starts it from requestReceived, through process().
    assert "self.process()" in inspect.getsource(http.Request.requestReceived)
    assert "create_application" in inspect.getsource(WebRequest.process)


def test_responses_are_drained_through_the_reply_path_daphne_awaits():
    """Hooks: BackpressureServer.handle_reply (awaited by the application's send) and the request's producer.

    Behaviour: tests/test_downloads_live.py (a slow reader of 1 GiB, the server stays small).
    """
    assert inspect.iscoroutinefunction(daphne_server.Server.handle_reply)
    assert "protocol.handle_reply(message)" in inspect.getsource(daphne_server.Server.handle_reply)
    assert callable(http.Request.registerProducer) and callable(http.Request.unregisterProducer)


def test_a_short_body_ends_its_connection_through_twisteds_persistence_flag():
    """Hook: BackpressureRequest.finish / _ends_short: a channel not persistent is closed when its request is done.

    Behaviour: tests/test_downloads_live.py (a DELETE ends a download: the client sees the end at once).
    """
    done = inspect.getsource(http.HTTPChannel.requestDone)
    assert "if self.persistent:" in done and "self.loseConnection()" in done
    assert "sentLength" in inspect.getsource(http.Request.write)


def test_websocket_connections_get_our_queue_through_create_application():
    """Hook: BackpressureServer.create_application (Daphne's, with our queue for WebSocket protocols).

    It copies Daphne's body: the keys it fills in must still be Daphne's.
    Behaviour: tests/test_live_server.py (floods of full and of tiny frames).
    """
    ours = inspect.getsource(server.BackpressureServer.create_application)
    daphnes = inspect.getsource(daphne_server.Server.create_application)
    for line in (
        'assert "application_instance" not in self.connections[protocol]',
        'scope.setdefault("asgi", {"version": "3.0"})',
        'self.connections[protocol]["application_instance"] = asyncio.ensure_future(',
    ):
        assert line in daphnes and line in ours, line
    # What the queue does to the connection: Twisted's TCP transport reads bufferSize bytes at a time and pauses.
    assert issubclass(WebSocketProtocol, object) and tcp.Connection.bufferSize == 65536
    assert callable(tcp.Connection.pauseProducing) and callable(tcp.Connection.resumeProducing)


def test_shutdown_waits_for_the_applications_through_the_event_trigger_daphne_registers():
    """Hook: BackpressureServer.kill_all_applications (Daphne's own stops at the first upgraded request).

    Behaviour: tests/test_live_server.py (a shutdown makes received bytes durable and frees the slot).
    """
    run = inspect.getsource(daphne_server.Server.run)
    assert 'reactor.addSystemEventTrigger("before", "shutdown", self.kill_all_applications)' in run


def test_streamed_bodies_rely_on_process_stopping_at_a_closed_body():
    """Hook: BoundedRequest.start_streaming calls Daphne's process() with the body not yet in.

    process() must rewind the stored body, start the application with the
    scope it builds, and stop there when the body is "closed" (_StreamedContent):
    otherwise it would send an empty, final http.request before the body came.
    Behaviour: tests/test_tus_conformance.py, tests/test_tus_memory.py.
    """
    process = inspect.getsource(WebRequest.process)
    assert "self.content.seek(0, 0)" in process
    assert "self.server.create_application" in process
    assert "if self.application_queue is None or self.content.closed:" in process
    # What requestReceived would set once the body is in, and process() reads.
    received = inspect.getsource(http.Request.requestReceived)
    for name in ("self.method, self.uri = command, path", "self.clientproto = version", "self.path"):
        assert name in received, name
    for name in ("self.client", "self.host", "self.clientproto", "self.method", "self.path", "self.uri"):
        assert name in process or name in inspect.getsource(http.Request.__init__), name


def test_the_request_line_is_on_the_channel_when_the_length_is_known():
    """Hook: BoundedRequest.gotLength reads the method, target and version from the channel.

    Twisted parses the request line into _command/_path/_version and calls
    gotLength from allHeadersReceived, before any body byte and before the
    request gets its own method and path (requestReceived, once the body is in).
    """
    line = inspect.getsource(http.HTTPChannel.lineReceived)
    for name in ("self._command = command", "self._path = request", "self._version = version"):
        assert name in line, name
    headers = inspect.getsource(http.HTTPChannel.allHeadersReceived)
    assert "req.gotLength(self.length)" in headers
    content = inspect.getsource(http.HTTPChannel.allContentReceived)
    assert "req.requestReceived(command, path, version)" in content


def test_an_early_answer_keeps_the_channel_reading_into_nothing():
    """Hook: BoundedRequest.finish for a body still arriving (a tus refusal, or the upload's end).

    requestDone closes the socket unless the channel is persistent (the unread
    body would make the kernel reset the answer away), and a persistent channel
    goes back to line mode: linger_and_close then swaps its dataReceived for a
    sink, so the rest of the body is neither parsed as a request nor stored.
    """
    done = inspect.getsource(http.HTTPChannel.requestDone)
    assert "if self.persistent:" in done
    assert "self.setLineMode(data)" in done
    assert "self.loseConnection()" in done
    # Data reaches the channel through its dataReceived attribute (LineReceiver), looked up per call.
    assert "dataReceived" in inspect.getsource(http._GenericHTTPChannelProtocol)


def test_tus_bodies_stream_and_no_other_body_does():
    """streams_request_body: only POST and PATCH under /api/tus/ are exempt from the request-body limit."""
    assert server.streams_request_body(b"PATCH", b"/api/tus/abc")
    assert server.streams_request_body(b"POST", b"/api/tus/")
    assert not server.streams_request_body(b"HEAD", b"/api/tus/abc")
    assert not server.streams_request_body(b"DELETE", b"/api/tus/abc")
    assert not server.streams_request_body(b"POST", b"/api/uploads/")
    assert not server.streams_request_body(b"PATCH", b"/api/tusx")


def test_serve_caps_the_malloc_arenas_unless_the_environment_says_otherwise(monkeypatch):
    import os
    import subprocess
    import sys

    from directdrivex import server

    # In a fresh process: mallopt's cap is for the whole process and must come before its threads.
    code = "from directdrivex import server; print(server.limit_malloc_arenas())"
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    capped = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert capped.stdout.strip() == "True"  # glibc here
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert server.limit_malloc_arenas() is False  # the operator's own setting wins
