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
from datetime import datetime


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


class StoreUnavailable(StorageError):
    """The object store did not answer, or answered with a server error: the transfer stops, resumable (4503 / 503)."""

    def __init__(self, detail: str, retry_after: int = 5):
        super().__init__(detail)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Piece:
    """A committed piece of an unfinished upload that lives outside the part itself (object stores).

    ``kind`` is PART (a multipart part: ``number`` and ``etag``) or TAIL (a
    short create-only object named ``name`` that keeps acknowledged bytes
    durable until the part they belong to is sent); either covers the bytes
    ``[start, end)`` of the file. The database records them with the offset,
    under the writer's fencing generation (uploads.models.StoredPiece).
    """

    PART = "part"
    TAIL = "tail"

    kind: str
    start: int
    end: int
    number: int = 0
    etag: str = ""
    name: str = ""


@dataclass(frozen=True)
class Committed:
    """What the database holds about an upload's part: where a writer resumes.

    ``offset`` and ``hash_state`` as committed; ``session`` names the store's
    own upload (an S3 multipart upload id, "" before the first); ``pieces``
    are the recorded parts and tails; ``numbers`` is the highest part number
    any writer of the upload may have used, so a new writer numbers its parts
    above it and a stale writer's late part can never replace one of ours.
    """

    offset: int = 0
    hash_state: bytes | None = None
    session: str = ""
    pieces: tuple[Piece, ...] = ()
    numbers: int = 0
    # The highest part number reserved for the writer that opens the part (admission reserves a few).
    reserved: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """What one commit makes durable: the bytes before ``offset``, with the sha256 state after them.

    ``since`` is when (time.monotonic) the first byte after ``offset`` was
    appended, None when nothing follows it: the writer's durability clock.
    """

    offset: int
    hash_state: bytes | None
    since: float | None = None


@dataclass(frozen=True)
class Durable:
    """What ``PartWriter.sync`` made durable, for the writer to commit under its fence.

    ``pieces`` are the parts and tails to record (the tails replace every
    tail recorded before); ``session`` the store's upload; ``numbers`` the
    part numbers to keep reserved; ``made`` the objects this sync created,
    which nothing records until the commit does (a new tail).
    """

    offset: int
    hash_state: bytes | None
    session: str = ""
    pieces: tuple[Piece, ...] = ()
    numbers: int = 0
    made: tuple[Piece, ...] = ()


class PartWriter(abc.ABC):
    """The single writer's handle on an upload's part, with the running sha256 of its bytes.

    Every method blocks on the disk or the network: async callers run them in a
    thread. A commit is ``checkpoint`` (between appends: what to make durable),
    then ``sync`` (may run while ``append`` goes on), then the writer's fenced
    database commit of what ``sync`` returned, then ``committed``.
    """

    offset: int
    # The highest part number this writer used (object stores): its reservation shrinks to it at the end.
    numbers_used: int = 0
    # Bytes read back from storage to open it (a re-hash, an object store's tails): what a resume cost.
    bytes_read_back: int = 0

    @abc.abstractmethod
    def append(self, chunks: Iterable[bytes | bytearray]) -> int:
        """Write ``chunks`` after the bytes already there and fold them into the digest; returns the new offset."""

    def checkpoint(self, full: bool = True) -> Checkpoint:
        """What a commit started now makes durable. Called only while no ``append`` runs.

        ``full``: every byte appended so far. Otherwise a backend may stop at a
        cheaper point (an object store at its last whole part) and report when
        the bytes after it began (``Checkpoint.since``).
        """
        return Checkpoint(self.offset, self.hash_state())

    @abc.abstractmethod
    def sync(self, checkpoint: Checkpoint | None = None) -> Durable:
        """Make every byte before ``checkpoint.offset`` (default: all appended so far) durable.

        May run while ``append`` goes on in another thread.
        """

    def committed(self, durable: Durable) -> None:  # noqa: B027 - a hook: a disk has nothing to let go of
        """The writer's fenced commit of ``durable`` succeeded: what it superseded may go."""

    def fenced(self, durable: Durable) -> None:  # noqa: B027 - a hook: a part file is the writer's, under its lock
        """The fenced commit of ``durable`` changed nothing: the upload is someone else's now.

        Delete what ``sync`` stored for it that nothing records (``durable.made``):
        no other writer can know those names, so a stale writer leaves no byte
        behind. What earlier commits recorded is the new owner's: never touched.
        """

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
    def finalize(self, committed: Committed | None = None) -> None:
        """Turn the part, atomically, into the finished file: visible whole or not at all.

        Every byte was committed (offset = size) first; ``committed`` is what
        the database recorded then, the only pieces an object store may
        assemble the file from.
        """

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
class Session:
    """An object store's unfinished multipart upload of ``key`` (fsck and the reaper judge it against the rows)."""

    key: str
    session: str
    started: datetime


