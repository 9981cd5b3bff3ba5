"""Django admin for uploads, slots and quotas. Actions call the same services as the commands."""

from django.contrib import admin, messages
from django.utils import timezone

from uploads.models import Slot, Upload, UserQuota
from uploads.slots import slots_reap, slots_reset
from uploads.transfers import upload_end


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
class SlotAdmin(admin.ModelAdmin):
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
    # Slot rows change only through uploads.slots: the admin shows and acts, never edits.
    readonly_fields = [f.name for f in Slot._meta.fields]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="state")
    def state(self, slot):
        if slot.released_at:
            return "released"
        return "stuck" if slot.lease_expires_at <= timezone.now() else "active"

    @admin.action(description="Release (reset) selected slots and stop their connections")
    def release_selected(self, request, queryset):
        released = slots_reset(ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"Released {len(released)} slot(s).", messages.SUCCESS)

    @admin.action(description="Reap every slot whose lease expired")
    def reap_expired(self, request, queryset):
        reaped = slots_reap()
        self.message_user(request, f"Reaped {len(reaped)} stuck slot(s).", messages.SUCCESS)


@admin.register(Upload)
class UploadAdmin(admin.ModelAdmin):
    list_display = ["id", "display_name", "owner", "status", "progress", "size", "created_at", "last_activity_at"]
    list_filter = ["status", "created_at"]
    search_fields = ["id", "display_name", "owner__username", "storage_key"]
    list_select_related = ["owner"]
    readonly_fields = [f.name for f in Upload._meta.fields]
    actions = ["cancel_selected"]

    def has_add_permission(self, request):
        return False

    @admin.display(description="progress")
    def progress(self, upload):
        return f"{100 * upload.offset / upload.size:.1f}%"

    @admin.action(description="Cancel selected unfinished uploads")
    def cancel_selected(self, request, queryset):
        ended = sum(upload_end(u, Upload.Status.CANCELLED, Slot.ReleaseReason.CANCELLED) for u in queryset.unfinished())
        self.message_user(request, f"Cancelled {ended} upload(s).", messages.SUCCESS)


@admin.register(UserQuota)
class UserQuotaAdmin(admin.ModelAdmin):
    list_display = ["user", "max_bytes"]
    search_fields = ["user__username"]
    autocomplete_fields = ["user"]
