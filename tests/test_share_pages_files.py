"""Share links on My files (uploads.views): each finished file's links, the share form, revoke, the ZIP selection.

The public side of a link (/s/<token>) is tests/test_shares_live.py; the API is
tests/test_shares_api.py. Pages are read with tests.test_pages' parser, which
also fails any page with an inline script, style or handler.
"""

from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from django.contrib.auth.hashers import check_password
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from tests.conftest import finish_upload
from tests.test_pages import page, rows_only, signed_in, uploading
from uploads.models import ShareLink, Upload
from uploads.services.shares import share_create, share_revoke

pytestmark = pytest.mark.django_db

FILES = "/files/"
DATA = b"shared bytes " * 100


def share_url(upload) -> str:
    return f"/files/{upload.pk}/share/"


def revoke_url(link) -> str:
    return f"/files/shares/{link.pk}/revoke/"


def links_of(parsed, upload) -> list:
    """The ``li.share-link`` elements under ``upload``'s row, newest first, each with the elements inside it."""
    start = parsed.elements.index(parsed.one("tr", data_shares_of=str(upload.pk)))
    share_row = parsed.elements[start]
    end = next(
        (i for i in range(start + 1, len(parsed.elements)) if parsed.elements[i].depth <= share_row.depth),
        len(parsed.elements),
    )
    inside = parsed.elements[start + 1 : end]
    return [e for e in inside if e.tag == "li" and e.has_class("share-link")]


def link_parts(parsed, li) -> dict:
    """What the page shows of one link: its URL, state, downloads, expiry, password marker, revoke form."""
    start = parsed.elements.index(li)
    end = next(i for i in range(start + 1, len(parsed.elements)) if parsed.elements[i].depth <= li.depth)
    inside = parsed.elements[start + 1 : end]

    def first(tag, cls):
        return next((e for e in inside if e.tag == tag and e.has_class(cls)), None)

    url = first("input", "share-url")
    revoke = first("form", "share-revoke")
    return {
        "url": url.attrs["value"] if url else None,
        "readonly": url is not None and "readonly" in url.attrs,
        "copy": first("button", "copy-link") is not None,
        "state": first("span", "share-state").text,
        "downloads": first("dd", "share-downloads").text,
        "expires": first("time", "share-expires").attrs["datetime"],
        "password": first("dd", "share-password").text,
        "revoke": revoke.attrs["action"] if revoke else None,
    }


@pytest.fixture
def done(alice):
    return finish_upload(alice, DATA, filename="report.pdf")


# --- the links on My files ------------------------------------------------------------------


def test_my_files_lists_a_files_links_newest_first_with_url_downloads_expiry_password_and_state(alice, done):
    older, older_token = share_create(alice, done.pk, expires_in=3 * 86400, max_downloads=5, password="s3cret")
    ShareLink.objects.filter(pk=older.pk).update(downloads=2, created_at=timezone.now() - timedelta(minutes=1))
    newer, newer_token = share_create(alice, done.pk)

    parsed = page(signed_in(alice).get(FILES))

    shown = [link_parts(parsed, li) for li in links_of(parsed, done)]
    older.refresh_from_db()
    assert shown == [
        {
            "url": f"http://testserver/s/{newer_token}",
            "readonly": True,
            "copy": True,
            "state": "Active",
            "downloads": "0",
            "expires": newer.expires_at.isoformat(),
            "password": "None",
            "revoke": revoke_url(newer),
        },
        {
            "url": f"http://testserver/s/{older_token}",
            "readonly": True,
            "copy": True,
            "state": "Active",
            "downloads": "2 of 5",
            "expires": older.expires_at.isoformat(),
            "password": "Required",
            "revoke": revoke_url(older),
        },
    ]
    # Each link's field has a label of its own; the copy button starts hidden until share.js shows it.
    for li in links_of(parsed, done):
        field = parsed.one("input", id=f"share-url-{li.attrs['data-share-id']}")
        assert parsed.all("label", **{"for": field.attrs["id"]})
        assert "hidden" in parsed.one("button", data_copy=field.attrs["id"]).attrs
    assert parsed.one("script", src="/static/uploads/js/share.js").attrs["type"] == "module"
    assert parsed.one("p", id="share-copy-status").attrs["aria-live"] == "polite"


