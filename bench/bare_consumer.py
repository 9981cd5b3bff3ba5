"""The "bare consumer" baseline of bench/upload.py: a Channels consumer that only appends frames to a file.

It runs under the same Daphne as DirectDriveX (``directdrivex.server.run``: the
same WebSocket size limits and transport backpressure queue), with the same
channel layer (Redis when ``REDIS_URL`` is set), and speaks just enough of the
upload protocol (``ready``, an ``ack`` every window/4, ``complete``) for the
reference client's own sending loop to drive it. No auth, no database, no
hashing, no durable commits: each binary frame is written to the file
synchronously on the event loop, and the file is fsynced once at the end.

    python bench/bare_consumer.py serve --port P --dir D
    python bench/bare_consumer.py send --server http://127.0.0.1:P FILE
"""

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import parse_qs

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.urls import path  # noqa: E402

log = logging.getLogger("bench.bare")

CHUNK_SIZE = 1024 * 1024
WINDOW = 8 * 1024 * 1024
MAX_REQUEST_BYTES = 1024 * 1024  # directdrivex.settings' default


class BareConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        query = parse_qs(self.scope["query_string"].decode())
        self.size = int(query["size"][0])
        self.chunk_size = settings.DIRECTDRIVEX_CHUNK_SIZE
        self.window = settings.DIRECTDRIVEX_WINDOW
        self.ack_every = max(1, self.window // 4)  # as uploads.transports.websocket does
        self.received = self.acked = 0
        self.path = Path(settings.BARE_DIR) / f"{uuid.uuid4().hex}.bin"
        self.file = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed at the end or on disconnect
        await self.accept()
        log.info("bare ready size=%s path=%s", self.size, self.path)
        await self.send(
            text_data=json.dumps({"type": "ready", "offset": 0, "chunk_size": self.chunk_size, "window": self.window})
        )

    async def receive(self, text_data=None, bytes_data=None):
        if bytes_data is None:
            await self.close(code=4400)
            return
        self.file.write(bytes_data)
        self.received += len(bytes_data)
        if self.received >= self.size:
            os.fsync(self.file.fileno())
            self.file.close()
            log.info("bare complete size=%s path=%s", self.received, self.path)
            await self.send(text_data=json.dumps({"type": "complete", "id": "bare", "size": self.size, "sha256": ""}))
            await self.close(code=1000)
        elif self.received - self.acked >= self.ack_every:
            self.acked = self.received
            await self.send(text_data=json.dumps({"type": "ack", "offset": self.received}))

    async def disconnect(self, code):
        if not self.file.closed:
            self.file.close()


application = ProtocolTypeRouter({"websocket": URLRouter([path("ws/bare/", BareConsumer.as_asgi())])})


def serve(port: int, directory: str) -> None:
    redis_url = os.environ.get("REDIS_URL")
    layer = (
        {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [{"address": redis_url, "socket_timeout": 30}]},  # as directdrivex.settings
        }
        if redis_url
        else {"BACKEND": "channels.layers.InMemoryChannelLayer"}
    )
    settings.configure(
        DEBUG=False,
        CHANNEL_LAYERS={"default": layer},
        DIRECTDRIVEX_CHUNK_SIZE=int(os.environ.get("DIRECTDRIVEX_CHUNK_SIZE", CHUNK_SIZE)),
        DIRECTDRIVEX_WINDOW=int(os.environ.get("DIRECTDRIVEX_WINDOW", WINDOW)),
        # directdrivex.server bounds every HTTP request body (the WebSocket handshake too) by this.
        DIRECTDRIVEX_MAX_REQUEST_BYTES=int(os.environ.get("DIRECTDRIVEX_MAX_REQUEST_BYTES", MAX_REQUEST_BYTES)),
        BARE_DIR=directory,
        LOGGING_CONFIG=None,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from directdrivex import server  # reads settings: import after configure()

    arguments = server.daphne_arguments(bind="127.0.0.1", port=port)
    arguments[-1] = "bench.bare_consumer:application"
    server.run(arguments)


def send(server: str, file: str) -> None:
    """Drive the bare consumer with the reference client's own connection and window code."""
    from tqdm import tqdm

    from ddxclient.uploader import Uploader

    size = os.path.getsize(file)
    uploader = Uploader(server, "unused", progress=False)
    started = time.monotonic()
    with tqdm(total=size, disable=True) as bar:
        result = asyncio.run(uploader._stream(file, size, f"/ws/bare/?size={size}", bar))
    elapsed = time.monotonic() - started
    print(json.dumps({"seconds": elapsed, "size": result["size"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("--port", type=int, required=True)
    serve_parser.add_argument("--dir", required=True)
    send_parser = sub.add_parser("send")
    send_parser.add_argument("--server", required=True)
    send_parser.add_argument("file")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.port, args.dir)
    else:
        send(args.server, args.file)


if __name__ == "__main__":
    main()
