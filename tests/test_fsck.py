"""`manage.py uploads fsck`: corrupted state is found by kind, repaired safely, live uploads are left alone.

Each kind of corruption is made on purpose (through the services, then broken
by hand on disk or in a row, as a crash, a disk or an operator would break it),
then fsck must report it with its specific kind, ``--repair`` must fix it, and
a second run must find nothing. A writer that holds its part file (a real
flock, here or in another process) is never touched. The last test does it all
against real servers: a holder killed with SIGKILL, a paused upload that stays
connected through the repair and then completes.
"""

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from tests.conftest import finish_upload, write_part
from tests.support.live_backend import live_backend
from tests.support.live_server import ROOT, LiveServer
from tests.test_live_faults import send_until
from tests.test_live_server import create_upload, part_files, receive, stream, upload_detail, ws_connect
from uploads import signals, storage
from uploads.models import FsckRun, Slot, Upload
from uploads.ops.fsck import KEEP_RUNS, Kind, fsck_find, fsck_repair, fsck_run
from uploads.services.grants import writer_admit, writer_commit, writer_complete, writer_release
from uploads.services.quota import quota_used
from uploads.services.slots import lease_duration, slot_admit
from uploads.services.uploads import upload_create, upload_end
from uploads.storage import local

# The local layout's findings and repairs: files planted, truncated, linked and moved aside in the folder.
# (fsck on s3 is tested in tests/test_storage_s3.py.)
pytestmark = pytest.mark.local_storage

KiB = 1024
MiB = 1024 * KiB


# --- making state, and breaking it ---------------------------------------------------------


@pytest.fixture
def long_ago():
    """A moment whose leases have long run out (but far from the upload expiry)."""
    return timezone.now() - 2 * lease_duration()


def paused_upload(user, committed: bytes, *, ahead: bytes = b"", size: int | None = None, now=None) -> Upload:
    """An unfinished upload whose writer made ``committed`` durable, wrote ``ahead`` past it, and went away.

    Its slot is released (the connection ended), as after a client disconnect.
    """
    size = size or len(committed) + len(ahead) + 100
    upload, _slot = upload_create(user, filename="paused.bin", size=size, now=now)
    grant = writer_admit(user, upload.pk, f"test.writer!{upload.pk.hex}", now=now)
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    try:
        if committed:
            part.append([committed])
            part.sync()
            writer_commit(grant, len(committed), now=now)
        if ahead:
            part.append([ahead])  # written, never committed: what a writer killed between two commits leaves
    finally:
        part.close()
    writer_release(grant, Slot.ReleaseReason.DISCONNECTED, now=now)
    return Upload.objects.get(pk=upload.pk)


class LiveWriter:
    """A connected writer in this process: a live slot through writer_admit, and the part file's flock."""

    def __init__(self, user, data: bytes, *, committed: int, written: int):
        upload, _slot = upload_create(user, filename="live.bin", size=len(data))
        self.user, self.data, self.upload_id = user, data, upload.pk
        self.grant = writer_admit(user, upload.pk, "live.writer!1")
        self.part = storage.backend().open_part(self.grant.storage_key, self.grant.committed(), self.grant.size)
        self.part.append([data[:committed]])
        self.part.sync()
        writer_commit(self.grant, committed)
        self.part.append([data[committed:written]])  # ahead of the durable offset, as a writer is between commits

    def snapshot(self):
        upload = Upload.objects.get(pk=self.upload_id)
        slot = Slot.objects.get(pk=self.grant.slot_id)
        on_disk = local.part_path(self.grant.storage_key).read_bytes()
        return (upload.offset, upload.status, upload.writer_generation, slot.released_at, slot.generation, on_disk)

    def finish(self):
        """Write the rest, commit and finalize under the same grant: it was never fenced."""
        self.part.append([self.data[self.part.offset :]])
        writer_commit(self.grant, len(self.data))
        self.part.finalize()
        self.part.close()
        writer_complete(self.grant, sha256=hashlib.sha256(self.data).hexdigest())

    def close(self):
        self.part.close()


