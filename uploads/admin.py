"""Django admin for uploads, slots and quotas: a view of the rows, and actions that call the services.

Upload and Slot rows change only through uploads.transfers and uploads.slots.
The admin has no add form, no change form that saves (a full-row save writes
back every column as it was read, and could roll back an offset commit or a
release that landed in between) and no default delete (a bare row delete would
leave the bytes on disk and skip the fencing): the actions below do all of it,
each through the same service as the API or the command. Each action needs the
model's Django permission (change_* to release or cancel, delete_upload to
delete), so a staff member with view permission only can look but not act.
"""

from django.contrib import admin, messages
from django.utils import timezone
from django.utils.timesince import timesince

from uploads.exceptions import UploadNotFound
from uploads.models import Slot, Upload, UserQuota
from uploads.slots import slots_reap, slots_reset
from uploads.transfers import upload_delete, upload_end

MiB = 1024 * 1024


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
        return [("active", "active (lease valid)"), ("stuck", "stuck (lease expired)"), ("released", "released")]

    def queryset(self, request, queryset):
        now = timezone.now()
        return {
            "active": queryset.live(now),
            "stuck": queryset.stuck(now),
            "released": queryset.released(),
        }.get(self.value(), queryset)


@admin.register(Slot)
class SlotAdmin(ServicesOnlyAdmin):
    list_display = [
        "id",
        "kind",
        "user",
        "upload",
        "state",
        "acquired_at",
        "lease_expires_at",
        "generation",
        "holder_channel",
        "released_at",
        "release_reason",
    ]
    list_filter = [SlotStateFilter, "kind", "release_reason"]
    search_fields = ["user__username", "upload__id", "holder_channel"]
    list_select_related = ["user", "upload"]
    actions = ["release_selected", "reap_expired"]
    # The view page lists every column, the non-editable ones too.
    readonly_fields = [f.name for f in Slot._meta.fields]

    def has_release_permission(self, request):
        return self._may(request, "change")

    @admin.display(description="state")
    def state(self, slot):
        if slot.released_at:
            return "released"
        return "stuck" if slot.lease_expires_at <= timezone.now() else "active"

    @admin.action(description="Release (reset) selected slots and stop their connections", permissions=["release"])
    def release_selected(self, request, queryset):
        released = slots_reset(ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"Released {len(released)} slot(s).", messages.SUCCESS)

    @admin.action(description="Reap every slot whose lease expired", permissions=["release"])
    def reap_expired(self, request, queryset):
        reaped = slots_reap()
        self.message_user(request, f"Reaped {len(reaped)} stuck slot(s).", messages.SUCCESS)


@admin.register(Upload)
class UploadAdmin(ServicesOnlyAdmin):
    list_display = [
        "id",
        "display_name",
        "owner",
        "status",
        "progress",
        "average_rate",
        "age",
        "size",
        "created_at",
        "last_activity_at",
    ]
    list_filter = ["status", "created_at"]
    search_fields = ["id", "display_name", "owner__username", "storage_key"]
    list_select_related = ["owner"]
    actions = ["cancel_selected", "delete_selected_uploads"]
    readonly_fields = [f.name for f in Upload._meta.fields]

    def has_cancel_permission(self, request):
        return self._may(request, "change")

    def has_delete_uploads_permission(self, request):
        return self._may(request, "delete")

    @admin.display(description="progress")
    def progress(self, upload):
        return f"{100 * upload.offset / upload.size:.1f}%"

    @admin.display(description="average rate")
    def average_rate(self, upload):
        """Durable bytes per second from creation to the last byte: pauses count, so it is a floor."""
        seconds = (upload.last_activity_at - upload.created_at).total_seconds()
        if upload.offset == 0 or seconds <= 0:
            return "-"
        return f"{upload.offset / seconds / MiB:.1f} MiB/s"

    @admin.display(description="age", ordering="created_at")
    def age(self, upload):
        return timesince(upload.created_at)

    @admin.action(description="Cancel selected unfinished uploads", permissions=["cancel"])
    def cancel_selected(self, request, queryset):
        ended = sum(upload_end(u, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED) for u in queryset.unfinished())
        self.message_user(request, f"Cancelled {ended} upload(s).", messages.SUCCESS)

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


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    list_display = ["user", "max_bytes"]
    search_fields = ["user__username"]
    autocomplete_fields = ["user"]
