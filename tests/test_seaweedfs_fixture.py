"""The S3 test fixtures: SeaweedFS answers as the s3 backend needs, and each test has a prefix of its own."""

import json
import os
import subprocess
import sys
import urllib.request

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from tests.conftest import TEST_STORAGE
from tests.support import seaweedfs

MiB = 1024 * 1024
ENVIRONMENT = (
    "DIRECTDRIVEX_STORAGE_BACKEND",
    "DIRECTDRIVEX_S3_ENDPOINT_URL",
    "DIRECTDRIVEX_S3_BUCKET",
    "DIRECTDRIVEX_S3_PREFIX",
    "DIRECTDRIVEX_S3_REGION",
    "DIRECTDRIVEX_SPOOL_DIR",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)

# Prefixes of the runs of test_each_test_has_a_prefix_of_its_own, in order.
seen_prefixes: list[str] = []


def error_code(error: botocore.exceptions.ClientError) -> str:
    return error.response["Error"]["Code"]


def test_the_bucket_exists(s3_storage):
    assert s3_storage.bucket == seaweedfs.BUCKET
    s3_storage.client.head_bucket(Bucket=s3_storage.bucket)
    assert seaweedfs.BUCKET in [bucket["Name"] for bucket in s3_storage.client.list_buckets()["Buckets"]]


@pytest.mark.parametrize("run", ["first", "second"])
def test_each_test_has_a_prefix_of_its_own(s3_storage, run):
    prefix = s3_storage.prefix
    assert prefix.startswith("t/")
    assert prefix.endswith("/")
    assert prefix not in seen_prefixes
    s3_storage.client.put_object(Bucket=s3_storage.bucket, Key=f"{prefix}marker", Body=run.encode())

    listed = s3_storage.client.list_objects_v2(Bucket=s3_storage.bucket, Prefix=prefix)

    # The first run's marker is under its own prefix, not this one.
    assert [item["Key"] for item in listed.get("Contents", [])] == [f"{prefix}marker"]
    seen_prefixes.append(prefix)


def test_the_settings_and_a_subprocess_environment_point_at_the_prefix(s3_storage, settings):
    expected = {
        "DIRECTDRIVEX_STORAGE_BACKEND": "s3",
        "DIRECTDRIVEX_S3_ENDPOINT_URL": s3_storage.endpoint,
        "DIRECTDRIVEX_S3_BUCKET": "ddx-test",
        "DIRECTDRIVEX_S3_PREFIX": s3_storage.prefix,
        "DIRECTDRIVEX_S3_REGION": "us-east-1",
        "DIRECTDRIVEX_SPOOL_DIR": s3_storage.spool,
    }
    print_environment = f"import json, os; print(json.dumps({{n: os.environ.get(n) for n in {ENVIRONMENT!r}}}))"

    printed = subprocess.run([sys.executable, "-c", print_environment], capture_output=True, text=True, check=True)

    assert {name: getattr(settings, name) for name in expected} == expected
    assert json.loads(printed.stdout) == {
        **{name: str(value) for name, value in expected.items()},
        "AWS_ACCESS_KEY_ID": "ddx",
        "AWS_SECRET_ACCESS_KEY": "ddx-secret",
    }


def test_an_object_put_under_the_prefix_reads_back_whole_by_range_and_by_presigned_url(s3_storage):
    client, bucket, key = s3_storage.client, s3_storage.bucket, f"{s3_storage.prefix}uploads/a.bin"
    data = bytes(range(256)) * 4096  # 1 MiB

    client.put_object(Bucket=bucket, Key=key, Body=data)

    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == data
    ranged = client.get_object(Bucket=bucket, Key=key, Range="bytes=1000-1999")
    assert ranged["ContentRange"] == f"bytes 1000-1999/{len(data)}"
    assert ranged["Body"].read() == data[1000:2000]
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=60)
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == data


def test_a_put_with_if_none_match_does_not_replace_an_object(s3_storage):
    client, bucket, key = s3_storage.client, s3_storage.bucket, f"{s3_storage.prefix}once"
    client.put_object(Bucket=bucket, Key=key, Body=b"first", IfNoneMatch="*")

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.put_object(Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*")

    assert error_code(refused.value) == "PreconditionFailed"
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"


def test_a_multipart_upload_completes_once_with_if_none_match(s3_storage):
    client, bucket, key = s3_storage.client, s3_storage.bucket, f"{s3_storage.prefix}big.bin"
    parts_data = [b"a" * (5 * MiB), b"b" * 1234]
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etags = [
        client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body)["ETag"]
        for number, body in enumerate(parts_data, start=1)
    ]

    listed = client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id)["Parts"]
    assert [(part["PartNumber"], part["Size"], part["ETag"]) for part in listed] == [
        (1, 5 * MiB, etags[0]),
        (2, 1234, etags[1]),
    ]
    in_progress = client.list_multipart_uploads(Bucket=bucket, Prefix=s3_storage.prefix)["Uploads"]
    assert [(upload["Key"], upload["UploadId"]) for upload in in_progress] == [(key, upload_id)]

    parts = [{"PartNumber": number, "ETag": etag} for number, etag in enumerate(etags, start=1)]
    completed = client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
    )

    assert completed["ETag"].strip('"').endswith("-2")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"".join(parts_data)
    assert client.list_multipart_uploads(Bucket=bucket, Prefix=s3_storage.prefix).get("Uploads", []) == []

    # A second upload of the same key cannot complete over the first.
    second_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    etag = client.upload_part(Bucket=bucket, Key=key, UploadId=second_id, PartNumber=1, Body=b"c" * 10)["ETag"]
    with pytest.raises(botocore.exceptions.ClientError) as refused:
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=second_id,
            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]}, IfNoneMatch="*",
        )  # fmt: skip
    assert error_code(refused.value) == "PreconditionFailed"
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"".join(parts_data)
    client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=second_id)


def test_a_request_signed_with_another_secret_is_refused(s3_storage):
    """The server checks signatures (ours is started with the test credentials), so signing is tested for real."""
    stranger = boto3.client(
        "s3",
        endpoint_url=s3_storage.endpoint,
        region_name=seaweedfs.REGION,
        aws_access_key_id=seaweedfs.ACCESS_KEY_ID,
        aws_secret_access_key="not-the-secret",
        config=Config(s3={"addressing_style": "path"}),
    )

    with pytest.raises(botocore.exceptions.ClientError) as refused:
        stranger.list_objects_v2(Bucket=s3_storage.bucket, Prefix=s3_storage.prefix)

    assert error_code(refused.value) == "SignatureDoesNotMatch"


def test_unmarked_tests_follow_DIRECTDRIVEX_TEST_STORAGE(storage_backend, s3_storage):
    if TEST_STORAGE == "s3":
        assert storage_backend is s3_storage  # one prefix per test, not two
    else:
        assert storage_backend is None


@pytest.mark.local_storage
def test_a_test_marked_local_storage_stays_on_the_local_backend(storage_backend, storage_dir, settings):
    assert storage_backend is None
    assert getattr(settings, "DIRECTDRIVEX_STORAGE_BACKEND", "local") != "s3"
    assert os.environ.get("DIRECTDRIVEX_STORAGE_BACKEND") != "s3"
    assert storage_dir == settings.DIRECTDRIVEX_STORAGE_DIR
