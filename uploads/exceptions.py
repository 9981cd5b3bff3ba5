"""Named refusals: each carries its machine code, HTTP status and WebSocket close code.

Entry points translate these in one place each (uploads.api_errors for HTTP,
the consumer for WebSocket, CommandError in commands); nothing else catches them.
"""


class DirectDriveXError(Exception):
    """Base of every refusal a user can be shown."""

    code = "error"
    http_status = 400
    close_code = 4400
    # The status a tus client is answered with (uploads.transports.tus), where tus 1.0 says another.
    tus_status: int | None = None
    default_detail = "The request was refused."

    def __init__(self, detail: str | None = None, *, retry_after: int | None = None):
        self.detail = detail or self.default_detail
        self.retry_after = retry_after
        super().__init__(self.detail)

    @property
    def ws_code(self) -> str:
        """The code in the WebSocket error message (the spec's close-code table)."""
        return self.code

    def as_dict(self, *, ws: bool = False) -> dict:
        body = {"code": self.ws_code if ws else self.code, "detail": self.detail}
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body


class InvalidRequest(DirectDriveXError):
    """A field is missing or malformed."""

    code = "invalid"
    default_detail = "The request is invalid."


class ProtocolError(DirectDriveXError):
    """The WebSocket client broke the protocol (bad frame, window, message)."""

    code = "protocol_error"
    default_detail = "The client broke the upload protocol."


class Unauthenticated(DirectDriveXError):
    """No valid ticket and no session."""

    code = "unauthenticated"
    http_status = 401
    close_code = 4401
    default_detail = "Sign in or use a valid, unexpired ticket."


class UploadNotFound(DirectDriveXError):
    """The upload does not exist or belongs to someone else."""

    code = "not_found"
    http_status = 404
    close_code = 4404
    default_detail = "No such upload."


class UploadBusy(DirectDriveXError):
    """Another live connection is writing this upload."""

    code = "busy"
    http_status = 409
    close_code = 4409
    tus_status = 423  # Locked: tus clients retry it after Retry-After
    default_detail = "Another connection is writing this upload."


class TakenOver(UploadBusy):
    """A newer request for the upload (a tus PATCH or HEAD, any process) asked this writer to let go."""

    default_detail = "Another request took over this upload; what arrived here was kept."


class NotUploading(DirectDriveXError):
    """The upload is complete, cancelled, expired, failed or deleted."""

    code = "not_uploading"
    http_status = 409
    close_code = 4409
    tus_status = 410  # Gone: tus clients start the file anew
    default_detail = "The upload is no longer accepting bytes."


class LeaseLost(DirectDriveXError):
    """The writer's slot was reclaimed or reset: a stale generation was used."""

    code = "lease_lost"
    http_status = 409
    close_code = 4410
    default_detail = "This connection's slot was reclaimed; reconnect to resume."


class FileTooLarge(DirectDriveXError):
    """The declared size is above DIRECTDRIVEX_MAX_FILE_SIZE."""

    code = "file_too_large"
    http_status = 413
    close_code = 4413
    default_detail = "The file is larger than the largest size accepted."


class QuotaExceeded(DirectDriveXError):
    """Stored plus reserved bytes would pass the user's quota."""

    code = "quota_exceeded"
    http_status = 413
    close_code = 4413
    default_detail = "The upload would exceed your storage quota."


class SizeExceeded(DirectDriveXError):
    """A frame would go past the declared size."""

    code = "size_exceeded"
    http_status = 413
    close_code = 4413
    default_detail = "The data goes past the declared size."


class ChecksumMismatch(DirectDriveXError):
    """The finished bytes do not match the declared sha256."""

    code = "checksum_mismatch"
    http_status = 422
    close_code = 4422
    tus_status = 460  # tus 1.0's checksum extension says 460
    default_detail = "The uploaded bytes do not match the declared sha256."


class OffsetMismatch(DirectDriveXError):
    """A tus PATCH's Upload-Offset is not the upload's durable offset (the response carries the right one)."""

    code = "offset_mismatch"
    http_status = 409
    default_detail = "Upload-Offset does not match the upload's offset."


class TusVersionUnsupported(DirectDriveXError):
    """A tus request without ``Tus-Resumable: 1.0.0``."""

    code = "tus_version_unsupported"
    http_status = 412
    default_detail = "This server speaks tus 1.0.0: send Tus-Resumable: 1.0.0."


class UnsupportedMediaType(DirectDriveXError):
    """A tus PATCH whose body is not application/offset+octet-stream."""

    code = "unsupported_media_type"
    http_status = 415
    default_detail = "A PATCH body must be Content-Type: application/offset+octet-stream."


class SlotsExhausted(DirectDriveXError):
    """No slot is free now; ``retry_after`` says when one may be."""

    code = "slots_exhausted"
    http_status = 429
    close_code = 4429
    default_detail = "No upload slot is free right now."

    @property
    def ws_code(self) -> str:
        # The WebSocket protocol has one code for all of them; the detail says which.
        return "slots_exhausted"


