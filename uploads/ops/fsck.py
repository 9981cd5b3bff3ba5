"""Consistency of slots, upload rows and the files on disk: what `manage.py uploads fsck` finds and repairs.

Two phases. ``fsck_find`` looks and changes nothing; ``fsck_repair`` fixes each
finding after checking it again under the locks that matter, because anything
may have moved since it was found; ``fsck_run`` does both and records the run
(uploads.models.FsckRun, read by the admin dashboard and /metrics). What each
kind means and why its repair is the safe one: docs/operations.md, "fsck".

Rules every repair keeps:

* A live upload is never touched: one whose upload slot has a holder and an
  unexpired lease, or whose part file is flocked (a writer process has it
  open, whatever the database says: the storage backend's hold).
* A file that a row needs is never deleted (checked again right before), and a
  file nobody knows is never deleted either: it is moved to fsck-lost+found/.
* Lock order is the writer's: the file's flock first, then a short transaction
  (slot rows, then the upload row). No hashing or other slow file I/O inside a
  transaction.
* Every repair is a service call (slots_reap, slots_reset, upload_end, and
  fsck's own two, upload_rewind and upload_fail_lost, in
  uploads.services.uploads): fsck owns no transaction.
"""

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError
from django.db.models import TextChoices
from django.utils import timezone

from uploads import storage
from uploads.models import FsckRun, Slot, StoredPiece, Upload
from uploads.services.slots import slots_reap, slots_reset
from uploads.services.uploads import (
    store_abort_abandoned,
    store_delete_unrecorded_tail,
    store_leftover_cutoff,
    upload_end,
    upload_fail_lost,
    upload_rewind,
)
from uploads.storage import Area

log = logging.getLogger(__name__)

# FsckRun rows kept: the dashboard and /metrics read the newest; a few dozen are history enough.
KEEP_RUNS = 50
# Rows read per query and file names looked up per query: memory stays flat on big deployments.
PAGE = 1000
# What uploads.models.new_storage_key makes (secrets.token_hex(16)): a layout name with
# such a key but no row is an orphan of ours; any other name is a stray.
STORAGE_KEY = re.compile(r"[0-9a-f]{32}")


class Kind(TextChoices):
    STUCK_SLOT = "stuck_slot", "active slot whose lease ran out (its holder is gone)"
    SLOT_FOR_ENDED_UPLOAD = (
        "slot_for_ended_upload",
        "active upload slot of a complete, failed, cancelled or expired upload",
    )
    IDLE_EXPIRED = "idle_expired", "unfinished upload idle past DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS"
    MISSING_PART = "missing_part", "unfinished upload with durable bytes but no part file"
    PART_SHORT = "part_short", "part file shorter than the durable offset"
    PART_LONG = "part_long", "part file longer than the durable offset (bytes never committed)"
    MISSING_FILE = "missing_file", "complete upload without its file"
    FILE_SIZE_MISMATCH = "file_size_mismatch", "complete upload whose file has the wrong size"
    FILE_CHECKSUM_MISMATCH = "file_checksum_mismatch", "complete upload whose file does not hash to its sha256"
    LEFTOVER_PART = "leftover_part", "part file of an upload that is no longer uploading"
    LEFTOVER_FILE = "leftover_file", "file of a failed, cancelled or expired upload"
    ORPHAN_PART = "orphan_part", "part file without an upload row"
    ORPHAN_FILE = "orphan_file", "finished file without an upload row"
    STRAY = "stray", "entry outside the storage layout"
    ABANDONED_SESSION = (
        "abandoned_session",
        "multipart upload in the object store that no unfinished upload records (older than a lease and a margin)",
    )
    LEFTOVER_TAIL = "leftover_tail", "tail object in the object store that no commit records"
    EXTRA_PARTS = "extra_parts", "parts in an unfinished multipart upload that no commit records (a crashed writer's)"
    NOT_A_FILE = (
        "not_a_file",
        "something other than a regular file (a symlink, a folder, a device) where an upload's bytes belong",
    )