@pytest.fixture
def live_writer(alice):
    writers = []

    def start(data: bytes, *, committed: int, written: int) -> LiveWriter:
        writer = LiveWriter(alice, data, committed=committed, written=written)
        writers.append(writer)
        return writer

    yield start
    for writer in writers:
        writer.close()


def stuck_writer(user, long_ago) -> Upload:
    """An upload whose writer's process died a while ago: its slot has a holder and a lease long run out.

    Make it last: every later admission reaps expired leases.
    """
    upload, _slot = upload_create(user, filename="stuck.bin", size=100, now=long_ago)
    writer_admit(user, upload.pk, "dead.writer!1", now=long_ago)
    return Upload.objects.get(pk=upload.pk)


def idle_upload(user, *, idle_for: timedelta) -> Upload:
    """An unfinished upload with bytes on disk whose client left ``idle_for`` ago."""
    upload = paused_upload(user, b"i" * 10, now=timezone.now() - idle_for)
    return upload


def flip_byte(path, position: int = 0) -> None:
    with open(path, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)
        handle.seek(position)
        handle.write(bytes([byte[0] ^ 0xFF]))


def orphan_key() -> str:
    return os.urandom(16).hex()


def found(report) -> list[tuple[str, str | None]]:
    """(kind, upload or path) of every finding, sorted: what a test compares."""
    return sorted((str(f.kind), f.upload or f.path) for f in report.findings)


def repaired_and_clean(*, verify: bool = False):
    """Repair, assert every finding was repaired, and that a second repair run finds nothing."""
    report = fsck_run(repair=True, verify=verify)
    assert report.findings, "nothing to repair"
    assert not report.unrepaired, [f.as_dict() for f in report.unrepaired]
    again = fsck_run(repair=True, verify=verify)
    assert again.findings == [], [f.as_dict() for f in again.findings]
    return report


def lost_and_found_files() -> dict[str, bytes]:
    base = local.lost_and_found()
    return {str(p.relative_to(base)).split("/", 1)[1]: p.read_bytes() for p in base.rglob("*") if p.is_file()}


def fsck_command(*args) -> tuple[int, str]:
    """`manage.py uploads fsck …` in this process: (exit code, stdout)."""
    out = StringIO()
    try:
        call_command("uploads", "fsck", *args, stdout=out)
    except CommandError as error:
        return error.returncode, out.getvalue()
    return 0, out.getvalue()


# --- a consistent deployment ----------------------------------------------------------------


def test_a_consistent_deployment_has_no_findings_and_the_run_is_recorded(alice, bob, live_writer):
    finish_upload(alice, b"done" * 100, sha256=hashlib.sha256(b"done" * 100).hexdigest())
    paused_upload(bob, b"p" * 50)
    live_writer(os.urandom(64 * KiB), committed=16 * KiB, written=40 * KiB)
    upload_create(bob, filename="reserved.bin", size=10)  # POST's slot, no connection yet

    report = fsck_run(verify=True)

    assert report.findings == []
    assert report.live_uploads == 1
    run = FsckRun.objects.get(pk=report.run_id)
    assert (run.findings, run.repair, run.verify) == ([], False, True)
    assert run.finished_at >= run.started_at


# --- one kind at a time ---------------------------------------------------------------------


def test_a_killed_holder_past_its_lease_is_a_stuck_slot_and_repair_reaps_it_and_fences_the_writer(alice, long_ago):
    upload = stuck_writer(alice, long_ago)
    slot = Slot.objects.active().get(upload=upload)

    report = fsck_run()

    assert found(report) == [(Kind.STUCK_SLOT, str(upload.pk))]
    assert report.findings[0].slot == slot.pk
    assert Slot.objects.get(pk=slot.pk).released_at is None  # finding changes nothing

    repaired_and_clean()
    slot.refresh_from_db()
    assert slot.release_reason == Slot.ReleaseReason.EXPIRED
    assert Upload.objects.get(pk=upload.pk).writer_generation > upload.writer_generation
    assert writer_admit(alice, upload.pk, "next.writer!1").offset == 0  # the upload resumes


