"""Quota: how many bytes a user may store, and how many they use (finished files plus unfinished uploads).

Read by upload_create (which refuses what does not fit) and by the pages (the quota bar).
"""

from dataclasses import dataclass

from django.conf import settings
from django.db.models import Q, Sum

from uploads.models import Upload, UserQuota


def quota_limit(user) -> int:
    override = UserQuota.objects.filter(user=user).values_list("max_bytes", flat=True).first()
    return settings.DIRECTDRIVEX_USER_QUOTA if override is None else override


def quota_used(user) -> int:
    """Bytes of finished files plus the declared size of unfinished uploads."""
    used = Upload.objects.filter(owner=user).counting_toward_quota().aggregate(total=Sum("size"))["total"]
    return used or 0


@dataclass(frozen=True)
class QuotaSummary:
    """A user's quota in bytes: ``used`` by finished files, ``reserved`` by unfinished uploads, the rest ``free``."""

    limit: int
    used: int
    reserved: int

    @property
    def free(self) -> int:
        # A quota lowered below what is already stored leaves nothing free, not a negative number.
        return max(0, self.limit - self.used - self.reserved)


def quota_summary(user) -> QuotaSummary:
    """The quota as upload_create counts it (quota_used, quota_limit), split into finished and reserved bytes.

    One aggregate over the rows quota_used sums, so used + reserved always
    equals quota_used even while an upload completes between two reads.
    """
    counted = Upload.objects.filter(owner=user).counting_toward_quota()
    sums = counted.aggregate(
        used=Sum("size", filter=Q(status=Upload.Status.COMPLETE)),
        reserved=Sum("size", filter=Q(status=Upload.Status.UPLOADING)),
    )
    return QuotaSummary(limit=quota_limit(user), used=sums["used"] or 0, reserved=sums["reserved"] or 0)
