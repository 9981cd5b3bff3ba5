"""A sha256 whose state can be saved with a durable offset and restored by the next writer, on any host.

An upload resumed at offset N needs the sha256 of its first N bytes. Without
a saved state the next writer reads them back and hashes them again: for a
client that sends its file in many requests (tus PATCHes of a few MiB) that
is quadratic, 127 GiB re-read for a 1 GiB file in 4 MiB pieces. Python's
hashlib cannot save a state (its objects neither pickle nor expose their
context). OpenSSL's SHA256_Init/Update/Final can: the context is a plain
112-byte struct (eight 32-bit words of hash, the bit count, the pending
block), so its bytes, stored with the durable offset, are the state itself.

These functions are deprecated in OpenSSL 3 but exported; they run at
hashlib's speed (both call the same code, and ctypes releases the GIL). The
module checks itself once against hashlib, saving and restoring mid-stream;
where libcrypto is missing or disagrees, ``available()`` is False and parts
fall back to hashlib and a re-read on resume (logged once, and said by
``manage.py check`` as uploads.W002).
"""

import ctypes
import ctypes.util
import functools
import hashlib
import logging
import struct
from pathlib import Path

log = logging.getLogger(__name__)

CTX_BYTES = 112
# SHA256_CTX: unsigned int h[8]; unsigned int Nl, Nh; unsigned int data[16]; unsigned int num, md_len.
_COUNT = struct.Struct("<II")
_COUNT_AT = 32


def _libcrypto_path() -> str | None:
    """The libcrypto this Python's hashlib uses (same code, same version), else the system's."""
    import _hashlib  # noqa: F401 - loads libcrypto into the process, so /proc/self/maps names it

    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            if "libcrypto" in line:
                return line.split()[-1]
    except OSError:
        pass
    return ctypes.util.find_library("crypto")


@functools.cache
def _library():
    path = _libcrypto_path()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(path)
        for name in ("SHA256_Init", "SHA256_Update", "SHA256_Final"):
            getattr(library, name).restype = ctypes.c_int
        library.SHA256_Init.argtypes = [ctypes.c_void_p]
        library.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        library.SHA256_Final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return library


class Sha256:
    """sha256 with a savable state. Use only where ``available()``; ``update`` takes bytes or bytearray."""

    def __init__(self, state: bytes | None = None):
        self._library = _library()
        self._ctx = ctypes.create_string_buffer(CTX_BYTES)
        if state is None:
            self._library.SHA256_Init(self._ctx)
        else:
            if len(state) != CTX_BYTES:
                raise ValueError(f"a sha256 state is {CTX_BYTES} bytes, not {len(state)}")
            ctypes.memmove(self._ctx, state, CTX_BYTES)

    def update(self, data: bytes | bytearray) -> None:
        if isinstance(data, bytearray):
            pointer = (ctypes.c_char * len(data)).from_buffer(data)
        else:
            pointer = bytes(data) if not isinstance(data, bytes) else data
        self._library.SHA256_Update(self._ctx, pointer, len(data))

    def state(self) -> bytes:
        return self._ctx.raw

    def hexdigest(self) -> str:
        finished = ctypes.create_string_buffer(self._ctx.raw, CTX_BYTES)  # Final must not end our own context
        digest = ctypes.create_string_buffer(32)
        self._library.SHA256_Final(digest, finished)
        return digest.raw.hex()


def hashed_bytes(state: bytes) -> int:
    """How many bytes a saved state has consumed (from the context's bit count)."""
    low, high = _COUNT.unpack_from(state, _COUNT_AT)
    return ((high << 32) | low) // 8


@functools.cache
def available() -> bool:
    """Whether libcrypto's sha256 is there and agrees with hashlib, a state saved mid-block included."""
    if _library() is None:
        log.warning("libcrypto's SHA256 functions not found: resumed uploads re-read their bytes to hash them")
        return False
    sample = bytes(range(256)) * 1000 + b"tail"
    try:
        first = Sha256()
        first.update(sample[:100_003])
        saved = first.state()
        second = Sha256(saved)
        second.update(bytearray(sample[100_003:]))
        agrees = second.hexdigest() == hashlib.sha256(sample).hexdigest() and hashed_bytes(saved) == 100_003
    except Exception:  # any surprise from a foreign library means: do not trust it
        log.warning("libcrypto's SHA256 self-test raised", exc_info=True)
        agrees = False
    if not agrees:
        log.warning("libcrypto's SHA256 disagrees with hashlib: resumed uploads re-read their bytes to hash them")
    return agrees


def new_digest():
    """A part's running sha256: one whose state can be saved where ``available()``, else hashlib's."""
    return Sha256() if available() else hashlib.sha256()


def resumed_digest(offset: int, state: bytes | None) -> Sha256 | None:
    """The digest of a part's first ``offset`` bytes, from the state saved with that offset.

    None when there is no usable state (none saved, another length, another
    offset: a rewind or repair moved the offset since): the caller re-reads.
    """
    if not state or len(state) != CTX_BYTES or not available() or hashed_bytes(state) != offset:
        return None
    return Sha256(state)
