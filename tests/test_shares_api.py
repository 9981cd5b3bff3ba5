"""POST / GET /api/uploads/<id>/shares/ and DELETE /api/shares/<id>/, through DRF with token auth.

What the public page then does with a link is tests/test_shares_live.py; these
pin the owner's side: who may create, list and revoke, the limits, the
stored hash, and that a revoke holds for the very next request.
"""

import hashlib
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from tests.conftest import finish_upload, token_client
from uploads.models import ShareLink, Slot
from uploads.services.shares import share_create, share_open, token_for
from uploads.services.uploads import upload_create

pytestmark = pytest.mark.django_db

DATA = b"shared bytes " * 1000


@pytest.fixture
def finished(alice):
    return finish_upload(alice, DATA, filename="report.pdf")


def _create(client, upload_id, **body):
    return client.post(f"/api/uploads/{upload_id}/shares/", body, format="json")


def test_create_answers_the_link_and_stores_only_its_hash(alice, finished, settings):
    answer = _create(token_client(alice), finished.pk, max_downloads=3, expires_in=3600)
    assert answer.status_code == 201, answer.content
    body = answer.json()
    assert set(body) >= {"id", "url", "expires_at", "max_downloads", "downloads"}
    assert body["max_downloads"] == 3 and body["downloads"] == 0 and body["password"] is False
    assert body["status"] == "active"
    token = body["url"].rsplit("/s/", 1)[1]
    assert body["url"].startswith("http://testserver/s/")
    # 256 bits as unpadded base64url; at least the 128 the contract asks for.
    assert len(token) == 43
    link = ShareLink.objects.get(pk=body["id"])
    assert link.token_hash == hashlib.sha256(token.encode()).hexdigest()
    stored = [str(value) for value in ShareLink.objects.filter(pk=link.pk).values_list().get()]
    assert not any(token in value for value in stored), "the token itself must not be stored"
    expires = link.expires_at - link.created_at
    assert expires == timedelta(seconds=3600)
    # The owner can copy the same link again later; the listing shows it.
    assert token_for(link) == token
    listed = token_client(alice).get(f"/api/uploads/{finished.pk}/shares/")
    assert listed.status_code == 200 and listed["Cache-Control"] == "no-store"
    assert [item["url"] for item in listed.json()] == [body["url"]]


def test_default_expiry_is_the_maximum(alice, finished, settings):
    settings.DIRECTDRIVEX_SHARE_MAX_DAYS = 2
    body = _create(token_client(alice), finished.pk).json()
    link = ShareLink.objects.get(pk=body["id"])
    assert link.expires_at - link.created_at == timedelta(days=2)
    assert body["max_downloads"] is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("expires_in", 30 * 86400 + 1, "at most 2592000 seconds"),
        ("expires_in", 0, "greater than or equal to 1"),
        ("expires_in", "60", "JSON integer"),
        ("max_downloads", -1, "greater than or equal to 1"),
        ("max_downloads", 0, "greater than or equal to 1"),
        ("max_downloads", 1.5, "JSON integer"),
        ("password", 12, "Not a valid string"),
    ],
)
def test_bad_limits_are_refused_by_name(alice, finished, field, value, message):
    answer = _create(token_client(alice), finished.pk, **{field: value})
    assert answer.status_code == 400
    body = answer.json()
    assert body["code"] == "invalid" and field in body["errors"]
    assert message in str(body["errors"][field])
    assert not ShareLink.objects.exists()


def test_an_unfinished_upload_cannot_be_shared(alice):
    upload, _slot = upload_create(alice, filename="half.bin", size=100)
    answer = _create(token_client(alice), upload.pk)
    assert answer.status_code == 409 and answer.json()["code"] == "not_complete"
    assert not ShareLink.objects.exists()


