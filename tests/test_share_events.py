"""Share link transitions (uploads.services.events): logged, counted and signalled once each, never with the token.

As in tests/test_events.py the tests commit for real (``transaction=True``):
the effects run once the service's transaction commits, and what a receiver
is told must already be visible to another connection. Every record captured
during a test is also formatted as the logfmt handler writes it, and the
link's token must not be in any of them.
"""

import logging
import sys
import threading
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.test import Client
from prometheus_client import REGISTRY

from tests.conftest import finish_upload
from uploads import signals
from uploads.logs import SHARE_TOKEN_MASK, LogfmtFormatter, mask_share_tokens
from uploads.models import ShareLink
from uploads.services.shares import share_create, share_download_ended, share_revoke, share_revoke_link

pytestmark = pytest.mark.django_db(transaction=True)

DATA = b"shared bytes " * 100
# A token as share_create makes them (43 characters of base64url), for the formatter's tests.
TOKEN = "Zm9vYmFyLWJhei1xdXV4LXRva2VuLXRoYXQtaXMtNDM"


def committed_link(share_id) -> dict | None:
    """The link's row as another connection sees it: only committed changes are visible there."""
    seen = {}

    def look():
        try:
            seen["row"] = ShareLink.objects.filter(pk=share_id).values("downloads", "bytes_sent", "revoked_at").first()
        finally:
            connections.close_all()

    thread = threading.Thread(target=look)
    thread.start()
    thread.join(30)
    return seen.get("row", "(no answer)")


@pytest.fixture
def heard():
    """Every share_* signal sent during the test: (outcome, kwargs, the link's committed row at that moment)."""
    received = []
    receivers = []
    for outcome, signal in signals.SHARE_BY_OUTCOME.items():

        def receiver(sender, outcome=outcome, **kwargs):
            received.append((outcome, {"sender": sender, **kwargs}, committed_link(kwargs["share_id"])))

        signal.connect(receiver, weak=False)
        receivers.append((signal, receiver))
    yield received
    for signal, receiver in receivers:
        signal.disconnect(receiver)


@pytest.fixture
def lines(caplog):
    """The share.* records of uploads.events logged during the test, by event name."""
    caplog.set_level(logging.INFO)

    def of(event: str):
        return [record for record in caplog.records if record.name == "uploads.events" and record.msg == event]

    return of


@pytest.fixture
def report(alice):
    return finish_upload(alice, DATA, filename="report.pdf")


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def share_links(event: str) -> float:
    return counter("directdrivex_share_links_total", event=event)


def share_downloads() -> float:
    return counter("directdrivex_share_downloads_total")


def formatted(record: logging.LogRecord) -> str:
    return LogfmtFormatter().format(record)


def assert_token_in_no_line(caplog, token: str) -> None:
    for record in caplog.records:
        assert token not in formatted(record), formatted(record)


def test_creating_a_link_is_logged_counted_and_signalled_once_without_its_token(alice, report, heard, lines, caplog):
    created_before, downloads_before = share_links("created"), share_downloads()

    link, token = share_create(alice, report.pk, max_downloads=2, password="open sesame")

    [line] = lines("share.created")
    assert {key: line.ddx[key] for key in ("share", "upload", "user", "max_downloads", "password")} == {
        "share": link.pk,
        "upload": report.pk,
        "user": alice.pk,
        "max_downloads": 2,
        "password": True,
    }
    assert f"share={link.pk} " in formatted(line)
    assert_token_in_no_line(caplog, token)
    assert share_links("created") == created_before + 1
    assert share_downloads() == downloads_before
    assert heard == [
        (
            "created",
            {
                "sender": ShareLink,
                "signal": signals.share_created,
                "share_id": link.pk,
                "upload_id": report.pk,
                "user_id": alice.pk,
                "expires_at": link.expires_at.isoformat(),
                "max_downloads": 2,
                "password": True,
            },
            {"downloads": 0, "bytes_sent": 0, "revoked_at": None},  # already committed
        )
    ]