@dataclass
class Finding:
    """One problem: what it is, what it concerns, and (after a repair) what was done about it."""

    kind: str
    detail: str
    upload: str | None = None
    user: int | None = None
    slot: int | None = None
    path: str | None = None  # the storage entry's name (local: relative to the storage folder)
    action: str = ""
    # True once the problem is gone: repaired by this run, or resolved meanwhile by someone else.
    repaired: bool = False
    # What the finding was judged on, checked again before repairing; not part of the report.
    seen: dict = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        return {
            "kind": str(self.kind),
            "upload": self.upload,
            "user": self.user,
            "slot": self.slot,
            "path": self.path,
            "detail": self.detail,
            "action": self.action,
            "repaired": self.repaired,
        }

    def done(self, action: str, *, repaired: bool = True) -> None:
        self.action, self.repaired = action, repaired
        level = logging.INFO if repaired else logging.WARNING
        log.log(
            level,
            "fsck %s kind=%s upload=%s user=%s slot=%s path=%s: %s",
            "repaired" if repaired else "left",
            self.kind,
            self.upload or "-",
            self.user or "-",
            self.slot or "-",
            self.path or "-",
            action,
        )


@dataclass
class FsckReport:
    started_at: datetime
    repair: bool = False
    verify: bool = False
    findings: list[Finding] = field(default_factory=list)
    finished_at: datetime | None = None
    # Looked at: slots (active), uploads (rows) and files (entries under the storage folder).
    checked: dict = field(default_factory=lambda: {"slots": 0, "uploads": 0, "files": 0})
    # Unfinished uploads with a live writer, and files a writer process holds open: left alone.
    live_uploads: int = 0
    held_files: int = 0
    run_id: int | None = None

    @property
    def unrepaired(self) -> list[Finding]:
        return [finding for finding in self.findings if not finding.repaired]

    def add(self, kind: str, detail: str, **about) -> Finding:
        finding = Finding(kind, detail, **about)
        self.findings.append(finding)
        log.warning(
            "fsck found kind=%s upload=%s user=%s slot=%s path=%s: %s",
            kind,
            finding.upload or "-",
            finding.user or "-",
            finding.slot or "-",
            finding.path or "-",
            detail,
        )
        return finding

    def as_dict(self) -> dict:
        return {
            "run": self.run_id,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "repair": self.repair,
            "verify": self.verify,
            "storage_dir": storage.backend().describe(),
            "checked": self.checked,
            "live_uploads_left_alone": self.live_uploads,
            "held_files_left_alone": self.held_files,
            "found": len(self.findings),
            "repaired": len(self.findings) - len(self.unrepaired),
            "unrepaired": len(self.unrepaired),
            "findings": [finding.as_dict() for finding in self.findings],
        }


def fsck_run(*, repair: bool = False, verify: bool = False, now=None) -> FsckReport:
    """Find (and with ``repair``, fix) every inconsistency; record the run as an FsckRun row."""
    report = fsck_find(verify=verify, now=now)
    if repair:
        fsck_repair(report)
    report.finished_at = timezone.now()
    run = FsckRun.objects.create(
        started_at=report.started_at,
        finished_at=report.finished_at,
        repair=repair,
        verify=verify,
        findings=[finding.as_dict() for finding in report.findings],
    )
    report.run_id = run.pk
    keep = list(FsckRun.objects.order_by("-started_at", "-pk").values_list("pk", flat=True)[:KEEP_RUNS])
    FsckRun.objects.exclude(pk__in=keep).delete()
    log.info(
        "fsck run=%s repair=%s verify=%s found=%s unrepaired=%s",
        run.pk,
        repair,
        verify,
        len(report.findings),
        len(report.unrepaired),
    )
    return report


def fsck_last_run() -> FsckRun | None:
    """The newest recorded run (the dashboard and /metrics show its findings)."""
    return FsckRun.objects.order_by("-started_at", "-pk").first()


# --- finding ---------------------------------------------------------------------------


