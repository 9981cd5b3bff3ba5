"""ASGI entry point for Daphne: `daphne directdrivex.asgi:application`.

Daphne does not run Django's system checks, so they run here: a bad
configuration (uploads.E001…) stops the server at start-up with the check's
message instead of failing at the first upload.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "directdrivex.settings")
django.setup()

from django.core import checks  # noqa: E402
from django.core.exceptions import ImproperlyConfigured  # noqa: E402

_errors = [message for message in checks.run_checks() if message.is_serious()]
if _errors:
    raise ImproperlyConfigured("System checks failed:\n" + "\n".join(str(message) for message in _errors))

from directdrivex.routing import application  # noqa: E402, F401
