"""Uploads, the upload/download slots that admit them, and per-user quota overrides.

Slot invariants live in the database, not in Python: partial unique
constraints over *active* slots (``released_at IS NULL``) make
"at most N slots" a matter of "at most N distinct indexes", which holds on
PostgreSQL and SQLite alike and across any number of processes.
"""

import secrets
import uuid

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone


def new_storage_key() -> str:
    """A random on-disk name: never derived from the user's filename."""
    return secrets.token_hex(16)


class UploadQuerySet(models.QuerySet):
    def unfinished(self):
        return self.filter(status=Upload.Status.UPLOADING)

    def counting_toward_quota(self):
        """Finished files plus bytes reserved by unfinished uploads."""
        return self.filter(status__in=[Upload.Status.UPLOADING, Upload.Status.COMPLETE])

    def idle_since(self, cutoff):
        return self.unfinished().filter(last_activity_at__lt=cutoff)


class Upload(models.Model):
    class Status(models.TextChoices):
        UPLOADING = "uploading"
        COMPLETE = "complete"
        FAILED = "failed"
        CANCELLED = "cancelled"
        EXPIRED = "expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="uploads")
    # As the client sent it (NUL, which PostgreSQL text cannot hold, becomes U+FFFD).
    original_filename = models.TextField()
    # Safe to show and to send in Content-Disposition; see uploads.filenames.
    display_name = models.CharField(max_length=255)
    size = models.BigIntegerField(help_text="Declared size in bytes.")
    sha256 = models.CharField(max_length=64, blank=True, help_text="Declared lowercase hex digest, if any.")
    # Opaque to the server, returned as sent: lets a client tell its own file again before resuming.
    fingerprint = models.CharField(max_length=256, blank=True, default="", help_text="Client's opaque file tag.")
    offset = models.BigIntegerField(default=0, help_text="Durable resume point: bytes fsynced and committed.")
    # The sha256 state after the first ``offset`` bytes (uploads.storage.sha256state), committed with
    # the offset under the same fence: the next writer, on any host, resumes hashing without re-reading.
    # It names the byte count it covers, so an offset moved by a rewind or repair simply ignores it.
    hash_state = models.BinaryField(null=True, blank=True, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.UPLOADING)
    storage_key = models.CharField(max_length=64, unique=True, default=new_storage_key, editable=False)
    # Fencing token: bumped whenever a writer is granted or revoked. Offset
    # commits compare-and-swap on it, so a writer whose lease was reclaimed
    # (reap, reset, cancel) can never move the offset again.
    writer_generation = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    last_activity_at = models.DateTimeField(default=timezone.now)
    # The object store's own upload (an S3 multipart upload id; "" on the local backend or before
    # the first commit), and the highest part number any writer of this upload may have used:
    # both committed under the fence, so a new writer numbers its parts above every stale one's.
    store_session = models.CharField(max_length=1024, blank=True, default="", editable=False)
    part_numbers = models.PositiveIntegerField(default=0, editable=False)
    # Durable bytes per second over the last offset commit (about a second apart while
    # bytes flow), for the admin and the dashboard; stale once last_activity_at is old.
    bytes_per_second = models.BigIntegerField(default=0)

    objects = UploadQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(size__gt=0), name="upload_size_positive"),
            models.CheckConstraint(condition=Q(offset__gte=0) & Q(offset__lte=F("size")), name="upload_offset_in_file"),
        ]
        indexes = [
            # GET /api/uploads/?status=… (newest first) and the quota sum.
            models.Index(fields=["owner", "status", "-created_at"], name="upload_owner_status"),
            # uploads expire: unfinished uploads idle past the expiry.
            models.Index(fields=["status", "last_activity_at"], name="upload_status_activity"),
        ]

    def __str__(self):
        return f"{self.display_name} ({self.id})"


