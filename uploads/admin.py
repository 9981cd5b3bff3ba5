"""Django admin for uploads, slots, share links and quotas: the rows, actions through the services, the dashboard.

Upload, Slot and ShareLink rows change only through the services (uploads.services).
The admin has no add form, no change form that saves (a full-row save writes
back every column as it was read, and could roll back an offset commit or a
release that landed in between) and no default delete (a bare row delete would
leave the bytes on disk and skip the fencing): the actions below do all of it,
each through the same service as the API or the command. Each action needs the
model's Django permission (change_* to release, reset, cancel, expire or revoke,
delete_upload to delete), so a staff member with view permission only can look
but not act. A share link's secrets (its nonce, token hash and password hash)
are never shown: with the nonce and SECRET_KEY anyone could rebuild the link.

The operations dashboard (``admin:uploads_dashboard``) lives under the Slot
admin's URLs, so admin_view makes it staff-only like every admin page; its data
comes from uploads.ops.dashboard, and its release button calls slots_reset.
"""

from datetime import timedelta

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.serializers.json import DjangoJSONEncoder
from django.http import HttpResponseRedirect, JsonResponse
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince
from django.views.decorators.http import require_GET, require_POST

from uploads.exceptions import UploadNotFound
from uploads.models import ShareLink, Slot, Upload, UserQuota
from uploads.ops import dashboard
from uploads.services.shares import share_revoke_link
from uploads.services.slots import slots_reap, slots_reset
from uploads.services.uploads import upload_delete, upload_end

MiB = 1024 * 1024

# The dashboard's sections, in page order: each is one template under
# admin/uploads/dashboard/, rendered alike into the page and into the JSON that
# dashboard.js swaps in, so the page needs no second renderer in JavaScript.
DASHBOARD_SECTIONS = ["slots", "stuck", "in_progress", "users", "releases", "disk", "fsck"]

# The default site's index gets a link to the dashboard (the template extends Django's own index).
admin.site.index_template = "admin/directdrivex_index.html"


def rate(bytes_per_second: int | None) -> str:
    return "-" if bytes_per_second is None else f"{bytes_per_second / MiB:.1f} MiB/s"


def upload_link(upload: Upload | None) -> str:
    """The upload's name, linking to its admin page."""
    if upload is None:
        return "-"
    url = reverse("admin:uploads_upload_change", args=[upload.pk])
    return format_html('<a href="{}">{}</a>', url, upload.display_name)


