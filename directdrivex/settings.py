"""Django settings for DirectDriveX: every value is read once, here, from the environment.

The variables and their defaults are documented in docs/configuration.md; bad
values are reported by the system checks in uploads/checks.py at start-up.
"""

from pathlib import Path

import dj_database_url
from csp.constants import NONE, SELF

from directdrivex.env import Env

BASE_DIR = Path(__file__).resolve().parent.parent
env = Env()

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DEBUG = env.bool("DEBUG", False)

# Only DEBUG gets a built-in key; uploads.E004 refuses to start without a real one.
INSECURE_DEV_SECRET_KEY = "django-insecure-directdrivex-development-only"
SECRET_KEY = env.str("SECRET_KEY") or INSECURE_DEV_SECRET_KEY
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    # django-csp: its system checks catch settings of its old (3.x) format.
    "csp",
    # Cross-origin calls to /api/ from DIRECTDRIVEX_CORS_ORIGINS (its checks refuse a malformed origin at start).
    "corsheaders",
    # Not "django_ratelimit": the throttles only call it (uploads.views). Its app adds nothing but
    # checks of CACHES, chosen below on purpose, and one of them (E003, "not a shared cache") would
    # refuse the single-host default's local memory; directdrivex/asgi.py stops the server on any
    # error check, even one listed in SILENCED_SYSTEM_CHECKS.
    "uploads",
]

MIDDLEWARE = [
    # Outermost: every line logged for a request carries its id, refusals of the next one included.
    "uploads.logs.RequestIdMiddleware",
    # Before anything that may answer: a refusal to an allowed origin must be readable by its page.
    "corsheaders.middleware.CorsMiddleware",
    # Around every answer, the refusals below included: nosniff, Referrer-Policy, COOP, HSTS. Its
    # request half only redirects to HTTPS (SECURE_SSL_REDIRECT), which an API client should get too.
    "django.middleware.security.SecurityMiddleware",
    # Content-Security-Policy (below) on every answer, the refusals of the next one included.
    "csp.middleware.CSPMiddleware",
    # Then: a bad Host or an unknown /api/ path is a JSON refusal before any view or redirect answers it.
    "uploads.middleware.ApiEdgeMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "directdrivex.urls"
ASGI_APPLICATION = "directdrivex.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "uploads.context_processors.directdrivex",
            ],
        },
    },
]

# DATABASES is at the end of this file: the PostgreSQL pool is sized by a DirectDriveX setting.
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # socket_timeout well above channels-redis's 5 s blocking read: an idle
            # consumer must not die with TimeoutError (redis-py 8 defaults to 5 s).
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 30}]},
        }
    }
    # The sign-in and sign-up throttles count here (uploads.views), so every process shares one count:
    # add() and incr() are Redis' atomic SET NX and INCR. Short timeouts: a sign-in must not hang on
    # an unreachable Redis.
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "directdrivex",
            "OPTIONS": {"socket_connect_timeout": 5, "socket_timeout": 5},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    # Without Redis (the single-host default) each process counts in its own memory: exact for one
    # process; with several, a client gets up to the limit times the processes (docs/configuration.md,
    # "Throttling"). Production runs several processes, and Redis.
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "home"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"

