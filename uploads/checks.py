"""System checks that stop start-up on bad configuration (ids uploads.E001…, uploads.W001).

Every value that would make the first upload fail (a limit the database column
cannot hold, a duration no date can be computed with, a request limit smaller
than a valid API call) is refused here instead, with the variable's name.
Daphne does not run system checks by itself: directdrivex/asgi.py runs them
before serving, and every manage.py command that serves or migrates does too.
"""

import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.checks import Error, Tags, Warning, register
from django.db.backends.base.operations import BaseDatabaseOperations

from uploads import metrics, storage
from uploads.models import Slot
from uploads.serializers import MAX_FILENAME_CHARS, MAX_FINGERPRINT_CHARS
from uploads.storage import sha256state

KiB = 1024
MiB = 1024 * KiB
# Durations far beyond any real use, yet small enough that "now + duration"
# stays inside Python's datetime range (year 9999) for thousands of years.
MAX_SECONDS = 100 * 365 * 24 * 3600
MAX_DAYS = 100 * 365
# The largest default the spec allows; larger chunks are not measured (W001).
LARGEST_MEASURED_CHUNK = 4 * MiB
DATE_RANGE = "Durations must fit date arithmetic: 100 years at most."


@dataclass(frozen=True)
class Bound:
    minimum: int
    maximum: int | None = None
    why: str = ""


# Ranges of the integer settings as they reach the code (whatever set them).
# directdrivex.env applies the same minimums to the environment (uploads.E001).
BOUNDS = {
    "DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS": Bound(1, why="With no slot every upload would be refused."),
    "DIRECTDRIVEX_USER_UPLOAD_SLOTS": Bound(1, why="With no slot every upload would be refused."),
    "DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS": Bound(1, why="With no slot every download would be refused."),
    "DIRECTDRIVEX_USER_DOWNLOAD_SLOTS": Bound(1, why="With no slot every download would be refused."),
    "DIRECTDRIVEX_SLOT_LEASE_SECONDS": Bound(
        5,
        MAX_SECONDS,
        "A writer stops writing a safety margin before its lease runs out and renews it several times per "
        "lease; a lease under 5 s leaves it no time to write.",
    ),
    "DIRECTDRIVEX_IDLE_SECONDS": Bound(1, MAX_SECONDS, DATE_RANGE),
    "DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS": Bound(1, MAX_SECONDS, DATE_RANGE),
    "DIRECTDRIVEX_SLOT_HISTORY_DAYS": Bound(1, MAX_DAYS, DATE_RANGE),
    "DIRECTDRIVEX_DB_POOL_SIZE": Bound(1, why="A pool of no connection could answer no request."),
    "DIRECTDRIVEX_MAX_FILE_SIZE": Bound(1, 2**63 - 1, "Upload.size and offset are 64-bit integer columns."),
    "DIRECTDRIVEX_USER_QUOTA": Bound(0),
    "DIRECTDRIVEX_CHUNK_SIZE": Bound(1),
    "DIRECTDRIVEX_WINDOW": Bound(1),
    "DIRECTDRIVEX_LOGIN_ATTEMPTS": Bound(1, why="With no failed sign-in allowed, nobody could sign in."),
    "DIRECTDRIVEX_LOGIN_USERNAME_ATTEMPTS": Bound(1, why="With no failed sign-in allowed, nobody could sign in."),
    "DIRECTDRIVEX_SIGNUP_ATTEMPTS": Bound(1, why="With no sign-up allowed, the sign-up page could never succeed."),
    # A link's expiry is a datetime: 100 years of days keeps it inside the dates Python and databases hold.
    "DIRECTDRIVEX_SHARE_MAX_DAYS": Bound(1, MAX_DAYS, DATE_RANGE),
    "DIRECTDRIVEX_SHARE_PASSWORD_ATTEMPTS": Bound(1, why="With no wrong password allowed, none could be typed."),
    "DIRECTDRIVEX_SHARE_LINK_PASSWORD_ATTEMPTS": Bound(1, why="With no wrong password allowed, none could be typed."),
}


