"""The operations dashboard in the admin: what it shows, its JSON for live refresh, and its one-click release."""

import asyncio
import shutil
from dataclasses import dataclass, field, replace
from datetime import timedelta
from html.parser import HTMLParser

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth.models import Permission
from django.contrib.staticfiles import finders
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from tests.conftest import PASSWORD, finish_upload, make_user
from uploads.models import FsckRun, Slot, Upload
from uploads.services.grants import writer_admit, writer_commit
from uploads.services.slots import slot_admit, slots_reset
from uploads.services.uploads import upload_create, upload_end

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024
SECTIONS = {"slots", "stuck", "in_progress", "users", "releases", "disk", "fsck"}


@dataclass
class Form:
    action: str
    method: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    buttons: list[str] = field(default_factory=list)  # their ids


class Html(HTMLParser):
    """A page's forms, element ids, scripts, and what a strict Content-Security-Policy would block."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self.ids: set[str] = set()
        self.script_sources: list[str] = []
        self.csp_violations: list[str] = []
        self._form: Form | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "script":
            if "src" in attrs:
                self.script_sources.append(attrs["src"])
            elif attrs.get("type") != "application/json":  # data, not code
                self.csp_violations.append("inline <script>")
        if tag == "style":
            self.csp_violations.append("inline <style>")
        self.csp_violations += [f"{name}= on <{tag}>" for name in attrs if name == "style" or name.startswith("on")]
        if tag == "form":
            self._form = Form(attrs.get("action", ""), attrs.get("method", "get").lower())
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None and attrs.get("name"):
            self._form.fields.append((attrs["name"], attrs.get("value", "")))
        elif tag == "button" and self._form is not None:
            self._form.buttons.append(attrs.get("id", ""))

    def handle_endtag(self, tag):
        if tag == "form":
            self._form = None

    def form_with_button(self, button_id: str) -> Form:
        [form] = [form for form in self.forms if button_id in form.buttons]
        return form


def post_form(client, form: Form):
    data: dict[str, list[str]] = {}
    for name, value in form.fields:
        data.setdefault(name, []).append(value)
    return client.post(form.action, data, follow=True)


@pytest.fixture
def operator(db):
    """A staff member with every permission."""
    return make_user("operator", is_staff=True, is_superuser=True)


@pytest.fixture
def operator_client(operator):
    """The operator's browser: CSRF checks on, as in production, so the forms must carry their token."""
    client = Client(enforce_csrf_checks=True)
    assert client.login(username="operator", password=PASSWORD)
    return client


@pytest.fixture
def viewer_client(db):
    viewer = make_user("viewer", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename__in=["view_upload", "view_slot"]))
    client = Client(enforce_csrf_checks=True)
    assert client.login(username="viewer", password=PASSWORD)
    return client


def dashboard_page(client) -> Html:
    response = client.get(reverse("admin:uploads_dashboard"))
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    return Html(response.content.decode())


def dashboard_data(client) -> dict:
    response = client.get(reverse("admin:uploads_dashboard_data"))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert "no-store" in response["Cache-Control"]
    return response.json()


def stuck_slot(user, *, seconds: int = 100, kind=Slot.Kind.DOWNLOAD) -> Slot:
    """A slot whose lease (60 s) ran out ``seconds - 60`` seconds ago."""
    return slot_admit(kind, user, now=timezone.now() - timedelta(seconds=seconds))


def receive(channel: str) -> dict:
    async def next_message():
        return await asyncio.wait_for(get_channel_layer().receive(channel), 10)

    return async_to_sync(next_message)()


# --- the page -------------------------------------------------------------------------------


def test_the_admin_index_links_to_the_dashboard_and_still_lists_the_apps(operator_client):
    response = operator_client.get(reverse("admin:index"))

    assert response.status_code == 200
    page = Html(response.content.decode())
    assert "directdrivex-operations" in page.ids
    assert reverse("admin:uploads_dashboard").encode() in response.content
    assert reverse("admin:uploads_slot_changelist").encode() in response.content  # Django's app list
    assert reverse("admin:auth_user_changelist").encode() in response.content
    assert page.csp_violations == []


def test_the_slot_list_links_to_the_dashboard(operator_client):
    response = operator_client.get(reverse("admin:uploads_slot_changelist"))

    assert reverse("admin:uploads_dashboard").encode() in response.content


