"""Configuration: environment parsing (directdrivex.env) and the start-up system checks (uploads.checks)."""

import json
import os
import random
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import DataError, connection, transaction
from django.utils import timezone

from directdrivex.env import Env
from directdrivex.settings import INSECURE_DEV_SECRET_KEY
from uploads.checks import (
    MAX_DAYS,
    MAX_SECONDS,
    check_configuration,
    largest_upload_create_body,
    slot_limit_capacity,
)
from uploads.models import Slot
from uploads.services.slots import slot_admit, slots_prune

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
    settings.DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS = 30
    settings.DIRECTDRIVEX_USER_DOWNLOAD_SLOTS = 10
    settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS = 60
    settings.DIRECTDRIVEX_IDLE_SECONDS = 300
    settings.DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS = 86400
    settings.DIRECTDRIVEX_SLOT_HISTORY_DAYS = 7
    settings.DIRECTDRIVEX_DB_POOL_SIZE = 8
    settings.DIRECTDRIVEX_MAX_REQUEST_BYTES = 1024 * 1024
    settings.DIRECTDRIVEX_MAX_FILE_SIZE = 10 * 1024**3
    return settings


def ids(errors) -> list[str]:
    return sorted(error.id for error in errors)


def found(errors, check_id: str) -> list[str]:
    """The variables that ``check_id`` names among ``errors``."""
    return [error.obj for error in errors if error.id == check_id]


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


def test_e003_a_per_user_upload_limit_above_the_global_limit(good_settings):
    good_settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS = 21

    assert found(check_configuration(None), "uploads.E003") == ["DIRECTDRIVEX_USER_UPLOAD_SLOTS"]

    good_settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS = 20
    assert check_configuration(None) == []


def test_a_per_user_download_limit_above_the_global_one_is_simply_never_reached(good_settings):
    good_settings.DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS = 4  # the per-user default stays 10

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


def test_every_problem_is_reported_at_once(good_settings, tmp_path):
    good_settings.DIRECTDRIVEX_CONFIG_ERRORS = [("DIRECTDRIVEX_WINDOW", "DIRECTDRIVEX_WINDOW='x' is not an integer.")]
    good_settings.DIRECTDRIVEX_CHUNK_SIZE = good_settings.DIRECTDRIVEX_WINDOW + 1
    good_settings.DIRECTDRIVEX_USER_UPLOAD_SLOTS = 99
    good_settings.SECRET_KEY = INSECURE_DEV_SECRET_KEY
    good_settings.ALLOWED_HOSTS = []
    good_settings.DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS = 40000
    good_settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS = 1
    good_settings.DIRECTDRIVEX_MAX_REQUEST_BYTES = 1024
    (tmp_path / "a-file").write_bytes(b"")
    good_settings.DIRECTDRIVEX_STORAGE_DIR = tmp_path / "a-file"

    assert ids(check_configuration(None)) == [f"uploads.E00{n}" for n in range(1, 10)] + ["uploads.W001"]


def test_e001_says_a_lease_under_5_seconds_is_too_short_and_why(good_settings):
    env = Env({"DIRECTDRIVEX_SLOT_LEASE_SECONDS": "4"})
    assert env.int("DIRECTDRIVEX_SLOT_LEASE_SECONDS", 60, minimum=5) == 60
    good_settings.DIRECTDRIVEX_CONFIG_ERRORS = env.errors

    [error] = check_configuration(None)

    assert (error.id, error.obj) == ("uploads.E001", "DIRECTDRIVEX_SLOT_LEASE_SECONDS")
    assert error.msg == "DIRECTDRIVEX_SLOT_LEASE_SECONDS=4 must be at least 5."
    assert "integer from 5 to" in error.hint
    assert "under 5 s" in error.hint


# --- uploads.E006: slot limits the index columns cannot hold --------------------------------


def test_the_slot_limit_capacity_is_the_smallint_range_plus_one():
    # Indexes run 0..limit-1, and PositiveSmallIntegerField holds 0..32767.
    assert slot_limit_capacity() == 32768