def _hint(name: str, bound: Bound | None) -> str:
    if bound is None:
        return f"Fix or unset {name}; see docs/configuration.md."
    upper = f"from {bound.minimum} to {bound.maximum}" if bound.maximum is not None else f"of at least {bound.minimum}"
    return " ".join(filter(None, [f"{name} takes an integer {upper}.", bound.why, "See docs/configuration.md."]))


def slot_limit_capacity() -> int:
    """The largest slot limit the index columns hold: indexes run 0..limit-1.

    Slot.global_index / user_index are PositiveSmallIntegerField, smallint on
    PostgreSQL (0..32767), so the limit may be 32768. SQLite would store more,
    but the same settings must work on the production database, so the
    column's declared range is what counts, not the running backend's.
    """
    ranges = BaseDatabaseOperations.integer_field_ranges
    columns = [Slot._meta.get_field(name).get_internal_type() for name in ("global_index", "user_index")]
    return min(ranges[column][1] for column in columns) + 1


def largest_upload_create_body() -> int:
    """Bytes of the largest valid POST /api/uploads/ body, as a compact JSON encoder may write it.

    The longest filename and fingerprint, each character outside the BMP, which
    an ASCII-only encoder (Python's json by default) writes as a 12-byte
    surrogate-pair escape.
    """
    astral = "\U0001f4be"
    body = {
        "filename": astral * MAX_FILENAME_CHARS,
        "size": BOUNDS["DIRECTDRIVEX_MAX_FILE_SIZE"].maximum,
        "sha256": "0" * 64,
        "fingerprint": astral * MAX_FINGERPRINT_CHARS,
    }
    return len(json.dumps(body).encode())


