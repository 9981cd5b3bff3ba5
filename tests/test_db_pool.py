"""Bounded PostgreSQL connections: the psycopg pool under load over four server processes, and exhausted.

Real `manage.py serve` processes (Daphne) share a fresh PostgreSQL database per
test. The load test fires 200 concurrent `POST /api/uploads/` at four of them
while a sampler watches `pg_stat_activity`: the deployment may never hold more
than processes x DIRECTDRIVEX_DB_POOL_SIZE connections, and the slot limits
still answer exactly 20 x 201 and 429 for the rest. The exhaustion test gives a
server a pool of one, makes a request hold that connection (blocked on a row
lock the test holds) and checks that the requests queued behind it are refused
with 503 unavailable, never 500.

PostgreSQL only: SQLite has no pool (its persistent connections are files).
"""

import concurrent.futures
import contextlib
import http.client
import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.live_server import ROOT, LiveServer, postgres_database

log = logging.getLogger(__name__)

SUITE_DATABASE = os.environ.get("DATABASE_URL", "")
ON_POSTGRES = SUITE_DATABASE.startswith(("postgres://", "postgresql://"))
postgres_only = pytest.mark.skipif(
    not ON_POSTGRES,
    reason="the connection pool exists on PostgreSQL only: run with DATABASE_URL=postgres://… (CI's PostgreSQL stage)",
)

PROCESSES = 4
POOL_SIZE = 4
REQUESTS = 200
GLOBAL_SLOTS = 20
USER_SLOTS = 2
# 40 users x 2 slots = 80 could-be admissions > 20: the global limit is what binds.
LOAD_USERS = [f"user{n:02d}" for n in range(40)]
HTTP_TIMEOUT = 60
# The sampler stops by itself after this many samples (about a minute and a half).
MAX_SAMPLES = 20_000
SAMPLE_INTERVAL = 0.005


@dataclass(frozen=True)
class Answer:
    status: int
    retry_after: str | None
    body: dict


@dataclass(frozen=True)
class Deployment:
    database_url: str
    redis_url: str | None
    tokens: dict[str, str]

    @property
    def database_name(self) -> str:
        return urlsplit(self.database_url).path.lstrip("/")

    @property
    def admin_url(self) -> str:
        """The same server's maintenance database: the sampler's own connection must not count."""
        return urlunsplit(urlsplit(self.database_url)._replace(path="/postgres", query=""))


def create_users(server: LiveServer, usernames: list[str]) -> dict[str, str]:
    """Users with API tokens, made in one manage.py process (one per user would take a second each)."""
    code = (
        "from django.contrib.auth.models import User\n"
        "from rest_framework.authtoken.models import Token\n"
        f"for name in {usernames!r}:\n"
        "    print('TOKEN', name, Token.objects.create(user=User.objects.create_user(name)).key)\n"
    )
    out = server.manage("shell", "-c", code)
    return {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith("TOKEN ")}


@pytest.fixture
def deployment(tmp_path):
    """A fresh, migrated PostgreSQL database with alice and the load users; dropped afterwards."""
    with postgres_database(SUITE_DATABASE, "pool") as database_url:
        redis_url = os.environ.get("REDIS_URL") or None
        setup = LiveServer(tmp_path / "setup", database_url=database_url, redis_url=redis_url)
        setup.migrate()
        yield Deployment(database_url, redis_url, create_users(setup, ["alice", *LOAD_USERS]))


@pytest.fixture
def start_server(deployment, tmp_path):
    """``start_server("a", SETTING=value)`` or ``start_server("b", sibling_of=a)``; all stopped at teardown."""
    with contextlib.ExitStack() as cleanup:

        def start(name: str, *, sibling_of: LiveServer | None = None, **settings) -> LiveServer:
            if sibling_of is not None:
                server = sibling_of.sibling(tmp_path / name, **settings)
            else:
                server = LiveServer(
                    tmp_path / name, database_url=deployment.database_url, redis_url=deployment.redis_url, **settings
                )
            cleanup.callback(server.stop)
            server.start()
            return server

        yield start


