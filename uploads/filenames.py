"""Turns a client-supplied filename into a display name that is safe to show and to serve.

The display name is only ever shown (pages, Content-Disposition); files on disk
are named by Upload.storage_key, which never derives from the filename.
"""

import unicodedata

MAX_DISPLAY_NAME = 255
FALLBACK_NAME = "unnamed"
# Device names that Windows refuses as a file name, whatever the extension.
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}


def stored_original(raw: str) -> str:
    """The filename as given, less NUL (PostgreSQL text cannot hold it)."""
    return raw.replace("\x00", "\ufffd")


def display_name(raw: str) -> str:
    name = unicodedata.normalize("NFC", raw)
    # A path is not a name: keep the last component, whichever separator it uses.
    name = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    # Control (Cc), format (Cf: bidi overrides such as U+202E, zero-width
    # characters) and surrogate (Cs) characters can disguise a name.
    name = "".join(ch for ch in name if unicodedata.category(ch) not in {"Cc", "Cf", "Cs"})
    name = " ".join(name.split())
    # Leading dots hide files and ".." climbs directories; trailing dots and
    # spaces are dropped by Windows when the file is saved.
    name = name.lstrip(". ").rstrip(". ")
    if not name:
        return FALLBACK_NAME
    if name.split(".", 1)[0].upper() in WINDOWS_RESERVED:
        name = f"_{name}"
    return _truncate(name)


def _truncate(name: str) -> str:
    if len(name) <= MAX_DISPLAY_NAME:
        return name
    stem, dot, ext = name.rpartition(".")
    if dot and 0 < len(ext) <= 16:
        return stem[: MAX_DISPLAY_NAME - len(ext) - 1] + "." + ext
    return name[:MAX_DISPLAY_NAME]
