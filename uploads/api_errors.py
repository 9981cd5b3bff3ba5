"""The one place where errors become HTTP answers on /api/: always {"code", "detail"}, never an HTML page.

Named refusals (uploads.exceptions) keep their status; DRF's and Django's own
exceptions get a code of ours; anything else is classified by ``refusal_for``:
an outage of the database or channel layer is 503 ``unavailable`` with
Retry-After, any other fault a 500 ``internal_error`` with a log line.

Three entry points share ``refusal_parts``: DRF's exception handler (errors in
API views, authentication included), Django's error handlers (errors raised
outside the views on /api/ paths, e.g. in middleware; directdrivex/urls.py),
and uploads.middleware (what is decided before any view runs). Paths outside
/api/ keep Django's HTML error pages.
"""

import logging
import sys
import traceback

from django.conf import settings
from django.core.exceptions import BadRequest, DisallowedHost, RequestDataTooBig, SuspiciousOperation
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.views import defaults
from rest_framework import exceptions as drf
from rest_framework.parsers import BaseParser
from rest_framework.response import Response
from rest_framework.views import set_rollback

from uploads import metrics
from uploads.exceptions import InternalError, InvalidRequest, RequestTooLarge, Unavailable, refusal_for

log = logging.getLogger(__name__)

API_PREFIX = "/api/"


class BadHost(drf.APIException):
    """The Host header names a host that is not in ALLOWED_HOSTS (Django's DisallowedHost)."""

    status_code = 400
    default_detail = "The Host header names a host this server does not answer for."
    default_code = "bad_host"


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
    BadHost: "bad_host",
}


def is_api_path(path_info: str) -> bool:
    return path_info == API_PREFIX.rstrip("/") or path_info.startswith(API_PREFIX)


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        for field, value in detail.items():
            message = _first_message(value)
            return message if field == "non_field_errors" else f"{field}: {message}"
    if isinstance(detail, list) and detail:
        return _first_message(detail[0])
    return str(detail)


def _raised_by_a_parser(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a DRF parser reading the request body."""
    return any(
        isinstance(frame.f_locals.get("self"), BaseParser) for frame, _line in traceback.walk_tb(exc.__traceback__)
    )


def _known(exc: BaseException) -> BaseException:
    """Django's and Python's errors that mean "this request is refused", as the DRF or named refusal that says so."""
    if isinstance(exc, Http404):
        return drf.NotFound()
    if isinstance(exc, DjangoPermissionDenied):
        return drf.PermissionDenied()
    if isinstance(exc, DisallowedHost):
        return BadHost()
    if isinstance(exc, RequestDataTooBig):
        # Only when DATA_UPLOAD_MAX_MEMORY_SIZE is set below the transport's limit (settings align the two).
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return RequestTooLarge(f"The request body is larger than {limit} bytes, the most this server accepts.")
    if isinstance(exc, SuspiciousOperation | BadRequest | MultiPartParserError):
        return InvalidRequest("The request is malformed.")
    if isinstance(exc, RecursionError) and _raised_by_a_parser(exc):
        # json lets deep nesting escape as RecursionError, not as the ValueError DRF turns into a ParseError.
        return drf.ParseError("JSON nested too deeply.")
    return exc


def refusal_parts(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """Status, JSON body and headers of the answer to ``exc``."""
    exc = _known(exc)
    if isinstance(exc, drf.APIException):
        code = next((c for cls, c in DRF_CODES.items() if isinstance(exc, cls)), "error")
        if isinstance(exc, drf.ValidationError):
            body = {"code": code, "detail": _first_message(exc.detail), "errors": exc.detail}
        elif isinstance(exc, drf.ParseError):
            body = {"code": code, "detail": f"Malformed request body: {exc.detail}"}
        else:
            body = {"code": code, "detail": str(exc.detail)}
        headers = {}
        if getattr(exc, "auth_header", None):
            headers["WWW-Authenticate"] = exc.auth_header
        if getattr(exc, "wait", None):
            headers["Retry-After"] = str(int(exc.wait))
        return exc.status_code, body, headers

    refusal = refusal_for(exc)
    if refusal is not exc and isinstance(refusal, InternalError):
        refusal = InternalError("The server failed; the error was logged.")
    headers = {"Retry-After": str(refusal.retry_after)} if refusal.retry_after is not None else {}
    # A refusal that HTTP requires a header for (416: Content-Range) names it itself.
    headers.update(getattr(refusal, "http_headers", {}))
    return refusal.http_status, refusal.as_dict(), headers


def exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error raised in an API view (authentication included), answered as JSON."""
    status, body, headers = refusal_parts(exc)
    metrics.refusal_counted("http", body["code"])
    if status >= 500:
        # Django logs what its own handlers answer; DRF leaves server errors to us.
        view = context.get("view")
        where = type(view).__name__ if view else "API view"
        if status == Unavailable.http_status:
            log.warning("%s answered 503 unavailable: %s: %s", where, type(exc).__name__, exc)
        else:
            log.error("%s failed, answered %d %s", where, status, body["code"], exc_info=exc)
    set_rollback()
    return Response(body, status=status, headers=headers)


def json_error(exc: BaseException) -> JsonResponse:
    """The JSON answer to ``exc`` outside DRF (middleware, Django's error handlers)."""
    status, body, headers = refusal_parts(exc)
    metrics.refusal_counted("http", body["code"])
    return JsonResponse(body, status=status, headers=headers)


# Django's error handlers (handler400 … handler500 in directdrivex/urls.py): on
# /api/ paths the JSON answer, elsewhere Django's own page.


def bad_request(request, exception):
    if is_api_path(request.path_info):
        return json_error(exception)
    return defaults.bad_request(request, exception)


def permission_denied(request, exception):
    if is_api_path(request.path_info):
        return json_error(exception)
    return defaults.permission_denied(request, exception)


def page_not_found(request, exception):
    if is_api_path(request.path_info):
        return json_error(exception)
    return defaults.page_not_found(request, exception)


def server_error(request):
    if is_api_path(request.path_info):
        # Django calls this handler while it handles the exception, without passing it in.
        error = sys.exc_info()[1]
        return json_error(error if error is not None else InternalError())
    return defaults.server_error(request)
