"""GET /metrics (uploads.metrics, uploads.metrics_views): who may read it, what it says, and that it is true.

In-process: the endpoint's refusals and the database-backed gauges. Against
real servers (``manage.py serve`` in subprocesses, multiprocess mode on one
PROMETHEUS_MULTIPROC_DIR): counters move with a real WebSocket upload and a
real download, two processes report the same totals, a process killed with
SIGKILL stops counting its open connection but keeps its totals, and the
servers' log lines carry the transition's fields with the request id and
client address. Output is parsed with prometheus_client's own parser.
"""

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import OperationalError
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from tests.support.live_backend import http_call, live_backend
from tests.support.live_server import ROOT, LiveServer
from tests.test_live_server import WS_TIMEOUT, receive
from tests.test_live_server import ws_connect as live_ws_connect
from uploads.checks import check_configuration
from uploads.models import FsckRun, Slot
from uploads.ops import collector
from uploads.services.slots import slot_admit
from uploads.services.uploads import upload_create

TOKEN = "metrics-token-" + "k" * 32
MiB = 1024 * 1024


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape: (sample name, its labels) -> value. Fails on anything the parser rejects."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# --- who may read it ----------------------------------------------------------------------


@pytest.fixture
def with_token(settings):
    settings.DIRECTDRIVEX_METRICS_TOKEN = TOKEN
    return settings


@pytest.mark.django_db
def test_anonymous_callers_are_refused_with_401_and_a_bearer_challenge(anonymous_client, with_token):
    answer = anonymous_client.get("/metrics")

    assert answer.status_code == 401
    assert answer["WWW-Authenticate"] == 'Bearer realm="metrics"'
    assert answer.json()["code"] == "unauthenticated"


@pytest.mark.django_db
@pytest.mark.parametrize("header", [f"Bearer {TOKEN}x", "Bearer ", f"Token {TOKEN}", f"Basic {TOKEN}"])
def test_a_wrong_token_or_scheme_is_refused(anonymous_client, with_token, header):
    answer = anonymous_client.get("/metrics", HTTP_AUTHORIZATION=header)

    assert answer.status_code == 401
    assert answer.json()["code"] == "unauthenticated"


@pytest.mark.django_db
def test_without_a_configured_token_no_bearer_is_accepted(anonymous_client, settings):
    settings.DIRECTDRIVEX_METRICS_TOKEN = ""

    assert anonymous_client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401
    assert anonymous_client.get("/metrics", HTTP_AUTHORIZATION="Bearer x").status_code == 401


def test_a_signed_in_user_who_is_not_staff_is_refused_with_403(bob_client, with_token):
    answer = bob_client.get("/metrics")

    assert answer.status_code == 403
    assert answer.json()["code"] == "permission_denied"


def test_a_staff_session_reads_the_metrics(staff_client):
    answer = staff_client.get("/metrics")

    assert answer.status_code == 200
    assert answer["Content-Type"].startswith("text/plain")
    samples = parse(answer.content.decode())
    assert value(samples, "directdrivex_database_up") == 1
    assert ("directdrivex_uploads_created_total", frozenset()) in samples


@pytest.mark.django_db
def test_the_bearer_token_reads_the_metrics(anonymous_client, with_token):
    answer = anonymous_client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")

    assert answer.status_code == 200
    assert value(parse(answer.content.decode()), "directdrivex_database_up") == 1


@pytest.mark.django_db
def test_a_scrape_with_the_token_answers_while_the_database_is_down(anonymous_client, with_token, monkeypatch):
    def down(self):
        raise OperationalError("connection refused")

    monkeypatch.setattr(collector.DatabaseCollector, "_from_database", down)

    answer = anonymous_client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")

    assert answer.status_code == 200
    samples = parse(answer.content.decode())
    assert value(samples, "directdrivex_database_up") == 0
    assert ("directdrivex_uploads_created_total", frozenset()) in samples
    assert ("directdrivex_slots_active", frozenset({("kind", "upload")})) not in samples


# --- what the database says, at scrape time -------------------------------------------------