def fsck_find(*, verify: bool = False, now=None) -> FsckReport:
    """Everything that is inconsistent right now, slots first, then rows, then files. Changes nothing.

    Taking a file's flock for a moment to see whether a writer holds it is the
    one thing it does to the disk (a writer opening that very file then is told
    busy and retries).
    """
    now = now or timezone.now()
    report = FsckReport(started_at=now, verify=verify)
    _find_slots(report, now)
    _find_rows(report, now, verify)
    _find_files(report)
    return report


def _live_writers(now) -> set:
    """Uploads whose slot has a holder and a lease that has not run out: a writer is connected."""
    live = Slot.objects.live(now).filter(kind=Slot.Kind.UPLOAD).exclude(holder_channel="")
    return set(live.values_list("upload_id", flat=True))


def _find_slots(report: FsckReport, now) -> None:
    active = list(Slot.objects.active().select_related("upload").order_by("pk"))
    report.checked["slots"] = len(active)
    for slot in active:
        upload = slot.upload
        about = {"upload": str(slot.upload_id) if slot.upload_id else None, "user": slot.user_id, "slot": slot.pk}
        if slot.kind == Slot.Kind.UPLOAD and upload is not None and upload.status != Upload.Status.UPLOADING:
            # A download slot of a complete upload is normal; an upload slot of an ended one holds a place for nobody.
            report.add(
                Kind.SLOT_FOR_ENDED_UPLOAD,
                f"upload slot {slot.pk} is still active but its upload is {upload.status}"
                f" (holder {slot.holder_process or '-'} {slot.holder_channel or '-'})",
                **about,
            )
        elif slot.lease_expires_at <= now:
            if slot.holder_channel:
                holder = f"its holder {slot.holder_process or '?'} ({slot.holder_channel}) is gone or frozen"
            else:
                holder = "reserved by POST /api/uploads/ and never claimed by a connection"
            ago = int((now - slot.lease_expires_at).total_seconds())
            report.add(
                Kind.STUCK_SLOT,
                f"{slot.kind} slot {slot.pk}: lease ran out {ago} s ago; {holder}",
                **about,
            )


def _pages(queryset):
    """``queryset`` in primary-key order, PAGE rows per query (keyset pagination: no long-lived cursor)."""
    last = None
    while True:
        page = queryset.order_by("pk")
        if last is not None:
            page = page.filter(pk__gt=last)
        rows = list(page[:PAGE])
        if not rows:
            return
        yield from rows
        last = rows[-1].pk


def _find_rows(report: FsckReport, now, verify: bool) -> None:
    live = _live_writers(now)
    cutoff = now - timedelta(seconds=settings.DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS)
    rows = Upload.objects.only(
        "id", "owner_id", "status", "offset", "size", "sha256", "storage_key", "last_activity_at", "writer_generation"
    )
    for upload in _pages(rows):
        report.checked["uploads"] += 1
        if upload.status == Upload.Status.UPLOADING:
            if upload.pk in live:
                report.live_uploads += 1
                continue
            _find_unfinished(report, upload, cutoff)
        elif upload.status == Upload.Status.COMPLETE:
            _find_complete(report, upload, verify)
            _find_leftover(report, upload, "partial")
        else:
            _find_leftover(report, upload, "partial")
            _find_leftover(report, upload, "files")


def _about(upload: Upload, name: str | None = None) -> dict:
    about = {"upload": str(upload.pk), "user": upload.owner_id}
    if name is not None:
        about["path"] = name
    return about


def _part(upload: Upload) -> str:
    return storage.backend().entry_name(Area.PARTIAL, upload.storage_key)


def _file(upload: Upload) -> str:
    return storage.backend().entry_name(Area.FILES, upload.storage_key)


def _finished_in_place(upload: Upload) -> bool:
    """The writer stopped between the atomic rename and marking the upload complete: the next connection does that."""
    try:
        return storage.backend().entry_size(_file(upload)) == upload.size
    except storage.NotAFile:
        return False


