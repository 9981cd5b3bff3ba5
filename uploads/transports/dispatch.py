"""Message dispatch for the project's consumers, without Channels' hop through the shared sync thread.

Channels' ``AsyncConsumer.dispatch`` first runs ``close_old_connections`` through
``database_sync_to_async`` (thread_sensitive) before every handler. asgiref
runs every thread-sensitive call of a process on one thread, which Django's
sync views and every consumer's hop queue on; a burst of requests waiting on
the database pool then delays a connect, a disconnect or a revocation by
seconds. The project's consumers never use the thread's connections (every
service call goes through uploads.services.calls, which hands its connections
back), so the hop buys them nothing.
"""

from channels.consumer import get_handler_name


class DirectDispatch:
    """Mixin for an AsyncConsumer: call the message's handler at once."""

    async def dispatch(self, message):
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)
