"""Creates a local admin account for development (DEBUG only) and tells how to sign in, once.

`make run` calls this before starting the server. The generated password is
printed only when the account is created; later runs say how to reset it.
"""

import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from rest_framework.authtoken.models import Token

USERNAME = "admin"


class Command(BaseCommand):
    help = "DEBUG only: create a superuser 'admin' with a generated password and API token if none exists."

    def add_arguments(self, parser):
        parser.add_argument(
            "--base-url",
            default="http://127.0.0.1:8000",
            help="Where the development server answers (used in the printed sign-in URL and curl example).",
        )

    def handle(self, *args, base_url, **options):
        if not settings.DEBUG:
            raise CommandError(
                "bootstrap_admin only runs with DEBUG on; in production use `manage.py createsuperuser`."
            )
        base_url = base_url.rstrip("/")
        users = get_user_model()
        existing = users.objects.filter(is_superuser=True).order_by("pk").first()
        if existing is not None:
            self.stdout.write(
                f"A superuser already exists ({existing.get_username()}): sign in at {base_url}/accounts/login/.\n"
                f"Forgot the password?  .venv/bin/python manage.py changepassword {existing.get_username()}\n"
                f"Need the API token?   .venv/bin/python manage.py drf_create_token {existing.get_username()}"
            )
            return
        if users.objects.filter(username=USERNAME).exists():
            # Not ours to promote or overwrite: say what to do and let the server start.
            self.stdout.write(
                self.style.WARNING(
                    f"A user named {USERNAME!r} exists but is not a superuser; "
                    "create one with `.venv/bin/python manage.py createsuperuser`."
                )
            )
            return

        password = secrets.token_urlsafe(16)
        with transaction.atomic():
            user = users.objects.create_superuser(username=USERNAME, email="", password=password)
            token = Token.objects.create(user=user)
        self.stdout.write(
            self.style.SUCCESS("Created a local admin account (shown once; it is not stored in clear anywhere):")
        )
        self.stdout.write(
            f"  sign in:  {base_url}/accounts/login/\n"
            f"  username: {USERNAME}\n"
            f"  password: {password}\n"
            f"  token:    {token.key}\n"
            "  try it:\n"
            f"    curl -H 'Authorization: Token {token.key}' -H 'Content-Type: application/json' \\\n"
            f'         -d \'{{"filename": "a.bin", "size": 123}}\' {base_url}/api/uploads/'
        )
