"""`manage.py slots status|reap|reset|prune|reaper`: look at, repair and trim upload/download slots.

Thin on purpose: each subcommand calls one service in uploads.services.slots (the same
ones the admin actions use), prints what it found and what it did, and is
safe to rerun.
"""

import argparse
import json
import uuid

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from uploads.exceptions import DirectDriveXError
from uploads.models import Upload
from uploads.ops.reaper import PRUNE_INTERVAL, ReaperPass, StopFlag, reaper_run, stop_on_signals
from uploads.services.slots import slots_prune, slots_reap, slots_reset, slots_summary


class Command(BaseCommand):
    help = "Show, reap, reset or prune upload/download slots (docs/slots.md)."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True, metavar="{status,reap,reset,prune,reaper}")

        status = sub.add_parser("status", help="Active, stuck and per-user slot counts.")
        status.add_argument("--json", action="store_true", dest="as_json", help="Print the summary as JSON.")

        reap = sub.add_parser("reap", help="Release every slot whose lease has expired.")
        reap.add_argument("--dry-run", action="store_true", help="List what would be reaped; change nothing.")
        reap.add_argument("--json", action="store_true", dest="as_json", help="Print what it found and did as JSON.")

        reset = sub.add_parser("reset", help="Release active slots in a scope and fence off their writers.")
        scope = reset.add_mutually_exclusive_group(required=True)
        scope.add_argument("--all", action="store_true", dest="everything", help="Every active slot.")
        scope.add_argument("--user", metavar="USERNAME", help="The active slots of this user.")
        scope.add_argument("--upload", metavar="ID", help="The active slot of this upload.")
        reset.add_argument("--dry-run", action="store_true", help="List what would be reset; change nothing.")
        reset.add_argument("--json", action="store_true", dest="as_json", help="Print what it found and did as JSON.")

        prune = sub.add_parser(
            "prune", help="Delete released slot rows older than DIRECTDRIVEX_SLOT_HISTORY_DAYS (active rows never)."
        )
        prune.add_argument("--dry-run", action="store_true", help="Count what would be deleted; change nothing.")
        prune.add_argument("--json", action="store_true", dest="as_json", help="Print what it found and did as JSON.")

        reaper = sub.add_parser(
            "reaper",
            help="Run until SIGTERM/SIGINT: reap expired leases, expire idle uploads, prune history, on a schedule.",
        )
        reaper.add_argument(
            "--interval",
            type=_seconds,
            metavar="S",
            help="Seconds between passes (default: a quarter of DIRECTDRIVEX_SLOT_LEASE_SECONDS, 15 by default).",
        )
        reaper.add_argument(
            "--prune-interval",
            type=_seconds,
            default=PRUNE_INTERVAL,
            metavar="S",
            help=f"Seconds between history prunes (default {PRUNE_INTERVAL:g}; the first pass prunes).",
        )
        reaper.add_argument("--json", action="store_true", dest="as_json", help="Print one JSON line per pass.")

    def handle(self, *args, action, **options):
        try:
            getattr(self, f"handle_{action}")(**options)
        except DirectDriveXError as exc:
            raise CommandError(f"{exc.code}: {exc.detail}") from exc

    def handle_status(self, *, as_json: bool = False, **options):
        summary = slots_summary()
        if as_json:
            self.stdout.write(json.dumps(summary, indent=2, sort_keys=True))
            return
        for kind, counts in summary.items():
            self.stdout.write(
                f"{kind}: {counts['active']} active of {counts['limit']}, {counts['stuck']} stuck (lease expired)"
            )
            for username, count in counts["by_user"].items():
                self.stdout.write(f"  {username}: {count}")
        if any(counts["stuck"] for counts in summary.values()):
            self.stdout.write("Stuck slots are reclaimed by the next admission, or now by `manage.py slots reap`.")

    def handle_reap(self, *, dry_run: bool = False, as_json: bool = False, **options):
        slots = slots_reap(dry_run=dry_run)
        self._report(slots, "reap", dry_run, as_json)

    def handle_reset(
        self, *, everything=False, user=None, upload=None, dry_run: bool = False, as_json: bool = False, **options
    ):
        scope = {"everything": everything, "user": self._user(user), "upload": self._upload(upload)}
        slots = slots_reset(**scope, dry_run=dry_run)
        self._report(slots, "reset", dry_run, as_json)

    def handle_prune(self, *, dry_run: bool = False, as_json: bool = False, **options):
        pruned = slots_prune(dry_run=dry_run)
        if as_json:
            document = {"action": "prune", "dry_run": dry_run, "count": pruned.count, "cutoff": pruned.cutoff}
            self.stdout.write(json.dumps(document, cls=DjangoJSONEncoder, sort_keys=True))
            return
        found = (
            f"{pruned.count} released slot row(s) older than {settings.DIRECTDRIVEX_SLOT_HISTORY_DAYS} day(s) "
            f"(released before {pruned.cutoff.isoformat()})"
        )
        if dry_run:
            self.stdout.write(f"Found {found}. Would delete them; nothing changed (dry run).")
        else:
            self.stdout.write(self.style.SUCCESS(f"Deleted {found}."))

    def handle_reaper(self, *, interval=None, prune_interval=PRUNE_INTERVAL, as_json: bool = False, **options):
        totals = {"reaped": 0, "expired": 0, "pruned": 0, "failed": 0}

        def report(result: ReaperPass):
            # The log has a line per pass already; stdout is for scripts (--json) and the summary.
            if as_json:
                self.stdout.write(json.dumps(result.as_dict(), sort_keys=True))
                self.stdout.flush()  # one line per pass as it happens, also into a pipe
            totals["reaped"] += len(result.reaped or ())
            totals["expired"] += len(result.expired or ())
            totals["pruned"] += result.pruned or 0
            totals["failed"] += bool(result.error)

        stop = StopFlag()
        try:
            with stop_on_signals(stop):
                passes = reaper_run(stop, interval=interval, prune_interval=prune_interval, on_pass=report)
        finally:
            stop.close()
        if not as_json:
            self.stdout.write(
                f"Stopped by {stop.reason} after {passes} pass(es) ({totals['failed']} failed): "
                f"reaped {totals['reaped']} slot(s), expired {totals['expired']} upload(s), "
                f"pruned {totals['pruned']} history row(s)."
            )

    def _user(self, username):
        if username is None:
            return None
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user named {username!r}.")
        return user

    def _upload(self, upload_id):
        if upload_id is None:
            return None
        try:
            key = uuid.UUID(upload_id)
        except ValueError:
            raise CommandError(f"{upload_id!r} is not an upload id (a UUID).") from None
        upload = Upload.objects.filter(pk=key).first()
        if upload is None:
            raise CommandError(f"No upload with id {upload_id}.")
        return upload

    def _report(self, slots, verb: str, dry_run: bool, as_json: bool):
        now = timezone.now()
        if as_json:
            document = {"action": verb, "dry_run": dry_run, "count": len(slots), "slots": [_slot(s) for s in slots]}
            self.stdout.write(json.dumps(document, cls=DjangoJSONEncoder, sort_keys=True))
            return
        for slot in slots:
            lease = "expired" if slot.lease_expires_at <= now else "live"
            self.stdout.write(
                f"  slot {slot.pk}: {slot.kind} user={slot.user_id} upload={slot.upload_id or '-'} "
                f"generation={slot.generation} lease {lease} at {slot.lease_expires_at.isoformat()} "
                f"holder={slot.holder_channel or '-'}"
            )
        if dry_run:
            self.stdout.write(f"Would {verb} {len(slots)} slot(s); nothing changed (dry run).")
        else:
            done = {"reap": "Reaped", "reset": "Reset"}[verb]
            self.stdout.write(self.style.SUCCESS(f"{done} {len(slots)} slot(s)."))


def _slot(slot) -> dict:
    return {
        "id": slot.pk,
        "kind": slot.kind,
        "user": slot.user_id,
        "upload": slot.upload_id,
        "generation": slot.generation,
        "lease_expires_at": slot.lease_expires_at,
        "holder_channel": slot.holder_channel,
        "holder_process": slot.holder_process,
    }


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return seconds
