"""The public side of share links: ``/s/<token>`` (the page) and ``/s/<token>/download`` (the file).

Anyone with the token may use them; nobody needs an account. What a link
opens is decided by uploads.services.shares.share_open: an unknown,
expired, revoked or used-up link (or one whose file is gone) is the same
404 page, byte for byte, so a visitor learns nothing about links they were
not given. A password, where one is set, is asked for on the page; a right
one leaves a signed cookie scoped to the link's path, wrong ones are
throttled per client address and per link (uploads.throttles).

Every answer here carries ``Referrer-Policy: no-referrer`` (the token is
in the URL, and must not travel to another site in a Referer),
``X-Robots-Tag: noindex`` and no cache for the page. The token never
reaches a log line: uploads.logs masks it in every line, and these views
log the link's id.
"""

import logging

from django.http import HttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from uploads import throttles
from uploads.api_errors import json_error
from uploads.downloads import share_download_response
from uploads.exceptions import DirectDriveXError, ShareNotFound
from uploads.models import ShareLink
from uploads.services.shares import share_open, share_password_ok, unlock_proof, unlocked

log = logging.getLogger(__name__)

UNLOCK_COOKIE = "ddx_share_unlock"


def _private(response: HttpResponse, *, cache: bool = False) -> HttpResponse:
    response["Referrer-Policy"] = "no-referrer"
    response["X-Robots-Tag"] = "noindex, nofollow"
    if not cache:
        response["Cache-Control"] = "no-store"
    return response


def _missing(request) -> HttpResponse:
    """The one answer for every link that does not open: nothing in it depends on why."""
    return _private(render(request, "uploads/share_missing.html", status=404))


def _open(token: str) -> ShareLink | None:
    try:
        return share_open(token)
    except ShareNotFound:
        return None


# No CSRF check on the password form. With Referrer-Policy: no-referrer a browser sends the form
# with "Origin: null", which Django's check refuses: no password could ever be given. And a forged
# form gains nothing: it needs the link's token and its password, with which the forger can unlock
# the link in their own browser; making a victim's browser unlock it just sets a cookie for that
# one link there. Wrong tries count against the throttles whoever sends them.
@csrf_exempt
@require_http_methods(["GET", "HEAD", "POST"])
def share_page(request, token):
    """The file's name, size and sha256 with a download button; first the password form where one is set."""
    link = _open(token)
    if link is None:
        return _missing(request)
    request.share_id = link.pk  # the request's log line names the link (uploads.logs)
    if unlocked(link, request.COOKIES.get(UNLOCK_COOKIE)):
        return _private(render(request, "uploads/share.html", _context(link, token)))
    if request.method != "POST":
        return _private(render(request, "uploads/share_password.html", _context(link, token)))
    return _try_password(request, link, token)


def _try_password(request, link: ShareLink, token: str) -> HttpResponse:
    link_throttle = throttles.share_password_by_link(link)
    for throttle in (throttles.SHARE_PASSWORD_BY_ADDRESS, link_throttle):
        wait = throttle.wait(request, count_this_attempt=False)
        if wait:
            log.warning("share password throttled share=%s by=%s", link.pk, throttle.group)
            return _private(throttles.throttled(request, throttle, wait))
    if not share_password_ok(link, request.POST.get("password", "")):
        for throttle in (throttles.SHARE_PASSWORD_BY_ADDRESS, link_throttle):
            throttle.count(request)
        log.info("share password wrong share=%s", link.pk)
        context = {**_context(link, token), "wrong_password": True}
        return _private(render(request, "uploads/share_password.html", context, status=403))
    log.info("share unlocked share=%s", link.pk)
    proof, seconds = unlock_proof(link)
    # Post/redirect/get: a reload does not send the password again.
    response = redirect(reverse("share", args=[token]), permanent=False)
    response.status_code = 303
    response.set_cookie(
        UNLOCK_COOKIE,
        proof,
        max_age=seconds,
        # Only this link's page and download ever receive it.
        path=reverse("share", args=[token]),
        secure=request.is_secure(),
        httponly=True,
        samesite="Lax",
    )
    return _private(response)


def _context(link: ShareLink, token: str) -> dict:
    return {
        "link": link,
        "upload": link.upload,
        "download_url": reverse("share-download", args=[token]),
        "page_url": reverse("share", args=[token]),
        "downloads_left": None if link.max_downloads is None else max(0, link.max_downloads - link.downloads),
    }


@require_http_methods(["GET", "HEAD"])
def share_download(request, token):
    """The file, under the download contract (Range, If-Range, ETag, download slots, 429 + Retry-After)."""
    link = _open(token)
    if link is None:
        return _missing(request)
    request.share_id = link.pk
    if not unlocked(link, request.COOKIES.get(UNLOCK_COOKIE)):
        # Only someone holding the token gets here: saying that a password is needed reveals nothing.
        response = render(request, "uploads/share_password.html", _context(link, token), status=403)
        return _private(response)
    try:
        response = share_download_response(link, request.headers, head=request.method == "HEAD")
    except DirectDriveXError as refusal:
        # 416 with Content-Range, 429 with Retry-After, 503: as the API answers them, in JSON.
        response = json_error(refusal)
    # The file's bytes never change: a browser may keep them (private, as for the owner's download).
    return _private(response, cache=True)
