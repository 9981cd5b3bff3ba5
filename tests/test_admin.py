"""Django admin: slots and uploads are visible with their state, and the actions go through the services."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from tests.conftest import PASSWORD, finish_upload, make_user, write_part
from uploads import storage
from uploads.exceptions import NotUploading
from uploads.models import Slot, Upload, UserQuota
from uploads.slots import slot_admit
from uploads.transfers import upload_create, writer_admit, writer_commit

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, staff):
    """staff, signed in to the admin with every permission."""
    staff.is_superuser = True
    staff.save(update_fields=["is_superuser"])
    assert client.login(username="staff", password=PASSWORD)
    return client


@pytest.fixture
def viewer_client(client, db):
    """A staff member who may look at uploads and slots, and nothing else."""
    viewer = make_user("viewer", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename__in=["view_upload", "view_slot"]))
    assert client.login(username="viewer", password=PASSWORD)
    return client


def finished(user, data: bytes) -> Upload:
    return finish_upload(user, data, filename="done.bin")


def run_action(client, model: str, action: str, *pks):
    return client.post(
        reverse(f"admin:uploads_{model}_changelist"),
        {"action": action, "_selected_action": [str(pk) for pk in pks]},
        follow=True,
    )


def offered_actions(client, model: str) -> set[str]:
    response = client.get(reverse(f"admin:uploads_{model}_changelist"))
    assert response.status_code == 200
    form = response.context["action_form"]
    return {name for name, _label in form.fields["action"].choices if name} if form else set()


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


# --- deleting uploads: only through upload_delete, the service behind DELETE /api/uploads/<id>/ --------


def test_delete_action_removes_a_finished_uploads_row_and_file(admin_client, alice):
    upload = finished(alice, b"0123456789")
    assert storage.final_path(upload.storage_key).read_bytes() == b"0123456789"

    response = run_action(admin_client, "upload", "delete_selected_uploads", upload.pk)

    assert response.status_code == 200
    assert not Upload.objects.filter(pk=upload.pk).exists()
    assert not storage.final_path(upload.storage_key).exists()
    assert "Deleted 1 upload(s) and their files." in [str(m) for m in response.context["messages"]]


def test_delete_action_cancels_an_unfinished_upload_deletes_its_part_file_and_frees_its_slot(
    admin_client, alice, limits
):
    limits(user_upload_slots=1)
    upload, _slot = upload_create(alice, filename="big.iso", size=1000)
    grant = writer_admit(alice, upload.pk, "live.writer!1")
    write_part(upload.storage_key, b"x" * 100)

    run_action(admin_client, "upload", "delete_selected_uploads", upload.pk)

    assert not storage.part_path(upload.storage_key).exists()
    assert Upload.objects.get(pk=upload.pk).status == Upload.Status.CANCELLED
    assert not Slot.objects.active().filter(upload=upload).exists()
    with pytest.raises(NotUploading):  # the live writer is fenced off
        writer_commit(grant, 100)
    upload_create(alice, filename="next.iso", size=10)  # alice's only slot is free again

    run_action(admin_client, "upload", "delete_selected_uploads", upload.pk)  # as a second DELETE does

    assert not Upload.objects.filter(pk=upload.pk).exists()


def test_delete_action_leaves_unselected_uploads_alone(admin_client, alice, bob):
    mine = finished(alice, b"alice")
    bobs, bobs_slot = upload_create(bob, filename="b.bin", size=10)
    write_part(bobs.storage_key, b"bob")

    run_action(admin_client, "upload", "delete_selected_uploads", mine.pk)

    assert Upload.objects.get(pk=bobs.pk).status == Upload.Status.UPLOADING
    assert storage.part_path(bobs.storage_key).read_bytes() == b"bob"
    assert Slot.objects.get(pk=bobs_slot.pk).released_at is None


# --- no default path around the services -----------------------------------------


@pytest.mark.parametrize("model", ["upload", "slot"])
def test_djangos_delete_selected_action_is_not_offered(admin_client, model):
    assert "delete_selected" not in offered_actions(admin_client, model)


def test_a_forged_delete_selected_post_deletes_nothing(admin_client, alice):
    upload = finished(alice, b"keep")
    slot = slot_admit(Slot.Kind.DOWNLOAD, alice, upload=upload)

    run_action(admin_client, "upload", "delete_selected", upload.pk)
    run_action(admin_client, "slot", "delete_selected", slot.pk)

    assert Upload.objects.filter(pk=upload.pk).exists()
    assert storage.final_path(upload.storage_key).read_bytes() == b"keep"
    assert Slot.objects.get(pk=slot.pk).released_at is None


@pytest.mark.parametrize("method", ["get", "post"])
def test_the_delete_views_are_refused(admin_client, alice, method):
    upload = finished(alice, b"keep")
    slot = slot_admit(Slot.Kind.DOWNLOAD, alice, upload=upload)

    for url in (
        reverse("admin:uploads_upload_delete", args=[upload.pk]),
        reverse("admin:uploads_slot_delete", args=[slot.pk]),
    ):
        assert getattr(admin_client, method)(url, {"post": "yes"}).status_code == 403

    assert Upload.objects.filter(pk=upload.pk).exists()
    assert storage.final_path(upload.storage_key).exists()
    assert Slot.objects.filter(pk=slot.pk, released_at__isnull=True).exists()


@pytest.mark.parametrize("model", ["upload", "slot"])
def test_the_add_view_is_refused(admin_client, model):
    assert admin_client.get(reverse(f"admin:uploads_{model}_add")).status_code == 403


def test_the_upload_page_is_view_only_and_a_post_to_it_changes_nothing(admin_client, alice):
    upload, _slot = upload_create(alice, filename="a.bin", size=10)
    grant = writer_admit(alice, upload.pk, "live.writer!1")
    url = reverse("admin:uploads_upload_change", args=[upload.pk])

    page = admin_client.get(url)
    assert page.status_code == 200
    assert page.context["has_change_permission"] is False
    assert page.context["adminform"].form.fields == {}  # nothing the browser could send back

    # A writer commits after the page was loaded; a save of the page would write offset 0 back.
    writer_commit(grant, 7)
    response = admin_client.post(url, {"offset": 0, "status": "cancelled", "writer_generation": 0, "_save": "Save"})

    assert response.status_code == 403
    assert Upload.objects.filter(pk=upload.pk).values_list("offset", "status", "writer_generation").get() == (
        7,
        Upload.Status.UPLOADING,
        grant.generation,
    )


def test_staff_with_view_permission_only_sees_rows_but_can_run_no_action(viewer_client, alice):
    upload = finished(alice, b"keep")
    _live, live_slot = upload_create(alice, filename="live.bin", size=10)

    assert offered_actions(viewer_client, "upload") == set()
    assert offered_actions(viewer_client, "slot") == set()
    run_action(viewer_client, "upload", "delete_selected_uploads", upload.pk)
    run_action(viewer_client, "slot", "release_selected", live_slot.pk)

    assert storage.final_path(upload.storage_key).read_bytes() == b"keep"
    assert Slot.objects.get(pk=live_slot.pk).released_at is None


def test_user_quotas_stay_editable(admin_client, alice):
    response = admin_client.post(reverse("admin:uploads_userquota_add"), {"user": alice.pk, "max_bytes": 1234})

    assert response.status_code == 302
    assert UserQuota.objects.get(user=alice).max_bytes == 1234


def test_a_user_who_owns_uploads_cannot_be_deleted_around_the_services(admin_client, alice):
    upload = finished(alice, b"alice's")

    response = admin_client.post(reverse("admin:auth_user_delete", args=[alice.pk]), {"post": "yes"})

    assert response.status_code == 403
    assert Upload.objects.filter(pk=upload.pk, owner=alice).exists()
    assert storage.final_path(upload.storage_key).read_bytes() == b"alice's"
