"""Range and conditional-request decisions for downloads (RFC 9110 sections 13 and 14), with no Django and no I/O.

``decide`` takes the request's validator and Range headers and the file's
size, ETag and modification time, and says what to answer: 304, 416, 206 with
one range, or 200 with the whole body. The choices where the RFC leaves room:

* One range only. A request for several ranges is answered 200 with the whole
  body (RFC 9110 14.2 lets a server ignore Range): no multipart/byteranges
  bodies, which few clients want and which would need a second body format.
* A Range header that does not parse, or names another unit, is ignored
  (200 whole), as the RFC says; one that parses but starts past the end is 416.
* ``If-Range`` with an entity tag matches by strong comparison only; with a
  date, only the exact Last-Modified second matches. A stale validator means
  the whole body, 200.
* ``If-None-Match`` (weak comparison, ``*`` included) answers 304; without it,
  ``If-Modified-Since`` does, at second resolution.
"""

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

# bytes=first-last | bytes=first- | bytes=-suffix (whitespace allowed around each range).
_RANGE_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$")
_ENTITY_TAG = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')
# Longer positions than this are past the end of any file (and int() refuses numbers of over 4300 digits).
_MAX_DIGITS = 19


@dataclass(frozen=True)
class ByteRange:
    """An inclusive byte range within a file of ``size`` bytes."""

    first: int
    last: int
    size: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.size}"


@dataclass(frozen=True)
class Decision:
    """What to answer: ``status`` 200 (whole), 206 (``byte_range``), 304 or 416."""

    status: int
    byte_range: ByteRange | None = None

    @property
    def sends_body(self) -> bool:
        return self.status in (200, 206)


class Unsatisfiable(Exception):
    """The Range header parses but no byte of it lies inside the file."""


def strong_etag(identity: str) -> str:
    """A strong ETag (quoted) for a file whose bytes never change, from its digest or another unique identity."""
    return f'"{identity}"'


def http_date(moment: datetime) -> str:
    """An IMF-fixdate, e.g. ``Tue, 01 Dec 2026 09:23:09 GMT`` (seconds; the fraction is dropped)."""
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


def parse_http_date(value: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed is None:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _entity_tags(header: str) -> list[tuple[bool, str]] | None:
    """(weak, opaque-tag) pairs of a list of entity tags, or None if it does not parse."""
    tags = []
    position = 0
    header = header.strip()
    while position < len(header):
        match = _ENTITY_TAG.match(header, position)
        if match is None:
            return None
        tags.append((bool(match.group(1)), match.group(2)))
        position = match.end()
    return tags


def _none_match(header: str, etag: str) -> bool:
    """If-None-Match: does any listed tag match ``etag`` by weak comparison (or is it ``*``)?"""
    if header.strip() == "*":
        return True
    tags = _entity_tags(header) or []
    return any(tag == etag for _weak, tag in tags)


def _if_range_holds(header: str, etag: str, last_modified: datetime) -> bool:
    value = header.strip()
    if value.startswith(('"', "W/")):
        tags = _entity_tags(value)
        # Strong comparison: a weak tag never matches.
        return tags is not None and len(tags) == 1 and not tags[0][0] and tags[0][1] == etag
    date = parse_http_date(value)
    return date is not None and date == last_modified.astimezone(UTC).replace(microsecond=0)


def _position(digits: str) -> int | None:
    if not digits:
        return None
    significant = digits.lstrip("0") or "0"
    return int(significant) if len(significant) <= _MAX_DIGITS else 10**_MAX_DIGITS


def parse_range(header: str, size: int) -> ByteRange | None:
    """The one range asked for, or None when the header is to be ignored (bad syntax, other unit, several ranges).

    Raises Unsatisfiable when it parses but lies entirely past the end of the file.
    """
    unit, equals, specs = header.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    parts = specs.split(",")
    if len(parts) != 1:
        return None  # several ranges: answered whole (see the module docstring)
    match = _RANGE_SPEC.match(parts[0])
    if match is None:
        return None
    first, last = (_position(text) for text in match.groups())
    if first is None and last is None:
        return None
    if first is None:  # suffix: the last N bytes
        if last == 0 or size == 0:
            raise Unsatisfiable()
        return ByteRange(max(0, size - last), size - 1, size)
    start = first
    end = size - 1 if last is None else last
    if last is not None and end < start:
        return None  # invalid: the RFC says ignore the header
    if start >= size:
        raise Unsatisfiable()
    return ByteRange(start, min(end, size - 1), size)


def decide(
    *,
    size: int,
    etag: str,
    last_modified: datetime,
    range_header: str | None = None,
    if_range: str | None = None,
    if_none_match: str | None = None,
    if_modified_since: str | None = None,
) -> Decision:
    """The answer to a GET or HEAD of a file, in the order RFC 9110 13.2.2 evaluates the headers."""
    if if_none_match is not None:
        if _none_match(if_none_match, etag):
            return Decision(304)
    elif if_modified_since is not None:
        since = parse_http_date(if_modified_since)
        if since is not None and last_modified.astimezone(UTC).replace(microsecond=0) <= since:
            return Decision(304)
    if range_header is None:
        return Decision(200)
    if if_range is not None and not _if_range_holds(if_range, etag, last_modified):
        return Decision(200)
    try:
        byte_range = parse_range(range_header, size)
    except Unsatisfiable:
        return Decision(416)
    if byte_range is None:
        return Decision(200)
    return Decision(206, byte_range)