@pytest.mark.parametrize(
    "name",
    [
        "DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS",
        "DIRECTDRIVEX_USER_UPLOAD_SLOTS",
        "DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS",
        "DIRECTDRIVEX_USER_DOWNLOAD_SLOTS",
    ],
)
def test_e006_a_slot_limit_above_32768(good_settings, name):
    good_settings.DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS = 32768  # room for the per-user limit (E003)
    setattr(good_settings, name, 32768)
    assert check_configuration(None) == []

    setattr(good_settings, name, 32769)
    errors = check_configuration(None)

    assert found(errors, "uploads.E006") == [name]
    assert "at most 32768" in next(e.msg for e in errors if e.id == "uploads.E006")


def test_the_largest_limit_the_check_allows_admits_its_top_index(alice, limits, monkeypatch):
    limits(global_upload_slots=32768, user_upload_slots=32768)
    monkeypatch.setattr(random, "choice", max)  # admission picks the highest free index

    slot = slot_admit(Slot.Kind.UPLOAD, alice)

    assert Slot.objects.get(pk=slot.pk).global_index == 32767


@pytest.mark.skipif(connection.vendor != "postgresql", reason="SQLite does not enforce column widths")
def test_one_slot_more_than_the_check_allows_fails_at_admission_on_postgresql(alice, limits, monkeypatch):
    limits(global_upload_slots=32769, user_upload_slots=5)  # what E006 keeps from starting
    monkeypatch.setattr(random, "choice", max)

    with pytest.raises(DataError), transaction.atomic():
        slot_admit(Slot.Kind.UPLOAD, alice)


# --- uploads.E007: values outside the range that works -----------------------------------


@pytest.mark.parametrize(
    ("name", "bad", "good"),
    [
        ("DIRECTDRIVEX_SLOT_LEASE_SECONDS", 4, 5),
        ("DIRECTDRIVEX_SLOT_LEASE_SECONDS", MAX_SECONDS + 1, MAX_SECONDS),
        ("DIRECTDRIVEX_IDLE_SECONDS", 0, 1),
        ("DIRECTDRIVEX_IDLE_SECONDS", MAX_SECONDS + 1, MAX_SECONDS),
        ("DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS", 0, 1),
        ("DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS", 10**12, MAX_SECONDS),
        ("DIRECTDRIVEX_SLOT_HISTORY_DAYS", 0, 1),
        ("DIRECTDRIVEX_SLOT_HISTORY_DAYS", MAX_DAYS + 1, MAX_DAYS),
        ("DIRECTDRIVEX_DB_POOL_SIZE", 0, 1),
        ("DIRECTDRIVEX_GLOBAL_DOWNLOAD_SLOTS", 0, 1),
        ("DIRECTDRIVEX_USER_UPLOAD_SLOTS", 0, 1),
        ("DIRECTDRIVEX_USER_DOWNLOAD_SLOTS", 0, 1),
        ("DIRECTDRIVEX_MAX_FILE_SIZE", 2**63, 2**63 - 1),
        ("DIRECTDRIVEX_MAX_FILE_SIZE", 0, 1),
        ("DIRECTDRIVEX_USER_QUOTA", -1, 0),
        ("DIRECTDRIVEX_LOGIN_ATTEMPTS", 0, 1),
        ("DIRECTDRIVEX_LOGIN_USERNAME_ATTEMPTS", 0, 1),
        ("DIRECTDRIVEX_SIGNUP_ATTEMPTS", 0, 1),
        ("DIRECTDRIVEX_SHARE_MAX_DAYS", 0, 1),
        ("DIRECTDRIVEX_SHARE_MAX_DAYS", MAX_DAYS + 1, MAX_DAYS),
        ("DIRECTDRIVEX_SHARE_PASSWORD_ATTEMPTS", 0, 1),
        ("DIRECTDRIVEX_SHARE_LINK_PASSWORD_ATTEMPTS", 0, 1),
    ],
)
def test_e007_a_setting_outside_its_working_range(good_settings, name, bad, good):
    setattr(good_settings, name, bad)
    errors = check_configuration(None)

    assert found(errors, "uploads.E007") == [name]
    assert all(error.is_serious() and error.hint for error in errors)

    setattr(good_settings, name, good)
    assert check_configuration(None) == []


