"""Short-lived signed tickets that let a WebSocket connect without cookies.

A ticket is bound to one user and one upload and admits any number of
connections to that upload until it expires (DIRECTDRIVEX_TICKET_MAX_AGE).
"""

from django.conf import settings
from django.core import signing

SALT = "directdrivex.ws-ticket"


def ticket_issue(user_id: int, upload_id) -> str:
    return signing.dumps({"u": user_id, "up": str(upload_id)}, salt=SALT, compress=True)


def ticket_read(ticket: str) -> tuple[int, str] | None:
    """(user id, upload id) of a valid, unexpired ticket; None otherwise."""
    try:
        claims = signing.loads(ticket, salt=SALT, max_age=settings.DIRECTDRIVEX_TICKET_MAX_AGE)
    except signing.BadSignature:  # includes SignatureExpired
        return None
    if not isinstance(claims, dict) or not isinstance(claims.get("u"), int) or not isinstance(claims.get("up"), str):
        return None
    return claims["u"], claims["up"]


def ws_url(upload) -> str:
    return f"/ws/uploads/{upload.pk}/?ticket={ticket_issue(upload.owner_id, upload.pk)}"
