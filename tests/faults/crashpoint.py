"""``manage.py`` with a SIGKILL at one step of an upload's finalization: a crash at an exact instant.

    DDX_CRASH_AT=<step> DDX_CRASH_FLAG=<path> python -m tests.faults.crashpoint manage.py serve --port N

The process kills itself with SIGKILL — no cleanup, no finally, as a power cut
or the OOM killer would — the first time an upload reaches ``step``; it then
writes nothing more. ``DDX_CRASH_FLAG`` is created just before, so the host
restarted with the same command (or another host) goes past the step. Steps, in
the order uploads.writer's ``_finalize`` takes them:

* ``before_visible``: every byte is in the part and fsynced (local) or in
  uploaded parts (s3), the offset committed; the file is not yet visible
  (before the rename into files/, before CompleteMultipartUpload).
* ``after_visible``: the file is visible (renamed and the folders fsynced, or the
  multipart upload completed); the row still says uploading.
* ``before_commit``: the UPDATE that marks the upload complete and releases its
  slot has run inside its transaction, which is not committed.

Only the server's code is wrapped, at those three names; what runs is unchanged.
"""

import os
import runpy
import signal
import sys
import threading
from pathlib import Path

STEPS = ("before_visible", "after_visible", "before_commit")


def crash(step: str) -> None:
    flag = Path(os.environ["DDX_CRASH_FLAG"])
    if flag.exists():
        return
    flag.write_text(step)
    os.kill(os.getpid(), signal.SIGKILL)


def install(step: str) -> None:
    import django

    django.setup()
    from django.db import transaction

    from uploads import writer
    from uploads.storage import local, s3

    if step == "before_visible":
        local_final_path, local_finalize, s3_complete = local.final_path, local.LocalPart.finalize, s3.complete
        finalizing = threading.local()  # final_path() is called elsewhere too (downloads, fsck)

        def local_part_finalize(self, *args, **kwargs):
            finalizing.now = True
            try:
                return local_finalize(self, *args, **kwargs)
            finally:
                finalizing.now = False

        def final_path(*args, **kwargs):
            if getattr(finalizing, "now", False):
                crash(step)  # LocalPart.finalize: synced, about to rename
            return local_final_path(*args, **kwargs)

        def complete(*args, **kwargs):
            crash(step)  # S3Part.finalize: parts uploaded, about to CompleteMultipartUpload
            return s3_complete(*args, **kwargs)

        local.LocalPart.finalize, local.final_path, s3.complete = local_part_finalize, final_path, complete
    elif step == "after_visible":
        for part_class in (local.LocalPart, s3.S3Part):
            original = part_class.finalize

            def finalize(self, *args, _original=original, **kwargs):
                _original(self, *args, **kwargs)
                crash(step)

            part_class.finalize = finalize
    elif step == "before_commit":
        writer_complete = writer.writer_complete

        def complete_uncommitted(*args, **kwargs):
            with transaction.atomic():
                result = writer_complete(*args, **kwargs)
                crash(step)  # the transaction dies with the process: PostgreSQL rolls it back
            return result

        writer.writer_complete = complete_uncommitted
    else:
        raise SystemExit(f"DDX_CRASH_AT must be one of {', '.join(STEPS)}, not {step!r}")


def main() -> None:
    install(os.environ["DDX_CRASH_AT"])
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
