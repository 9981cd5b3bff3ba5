"""Slot limits hold across OS processes: eight processes admit and release at once while an observer watches.

Each backend gets a database of its own (a fresh PostgreSQL database or a
temporary SQLite file) migrated by ``manage.py migrate`` in a subprocess. The
workers and the observer are "spawn" processes, each with its own connection,
configured through the environment before ``django.setup()`` exactly as a
server process would be.

The process entry points are module-level so that spawned children can import
them; they import Django only after pointing the environment at the test
database, so importing this module never reads settings.
"""

import logging
import multiprocessing
import os
import queue
import random
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from contextlib import suppress
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
WORKERS = 8
HAMMER_SECONDS = 10.0
GLOBAL_LIMIT = 20
USER_LIMIT = 2
# 16 users x 2 slots = 32 > 20: the per-user and the global limit are both under pressure.
USERS = [f"user{i:02d}" for i in range(16)]
# Uploads are shared by all workers, so two processes regularly race for one upload's writer slot.
UPLOADS_PER_USER = 3
# Each worker holds up to this many slots at once: 8 x 6 = 48 wanted, 20 available.
HELD_PER_WORKER = 6
RELEASE_RATE = 0.35
RENEW_RATE = 0.1
# A worker "crashes" on this share of its slots (never releases them), so that
# admissions keep reclaiming expired leases while everything else runs.
ABANDON_RATE = 0.02
LEASE_SECONDS = 5  # the shortest lease the configuration accepts
# Spawn + django.setup + migrate get this long; past the hammer time plus the
# grace, a worker is hung (a deadlock, or a lock never released).
START_TIMEOUT = 120
FINISH_GRACE = 45
# The named refusals a worker may meet; anything else fails the test. UploadBusy
# is the one-writer rule (uploads are shared); LeaseLost a renewal after a reap.
EXPECTED_REFUSALS = {"UserSlotsExhausted", "GlobalSlotsExhausted", "UploadBusy", "LeaseLost"}


def _use_database(env: dict) -> None:
    """In a spawned child: point Django at the test database, then set it up (no query yet)."""
    os.environ.update(env)
    import logging

    import django

    django.setup()
    # One INFO line per admission and a WARNING per reaped slot would drown the test output.
    logging.getLogger("uploads").setLevel(logging.ERROR)


def _report_failure(results) -> None:
    results.put(("error", traceback.format_exc()))


def _hammer(env: dict, index: int, seeded, go, results) -> None:
    """Admit, renew and release upload slots at random until the deadline; report the counts."""
    try:
        _use_database(env)
        from django.contrib.auth import get_user_model

        from uploads import exceptions
        from uploads.models import Slot, Upload
        from uploads.services.slots import slot_admit, slot_release, slot_renew

        if not seeded.wait(START_TIMEOUT):
            raise RuntimeError("the database was never seeded")
        rng = random.Random(index)
        users = list(get_user_model().objects.filter(username__in=USERS))
        uploads = {user.pk: list(Upload.objects.filter(owner=user)) for user in users}
        results.put(("ready", index))
        if not go.wait(START_TIMEOUT):
            raise RuntimeError("never told to start")

        counts, held = Counter(), []
        slowest, previous = 0.0, time.monotonic()
        deadline = previous + HAMMER_SECONDS
        while (started := time.monotonic()) < deadline:
            slowest, previous = max(slowest, started - previous), started
            if held and (len(held) >= HELD_PER_WORKER or rng.random() < RELEASE_RATE):
                slot = held.pop(rng.randrange(len(held)))
                if rng.random() < RENEW_RATE:
                    try:
                        slot_renew(slot.pk, slot.generation)
                        counts["renewed"] += 1
                    except exceptions.LeaseLost:
                        counts["LeaseLost"] += 1
                    held.append(slot)
                elif rng.random() < ABANDON_RATE:
                    counts["abandoned"] += 1
                elif slot_release(slot.pk, Slot.ReleaseReason.COMPLETED):
                    counts["released"] += 1
                else:
                    counts["already_released"] += 1  # reaped: this worker held it past its lease
                continue
            user = rng.choice(users)
            try:
                held.append(slot_admit(Slot.Kind.UPLOAD, user, upload=rng.choice(uploads[user.pk])))
                counts["admitted"] += 1
            except exceptions.DirectDriveXError as refusal:
                if type(refusal).__name__ not in EXPECTED_REFUSALS:
                    raise
                counts[type(refusal).__name__] += 1
        for slot in held:
            counts["released" if slot_release(slot.pk, Slot.ReleaseReason.DISCONNECTED) else "already_released"] += 1
        results.put(("counts", {"counts": dict(counts), "slowest_step_ms": round(slowest * 1000)}))
    except BaseException:
        _report_failure(results)


