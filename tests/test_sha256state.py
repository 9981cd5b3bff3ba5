"""The savable sha256 (uploads.storage.sha256state) and the resume it buys (no re-read of a part).

Without it every tus PATCH after the first re-read the whole part to hash it
again: quadratic in the number of PATCHes (docs/tus.md, docs/benchmarks.md).
"""

import hashlib
import os

import pytest

from uploads import storage
from uploads.services.grants import writer_admit, writer_commit, writer_park, writer_rewind
from uploads.services.uploads import upload_create
from uploads.storage import local, sha256state

KEY = "fedcba9876543210fedcba9876543210"


@pytest.fixture
def layout(storage_dir):
    storage.backend().prepare()
    return storage_dir


def test_libcrypto_is_there_and_agrees_with_hashlib():
    assert sha256state.available()


@pytest.mark.parametrize("cut", [0, 1, 63, 64, 65, 4096, 99_999])
def test_a_state_saved_anywhere_and_restored_elsewhere_gives_hashlibs_digest(cut):
    data = os.urandom(100_000)
    first = sha256state.Sha256()
    first.update(data[:cut])
    state = first.state()
    assert sha256state.hashed_bytes(state) == cut
    resumed = sha256state.Sha256(state)
    resumed.update(bytearray(data[cut:]))  # bytearray: what the writer's coalesced frames are
    assert resumed.hexdigest() == hashlib.sha256(data).hexdigest()
    assert first.hexdigest() == hashlib.sha256(data[:cut]).hexdigest()  # hexdigest leaves the context usable
    first.update(data[cut:])
    assert first.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_state_of_another_offset_is_not_used():
    digest = sha256state.Sha256()
    digest.update(b"x" * 1000)
    assert sha256state.resumed_digest(1000, digest.state()) is not None
    assert sha256state.resumed_digest(999, digest.state()) is None  # a rewind moved the offset since
    assert sha256state.resumed_digest(1000, None) is None
    assert sha256state.resumed_digest(1000, digest.state()[:-1]) is None


def write_part(data: bytes) -> bytes:
    part = storage.backend().open_part(KEY, storage.Committed(), 1 << 40)
    try:
        part.append([data])
        part.sync()
        return part.hash_state()
    finally:
        part.close()


@pytest.mark.local_storage  # re-reads a part file on disk (an s3 part is never read back)
def test_a_part_resumed_with_its_saved_state_does_not_read_its_bytes_again(layout):
    original = os.urandom(3 * 1024 * 1024)
    state = write_part(original)
    # Change the bytes on disk behind the part's back: only a re-read would see it.
    with open(local.part_path(KEY), "r+b") as file:
        file.write(b"\0" * 1024)
    resumed = storage.backend().open_part(KEY, storage.Committed(offset=len(original), hash_state=state), 1 << 40)
    try:
        resumed.append([b"tail"])
        assert resumed.hexdigest() == hashlib.sha256(original + b"tail").hexdigest()
    finally:
        resumed.close()
    reread = storage.backend().open_part(KEY, storage.Committed(offset=len(original)), 1 << 40)
    try:
        changed = b"\0" * 1024 + original[1024:]
        assert reread.hexdigest() == hashlib.sha256(changed).hexdigest()
    finally:
        reread.close()


@pytest.mark.local_storage  # re-reads a part file on disk (an s3 part is never read back)
def test_a_stale_state_makes_the_part_read_again(layout):
    original = os.urandom(1024 * 1024)
    state = write_part(original)
    # The offset moved back (a rewind or a repair): the state of the longer prefix must not be used.
    shorter = storage.backend().open_part(KEY, storage.Committed(offset=1000, hash_state=state), 1 << 40)
    try:
        assert shorter.hexdigest() == hashlib.sha256(original[:1000]).hexdigest()
    finally:
        shorter.close()


def test_the_state_is_committed_with_its_offset_and_handed_to_the_next_writer(alice):
    upload, _slot = upload_create(alice, filename="a.bin", size=10_000)
    grant = writer_admit(alice, upload.pk, "specific.one!1")
    assert grant.hash_state is None
    digest = sha256state.Sha256()
    digest.update(b"y" * 4000)
    writer_commit(grant, 4000, hash_state=digest.state())
    assert writer_park(grant)
    resumed = writer_admit(alice, upload.pk, "specific.two!1")
    assert (resumed.offset, resumed.hash_state) == (4000, digest.state())
    # A rewind moves the offset back; the saved state then names another byte count and is ignored.
    rewound = writer_rewind(resumed, 1000)
    assert sha256state.resumed_digest(rewound.offset, rewound.hash_state) is None