def test_the_page_renders_every_section_without_javascript_and_loads_its_script_from_a_file(operator_client):
    page = dashboard_page(operator_client)

    assert {f"dashboard-{name}" for name in SECTIONS} <= page.ids
    assert page.csp_violations == []
    [script] = [src for src in page.script_sources if src.endswith("dashboard.js")]
    assert script == "/static/uploads/js/dashboard.js"
    assert finders.find("uploads/js/dashboard.js")


def test_staff_without_the_view_permission_may_not_see_the_dashboard(client, staff, alice):
    slot = stuck_slot(alice)
    assert client.login(username="staff", password=PASSWORD)

    assert client.get(reverse("admin:uploads_dashboard")).status_code == 403
    assert client.get(reverse("admin:uploads_dashboard_data")).status_code == 403
    assert client.post(reverse("admin:uploads_dashboard_release"), {"slot": [slot.pk]}).status_code == 403
    assert Slot.objects.get(pk=slot.pk).released_at is None
    assert b"directdrivex-operations" not in client.get(reverse("admin:index")).content


def test_a_viewer_sees_the_stuck_slot_but_no_release_button_and_cannot_release_it(viewer_client, alice):
    slot = stuck_slot(alice)

    page = dashboard_page(viewer_client)

    assert f"release-slot-{slot.pk}" not in page.ids
    assert [form for form in page.forms if form.action == reverse("admin:uploads_dashboard_release")] == []
    assert dashboard_data(viewer_client)["stuck"][0]["id"] == slot.pk
    token = viewer_client.get(reverse("admin:uploads_dashboard")).cookies["csrftoken"].value
    refused = viewer_client.post(
        reverse("admin:uploads_dashboard_release"), {"slot": [slot.pk], "csrfmiddlewaretoken": token}
    )
    assert refused.status_code == 403
    assert Slot.objects.get(pk=slot.pk).released_at is None


# --- one-click release ------------------------------------------------------------------------


def test_the_dashboard_shows_a_stuck_slot_and_its_release_button_frees_it(operator_client, alice, limits):
    limits(user_upload_slots=1)
    upload, _slot = upload_create(alice, filename="frozen.iso", size=100)
    grant = writer_admit(alice, upload.pk, "frozen.writer!1")
    # The holder froze: its lease ran out 40 s ago, and nothing has reclaimed it yet.
    Slot.objects.filter(pk=grant.slot_id).update(lease_expires_at=timezone.now() - timedelta(seconds=40))

    page = dashboard_page(operator_client)
    assert f"release-slot-{grant.slot_id}" in page.ids
    data = dashboard_data(operator_client)
    [row] = data["stuck"]
    assert (row["id"], row["user"], row["filename"], row["holder_channel"]) == (
        grant.slot_id,
        "alice",
        "frozen.iso",
        "frozen.writer!1",
    )
    assert 40 <= row["stuck_seconds"] <= 45
    assert data["slots"]["upload"]["stuck"] == 1

    response = post_form(operator_client, page.form_with_button(f"release-slot-{grant.slot_id}"))

    assert response.status_code == 200
    assert response.redirect_chain == [(reverse("admin:uploads_dashboard"), 302)]
    released = Slot.objects.get(pk=grant.slot_id)
    assert (released.released_at is not None, released.release_reason) == (True, Slot.ReleaseReason.RESET)
    assert "Released 1 slot(s)." in " ".join(str(m) for m in response.context["messages"])
    after = dashboard_data(operator_client)
    assert after["stuck"] == [] and after["slots"]["upload"]["stuck"] == 0
    assert after["recent_releases"][0]["id"] == grant.slot_id
    assert after["recent_releases"][0]["release_reason"] == "reset"
    assert Upload.objects.get(pk=upload.pk).status == Upload.Status.UPLOADING  # resumable, not ended
    upload_create(alice, filename="next.iso", size=10)  # alice's only slot is free again


def test_release_all_frees_every_listed_stuck_slot_and_nothing_else(operator_client, alice, bob):
    stuck = [stuck_slot(alice), stuck_slot(bob)]
    _upload, live = upload_create(bob, filename="live.bin", size=10)  # not a download: that would reap them

    page = dashboard_page(operator_client)
    post_form(operator_client, page.form_with_button("release-all-stuck"))

    assert set(Slot.objects.released().values_list("pk", flat=True)) == {slot.pk for slot in stuck}
    assert Slot.objects.get(pk=live.pk).released_at is None