def test_expired_revoked_and_used_up_links_say_so_and_offer_no_revoke_or_copy(alice, done):
    expired, _ = share_create(alice, done.pk, expires_in=60)
    ShareLink.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    revoked, _ = share_create(alice, done.pk)
    share_revoke(alice, revoked.pk)
    used_up, _ = share_create(alice, done.pk, max_downloads=1)
    ShareLink.objects.filter(pk=used_up.pk).update(downloads=1, bytes_sent=len(DATA))

    parsed = page(signed_in(alice).get(FILES))

    states = {li.attrs["data-share-id"]: link_parts(parsed, li) for li in links_of(parsed, done)}
    assert {key: (shown["state"], shown["revoke"], shown["copy"]) for key, shown in states.items()} == {
        str(expired.pk): ("Expired", None, False),
        str(revoked.pk): ("Revoked", None, False),
        str(used_up.pk): ("Used up", None, False),
    }
    assert states[str(used_up.pk)]["downloads"] == "1 of 1"


def test_a_link_whose_url_cannot_be_shown_any_more_says_so(alice, done, settings):
    share_create(alice, done.pk)
    settings.SECRET_KEY = "another secret key of the server, long enough to be a real one"

    parsed = page(signed_in(alice).get(FILES))

    (li,) = links_of(parsed, done)
    assert link_parts(parsed, li)["url"] is None
    assert parsed.one("p", cls="share-url-lost").text.startswith("This link can no longer be shown")


def test_only_finished_files_have_links_and_a_share_form(alice, done):
    running = uploading(alice, "running.iso", size=100, received=b"x" * 10)

    parsed = page(signed_in(alice).get(FILES))

    assert [tr.attrs["data-shares-of"] for tr in parsed.all("tr", cls="share-row")] == [str(done.pk)]
    form = parsed.one("form", cls="share-form")
    assert (form.attrs["method"], form.attrs["action"]) == ("post", share_url(done))
    assert not parsed.all("form", action=share_url(running))


def test_the_share_form_has_labelled_fields_with_the_longest_expiry_as_default(alice, done, settings):
    settings.DIRECTDRIVEX_SHARE_MAX_DAYS = 7

    parsed = page(signed_in(alice).get(FILES))

    days = parsed.one("input", name="days")
    assert (days.attrs["type"], days.attrs["min"], days.attrs["max"], days.attrs["value"]) == ("number", "1", "7", "7")
    downloads = parsed.one("input", name="max_downloads")
    assert (downloads.attrs["type"], downloads.attrs["min"]) == ("number", "1")
    assert "required" not in downloads.attrs
    password = parsed.one("input", name="password")
    assert (password.attrs["type"], password.attrs["autocomplete"]) == ("password", "new-password")
    for field in (days, downloads, password):
        assert field.attrs["id"].startswith(f"share-{done.pk}-")
        assert parsed.all("label", **{"for": field.attrs["id"]}), field.attrs["name"]
    assert parsed.one("legend").text == "New link to report.pdf"


def test_my_files_reads_every_link_of_the_page_in_one_query_however_many_there_are(alice):
    client = signed_in(alice)
    first = finish_upload(alice, DATA, filename="one.bin")
    share_create(alice, first.pk)
    with CaptureQueriesContext(connection) as few:
        page(client.get(FILES))

    for number in range(3):
        more = finish_upload(alice, DATA, filename=f"more-{number}.bin")
        for _ in range(3):
            share_create(alice, more.pk, max_downloads=2)
    with CaptureQueriesContext(connection) as many:
        parsed = page(client.get(FILES))

    assert len(parsed.all("li", cls="share-link")) == 10
    assert len(many.captured_queries) == len(few.captured_queries)


# --- the share form -------------------------------------------------------------------------


def test_sharing_creates_a_link_with_the_given_limits_and_shows_it(alice, done):
    client = signed_in(alice)
    before = timezone.now()

    response = client.post(share_url(done), {"days": "3", "max_downloads": "4", "password": "open sesame "})

    assert (response.status_code, response["Location"]) == (302, FILES)
    link = ShareLink.objects.get(upload=done)
    assert link.max_downloads == 4
    assert check_password("open sesame ", link.password)
    assert before + timedelta(days=3) <= link.expires_at <= timezone.now() + timedelta(days=3)
    parsed = page(client.get(FILES))
    (li,) = links_of(parsed, done)
    shown = link_parts(parsed, li)
    (message,) = parsed.messages()
    assert message == f"Shared report.pdf. Anyone with this link can download it: {shown['url']}"
    assert (shown["downloads"], shown["password"], shown["state"]) == ("0 of 4", "Required", "Active")
    # The link the page shows opens the file, behind the password as given (its trailing space included).
    public = Client()
    assert b"This link is protected by a password" in public.get(urlsplit(shown["url"]).path).content
    unlocked = public.post(urlsplit(shown["url"]).path, {"password": "open sesame "})
    assert unlocked.status_code == 303


