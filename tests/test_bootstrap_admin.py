"""`manage.py bootstrap_admin`: the local admin account that `make run` creates in DEBUG only."""

import re
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.authtoken.models import Token

from tests.conftest import make_user


def bootstrap(**options) -> str:
    out = StringIO()
    call_command("bootstrap_admin", stdout=out, **options)
    return out.getvalue()


def printed(field: str, output: str) -> str:
    match = re.search(rf"^\s*{field}:\s+(\S+)$", output, re.MULTILINE)
    assert match, f"no {field} line in:\n{output}"
    return match.group(1)


@pytest.fixture
def debug(settings):
    settings.DEBUG = True
    return settings


def test_first_run_creates_a_superuser_whose_printed_password_and_token_work(db, debug):
    output = bootstrap()

    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff and admin.is_active
    assert admin.check_password(printed("password", output))
    assert Token.objects.get(user=admin).key == printed("token", output)
    assert "http://127.0.0.1:8000/accounts/login/" in output


def test_printed_token_authenticates_an_upload_creation(db, debug, client):
    token = printed("token", bootstrap())

    response = client.post(
        "/api/uploads/",
        {"filename": "a.bin", "size": 123},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Token {token}",
    )

    assert response.status_code == 201, response.content
    assert response.json()["status"] == "uploading"


def test_second_run_changes_nothing_and_prints_no_password(db, debug):
    first = bootstrap()
    password = printed("password", first)

    second = bootstrap()

    admin = get_user_model().objects.get(username="admin")
    assert get_user_model().objects.count() == 1
    assert admin.check_password(password)
    assert Token.objects.filter(user=admin).count() == 1
    assert password not in second
    assert "changepassword admin" in second


def test_an_existing_superuser_is_left_alone_and_no_admin_is_created(db, debug):
    make_user("root", is_staff=True, is_superuser=True)

    output = bootstrap()

    assert not get_user_model().objects.filter(username="admin").exists()
    assert not Token.objects.exists()
    assert "changepassword root" in output


def test_a_plain_user_named_admin_is_not_promoted(db, debug):
    make_user("admin")

    bootstrap()

    admin = get_user_model().objects.get(username="admin")
    assert not admin.is_superuser and not admin.is_staff
    assert not Token.objects.exists()


def test_refuses_without_debug_and_creates_nothing(db, settings):
    settings.DEBUG = False

    with pytest.raises(CommandError, match="DEBUG"):
        bootstrap()

    assert not get_user_model().objects.exists()


def test_base_url_option_goes_into_the_sign_in_url(db, debug):
    output = bootstrap(base_url="http://127.0.0.1:9000/")

    assert "http://127.0.0.1:9000/accounts/login/" in output
    assert "http://127.0.0.1:9000/api/uploads/" in output
