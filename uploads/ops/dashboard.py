"""The operations dashboard's data: read-only queries that say who holds the slots, which are stuck, and why.

Nothing here changes a row: the dashboard's one action (release) goes through
uploads.services.slots.slots_reset, like the admin action and `manage.py slots reset`.
Every list is capped, so one refresh costs a handful of indexed queries
whatever the size of the deployment; the page is polled every
REFRESH_SECONDS by every open dashboard.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.utils import timezone

from uploads import storage
from uploads.models import FsckRun, Slot, Upload, UserQuota
from uploads.services.slots import lease_duration, slot_limits

# How often dashboard.js asks for fresh data (the page's data-refresh-seconds).
REFRESH_SECONDS = 2
# A writer commits its offset (and Upload.bytes_per_second) about once a second
# while bytes flow; five seconds without a commit means the bytes stopped, and
# the last rate says nothing about now.
THROUGHPUT_FRESH_SECONDS = 5
# Caps on the lists: a dashboard that answers in milliseconds beats one that lists everything.
STUCK_LIMIT = 100
IN_PROGRESS_LIMIT = 50
USERS_LIMIT = 50
RELEASES_LIMIT = 20
FINDINGS_LIMIT = 50


def current_throughput(upload: Upload, now: datetime) -> int | None:
    """Bytes per second over the upload's last offset commit, or None if no bytes arrived lately."""
    if upload.status != Upload.Status.UPLOADING or upload.bytes_per_second <= 0:
        return None
    if now - upload.last_activity_at > timedelta(seconds=THROUGHPUT_FRESH_SECONDS):
        return None
    return upload.bytes_per_second


def progress_percent(upload: Upload) -> float:
    return round(100 * upload.offset / upload.size, 1) if upload.size else 0.0


def last_renewal(slot: Slot) -> datetime:
    """When the holder last renewed: no column keeps it, but every renewal sets expiry = now + lease."""
    return max(slot.acquired_at, slot.lease_expires_at - lease_duration())


def stuck_seconds(slot: Slot, now: datetime) -> int | None:
    """How long an active slot's lease has been expired (not yet reclaimed); None if it is not stuck."""
    if slot.released_at is not None or slot.lease_expires_at > now:
        return None
    return int((now - slot.lease_expires_at).total_seconds())


def slot_state(slot: Slot, now: datetime) -> str:
    if slot.released_at is not None:
        return "released"
    return "stuck" if slot.lease_expires_at <= now else "active"


@dataclass(frozen=True)
class DiskUsage:
    """The storage folder as the database accounts for it, against the filesystem that holds it.

    Sums come from the rows, not from walking the folder (a walk of a big tree
    every refresh is costly): ``finished`` are the sizes of complete uploads,
    ``partial`` the durable offsets of unfinished ones, ``to_come`` what those
    still need. Files the rows do not know about are `uploads fsck`'s business.
    """

    path: str
    finished: int
    partial: int
    to_come: int
    # The filesystem's room (local); None where the store does not say (a bucket).
    total: int | None
    used: int | None
    free: int | None

    @property
    def stored(self) -> int:
        return self.finished + self.partial


def disk_usage() -> DiskUsage:
    where = storage.backend()
    sums = Upload.objects.aggregate(
        finished=Sum("size", filter=Q(status=Upload.Status.COMPLETE)),
        partial=Sum("offset", filter=Q(status=Upload.Status.UPLOADING)),
        declared=Sum("size", filter=Q(status=Upload.Status.UPLOADING)),
    )
    partial = sums["partial"] or 0
    filesystem = where.capacity()
    return DiskUsage(
        path=where.describe(),
        finished=sums["finished"] or 0,
        partial=partial,
        to_come=(sums["declared"] or 0) - partial,
        total=filesystem.total if filesystem else None,
        used=filesystem.used if filesystem else None,
        free=filesystem.free if filesystem else None,
    )


def _slot_row(slot: Slot, now: datetime) -> dict:
    upload = slot.upload
    row = {
        "id": slot.pk,
        "kind": slot.kind,
        "user": slot.user.get_username(),
        "upload": str(upload.pk) if upload else None,
        "filename": upload.display_name if upload else "",
        "size": upload.size if upload else None,
        "acquired_at": slot.acquired_at,
        "last_renewal": last_renewal(slot),
        "lease_expires_at": slot.lease_expires_at,
        "stuck_seconds": stuck_seconds(slot, now),
        "generation": slot.generation,
        "holder_process": slot.holder_process,
        "holder_channel": slot.holder_channel,
        "state": slot_state(slot, now),
    }
    if slot.released_at is not None:
        row["released_at"] = slot.released_at
        row["release_reason"] = slot.release_reason
        row["release_reason_label"] = slot.get_release_reason_display()
    return row


def slot_counts(now: datetime) -> dict:
    """Per kind: the global limit (and the per-user one), active slots, and how many of them are stuck."""
    counts = {
        row["kind"]: row
        for row in Slot.objects.active()
        .values("kind")
        .annotate(active=Count("pk"), stuck=Count("pk", filter=Q(lease_expires_at__lte=now)))
    }
    result = {}
    for kind in Slot.Kind.values:
        limits = slot_limits(kind)
        active = counts.get(kind, {}).get("active", 0)
        stuck = counts.get(kind, {}).get("stuck", 0)
        result[kind] = {
            "limit": limits.global_limit,
            "user_limit": limits.user_limit,
            "active": active,
            "stuck": stuck,
            "live": active - stuck,
            "free": max(0, limits.global_limit - active),
        }
    return result


