"""The s3 backend against a real S3 server (SeaweedFS): parts, tails, fencing, resume elsewhere, completion.

Every test here uses the ``s3_storage`` fixture (tests/conftest.py): its own
prefix in the test bucket and its own spool folder. "Another host" is a second
S3Storage with a spool folder of its own, sharing only the database and the
bucket, as two servers without a shared disk do.
"""

import hashlib
import os

import pytest

from uploads import storage
from uploads.exceptions import LeaseLost
from uploads.models import StoredPiece, Upload
from uploads.services.grants import (
    writer_admit,
    writer_commit,
    writer_committed,
    writer_complete,
    writer_release,
)
from uploads.services.slots import slots_reset
from uploads.services.uploads import upload_create
from uploads.storage import s3

MiB = 1024 * 1024
PART = s3.MIN_PART_BYTES

pytestmark = pytest.mark.django_db(transaction=True)


def another_host(s3_storage, tmp_path) -> s3.S3Storage:
    """The same bucket and prefix seen from a second server: its own client, its own spool folder."""
    here = storage.backend()
    return s3.S3Storage(
        endpoint_url=here.endpoint_url,
        bucket=here.where.bucket,
        prefix=here.where.prefix,
        region="us-east-1",
        spool_dir=tmp_path / "other-host-spool",
    )


def commit(grant, part):
    durable = part.sync()
    writer_commit(grant, durable.offset, hash_state=durable.hash_state, durable=durable)
    part.committed(durable)
    return durable


def object_bytes(s3_storage, key: str) -> bytes:
    where = storage.backend().where
    return where.client.get_object(Bucket=where.bucket, Key=where.final(key))["Body"].read()


def count_calls(client, monkeypatch) -> dict[str, int]:
    """Count the client's operations by name (get_object, upload_part, ...) from now on."""
    calls: dict[str, int] = {}

    def counted(params, model, **_ignored):
        calls[model.name] = calls.get(model.name, 0) + 1

    client.meta.events.register("before-call.s3", counted)
    return calls


