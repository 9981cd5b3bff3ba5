"""How long a connection's cleanup may take, derived from what Daphne does once a client has gone.

Daphne (daphne.server.Server.application_checker) looks at every connection
once a second. When the client of a connection left more than
``APPLICATION_CLOSE_TIMEOUT`` seconds ago and its application is still
running, it cancels the application, logs "took too long to shut down and was
killed", and does so again at every later tick: the first cancellation lands
between APPLICATION_CLOSE_TIMEOUT and APPLICATION_CLOSE_TIMEOUT + 1 s after
the disconnect, the second one a second later. The server passes
``APPLICATION_CLOSE_TIMEOUT`` to Daphne explicitly (directdrivex.server), so
the numbers here and Daphne's cannot drift apart.

Everything a transport still does after its client left (write what arrived,
make it durable, free the slot) therefore has ``AFTER_DISCONNECT_SECONDS``:
up to one checker tick before the first cancellation. A connection that ends
on the server's initiative (a refusal, a completion) closes its writer before
it sends the close, so Daphne's clock has not started then; it gets
``CLOSE_SECONDS`` and would still be inside Daphne's budget if the client left
at that moment.

Daphne also drops a WebSocket whose application has not accepted it within
``HANDSHAKE_SECONDS`` (its --websocket_connect_timeout): the lookups that
decide who is connecting (uploads.transports.auth) get ``AUTH_SECONDS``, so a
database that does not answer is told to the client as 4503 after the accept,
not as a connection dropped mid-handshake.
"""

# Passed to Daphne as --application-close-timeout (its default too).
APPLICATION_CLOSE_TIMEOUT = 10
# Daphne's application checker runs once a second.
DAPHNE_CHECK_SECONDS = 1
# From the moment a transport learns its client left until its session has ended.
AFTER_DISCONNECT_SECONDS = APPLICATION_CLOSE_TIMEOUT - DAPHNE_CHECK_SECONDS
# The writer's close (final commit, release) when no disconnect deadline is running:
# inside AFTER_DISCONNECT_SECONDS, with a second left for the transport's own close.
CLOSE_SECONDS = AFTER_DISCONNECT_SECONDS - 1
# Passed to Daphne as --websocket_connect_timeout (its default too).
HANDSHAKE_SECONDS = 5
# Who is connecting, looked up before the accept: well inside HANDSHAKE_SECONDS.
AUTH_SECONDS = 2.0
# A tus PATCH or HEAD for an upload that an earlier request still writes asks
# that writer to let go and waits this long for its final commit and release
# (a drain of at most a window and one fsync: well under a second on a sound
# disk) before answering 423 with Retry-After. Short enough for a client's
# retry, long enough for a disk that is slow for a moment.
TAKEOVER_SECONDS = 5.0