def test_a_deleted_part_file_is_missing_part_and_repair_rewinds_the_upload_to_zero(alice):
    upload = paused_upload(alice, b"m" * 100)
    local.part_path(upload.storage_key).unlink()

    assert found(fsck_find()) == [(Kind.MISSING_PART, str(upload.pk))]

    repaired_and_clean()
    after = Upload.objects.get(pk=upload.pk)
    assert (after.offset, after.status) == (0, "uploading")
    assert after.writer_generation == upload.writer_generation + 1  # grants issued before the rewind are fenced
    assert writer_admit(alice, upload.pk, "next.writer!1").offset == 0


@pytest.mark.parametrize("how", ["file truncated", "offset set beyond the file"])
def test_an_offset_beyond_the_part_file_is_part_short_and_repair_resumes_from_what_is_on_disk(alice, how):
    data = os.urandom(100)
    upload = paused_upload(alice, data, size=200)
    path = local.part_path(upload.storage_key)
    if how == "file truncated":
        os.truncate(path, 40)
    else:
        write_part(upload.storage_key, data[:40])
        Upload.objects.filter(pk=upload.pk).update(offset=100)

    assert found(fsck_find()) == [(Kind.PART_SHORT, str(upload.pk))]

    repaired_and_clean()
    assert Upload.objects.get(pk=upload.pk).offset == 40
    grant = writer_admit(alice, upload.pk, "next.writer!1")
    part = storage.backend().open_part(
        grant.storage_key, grant.committed(), grant.size
    )  # resumes: no PartFileShort any more
    try:
        assert part.hexdigest() == hashlib.sha256(data[:40]).hexdigest()
    finally:
        part.close()


def test_bytes_written_past_the_durable_offset_by_a_dead_writer_are_part_long_and_truncated(alice):
    upload = paused_upload(alice, b"c" * 40, ahead=b"a" * 60)
    path = local.part_path(upload.storage_key)

    assert found(fsck_find()) == [(Kind.PART_LONG, str(upload.pk))]
    assert path.stat().st_size == 100

    repaired_and_clean()
    assert path.read_bytes() == b"c" * 40
    assert Upload.objects.get(pk=upload.pk).offset == 40


def test_an_unfinished_upload_idle_past_expiry_is_expired_with_its_bytes_and_slot(alice, limits):
    limits(upload_expiry_seconds=3600)
    idle = idle_upload(alice, idle_for=timedelta(hours=2))
    fresh = idle_upload(alice, idle_for=timedelta(minutes=30))
    assert local.part_path(idle.storage_key).exists()

    assert found(fsck_find()) == [(Kind.IDLE_EXPIRED, str(idle.pk))]

    repaired_and_clean()
    assert Upload.objects.get(pk=idle.pk).status == "expired"
    assert not local.part_path(idle.storage_key).exists()
    assert Upload.objects.get(pk=fresh.pk).status == "uploading"
    assert local.part_path(fresh.storage_key).exists()


def test_a_complete_upload_whose_file_is_gone_is_marked_failed_and_stops_counting_toward_the_quota(
    alice, django_capture_on_commit_callbacks
):
    upload = finish_upload(alice, b"x" * 1000)
    local.final_path(upload.storage_key).unlink()

    assert found(fsck_find()) == [(Kind.MISSING_FILE, str(upload.pk))]

    failed = []
    signals.upload_failed.connect(lambda **kwargs: failed.append(kwargs), weak=False, dispatch_uid="fsck-test")
    try:
        with django_capture_on_commit_callbacks(execute=True):
            report = repaired_and_clean()
    finally:
        signals.upload_failed.disconnect(dispatch_uid="fsck-test")
    assert Upload.objects.get(pk=upload.pk).status == "failed"
    assert quota_used(alice) == 0
    assert "upload the file again" in report.findings[0].action
    # Integrators hear of it as of any other failure, once.
    assert [(f["upload_id"], f["reason"]) for f in failed] == [(upload.pk, "fsck_bytes_lost")]