def test_a_release_post_without_the_csrf_token_is_refused(operator_client, alice):
    slot = stuck_slot(alice)

    response = operator_client.post(reverse("admin:uploads_dashboard_release"), {"slot": [slot.pk]})

    assert response.status_code == 403
    assert Slot.objects.get(pk=slot.pk).released_at is None


def test_releasing_a_slot_freed_meanwhile_says_so(operator_client, alice):
    slot = stuck_slot(alice)
    form = dashboard_page(operator_client).form_with_button(f"release-slot-{slot.pk}")
    slots_reset(ids=[slot.pk])  # the reaper or another admin was quicker

    response = post_form(operator_client, form)

    texts = [str(m) for m in response.context["messages"]]
    assert "Released 0 slot(s)." in texts
    assert "1 slot(s) had been released already." in texts


# Not a slot's number: a primary key (BigAutoField) is 1 .. 2**63 - 1, and SQLite
# cannot even bind an int beyond 64 bits. Each must be refused like "abc", not answer 500.
NOT_SLOT_NUMBERS = [str(2**63), str(2**64), str(10**30), "0", "-1", str(-(2**63)), f"-{2**64}", "abc", "", "1.5"]


@pytest.mark.parametrize("value", NOT_SLOT_NUMBERS)
def test_a_release_of_something_that_is_not_a_slot_number_releases_nothing(operator_client, alice, value):
    slot = stuck_slot(alice)
    form = dashboard_page(operator_client).form_with_button(f"release-slot-{slot.pk}")
    forged = replace(form, fields=[(name, value if name == "slot" else given) for name, given in form.fields])

    response = post_form(operator_client, forged)

    assert response.status_code == 200
    assert response.redirect_chain == [(reverse("admin:uploads_dashboard"), 302)]
    assert [str(m) for m in response.context["messages"]] == ["No slot was chosen."]
    assert Slot.objects.get(pk=slot.pk).released_at is None


def test_a_release_with_a_slot_and_numbers_out_of_range_releases_the_slot(operator_client, alice):
    slot = stuck_slot(alice)
    form = dashboard_page(operator_client).form_with_button(f"release-slot-{slot.pk}")
    # 2**63 - 1, the largest id a slot can have, is still asked for: the one "released already".
    extra = [("slot", value) for value in [*NOT_SLOT_NUMBERS, str(2**63 - 1)]]

    response = post_form(operator_client, replace(form, fields=[*form.fields, *extra]))

    assert response.status_code == 200
    assert [str(m) for m in response.context["messages"]] == [
        "Released 1 slot(s).",
        "1 slot(s) had been released already.",
    ]
    released = Slot.objects.get(pk=slot.pk)
    assert (released.released_at is not None, released.release_reason) == (True, Slot.ReleaseReason.RESET)


def test_release_is_post_only(operator_client, alice):
    slot = stuck_slot(alice)

    assert operator_client.get(reverse("admin:uploads_dashboard_release"), {"slot": slot.pk}).status_code == 405
    assert Slot.objects.get(pk=slot.pk).released_at is None


