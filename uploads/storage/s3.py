"""The ``s3`` backend: bytes in an S3-compatible bucket, so the server hosts share no disk.

Layout under ``DIRECTDRIVEX_S3_PREFIX`` in ``DIRECTDRIVEX_S3_BUCKET``::

    files/<storage_key>                     finished, verified files (one object each)
    tails/<storage_key>/<start>-<end>-<tag> short create-only objects holding acknowledged
                                            bytes of a part not yet sent (slow clients)

An unfinished upload is an S3 multipart upload of ``files/<storage_key>``
(invisible until completed). Its parts are uniform (``part_size``: at least
8 MiB, and size / 9,000 for files so big that 10,000 parts would not do), so
every part but the last has the same size (Cloudflare R2 requires it) and
part boundaries never move between writers. A part is filled in a local,
disposable spool file (``DIRECTDRIVEX_SPOOL_DIR``) and sent from a thread
while the next fills; a few are in flight at most.

Nothing here decides what is durable: ``sync`` reports parts sent and tails
written, and the writer records them in the database under its fencing
generation (uploads.models.StoredPiece). That record is the truth:

* A resume on any host opens the recorded multipart upload, restores the
  sha256 state committed with the offset, fetches the recorded tails (less
  than a part) and goes on: no committed byte is sent again or read back.
* Part numbers only go up: each writer numbers its parts above the highest
  number any earlier writer may have used (``Committed.numbers``) and uses
  only numbers the database reserved for its generation, so a stale writer's
  late UploadPart can never replace a recorded part.
* Completion assembles the object from the parts the database recorded, and
  nothing else, with ``If-None-Match: *``; an answer lost on the way is
  decided by looking at the object.

Errors of the store (unreachable, 5xx, throttling) are StoreUnavailable: the
transfer stops with 4503 / 503 and resumes from the last commit.
"""

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

import boto3
import botocore.exceptions
from botocore.config import Config

from uploads.storage import sha256state
from uploads.storage.base import (
    Area,
    Checkpoint,
    Committed,
    Durable,
    FileGone,
    FinishedReader,
    Held,
    Interrupted,
    PartShort,
    PartWriter,
    Piece,
    Session,
    Storage,
    StorageError,
    StoredEntry,
    StoreUnavailable,
)

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_PART_BYTES = 8 * MiB
# S3 allows 10,000 parts; 9,000 of them cover the file, the rest are for the
# numbers writers that crashed reserved and never used (see PART_NUMBERS_AHEAD).
MAX_PARTS = 10_000
PARTS_FOR_THE_FILE = 9_000
# Numbers a writer reserves beyond the last it used, at admission and at each
# commit: more than the parts between two commits (the writer commits every
# 32 MiB and never leads by more than 64 MiB), so a part never waits for one.
PART_NUMBERS_AHEAD = 12
# Parts sent at once per writer; with the one filling, the spool holds at most this + 1.
PARTS_IN_FLIGHT = 3
READ_BLOCK = 8 * MiB
# Where `uploads fsck --repair` copies objects it will not delete, and where start-up checks probe.
LOST_AND_FOUND = "fsck-lost+found"
CHECKS = ".ddx-check"


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _senders() -> ThreadPoolExecutor:
    """The process's part senders, shared by every writer (each keeps at most PARTS_IN_FLIGHT in it)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="ddx-s3-part")
        return _pool


def part_size(size: int) -> int:
    """Bytes per part for a file of ``size`` bytes: uniform, a whole number of MiB."""
    needed = -(-size // PARTS_FOR_THE_FILE)
    return max(MIN_PART_BYTES, -(-needed // MiB) * MiB)


def _unavailable(exc: Exception) -> StoreUnavailable:
    return StoreUnavailable(f"The object store did not answer: {type(exc).__name__}: {exc}")


def _error_code(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _status(exc: Exception) -> int:
    if isinstance(exc, botocore.exceptions.ClientError):
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


@contextlib.contextmanager
def _store_call():
    """Turn the store's outages (connection errors, timeouts, 5xx, throttling) into StoreUnavailable."""
    try:
        yield
    except (botocore.exceptions.BotoCoreError, OSError) as exc:
        if isinstance(exc, botocore.exceptions.ParamValidationError):
            raise
        raise _unavailable(exc) from exc
    except botocore.exceptions.ClientError as exc:
        if _status(exc) >= 500 or _error_code(exc) in ("SlowDown", "Throttling", "RequestTimeout"):
            raise _unavailable(exc) from exc
        raise


