"""What each process counts where things happen: the Prometheus counters, gauges and histograms of DirectDriveX.

A leaf: it imports nothing of the app, so the services (uploads.services.events),
the writer, the transports and downloads can count without importing the
scrape-time side (uploads.ops.collector, which reads the database through the
services). Not in uploads/ops with the collector for that reason: the services
count, and ops calls the services, so a counters module in ops would make the
two packages import each other. With
several server processes on a host the values are summed through
prometheus_client's multiprocess mode: every process that has
``PROMETHEUS_MULTIPROC_DIR`` in its environment writes its values to files
there, and ``GET /metrics`` of any process reads all of them (docs/operations.md, "Metrics").
"""

import os
from pathlib import Path


def _prepare_multiprocess_dir() -> str | None:
    """Create PROMETHEUS_MULTIPROC_DIR if set and drop this PID's stale live gauges; why it is unusable, or None.

    Runs before prometheus_client is imported and before any metric exists:
    prometheus_client picks multiprocess mode from the environment at import,
    and a metric opens its file (reading any old value) when it is created. A
    process that reuses the PID of a dead one must not start from the dead
    one's open-connection count. An unusable directory is taken out of the
    environment (so that the import does not fail with a traceback) and
    reported by the system check uploads.E011, which stops start-up.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return None
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"{path} is not writable by this process")
        for stale in Path(path).glob(f"gauge_live*_{os.getpid()}.db"):
            stale.unlink(missing_ok=True)
    except OSError as error:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        return f"PROMETHEUS_MULTIPROC_DIR={path} cannot hold metrics: {error}"
    return None


MULTIPROCESS_PROBLEM = _prepare_multiprocess_dir()

from prometheus_client import (  # noqa: E402 - after the directory is prepared, see above
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# `*_created` samples (a timestamp per counter) are noise here, and multiprocess mode has none.
disable_created_metrics()

# --- counted where it happens ----------------------------------------------------------

UPLOADS_CREATED = Counter("directdrivex_uploads_created", "Uploads created (POST /api/uploads/ accepted).")
UPLOADS_COMPLETED = Counter("directdrivex_uploads_completed", "Uploads finished: verified, durable and visible.")
UPLOADS_FAILED = Counter("directdrivex_uploads_failed", "Uploads failed (the bytes did not match the sha256).")
UPLOADS_CANCELLED = Counter("directdrivex_uploads_cancelled", "Unfinished uploads cancelled (DELETE, admin).")
UPLOADS_EXPIRED = Counter("directdrivex_uploads_expired", "Unfinished uploads expired after idling too long.")
UPLOADS_DELETED = Counter("directdrivex_uploads_deleted", "Finished (or failed, cancelled, expired) uploads deleted.")
BYTES_RECEIVED = Counter(
    "directdrivex_bytes_received",
    "Upload bytes made durable (fsynced and committed as the resume point); counted once per commit.",
)
RESUME_BYTES_READ = Counter(
    "directdrivex_resume_bytes_read",
    "Bytes a writer read back from storage to resume: a part re-hashed for want of a saved sha256 state, or an "
    "object store's tails (never its committed parts).",
)
BYTES_SERVED = Counter(
    "directdrivex_bytes_served", "Download bytes sent by this server (not those nginx sends via X-Accel-Redirect)."
)
CONNECTIONS_OPEN = Gauge(
    "directdrivex_connections_open",
    "Open upload WebSocket connections and download bodies being streamed.",
    ["kind"],
    multiprocess_mode="livesum",
)
SLOTS_ADMITTED = Counter("directdrivex_slots_admitted", "Slots admitted.", ["kind"])
SLOTS_RELEASED = Counter(
    "directdrivex_slots_released",
    "Slots released by their holder or revoked (reset, cancel, reap).",
    ["kind", "reason"],
)
REFUSALS = Counter(
    "directdrivex_refusals",
    "Refusals answered, by machine code: HTTP error bodies on /api/ and WebSocket error messages.",
    ["transport", "code"],
)
WEBSOCKET_CLOSES = Counter("directdrivex_websocket_closes", "Close codes sent to upload connections.", ["code"])
COMMIT_SECONDS = Histogram(
    "directdrivex_commit_seconds",
    "Durable offset commits of upload writers: fsync of the part file plus the fenced database update.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

SHARE_LINKS = Counter(
    "directdrivex_share_links",
    "Share link events: created, used (a download through a link ended or was handed to nginx), revoked.",
    ["event"],
)
SHARE_DOWNLOADS = Counter(
    "directdrivex_share_downloads",
    "Downloads through share links that sent the file's last byte: what a link's download limit counts.",
)

for _event in ("created", "used", "revoked"):
    SHARE_LINKS.labels(_event)

for _kind in ("upload", "download"):
    # Present from the start, at 0: an alert on them must not depend on the first connection.
    CONNECTIONS_OPEN.labels(_kind)
    SLOTS_ADMITTED.labels(_kind)

UPLOAD_COUNTERS = {
    "started": UPLOADS_CREATED,
    "completed": UPLOADS_COMPLETED,
    "failed": UPLOADS_FAILED,
    "cancelled": UPLOADS_CANCELLED,
    "expired": UPLOADS_EXPIRED,
    "deleted": UPLOADS_DELETED,
}


def refusal_counted(transport: str, code: str) -> None:
    REFUSALS.labels(transport, code).inc()


def websocket_closed(code: int | None) -> None:
    WEBSOCKET_CLOSES.labels(str(code or 1000)).inc()
