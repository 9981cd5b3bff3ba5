"""The storage interface: what the writer, downloads, the services and fsck may ask of wherever the bytes live.

An upload's bytes are named by its storage key (``Upload.storage_key``, made by
the server, never from the user's file name). While it is written they are a
*part*, owned by one writer at a time; once verified they become, atomically,
its *finished file*, which downloads read. Nothing here touches the database:
which writer may write, and up to which offset the bytes are durable, is the
database's business (uploads.services.grants); a backend only keeps the bytes
and refuses a second concurrent writer where it can.

fsck sees a backend as a list of *entries*, each with a name the backend
chooses (a path relative to the storage folder for ``local``): it finds them
with ``scan``, looks at one with ``hold`` and moves what nobody claims aside
with ``move_aside``; it never builds a name itself except through
``entry_name``.
"""

import abc
import contextlib
import enum
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class Area(enum.StrEnum):
    """Where in its life an upload's bytes are."""

    PARTIAL = "partial"  # being written: never served
    FILES = "files"  # finished and verified: served by downloads


class StorageError(Exception):
    """Base of the errors a backend raises on purpose (anything else is a fault of the disk or the store)."""


class PartLocked(StorageError):
    """Another writer (in any process) has this part open: it must not be shared."""


class PartShort(StorageError):
    """The part holds fewer bytes than the durable offset (lost by the disk, or removed by hand)."""

    def __init__(self, name: str, on_disk: int, offset: int):
        super().__init__(f"{name} has {on_disk} bytes, the durable offset is {offset}")
        self.on_disk = on_disk


class Interrupted(StorageError):
    """A long read (the re-hash of a resumed prefix or of a finished file) was stopped: its connection is ending."""


class NotAFile(StorageError):
    """Something other than a regular file (a symlink, a folder, a device) sits where the layout expects one.

    Never followed, never truncated, never served: fsck reports it, the
    transfer that met it fails as a server fault and stays resumable.
    """

    def __init__(self, name: str, what: str):
        super().__init__(f"{name} is {what}, not a regular file")
        self.name = name
        self.what = what


class FileGone(StorageError):
    """The finished file was deleted (or replaced) while a download read it: the download must end."""


class PartWriter(abc.ABC):
    """The single writer's handle on an upload's part, with the running sha256 of its bytes.

    Every method blocks on the disk or the network: async callers run them in a thread.
    """

    offset: int

    @abc.abstractmethod
    def append(self, chunks: Iterable[bytes | bytearray]) -> int:
        """Write ``chunks`` after the bytes already there and fold them into the digest; returns the new offset."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make every byte appended so far durable (may run while ``append`` goes on in another thread)."""

    @abc.abstractmethod
    def hexdigest(self) -> str:
        """sha256 of every byte of the part so far."""

    @abc.abstractmethod
    def hash_state(self) -> bytes | None:
        """The sha256's state after every byte so far, to save with the durable offset (uploads.storage.sha256state).

        None when it cannot be saved; the next writer then re-reads the part.
        Called only while no ``append`` runs.
        """

    @abc.abstractmethod
    def finalize(self) -> None:
        """Make the part durable and turn it, atomically, into the finished file: visible whole or not at all."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of the part (and of the hold that keeps other writers out). Idempotent."""


