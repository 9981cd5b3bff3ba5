"""Bytes on disk: part files while uploading, finished files after. No ORM here.

Layout under DIRECTDRIVEX_STORAGE_DIR::

    partial/<storage_key>.part   bytes being uploaded (never served)
    files/<storage_key>          finished, verified files

A file appears in files/ only by an atomic rename of a fully fsynced part
file, followed by an fsync of the directory, so a crash at any instant leaves
either a resumable part file or a complete one, never a visible partial file.
"""

import errno
import fcntl
import hashlib
import logging
import os
from pathlib import Path

from django.conf import settings

log = logging.getLogger(__name__)

READ_BLOCK = 4 * 1024 * 1024


class PartFileLocked(Exception):
    """Another open PartFile (in any process) holds the part file's lock."""


def root() -> Path:
    return Path(settings.DIRECTDRIVEX_STORAGE_DIR)


def part_path(key: str) -> Path:
    return root() / "partial" / f"{key}.part"


def final_path(key: str) -> Path:
    return root() / "files" / key


def ensure_layout() -> None:
    for sub in ("partial", "files"):
        (root() / sub).mkdir(parents=True, exist_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete(key: str) -> bool:
    """Remove an upload's bytes, partial or finished. True if anything was removed."""
    removed = False
    for path in (part_path(key), final_path(key)):
        try:
            path.unlink()
            removed = True
        except FileNotFoundError:
            pass
    return removed


def part_size(key: str) -> int | None:
    try:
        return part_path(key).stat().st_size
    except FileNotFoundError:
        return None


class PartFile:
    """The single writer's handle on a part file.

    An exclusive, non-blocking ``flock`` taken at open is held until close: a
    second writer in any process is refused at once (PartFileLocked), and a
    frozen writer keeps the lock, so nobody else can write under it.
    """

    def __init__(self, key: str, offset: int):
        ensure_layout()
        self.key = key
        self.path = part_path(key)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PartFileLocked(key) from exc
            raise
        # Bytes past the durable offset were never acknowledged as durable: drop them.
        os.ftruncate(self.fd, offset)
        self.offset = offset

    def hash_prefix(self):
        """A sha256 object over the bytes already on disk (once, after a resume)."""
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            remaining = self.offset
            while remaining:
                block = handle.read(min(READ_BLOCK, remaining))
                if not block:
                    raise OSError(f"part file {self.path} is shorter than its durable offset")
                digest.update(block)
                remaining -= len(block)
        return digest

    def write(self, data) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, self.offset)
            self.offset += written
            view = view[written:]

    def sync(self) -> None:
        os.fsync(self.fd)

    def finalize(self) -> Path:
        """fsync, rename into files/, fsync the directory: the file is now durable and visible."""
        os.fsync(self.fd)
        target = final_path(self.key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path, target)
        _fsync_dir(target.parent)
        _fsync_dir(self.path.parent)
        return target

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also drops the flock
            self.fd = -1