def test_slots_active_and_stuck_by_kind_come_from_the_rows(alice, bob, staff_client, limits):
    limits(global_upload_slots=7, global_download_slots=9)
    upload_create(alice, filename="live.bin", size=10)
    _upload, stuck = upload_create(bob, filename="stuck.bin", size=10)
    third, _slot = upload_create(alice, filename="third.bin", size=10)
    slot_admit(Slot.Kind.DOWNLOAD, alice, upload=third)
    # Last: the next admission would reclaim it.
    Slot.objects.filter(pk=stuck.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))

    samples = parse(staff_client.get("/metrics").content.decode())

    assert value(samples, "directdrivex_slots_active", kind="upload") == 3
    assert value(samples, "directdrivex_slots_stuck", kind="upload") == 1
    assert value(samples, "directdrivex_slots_active", kind="download") == 1
    assert value(samples, "directdrivex_slots_stuck", kind="download") == 0
    assert value(samples, "directdrivex_slots_limit", kind="upload") == 7
    assert value(samples, "directdrivex_slots_limit", kind="download") == 9
    assert value(samples, "directdrivex_uploads_unfinished") == 3


def test_fsck_findings_are_those_of_the_last_run(staff_client):
    now = timezone.now()
    finding = {"upload": None, "path": "", "detail": "", "action": "", "repaired": False}
    FsckRun.objects.create(
        started_at=now - timedelta(hours=1),
        finished_at=now - timedelta(hours=1),
        findings=[{**finding, "kind": "orphan_part"}] * 5,
    )
    last = FsckRun.objects.create(
        started_at=now - timedelta(seconds=30),
        finished_at=now - timedelta(seconds=20),
        repair=True,
        findings=[
            {**finding, "kind": "missing_part", "action": "offset moved back", "repaired": True},
            {**finding, "kind": "missing_part", "action": "offset moved back", "repaired": True},
            # An action that is not a repair: fsck says why it left the finding alone.
            {**finding, "kind": "part_long", "action": "left alone: a writer process has the file open"},
            {**finding, "kind": "stray"},
        ],
    )

    samples = parse(staff_client.get("/metrics").content.decode())

    assert value(samples, "directdrivex_fsck_findings", kind="missing_part", repaired="true") == 2
    assert value(samples, "directdrivex_fsck_findings", kind="part_long", repaired="false") == 1
    assert value(samples, "directdrivex_fsck_findings", kind="stray", repaired="false") == 1
    assert ("directdrivex_fsck_findings", frozenset({("kind", "orphan_part"), ("repaired", "false")})) not in (samples)
    assert value(samples, "directdrivex_fsck_last_run_timestamp_seconds") == pytest.approx(last.finished_at.timestamp())


def test_http_refusals_are_counted_by_code(alice_client, limits, staff_client):
    limits(max_file_size=100)
    before = value(parse(staff_client.get("/metrics").content.decode()), "directdrivex_refusals_total",
                   transport="http", code="file_too_large")  # fmt: skip

    assert alice_client.post("/api/uploads/", {"filename": "big", "size": 101}, format="json").status_code == 413
    assert alice_client.get("/api/nowhere/").status_code == 404

    samples = parse(staff_client.get("/metrics").content.decode())
    assert value(samples, "directdrivex_refusals_total", transport="http", code="file_too_large") == before + 1
    assert value(samples, "directdrivex_refusals_total", transport="http", code="not_found") >= 1


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["short", "has spaces in it, and is long", '"quoted-token-of-some-length"'])
def test_e011_a_metrics_token_that_is_short_or_no_bearer_token(settings, token):
    settings.DIRECTDRIVEX_METRICS_TOKEN = token

    assert "uploads.E011" in [error.id for error in check_configuration(None)]


def test_e011_accepts_a_generated_token(settings):
    settings.DIRECTDRIVEX_METRICS_TOKEN = "Zx9_-" + "a" * 40

    assert "uploads.E011" not in [error.id for error in check_configuration(None)]


def test_e012_a_multiprocess_dir_that_cannot_be_created_stops_start_up(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    env = {**os.environ, "DEBUG": "1", "PROMETHEUS_MULTIPROC_DIR": str(blocker / "metrics")}

    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )

    assert result.returncode != 0
    assert "PROMETHEUS_MULTIPROC_DIR: (uploads.E012)" in result.stderr, result.stderr


# --- real servers, several processes -------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "metrics") as backend:
        yield backend


@pytest.fixture(scope="module")
def deployment(backend, tmp_path_factory):
    """Two server processes of one deployment on one host: shared database, storage and metrics folder."""
    root = tmp_path_factory.mktemp("metrics-live")
    settings = {"PROMETHEUS_MULTIPROC_DIR": str(root / "prometheus"), "DIRECTDRIVEX_METRICS_TOKEN": TOKEN}
    first = LiveServer(root / "a", database_url=backend.database_url, redis_url=backend.redis_url, **settings)
    second = first.sibling(root / "b")
    try:
        first.start()
        second.start()
        yield first, second
    finally:
        first.stop()
        second.stop()


