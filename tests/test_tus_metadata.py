"""tus header parsing (uploads.transports.tus): Upload-Metadata and the integer headers.

The live behaviour (400 invalid for these, with the JSON body) is in tests/test_tus_conformance.py.
"""

import base64

import pytest

from uploads.exceptions import InvalidRequest
from uploads.models import Upload
from uploads.transports.tus import _integer_header, format_metadata, parse_metadata


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_metadata_pairs_are_decoded_and_a_key_may_have_no_value():
    name = "holiday \u00e9t\u00e9 2026.mkv"
    header = f"filename {b64(name)},sha256 {b64('ab' * 32)}, is_confidential"
    assert parse_metadata(header) == {"filename": name, "sha256": "ab" * 32, "is_confidential": ""}


def test_empty_metadata_is_no_metadata():
    assert parse_metadata("") == {}


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("filename a$b", "not base64"),
        (f"filename {b64('x')},filename {b64('y')}", "twice"),
        ("filename " + base64.b64encode(b"\xff\xfe").decode(), "not base64 of UTF-8"),
        (f"file\u00a0name {b64('x')}", "not a valid key"),  # no kind of space inside a key
    ],
)
def test_bad_metadata_is_refused_with_a_reason(header, says):
    with pytest.raises(InvalidRequest) as refused:
        parse_metadata(header)
    if says:
        assert says in refused.value.detail


def test_metadata_round_trips_what_an_upload_keeps():
    upload = Upload(display_name="a,b c.txt", sha256="cd" * 32, fingerprint="")
    assert parse_metadata(format_metadata(upload)) == {"filename": "a,b c.txt", "sha256": "cd" * 32}


@pytest.mark.parametrize("value", ["-1", "1.5", "", "١٢", "0x10", " 5"])
def test_integer_headers_must_be_plain_non_negative_integers(value):
    with pytest.raises(InvalidRequest, match="Upload-Offset must be a non-negative integer"):
        _integer_header("Upload-Offset", value)


def test_integer_headers_parse_and_absent_is_none():
    assert _integer_header("Upload-Length", "3624892618") == 3_624_892_618
    assert _integer_header("Upload-Length", None) is None
