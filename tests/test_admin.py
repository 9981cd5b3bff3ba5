"""Django admin: slots and uploads are visible with their state, and the actions go through the services."""

import asyncio
import os
import re
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.admin import site as admin_site
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from tests.conftest import PASSWORD, finish_upload, make_user, write_part
from tests.support import stored
from uploads.exceptions import LeaseLost, NotUploading
from uploads.models import Slot, Upload, UserQuota
from uploads.services.grants import writer_admit, writer_commit
from uploads.services.slots import slot_admit, slots_reset
from uploads.services.uploads import upload_create, upload_end

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024


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
    assert stored.finished_bytes(upload.storage_key) == b"0123456789"

    response = run_action(admin_client, "upload", "delete_selected_uploads", upload.pk)

    assert response.status_code == 200
    assert not Upload.objects.filter(pk=upload.pk).exists()
    assert stored.nothing_stored(upload.storage_key)
    assert "Deleted 1 upload(s) and their files." in [str(m) for m in response.context["messages"]]


def test_delete_action_cancels_an_unfinished_upload_deletes_its_part_file_and_frees_its_slot(
    admin_client, alice, limits
):
    limits(user_upload_slots=1)
    upload, _slot = upload_create(alice, filename="big.iso", size=1000)
    grant = writer_admit(alice, upload.pk, "live.writer!1")
    write_part(upload.storage_key, b"x" * 100, upload.size)

    run_action(admin_client, "upload", "delete_selected_uploads", upload.pk)

    assert stored.nothing_stored(upload.storage_key)
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
    write_part(bobs.storage_key, b"bob", bobs.size)
    bobs_bytes = stored.snapshot(bobs.storage_key)
    assert stored.part_stored(bobs.storage_key)

    run_action(admin_client, "upload", "delete_selected_uploads", mine.pk)

    assert Upload.objects.get(pk=bobs.pk).status == Upload.Status.UPLOADING
    assert stored.snapshot(bobs.storage_key) == bobs_bytes
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
    assert stored.finished_bytes(upload.storage_key) == b"keep"
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
    assert stored.finished_stored(upload.storage_key)
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

    assert stored.finished_bytes(upload.storage_key) == b"keep"
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
    assert stored.finished_bytes(upload.storage_key) == b"alice's"


# --- who may look: staff with the view permission; everyone else is sent to the admin's login ------


@pytest.fixture
def non_staff_client(client, alice):
    """alice, signed in, but not staff."""
    assert client.login(username="alice", password=PASSWORD)
    return client


ADMIN_PAGES = [
    "admin:uploads_slot_changelist",
    "admin:uploads_upload_changelist",
    "admin:uploads_dashboard",
    "admin:uploads_dashboard_data",
]


@pytest.mark.parametrize("who", ["anonymous", "non_staff"])
@pytest.mark.parametrize("page", ADMIN_PAGES)
def test_anyone_but_staff_is_sent_to_the_admin_login(request, client, alice, who, page):
    if who == "non_staff":
        request.getfixturevalue("non_staff_client")

    response = client.get(reverse(page))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.parametrize("page", ADMIN_PAGES)
def test_staff_with_every_permission_sees_each_page(admin_client, page):
    assert admin_client.get(reverse(page)).status_code == 200


@pytest.mark.parametrize("who", ["anonymous", "non_staff"])
def test_anyone_but_staff_cannot_release_or_reset_a_slot(request, client, alice, who):
    if who == "non_staff":
        request.getfixturevalue("non_staff_client")
    _upload, slot = upload_create(alice, filename="a.bin", size=10)

    for action in ("release_selected", "reset_users_slots"):
        assert run_action(client, "slot", action, slot.pk).redirect_chain[0][0].startswith(reverse("admin:login"))
    response = client.post(reverse("admin:uploads_dashboard_release"), {"slot": [slot.pk]})

    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    assert Slot.objects.get(pk=slot.pk).released_at is None


# --- the columns an operator reads ----------------------------------------------------------


def slot_admin():
    return admin_site._registry[Slot]


def upload_admin():
    return admin_site._registry[Upload]


def test_slot_list_shows_the_operations_columns(admin_client, alice):
    upload, _slot = upload_create(alice, filename="columns.bin", size=100)
    writer_admit(alice, upload.pk, "columns.writer!1")

    response = admin_client.get(reverse("admin:uploads_slot_changelist"))

    headers = [str(column["text"]) for column in response.context["result_headers"]]
    for column in ("user", "file", "size", "progress", "throughput", "state", "acquired at", "last renewal",
                   "lease expires at", "stuck for", "holder (process / connection)", "generation"):  # fmt: skip
        assert column in headers
    assert b"columns.writer!1" in response.content