def test_a_truncated_finished_file_is_a_size_mismatch_and_is_moved_aside_when_the_upload_fails(alice):
    upload = finish_upload(alice, b"t" * 1000)
    path = local.final_path(upload.storage_key)
    os.truncate(path, 600)

    assert found(fsck_find()) == [(Kind.FILE_SIZE_MISMATCH, str(upload.pk))]

    repaired_and_clean()
    assert Upload.objects.get(pk=upload.pk).status == "failed"
    assert not path.exists()
    assert lost_and_found_files() == {f"files/{upload.storage_key}": b"t" * 600}  # kept for an operator


def test_a_flipped_byte_is_found_only_with_verify_and_the_upload_fails(alice):
    data = os.urandom(3 * MiB)
    upload = finish_upload(alice, data, sha256=hashlib.sha256(data).hexdigest())
    flip_byte(local.final_path(upload.storage_key), 2 * MiB + 7)

    assert fsck_find().findings == []  # same size: only re-hashing can tell
    assert found(fsck_find(verify=True)) == [(Kind.FILE_CHECKSUM_MISMATCH, str(upload.pk))]

    repaired_and_clean(verify=True)
    assert Upload.objects.get(pk=upload.pk).status == "failed"
    assert not local.final_path(upload.storage_key).exists()
    assert list(lost_and_found_files()) == [f"files/{upload.storage_key}"]


def test_an_active_upload_slot_of_a_complete_upload_is_released_and_its_downloads_keep_their_slots(alice, bob):
    upload = finish_upload(alice, b"d" * 100)
    ghost = slot_admit(Slot.Kind.UPLOAD, alice, upload=upload, holder_channel="ghost.writer!1")
    download = slot_admit(Slot.Kind.DOWNLOAD, bob, upload=upload)

    report = fsck_find()
    assert found(report) == [(Kind.SLOT_FOR_ENDED_UPLOAD, str(upload.pk))]
    assert report.findings[0].slot == ghost.pk

    repaired_and_clean()
    ghost.refresh_from_db()
    assert (ghost.released_at is not None, ghost.release_reason) == (True, Slot.ReleaseReason.RESET)
    assert Slot.objects.get(pk=download.pk).released_at is None
    assert Upload.objects.get(pk=upload.pk).status == "complete"


def test_part_files_without_rows_are_deleted_and_a_finished_file_without_a_row_is_moved_aside(db):
    parts = [orphan_key(), orphan_key()]
    for key in parts:
        write_part(key, b"orphan bytes")
    finished = orphan_key()
    local.final_path(finished).write_bytes(b"somebody's file")

    assert found(fsck_find()) == sorted(
        [(Kind.ORPHAN_PART, f"partial/{key}.part") for key in parts] + [(Kind.ORPHAN_FILE, f"files/{finished}")]
    )

    repaired_and_clean()
    assert not any(local.part_path(key).exists() for key in parts)
    assert lost_and_found_files() == {f"files/{finished}": b"somebody's file"}


@pytest.mark.parametrize("status", ["cancelled", "expired"])
def test_bytes_an_ended_upload_left_behind_are_deleted(alice, status):
    upload = paused_upload(alice, b"l" * 30)
    upload_end(upload, status, Slot.ReleaseReason.CANCELLED)
    # The ending committed, then the process died before (or a writer re-created the file after) the delete.
    write_part(upload.storage_key, b"l" * 30)
    local.final_path(upload.storage_key).write_bytes(b"f" * 130)

    assert found(fsck_find()) == [(Kind.LEFTOVER_FILE, str(upload.pk)), (Kind.LEFTOVER_PART, str(upload.pk))]

    repaired_and_clean()
    assert not local.part_path(upload.storage_key).exists()
    assert not local.final_path(upload.storage_key).exists()
    assert Upload.objects.get(pk=upload.pk).status == status


