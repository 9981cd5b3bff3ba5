"""What an upload left in storage, asked through uploads.storage.backend() so a test reads the same on every backend.

``local`` answers from its folder (the part file, the finished file); ``s3``
from its bucket (the finished object, the tails, the multipart uploads of the
key). Tests assert on these instead of building a path or an object name.
"""

import contextlib
import functools
import hashlib
import tempfile
from pathlib import Path

import botocore.exceptions
from django.conf import settings

from tests.support.files import file_sha256, lock_is_free
from uploads import storage
from uploads.storage import local


def _s3_where():
    backend = storage.backend()
    return getattr(backend, "where", None)


def part_class() -> type[storage.PartWriter]:
    """The class of the backend's parts: what a test patches to stall or break a writer's appends."""
    if _s3_where() is None:
        return local.LocalPart
    from uploads.storage import s3

    return s3.S3Part


def finished_bytes(key: str) -> bytes | None:
    """Every byte of the finished file of ``key``, or None if it does not exist."""
    try:
        reader = storage.backend().open_finished(key)
    except FileNotFoundError:
        return None
    try:
        chunks, position = [], 0
        while chunk := reader.read(position, 4 * 1024 * 1024):
            chunks.append(chunk)
            position += len(chunk)
        return b"".join(chunks)
    finally:
        reader.close()


def plant_finished(key: str, data: bytes) -> None:
    """A finished file of ``key`` holding ``data``, put there behind the database's back (a crash after the rename)."""
    where = _s3_where()
    if where is None:
        storage.backend().prepare()
        local.final_path(key).write_bytes(data)
        return
    where.client.put_object(Bucket=where.bucket, Key=where.final(key), Body=data)


def _multipart_uploads(where, key: str) -> list[str]:
    listing = where.client.list_multipart_uploads(Bucket=where.bucket, Prefix=where.final(key))
    return [upload["UploadId"] for upload in listing.get("Uploads", []) if upload["Key"] == where.final(key)]


def _tails(where, key: str) -> list[str]:
    listing = where.client.list_objects_v2(Bucket=where.bucket, Prefix=where.tails(key))
    return [item["Key"] for item in listing.get("Contents", [])]


def _object_exists(where, key: str) -> bool:
    try:
        where.client.head_object(Bucket=where.bucket, Key=where.final(key))
    except botocore.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    return True


def part_stored(key: str) -> bool:
    """Whether unfinished bytes of ``key`` are kept: a part file (local), a multipart upload or a tail (s3)."""
    where = _s3_where()
    if where is None:
        return local.part_path(key).exists()
    return bool(_multipart_uploads(where, key) or _tails(where, key))


def finished_stored(key: str) -> bool:
    """Whether the finished file of ``key`` exists."""
    where = _s3_where()
    if where is None:
        return local.final_path(key).exists()
    return _object_exists(where, key)


def nothing_stored(key: str) -> bool:
    """No byte of ``key`` is left: no part and no finished file (s3: no object, no tail, no multipart upload)."""
    return not part_stored(key) and not finished_stored(key)


def part_bytes(upload) -> bytes | None:
    """The bytes of ``upload``'s part that storage keeps (None if it keeps none).

    local: the whole part file. s3: the recorded pieces, in order, which must
    all be tails (parts of an unfinished multipart upload cannot be read back):
    keep such tests below one part (8 MiB). Call from synchronous code.
    """
    where = _s3_where()
    if where is None:
        path = local.part_path(upload.storage_key)
        return path.read_bytes() if path.exists() else None
    from uploads.models import StoredPiece

    pieces = list(StoredPiece.objects.filter(upload_id=upload.pk).order_by("start"))
    if not pieces:
        return b"" if _multipart_uploads(where, upload.storage_key) else None
    assert all(piece.kind == StoredPiece.Kind.TAIL for piece in pieces), "a sent part cannot be read back"
    data = b""
    for piece in pieces:
        assert piece.start == len(data), f"a gap before {piece}"
        data += where.client.get_object(Bucket=where.bucket, Key=piece.name)["Body"].read()
        assert len(data) == piece.end, f"{piece} holds {len(data) - piece.start} bytes"
    return data


