"""Page views (Django templates). They call the same services as the API."""

import functools
import ipaddress
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login, user_logged_in, user_logged_out, user_login_failed
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.dispatch import receiver
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods
from django_ratelimit.core import get_usage

from uploads.exceptions import UploadNotFound
from uploads.forms import SignupForm
from uploads.models import Upload
from uploads.services.quota import QuotaSummary, quota_summary
from uploads.services.uploads import upload_delete, upload_for, uploads_of

FILES_PER_PAGE = 25

log = logging.getLogger(__name__)


def home(request):
    return render(request, "uploads/home.html")


@login_required
def upload_page(request):
    """The uploader: its scripts read these limits from data attributes (no inline script, CSP-friendly)."""
    return render(
        request,
        "uploads/upload.html",
        {
            # How many files upload at once: the server's per-user slots, not a client constant.
            "slot_limit": settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS,
            "max_file_size": settings.DIRECTDRIVEX_MAX_FILE_SIZE,
        },
    )


# --- my files ----------------------------------------------------------------------


@dataclass(frozen=True)
class FileRow:
    """One upload as the my-files page shows it."""

    upload: Upload
    # Rounded down: 100 only once every byte is durable.
    percent: int
    download_url: str


@dataclass(frozen=True)
class QuotaBar:
    """The quota bar's two segments, as SVG widths in percent of the bar ("12.34")."""

    used: str
    reserved: str