def test_links_and_folders_where_bytes_belong_are_reported_never_followed_and_fsck_goes_on(alice, bob, tmp_path):
    target = tmp_path / "outside.bin"
    target.write_bytes(b"not ours " * 1000)
    linked = paused_upload(alice, b"l" * 100)
    local.part_path(linked.storage_key).unlink()
    local.part_path(linked.storage_key).symlink_to(target)
    folder = finish_upload(bob, b"d" * 100)
    local.final_path(folder.storage_key).unlink()
    local.final_path(folder.storage_key).mkdir()
    orphan = orphan_key()
    write_part(orphan, b"o" * 10)

    # Before: the scan stopped at the link (ELOOP) and reported nothing at all.
    report = fsck_run(repair=True)

    assert found(report) == sorted(
        [
            (Kind.NOT_A_FILE, str(linked.pk)),
            (Kind.NOT_A_FILE, str(folder.pk)),
            (Kind.ORPHAN_PART, f"partial/{orphan}.part"),
        ]
    )
    assert not report.unrepaired
    assert target.read_bytes() == b"not ours " * 1000  # never truncated, never moved
    # Moved aside as they are, for an operator to look at: the link still a link, the folder a folder.
    [batch] = local.lost_and_found().iterdir()
    assert (batch / "partial" / f"{linked.storage_key}.part").readlink() == target
    assert (batch / "files" / folder.storage_key).is_dir()
    # What is missing now is reported as such, and repaired the usual way.
    again = fsck_run(repair=True)
    assert found(again) == sorted([(Kind.MISSING_PART, str(linked.pk)), (Kind.MISSING_FILE, str(folder.pk))])
    assert fsck_run().findings == []


def test_strays_are_moved_into_lost_and_found_never_deleted_and_the_filesystems_lost_and_found_is_left_alone(db):
    storage.backend().prepare()
    root = local.root()
    (root / "notes.txt").write_text("an operator's notes")
    temp = f"{orphan_key()}.part.tmp"
    (root / "partial" / temp).write_bytes(b"temp")
    (root / "files" / "a-folder").mkdir()
    (root / "files" / "a-folder" / "inside").write_bytes(b"nested")
    (root / "lost+found").mkdir()  # ext4's, when the storage folder is a filesystem's root
    (root / "lost+found" / "#1234").write_bytes(b"e2fsck's")

    report = fsck_find()
    assert {str(f.kind) for f in report.findings} == {Kind.STRAY}
    assert sorted(f.path for f in report.findings) == ["files/a-folder", "notes.txt", f"partial/{temp}"]

    repaired_and_clean()
    moved = lost_and_found_files()
    assert moved.pop("notes.txt") == b"an operator's notes"
    assert moved.pop("files/a-folder/inside") == b"nested"
    assert moved == {f"partial/{temp}": b"temp"}
    assert (root / "lost+found" / "#1234").read_bytes() == b"e2fsck's"
    assert sorted(p.name for p in root.iterdir()) == ["files", local.LOST_AND_FOUND, "lost+found", "partial"]


# --- all of it at once, around a live upload -------------------------------------------------


