"""Fixtures shared by every test: the named users, API clients per auth method, limits, a private storage folder.

alice owns uploads, bob is another user, staff is an admin. alice's client
authenticates with a DRF token (``Authorization: Token <key>``), bob's and
staff's with a session, so both ways into the API are exercised.

DIRECTDRIVEX_TEST_STORAGE picks the storage backend the tests run on: ``local``
(the default) or ``s3``, where every test not marked ``local_storage`` stores
its bytes under a prefix of its own on the session's S3 server (SeaweedFS,
tests/support/seaweedfs.py), started on first use.
"""

import dataclasses
import functools
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.hashers import make_password
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.support import seaweedfs
from uploads import storage

TEST_STORAGE = os.environ.get("DIRECTDRIVEX_TEST_STORAGE", "local")
# How long an in-process WebSocket handshake (WebsocketCommunicator.connect) may take: channels' default of
# 1 s fails on a loaded machine (CI runs its test runs side by side on two cores), and a test that fails
# in its handshake leaves its consumer to the teardown.
CONNECT_SECONDS = 10

PASSWORD = "correct-horse-battery-staple"


@functools.cache
def _password_hash() -> str:
    # Hashing with the real hasher costs about half a second: do it once per run.
    return make_password(PASSWORD)


def make_user(username: str, **fields):
    """A user with the shared PASSWORD, created with the ORM."""
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create(
        username=username, email=f"{username}@example.com", password=_password_hash(), **fields
    )


def write_part(key: str, data: bytes, size: int | None = None) -> None:
    """Bytes in an upload's part file, written as a writer would (through uploads.storage; no commit)."""
    # As admission would, a few part numbers reserved (an object store sends a whole part at once).
    reserved = storage.Committed(reserved=storage.backend().part_numbers_ahead)
    part = storage.backend().open_part(key, reserved, size or len(data))
    try:
        part.append([data])
        part.sync()
    finally:
        part.close()


def complete_upload(user, upload_id, data: bytes) -> None:
    """Finish an upload the way the consumer does: admit a writer, write, commit, finalize, mark complete."""
    from uploads.services.grants import writer_admit, writer_commit, writer_committed, writer_complete

    grant = writer_admit(user, upload_id, "test-writer")
    part = storage.backend().open_part(grant.storage_key, grant.committed(), grant.size)
    try:
        part.append([data])
        durable = part.sync()
        writer_commit(grant, durable.offset, hash_state=durable.hash_state, durable=durable)
        part.committed(durable)
        part.finalize(writer_committed(grant))
    finally:
        part.close()
    writer_complete(grant)


def finish_upload(user, data: bytes, *, filename: str = "data.bin", sha256: str = ""):
    """A complete upload of ``data`` with its file in place, finished the way the consumer finishes one."""
    from uploads.models import Upload
    from uploads.services.uploads import upload_create

    upload, _slot = upload_create(user, filename=filename, size=len(data), sha256=sha256)
    complete_upload(user, upload.pk, data)
    return Upload.objects.get(pk=upload.pk)


def token_client(user) -> APIClient:
    """An API client that sends ``Authorization: Token <key>`` (how scripts call the API)."""
    token, _created = Token.objects.get_or_create(user=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def session_client(user) -> APIClient:
    """An API client signed in with a session cookie (how the pages call the API)."""
    client = APIClient()
    client.force_login(user)
    return client


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix, tmp_path_factory):
    """On SQLite, test in a database file, as production runs, not in Django's shared-cache memory database.

    Writers, the API and the tests reach the database from several threads at
    once; a shared-cache memory database answers a second writer "database
    table is locked" at once, where a WAL file waits its busy timeout.
    """
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"] == "django.db.backends.sqlite3":
        database.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("sqlite") / "test.sqlite3")


def pytest_configure(config):
    if TEST_STORAGE not in ("local", "s3"):
        raise pytest.UsageError(f"DIRECTDRIVEX_TEST_STORAGE={TEST_STORAGE!r}: use local (the default) or s3")


@pytest.fixture(autouse=True)
def storage_dir(settings, tmp_path, monkeypatch):
    """Every test stores bytes in its own folder, never in var/ (subprocesses inherit it too)."""
    path = tmp_path / "storage"
    settings.DIRECTDRIVEX_STORAGE_DIR = path
    monkeypatch.setenv("DIRECTDRIVEX_STORAGE_DIR", str(path))
    return path


@dataclasses.dataclass(frozen=True)
class S3TestStorage:
    """Where one test's objects live: ``prefix`` in ``bucket`` at ``endpoint``; ``client`` is boto3's."""

    endpoint: str
    bucket: str
    prefix: str
    spool: Path
    client: Any


