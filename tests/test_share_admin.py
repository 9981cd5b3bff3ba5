"""Django admin for share links: every link with its owner, file, use and state; revoked through the service."""

import logging
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from tests.conftest import PASSWORD, finish_upload, make_user
from uploads.models import ShareLink, Slot
from uploads.services.shares import share_create, share_download_ended, share_revoke
from uploads.services.slots import slot_admit

pytestmark = pytest.mark.django_db

DATA = b"shared bytes " * 100


@pytest.fixture
def admin_client(client, staff):
    """staff, signed in to the admin with every permission."""
    staff.is_superuser = True
    staff.save(update_fields=["is_superuser"])
    assert client.login(username="staff", password=PASSWORD)
    return client


@pytest.fixture
def report(alice):
    return finish_upload(alice, DATA, filename="report.pdf")


@pytest.fixture
def photos(bob):
    return finish_upload(bob, DATA, filename="photos.zip")


def changelist(client, **query):
    response = client.get(reverse("admin:uploads_sharelink_changelist"), query)
    assert response.status_code == 200  # a lookup the admin does not allow is a redirect to ?e=1
    return response


def listed(client, **query) -> set[int]:
    return {link.pk for link in changelist(client, **query).context["cl"].result_list}


def revoke_action(client, *links):
    return client.post(
        reverse("admin:uploads_sharelink_changelist"),
        {"action": "revoke_selected", "_selected_action": [str(link.pk) for link in links]},
        follow=True,
    )


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def secrets_of(link: ShareLink, token: str) -> list[str]:
    # The password's whole hash and its salted digest alone: either would do for an offline guess.
    return [token, link.nonce, link.token_hash, link.password, link.password.rsplit("$", 1)[-1]]


def test_the_list_shows_owner_file_downloads_and_state_and_never_a_secret(admin_client, alice, report, photos, bob):
    limited, limited_token = share_create(alice, report.pk, max_downloads=3, password="open sesame")
    share_download_ended(limited, sent=len(DATA), reached_end=True)
    unlimited, unlimited_token = share_create(bob, photos.pk)
    share_revoke(bob, unlimited.pk)

    response = changelist(admin_client)

    rows = {row.pk: row for row in response.context["cl"].result_list}
    assert set(rows) == {limited.pk, unlimited.pk}
    html = response.content.decode()
    assert ">alice<" in html and ">bob<" in html
    upload_page = reverse("admin:uploads_upload_change", args=[report.pk])
    assert f'<a href="{upload_page}">report.pdf</a>' in html
    assert ">1 of 3<" in html  # downloads, of max_downloads
    assert ">active<" in html and ">revoked<" in html
    admin = response.context["cl"].model_admin
    assert (admin.has_password(rows[limited.pk]), admin.has_password(rows[unlimited.pk])) == (True, False)
    assert admin.downloads_of(rows[unlimited.pk]) == 0  # no limit: no "of"
    for link, token in ((limited, limited_token), (unlimited, unlimited_token)):
        link.refresh_from_db()
        for secret in filter(None, secrets_of(link, token)):
            assert secret not in html


def test_a_links_page_and_its_files_page_show_no_secret_either(admin_client, alice, report):
    link, token = share_create(alice, report.pk, password="open sesame")

    page = admin_client.get(reverse("admin:uploads_sharelink_change", args=[link.pk]))
    upload_page = admin_client.get(reverse("admin:uploads_upload_change", args=[report.pk]))

    assert page.status_code == 200 and upload_page.status_code == 200
    shown = {line.field["name"] for fieldset in page.context["adminform"] for row in fieldset for line in row}
    assert {"owner", "file", "downloads", "bytes_sent", "has_password", "state", "revoked_at"} <= shown
    assert not shown & {"nonce", "token_hash", "password"}
    # The file's page lists its links, each linking to the link's own page.
    assert reverse("admin:uploads_sharelink_change", args=[link.pk]) in upload_page.content.decode()
    for html in (page.content.decode(), upload_page.content.decode()):
        for secret in secrets_of(link, token):
            assert secret not in html


def test_links_are_filtered_by_revoked_and_expired(admin_client, alice, report):
    active, _ = share_create(alice, report.pk)
    revoked, _ = share_create(alice, report.pk)
    share_revoke(alice, revoked.pk)
    long_ago = timezone.now() - timedelta(days=2)
    expired, _ = share_create(alice, report.pk, expires_in=3600, now=long_ago)

    assert listed(admin_client, revoked="yes") == {revoked.pk}
    assert listed(admin_client, revoked="no") == {active.pk, expired.pk}
    assert listed(admin_client, expired="yes") == {expired.pk}
    assert listed(admin_client, expired="no") == {active.pk, revoked.pk}
    assert listed(admin_client, expired="no", revoked="no") == {active.pk}


