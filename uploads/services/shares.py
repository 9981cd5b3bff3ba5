"""Share links: create, list, revoke, open by token, unlock with a password, count what went out.

A link's token is 256 bits that only this server can compute: an HMAC of the
link's random ``nonce`` under SECRET_KEY. The database holds the nonce and
the token's SHA-256 (``token_hash``, what a request is looked up by), never
the token: a leaked copy of the database opens no link, yet the owner can
copy a link again at any time (``token_for``). After SECRET_KEY changes, a
link still opens for whoever has it (the lookup needs only the hash), but
its URL can no longer be shown: ``token_for`` then answers None.

Whether a link opens is one rule, ``share_open``: it exists, is not revoked,
not expired, not used up, and its file is complete. Every "no" is the same
ShareNotFound, so a visitor cannot tell an expired link from one that never
existed. What counts as a download is docs/sharing.md, "What counts".
"""

import hashlib
import hmac
import logging
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.hashers import check_password, make_password
from django.core import signing
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django.utils.crypto import salted_hmac

from uploads.exceptions import InvalidShare, NotComplete, NotUploading, ShareNotFound
from uploads.models import ShareLink, Slot, Upload
from uploads.services.events import Event, record
from uploads.services.slots import slots_revoke_for_share
from uploads.services.uploads import upload_for

log = logging.getLogger(__name__)

_TOKEN_SALT = "directdrivex.share.token"
_UNLOCK_SALT = "directdrivex.share.unlock"
# base64url of 32 bytes, unpadded: what token_for makes. Anything else is not looked up at all.
TOKEN_LENGTH = 43
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
# A password unlocks its link in one browser for this long at most (and never past the link's expiry).
UNLOCK_SECONDS = 12 * 3600
MAX_PASSWORD_LENGTH = 1024


def _token(nonce: str, secret) -> str:
    digest = salted_hmac(_TOKEN_SALT, nonce, secret=secret, algorithm="sha256").digest()
    return signing.b64_encode(digest).decode()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_for(link: ShareLink) -> str | None:
    """The link's token, to show its owner; None if SECRET_KEY changed since it was made (see the module docstring)."""
    for secret in (settings.SECRET_KEY, *settings.SECRET_KEY_FALLBACKS):
        token = _token(link.nonce, secret)
        if hmac.compare_digest(_hash(token), link.token_hash):
            return token
    return None


def share_max_seconds() -> int:
    return settings.DIRECTDRIVEX_SHARE_MAX_DAYS * 86400


def share_create(
    user, upload_id, *, expires_in: int | None = None, max_downloads: int | None = None, password: str = "", now=None
) -> tuple[ShareLink, str]:
    """A new link to the user's finished file, and its token (the URL's last part).

    404 for an upload that is not the user's, 409 not_complete for one that has
    not finished. ``expires_in`` seconds, at most DIRECTDRIVEX_SHARE_MAX_DAYS
    (the default); ``max_downloads`` at least 1 or None; ``password`` "" for none.
    """
    now = now or timezone.now()
    longest = share_max_seconds()
    expires_in = longest if expires_in is None else expires_in
    if not 1 <= expires_in <= longest:
        raise InvalidShare(
            f"expires_in must be between 1 and {longest} seconds ({settings.DIRECTDRIVEX_SHARE_MAX_DAYS} days)."
        )
    if max_downloads is not None and max_downloads < 1:
        raise InvalidShare("max_downloads must be at least 1, or left out for no limit.")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise InvalidShare(f"The password is longer than {MAX_PASSWORD_LENGTH} characters.")
    upload = upload_for(user, upload_id)
    if upload.status != Upload.Status.COMPLETE:
        raise NotComplete(f"The upload is {upload.status}: only a finished file can be shared.")
    nonce = secrets.token_hex(32)
    token = _token(nonce, settings.SECRET_KEY)
    with transaction.atomic():
        # Locked and read again: a DELETE of the file that got there first leaves nothing to share.
        if not Upload.objects.select_for_update().filter(pk=upload.pk, status=Upload.Status.COMPLETE).exists():
            raise NotComplete("The file was deleted or changed meanwhile: there is nothing to share.")
        link = ShareLink.objects.create(
            upload=upload,
            nonce=nonce,
            token_hash=_hash(token),
            password=make_password(password) if password else "",
            created_at=now,
            expires_at=now + timedelta(seconds=expires_in),
            max_downloads=max_downloads,
        )
        record(
            Event.SHARE_CREATED,
            share=link.pk,
            upload=upload.pk,
            user=user.pk,
            expires_at=link.expires_at.isoformat(),
            max_downloads=max_downloads,
            password=bool(password),
        )
    link.upload = upload
    return link, token


