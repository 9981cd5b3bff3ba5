"""Log lines as logfmt (``key=value``), with the request id and the client's address of the entry point.

One record is one line: ``time=… level=… logger=… msg=…`` followed by the
record's structured fields (``upload=… user=… slot=… gen=… reason=…``, given
as ``extra={"ddx": {...}}``, see uploads.services.events) and the context of the entry
point that caused it: ``request_id=…`` and ``remote=…``. Readable in a
terminal and parsed as is by Loki (``| logfmt``), Vector or ``grep``. A
traceback, if any, follows on the next lines, as Python prints it but
indented: the record itself stays one line, and only a record starts at
column 0. No value, message or traceback writes a control character raw (see
``_CONTROLS``): a client's path or header cannot forge a line.

The context lives in contextvars set by the entry points (the HTTP middleware
below, ``bind_connection`` in the WebSocket consumer). asgiref copies them
into the threads that run sync code (views, services through db_call), and
on_commit callbacks run in the thread that committed, so a line logged deep in
a service still says which request or connection it belongs to. Nothing here
imports the app's models: LOGGING loads this module before Django is set up.
"""

import logging
import re
import time
import uuid
from contextvars import ContextVar

from django.utils.functional import SimpleLazyObject, empty

REQUEST_ID: ContextVar[str | None] = ContextVar("ddx_request_id", default=None)
REMOTE: ContextVar[str | None] = ContextVar("ddx_remote", default=None)

REQUEST_ID_HEADER = "X-Request-ID"
# What an incoming X-Request-ID may look like (nginx's $request_id, a UUID, most
# tracers' ids). Anything else is replaced: the id is written into every log
# line, so a client must not be able to put spaces, quotes or newlines there.
_ACCEPTED_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# What a line must never carry raw, since paths, headers and messages come from
# anonymous clients: the C0 and C1 controls and DEL (the line ends CR, VT, FF,
# NEL, and NUL for journald; ESC and C1's one-byte CSI, which start terminal
# escapes; backspace), the Unicode line and paragraph separators, and the bidi
# controls, with which a viewer shows text in another order than it is written.
# Other non-ASCII text (é, ✓, CJK, emoji joined with ZWJ) stays as it is, readable.
_CONTROLS = r"\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069"
_NEEDS_QUOTES = re.compile(rf'[\s"=\\{_CONTROLS}]')
_QUOTED_ESCAPES = re.compile(rf'["\\{_CONTROLS}]')
_TRACEBACK_ESCAPES = re.compile(rf"(?!\n)[{_CONTROLS}]")
# Escaped as JSON escapes a string (``\r``, ``\u001b``, ``\u2028``): logfmt parsers
# (go-logfmt, Loki's ``| logfmt``) decode these in a quoted value, and would
# refuse the whole line for a Python-style ``\x1b``.
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
# A traceback carries exception messages, user data among them, on lines of its
# own. Each of its lines starts with this, so that a record is exactly a line
# that starts at column 0: whatever a message says, it cannot start one. (One
# escaped value for the whole traceback would be as sound but unreadable.)
_CONTINUATION = "  "

# A share link's token is its whole secret, and it is in the link's path (/s/<token>): whoever reads
# the logs must not be able to download the files. Masked in every line, whoever logs the path
# (this middleware, django.request's "Not Found: …", the server's refusals); the views log the link's id.
_SHARE_TOKEN = re.compile(r"(/s/)[^/\s?#\"']+")
SHARE_TOKEN_MASK = "[token]"

http_log = logging.getLogger("uploads.http")


def mask_share_tokens(text: str) -> str:
    """``text`` with every share-link token replaced by SHARE_TOKEN_MASK."""
    return _SHARE_TOKEN.sub(rf"\g<1>{SHARE_TOKEN_MASK}", text) if "/s/" in text else text


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(header: str | None) -> str:
    """The caller's X-Request-ID if it is a plain token (a proxy's id to correlate with), else a new one."""
    if header and _ACCEPTED_REQUEST_ID.fullmatch(header):
        return header
    return new_request_id()


