"""The logfmt lines (uploads.logs): one record is one line, whatever a client puts in a path, a header or a message.

A value is checked both as text (nothing that ends a line, moves the cursor or
reorders text is written raw) and as data: decoded the way logfmt parsers
decode a quoted value (JSON string escapes: go-logfmt, Loki), it gives back
exactly what was logged.
"""

import io
import json
import logging
import re
import sys

import pytest

from uploads.logs import LogfmtFormatter

# What a terminal, a pager or a log viewer could take for a line break, a cursor move or a reordering.
RAW_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
PAIR = r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]*)'
FORGED = "time=2026-01-01T00:00:00.000Z level=CRITICAL logger=uploads.events msg=forged"


def a_record(msg: str = "request", *args, exc_info=None, **fields) -> logging.LogRecord:
    record = logging.LogRecord("uploads.http", logging.INFO, __file__, 1, msg, args, exc_info)
    record.ddx = fields
    return record


def formatted(record: logging.LogRecord) -> str:
    return LogfmtFormatter().format(record)


def parsed(line: str) -> dict[str, str]:
    """The line's pairs, quoted values decoded as logfmt parsers decode them; the whole line must be pairs."""
    assert re.fullmatch(f"{PAIR}( {PAIR})*", line), line
    return {key: json.loads(value) if value.startswith('"') else value for key, value in re.findall(PAIR, line)}


@pytest.mark.parametrize(
    ("char", "escaped"),
    [
        ("\n", r"\n"),
        ("\r", r"\r"),
        ("\r\n", r"\r\n"),
        ("\x0b", r"\u000b"),  # VT
        ("\x0c", r"\f"),  # FF
        ("\x1c", r"\u001c"),  # file separator: str.splitlines() breaks there
        ("\x1e", r"\u001e"),
        ("\x85", r"\u0085"),  # NEL
        ("\u2028", r"\u2028"),  # line separator
        ("\u2029", r"\u2029"),  # paragraph separator
        ("\x00", r"\u0000"),  # journald ends a line at a NUL too
    ],
)
def test_a_value_cannot_end_the_line_and_start_a_forged_record(char, escaped):
    path = f"/files{char}{FORGED}"

    line = formatted(a_record(path=path, status=404))

    assert line.splitlines() == [line], line
    assert f'path="/files{escaped}time=2026-01-01T00:00:00.000Z level=CRITICAL' in line, line
    assert parsed(line)["path"] == path
    assert parsed(line)["level"] == "INFO" and parsed(line)["status"] == "404"


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("\x1b[2J\x1b[1;1H", r"\u001b[2J\u001b[1;1H"),  # ESC: clear the screen, cursor home
        ("\x9b2J", r"\u009b2J"),  # the one-byte CSI of C1
        ("\x07", r"\u0007"),  # BEL
        ("abc\x08\x08\x08xyz", r"abc\b\b\bxyz"),  # backspaces overwrite what was printed
        ("\x7f", r"\u007f"),  # DEL
        ("a\tb", r"a\tb"),
    ],
)
def test_terminal_escapes_and_other_control_characters_are_written_visibly(text, escaped):
    line = formatted(a_record(agent=text))

    assert f'agent="{escaped}"' in line, line
    assert not RAW_CONTROLS.search(line), ascii(line)
    assert parsed(line)["agent"] == text


@pytest.mark.parametrize(
    "char", ["\u202e", "\u202d", "\u202a", "\u202c", "\u2066", "\u2067", "\u2069", "\u200f", "\u061c"]
)
def test_bidi_controls_that_would_reorder_the_line_are_escaped(char):
    # Right-to-left override: "user=1 slot=" + "\u202e" + "9=resu" displays as "user=1 slot=user=9".
    value = f"x{char}9=resu"

    line = formatted(a_record(slot=value, user=1))

    assert f'slot="x\\u{ord(char):04x}9=resu"' in line, line
    assert not RAW_CONTROLS.search(line), ascii(line)
    assert parsed(line)["slot"] == value


def test_ordinary_non_ascii_text_stays_readable_as_is():
    line = formatted(a_record(filename="été✓漢字.bin", title="naïve 😀 👩\u200d💻 ok"))

    assert " filename=été✓漢字.bin " in line, line
    assert ' title="naïve 😀 👩\u200d💻 ok"' in line, line  # a joined emoji is text, not a control
    assert parsed(line)["title"] == "naïve 😀 👩\u200d💻 ok"


def test_the_message_and_its_arguments_are_escaped_like_any_value():
    line = formatted(a_record("Not Found: %s", f"/x\r{FORGED}\x1b[2J\u2028"))

    assert line.splitlines() == [line], line
    assert 'msg="Not Found: /x\\rtime=2026-01-01T00:00:00.000Z ' in line, line
    assert not RAW_CONTROLS.search(line), ascii(line)
    assert parsed(line)["msg"] == f"Not Found: /x\r{FORGED}\x1b[2J\u2028"


def test_an_exception_message_cannot_forge_a_record_after_the_line():
    message = f"bad name\n{FORGED}\r{FORGED}\x1b[2K\u2028{FORGED}\x85{FORGED}\u202e"
    try:
        raise ValueError(message)
    except ValueError:
        record = a_record("failed", exc_info=sys.exc_info())

    text = formatted(record)

    first, *traceback = text.split("\n")
    assert first.startswith("time=") and parsed(first)["msg"] == "failed"
    assert text.splitlines() == [first, *traceback], ascii(text)  # no line break but the \n between lines
    assert traceback[0] == "  Traceback (most recent call last):"
    assert all(line.startswith("  ") for line in traceback), traceback
    assert traceback[-2:] == [
        "  ValueError: bad name",
        f"  {FORGED}\\r{FORGED}\\u001b[2K\\u2028{FORGED}\\u0085{FORGED}\\u202e",
    ]
    assert not RAW_CONTROLS.search(text.replace("\n", "")), ascii(text)
    # Other handlers (the test's caplog, an error tracker) still get the traceback as Python printed it.
    assert record.exc_text.endswith(f"ValueError: {message}")


def test_a_request_with_control_characters_in_its_path_is_logged_on_one_line_each(client):
    """End to end: the settings' handler and formatter, a real request through the middleware, a 404."""
    [handler] = [h for h in logging.getLogger().handlers if isinstance(h.formatter, LogfmtFormatter)]
    written = io.StringIO()
    previous = handler.setStream(written)
    try:
        response = client.get("/files%0dtime=2026-01-01T00:00:00.000Z%20level=CRITICAL%1b[2J%c2%85%e2%80%a8%e2%80%ae")
    finally:
        handler.setStream(previous)

    assert response.status_code == 404
    output = written.getvalue()
    lines = output.splitlines()
    assert output.split("\n") == [*lines, ""], ascii(output)  # every line ends at a \n, and only there
    assert all(line.startswith("time=") for line in lines), lines
    assert not RAW_CONTROLS.search(output.replace("\n", "")), ascii(output)
    [access] = [line for line in lines if " logger=uploads.http " in line]
    assert 'path="/files\\rtime=2026-01-01T00:00:00.000Z level=CRITICAL\\u001b[2J\\u0085\\u2028\\u202e"' in access
    fields = parsed(access)
    assert (fields["level"], fields["msg"], fields["status"]) == ("INFO", "request", "404")
    assert fields["path"] == "/files\rtime=2026-01-01T00:00:00.000Z level=CRITICAL\x1b[2J\x85\u2028\u202e"