def per_user_usage(now: datetime) -> list[dict]:
    """Users holding slots or with unfinished uploads: their slots against the limits, and their storage."""
    held = (
        Slot.objects.active()
        .values("user_id", "user__username")
        .annotate(
            upload=Count("pk", filter=Q(kind=Slot.Kind.UPLOAD)),
            download=Count("pk", filter=Q(kind=Slot.Kind.DOWNLOAD)),
            stuck=Count("pk", filter=Q(lease_expires_at__lte=now)),
        )
    )
    users = {row["user_id"]: {**row, "unfinished": 0} for row in held}
    unfinished = Upload.objects.unfinished().values("owner_id", "owner__username").annotate(n=Count("pk"))
    for row in unfinished:
        empty = {"user_id": row["owner_id"], "user__username": row["owner__username"], "upload": 0, "download": 0}
        entry = users.setdefault(row["owner_id"], {**empty, "stuck": 0})
        entry["unfinished"] = row["n"]

    def busiest(u):
        return -(u["upload"] + u["download"]), -u["unfinished"], u["user__username"]

    ranked = sorted(users.values(), key=busiest)[:USERS_LIMIT]
    ids = [u["user_id"] for u in ranked]
    stored = {
        row["owner_id"]: row
        for row in Upload.objects.filter(owner_id__in=ids)
        .values("owner_id")
        .annotate(
            used=Sum("size", filter=Q(status=Upload.Status.COMPLETE)),
            reserved=Sum("size", filter=Q(status=Upload.Status.UPLOADING)),
        )
    }
    quotas = dict(UserQuota.objects.filter(user_id__in=ids).values_list("user_id", "max_bytes"))
    upload_limit, download_limit = slot_limits(Slot.Kind.UPLOAD).user_limit, slot_limits(Slot.Kind.DOWNLOAD).user_limit
    return [
        {
            "user": u["user__username"],
            "user_id": u["user_id"],
            "upload_slots": u["upload"],
            "upload_slot_limit": upload_limit,
            "download_slots": u["download"],
            "download_slot_limit": download_limit,
            "stuck_slots": u["stuck"],
            "unfinished_uploads": u["unfinished"],
            "stored_bytes": stored.get(u["user_id"], {}).get("used") or 0,
            "reserved_bytes": stored.get(u["user_id"], {}).get("reserved") or 0,
            "quota_bytes": quotas.get(u["user_id"], settings.DIRECTDRIVEX_USER_QUOTA),
        }
        for u in ranked
    ]


def stuck_slots(now: datetime) -> tuple[list[dict], int]:
    """Active slots whose lease ran out, longest stuck first (at most STUCK_LIMIT), and how many there are."""
    stuck = Slot.objects.stuck(now)
    rows = stuck.select_related("user", "upload").order_by("lease_expires_at", "pk")[:STUCK_LIMIT]
    return [_slot_row(slot, now) for slot in rows], stuck.count()


def uploads_in_progress(now: datetime) -> tuple[list[dict], int]:
    """Uploads that hold an upload slot (connected or reserved), most recently active first, and their count."""
    held = Slot.objects.active().filter(kind=Slot.Kind.UPLOAD, upload__isnull=False)
    rows = held.select_related("user", "upload").order_by("-upload__last_activity_at", "pk")[:IN_PROGRESS_LIMIT]
    result = []
    for slot in rows:
        upload = slot.upload
        result.append(
            {
                **_slot_row(slot, now),
                "offset": upload.offset,
                "progress_percent": progress_percent(upload),
                "bytes_per_second": current_throughput(upload, now),
                "last_activity_at": upload.last_activity_at,
                "idle_seconds": max(0, int((now - upload.last_activity_at).total_seconds())),
                "connected": bool(slot.holder_channel),
            }
        )
    return result, held.count()


def recent_releases(now: datetime) -> list[dict]:
    """The last RELEASES_LIMIT slot releases, newest first, with their reasons."""
    rows = Slot.objects.released().select_related("user", "upload").order_by("-released_at", "-pk")[:RELEASES_LIMIT]
    return [_slot_row(slot, now) for slot in rows]


def last_fsck() -> dict | None:
    """The newest `uploads fsck` run (written by the command): when, how, and what it found."""
    run = FsckRun.objects.order_by("-started_at").first()
    if run is None:
        return None
    findings = run.findings if isinstance(run.findings, list) else []
    by_kind: dict[str, int] = {}
    for finding in findings:
        kind = str(finding.get("kind", "?")) if isinstance(finding, dict) else "?"
        by_kind[kind] = by_kind.get(kind, 0) + 1
    return {
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "repair": run.repair,
        "verify": run.verify,
        "count": len(findings),
        "by_kind": dict(sorted(by_kind.items())),
        "findings": [f for f in findings[:FINDINGS_LIMIT] if isinstance(f, dict)],
    }


def dashboard_snapshot(now: datetime | None = None) -> dict:
    """Everything the dashboard shows, as plain values (datetimes included; the JSON view encodes them)."""
    now = now or timezone.now()
    stuck, stuck_total = stuck_slots(now)
    in_progress, in_progress_total = uploads_in_progress(now)
    disk = disk_usage()
    return {
        "generated_at": now,
        "refresh_seconds": REFRESH_SECONDS,
        "lease_seconds": int(lease_duration().total_seconds()),
        "slots": slot_counts(now),
        "users": per_user_usage(now),
        "stuck": stuck,
        "stuck_total": stuck_total,
        "in_progress": in_progress,
        "in_progress_total": in_progress_total,
        "recent_releases": recent_releases(now),
        "disk": {
            "path": disk.path,
            "finished_bytes": disk.finished,
            "partial_bytes": disk.partial,
            "to_come_bytes": disk.to_come,
            "stored_bytes": disk.stored,
            "filesystem_total_bytes": disk.total,
            "filesystem_used_bytes": disk.used,
            "filesystem_free_bytes": disk.free,
        },
        "fsck": last_fsck(),
    }
