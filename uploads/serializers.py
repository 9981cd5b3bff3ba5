"""Shapes of the HTTP API: input validation for POST /api/uploads/ and the upload representation."""

import re
from datetime import datetime

from django.conf import settings
from django.core.validators import ProhibitNullCharactersValidator
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from uploads.models import Upload
from uploads.tickets import ws_url
from uploads.transfers import upload_expires_at

SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# Longer than any real path; the display name is cut to 255 characters anyway.
MAX_FILENAME_CHARS = 16384


@extend_schema_field(OpenApiTypes.INT64)
class StrictIntegerField(serializers.Field):
    """A JSON integer: not a string, not a float, not a boolean."""

    default_error_messages = {"type": "Must be a JSON integer number of bytes."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("type")
        return data

    def to_representation(self, value):
        return value


class FilenameField(serializers.CharField):
    """Any name a client's file system can produce, NUL included: uploads.filenames makes it safe.

    DRF refuses NUL by default; surrogates stay refused (no database can store them).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.validators = [v for v in self.validators if not isinstance(v, ProhibitNullCharactersValidator)]


class UploadCreateSerializer(serializers.Serializer):
    filename = FilenameField(max_length=MAX_FILENAME_CHARS, trim_whitespace=False)
    size = StrictIntegerField(help_text="Exact size of the file in bytes, at least 1.")
    sha256 = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="Optional hex sha256 of the whole file, verified at the end.",
    )

    def validate_size(self, value):
        if value <= 0:
            raise serializers.ValidationError("Must be at least 1 byte.")
        return value

    def validate_sha256(self, value):
        if value and not SHA256_HEX.fullmatch(value):
            raise serializers.ValidationError("Must be 64 hexadecimal characters.")
        return value.lower()


class UploadSerializer(serializers.ModelSerializer):
    filename = serializers.CharField(source="display_name", help_text="Sanitized display name.")
    ws_url = serializers.SerializerMethodField(help_text="Where to stream the bytes; only while uploading.")
    expires_at = serializers.SerializerMethodField(help_text="When an idle unfinished upload expires.")

    class Meta:
        model = Upload
        fields = [
            "id",
            "filename",
            "size",
            "offset",
            "status",
            "sha256",
            "created_at",
            "completed_at",
            "expires_at",
            "ws_url",
        ]
        read_only_fields = fields

    def get_ws_url(self, upload) -> str | None:
        return ws_url(upload) if upload.status == Upload.Status.UPLOADING else None

    @extend_schema_field(OpenApiTypes.DATETIME)
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


class StatusQuerySerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=Upload.Status.choices, required=False)


class SlotKindSummarySerializer(serializers.Serializer):
    limit = serializers.IntegerField()
    active = serializers.IntegerField()
    stuck = serializers.IntegerField()
    by_user = serializers.DictField(child=serializers.IntegerField())


class SlotSummarySerializer(serializers.Serializer):
    upload = SlotKindSummarySerializer()
    download = SlotKindSummarySerializer()


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    detail = serializers.CharField()
    retry_after = serializers.IntegerField(required=False)
    errors = serializers.DictField(required=False)
