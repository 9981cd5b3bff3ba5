"""State transitions of uploads and slots: one call logs the line, counts the metric and sends the signal.

Services call :func:`record` where a transition happens, inside the
transaction that makes it. The three effects run together, once that
transaction commits (``transaction.on_commit``; at once outside a
transaction), so they can never disagree: a transition that is rolled back (a
refused admission, a cancel that lost a race with completion, a test's
rollback) is neither logged, counted nor signalled.

Lines go to the ``uploads.services.events`` logger, one per transition, with
``upload``, ``user``, ``slot``, ``gen`` (the fencing generation), ``kind``,
``reason`` and whatever else the service knows; uploads.logs adds the
``request_id`` and ``remote`` address of the entry point. Not called per
frame or per commit: the writer's hot path counts its bytes itself, once per
commit (uploads.metrics).
"""

import enum
import functools
import logging

from django.db import transaction

from uploads import metrics, signals
from uploads.models import ShareLink, Upload

# Named for what operators filter on (docs/operations.md, "Logs"), not for the module: a stable interface.
log = logging.getLogger("uploads.events")


class Event(enum.StrEnum):
    UPLOAD_STARTED = "upload.started"
    UPLOAD_COMPLETED = "upload.completed"
    UPLOAD_FAILED = "upload.failed"
    UPLOAD_CANCELLED = "upload.cancelled"
    UPLOAD_EXPIRED = "upload.expired"
    UPLOAD_DELETED = "upload.deleted"
    # A connection became the upload's one writer, with a new fencing generation.
    WRITER_ADMITTED = "writer.admitted"
    SLOT_ADMITTED = "slot.admitted"
    # Let go by its holder (completed, disconnected, error, idle, failed).
    SLOT_RELEASED = "slot.released"
    # Taken from its holder (reset, cancelled), which is fenced off and told.
    SLOT_REVOKED = "slot.revoked"
    # Taken because its lease ran out (the reaper, an admission, a takeover).
    SLOT_REAPED = "slot.reaped"
    SHARE_CREATED = "share.created"
    # A download through the link ended (or was handed to nginx); ``counted`` if it sent the last byte.
    SHARE_USED = "share.used"
    SHARE_REVOKED = "share.revoked"


# What an operator should notice; the rest is the normal life of an upload.
LEVELS = {
    Event.UPLOAD_FAILED: logging.WARNING,
    Event.SLOT_REVOKED: logging.WARNING,
    Event.SLOT_REAPED: logging.WARNING,
}
# Per signal, the fields passed on besides upload_id, user_id and size (uploads.signals).
SIGNAL_FIELDS = {"started": ("filename",), "completed": ("sha256",), "failed": ("reason",), "deleted": ("status",)}
SHARE_SIGNAL_FIELDS = {
    "created": ("expires_at", "max_downloads", "password"),
    "used": ("sent", "counted"),
    "revoked": ("reason",),
}


def record(
    event: Event,
    *,
    upload=None,
    user=None,
    share=None,
    slot=None,
    generation=None,
    kind=None,
    reason=None,
    **details,
) -> None:
    """Log, count and signal ``event`` when the current transaction commits (see the module docstring).

    ``upload``, ``user``, ``share``, ``slot``: ids (not model instances); ``share`` is a
    share link's id, never its token. ``details``
    are logged too (``size``, ``status``, ``holder``, …).
    """
    fields = {
        "upload": upload,
        "user": user,
        "share": share,
        "slot": slot,
        "gen": generation,
        "kind": kind,
        "reason": reason,
    }
    fields.update(details)
    # robust: a failure here is logged by Django and never undoes or fails the service's change.
    transaction.on_commit(functools.partial(_emit, Event(event), fields), robust=True)


def _emit(event: Event, fields: dict) -> None:
    log.log(LEVELS.get(event, logging.INFO), event.value, extra={"ddx": fields})
    group, _, outcome = event.value.partition(".")
    if group == "upload":
        metrics.UPLOAD_COUNTERS[outcome].inc()
        _send(outcome, fields)
    elif group == "share":
        metrics.SHARE_LINKS.labels(outcome).inc()
        if fields.get("counted"):
            metrics.SHARE_DOWNLOADS.inc()
        _send_share(outcome, fields)
    elif event == Event.SLOT_ADMITTED:
        metrics.SLOTS_ADMITTED.labels(fields["kind"]).inc()
    elif group == "slot":
        metrics.SLOTS_RELEASED.labels(fields["kind"], fields["reason"]).inc()


def _send(outcome: str, fields: dict) -> None:
    signal = signals.BY_OUTCOME[outcome]
    extra = {name: fields.get(name) for name in SIGNAL_FIELDS.get(outcome, ())}
    answers = signal.send_robust(
        sender=Upload, upload_id=fields["upload"], user_id=fields["user"], size=fields.get("size"), **extra
    )
    _log_failed_receivers(answers, fields, f"upload_{outcome}")


def _send_share(outcome: str, fields: dict) -> None:
    extra = {name: fields.get(name) for name in SHARE_SIGNAL_FIELDS[outcome]}
    answers = signals.SHARE_BY_OUTCOME[outcome].send_robust(
        sender=ShareLink, share_id=fields["share"], upload_id=fields["upload"], user_id=fields["user"], **extra
    )
    _log_failed_receivers(answers, fields, f"share_{outcome}")


def _log_failed_receivers(answers, fields: dict, signal: str) -> None:
    for receiver, answer in answers:
        if isinstance(answer, Exception):
            # django.dispatch has logged the traceback; this line says which upload (and link) it was about.
            log.error(
                "signal receiver failed: %s: %r",
                getattr(receiver, "__qualname__", receiver),
                answer,
                extra={
                    "ddx": {
                        "upload": fields["upload"],
                        "user": fields["user"],
                        "share": fields["share"],
                        "signal": signal,
                    }
                },
            )