class ServicesOnlyAdmin(admin.ModelAdmin):
    """View-only rows: every change goes through an action, hence through a service."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        # Also removes Django's site-wide `delete_selected` action from this model.
        return False

    def _may(self, request, action: str) -> bool:
        return request.user.has_perm(f"{self.opts.app_label}.{action}_{self.opts.model_name}")


class SlotStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [
            ("active", "active (lease valid)"),
            ("stuck", "stuck (lease expired, not yet reclaimed)"),
            ("released", "released"),
        ]

    def queryset(self, request, queryset):
        now = timezone.now()
        return {
            "active": queryset.live(now),
            "stuck": queryset.stuck(now),
            "released": queryset.released(),
        }.get(self.value(), queryset)


class UploadActivityFilter(admin.SimpleListFilter):
    title = "activity"
    parameter_name = "activity"

    def lookups(self, request, model_admin):
        return [
            ("receiving", "receiving bytes now"),
            ("holding", "holding an upload slot"),
            ("idle", "unfinished, no slot (waiting to resume or expire)"),
        ]

    def queryset(self, request, queryset):
        holding = Slot.objects.active().filter(kind=Slot.Kind.UPLOAD).values("upload_id")
        if self.value() == "receiving":
            fresh = timezone.now() - timedelta(seconds=dashboard.THROUGHPUT_FRESH_SECONDS)
            return queryset.unfinished().filter(last_activity_at__gte=fresh, bytes_per_second__gt=0)
        if self.value() == "holding":
            return queryset.filter(pk__in=holding)
        if self.value() == "idle":
            return queryset.unfinished().exclude(pk__in=holding)
        return queryset


class YesNoFilter(admin.SimpleListFilter):
    """A yes/no question about a share link, answered by ``matching(queryset, now)``."""

    def lookups(self, request, model_admin):
        return [("yes", "yes"), ("no", "no")]

    def matching(self, queryset, now):
        raise NotImplementedError

    def queryset(self, request, queryset):
        if self.value() not in ("yes", "no"):
            return queryset
        matching = self.matching(queryset, timezone.now())
        return matching if self.value() == "yes" else queryset.exclude(pk__in=matching.values("pk"))


class ShareRevokedFilter(YesNoFilter):
    title = "revoked"
    parameter_name = "revoked"

    def matching(self, queryset, now):
        return queryset.filter(revoked_at__isnull=False)


class ShareExpiredFilter(YesNoFilter):
    # Past its expiry, whether or not it was revoked first: the two filters combine.
    title = "expired"
    parameter_name = "expired"

    def matching(self, queryset, now):
        return queryset.filter(expires_at__lte=now)


@admin.register(Slot)
class SlotAdmin(ServicesOnlyAdmin):
    list_display = [
        "id",
        "kind",
        "user",
        "file",
        "file_size",
        "progress",
        "throughput",
        "state",
        "acquired_at",
        "last_renewal",
        "lease_expires_at",
        "stuck_for",
        "holder",
        "generation",
        "released_at",
        "release_reason",
        "share_link",
    ]
    list_filter = [SlotStateFilter, "kind", "release_reason", ("user", admin.RelatedOnlyFieldListFilter)]
    # "=id" is an exact match on the slot number; "upload__id" finds an upload by (part of) its UUID.
    search_fields = ["=id", "user__username", "upload__id", "upload__display_name", "holder_channel", "holder_process"]
    list_select_related = ["user", "upload"]
    actions = ["release_selected", "reset_users_slots", "reap_expired"]
    # The view page lists every column, the non-editable ones too, and what is derived from them.
    readonly_fields = [f.name for f in Slot._meta.fields] + ["state", "last_renewal", "stuck_for", "holder"]

    def has_release_permission(self, request):
        return self._may(request, "change")

    # --- columns -------------------------------------------------------------------

    @admin.display(description="state")
    def state(self, slot):
        return dashboard.slot_state(slot, timezone.now())

    @admin.display(description="file", ordering="upload__display_name")
    def file(self, slot):
        return upload_link(slot.upload)

    @admin.display(description="share", ordering="share")
    def share_link(self, slot):
        """The share link a download goes through (by id: no query per row), "-" for the owner's own."""
        if slot.share_id is None:
            return "-"
        url = reverse("admin:uploads_sharelink_change", args=[slot.share_id])
        return format_html('<a href="{}">#{}</a>', url, slot.share_id)

    @admin.display(description="size", ordering="upload__size")
    def file_size(self, slot):
        return "-" if slot.upload is None else slot.upload.size

    @admin.display(description="progress")
    def progress(self, slot):
        if slot.upload is None or slot.kind != Slot.Kind.UPLOAD:
            return "-"
        return f"{dashboard.progress_percent(slot.upload):.1f}%"

    @admin.display(description="throughput")
    def throughput(self, slot):
        # Only a live upload slot's rate is this slot's: once released, the upload may have a new writer.
        if slot.upload is None or slot.kind != Slot.Kind.UPLOAD or slot.released_at is not None:
            return "-"
        current = dashboard.current_throughput(slot.upload, timezone.now())
        return "idle" if current is None else rate(current)

    @admin.display(description="last renewal", ordering="lease_expires_at")
    def last_renewal(self, slot):
        return dashboard.last_renewal(slot)

    @admin.display(description="stuck for", ordering="lease_expires_at")
    def stuck_for(self, slot):
        seconds = dashboard.stuck_seconds(slot, timezone.now())
        return "-" if seconds is None else f"{seconds} s"

    @admin.display(description="holder (process / connection)")
    def holder(self, slot):
        if not (slot.holder_process or slot.holder_channel):
            return "reserved, no connection yet" if slot.released_at is None else "-"
        return format_html("{}<br><small>{}</small>", slot.holder_process or "?", slot.holder_channel or "-")

    # --- actions -------------------------------------------------------------------

    @admin.action(description="Release (reset) selected slots and stop their connections", permissions=["release"])
    def release_selected(self, request, queryset):
        released = slots_reset(ids=list(queryset.values_list("pk", flat=True)))
        self._report_released(request, released)

    @admin.action(description="Reset every slot of the selected slots' users", permissions=["release"])
    def reset_users_slots(self, request, queryset):
        users = {slot.user for slot in queryset.select_related("user")}
        released = []
        for user in sorted(users, key=lambda u: u.pk):
            released += slots_reset(user=user)
        names = ", ".join(sorted(user.get_username() for user in users))
        self._report_released(request, released, f" of {names}" if names else "")

    @admin.action(description="Reap every slot whose lease expired", permissions=["release"])
    def reap_expired(self, request, queryset):
        reaped = slots_reap()
        self.message_user(request, f"Reaped {len(reaped)} stuck slot(s).", messages.SUCCESS)

    def _report_released(self, request, released: list[Slot], whose: str = "") -> None:
        connected = sum(1 for slot in released if slot.holder_channel)
        text = f"Released {len(released)} slot(s){whose}."
        if connected:
            # The consumers close with 4410 lease_lost; clients resume from the durable offset.
            text += f" {connected} live connection(s) were told to stop (4410 lease_lost); their clients resume."
        self.message_user(request, text, messages.SUCCESS if released else messages.WARNING)

    # --- the dashboard -----------------------------------------------------------------

    def get_urls(self):
        # admin_view: staff only (others go to the login page), CSRF-protected, and never_cache,
        # so neither the page nor its JSON is ever answered from a browser or proxy cache.
        view = self.admin_site.admin_view
        return [
            path("dashboard/", view(require_GET(self.dashboard_view)), name="uploads_dashboard"),
            path("dashboard/data/", view(require_GET(self.dashboard_data_view)), name="uploads_dashboard_data"),
            path(
                "dashboard/release/", view(require_POST(self.dashboard_release_view)), name="uploads_dashboard_release"
            ),
            *super().get_urls(),
        ]

    def _dashboard_context(self, request) -> dict:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return {
            "dashboard": dashboard.dashboard_snapshot(),
            "may_release": self.has_release_permission(request),
            "opts": self.opts,
        }

    @staticmethod
    def _section_template(name: str) -> str:
        return f"admin/uploads/dashboard/{name}.html"

    def dashboard_view(self, request):
        page = {
            **self.admin_site.each_context(request),
            **self._dashboard_context(request),
            "title": "Operations dashboard",
            "section_templates": [(name, self._section_template(name)) for name in DASHBOARD_SECTIONS],
        }
        return TemplateResponse(request, "admin/uploads/dashboard.html", page)

    def dashboard_data_view(self, request):
        """The dashboard's data, and each section rendered, for dashboard.js to swap in."""
        context = self._dashboard_context(request)
        html = {
            name: render_to_string(self._section_template(name), context, request=request)
            for name in DASHBOARD_SECTIONS
        }
        return JsonResponse({**context["dashboard"], "html": html}, encoder=DjangoJSONEncoder)

    @staticmethod
    def _slot_ids(values) -> list[int]:
        ids = set()
        for value in values:
            try:
                number = int(value)
            except (TypeError, ValueError):
                continue  # not a slot number: nothing to release
            # Nor is a number no slot's primary key can be (a BigAutoField: 1 .. 2**63 - 1);
            # SQLite cannot even bind one beyond 64 bits, and the release would answer 500.
            if 1 <= number < 2**63:
                ids.add(number)
        return sorted(ids)

    def dashboard_release_view(self, request):
        """One click on the dashboard: release the given slots (slots_reset, as the action and the command do)."""
        if not self.has_release_permission(request):
            raise PermissionDenied
        ids = self._slot_ids(request.POST.getlist("slot"))
        if not ids:
            self.message_user(request, "No slot was chosen.", messages.WARNING)
        else:
            released = slots_reset(ids=ids)
            self._report_released(request, released)
            if len(released) < len(ids):
                already = len(ids) - len(released)
                self.message_user(request, f"{already} slot(s) had been released already.", messages.INFO)
        return HttpResponseRedirect(reverse("admin:uploads_dashboard"))


