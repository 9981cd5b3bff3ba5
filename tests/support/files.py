"""Files for tests and bench/: random bytes hashed as they are written, a file's sha256, who holds a file open."""

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

BLOCK = 4 * 1024 * 1024


def write_random(path: Path, size: int) -> str:
    """``size`` bytes of os.urandom at ``path``, hashed while written (never read back); returns the sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(BLOCK, left))
            digest.update(block)
            handle.write(block)
            left -= len(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of the file at ``path``, read in bounded blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()


def lock_is_free(path) -> bool:
    """Whether nobody holds the part file's flock (a writer that let go of it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def open_descriptors(paths: list[Path]) -> list[str]:
    """File descriptors of this process that point at any of ``paths``."""
    wanted = {str(path) for path in paths}
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
            if target in wanted:
                found.append(target)
    return found