def _observe(env: dict, migrated, seeded, stop, results) -> None:
    """Seed the users, sample the active upload slots until told to stop, then report the rows' history."""
    try:
        _use_database(env)
        from datetime import timedelta

        from django.contrib.auth import get_user_model
        from django.utils import timezone

        from uploads.models import Slot, Upload
        from uploads.services.slots import slots_reap

        if not migrated.wait(START_TIMEOUT):
            raise RuntimeError("the database was never migrated")
        for name in USERS:
            user = get_user_model().objects.create_user(name)
            for n in range(UPLOADS_PER_USER):
                Upload.objects.create(owner=user, original_filename=f"f{n}", display_name=f"f{n}", size=1)
        seeded.set()

        samples, peak, violations = 0, 0, []
        while not stop.is_set():
            # One SELECT is one snapshot, on PostgreSQL (READ COMMITTED) and on SQLite (WAL).
            rows = list(
                Slot.objects.active()
                .filter(kind=Slot.Kind.UPLOAD)
                .values_list("user_id", "upload_id", "global_index", "user_index")
            )
            samples += 1
            peak = max(peak, len(rows))
            problems = [f"{len(rows)} active upload slots > {GLOBAL_LIMIT}"] if len(rows) > GLOBAL_LIMIT else []
            per_user = Counter(user for user, _, _, _ in rows)
            problems += [f"user {u} holds {n} slots > {USER_LIMIT}" for u, n in per_user.items() if n > USER_LIMIT]
            per_upload = Counter(upload for _, upload, _, _ in rows)
            problems += [f"upload {u} has {n} active upload slots" for u, n in per_upload.items() if n > 1]
            if len({index for _, _, index, _ in rows}) != len(rows):
                problems.append("two active slots share a global index")
            if problems and len(violations) < 20:
                violations.append((problems, rows))
            time.sleep(0.001)

        final = {
            "rows": Slot.objects.count(),
            "active": Slot.objects.active().count(),
            "released_without_reason": Slot.objects.released().filter(release_reason="").count(),
            "reasons": dict(Counter(Slot.objects.released().values_list("release_reason", flat=True))),
        }
        # Whatever the "crashed" holders left behind is reclaimable once its lease runs out.
        final["reaped"] = len(slots_reap(now=timezone.now() + timedelta(seconds=LEASE_SECONDS + 1)))
        final["active_after_reap"] = Slot.objects.active().count()
        results.put(("observed", {"samples": samples, "peak": peak, "violations": violations, "final": final}))
    except BaseException:
        _report_failure(results)


def _expect(results, kind: str, timeout: float):
    try:
        got, payload = results.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no {kind!r} report within {timeout:.0f} s: a process is hung") from None
    assert got != "error", f"a process failed:\n{payload}"
    assert got == kind, (got, payload)
    return payload


