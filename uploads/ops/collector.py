"""GET /metrics at scrape time: the database's view of the deployment, and every process's counters.

Two kinds of metrics (docs/operations.md, "Metrics"):

* Counted by the process where things happen: uploads.metrics, the leaf
  the rest of the app increments.
* Deployment state kept in the database (slots active and stuck, the last
  fsck's findings): ``DatabaseCollector`` queries it at each scrape, so it is
  right across processes and hosts by construction.

With ``PROMETHEUS_MULTIPROC_DIR`` the directory is tidied as processes come
and go (``tidy``): the live gauges (open connections) of a process that is
gone are dropped, and its counters and histograms are folded into
``*_archive.db`` files, so totals never go back and the directory holds files
of live processes only. The directory must be local to one host (one PID
namespace): liveness is judged by PID.
"""

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from django.db.models import Count, Q
from django.utils import timezone
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from uploads.models import FsckRun, Slot, Upload
from uploads.services.slots import slot_limits

log = logging.getLogger(__name__)


# --- read from the database at scrape time -----------------------------------------------


class DatabaseCollector:
    """Slots and fsck findings as the database has them now: the same answer from every process."""

    def collect(self):
        up = GaugeMetricFamily("directdrivex_database_up", "Whether the database answered this scrape (1) or not (0).")
        try:
            families = self._from_database()
        except Exception as error:  # an outage must not take the process's own metrics down with it
            log.warning("metrics: database unavailable for this scrape: %r", error)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _from_database(self) -> list:
        now = timezone.now()
        active = GaugeMetricFamily("directdrivex_slots_active", "Active slots (released_at unset).", labels=["kind"])
        stuck = GaugeMetricFamily(
            "directdrivex_slots_stuck", "Active slots whose lease ran out (holder gone or frozen).", labels=["kind"]
        )
        limit = GaugeMetricFamily("directdrivex_slots_limit", "Configured global slot limit.", labels=["kind"])
        counts = {
            row["kind"]: row
            for row in Slot.objects.active()
            .values("kind")
            .annotate(active=Count("pk"), stuck=Count("pk", filter=Q(lease_expires_at__lte=now)))
        }
        for kind in Slot.Kind.values:
            row = counts.get(kind, {"active": 0, "stuck": 0})
            active.add_metric([kind], row["active"])
            stuck.add_metric([kind], row["stuck"])
            limit.add_metric([kind], slot_limits(kind).global_limit)
        unfinished = GaugeMetricFamily("directdrivex_uploads_unfinished", "Uploads in status uploading.")
        unfinished.add_metric([], Upload.objects.unfinished().count())
        families = [active, stuck, limit, unfinished]

        run = FsckRun.objects.order_by("-started_at").first()
        if run is not None:
            last = GaugeMetricFamily(
                "directdrivex_fsck_last_run_timestamp_seconds", "When the last `uploads fsck` finished (Unix time)."
            )
            last.add_metric([], run.finished_at.timestamp())
            findings = GaugeMetricFamily(
                "directdrivex_fsck_findings",
                "Findings of the last `uploads fsck`, by kind; repaired=true if that run repaired them.",
                labels=["kind", "repaired"],
            )
            tally: dict[tuple[str, str], int] = {}
            for finding in run.findings:
                key = (str(finding.get("kind", "unknown")), "true" if finding.get("repaired") else "false")
                tally[key] = tally.get(key, 0) + 1
            for (kind, repaired), number in sorted(tally.items()):
                findings.add_metric([kind, repaired], number)
            families += [last, findings]
        return families


class _ThisProcess:
    """The default registry's metrics (single-process mode: this process's counters, its CPU and memory)."""

    def collect(self):
        yield from REGISTRY.collect()


def multiprocess_dir() -> Path | None:
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(path) if path else None


def render() -> bytes:
    """The Prometheus text exposition of every metric (GET /metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector())
    path = multiprocess_dir()
    if path is None:
        registry.register(_ThisProcess())
        return generate_latest(registry)
    MultiProcessCollector(registry, path=str(path))
    with _locked(path):
        # Under the lock: a scrape never sees a dead process's counters twice
        # (in its file and in the archive) or not at all.
        _tidy(path)
        return generate_latest(registry)


# --- multiprocess bookkeeping ---------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path):
    with open(path / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _pids(path: Path) -> set[int]:
    pids = set()
    for file in path.glob("*.db"):
        tail = file.stem.rsplit("_", 1)[-1]
        if tail.isdigit():
            pids.add(int(tail))
    return pids


def _fold_into_archive(path: Path, pid: int) -> None:
    for kind in ("counter", "histogram"):
        dead = path / f"{kind}_{pid}.db"
        if not dead.exists():
            continue
        archive = MmapedDict(str(path / f"{kind}_archive.db"))
        try:
            for key, value, _timestamp, _position in MmapedDict.read_all_values_from_file(str(dead)):
                total, _ = archive.read_value(key)
                archive.write_value(key, total + value, 0.0)
        finally:
            archive.close()
        dead.unlink()


def _tidy(path: Path) -> list[int]:
    """Drop the live gauges of processes that are gone and fold their counters into the archive (lock held)."""
    gone = [pid for pid in sorted(_pids(path)) if pid != os.getpid() and not _alive(pid)]
    for pid in gone:
        mark_process_dead(pid, str(path))
        _fold_into_archive(path, pid)
    if gone:
        log.info("metrics: folded the files of %d stopped process(es) into the archive", len(gone))
    return gone


def tidy() -> list[int]:
    """At server start (manage.py serve): clean up after processes that stopped or crashed. Returns their PIDs."""
    path = multiprocess_dir()
    if path is None:
        return []
    with _locked(path):
        return _tidy(path)


def process_exiting() -> None:
    """At server exit: this process's open connections stop counting at once (its counters stay, summed)."""
    path = multiprocess_dir()
    if path is not None:
        mark_process_dead(os.getpid(), str(path))
