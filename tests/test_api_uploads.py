"""The upload API (uploads.api): POST, list, detail, DELETE; every refusal as {"code", "detail"}."""

import re
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from tests.conftest import complete_upload as complete
from tests.conftest import make_user, token_client, write_part
from tests.support import stored
from uploads.models import Slot, Upload, UserQuota
from uploads.services.grants import writer_admit, writer_commit, writer_fail
from uploads.services.slots import slots_reap
from uploads.services.uploads import upload_create, upload_end
from uploads.storage import local
from uploads.tickets import ticket_read

LIST = "/api/uploads/"
GiB = 1024**3
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
STORAGE_KEY = re.compile(r"[0-9a-f]{32}")
CREATED_FIELDS = {"id", "filename", "size", "offset", "status", "chunk_size", "window", "ws_url", "expires_at"}
DETAIL_FIELDS = {
    "id",
    "filename",
    "size",
    "offset",
    "status",
    "sha256",
    "fingerprint",
    "created_at",
    "completed_at",
    "expires_at",
    "ws_url",
}
NEXT_LINK = re.compile(r'<([^>]+)>; rel="next"')


def detail_url(upload_id) -> str:
    return f"/api/uploads/{upload_id}/"


def next_url(response) -> str | None:
    """The next page's URL from the Link header, or None on the last page."""
    if "Link" not in response:
        return None
    return NEXT_LINK.fullmatch(response["Link"]).group(1)


def pages(client, url: str) -> list[list[str]]:
    """The ids on every page of a listing, following Link from ``url`` to the last page."""
    ids = []
    while url is not None:
        response = client.get(url)
        assert response.status_code == 200, response.content
        ids.append([item["id"] for item in response.json()])
        url = next_url(response)
    return ids


def stored_uploads(user, count: int, *, at=None) -> list[Upload]:
    """``count`` rows of ``user``'s, one second apart (or all at ``at``), oldest first.

    Rows only, no slots: for listing tests that need more uploads than a user may hold slots.
    """
    t0 = timezone.now() - timedelta(hours=1)
    return Upload.objects.bulk_create(
        Upload(
            owner=user,
            original_filename=f"{n}.bin",
            display_name=f"{n}.bin",
            size=1,
            created_at=at or t0 + timedelta(seconds=n),
        )
        for n in range(count)
    )


def post(client, **body):
    return client.post(LIST, body, format="json")


def assert_refused(response, status: int, code: str) -> dict:
    """The response is the named refusal, with the {"code", "detail"} body and nothing else of the app."""
    assert response.status_code == status, response.content
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]
    assert set(body) <= {"code", "detail", "retry_after", "errors"}
    return body


def assert_nothing_stored():
    assert not Upload.objects.exists()
    assert not Slot.objects.exists()


# --- POST /api/uploads/: success ---------------------------------------------


def test_post_creates_an_uploading_upload_and_holds_a_slot_for_it(alice, alice_client, settings):
    response = post(alice_client, filename="holiday.mov", size=3_624_892_618, sha256=SHA)

    assert response.status_code == 201
    body = response.json()
    assert set(body) >= CREATED_FIELDS
    upload = Upload.objects.get()
    assert body["id"] == str(upload.pk)
    assert (body["filename"], body["size"], body["offset"], body["status"]) == (
        "holiday.mov",
        3_624_892_618,
        0,
        "uploading",
    )
    assert (body["chunk_size"], body["window"]) == (settings.DIRECTDRIVEX_CHUNK_SIZE, settings.DIRECTDRIVEX_WINDOW)
    assert (upload.owner, upload.size, upload.sha256, upload.status) == (alice, 3_624_892_618, SHA, "uploading")
    slot = Slot.objects.active().get()
    assert (slot.kind, slot.user, slot.upload, slot.holder_channel) == ("upload", alice, upload, "")


def test_post_returns_a_ws_url_with_a_ticket_for_this_user_and_upload(alice, alice_client):
    body = post(alice_client, filename="a.bin", size=1).json()

    prefix = f"/ws/uploads/{body['id']}/?ticket="
    assert body["ws_url"].startswith(prefix)
    assert ticket_read(body["ws_url"][len(prefix) :]) == (alice.pk, body["id"])


