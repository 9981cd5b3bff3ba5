"""Transitions (uploads.services.events): each is logged, counted and signalled once, after its transaction commits.

Signals are checked from a second database connection (another thread):
what a receiver is told has already committed. Log lines are checked as the
records carry them (caplog) and as the logfmt formatter writes them, with the
request id and client address of the HTTP request that caused them.
"""

import logging
import re
import sys
import threading
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.utils import timezone
from prometheus_client import REGISTRY

from tests.conftest import finish_upload, session_client
from uploads import signals
from uploads.exceptions import UserSlotsExhausted
from uploads.logs import REMOTE, REQUEST_ID, LogfmtFormatter, request_id_from
from uploads.models import Slot, Upload
from uploads.services.grants import writer_admit, writer_fail
from uploads.services.slots import slot_admit, slots_reap
from uploads.services.uploads import upload_create, upload_delete, upload_end, uploads_expire

pytestmark = pytest.mark.django_db(transaction=True)

SIZE = 1000


def committed_status(upload_id):
    """The upload's status as another connection sees it: only committed changes are visible there."""
    seen = {}

    def look():
        try:
            seen["status"] = Upload.objects.filter(pk=upload_id).values_list("status", flat=True).first()
        finally:
            connections.close_all()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join(30)
    return seen.get("status", "(no answer)")


@pytest.fixture
def heard():
    """Every upload_* signal sent during the test: (name, kwargs, the upload's committed status at that moment)."""
    received = []
    receivers = []
    for outcome, signal in signals.BY_OUTCOME.items():

        def receiver(sender, outcome=outcome, **kwargs):
            received.append((outcome, {"sender": sender, **kwargs}, committed_status(kwargs["upload_id"])))

        signal.connect(receiver, weak=False)
        receivers.append((signal, receiver))
    yield received
    for signal, receiver in receivers:
        signal.disconnect(receiver)


@pytest.fixture
def lines(caplog):
    """The uploads.services.events records logged during the test, by message (the event name)."""
    caplog.set_level(logging.INFO, logger="uploads.events")

    def of(event: str):
        return [record for record in caplog.records if record.name == "uploads.events" and record.msg == event]

    return of


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_upload_started_is_sent_once_after_commit_with_its_arguments(alice, heard, lines):
    created_before = counter("directdrivex_uploads_created_total")

    upload, slot = upload_create(alice, filename="report.pdf", size=SIZE)

    assert heard == [
        (
            "started",
            {
                "sender": Upload,
                "signal": signals.upload_started,
                "upload_id": upload.pk,
                "user_id": alice.pk,
                "size": SIZE,
                "filename": "report.pdf",
            },
            "uploading",  # already visible to another connection: sent after commit
        )
    ]
    [line] = lines("upload.started")
    assert {key: line.ddx[key] for key in ("upload", "user", "slot", "gen", "size")} == {
        "upload": upload.pk,
        "user": alice.pk,
        "slot": slot.pk,
        "gen": slot.generation,
        "size": SIZE,
    }
    assert [record.ddx["slot"] for record in lines("slot.admitted")] == [slot.pk]
    assert counter("directdrivex_uploads_created_total") == created_before + 1


def test_nothing_is_sent_logged_or_counted_before_commit_nor_after_a_rollback(alice, heard, lines):
    created_before = counter("directdrivex_uploads_created_total")
    admitted_before = counter("directdrivex_slots_admitted_total", kind="upload")

    with pytest.raises(RuntimeError), transaction.atomic():
        upload_create(alice, filename="report.pdf", size=SIZE)
        assert heard == [], "sent while its transaction was still open"
        raise RuntimeError("the caller changes its mind")

    assert Upload.objects.count() == 0
    assert heard == []
    assert lines("upload.started") == [] and lines("slot.admitted") == []
    assert counter("directdrivex_uploads_created_total") == created_before
    assert counter("directdrivex_slots_admitted_total", kind="upload") == admitted_before


def test_a_refused_upload_sends_nothing(alice, heard, lines, limits):
    limits(user_upload_slots=1)
    upload_create(alice, filename="first.bin", size=SIZE)
    heard.clear()

    with pytest.raises(UserSlotsExhausted):
        upload_create(alice, filename="second.bin", size=SIZE)

    assert heard == []
    assert len(lines("upload.started")) == 1


