"""`manage.py uploads expire|fsck`: end idle unfinished uploads; find and repair inconsistent state.

Thin on purpose: each subcommand calls one service (uploads.services.uploads.uploads_expire,
uploads.ops.fsck.fsck_run), prints what it found and what it did, and is safe to rerun.
"""

import json
import logging

from django.core.management.base import BaseCommand, CommandError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError

from uploads.ops.fsck import fsck_run
from uploads.services.uploads import uploads_expire

log = logging.getLogger(__name__)

# fsck exit codes (docs/operations.md): 0 nothing wrong, or everything found was repaired.
FSCK_UNREPAIRED = 1  # problems found and left (no --repair, or a repair was refused or failed)
FSCK_FAILED = 2  # fsck itself could not finish (database or storage unreachable)


class Command(BaseCommand):
    help = "Maintain uploads: expire idle unfinished uploads; fsck rows, slots and files against each other."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True, metavar="{expire,fsck}")
        expire = sub.add_parser("expire", help="Expire idle unfinished uploads: free their slots, delete their bytes.")
        expire.add_argument("--dry-run", action="store_true", help="List what would expire; change nothing.")
        expire.add_argument("--json", action="store_true", dest="as_json", help="Print what expired as JSON.")

        fsck = sub.add_parser(
            "fsck",
            help="Find (and with --repair, fix) slots, upload rows and files that disagree (docs/operations.md).",
        )
        fsck.add_argument("--repair", action="store_true", help="Fix each finding in the safest way.")
        fsck.add_argument(
            "--verify",
            action="store_true",
            help="Also re-hash every finished file against its sha256 (reads them all).",
        )
        fsck.add_argument("--json", action="store_true", dest="as_json", help="Print the report as JSON.")

    def handle(self, *args, action, **options):
        getattr(self, f"handle_{action}")(**options)

    def handle_expire(self, *, dry_run: bool = False, as_json: bool = False, **options):
        uploads = uploads_expire(dry_run=dry_run)
        if as_json:
            listed = [
                {
                    "id": upload.pk,
                    "filename": upload.display_name,
                    "user": upload.owner_id,
                    "offset": upload.offset,
                    "size": upload.size,
                    "last_activity_at": upload.last_activity_at,
                }
                for upload in uploads
            ]
            document = {"action": "expire", "dry_run": dry_run, "count": len(uploads), "uploads": listed}
            self.stdout.write(json.dumps(document, cls=DjangoJSONEncoder, sort_keys=True))
            return
        for upload in uploads:
            self.stdout.write(
                f"  {upload.pk}: {upload.display_name!r} of user={upload.owner_id}, "
                f"{upload.offset}/{upload.size} bytes, idle since {upload.last_activity_at.isoformat()}"
            )
        verb = "Would expire" if dry_run else "Expired"
        self.stdout.write(f"{verb} {len(uploads)} upload(s).")

    def handle_fsck(self, *, repair: bool = False, verify: bool = False, as_json: bool = False, **options):
        try:
            report = fsck_run(repair=repair, verify=verify)
        except (DatabaseError, OSError) as exc:
            log.exception("fsck failed")
            raise CommandError(f"fsck could not finish: {exc}", returncode=FSCK_FAILED) from exc
        if as_json:
            self.stdout.write(json.dumps(report.as_dict(), indent=2))
        else:
            self._print_fsck(report)
        left = len(report.unrepaired)
        if left:
            hint = "" if repair else " (run with --repair to fix them)"
            raise CommandError(f"{left} problem(s) left{hint}.", returncode=FSCK_UNREPAIRED)

    def _print_fsck(self, report):
        for finding in report.findings:
            line = (
                f"{finding.kind} upload={finding.upload or '-'} user={finding.user or '-'} "
                f"slot={finding.slot or '-'} path={finding.path or '-'}: {finding.detail}"
            )
            if finding.action:
                line += f" -> {finding.action}"
            style = self.style.SUCCESS if finding.repaired else self.style.WARNING
            self.stdout.write(style(line))
        checked = report.checked
        self.stdout.write(
            f"Checked {checked['slots']} active slot(s), {checked['uploads']} upload(s), {checked['files']} file(s); "
            f"left alone {report.live_uploads} live upload(s) and {report.held_files} file(s) a writer holds open."
        )
        found, left = len(report.findings), len(report.unrepaired)
        summary = f"Found {found} problem(s), repaired {found - left}, {left} left (fsck run {report.run_id})."
        self.stdout.write(self.style.SUCCESS(summary) if not left else self.style.ERROR(summary))