def test_a_session_signed_in_user_can_post(bob, bob_client):
    response = post(bob_client, filename="b.bin", size=5)

    assert response.status_code == 201
    assert Upload.objects.get().owner == bob


def test_a_session_post_without_a_csrf_token_is_refused(bob):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(bob)

    assert_refused(post(client, filename="b.bin", size=5), 403, "permission_denied")
    assert_nothing_stored()


def test_sha256_in_uppercase_is_stored_lowercase(alice_client):
    body = post(alice_client, filename="a.bin", size=1, sha256=SHA.upper()).json()

    assert body["sha256"] == SHA
    assert Upload.objects.get().sha256 == SHA


def test_sha256_may_be_left_out_or_blank(alice_client):
    assert post(alice_client, filename="a.bin", size=1).json()["sha256"] == ""
    assert post(alice_client, filename="b.bin", size=1, sha256="").json()["sha256"] == ""


def test_a_fingerprint_is_stored_and_returned_exactly_as_sent_by_post_detail_and_list(alice_client):
    # The longest accepted, with the whitespace and non-ASCII an opaque value may hold.
    fingerprint = (" holiday.mov\t3624892618 ü " + "x" * 256)[:256]

    body = post(alice_client, filename="holiday.mov", size=1, fingerprint=fingerprint).json()

    assert body["fingerprint"] == fingerprint
    assert Upload.objects.get().fingerprint == fingerprint
    assert alice_client.get(detail_url(body["id"])).json()["fingerprint"] == fingerprint
    assert [item["fingerprint"] for item in alice_client.get(LIST).json()] == [fingerprint]


def test_a_fingerprint_may_be_left_out_or_blank(alice_client):
    assert post(alice_client, filename="a.bin", size=1).json()["fingerprint"] == ""
    assert post(alice_client, filename="b.bin", size=1, fingerprint="").json()["fingerprint"] == ""
    assert list(Upload.objects.values_list("fingerprint", flat=True)) == ["", ""]


def test_the_largest_accepted_size_is_the_maximum(alice_client, settings):
    response = post(alice_client, filename="a.bin", size=settings.DIRECTDRIVEX_MAX_FILE_SIZE)

    assert response.status_code == 201
    assert Upload.objects.get().size == 10 * GiB


# --- POST /api/uploads/: refusals -------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"size": 10}, id="no-filename"),
        pytest.param({"filename": "", "size": 10}, id="empty-filename"),
        pytest.param({"filename": None, "size": 10}, id="null-filename"),
        pytest.param({"filename": ["a"], "size": 10}, id="list-filename"),
        pytest.param({"filename": 7, "size": 10}, id="number-filename"),
        pytest.param({"filename": "a" * 16385, "size": 10}, id="filename-over-16k"),
        pytest.param({"filename": "a.bin"}, id="no-size"),
        pytest.param({"filename": "a.bin", "size": 0}, id="size-0"),
        pytest.param({"filename": "a.bin", "size": -1}, id="size-negative"),
        pytest.param({"filename": "a.bin", "size": -(2**63)}, id="size-very-negative"),
        pytest.param({"filename": "a.bin", "size": "10"}, id="size-string"),
        pytest.param({"filename": "a.bin", "size": 1.5}, id="size-float"),
        pytest.param({"filename": "a.bin", "size": 10.0}, id="size-integral-float"),
        pytest.param({"filename": "a.bin", "size": True}, id="size-true"),
        pytest.param({"filename": "a.bin", "size": None}, id="size-null"),
        pytest.param({"filename": "a.bin", "size": [10]}, id="size-list"),
        pytest.param({"filename": "a.bin", "size": 10, "sha256": SHA[:-1]}, id="sha256-short"),
        pytest.param({"filename": "a.bin", "size": 10, "sha256": SHA + "0"}, id="sha256-long"),
        pytest.param({"filename": "a.bin", "size": 10, "sha256": "g" * 64}, id="sha256-not-hex"),
        pytest.param({"filename": "a.bin", "size": 10, "sha256": f" {SHA[1:]}"}, id="sha256-space"),
        pytest.param({"filename": "a.bin", "size": 10, "sha256": None}, id="sha256-null"),
        pytest.param({"filename": "a.bin", "size": 10, "sha256": f" {SHA} "}, id="sha256-padded"),
        pytest.param({"filename": "a.bin", "size": 10, "sha256": f"{SHA}\n"}, id="sha256-trailing-newline"),
        pytest.param({"filename": "a.bin", "size": 10, "sha256": 1}, id="sha256-number"),
        pytest.param({"filename": "a.bin", "size": 10, "fingerprint": "f" * 257}, id="fingerprint-257-chars"),
        pytest.param({"filename": "a.bin", "size": 10, "fingerprint": 5}, id="fingerprint-number"),
        pytest.param({"filename": "a.bin", "size": 10, "fingerprint": None}, id="fingerprint-null"),
        pytest.param({"filename": "a.bin", "size": 10, "fingerprint": ["f"]}, id="fingerprint-list"),
        pytest.param({"filename": "a.bin", "size": 10, "fingerprint": "a\x00b"}, id="fingerprint-nul"),
    ],
)
def test_invalid_fields_are_refused_with_400_invalid_and_nothing_is_stored(alice_client, body):
    body = assert_refused(alice_client.post(LIST, body, format="json"), 400, "invalid")

    assert body["errors"]
    assert_nothing_stored()