def _find_unfinished(report: FsckReport, upload: Upload, cutoff) -> None:
    if upload.last_activity_at < cutoff:
        report.add(
            Kind.IDLE_EXPIRED,
            f"no bytes since {upload.last_activity_at.isoformat()} (expiry is "
            f"{settings.DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS} s); {upload.offset} of {upload.size} bytes received",
            **_about(upload),
        )
        return
    if storage.backend().keeps_pieces:
        _find_unfinished_pieces(report, upload)
        return
    path = _part(upload)
    try:
        with storage.backend().hold(path) as part:
            on_disk = part.size()
    except storage.PartLocked:
        report.held_files += 1  # a writer process has it open: it judges the file itself when it resumes
        return
    except storage.NotAFile as error:
        _add_not_a_file(report, upload, path, error)
        return
    except FileNotFoundError:
        if upload.offset > 0 and not _finished_in_place(upload):
            report.add(
                Kind.MISSING_PART,
                f"durable offset is {upload.offset} of {upload.size} bytes but there is no part file",
                **_about(upload, path),
                seen={"offset": upload.offset},
            )
        return
    if on_disk < upload.offset:
        report.add(
            Kind.PART_SHORT,
            f"part file holds {on_disk} bytes, durable offset is {upload.offset}",
            **_about(upload, path),
            seen={"offset": upload.offset},
        )
    elif on_disk > upload.offset:
        report.add(
            Kind.PART_LONG,
            f"part file holds {on_disk} bytes, durable offset is {upload.offset}: "
            f"{on_disk - upload.offset} bytes were written but never committed",
            **_about(upload, path),
        )


def _find_unfinished_pieces(report: FsckReport, upload: Upload) -> None:
    """An object store: the recorded multipart upload, parts and tails against what the bucket holds.

    Also the store's leftovers of this upload that no commit records: other
    multipart uploads and tails, once older than a lease and a margin (a
    writer records what it makes at its next commit, seconds later).
    """
    backend, key, path = storage.backend(), upload.storage_key, _part(upload)
    cutoff = store_leftover_cutoff(report.started_at)
    for session in backend.sessions(key):
        if session.session != upload.store_session and session.started < cutoff:
            report.add(
                Kind.ABANDONED_SESSION,
                f"multipart upload {session.session} started {session.started.isoformat()} is not the recorded one",
                **_about(upload, path),
                seen={"key": key, "session": session.session},
            )
    recorded = list(StoredPiece.objects.filter(upload_id=upload.pk, end__lte=upload.offset))
    in_store = backend.tails(key)
    names = {piece.name for piece in recorded}
    for name, (_size, written) in sorted(in_store.items()):
        if name not in names and written < cutoff:
            report.add(Kind.LEFTOVER_TAIL, "a tail object no commit records", **_about(upload, name), seen={"key": key})
    if upload.offset == 0:
        return
    missing = []
    parts = backend.session_parts(key, upload.store_session) if upload.store_session else None
    if parts is None:
        missing.append(f"its multipart upload {upload.store_session or '(none recorded)'} is gone")
    for piece in recorded:
        if piece.kind == StoredPiece.Kind.PART and parts is not None:
            if parts.get(piece.number) != (piece.end - piece.start, piece.etag):
                missing.append(f"part {piece.number} (bytes {piece.start}-{piece.end}) is missing or different")
        elif piece.kind == StoredPiece.Kind.TAIL and in_store.get(piece.name, (None,))[0] != piece.end - piece.start:
            missing.append(f"tail {piece.name} (bytes {piece.start}-{piece.end}) is missing or different")
    extra = sorted(set(parts or ()) - {piece.number for piece in recorded if piece.kind == StoredPiece.Kind.PART})
    if extra:
        report.add(
            Kind.EXTRA_PARTS,
            f"{len(extra)} part(s) of multipart upload {upload.store_session} no commit records "
            f"(numbers {', '.join(map(str, extra[:10]))}{'…' if len(extra) > 10 else ''})",
            **_about(upload, path),
        )
    if missing and not _finished_in_place(upload):
        report.add(
            Kind.MISSING_PART if parts is None else Kind.PART_SHORT,
            f"durable offset is {upload.offset} of {upload.size} bytes but " + "; ".join(missing[:5]),
            **_about(upload, path),
            # Parts of an unfinished multipart upload cannot be read back to hash: the upload restarts at 0.
            seen={"offset": upload.offset, "to": 0},
        )