def test_a_release_from_the_dashboard_tells_a_connected_holder_to_close_with_4410(
    operator_client, alice, django_capture_on_commit_callbacks
):
    holder = async_to_sync(get_channel_layer().new_channel)("dashboard-test.")
    upload, _slot = upload_create(alice, filename="live.bin", size=10)
    grant = writer_admit(alice, upload.pk, holder)
    Slot.objects.filter(pk=grant.slot_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    form = dashboard_page(operator_client).form_with_button(f"release-slot-{grant.slot_id}")

    with django_capture_on_commit_callbacks(execute=True):  # the notification is sent after commit
        post_form(operator_client, form)

    message = receive(holder)
    assert (message["type"], message["close_code"], message["code"]) == ("upload.revoke", 4410, "lease_lost")


# --- the JSON endpoint that dashboard.js polls --------------------------------------------------------


def test_the_json_counts_slots_against_their_limits(operator_client, alice, bob, limits):
    limits(global_upload_slots=4, user_upload_slots=2, global_download_slots=3, user_download_slots=2)
    upload_create(alice, filename="a.bin", size=10)
    upload_create(bob, filename="b.bin", size=10)
    stuck_slot(bob, kind=Slot.Kind.UPLOAD)
    slot_admit(Slot.Kind.DOWNLOAD, alice)

    slots = dashboard_data(operator_client)["slots"]

    assert slots["upload"] == {"limit": 4, "user_limit": 2, "active": 3, "stuck": 1, "live": 2, "free": 1}
    assert slots["download"] == {"limit": 3, "user_limit": 2, "active": 1, "stuck": 0, "live": 1, "free": 2}


def test_the_json_shows_per_user_usage(operator_client, alice, bob, limits):
    limits(user_upload_slots=3, user_download_slots=4)
    finish_upload(alice, b"x" * 1000)
    upload_create(alice, filename="a.bin", size=500)
    slot_admit(Slot.Kind.DOWNLOAD, alice)
    stuck_slot(bob, kind=Slot.Kind.UPLOAD)
    make_user("carol")  # no slots, no unfinished uploads: not listed

    users = {row["user"]: row for row in dashboard_data(operator_client)["users"]}

    assert set(users) == {"alice", "bob"}
    assert users["alice"] == {
        "user": "alice",
        "user_id": alice.pk,
        "upload_slots": 1,
        "upload_slot_limit": 3,
        "download_slots": 1,
        "download_slot_limit": 4,
        "stuck_slots": 0,
        "unfinished_uploads": 1,
        "stored_bytes": 1000,
        "reserved_bytes": 500,
        "quota_bytes": 50 * 1024**3,
    }
    assert (users["bob"]["upload_slots"], users["bob"]["stuck_slots"]) == (1, 1)


def test_the_json_lists_uploads_in_progress_with_their_throughput_while_bytes_arrive(operator_client, alice, bob):
    fast, _slot = upload_create(alice, filename="fast.bin", size=10 * MiB)
    grant = writer_admit(alice, fast.pk, "fast.writer!1")
    started = Upload.objects.get(pk=fast.pk).last_activity_at
    writer_commit(grant, 3 * MiB, now=started + timedelta(seconds=1))
    stopped, _stopped_slot = upload_create(bob, filename="stopped.bin", size=10 * MiB)
    stopped_grant = writer_admit(bob, stopped.pk, "stopped.writer!1")
    long_ago = timezone.now() - timedelta(seconds=30)
    writer_commit(stopped_grant, MiB, now=long_ago)
    _reserved, _reserved_slot = upload_create(bob, filename="reserved.bin", size=10)

    data = dashboard_data(operator_client)

    rows = {row["filename"]: row for row in data["in_progress"]}
    assert data["in_progress_total"] == 3
    assert rows["fast.bin"]["bytes_per_second"] == 3 * MiB
    assert rows["fast.bin"]["progress_percent"] == 30.0
    assert (rows["fast.bin"]["connected"], rows["fast.bin"]["holder_channel"]) == (True, "fast.writer!1")
    assert rows["stopped.bin"]["bytes_per_second"] is None  # bytes stopped: no rate to show
    assert rows["stopped.bin"]["idle_seconds"] >= 30
    assert rows["reserved.bin"]["connected"] is False


def test_the_json_lists_recent_releases_newest_first_with_their_reasons(operator_client, alice):
    first = slot_admit(Slot.Kind.DOWNLOAD, alice)
    upload, second = upload_create(alice, filename="a.bin", size=10)
    slots_reset(ids=[first.pk], now=timezone.now() - timedelta(seconds=5))
    upload_end(upload, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED)

    releases = dashboard_data(operator_client)["recent_releases"]

    assert [(row["id"], row["release_reason"]) for row in releases] == [(second.pk, "cancelled"), (first.pk, "reset")]
    assert releases[0]["filename"] == "a.bin"


@pytest.mark.local_storage  # the capacity of the local storage folder's filesystem
def test_the_json_sums_disk_usage_from_the_rows_against_the_filesystem(operator_client, alice, storage_dir):
    finish_upload(alice, b"y" * 4096)
    unfinished, _slot = upload_create(alice, filename="half.bin", size=1000)
    grant = writer_admit(alice, unfinished.pk, "half.writer!1")
    writer_commit(grant, 400)

    disk = dashboard_data(operator_client)["disk"]

    filesystem = shutil.disk_usage(storage_dir)
    assert disk["path"] == str(storage_dir)
    assert (disk["finished_bytes"], disk["partial_bytes"], disk["to_come_bytes"]) == (4096, 400, 600)
    assert disk["stored_bytes"] == 4496
    assert disk["filesystem_total_bytes"] == filesystem.total
    assert abs(disk["filesystem_free_bytes"] - filesystem.free) < 64 * MiB  # other tests write meanwhile


@pytest.mark.local_storage  # the capacity of the local storage folder's filesystem
def test_the_json_answers_before_the_storage_folder_exists(operator_client, settings, tmp_path):
    settings.DIRECTDRIVEX_STORAGE_DIR = tmp_path / "not" / "yet"

    disk = dashboard_data(operator_client)["disk"]

    assert disk["filesystem_total_bytes"] == shutil.disk_usage(tmp_path).total


def test_the_json_shows_the_findings_of_the_newest_fsck_run(operator_client):
    now = timezone.now()
    FsckRun.objects.create(
        started_at=now - timedelta(hours=2),
        finished_at=now - timedelta(hours=2),
        findings=[{"kind": "old", "upload": None, "path": "", "detail": "older run", "action": ""}],
    )
    findings = [
        {"kind": "orphan_part", "upload": None, "path": "partial/ab.part", "detail": "no row", "action": "deleted"},
        {"kind": "missing_file", "upload": "3f2c…", "path": "files/cd", "detail": "gone", "action": "marked failed"},
        {"kind": "orphan_part", "upload": None, "path": "partial/ef.part", "detail": "no row", "action": "deleted"},
    ]
    FsckRun.objects.create(started_at=now - timedelta(minutes=1), finished_at=now, repair=True, findings=findings)

    fsck = dashboard_data(operator_client)["fsck"]

    assert (fsck["count"], fsck["repair"], fsck["verify"]) == (3, True, False)
    assert fsck["by_kind"] == {"missing_file": 1, "orphan_part": 2}
    assert fsck["findings"] == findings
    html = dashboard_data(operator_client)["html"]["fsck"]
    assert "partial/ab.part" in html and "marked failed" in html and "older run" not in html


def test_the_json_says_when_no_fsck_has_run(operator_client):
    data = dashboard_data(operator_client)

    assert data["fsck"] is None
    assert "No fsck has run yet" in data["html"]["fsck"]


def test_the_json_carries_every_section_rendered_for_the_script_to_swap_in(operator_client, alice):
    slot = stuck_slot(alice)

    data = dashboard_data(operator_client)

    assert set(data["html"]) == SECTIONS
    stuck = Html(data["html"]["stuck"])
    assert f"release-slot-{slot.pk}" in stuck.ids
    assert stuck.csp_violations == []
    form = stuck.form_with_button(f"release-slot-{slot.pk}")
    assert form.action == reverse("admin:uploads_dashboard_release")
    assert ("slot", str(slot.pk)) in form.fields
    assert any(name == "csrfmiddlewaretoken" and value for name, value in form.fields)
    assert data["refresh_seconds"] == 2


def test_the_json_endpoint_is_get_only(operator_client):
    assert operator_client.post(reverse("admin:uploads_dashboard_data")).status_code in (403, 405)
    token = operator_client.get(reverse("admin:uploads_dashboard")).cookies["csrftoken"].value
    response = operator_client.post(reverse("admin:uploads_dashboard_data"), {"csrfmiddlewaretoken": token})
    assert response.status_code == 405


def test_a_refresh_costs_the_same_few_queries_however_many_rows_it_lists(operator_client, alice, bob, limits):
    def queries() -> tuple[int, dict]:
        with CaptureQueriesContext(connection) as captured:
            data = dashboard_data(operator_client)
        return len(captured), data

    limits(user_upload_slots=10, global_upload_slots=40)
    upload_create(alice, filename="one.bin", size=10)
    stuck_slot(bob)
    few, _data = queries()
    for n in range(8):
        user = make_user(f"user{n}")
        upload, _slot = upload_create(user, filename=f"{n}.bin", size=10)
        writer_admit(user, upload.pk, f"writer-{n}!1")
        slot_admit(Slot.Kind.DOWNLOAD, user)
    slots_reset(user=bob)
    # Half of them froze (after every admission: an admission reaps the stuck slots of its kind).
    frozen = Slot.objects.active().filter(kind=Slot.Kind.DOWNLOAD).values_list("pk", flat=True)
    Slot.objects.filter(pk__in=list(frozen)).update(lease_expires_at=timezone.now() - timedelta(seconds=5))

    many, data = queries()

    assert (len(data["stuck"]), len(data["in_progress"]), len(data["users"])) == (8, 9, 9)
    assert many == few <= 20, few
