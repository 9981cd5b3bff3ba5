"""`manage.py slots reaper`: real reaper processes reap, expire and prune; stop on signals; never double-act.

The reapers are subprocesses on a database of their own (a fresh PostgreSQL
database and the suite's Redis in the PostgreSQL stage, a SQLite file
otherwise). State is set up and inspected through the services, by
``manage.py shell`` running this module's ``seed`` / ``inspect`` against that
database, so the test process never needs it. A TcpProxy in front of
PostgreSQL cuts the database under a running reaper.
"""

import configparser
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.live_backend import live_backend
from tests.support.live_server import ROOT, LiveServer
from tests.support.tcp_proxy import TcpProxy

LEASE_SECONDS = 60
# Enough room for the many stuck slots of the two-reaper test.
SLOT_LIMIT = 1000
POLL = 0.05
LOGFMT_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


# --- set-up and inspection, run by `manage.py shell` inside the deployment --------------------------------


def seed(spec_json: str) -> None:
    """Create what ``spec`` asks for, through the services, and print its ids as ``RESULT {json}``.

    ``stuck``: uploads whose writer (with a holder channel) crashed two leases
    ago; ``idle``: uploads idle past DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS, with
    a part file and a crashed writer too; ``fresh``: uploads with a part file
    whose last byte came just now (idle once the expiry has passed); ``old_history`` / ``recent_history``:
    released download slots from ten days / one day ago; ``live``: an upload
    with a fresh slot. The rows appear at once, in one transaction.
    """
    from datetime import timedelta

    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import transaction
    from django.utils import timezone

    from tests.conftest import write_part
    from uploads.models import Slot, Upload
    from uploads.services.grants import writer_admit
    from uploads.services.slots import slot_admit, slot_release
    from uploads.services.uploads import upload_create

    spec = json.loads(spec_json)
    now = timezone.now()
    crashed = now - timedelta(seconds=2 * settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS)
    idle_since = now - timedelta(seconds=settings.DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS + 3600)
    tag = spec["user"]
    result = {"stuck_slots": [], "idle_uploads": [], "idle_slots": [], "channels": [], "part_keys": []}

    def crashed_writer(upload: Upload, at) -> int:
        channel = f"reapertest.{tag}.{upload.pk.hex[:12]}"
        grant = writer_admit(upload.owner, upload.pk, channel, now=at)
        result["channels"].append(channel)
        return grant.slot_id

    def history(at) -> list[int]:
        ids = []
        for _ in range(spec.get("history", 1)):
            slot = slot_admit(Slot.Kind.DOWNLOAD, user, now=at)
            slot_release(slot.pk, Slot.ReleaseReason.COMPLETED, now=at)
            ids.append(slot.pk)
        return ids

    with transaction.atomic():
        user = get_user_model().objects.create(username=tag)
        # Newest first: every admission reaps the leases that ran out before its own time.
        if spec.get("live"):
            upload, slot = upload_create(user, filename="live.bin", size=10, now=now)
            result["live_slot"], result["live_upload"] = slot.pk, str(upload.pk)
        if spec.get("recent_history"):
            result["recent_history"] = history(now - timedelta(days=1))
        if spec.get("old_history"):
            result["old_history"] = history(now - timedelta(days=settings.DIRECTDRIVEX_SLOT_HISTORY_DAYS + 3))
        for i in range(spec.get("stuck", 0)):
            upload, _slot = upload_create(user, filename=f"stuck-{i}.bin", size=10, now=crashed)
            result["stuck_slots"].append(crashed_writer(upload, crashed))
        for i in range(spec.get("fresh", 0)):
            upload, _slot = upload_create(user, filename=f"fresh-{i}.bin", size=10, now=now)
            result["idle_uploads"].append(str(upload.pk))
            result["part_keys"].append(upload.storage_key)
        for i in range(spec.get("idle", 0)):
            upload, _slot = upload_create(user, filename=f"idle-{i}.bin", size=10, now=idle_since)
            result["idle_slots"].append(crashed_writer(upload, idle_since))
            result["idle_uploads"].append(str(upload.pk))
            result["part_keys"].append(upload.storage_key)
        # writer_generation after the set-up: a revocation bumps it by one, an expiry by one more.
        result["generations"] = {
            str(pk): generation
            for pk, generation in Upload.objects.filter(owner=user).values_list("pk", "writer_generation")
        }
    for key in result["part_keys"]:
        write_part(key, b"x" * 5, 10)  # of an upload of 10 bytes
    print("RESULT", json.dumps(result))  # noqa: T201 - read by the test process


