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


class PartFileInterrupted(Exception):
    """Reading a long prefix was stopped because its connection is ending."""


class PartFileShort(Exception):
    """The part file holds fewer bytes than the durable offset (lost by the disk or by hand)."""

    def __init__(self, path, on_disk: int, offset: int):
        super().__init__(f"part file {path} has {on_disk} bytes, durable offset is {offset}")
        self.on_disk = on_disk


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


def _check(interrupt) -> None:
    if interrupt is not None and interrupt.is_set():
        raise PartFileInterrupted()


def finished_digest(key: str, size: int, interrupt=None) -> str | None:
    """sha256 of a finished file of exactly ``size`` bytes, or None if there is none.

    Finds uploads whose finalization stopped after the atomic rename but before
    the database said complete. ``interrupt`` (a threading.Event) stops the
    read between blocks (PartFileInterrupted).
    """
    path = final_path(key)
    try:
        if path.stat().st_size != size:
            return None
    except FileNotFoundError:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(READ_BLOCK):
            _check(interrupt)
            digest.update(block)
    return digest.hexdigest()


class PartFile:
    """The single writer's handle on a part file, with the running sha256 of its bytes.

    An exclusive, non-blocking ``flock`` taken at open is held until close: a
    second writer in any process is refused at once (PartFileLocked), and a
    frozen writer keeps the lock, so nobody else can write under it. All
    methods block on disk: async callers run them in a thread.
    """

    def __init__(self, key: str, offset: int, interrupt=None):
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
        try:
            on_disk = os.fstat(self.fd).st_size
            if on_disk < offset:
                raise PartFileShort(self.path, on_disk, offset)
            # Bytes past the durable offset were never committed: drop them.
            os.ftruncate(self.fd, offset)
            self.offset = offset
            self._dropped = 0  # page-cache bytes already let go of (sync)
            self.digest = self._hash_prefix(interrupt)
        except BaseException:
            self.close()
            raise

    def _hash_prefix(self, interrupt):
        """sha256 over the bytes already on disk: read once after a resume, never on the hot path.

        ``interrupt`` (a threading.Event) stops it between blocks: a client that
        goes away during a long re-hash must not keep the file (and its lock).
        """
        digest = hashlib.sha256()
        position = 0
        while position < self.offset:
            _check(interrupt)
            block = os.pread(self.fd, min(READ_BLOCK, self.offset - position), position)
            if not block:
                raise PartFileShort(self.path, position, self.offset)
            digest.update(block)
            position += len(block)
        return digest

    def append(self, chunks) -> int:
        """Write ``chunks`` at the end and fold them into the digest; returns the new offset."""
        for chunk in chunks:
            view = memoryview(chunk)
            # hashlib and os.pwrite both release the GIL on large buffers, so
            # this thread runs beside the event loop that parses frames.
            self.digest.update(view)
            while view:
                written = os.pwrite(self.fd, view, self.offset)
                self.offset += written
                view = view[written:]
        return self.offset

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def sync(self) -> None:
        """fsync, then drop the synced bytes from the page cache.

        May run while append() writes further on (the writer overlaps commits
        with writing): only what was written before the fsync began is
        dropped, and those pages are clean by then. Dropping them is what
        keeps the copy into the page cache cheap: the next writes reuse pages
        just freed instead of fresh ones, which cost a fault each (measured
        4.4 -> 2.1 server CPU s/GiB on this project's VMs; docs/benchmarks.md).
        Nothing reads a part file back while it is written.
        """
        synced = self.offset
        os.fsync(self.fd)
        if synced > self._dropped and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, self._dropped, synced - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = synced

    def finalize(self) -> Path:
        """fsync, rename into files/, fsync both directories: the file is now durable and visible."""
        self.sync()
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