@dataclass(frozen=True)
class Capacity:
    """Room where the bytes live (the filesystem of the storage folder), in bytes."""

    total: int
    used: int
    free: int


class Storage(abc.ABC):
    """One place where uploads' bytes live. A backend keeps no per-upload state between calls."""

    # Part numbers a writer's admission reserves for it (an object store's multipart parts; none on a disk).
    part_numbers_ahead = 0

    # --- the writer -----------------------------------------------------------------

    @abc.abstractmethod
    def open_part(
        self, key: str, committed: Committed, size: int, interrupt: threading.Event | None = None
    ) -> PartWriter:
        """The part of ``key`` (a file of ``size`` bytes) opened for its single writer, resuming at ``committed``.

        Bytes past ``committed.offset`` were never committed and are dropped.
        The sha256 of the bytes before it comes from ``committed.hash_state``,
        or else they are read and hashed again (``interrupt`` stops that
        between blocks: Interrupted). PartLocked: another writer holds it.
        PartShort: fewer than the offset's bytes are there. NotAFile:
        something else sits there.
        """

    @abc.abstractmethod
    def finished_digest(
        self, key: str, size: int, interrupt: threading.Event | None = None, hash_state: bytes | None = None
    ) -> str | None:
        """sha256 of the finished file of ``key`` if it exists with exactly ``size`` bytes, else None.

        Finds uploads whose finalization stopped after the file became visible
        but before the database said complete. ``hash_state``, when it covers
        all ``size`` bytes, gives the digest without reading them again.
        """

    # --- downloads ----------------------------------------------------------------------

    @abc.abstractmethod
    def open_finished(self, key: str) -> FinishedReader:
        """The finished file of ``key``, for reading. FileNotFoundError if missing; NotAFile if not a file."""

    # Whether nginx's X-Accel-Redirect location answers Range and If-Range itself (a file it reads:
    # the server leaves them to it) or asks for the range the server decided (an object store).
    accel_answers_ranges = True

    @abc.abstractmethod
    def accel_path(self, key: str, answer: dict[str, str]) -> str:
        """Where nginx gets the finished file of ``key``, below the X-Accel-Redirect prefix (docs/deployment.md).

        ``answer``: the download's headers as the server decided them (``ETag``,
        ``Last-Modified``, ``Content-Range`` for a 206), for a location that
        cannot take them from the server's answer once it proxies the bytes.
        """

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

    def problems(self) -> list[str]:
        """Why uploads could not be stored here, found by trying (start-up checks); none when all is well."""
        return []

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

    # --- an object store's pieces (fsck and the reaper; a disk has none) ------------------------

    keeps_pieces = False

    def sweep_spool(self) -> None:  # noqa: B027 - a disk has no spool
        """Remove what processes of this host that are gone left in the local spool (an object store's)."""

    def sessions(self, key: str = "") -> Iterator[Session]:
        """Every unfinished multipart upload in the store, or only those of ``key``."""
        return iter(())

    def session_parts(self, key: str, session: str) -> dict[int, tuple[int, str]] | None:
        """The parts the store holds for ``session`` (number: (size, ETag)); None once the session is gone."""
        return None

    def tails(self, key: str) -> dict[str, tuple[int, datetime]]:
        """The tail objects of ``key`` in the store: name: (size, written at)."""
        return {}

    def tail_keys(self) -> Iterator[str]:
        """The storage keys that have tail objects in the store."""
        return iter(())

    def abort_session(self, key: str, session: str) -> None:
        """Abort a multipart upload: its parts are gone."""
        raise NotImplementedError("this store keeps no multipart uploads")

    def delete_tail(self, name: str) -> None:
        """Delete one tail object."""
        raise NotImplementedError("this store keeps no tail objects")