def _find_complete(report: FsckReport, upload: Upload, verify: bool) -> None:
    path = _file(upload)
    try:
        on_disk = storage.backend().entry_size(path)
    except storage.NotAFile as error:
        _add_not_a_file(report, upload, path, error)
        return
    if on_disk is None:
        report.add(Kind.MISSING_FILE, f"complete upload of {upload.size} bytes has no file", **_about(upload, path))
        return
    if on_disk != upload.size:
        report.add(
            Kind.FILE_SIZE_MISMATCH,
            f"the file holds {on_disk} bytes, the upload is {upload.size}",
            **_about(upload, path),
        )
        return
    if verify and upload.sha256:
        # Outside any transaction, in bounded blocks: a big file takes a while.
        digest = storage.backend().finished_digest(upload.storage_key, upload.size)
        if digest is not None and digest != upload.sha256:
            report.add(
                Kind.FILE_CHECKSUM_MISMATCH,
                f"the file hashes to {digest}, the upload's sha256 is {upload.sha256}",
                **_about(upload, path),
            )


def _find_leftover(report: FsckReport, upload: Upload, area: str) -> None:
    """Bytes an ended upload no longer needs: its ending stopped between the commit and the delete."""
    path = _part(upload) if area == Area.PARTIAL else _file(upload)
    try:
        if not _is_unheld_file(report, path):
            return
    except storage.NotAFile as error:
        _add_not_a_file(report, upload, path, error)
        return
    kind = Kind.LEFTOVER_PART if area == Area.PARTIAL else Kind.LEFTOVER_FILE
    what = "a part file" if area == Area.PARTIAL else "a file"
    report.add(
        kind,
        f"the upload is {upload.status} but still has {what}",
        **_about(upload, path),
        seen={"area": area, "key": upload.storage_key},
    )


def _add_not_a_file(report: FsckReport, upload: Upload, name: str, error: storage.NotAFile) -> None:
    """Never followed, opened or deleted: reported, and moved aside by --repair (as a stray is)."""
    report.add(Kind.NOT_A_FILE, f"{error.what} where the upload's bytes belong", **_about(upload, name))


def _is_unheld_file(report: FsckReport, name: str) -> bool:
    """Whether the entry ``name`` exists and no writer holds it (a held one is counted and left alone).

    NotAFile: something other than a regular file is there.
    """
    try:
        with storage.backend().hold(name):
            return True
    except storage.PartLocked:
        report.held_files += 1
        return False
    except FileNotFoundError:
        return False


def _find_files(report: FsckReport) -> None:
    # The disk first, then the rows: a file's row is committed before the file is
    # made (upload_create, then writer_admit, then open_part), so a file whose row
    # is missing after the scan is an orphan, not a file being born.
    entries = list(storage.backend().scan())
    report.checked["files"] = len(entries)
    reported = {finding.path for finding in report.findings if finding.path}
    for start in range(0, len(entries), PAGE):
        batch = entries[start : start + PAGE]
        keys = {entry.key for entry in batch if entry.key}
        known = set(Upload.objects.filter(storage_key__in=keys).values_list("storage_key", flat=True))
        for entry in batch:
            if entry.key in known or entry.name in reported:
                continue  # the row checks judged it
            if entry.key and STORAGE_KEY.fullmatch(entry.key):
                try:
                    if not _is_unheld_file(report, entry.name):
                        continue
                except storage.NotAFile:
                    continue  # replaced since the scan: the next run judges what is there
                kind = Kind.ORPHAN_PART if entry.area == Area.PARTIAL else Kind.ORPHAN_FILE
                detail = f"no upload has the storage key {entry.key}"
            else:
                kind = Kind.STRAY
                what = "folder" if entry.is_folder else "file"
                detail = f"a {what} outside the storage layout (partial/<key>.part, files/<key>)"
            report.add(kind, detail, path=entry.name, seen={"area": entry.area, "key": entry.key})