def test_last_renewal_is_the_lease_expiry_minus_one_lease(alice, settings):
    settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS = 60
    upload, _slot = upload_create(alice, filename="a.bin", size=100)
    grant = writer_admit(alice, upload.pk, "renewing.writer!1")
    renewed_at = timezone.now() + timedelta(seconds=30)
    writer_commit(grant, 10, now=renewed_at)  # every commit renews the lease

    slot = Slot.objects.get(pk=grant.slot_id)

    assert slot_admin().last_renewal(slot) == renewed_at
    assert slot.lease_expires_at == renewed_at + timedelta(seconds=60)


def test_stuck_for_counts_seconds_since_the_lease_ran_out(alice):
    stuck = slot_admit(Slot.Kind.DOWNLOAD, alice, now=timezone.now() - timedelta(seconds=100))  # lease 60 s
    live = slot_admit(Slot.Kind.DOWNLOAD, alice)

    assert slot_admin().stuck_for(stuck) in {"40 s", "41 s"}
    assert slot_admin().stuck_for(live) == "-"
    assert (slot_admin().state(stuck), slot_admin().state(live)) == ("stuck", "active")


def test_holder_shows_process_and_connection_or_that_nobody_connected_yet(alice):
    _reserved_upload, reserved = upload_create(alice, filename="reserved.bin", size=10)
    upload, _slot = upload_create(alice, filename="held.bin", size=10)
    grant = writer_admit(alice, upload.pk, "held.writer!1")
    held = Slot.objects.get(pk=grant.slot_id)

    assert slot_admin().holder(reserved) == "reserved, no connection yet"
    assert held.holder_process in slot_admin().holder(held)
    assert "held.writer!1" in slot_admin().holder(held)
    assert held.holder_process.endswith(f":{os.getpid()}")


def test_throughput_is_shown_while_bytes_arrive_and_idle_once_they_stop(alice):
    upload, _slot = upload_create(alice, filename="a.bin", size=10 * MiB)
    grant = writer_admit(alice, upload.pk, "fast.writer!1")
    start = Upload.objects.get(pk=upload.pk).last_activity_at
    writer_commit(grant, 4 * MiB, now=start + timedelta(seconds=2))  # 2 MiB/s over the last commit
    slot = Slot.objects.select_related("upload").get(pk=grant.slot_id)

    assert slot.upload.bytes_per_second == 2 * MiB
    assert upload_admin().throughput(slot.upload) == "2.0 MiB/s"
    assert slot_admin().throughput(slot) == "2.0 MiB/s"

    Upload.objects.filter(pk=upload.pk).update(last_activity_at=timezone.now() - timedelta(seconds=30))
    slot = Slot.objects.select_related("upload").get(pk=grant.slot_id)

    assert upload_admin().throughput(slot.upload) == "idle"
    assert slot_admin().throughput(slot) == "idle"
    assert upload_admin().progress(slot.upload) == "40.0%"


def listed(client, model: str, **query) -> set:
    response = client.get(reverse(f"admin:uploads_{model}_changelist"), query)
    assert response.status_code == 200  # a lookup the admin does not allow is a redirect to ?e=1
    return {row.pk for row in response.context["cl"].result_list}


def test_slot_list_filters_by_kind_user_and_release_reason(admin_client, alice, bob):
    _upload, alices_upload_slot = upload_create(alice, filename="a.bin", size=10)
    bobs_download = slot_admit(Slot.Kind.DOWNLOAD, bob)
    _other, cancelled = upload_create(bob, filename="b.bin", size=10)
    upload_end(_other, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED)
    reset = slots_reset(ids=[bobs_download.pk])[0]

    assert listed(admin_client, "slot", kind="upload") == {alices_upload_slot.pk, cancelled.pk}
    assert listed(admin_client, "slot", user__id__exact=alice.pk) == {alices_upload_slot.pk}
    assert listed(admin_client, "slot", state="released") == {cancelled.pk, reset.pk}
    assert listed(admin_client, "slot", state="released", release_reason="reset") == {reset.pk}


def test_slot_list_is_searchable_by_user_file_name_and_id(admin_client, alice, bob):
    upload, alices = upload_create(alice, filename="holiday-video.mkv", size=10)
    _bobs_upload, bobs = upload_create(bob, filename="notes.txt", size=10)

    assert listed(admin_client, "slot", q="bob") == {bobs.pk}
    assert listed(admin_client, "slot", q="holiday") == {alices.pk}
    # A number also matches the UUIDs that contain it: the slot itself must be among the hits.
    assert bobs.pk in listed(admin_client, "slot", q=str(bobs.pk))
    assert listed(admin_client, "slot", q=str(upload.pk)) == {alices.pk}  # the upload's UUID


