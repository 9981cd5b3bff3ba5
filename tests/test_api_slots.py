"""GET /api/slots/: the staff-only view of upload and download slots."""

from datetime import timedelta

from django.utils import timezone

from tests.conftest import token_client
from uploads.models import Slot
from uploads.services.slots import slot_admit, slot_release
from uploads.services.uploads import upload_create

URL = "/api/slots/"


def test_staff_sees_limits_active_stuck_and_per_user_counts(alice, bob, staff, staff_client, limits):
    limits(global_upload_slots=12, user_upload_slots=4, global_download_slots=9)
    now = timezone.now()
    upload_create(alice, filename="a.bin", size=1)
    upload_create(alice, filename="b.bin", size=1)
    upload_create(bob, filename="c.bin", size=1)
    slot_admit(Slot.Kind.DOWNLOAD, bob)
    slot_admit(Slot.Kind.DOWNLOAD, bob)
    slot_admit(Slot.Kind.DOWNLOAD, staff)
    done = slot_admit(Slot.Kind.UPLOAD, staff)
    slot_release(done.pk, Slot.ReleaseReason.COMPLETED)
    # Admitted last and with a lease that already ran out: stuck until reaped.
    upload_create(bob, filename="stuck.bin", size=1, now=now - timedelta(minutes=5))
    slot_admit(Slot.Kind.DOWNLOAD, alice, now=now - timedelta(minutes=5))

    response = staff_client.get(URL)

    assert response.status_code == 200
    assert response.json() == {
        "upload": {"limit": 12, "active": 4, "stuck": 1, "by_user": {"alice": 2, "bob": 2}},
        "download": {"limit": 9, "active": 4, "stuck": 1, "by_user": {"alice": 1, "bob": 2, "staff": 1}},
    }


def test_staff_sees_empty_counts_when_nothing_is_active(staff, staff_client):
    body = staff_client.get(URL).json()

    assert body == {
        "upload": {"limit": 20, "active": 0, "stuck": 0, "by_user": {}},
        "download": {"limit": 30, "active": 0, "stuck": 0, "by_user": {}},
    }


def test_staff_with_a_token_sees_the_summary_too(staff):
    assert token_client(staff).get(URL).status_code == 200


def test_a_non_staff_user_is_refused_with_403(alice_client, bob_client):
    for client in (alice_client, bob_client):
        response = client.get(URL)

        assert response.status_code == 403
        body = response.json()
        assert body["code"] == "permission_denied"
        assert body["detail"]
        assert set(body) == {"code", "detail"}


def test_the_summary_is_read_only(staff_client):
    response = staff_client.post(URL, {}, format="json")

    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
