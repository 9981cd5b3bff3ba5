"""Throttling of sign-in and sign-up attempts (django-ratelimit's counters in Django's cache).

With REDIS_URL set the counters live in Redis (settings.CACHES), so every server
process counts into the same fixed windows; without it, in one process's memory.
A cache that cannot be reached does not stop anyone from signing in: the attempt
is let through uncounted, with a warning line (sign-in matters more than its
throttle, and the password hasher still makes each guess cost).
"""

import functools
import ipaddress
import logging
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import user_login_failed
from django.dispatch import receiver
from django.shortcuts import render
from django_ratelimit.core import get_usage

log = logging.getLogger(__name__)


MINUTE = 60
HOUR = 3600


def client_address(request) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy (DIRECTDRIVEX_TRUSTED_PROXIES).

    Behind one, the peer is the proxy itself for every client, so the address is taken from
    X-Forwarded-For, right to left, skipping the trusted proxies: the rightmost entries are the
    ones they appended (nginx's $proxy_add_x_forwarded_for), the ones further left anyone could
    have written. A malformed entry ends the walk at the last address known (a proxy's): never an
    address the client chose. django-ratelimit reads it through RATELIMIT_IP_META_KEY and groups
    IPv6 addresses by /64.
    """
    address = request.META["REMOTE_ADDR"]
    proxies = [ipaddress.ip_network(entry, strict=False) for entry in settings.DIRECTDRIVEX_TRUSTED_PROXIES]
    if not proxies:
        return address
    forwarded = [entry.strip() for entry in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    for hop in reversed(forwarded):
        if not any(ipaddress.ip_address(address) in network for network in proxies):
            break
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        address = hop
    return address


def _attempted_username(group, request) -> str:
    # As AuthenticationForm's UsernameField reads it, case-folded: "Alice" and "alice " are one count.
    return unicodedata.normalize("NFKC", request.POST.get("username", "")).strip().casefold()


@dataclass(frozen=True)
class Throttle:
    """At most ``setting`` attempts per ``period`` seconds for one ``key`` (django-ratelimit's key or function)."""

    group: str
    setting: str
    period: int
    key: str | Callable
    # Why the attempt is refused, for the throttled page.
    reason: str

    def _usage(self, request, *, increment: bool) -> dict | None:
        rate = (getattr(settings, self.setting), self.period)
        try:
            return get_usage(request, group=self.group, key=self.key, rate=rate, increment=increment)
        except Exception as error:  # the cache (Redis) is unreachable: see the module docstring
            log.warning("throttle %s unavailable, attempt let through uncounted: %r", self.group, error)
            return None

    def count(self, request) -> None:
        self._usage(request, increment=True)

    def wait(self, request, *, count_this_attempt: bool) -> int:
        """Seconds until the next attempt is allowed: 0 if this one is.

        Counting first (``count_this_attempt``) refuses the attempt past the limit; without it, the
        attempt after ``setting`` counted ones. django-ratelimit answers a cache it could not count
        in with a limit of 0, so such an attempt is refused rather than let through uncounted.
        """
        usage = self._usage(request, increment=count_this_attempt)
        if usage is None:  # RATELIMIT_ENABLE = False, or the cache could not be reached
            return 0
        count, limit = usage["count"], usage["limit"]
        over = count > limit if count_this_attempt else count >= limit
        # time_left is the window's last second, which still counts: the next window starts after it.
        return max(1, usage["time_left"] + 1) if over else 0


SIGN_IN_BY_ADDRESS = Throttle(
    "sign-in-address",
    "DIRECTDRIVEX_LOGIN_ATTEMPTS",
    MINUTE,
    "ip",
    "Too many sign-ins from your network address failed.",
)
SIGN_IN_BY_USERNAME = Throttle(
    "sign-in-username",
    "DIRECTDRIVEX_LOGIN_USERNAME_ATTEMPTS",
    HOUR,
    _attempted_username,
    "Too many sign-ins with this username failed.",
)
SIGN_UP_BY_ADDRESS = Throttle(
    "sign-up-address",
    "DIRECTDRIVEX_SIGNUP_ATTEMPTS",
    HOUR,
    "ip",
    "Too many accounts were asked for from your network address.",
)


# Wrong share-link passwords (uploads.share_pages): per client address, and per link whoever tries,
# so that guessing from many addresses gets no further than from one.
SHARE_PASSWORD_BY_ADDRESS = Throttle(
    "share-password-address",
    "DIRECTDRIVEX_SHARE_PASSWORD_ATTEMPTS",
    MINUTE,
    "ip",
    "Too many wrong passwords were tried from your network address.",
)


def share_password_by_link(link) -> Throttle:
    return Throttle(
        "share-password-link",
        "DIRECTDRIVEX_SHARE_LINK_PASSWORD_ATTEMPTS",
        HOUR,
        # The hash, not the id: ids start again in a new database, and the counters (Redis) outlive it.
        lambda group, request: f"share:{link.token_hash}",
        "Too many wrong passwords were tried for this link.",
    )


def _sign_in_throttles(request) -> list[Throttle]:
    # An empty username is not an account: all such attempts would otherwise share one count.
    return [SIGN_IN_BY_ADDRESS, SIGN_IN_BY_USERNAME] if _attempted_username(None, request) else [SIGN_IN_BY_ADDRESS]


def _wait_in_words(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} second{'s' if seconds != 1 else ''}"
    return f"{-(-seconds // 60)} minutes"


def throttled(request, throttle: Throttle, wait: int):
    """The 429 page: why, how long to wait, and Retry-After saying the same."""
    log.warning("throttled", extra={"ddx": {"reason": throttle.group, "retry_after": wait}})
    context = {"reason": throttle.reason, "wait": _wait_in_words(wait)}
    response = render(request, "registration/throttled.html", context, status=429)
    response["Retry-After"] = str(wait)
    return response


def throttled_sign_in(view):
    """``view``, a sign-in form, refused with the 429 page while the client's address or the username
    has had too many failed sign-ins (counted by _count_failed_sign_in).

    Only failures count: a user who signs in after a few typos is not held up, and people signing
    in behind one shared address do not use up each other's attempts. An attempt is checked before
    it runs and counted once it failed, so a burst of attempts sent at once can exceed the limit by
    as many as the server runs at the same time (its threads), once per window.
    """

    @functools.wraps(view)
    def sign_in(request, *args, **kwargs):
        if request.method == "POST":
            for throttle in _sign_in_throttles(request):
                wait = throttle.wait(request, count_this_attempt=False)
                if wait:
                    return throttled(request, throttle, wait)
        return view(request, *args, **kwargs)

    return sign_in


@receiver(user_login_failed, dispatch_uid="uploads.throttles.count_failed_sign_in")
def _count_failed_sign_in(sender, credentials, request=None, **kwargs):
    # Sent by authenticate() whichever form called it (this site's, the admin's); without a
    # request (a test client's login()) there is no address to count.
    if request is not None:
        for throttle in _sign_in_throttles(request):
            throttle.count(request)