def bind(*, request_id: str | None, remote: str | None) -> None:
    """Set the context of the current entry point (a request, a connection) for every line logged under it."""
    REQUEST_ID.set(request_id)
    REMOTE.set(remote)


def bind_connection(scope: dict) -> str:
    """For a WebSocket connection: a request id (the handshake's X-Request-ID or a new one) and the client address."""
    header = next((value for name, value in scope.get("headers", []) if name == b"x-request-id"), b"")
    request_id = request_id_from(header.decode("latin-1"))
    client = scope.get("client")
    bind(request_id=request_id, remote=client[0] if client else None)
    return request_id


def _escape(match: re.Match) -> str:
    char = match.group()
    return _SHORT_ESCAPES.get(char) or f"\\u{ord(char):04x}"


def _value(value) -> str:
    text = mask_share_tokens(str(value))
    if text == "" or _NEEDS_QUOTES.search(text):
        return '"' + _QUOTED_ESCAPES.sub(_escape, text) + '"'
    return text


def _continuation(text: str) -> str:
    """A traceback or stack as the lines after a record: indented, its control characters but \\n escaped.

    Escaped as in values, so that none of them can end a line or bring the
    cursor back to column 0 in a terminal, a pager or the journal.
    """
    return "".join(f"\n{_CONTINUATION}{line}" for line in _TRACEBACK_ESCAPES.sub(_escape, text).split("\n"))


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class LogfmtFormatter(logging.Formatter):
    """``time=… level=… logger=… msg=… <fields> request_id=… remote=…`` (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = {
            "time": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in (getattr(record, "ddx", None) or {}).items():
            if value is not None:
                pairs[key] = value
        for key, var in (("request_id", REQUEST_ID), ("remote", REMOTE)):
            value = var.get()
            if value is not None:
                pairs.setdefault(key, value)
        line = " ".join(f"{key}={_value(value)}" for key, value in pairs.items())
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        # record.exc_text stays as Python printed it: other handlers format the same record.
        if record.exc_text:
            line += _continuation(mask_share_tokens(record.exc_text))
        if record.stack_info:
            # Masked like the traceback: no part of a record is written with a token in it.
            line += _continuation(mask_share_tokens(self.formatStack(record.stack_info)))
        return line


def _user_id(request):
    """The user's id if authentication already ran for this request; never a database query of its own."""
    user = getattr(request, "user", None)
    if isinstance(user, SimpleLazyObject) and user._wrapped is empty:
        return None
    return user.pk if getattr(user, "is_authenticated", False) else None


class RequestIdMiddleware:
    """Gives every HTTP request an id (X-Request-ID in and out) and logs one line per request with it.

    An incoming X-Request-ID is kept when it is a plain token, so that a
    proxy's id (nginx: ``proxy_set_header X-Request-ID $request_id``) links its
    access log to ours; it only ever labels log lines, so a client choosing
    its own grants nothing. First in MIDDLEWARE: every line logged while the
    request is handled, by any middleware or view, carries the id.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        request.request_id = request_id
        # Not reset afterwards: under ASGI each request runs in a context of its
        # own, and a streamed body (a download) still logs under this request.
        bind(request_id=request_id, remote=request.META.get("REMOTE_ADDR"))
        started = time.monotonic()
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        http_log.info(
            "request",
            extra={
                "ddx": {
                    "method": request.method,
                    # Without the query string: it may carry a cursor or a ticket.
                    "path": request.path,
                    "status": response.status_code,
                    "duration_ms": round((time.monotonic() - started) * 1000),
                    "user": _user_id(request),
                    # A share link's page or download: which link (its token is masked in the path).
                    "share": getattr(request, "share_id", None),
                }
            },
        )
        return response