def test_field_errors_name_the_field(alice_client):
    body = assert_refused(post(alice_client, filename="a.bin", size=0), 400, "invalid")

    assert set(body["errors"]) == {"size"}
    assert body["detail"].startswith("size: ")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param('{"filename": "a.bin", "size": ', id="truncated"),
        pytest.param("{'filename': 'a.bin', 'size': 1}", id="single-quotes"),
        pytest.param('{"filename": "a.bin", "size": 1}}', id="trailing-brace"),
        pytest.param("", id="empty"),
        pytest.param("\xff\xfe", id="not-utf8"),
    ],
)
def test_malformed_json_is_refused_with_400_invalid(alice_client, raw):
    response = alice_client.post(LIST, raw.encode("latin-1"), content_type="application/json")

    assert_refused(response, 400, "invalid")
    assert_nothing_stored()


def test_a_filename_with_a_lone_surrogate_is_refused(alice_client):
    # Valid JSON, but no database can store the string it decodes to.
    raw = b'{"filename": "a\\ud800b.txt", "size": 10}'

    assert_refused(alice_client.post(LIST, raw, content_type="application/json"), 400, "invalid")
    assert_nothing_stored()


def test_a_json_body_that_is_not_an_object_is_refused(alice_client):
    assert_refused(alice_client.post(LIST, ["a.bin", 10], format="json"), 400, "invalid")
    assert_nothing_stored()


def test_a_form_body_is_refused_as_unsupported(alice_client):
    response = alice_client.post(LIST, {"filename": "a.bin", "size": "10"}, format="multipart")

    assert_refused(response, 415, "unsupported_media_type")
    assert_nothing_stored()


@pytest.mark.parametrize("size", [10 * GiB + 1, 2**63 - 1, 2**63, 2**64, 10**30])
def test_a_size_above_the_maximum_is_refused_with_413_and_nothing_is_stored(alice_client, size):
    body = assert_refused(post(alice_client, filename="a.bin", size=size), 413, "file_too_large")

    assert str(10 * GiB) in body["detail"]
    assert_nothing_stored()


def test_a_size_above_the_users_quota_is_refused_with_413(alice_client, limits):
    limits(user_quota=1000)
    assert post(alice_client, filename="a.bin", size=600).status_code == 201

    body = assert_refused(post(alice_client, filename="b.bin", size=401), 413, "quota_exceeded")

    assert "400" in body["detail"]
    assert Upload.objects.count() == 1
    assert post(alice_client, filename="c.bin", size=400).status_code == 201


def test_a_per_user_quota_override_replaces_the_default(alice, alice_client, bob_client, limits):
    limits(user_quota=1000)
    UserQuota.objects.create(user=alice, max_bytes=5000)

    assert post(alice_client, filename="a.bin", size=5000).status_code == 201
    assert_refused(post(alice_client, filename="b.bin", size=1), 413, "quota_exceeded")
    assert_refused(post(bob_client, filename="c.bin", size=1001), 413, "quota_exceeded")


