"""Request bodies of any size made on the fly, and raw HTTP/1.1 requests that stream them.

A ``Body`` is ``size`` pseudo-random bytes that exist only one block at a
time: block ``i`` is a seeded random block with ``i`` in its first eight
bytes, so no two blocks are alike (a lost, doubled or swapped block changes
the digest) and a 3.38 GB body costs the client one block of memory and no
disk. Its sha256 is computed from what was handed out, as it is sent.

``send_head`` / ``read_answer`` speak HTTP/1.1 over a plain socket, so that a
test writes the body as fast as the socket takes it, and ``chunked_tiny``
frames a payload as one-byte chunks of a chunked body.
"""

import hashlib
import http.client
import random
import socket
import struct
from collections.abc import Iterator

MiB = 1024 * 1024
BLOCK = 1 * MiB


class Body:
    """``size`` bytes made block by block (see the module docstring); ``sha256`` of what was read so far."""

    def __init__(self, size: int, *, seed: int = 20261207, block: int = BLOCK):
        self.size = size
        self.block = block
        self.given = 0
        self._digest = hashlib.sha256()
        self._buffer = bytearray(random.Random(seed).randbytes(block))
        self._view = memoryview(self._buffer)
        self._index = -1  # the block now in the buffer

    @property
    def left(self) -> int:
        return self.size - self.given

    def read(self, limit: int) -> memoryview:
        """The next at most ``limit`` bytes (fewer at a block's end; empty at the body's end).

        Valid until the next read: the buffer is reused.
        """
        index, start = divmod(self.given, self.block)
        if index != self._index:
            self._buffer[:8] = struct.pack(">Q", index)
            self._index = index
        piece = self._view[start : start + min(limit, self.block - start, self.left)]
        self._digest.update(piece)
        self.given += len(piece)
        return piece

    def pieces(self, total: int | None = None, limit: int = BLOCK) -> Iterator[memoryview]:
        """The next ``total`` bytes (all that is left by default), in reads of at most ``limit``."""
        end = self.size if total is None else self.given + total
        while self.given < end:
            yield self.read(min(limit, end - self.given))

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


def send_head(sock: socket.socket, method: str, path: str, headers: dict[str, str]) -> None:
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in headers.items()), "", ""]
    sock.sendall("\r\n".join(lines).encode("latin-1"))


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The response to the request sent on ``sock``: status, headers (lowercase names), body."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    try:
        body = response.read()
    finally:
        response.close()
    return response.status, {name.lower(): value for name, value in response.getheaders()}, body


def chunk(payload: bytes) -> bytes:
    """``payload`` as one chunk of a chunked body."""
    return b"%x\r\n" % len(payload) + bytes(payload) + b"\r\n"


def chunked_tiny(payload: bytes) -> bytes:
    """``payload`` as one chunk per byte: ``1\\r\\n<byte>\\r\\n`` each, six bytes on the wire for one of the body."""
    wire = bytearray(b"1\r\n_\r\n" * len(payload))
    wire[3::6] = payload
    return bytes(wire)


CHUNKED_END = b"0\r\n\r\n"