def test_the_longest_durations_the_checks_allow_still_compute_dates(alice, limits):
    limits(slot_lease_seconds=MAX_SECONDS, slot_history_days=MAX_DAYS)

    slot = slot_admit(Slot.Kind.UPLOAD, alice)
    slots_prune()

    assert Slot.objects.get(pk=slot.pk).lease_expires_at > timezone.now() + timedelta(days=MAX_DAYS - 1)
    with pytest.raises(OverflowError):  # what E007's maximum is there for
        timezone.now() + timedelta(seconds=10**12)


# --- uploads.E008: a request limit smaller than a valid POST /api/uploads/ -----------------


def test_e008_a_request_limit_below_the_largest_create_body(good_settings):
    good_settings.DIRECTDRIVEX_MAX_REQUEST_BYTES = largest_upload_create_body()
    assert check_configuration(None) == []

    good_settings.DIRECTDRIVEX_MAX_REQUEST_BYTES = largest_upload_create_body() - 1
    assert found(check_configuration(None), "uploads.E008") == ["DIRECTDRIVEX_MAX_REQUEST_BYTES"]


def test_the_largest_create_body_is_a_valid_post(alice_client, limits):
    limits(max_file_size=2**63 - 1, user_quota=2**63 - 1)
    body = json.dumps(
        {"filename": "\U0001f4be" * 16384, "size": 2**63 - 1, "sha256": "0" * 64, "fingerprint": "\U0001f4be" * 256}
    )
    assert len(body.encode()) == largest_upload_create_body()

    response = alice_client.post("/api/uploads/", body, content_type="application/json")

    assert response.status_code == 201, response.content


# --- uploads.E009: a storage folder that cannot hold uploads -------------------------------


def test_e009_a_storage_path_that_is_a_file(good_settings, tmp_path):
    good_settings.DIRECTDRIVEX_STORAGE_DIR = tmp_path / "storage"
    (tmp_path / "storage").write_bytes(b"")

    assert found(check_configuration(None), "uploads.E009") == ["DIRECTDRIVEX_STORAGE_DIR"]


def test_e009_a_storage_layout_folder_that_is_a_file(good_settings, tmp_path):
    good_settings.DIRECTDRIVEX_STORAGE_DIR = tmp_path / "storage"
    (tmp_path / "storage").mkdir()
    (tmp_path / "storage" / "partial").write_bytes(b"")

    assert found(check_configuration(None), "uploads.E009") == ["DIRECTDRIVEX_STORAGE_DIR"]


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder this process cannot create anything in: read-only by mode, or immutable when we are root."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:
        # Root ignores the mode; an immutable folder refuses even root (CI runs as root).
        subprocess.run(["chattr", "+i", str(locked)], check=True)
    yield locked
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(locked)], check=True)


def test_e009_a_storage_folder_that_cannot_be_created(good_settings, unwritable_folder):
    good_settings.DIRECTDRIVEX_STORAGE_DIR = unwritable_folder / "storage"

    assert found(check_configuration(None), "uploads.E009") == ["DIRECTDRIVEX_STORAGE_DIR"]


def test_a_storage_folder_that_does_not_exist_yet_is_fine(good_settings, tmp_path):
    good_settings.DIRECTDRIVEX_STORAGE_DIR = tmp_path / "not" / "yet" / "there"

    assert check_configuration(None) == []
    assert not (tmp_path / "not").exists()  # the check looks; it creates nothing


# --- uploads.W001: a chunk above 4 MiB works but is not measured ---------------------------


def test_w001_a_chunk_above_4_mib_is_a_warning_not_an_error(good_settings):
    good_settings.DIRECTDRIVEX_CHUNK_SIZE = 4 * 1024 * 1024
    assert check_configuration(None) == []

    good_settings.DIRECTDRIVEX_CHUNK_SIZE = 4 * 1024 * 1024 + 1
    [warning] = check_configuration(None)

    assert (warning.id, warning.obj) == ("uploads.W001", "DIRECTDRIVEX_CHUNK_SIZE")
    assert not warning.is_serious()


# --- manage.py check, end to end ------------------------------------------------