class UserSlotsExhausted(SlotsExhausted):
    """The user already holds the per-user number of upload slots."""

    code = "user_slots_exhausted"
    default_detail = "You already have the maximum number of uploads in progress."


class GlobalSlotsExhausted(SlotsExhausted):
    """Every upload slot of the deployment is taken."""

    code = "global_slots_exhausted"
    default_detail = "The server is handling the maximum number of uploads; try again shortly."


class DownloadSlotsExhausted(SlotsExhausted):
    """Every download slot of the deployment is taken."""

    code = "download_slots_exhausted"
    default_detail = "The server is handling the maximum number of downloads; try again shortly."


class UserDownloadSlotsExhausted(DownloadSlotsExhausted):
    """The user already holds the per-user number of download slots (same code: the spec has one for downloads)."""

    default_detail = "You already have the maximum number of downloads in progress; try again when one ends."


class ShareDownloadSlotsExhausted(DownloadSlotsExhausted):
    """The downloads through one share link already hold the per-user number of download slots."""

    default_detail = "This link already has the maximum number of downloads in progress; try again when one ends."


class IdleTimeout(DirectDriveXError):
    """A connected writer delivered no bytes for DIRECTDRIVEX_IDLE_SECONDS; its slot is freed."""

    code = "idle_timeout"
    http_status = 408
    close_code = 4408
    default_detail = "No bytes arrived for too long; the slot was freed. Reconnect to resume."


class RequestTooLarge(DirectDriveXError):
    """An HTTP request body is larger than DIRECTDRIVEX_MAX_REQUEST_BYTES."""

    code = "request_too_large"
    http_status = 413
    close_code = 4413
    default_detail = "The request body is larger than the server accepts."


class InternalError(DirectDriveXError):
    """A server fault; the upload stays resumable.

    Close code 4500, not 1011: Daphne lets an application close only with 1000
    or 3000-4999 and drops the close (and the error) otherwise.
    """

    code = "internal_error"
    http_status = 500
    close_code = 4500
    default_detail = "The server failed; the upload can be resumed."


class Unavailable(DirectDriveXError):
    """The database or the channel layer is unreachable or out of connections; try again later."""

    code = "unavailable"
    http_status = 503
    close_code = 4503
    default_detail = "The server cannot reach its database or channel layer right now; try again shortly."

    # Long enough for a restarting database or a reconnecting pool; short enough to feel live.
    DEFAULT_RETRY_AFTER = 5

    def __init__(self, detail: str | None = None, *, retry_after: int | None = None):
        super().__init__(detail, retry_after=self.DEFAULT_RETRY_AFTER if retry_after is None else retry_after)


def _outage_types() -> tuple[type[BaseException], ...]:
    """Low-level errors that mean "a backing service is down or saturated", not "this code is wrong".

    Django wraps psycopg's errors (a PoolTimeout included: it is an
    OperationalError) in django.db.OperationalError / InterfaceError; SQLite's
    "database is locked" past its busy timeout is an OperationalError too.
    channels-redis lets redis-py's connection errors and OSError through.
    """
    from django.db import InterfaceError, OperationalError

    types: list[type[BaseException]] = [OperationalError, InterfaceError, ConnectionError]
    try:
        import redis.exceptions

        types += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover - redis is only needed with REDIS_URL
        pass
    return tuple(types)


def refusal_for(error: BaseException) -> DirectDriveXError:
    """The refusal a client is shown for ``error``: itself if named, 503/4503 for an outage, else 500/4500.

    The single classification used by every entry point (HTTP exception
    handler, WebSocket consumer), so an outage reads the same everywhere.
    """
    if isinstance(error, DirectDriveXError):
        return error
    if isinstance(error, _outage_types()):
        return Unavailable()
    return InternalError()


class NotComplete(DirectDriveXError):
    """The upload has not finished (or failed): there is no file to download yet."""

    code = "not_complete"
    http_status = 409
    close_code = 4409
    default_detail = "The upload is not complete: there is nothing to download yet."


class RangeNotSatisfiable(DirectDriveXError):
    """The requested byte range lies entirely past the end of the file (HTTP only)."""

    code = "range_not_satisfiable"
    http_status = 416
    default_detail = "The requested range starts past the end of the file."

    def __init__(self, size: int, detail: str | None = None):
        super().__init__(detail or f"The requested range starts past the end of the {size}-byte file.")
        self.size = size

    @property
    def http_headers(self) -> dict[str, str]:
        # RFC 9110 15.5.17: a 416 says how long the file is.
        return {"Content-Range": f"bytes */{self.size}"}


class ShareNotFound(DirectDriveXError):
    """No such share link, or another user's; on the public page also an expired, revoked or used-up one."""

    code = "not_found"
    http_status = 404
    default_detail = "No such share link."


class InvalidShare(InvalidRequest):
    """A share link's expiry or download limit is out of range (the API's serializer says so first)."""
