"""Where uploads' bytes live: one interface (uploads.storage.base.Storage), a backend behind it.

Callers (the writer, downloads, the services, fsck, the dashboard) ask
``backend()`` and never build a path or an object name themselves.
"""

from uploads.storage.base import (
    Area,
    Capacity,
    FileGone,
    FinishedReader,
    Held,
    Interrupted,
    NotAFile,
    PartLocked,
    PartShort,
    PartWriter,
    Storage,
    StorageError,
    StoredEntry,
)
from uploads.storage.local import LocalStorage

__all__ = [
    "Area",
    "Capacity",
    "FileGone",
    "FinishedReader",
    "Held",
    "Interrupted",
    "NotAFile",
    "PartLocked",
    "PartShort",
    "PartWriter",
    "Storage",
    "StorageError",
    "StoredEntry",
    "backend",
]

_BACKEND: Storage = LocalStorage()


def backend() -> Storage:
    """The backend the bytes live in. ``local`` is the only one so far; it reads its folder from settings."""
    return _BACKEND
