"""The pages (uploads.views and the templates): my files, delete with confirmation, sign in/out/up, error pages.

Every page fetched here is parsed with html.parser and must be CSP-clean: no
inline <script> or <style>, no style= and no on*= attributes.
"""

import hashlib
import os
import random
import re
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from html.parser import HTMLParser

import django_ratelimit.core
import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.test import Client, RequestFactory
from django.urls import include, path
from django.utils import timezone

from tests.conftest import PASSWORD, finish_upload, write_part
from tests.support import stored
from tests.support.live_backend import http_call, live_backend
from tests.support.live_server import LiveServer
from uploads.models import Slot, Upload
from uploads.services.grants import writer_admit, writer_commit
from uploads.services.quota import QuotaSummary, quota_summary
from uploads.services.uploads import upload_create, upload_delete
from uploads.throttles import client_address

FILES = "/files/"
LOGIN = "/accounts/login/"
SIGNUP = "/accounts/signup/"
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# --- reading pages -------------------------------------------------------------------


@dataclass
class Element:
    tag: str
    attrs: dict
    depth: int  # how many elements enclose it
    parts: list = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join("".join(self.parts).split())

    def has_class(self, name: str) -> bool:
        return name in (self.attrs.get("class") or "").split()


class Finder:
    """Lookups over ``self.elements``: ``all("a", cls="download", rel="next")`` (``aria_label`` means aria-label)."""

    elements: list[Element]

    def all(self, tag: str | None = None, *, cls: str | None = None, **attrs) -> list[Element]:
        return [
            e
            for e in self.elements
            if (tag is None or e.tag == tag)
            and (cls is None or e.has_class(cls))
            and all(e.attrs.get(name.replace("_", "-")) == value for name, value in attrs.items())
        ]

    def one(self, tag: str | None = None, **kwargs) -> Element:
        (element,) = self.all(tag, **kwargs)
        return element


@dataclass
class Row(Finder):
    """A my-files table row and the elements inside it."""

    tr: Element
    elements: list[Element]