def test_upload_list_is_filtered_by_owner_and_activity_and_searchable_by_id(admin_client, alice, bob):
    receiving, _slot = upload_create(alice, filename="receiving.bin", size=100)
    grant = writer_admit(alice, receiving.pk, "busy.writer!1")
    writer_commit(grant, 50)
    idle, _idle_slot = upload_create(bob, filename="idle.bin", size=100)
    slots_reset(upload=idle)  # unfinished, no slot: waits for its client or for expiry
    done = finished(bob, b"done")

    assert listed(admin_client, "upload", owner__id__exact=bob.pk) == {idle.pk, done.pk}
    assert listed(admin_client, "upload", activity="receiving") == {receiving.pk}
    assert listed(admin_client, "upload", activity="holding") == {receiving.pk}
    assert listed(admin_client, "upload", activity="idle") == {idle.pk}
    assert listed(admin_client, "upload", q=str(idle.pk)) == {idle.pk}
    assert listed(admin_client, "upload", q="receiving") == {receiving.pk}


# --- actions, through the services ------------------------------------------------------------


def test_reset_users_action_releases_every_slot_of_the_selected_slots_users_only(admin_client, alice, bob, staff):
    first, _alices_first = upload_create(alice, filename="1.bin", size=10)
    _second, alices_second = upload_create(alice, filename="2.bin", size=10)
    alices_download = slot_admit(Slot.Kind.DOWNLOAD, alice)
    _bobs, bobs_slot = upload_create(bob, filename="b.bin", size=10)
    grant = writer_admit(alice, first.pk, "alice.writer!1")

    response = run_action(admin_client, "slot", "reset_users_slots", grant.slot_id)

    reset = Slot.objects.filter(user=alice, release_reason="reset").values_list("pk", flat=True)
    assert set(reset) == {grant.slot_id, alices_second.pk, alices_download.pk}
    assert not Slot.objects.active().filter(user=alice).exists()
    assert Slot.objects.get(pk=bobs_slot.pk).released_at is None
    with pytest.raises(LeaseLost):
        writer_commit(grant, 5)
    assert "Released 3 slot(s) of alice." in " ".join(str(m) for m in response.context["messages"])


def test_expire_action_ends_unfinished_uploads_now_and_leaves_finished_ones_alone(admin_client, alice, limits):
    limits(user_upload_slots=1)
    upload, slot = upload_create(alice, filename="stale.iso", size=1000)
    grant = writer_admit(alice, upload.pk, "stale.writer!1")
    write_part(upload.storage_key, b"x" * 100, upload.size)
    done = finished(make_user("carol"), b"done")

    response = run_action(admin_client, "upload", "expire_selected", upload.pk, done.pk)

    assert Upload.objects.get(pk=upload.pk).status == Upload.Status.EXPIRED
    assert stored.nothing_stored(upload.storage_key)
    assert Slot.objects.get(pk=grant.slot_id).release_reason == Slot.ReleaseReason.EXPIRED
    with pytest.raises(NotUploading):
        writer_commit(grant, 100)
    upload_create(alice, filename="next.iso", size=10)  # alice's only slot is free again
    assert Upload.objects.get(pk=done.pk).status == Upload.Status.COMPLETE
    assert stored.finished_bytes(done.storage_key) == b"done"
    texts = [str(m) for m in response.context["messages"]]
    assert "Expired 1 upload(s)." in texts
    assert slot.pk == grant.slot_id  # the reserved slot was claimed by the writer, then expired


def receive(channel: str) -> dict:
    """The next message on ``channel`` of the test's channel layer (in-memory, or Redis in CI)."""

    async def next_message():
        return await asyncio.wait_for(get_channel_layer().receive(channel), 10)

    return async_to_sync(next_message)()


def new_channel() -> str:
    return async_to_sync(get_channel_layer().new_channel)("admin-test.")


def test_release_action_tells_the_live_holder_through_the_channel_layer_to_close_with_4410(
    admin_client, alice, django_capture_on_commit_callbacks
):
    holder = new_channel()
    upload, _slot = upload_create(alice, filename="live.bin", size=10)
    grant = writer_admit(alice, upload.pk, holder)

    with django_capture_on_commit_callbacks(execute=True):  # the notification is sent after commit
        response = run_action(admin_client, "slot", "release_selected", grant.slot_id)

    message = receive(holder)
    assert (message["type"], message["close_code"], message["code"]) == ("upload.revoke", 4410, "lease_lost")
    assert "1 live connection(s) were told to stop" in " ".join(str(m) for m in response.context["messages"])


def test_the_slot_page_shows_what_is_derived_from_the_row(admin_client, alice):
    upload, _slot = upload_create(alice, filename="a.bin", size=10)
    grant = writer_admit(alice, upload.pk, "page.writer!1")
    Slot.objects.filter(pk=grant.slot_id).update(lease_expires_at=timezone.now() - timedelta(seconds=30))

    response = admin_client.get(reverse("admin:uploads_slot_change", args=[grant.slot_id]))

    assert response.status_code == 200
    fields = {
        line.field["name"]: line for fieldset in response.context["adminform"] for row in fieldset for line in row
    }
    assert {"state", "last_renewal", "stuck_for", "holder"} <= set(fields)
    assert b"page.writer!1" in response.content
    assert re.search(rb'<div class="readonly">3[01] s</div>', response.content)  # stuck for
