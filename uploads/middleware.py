"""The edges of /api/ that are decided before any view runs: a bad Host, an unknown path, a missing slash.

Django answers these with an HTML page, a debug page under DEBUG, or (for a
path without its trailing slash) a redirect that a POST cannot follow. Here
they are JSON refusals, whatever DEBUG says, and a path that exists only with
its trailing slash is answered as if it had it. In MIDDLEWARE right inside the
request id and SecurityMiddleware: no other middleware sees a bad Host or
redirects first, and SecurityMiddleware adds its headers (nosniff,
Referrer-Policy, Cross-Origin-Opener-Policy, HSTS) to these refusals as to every
other answer. (Its redirect to HTTPS reads the Host too: a bad one there is
Django's DisallowedHost, which handler400 answers with the same JSON refusal.)
"""

from django.core.exceptions import DisallowedHost
from django.urls import Resolver404, resolve
from rest_framework.exceptions import NotFound

from uploads.api_errors import is_api_path, json_error


def _add_slash_if_only_that_resolves(request) -> None:
    """Leave a path that resolves as it is, give one that resolves only with a trailing slash its slash,
    raise NotFound for any other."""
    path = request.path_info
    try:
        resolve(path)
        return
    except Resolver404:
        if path.endswith("/"):
            raise NotFound("There is no API endpoint at this path.") from None
    try:
        resolve(path + "/")
    except Resolver404:
        raise NotFound("There is no API endpoint at this path.") from None
    request.path_info += "/"
    request.path += "/"
    request.META["PATH_INFO"] += "/"


class ApiEdgeMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if is_api_path(request.path_info):
            try:
                request.get_host()  # raises DisallowedHost, as CommonMiddleware would, but as JSON
                _add_slash_if_only_that_resolves(request)
            except (DisallowedHost, NotFound) as refused:
                return json_error(refused)
        return self.get_response(request)