class FinishedReader(abc.ABC):
    """A download's handle on a finished file. Methods block: async callers run them in a thread."""

    @abc.abstractmethod
    def read(self, position: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``position`` (fewer only at the end); FileGone once the file was deleted."""

    @abc.abstractmethod
    def close(self) -> None:
        """Idempotent."""


class Held(abc.ABC):
    """An entry fsck holds as a writer would (no writer can open it meanwhile), to look at or repair it."""

    @abc.abstractmethod
    def size(self) -> int: ...

    @abc.abstractmethod
    def truncate(self, size: int) -> None:
        """Cut a part back to ``size`` bytes, durably."""

    @abc.abstractmethod
    def unlink(self) -> None:
        """Delete the entry, durably."""

    @abc.abstractmethod
    def move_aside(self, batch: str) -> str:
        """Move the entry where an operator can review it (``batch`` groups one fsck run); returns its new name."""


@dataclass(frozen=True)
class StoredEntry:
    """One entry of the store, as the layout names it.

    ``area`` and ``key`` are set for a regular file named as the layout names
    an upload's part or finished file; anything else is a stray, with both
    empty. ``name`` is what an operator is shown, and what ``hold`` and
    ``move_aside`` take.
    """

    name: str
    area: Area | None = None
    key: str = ""
    is_folder: bool = False


@dataclass(frozen=True)
class Capacity:
    """Room where the bytes live (the filesystem of the storage folder), in bytes."""

    total: int
    used: int
    free: int


class Storage(abc.ABC):
    """One place where uploads' bytes live. A backend keeps no per-upload state between calls."""

    # --- the writer -----------------------------------------------------------------

    @abc.abstractmethod
    def open_part(
        self, key: str, offset: int, interrupt: threading.Event | None = None, hash_state: bytes | None = None
    ) -> PartWriter:
        """The part of ``key`` opened for its single writer, resuming at the durable ``offset``.

        Bytes past ``offset`` were never committed and are dropped. The sha256
        of the bytes before it comes from ``hash_state`` (saved with that
        offset), or else they are read and hashed again (``interrupt`` stops
        that between blocks: Interrupted). PartLocked: another writer holds it. PartShort: it has
        fewer than ``offset`` bytes. NotAFile: something else sits there.
        """

    @abc.abstractmethod
    def finished_digest(self, key: str, size: int, interrupt: threading.Event | None = None) -> str | None:
        """sha256 of the finished file of ``key`` if it exists with exactly ``size`` bytes, else None.

        Finds uploads whose finalization stopped after the file became visible
        but before the database said complete.
        """

    # --- downloads ----------------------------------------------------------------------

    @abc.abstractmethod
    def open_finished(self, key: str) -> FinishedReader:
        """The finished file of ``key``, for reading. FileNotFoundError if missing; NotAFile if not a file."""

    @abc.abstractmethod
    def accel_path(self, key: str) -> str:
        """Where nginx finds the finished file of ``key`` below the X-Accel-Redirect prefix (docs/deployment.md)."""

    # --- every ending -------------------------------------------------------------------

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the bytes of ``key``, part and finished file alike; True if anything was removed.

        OSError if the store refused (read-only, I/O error, a folder in the
        way): the caller decides whether that fails its request.
        """

    # --- operations (fsck, the dashboard, start-up) ----------------------------------------

    @abc.abstractmethod
    def prepare(self) -> None:
        """Create what the layout needs before the first byte (at server start)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the bytes live, for operators (the folder's path)."""

    @abc.abstractmethod
    def capacity(self) -> Capacity | None:
        """Room left where the bytes live; None where the store does not say."""

    @abc.abstractmethod
    def entry_name(self, area: Area, key: str) -> str:
        """The entry name of an upload's part (Area.PARTIAL) or finished file (Area.FILES)."""

    @abc.abstractmethod
    def entry_size(self, name: str) -> int | None:
        """Bytes in the entry ``name``, None if it does not exist; NotAFile if it is not a regular file."""

    @abc.abstractmethod
    def scan(self) -> Iterator[StoredEntry]:
        """Every entry of the store, in name order, except the ones fsck set aside. Creates nothing."""

    @abc.abstractmethod
    def hold(self, name: str) -> contextlib.AbstractContextManager[Held]:
        """Hold the entry ``name`` for the block, as its writer would, without waiting.

        PartLocked: a writer has it open. FileNotFoundError: it is gone. NotAFile: not a regular file.
        """

    @abc.abstractmethod
    def move_aside(self, name: str, batch: str) -> str:
        """Move the entry ``name`` (a file or a folder) where an operator can review it; returns its new name."""