def request(server: LiveServer, token: str, method: str, path: str, body: dict | None = None) -> Answer:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT)
    try:
        connection.request(
            method,
            path,
            body=None if body is None else json.dumps(body),
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {"not_json": raw[:200].decode(errors="replace")}
    return Answer(response.status, response.getheader("Retry-After"), parsed)


def post_upload(server: LiveServer, token: str, filename: str) -> Answer:
    return request(server, token, "POST", "/api/uploads/", {"filename": filename, "size": 1024})


def client_connections(admin, database: str) -> int:
    """Client connections to ``database`` right now (autovacuum workers are not ours)."""
    (count,) = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'", [database]
    ).fetchone()
    return count


class ConnectionSampler(threading.Thread):
    """Counts the database's client connections in a loop until stopped (or MAX_SAMPLES); keeps the peak."""

    def __init__(self, deployment: Deployment):
        super().__init__(name="pg_stat_activity sampler", daemon=True)
        self.deployment = deployment
        self.done = threading.Event()
        self.ready = threading.Event()
        self.samples = 0
        self.peak = 0
        self.error: BaseException | None = None

    def run(self):
        import psycopg

        try:
            with psycopg.connect(self.deployment.admin_url, autocommit=True, connect_timeout=5) as admin:
                self.ready.set()
                while not self.done.is_set() and self.samples < MAX_SAMPLES:
                    self.peak = max(self.peak, client_connections(admin, self.deployment.database_name))
                    self.samples += 1
                    self.done.wait(SAMPLE_INTERVAL)
        except BaseException as error:  # reported by stop(): a dead sampler must fail the test, not pass it
            self.error = error
            self.ready.set()

    def stop(self) -> None:
        self.done.set()
        self.join(10)
        if self.error is not None:
            raise self.error


def server_logs(*servers: LiveServer) -> str:
    """The end of each server's log, for an assertion's message."""
    return "\n".join(
        f"--- {server.log_path}\n{server.log_path.read_text(errors='replace')[-3000:]}" for server in servers
    )


@pytest.mark.slow
@postgres_only
def test_200_concurrent_posts_over_four_processes_stay_within_the_connection_budget_and_the_slot_limits(
    deployment, start_server
):
    limits = {
        "DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS": GLOBAL_SLOTS,
        "DIRECTDRIVEX_USER_UPLOAD_SLOTS": USER_SLOTS,
        "DIRECTDRIVEX_DB_POOL_SIZE": POOL_SIZE,
        # This test is about the bound, not the timeout: on a busy 2-core machine a
        # request may queue for its connection for a while, and must still get one.
        "DIRECTDRIVEX_DB_POOL_TIMEOUT": 30,
    }
    first = start_server("server-0", **limits)
    servers = [first, *(start_server(f"server-{n}", sibling_of=first) for n in range(1, PROCESSES))]
    budget = PROCESSES * POOL_SIZE

    users = [LOAD_USERS[n % len(LOAD_USERS)] for n in range(REQUESTS)]
    barrier = threading.Barrier(REQUESTS, timeout=HTTP_TIMEOUT)

    def fire(n: int) -> tuple[str, Answer]:
        barrier.wait()  # every request is in flight at once
        return users[n], post_upload(servers[n % PROCESSES], deployment.tokens[users[n]], f"load-{n}.bin")

    sampler = ConnectionSampler(deployment)
    sampler.start()
    assert sampler.ready.wait(10)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=REQUESTS) as pool:
            answers = list(pool.map(fire, range(REQUESTS), timeout=2 * HTTP_TIMEOUT))
    finally:
        sampler.stop()

    statuses = sorted({answer.status for _user, answer in answers})
    created = [user for user, answer in answers if answer.status == 201]
    refused = [answer for _user, answer in answers if answer.status == 429]
    assert all(answer.status < 500 for _user, answer in answers), (statuses, server_logs(*servers))
    assert len(created) == GLOBAL_SLOTS, statuses
    assert len(refused) == REQUESTS - GLOBAL_SLOTS, statuses
    assert max(created.count(user) for user in set(created)) <= USER_SLOTS
    assert all(answer.retry_after and int(answer.retry_after) >= 1 for answer in refused)
    assert {answer.body["code"] for answer in refused} <= {"global_slots_exhausted", "user_slots_exhausted"}
    assert "global_slots_exhausted" in {answer.body["code"] for answer in refused}

    log.info("peak %d connections over %d samples (budget %d)", sampler.peak, sampler.samples, budget)
    assert sampler.samples > 0
    assert sampler.peak <= budget, f"{sampler.peak} connections to the database, budget {budget}"

    import psycopg

    with psycopg.connect(deployment.admin_url, autocommit=True) as admin:
        # Each process answered requests and keeps its pool's warm connection: the
        # sampler was counting the right database, and nothing went past the pools.
        assert PROCESSES <= client_connections(admin, deployment.database_name) <= budget
    with psycopg.connect(deployment.database_url, autocommit=True) as database:
        (active,) = database.execute(
            "SELECT count(*) FROM uploads_slot WHERE kind = 'upload' AND released_at IS NULL"
        ).fetchone()
        (uploads,) = database.execute("SELECT count(*) FROM uploads_upload").fetchone()
    assert (active, uploads) == (GLOBAL_SLOTS, GLOBAL_SLOTS)


