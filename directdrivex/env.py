"""Reads DirectDriveX's configuration from the environment without ever raising.

A bad value must fail at start-up with a clear message (system check
``uploads.E001``), not as a traceback while settings import, so parsing errors
are collected here and reported by :mod:`uploads.checks`.
"""

import os

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


class Env:
    def __init__(self, environ=None):
        self.environ = os.environ if environ is None else environ
        self.errors: list[tuple[str, str]] = []

    def str(self, name: str, default: str = "") -> str:
        return self.environ.get(name, default)

    def list(self, name: str, default: list[str] | None = None) -> list[str]:
        raw = self.environ.get(name)
        if raw is None:
            return list(default or [])
        return [item.strip() for item in raw.split(",") if item.strip()]

    def bool(self, name: str, default: bool) -> bool:
        raw = self.environ.get(name)
        if raw is None:
            return default
        word = raw.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        self.errors.append((name, f"{name}={raw!r} is not a boolean (use 1/0, true/false, on/off)."))
        return default

    def int(self, name: str, default: int, minimum: int = 1) -> int:
        """An integer of at least ``minimum``; a bad value is recorded and the default used."""
        raw = self.environ.get(name)
        if raw is None:
            return default
        try:
            value = int(raw.strip().replace("_", ""), 10)
        except ValueError:
            self.errors.append((name, f"{name}={raw!r} is not an integer."))
            return default
        if value < minimum:
            self.errors.append((name, f"{name}={value} must be at least {minimum}."))
            return default
        return value