class StoredPiece(models.Model):
    """A committed piece of an unfinished upload in an object store (uploads.storage.base.Piece).

    Rows are written only by the upload's current writer, in the same fenced
    transaction as the offset they make durable: completion assembles the
    file from these parts and no others, and a resume fetches these tails.
    """

    class Kind(models.TextChoices):
        PART = "part"
        TAIL = "tail"

    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, related_name="pieces")
    kind = models.CharField(max_length=4, choices=Kind.choices)
    start = models.BigIntegerField()
    end = models.BigIntegerField()
    # A part's number and ETag in the multipart upload; a tail's object name.
    number = models.PositiveIntegerField(null=True, blank=True)
    etag = models.CharField(max_length=128, blank=True, default="")
    name = models.CharField(max_length=1024, blank=True, default="")
    generation = models.BigIntegerField(help_text="Fencing generation of the writer that committed it.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["upload", "start"]
        constraints = [
            models.UniqueConstraint(
                fields=["upload", "number"], condition=Q(kind="part"), name="storedpiece_part_number_once"
            ),
            models.CheckConstraint(condition=Q(end__gt=F("start")) & Q(start__gte=0), name="storedpiece_bytes"),
        ]

    def __str__(self):
        return f"{self.kind} {self.number or self.name} [{self.start}, {self.end}) of {self.upload_id}"


class SlotQuerySet(models.QuerySet):
    def active(self):
        return self.filter(released_at__isnull=True)

    def released(self):
        return self.filter(released_at__isnull=False)

    def stuck(self, now):
        """Active slots whose lease ran out: the holder is gone or frozen."""
        return self.active().filter(lease_expires_at__lte=now)

    def live(self, now):
        return self.active().filter(lease_expires_at__gt=now)


class Slot(models.Model):
    class Kind(models.TextChoices):
        UPLOAD = "upload"
        DOWNLOAD = "download"

    class ReleaseReason(models.TextChoices):
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        DISCONNECTED = "disconnected"
        ERROR = "error"
        EXPIRED = "expired", "lease expired (reaped)"
        RESET = "reset"
        FAILED = "failed"
        IDLE = "idle", "idle (no bytes for DIRECTDRIVEX_IDLE_SECONDS)"

    kind = models.CharField(max_length=8, choices=Kind.choices)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="slots")
    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, null=True, blank=True, related_name="slots")
    # A download through a share link: ``user`` is then the file's owner, and the per-user limit
    # counts the link's downloads apart from the owner's own (the downloads through one link are
    # one user, spec "Configuration").
    share = models.ForeignKey("ShareLink", on_delete=models.CASCADE, null=True, blank=True, related_name="slots")
    # Position among the kind's slots, 0 <= global_index < global limit, unique
    # among active slots: this is what makes the global limit a DB constraint.
    global_index = models.PositiveSmallIntegerField()
    # Likewise per user, for both kinds (NULL only in download rows older than the per-user download limit).
    user_index = models.PositiveSmallIntegerField(null=True, blank=True)
    acquired_at = models.DateTimeField()
    lease_expires_at = models.DateTimeField()
    # The upload's writer_generation when this slot was granted to a writer.
    generation = models.BigIntegerField(default=0)
    # Channel name of the consumer holding the slot; empty while reserved by
    # POST /api/uploads/ and not yet claimed by a connection.
    holder_channel = models.CharField(max_length=200, blank=True)
    # "host:pid" of the server process holding the slot (empty while unclaimed), so an
    # operator can tell which process to look at when a slot is stuck.
    holder_process = models.CharField(max_length=100, blank=True)
    released_at = models.DateTimeField(null=True, blank=True)
    release_reason = models.CharField(max_length=16, choices=ReleaseReason.choices, blank=True)

    objects = SlotQuerySet.as_manager()

    class Meta:
        ordering = ["-acquired_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "global_index"],
                condition=Q(released_at__isnull=True),
                name="slot_global_limit",
                violation_error_message="No free global slot.",
            ),
            models.UniqueConstraint(
                fields=["kind", "user", "user_index"],
                condition=Q(released_at__isnull=True, share__isnull=True),
                name="slot_user_limit",
                violation_error_message="No free slot for this user.",
            ),
            models.UniqueConstraint(
                fields=["kind", "share", "user_index"],
                condition=Q(released_at__isnull=True, share__isnull=False),
                name="slot_share_limit",
                violation_error_message="No free slot for this share link.",
            ),
            models.UniqueConstraint(
                fields=["upload"],
                condition=Q(released_at__isnull=True, kind="upload"),
                name="slot_one_writer_per_upload",
                violation_error_message="The upload already has a writer.",
            ),
            models.CheckConstraint(
                condition=Q(released_at__isnull=True) | ~Q(release_reason=""),
                name="slot_release_has_reason",
            ),
        ]
        indexes = [
            # Admission, reaping and GET /api/slots/: active slots by kind and lease.
            models.Index(
                fields=["kind", "lease_expires_at"],
                condition=Q(released_at__isnull=True),
                name="slot_active_lease",
            ),
            # History: the dashboard's recent releases (every refresh) and slots prune.
            models.Index(
                fields=["-released_at"],
                condition=Q(released_at__isnull=False),
                name="slot_release_history",
            ),
        ]

    def __str__(self):
        return f"{self.kind} slot #{self.pk} ({self.user_id})"

    @property
    def is_active(self):
        return self.released_at is None


