"""The database a module's live servers share, and raw HTTP calls to them (no redirects followed, any Host).

``live_backend`` is the module-scoped set-up of tests/test_live_server.py
as a context manager: a fresh PostgreSQL database (dropped afterwards) and
the suite's Redis when the suite runs on them, else a SQLite file and the
in-memory layer; migrated, with alice and her token.
"""

import contextlib
import http.client
import json
import os
from dataclasses import dataclass

from tests.support.live_server import LiveServer, postgres_database


@dataclass(frozen=True)
class Backend:
    database_url: str
    redis_url: str | None
    alice_token: str

    @property
    def postgres(self) -> bool:
        return self.database_url.startswith(("postgres://", "postgresql://"))


@contextlib.contextmanager
def live_backend(tmp_path_factory, label: str):
    suite_database = os.environ.get("DATABASE_URL", "")
    redis_url = os.environ.get("REDIS_URL") or None
    with contextlib.ExitStack() as stack:
        if suite_database.startswith(("postgres://", "postgresql://")):
            database_url = stack.enter_context(postgres_database(suite_database, label))
        else:
            database_url = f"sqlite:///{tmp_path_factory.mktemp(f'{label}-db') / 'db.sqlite3'}"
        setup = LiveServer(tmp_path_factory.mktemp(f"{label}-setup"), database_url=database_url, redis_url=redis_url)
        setup.migrate()
        yield Backend(database_url, redis_url, alice_token=setup.create_user("alice"))


@dataclass(frozen=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")


def http_call(
    server: LiveServer,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> Answer:
    """One HTTP request as sent, with the answer as received: a redirect is an answer, not followed."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    sent = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        sent["Authorization"] = f"Token {token}"
    sent.update(headers or {})
    try:
        # skip_host when the test sends its own Host (a bad one, say).
        connection.putrequest(method, path, skip_host="Host" in sent, skip_accept_encoding=True)
        for name, value in sent.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


@contextlib.contextmanager
def slot_inserts_blocked(database_url: str):
    """While the block runs, no new slot row can be inserted (admissions wait): a database that is slow to admit.

    SQLite: a write transaction held open (every other writer waits its busy
    timeout). PostgreSQL: the slot table locked against inserts and updates,
    reads still allowed, from a connection of the test's own.
    """
    if database_url.startswith("sqlite:"):
        import sqlite3

        holder = sqlite3.connect(database_url.removeprefix("sqlite:///"), timeout=10, isolation_level=None)
        try:
            holder.execute("BEGIN IMMEDIATE")
            yield
            holder.execute("ROLLBACK")
        finally:
            holder.close()
        return
    import psycopg

    with psycopg.connect(database_url, connect_timeout=5) as holder:
        holder.execute("LOCK TABLE uploads_slot IN SHARE ROW EXCLUSIVE MODE")
        yield
        holder.rollback()