def test_upload_completed_is_sent_once_with_the_digest_of_the_bytes(alice, heard, lines):
    completed_before = counter("directdrivex_uploads_completed_total")

    upload = finish_upload(alice, b"x" * SIZE)

    completed = [entry for entry in heard if entry[0] == "completed"]
    assert completed == [
        (
            "completed",
            {
                "sender": Upload,
                "signal": signals.upload_completed,
                "upload_id": upload.pk,
                "user_id": alice.pk,
                "size": SIZE,
                "sha256": upload.sha256,
            },
            "complete",
        )
    ]
    assert [entry[0] for entry in heard] == ["started", "completed"]
    [released] = lines("slot.released")
    assert (released.ddx["reason"], released.ddx["kind"], released.ddx["upload"]) == ("completed", "upload", upload.pk)
    assert counter("directdrivex_uploads_completed_total") == completed_before + 1


def test_upload_failed_is_sent_with_its_reason(alice, heard, lines):
    upload, _slot = upload_create(alice, filename="bad.bin", size=SIZE, sha256="0" * 64)
    grant = writer_admit(alice, upload.pk, "test-writer")

    writer_fail(grant)

    assert heard[-1] == (
        "failed",
        {
            "sender": Upload,
            "signal": signals.upload_failed,
            "upload_id": upload.pk,
            "user_id": alice.pk,
            "size": SIZE,
            "reason": "checksum_mismatch",
        },
        "failed",
    )
    [line] = lines("upload.failed")
    assert line.levelno == logging.WARNING
    assert (line.ddx["slot"], line.ddx["gen"]) == (grant.slot_id, grant.generation)


def test_cancelling_an_unfinished_upload_sends_upload_cancelled_and_logs_the_revocation(alice, heard, lines):
    upload, slot = upload_create(alice, filename="half.bin", size=SIZE)

    upload_delete(alice, upload.pk)

    assert heard[-1][0] == "cancelled"
    assert heard[-1][1]["upload_id"] == upload.pk and heard[-1][2] == "cancelled"
    [revoked] = lines("slot.revoked")
    assert (revoked.ddx["slot"], revoked.ddx["reason"], revoked.ddx["user"]) == (slot.pk, "cancelled", alice.pk)
    assert [line.ddx["reason"] for line in lines("upload.cancelled")] == ["cancelled"]


def test_an_idle_upload_that_expires_sends_upload_expired(alice, heard, lines):
    upload, _slot = upload_create(alice, filename="idle.bin", size=SIZE)
    expired_before = counter("directdrivex_uploads_expired_total")

    uploads_expire(now=timezone.now() + timedelta(days=30))

    assert heard[-1][:1] == ("expired",) and heard[-1][1]["upload_id"] == upload.pk
    assert heard[-1][2] == "expired"
    assert len(lines("upload.expired")) == 1
    assert counter("directdrivex_uploads_expired_total") == expired_before + 1


def test_deleting_a_finished_file_sends_upload_deleted_with_what_it_was(alice, heard):
    upload = finish_upload(alice, b"y" * SIZE)

    upload_delete(alice, upload.pk)

    assert heard[-1] == (
        "deleted",
        {
            "sender": Upload,
            "signal": signals.upload_deleted,
            "upload_id": upload.pk,
            "user_id": alice.pk,
            "size": SIZE,
            "status": "complete",
        },
        None,  # the row is gone, committed
    )


def test_a_revocation_that_is_rolled_back_is_never_logged(alice, heard, lines):
    # A cancel that loses the race with completion: upload_end revokes the
    # upload's slots, finds the upload no longer uploading and rolls back.
    upload = finish_upload(alice, b"z" * SIZE)
    download = slot_admit(Slot.Kind.DOWNLOAD, alice, upload=upload)
    stale = Upload.objects.get(pk=upload.pk)
    stale.status = Upload.Status.UPLOADING
    heard.clear()

    assert upload_end(stale, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED) is False

    assert Slot.objects.get(pk=download.pk).is_active, "the rollback kept the download's slot"
    assert lines("slot.revoked") == []
    assert heard == []