def test_a_zero_quota_override_refuses_everything(alice, alice_client):
    UserQuota.objects.create(user=alice, max_bytes=0)

    assert_refused(post(alice_client, filename="a.bin", size=1), 413, "quota_exceeded")
    assert_nothing_stored()


def test_quota_counts_finished_and_reserved_bytes_but_not_ended_uploads(alice, alice_client, limits):
    limits(user_quota=1000)
    upload_create(alice, filename="reserved.bin", size=300)
    finished, _ = upload_create(alice, filename="finished.bin", size=4)
    complete(alice, finished.pk, b"done")
    cancelled, _ = upload_create(alice, filename="cancelled.bin", size=200)
    upload_end(cancelled, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED)
    expired, _ = upload_create(alice, filename="expired.bin", size=200)
    upload_end(expired, Upload.Status.EXPIRED, Slot.ReleaseReason.EXPIRED)
    failed, _ = upload_create(alice, filename="failed.bin", size=200)
    writer_fail(writer_admit(alice, failed.pk, "test-writer"))

    # 300 reserved + 4 finished are used; the 600 of ended uploads are not.
    assert_refused(post(alice_client, filename="x.bin", size=697), 413, "quota_exceeded")
    assert post(alice_client, filename="x.bin", size=696).status_code == 201


def test_the_sixth_concurrent_upload_is_refused_with_retry_after(alice_client, settings):
    for n in range(5):
        assert post(alice_client, filename=f"{n}.bin", size=1).status_code == 201

    response = post(alice_client, filename="6.bin", size=1)

    body = assert_refused(response, 429, "user_slots_exhausted")
    assert response["Retry-After"] == str(body["retry_after"])
    assert 1 <= body["retry_after"] <= settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS
    assert Upload.objects.count() == 5
    assert Slot.objects.active().count() == 5


def test_the_twenty_first_upload_globally_is_refused_with_retry_after(alice_client, bob_client, staff_client):
    clients = [alice_client, bob_client, staff_client, token_client(make_user("carol"))]
    for client in clients:
        for n in range(5):
            assert post(client, filename=f"{n}.bin", size=1).status_code == 201

    response = post(token_client(make_user("dave")), filename="21.bin", size=1)

    body = assert_refused(response, 429, "global_slots_exhausted")
    assert response["Retry-After"] == str(body["retry_after"])
    assert 1 <= body["retry_after"] <= 60
    assert Upload.objects.count() == 20
    assert Slot.objects.active().count() == 20


def test_delete_frees_a_slot_for_the_next_upload(alice_client):
    ids = [post(alice_client, filename=f"{n}.bin", size=1).json()["id"] for n in range(5)]
    assert_refused(post(alice_client, filename="6.bin", size=1), 429, "user_slots_exhausted")

    assert alice_client.delete(detail_url(ids[0])).status_code == 204

    assert post(alice_client, filename="6.bin", size=1).status_code == 201
    assert Slot.objects.active().count() == 5


def test_slots_with_expired_leases_are_reclaimed_by_the_next_post(alice, alice_client):
    long_ago = timezone.now() - timedelta(minutes=2)
    for n in range(5):
        upload_create(alice, filename=f"{n}.bin", size=1, now=long_ago)

    response = post(alice_client, filename="6.bin", size=1)

    assert response.status_code == 201
    assert list(Slot.objects.active().values_list("upload_id", flat=True)) == [uuid.UUID(response.json()["id"])]
    assert Slot.objects.filter(release_reason=Slot.ReleaseReason.EXPIRED).count() == 5


