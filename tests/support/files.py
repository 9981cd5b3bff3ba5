"""Files of random bytes for tests and bench/, hashed as they are written, and the sha256 of a file on disk."""

import hashlib
import os
from pathlib import Path

BLOCK = 4 * 1024 * 1024


def write_random(path: Path, size: int) -> str:
    """``size`` bytes of os.urandom at ``path``, hashed while written (never read back); returns the sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(BLOCK, left))
            digest.update(block)
            handle.write(block)
            left -= len(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of the file at ``path``, read in bounded blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(BLOCK):
            digest.update(block)
    return digest.hexdigest()