def hammer_and_observe(database_url: str, tmp_path) -> tuple[list[dict], dict]:
    """Run the workers and the observer against ``database_url``; return their reports."""
    env = {
        "DJANGO_SETTINGS_MODULE": "directdrivex.settings",
        "DATABASE_URL": database_url,
        "DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS": str(GLOBAL_LIMIT),
        "DIRECTDRIVEX_USER_UPLOAD_SLOTS": str(USER_LIMIT),
        "DIRECTDRIVEX_SLOT_LEASE_SECONDS": str(LEASE_SECONDS),
        "DIRECTDRIVEX_STORAGE_DIR": str(tmp_path / "storage"),
        "REDIS_URL": "",
        "DEBUG": "0",
    }
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    migrated, seeded, go, stop = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    observer = ctx.Process(target=_observe, args=(env, migrated, seeded, stop, results), daemon=True)
    workers = [
        ctx.Process(target=_hammer, args=(env, index, seeded, go, results), daemon=True) for index in range(WORKERS)
    ]
    begun = time.monotonic()
    try:
        # The children import Django while the schema is being created.
        for process in [observer, *workers]:
            process.start()
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "--skip-checks", "-v", "0"],
            cwd=REPO,
            env={**os.environ, **env},
            check=True,
            timeout=START_TIMEOUT,
        )
        migrated.set()
        log.info("migrated after %.1f s", time.monotonic() - begun)
        for _ in workers:
            _expect(results, "ready", START_TIMEOUT)
        go.set()
        started = time.monotonic()
        log.info("%d workers ready after %.1f s", WORKERS, started - begun)
        reports = [_expect(results, "counts", HAMMER_SECONDS + FINISH_GRACE) for _ in workers]
        finished = time.monotonic() - started
        stop.set()
        observed = _expect(results, "observed", 60)
        log.info("workers finished in %.1f s; observer took %d samples", finished, observed["samples"])
        for process in [observer, *workers]:
            process.join(10)
            assert process.exitcode == 0, f"{process.name} exited with {process.exitcode}"
    finally:
        for process in [observer, *workers]:
            if process.is_alive():
                process.terminate()
                process.join(5)
    assert finished < HAMMER_SECONDS + FINISH_GRACE, f"the workers took {finished:.0f} s"
    return reports, observed


def assert_limits_held_under_load(reports: list[dict], observed: dict) -> None:
    total = sum((Counter(report["counts"]) for report in reports), Counter())
    final = observed["final"]
    assert observed["violations"] == [], observed["violations"][:3]
    # Enough samples and traffic that a broken limit would have been seen, and every limit was reached.
    assert observed["samples"] >= 100, observed["samples"]
    assert total["admitted"] >= 200, total
    assert all(report["counts"].get("admitted", 0) > 0 for report in reports), reports
    # 48 slots wanted, 20 to be had: the observer sees the table at (or a release away from) the limit.
    assert observed["peak"] >= GLOBAL_LIMIT - 2, observed["peak"]
    assert total["GlobalSlotsExhausted"] > 0, total
    assert total["UserSlotsExhausted"] > 0, total
    assert total["UploadBusy"] > 0, total
    # Every admission is one row and every refusal none; every release left its reason.
    assert final["rows"] == total["admitted"], (final, total)
    assert final["released_without_reason"] == 0, final
    # Abandoned slots were reclaimed by later admissions; what is left is reclaimable.
    assert final["reasons"].get("expired", 0) > 0, final
    assert final["active"] <= total["abandoned"], (final, total)
    assert final["active_after_reap"] == 0, final


def on_postgresql() -> bool:
    return settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"


@pytest.fixture
def fresh_postgres_url():
    """A new, empty database on the test run's PostgreSQL server, dropped afterwards."""
    import psycopg

    parts = urlsplit(settings.DATABASE_URL)
    name = f"{parts.path.lstrip('/') or 'ddx'}_conc_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    server = settings.DATABASES["default"]
    connect = {
        "host": server["HOST"] or None,
        "port": server["PORT"] or None,
        "user": server["USER"] or None,
        "password": server["PASSWORD"] or None,
        "dbname": "postgres",
        "autocommit": True,
    }
    with psycopg.connect(**connect) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(**connect) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# Each variant runs in the CI run on its backend: the SQLite file in the SQLite
