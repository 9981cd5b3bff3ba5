"""`manage.py uploads expire`: end unfinished uploads that have been idle too long.

Thin on purpose: it calls uploads.transfers.uploads_expire, prints what it
found and what it did, and is safe to rerun.
"""

from django.core.management.base import BaseCommand

from uploads.transfers import uploads_expire


class Command(BaseCommand):
    help = "Maintain uploads: expire unfinished uploads idle for DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True, metavar="{expire}")
        expire = sub.add_parser("expire", help="Expire idle unfinished uploads: free their slots, delete their bytes.")
        expire.add_argument("--dry-run", action="store_true", help="List what would expire; change nothing.")

    def handle(self, *args, action, dry_run: bool = False, **options):
        uploads = uploads_expire(dry_run=dry_run)
        for upload in uploads:
            self.stdout.write(
                f"  {upload.pk}: {upload.display_name!r} of user={upload.owner_id}, "
                f"{upload.offset}/{upload.size} bytes, idle since {upload.last_activity_at.isoformat()}"
            )
        verb = "Would expire" if dry_run else "Expired"
        self.stdout.write(f"{verb} {len(uploads)} upload(s).")