def _file_row(upload: Upload) -> FileRow:
    # Downloads are the API's (uploads.downloads): a session is enough to follow the link.
    return FileRow(upload, upload.offset * 100 // upload.size, reverse("api-upload-content", args=[upload.pk]))


def _quota_bar(quota: QuotaSummary) -> QuotaBar:
    # Over quota (the limit was lowered), the bar is full and split in proportion.
    whole = max(quota.limit, quota.used + quota.reserved)
    if whole == 0:
        return QuotaBar("0", "0")
    return QuotaBar(f"{100 * quota.used / whole:.2f}", f"{100 * quota.reserved / whole:.2f}")


def _page_number(value) -> int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _files_url(page: int | None) -> str:
    return reverse("files") + (f"?page={page}" if page and page > 1 else "")


@login_required
def files(request):
    """My files: the user's uploads newest first, 25 a page, with the quota they use."""
    page = Paginator(uploads_of(request.user), FILES_PER_PAGE).get_page(request.GET.get("page"))
    quota = quota_summary(request.user)
    context = {
        "page": page,
        "page_links": page.paginator.get_elided_page_range(page.number, on_each_side=2, on_ends=1),
        "rows": [_file_row(upload) for upload in page],
        "quota": quota,
        "quota_bar": _quota_bar(quota),
    }
    return render(request, "uploads/files.html", context)


@login_required
@require_http_methods(["GET", "POST"])
def file_delete(request, upload_id):
    """GET asks for confirmation; POST deletes the file, or cancels an unfinished upload, as DELETE on the API does."""
    try:
        upload = upload_for(request.user, upload_id)
    except UploadNotFound:
        raise Http404("No such upload.") from None
    back = _page_number(request.POST.get("page") or request.GET.get("page"))
    if request.method == "GET":
        return render(request, "uploads/file_delete.html", {"upload": upload, "back": _files_url(back), "page": back})
    try:
        # Its only refusal is not_found (deleted meanwhile, e.g. from another tab): the same 404 as above.
        upload_delete(request.user, upload.pk)
    except UploadNotFound:
        raise Http404("No such upload.") from None
    # An unfinished upload stays listed as cancelled (its bytes are gone); anything else is gone with its row.
    if Upload.objects.filter(pk=upload.pk).exists():
        messages.success(request, f"Cancelled {upload.display_name}; its partial bytes are deleted.")
    elif upload.status in (Upload.Status.UPLOADING, Upload.Status.COMPLETE):
        messages.success(request, f"Deleted {upload.display_name}.")
    else:
        messages.success(request, f"Removed {upload.display_name} from your list.")
    return redirect(_files_url(back))


# --- accounts ------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
def signup(request):
    """Create an account and sign in with it; the page does not exist unless DIRECTDRIVEX_SIGNUP is on."""
    if not settings.DIRECTDRIVEX_SIGNUP:
        raise Http404("Sign-up is closed.")
    if request.method == "POST":
        # Every form sent counts, not only the accounts made: a bot's failed forms cost it too.
        wait = SIGN_UP_BY_ADDRESS.wait(request, count_this_attempt=True)
        if wait:
            return _throttled(request, SIGN_UP_BY_ADDRESS, wait)
    form = SignupForm(request.POST if request.method == "POST" else None)
    if form.is_valid():
        user = form.save()
        messages.success(request, f"Your account {user.username} is ready.")
        login(request, user)
        return redirect("files")
    return render(request, "registration/signup.html", {"form": form})


# django.contrib.auth's sign-in and sign-out views say nothing; these say it as
# messages on the next page. Connected when the URLconf imports this module,
# which Django does to resolve the first request, before any view runs.
# fail_silently: test clients' login() and force_login() pass a request without messages.


@receiver(user_logged_in, dispatch_uid="uploads.views.signed_in_message")
def _signed_in_message(sender, request, user, **kwargs):
    messages.success(request, f"Signed in as {user.get_username()}.", fail_silently=True)


@receiver(user_logged_out, dispatch_uid="uploads.views.signed_out_message")
def _signed_out_message(sender, request, user, **kwargs):
    if user is not None:
        messages.info(request, "You are signed out.", fail_silently=True)


# --- throttling of sign-in and sign-up ------------------------------------------------------
# django-ratelimit's counters in Django's cache: Redis when REDIS_URL is set, so every server
# process counts into the same fixed windows; without Redis, one process's memory (settings.CACHES).

MINUTE = 60
HOUR = 3600


def client_address(request) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy (DIRECTDRIVEX_TRUSTED_PROXIES).

    Behind one, the peer is the proxy itself for every client, so the address is taken from
    X-Forwarded-For, right to left, skipping the trusted proxies: the rightmost entries are the
    ones they appended (nginx's $proxy_add_x_forwarded_for), the ones further left anyone could
    have written. A malformed entry ends the walk at the last address known (a proxy's): never an
    address the client chose. django-ratelimit reads it through RATELIMIT_IP_META_KEY and groups
    IPv6 addresses by /64.
    """
    address = request.META["REMOTE_ADDR"]
    proxies = [ipaddress.ip_network(entry, strict=False) for entry in settings.DIRECTDRIVEX_TRUSTED_PROXIES]
    if not proxies:
        return address
    forwarded = [entry.strip() for entry in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    for hop in reversed(forwarded):
        if not any(ipaddress.ip_address(address) in network for network in proxies):
            break
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        address = hop
    return address


def _attempted_username(group, request) -> str:
    # As AuthenticationForm's UsernameField reads it, case-folded: "Alice" and "alice " are one count.
    return unicodedata.normalize("NFKC", request.POST.get("username", "")).strip().casefold()


@dataclass(frozen=True)
class Throttle:
    """At most ``setting`` attempts per ``period`` seconds for one ``key`` (django-ratelimit's key or function)."""

    group: str
    setting: str
    period: int
    key: str | Callable
    # Why the attempt is refused, for the throttled page.
    reason: str

    def _usage(self, request, *, increment: bool) -> dict | None:
        rate = (getattr(settings, self.setting), self.period)
        return get_usage(request, group=self.group, key=self.key, rate=rate, increment=increment)

    def count(self, request) -> None:
        self._usage(request, increment=True)

    def wait(self, request, *, count_this_attempt: bool) -> int:
        """Seconds until the next attempt is allowed: 0 if this one is.

        Counting first (``count_this_attempt``) refuses the attempt past the limit; without it, the
        attempt after ``setting`` counted ones. django-ratelimit answers a cache it could not count
        in with a limit of 0, so such an attempt is refused rather than let through uncounted.
        """
        usage = self._usage(request, increment=count_this_attempt)
        if usage is None:  # RATELIMIT_ENABLE = False
            return 0
        count, limit = usage["count"], usage["limit"]
        over = count > limit if count_this_attempt else count >= limit
        # time_left is the window's last second, which still counts: the next window starts after it.
        return max(1, usage["time_left"] + 1) if over else 0


SIGN_IN_BY_ADDRESS = Throttle(
    "sign-in-address",
    "DIRECTDRIVEX_LOGIN_ATTEMPTS",
    MINUTE,
    "ip",
    "Too many sign-ins from your network address failed.",
)
SIGN_IN_BY_USERNAME = Throttle(
    "sign-in-username",
    "DIRECTDRIVEX_LOGIN_USERNAME_ATTEMPTS",
    HOUR,
    _attempted_username,
    "Too many sign-ins with this username failed.",
)
SIGN_UP_BY_ADDRESS = Throttle(
    "sign-up-address",
    "DIRECTDRIVEX_SIGNUP_ATTEMPTS",
    HOUR,
    "ip",
    "Too many accounts were asked for from your network address.",
)


def _sign_in_throttles(request) -> list[Throttle]:
    # An empty username is not an account: all such attempts would otherwise share one count.
    return [SIGN_IN_BY_ADDRESS, SIGN_IN_BY_USERNAME] if _attempted_username(None, request) else [SIGN_IN_BY_ADDRESS]


def _wait_in_words(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    return f"{-(-seconds // 60)} minutes"


def _throttled(request, throttle: Throttle, wait: int):
    """The 429 page: why, how long to wait, and Retry-After saying the same."""
    log.warning("throttled", extra={"ddx": {"reason": throttle.group, "retry_after": wait}})
    context = {"reason": throttle.reason, "wait": _wait_in_words(wait)}
    response = render(request, "registration/throttled.html", context, status=429)
    response["Retry-After"] = str(wait)
    return response


def throttled_sign_in(view):
    """``view``, a sign-in form, refused with the 429 page while the client's address or the username
    has had too many failed sign-ins (counted by _count_failed_sign_in).

    Only failures count: a user who signs in after a few typos is not held up, and people signing
    in behind one shared address do not use up each other's attempts. An attempt is checked before
    it runs and counted once it failed, so a burst of attempts sent at once can exceed the limit by
    as many as the server runs at the same time (its threads), once per window.
    """

    @functools.wraps(view)
    def sign_in(request, *args, **kwargs):
        if request.method == "POST":
            for throttle in _sign_in_throttles(request):
                wait = throttle.wait(request, count_this_attempt=False)
                if wait:
                    return _throttled(request, throttle, wait)
        return view(request, *args, **kwargs)

    return sign_in


@receiver(user_login_failed, dispatch_uid="uploads.views.count_failed_sign_in")
def _count_failed_sign_in(sender, credentials, request=None, **kwargs):
    # Sent by authenticate() whichever form called it (this site's, the admin's); without a
    # request (a test client's login()) there is no address to count.
    if request is not None:
        for throttle in _sign_in_throttles(request):
            throttle.count(request)