# run, a fresh PostgreSQL database in the PostgreSQL run. Decided inside the
# tests rather than by skipif at import time, because spawned children import
# this module and must not read settings before their environment is set.
def test_limits_hold_across_processes_on_postgresql(request, tmp_path):
    if not on_postgresql():
        pytest.skip("the PostgreSQL variant runs when the test run is on PostgreSQL (DATABASE_URL=postgres://…)")
    database_url = request.getfixturevalue("fresh_postgres_url")
    assert_limits_held_under_load(*hammer_and_observe(database_url, tmp_path))


def test_limits_hold_across_processes_on_sqlite_file(tmp_path):
    if on_postgresql():
        pytest.skip("the SQLite file variant runs when the test run is on SQLite")
    assert_limits_held_under_load(*hammer_and_observe(f"sqlite:///{tmp_path / 'slots.sqlite3'}", tmp_path))


@pytest.mark.django_db(transaction=True)
def test_admissions_reclaiming_each_others_stuck_slots_do_not_deadlock(alice, bob, monkeypatch):
    """Regression: A reaps X's stuck slot and admits for Y while B reaps Y's and admits for X.

    Before slot_admit locked the upload's own slot first, each insert waited on
    the other's uncommitted release in slot_one_writer_per_upload and PostgreSQL
    killed one with "deadlock detected". A barrier after the reap forces that
    interleaving (the only way to do so deterministically). Now a standalone
    admission commits its reap before it inserts, and a nested one locks the
    upload's own slot first: both get a proper answer.
    """
    if not on_postgresql():
        pytest.skip("row locks and the deadlock detector are PostgreSQL's; SQLite serializes writers")
    from django.db import connection
    from django.utils import timezone

    from uploads import exceptions
    from uploads.models import Slot, Upload
    from uploads.services import slots

    upload_x = Upload.objects.create(owner=alice, original_filename="x", display_name="x", size=1)
    upload_y = Upload.objects.create(owner=bob, original_filename="y", display_name="y", size=1)
    t0 = timezone.now()
    lease = timedelta(seconds=settings.DIRECTDRIVEX_SLOT_LEASE_SECONDS)
    stuck_x = slots.slot_admit(Slot.Kind.UPLOAD, alice, upload=upload_x, now=t0)
    stuck_y = slots.slot_admit(Slot.Kind.UPLOAD, bob, upload=upload_y, now=t0 + timedelta(seconds=10))

    reaped = {"A": threading.Event(), "B": threading.Event()}
    barrier = threading.Barrier(2, timeout=2)
    real_reap = slots._reap

    def reap_then_meet(**kwargs):
        stuck = real_reap(**kwargs)
        reaped[threading.current_thread().name].set()
        with suppress(threading.BrokenBarrierError):
            barrier.wait()
        return stuck

    monkeypatch.setattr(slots, "_reap", reap_then_meet)
    outcomes = {}

    def admit(name, user, upload, now):
        try:
            outcomes[name] = slots.slot_admit(Slot.Kind.UPLOAD, user, upload=upload, now=now)
        except Exception as error:
            outcomes[name] = error
        finally:
            connection.close()

    # At A's time only X's slot is stuck; at B's time both are, but A holds X's.
    a = threading.Thread(name="A", target=admit, args=("A", bob, upload_y, t0 + lease + timedelta(seconds=5)))
    b = threading.Thread(name="B", target=admit, args=("B", alice, upload_x, t0 + lease + timedelta(seconds=15)))
    a.start()
    assert reaped["A"].wait(10)
    b.start()
    a.join(30)
    b.join(30)

    assert not a.is_alive() and not b.is_alive()
    # No "deadlock detected" (OperationalError): each admission either got a slot or was told busy.
    for name, outcome in outcomes.items():
        assert isinstance(outcome, Slot | exceptions.UploadBusy), (name, outcome)
    # B ran when both old slots were stuck: it got X's writer slot, whatever A did.
    assert isinstance(outcomes["B"], Slot), outcomes["B"]
    assert Slot.objects.active().filter(upload=upload_x).get().pk == outcomes["B"].pk
    assert Slot.objects.active().filter(upload=upload_y).count() <= 1
    assert Slot.objects.get(pk=stuck_x.pk).release_reason == "expired"
    assert Slot.objects.get(pk=stuck_y.pk).released_at is not None  # reaped by A or B, or released by A's take-over


