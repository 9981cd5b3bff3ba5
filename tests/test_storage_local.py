"""The local storage backend against what can be planted in its folder: links, folders, FIFOs, deletions mid-read.

Nothing it opens at a layout path may be anything but a regular file of its
own: a symlink would let a writer truncate, or a download serve, a file
anywhere on the host.
"""

import os
import threading

import pytest

from uploads import storage
from uploads.storage import local

# The local backend itself: its folder layout, links, FIFOs, flocks and renames.
pytestmark = pytest.mark.local_storage

KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def outside(tmp_path):
    """A file outside the storage folder that a planted link points at."""
    path = tmp_path / "elsewhere" / "precious.txt"
    path.parent.mkdir()
    path.write_bytes(b"somebody else's bytes " * 100)
    return path


@pytest.fixture
def layout(storage_dir):
    storage.backend().prepare()
    return storage_dir


def test_a_symlink_at_a_part_path_is_not_a_file_and_its_target_is_not_truncated(layout, outside):
    before = outside.read_bytes()
    local.part_path(KEY).symlink_to(outside)

    for offset in (0, 10):
        with pytest.raises(storage.NotAFile) as refused:
            storage.backend().open_part(KEY, storage.Committed(offset=offset), 1 << 40)
        assert refused.value.what == "a symbolic link"

    assert outside.read_bytes() == before
    assert local.part_path(KEY).is_symlink()


def test_a_folder_at_a_part_path_is_not_a_file(layout):
    local.part_path(KEY).mkdir()

    with pytest.raises(storage.NotAFile) as refused:
        storage.backend().open_part(KEY, storage.Committed(), 1 << 40)

    assert refused.value.what == "a folder"


def test_a_missing_part_at_a_later_offset_is_short_and_is_not_made_anew(layout):
    with pytest.raises(storage.PartShort) as short:
        storage.backend().open_part(KEY, storage.Committed(offset=4096), 1 << 40)

    assert short.value.on_disk == 0
    assert not local.part_path(KEY).exists()
    # From zero it is made: that is where every upload starts.
    storage.backend().open_part(KEY, storage.Committed(), 1 << 40).close()
    assert local.part_path(KEY).is_file()


def test_a_symlink_at_a_finished_path_is_neither_hashed_nor_served(layout, outside):
    local.final_path(KEY).symlink_to(outside)

    with pytest.raises(storage.NotAFile):
        storage.backend().finished_digest(KEY, outside.stat().st_size)
    with pytest.raises(storage.NotAFile):
        storage.backend().open_finished(KEY)
    with pytest.raises(storage.NotAFile):
        storage.backend().entry_size(storage.backend().entry_name(storage.Area.FILES, KEY))


def test_a_fifo_at_a_finished_path_does_not_hang_whoever_opens_it(layout):
    os.mkfifo(local.final_path(KEY))
    outcome = {}

    def open_it():
        try:
            storage.backend().open_finished(KEY)
        except storage.NotAFile as refused:
            outcome["refused"] = refused.what

    opener = threading.Thread(target=open_it, daemon=True)
    opener.start()
    opener.join(10)

    assert not opener.is_alive(), "opening a FIFO blocked"
    assert outcome["refused"].startswith("not a regular file")


def test_a_finished_file_deleted_while_it_is_read_ends_the_read(layout):
    local.final_path(KEY).write_bytes(b"f" * 4096)
    reader = storage.backend().open_finished(KEY)
    try:
        assert reader.read(0, 1024) == b"f" * 1024
        storage.backend().delete(KEY)
        # The descriptor could still read the unlinked inode: the reader refuses to.
        with pytest.raises(storage.FileGone):
            reader.read(1024, 1024)
    finally:
        reader.close()


def test_a_finished_file_replaced_while_it_is_read_ends_the_read(layout):
    path = local.final_path(KEY)
    path.write_bytes(b"f" * 4096)
    reader = storage.backend().open_finished(KEY)
    try:
        replacement = path.with_name("replacement")
        replacement.write_bytes(b"r" * 4096)
        os.rename(replacement, path)
        with pytest.raises(storage.FileGone):
            reader.read(0, 1024)
    finally:
        reader.close()


def test_fsck_holds_never_follow_a_link(layout, outside):
    local.part_path(KEY).symlink_to(outside)
    name = storage.backend().entry_name(storage.Area.PARTIAL, KEY)

    with pytest.raises(storage.NotAFile), storage.backend().hold(name):
        pass

    assert outside.stat().st_size == len(b"somebody else's bytes " * 100)