# --- filenames ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        pytest.param("../../etc/passwd", "passwd", id="slash-dotdot"),
        pytest.param("..\\..\\Windows\\System32\\evil.dll", "evil.dll", id="backslash-dotdot"),
        pytest.param("C:\\Users\\alice\\My Report.docx", "My Report.docx", id="windows-path"),
        pytest.param("..", "unnamed", id="dotdot"),
        pytest.param("photos/../..", "unnamed", id="ends-in-dotdot"),
        pytest.param("/", "unnamed", id="slash"),
        pytest.param("report\x00.pdf", "report.pdf", id="nul"),
        pytest.param("\x00", "unnamed", id="only-nul"),
        pytest.param("invoice\x1b[31m\x07.txt", "invoice[31m.txt", id="escape-and-bell"),
        pytest.param("line\nbreak\r\n.txt", "linebreak.txt", id="newlines"),
        pytest.param("tab\there.txt", "tabhere.txt", id="tab"),
        pytest.param("\x7fdel.txt", "del.txt", id="delete"),
        pytest.param("photo\u202egnp.exe", "photognp.exe", id="right-to-left-override"),
        pytest.param("a\u200bb\ufeff.txt", "ab.txt", id="zero-width"),
        pytest.param(".bashrc", "bashrc", id="hidden"),
        pytest.param("CON.txt", "_CON.txt", id="windows-device"),
        pytest.param("a" * 10_000, "a" * 255, id="10000-chars"),
        pytest.param("b" * 9_996 + ".pdf", "b" * 251 + ".pdf", id="10000-chars-with-extension"),
    ],
)
def test_odd_filenames_are_accepted_with_a_sanitized_display_name(alice_client, raw, shown):
    response = post(alice_client, filename=raw, size=1)

    assert response.status_code == 201, response.content
    assert response.json()["filename"] == shown
    upload = Upload.objects.get()
    assert upload.display_name == shown
    assert upload.original_filename == raw.replace("\x00", "\ufffd")
    assert STORAGE_KEY.fullmatch(upload.storage_key)
    assert alice_client.get(detail_url(upload.pk)).json()["filename"] == shown


def test_the_storage_key_does_not_derive_from_the_filename(alice_client):
    for _ in range(2):
        post(alice_client, filename="../../etc/passwd", size=1)
        post(alice_client, filename="a" * 10_000, size=1)

    keys = list(Upload.objects.values_list("storage_key", flat=True))
    assert len(set(keys)) == 4
    assert all(STORAGE_KEY.fullmatch(key) for key in keys)
    # Bytes of any of them would live directly under the storage folder, whatever the name.
    for key in keys:
        assert local.part_path(key).parent == local.root() / "partial"


# --- GET /api/uploads/ -------------------------------------------------------


def test_list_shows_only_the_callers_uploads_newest_first(alice, bob, alice_client):
    t0 = timezone.now() - timedelta(minutes=1)
    first, _ = upload_create(alice, filename="first.bin", size=1, now=t0)
    upload_create(bob, filename="bobs.bin", size=1, now=t0 + timedelta(seconds=1))
    second, _ = upload_create(alice, filename="second.bin", size=1, now=t0 + timedelta(seconds=2))
    third, _ = upload_create(alice, filename="third.bin", size=1, now=t0 + timedelta(seconds=3))

    response = alice_client.get(LIST)

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    assert "Link" not in response
    assert [item["id"] for item in response.json()] == [str(third.pk), str(second.pk), str(first.pk)]


def test_list_filters_by_status(alice, alice_client):
    uploading, _ = upload_create(alice, filename="uploading.bin", size=1)
    done, _ = upload_create(alice, filename="done.bin", size=1)
    complete(alice, done.pk, b"x")
    cancelled, _ = upload_create(alice, filename="cancelled.bin", size=1)
    upload_end(cancelled, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED)

    def listed(status):
        body = alice_client.get(LIST, {"status": status}).json()
        return [(item["id"], item["status"]) for item in body]

    assert listed("uploading") == [(str(uploading.pk), "uploading")]
    assert listed("complete") == [(str(done.pk), "complete")]
    assert listed("cancelled") == [(str(cancelled.pk), "cancelled")]
    assert listed("expired") == []
    assert len(alice_client.get(LIST).json()) == 3


def test_list_gives_ws_url_only_to_uploads_still_uploading(alice, alice_client):
    upload_create(alice, filename="uploading.bin", size=1)
    done, _ = upload_create(alice, filename="done.bin", size=1)
    complete(alice, done.pk, b"x")

    by_status = {item["status"]: item for item in alice_client.get(LIST).json()}

    assert by_status["uploading"]["ws_url"].startswith("/ws/uploads/")
    assert by_status["complete"]["ws_url"] is None


@pytest.mark.parametrize("status", ["bogus", "UPLOADING", "done", "", " uploading"])
def test_list_with_an_unknown_or_empty_status_is_refused_with_400(alice_client, status):
    body = assert_refused(alice_client.get(LIST, {"status": status}), 400, "invalid")

    assert set(body["errors"]) == {"status"}