def inspect(tag: str) -> None:
    """Print the state of user ``tag``'s rows and files as ``RESULT {json}``."""
    from tests.support import stored
    from uploads.models import Slot, Upload

    slots = Slot.objects.filter(user__username=tag)
    uploads = Upload.objects.filter(owner__username=tag)
    state = {
        "slots": {str(pk): reason for pk, reason in slots.values_list("pk", "release_reason")},
        "active": sorted(slots.active().values_list("pk", flat=True)),
        "uploads": {
            str(pk): {"status": status, "generation": generation}
            for pk, status, generation in uploads.values_list("pk", "status", "writer_generation")
        },
        "part_files": [str(u.pk) for u in uploads if stored.part_stored(u.storage_key)],
    }
    print("RESULT", json.dumps(state))  # noqa: T201 - read by the test process


# --- the reaper process ----------------------------------------------------------------------------------


class Reaper:
    """`manage.py slots reaper --json` as a subprocess; its JSON lines and its log are files in ``workdir``."""

    def __init__(self, deployment: LiveServer, workdir: Path, *args: str, command=("slots", "reaper"), **env: str):
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.log_path = workdir / "reaper.jsonl", workdir / "reaper.log"
        with open(self.out_path, "wb") as out, open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", *command, "--json", *args],
                cwd=ROOT, env={**deployment.env, **env}, stdout=out, stderr=log,
            )  # fmt: skip

    def passes(self) -> list[dict]:
        text = self.out_path.read_text()
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def log(self) -> str:
        return self.log_path.read_text()

    def diagnostics(self) -> str:
        return f"--- stdout\n{self.out_path.read_text()[-4000:]}\n--- log\n{self.log()[-4000:]}"

    def wait_for(self, condition, what: str, timeout: float = 20) -> list[dict]:
        """Poll this reaper's passes until ``condition(passes)`` holds; fail if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            passes = self.passes()
            if condition(passes):
                return passes
            if self.process.poll() is not None:
                pytest.fail(
                    f"the reaper exited with {self.process.returncode} waiting for {what}\n{self.diagnostics()}"
                )
            time.sleep(POLL)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.diagnostics()}")

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Send ``signum``; returns the exit code and the seconds it took to exit."""
        sent = time.monotonic()
        self.process.send_signal(signum)
        try:
            code = self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"the reaper did not stop within 10 s of {signum!r}\n{self.diagnostics()}")
        return code, time.monotonic() - sent

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def log_events(*logs: str, msg: str) -> list[dict[str, str]]:
    """The fields of every logfmt line (settings.LOGGING, uploads.logs) whose msg is ``msg``."""
    events = []
    for line in "\n".join(logs).splitlines():
        fields = {key: value.strip('"') for key, value in LOGFMT_PAIR.findall(line)}
        if fields.get("msg") == msg:
            events.append(fields)
    return events


def reaped(passes) -> list[int]:
    return [slot for one in passes for slot in one["reaped_slots"]]


def expired(passes) -> list[str]:
    return [upload for one in passes for upload in one["expired_uploads"]]


def pruned(passes) -> int:
    return sum(one["pruned"] or 0 for one in passes)


def succeeded(passes) -> list[dict]:
    return [one for one in passes if not one["error"]]


