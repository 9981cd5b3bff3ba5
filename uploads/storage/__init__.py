"""Where uploads' bytes live: one interface (uploads.storage.base.Storage), a backend behind it.

Callers (the writer, downloads, the services, fsck, the dashboard) ask
``backend()`` and never build a path or an object name themselves.
"""

import threading

from django.conf import settings

from uploads.storage.base import (
    Area,
    Capacity,
    Checkpoint,
    Committed,
    Durable,
    FileGone,
    FinishedReader,
    Held,
    Interrupted,
    NotAFile,
    PartLocked,
    PartShort,
    PartWriter,
    Piece,
    Storage,
    StorageError,
    StoredEntry,
    StoreUnavailable,
)
from uploads.storage.local import LocalStorage

__all__ = [
    "Area",
    "Capacity",
    "Checkpoint",
    "Committed",
    "Durable",
    "FileGone",
    "FinishedReader",
    "Held",
    "Interrupted",
    "NotAFile",
    "PartLocked",
    "PartShort",
    "PartWriter",
    "Piece",
    "Storage",
    "StorageError",
    "StoreUnavailable",
    "StoredEntry",
    "backend",
]

_LOCAL: Storage = LocalStorage()
# Backends by configuration, newest last; a process has one, a test run one per test (a few kept).
_built: dict[tuple, Storage] = {}
_KEPT = 4
_lock = threading.Lock()


def backend() -> Storage:
    """The backend the bytes live in, as settings choose it (DIRECTDRIVEX_STORAGE_BACKEND).

    ``local`` reads its folder from settings at every call. ``s3`` is built
    once per configuration (its client and part senders are shared by every
    writer of the process); tests give each test a prefix of its own.
    """
    if settings.DIRECTDRIVEX_STORAGE_BACKEND != "s3":
        return _LOCAL
    config = (
        settings.DIRECTDRIVEX_S3_ENDPOINT_URL,
        settings.DIRECTDRIVEX_S3_BUCKET,
        settings.DIRECTDRIVEX_S3_PREFIX,
        settings.DIRECTDRIVEX_S3_REGION,
        str(settings.DIRECTDRIVEX_SPOOL_DIR),
    )
    found = _built.get(config)
    if found is None:
        with _lock:
            found = _built.get(config)
            if found is None:
                from uploads.storage.s3 import S3Storage  # boto3 is imported only where it is used

                endpoint, bucket, prefix, region, spool = config
                found = S3Storage(endpoint_url=endpoint, bucket=bucket, prefix=prefix, region=region, spool_dir=spool)
                _built[config] = found
                while len(_built) > _KEPT:
                    del _built[next(iter(_built))]
    return found
