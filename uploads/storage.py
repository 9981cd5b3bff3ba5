"""Bytes on disk: part files while uploading, finished files after. No ORM here.

Layout under DIRECTDRIVEX_STORAGE_DIR::

    partial/<storage_key>.part   bytes being uploaded (never served)
    files/<storage_key>          finished, verified files

A file appears in files/ only by an atomic rename of a fully fsynced part
file, followed by an fsync of the directory, so a crash at any instant leaves
either a resumable part file or a complete one, never a visible partial file.
"""

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
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


# --- the layout as a whole (uploads fsck) ------------------------------------------

# Where `uploads fsck --repair` moves files it will not delete. Not plain
# "lost+found": a storage folder that is a filesystem's root already has one
# (ext4's, owned by root), which is never ours to touch.
LOST_AND_FOUND = "fsck-lost+found"
# Entries at the top of the storage folder that are not the layout but never strays.
_NOT_OURS = {LOST_AND_FOUND, "lost+found"}


def lost_and_found() -> Path:
    return root() / LOST_AND_FOUND


@dataclass(frozen=True)
class StoredEntry:
    """One entry under the storage folder, as the layout names it.

    ``area`` is "partial" or "files" and ``key`` the storage key for a regular
    file named as the layout names one (``partial/<key>.part``, ``files/<key>``);
    anything else (other names, folders or symlinks inside them, entries at the
    top) is a stray, with ``area`` and ``key`` empty.
    """

    path: Path
    area: str = ""
    key: str = ""

    @property
    def relative(self) -> str:
        return str(self.path.relative_to(root()))


def scan() -> Iterator[StoredEntry]:
    """Every entry under the storage folder except the lost+found folders, in name order. Creates nothing."""
    base = root()
    try:
        top = sorted(os.scandir(base), key=lambda entry: entry.name)
    except FileNotFoundError:
        return
    for entry in top:
        if entry.name in _NOT_OURS:
            continue
        # partial/ and files/ may be symlinks to another disk (followed); a symlink inside them is a stray.
        if entry.name in ("partial", "files") and entry.is_dir():
            for inner in sorted(os.scandir(entry.path), key=lambda inner: inner.name):
                yield _classify(entry.name, inner)
        else:
            yield StoredEntry(Path(entry.path))


def _classify(area: str, entry: os.DirEntry) -> StoredEntry:
    path = Path(entry.path)
    if not entry.is_file(follow_symlinks=False):
        return StoredEntry(path)
    if area == "partial":
        key = entry.name.removesuffix(".part")
        if key and key != entry.name:
            return StoredEntry(path, area, key)
        return StoredEntry(path)
    return StoredEntry(path, area, entry.name)


def move_aside(path: Path, batch: str) -> Path:
    """Move ``path`` (a file or a folder) to <lost+found>/<batch>/<its path under the storage folder>.

    A rename: nothing is copied or deleted, and an operator can move it back.
    """
    relative = path.relative_to(root())
    target = lost_and_found() / batch / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        if not target.exists() and not target.is_symlink():
            break
        target = target.with_name(f"{relative.name}.{attempt}")
    os.rename(path, target)
    _fsync_dir(target.parent)
    _fsync_dir(path.parent)
    return target


class HeldFile:
    """A layout file opened and exclusively flocked by the caller (see ``held``)."""

    def __init__(self, path: Path, fd: int):
        self.path = path
        self.fd = fd

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)

    def unlink(self) -> None:
        self.path.unlink()
        _fsync_dir(self.path.parent)

    def move_aside(self, batch: str) -> Path:
        return move_aside(self.path, batch)


@contextlib.contextmanager
def held(path: Path) -> Iterator[HeldFile]:
    """``path`` opened and flocked as a writer flocks it (PartFile), without waiting, for the block.

    PartFileLocked: a writer (in any process) has it open, so it is not ours to
    touch. FileNotFoundError: it is gone, or was replaced while we locked it.
    A finished file keeps its writer's lock too: the rename moves the locked inode.
    """
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PartFileLocked(str(path)) from exc
            raise
        mine, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
        if (mine.st_dev, mine.st_ino) != (named.st_dev, named.st_ino):
            raise FileNotFoundError(errno.ENOENT, "replaced while being locked", str(path))
        yield HeldFile(path, fd)
    finally:
        os.close(fd)  # also drops the flock