def test_sharing_with_only_the_defaults_makes_a_link_of_the_longest_expiry_without_limits(alice, done, settings):
    settings.DIRECTDRIVEX_SHARE_MAX_DAYS = 5
    before = timezone.now()

    signed_in(alice).post(share_url(done), {"days": "5", "max_downloads": "", "password": ""})

    link = ShareLink.objects.get(upload=done)
    assert (link.max_downloads, link.password) == (None, "")
    assert before + timedelta(days=5) <= link.expires_at <= timezone.now() + timedelta(days=5)
    shown = page(signed_in(alice).get(FILES)).one("input", cls="share-url").attrs["value"]
    assert page(Client().get(urlsplit(shown).path)).one("h2", cls="file-name").text == "report.pdf"


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"days": "0"}, "A link lasts from 1 to 30 days."),
        ({"days": "31"}, "A link lasts from 1 to 30 days."),
        ({"days": "-2"}, "A link lasts from 1 to 30 days."),
        ({"days": ""}, "Say how many days the link lasts (1 to 30)."),
        ({"days": "1.5"}, "The number of days must be a whole number from 1 to 30."),
        ({"max_downloads": "0"}, "Most downloads must be 1 or more (or empty for no limit)."),
        ({"max_downloads": "-1"}, "Most downloads must be 1 or more (or empty for no limit)."),
        ({"max_downloads": "abc"}, "Most downloads must be a whole number, 1 or more (or empty for no limit)."),
        ({"max_downloads": str(2**31)}, "Most downloads can be at most 2147483647."),
        ({"password": "x" * 1025}, "The password is longer than 1024 characters."),
    ],
)
def test_bad_share_fields_come_back_as_an_error_message_and_create_nothing(alice, done, settings, fields, error):
    settings.DIRECTDRIVEX_SHARE_MAX_DAYS = 30
    client = signed_in(alice)

    response = client.post(share_url(done), {"days": "7", "max_downloads": "", "password": "", **fields})

    assert (response.status_code, response["Location"]) == (302, FILES)
    assert not ShareLink.objects.exists()
    parsed = page(client.get(FILES))
    assert parsed.messages() == [f"report.pdf was not shared: {error}"]
    assert parsed.one("li", cls="message").has_class("message-error")


def test_an_unfinished_upload_cannot_be_shared_and_says_why(alice):
    running = uploading(alice, "half.iso", size=100, received=b"x" * 10)
    client = signed_in(alice)

    response = client.post(share_url(running), {"days": "1"})

    assert response.status_code == 302
    assert not ShareLink.objects.exists()
    assert page(client.get(FILES)).messages() == [
        "half.iso was not shared: The upload is uploading: only a finished file can be shared."
    ]


def test_sharing_returns_to_the_page_the_file_was_listed_on(alice):
    rows_only(alice, 26)
    oldest = Upload.objects.filter(owner=alice).order_by("created_at").first()
    client = signed_in(alice)

    parsed = page(client.get(FILES, {"page": "2"}))
    form = parsed.one("form", cls="share-form")
    assert form.attrs["action"] == share_url(oldest)
    assert [e.attrs["value"] for e in parsed.all("input", name="page")] == ["2"]

    assert client.post(share_url(oldest), {"days": "1", "page": "2"})["Location"] == f"{FILES}?page=2"
    assert client.post(share_url(oldest), {"days": "0", "page": "2"})["Location"] == f"{FILES}?page=2"


def test_sharing_bobs_upload_is_a_404_page_and_creates_nothing(alice, bob):
    bobs = finish_upload(bob, DATA, filename="bobs.bin")

    response = signed_in(alice).post(share_url(bobs), {"days": "1"})

    assert page(response, 404).one("h1").text == "Page not found"
    assert not ShareLink.objects.exists()


def test_sharing_needs_a_signed_in_owner_and_a_post(alice, done):
    assert Client().post(share_url(done), {"days": "1"})["Location"] == f"/accounts/login/?next={share_url(done)}"
    assert signed_in(alice).get(share_url(done)).status_code == 405
    assert not ShareLink.objects.exists()