def unit(name: str) -> configparser.ConfigParser:
    """A systemd unit of deploy/systemd, read as the ini file it is."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((ROOT / "deploy" / "systemd" / name).read_text())
    return parser


def manage_arguments(exec_start: str) -> list[str]:
    """The arguments after `manage.py` in a unit's ExecStart (the test runs them with its own interpreter)."""
    words = shlex.split(exec_start)
    return words[words.index("manage.py") + 1 :]


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "reaper") as backend:
        yield backend


@pytest.fixture(scope="module")
def deployment(backend, tmp_path_factory) -> LiveServer:
    """The environment (database, Redis, storage, settings) that reapers and set-up share; no server runs."""
    return LiveServer(
        tmp_path_factory.mktemp("reaper-deployment"),
        database_url=backend.database_url,
        redis_url=backend.redis_url,
        DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
        DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS=SLOT_LIMIT,
        DIRECTDRIVEX_USER_UPLOAD_SLOTS=SLOT_LIMIT,
    )


@pytest.fixture
def reapers(deployment, tmp_path):
    started: list[Reaper] = []

    def start(*args: str, name: str = "reaper", command=("slots", "reaper"), **env: str) -> Reaper:
        reaper = Reaper(deployment, tmp_path / f"{name}-{len(started)}", *args, command=command, **env)
        started.append(reaper)
        return reaper

    yield start
    for reaper in started:
        reaper.kill()


def shell(deployment: LiveServer, call: str) -> dict:
    out = deployment.manage("shell", "-c", f"from tests.test_reaper import seed, inspect; {call}")
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])


def seeded(deployment: LiveServer, **spec) -> dict:
    tag = f"reaper-{uuid.uuid4().hex[:8]}"
    return {"user": tag, **shell(deployment, f"seed({json.dumps({'user': tag, **spec})!r})")}


def state_of(deployment: LiveServer, tag: str) -> dict:
    return shell(deployment, f"inspect({tag!r})")


def holder_messages(backend, channels: list[str]) -> Counter:
    """How many messages the channel layer holds for each channel (nobody receives them here).

    channels-redis keeps a channel's messages as members of the sorted set
    "asgi" + name, each with a random prefix, so two identical messages are
    two members.
    """
    import redis

    client = redis.Redis.from_url(backend.redis_url)
    try:
        return Counter({channel: client.zcard(f"asgi{channel}") for channel in channels})
    finally:
        client.close()


# --- one reaper does its three jobs ----------------------------------------------------------------------


@pytest.mark.slow
def test_reaper_reclaims_expired_leases_expires_idle_uploads_and_prunes_old_history(backend, deployment, reapers):
    seed = seeded(deployment, stuck=2, idle=1, old_history=True, recent_history=True, live=True)
    reaper = reapers("--interval", "0.2")

    passes = reaper.wait_for(
        lambda passes: set(seed["stuck_slots"]) <= set(reaped(passes)) and seed["idle_uploads"][0] in expired(passes),
        "the stuck slots reaped and the idle upload expired",
    )
    code, _seconds = reaper.stop()

    assert code == 0, reaper.diagnostics()
    assert pruned(passes) >= 1  # the first pass prunes; the other rows pruned may be earlier tests' released slots
    state = state_of(deployment, seed["user"])
    for slot in seed["stuck_slots"]:
        assert state["slots"][str(slot)] == "expired"
    idle = seed["idle_uploads"][0]
    assert state["uploads"][idle]["status"] == "expired"
    assert state["part_files"] == [], "the idle upload's bytes are deleted"
    for slot in seed["old_history"]:
        assert str(slot) not in state["slots"], "history older than DIRECTDRIVEX_SLOT_HISTORY_DAYS is pruned"
    for slot in seed["recent_history"]:
        assert state["slots"][str(slot)] == "completed", "recent history is kept"
    assert state["active"] == [seed["live_slot"]], "a live slot is left alone"
    assert state["uploads"][seed["live_upload"]]["status"] == "uploading"
    # Each pass logs one line with its counts; the services log a line per slot and upload they changed.
    log = reaper.log()
    lines = log_events(log, msg="reaper.pass")
    assert [(line["pass"], line["reaped"], line["expired"], line["pruned"]) for line in lines[:1]] == [
        ("1", str(passes[0]["reaped"]), str(passes[0]["expired"]), str(passes[0]["pruned"]))
    ]
    assert len(lines) == len(reaper.passes())
    for slot in seed["stuck_slots"] + seed["idle_slots"]:
        assert [line["slot"] for line in log_events(log, msg="slot.reaped")].count(str(slot)) == 1, log
    assert [line["upload"] for line in log_events(log, msg="upload.expired")] == [idle], log
    if backend.redis_url:
        assert set(holder_messages(backend, seed["channels"]).values()) == {1}, "each holder is told once"


