"""System checks that stop start-up on bad configuration (ids uploads.E001…).

Daphne does not run system checks by itself: directdrivex/asgi.py runs them
before serving, and every manage.py command that serves or migrates does too.
"""

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.compatibility, deploy=False)
def check_configuration(app_configs, **kwargs):
    errors = [
        Error(message, hint=f"Fix or unset {name}; see docs/configuration.md.", id="uploads.E001", obj=name)
        for name, message in settings.DIRECTDRIVEX_CONFIG_ERRORS
    ]
    chunk, window = settings.DIRECTDRIVEX_CHUNK_SIZE, settings.DIRECTDRIVEX_WINDOW
    if chunk > window:
        errors.append(
            Error(
                f"DIRECTDRIVEX_CHUNK_SIZE ({chunk}) is larger than DIRECTDRIVEX_WINDOW ({window}).",
                hint="A client could never send a full frame; make the window at least one chunk (8 chunks is usual).",
                id="uploads.E002",
            )
        )
    if settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS > settings.DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS:
        errors.append(
            Error(
                "DIRECTDRIVEX_USER_UPLOAD_SLOTS is larger than DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS.",
                hint="The per-user limit cannot exceed the global one.",
                id="uploads.E003",
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
    return errors