def test_a_share_form_posted_without_its_csrf_token_gets_the_friendly_403_page(alice, done):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)

    assert page(client.post(share_url(done), {"days": "1"}), 403)
    assert not ShareLink.objects.exists()


# --- revoke ---------------------------------------------------------------------------------


def test_revoking_a_link_says_so_and_its_public_page_then_answers_404(alice, done):
    link, token = share_create(alice, done.pk)
    public = Client()
    assert public.get(reverse("share", args=[token])).status_code == 200
    client = signed_in(alice)

    response = client.post(revoke_url(link))

    assert (response.status_code, response["Location"]) == (302, FILES)
    link.refresh_from_db()
    assert link.revoked_at is not None
    parsed = page(client.get(FILES))
    assert parsed.messages() == ["Revoked the link to report.pdf; it no longer opens."]
    (li,) = links_of(parsed, done)
    assert link_parts(parsed, li)["state"] == "Revoked"
    missing = page(public.get(reverse("share", args=[token])), 404)
    assert missing.one("h1").text == "This link does not work"
    assert public.get(reverse("share-download", args=[token])).status_code == 404


def test_revoking_returns_to_the_page_the_link_was_listed_on(alice):
    rows_only(alice, 26)
    oldest = Upload.objects.filter(owner=alice).order_by("created_at").first()
    link, _ = share_create(alice, oldest.pk)
    client = signed_in(alice)

    form = page(client.get(FILES, {"page": "2"})).one("form", cls="share-revoke")
    assert form.attrs["action"] == revoke_url(link)

    assert client.post(revoke_url(link), {"page": "2"})["Location"] == f"{FILES}?page=2"


def test_revoking_bobs_link_or_one_that_does_not_exist_is_a_404_page_and_changes_nothing(alice, bob):
    bobs = finish_upload(bob, DATA, filename="bobs.bin")
    link, _ = share_create(bob, bobs.pk)
    client = signed_in(alice)

    assert page(client.post(revoke_url(link)), 404).one("h1").text == "Page not found"
    assert page(client.post("/files/shares/999999/revoke/"), 404).one("h1").text == "Page not found"
    link.refresh_from_db()
    assert link.revoked_at is None


def test_revoke_needs_a_signed_in_owner_and_a_post(alice, done):
    link, _ = share_create(alice, done.pk)
    assert Client().post(revoke_url(link))["Location"] == f"/accounts/login/?next={revoke_url(link)}"
    assert signed_in(alice).get(revoke_url(link)).status_code == 405
    link.refresh_from_db()
    assert link.revoked_at is None


# --- the ZIP selection ----------------------------------------------------------------------


def assert_zip_form(parsed, action: str, finished: list, unfinished: list) -> None:
    form = parsed.one("form", id="zip-form")
    assert (form.attrs["method"], form.attrs["action"]) == ("get", action)
    assert parsed.one("button", cls="button-secondary").text == "Download selected as ZIP"
    boxes = parsed.all("input", type="checkbox")
    assert [(box.attrs["name"], box.attrs["value"], box.attrs["form"]) for box in boxes] == [
        ("id", str(upload.pk), "zip-form") for upload in finished
    ]
    for box in boxes:
        assert parsed.all("label", **{"for": box.attrs["id"]})
    for upload in unfinished:
        assert not parsed.row_of(upload).all("input", type="checkbox")


def test_each_finished_file_has_a_checkbox_of_the_zip_form(alice):
    older = finish_upload(alice, DATA, filename="older.bin")
    running = uploading(alice, "running.iso", size=100)
    newer = finish_upload(alice, DATA, filename="newer.bin")

    parsed = page(signed_in(alice).get(FILES))

    assert_zip_form(parsed, reverse("files-zip"), [newer, older], [running])


def test_deleting_a_shared_file_says_its_links_stop_working(alice, done):
    client = signed_in(alice)
    plain = client.get(f"/files/{done.pk}/delete/")
    assert plain.status_code == 200 and b"share link" not in plain.content
    share_create(alice, done.pk)
    share_create(alice, done.pk)
    confirm = client.get(f"/files/{done.pk}/delete/").content.decode()
    assert "Its 2 share links stop working" in confirm
    client.post(f"/files/{done.pk}/delete/")
    assert not ShareLink.objects.exists()