class Page(HTMLParser, Finder):
    """A parsed page: its elements in document order (with their text) and what a strict CSP would block."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[Element] = []
        self.csp_violations: list[str] = []
        self._open: list[Element] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script" and "src" not in attrs:
            self.csp_violations.append("inline <script>")
        if tag == "style":
            self.csp_violations.append("inline <style>")
        self.csp_violations += [f"{name}= on <{tag}>" for name in attrs if name == "style" or name.startswith("on")]
        element = Element(tag, attrs, len(self._open))
        self.elements.append(element)
        if tag not in VOID_TAGS:
            self._open.append(element)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS:
            self._open.pop()

    def handle_endtag(self, tag):
        while self._open and self._open.pop().tag != tag:
            pass

    def handle_data(self, data):
        for element in self._open:
            element.parts.append(data)

    def messages(self) -> list[str]:
        return [e.text for e in self.all("li", cls="message")]

    def row_of(self, upload) -> Row:
        """The my-files table row of ``upload``, with the elements inside it."""
        tr = self.one("tr", data_upload_id=str(upload.pk))
        start = self.elements.index(tr) + 1
        end = next((i for i in range(start, len(self.elements)) if self.elements[i].depth <= tr.depth), None)
        return Row(tr, self.elements[start:end])


def page(response, status: int = 200) -> Page:
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"].startswith("text/html")
    parsed = Page(response.content.decode())
    assert parsed.csp_violations == []
    return parsed


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


# --- uploads in each state, through the services -------------------------------------------


def uploading(user, name="part.bin", *, size=10, received=b""):
    """An unfinished upload with ``received`` durable bytes, as a writer leaves it."""
    upload, _ = upload_create(user, filename=name, size=size)
    if received:
        write_part(upload.storage_key, received, size)
        writer_commit(writer_admit(user, upload.pk, "test-writer"), len(received))
    upload.refresh_from_db()
    return upload


def finished(user, name="done.bin", data=b"0123456789", *, declared=True):
    """A complete upload of ``data`` (sha256 declared, or not), finished the way the consumer finishes one."""
    return finish_upload(user, data, filename=name, sha256=hashlib.sha256(data).hexdigest() if declared else "")


def rows_only(user, count: int) -> list[Upload]:
    """``count`` complete rows one second apart, oldest first: more uploads than a user may hold slots for."""
    t0 = timezone.now() - timedelta(hours=1)
    return Upload.objects.bulk_create(
        Upload(
            owner=user,
            original_filename=f"{n}.bin",
            display_name=f"{n}.bin",
            size=1,
            offset=1,
            status=Upload.Status.COMPLETE,
            created_at=t0 + timedelta(seconds=n),
            completed_at=t0 + timedelta(seconds=n),
        )
        for n in range(count)
    )


def listed_ids(parsed: Page) -> list[str]:
    return [row.attrs["data-upload-id"] for row in parsed.all("tr", cls="file-row")]


# --- my files ------------------------------------------------------------------------------


def test_my_files_sends_an_anonymous_visitor_to_sign_in(db):
    response = Client().get(FILES)
    assert response.status_code == 302
    assert response["Location"] == f"{LOGIN}?next={FILES}"


def test_my_files_lists_alices_uploads_and_not_bobs(alice, bob):
    older = uploading(alice, "older.bin")
    newer = finished(alice, "newer.bin")
    uploading(bob, "bobs.bin")

    parsed = page(signed_in(alice).get(FILES))

    assert listed_ids(parsed) == [str(newer.pk), str(older.pk)]
    assert [e.text for e in parsed.all("span", cls="name")] == ["newer.bin", "older.bin"]


def test_my_files_shows_status_size_progress_and_sha256_of_each_upload(alice):
    running = uploading(alice, "running.iso", size=1000, received=b"x" * 612)
    done = finished(alice, "done.bin", b"0123456789")
    undeclared = finished(alice, "plain.bin", b"abc", declared=False)

    parsed = page(signed_in(alice).get(FILES))

    row = parsed.row_of(running)
    assert (row.tr.attrs["data-status"], row.tr.attrs["data-offset"], row.tr.attrs["data-size"]) == (
        "uploading",
        "612",
        "1000",
    )
    assert row.one(cls="status").text == "Uploading"
    assert row.one("data", cls="size").attrs["value"] == "1000"
    progress = row.one("progress")
    assert (progress.attrs["value"], progress.attrs["max"], progress.text) == ("612", "1000", "61 %")
    assert progress.attrs["aria-label"] == "Received of running.iso"
    assert row.one(cls="progress-text").text.startswith("61 %")  # the text equivalent, shown
    assert not row.all("a", cls="download")
    assert row.one("a", cls="delete").text == "Cancel… running.iso"

    row = parsed.row_of(done)
    assert row.one(cls="status").text == "Complete"
    assert row.one("code", cls="sha256").text == hashlib.sha256(b"0123456789").hexdigest()
    assert row.one("a", cls="download").attrs["href"] == f"/api/uploads/{done.pk}/content"
    assert [t.attrs["datetime"] for t in row.all("time")] == [
        done.created_at.isoformat(),
        done.completed_at.isoformat(),
    ]
    assert not row.all("progress")

    assert not parsed.row_of(undeclared).all("code", cls="sha256")


def test_my_files_shows_25_uploads_a_page_newest_first_and_26_make_two_pages(alice):
    uploads = rows_only(alice, 26)
    client = signed_in(alice)

    first = page(client.get(FILES))
    second = page(client.get(FILES, {"page": "2"}))

    newest_first = [str(u.pk) for u in reversed(uploads)]
    assert listed_ids(first) == newest_first[:25]
    assert listed_ids(second) == newest_first[25:]
    assert first.one("a", rel="next").attrs["href"] == "?page=2"
    assert not first.all("a", rel="prev")
    assert second.one("a", rel="prev").attrs["href"] == "?page=1"
    assert second.one("span", aria_current="page").text == "2"


def test_an_out_of_range_page_number_shows_the_last_page(alice):
    uploads = rows_only(alice, 26)
    assert listed_ids(page(signed_in(alice).get(FILES, {"page": "99"}))) == [str(uploads[0].pk)]


def test_quota_summary_splits_finished_from_reserved_bytes_and_ignores_ended_uploads(alice, limits):
    limits(user_quota=1000)
    finished(alice, data=b"0123456789")
    uploading(alice, size=40, received=b"abc")
    ended = uploading(alice, size=500)
    upload_delete(alice, ended.pk)  # cancelled: counts no more

    assert quota_summary(alice) == QuotaSummary(limit=1000, used=10, reserved=40)
    assert quota_summary(alice).free == 950


def test_quota_free_is_never_negative_when_the_quota_was_lowered_below_what_is_stored(alice, limits):
    finished(alice, data=b"0123456789")
    limits(user_quota=4)
    assert (quota_summary(alice).free, quota_summary(alice).used) == (0, 10)


def test_my_files_shows_the_quota_numbers_and_bar(alice, limits):
    limits(user_quota=1000)
    finished(alice, data=b"0123456789")
    uploading(alice, size=40)

    parsed = page(signed_in(alice).get(FILES))

    shown = {
        name: parsed.one("data", cls=f"quota-{name}").attrs["value"] for name in ("used", "reserved", "free", "limit")
    }
    assert shown == {"used": "10", "reserved": "40", "free": "950", "limit": "1000"}
    used, reserved = parsed.one("rect", cls="quota-used"), parsed.one("rect", cls="quota-reserved")
    assert (used.attrs["width"], reserved.attrs["x"], reserved.attrs["width"]) == ("1.00", "1.00", "4.00")


def test_my_files_without_uploads_says_so(alice):
    parsed = page(signed_in(alice).get(FILES))
    assert not parsed.all("table")
    assert parsed.one("p", cls="empty").text.startswith("You have no uploads yet.")


# --- delete with confirmation ----------------------------------------------------------------


def delete_url(upload) -> str:
    return f"/files/{upload.pk}/delete/"


def test_deleting_a_file_asks_first_then_removes_its_row_and_bytes(alice):
    done = finished(alice, "big.iso")
    client = signed_in(alice)

    confirm = page(client.get(delete_url(done)))
    assert Upload.objects.filter(pk=done.pk).exists()  # asking deletes nothing
    form = confirm.one("form", cls="confirm")
    assert (form.attrs["method"], form.attrs["action"]) == ("post", delete_url(done))

    response = client.post(delete_url(done))

    assert (response.status_code, response["Location"]) == (302, FILES)
    assert not Upload.objects.filter(pk=done.pk).exists()
    assert stored.nothing_stored(done.storage_key)
    listing = page(client.get(FILES))
    assert listing.messages() == ["Deleted big.iso."]
    assert listed_ids(listing) == []


def test_cancelling_an_unfinished_upload_deletes_its_partial_bytes_and_keeps_it_listed_as_cancelled(alice):
    running = uploading(alice, "half.iso", size=100, received=b"x" * 50)
    assert stored.part_stored(running.storage_key)
    client = signed_in(alice)

    assert page(client.get(delete_url(running))).one("h1").text == "Cancel the upload of half.iso?"
    client.post(delete_url(running))

    running.refresh_from_db()
    assert running.status == Upload.Status.CANCELLED
    assert stored.nothing_stored(running.storage_key)
    assert not Slot.objects.active().filter(upload=running).exists()
    listing = page(client.get(FILES))
    assert listing.messages() == ["Cancelled half.iso; its partial bytes are deleted."]
    assert listing.row_of(running).tr.attrs["data-status"] == "cancelled"

    client.post(delete_url(running))  # and then off the list
    assert not Upload.objects.filter(pk=running.pk).exists()
    assert page(client.get(FILES)).messages() == ["Removed half.iso from your list."]


def test_deleting_returns_to_the_page_the_file_was_listed_on(alice):
    rows_only(alice, 26)
    oldest = Upload.objects.filter(owner=alice).order_by("created_at").first()
    client = signed_in(alice)

    confirm = page(client.get(delete_url(oldest), {"page": "2"}))
    assert confirm.one("input", name="page").attrs["value"] == "2"
    assert confirm.one("a", cls="button-secondary").attrs["href"] == f"{FILES}?page=2"

    assert client.post(delete_url(oldest), {"page": "2"})["Location"] == f"{FILES}?page=2"


def test_deleting_bobs_upload_or_one_already_deleted_is_a_404_page_and_changes_nothing(alice, bob):
    bobs = finished(bob, "bobs.bin")
    mine = finished(alice, "mine.bin")
    client = signed_in(alice)
    assert client.post(delete_url(mine)).status_code == 302

    assert page(client.post(delete_url(mine)), 404).one("h1").text == "Page not found"
    assert page(client.get(delete_url(bobs)), 404).one("h1").text == "Page not found"
    assert page(client.post(delete_url(bobs)), 404).one("h1").text == "Page not found"
    assert Upload.objects.filter(pk=bobs.pk, status=Upload.Status.COMPLETE).exists()
    assert stored.finished_stored(bobs.storage_key)


def test_delete_needs_a_signed_in_owner_and_a_post(alice):
    done = finished(alice)
    assert Client().post(delete_url(done))["Location"] == f"{LOGIN}?next={delete_url(done)}"
    assert signed_in(alice).put(delete_url(done)).status_code == 405
    assert Upload.objects.filter(pk=done.pk).exists()


# --- sign in, sign out, sign up ---------------------------------------------------------------


def test_signing_in_and_out_says_so_in_messages(alice):
    client = Client()

    refused = page(client.post(LOGIN, {"username": "alice", "password": "wrong"}))
    assert refused.one(cls="form-errors").text.startswith("Please enter a correct username and password")
    assert refused.one(cls="form-errors").attrs["role"] == "alert"

    response = client.post(LOGIN, {"username": "alice", "password": PASSWORD, "next": FILES})
    assert response["Location"] == FILES
    assert page(client.get(FILES)).messages() == ["Signed in as alice."]

    assert client.post("/accounts/logout/")["Location"] == "/"
    home = page(client.get("/"))
    assert home.messages() == ["You are signed out."]
    assert client.get(FILES).status_code == 302


def test_the_sign_in_form_has_labelled_fields(db):
    parsed = page(Client().get(LOGIN))
    for name in ("username", "password"):
        field_id = parsed.one("input", name=name).attrs["id"]
        assert [label.attrs["for"] for label in parsed.all("label") if label.attrs.get("for") == field_id] == [field_id]


@pytest.mark.parametrize("method", ["get", "post"])
def test_sign_up_is_404_while_signup_is_off(db, settings, method):
    settings.DIRECTDRIVEX_SIGNUP = False
    response = getattr(Client(), method)(SIGNUP, {"username": "alice", "password1": "x", "password2": "x"})
    page(response, 404)
    assert not get_user_model().objects.exists()
    assert not page(Client().get(LOGIN)).all("a", href=SIGNUP)


def test_sign_up_creates_the_account_and_signs_in_with_it(db, settings):
    settings.DIRECTDRIVEX_SIGNUP = True
    client = Client()
    assert page(client.get(LOGIN)).all("a", href=SIGNUP)
    assert page(client.get(SIGNUP)).one("input", name="username")

    response = client.post(
        SIGNUP, {"username": "alice", "email": "alice@example.com", "password1": PASSWORD, "password2": PASSWORD}
    )

    assert response["Location"] == FILES
    alice = get_user_model().objects.get(username="alice")
    assert alice.check_password(PASSWORD) and alice.email == "alice@example.com"
    listing = page(client.get(FILES))
    assert listing.messages() == ["Your account alice is ready.", "Signed in as alice."]
    assert listing.one("li", cls="signed-in").text == "Signed in as alice"


def test_sign_up_with_a_taken_name_or_mismatched_passwords_shows_why_and_creates_nothing(alice, settings):
    settings.DIRECTDRIVEX_SIGNUP = True
    client = Client()

    taken = page(client.post(SIGNUP, {"username": "ALICE", "password1": PASSWORD, "password2": PASSWORD}))
    assert taken.one("ul", id="id_username_error").text == "A user with that username already exists."
    mismatch = page(client.post(SIGNUP, {"username": "bob", "password1": PASSWORD, "password2": PASSWORD + "x"}))
    assert mismatch.one("input", name="password2").attrs["aria-invalid"] == "true"

    assert list(get_user_model().objects.values_list("username", flat=True)) == ["alice"]
    assert "_auth_user_id" not in client.session


# --- throttling of sign-in and sign-up -------------------------------------------------------------

# Documentation addresses (RFC 5737, RFC 3849): two clients, and one more.
HERE, ELSEWHERE, THIRD = "203.0.113.7", "198.51.100.9", "192.0.2.4"
ADMIN_LOGIN = "/admin/login/"


@pytest.fixture(autouse=True)
def throttle_counters(settings):
    """Every test counts sign-in and sign-up attempts from zero, under a cache key prefix of its own.

    Not by clearing the cache: with REDIS_URL set it is the suite's Redis, and clearing it would
    flush the channel layer's database with it.
    """
    settings.RATELIMIT_CACHE_PREFIX = f"rl:test-{uuid.uuid4().hex}:"


class Clock:
    """A clock that moves only when told to."""

    def __init__(self):
        self.now = 1_800_000_000.0

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def throttle_clock(monkeypatch) -> Clock:
    """django-ratelimit's clock, held still: a fixed window can end at any second, and one that ended
    between a test's attempts would start its count anew. Only the library's own reference to the
    time module is replaced; nothing else in the process stands still."""
    clock = Clock()
    monkeypatch.setattr(django_ratelimit.core, "time", clock)
    return clock


def sign_in_from(address: str, username: str, password: str, where: str = LOGIN, **extra):
    return Client().post(where, {"username": username, "password": password}, REMOTE_ADDR=address, **extra)


def sign_up_from(address: str, username: str):
    form = {"username": username, "password1": PASSWORD, "password2": PASSWORD}
    return Client().post(SIGNUP, form, REMOTE_ADDR=address)


def throttled(response, longest_wait: int) -> tuple[int, str]:
    """Retry-After of a 429 answer (1 to ``longest_wait`` s) and the sentence of its page, which says the same wait."""
    parsed = page(response, 429)
    wait = int(response["Retry-After"])
    assert 1 <= wait <= longest_wait
    assert parsed.one("h1").text == "Too many attempts"
    sentence = parsed.one("p", cls="throttled").text
    in_words = f"{wait} second" if wait < 120 else f"{-(-wait // 60)} minutes"
    assert f"Please wait {in_words}" in sentence
    return wait, sentence


def test_sign_in_and_sign_up_work_uncounted_while_the_throttles_cache_is_unreachable(alice, settings, caplog):
    # Redis down (here: nothing listens on its port). Before, every sign-in and sign-up answered 500.
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:9/0",
            "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
        }
    }
    settings.DIRECTDRIVEX_SIGNUP = True

    signed_in = sign_in_from(HERE, "alice", PASSWORD)
    failed = sign_in_from(HERE, "alice", "wrong")
    signed_up = sign_up_from(HERE, "carol")

    assert signed_in.status_code == 302 and "_auth_user_id" in signed_in.client.session
    assert failed.status_code == 200  # the form again, with its error
    assert signed_up.status_code == 302
    assert any("attempt let through uncounted" in r.getMessage() for r in caplog.records)


def test_failed_sign_ins_past_the_limit_from_one_address_are_refused_with_429_and_retry_after(
    alice, settings, throttle_clock
):
    settings.DIRECTDRIVEX_LOGIN_ATTEMPTS = 3
    for _ in range(3):
        assert page(sign_in_from(HERE, "alice", "wrong")).all(cls="form-errors")

    refused = sign_in_from(HERE, "alice", PASSWORD)  # the right password too: the address waits

    wait, sentence = throttled(refused, 60)
    assert sentence.startswith("Too many sign-ins from your network address failed.")
    assert "_auth_user_id" not in refused.client.session
    throttle_clock.advance(wait - 1)
    assert sign_in_from(HERE, "alice", PASSWORD).status_code == 429
    throttle_clock.advance(1)  # as long as Retry-After said
    assert sign_in_from(HERE, "alice", PASSWORD)["Location"] == "/"


def test_a_throttled_address_does_not_hold_up_another_one(alice, settings):
    settings.DIRECTDRIVEX_LOGIN_ATTEMPTS = 2
    for _ in range(2):
        sign_in_from(HERE, "alice", "wrong")
    assert sign_in_from(HERE, "alice", PASSWORD).status_code == 429

    assert sign_in_from(ELSEWHERE, "alice", PASSWORD)["Location"] == "/"


def test_a_few_failures_do_not_hold_up_a_sign_in_and_successful_ones_are_not_counted(alice, settings):
    settings.DIRECTDRIVEX_LOGIN_ATTEMPTS = 3
    for _ in range(2):
        sign_in_from(HERE, "alice", "wrong")

    for _ in range(5):
        assert sign_in_from(HERE, "alice", PASSWORD)["Location"] == "/"
    page(sign_in_from(HERE, "alice", "wrong"))  # the third failure: still answered
    assert sign_in_from(HERE, "alice", PASSWORD).status_code == 429


def test_failed_sign_ins_at_one_username_from_many_addresses_are_refused_past_the_username_limit(alice, bob, settings):
    settings.DIRECTDRIVEX_LOGIN_USERNAME_ATTEMPTS = 3
    for n in range(3):
        sign_in_from(f"203.0.113.{10 + n}", "alice", "wrong")

    # The same username however it is written, from an address that never failed.
    refused = sign_in_from(THIRD, " ALICE ", PASSWORD)

    _wait, sentence = throttled(refused, 3600)
    assert sentence.startswith("Too many sign-ins with this username failed.")
    assert sign_in_from(THIRD, "bob", PASSWORD)["Location"] == "/"


def test_the_admins_sign_in_counts_and_is_refused_alike(staff, settings):
    settings.DIRECTDRIVEX_LOGIN_ATTEMPTS = 2
    assert sign_in_from(HERE, "staff", "wrong").status_code == 200
    assert sign_in_from(HERE, "staff", "wrong", ADMIN_LOGIN).status_code == 200

    throttled(sign_in_from(HERE, "staff", PASSWORD, ADMIN_LOGIN), 60)
    throttled(sign_in_from(HERE, "staff", PASSWORD), 60)
    assert sign_in_from(ELSEWHERE, "staff", PASSWORD, ADMIN_LOGIN).status_code == 302


def test_sign_up_is_throttled_per_address_whatever_became_of_the_forms(db, settings):
    settings.DIRECTDRIVEX_SIGNUP = True
    settings.DIRECTDRIVEX_SIGNUP_ATTEMPTS = 2
    assert sign_up_from(HERE, "carol")["Location"] == FILES
    assert page(sign_up_from(HERE, "carol")).one("ul", id="id_username_error")  # taken: counted all the same

    _wait, sentence = throttled(sign_up_from(HERE, "dave"), 3600)

    assert sentence.startswith("Too many accounts were asked for from your network address.")
    assert sign_up_from(ELSEWHERE, "erin")["Location"] == FILES
    assert sorted(get_user_model().objects.values_list("username", flat=True)) == ["carol", "erin"]
    assert page(Client().get(SIGNUP, REMOTE_ADDR=HERE)).one("input", name="username")  # the form still shows


def test_behind_a_trusted_proxy_each_forwarded_address_is_counted_apart(alice, settings):
    settings.DIRECTDRIVEX_TRUSTED_PROXIES = ["127.0.0.1"]
    settings.DIRECTDRIVEX_LOGIN_ATTEMPTS = 2
    for _ in range(2):
        sign_in_from("127.0.0.1", "alice", "wrong", HTTP_X_FORWARDED_FOR=HERE)

    assert sign_in_from("127.0.0.1", "alice", PASSWORD, HTTP_X_FORWARDED_FOR=HERE).status_code == 429
    # Whatever a client writes into the header itself stays left of what the proxy appends.
    spoofed = f"{ELSEWHERE}, {HERE}"
    assert sign_in_from("127.0.0.1", "alice", PASSWORD, HTTP_X_FORWARDED_FOR=spoofed).status_code == 429
    assert sign_in_from("127.0.0.1", "alice", PASSWORD, HTTP_X_FORWARDED_FOR=ELSEWHERE)["Location"] == "/"


@pytest.mark.parametrize(
    ("proxies", "peer", "forwarded", "address"),
    [
        ([], HERE, ELSEWHERE, HERE),  # no proxy trusted: the header is anyone's
        (["127.0.0.1"], "127.0.0.1", ELSEWHERE, ELSEWHERE),
        (["127.0.0.1"], "127.0.0.1", f"{THIRD}, {ELSEWHERE}", ELSEWHERE),
        (["127.0.0.1", "10.0.0.0/8"], "127.0.0.1", f"{THIRD}, {ELSEWHERE}, 10.1.2.3", ELSEWHERE),
        (["127.0.0.1"], HERE, ELSEWHERE, HERE),  # not from the proxy
        (["127.0.0.1"], "127.0.0.1", None, "127.0.0.1"),
        (["127.0.0.1"], "127.0.0.1", "unknown", "127.0.0.1"),
        (["::1"], "::1", "2001:db8::7", "2001:db8::7"),
    ],
)
def test_the_client_address_is_the_last_forwarded_one_that_is_not_a_trusted_proxy(
    settings, proxies, peer, forwarded, address
):
    settings.DIRECTDRIVEX_TRUSTED_PROXIES = proxies
    headers = {"HTTP_X_FORWARDED_FOR": forwarded} if forwarded else {}
    request = RequestFactory().post(LOGIN, REMOTE_ADDR=peer, **headers)

    assert client_address(request) == address


def csrf_form(server, path: str) -> tuple[str, str]:
    """The CSRF cookie and form token of the page at ``path``, as a browser would get them."""
    answer = http_call(server, "GET", path)
    cookie = answer.headers["Set-Cookie"].split(";")[0]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', answer.body.decode()).group(1)
    return cookie, token


def sign_in_through(server, address: str, username: str):
    cookie, token = csrf_form(server, LOGIN)
    body = f"csrfmiddlewaretoken={token}&username={username}&password=wrong".encode()
    headers = {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded", "X-Forwarded-For": address}
    return http_call(server, "POST", LOGIN, body=body, headers=headers)


@pytest.mark.slow
def test_failed_sign_ins_counted_by_one_server_process_are_refused_by_another(tmp_path_factory):
    if not os.environ.get("REDIS_URL"):
        pytest.skip("needs REDIS_URL: without Redis each process counts by itself, as docs/configuration.md says")
    # Real clocks here: counted per username, in hour-long windows (a minute's could end between the
    # attempts). Addresses and a username of this run alone: the suite's Redis keeps counts an hour.
    username = f"nobody-{uuid.uuid4().hex[:8]}"
    prefix = f"2001:db8:{random.getrandbits(16):x}"
    with live_backend(tmp_path_factory, "throttle") as backend:
        first = LiveServer(
            tmp_path_factory.mktemp("throttle-first"),
            database_url=backend.database_url,
            redis_url=backend.redis_url,
            DIRECTDRIVEX_LOGIN_USERNAME_ATTEMPTS=2,
            DIRECTDRIVEX_TRUSTED_PROXIES="127.0.0.1",
        )
        second = first.sibling(tmp_path_factory.mktemp("throttle-second"))
        with first, second:
            first.start()
            second.start()
            failed = [sign_in_through(first, f"{prefix}:{n}::1", username).status for n in range(2)]
            assert failed == [200, 200]

            refused = sign_in_through(second, f"{prefix}:2::1", username)

            assert refused.status == 429
            assert 1 <= int(refused.headers["Retry-After"]) <= 3600
            assert b"Too many sign-ins with this username failed." in refused.body


# --- layout and error pages -------------------------------------------------------------------


def test_the_layout_has_a_skip_link_landmarks_and_an_external_stylesheet(alice):
    parsed = page(signed_in(alice).get(FILES))
    assert parsed.elements[parsed.elements.index(parsed.one("body")) + 1].attrs == {
        "class": "skip-link",
        "href": "#main",
    }
    assert parsed.one("main").attrs["id"] == "main"
    assert parsed.one("nav", aria_label="Main")
    assert parsed.all("header") and parsed.all("footer")
    assert parsed.one("link", rel="stylesheet").attrs["href"] == "/static/uploads/site.css"
    assert parsed.one("a", aria_current="page").attrs["href"] == FILES


def test_no_page_has_an_inline_script_style_or_event_handler(alice, settings):
    """What a strict Content-Security-Policy would block; page() checks every page any test here fetches, too."""
    settings.DIRECTDRIVEX_SIGNUP = True
    running, done = uploading(alice, size=100, received=b"x" * 30), finished(alice)
    visitor, client = Client(), signed_in(alice)
    pages = [
        (visitor, "/"),
        (visitor, LOGIN),
        (visitor, SIGNUP),
        (client, "/"),
        (client, FILES),
        (client, delete_url(running)),
        (client, delete_url(done)),
        (client, "/no-such-page/"),
    ]
    for who, url in pages:
        assert Page(who.get(url).content.decode()).csp_violations == [], url


# The policy of settings.CONTENT_SECURITY_POLICY: what is allowed comes from the page's own origin only.
STRICT_POLICY = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'none'"],
    "form-action": ["'self'"],
    "frame-ancestors": ["'none'"],
}


def policy(response) -> dict[str, list[str]]:
    directives = [part.split() for part in response["Content-Security-Policy"].split(";") if part.strip()]
    return {name: values for name, *values in directives}


def test_pages_error_pages_and_the_admin_carry_the_strict_content_security_policy(alice, settings):
    settings.DIRECTDRIVEX_SIGNUP = True
    settings.DIRECTDRIVEX_LOGIN_ATTEMPTS = 1
    sign_in_from(HERE, "alice", "wrong")
    operator = get_user_model().objects.create_superuser("operator", password=PASSWORD)
    visitor, client, admin = Client(), signed_in(alice), signed_in(operator)
    answers = {
        "/": visitor.get("/"),
        LOGIN: visitor.get(LOGIN),
        SIGNUP: visitor.get(SIGNUP),
        "upload": client.get("/upload/"),
        FILES: client.get(FILES),
        "delete": client.get(delete_url(uploading(alice))),
        "404": client.get("/no-such-page/"),
        "403 csrf": Client(enforce_csrf_checks=True).post(LOGIN, {"username": "alice", "password": PASSWORD}),
        "/admin/": admin.get("/admin/"),
        "dashboard": admin.get("/admin/uploads/slot/dashboard/"),
        "user form": admin.get(f"/admin/auth/user/{alice.pk}/change/"),
        "429": sign_in_from(HERE, "alice", PASSWORD),
    }

    assert {name: answer.status_code for name, answer in answers.items()} == {
        **dict.fromkeys(answers, 200),
        "404": 404,
        "403 csrf": 403,
        "429": 429,
    }
    assert {name: policy(answer) for name, answer in answers.items()} == dict.fromkeys(answers, STRICT_POLICY)


def test_home_offers_sign_in_to_visitors_and_my_files_to_signed_in_users(alice):
    assert page(Client().get("/")).all("a", href=LOGIN)
    assert page(signed_in(alice).get("/")).all("a", href=FILES)


def test_an_unknown_page_is_a_friendly_404_page_while_an_unknown_api_path_stays_json(alice):
    client = signed_in(alice)

    missing = page(client.get("/no-such-page/"), 404)
    assert missing.one("h1").text == "Page not found"
    assert missing.one("code").text == "/no-such-page/"
    assert missing.all("a", href=FILES)  # the layout, with the signed-in user's links
    page(client.get(f"/files/{uuid.uuid4()}/delete/"), 404)

    api = client.get("/api/no-such-thing/")
    assert (api.status_code, api["Content-Type"]) == (404, "application/json")
    assert api.json()["code"] == "not_found"


def test_a_form_posted_without_its_csrf_token_gets_the_friendly_403_page(db):
    response = Client(enforce_csrf_checks=True).post(LOGIN, {"username": "alice", "password": PASSWORD})
    assert page(response, 403).one("h1").text == "This form has expired"


# This module is also the URLconf of the next tests: the project's URLs plus
# views that fail on a page path and on an /api/ path.


def refuses(request):
    raise PermissionDenied


def fails(request):
    raise RuntimeError("a page view's bug")


urlpatterns = [
    path("page-forbidden/", refuses),
    path("page-fails/", fails),
    path("api/forbidden/", refuses),
    path("api/fails/", fails),
    path("", include("directdrivex.urls")),
]
handler400 = "uploads.api_errors.bad_request"
handler403 = "uploads.api_errors.permission_denied"
handler404 = "uploads.api_errors.page_not_found"
handler500 = "uploads.api_errors.server_error"


@pytest.mark.urls(__name__)
def test_a_refused_page_is_the_friendly_403_page_and_an_api_path_stays_json(alice):
    client = signed_in(alice)
    assert page(client.get("/page-forbidden/"), 403).one("h1").text == "Not allowed"
    api = client.get("/api/forbidden/")
    assert (api.status_code, api.json()["code"]) == (403, "permission_denied")


@pytest.mark.urls(__name__)
def test_a_failing_page_is_the_friendly_500_page_and_an_api_path_stays_json(alice):
    client = Client(raise_request_exception=False)
    client.force_login(alice)
    assert page(client.get("/page-fails/"), 500).one("h1").text == "Something went wrong on our side"
    api = client.get("/api/fails/")
    assert (api.status_code, api.json()["code"]) == (500, "internal_error")