def test_a_download_that_sent_the_last_byte_is_used_and_counted(alice, report, heard, lines, caplog):
    link, token = share_create(alice, report.pk)
    heard.clear()
    used_before, downloads_before = share_links("used"), share_downloads()

    share_download_ended(link, sent=len(DATA), reached_end=True)

    [line] = lines("share.used")
    assert (line.ddx["share"], line.ddx["sent"], line.ddx["counted"]) == (link.pk, len(DATA), True)
    assert f"share={link.pk} " in formatted(line)
    assert_token_in_no_line(caplog, token)
    assert share_links("used") == used_before + 1
    assert share_downloads() == downloads_before + 1
    assert heard == [
        (
            "used",
            {
                "sender": ShareLink,
                "signal": signals.share_used,
                "share_id": link.pk,
                "upload_id": report.pk,
                "user_id": alice.pk,
                "sent": len(DATA),
                "counted": True,
            },
            {"downloads": 1, "bytes_sent": len(DATA), "revoked_at": None},
        )
    ]


def test_a_download_that_stopped_early_is_used_but_not_counted(alice, report, heard, lines, caplog):
    link, token = share_create(alice, report.pk)
    heard.clear()
    used_before, downloads_before = share_links("used"), share_downloads()

    share_download_ended(link, sent=10, reached_end=False)

    [line] = lines("share.used")
    assert (line.ddx["share"], line.ddx["sent"], line.ddx["counted"]) == (link.pk, 10, False)
    assert_token_in_no_line(caplog, token)
    assert share_links("used") == used_before + 1
    assert share_downloads() == downloads_before
    assert [(outcome, kwargs["sent"], kwargs["counted"], row) for outcome, kwargs, row in heard] == [
        ("used", 10, False, {"downloads": 0, "bytes_sent": 10, "revoked_at": None})
    ]


def test_revoking_is_logged_counted_and_signalled_once_with_its_reason(alice, report, heard, lines, caplog):
    link, token = share_create(alice, report.pk)
    heard.clear()
    revoked_before = share_links("revoked")

    share_revoke(alice, link.pk)
    share_revoke(alice, link.pk)  # idempotent: the second revocation is no transition
    share_revoke_link(link, reason="admin")

    [line] = lines("share.revoked")
    assert (line.ddx["share"], line.ddx["upload"], line.ddx["user"], line.ddx["reason"]) == (
        link.pk,
        report.pk,
        alice.pk,
        "revoked",
    )
    assert f"share={link.pk} " in formatted(line)
    assert_token_in_no_line(caplog, token)
    assert share_links("revoked") == revoked_before + 1
    [(outcome, kwargs, row)] = heard
    assert (outcome, kwargs) == (
        "revoked",
        {
            "sender": ShareLink,
            "signal": signals.share_revoked,
            "share_id": link.pk,
            "upload_id": report.pk,
            "user_id": alice.pk,
            "reason": "revoked",
        },
    )
    assert row["revoked_at"] is not None  # committed before the receiver ran


def test_an_admin_revocation_says_admin(alice, report, heard, lines):
    link, _token = share_create(alice, report.pk)

    share_revoke_link(link, reason="admin")

    assert [line.ddx["reason"] for line in lines("share.revoked")] == ["admin"]
    assert heard[-1][1]["reason"] == "admin"


def test_a_link_created_in_a_transaction_that_rolls_back_is_never_recorded(alice, report, heard, lines):
    created_before = share_links("created")

    with pytest.raises(RuntimeError), transaction.atomic():
        share_create(alice, report.pk)
        assert heard == [], "sent while its transaction was still open"
        raise RuntimeError("the caller changes its mind")

    assert not ShareLink.objects.exists()
    assert heard == [] and lines("share.created") == []
    assert share_links("created") == created_before