# --- stopping ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["unit's KillSignal", "SIGINT"])
def test_reaper_stops_on_a_signal_even_mid_sleep_and_exits_0(deployment, reapers, signal_name):
    service = unit("directdrivex-reaper.service")["Service"]
    # The command systemd runs, and the signal it stops it with.
    signum = signal.Signals[service["KillSignal"] if signal_name == "unit's KillSignal" else signal_name]
    reaper = reapers("--interval", "30", command=manage_arguments(service["ExecStart"]))
    reaper.wait_for(lambda passes: len(passes) >= 1, "the first pass")
    time.sleep(0.2)  # now it sleeps: the next pass is 30 s away

    code, seconds = reaper.stop(signum)

    assert code == 0, reaper.diagnostics()
    # Woken by the signal, not by its 30 s interval; well inside what systemd waits before a SIGKILL.
    # (The outcome is asserted, the wait bounded generously: a loaded machine is not a benchmark.)
    assert seconds < min(10, float(service["TimeoutStopSec"])), f"took {seconds:.2f}s to stop"
    assert len(reaper.passes()) == 1, "no pass started after the signal"
    assert [(line["passes"], line["reason"]) for line in log_events(reaper.log(), msg="reaper.stopped")] == [
        ("1", signal.Signals(signum).name)
    ]


# --- several reapers --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_reapers_never_release_a_slot_expire_an_upload_or_tell_a_holder_twice(backend, deployment, reapers):
    # Both run before the work appears, passing as fast as they can, so that they meet on the same rows.
    first, second = reapers("--interval", "0.01", name="first"), reapers("--interval", "0.01", name="second")
    for reaper in (first, second):
        reaper.wait_for(lambda passes: len(passes) >= 1, "the first pass")
    seed = seeded(deployment, stuck=120, idle=30)

    def done(_passes) -> bool:
        both = first.passes() + second.passes()
        return set(seed["stuck_slots"]) <= set(reaped(both)) and set(seed["idle_uploads"]) <= set(expired(both))

    first.wait_for(done, "every stuck slot reaped and every idle upload expired", timeout=30)
    assert first.stop()[0] == 0, first.diagnostics()
    assert second.stop()[0] == 0, second.diagnostics()

    both = first.passes() + second.passes()
    assert not set(reaped(first.passes())) & set(reaped(second.passes())), "a slot reaped by both reapers"
    assert not set(expired(first.passes())) & set(expired(second.passes())), "an upload expired by both reapers"
    assert Counter(expired(both)) == Counter(seed["idle_uploads"])
    mine = Counter(slot for slot in reaped(both) if slot in set(seed["stuck_slots"]))
    assert set(mine.values()) == {1} and len(mine) == len(seed["stuck_slots"])
    # The services log each slot and upload they changed once, after commit, whichever reaper it was.
    logs = (first.log(), second.log())
    slot_lines = Counter(line["slot"] for line in log_events(*logs, msg="slot.reaped"))
    assert {slot: slot_lines[str(slot)] for slot in seed["stuck_slots"] + seed["idle_slots"]} == dict.fromkeys(
        seed["stuck_slots"] + seed["idle_slots"], 1
    )
    upload_lines = Counter(line["upload"] for line in log_events(*logs, msg="upload.expired"))
    assert upload_lines == Counter(seed["idle_uploads"])
    # The rows agree: each upload's writer was fenced exactly once (twice for an expired one: its slot, its status).
    state = state_of(deployment, seed["user"])
    assert state["active"] == []
    assert set(state["slots"].values()) == {"expired"}
    for upload, before in seed["generations"].items():
        bumps = 2 if upload in seed["idle_uploads"] else 1
        assert state["uploads"][upload]["generation"] == before + bumps, upload
    if backend.redis_url:
        assert set(holder_messages(backend, seed["channels"]).values()) == {1}, "a holder told twice (or never)"
    print(  # noqa: T201 - how the work was shared, for whoever reads the test log
        f"first reaped {len(reaped(first.passes()))}, expired {len(expired(first.passes()))}; "
        f"second reaped {len(reaped(second.passes()))}, expired {len(expired(second.passes()))}"
    )