def test_every_kind_is_found_and_repaired_and_a_live_upload_in_progress_is_untouched(
    alice, bob, long_ago, live_writer, limits
):
    limits(upload_expiry_seconds=3600)
    live = live_writer(os.urandom(256 * KiB), committed=64 * KiB, written=200 * KiB)
    missing = paused_upload(alice, b"m" * 100)
    local.part_path(missing.storage_key).unlink()
    short = paused_upload(bob, b"s" * 100, size=300)
    Upload.objects.filter(pk=short.pk).update(offset=250)
    long = paused_upload(bob, b"c" * 10, ahead=b"a" * 20)
    idle = idle_upload(bob, idle_for=timedelta(hours=2))
    truncated = finish_upload(alice, b"t" * 500)
    os.truncate(local.final_path(truncated.storage_key), 499)
    flipped = finish_upload(alice, b"f" * 500, sha256=hashlib.sha256(b"f" * 500).hexdigest())
    flip_byte(local.final_path(flipped.storage_key))
    gone = finish_upload(bob, b"g" * 500)
    local.final_path(gone.storage_key).unlink()
    ended = finish_upload(bob, b"e" * 500)
    slot_admit(Slot.Kind.UPLOAD, bob, upload=ended, holder_channel="ghost.writer!1")
    orphan = orphan_key()
    write_part(orphan, b"o" * 10)
    (local.root() / "stray.tmp").write_bytes(b"?")
    stuck = stuck_writer(alice, long_ago)  # last: every admission reaps expired leases

    before = live.snapshot()
    report = fsck_find(verify=True)

    assert found(report) == sorted(
        [
            (Kind.MISSING_PART, str(missing.pk)),
            (Kind.PART_SHORT, str(short.pk)),
            (Kind.PART_LONG, str(long.pk)),
            (Kind.IDLE_EXPIRED, str(idle.pk)),
            (Kind.FILE_SIZE_MISMATCH, str(truncated.pk)),
            (Kind.FILE_CHECKSUM_MISMATCH, str(flipped.pk)),
            (Kind.MISSING_FILE, str(gone.pk)),
            (Kind.SLOT_FOR_ENDED_UPLOAD, str(ended.pk)),
            (Kind.ORPHAN_PART, f"partial/{orphan}.part"),
            (Kind.STRAY, "stray.tmp"),
            (Kind.STUCK_SLOT, str(stuck.pk)),
        ]
    )
    assert report.live_uploads == 1
    assert live.snapshot() == before

    fsck_repair(report)
    assert not report.unrepaired, [f.as_dict() for f in report.unrepaired]
    assert fsck_run(repair=True, verify=True).findings == []

    statuses = dict(Upload.objects.values_list("pk", "status"))
    assert [statuses[u.pk] for u in (idle, truncated, flipped, gone, ended)] == [
        "expired",
        "failed",
        "failed",
        "failed",
        "complete",
    ]
    offsets = dict(Upload.objects.values_list("pk", "offset"))
    assert [offsets[u.pk] for u in (missing, short, long)] == [0, 100, 10]
    # The live writer's row, slot, generation and bytes (including those ahead of the
    # durable offset) are as they were, and it goes on to finish under the same grant.
    assert live.snapshot() == before
    live.finish()
    upload = Upload.objects.get(pk=live.upload_id)
    assert upload.status == "complete"
    assert local.final_path(upload.storage_key).read_bytes() == live.data


# --- races: a writer that shows up between the look and the repair -----------------------------