def test_a_failing_receiver_is_logged_and_breaks_neither_the_others_nor_the_service(alice, report, heard, caplog):
    link, token = share_create(alice, report.pk)
    heard.clear()

    def broken(sender, **kwargs):
        raise ValueError("integrator bug")

    signals.share_used.connect(broken, weak=False)
    try:
        with caplog.at_level(logging.INFO):
            share_download_ended(link, sent=len(DATA), reached_end=True)
    finally:
        signals.share_used.disconnect(broken)

    assert ShareLink.objects.get(pk=link.pk).downloads == 1
    assert [entry[0] for entry in heard] == ["used"]
    [failure] = [
        record for record in caplog.records if record.name == "uploads.events" and record.levelno == logging.ERROR
    ]
    assert "signal receiver failed" in failure.getMessage() and "integrator bug" in failure.getMessage()
    assert (failure.ddx["share"], failure.ddx["upload"], failure.ddx["signal"]) == (link.pk, report.pk, "share_used")
    assert any(record.name == "django.dispatch" and record.exc_info for record in caplog.records)
    assert_token_in_no_line(caplog, token)


def test_a_visit_to_the_links_page_is_logged_by_link_id_with_the_token_masked(alice, report, caplog):
    caplog.set_level(logging.INFO)
    link, token = share_create(alice, report.pk)

    page = Client().get(f"/s/{token}")
    missing = Client().get(f"/s/{TOKEN}/download")

    assert (page.status_code, missing.status_code) == (200, 404)
    [visit, miss] = [formatted(record) for record in caplog.records if record.name == "uploads.http"]
    assert "path=/s/[token] status=200" in visit and f"share={link.pk} " in visit, visit
    assert "path=/s/[token]/download status=404" in miss, miss
    assert_token_in_no_line(caplog, token)
    assert_token_in_no_line(caplog, TOKEN)


# --- the mask itself --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (f"/s/{TOKEN}", "/s/[token]"),
        (f"/s/{TOKEN}/download", "/s/[token]/download"),
        (f"Not Found: /s/{TOKEN}?x=1#top", "Not Found: /s/[token]?x=1#top"),
        (f"https://files.example/s/{TOKEN} and '/s/{TOKEN}'", "https://files.example/s/[token] and '/s/[token]'"),
        ("/api/uploads/1/shares/", "/api/uploads/1/shares/"),  # not a share link's path
        ("/s/", "/s/"),
    ],
)
def test_mask_share_tokens_replaces_every_token_in_a_links_path(text, masked):
    assert mask_share_tokens(text) == masked


def test_the_formatter_masks_the_token_in_the_message_the_fields_the_traceback_and_the_stack():
    try:
        raise LookupError(f"no link at /s/{TOKEN}")
    except LookupError:
        record = logging.LogRecord(
            "django.request", logging.WARNING, __file__, 1, "Not Found: %s", (f"/s/{TOKEN}",), sys.exc_info()
        )
    record.ddx = {"path": f"/s/{TOKEN}/download", "url": f"http://testserver/s/{TOKEN}"}
    record.stack_info = f'Stack (most recent call last):\n  File "x.py", line 1, in f\n    get("/s/{TOKEN}")'

    line = formatted(record)

    assert TOKEN not in line, line
    first, *rest = line.splitlines()
    assert f'msg="Not Found: /s/{SHARE_TOKEN_MASK}" path=/s/{SHARE_TOKEN_MASK}/download' in first, first
    assert f"url=http://testserver/s/{SHARE_TOKEN_MASK}" in first, first
    assert f"  LookupError: no link at /s/{SHARE_TOKEN_MASK}" in rest, rest
    assert f'      get("/s/{SHARE_TOKEN_MASK}")' in rest, rest
    # Other handlers format the same record: what it carries stays as it was.
    assert TOKEN in record.exc_text and TOKEN in record.getMessage()


def test_a_link_expiring_later_is_logged_with_its_expiry(alice, report, lines):
    link, _token = share_create(alice, report.pk, expires_in=3600)

    [line] = lines("share.created")

    assert line.ddx["expires_at"] == link.expires_at.isoformat()
    assert link.expires_at - link.created_at == timedelta(seconds=3600)
