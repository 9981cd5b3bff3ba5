"""Shapes of the HTTP API: input validation for POST /api/uploads/ and the list, the upload representation.

The OpenAPI schema (drf-spectacular) is read off these fields, so each field
states exactly what the server enforces: bounds, patterns, nullability.
"""

import re
import uuid
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.core.validators import ProhibitNullCharactersValidator, RegexValidator
from django.urls import reverse
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from uploads.models import ShareLink, Upload
from uploads.services.shares import MAX_PASSWORD_LENGTH, share_max_seconds, token_for
from uploads.services.uploads import upload_expires_at
from uploads.tickets import ws_url

# \A…\Z, not ^…$: "$" would let a trailing newline through (the schema gets ^…$, which is exact in ECMA regex).
SHA256_HEX = r"\A[0-9a-fA-F]{64}\Z"
# Longer than any real path; the display name is cut to 255 characters anyway.
MAX_FILENAME_CHARS = 16384
MAX_FINGERPRINT_CHARS = 256
BIGINT_MAX = 2**63 - 1
DEFAULT_PAGE = 100
MAX_PAGE = 1000
# A list position: the last upload's created_at in microseconds since the epoch, "-", its id in hex
# (the keyset of uploads_of). Every string that matches is a position (17 digits stay below the year
# 5000), so the pattern in the schema is exactly what the server accepts.
CURSOR = r"\A([0-9]{1,17})-([0-9a-f]{32})\Z"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


def cursor_after(upload: Upload) -> str:
    """The cursor of the page that starts after ``upload``."""
    return f"{(upload.created_at - EPOCH) // MICROSECOND}-{upload.pk.hex}"


class FileSizeField(serializers.IntegerField):
    """A JSON integer number of bytes (not a string, float or boolean), at least 1.

    The schema also states DIRECTDRIVEX_MAX_FILE_SIZE as the maximum, but this
    field does not enforce it: upload_create refuses a larger size with the
    contract's 413 file_too_large, not with 400 invalid. (The quota is per user
    and changes with every upload, so no schema can state it: 413 quota_exceeded.)
    """

    default_error_messages = {
        "invalid": "Must be a JSON integer number of bytes.",
        "min_value": "Must be at least {min_value} byte.",
    }

    def __init__(self, **kwargs):
        super().__init__(min_value=1, **kwargs)
        # Read per serializer instance (DRF copies declared fields per instance), so the schema follows the setting.
        self.max_value = settings.DIRECTDRIVEX_MAX_FILE_SIZE

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return data


class QueryIntegerField(serializers.IntegerField):
    """A query-string integer written in plain decimal digits: "1.0", " 1" or "+1" are refused, not coerced."""

    def to_internal_value(self, data):
        # 20 digits are past any bound this API has, and int() of a longer string is work for nothing.
        if not isinstance(data, str) or not re.fullmatch(r"[0-9]{1,20}", data):
            self.fail("invalid")
        return int(data)


