"""bench/upload.py times uploads by the server's own log lines: it must read what the server writes."""

import logging

from bench.upload import UPLOAD_COMPLETE, log_seconds
from uploads.logs import LogfmtFormatter
from uploads.services.events import Event


def line(message: str, created: float, **fields) -> str:
    record = logging.LogRecord("uploads", logging.INFO, __file__, 1, message, None, None)
    record.created = created
    record.ddx = fields
    return LogfmtFormatter().format(record)


def test_log_seconds_reads_the_servers_logfmt_lines_and_the_completion_event(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "\n".join(
            [
                line("writer ready upload=u user=1 offset=0", 1_700_000_000.250),
                line("noise", 1_700_000_001.000),
                line(str(Event.UPLOAD_COMPLETED), 1_700_000_002.750, upload="u", user=1),
            ]
        )
        + "\n"
    )

    assert UPLOAD_COMPLETE in log.read_text()
    assert log_seconds(log, "writer ready", UPLOAD_COMPLETE) == 2.5


def test_log_seconds_still_reads_python_loggings_default_stamp_of_the_tus_peer(tmp_path):
    log = tmp_path / "tus.log"
    log.write_text(
        "2026-12-01 10:00:00,100 INFO bench.tus tus ready\n2026-12-01 10:00:03,600 INFO bench.tus tus durable\n"
    )

    assert log_seconds(log, "tus ready", "tus durable") == 3.5
