"""Configuration: environment parsing (directdrivex.env) and the start-up system checks (uploads.checks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from directdrivex.env import Env
from directdrivex.settings import INSECURE_DEV_SECRET_KEY
from uploads.checks import check_configuration

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def good_settings(settings):
    """A production-like configuration that passes every check."""
    settings.DEBUG = False
    settings.SECRET_KEY = "a-real-secret-key-" + "x" * 40
    settings.ALLOWED_HOSTS = ["files.example.com"]
    settings.DIRECTDRIVEX_CONFIG_ERRORS = []
    settings.DIRECTDRIVEX_CHUNK_SIZE = 1024 * 1024
    settings.DIRECTDRIVEX_WINDOW = 8 * 1024 * 1024
    settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS = 5
    settings.DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS = 20
    return settings


def ids(errors) -> list[str]:
    return sorted(error.id for error in errors)


# --- directdrivex.env ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"),
    [("42", 42), (" 42 ", 42), ("1_048_576", 1_048_576), ("1", 1), ("007", 7)],
)
def test_env_reads_integers(raw, value):
    env = Env({"N": raw})

    assert env.int("N", 5) == value
    assert env.errors == []


@pytest.mark.parametrize("raw", ["abc", "", "1.5", "1e6", "10MB", "0x10", "1 000", "--1", "½"])
def test_env_records_a_non_integer_and_uses_the_default(raw):
    env = Env({"DIRECTDRIVEX_CHUNK_SIZE": raw})

    assert env.int("DIRECTDRIVEX_CHUNK_SIZE", 5) == 5
    assert env.errors == [("DIRECTDRIVEX_CHUNK_SIZE", f"DIRECTDRIVEX_CHUNK_SIZE={raw!r} is not an integer.")]


@pytest.mark.parametrize("raw", ["-1", "-1048576", "0"])
def test_env_records_a_value_below_the_minimum(raw):
    env = Env({"DIRECTDRIVEX_WINDOW": raw})

    assert env.int("DIRECTDRIVEX_WINDOW", 8) == 8
    assert env.errors == [("DIRECTDRIVEX_WINDOW", f"DIRECTDRIVEX_WINDOW={int(raw)} must be at least 1.")]


def test_env_accepts_zero_where_the_minimum_is_zero():
    env = Env({"DIRECTDRIVEX_USER_QUOTA": "0"})

    assert env.int("DIRECTDRIVEX_USER_QUOTA", 50, minimum=0) == 0
    assert env.int("UNSET", 50, minimum=0) == 50
    assert env.errors == []


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("true", True), ("ON", True), (" yes ", True), ("0", False), ("off", False), ("", False)],
)
def test_env_reads_booleans(raw, value):
    env = Env({"DEBUG": raw})

    assert env.bool("DEBUG", not value) is value
    assert env.errors == []


def test_env_records_a_bad_boolean():
    env = Env({"DEBUG": "maybe"})

    assert env.bool("DEBUG", False) is False
    assert [name for name, _message in env.errors] == ["DEBUG"]


def test_env_reads_comma_separated_lists():
    env = Env({"ALLOWED_HOSTS": " a.example.com, b.example.com,,"})

    assert env.list("ALLOWED_HOSTS") == ["a.example.com", "b.example.com"]
    assert env.list("UNSET", ["x"]) == ["x"]


def test_env_collects_every_error_not_just_the_first():
    env = Env({"A": "x", "B": "-3", "C": "nope"})

    env.int("A", 1)
    env.int("B", 1)
    env.bool("C", False)

    assert [name for name, _message in env.errors] == ["A", "B", "C"]


# --- uploads.checks -------------------------------------------------------------


def test_a_good_configuration_passes(good_settings):
    assert check_configuration(None) == []


def test_e001_reports_each_bad_environment_value(good_settings):
    env = Env({"DIRECTDRIVEX_CHUNK_SIZE": "abc", "DIRECTDRIVEX_USER_UPLOAD_SLOTS": "-2"})
    env.int("DIRECTDRIVEX_CHUNK_SIZE", 1)
    env.int("DIRECTDRIVEX_USER_UPLOAD_SLOTS", 5)
    good_settings.DIRECTDRIVEX_CONFIG_ERRORS = env.errors

    errors = check_configuration(None)

    assert ids(errors) == ["uploads.E001", "uploads.E001"]
    assert [error.obj for error in errors] == ["DIRECTDRIVEX_CHUNK_SIZE", "DIRECTDRIVEX_USER_UPLOAD_SLOTS"]
    assert "'abc' is not an integer" in errors[0].msg
    assert "-2 must be at least 1" in errors[1].msg
    assert all(error.is_serious() for error in errors)


def test_e002_a_chunk_larger_than_the_window(good_settings):
    good_settings.DIRECTDRIVEX_CHUNK_SIZE = 2 * 1024 * 1024
    good_settings.DIRECTDRIVEX_WINDOW = 2 * 1024 * 1024 - 1

    assert ids(check_configuration(None)) == ["uploads.E002"]

    good_settings.DIRECTDRIVEX_WINDOW = 2 * 1024 * 1024
    assert check_configuration(None) == []


def test_e003_a_per_user_limit_above_the_global_limit(good_settings):
    good_settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS = 21

    assert ids(check_configuration(None)) == ["uploads.E003"]

    good_settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS = 20
    assert check_configuration(None) == []


def test_e004_the_development_secret_key_with_debug_off(good_settings):
    # settings.py turns an empty SECRET_KEY into the development key, so this covers "missing" too.
    good_settings.SECRET_KEY = INSECURE_DEV_SECRET_KEY

    assert ids(check_configuration(None)) == ["uploads.E004"]

    good_settings.DEBUG = True
    assert check_configuration(None) == []


def test_e005_no_allowed_hosts_with_debug_off(good_settings):
    good_settings.ALLOWED_HOSTS = []

    assert ids(check_configuration(None)) == ["uploads.E005"]

    good_settings.DEBUG = True
    assert check_configuration(None) == []


def test_every_problem_is_reported_at_once(good_settings):
    good_settings.DIRECTDRIVEX_CONFIG_ERRORS = [("DIRECTDRIVEX_WINDOW", "DIRECTDRIVEX_WINDOW='x' is not an integer.")]
    good_settings.DIRECTDRIVEX_CHUNK_SIZE = good_settings.DIRECTDRIVEX_WINDOW + 1
    good_settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS = 99
    good_settings.SECRET_KEY = INSECURE_DEV_SECRET_KEY
    good_settings.ALLOWED_HOSTS = []

    assert ids(check_configuration(None)) == [f"uploads.E00{n}" for n in range(1, 6)]


# --- manage.py check, end to end ------------------------------------------------


def manage_check(**environ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRECTDRIVEX_") and k != "DEBUG"}
    env.update({"DEBUG": "1", "DJANGO_SETTINGS_MODULE": "directdrivex.settings", **environ})
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_manage_check_passes_with_a_good_environment():
    result = manage_check()

    assert result.returncode == 0, result.stderr
    assert "uploads.E" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("DIRECTDRIVEX_CHUNK_SIZE", "abc"),
        ("DIRECTDRIVEX_USER_UPLOAD_SLOTS", "-1"),
        ("DIRECTDRIVEX_SLOT_LEASE_SECONDS", "1.5"),
    ],
)
def test_manage_check_fails_on_a_bad_value_and_names_e001(name, raw):
    result = manage_check(**{name: raw})

    assert result.returncode != 0
    assert f"{name}: (uploads.E001)" in result.stderr


def test_manage_check_fails_when_the_chunk_exceeds_the_window():
    result = manage_check(DIRECTDRIVEX_CHUNK_SIZE="4096", DIRECTDRIVEX_WINDOW="1024")

    assert result.returncode != 0
    assert "(uploads.E002)" in result.stderr


def test_manage_check_refuses_production_without_a_secret_key():
    result = manage_check(DEBUG="0", ALLOWED_HOSTS="files.example.com", SECRET_KEY="")

    assert result.returncode != 0
    assert "(uploads.E004)" in result.stderr
