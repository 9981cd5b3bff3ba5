"""The one place where refusals become HTTP responses: always {"code", "detail"}.

Named refusals (uploads.exceptions) keep their status; DRF's own exceptions get
a code of ours; anything else is a real 500 with a log line, still in JSON.
"""

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import exceptions as drf
from rest_framework.response import Response
from rest_framework.views import set_rollback

from uploads.exceptions import DirectDriveXError

log = logging.getLogger(__name__)

DRF_CODES = {
    drf.NotAuthenticated: "unauthenticated",
    drf.AuthenticationFailed: "unauthenticated",
    drf.PermissionDenied: "permission_denied",
    drf.NotFound: "not_found",
    drf.MethodNotAllowed: "method_not_allowed",
    drf.NotAcceptable: "not_acceptable",
    drf.UnsupportedMediaType: "unsupported_media_type",
    drf.Throttled: "throttled",
    drf.ParseError: "invalid",
    drf.ValidationError: "invalid",
}


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        for field, value in detail.items():
            message = _first_message(value)
            return message if field == "non_field_errors" else f"{field}: {message}"
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return str(detail)


def exception_handler(exc, context):
    if isinstance(exc, Http404):
        exc = drf.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()

    if isinstance(exc, DirectDriveXError):
        response = Response(exc.as_dict(), status=exc.http_status)
        if exc.retry_after is not None:
            response["Retry-After"] = str(exc.retry_after)
        set_rollback()
        return response

    if isinstance(exc, drf.APIException):
        code = next((c for cls, c in DRF_CODES.items() if isinstance(exc, cls)), "error")
        if isinstance(exc, drf.ValidationError):
            body = {"code": code, "detail": _first_message(exc.detail), "errors": exc.detail}
        elif isinstance(exc, drf.ParseError):
            body = {"code": code, "detail": f"Malformed request body: {exc.detail}"}
        else:
            body = {"code": code, "detail": str(exc.detail)}
        response = Response(body, status=exc.status_code)
        if getattr(exc, "auth_header", None):
            response["WWW-Authenticate"] = exc.auth_header
        if getattr(exc, "wait", None):
            response["Retry-After"] = str(int(exc.wait))
        set_rollback()
        return response

    # Not a refusal we know: a server fault. Log it and answer a JSON 500.
    view = context.get("view")
    log.error("unhandled error in %s", type(view).__name__ if view else "API view", exc_info=exc)
    set_rollback()
    return Response({"code": "internal_error", "detail": "The server failed; the error was logged."}, status=500)