# --- the database goes away --------------------------------------------------------------------------------


@pytest.mark.slow
def test_reaper_survives_a_database_outage_backs_off_and_reaps_once_it_is_back(backend, deployment, reapers):
    if not backend.postgres:
        pytest.skip("SQLite is a local file: there is no database connection to cut (the PostgreSQL stage runs this)")
    parts = urlsplit(backend.database_url)
    with TcpProxy(parts.hostname, parts.port or 5432) as database:
        reaper = reapers(
            "--interval", "0.2", DATABASE_URL=database.via(backend.database_url), DIRECTDRIVEX_DB_POOL_TIMEOUT="1"
        )
        reaper.wait_for(lambda passes: succeeded(passes), "a pass with the database up")

        database.cut()
        passes = reaper.wait_for(
            lambda passes: sum(1 for one in passes if one["error"]) >= 2, "two failed passes", timeout=15
        )
        failed = [one for one in passes if one["error"]]
        assert all("OperationalError" in one["error"] for one in failed), failed
        assert failed[1]["retry_in"] > failed[0]["retry_in"], "it backs off"
        assert reaper.process.poll() is None, "the reaper died\n" + reaper.diagnostics()
        # Work that appears while the reaper cannot see it (set up past the proxy) ...
        seed = seeded(deployment, stuck=1)

        database.restore()
        # ... is done once the database is back, by the same process.
        passes = reaper.wait_for(
            lambda passes: seed["stuck_slots"][0] in reaped(passes), "the stuck slot reaped after the outage"
        )
        code, _seconds = reaper.stop()

    assert code == 0, reaper.diagnostics()
    assert not passes[-1]["error"]
    assert state_of(deployment, seed["user"])["slots"][str(seed["stuck_slots"][0])] == "expired"
    assert len(log_events(reaper.log(), msg="reaper.pass_failed")) == len([one for one in passes if one["error"]])
    assert len(log_events(reaper.log(), msg="reaper.recovered")) == 1


# --- the disk refuses ---------------------------------------------------------------------------------------


@pytest.fixture
def read_only_storage(tmp_path):
    """A storage folder on a filesystem of its own (a tmpfs), which the test can remount read-only."""
    mountpoint = tmp_path / "storage-fs"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mountpoint)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a filesystem here to make read-only: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.local_storage  # the local storage folder's filesystem remounted read-only