class ShareLinkInline(admin.TabularInline):
    """The upload's share links on its page, read-only; the link's own page has the revoke action."""

    model = ShareLink
    # Listed by name: the inline would otherwise show every form field, and the secrets must never be.
    fields = readonly_fields = ["created_at", "expires_at", "downloads", "bytes_sent", "state", "revoked_at"]
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        # state() reads the file's size: one query for all the links, not one per link.
        return super().get_queryset(request).select_related("upload")

    @admin.display(description="state")
    def state(self, link):
        return link.state(timezone.now())


@admin.register(Upload)
class UploadAdmin(ServicesOnlyAdmin):
    list_display = [
        "id",
        "display_name",
        "owner",
        "size",
        "status",
        "progress",
        "throughput",
        "average_rate",
        "age",
        "created_at",
        "last_activity_at",
    ]
    list_filter = ["status", UploadActivityFilter, ("owner", admin.RelatedOnlyFieldListFilter), "created_at"]
    search_fields = ["id", "display_name", "owner__username", "storage_key"]
    list_select_related = ["owner"]
    actions = ["cancel_selected", "expire_selected", "delete_selected_uploads"]
    readonly_fields = [f.name for f in Upload._meta.fields]
    inlines = [ShareLinkInline]

    def has_cancel_permission(self, request):
        return self._may(request, "change")

    def has_delete_uploads_permission(self, request):
        return self._may(request, "delete")

    @admin.display(description="progress")
    def progress(self, upload):
        return f"{dashboard.progress_percent(upload):.1f}%"

    @admin.display(description="throughput")
    def throughput(self, upload):
        """Bytes per second over the last offset commit, while bytes are arriving."""
        if upload.status != Upload.Status.UPLOADING:
            return "-"
        current = dashboard.current_throughput(upload, timezone.now())
        return "idle" if current is None else rate(current)

    @admin.display(description="average rate")
    def average_rate(self, upload):
        """Durable bytes per second from creation to the last byte: pauses count, so it is a floor."""
        seconds = (upload.last_activity_at - upload.created_at).total_seconds()
        if upload.offset == 0 or seconds <= 0:
            return "-"
        return rate(round(upload.offset / seconds))

    @admin.display(description="age", ordering="created_at")
    def age(self, upload):
        return timesince(upload.created_at)

    def _end_selected(self, request, queryset, status: str, reason: str, verb: str) -> None:
        ended = sum(upload_end(u, status, reason) for u in queryset.unfinished())
        skipped = queryset.count() - ended
        self.message_user(request, f"{verb} {ended} upload(s).", messages.SUCCESS if ended else messages.WARNING)
        if skipped:
            self.message_user(request, f"{skipped} selected upload(s) were not unfinished; left alone.", messages.INFO)

    @admin.action(description="Cancel selected unfinished uploads", permissions=["cancel"])
    def cancel_selected(self, request, queryset):
        self._end_selected(request, queryset, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED, "Cancelled")

    @admin.action(
        description="Expire selected unfinished uploads now (slot freed, partial bytes deleted)",
        permissions=["cancel"],
    )
    def expire_selected(self, request, queryset):
        # What `uploads expire` does to an upload idle past DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS, without the wait.
        self._end_selected(request, queryset, Upload.Status.EXPIRED, Slot.ReleaseReason.EXPIRED, "Expired")

    @admin.action(
        description="Delete selected uploads and their files (unfinished ones are cancelled first)",
        permissions=["delete_uploads"],
    )
    def delete_selected_uploads(self, request, queryset):
        # The very service behind DELETE /api/uploads/<id>/, as the owner would call it:
        # an unfinished upload is cancelled (slot freed, writer closed, part file gone)
        # and its row kept as `cancelled`; anything else loses its row and its file.
        deleted = cancelled = gone = 0
        for upload in queryset.select_related("owner"):
            try:
                upload_delete(upload.owner, upload.pk)
            except UploadNotFound:
                gone += 1  # deleted meanwhile by its owner or another admin
                continue
            if upload.status == Upload.Status.UPLOADING:
                cancelled += 1
            else:
                deleted += 1
        self.message_user(request, f"Deleted {deleted} upload(s) and their files.", messages.SUCCESS)
        if cancelled:
            self.message_user(
                request,
                f"Cancelled {cancelled} unfinished upload(s) and deleted their partial files; "
                "their rows stay as cancelled (run the action again to remove them).",
                messages.SUCCESS,
            )
        if gone:
            self.message_user(request, f"{gone} upload(s) were already gone.", messages.WARNING)