def part_released(key: str) -> bool:
    """Whether no writer of this process holds the part of ``key`` any more.

    local: nobody holds its flock. s3: no spool file of ``key`` is left (a
    writer's filling part and the parts it is sending each have one).
    """
    if _s3_where() is None:
        return lock_is_free(local.part_path(key))
    return not list(Path(settings.DIRECTDRIVEX_SPOOL_DIR).glob(f"*/{key}.*.part"))


def assert_durable_bytes(upload, data: bytes) -> None:
    """The bytes storage keeps for ``upload`` cover its durable offset and are those of ``data`` up to it.

    The finished file, if there is one, must be all of ``data``. Otherwise
    local: the part file holds at least ``upload.offset`` bytes, the first of
    them ``data``'s. s3: the recorded pieces cover ``[0, upload.offset)``
    without a gap, each tail holds ``data``'s bytes and each part is in the
    multipart upload with the size and the ETag (MD5) of ``data``'s bytes.
    Call from synchronous code.
    """
    key, offset = upload.storage_key, upload.offset
    finished = finished_bytes(key)
    if finished is not None:
        assert finished == data, "a visible file with wrong bytes"
        return
    where = _s3_where()
    if where is None:
        path = local.part_path(key)
        on_disk = path.read_bytes() if path.exists() else b""
        assert len(on_disk) >= offset, (len(on_disk), offset)
        assert on_disk[:offset] == data[:offset], "durable bytes differ from what was sent"
        return
    from uploads.models import StoredPiece

    covered = 0
    listed = {}
    if offset:
        assert upload.store_session, "a durable offset without a multipart upload"
        answer = where.client.list_parts(Bucket=where.bucket, Key=where.final(key), UploadId=upload.store_session)
        listed = {part["PartNumber"]: part for part in answer.get("Parts", [])}
    for piece in StoredPiece.objects.filter(upload_id=upload.pk).order_by("start"):
        if piece.start > covered:
            break
        expected = data[piece.start : piece.end]
        if piece.kind == StoredPiece.Kind.TAIL:
            body = where.client.get_object(Bucket=where.bucket, Key=piece.name)["Body"].read()
            assert body == expected, f"{piece} differs from what was sent"
        else:
            sent = listed.get(piece.number)
            assert sent is not None, f"{piece} is not in the multipart upload"
            assert sent["Size"] == len(expected), (piece, sent["Size"])
            assert sent["ETag"].strip('"') == hashlib.md5(expected).hexdigest(), f"{piece} differs from what was sent"
        covered = max(covered, piece.end)
    assert covered >= offset, (covered, offset)


def snapshot(key: str) -> dict:
    """Everything stored for ``key``, to compare before and after a step that must not touch it.

    local: the bytes of the part and of the finished file. s3: the finished
    object's and every tail's bytes, and each multipart upload of the key with
    its parts (number, size, ETag).
    """
    where = _s3_where()
    if where is None:
        part, final = local.part_path(key), local.final_path(key)
        return {
            "part": part.read_bytes() if part.exists() else None,
            "finished": final.read_bytes() if final.exists() else None,
        }
    uploads = {}
    for upload_id in _multipart_uploads(where, key):
        answer = where.client.list_parts(Bucket=where.bucket, Key=where.final(key), UploadId=upload_id)
        uploads[upload_id] = [(p["PartNumber"], p["Size"], p["ETag"]) for p in answer.get("Parts", [])]
    tails = {name: where.client.get_object(Bucket=where.bucket, Key=name)["Body"].read() for name in _tails(where, key)}
    return {"finished": finished_bytes(key), "tails": tails, "multipart": uploads}