@pytest.mark.slow
def test_reaper_keeps_running_when_the_storage_turns_read_only(backend, read_only_storage, reapers, tmp_path):
    # Before, an expiry committed, the delete of its bytes raised (EROFS), and the reaper
    # process died with it: under systemd it restarted into the same error, every pass.
    expiry = {"DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS": "6"}
    deployment = LiveServer(
        tmp_path / "ro-deployment",
        database_url=backend.database_url,
        redis_url=backend.redis_url,
        storage_dir=read_only_storage,
        DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
        **expiry,
    )
    reaper = Reaper(deployment, tmp_path / "reaper", "--interval", "0.2")  # starts on a writable folder
    try:
        reaper.wait_for(lambda passes: len(passes) >= 1, "the first pass")
        # Uploads that go idle six seconds from now, with bytes on a disk that turns read-only first.
        seed = seeded(deployment, fresh=2)
        subprocess.run(["mount", "-o", "remount,ro", str(read_only_storage)], check=True)
        try:
            passes = reaper.wait_for(
                lambda passes: set(seed["idle_uploads"]) <= set(expired(passes)), "the idle uploads expired", 30
            )
            # ... and it goes on passing: a stuck slot that appears afterwards is still reaped.
            later = seeded(deployment, stuck=1)
            passes = reaper.wait_for(lambda passes: later["stuck_slots"][0] in reaped(passes), "a later stuck slot")
            code, _seconds = reaper.stop()
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(read_only_storage)], check=True)
    finally:
        reaper.kill()

    assert code == 0, reaper.diagnostics()
    state = state_of(deployment, seed["user"])
    assert {state["uploads"][upload]["status"] for upload in seed["idle_uploads"]} == {"expired"}
    assert sorted(state["part_files"]) == sorted(seed["idle_uploads"])  # left for `uploads fsck --repair`
    not_deleted = [line for line in reaper.log().splitlines() if "bytes not deleted" in line]
    assert all(any(upload in line for line in not_deleted) for upload in seed["idle_uploads"]), not_deleted
    assert not [one for one in passes if one["error"]], passes


# --- the server's unit ----------------------------------------------------------------------------------


def test_the_server_unit_runs_the_serve_command_and_is_stopped_with_sigterm(deployment):
    service = unit("directdrivex.service")["Service"]
    arguments = manage_arguments(service["ExecStart"])

    # `serve --print` checks the configuration and prints the Daphne command it would run.
    printed = deployment.manage(*arguments, "--print")

    assert arguments[0] == "serve"
    assert printed.startswith("daphne ") and "directdrivex.asgi:application" in printed, printed
    assert service["KillSignal"] == "SIGTERM" and service["Restart"] == "always"
    for unit_name in ("directdrivex.service", "directdrivex-reaper.service"):
        section = unit(unit_name)["Service"]
        assert section["User"] and section["EnvironmentFile"] == "/etc/directdrivex.env", unit_name


# --- in process: the pieces the command is made of ---------------------------------------------------------


def test_a_stop_during_a_pass_finishes_the_step_in_progress_and_skips_the_rest(alice):
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from uploads.models import Slot, Upload
    from uploads.ops.reaper import StopFlag, reaper_pass
    from uploads.services.uploads import upload_create

    long_ago = timezone.now() - timedelta(seconds=settings.DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS + 60)
    upload, slot = upload_create(alice, filename="idle.bin", size=10, now=long_ago)
    stop = StopFlag()
    stop.set("test")

    result = reaper_pass(stop=stop)

    assert result.reaped == (slot.pk,)
    assert result.expired is None and result.pruned is None
    assert Slot.objects.get(pk=slot.pk).release_reason == Slot.ReleaseReason.EXPIRED
    assert Upload.objects.get(pk=upload.pk).status == Upload.Status.UPLOADING, "expiry did not start"


def test_stop_flag_wakes_a_sleeping_wait_when_a_signal_arrives():
    from uploads.ops.reaper import StopFlag, stop_on_signals

    stop = StopFlag()
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM))
    with stop_on_signals(stop):
        started = time.monotonic()
        timer.start()
        stopped = stop.wait(10)
        waited = time.monotonic() - started
        timer.join()  # the signal is delivered before our handler is taken away again
    stop.close()

    assert stopped and stop.reason == "SIGTERM"
    assert waited < 1, waited


def test_back_off_doubles_from_the_interval_up_to_a_minute():
    from uploads.ops.reaper import backoff

    assert [backoff(15, n) for n in range(1, 5)] == [30, 60, 60, 60]
    assert backoff(0.2, 1) == 0.4
    assert backoff(120, 3) == 120, "never more often than the interval"
