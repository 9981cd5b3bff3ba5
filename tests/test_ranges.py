"""uploads.ranges: the Range, If-Range, If-None-Match and If-Modified-Since decisions, with no Django in the way."""

from datetime import UTC, datetime, timedelta

import pytest

from uploads.ranges import ByteRange, Decision, decide, http_date, parse_http_date, parse_range, strong_etag

SIZE = 1000
ETAG = strong_etag("ab" * 32)
MODIFIED = datetime(2026, 12, 1, 9, 23, 9, 123456, tzinfo=UTC)


def answer(**headers) -> Decision:
    return decide(size=SIZE, etag=ETAG, last_modified=MODIFIED, **headers)


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=0-499", 0, 499),
        ("bytes=500-", 500, 999),
        ("bytes=-1", 999, 999),
        ("bytes=-200", 800, 999),
        ("bytes=-5000", 0, 999),
        ("bytes=900-5000", 900, 999),
        ("bytes=999-999", 999, 999),
        ("BYTES = 10 - 19", 10, 19),
        ("bytes=" + "0" * 30 + "5-9", 5, 9),
    ],
)
def test_a_single_range_is_answered_206_with_that_range(header, first, last):
    assert answer(range_header=header) == Decision(206, ByteRange(first, last, SIZE))


def test_a_range_says_its_length_and_content_range():
    byte_range = parse_range("bytes=-200", SIZE)

    assert byte_range.length == 200
    assert byte_range.content_range == "bytes 800-999/1000"


@pytest.mark.parametrize(
    "header", ["bytes=1000-", "bytes=1000-1000", "bytes=5000-6000", "bytes=-0", "bytes=" + "9" * 5000 + "-"]
)
def test_a_range_past_the_end_is_416(header):
    assert answer(range_header=header) == Decision(416)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-0,5-9",  # several ranges: the whole body (documented choice)
        "bytes=0-0, -1",
        "bytes=5-1",  # last before first: invalid, ignored
        "bytes=",
        "bytes=-",
        "bytes=a-b",
        "bytes 0-1",
        "items=0-1",
        "0-1",
        "",
    ],
)
def test_a_range_header_that_is_ignored_gets_the_whole_body(header):
    assert answer(range_header=header) == Decision(200)


def test_no_range_is_the_whole_body():
    assert answer() == Decision(200)


def test_if_range_with_the_current_etag_honours_the_range():
    assert answer(range_header="bytes=0-0", if_range=ETAG) == Decision(206, ByteRange(0, 0, SIZE))


def test_if_range_with_the_last_modified_date_honours_the_range():
    assert answer(range_header="bytes=0-0", if_range=http_date(MODIFIED)).status == 206


@pytest.mark.parametrize(
    "validator",
    [
        strong_etag("cd" * 32),
        "W/" + ETAG,  # If-Range compares strongly: a weak tag never matches
        http_date(MODIFIED - timedelta(seconds=1)),
        http_date(MODIFIED + timedelta(seconds=1)),
        "not a validator",
    ],
)
def test_if_range_with_a_stale_validator_gets_the_whole_body(validator):
    assert answer(range_header="bytes=0-0", if_range=validator) == Decision(200)


def test_if_range_does_not_make_an_unsatisfiable_range_416_when_stale():
    assert answer(range_header="bytes=5000-", if_range=strong_etag("old")) == Decision(200)


@pytest.mark.parametrize("header", [ETAG, "W/" + ETAG, f'"other", {ETAG}', "*"])
def test_if_none_match_with_the_current_etag_is_304(header):
    assert answer(if_none_match=header) == Decision(304)


def test_if_none_match_wins_over_a_range():
    assert answer(if_none_match=ETAG, range_header="bytes=0-0") == Decision(304)


@pytest.mark.parametrize("header", [strong_etag("other"), "garbage", '"a", W/"b"'])
def test_if_none_match_with_another_etag_is_answered_normally(header):
    assert answer(if_none_match=header) == Decision(200)


def test_if_modified_since_at_or_after_last_modified_is_304():
    assert answer(if_modified_since=http_date(MODIFIED)) == Decision(304)
    assert answer(if_modified_since=http_date(MODIFIED + timedelta(days=1))) == Decision(304)


def test_if_modified_since_before_last_modified_is_answered_normally():
    assert answer(if_modified_since=http_date(MODIFIED - timedelta(seconds=1))) == Decision(200)
    assert answer(if_modified_since="yesterday") == Decision(200)


def test_if_none_match_that_does_not_match_overrides_if_modified_since():
    # RFC 9110 13.1.3: If-Modified-Since is ignored when If-None-Match is present.
    assert answer(if_none_match=strong_etag("other"), if_modified_since=http_date(MODIFIED)) == Decision(200)


def test_http_dates_are_imf_fixdates_in_gmt_to_the_second():
    assert http_date(MODIFIED) == "Tue, 01 Dec 2026 09:23:09 GMT"
    assert parse_http_date("Tue, 01 Dec 2026 09:23:09 GMT") == MODIFIED.replace(microsecond=0)
    assert parse_http_date("not a date") is None


def test_a_strong_etag_is_quoted():
    assert strong_etag("abc") == '"abc"'