def test_links_are_searchable_by_owner_file_name_and_id(admin_client, alice, bob, report, photos):
    alices, _ = share_create(alice, report.pk)
    bobs, _ = share_create(bob, photos.pk)

    assert listed(admin_client, q="bob") == {bobs.pk}
    assert listed(admin_client, q="report") == {alices.pk}
    assert alices.pk in listed(admin_client, q=str(alices.pk))


def test_revoking_goes_through_the_service_and_stops_the_links_downloads(
    admin_client, alice, report, django_capture_on_commit_callbacks, caplog
):
    caplog.set_level(logging.INFO, logger="uploads.events")
    link, _token = share_create(alice, report.pk)
    other, _ = share_create(alice, report.pk)
    download = slot_admit(Slot.Kind.DOWNLOAD, alice, upload=report, share=link)
    owners_own = slot_admit(Slot.Kind.DOWNLOAD, alice, upload=report)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = revoke_action(admin_client, link)

    assert response.status_code == 200
    assert ShareLink.objects.get(pk=link.pk).revoked_at is not None
    assert ShareLink.objects.get(pk=other.pk).revoked_at is None  # not selected
    released = Slot.objects.get(pk=download.pk)
    assert (released.released_at is not None, released.release_reason) == (True, "reset")
    assert Slot.objects.get(pk=owners_own.pk).is_active  # the owner's own download is not the link's
    assert "Revoked 1 share link(s)." in messages_of(response)
    assert callbacks, "the revocation is recorded (uploads.services.events) after commit"
    [line] = [record for record in caplog.records if record.msg == "share.revoked"]
    assert (line.ddx["share"], line.ddx["reason"]) == (link.pk, "admin")


def test_revoking_again_changes_nothing_and_says_so(admin_client, alice, report):
    link, _ = share_create(alice, report.pk)
    fresh, _ = share_create(alice, report.pk)
    revoke_action(admin_client, link)
    first = ShareLink.objects.get(pk=link.pk).revoked_at

    response = revoke_action(admin_client, link, fresh)

    assert ShareLink.objects.get(pk=link.pk).revoked_at == first
    assert ShareLink.objects.get(pk=fresh.pk).revoked_at is not None
    assert messages_of(response) == ["Revoked 1 share link(s).", "1 selected link(s) had been revoked already."]


def test_the_slot_list_shows_which_link_a_download_goes_through(admin_client, alice, report):
    link, _ = share_create(alice, report.pk)
    through_link = slot_admit(Slot.Kind.DOWNLOAD, alice, upload=report, share=link)
    own = slot_admit(Slot.Kind.DOWNLOAD, alice, upload=report)

    response = admin_client.get(reverse("admin:uploads_slot_changelist"))

    admin = response.context["cl"].model_admin
    rows = {slot.pk: slot for slot in response.context["cl"].result_list}
    assert admin.share_link(rows[own.pk]) == "-"
    link_page = reverse("admin:uploads_sharelink_change", args=[link.pk])
    assert admin.share_link(rows[through_link.pk]) == f'<a href="{link_page}">#{link.pk}</a>'
    assert link_page in response.content.decode()


def test_links_cannot_be_added_edited_or_deleted_in_the_admin(admin_client, alice, report):
    link, _ = share_create(alice, report.pk, max_downloads=2)

    assert admin_client.get(reverse("admin:uploads_sharelink_add")).status_code == 403
    edit = admin_client.post(reverse("admin:uploads_sharelink_change", args=[link.pk]), {"max_downloads": 99})
    assert edit.status_code == 403
    assert admin_client.post(reverse("admin:uploads_sharelink_delete", args=[link.pk])).status_code == 403
    assert ShareLink.objects.get(pk=link.pk).max_downloads == 2


@pytest.mark.parametrize("page", ["admin:uploads_sharelink_changelist", "admin:uploads_sharelink_add"])
def test_anyone_but_staff_is_sent_to_the_admin_login(client, alice, page):
    assert client.login(username="alice", password=PASSWORD)

    response = client.get(reverse(page))

    assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))


def test_nobody_but_staff_can_revoke(client, alice, report):
    link, _ = share_create(alice, report.pk)
    assert client.login(username="alice", password=PASSWORD)

    response = revoke_action(client, link)

    assert response.redirect_chain[0][0].startswith(reverse("admin:login"))
    assert ShareLink.objects.get(pk=link.pk).revoked_at is None


def test_staff_who_may_only_view_links_are_not_offered_the_revoke_action(client, alice, report):
    link, _ = share_create(alice, report.pk)
    viewer = make_user("viewer", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_sharelink"))
    assert client.login(username="viewer", password=PASSWORD)

    assert client.get(reverse("admin:uploads_sharelink_changelist")).context["action_form"] is None
    revoke_action(client, link)

    assert ShareLink.objects.get(pk=link.pk).revoked_at is None