@pytest.mark.django_db(transaction=True)
def test_parallel_downloads_of_one_file_are_never_refused_as_busy(alice, limits):
    """Eight threads with connections of their own admit download slots for one file at once, twelve rounds.

    Before, a lost race for an index (a unique violation) was taken for the
    one-writer rule whenever the file had any active slot: ``409 busy`` for a
    download, which clients treat as final. On SQLite, writers are serialized
    and no race is lost; the PostgreSQL run is the one that raced.
    """
    from django.db import connection

    from uploads.models import Slot
    from uploads.services.slots import slot_admit, slot_release
    from uploads.services.uploads import upload_create

    limits(global_download_slots=30, user_download_slots=10)
    upload, upload_slot = upload_create(alice, filename="f.bin", size=10)
    slot_release(upload_slot.pk, Slot.ReleaseReason.COMPLETED)
    parallel, rounds = 8, 12
    refused = []

    def download(barrier, admitted):
        try:
            barrier.wait()
            admitted.append(slot_admit(Slot.Kind.DOWNLOAD, alice, upload=upload))
        except Exception as error:
            refused.append(type(error).__name__)
        finally:
            connection.close()

    for _round in range(rounds):
        barrier, admitted = threading.Barrier(parallel, timeout=10), []
        threads = [threading.Thread(target=download, args=(barrier, admitted)) for _ in range(parallel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(admitted) == parallel, refused  # 8 of 30 slots: every one of them is admitted
        # Each round's downloads end before the next begins (as short ranged requests do).
        for slot in admitted:
            slot_release(slot.pk, Slot.ReleaseReason.COMPLETED)

    assert refused == []


@pytest.mark.django_db(transaction=True)
def test_a_new_writer_resumes_from_what_the_previous_one_committed_while_it_was_being_admitted(alice, monkeypatch):
    """The previous writer's last commit and release land between the new writer's read and its lock.

    writer_admit read the upload (its offset) before slot_claim_writer took the
    slot row lock; a commit in between was missed, and the new writer resumed
    (and truncated the part) before bytes that were durable. On SQLite the
    IMMEDIATE transaction holds the write lock from its first read: no commit
    can land in between there.
    """
    if not on_postgresql():
        pytest.skip("SQLite's IMMEDIATE transactions serialize the read and the commit: no window to race in")
    from django.db import connection

    from uploads.models import Slot
    from uploads.services import grants
    from uploads.services.uploads import upload_create

    upload, _slot = upload_create(alice, filename="f.bin", size=1000)
    previous = grants.writer_admit(alice, upload.pk, "specific.previous!writer")
    grants.writer_commit(previous, 100)
    read_done, go_on = threading.Event(), threading.Event()
    real_claim = grants.slot_claim_writer

    def claim_after_the_commit(*args, **kwargs):
        read_done.set()  # the upload row (and its offset) has been read
        assert go_on.wait(10)
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(grants, "slot_claim_writer", claim_after_the_commit)
    outcome = {}

    def admit():
        try:
            outcome["grant"] = grants.writer_admit(alice, upload.pk, "specific.next!writer")
        except Exception as error:
            outcome["error"] = error
        finally:
            connection.close()

    newcomer = threading.Thread(target=admit)
    newcomer.start()
    assert read_done.wait(10)
    grants.writer_commit(previous, 600)  # the previous connection's final commit...
    grants.writer_release(previous, Slot.ReleaseReason.DISCONNECTED)  # ...and its release
    go_on.set()
    newcomer.join(30)

    assert "error" not in outcome, outcome
    assert outcome["grant"].offset == 600
