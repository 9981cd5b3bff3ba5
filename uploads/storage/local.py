"""The ``local`` backend: bytes in a folder (DIRECTDRIVEX_STORAGE_DIR) on one host or a filesystem every server shares.

Layout under the folder::

    partial/<storage_key>.part   bytes being uploaded (never served)
    files/<storage_key>          finished, verified files
    fsck-lost+found/<batch>/…     what `uploads fsck --repair` set aside

A file appears in files/ only by an atomic rename of a fully fsynced part
file, followed by an fsync of the directory, so a crash at any instant leaves
either a resumable part file or a complete one, never a visible partial file.

A part file's one writer holds an exclusive, non-blocking ``flock`` on it from
open to close: a second writer in any process is refused at once
(PartLocked), and a frozen writer keeps the lock, so nobody else can write
under it. fsck takes the same lock before it touches a file.

Nothing here follows a symbolic link or opens anything but a regular file at
a layout path (``O_NOFOLLOW``, then a check of what was opened): a link
planted in the folder would otherwise let a writer truncate, or a download
serve, a file anywhere on the host. What is found instead is NotAFile.
"""

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings

from uploads.storage import sha256state
from uploads.storage.base import (
    Area,
    Capacity,
    Checkpoint,
    Committed,
    Durable,
    FileGone,
    FinishedReader,
    Held,
    Interrupted,
    NotAFile,
    PartLocked,
    PartShort,
    PartWriter,
    Storage,
    StoredEntry,
)

log = logging.getLogger(__name__)

READ_BLOCK = 4 * 1024 * 1024
PART_SUFFIX = ".part"
# Where `uploads fsck --repair` moves files it will not delete. Not plain
# "lost+found": a storage folder that is a filesystem's root already has one
# (ext4's, owned by root), which is never ours to touch.
LOST_AND_FOUND = "fsck-lost+found"
# Entries at the top of the storage folder that are not the layout but never strays.
_NOT_OURS = {LOST_AND_FOUND, "lost+found"}


# --- the layout (also what the local backend's tests plant files with) ---------------------


def root() -> Path:
    # Read at every call: tests give each test a folder of its own.
    return Path(settings.DIRECTDRIVEX_STORAGE_DIR)


def part_path(key: str) -> Path:
    return root() / Area.PARTIAL / f"{key}{PART_SUFFIX}"


def final_path(key: str) -> Path:
    return root() / Area.FILES / key


def lost_and_found() -> Path:
    return root() / LOST_AND_FOUND


