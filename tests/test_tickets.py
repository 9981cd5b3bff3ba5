"""ws_url tickets (uploads.tickets): signed, bound to one user and one upload, short-lived."""

import time
import uuid

import pytest
from django.core import signing

from uploads.services.uploads import upload_create
from uploads.tickets import SALT, ticket_issue, ticket_read, ws_url


@pytest.fixture
def issued_seconds_ago(monkeypatch):
    """Issue tickets as if at ``seconds`` ago, by back-dating the signer's timestamp."""

    def back_date(seconds: int):
        monkeypatch.setattr(
            signing.TimestampSigner, "timestamp", lambda self: signing.b62_encode(int(time.time()) - seconds)
        )

    return back_date


def test_a_fresh_ticket_names_its_user_and_upload():
    upload_id = uuid.uuid4()

    assert ticket_read(ticket_issue(7, upload_id)) == (7, str(upload_id))


def test_ws_url_carries_a_ticket_for_the_owner_and_the_upload(alice):
    upload, _slot = upload_create(alice, filename="a.bin", size=1)

    url = ws_url(upload)

    path, ticket = url.split("?ticket=")
    assert path == f"/ws/uploads/{upload.pk}/"
    assert ticket_read(ticket) == (alice.pk, str(upload.pk))


def test_a_ticket_is_valid_until_its_max_age(issued_seconds_ago, settings):
    settings.DIRECTDRIVEX_TICKET_MAX_AGE = 600
    upload_id = uuid.uuid4()
    issued_seconds_ago(590)

    assert ticket_read(ticket_issue(7, upload_id)) == (7, str(upload_id))


def test_an_expired_ticket_is_rejected(issued_seconds_ago, settings):
    settings.DIRECTDRIVEX_TICKET_MAX_AGE = 600
    issued_seconds_ago(601)

    assert ticket_read(ticket_issue(7, uuid.uuid4())) is None


def test_the_max_age_setting_is_honoured(issued_seconds_ago, settings):
    issued_seconds_ago(100)
    ticket = ticket_issue(7, uuid.uuid4())

    settings.DIRECTDRIVEX_TICKET_MAX_AGE = 600
    assert ticket_read(ticket) is not None
    settings.DIRECTDRIVEX_TICKET_MAX_AGE = 60
    assert ticket_read(ticket) is None


def flip(text: str, index: int) -> str:
    return text[:index] + ("A" if text[index] != "A" else "B") + text[index + 1 :]


@pytest.mark.parametrize("index", [0, 5, -1, -5])
def test_a_tampered_ticket_is_rejected(index):
    ticket = ticket_issue(7, uuid.uuid4())

    assert ticket_read(flip(ticket, index)) is None


def test_a_ticket_for_another_user_cannot_be_forged_by_editing_the_payload():
    upload_id = uuid.uuid4()
    mine = ticket_issue(7, upload_id)
    theirs = ticket_issue(8, upload_id)
    # Payload of one, timestamp and signature of the other.
    forged = theirs.split(":", 1)[0] + ":" + mine.split(":", 1)[1]

    assert forged != mine
    assert ticket_read(forged) is None


def test_a_ticket_cannot_be_extended_by_editing_its_timestamp(issued_seconds_ago):
    issued_seconds_ago(3600)
    payload, _old, signature = ticket_issue(7, uuid.uuid4()).split(":")

    assert ticket_read(f"{payload}:{signing.b62_encode(int(time.time()))}:{signature}") is None


def test_a_ticket_signed_with_another_key_or_salt_is_rejected(settings):
    claims = {"u": 7, "up": str(uuid.uuid4())}

    assert ticket_read(signing.dumps(claims, salt="another.salt")) is None
    assert ticket_read(signing.dumps(claims, key="another-secret-key", salt=SALT)) is None
    assert ticket_read(signing.dumps(claims, salt=SALT)) == (7, claims["up"])


@pytest.mark.parametrize(
    "claims",
    [{"u": "7", "up": "x"}, {"u": 7, "up": 5}, {"u": 7}, [7, "x"], "7", None],
)
def test_a_validly_signed_ticket_with_malformed_claims_is_rejected(claims):
    ticket = signing.dumps(claims, salt=SALT)

    assert ticket_read(ticket) is None


@pytest.mark.parametrize("ticket", ["", "abc", ":", "a:b:c", "é" * 10])
def test_garbage_is_rejected(ticket):
    assert ticket_read(ticket) is None