@pytest.fixture
def flock_holder():
    """Hold a file's flock from another process, as a writer process does: ``flock_holder(path)``."""
    holders = []

    def hold(path):
        code = (
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        holders.append(holder)
        assert holder.stdout.readline() == "locked\n"
        return holder

    yield hold
    for holder in holders:
        holder.kill()
        holder.wait(10)


def test_a_file_a_writer_process_locked_after_the_look_is_left_alone_and_the_run_fails(alice, flock_holder):
    upload = paused_upload(alice, b"c" * 10, ahead=b"a" * 20)
    orphan = orphan_key()
    write_part(orphan, b"o" * 10)
    report = fsck_find()
    assert found(report) == sorted([(Kind.PART_LONG, str(upload.pk)), (Kind.ORPHAN_PART, f"partial/{orphan}.part")])

    holders = [flock_holder(local.part_path(upload.storage_key)), flock_holder(local.part_path(orphan))]
    fsck_repair(report)

    assert len(report.unrepaired) == 2
    assert all("flock held" in f.action for f in report.unrepaired)
    assert local.part_path(upload.storage_key).stat().st_size == 30
    assert local.part_path(orphan).exists()
    # While the writers hold them, a new look reports neither: a held file is the writer's to judge.
    again = fsck_find()
    assert (again.findings, again.held_files) == ([], 2)

    for holder in holders:
        holder.kill()
        holder.wait(10)
    repaired_and_clean()
    assert local.part_path(upload.storage_key).stat().st_size == 10
    assert not local.part_path(orphan).exists()


def test_an_upload_a_writer_connects_to_after_the_look_is_not_rewound(alice):
    upload = paused_upload(alice, b"m" * 100)
    local.part_path(upload.storage_key).unlink()
    report = fsck_find()
    assert found(report) == [(Kind.MISSING_PART, str(upload.pk))]

    grant = writer_admit(alice, upload.pk, "new.writer!1")  # connected, not yet opened its file
    fsck_repair(report)

    assert report.findings[0].repaired is False
    assert "writer connected" in report.findings[0].action
    after = Upload.objects.get(pk=upload.pk)
    assert (after.offset, after.writer_generation) == (100, grant.generation)  # the writer rewinds itself


# --- the command: exit codes, JSON, history ---------------------------------------------------


def test_the_command_exits_1_with_problems_left_0_once_repaired_and_json_reports_each_finding(alice):
    upload = paused_upload(alice, b"m" * 100)
    local.part_path(upload.storage_key).unlink()
    write_part(orphan_key(), b"o")

    code, out = fsck_command("--json")
    document = json.loads(out)
    assert code == 1
    assert (document["found"], document["repaired"], document["unrepaired"], document["repair"]) == (2, 0, 2, False)
    assert sorted(f["kind"] for f in document["findings"]) == ["missing_part", "orphan_part"]
    missing = next(f for f in document["findings"] if f["kind"] == "missing_part")
    assert (missing["upload"], missing["user"], missing["action"]) == (str(upload.pk), alice.pk, "")
    assert missing["path"] == f"partial/{upload.storage_key}.part"

    code, out = fsck_command("--repair", "--json")
    document = json.loads(out)
    assert code == 0
    assert (document["found"], document["repaired"], document["unrepaired"]) == (2, 2, 0)
    assert all(f["action"] and f["repaired"] for f in document["findings"])
    assert FsckRun.objects.get(pk=document["run"]).findings == document["findings"]

    code, out = fsck_command()
    assert code == 0
    assert Kind.MISSING_PART not in out


def test_the_plain_output_has_one_line_per_finding_with_its_action(alice):
    for _ in range(3):
        write_part(orphan_key(), b"o")

    code, out = fsck_command("--repair")

    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith("orphan_part ")]
    assert len(lines) == 3
    assert all(line.endswith("-> deleted") for line in lines)


def test_the_command_exits_2_when_the_storage_folder_cannot_be_read(db, settings, tmp_path):
    settings.DIRECTDRIVEX_STORAGE_DIR = tmp_path / "not-a-folder"
    settings.DIRECTDRIVEX_STORAGE_DIR.write_text("a file where the storage folder should be")

    code, _out = fsck_command()

    assert code == 2
    assert not FsckRun.objects.exists()  # a run that could not look records no findings


def test_only_the_last_runs_are_kept(db):
    old = timezone.now() - timedelta(days=1)
    FsckRun.objects.bulk_create(
        FsckRun(started_at=old + timedelta(seconds=i), finished_at=old + timedelta(seconds=i)) for i in range(KEEP_RUNS)
    )
    oldest = FsckRun.objects.order_by("started_at").first()

    report = fsck_run()

    assert FsckRun.objects.count() == KEEP_RUNS
    assert FsckRun.objects.filter(pk=report.run_id).exists()
    assert not FsckRun.objects.filter(pk=oldest.pk).exists()