def _make_layout() -> None:
    for area in Area:
        (root() / area).mkdir(parents=True, exist_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check(interrupt) -> None:
    if interrupt is not None and interrupt.is_set():
        raise Interrupted()


def _open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that neither follows a symlink at ``path`` nor opens anything but a regular file (NotAFile).

    O_NONBLOCK so that a FIFO planted there cannot hang the open; it makes no
    difference to a regular file, and is cleared again for one.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotAFile(str(path), "a symbolic link") from exc
        if exc.errno == errno.EISDIR:
            raise NotAFile(str(path), "a folder") from exc
        raise
    kind = os.fstat(fd).st_mode
    if not stat.S_ISREG(kind):
        os.close(fd)
        raise NotAFile(str(path), _what(kind))
    os.set_blocking(fd, True)
    return fd


def _what(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file (a device, FIFO or socket)"


def _lock(fd: int, name) -> None:
    """Take the writer's exclusive flock on ``fd`` without waiting, or close it and raise PartLocked."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise PartLocked(str(name)) from exc
        raise


class LocalPart(PartWriter):
    """A part file under partial/, flocked by its one writer (see the module docstring)."""

    def __init__(self, key: str, offset: int, interrupt=None, hash_state: bytes | None = None):
        self.fd = -1
        _make_layout()
        self.key = key
        self.path = part_path(key)
        # Made anew only for a resume from zero: a missing part at a later
        # offset must be reported (PartShort), not replaced by an empty one
        # while its bytes may have just become the finished file.
        try:
            self.fd = _open_regular(self.path, os.O_RDWR | (os.O_CREAT if offset == 0 else 0))
        except FileNotFoundError:
            raise PartShort(str(self.path), 0, offset) from None
        _lock(self.fd, self.path)
        try:
            on_disk = os.fstat(self.fd).st_size
            if on_disk < offset:
                raise PartShort(str(self.path), on_disk, offset)
            # Bytes past the durable offset were never committed: drop them.
            os.ftruncate(self.fd, offset)
            self.offset = offset
            self._dropped = 0  # page-cache bytes already let go of (sync)
            self.digest = sha256state.resumed_digest(offset, hash_state) or self._hash_prefix(interrupt)
        except BaseException:
            self.close()
            raise

    def _hash_prefix(self, interrupt):
        """sha256 over the bytes already on disk: read once after a resume, never on the hot path.

        ``interrupt`` (a threading.Event) stops it between blocks: a client that
        goes away during a long re-hash must not keep the file (and its lock).
        """
        digest = sha256state.new_digest()
        position = 0
        while position < self.offset:
            _check(interrupt)
            block = os.pread(self.fd, min(READ_BLOCK, self.offset - position), position)
            if not block:
                raise PartShort(str(self.path), position, self.offset)
            digest.update(block)
            position += len(block)
        self.bytes_read_back = position
        return digest

    def append(self, chunks) -> int:
        for chunk in chunks:
            # The digest (libcrypto through ctypes, or hashlib) and os.pwrite both release the
            # GIL on large buffers, so this thread runs beside the event loop that parses frames.
            self.digest.update(chunk)
            view = memoryview(chunk)
            while view:
                written = os.pwrite(self.fd, view, self.offset)
                self.offset += written
                view = view[written:]
        return self.offset

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def hash_state(self) -> bytes | None:
        return self.digest.state() if isinstance(self.digest, sha256state.Sha256) else None

    def sync(self, checkpoint: Checkpoint | None = None) -> Durable:
        """fsync, then drop the synced bytes from the page cache; everything appended before it is durable.

        May run while append() writes further on (the writer overlaps commits
        with writing): only what was written before the fsync began is
        dropped, and those pages are clean by then. Dropping them is what
        keeps the copy into the page cache cheap: the next writes reuse pages
        just freed instead of fresh ones, which cost a fault each (measured
        4.4 -> 2.1 server CPU s/GiB on this project's VMs; docs/benchmarks.md).
        Nothing reads a part file back while it is written.
        """
        checkpoint = checkpoint or self.checkpoint()
        synced = self.offset
        os.fsync(self.fd)
        if synced > self._dropped and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, self._dropped, synced - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = synced
        return Durable(checkpoint.offset, checkpoint.hash_state)

    def finalize(self, committed: Committed | None = None) -> None:
        """fsync, rename into files/, fsync both directories: the file is now durable and visible."""
        self.sync()
        target = final_path(self.key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path, target)
        _fsync_dir(target.parent)
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # also drops the flock
            self.fd = -1


class LocalFinished(FinishedReader):
    """A finished file opened for a download, which ends (FileGone) once the file is deleted.

    An open descriptor reads an unlinked file to its end, so every read checks
    that the name still leads to the inode it opened: a DELETE answered 204
    (its bytes gone) stops every download of the file at the next block.
    """

    def __init__(self, key: str):
        self.path = final_path(key)
        self.fd = _open_regular(self.path, os.O_RDONLY)
        opened = os.fstat(self.fd)
        self.identity = (opened.st_dev, opened.st_ino)

    def read(self, position: int, length: int) -> bytes:
        block = os.pread(self.fd, length, position)
        # After the read: a block read before a delete is not sent after it either.
        try:
            named = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            raise FileGone(str(self.path)) from None
        if (named.st_dev, named.st_ino) != self.identity:
            raise FileGone(str(self.path))
        return block

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalHeld(Held):
    """A layout file opened and exclusively flocked by fsck (see ``LocalStorage.hold``)."""

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

    def move_aside(self, batch: str) -> str:
        return _move_aside(self.path, batch)


def _relative(path: Path) -> str:
    return str(path.relative_to(root()))


def _move_aside(path: Path, batch: str) -> str:
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
    return _relative(target)


def _classify(area: str, entry: os.DirEntry) -> StoredEntry:
    name = _relative(Path(entry.path))
    if not entry.is_file(follow_symlinks=False):
        return StoredEntry(name, is_folder=entry.is_dir(follow_symlinks=False))
    if area == Area.PARTIAL:
        key = entry.name.removesuffix(PART_SUFFIX)
        if key and key != entry.name:
            return StoredEntry(name, Area.PARTIAL, key)
        return StoredEntry(name)
    return StoredEntry(name, Area.FILES, entry.name)


class LocalStorage(Storage):
    """See the module docstring."""

    def open_part(self, key, committed, size, interrupt=None) -> LocalPart:
        return LocalPart(key, committed.offset, interrupt, committed.hash_state)

    def finished_digest(self, key, size, interrupt=None, hash_state=None) -> str | None:
        try:
            fd = _open_regular(final_path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        with open(fd, "rb") as handle:
            if os.fstat(fd).st_size != size:
                return None
            # The state committed at offset = size hashes exactly the bytes renamed into place.
            if (resumed := sha256state.resumed_digest(size, hash_state)) is not None:
                return resumed.hexdigest()
            digest = hashlib.sha256()
            while block := handle.read(READ_BLOCK):
                _check(interrupt)
                digest.update(block)
        return digest.hexdigest()

    def open_finished(self, key) -> LocalFinished:
        return LocalFinished(key)

    def accel_path(self, key, answer) -> str:
        # nginx's internal location aliases the files/ folder (deploy/nginx.conf.template), and
        # takes the validators from the server's answer and the range from the client's request.
        return key

    def delete(self, key) -> bool:
        removed = False
        for path in (part_path(key), final_path(key)):
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                pass
        return removed

    def prepare(self) -> None:
        _make_layout()

    def describe(self) -> str:
        return str(root())

    def capacity(self) -> Capacity:
        # The folder is made at the first upload: ask about the nearest folder above it that exists.
        path = root()
        existing = next((candidate for candidate in (path, *path.parents) if candidate.exists()), Path("/"))
        usage = shutil.disk_usage(existing)
        return Capacity(total=usage.total, used=usage.used, free=usage.free)

    def entry_name(self, area, key) -> str:
        return _relative(part_path(key) if area == Area.PARTIAL else final_path(key))

    def entry_size(self, name) -> int | None:
        try:
            found = os.stat(root() / name, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(found.st_mode):
            raise NotAFile(name, _what(found.st_mode))
        return found.st_size

    def scan(self) -> Iterator[StoredEntry]:
        base = root()
        try:
            top = sorted(os.scandir(base), key=lambda entry: entry.name)
        except FileNotFoundError:
            return
        for entry in top:
            if entry.name in _NOT_OURS:
                continue
            # partial/ and files/ may be symlinks to another disk (followed); a symlink inside them is a stray.
            if entry.name in (Area.PARTIAL, Area.FILES) and entry.is_dir():
                for inner in sorted(os.scandir(entry.path), key=lambda inner: inner.name):
                    yield _classify(entry.name, inner)
            else:
                yield StoredEntry(_relative(Path(entry.path)), is_folder=entry.is_dir(follow_symlinks=False))

    @contextlib.contextmanager
    def hold(self, name) -> Iterator[LocalHeld]:
        """Opened and flocked as a writer flocks it (LocalPart), without waiting, for the block.

        A finished file keeps its writer's lock too: the rename moves the locked inode.
        """
        path = root() / name
        try:
            fd = _open_regular(path, os.O_RDWR)
        except NotAFile as not_a_file:
            raise NotAFile(name, not_a_file.what) from None
        _lock(fd, path)  # closes fd if it raises
        try:
            mine, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
            if (mine.st_dev, mine.st_ino) != (named.st_dev, named.st_ino):
                raise FileNotFoundError(errno.ENOENT, "replaced while being locked", str(path))
            yield LocalHeld(path, fd)
        finally:
            os.close(fd)  # the flock goes with the last descriptor of this open file

    def move_aside(self, name, batch) -> str:
        return _move_aside(root() / name, batch)
