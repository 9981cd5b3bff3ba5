"""Django admin: slots and uploads are visible with their state, and the actions go through the services."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from tests.conftest import PASSWORD, make_user
from uploads.models import Slot, Upload
from uploads.slots import slot_admit
from uploads.transfers import upload_create, writer_admit

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, db):
    make_user("root", is_staff=True, is_superuser=True)
    assert client.login(username="root", password=PASSWORD)
    return client


def test_slot_list_filters_active_stuck_and_released(admin_client, alice, bob):
    _live_upload, live = upload_create(alice, filename="live.bin", size=10)
    stuck = slot_admit(Slot.Kind.UPLOAD, bob, now=timezone.now() - timedelta(hours=1))
    url = reverse("admin:uploads_slot_changelist")

    def listed(state):
        response = admin_client.get(url, {"state": state})
        assert response.status_code == 200
        return {slot.pk for slot in response.context["cl"].result_list}

    assert listed("active") == {live.pk}
    assert listed("stuck") == {stuck.pk}
    assert listed("released") == set()


def test_release_action_resets_only_the_selected_slot_and_fences_its_writer(admin_client, alice):
    upload, _reserved = upload_create(alice, filename="a.bin", size=10)
    _other, other_slot = upload_create(alice, filename="b.bin", size=10)
    grant = writer_admit(alice, upload.pk, "specific.writer!1")

    response = admin_client.post(
        reverse("admin:uploads_slot_changelist"),
        {"action": "release_selected", "_selected_action": [grant.slot_id]},
        follow=True,
    )

    assert response.status_code == 200
    released = Slot.objects.get(pk=grant.slot_id)
    assert (released.released_at is not None, released.release_reason) == (True, "reset")
    assert Upload.objects.get(pk=upload.pk).writer_generation > grant.generation
    assert Slot.objects.get(pk=other_slot.pk).released_at is None  # the same user's other upload is untouched


def test_reap_action_releases_expired_slots(admin_client, alice):
    stuck = slot_admit(Slot.Kind.DOWNLOAD, alice, now=timezone.now() - timedelta(hours=1))
    admin_client.post(
        reverse("admin:uploads_slot_changelist"), {"action": "reap_expired", "_selected_action": [stuck.pk]}
    )
    assert Slot.objects.get(pk=stuck.pk).release_reason == "expired"


def test_cancel_action_ends_unfinished_uploads(admin_client, alice):
    upload, slot = upload_create(alice, filename="a.bin", size=10)
    admin_client.post(
        reverse("admin:uploads_upload_changelist"), {"action": "cancel_selected", "_selected_action": [upload.pk]}
    )
    assert Upload.objects.get(pk=upload.pk).status == "cancelled"
    assert Slot.objects.get(pk=slot.pk).release_reason == "cancelled"


def test_slots_cannot_be_edited_in_the_admin(admin_client, alice):
    _upload, slot = upload_create(alice, filename="a.bin", size=10)
    response = admin_client.post(
        reverse("admin:uploads_slot_change", args=[slot.pk]), {"global_index": 7, "kind": "upload"}
    )
    assert response.status_code == 403
    assert Slot.objects.get(pk=slot.pk).global_index == slot.global_index
    assert get_user_model().objects.filter(username="root").exists()