# --- repairing ---------------------------------------------------------------------------


def fsck_repair(report: FsckReport) -> None:
    """Fix every finding of ``report`` in the safest way, each checked again first; says what it did on each.

    A repair that fails (a disk or database error) is logged and left unrepaired;
    the others go on.
    """
    report.repair = True
    batch = timezone.now().strftime("%Y%m%dT%H%M%S.%fZ")  # one folder per run in fsck-lost+found/
    stuck = [finding for finding in report.findings if finding.kind == Kind.STUCK_SLOT]
    for finding in list(report.findings):
        try:
            if finding.kind == Kind.STUCK_SLOT:
                if finding is stuck[0]:
                    _repair_stuck(report, stuck)
            else:
                REPAIRS[finding.kind](finding, batch)
        except (OSError, DatabaseError, storage.StorageError) as exc:
            log.exception("fsck repair failed kind=%s upload=%s path=%s", finding.kind, finding.upload, finding.path)
            finding.done(f"repair failed: {exc}", repaired=False)


def _repair_stuck(report: FsckReport, stuck: list[Finding]) -> None:
    """slots_reap: releases every slot whose lease has run out now (checked under row locks) and fences its holder."""
    reaped = {slot.pk: slot for slot in slots_reap()}
    for finding in stuck:
        if reaped.pop(finding.slot, None) is not None:
            finding.done("released (lease expired) and its holder fenced off; the upload can resume")
            continue
        slot = Slot.objects.filter(pk=finding.slot).first()
        if slot is None or slot.released_at is not None:
            reason = slot.release_reason if slot is not None else "deleted"
            finding.done(f"nothing to do: the slot was released meanwhile ({reason})")
        else:
            finding.done("nothing to do: its lease was renewed meanwhile, the holder is alive")
    for slot in reaped.values():  # became stuck between the look and the repair
        finding = report.add(
            Kind.STUCK_SLOT,
            f"{slot.kind} slot {slot.pk}: lease ran out while fsck ran",
            upload=str(slot.upload_id) if slot.upload_id else None,
            user=slot.user_id,
            slot=slot.pk,
        )
        finding.done("released (lease expired) and its holder fenced off; the upload can resume")


def _repair_slot_for_ended_upload(finding: Finding, batch: str) -> None:
    # slots_reset by id, not slots_revoke_for_upload: the upload's download slots (a
    # complete file being served) are not ours to end.
    if slots_reset(ids=[finding.slot]):
        finding.done("released (reason reset); a connection still holding it is told to close")
    else:
        finding.done("nothing to do: the slot was released meanwhile")


def _has_live_writer(upload_id, now=None) -> bool:
    now = now or timezone.now()
    return Slot.objects.live(now).filter(upload_id=upload_id, kind=Slot.Kind.UPLOAD).exclude(holder_channel="").exists()


def _upload_or_gone(finding: Finding) -> Upload | None:
    upload = Upload.objects.filter(pk=finding.upload).first()
    if upload is None:
        finding.done("nothing to do: the upload was deleted meanwhile")
    return upload


LIVE_WRITER = "left alone: a writer connected meanwhile (live slot)"
HELD_BY_WRITER = "left alone: a writer process has the file open (flock held); run fsck again later"


def _repair_idle_expired(finding: Finding, batch: str) -> None:
    """upload_end, as `uploads expire` does: slot released, writer fenced, bytes deleted, status expired."""
    upload = _upload_or_gone(finding)
    if upload is None:
        return
    if _has_live_writer(upload.pk):
        finding.done(LIVE_WRITER, repaired=False)
        return
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS)
    try:
        with storage.backend().hold(_part(upload)):
            ended = upload_end(upload, Upload.Status.EXPIRED, Slot.ReleaseReason.EXPIRED, idle_since=cutoff, now=now)
    except storage.PartLocked:
        finding.done(HELD_BY_WRITER, repaired=False)
        return
    except FileNotFoundError:  # no bytes on disk yet: nothing for a writer to hold
        ended = upload_end(upload, Upload.Status.EXPIRED, Slot.ReleaseReason.EXPIRED, idle_since=cutoff, now=now)
    if ended:
        finding.done("expired: its slot released, writer fenced off and bytes deleted (as `uploads expire` does)")
    else:
        finding.done("nothing to do: it was written to or ended meanwhile")