# Production hardening; a TLS-terminating proxy sets X-Forwarded-Proto.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", not DEBUG)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", False)
if env.bool("SECURE_PROXY_SSL_HEADER", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# The pages have no inline script, style or event handler (tests/test_pages.py parses every one, and
# the browser tests fail on any violation Chromium reports), so nothing needs 'unsafe-inline' or a
# nonce; Django's admin needs nothing more either. The uploader and My files open WebSockets to
# their own origin (/ws/uploads/…, /ws/progress/): CSP Level 3's 'self' matches ws: and wss: on the
# page's host and port (Chromium since 71, Firefox, Safari since 16; tests/browser/test_csp.py checks
# it in Chromium), so no host needs naming. Under DEBUG, django-csp leaves Django's 404 and 500
# debug pages, which have inline styles, without the header.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}

REST_FRAMEWORK = {
    # Token first: an unauthenticated API call gets 401 with WWW-Authenticate.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON only: file bodies never go through Django's multipart parser.
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "uploads.api_errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "DirectDriveX API",
    "DESCRIPTION": "Resumable uploads of very large files. The WebSocket protocol is in docs/protocol.md.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Two "status" fields with different choices (an upload's, a share link's): named, not hashed.
    "ENUM_NAME_OVERRIDES": {
        "UploadStatusEnum": "uploads.models.Upload.Status",
        "ShareStatusEnum": "uploads.models.ShareLink.STATES",
    },
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # logfmt with the request id and client address of the entry point (uploads.logs; docs/operations.md).
    "formatters": {"logfmt": {"()": "uploads.logs.LogfmtFormatter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "logfmt"}},
    "root": {"handlers": ["console"], "level": "INFO"},
    "loggers": {
        # Django adds its own console handler under DEBUG: don't print every line twice.
        "django": {"handlers": ["console"], "level": "INFO", "propagate": False},
        "django.db.backends": {"level": "WARNING"},
    },
}

# --- DirectDriveX (docs/configuration.md) ---------------------------------
DIRECTDRIVEX_STORAGE_DIR = Path(env.str("DIRECTDRIVEX_STORAGE_DIR") or BASE_DIR / "var" / "storage")
# Where the bytes live (uploads.storage): "local" (the folder above) or "s3" (a bucket; docs/storage.md).
# Credentials for s3 come from the standard AWS variables or profile, never from here.
DIRECTDRIVEX_STORAGE_BACKEND = env.str("DIRECTDRIVEX_STORAGE_BACKEND") or "local"
DIRECTDRIVEX_S3_ENDPOINT_URL = env.str("DIRECTDRIVEX_S3_ENDPOINT_URL") or ""
DIRECTDRIVEX_S3_BUCKET = env.str("DIRECTDRIVEX_S3_BUCKET") or ""
DIRECTDRIVEX_S3_PREFIX = env.str("DIRECTDRIVEX_S3_PREFIX") or ""
DIRECTDRIVEX_S3_REGION = env.str("DIRECTDRIVEX_S3_REGION") or ""
# The s3 backend fills a part here before sending it: local, disposable, emptied at start.
DIRECTDRIVEX_SPOOL_DIR = Path(env.str("DIRECTDRIVEX_SPOOL_DIR") or BASE_DIR / "var" / "spool")
DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS = env.int("DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS", 20)
DIRECTDRIVEX_USER_UPLOAD_SLOTS = env.int("DIRECTDRIVEX_USER_UPLOAD_SLOTS", 5)
DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS = env.int("DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS", 30)
# The downloads through one share link count as one user (spec); 10 leaves room for a download manager.
DIRECTDRIVEX_USER_DOWNLOAD_SLOTS = env.int("DIRECTDRIVEX_USER_DOWNLOAD_SLOTS", 10)
# At least 5 s: a writer keeps a local safety margin of a fifth of the lease (uploads.writer).
DIRECTDRIVEX_SLOT_LEASE_SECONDS = env.int("DIRECTDRIVEX_SLOT_LEASE_SECONDS", 60, minimum=5)
DIRECTDRIVEX_IDLE_SECONDS = env.int("DIRECTDRIVEX_IDLE_SECONDS", 300)
DIRECTDRIVEX_DB_POOL_SIZE = env.int("DIRECTDRIVEX_DB_POOL_SIZE", 8)
DIRECTDRIVEX_MAX_REQUEST_BYTES = env.int("DIRECTDRIVEX_MAX_REQUEST_BYTES", 1 * MiB)
DIRECTDRIVEX_SLOT_HISTORY_DAYS = env.int("DIRECTDRIVEX_SLOT_HISTORY_DAYS", 7)
DIRECTDRIVEX_MAX_FILE_SIZE = env.int("DIRECTDRIVEX_MAX_FILE_SIZE", 10 * GiB)
DIRECTDRIVEX_USER_QUOTA = env.int("DIRECTDRIVEX_USER_QUOTA", 50 * GiB, minimum=0)
DIRECTDRIVEX_CHUNK_SIZE = env.int("DIRECTDRIVEX_CHUNK_SIZE", 1 * MiB)
DIRECTDRIVEX_WINDOW = env.int("DIRECTDRIVEX_WINDOW", 8 * MiB)
DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS = env.int("DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS", 86400)
DIRECTDRIVEX_SIGNUP = env.bool("DIRECTDRIVEX_SIGNUP", False)
# Longest a share link may live (uploads.services.shares); a link asked for without an expiry gets this.
DIRECTDRIVEX_SHARE_MAX_DAYS = env.int("DIRECTDRIVEX_SHARE_MAX_DAYS", 30, minimum=1)
# Other sites whose pages may call the API and the tus endpoint from a browser (Uppy on another domain):
# exact origins. The tus consumer (uploads.transports.tus) answers its own CORS; django-cors-headers the API.
# No credentials: a page on another origin authenticates with a token, never with this site's cookies.
DIRECTDRIVEX_CORS_ORIGINS = env.list("DIRECTDRIVEX_CORS_ORIGINS")
CORS_ALLOWED_ORIGINS = DIRECTDRIVEX_CORS_ORIGINS
CORS_URLS_REGEX = r"^/api/.*$"
CORS_EXPOSE_HEADERS = ["Retry-After", "Link", "Content-Disposition", "Content-Range", "ETag", "X-Request-ID"]
# Throttles (uploads.views): failed sign-ins per client address per minute and per username per
# hour, sign-up forms per client address per hour.
DIRECTDRIVEX_LOGIN_ATTEMPTS = env.int("DIRECTDRIVEX_LOGIN_ATTEMPTS", 10)
DIRECTDRIVEX_LOGIN_USERNAME_ATTEMPTS = env.int("DIRECTDRIVEX_LOGIN_USERNAME_ATTEMPTS", 20)
DIRECTDRIVEX_SIGNUP_ATTEMPTS = env.int("DIRECTDRIVEX_SIGNUP_ATTEMPTS", 10)
# Wrong share-link passwords: per client address a minute, per link an hour (uploads.throttles).
DIRECTDRIVEX_SHARE_PASSWORD_ATTEMPTS = env.int("DIRECTDRIVEX_SHARE_PASSWORD_ATTEMPTS", 10)
DIRECTDRIVEX_SHARE_LINK_PASSWORD_ATTEMPTS = env.int("DIRECTDRIVEX_SHARE_LINK_PASSWORD_ATTEMPTS", 30)
# Addresses or networks of the reverse proxies in front: from them, the client's address is taken
# from X-Forwarded-For (uploads.throttles.client_address; uploads.E013 rejects what is not an address).
DIRECTDRIVEX_TRUSTED_PROXIES = env.list("DIRECTDRIVEX_TRUSTED_PROXIES")
# django-ratelimit's "ip" key: the client's address as above, IPv6 grouped by /64 (its default).
RATELIMIT_IP_META_KEY = "uploads.throttles.client_address"
# An nginx `internal` location prefix (e.g. /_protected/, ending in a slash): downloads are then
# answered with X-Accel-Redirect and nginx sends the bytes; empty, the server streams them itself.
DIRECTDRIVEX_ACCEL_REDIRECT = env.str("DIRECTDRIVEX_ACCEL_REDIRECT")
# Bearer token for GET /metrics; empty, only staff sessions may read it (uploads.metrics_views).
DIRECTDRIVEX_METRICS_TOKEN = env.str("DIRECTDRIVEX_METRICS_TOKEN")
# prometheus_client's own variable, which it reads from the environment itself (uploads.metrics;
# uploads.E012): where every process of the host keeps its metrics, so that GET /metrics of any one
# reports them all. Unset, each process reports only itself (fine for one process). Here so that
# this file names every variable the service reads.
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR")
# How long a ws_url ticket admits new connections (not an environment variable).
DIRECTDRIVEX_TICKET_MAX_AGE = 600

# Read by uploads.checks (uploads.E001) so a bad value stops start-up with a message.
DIRECTDRIVEX_CONFIG_ERRORS = env.errors

# --- Errors at the edges (docs/api.md) -----------------------------------------
# The server refuses larger bodies at the transport (directdrivex/server.py);
# Django's own limit follows it, so raising DIRECTDRIVEX_MAX_REQUEST_BYTES raises
# both and a body the transport let through is never refused by Django.
DATA_UPLOAD_MAX_MEMORY_SIZE = DIRECTDRIVEX_MAX_REQUEST_BYTES

# --- Database (docs/deployment.md, "Database connections: the budget") ------
DATABASE_URL = env.str("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'var' / 'db.sqlite3'}"
# Seconds a request waits for a pooled PostgreSQL connection before it is refused
# with 503 unavailable (psycopg_pool's PoolTimeout is an OperationalError). A
# healthy request holds a connection for milliseconds, so a wait of seconds means
# the database is saturated or unreachable; 5 s matches Unavailable's Retry-After
# and stays inside a writer's lease safety margin (a fifth of the default lease).
DIRECTDRIVEX_DB_POOL_TIMEOUT = env.int("DIRECTDRIVEX_DB_POOL_TIMEOUT", 5)
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_health_checks=True)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A connection is a file handle here, so persistent ones are cheap and kept.
    DATABASES["default"]["CONN_MAX_AGE"] = 60
    # IMMEDIATE takes the write lock at BEGIN, so two processes never both read
    # and then fail to upgrade ("database is locked"); the timeout lets them queue.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
        "init_command": "PRAGMA journal_mode=WAL;",
    }
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Under ASGI every request runs in its own thread, so persistent connections
    # (CONN_MAX_AGE > 0) are never reused and pile up. Django's guidance for ASGI:
    # CONN_MAX_AGE = 0 (the default of parse()) and the psycopg pool, so a process
    # never opens more than DIRECTDRIVEX_DB_POOL_SIZE connections, whatever the load.
    # CONN_HEALTH_CHECKS makes the pool check a connection before handing it out.
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        # One warm connection per idle process; the rest open on demand and close
        # after the pool's max_idle (10 min) without use.
        "min_size": 1,
        "max_size": DIRECTDRIVEX_DB_POOL_SIZE,
        "timeout": DIRECTDRIVEX_DB_POOL_TIMEOUT,
    }