def test_list_gives_at_most_limit_uploads_and_links_the_next_page(alice, alice_client):
    uploads = stored_uploads(alice, 5)

    response = alice_client.get(LIST, {"limit": 2})

    assert [item["id"] for item in response.json()] == [str(uploads[4].pk), str(uploads[3].pk)]
    link = next_url(response)
    assert link.startswith("http://testserver/api/uploads/?")
    assert "limit=2" in link
    newest_first = [str(upload.pk) for upload in reversed(uploads)]
    assert pages(alice_client, link) == [newest_first[2:4], newest_first[4:]]


def test_list_has_no_next_link_when_the_page_holds_the_last_upload(alice, alice_client):
    stored_uploads(alice, 3)

    response = alice_client.get(LIST, {"limit": 3})

    assert len(response.json()) == 3
    assert "Link" not in response


def test_list_gives_100_uploads_by_default_and_up_to_1000_when_asked(alice, alice_client):
    stored_uploads(alice, 1001)

    first = alice_client.get(LIST)
    most = alice_client.get(LIST, {"limit": 1000})

    assert len(first.json()) == 100
    assert next_url(first) is not None
    assert len(most.json()) == 1000
    assert [len(page) for page in pages(alice_client, next_url(most))] == [1]


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "", "abc", "1.0", " 5", "+5", "1e3", "9" * 30])
def test_list_with_a_bad_limit_is_refused_with_400(alice_client, limit):
    body = assert_refused(alice_client.get(LIST, {"limit": limit}), 400, "invalid")

    assert set(body["errors"]) == {"limit"}


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "abc",
        f"1-{'g' * 32}",
        f"1-{'A' * 32}",
        f"{'1' * 18}-{'a' * 32}",
        f"1-{'a' * 31}",
        f"-{'a' * 32}",
        f"1-{'a' * 32}\n",
    ],
)
def test_list_with_a_cursor_not_made_by_the_server_is_refused_with_400(alice_client, cursor):
    body = assert_refused(alice_client.get(LIST, {"cursor": cursor}), 400, "invalid")

    assert set(body["errors"]) == {"cursor"}


def test_pages_neither_skip_nor_repeat_when_uploads_arrive_between_them(alice, alice_client, limits):
    limits(user_upload_slots=10)
    t0 = timezone.now() - timedelta(minutes=1)
    old = [upload_create(alice, filename=f"{n}.bin", size=1, now=t0 + timedelta(seconds=n))[0] for n in range(4)]
    first = alice_client.get(LIST, {"limit": 2})
    new = [post(alice_client, filename=f"new{n}.bin", size=1).json()["id"] for n in range(2)]

    rest = pages(alice_client, next_url(first))

    assert [item["id"] for item in first.json()] == [str(old[3].pk), str(old[2].pk)]
    assert rest == [[str(old[1].pk), str(old[0].pk)]]
    assert [item["id"] for item in alice_client.get(LIST, {"limit": 2}).json()] == new[::-1]


def test_uploads_created_at_the_same_instant_are_paged_by_id_without_loss(alice, alice_client):
    uploads = stored_uploads(alice, 3, at=timezone.now() - timedelta(minutes=1))

    listed = pages(alice_client, f"{LIST}?limit=1")

    assert listed == [[str(pk)] for pk in sorted((upload.pk for upload in uploads), reverse=True)]


def test_the_next_link_keeps_the_status_filter(alice, alice_client):
    t0 = timezone.now() - timedelta(minutes=1)
    kept = []
    for n in range(4):
        upload, _ = upload_create(alice, filename=f"{n}.bin", size=1, now=t0 + timedelta(seconds=n))
        if n % 2:
            upload_end(upload, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED)
        else:
            kept.append(str(upload.pk))

    listed = pages(alice_client, f"{LIST}?status=uploading&limit=1")

    assert listed == [[kept[1]], [kept[0]]]


def test_a_cursor_from_someone_elses_listing_shows_only_the_callers_uploads(alice, bob, alice_client, bob_client):
    alices = stored_uploads(alice, 2)
    stored_uploads(bob, 3)
    bobs_link = next_url(bob_client.get(LIST, {"limit": 1}))

    # A cursor is only a position in the order: it carries no one's rows.
    listed = pages(alice_client, bobs_link)

    assert listed == [[str(alices[1].pk)], [str(alices[0].pk)]]