def manage_check(*options: str, **environ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRECTDRIVEX_") and k != "DEBUG"}
    env.update({"DEBUG": "1", "DJANGO_SETTINGS_MODULE": "directdrivex.settings", **environ})
    return subprocess.run(
        [sys.executable, "manage.py", "check", *options],
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
        ("DIRECTDRIVEX_LOGIN_ATTEMPTS", "0"),
        ("DIRECTDRIVEX_LOGIN_USERNAME_ATTEMPTS", "many"),
        ("DIRECTDRIVEX_SIGNUP_ATTEMPTS", "-5"),
        ("DIRECTDRIVEX_SHARE_MAX_DAYS", "0"),
        ("DIRECTDRIVEX_SHARE_PASSWORD_ATTEMPTS", "ten"),
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


def test_manage_check_explains_a_lease_under_5_seconds():
    result = manage_check(DIRECTDRIVEX_SLOT_LEASE_SECONDS="4")

    assert result.returncode != 0
    assert "DIRECTDRIVEX_SLOT_LEASE_SECONDS: (uploads.E001) DIRECTDRIVEX_SLOT_LEASE_SECONDS=4 must be at least 5." in (
        result.stderr
    )


def test_manage_check_fails_on_a_slot_limit_the_column_cannot_hold():
    result = manage_check(DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS="32769")

    assert result.returncode != 0
    assert "DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS: (uploads.E006)" in result.stderr


@pytest.mark.parametrize("redis_url", ["", "redis://127.0.0.1:6379/0"], ids=["local-memory", "redis"])
def test_manage_check_deploy_accepts_the_throttles_cache_with_or_without_redis(redis_url):
    # The CI's production-like check fails on any warning, and the ASGI entry point on any error,
    # silenced or not: neither cache may draw one (docs/configuration.md, "Throttling").
    result = manage_check(
        "--deploy",
        "--fail-level",
        "WARNING",
        REDIS_URL=redis_url,
        DEBUG="0",
        SECRET_KEY="a-real-secret-key-" + "x" * 40,
        ALLOWED_HOSTS="files.example.com",
        SECURE_SSL_REDIRECT="1",
        SECURE_HSTS_SECONDS="31536000",
        SECURE_HSTS_INCLUDE_SUBDOMAINS="1",
        SECURE_HSTS_PRELOAD="1",
    )

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def test_manage_check_starts_with_a_large_chunk_and_warns():
    result = manage_check(DIRECTDRIVEX_CHUNK_SIZE=str(8 * 1024 * 1024), DIRECTDRIVEX_WINDOW=str(64 * 1024 * 1024))

    assert result.returncode == 0, result.stderr
    assert "(uploads.W001)" in result.stdout + result.stderr


# --- uploads.E010: an X-Accel-Redirect prefix nginx could never match ----------------------


@pytest.mark.parametrize("prefix", ["_protected/", "/_protected", "/", "_protected", "/_pro.tected/", "/a b/"])
def test_e010_an_accel_redirect_prefix_without_both_slashes(good_settings, prefix):
    good_settings.DIRECTDRIVEX_ACCEL_REDIRECT = prefix

    assert found(check_configuration(None), "uploads.E010") == ["DIRECTDRIVEX_ACCEL_REDIRECT"]


@pytest.mark.parametrize("prefix", ["", "/_protected/", "/internal/files/"])
def test_e010_accepts_no_prefix_or_a_location_prefix(good_settings, prefix):
    good_settings.DIRECTDRIVEX_ACCEL_REDIRECT = prefix

    assert found(check_configuration(None), "uploads.E010") == []


# --- uploads.E013: trusted proxies that are not addresses ----------------------------------------


@pytest.mark.parametrize("entries", [["localhost"], ["127.0.0.1", "nginx"], ["10.0.0.0/33"], ["127.0.0.1:8000"]])
def test_e013_a_trusted_proxy_that_is_not_an_address_or_network(good_settings, entries):
    good_settings.DIRECTDRIVEX_TRUSTED_PROXIES = entries

    assert found(check_configuration(None), "uploads.E013") == ["DIRECTDRIVEX_TRUSTED_PROXIES"]


@pytest.mark.parametrize("entries", [[], ["127.0.0.1", "::1"], ["10.0.0.0/8", "fd00::/8"], ["10.1.2.3/8"]])
def test_e013_accepts_addresses_and_networks(good_settings, entries):
    good_settings.DIRECTDRIVEX_TRUSTED_PROXIES = entries

    assert check_configuration(None) == []