def test_part_sizes_are_uniform_whole_mebibytes_and_fit_the_part_limit():
    assert s3.part_size(1) == 8 * MiB
    assert s3.part_size(3_624_892_618) == 8 * MiB
    big = 200 * 1024**3
    size = s3.part_size(big)
    assert size % MiB == 0
    assert -(-big // size) <= s3.PARTS_FOR_THE_FILE < s3.MAX_PARTS


def test_an_upload_becomes_one_object_with_every_byte(alice, s3_storage):
    data = os.urandom(2 * PART + 12345)
    upload, _slot = upload_create(alice, filename="a.bin", size=len(data))
    grant = writer_admit(alice, upload.pk, "test-writer")
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    try:
        part.append([data[: PART + 5], data[PART + 5 :]])
        commit(grant, part)
        part.finalize(writer_committed(grant))
    finally:
        part.close()
    writer_complete(grant, sha256=part.hexdigest())

    assert part.hexdigest() == hashlib.sha256(data).hexdigest()
    assert object_bytes(s3_storage, upload.storage_key) == data
    parts = StoredPiece.objects.filter(upload=upload, kind=StoredPiece.Kind.PART).order_by("start")
    assert [(p.start, p.end) for p in parts] == [(0, PART), (PART, 2 * PART), (2 * PART, len(data))]
    # Numbers go up with the bytes and were reserved at admission.
    assert [p.number for p in parts] == [1, 2, 3]
    # The spool holds nothing once the writer let go.
    assert not any(path.is_file() for path in s3_storage.spool.rglob("*"))


def test_a_resume_on_another_host_fetches_only_the_tails_and_sends_no_committed_byte_again(
    alice, s3_storage, tmp_path, monkeypatch
):
    data = os.urandom(PART + 3 * MiB + 777)
    upload, _slot = upload_create(alice, filename="a.bin", size=len(data))
    first = writer_admit(alice, upload.pk, "host-one")
    part = storage.backend().open_part(first.storage_key, first.committed(), first.size)
    try:
        part.append([data[: PART + 3 * MiB]])  # one whole part, and 3 MiB of the next
        durable = commit(first, part)  # a full commit: the 3 MiB go into a tail object
    finally:
        part.close()
    writer_release(first, "disconnected", part_numbers=part.numbers_used)
    assert durable.offset == PART + 3 * MiB
    tails = StoredPiece.objects.filter(upload=upload, kind=StoredPiece.Kind.TAIL)
    assert [(t.start, t.end) for t in tails] == [(PART, PART + 3 * MiB)]

    other = another_host(s3_storage, tmp_path)
    calls = count_calls(other.where.client, monkeypatch)
    second = writer_admit(alice, upload.pk, "host-two")
    assert second.offset == PART + 3 * MiB
    resumed = other.open_part(second.storage_key, second.committed(), second.size)
    try:
        # Only the tail was read back (one GET of 3 MiB); the committed part was not.
        assert calls == {"GetObject": 1}
        assert resumed.hexdigest() == hashlib.sha256(data[: PART + 3 * MiB]).hexdigest()
        resumed.append([data[PART + 3 * MiB :]])
        durable = resumed.sync()
        writer_commit(second, durable.offset, hash_state=durable.hash_state, durable=durable)
        resumed.committed(durable)
        resumed.finalize(writer_committed(second))
    finally:
        resumed.close()
    writer_complete(second, sha256=resumed.hexdigest())

    assert calls.get("UploadPart") == 1  # the second part only
    assert object_bytes(s3_storage, upload.storage_key) == data
    assert Upload.objects.get(pk=upload.pk).sha256 == hashlib.sha256(data).hexdigest()
    # The tail went once the part that holds its bytes was recorded.
    assert not StoredPiece.objects.filter(upload=upload, kind=StoredPiece.Kind.TAIL).exists()
    where = other.where
    assert where.client.list_objects_v2(Bucket=where.bucket, Prefix=where.tails(upload.storage_key))["KeyCount"] == 0


def test_a_stale_writer_can_neither_replace_a_part_nor_record_one(alice, s3_storage, tmp_path):
    data = os.urandom(3 * PART)
    upload, _slot = upload_create(alice, filename="a.bin", size=len(data))
    stale = writer_admit(alice, upload.pk, "stale-writer")
    stale_part = storage.backend().open_part(stale.storage_key, stale.committed(), stale.size)
    stale_part.append([data[:PART]])
    commit(stale, stale_part)
    slots_reset(upload=upload)  # the stale writer froze past its lease and was fenced off

    fresh = writer_admit(alice, upload.pk, "fresh-writer")
    assert fresh.part_numbers >= stale.reserved  # numbered above anything the stale one may use
    part = another_host(s3_storage, tmp_path).open_part(fresh.storage_key, fresh.committed(), fresh.size)
    try:
        part.append([data[PART:]])
        # The stale writer wakes up and sends its next parts, with other bytes, under its own numbers.
        stale_part.append([b"X" * (2 * PART)])
        with pytest.raises(LeaseLost):
            commit(stale, stale_part)
        commit(fresh, part)
        part.finalize(writer_committed(fresh))
    finally:
        part.close()
        stale_part.close()
    writer_complete(fresh, sha256=part.hexdigest())

    assert object_bytes(s3_storage, upload.storage_key) == data
    numbers = list(StoredPiece.objects.filter(upload=upload).order_by("start").values_list("number", "generation"))
    assert len(numbers) == 3
    assert all(generation in (stale.generation, fresh.generation) for _n, generation in numbers)


def test_a_completion_whose_answer_was_lost_is_decided_by_the_object(alice, s3_storage):
    data = os.urandom(1000)
    upload, _slot = upload_create(alice, filename="a.bin", size=len(data))
    grant = writer_admit(alice, upload.pk, "test-writer")
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    try:
        part.append([data])
        commit(grant, part)
        committed = writer_committed(grant)
        part.finalize(committed)
        # Completed once; again (the first answer lost): the object is whole, so it is done.
        part.finalize(committed)
    finally:
        part.close()
    assert object_bytes(s3_storage, upload.storage_key) == data


def test_a_finished_digest_comes_from_the_saved_state_without_reading(alice, s3_storage, monkeypatch):
    data = os.urandom(PART + 10)
    upload, _slot = upload_create(alice, filename="a.bin", size=len(data))
    grant = writer_admit(alice, upload.pk, "test-writer")
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    try:
        part.append([data])
        durable = commit(grant, part)
        part.finalize(writer_committed(grant))
    finally:
        part.close()
    backend = storage.backend()
    calls = count_calls(backend.where.client, monkeypatch)
    expected = hashlib.sha256(data).hexdigest()
    assert backend.finished_digest(upload.storage_key, len(data), None, durable.hash_state) == expected
    assert "GetObject" not in calls
    assert backend.finished_digest(upload.storage_key, len(data)) == expected  # read back in full
    assert calls["GetObject"] >= 1
    assert backend.finished_digest(upload.storage_key, len(data) + 1) is None


def test_delete_leaves_nothing_of_an_upload(alice, s3_storage):
    data = os.urandom(PART + 100)
    upload, _slot = upload_create(alice, filename="a.bin", size=len(data) + 1)
    grant = writer_admit(alice, upload.pk, "test-writer")
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    try:
        part.append([data])
        commit(grant, part)  # one part in the multipart upload, 100 bytes in a tail
    finally:
        part.close()
    backend = storage.backend()
    where = backend.where

    assert backend.delete(upload.storage_key) is True

    assert where.client.list_objects_v2(Bucket=where.bucket, Prefix=where.prefix)["KeyCount"] == 0
    uploads = where.client.list_multipart_uploads(Bucket=where.bucket, Prefix=where.prefix).get("Uploads", [])
    assert uploads == []
    assert backend.delete(upload.storage_key) is False


def test_an_unreachable_store_is_unavailable_not_a_crash(alice, s3_storage, tmp_path):
    from tests.support.live_server import free_port

    upload, _slot = upload_create(alice, filename="a.bin", size=100)
    grant = writer_admit(alice, upload.pk, "test-writer")
    down = s3.S3Storage(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        bucket="ddx-test",
        prefix="nowhere/",
        region="us-east-1",
        spool_dir=tmp_path / "spool-down",
    )
    part = down.open_part(grant.storage_key, grant.committed(), grant.size)  # nothing is asked of the store yet
    try:
        part.append([b"0123456789"])
        with pytest.raises(storage.StoreUnavailable):
            part.sync()  # the multipart upload and the tail cannot be made
    finally:
        part.close()


# --- start-up checks (uploads.E014, uploads.E015) -------------------------------------------------


def check_ids(settings) -> list[tuple[str, str]]:
    from uploads.checks import check_configuration

    ours = ("uploads.E014", "uploads.E015")
    return [(error.id, error.msg) for error in check_configuration(None) if error.id in ours]


def test_a_usable_bucket_passes_the_start_up_check(s3_storage, settings):
    assert check_ids(settings) == []
    # The probe leaves nothing behind in the bucket.
    where = storage.backend().where
    assert where.client.list_objects_v2(Bucket=where.bucket, Prefix=where.prefix)["KeyCount"] == 0


def test_an_unreachable_store_stops_start_up_with_its_address(s3_storage, settings):
    from tests.support.live_server import free_port

    settings.DIRECTDRIVEX_S3_ENDPOINT_URL = f"http://127.0.0.1:{free_port()}"
    [(error_id, message)] = check_ids(settings)
    assert error_id == "uploads.E015"
    assert settings.DIRECTDRIVEX_S3_ENDPOINT_URL in message


def test_a_missing_bucket_or_an_unknown_backend_stops_start_up(s3_storage, settings):
    settings.DIRECTDRIVEX_S3_BUCKET = "no-such-bucket-here"
    [(error_id, message)] = check_ids(settings)
    assert error_id == "uploads.E015" and "404" in message

    settings.DIRECTDRIVEX_S3_BUCKET = ""
    assert check_ids(settings) == [
        ("uploads.E015", "The s3 storage backend cannot store uploads: DIRECTDRIVEX_S3_BUCKET is not set.")
    ]

    settings.DIRECTDRIVEX_STORAGE_BACKEND = "s4"
    [(error_id, message)] = check_ids(settings)
    assert error_id == "uploads.E014" and "'s4'" in message


def test_wrong_credentials_stop_start_up(s3_storage, settings, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    settings.DIRECTDRIVEX_S3_PREFIX = s3_storage.prefix + "other/"  # a new backend object: new credentials
    [(error_id, message)] = check_ids(settings)
    assert error_id == "uploads.E015" and "403" in message


# --- fsck and the reaper know the bucket --------------------------------------------------------


def paused(alice, data: bytes, size: int):
    """An unfinished upload whose writer committed ``data`` (parts and a tail) and went away."""
    upload, _slot = upload_create(alice, filename="paused.bin", size=size)
    grant = writer_admit(alice, upload.pk, "test-writer")
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    try:
        part.append([data])
        commit(grant, part)
    finally:
        part.close()
    writer_release(grant, "disconnected", part_numbers=part.numbers_used)
    return Upload.objects.get(pk=upload.pk)


def kinds(report) -> list[str]:
    return sorted(str(finding.kind) for finding in report.findings)


def later():
    """A moment past every leftover's grace (a lease and a margin): what is unrecorded by then is abandoned."""
    from datetime import timedelta

    from django.utils import timezone

    return timezone.now() + timedelta(hours=2)


def test_fsck_finds_nothing_wrong_in_a_healthy_bucket(alice, s3_storage):
    from tests.conftest import finish_upload
    from uploads.ops.fsck import fsck_run

    paused(alice, os.urandom(PART + 10), PART + 100)
    finish_upload(alice, os.urandom(PART + 5))

    report = fsck_run(repair=True, verify=True, now=later())

    assert report.findings == []
    assert report.checked["files"] == 2  # the finished object and the unfinished upload's entry


def test_fsck_rewinds_an_upload_whose_recorded_part_is_gone_and_it_completes_from_zero(alice, s3_storage):
    from tests.conftest import complete_upload
    from uploads.ops.fsck import fsck_run

    data = os.urandom(PART + 10)
    upload = paused(alice, data[:PART], len(data))
    storage.backend().abort_session(upload.storage_key, upload.store_session)  # lost behind our back

    report = fsck_run(repair=True)

    assert kinds(report) == ["missing_part"]
    assert report.findings[0].repaired, report.findings[0].action
    upload.refresh_from_db()
    assert (upload.offset, upload.store_session, upload.pieces.count()) == (0, "", 0)
    complete_upload(alice, upload.pk, data)
    assert object_bytes(s3_storage, upload.storage_key) == data


def test_fsck_and_the_reaper_remove_what_no_row_records_and_keep_what_one_does(alice, s3_storage):
    from uploads.ops.fsck import fsck_run
    from uploads.services.uploads import store_sweep

    upload = paused(alice, os.urandom(PART + 10), PART + 100)
    where = storage.backend().where
    key = upload.storage_key
    # A second multipart upload of the same key and a tail no commit recorded: a writer that crashed
    # before its first commit; and a multipart upload whose key has no row at all.
    stray_session = where.client.create_multipart_upload(Bucket=where.bucket, Key=where.final(key))["UploadId"]
    where.client.put_object(Bucket=where.bucket, Key=f"{where.tails(key)}0-10-dead", Body=b"0123456789")
    orphan = "0" * 32
    where.client.create_multipart_upload(Bucket=where.bucket, Key=where.final(orphan))

    # Young leftovers of an upload may be its writer's next commit: left alone. A key without a row
    # has no writer (the row comes first): its multipart upload is an orphan at once, as a part file is.
    assert kinds(fsck_run(repair=False)) == ["orphan_part"]
    assert store_sweep() == 0

    report = fsck_run(repair=True, now=later())

    assert kinds(report) == ["abandoned_session", "leftover_tail", "orphan_part"]
    assert all(finding.repaired for finding in report.findings), [f.action for f in report.findings]
    sessions = {(s.key, s.session) for s in storage.backend().sessions()}
    assert sessions == {(key, upload.store_session)}  # the recorded one is kept
    assert list(storage.backend().tails(key)) == [p.name for p in upload.pieces.filter(kind="tail")]

    # The reaper does the same on its own (hourly, with the history prune).
    where.client.create_multipart_upload(Bucket=where.bucket, Key=where.final(key))
    where.client.put_object(Bucket=where.bucket, Key=f"{where.tails(key)}0-10-dead", Body=b"0123456789")
    assert store_sweep(now=later()) == 2
    assert {(s.key, s.session) for s in storage.backend().sessions()} == {(key, upload.store_session)}
    assert stray_session not in {s.session for s in storage.backend().sessions()}


def test_fsck_fails_a_complete_upload_whose_object_is_gone_and_sets_an_orphan_object_aside(alice, s3_storage):
    from tests.conftest import finish_upload
    from uploads.ops.fsck import fsck_run

    lost = finish_upload(alice, os.urandom(1000))
    where = storage.backend().where
    where.client.delete_object(Bucket=where.bucket, Key=where.final(lost.storage_key))
    orphan = "f" * 32
    where.client.put_object(Bucket=where.bucket, Key=where.final(orphan), Body=b"someone's data")

    report = fsck_run(repair=True)

    assert kinds(report) == ["missing_file", "orphan_file"]
    assert all(finding.repaired for finding in report.findings)
    assert Upload.objects.get(pk=lost.pk).status == Upload.Status.FAILED
    moved = next(f.action for f in report.findings if f.kind == "orphan_file")
    kept = where.client.list_objects_v2(Bucket=where.bucket, Prefix=f"{where.prefix}{s3.LOST_AND_FOUND}/")
    assert [item["Key"] for item in kept["Contents"]] == [moved.split()[2]]
    assert storage.backend().entry_size(where.final(orphan)) is None


def test_a_tail_of_tiny_appends_holds_exactly_the_bytes_appended(alice, s3_storage, tmp_path):
    from tests.conftest import complete_upload

    data = os.urandom(PART // 2)
    upload, _slot = upload_create(alice, filename="a.bin", size=len(data))
    grant = writer_admit(alice, upload.pk, "test-writer")
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    try:
        for start in range(0, 300_000, 100):  # what a client sending 100-byte frames leaves
            part.append([data[start : start + 100]])
        durable = commit(grant, part)
    finally:
        part.close()
    writer_release(grant, "disconnected", part_numbers=part.numbers_used)
    [tail] = upload.pieces.filter(kind="tail")
    assert (durable.offset, tail.start, tail.end) == (300_000, 0, 300_000)
    where = storage.backend().where
    assert where.client.get_object(Bucket=where.bucket, Key=tail.name)["Body"].read() == data[:300_000]

    # The next writer resumes from the tail and finishes: every byte, once.
    upload.refresh_from_db()
    assert upload.offset == 300_000
    complete_upload(alice, upload.pk, data[300_000:])
    assert object_bytes(s3_storage, upload.storage_key) == data


def test_an_upload_whose_part_numbers_ran_out_starts_again_with_a_new_multipart_upload(alice, s3_storage):
    from dataclasses import replace

    from tests.conftest import complete_upload
    from uploads.services.grants import writer_rewind

    data = os.urandom(PART + 10)
    upload = paused(alice, data[:PART], len(data))
    # As if crashed writers had used up the numbers: one more part would pass the store's 10,000.
    Upload.objects.filter(pk=upload.pk).update(part_numbers=s3.MAX_PARTS - 1)
    grant = writer_admit(alice, upload.pk, "test-writer")
    with pytest.raises(storage.PartShort) as short:
        storage.backend().open_part(grant.storage_key, replace(grant.committed(), numbers=s3.MAX_PARTS - 1), grant.size)
    assert short.value.on_disk == 0

    rewound = writer_rewind(grant, 0)  # what the writer does with a PartShort
    assert (rewound.store_session, rewound.part_numbers, rewound.reserved) == ("", 0, s3.PART_NUMBERS_AHEAD)
    writer_release(rewound, "disconnected")
    complete_upload(alice, upload.pk, data)
    assert object_bytes(s3_storage, upload.storage_key) == data
    # Numbered anew, above the rewinding writer's reservation (it gave nothing back: no part_numbers).
    ahead = s3.PART_NUMBERS_AHEAD
    assert list(upload.pieces.order_by("start").values_list("number", flat=True)) == [ahead + 1, ahead + 2]


def test_the_dashboard_shows_a_bucket_without_a_filesystem(alice, s3_storage):
    from django.test import Client
    from django.urls import reverse

    from tests.conftest import finish_upload, make_user

    finish_upload(alice, b"y" * 4096)
    client = Client()
    client.force_login(make_user("root", is_staff=True, is_superuser=True))

    disk = client.get(reverse("admin:uploads_dashboard_data")).json()["disk"]
    page = client.get(reverse("admin:uploads_dashboard"))

    assert disk["path"].startswith(f"s3://{s3_storage.bucket}/{s3_storage.prefix}")
    assert (disk["finished_bytes"], disk["filesystem_total_bytes"], disk["filesystem_free_bytes"]) == (4096, None, None)
    assert page.status_code == 200
    assert b"not reported by an object store" in page.content


def test_fsck_reports_parts_a_crashed_writer_sent_and_the_completion_leaves_them_out(alice, s3_storage):
    from tests.conftest import complete_upload
    from uploads.ops.fsck import fsck_run

    data = os.urandom(3 * PART)
    upload = paused(alice, data[:PART], len(data))
    grant = writer_admit(alice, upload.pk, "crashing-writer")
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    part.append([b"X" * PART])  # a whole part, sent, never committed: the process died here
    part.sync()  # only to wait for the send; nothing is recorded
    part.close()
    writer_release(grant, "error")

    report = fsck_run(repair=True)

    assert kinds(report) == ["extra_parts"]
    assert "no commit records" in report.findings[0].detail and report.findings[0].repaired
    complete_upload(alice, upload.pk, data[PART:])
    assert object_bytes(s3_storage, upload.storage_key) == data


def test_the_reaper_empties_the_spool_folders_of_processes_that_are_gone(s3_storage, db):
    import socket
    import subprocess
    import sys

    from uploads.services.uploads import store_sweep

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    dead = s3_storage.spool / f"{host}-{gone.stdout.strip()}"  # killed with -9 mid-part: its spool stays
    alive = s3_storage.spool / f"{host}-1"  # pid 1 is alive
    elsewhere = s3_storage.spool / "another-host-123"  # not this host's to judge
    for folder in (dead, alive, elsewhere):
        folder.mkdir(parents=True)
        (folder / "key.0000.part").write_bytes(b"x" * 1000)

    store_sweep()

    assert not dead.exists()
    assert (alive / "key.0000.part").exists() and (elsewhere / "key.0000.part").exists()