def _storage_problem(path: Path) -> str | None:
    """Why uploads could not store bytes under ``path``, or None. Looks only, creates nothing."""
    for folder in (path, path / "partial", path / "files"):
        if not folder.exists():
            continue
        if not folder.is_dir():
            return f"{folder} exists and is not a directory."
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable by this process."
    if not path.exists():
        parent = next(p for p in path.parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            return f"{path} does not exist and cannot be created in {parent}."
    return None


@register(Tags.compatibility, deploy=False)
def check_configuration(app_configs, **kwargs):
    errors = [
        Error(message, hint=_hint(name, BOUNDS.get(name)), id="uploads.E001", obj=name)
        for name, message in settings.DIRECTDRIVEX_CONFIG_ERRORS
    ]
    errors += _check_bounds()
    chunk, window = settings.DIRECTDRIVEX_CHUNK_SIZE, settings.DIRECTDRIVEX_WINDOW
    if chunk > window:
        errors.append(
            Error(
                f"DIRECTDRIVEX_CHUNK_SIZE ({chunk}) is larger than DIRECTDRIVEX_WINDOW ({window}).",
                hint="A client could never send a full frame; make the window at least one chunk (8 chunks is usual).",
                id="uploads.E002",
            )
        )
    # Uploads only: a per-user download limit above the global one is merely never reached, and
    # lowering the global number of downloads must not also require lowering the per-user one.
    if settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS > settings.DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS:
        errors.append(
            Error(
                "DIRECTDRIVEX_USER_UPLOAD_SLOTS is larger than DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS.",
                hint="The per-user limit cannot exceed the global one.",
                id="uploads.E003",
                obj="DIRECTDRIVEX_USER_UPLOAD_SLOTS",
            )
        )
    if not settings.DEBUG and settings.SECRET_KEY in ("", settings.INSECURE_DEV_SECRET_KEY):
        errors.append(
            Error(
                "SECRET_KEY is missing or is the development default while DEBUG is off.",
                hint="Set SECRET_KEY to a long random value, e.g. from secrets.token_urlsafe(50).",
                id="uploads.E004",
            )
        )
    if not settings.DEBUG and not settings.ALLOWED_HOSTS:
        errors.append(
            Error(
                "ALLOWED_HOSTS is empty while DEBUG is off: every request would be refused.",
                hint="Set ALLOWED_HOSTS to the comma-separated host names the service answers to.",
                id="uploads.E005",
            )
        )
    errors += _check_slot_columns()
    errors += _check_request_limit()
    errors += _check_storage()
    errors += _check_object_store()
    errors += _check_chunk_size()
    errors += _check_resumable_sha256()
    errors += _check_accel_redirect()
    errors += _check_metrics()
    errors += _check_trusted_proxies()
    return errors


def _is_network(entry: str) -> bool:
    try:
        ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False
    return True


def _check_trusted_proxies() -> list[Error]:
    # uploads.throttles.client_address parses each entry on every sign-in: a bad one would fail there.
    bad = [entry for entry in settings.DIRECTDRIVEX_TRUSTED_PROXIES if not _is_network(entry)]
    if not bad:
        return []
    return [
        Error(
            f"DIRECTDRIVEX_TRUSTED_PROXIES has entries that are not IP addresses or networks: {', '.join(bad)}.",
            hint="List the proxies in front of the server by address, e.g. 127.0.0.1,::1 for nginx on the same "
            "host, or by network, e.g. 10.0.0.0/8 (host names are not resolved).",
            id="uploads.E013",
            obj="DIRECTDRIVEX_TRUSTED_PROXIES",
        )
    ]


ACCEL_PREFIX = re.compile(r"/[A-Za-z0-9_\-/]*/")


def _check_accel_redirect() -> list[Error]:
    # The header is the prefix followed by the storage key: without both slashes nginx
    # would look for "/_protectedKEY" or "_protected/KEY", match no internal location, and
    # answer every download 404 — a misconfiguration that only shows when someone downloads.
    # Plain characters only: the s3 location of deploy/nginx.conf.template puts it in a regular expression.
    prefix = settings.DIRECTDRIVEX_ACCEL_REDIRECT
    if not prefix or ACCEL_PREFIX.fullmatch(prefix):
        return []
    return [
        Error(
            f"DIRECTDRIVEX_ACCEL_REDIRECT is {prefix!r}: it must be a location prefix that starts and ends with '/', "
            "of letters, digits, '_', '-' and '/'.",
            hint="Use the path of the nginx `internal` location, e.g. /_protected/ (deploy/nginx.conf.template).",
            id="uploads.E010",
            obj="DIRECTDRIVEX_ACCEL_REDIRECT",
        )
    ]


def _check_bounds() -> list[Error]:
    errors = []
    for name, bound in BOUNDS.items():
        value = getattr(settings, name)
        if value < bound.minimum:
            problem = f"{name} is {value}; it must be at least {bound.minimum}."
        elif bound.maximum is not None and value > bound.maximum:
            problem = f"{name} is {value}; it must be at most {bound.maximum}."
        else:
            continue
        errors.append(Error(problem, hint=_hint(name, bound), id="uploads.E007", obj=name))
    return errors


def _check_slot_columns() -> list[Error]:
    capacity = slot_limit_capacity()
    return [
        Error(
            f"{name} is {getattr(settings, name)}; the slot index columns hold at most {capacity} slots of a kind.",
            hint=(
                f"Set {name} to {capacity} or less. Each active slot takes an index 0..limit-1 in a smallint "
                "column (uploads.models.Slot), so a larger limit fails at admission on PostgreSQL."
            ),
            id="uploads.E006",
            obj=name,
        )
        for name in (
            "DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS",
            "DIRECTDRIVEX_USER_UPLOAD_SLOTS",
            "DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS",
            "DIRECTDRIVEX_USER_DOWNLOAD_SLOTS",
        )
        if getattr(settings, name) > capacity
    ]


def _check_request_limit() -> list[Error]:
    limit, needed = settings.DIRECTDRIVEX_MAX_REQUEST_BYTES, largest_upload_create_body()
    if limit >= needed:
        return []
    return [
        Error(
            f"DIRECTDRIVEX_MAX_REQUEST_BYTES is {limit}; a valid POST /api/uploads/ can be {needed} bytes long.",
            hint=(
                f"Set it to at least {needed} (the default is {MiB}): a client sending the longest filename "
                "would otherwise be refused with 413 request_too_large."
            ),
            id="uploads.E008",
            obj="DIRECTDRIVEX_MAX_REQUEST_BYTES",
        )
    ]


def _check_storage() -> list[Error]:
    problem = _storage_problem(Path(settings.DIRECTDRIVEX_STORAGE_DIR))
    if problem is None:
        return []
    return [
        Error(
            f"DIRECTDRIVEX_STORAGE_DIR cannot hold uploads: {problem}",
            hint="Point DIRECTDRIVEX_STORAGE_DIR at a folder this process may create and write (shared by every "
            "server process of the deployment).",
            id="uploads.E009",
            obj="DIRECTDRIVEX_STORAGE_DIR",
        )
    ]


BACKENDS = ("local", "s3")


def _check_object_store() -> list[Error]:
    """DIRECTDRIVEX_STORAGE_BACKEND=s3: the bucket is tried (written, read, listed, deleted) before serving."""
    backend = settings.DIRECTDRIVEX_STORAGE_BACKEND
    if backend not in BACKENDS:
        return [
            Error(
                f"DIRECTDRIVEX_STORAGE_BACKEND is {backend!r}.",
                hint="Use local (a folder every server shares) or s3 (an S3-compatible bucket; docs/storage.md).",
                id="uploads.E014",
                obj="DIRECTDRIVEX_STORAGE_BACKEND",
            )
        ]
    if backend != "s3":
        return []
    return [
        Error(
            f"The s3 storage backend cannot store uploads: {problem}",
            hint="Check DIRECTDRIVEX_S3_ENDPOINT_URL, DIRECTDRIVEX_S3_BUCKET, DIRECTDRIVEX_S3_PREFIX, "
            "DIRECTDRIVEX_S3_REGION, DIRECTDRIVEX_SPOOL_DIR and the AWS credentials (docs/storage.md lists the "
            "permissions the server needs).",
            id="uploads.E015",
            obj="DIRECTDRIVEX_STORAGE_BACKEND",
        )
        for problem in storage.backend().problems()
    ]


def _check_chunk_size() -> list[Warning]:
    chunk = settings.DIRECTDRIVEX_CHUNK_SIZE
    if chunk <= LARGEST_MEASURED_CHUNK:
        return []
    return [
        Warning(
            f"DIRECTDRIVEX_CHUNK_SIZE is {chunk}, above {LARGEST_MEASURED_CHUNK} (4 MiB), the largest size measured.",
            hint=(
                "It works (Daphne's message and frame limits follow it, at twice the chunk size), but Daphne "
                "assembles every frame in memory before the window applies, and larger frames were not measured "
                "to be faster. Lower it to 4194304 or less unless you measured otherwise (docs/benchmarks.md)."
            ),
            id="uploads.W001",
            obj="DIRECTDRIVEX_CHUNK_SIZE",
        )
    ]


def _check_resumable_sha256() -> list[Warning]:
    if sha256state.available():
        return []
    return [
        Warning(
            "libcrypto's SHA256 functions are missing or failed their self-test: the sha256 state cannot be saved "
            "with the durable offset, so every resumed upload (every tus PATCH after the first) reads its bytes "
            "back to hash them again.",
            hint="Uploads stay correct, only slower to resume. Install OpenSSL's libcrypto (Debian: libssl3).",
            id="uploads.W002",
        )
    ]


# RFC 6750's b64token: what an Authorization: Bearer header can carry as is.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
SHORTEST_METRICS_TOKEN = 16


def _check_metrics() -> list[Error]:
    errors = []
    token = settings.DIRECTDRIVEX_METRICS_TOKEN
    if token and (len(token) < SHORTEST_METRICS_TOKEN or not BEARER_TOKEN.fullmatch(token)):
        errors.append(
            Error(
                f"DIRECTDRIVEX_METRICS_TOKEN must be at least {SHORTEST_METRICS_TOKEN} characters of letters, digits "
                "and -._~+/ (a bearer token), without spaces or quotes.",
                hint="Generate one with python3 -c 'import secrets; print(secrets.token_urlsafe(32))', or unset it "
                "to let only staff sessions read /metrics.",
                id="uploads.E011",
                obj="DIRECTDRIVEX_METRICS_TOKEN",
            )
        )
    if metrics.MULTIPROCESS_PROBLEM:
        errors.append(
            Error(
                metrics.MULTIPROCESS_PROBLEM,
                hint="Point PROMETHEUS_MULTIPROC_DIR at a folder this process may create and write, local to this "
                "host (e.g. /run/directdrivex/metrics), or unset it when only one server process runs.",
                id="uploads.E012",
                obj="PROMETHEUS_MULTIPROC_DIR",
            )
        )
    return errors