def test_a_reaped_slot_is_logged_with_its_reason_and_counted(alice, lines):
    upload, slot = upload_create(alice, filename="stuck.bin", size=SIZE)
    Slot.objects.filter(pk=slot.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    before = counter("directdrivex_slots_released_total", kind="upload", reason="expired")

    slots_reap()

    [line] = lines("slot.reaped")
    assert (line.ddx["slot"], line.ddx["upload"], line.ddx["reason"]) == (slot.pk, upload.pk, "expired")
    assert line.levelno == logging.WARNING
    assert counter("directdrivex_slots_released_total", kind="upload", reason="expired") == before + 1


def test_a_failing_receiver_is_logged_and_neither_stops_the_others_nor_the_service(alice, heard, caplog):
    def broken(sender, **kwargs):
        raise ValueError("integrator bug")

    signals.upload_started.connect(broken, weak=False)
    try:
        with caplog.at_level(logging.ERROR, logger="uploads.events"):
            upload, _slot = upload_create(alice, filename="still.bin", size=SIZE)
    finally:
        signals.upload_started.disconnect(broken)

    assert Upload.objects.filter(pk=upload.pk).exists()
    assert [entry[0] for entry in heard] == ["started"]
    [failure] = [record for record in caplog.records if record.name == "uploads.events"]
    assert "signal receiver failed" in failure.getMessage() and "integrator bug" in failure.getMessage()
    assert (failure.ddx["upload"], failure.ddx["signal"]) == (upload.pk, "upload_started")
    # The traceback is django.dispatch's line.
    assert any(record.name == "django.dispatch" and record.exc_info for record in caplog.records)


# --- the lines as written ---------------------------------------------------------------


def formatted(record: logging.LogRecord) -> str:
    return LogfmtFormatter().format(record)


def test_an_http_request_gets_an_id_that_its_lines_and_its_answer_carry(alice, caplog):
    caplog.set_level(logging.INFO)
    client = session_client(alice)

    answer = client.post(
        "/api/uploads/",
        {"filename": "a b.txt", "size": SIZE},
        format="json",
        HTTP_X_REQUEST_ID="proxy-id-1234",
        REMOTE_ADDR="203.0.113.7",
    )

    assert answer.status_code == 201
    assert answer["X-Request-ID"] == "proxy-id-1234"
    [started] = [record for record in caplog.records if record.msg == "upload.started"]
    line = formatted(started)
    assert re.match(r"time=\S+Z level=INFO logger=uploads\.events msg=upload\.started ", line), line
    for field in (f"upload={answer.json()['id']}", f"user={alice.pk}", "slot=", "gen=", 'filename="a b.txt"'):
        assert field in line, line
    assert line.endswith(" request_id=proxy-id-1234 remote=203.0.113.7"), line
    [access] = [record for record in caplog.records if record.name == "uploads.http"]
    line = formatted(access)
    assert "msg=request method=POST path=/api/uploads/ status=201 duration_ms=" in line, line
    assert f"user={alice.pk} request_id=proxy-id-1234 remote=203.0.113.7" in line, line


def test_a_request_without_a_usable_id_gets_a_new_one(alice):
    client = session_client(alice)

    plain = client.get("/api/uploads/")
    hostile = client.get("/api/uploads/", HTTP_X_REQUEST_ID='x" level=CRITICAL')

    for answer in (plain, hostile):
        assert re.fullmatch(r"[0-9a-f]{32}", answer["X-Request-ID"]), answer["X-Request-ID"]
    assert plain["X-Request-ID"] != hostile["X-Request-ID"]
    assert request_id_from("a" * 129) != "a" * 129


def test_values_that_would_break_a_line_are_quoted_and_a_traceback_follows_it():
    try:
        raise KeyError("boom")
    except KeyError:
        record = logging.LogRecord("uploads.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    record.ddx = {"detail": 'says "no"\nthen=more', "empty": "", "none": None, "n": 3}
    request_token, remote_token = REQUEST_ID.set("r1"), REMOTE.set("::1")
    try:
        text = formatted(record)
    finally:
        REQUEST_ID.reset(request_token)
        REMOTE.reset(remote_token)

    first, *traceback = text.splitlines()
    assert first.endswith(
        'level=ERROR logger=uploads.x msg="failed here" detail="says \\"no\\"\\nthen=more" empty="" n=3 '
        "request_id=r1 remote=::1"
    ), first
    # Indented: only a record starts at column 0 (tests/test_logs.py).
    assert traceback[0] == "  Traceback (most recent call last):" and traceback[-1] == "  KeyError: 'boom'"