def _repair_short(finding: Finding, batch: str) -> None:
    """missing_part, part_short: resume from what is on disk (the bytes past it are lost; the client re-sends them)."""
    upload = _upload_or_gone(finding)
    if upload is None:
        return
    expected = finding.seen["offset"]
    if "to" in finding.seen:  # an object store: nothing to hold, the rewind's checks under the row locks suffice
        on_disk = finding.seen["to"]
        if upload_rewind(upload.pk, expected=expected, to=on_disk):
            finding.done(
                f"durable offset moved back from {expected} to {on_disk}: the client sends the file again from "
                "there when it resumes (the parts left behind are aborted with their multipart upload)"
            )
        elif _has_live_writer(upload.pk):
            finding.done(LIVE_WRITER, repaired=False)
        else:
            finding.done("nothing to do: the offset moved or the upload ended meanwhile")
        return
    try:
        with storage.backend().hold(_part(upload)) as part:
            on_disk = part.size()
            rewound = on_disk < expected and upload_rewind(upload.pk, expected=expected, to=on_disk)
    except storage.PartLocked:
        finding.done(HELD_BY_WRITER, repaired=False)
        return
    except FileNotFoundError:
        # No file, so no flock to take: upload_rewind's checks under the row locks
        # and its new generation stop a writer admitted meanwhile.
        on_disk = 0
        rewound = upload_rewind(upload.pk, expected=expected, to=0)
    if rewound:
        finding.done(
            f"durable offset moved back from {expected} to {on_disk}: bytes {on_disk}-{expected} were lost "
            f"and the client sends them again when it resumes"
        )
    elif _has_live_writer(upload.pk):
        finding.done(LIVE_WRITER, repaired=False)
    elif on_disk >= expected:
        finding.done("nothing to do: the part file holds the durable bytes now")
    else:
        finding.done("nothing to do: the offset moved or the upload ended meanwhile")


def _repair_long(finding: Finding, batch: str) -> None:
    """part_long: truncate to the durable offset, as the next writer would on opening it; frees the space."""
    upload = _upload_or_gone(finding)
    if upload is None:
        return
    try:
        with storage.backend().hold(_part(upload)) as part:
            if _has_live_writer(upload.pk):
                finding.done(LIVE_WRITER, repaired=False)
                return
            # Under the flock the offset cannot move: a writer commits only while it holds the file.
            unfinished = Upload.objects.filter(pk=upload.pk, status=Upload.Status.UPLOADING)
            offset = unfinished.values_list("offset", flat=True).first()
            if offset is None:
                finding.done("nothing to do: the upload ended meanwhile (its part file is a leftover now)")
                return
            on_disk = part.size()
            if on_disk <= offset:
                finding.done("nothing to do: the part file no longer runs past the durable offset")
                return
            part.truncate(offset)
    except storage.PartLocked:
        finding.done(HELD_BY_WRITER, repaired=False)
        return
    except FileNotFoundError:
        finding.done("nothing to do: the part file was removed meanwhile")
        return
    finding.done(f"truncated from {on_disk} to the durable offset {offset} (bytes past it were never durable)")


def _repair_lost(finding: Finding, batch: str) -> None:
    """missing_file, file_size_mismatch, file_checksum_mismatch: the upload becomes failed, a wrong file set aside."""
    upload = _upload_or_gone(finding)
    if upload is None:
        return
    path = _file(upload)
    on_disk = storage.backend().entry_size(path)
    if finding.kind == Kind.FILE_SIZE_MISMATCH and on_disk == upload.size:
        finding.done("nothing to do: the file has the right size now")
        return
    if finding.kind == Kind.MISSING_FILE and on_disk is not None:
        finding.done("nothing to do: the file is in place now")
        return
    if upload_fail_lost(upload.pk, upload.storage_key) is None:
        finding.done("nothing to do: the upload changed or was deleted meanwhile")
        return
    action = "marked failed: its bytes are lost and the user must upload the file again"
    if on_disk is not None:
        moved = storage.backend().move_aside(path, batch)
        action += f"; the wrong file was moved to {moved}"
    finding.done(action)


