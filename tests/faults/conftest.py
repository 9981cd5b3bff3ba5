"""The fault suite's set-up: its scale, its deployments, and the count it prints at the end of the run.

``make test`` runs it at a reduced count. The multi-process deployments (two
hosts sharing PostgreSQL and Redis) skip on SQLite; CI runs them in a run of
their own on PostgreSQL + Redis, on both storage backends, the folder and
SeaweedFS (.ci/run). The fuzzers run in both.
``make faults`` runs the full count (DIRECTDRIVEX_FAULTS=full) and writes the
figures docs/reliability.md publishes (DIRECTDRIVEX_FAULTS_REPORT).
"""

import os
import uuid
from pathlib import Path

import pytest

from tests.faults.cluster import Client, Cluster, Site, Storage
from tests.faults.tally import TALLY
from tests.support import seaweedfs
from tests.support.live_backend import live_backend

FULL = os.environ.get("DIRECTDRIVEX_FAULTS") == "full"
HERE = Path(__file__).parent


def scaled(reduced: int, full: int) -> int:
    """How many of something the run does: ``full`` under ``make faults``, ``reduced`` in ``make test``."""
    return full if FULL else reduced


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.faults)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    counted = report.when == "call" or (report.when == "setup" and report.outcome != "passed")
    if counted and HERE in Path(item.fspath).parents:
        TALLY.tests[report.outcome] += 1


def pytest_terminal_summary(terminalreporter):
    if TALLY.empty():
        return
    scale = "full (make faults)" if FULL else "reduced (make test)"
    terminalreporter.section(f"DirectDriveX fault suite, {scale} count")
    for line in TALLY.lines():
        terminalreporter.write_line(line)
    report = os.environ.get("DIRECTDRIVEX_FAULTS_REPORT")
    if report:
        Path(report).write_text(TALLY.to_json() + "\n")
        terminalreporter.write_line(f"written to {report}")


def needs_shared_services() -> None:
    """Two hosts share a database and a channel layer over the network: PostgreSQL and Redis."""
    database_url, redis_url = os.environ.get("DATABASE_URL", ""), os.environ.get("REDIS_URL", "")
    if database_url.startswith(("postgres://", "postgresql://")) and redis_url.startswith(("redis://", "rediss://")):
        return
    reason = "hosts share PostgreSQL and Redis: needs DATABASE_URL=postgres://… and REDIS_URL=redis://… (the PG stage)"
    if FULL:
        pytest.fail(f"{reason}; make faults sets both", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def no_client_outlives_its_test():
    """A test that fails half-way leaves its clients running: they are killed here, not left to the next test."""
    yield
    for client in list(Client.started):
        client.kill()


@pytest.fixture(scope="module", params=["local", "s3"])
def site(request, tmp_path_factory) -> Site:
    """What a module's deployments share, on each storage backend: a fresh PostgreSQL database (with alice), the
    suite's Redis, and the storage — one folder, or one prefix of the bucket with a spool folder per host."""
    needs_shared_services()
    storage = Storage("local") if request.param == "local" else Storage("s3", *request.getfixturevalue("s3_server"))
    with pytest.MonkeyPatch.context() as patch, live_backend(tmp_path_factory, f"faults_{request.param}") as backend:
        # The test process reads the bucket too (tests/support/stored.py): boto3 finds the test credentials here.
        patch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.ACCESS_KEY_ID)
        patch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.SECRET_ACCESS_KEY)
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
            patch.delenv(name, raising=False)
        yield Site(backend, storage, tmp_path_factory.mktemp("faults-storage"), f"faults/{uuid.uuid4().hex}/")


@pytest.fixture
def cluster(site, tmp_path):
    """``cluster(**settings)``: a deployment on the module's site; its processes are stopped at teardown."""
    made: list[Cluster] = []

    def make(**settings) -> Cluster:
        deployment = Cluster(tmp_path / f"cluster{len(made)}", site, **settings)
        made.append(deployment)
        return deployment

    yield make
    for deployment in made:
        deployment.close()