class ShareLink(models.Model):
    """A link that lets anyone who has it download one finished file (uploads.services.shares).

    The token itself is never stored: it is derived from ``nonce`` and the
    server's SECRET_KEY (so the owner can copy the link again), and looked
    up by its SHA-256, ``token_hash``. A copy of the database alone opens
    nothing. Deleting the file deletes its links (CASCADE).
    """

    # What ``state()`` answers: what the link's page does now.
    STATES = ("active", "expired", "revoked", "used_up")

    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, related_name="shares")
    # Random per link; with SECRET_KEY it gives the token (uploads.services.shares.token_for).
    nonce = models.CharField(max_length=64, editable=False)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    # Django's password hash ("" = no password).
    password = models.CharField(max_length=256, blank=True, default="", editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    max_downloads = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: no limit.")
    downloads = models.PositiveIntegerField(default=0, help_text="Downloads that sent the file's last byte.")
    # Every byte sent through the link: with max_downloads, at most max_downloads x size may go
    # out, however the requests cut the file (docs/sharing.md, "What counts as a download").
    bytes_sent = models.BigIntegerField(default=0)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(max_downloads__isnull=True) | Q(max_downloads__gt=0), name="share_max_positive"
            ),
            models.CheckConstraint(condition=Q(bytes_sent__gte=0), name="share_bytes_sent_not_negative"),
        ]
        indexes = [models.Index(fields=["upload", "-created_at"], name="share_upload_created")]

    def __str__(self):
        return f"share link #{self.pk} of {self.upload_id}"

    @property
    def owner_id(self):
        return self.upload.owner_id

    def state(self, now=None) -> str:
        """``active``, ``revoked``, ``expired`` or ``used_up``: what the link's page would do now."""
        now = now or timezone.now()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        if self.max_downloads is not None and (
            self.downloads >= self.max_downloads or self.bytes_sent >= self.max_downloads * self.upload.size
        ):
            return "used_up"
        return "active"


class UserQuota(models.Model):
    """A per-user override of DIRECTDRIVEX_USER_QUOTA, edited in the admin."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="quota")
    max_bytes = models.BigIntegerField(help_text="Bytes this user may store (finished + reserved).")

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(max_bytes__gte=0), name="quota_not_negative")]

    def __str__(self):
        return f"quota of {self.user}: {self.max_bytes} bytes"


class FsckRun(models.Model):
    """One run of `manage.py uploads fsck`: what it found and, with --repair, what it did.

    Kept so the admin dashboard and /metrics can show the findings of the last run.
    ``findings`` is a list of {"kind", "upload", "path", "detail", "action"} dicts.
    """

    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    repair = models.BooleanField(default=False, help_text="Run with --repair.")
    verify = models.BooleanField(default=False, help_text="Run with --verify (re-hashed finished files).")
    findings = models.JSONField(default=list)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["-started_at"], name="fsckrun_started")]

    def __str__(self):
        return f"fsck at {self.started_at:%Y-%m-%d %H:%M:%S}: {len(self.findings)} finding(s)"