# --- GET /api/uploads/<id>/ --------------------------------------------------


def test_detail_shows_the_durable_offset_and_is_never_cached(alice, alice_client):
    upload, _ = upload_create(alice, filename="a.bin", size=100, sha256=SHA)
    grant = writer_admit(alice, upload.pk, "test-writer")
    writer_commit(grant, 42)

    response = alice_client.get(detail_url(upload.pk))

    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    body = response.json()
    assert set(body) >= DETAIL_FIELDS
    assert (body["id"], body["filename"], body["size"], body["offset"], body["status"], body["sha256"]) == (
        str(upload.pk),
        "a.bin",
        100,
        42,
        "uploading",
        SHA,
    )
    assert body["completed_at"] is None
    prefix = f"/ws/uploads/{upload.pk}/?ticket="
    assert body["ws_url"].startswith(prefix)
    assert ticket_read(body["ws_url"][len(prefix) :]) == (alice.pk, str(upload.pk))


def test_detail_of_a_finished_upload_has_no_ws_url(alice, alice_client):
    upload, _ = upload_create(alice, filename="a.bin", size=3)
    complete(alice, upload.pk, b"abc")

    body = alice_client.get(detail_url(upload.pk)).json()

    assert (body["status"], body["offset"], body["ws_url"]) == ("complete", 3, None)
    assert body["completed_at"] is not None


def test_an_upload_whose_reserved_slot_expired_is_still_resumable(alice, alice_client):
    upload, _slot = upload_create(alice, filename="a.bin", size=3)
    slots_reap(now=timezone.now() + timedelta(seconds=61))

    body = alice_client.get(detail_url(upload.pk)).json()

    assert not Slot.objects.active().exists()
    assert body["status"] == "uploading"
    assert body["ws_url"].startswith(f"/ws/uploads/{upload.pk}/?ticket=")


@pytest.mark.parametrize("method", ["get", "delete"])
def test_unknown_garbage_and_other_users_ids_are_all_404_not_found(alice_client, bob, method):
    bobs, bobs_slot = upload_create(bob, filename="bob.bin", size=1)
    call = getattr(alice_client, method)

    bodies = [
        assert_refused(call(detail_url(upload_id)), 404, "not_found")
        for upload_id in (uuid.uuid4(), "not-a-uuid", "1", "%00", bobs.pk)
    ]

    # Someone else's upload is indistinguishable from a missing one.
    assert all(body == bodies[0] for body in bodies)
    bobs.refresh_from_db()
    assert bobs.status == Upload.Status.UPLOADING
    assert Slot.objects.active().get() == bobs_slot


# --- DELETE /api/uploads/<id>/ -----------------------------------------------


def test_delete_cancels_an_unfinished_upload_and_frees_its_quota(alice_client, limits):
    limits(user_quota=1000)
    upload_id = post(alice_client, filename="a.bin", size=1000).json()["id"]
    assert_refused(post(alice_client, filename="b.bin", size=1), 413, "quota_exceeded")

    response = alice_client.delete(detail_url(upload_id))

    assert response.status_code == 204
    assert response.content == b""
    upload = Upload.objects.get(pk=upload_id)
    assert upload.status == Upload.Status.CANCELLED
    assert Slot.objects.get(upload=upload).release_reason == Slot.ReleaseReason.CANCELLED
    assert not Slot.objects.active().exists()
    assert post(alice_client, filename="b.bin", size=1000).status_code == 201


def test_delete_removes_the_partial_bytes(alice, alice_client, bob):
    upload_id = post(alice_client, filename="a.bin", size=10).json()["id"]
    upload = Upload.objects.get(pk=upload_id)
    write_part(upload.storage_key, b"0123456789")
    bobs, _ = upload_create(bob, filename="b.bin", size=10)
    write_part(bobs.storage_key, b"9876543210")
    bobs_before = stored.snapshot(bobs.storage_key)
    assert stored.part_stored(upload.storage_key) and stored.part_stored(bobs.storage_key)

    assert alice_client.delete(detail_url(upload_id)).status_code == 204

    assert stored.nothing_stored(upload.storage_key)
    assert stored.snapshot(bobs.storage_key) == bobs_before


