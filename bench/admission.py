"""Slot admission benchmark: admit + release throughput and latency through uploads.services.slots on PostgreSQL.

    python bench/admission.py [--seconds 10] [--workers 16] [--mode processes|threads]
                              [--database-url postgres://postgres@127.0.0.1:5432/postgres]

Creates a database ``ddx_bench_<pid>`` on the server of ``--database-url``
(default: DATABASE_URL if it is PostgreSQL, else the local server), migrates
it with ``manage.py migrate``, runs two phases with the same workers, and drops
the database again:

* baseline: each worker INSERTs one Slot row and UPDATEs it to released through
  the ORM (two autocommit statements, no service logic): what the database and
  the ORM cost on this machine;
* service: each worker calls ``slot_admit`` (upload kind, for its own upload;
  workers share users two by two) and then ``slot_release``, as the API and
  the consumer do.

Workers are OS processes by default ("spawn"), each with its own connection:
threads would share one GIL and measure Python contention, not the database
(``--mode threads`` measures that for comparison). During the service phase an
observer process samples the active slots on its own connection and checks the
limits (global, per user, one writer per upload); a violation makes the run
exit 1. Targets: >= 500 admit + release cycles per second, p99 < 50 ms.
"""

import argparse
import logging
import math
import multiprocessing
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
TARGET_RATE = 500
TARGET_P99_MS = 50
GLOBAL_LIMIT = 20
USER_LIMIT = 5
START_TIMEOUT = 120

log = logging.getLogger("bench.admission")


def configure(env: dict) -> None:
    """Point Django at the benchmark database and set it up (once per process)."""
    from django.apps import apps

    if apps.ready:
        return
    os.environ.update(env)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import django

    django.setup()
    # Two INFO lines per cycle would measure the terminal, not the service.
    logging.getLogger("uploads").setLevel(logging.WARNING)


def worker(env: dict, phase: str, index: int, users: int, seconds: float, go, results) -> None:
    """Run one phase's loop until ``seconds`` after ``go``; report the latencies in seconds."""
    try:
        configure(env)
        from django.contrib.auth import get_user_model
        from django.db import connection
        from django.utils import timezone

        from uploads.exceptions import SlotsExhausted
        from uploads.models import Slot, Upload
        from uploads.services.slots import slot_admit, slot_release

        user = get_user_model().objects.get(username=f"bench{index % users}")
        upload = Upload.objects.get(owner=user, display_name=f"worker{index}")
        connection.ensure_connection()
        results.put(("ready", index))
        if not go.wait(START_TIMEOUT):
            raise RuntimeError("never told to start")
        admit, release, cycle, refused = [], [], [], Counter()
        started = time.perf_counter()
        deadline = started + seconds
        while (t0 := time.perf_counter()) < deadline:
            if phase == "service":
                try:
                    slot = slot_admit(Slot.Kind.UPLOAD, user, upload=upload)
                except SlotsExhausted as refusal:
                    refused[refusal.code] += 1
                    continue
                t1 = time.perf_counter()
                slot_release(slot.pk, Slot.ReleaseReason.COMPLETED)
            else:
                now = timezone.now()
                row = Slot.objects.create(
                    kind=Slot.Kind.UPLOAD,
                    user=user,
                    upload=upload,
                    global_index=index,  # one index per worker: never a conflict, no limit logic
                    acquired_at=now,
                    lease_expires_at=now,
                )
                t1 = time.perf_counter()
                Slot.objects.filter(pk=row.pk).update(released_at=now, release_reason=Slot.ReleaseReason.COMPLETED)
            t2 = time.perf_counter()
            admit.append(t1 - t0)
            release.append(t2 - t1)
            cycle.append(t2 - t0)
        elapsed = time.perf_counter() - started
        connection.close()
        report = {"admit": admit, "release": release, "cycle": cycle, "refused": dict(refused), "elapsed": elapsed}
        results.put(("done", report))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def observer(env: dict, stop, results) -> None:
    """Sample the active upload slots (one SELECT, one snapshot) until told to stop; report any violation."""
    try:
        configure(env)
        from uploads.models import Slot

        samples, peak, violations = 0, 0, []
        while not stop.is_set():
            rows = list(
                Slot.objects.active().filter(kind=Slot.Kind.UPLOAD).values_list("user_id", "upload_id", "global_index")
            )
            samples += 1
            peak = max(peak, len(rows))
            per_user = Counter(user for user, _, _ in rows)
            per_upload = Counter(upload for _, upload, _ in rows)
            problems = [f"{len(rows)} active > {GLOBAL_LIMIT}"] if len(rows) > GLOBAL_LIMIT else []
            problems += [f"user {u}: {n} > {USER_LIMIT}" for u, n in per_user.items() if n > USER_LIMIT]
            problems += [f"upload {u}: {n} writers" for u, n in per_upload.items() if n > 1]
            if len({index for _, _, index in rows}) != len(rows):
                problems.append("two active slots share a global index")
            if problems and len(violations) < 10:
                violations.append(problems)
            time.sleep(0.002)
        results.put(("observed", {"samples": samples, "peak": peak, "violations": violations}))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def expect(results, kind: str, timeout: float):
    try:
        got, payload = results.get(timeout=timeout)
    except queue.Empty:
        raise SystemExit(f"no {kind!r} report within {timeout:.0f} s: a worker is hung") from None
    if got == "error":
        raise SystemExit(f"a worker failed:\n{payload}")
    if got != kind:
        raise SystemExit(f"expected {kind!r}, got {got!r}: {payload!r}")
    return payload