@pytest.mark.slow
@postgres_only
def test_requests_queued_behind_an_exhausted_pool_are_refused_with_503_unavailable_and_retry_after(
    deployment, start_server
):
    import psycopg

    server = start_server("server", DIRECTDRIVEX_DB_POOL_SIZE=1, DIRECTDRIVEX_DB_POOL_TIMEOUT=1)
    token = deployment.tokens["alice"]
    queued = 3
    # Warm the pool, so the first POST below gets its connection at once, however busy the machine.
    assert request(server, token, "GET", "/api/uploads/").status == 200

    # A real fault: alice's row is locked by another transaction, so the first
    # POST to reach upload_create waits inside PostgreSQL holding the process's
    # only pooled connection, and every other request waits for the pool.
    with psycopg.connect(deployment.database_url) as locker:
        locker.execute("SELECT 1 FROM auth_user WHERE username = 'alice' FOR UPDATE")
        with concurrent.futures.ThreadPoolExecutor(max_workers=queued + 1) as pool:
            futures = [pool.submit(post_upload, server, token, f"held-{n}.bin") for n in range(queued + 1)]
            answered = []
            try:
                for future in concurrent.futures.as_completed(futures, timeout=HTTP_TIMEOUT):
                    answered.append(future)
                    if len(answered) == queued:
                        break
            finally:
                locker.rollback()  # the holder goes on
            early = [future.result() for future in answered]
            late = [future.result(timeout=HTTP_TIMEOUT) for future in futures if future not in answered]

    assert [answer.status for answer in early] == [503] * queued, server_logs(server)
    assert all(answer.body["code"] == "unavailable" for answer in early)
    assert all(answer.retry_after and int(answer.retry_after) >= 1 for answer in early)
    assert [answer.status for answer in late] == [201]

    # The timeouts leaked nothing: the pool's one connection serves the next request.
    listed = request(server, token, "GET", "/api/uploads/")
    assert listed.status == 200
    assert [upload["filename"] for upload in listed.body] == [late[0].body["filename"]]


def test_a_pool_timeout_below_one_second_stops_start_up_with_a_system_check():
    env = {**os.environ, "DEBUG": "1", "DIRECTDRIVEX_DB_POOL_TIMEOUT": "0"}
    done = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "DIRECTDRIVEX_DB_POOL_TIMEOUT" in done.stderr
    assert "uploads.E001" in done.stderr