# --- a live server's storage: its own folder on local, the bucket prefix in its environment on s3 ---


def _server_backend(server) -> storage.Storage | None:
    """The s3 backend a live server (tests.support.live_server.LiveServer) writes to, or None for a folder."""
    env = server.env
    if env.get("DIRECTDRIVEX_STORAGE_BACKEND") != "s3":
        return None
    return _s3_backend(
        env["DIRECTDRIVEX_S3_ENDPOINT_URL"],
        env["DIRECTDRIVEX_S3_BUCKET"],
        env.get("DIRECTDRIVEX_S3_PREFIX", ""),
        env.get("DIRECTDRIVEX_S3_REGION", ""),
    )


@functools.cache
def _s3_backend(endpoint: str, bucket: str, prefix: str, region: str) -> storage.Storage:
    from uploads.storage.s3 import S3Storage

    spool = Path(tempfile.gettempdir()) / "ddx-test-inspect-spool"  # never written: inspection only
    return S3Storage(endpoint_url=endpoint, bucket=bucket, prefix=prefix, region=region, spool_dir=spool)


def finished_keys(server) -> list[str]:
    """Keys of every finished file of a live server: in its folder's files/ (local), under its prefix's files/ (s3)."""
    backend = _server_backend(server)
    if backend is None:
        return sorted(path.name for path in (server.storage / storage.Area.FILES).glob("*"))
    where = backend.where
    prefix = where.final("")
    listing = where.client.list_objects_v2(Bucket=where.bucket, Prefix=prefix)
    return sorted(item["Key"].removeprefix(prefix) for item in listing.get("Contents", []))


def part_keys(server) -> list[str]:
    """Keys of a live server's unfinished parts: its folder's partial/ (local); multipart uploads, tails (s3)."""
    backend = _server_backend(server)
    if backend is None:
        folder = server.storage / storage.Area.PARTIAL
        return sorted(path.name.removesuffix(local.PART_SUFFIX) for path in folder.glob("*"))
    return sorted({session.key for session in backend.sessions()} | set(backend.tail_keys()))


def finished_sha256(key: str, server) -> str:
    """sha256 of a live server's finished file of ``key``, read in blocks."""
    backend = _server_backend(server)
    if backend is None:
        return file_sha256(server.storage / storage.Area.FILES / key)
    digest = hashlib.sha256()
    reader = backend.open_finished(key)
    try:
        position = 0
        while block := reader.read(position, 8 * 1024 * 1024):
            digest.update(block)
            position += len(block)
    finally:
        reader.close()
    return digest.hexdigest()


def stored_holding(server, data: bytes) -> list[str]:
    """A live server's stored entries (parts and finished files) whose bytes begin with ``data``'s first 4 KiB.

    Random data makes them unique to one upload. On s3, an unfinished upload's
    bytes are only partly readable (its tails): it counts when a tail or the
    finished object begins with them, or when it has a multipart upload and
    ``data`` is shorter than a part (then it is all in tails or nowhere yet).
    """
    head = data[:4096]
    backend = _server_backend(server)
    if backend is None:
        found = []
        for folder in (storage.Area.PARTIAL, storage.Area.FILES):
            for path in sorted((server.storage / folder).glob("*")):
                with contextlib.suppress(OSError), open(path, "rb") as handle:
                    if handle.read(len(head)) == head:
                        found.append(str(path))
        return found
    where = backend.where
    found = []
    for key in finished_keys(server):
        reader = backend.open_finished(key)
        try:
            if reader.read(0, len(head)) == head:
                found.append(where.final(key))
        finally:
            reader.close()
    for key in backend.tail_keys():
        for name in backend.tails(key):
            if name.removeprefix(where.tails(key)).startswith("0-"):
                body = where.client.get_object(Bucket=where.bucket, Key=name, Range=f"bytes=0-{len(head) - 1}")
                if body["Body"].read() == head:
                    found.append(name)
    return found