def run_phase(phase: str, args, env: dict) -> dict:
    """Start the workers (and, for the service, the observer), run them together, gather their reports."""
    if args.mode == "processes":
        ctx = multiprocessing.get_context("spawn")
        results, go, stop = ctx.Queue(), ctx.Event(), ctx.Event()

        def start(target, *target_args):
            process = ctx.Process(target=target, args=(env, *target_args), daemon=True)
            process.start()
            return process
    else:
        configure(env)  # once, in this thread, before the worker threads use the ORM
        results, go, stop = queue.Queue(), threading.Event(), threading.Event()

        def start(target, *target_args):
            thread = threading.Thread(target=target, args=(env, *target_args), daemon=True)
            thread.start()
            return thread

    users = math.ceil(args.workers / 2)
    workers = [start(worker, phase, i, users, args.seconds, go, results) for i in range(args.workers)]
    for _ in workers:
        expect(results, "ready", START_TIMEOUT)
    watcher = None
    if phase == "service":
        # Always a process: it must read through its own connection, whatever the workers are.
        ctx = multiprocessing.get_context("spawn")
        observer_results, stop = ctx.Queue(), ctx.Event()
        watcher = ctx.Process(target=observer, args=(env, stop, observer_results), daemon=True)
        watcher.start()
    go.set()
    reports = [expect(results, "done", args.seconds + 60) for _ in workers]
    observed = None
    if watcher is not None:
        stop.set()
        observed = expect(observer_results, "observed", 60)
        watcher.join(10)
    for each in workers:
        each.join(10)
    return summarize(reports, observed)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)] * 1000 if ordered else float("nan")


def summarize(reports: list[dict], observed: dict | None) -> dict:
    merged = {key: [v for report in reports for v in report[key]] for key in ("admit", "release", "cycle")}
    elapsed = max(report["elapsed"] for report in reports)
    refused = sum((Counter(report["refused"]) for report in reports), Counter())
    summary = {"cycles": len(merged["cycle"]), "rate": len(merged["cycle"]) / elapsed, "refused": dict(refused)}
    for key, values in merged.items():
        summary[f"{key}_p50"] = percentile(values, 0.50)
        summary[f"{key}_p99"] = percentile(values, 0.99)
    summary["observed"] = observed
    return summary


def create_database(server_url: str) -> tuple[str, dict]:
    import psycopg

    parts = urlsplit(server_url)
    name = f"ddx_bench_{os.getpid()}"
    connect = {
        "host": parts.hostname,
        "port": parts.port,
        "user": parts.username,
        "password": parts.password,
        "dbname": parts.path.lstrip("/") or "postgres",
        "autocommit": True,
    }
    with psycopg.connect(**connect) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        version = admin.execute("SHOW server_version").fetchone()[0]
    return urlunsplit(parts._replace(path=f"/{name}")), {**connect, "name": name, "version": version}