def _still_needed(key: str, area: str) -> bool:
    """Whether a row needs the file: a part file while uploading; a finished one while uploading or complete."""
    statuses = [Upload.Status.UPLOADING] if area == "partial" else [Upload.Status.UPLOADING, Upload.Status.COMPLETE]
    return Upload.objects.filter(storage_key=key, status__in=statuses).exists()


def _repair_unowned(finding: Finding, batch: str) -> None:
    """leftover_*, orphan_*: under the file's flock, and only if no row needs it (checked again).

    Deleted: part files (fragments nobody can resume or serve) and the files of
    ended uploads (their ending meant to delete them). Moved aside: finished
    files without any row (after a database restore they are someone's data).
    """
    key, area = finding.seen["key"], finding.seen["area"]
    try:
        with storage.backend().hold(finding.path) as held:
            if _still_needed(key, area):
                finding.done("left alone: an upload needs this file")
                return
            if finding.kind == Kind.ORPHAN_FILE:
                moved = held.move_aside(batch)
                action = f"moved to {moved} (a finished file nobody owns; review, then delete)"
            else:
                held.unlink()
                action = "deleted"
    except storage.PartLocked:
        finding.done(HELD_BY_WRITER, repaired=False)
        return
    except FileNotFoundError:
        finding.done("nothing to do: the file was removed meanwhile")
        return
    finding.done(action)


def _repair_stray(finding: Finding, batch: str) -> None:
    """stray, not_a_file: never deleted, never followed: moved aside, as it is, for an operator to look at."""
    try:
        moved = storage.backend().move_aside(finding.path, batch)
    except FileNotFoundError:
        finding.done("nothing to do: it was removed meanwhile")
        return
    finding.done(f"moved to {moved} (review, then delete)")


def _repair_abandoned_session(finding: Finding, batch: str) -> None:
    if store_abort_abandoned(finding.seen["key"], finding.seen["session"]):
        finding.done("aborted: its parts are gone from the store (no upload needed them)")
    else:
        finding.done("left alone: an upload records it now")


def _repair_extra_parts(finding: Finding, batch: str) -> None:
    # S3 has no call to delete one part; completion leaves out every part it is not given.
    finding.done("nothing to remove: the completion uses only the recorded parts, and the store drops the rest then")


def _repair_leftover_tail(finding: Finding, batch: str) -> None:
    if store_delete_unrecorded_tail(finding.seen["key"], finding.path):
        finding.done("deleted (no commit recorded it)")
    else:
        finding.done("left alone: a commit records it now")


REPAIRS = {
    Kind.ABANDONED_SESSION: _repair_abandoned_session,
    Kind.LEFTOVER_TAIL: _repair_leftover_tail,
    Kind.EXTRA_PARTS: _repair_extra_parts,
    Kind.SLOT_FOR_ENDED_UPLOAD: _repair_slot_for_ended_upload,
    Kind.IDLE_EXPIRED: _repair_idle_expired,
    Kind.MISSING_PART: _repair_short,
    Kind.PART_SHORT: _repair_short,
    Kind.PART_LONG: _repair_long,
    Kind.MISSING_FILE: _repair_lost,
    Kind.FILE_SIZE_MISMATCH: _repair_lost,
    Kind.FILE_CHECKSUM_MISMATCH: _repair_lost,
    Kind.LEFTOVER_PART: _repair_unowned,
    Kind.LEFTOVER_FILE: _repair_unowned,
    Kind.ORPHAN_PART: _repair_unowned,
    Kind.ORPHAN_FILE: _repair_unowned,
    Kind.STRAY: _repair_stray,
    Kind.NOT_A_FILE: _repair_stray,
}