@pytest.fixture(scope="session")
def s3_server():
    """``(endpoint_url, bucket)`` of the session's S3 server, started by the first test that needs it."""
    with seaweedfs.s3_server() as server:
        yield server


def use_s3_storage(settings, monkeypatch, tmp_path: Path, endpoint: str, bucket: str) -> S3TestStorage:
    """Point the settings and the environment (subprocesses inherit it) at a new prefix of ``bucket``."""
    s3 = S3TestStorage(endpoint, bucket, f"t/{uuid.uuid4().hex}/", tmp_path / "spool", seaweedfs.s3_client(endpoint))
    values = {
        "DIRECTDRIVEX_STORAGE_BACKEND": "s3",
        "DIRECTDRIVEX_S3_ENDPOINT_URL": s3.endpoint,
        "DIRECTDRIVEX_S3_BUCKET": s3.bucket,
        "DIRECTDRIVEX_S3_PREFIX": s3.prefix,
        "DIRECTDRIVEX_S3_REGION": seaweedfs.REGION,
        "DIRECTDRIVEX_SPOOL_DIR": s3.spool,
    }
    for name, value in values.items():
        setattr(settings, name, value)
        monkeypatch.setenv(name, str(value))
    # boto3 finds its credentials in the environment; a developer's profile or session token must not win.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.SECRET_ACCESS_KEY)
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return s3


@pytest.fixture(scope="session", autouse=True)
def shared_servers_on_s3(request, tmp_path_factory):
    """With DIRECTDRIVEX_TEST_STORAGE=s3, servers a module starts once for all its tests store in the bucket too.

    Such a server is started before the per-test fixture below sets each
    test's own prefix, and keeps the environment it was started with: this
    gives it a prefix of the session's. tests/support/stored.py reads a live
    server's storage from that server's own environment.
    """
    if TEST_STORAGE != "s3":
        yield None
        return
    endpoint, bucket = request.getfixturevalue("s3_server")
    values = {
        "DIRECTDRIVEX_STORAGE_BACKEND": "s3",
        "DIRECTDRIVEX_S3_ENDPOINT_URL": endpoint,
        "DIRECTDRIVEX_S3_BUCKET": bucket,
        "DIRECTDRIVEX_S3_PREFIX": f"t/shared-{uuid.uuid4().hex}/",
        "DIRECTDRIVEX_S3_REGION": seaweedfs.REGION,
        "DIRECTDRIVEX_SPOOL_DIR": str(tmp_path_factory.mktemp("shared-spool")),
        "AWS_ACCESS_KEY_ID": seaweedfs.ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.SECRET_ACCESS_KEY,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        yield values


@pytest.fixture(autouse=True)
def storage_backend(request, settings, monkeypatch, tmp_path) -> S3TestStorage | None:
    """With DIRECTDRIVEX_TEST_STORAGE=s3, the test's S3TestStorage (unless marked local_storage); else None."""
    if TEST_STORAGE != "s3":
        return None
    if request.node.get_closest_marker("local_storage"):
        # The session's environment points servers at the bucket (shared_servers_on_s3): not this test's.
        settings.DIRECTDRIVEX_STORAGE_BACKEND = "local"
        monkeypatch.setenv("DIRECTDRIVEX_STORAGE_BACKEND", "local")
        return None
    return use_s3_storage(settings, monkeypatch, tmp_path, *request.getfixturevalue("s3_server"))


@pytest.fixture
def s3_storage(storage_backend, request, settings, monkeypatch, tmp_path) -> S3TestStorage:
    """The s3 backend for this test whatever DIRECTDRIVEX_TEST_STORAGE says (for tests of the backend itself)."""
    if storage_backend is not None:
        return storage_backend
    return use_s3_storage(settings, monkeypatch, tmp_path, *request.getfixturevalue("s3_server"))


@pytest.fixture
def limits(settings):
    """Set DirectDriveX limits for one test: ``limits(user_upload_slots=2, global_upload_slots=3)``.

    Names are the settings without the DIRECTDRIVEX_ prefix, lowercase; a typo fails loudly.
    """

    def apply(**values):
        for name, value in values.items():
            setting = f"DIRECTDRIVEX_{name.upper()}"
            if not hasattr(settings, setting):
                raise AttributeError(f"no setting {setting}")
            setattr(settings, setting, value)
        return settings

    return apply


@pytest.fixture
def alice(db):
    return make_user("alice")


@pytest.fixture
def bob(db):
    return make_user("bob")


@pytest.fixture
def staff(db):
    return make_user("staff", is_staff=True)


@pytest.fixture
def anonymous_client():
    return APIClient()


@pytest.fixture
def alice_client(alice):
    return token_client(alice)


@pytest.fixture
def bob_client(bob):
    return session_client(bob)


@pytest.fixture
def staff_client(staff):
    return session_client(staff)
