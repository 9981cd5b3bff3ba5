"""Debian's Chromium as the browser tests and bench/browser_e2e.py launch it (Playwright's executable_path)."""

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (containers, root), no GPU, and no background traffic of the browser's own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
