"""GET /metrics: the Prometheus text exposition, for staff sessions and the bearer DIRECTDRIVEX_METRICS_TOKEN.

A scraper sends ``Authorization: Bearer <token>``; that path needs no
database, so a scrape still answers (with ``directdrivex_database_up 0``)
while the database is down. Refusals are JSON like the API's: 401
``unauthenticated`` (with ``WWW-Authenticate: Bearer``) without valid
credentials, 403 ``permission_denied`` for a signed-in user who is not staff.
"""

import hmac

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST

from uploads.ops import collector


def _bearer(request) -> str | None:
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else None


def _token_matches(given: str | None) -> bool:
    expected = settings.DIRECTDRIVEX_METRICS_TOKEN
    if not expected or given is None:
        return False
    # Constant time: how much of a guess matched must not show in the answer's timing.
    return hmac.compare_digest(given.encode(), expected.encode())


def _refused(status: int, code: str, detail: str) -> JsonResponse:
    response = JsonResponse({"code": code, "detail": detail}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@require_safe
def metrics(request):
    bearer = _bearer(request)
    if not _token_matches(bearer):
        if bearer is not None:
            return _refused(401, "unauthenticated", "The bearer token is not DIRECTDRIVEX_METRICS_TOKEN.")
        user = request.user
        if not user.is_authenticated:
            return _refused(401, "unauthenticated", "Send Authorization: Bearer <token>, or sign in as staff.")
        if not user.is_staff:
            return _refused(403, "permission_denied", "Metrics are for staff and for the metrics token.")
    response = HttpResponse(collector.render(), content_type=CONTENT_TYPE_LATEST)
    response["Cache-Control"] = "no-store"
    return response