def shares_of(user, upload_id):
    """The links of the user's upload, newest first (404 for someone else's upload)."""
    upload = upload_for(user, upload_id)
    return upload.shares.select_related("upload").order_by("-created_at", "-pk")


def share_for(user, share_id) -> ShareLink:
    """The user's link; other users' links are indistinguishable from missing ones."""
    try:
        key = int(str(share_id))
    except ValueError:
        raise ShareNotFound() from None
    link = ShareLink.objects.select_related("upload").filter(pk=key, upload__owner=user).first()
    if link is None:
        raise ShareNotFound()
    return link


def share_revoke(user, share_id, *, now=None) -> ShareLink:
    """DELETE /api/shares/<id>/: the link opens nothing from now on, and its downloads in progress stop."""
    return share_revoke_link(share_for(user, share_id), reason="revoked", now=now)


def share_revoke_link(link: ShareLink, *, reason: str, now=None) -> ShareLink:
    """Revoke ``link`` (the owner through the API or a page, an admin): idempotent, the first time is recorded.

    The downloads streaming through the link lose their slots in the same
    transaction, and stop at their next block.
    """
    now = now or timezone.now()
    with transaction.atomic():
        revoked = ShareLink.objects.filter(pk=link.pk, revoked_at__isnull=True).update(revoked_at=now) == 1
        slots_revoke_for_share(link, Slot.ReleaseReason.RESET, NotUploading("The share link was revoked."), now=now)
        if revoked:
            record(Event.SHARE_REVOKED, share=link.pk, upload=link.upload_id, user=link.upload.owner_id, reason=reason)
    link.refresh_from_db(fields=["revoked_at"])
    return link


def share_open(token: str, *, now=None) -> ShareLink:
    """The link a visitor's token names, if it opens now; ShareNotFound, the same for every reason, if not."""
    now = now or timezone.now()
    if len(token) != TOKEN_LENGTH or not _TOKEN_CHARS.issuperset(token):
        raise ShareNotFound()
    hashed = _hash(token)
    link = ShareLink.objects.select_related("upload").filter(token_hash=hashed).first()
    # The index finds the row by hash; comparing again in constant time costs nothing and leaves
    # no timing difference between a near and a far guess to any lookup we add later.
    if link is None or not hmac.compare_digest(link.token_hash, hashed):
        raise ShareNotFound()
    if link.state(now) != "active" or link.upload.status != Upload.Status.COMPLETE:
        raise ShareNotFound()
    return link


def share_password_ok(link: ShareLink, password: str) -> bool:
    """Whether ``password`` is the link's. Slow by design (Django's hasher); the caller throttles the tries."""
    if len(password) > MAX_PASSWORD_LENGTH:
        return False
    return check_password(password, link.password)


def unlock_proof(link: ShareLink, now=None) -> tuple[str, int]:
    """A signed value saying "this browser gave the link's password", and for how many seconds it holds.

    Signed with a salt of the link's own hash, so that it opens no other link.
    """
    now = now or timezone.now()
    seconds = max(1, min(UNLOCK_SECONDS, int((link.expires_at - now).total_seconds())))
    return signing.dumps(link.pk, salt=f"{_UNLOCK_SALT}.{link.token_hash}"), seconds


def unlocked(link: ShareLink, proof: str | None) -> bool:
    """Whether the link can be used: it has no password, or ``proof`` is a valid unlock_proof for it."""
    if not link.password:
        return True
    if not proof:
        return False
    try:
        return signing.loads(proof, salt=f"{_UNLOCK_SALT}.{link.token_hash}", max_age=UNLOCK_SECONDS) == link.pk
    except signing.BadSignature:
        return False


def share_download_ended(link: ShareLink, *, sent: int, reached_end: bool, now=None) -> None:
    """Count a download through ``link``: its bytes always, one download if it sent the file's last byte.

    Atomic increments, so downloads ending together on several processes all count.
    """
    now = now or timezone.now()
    counted = ShareLink.objects.filter(pk=link.pk).update(
        downloads=F("downloads") + (1 if reached_end else 0), bytes_sent=F("bytes_sent") + sent, last_used_at=now
    )
    if not counted:
        return  # the file was deleted meanwhile, and its links with it: nothing left to count against
    record(
        Event.SHARE_USED,
        share=link.pk,
        upload=link.upload_id,
        user=link.upload.owner_id,
        sent=sent,
        counted=reached_end,
    )