def scrape(server: LiveServer) -> dict:
    answer = http_call(server, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 200, (answer.status, answer.body[:500])
    return parse(answer.body.decode())


PROCESS_COUNTERS = (
    ("directdrivex_uploads_created_total", {}),
    ("directdrivex_uploads_completed_total", {}),
    ("directdrivex_bytes_received_total", {}),
    ("directdrivex_bytes_served_total", {}),
    ("directdrivex_slots_admitted_total", {"kind": "upload"}),
    ("directdrivex_slots_admitted_total", {"kind": "download"}),
    ("directdrivex_slots_released_total", {"kind": "upload", "reason": "completed"}),
    ("directdrivex_slots_released_total", {"kind": "download", "reason": "completed"}),
    ("directdrivex_websocket_closes_total", {"code": "1000"}),
    ("directdrivex_websocket_closes_total", {"code": "4401"}),
    ("directdrivex_refusals_total", {"transport": "websocket", "code": "unauthenticated"}),
    ("directdrivex_refusals_total", {"transport": "http", "code": "file_too_large"}),
    ("directdrivex_commit_seconds_count", {}),
)


def counters(samples) -> dict[str, float]:
    return {f"{name}{labels or ''}": value(samples, name, **labels) for name, labels in PROCESS_COUNTERS}


def ws_connect(server: LiveServer, ws_url: str, request_id: str):
    return live_ws_connect(server, ws_url, headers={"X-Request-ID": request_id})


async def upload_over_websocket(server: LiveServer, ws_url: str, data: bytes, request_id: str) -> dict:
    """Send ``data`` within the window; the ``complete`` message, once the server closed with 1000."""
    async with ws_connect(server, ws_url, request_id) as ws:
        ready = await receive(ws)
        assert ready["type"] == "ready", ready
        chunk, window = ready["chunk_size"], ready["window"]
        sent = acked = 0
        while True:
            while sent < len(data) and sent + min(chunk, len(data) - sent) - acked <= window:
                await ws.send(data[sent : sent + chunk])
                sent += min(chunk, len(data) - sent)
            message = await receive(ws)
            if message["type"] == "complete":
                await asyncio.wait_for(ws.wait_closed(), WS_TIMEOUT)
                assert ws.close_code == 1000
                return message
            assert message["type"] == "ack", message
            acked = message["offset"]


def create(server: LiveServer, token: str, data: bytes, request_id: str) -> dict:
    body = json.dumps({"filename": "metrics.bin", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    answer = http_call(server, "POST", "/api/uploads/", body=body.encode(), token=token,
                       headers={"X-Request-ID": request_id})  # fmt: skip
    assert answer.status == 201, answer.body
    assert answer.headers["X-Request-ID"] == request_id
    return answer.json()


def wait_for(condition, what: str, timeout: float = 15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def lines_of(server: LiveServer, message: str) -> list[str]:
    return [line for line in server.log_path.read_text(errors="replace").splitlines() if f" msg={message} " in line]


@pytest.mark.slow
def test_counters_move_with_a_real_upload_and_download_and_both_processes_report_them(backend, deployment):
    first, second = deployment
    before = counters(scrape(first))
    data = os.urandom(3 * MiB + 5)

    created = create(first, backend.alice_token, data, "post-req-1")
    complete = asyncio.run(upload_over_websocket(first, created["ws_url"], data, "ws-conn-1"))
    download = http_call(second, "GET", f"/api/uploads/{created['id']}/content", token=backend.alice_token)
    refused = http_call(second, "POST", "/api/uploads/", token=backend.alice_token,
                        body=json.dumps({"filename": "huge", "size": 2**62}).encode())  # fmt: skip

    async def unauthenticated():
        async with ws_connect(second, f"/ws/uploads/{created['id']}/?ticket=forged", "ws-conn-2") as ws:
            message = await receive(ws)
            await asyncio.wait_for(ws.wait_closed(), WS_TIMEOUT)
            return message["code"], ws.close_code

    assert complete["sha256"] == hashlib.sha256(data).hexdigest()
    assert download.status == 200 and download.body == data
    assert refused.status == 413 and refused.json()["code"] == "file_too_large"
    assert asyncio.run(unauthenticated()) == ("unauthenticated", 4401)

    # Connections are counted down a moment after the last byte leaves: wait for both to be at 0.
    wait_for(
        lambda: all(
            value(scrape(server), "directdrivex_connections_open", kind=kind) == 0
            for server in deployment
            for kind in ("upload", "download")
        ),
        "every connection to be counted closed",
    )
    after_first, after_second = scrape(first), scrape(second)
    moved = {name: counters(after_first)[name] - before[name] for name in before}
    assert moved == {
        "directdrivex_uploads_created_total": 1,
        "directdrivex_uploads_completed_total": 1,
        "directdrivex_bytes_received_total": len(data),
        "directdrivex_bytes_served_total": len(data),
        "directdrivex_slots_admitted_total{'kind': 'upload'}": 1,
        "directdrivex_slots_admitted_total{'kind': 'download'}": 1,
        "directdrivex_slots_released_total{'kind': 'upload', 'reason': 'completed'}": 1,
        "directdrivex_slots_released_total{'kind': 'download', 'reason': 'completed'}": 1,
        "directdrivex_websocket_closes_total{'code': '1000'}": 1,
        "directdrivex_websocket_closes_total{'code': '4401'}": 1,
        "directdrivex_refusals_total{'transport': 'websocket', 'code': 'unauthenticated'}": 1,
        "directdrivex_refusals_total{'transport': 'http', 'code': 'file_too_large'}": 1,
        # 3 MiB at 1 s commits: at least the one before finalizing.
        "directdrivex_commit_seconds_count": moved["directdrivex_commit_seconds_count"],
    }, moved
    assert moved["directdrivex_commit_seconds_count"] >= 1
    # The upload went through the first process, the download through the second: each reports both.
    assert counters(after_second) == counters(after_first)
    assert value(after_first, "directdrivex_slots_active", kind="upload") == 0
    assert value(after_first, "directdrivex_database_up") == 1

    # The lines of that upload, with who did it, from where and under which request.
    [started] = lines_of(first, "upload.started")
    assert f"upload={created['id']} " in started and " request_id=post-req-1 remote=127.0.0.1" in started, started
    [admitted] = lines_of(first, "writer.admitted")
    [completed] = lines_of(first, "upload.completed")
    for line in (admitted, completed):
        assert re.search(rf"upload={created['id']} user=\d+ slot=\d+ gen=\d+ ", line), line
        assert line.endswith(" request_id=ws-conn-1 remote=127.0.0.1"), line
    [post] = [line for line in lines_of(first, "request") if " method=POST path=/api/uploads/ status=201 " in line]
    assert "request_id=post-req-1" in post
    [served] = [line for line in lines_of(second, "slot.released") if "kind=download" in line]
    assert "reason=completed" in served and f"upload={created['id']}" in served


@pytest.mark.slow
def test_anonymous_scrapes_of_a_real_server_are_refused(deployment):
    first, _second = deployment

    answer = http_call(first, "GET", "/metrics")

    assert answer.status == 401
    assert answer.json()["code"] == "unauthenticated"


@pytest.mark.slow
def test_a_killed_process_stops_counting_its_connection_but_its_totals_stay(backend, deployment, tmp_path):
    first, _second = deployment
    doomed = first.sibling(tmp_path / "doomed")
    doomed.start()
    try:
        data = os.urandom(2 * MiB)
        created = create(first, backend.alice_token, data, "post-req-2")

        async def hold_open_then_kill():
            async with ws_connect(doomed, created["ws_url"], "ws-conn-3") as ws:
                ready = await receive(ws)
                assert ready["type"] == "ready", ready
                await ws.send(data[: ready["chunk_size"]])
                assert (await receive(ws))["type"] == "ack"
                # The writer commits within about a second: then its bytes count as received.
                durable = wait_for(
                    lambda: http_call(first, "GET", f"/api/uploads/{created['id']}/", token=backend.alice_token).json()[
                        "offset"
                    ],
                    "the first bytes to be durable",
                )
                alive = scrape(first)
                doomed.kill()  # SIGKILL: no clean-up of its own runs
                return durable, alive

        durable, alive = asyncio.run(hold_open_then_kill())
        assert value(alive, "directdrivex_connections_open", kind="upload") == 1

        dead = scrape(first)
        assert value(dead, "directdrivex_connections_open", kind="upload") == 0
        received = value(alive, "directdrivex_bytes_received_total")
        assert received >= durable
        assert value(dead, "directdrivex_bytes_received_total") == received, "the dead process's totals are kept"
        files = sorted(path.name for path in Path(first.env["PROMETHEUS_MULTIPROC_DIR"]).glob("*.db"))
        assert not [name for name in files if name.endswith(f"_{doomed.pid}.db")], files
        assert "counter_archive.db" in files
    finally:
        doomed.stop()