def test_other_users_uploads_and_links_are_not_found(alice, bob, finished):
    bob_api = token_client(bob)
    for answer in (
        _create(bob_api, finished.pk),
        bob_api.get(f"/api/uploads/{finished.pk}/shares/"),
    ):
        assert answer.status_code == 404 and answer.json()["code"] == "not_found"
    link, _token = share_create(alice, finished.pk)
    answer = bob_api.delete(f"/api/shares/{link.pk}/")
    assert answer.status_code == 404 and answer.json() == {"code": "not_found", "detail": "No such share link."}
    unknown = bob_api.delete("/api/shares/999999/")
    assert unknown.status_code == 404 and unknown.json() == answer.json()
    assert bob_api.delete("/api/shares/not-a-number/").status_code == 404
    link.refresh_from_db()
    assert link.revoked_at is None


def test_anonymous_calls_are_refused(finished):
    from rest_framework.test import APIClient

    assert APIClient().post(f"/api/uploads/{finished.pk}/shares/", {}, format="json").status_code in (401, 403)


def test_revoke_takes_effect_for_the_next_request(alice, finished):
    api = token_client(alice)
    body = _create(api, finished.pk).json()
    page = body["url"].replace("http://testserver", "")
    visitor = Client()
    assert visitor.get(page).status_code == 200
    assert api.delete(f"/api/shares/{body['id']}/").status_code == 204
    gone = visitor.get(page)
    assert gone.status_code == 404
    assert visitor.get(page + "/download").status_code == 404
    # Revoking again is still a 204: the link stays revoked, nothing else happens.
    assert api.delete(f"/api/shares/{body['id']}/").status_code == 204
    listed = api.get(f"/api/uploads/{finished.pk}/shares/").json()
    assert listed[0]["status"] == "revoked" and listed[0]["revoked_at"]


def test_deleting_the_file_ends_its_links(alice, finished):
    api = token_client(alice)
    body = _create(api, finished.pk).json()
    assert api.delete(f"/api/uploads/{finished.pk}/").status_code == 204
    assert not ShareLink.objects.filter(pk=body["id"]).exists()
    assert Client().get(body["url"].replace("http://testserver", "")).status_code == 404


def test_share_open_refuses_every_closed_link_alike(alice, finished):
    now = timezone.now()
    opened, token = share_create(alice, finished.pk, max_downloads=1)
    assert share_open(token).pk == opened.pk
    from uploads.exceptions import ShareNotFound

    _expired, expired_token = share_create(alice, finished.pk, expires_in=60, now=now - timedelta(seconds=61))
    used, used_token = share_create(alice, finished.pk, max_downloads=1)
    ShareLink.objects.filter(pk=used.pk).update(downloads=1)
    bytes_used, bytes_token = share_create(alice, finished.pk, max_downloads=2)
    ShareLink.objects.filter(pk=bytes_used.pk).update(bytes_sent=2 * len(DATA))
    for token_ in (expired_token, used_token, bytes_token, "x" * 43, token[:-1], token + "A", ""):
        with pytest.raises(ShareNotFound):
            share_open(token_)


def test_slots_of_a_link_count_apart_from_the_owner(alice, finished, settings):
    settings.DIRECTDRIVEX_USER_DOWNLOAD_SLOTS = 1
    from uploads.exceptions import ShareDownloadSlotsExhausted, UserDownloadSlotsExhausted
    from uploads.services.slots import slot_admit

    link, _token = share_create(alice, finished.pk)
    other, _other_token = share_create(alice, finished.pk)
    slot_admit(Slot.Kind.DOWNLOAD, alice, upload=finished)
    # The owner's own slot is taken; the link's visitors still get theirs, one per link.
    slot_admit(Slot.Kind.DOWNLOAD, alice, upload=finished, share=link)
    with pytest.raises(ShareDownloadSlotsExhausted):
        slot_admit(Slot.Kind.DOWNLOAD, alice, upload=finished, share=link)
    slot_admit(Slot.Kind.DOWNLOAD, alice, upload=finished, share=other)
    with pytest.raises(UserDownloadSlotsExhausted):
        slot_admit(Slot.Kind.DOWNLOAD, alice, upload=finished)