def drop_database(server: dict) -> None:
    import psycopg

    connect = {key: value for key, value in server.items() if key not in ("name", "version")}
    with psycopg.connect(**connect) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{server["name"]}" WITH (FORCE)')


def seed(env: dict, workers: int) -> None:
    """Users bench0.. (two workers per user) and one upload per worker, in a subprocess of its own."""
    script = (
        "import os, sys; sys.path.insert(0, os.getcwd()); import django; django.setup()\n"
        "from django.contrib.auth import get_user_model\n"
        "from uploads.models import Upload\n"
        f"workers = {workers}; users = -(-workers // 2)\n"
        "people = [get_user_model().objects.create_user(f'bench{i}') for i in range(users)]\n"
        "for i in range(workers):\n"
        "    Upload.objects.create(owner=people[i % users], original_filename='f', display_name=f'worker{i}', size=1)\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, **env}, check=True, timeout=120)


def truncate_slots(server: dict) -> None:
    """Start each phase from an empty slot table, so the service does not read the baseline's rows."""
    import psycopg

    connect = {key: value for key, value in server.items() if key not in ("name", "version")}
    with psycopg.connect(**{**connect, "dbname": server["name"]}) as db:
        db.execute("TRUNCATE uploads_slot")


def line(label: str, summary: dict) -> str:
    return (
        f"{label:<34} {summary['rate']:8.0f} cycles/s ({summary['cycles']} in all)  "
        f"first call p50 {summary['admit_p50']:6.2f} ms p99 {summary['admit_p99']:6.2f} ms | "
        f"second p50 {summary['release_p50']:6.2f} ms p99 {summary['release_p99']:6.2f} ms | "
        f"cycle p50 {summary['cycle_p50']:6.2f} ms p99 {summary['cycle_p99']:6.2f} ms"
    )


def default_server_url() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        return url
    return "postgres://postgres@127.0.0.1:5432/postgres"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase (default 10)")
    parser.add_argument("--workers", type=int, default=16, help="concurrent workers (default 16)")
    parser.add_argument("--mode", choices=["processes", "threads"], default="processes")
    parser.add_argument(
        "--database-url",
        default=default_server_url(),
        help="a PostgreSQL URL; the benchmark creates and drops ddx_bench_<pid> on its server",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    url, server = create_database(args.database_url)
    env = {
        "DJANGO_SETTINGS_MODULE": "directdrivex.settings",
        "DATABASE_URL": url,
        "DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS": str(GLOBAL_LIMIT),
        "DIRECTDRIVEX_USER_UPLOAD_SLOTS": str(USER_LIMIT),
        "REDIS_URL": "",
        "DEBUG": "0",
    }
    try:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "--skip-checks", "-v", "0"],
            cwd=REPO,
            env={**os.environ, **env},
            check=True,
            timeout=START_TIMEOUT,
        )
        seed(env, args.workers)
        print(
            f"slot admission: PostgreSQL {server['version']} at {server['host']}:{server['port']}, "
            f"{args.workers} worker {args.mode}, {args.seconds:g} s per phase, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.2f}, limits {GLOBAL_LIMIT} global / {USER_LIMIT} per user"
        )
        baseline = run_phase("baseline", args, env)
        print(line("baseline: ORM INSERT + UPDATE", baseline))
        truncate_slots(server)
        service = run_phase("service", args, env)
        print(line("service: slot_admit + slot_release", service))
    finally:
        drop_database(server)

    observed = service["observed"]
    print(f"refusals during the service phase: {service['refused'] or 'none'}")
    print(f"service / baseline throughput: {service['rate'] / baseline['rate']:.2f}")
    print(
        f"against the targets: {service['rate'] / TARGET_RATE:.2f} x {TARGET_RATE} cycles/s; "
        f"admit p99 {service['admit_p99']:.1f} ms and cycle p99 {service['cycle_p99']:.1f} ms "
        f"vs {TARGET_P99_MS} ms ({TARGET_P99_MS / service['cycle_p99']:.2f} x headroom on the cycle)"
    )
    print(
        f"invariant: observer took {observed['samples']} samples, peak {observed['peak']} active upload slots, "
        f"{len(observed['violations'])} violations"
    )
    if observed["violations"]:
        print(f"VIOLATIONS: {observed['violations']}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
