"""Django signals for integrators: an upload started, completed, failed, was cancelled, expired or was deleted.

Each is sent once per transition, after the transaction that made it has
committed (never for a change that was rolled back), by uploads.services.events, in
the process and thread that made the change (a request thread, a writer's
database thread, the reaper). ``sender`` is ``uploads.models.Upload``; every
signal has the keyword arguments

* ``upload_id`` (``uuid.UUID``) and ``user_id`` (the owner's primary key),
* ``size`` (the declared size in bytes),

and some one more:

* ``upload_started``: ``filename`` (as shown to users). Sent when
  ``POST /api/uploads/`` is accepted: the upload exists and holds a slot.
* ``upload_completed``: ``sha256`` (hex digest of the bytes on disk). The file
  is verified, durable and downloadable.
* ``upload_failed``: ``reason`` (``"checksum_mismatch"``). The partial bytes are deleted.
* ``upload_cancelled``: an unfinished upload was cancelled (``DELETE``, the admin); its bytes are deleted.
* ``upload_expired``: an unfinished upload idled past ``DIRECTDRIVEX_UPLOAD_EXPIRY_SECONDS``; its bytes are deleted.
* ``upload_deleted``: ``status``, what the upload was (``complete``, ``failed``, …); row and file are gone.

Share links have three more, with ``sender`` ``uploads.models.ShareLink`` and the keyword
arguments ``share_id``, ``upload_id`` and ``user_id`` (the file's owner):

* ``share_created``: ``expires_at`` (an ISO 8601 string, as logged), ``max_downloads``, ``password``
  (bool: whether one is set).
* ``share_used``: ``sent`` (bytes of this download), ``counted`` (whether it counted toward the
  link's download limit: it sent the file's last byte). Sent when a download through the link ends,
  or is handed to nginx.
* ``share_revoked``: ``reason`` (``"revoked"`` by its owner, ``"admin"``).

Receivers run with ``send_robust``: one that raises is logged and does not
stop the others nor the service that sent it. A receiver runs inside the
service call, so it must be quick (queue slow work, e.g. with a task queue).

    from django.dispatch import receiver
    from uploads.signals import upload_completed

    @receiver(upload_completed)
    def index_file(sender, upload_id, user_id, size, sha256, **kwargs):
        ...
"""

from django.dispatch import Signal

upload_started = Signal()
upload_completed = Signal()
upload_failed = Signal()
upload_cancelled = Signal()
upload_expired = Signal()
upload_deleted = Signal()

BY_OUTCOME = {
    "started": upload_started,
    "completed": upload_completed,
    "failed": upload_failed,
    "cancelled": upload_cancelled,
    "expired": upload_expired,
    "deleted": upload_deleted,
}

share_created = Signal()
share_used = Signal()
share_revoked = Signal()

SHARE_BY_OUTCOME = {"created": share_created, "used": share_used, "revoked": share_revoked}