class JSONIntegerField(serializers.IntegerField):
    """A JSON integer: not a string of digits, a float or a boolean, which DRF's IntegerField would coerce."""

    default_error_messages = {"invalid": "Must be a JSON integer."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class JSONStringField(serializers.CharField):
    """A JSON string: DRF's CharField also takes a number and keeps its str(), which the schema does not allow."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class FilenameField(JSONStringField):
    """Any name a client's file system can produce, NUL included: uploads.filenames makes it safe.

    DRF refuses NUL by default; surrogates stay refused (no database can store them).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.validators = [v for v in self.validators if not isinstance(v, ProhibitNullCharactersValidator)]


class UploadCreateSerializer(serializers.Serializer):
    filename = FilenameField(min_length=1, max_length=MAX_FILENAME_CHARS, trim_whitespace=False)
    size = FileSizeField(
        help_text="Exact size of the file in bytes. A size above the maximum is refused with 413 file_too_large; "
        "one that does not fit the caller's quota with 413 quota_exceeded."
    )
    # Absent means "" (upload_create's default). No default="" here: drf-spectacular would put it
    # inside the pattern's branch of the schema, where "" does not match.
    sha256 = JSONStringField(
        required=False,
        allow_blank=True,
        # Untrimmed: a digest with a stray space is refused, as the pattern says.
        trim_whitespace=False,
        validators=[RegexValidator(SHA256_HEX, message="Must be 64 hexadecimal characters.")],
        help_text="Optional hex sha256 of the whole file, any case, verified at the end.",
    )
    fingerprint = JSONStringField(
        required=False,
        allow_blank=True,
        max_length=MAX_FINGERPRINT_CHARS,
        # Opaque: stored and returned exactly as sent, whitespace included.
        trim_whitespace=False,
        # DRF refuses NUL already (no database text holds it); this validator puts that in the schema.
        # "+", not "*": a blank value never reaches validators, and the schema states it separately.
        validators=[RegexValidator(r"\A[^\x00]+\Z", message="Null characters are not allowed.")],
        help_text="Optional opaque client string (no NUL), returned by GET, to tell the same file again.",
    )

    def validate_sha256(self, value):
        return value.lower()


class UploadSerializer(serializers.ModelSerializer):
    filename = serializers.CharField(source="display_name", help_text="Sanitized display name.")
    # Bounds that make the schema say int64: sizes pass 2**31, and generated clients read a bare
    # "integer" as 32 bits.
    size = serializers.IntegerField(
        read_only=True, min_value=1, max_value=BIGINT_MAX, help_text="Declared size in bytes."
    )
    offset = serializers.IntegerField(
        read_only=True,
        min_value=0,
        max_value=BIGINT_MAX,
        help_text="Durable resume point: bytes fsynced and committed.",
    )
    ws_url = serializers.SerializerMethodField(help_text="Where to stream the bytes; only while uploading.")
    expires_at = serializers.SerializerMethodField(help_text="When an idle upload expires; only while uploading.")

    class Meta:
        model = Upload
        fields = [
            "id",
            "filename",
            "size",
            "offset",
            "status",
            "sha256",
            "fingerprint",
            "created_at",
            "completed_at",
            "expires_at",
            "ws_url",
        ]
        read_only_fields = fields

    def get_ws_url(self, upload) -> str | None:
        return ws_url(upload) if upload.status == Upload.Status.UPLOADING else None

    @extend_schema_field(serializers.DateTimeField(allow_null=True))
    def get_expires_at(self, upload) -> datetime | None:
        if upload.status != Upload.Status.UPLOADING:
            return None
        return serializers.DateTimeField().to_representation(upload_expires_at(upload))


class UploadCreatedSerializer(UploadSerializer):
    """POST's answer also says how to stream: frame size and window."""

    chunk_size = serializers.SerializerMethodField()
    window = serializers.SerializerMethodField()

    class Meta(UploadSerializer.Meta):
        fields = [*UploadSerializer.Meta.fields, "chunk_size", "window"]

    def get_chunk_size(self, upload) -> int:
        return settings.DIRECTDRIVEX_CHUNK_SIZE

    def get_window(self, upload) -> int:
        return settings.DIRECTDRIVEX_WINDOW


class UploadListQuerySerializer(serializers.Serializer):
    """GET /api/uploads/'s query: give it ``request.query_params.dict()``.

    A plain dict, not the QueryDict: DRF reads an empty form value of an
    optional field as "not given", and ``?status=`` must be refused, not ignored.
    """

    status = serializers.ChoiceField(choices=Upload.Status.choices, required=False, help_text="Only this status.")
    limit = QueryIntegerField(
        required=False,
        default=DEFAULT_PAGE,
        min_value=1,
        max_value=MAX_PAGE,
        help_text="At most this many uploads.",
    )
    cursor = serializers.CharField(
        required=False,
        trim_whitespace=False,
        validators=[RegexValidator(CURSOR, message="Not a cursor of this API: take the next page's URL from Link.")],
        help_text="Where the page starts: the next page's URL in the Link header carries it.",
    )

    def validate_cursor(self, value) -> tuple[datetime, uuid.UUID]:
        microseconds, upload_id = re.fullmatch(CURSOR, value).groups()
        return EPOCH + int(microseconds) * MICROSECOND, uuid.UUID(upload_id)


class SlotKindSummarySerializer(serializers.Serializer):
    limit = serializers.IntegerField()
    active = serializers.IntegerField()
    stuck = serializers.IntegerField()
    by_user = serializers.DictField(child=serializers.IntegerField())


class SlotSummarySerializer(serializers.Serializer):
    upload = SlotKindSummarySerializer()
    download = SlotKindSummarySerializer()


class ShareCreateSerializer(serializers.Serializer):
    expires_in = JSONIntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        help_text="Seconds the link lives; at most DIRECTDRIVEX_SHARE_MAX_DAYS days, which is also the default.",
    )
    max_downloads = JSONIntegerField(
        required=False,
        allow_null=True,
        min_value=1,
        max_value=2**31 - 1,
        help_text="Downloads the link allows (each one that sends the file's last byte counts); absent: no limit.",
    )
    password = JSONStringField(
        required=False,
        allow_blank=True,
        max_length=MAX_PASSWORD_LENGTH,
        # As typed: a password's spaces are part of it.
        trim_whitespace=False,
        help_text="Visitors must give it before they see or download the file; absent or empty: none.",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Read per instance, so that the schema and the check follow the setting.
        self.fields["expires_in"].max_value = share_max_seconds()
        self.fields["expires_in"].validators.append(_at_most(share_max_seconds()))


def _at_most(limit: int):
    def check(value):
        if value is not None and value > limit:
            raise serializers.ValidationError(
                f"Must be at most {limit} seconds ({settings.DIRECTDRIVEX_SHARE_MAX_DAYS} days)."
            )

    return check


class ShareSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField(
        help_text="The link to hand out; null if the server's SECRET_KEY changed since (the link still works)."
    )
    upload = serializers.UUIDField(source="upload_id", read_only=True)
    password = serializers.SerializerMethodField(help_text="Whether the link asks for a password.")
    status = serializers.SerializerMethodField(help_text="What the link does now.")
    downloads = serializers.IntegerField(read_only=True, min_value=0, help_text="Downloads counted so far.")
    bytes_sent = serializers.IntegerField(read_only=True, min_value=0, max_value=BIGINT_MAX)

    class Meta:
        model = ShareLink
        fields = [
            "id",
            "url",
            "upload",
            "created_at",
            "expires_at",
            "max_downloads",
            "downloads",
            "bytes_sent",
            "password",
            "revoked_at",
            "status",
        ]
        read_only_fields = fields

    def get_url(self, link) -> str | None:
        token = self.context.get("token") or token_for(link)
        if token is None:
            return None
        path = reverse("share", args=[token])
        request = self.context.get("request")
        return request.build_absolute_uri(path) if request is not None else path

    def get_password(self, link) -> bool:
        return bool(link.password)

    @extend_schema_field(serializers.ChoiceField(choices=ShareLink.STATES))
    def get_status(self, link) -> str:
        return link.state()


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    detail = serializers.CharField()
    retry_after = serializers.IntegerField(required=False)
    errors = serializers.DictField(required=False)