# --- on real servers -------------------------------------------------------------------------


def run_fsck(server: LiveServer, *args: str) -> tuple[int, dict]:
    """`manage.py uploads fsck --json …` as an operator runs it beside the servers: (exit code, report)."""
    done = subprocess.run(
        [sys.executable, "manage.py", "uploads", "fsck", "--json", *args],
        cwd=ROOT, env=server.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.slow
async def test_on_running_servers_fsck_reaps_a_killed_holder_and_a_paused_live_upload_goes_on_to_complete(
    tmp_path_factory, tmp_path
):
    lease = 5
    with live_backend(tmp_path_factory, "fsck") as backend:
        token = backend.alice_token
        server = LiveServer(
            tmp_path / "a",
            database_url=backend.database_url,
            redis_url=backend.redis_url,
            DIRECTDRIVEX_SLOT_LEASE_SECONDS=lease,
        )
        doomed = server.sibling(tmp_path / "b")
        with server, doomed:
            server.start()
            doomed.start()
            live_data, dead_data = os.urandom(6 * MiB), os.urandom(6 * MiB)
            live = create_upload(server, token, "live.bin", live_data)
            dead = create_upload(doomed, token, "dead.bin", dead_data)

            async with ws_connect(server, live["ws_url"]) as writer:
                ready = await receive(writer)
                chunk, window = ready["chunk_size"], ready["window"]
                acked = await send_until(writer, live_data, 0, 2 * MiB, chunk=chunk, window=window)
                (live_part,) = part_files(server)  # the only part file so far

                async with ws_connect(doomed, dead["ws_url"]) as victim:
                    await receive(victim)
                    await send_until(victim, dead_data, 0, 3 * MiB, chunk=chunk, window=window)
                    doomed.kill()  # SIGKILL: its slot stays active, with a holder, until the lease runs out
                killed_at = time.monotonic()
                await asyncio.sleep(max(0.0, killed_at + lease + 0.5 - time.monotonic()))
                assert live_part.read_bytes() == live_data[:acked]

                code, report = await asyncio.to_thread(run_fsck, server)
                assert code == 1, report
                kinds = {f["kind"] for f in report["findings"] if f["upload"] == dead["id"]}
                # Bytes the killed writer wrote past its last commit may be on disk too (part_long).
                assert Kind.STUCK_SLOT in kinds and kinds <= {Kind.STUCK_SLOT, Kind.PART_LONG}, report
                assert all(f["upload"] == dead["id"] for f in report["findings"]), report
                assert report["live_uploads_left_alone"] == 1

                code, report = await asyncio.to_thread(run_fsck, server, "--repair", "--verify")
                assert code == 0, report
                assert report["found"] == report["repaired"] == len(kinds), report
                code, report = await asyncio.to_thread(run_fsck, server, "--repair", "--verify")
                assert (code, report["found"]) == (0, 0), report

                # The paused upload was never touched: same bytes, and it finishes on the same connection.
                assert live_part.read_bytes() == live_data[:acked]
                complete = await stream(writer, live_data, acked, chunk=chunk, window=window)
                assert complete["sha256"] == hashlib.sha256(live_data).hexdigest()

            # The killed holder's upload resumes from its durable offset on the surviving server.
            detail = upload_detail(server, token, dead["id"])
            async with ws_connect(server, detail["ws_url"]) as writer:
                ready = await receive(writer)
                assert ready["offset"] == detail["offset"]
                complete = await stream(writer, dead_data, ready["offset"], chunk=chunk, window=window)
                assert complete["sha256"] == hashlib.sha256(dead_data).hexdigest()
            code, report = await asyncio.to_thread(run_fsck, server, "--verify")
            assert (code, report["found"]) == (0, 0), report