@contextlib.contextmanager
def _gone_as_missing(session: str):
    """A multipart upload aborted under its writer (a DELETE, fsck) is a missing part, as an unlinked file is."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        if _error_code(exc) == "NoSuchUpload":
            raise FileNotFoundError(f"multipart upload {session} is gone") from exc
        raise


def _not_found(exc: Exception) -> bool:
    return _error_code(exc) in ("404", "NoSuchKey", "NotFound", "NoSuchUpload")


@dataclass(frozen=True)
class Bucket:
    """Where the objects live: one client (thread-safe) and the names under the prefix."""

    client: object
    bucket: str
    prefix: str

    def final(self, key: str) -> str:
        return f"{self.prefix}{Area.FILES}/{key}"

    def tails(self, key: str) -> str:
        return f"{self.prefix}tails/{key}/"


class Spool:
    """This process's folder in DIRECTDRIVEX_SPOOL_DIR (disposable: emptied when the process starts)."""

    def __init__(self, root: Path):
        self.root = root
        self.mine = root / f"{socket.gethostname()}-{os.getpid()}"

    def new_file(self, key: str):
        self.mine.mkdir(parents=True, exist_ok=True)
        path = self.mine / f"{key}.{secrets.token_hex(4)}.part"
        # Unbuffered: a commit's thread reads the filling part's bytes (os.pread) while the writer's
        # thread appends, and must see every byte appended before its checkpoint.
        return path, open(path, "w+b", buffering=0)

    def clean(self) -> None:
        """Remove the folders of processes of this host that are gone (and this process's own)."""
        host = socket.gethostname()
        with contextlib.suppress(FileNotFoundError):
            for entry in self.root.iterdir():
                name, _, pid = entry.name.rpartition("-")
                if name != host or not pid.isdigit():
                    continue
                if int(pid) != os.getpid() and _alive(int(pid)):
                    continue
                shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class S3Part(PartWriter):
    """One writer's multipart upload: see the module docstring.

    ``append`` runs in one thread at a time; ``sync`` may run beside it in
    another; part uploads run in the backend's pool. ``_lock`` guards what
    they share.
    """

    def __init__(self, store: "S3Storage", key: str, committed: Committed, size: int, interrupt=None):
        self.store = store
        self.where = store.where
        self.key = key
        self.size = size
        self.part_bytes = part_size(size)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self.spool_path, self.spool = None, None
        self._closed = False
        self._uploads: list[tuple[Piece, Future]] = []  # parts handed to the pool, not yet collected by sync
        self._sent: list[Piece] = []  # parts the store has, not yet recorded by a commit
        self._ends: dict[int, bytes | None] = {}  # sha256 state at the end of each part not yet recorded
        self._tails: list[Piece] = []  # tails of the filling part
        self._tail_state: bytes | None = None  # sha256 state at the end of the last tail
        self._superseded: dict[int, list[Piece]] = {}  # a part's tails, unneeded once the part is recorded
        self._doomed: list[str] = []  # objects a commit made unneeded, deleted at the next sync or finalize
        self._deleting: Future | None = None  # the last deletion of unneeded tails, sent to a thread
        # Part numbers: above every number an earlier writer may have used, and only those reserved for us.
        self.numbers_used = committed.numbers
        self.reserved = committed.reserved
        try:
            self._open(committed, interrupt)
        except BaseException:
            self.close()
            raise

    # --- opening -------------------------------------------------------------------

    def _open(self, committed: Committed, interrupt) -> None:
        offset = committed.offset
        parts = sorted((p for p in committed.pieces if p.kind == Piece.PART and p.end <= offset), key=_start)
        boundary = _contiguous(parts, 0)
        tails = sorted((p for p in committed.pieces if p.kind == Piece.TAIL and p.start >= boundary), key=_start)
        covered = _contiguous(tails, boundary)
        digest = sha256state.resumed_digest(offset, committed.hash_state)
        if offset and (covered < offset or digest is None or not committed.session):
            # Parts of an unfinished multipart upload cannot be read back portably: without every
            # recorded piece and the hash state, the upload starts again from its first byte.
            raise PartShort(self.where.final(self.key), 0, offset)
        if offset and committed.numbers + -(-(self.size - boundary) // self.part_bytes) >= MAX_PARTS:
            # Crashed writers used up the part numbers (each wastes its reservation): a new
            # multipart upload, from the first byte, is the only way to finish.
            log.warning("part numbers used up key=%s numbers=%s: the upload starts again", self.key, committed.numbers)
            raise PartShort(self.where.final(self.key), 0, offset)
        # Made at the first part or tail, not here: a writer whose client never sends a byte leaves
        # no multipart upload behind for the reaper to abort.
        self.session = committed.session
        self.digest = digest or sha256state.new_digest()
        self.offset = offset
        self.part_start = boundary
        self._filled_since: float | None = None
        self.spool_path, self.spool = self.store.spool.new_file(self.key)
        self._tails = [tail for tail in tails if tail.end <= offset]
        self._tail_state = committed.hash_state if self._tails else None
        for tail in self._tails:
            _check(interrupt)
            _write_all(self.spool, self._get(tail.name, tail.end - tail.start))
            self.bytes_read_back += tail.end - tail.start
        if boundary + self.bytes_read_back != offset:  # recorded tails always end at the offset
            raise PartShort(self.where.final(self.key), 0, offset)

    def _ensure_session(self) -> str:
        """The multipart upload, made when first needed; recorded by the next commit."""
        if not self.session:
            with _store_call():
                answer = self.where.client.create_multipart_upload(
                    Bucket=self.where.bucket, Key=self.where.final(self.key)
                )
            self.session = answer["UploadId"]
        return self.session

    def _get(self, name: str, length: int) -> bytes:
        try:
            with _store_call():
                body = self.where.client.get_object(Bucket=self.where.bucket, Key=name)["Body"].read()
        except botocore.exceptions.ClientError as exc:
            if _not_found(exc):
                raise PartShort(name, 0, length) from None
            raise
        if len(body) != length:
            raise PartShort(name, 0, length)
        return body

    # --- writing -------------------------------------------------------------------

    def _part_end(self) -> int:
        return min(self.part_start + self.part_bytes, self.size)

    def append(self, chunks) -> int:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                piece, view = view[: self._part_end() - self.offset], view[self._part_end() - self.offset :]
                if self._filled_since is None:
                    self._filled_since = time.monotonic()
                self.digest.update(piece)
                _write_all(self.spool, piece)
                self.offset += len(piece)
                if self.offset == self._part_end():
                    self._hand_off()
        return self.offset

    def _hand_off(self) -> None:
        """The filling part is whole: send it from the pool and start filling the next one."""
        with self._room:
            while sum(not future.done() for _piece, future in self._uploads) >= PARTS_IN_FLIGHT:
                self._room.wait(1.0)
            if self.numbers_used >= self.reserved:
                # Cannot happen while PART_NUMBERS_AHEAD exceeds the parts between two commits.
                raise StoreUnavailable("No part number is reserved for this writer yet; resume to go on.", 1)
            self._ensure_session()
            self.numbers_used += 1
            piece = Piece(Piece.PART, self.part_start, self.offset, number=self.numbers_used)
            self.spool.flush()
            future = self.store.pool.submit(self._send_part, piece, self.spool_path, self.spool)
            future.add_done_callback(self._part_done)
            self._uploads.append((piece, future))
            self._ends[piece.end] = self.hash_state()
            self._superseded[piece.number] = self._tails
            self._tails, self._tail_state = [], None
            self.part_start, self._filled_since = self.offset, None
            self.spool_path, self.spool = self.store.spool.new_file(self.key)

    def _send_part(self, piece: Piece, path: Path, spool) -> Piece:
        try:
            spool.seek(0)
            with _store_call(), _gone_as_missing(self.session):
                answer = self.where.client.upload_part(
                    Bucket=self.where.bucket,
                    Key=self.where.final(self.key),
                    UploadId=self.session,
                    PartNumber=piece.number,
                    Body=spool,
                    ContentLength=piece.end - piece.start,
                )
            return Piece(Piece.PART, piece.start, piece.end, number=piece.number, etag=answer["ETag"])
        finally:
            spool.close()
            path.unlink(missing_ok=True)

    def _part_done(self, _future: Future) -> None:
        with self._room:
            self._room.notify_all()

    # --- commits -------------------------------------------------------------------

    def checkpoint(self, full: bool = True) -> Checkpoint:
        """A full checkpoint is every byte (a tail object for the filling part's); else the last part or tail end."""
        if full or self.offset == self.part_start:
            return Checkpoint(self.offset, self.hash_state())
        if self._tails:
            return Checkpoint(self._tails[-1].end, self._tail_state, self._filled_since)
        return Checkpoint(self.part_start, self._ends.get(self.part_start), self._filled_since)

    def sync(self, checkpoint: Checkpoint | None = None) -> Durable:
        """Wait for the parts below the checkpoint; cover the rest of it with a tail. May report more than asked.

        A part handed off since the checkpoint was taken is waited for too, and
        the durable offset is then that part's end (with the state saved there).
        """
        checkpoint = checkpoint or self.checkpoint()
        target = checkpoint.offset
        self._delete_doomed()
        with self._lock:
            waiting = [pair for pair in self._uploads if pair[0].start < target]
        sent = [future.result() for _piece, future in waiting]  # a part's failure fails the commit
        with self._lock:
            self._uploads = [pair for pair in self._uploads if pair not in waiting]
            self._sent += sent
            if target <= self.part_start:
                # A boundary: the end of the part that holds the target byte, whole in the store now.
                offset = min((p.end for p in self._sent if p.end >= target), default=target)
                state = checkpoint.hash_state if offset == target else self._ends[offset]
                tails, gap = [], b""
            else:
                offset, state = target, checkpoint.hash_state
                tails = list(self._tails)
                start = tails[-1].end if tails else self.part_start
                # Copied under the lock: the spool file is the filling part's only until the next hand-off.
                gap = os.pread(self.spool.fileno(), target - start, start - self.part_start) if target > start else b""
            part_start = self.part_start
            pieces = [p for p in self._sent if p.end <= offset]
        if gap:
            tail = self._put_tail(offset - len(gap), offset, gap)
            tails.append(tail)
            with self._lock:
                if self.part_start == part_start:  # still the filling part's: later checkpoints may use it
                    self._tails.append(tail)
                    self._tail_state = state
                else:  # its part was handed off meanwhile: the part supersedes it too
                    number = next(p.number for p, _f in self._uploads if p.start == part_start)
                    self._superseded.setdefault(number, []).append(tail)
        with self._lock:
            session = self._ensure_session()
        return Durable(
            offset,
            state,
            session=session,
            pieces=(*pieces, *tails),
            numbers=self.numbers_used + PART_NUMBERS_AHEAD,
            made=(tail,) if gap else (),
        )

    def _put_tail(self, start: int, end: int, data: bytes) -> Piece:
        """Bytes [start, end) of the filling part as a create-only object: durable before their part is sent."""
        name = f"{self.where.tails(self.key)}{start}-{end}-{secrets.token_hex(4)}"
        with _store_call():
            self.where.client.put_object(Bucket=self.where.bucket, Key=name, Body=data, IfNoneMatch="*")
        return Piece(Piece.TAIL, start, end, name=name)

    def committed(self, durable: Durable) -> None:
        """The database recorded ``durable``: its parts are no longer ours to report, their tails may go."""
        recorded = {piece.number for piece in durable.pieces if piece.kind == Piece.PART}
        kept = {piece.name for piece in durable.pieces if piece.kind == Piece.TAIL}
        with self._lock:
            self._sent = [piece for piece in self._sent if piece.number not in recorded]
            for number in recorded:
                self._doomed += [t.name for t in self._superseded.pop(number, []) if t.name not in kept]
            for end in [end for end in self._ends if end <= durable.offset]:
                del self._ends[end]
            self.reserved = max(self.reserved, durable.numbers)
            doomed = bool(self._doomed)
        if doomed:  # called on the event loop: the deletes go to a thread, and a failed one is only a leftover
            self._deleting = self.store.pool.submit(self._delete_doomed)

    def fenced(self, durable: Durable) -> None:
        for piece in durable.made:
            try:
                with _store_call():
                    self.where.client.delete_object(Bucket=self.where.bucket, Key=piece.name)
            except Exception:  # the store is unreachable: fsck --repair finds the tail (leftover_tail)
                log.warning("a fenced writer could not delete its unrecorded tail %s", piece.name, exc_info=True)

    def _delete_doomed(self) -> None:
        with self._lock:
            doomed, self._doomed = self._doomed, []
        for name in doomed:
            try:
                self.where.client.delete_object(Bucket=self.where.bucket, Key=name)
            except Exception:  # a leftover tail is harmless: fsck and the reaper find it
                log.warning("could not delete an unneeded tail %s", name, exc_info=True)

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def hash_state(self) -> bytes | None:
        return self.digest.state() if isinstance(self.digest, sha256state.Sha256) else None

    # --- the end -------------------------------------------------------------------

    def finalize(self, committed: Committed | None = None) -> None:
        """Complete the multipart upload from the recorded parts only: the object appears whole or not at all."""
        parts = sorted((p for p in (committed.pieces if committed else ()) if p.kind == Piece.PART), key=_start)
        if _contiguous(parts, 0) != self.size or committed.session != self.session:
            raise PartShort(self.where.final(self.key), _contiguous(parts, 0), self.size)
        complete(self.where, self.key, self.session, parts, self.size)
        # Nothing of the upload but its object once it is complete: the deletes in flight, then the rest.
        if self._deleting is not None:
            self._deleting.result()
        self._delete_doomed()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.spool is not None:
            self.spool.close()
            self.spool_path.unlink(missing_ok=True)


def complete(where: Bucket, key: str, session: str, parts: list[Piece], size: int) -> None:
    """CompleteMultipartUpload with ``parts``; an answer lost or refused is decided by looking at the object."""
    listing = [{"PartNumber": part.number, "ETag": part.etag} for part in parts]
    try:
        with _store_call():
            where.client.complete_multipart_upload(
                Bucket=where.bucket,
                Key=where.final(key),
                UploadId=session,
                MultipartUpload={"Parts": listing},
                IfNoneMatch="*",
            )
        return
    except (StoreUnavailable, botocore.exceptions.ClientError) as exc:
        # Already completed (by us, with the answer lost, or by the writer that took over): the
        # object is there with every byte. Anything else keeps the upload resumable.
        if _object_size(where, key) == size:
            log.info("multipart completion answered %s but the object is whole key=%s", type(exc).__name__, key)
            return
        if _error_code(exc) == "NoSuchUpload":  # aborted under us (a DELETE): as a part file removed is
            raise FileNotFoundError(f"multipart upload {session} is gone") from exc
        raise


def _object_size(where: Bucket, key: str) -> int | None:
    try:
        with _store_call():
            return where.client.head_object(Bucket=where.bucket, Key=where.final(key))["ContentLength"]
    except botocore.exceptions.ClientError as exc:
        if _not_found(exc):
            return None
        raise


def _write_all(spool, data) -> None:
    view = memoryview(data)
    while view:
        view = view[spool.write(view) :]


def _start(piece: Piece) -> int:
    return piece.start


def _contiguous(pieces: list[Piece], start: int) -> int:
    """How far ``pieces`` (sorted) cover the bytes from ``start`` without a gap."""
    for piece in pieces:
        if piece.start != start:
            break
        start = piece.end
    return start


def _check(interrupt) -> None:
    if interrupt is not None and interrupt.is_set():
        raise Interrupted()


class S3Finished(FinishedReader):
    """A finished object read with ranged GETs, each pinned to the object's ETag (If-Match).

    The object's size and ETag come from one HEAD at open (FileNotFoundError
    there, before the download takes a slot). Reads are served from a window
    fetched with one ranged GET into a buffer of the reader's own, reused:
    memory stays at one window (at most WINDOW) per download, however large
    the file and however slowly its client reads. The first window is the
    size of the first read and each next one twice the last, up to WINDOW: a
    small Range costs a small GET, a whole file soon goes in WINDOW-sized
    ones. A deleted (or replaced) object ends the download at the next
    window (FileGone); the download's slot, revoked by the DELETE, ends it at
    the next block (uploads.downloads).
    """

    WINDOW = 8 * MiB

    def __init__(self, where: Bucket, key: str):
        self.where = where
        self.name = where.final(key)
        try:
            with _store_call():
                head = where.client.head_object(Bucket=where.bucket, Key=self.name)
        except botocore.exceptions.ClientError as exc:
            if _not_found(exc):
                raise FileNotFoundError(self.name) from None
            raise
        self.etag = head["ETag"]
        self.size = head["ContentLength"]
        self._buffer = bytearray()
        self._start, self._end = 0, 0  # the window: bytes [start, end) of the object, in _buffer[: end - start]

    def read(self, position: int, length: int) -> bytes:
        wanted = min(position + length, self.size) - position
        if wanted <= 0:
            return b""
        if not (self._start <= position and position + wanted <= self._end):
            span = max(wanted, min(self.WINDOW, 2 * (self._end - self._start)))
            self._fetch(position, min(span, self.size - position))
        offset = position - self._start
        # A copy: the buffer is refilled by the next window while this block may still be on its way.
        return bytes(memoryview(self._buffer)[offset : offset + wanted])

    def _fetch(self, position: int, length: int) -> None:
        self._start, self._end = 0, 0  # nothing valid while it is refilled
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        try:
            with _store_call():
                answer = self.where.client.get_object(
                    Bucket=self.where.bucket,
                    Key=self.name,
                    Range=f"bytes={position}-{position + length - 1}",
                    IfMatch=self.etag,
                )
                body = answer["Body"]
                with memoryview(self._buffer) as view, contextlib.closing(body):
                    filled = 0
                    while filled < length:
                        # A body that ends early raises (IncompleteReadError: StoreUnavailable).
                        got = body.readinto(view[filled:length])
                        if not got:
                            raise StoreUnavailable(f"{self.name}: the store sent {filled} of {length} bytes")
                        filled += got
        except botocore.exceptions.ClientError as exc:
            if _not_found(exc) or _error_code(exc) == "PreconditionFailed":
                raise FileGone(self.name) from None
            raise
        self._start, self._end = position, position + length

    def close(self) -> None:
        self._buffer = bytearray()
        self._start, self._end = 0, 0


class S3Storage(Storage):
    """See the module docstring. One per configuration: it owns the client and the part senders."""

    part_numbers_ahead = PART_NUMBERS_AHEAD

    def __init__(self, *, endpoint_url: str, bucket: str, prefix: str, region: str, spool_dir: Path):
        config = Config(
            # SigV4 for presigned URLs too (botocore presigns with the deprecated SigV2 unless told).
            signature_version="s3v4",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=64,
            # Payloads are not SHA-256 signed (botocore does that over plain http: 0.65 CPU s/GiB
            # measured here); a CRC32 checksum of every part and tail lets the store check the bytes.
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            request_checksum_calculation="when_supported",
            # A ranged read of a multipart object has no checksum to validate.
            response_checksum_validation="when_required",
        )
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, region_name=region or None, config=config
        )
        self.where = Bucket(client, bucket, prefix)
        self.endpoint_url = endpoint_url
        self.spool = Spool(Path(spool_dir))
        self.pool = _senders()

    # --- the writer ------------------------------------------------------------------

    def open_part(self, key, committed, size, interrupt=None) -> S3Part:
        return S3Part(self, key, committed, size, interrupt)

    def finished_digest(self, key, size, interrupt=None, hash_state=None) -> str | None:
        if _object_size(self.where, key) != size:
            return None
        if (resumed := sha256state.resumed_digest(size, hash_state)) is not None:
            return resumed.hexdigest()
        digest = hashlib.sha256()
        reader = S3Finished(self.where, key)
        try:
            for position in range(0, size, READ_BLOCK):
                _check(interrupt)
                digest.update(reader.read(position, READ_BLOCK))
        except FileGone:
            return None
        finally:
            reader.close()
        return digest.hexdigest()

    # --- downloads ---------------------------------------------------------------------

    def open_finished(self, key) -> S3Finished:
        return S3Finished(self.where, key)

    # nginx asks the store for the range the server decided (it cannot judge If-Range by our ETag).
    accel_answers_ranges = False
    # How long the presigned GET handed to nginx is valid: nginx uses it at once, so this only has to
    # cover a clock difference with the store; a response under way is not cut when it expires.
    accel_presign_seconds = 300

    def accel_path(self, key, answer) -> str:
        """``s3/[<range>/]<ETag>/<Last-Modified>`` + the path and query of a short-lived presigned GET of the object.

        deploy/nginx.conf.template's s3 location takes the range and the
        validators from the path (once it proxies, the server's headers are
        out of its reach), asks the store for that range with the signed URL
        and nothing of the client's request, and answers with the server's
        headers. The bucket stays private: the signature covers this object,
        this GET and the store's host, for ``accel_presign_seconds``.
        """
        url = urlsplit(
            self.where.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.where.bucket, "Key": self.where.final(key)},
                ExpiresIn=self.accel_presign_seconds,
            )
        )
        segments = [quote(answer["ETag"], safe=""), quote(answer["Last-Modified"], safe="")]
        if content_range := answer.get("Content-Range"):  # "bytes first-last/size"
            segments.insert(0, "bytes=" + content_range.removeprefix("bytes ").partition("/")[0])
        return "s3/" + "/".join(segments) + f"{url.path}?{url.query}"

    # --- every ending ----------------------------------------------------------------------

    def delete(self, key) -> bool:
        """The finished object, every tail and every multipart upload of ``key``: nothing of it is left."""
        where = self.where
        removed = self._delete_unfinished(key)
        if _object_size(where, key) is not None:
            with _store_call():
                where.client.delete_object(Bucket=where.bucket, Key=where.final(key))
            removed = True
        return removed

    def _list(self, prefix: str) -> Iterator[str]:
        paginator = self.where.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.where.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    # --- operations ----------------------------------------------------------------------

    def prepare(self) -> None:
        self.spool.clean()

    def sweep_spool(self) -> None:
        self.spool.clean()

    def problems(self) -> list[str]:
        """Try what a writer and the reaper will do, once, quickly: write, read, list and delete in the bucket."""
        found = []
        if not self.where.bucket:
            return ["DIRECTDRIVEX_S3_BUCKET is not set."]
        if not sha256state.available():
            found.append(
                "libcrypto's SHA256 functions are missing or failed their self-test: the s3 backend must save the "
                "sha256 state with every commit, because parts of an unfinished upload cannot be read back."
            )
        try:
            self.spool.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.spool.root):
                pass
        except OSError as exc:
            found.append(f"DIRECTDRIVEX_SPOOL_DIR ({self.spool.root}) cannot hold a part: {exc}.")
        # A client of its own: one attempt and short timeouts, so a bad endpoint stops start-up in seconds.
        probe = boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url or None,
            region_name=self.where.client.meta.region_name,
            config=Config(
                retries={"max_attempts": 1},
                connect_timeout=3,
                read_timeout=5,
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        name = f"{self.where.prefix}{CHECKS}/{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            # First: some stores (SeaweedFS) make a missing bucket on the first PUT into it.
            probe.head_bucket(Bucket=self.where.bucket)
            probe.put_object(Bucket=self.where.bucket, Key=name, Body=b"ddx", IfNoneMatch="*")
            probe.get_object(Bucket=self.where.bucket, Key=name)["Body"].read()
            probe.list_objects_v2(Bucket=self.where.bucket, Prefix=self.where.prefix, MaxKeys=1)
            probe.list_multipart_uploads(Bucket=self.where.bucket, Prefix=self.where.prefix, MaxUploads=1)
            probe.delete_object(Bucket=self.where.bucket, Key=name)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            found.append(f"the bucket {self.describe()} cannot be used: {type(exc).__name__}: {exc}")
        return found

    def describe(self) -> str:
        return f"s3://{self.where.bucket}/{self.where.prefix} at {self.endpoint_url or 'AWS'}"

    def capacity(self):
        return None  # a bucket does not say

    # fsck sees an upload's unfinished state (its multipart uploads and tails together) as one
    # entry named <prefix>partial/<key>, which exists no object of that name; finished files are
    # the objects under files/. Nothing is locked: fencing, not a lock, keeps a stale writer harmless.

    def _partial_name(self, key: str) -> str:
        return f"{self.where.prefix}{Area.PARTIAL}/{key}"

    def _partial_key(self, name: str) -> str | None:
        prefix = f"{self.where.prefix}{Area.PARTIAL}/"
        return name.removeprefix(prefix) if name.startswith(prefix) else None

    def entry_name(self, area, key) -> str:
        return self.where.final(key) if area == Area.FILES else self._partial_name(key)

    def entry_size(self, name) -> int | None:
        key = self._partial_key(name)
        if key is not None:
            return None if not self._key_sessions(key) and not self.tails(key) else 0
        try:
            with _store_call():
                return self.where.client.head_object(Bucket=self.where.bucket, Key=name)["ContentLength"]
        except botocore.exceptions.ClientError as exc:
            if _not_found(exc):
                return None
            raise

    def scan(self) -> Iterator[StoredEntry]:
        """Finished objects, one partial entry per key with sessions or tails, and anything else (strays)."""
        where = self.where
        files, tails, lost = f"{where.prefix}{Area.FILES}/", f"{where.prefix}tails/", f"{where.prefix}{LOST_AND_FOUND}/"
        entries: dict[str, StoredEntry] = {}
        with _store_call():
            for name in self._list(where.prefix):
                if name.startswith((lost, f"{where.prefix}{CHECKS}/")):
                    continue
                key = name.removeprefix(files) if name.startswith(files) else ""
                if key and "/" not in key:
                    entries[name] = StoredEntry(name, Area.FILES, key)
                elif name.startswith(tails) and name.count("/") - tails.count("/") == 1:
                    key = name.removeprefix(tails).split("/", 1)[0]
                    entries[self._partial_name(key)] = StoredEntry(self._partial_name(key), Area.PARTIAL, key)
                else:
                    entries[name] = StoredEntry(name)
            for session in self.sessions():
                name = self._partial_name(session.key)
                entries[name] = StoredEntry(name, Area.PARTIAL, session.key)
        for name in sorted(entries):
            yield entries[name]

    @contextlib.contextmanager
    def hold(self, name) -> Iterator["S3Held"]:
        if self.entry_size(name) is None:
            raise FileNotFoundError(name)
        yield S3Held(self, name)

    def move_aside(self, name, batch) -> str:
        """Copy to <prefix>fsck-lost+found/<batch>/<name under the prefix>, then delete; a partial entry is aborted."""
        key = self._partial_key(name)
        if key is not None:
            self._delete_unfinished(key)
            return f"(aborted: parts of an unfinished multipart upload cannot be kept) {name}"
        relative = name.removeprefix(self.where.prefix)
        target = f"{self.where.prefix}{LOST_AND_FOUND}/{batch}/{relative}"
        with _store_call():
            # The managed copy: a multipart copy for objects over 5 GB, no byte through this process.
            self.where.client.copy({"Bucket": self.where.bucket, "Key": name}, self.where.bucket, target)
            self.where.client.delete_object(Bucket=self.where.bucket, Key=name)
        return target

    # --- the pieces, for fsck and the reaper ------------------------------------------------------

    keeps_pieces = True

    def sessions(self, key: str = "") -> Iterator[Session]:
        # Listed by the store under the key's own name when one is asked for: one small request,
        # not every unfinished upload of the bucket.
        files = f"{self.where.prefix}{Area.FILES}/"
        paginator = self.where.client.get_paginator("list_multipart_uploads")
        with _store_call():
            for page in paginator.paginate(Bucket=self.where.bucket, Prefix=files + key):
                for upload in page.get("Uploads", []):
                    found = upload["Key"].removeprefix(files)
                    if not key or found == key:
                        yield Session(found, upload["UploadId"], upload["Initiated"])

    def _key_sessions(self, key: str) -> list[Session]:
        return list(self.sessions(key))

    def session_parts(self, key, session) -> dict[int, tuple[int, str]] | None:
        parts: dict[int, tuple[int, str]] = {}
        paginator = self.where.client.get_paginator("list_parts")
        try:
            with _store_call():
                for page in paginator.paginate(Bucket=self.where.bucket, Key=self.where.final(key), UploadId=session):
                    for part in page.get("Parts", []):
                        parts[part["PartNumber"]] = (part["Size"], part["ETag"])
        except botocore.exceptions.ClientError as exc:
            if _not_found(exc):
                return None
            raise
        return parts

    def tails(self, key) -> dict[str, tuple[int, datetime]]:
        found = {}
        paginator = self.where.client.get_paginator("list_objects_v2")
        with _store_call():
            for page in paginator.paginate(Bucket=self.where.bucket, Prefix=self.where.tails(key)):
                for item in page.get("Contents", []):
                    found[item["Key"]] = (item["Size"], item["LastModified"])
        return found

    def tail_keys(self) -> Iterator[str]:
        # From the objects themselves: a store built on a filer (SeaweedFS) keeps listing an emptied
        # "folder" as a common prefix after its last object is deleted.
        prefix = f"{self.where.prefix}tails/"
        keys = set()
        with _store_call():
            for name in self._list(prefix):
                key = name.removeprefix(prefix).split("/", 1)[0]
                if key not in keys:
                    keys.add(key)
                    yield key

    def abort_session(self, key, session) -> None:
        try:
            with _store_call():
                self.where.client.abort_multipart_upload(
                    Bucket=self.where.bucket, Key=self.where.final(key), UploadId=session
                )
        except botocore.exceptions.ClientError as exc:
            if not _not_found(exc):
                raise

    def delete_tail(self, name) -> None:
        with _store_call():
            self.where.client.delete_object(Bucket=self.where.bucket, Key=name)

    def _delete_unfinished(self, key: str) -> bool:
        removed = False
        for session in self._key_sessions(key):
            self.abort_session(key, session.session)
            removed = True
        for name in self.tails(key):
            self.delete_tail(name)
            removed = True
        return removed


class S3Held(Held):
    """An entry fsck looks at: no lock (fencing keeps stale writers harmless), the store's own operations."""

    def __init__(self, store: S3Storage, name: str):
        self.store = store
        self.name = name

    def size(self) -> int:
        return self.store.entry_size(self.name) or 0

    def truncate(self, size: int) -> None:
        raise StorageError("an object cannot be truncated; fsck rewinds unfinished s3 uploads instead")

    def unlink(self) -> None:
        key = self.store._partial_key(self.name)
        if key is not None:
            self.store._delete_unfinished(key)
            return
        with _store_call():
            self.store.where.client.delete_object(Bucket=self.store.where.bucket, Key=self.name)

    def move_aside(self, batch: str) -> str:
        return self.store.move_aside(self.name, batch)
