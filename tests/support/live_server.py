"""A real DirectDriveX server in a subprocess (`manage.py serve`), for real-server tests and bench/.

It runs against its own storage folder and database: a SQLite file in the
work folder, or, when ``database_url`` is a PostgreSQL URL, that database
(``postgres_database()`` makes a fresh one; ``migrate()`` migrates it). Users
and tokens are made with manage.py, so the caller's process never needs
Django set up. ``sibling()`` starts a second process of the same deployment
(same database, channel layer and storage, its own port), as production runs
several Daphne processes.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def postgres_database(server_url: str, label: str = "live"):
    """A new, empty database on the PostgreSQL server of ``server_url``, dropped (forcibly) afterwards.

    Yields its URL. Named after the database in ``server_url``, so that
    parallel runs that use different databases never collide.
    """
    import psycopg

    parts = urlsplit(server_url)
    base = parts.path.lstrip("/") or "ddx"
    name = f"{base}_{label}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin_url = urlunsplit(parts._replace(path="/postgres", query=""))
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a live process, from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LiveServer:
    def __init__(
        self,
        workdir: Path,
        *,
        database_url: str | None = None,
        redis_url: str | None = None,
        storage_dir: Path | None = None,
        **settings,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage = Path(storage_dir) if storage_dir is not None else self.workdir / "storage"
        self.settings = settings
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "directdrivex.settings",
            "DEBUG": "0",
            "SECRET_KEY": "live-server-tests-only-" + "x" * 40,
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DATABASE_URL": database_url or f"sqlite:///{self.workdir / 'db.sqlite3'}",
            "DIRECTDRIVEX_STORAGE_DIR": str(self.storage),
            # Tests and benchmarks must not inherit a developer's shell settings by accident.
            **{key: str(value) for key, value in settings.items()},
        }
        if redis_url:
            self.env["REDIS_URL"] = redis_url
        else:
            self.env.pop("REDIS_URL", None)
        self.process: subprocess.Popen | None = None
        self.log_path = self.workdir / "server.log"
        # Interpreter arguments before manage.py: a launcher module that wraps it (tests/faults/crashpoint.py).
        self.python_args: list[str] = []

    # --- management -----------------------------------------------------------

    def manage(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if check and done.returncode:
            raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def migrate(self) -> None:
        self.manage("migrate", "--noinput", "-v0")

    def create_user(self, username: str) -> str:
        """Create a user and return its API token."""
        code = (
            "from django.contrib.auth.models import User;"
            "from rest_framework.authtoken.models import Token;"
            f"u=User.objects.create_user({username!r});"
            "print('TOKEN', Token.objects.create(user=u).key)"
        )
        out = self.manage("shell", "-c", code)
        return next(line.split()[1] for line in out.splitlines() if line.startswith("TOKEN "))

    def session_cookie(self, username: str) -> str:
        """A ``Cookie`` header value signing ``username`` in (a session made in the database, as a sign-in would)."""
        code = (
            "from django.contrib.auth.models import User;"
            "from django.contrib.sessions.backends.db import SessionStore;"
            f"u=User.objects.get(username={username!r});"
            "s=SessionStore();"
            "s['_auth_user_id']=str(u.pk);"
            "s['_auth_user_backend']='django.contrib.auth.backends.ModelBackend';"
            "s['_auth_user_hash']=u.get_session_auth_hash();"
            "s.create();"
            "print('SESSION', s.session_key)"
        )
        out = self.manage("shell", "-c", code)
        return "sessionid=" + next(line.split()[1] for line in out.splitlines() if line.startswith("SESSION "))

    # --- the server process -----------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.process = subprocess.Popen(
            [sys.executable, *self.python_args, "manage.py", "serve", "--port", str(self.port)],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(self.url + "/", timeout=2).close()
                return
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer within {timeout}s:\n{self.log_path.read_text()}")

    def restart(self, timeout: float = 30) -> None:
        """Start again on the same port (after kill() or stop()), as a process manager would."""
        if self.process and self.process.poll() is None:
            raise RuntimeError("the server is still running: kill() or stop() it first")
        self.start(timeout)

    def sibling(self, workdir: Path, **settings) -> "LiveServer":
        """Another server process of this deployment: same database, channel layer, storage and
        settings (``settings`` override them), its own port and log. Not started."""
        return LiveServer(
            workdir,
            database_url=self.env["DATABASE_URL"],
            redis_url=self.env.get("REDIS_URL"),
            storage_dir=self.storage,
            **{**self.settings, **settings},
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        """kill -9: no cleanup runs, as in a crash."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a frozen (SIGSTOP) server could not shut down
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss(self) -> dict[str, int]:
        return proc_status(self.pid)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