@admin.register(ShareLink)
class ShareLinkAdmin(ServicesOnlyAdmin):
    """Share links of every user: what each gave out and how much went through it; revoking goes through the service."""

    list_display = [
        "id",
        "owner",
        "file",
        "created_at",
        "expires_at",
        "downloads_of",
        "bytes_sent",
        "has_password",
        "state",
        "revoked_at",
    ]
    list_filter = [ShareRevokedFilter, ShareExpiredFilter, "created_at"]
    # "=id" is an exact match on the link's number (the API's share id).
    search_fields = ["=id", "upload__owner__username", "upload__display_name"]
    list_select_related = ["upload__owner"]
    actions = ["revoke_selected"]
    # Listed by name, not taken from the model: nonce, token_hash and password stay off every page.
    fields = readonly_fields = [
        "id",
        "owner",
        "file",
        "created_at",
        "expires_at",
        "max_downloads",
        "downloads",
        "bytes_sent",
        "last_used_at",
        "has_password",
        "state",
        "revoked_at",
    ]

    def has_revoke_permission(self, request):
        return self._may(request, "change")

    @admin.display(description="owner", ordering="upload__owner__username")
    def owner(self, link):
        return link.upload.owner.get_username()

    @admin.display(description="file", ordering="upload__display_name")
    def file(self, link):
        return upload_link(link.upload)

    @admin.display(description="downloads", ordering="downloads")
    def downloads_of(self, link):
        return link.downloads if link.max_downloads is None else f"{link.downloads} of {link.max_downloads}"

    @admin.display(description="password", boolean=True)
    def has_password(self, link):
        return bool(link.password)

    @admin.display(description="state")
    def state(self, link):
        return link.state(timezone.now())

    @admin.action(description="Revoke selected links", permissions=["revoke"])
    def revoke_selected(self, request, queryset):
        # Through the service for every link, revoked already or not: it is idempotent, and it
        # also stops the downloads still streaming through a link.
        now = timezone.now()
        revoked = already = 0
        for link in queryset.select_related("upload"):
            share_revoke_link(link, reason="admin", now=now)
            # Ours if it carries our time; another admin or the owner may have revoked it meanwhile.
            if link.revoked_at == now:
                revoked += 1
            else:
                already += 1
        self.message_user(
            request, f"Revoked {revoked} share link(s).", messages.SUCCESS if revoked else messages.WARNING
        )
        if already:
            self.message_user(request, f"{already} selected link(s) had been revoked already.", messages.INFO)


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    list_display = ["user", "max_bytes"]
    search_fields = ["user__username"]
    autocomplete_fields = ["user"]