def test_delete_of_a_cancelled_upload_removes_its_row(alice_client):
    upload_id = post(alice_client, filename="a.bin", size=10).json()["id"]
    assert alice_client.delete(detail_url(upload_id)).status_code == 204
    assert Upload.objects.get(pk=upload_id).status == Upload.Status.CANCELLED

    assert alice_client.delete(detail_url(upload_id)).status_code == 204

    assert not Upload.objects.filter(pk=upload_id).exists()
    assert_refused(alice_client.delete(detail_url(upload_id)), 404, "not_found")


def test_delete_of_a_complete_upload_removes_its_row_and_file_and_frees_its_quota(alice, alice_client, limits):
    limits(user_quota=10)
    upload, _ = upload_create(alice, filename="a.bin", size=10)
    complete(alice, upload.pk, b"0123456789")
    assert stored.finished_bytes(upload.storage_key) == b"0123456789"
    assert_refused(post(alice_client, filename="b.bin", size=1), 413, "quota_exceeded")

    assert alice_client.delete(detail_url(upload.pk)).status_code == 204

    assert not Upload.objects.filter(pk=upload.pk).exists()
    assert stored.nothing_stored(upload.storage_key)
    assert post(alice_client, filename="b.bin", size=10).status_code == 201


@pytest.mark.local_storage  # a folder planted where the local layout keeps the bytes
@pytest.mark.parametrize("finished", [True, False], ids=["complete", "unfinished"])
def test_a_delete_whose_bytes_cannot_be_removed_is_a_500_and_the_next_delete_finishes_it(alice, alice_client, finished):
    # A folder with something in it where the upload's bytes are: the storage refuses,
    # as a read-only or failing disk would. A 204 would claim bytes gone that are not.
    upload, _ = upload_create(alice, filename="a.bin", size=10)
    if finished:
        complete(alice, upload.pk, b"0123456789")
        path = local.final_path(upload.storage_key)
    else:
        write_part(upload.storage_key, b"01234")
        path = local.part_path(upload.storage_key)
    path.unlink()
    (path / "in-the-way").mkdir(parents=True)

    assert_refused(alice_client.delete(detail_url(upload.pk)), 500, "internal_error")

    # The row is still there to DELETE again (an unfinished one as cancelled, its slot freed).
    row = Upload.objects.get(pk=upload.pk)
    assert row.status == ("complete" if finished else "cancelled")
    assert not Slot.objects.active().filter(upload=upload).exists()
    (path / "in-the-way").rmdir()
    path.rmdir()
    assert alice_client.delete(detail_url(upload.pk)).status_code == 204
    assert not Upload.objects.filter(pk=upload.pk).exists()


# --- authentication ------------------------------------------------------------


ENDPOINTS = [
    ("post", LIST),
    ("get", LIST),
    ("get", detail_url(uuid.uuid4())),
    ("delete", detail_url(uuid.uuid4())),
    ("get", "/api/slots/"),
]


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
def test_calls_without_credentials_are_refused_with_401(db, anonymous_client, method, url):
    response = getattr(anonymous_client, method)(url, {"filename": "a.bin", "size": 1}, format="json")

    assert_refused(response, 401, "unauthenticated")
    assert response["WWW-Authenticate"] == "Token"
    assert_nothing_stored()


@pytest.mark.parametrize(("method", "url"), ENDPOINTS)
@pytest.mark.parametrize("header", ["Token not-a-real-token", "Token ", "Bearer abc", "Token a b"])
def test_calls_with_a_bad_token_are_refused_with_401(alice, method, url, header):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=header)

    response = getattr(client, method)(url, {"filename": "a.bin", "size": 1}, format="json")

    # "Bearer …" is not a token header at all: the caller is simply anonymous.
    assert_refused(response, 401, "unauthenticated")
    assert_nothing_stored()


def test_the_token_of_a_deactivated_user_is_refused(alice, alice_client):
    alice.is_active = False
    alice.save()

    assert_refused(post(alice_client, filename="a.bin", size=1), 401, "unauthenticated")
    assert_nothing_stored()
