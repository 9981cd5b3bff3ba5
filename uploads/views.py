"""Page views (Django templates). They call the same services as the API."""

import logging
from dataclasses import dataclass

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login, user_logged_in, user_logged_out
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models import Prefetch
from django.dispatch import receiver
from django.http import Http404
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_http_methods, require_POST

from uploads import throttles
from uploads.exceptions import (
    DownloadSlotsExhausted,
    InvalidRequest,
    InvalidShare,
    NotComplete,
    ShareNotFound,
    UploadNotFound,
)
from uploads.forms import ShareForm, SignupForm
from uploads.models import ShareLink, Upload
from uploads.services.quota import QuotaSummary, quota_summary
from uploads.services.shares import share_create, share_revoke, token_for
from uploads.services.uploads import upload_delete, upload_for, uploads_of
from uploads.zips import zip_response

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


SHARE_STATES = {"active": "Active", "expired": "Expired", "revoked": "Revoked", "used_up": "Used up"}

# Every link of the page's uploads in one query, newest first (the order shares_of gives the API).
# The prefetch also sets each link's upload, which ShareLink.state reads for the file's size.
_LINKS_NEWEST_FIRST = Prefetch("shares", queryset=ShareLink.objects.order_by("-created_at", "-pk"))


@dataclass(frozen=True)
class ShareRow:
    """One share link of a file, as the my-files page shows it to its owner."""

    link: ShareLink
    # None once SECRET_KEY changed since the link was made: it still opens, but cannot be shown.
    url: str | None
    state: str

    @property
    def state_label(self) -> str:
        return SHARE_STATES[self.state]


@dataclass(frozen=True)
class FileRow:
    """One upload as the my-files page shows it."""

    upload: Upload
    # Rounded down: 100 only once every byte is durable.
    percent: int
    download_url: str
    # Only a finished file has links and a share form.
    shares: tuple[ShareRow, ...] = ()
    share_form: ShareForm | None = None


@dataclass(frozen=True)
class QuotaBar:
    """The quota bar's two segments, as SVG widths in percent of the bar ("12.34")."""

    used: str
    reserved: str


def _file_row(request, upload: Upload, now) -> FileRow:
    # Downloads are the API's (uploads.downloads): a session is enough to follow the link.
    percent, download_url = upload.offset * 100 // upload.size, reverse("api-upload-content", args=[upload.pk])
    if upload.status != Upload.Status.COMPLETE:
        return FileRow(upload, percent, download_url)
    shares = tuple(_share_row(request, link, now) for link in upload.shares.all())
    # Ids of the upload's own: each row has a share form, and a label must find its one input.
    form = ShareForm(auto_id=f"share-{upload.pk}-%s")
    return FileRow(upload, percent, download_url, shares, form)


def _share_row(request, link: ShareLink, now) -> ShareRow:
    token = token_for(link)
    url = request.build_absolute_uri(reverse("share", args=[token])) if token else None
    return ShareRow(link, url, link.state(now))


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
    """My files: the user's uploads newest first, 25 a page, with the quota they use and each finished file's links."""
    uploads = uploads_of(request.user).prefetch_related(_LINKS_NEWEST_FIRST)
    page = Paginator(uploads, FILES_PER_PAGE).get_page(request.GET.get("page"))
    quota = quota_summary(request.user)
    # One instant for the whole page: two links expiring together never show different states.
    now = timezone.now()
    context = {
        "page": page,
        "page_links": page.paginator.get_elided_page_range(page.number, on_each_side=2, on_ends=1),
        "rows": [_file_row(request, upload, now) for upload in page],
        "zip_url": reverse("files-zip"),
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


@login_required
@require_POST
def file_share(request, upload_id):
    """POST from My files: a new share link to a finished file. Every refusal comes back as a message there."""
    try:
        upload = upload_for(request.user, upload_id)
    except UploadNotFound:
        raise Http404("No such upload.") from None
    back = _files_url(_page_number(request.POST.get("page")))
    form = ShareForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"{upload.display_name} was not shared: {form.problems()}")
        return redirect(back)
    try:
        _link, token = share_create(
            request.user,
            upload.pk,
            expires_in=form.cleaned_data["days"] * 86400,
            max_downloads=form.cleaned_data["max_downloads"],
            password=form.cleaned_data["password"],
        )
    except UploadNotFound:
        # Deleted since upload_for above (another tab): the same 404 as if it had been gone already.
        raise Http404("No such upload.") from None
    except (InvalidShare, NotComplete) as refusal:
        messages.error(request, f"{upload.display_name} was not shared: {refusal.detail}")
        return redirect(back)
    url = request.build_absolute_uri(reverse("share", args=[token]))
    messages.success(request, f"Shared {upload.display_name}. Anyone with this link can download it: {url}")
    return redirect(back)


@login_required
@require_POST
def share_revoke_page(request, share_id):
    """POST from My files: the link stops opening (and its downloads in progress stop), as DELETE on the API does."""
    try:
        link = share_revoke(request.user, share_id)
    except ShareNotFound:
        raise Http404("No such share link.") from None
    messages.success(request, f"Revoked the link to {link.upload.display_name}; it no longer opens.")
    return redirect(_files_url(_page_number(request.POST.get("page"))))


# --- accounts ------------------------------------------------------------------------


@require_http_methods(["GET", "POST"])
def signup(request):
    """Create an account and sign in with it; the page does not exist unless DIRECTDRIVEX_SIGNUP is on."""
    if not settings.DIRECTDRIVEX_SIGNUP:
        raise Http404("Sign-up is closed.")
    if request.method == "POST":
        # Every form sent counts, not only the accounts made: a bot's failed forms cost it too.
        wait = throttles.SIGN_UP_BY_ADDRESS.wait(request, count_this_attempt=True)
        if wait:
            return throttles.throttled(request, throttles.SIGN_UP_BY_ADDRESS, wait)
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


# --- several files as one ZIP ---------------------------------------------------------------


@login_required
@require_http_methods(["GET"])
def files_zip(request):
    """GET ?id=…&id=… from My files: those finished files as one streamed ZIP (uploads.zips).

    Reached by the browser's navigation, so a refusal is a message back on My
    files, not an error page; only a lack of download slots is answered 429
    with Retry-After, as every download is, on a page saying how long to wait.
    """
    try:
        return zip_response(request.user, request.GET.getlist("id"))
    except DownloadSlotsExhausted as refusal:
        log.info("zip download refused user=%s: no download slot", request.user.pk)
        response = render(
            request, "uploads/zip_refused.html", {"detail": refusal.detail, "wait": refusal.retry_after}, status=429
        )
        response["Retry-After"] = str(refusal.retry_after)
        return response
    except (InvalidRequest, UploadNotFound, NotComplete) as refusal:
        log.info("zip download refused user=%s: %s", request.user.pk, refusal.code)
        messages.error(request, refusal.detail)
        # 303: the browser follows with a GET, and a reload does not ask for the ZIP again.
        response = redirect("files")
        response.status_code = 303
        return response
