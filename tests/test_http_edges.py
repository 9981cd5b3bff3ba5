"""Every answer under /api/ is JSON {"code", "detail"}: unknown paths, wrong methods, missing slashes, bad bodies,
bad Hosts, outages and faults; pages outside /api/ keep Django's HTML.

Most tests call one real server (`manage.py serve`, module-scoped); an outage
is a second server whose database cannot be reached at all. In-process tests
cover what needs a fault inside the process (a broken storage folder, a
channel layer that is down) or a setting the server does not expose.
"""

import json
import logging

import pytest
from asgiref.sync import async_to_sync
from channels_redis.core import RedisChannelLayer
from django.test import Client
from django.urls import include, path

from tests.support.live_backend import http_call, live_backend
from tests.support.live_server import LiveServer, free_port

live = pytest.mark.slow

DEEP_JSON = b"[" * 1000 + b"]" * 1000
NO_UPLOAD = "00000000-0000-0000-0000-000000000000"


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "edges") as value:
        yield value


@pytest.fixture(scope="module")
def server(backend, tmp_path_factory):
    with LiveServer(
        tmp_path_factory.mktemp("edges"), database_url=backend.database_url, redis_url=backend.redis_url
    ) as running:
        running.start()
        yield running


def assert_refusal(answer, status: int, code: str) -> dict:
    assert answer.status == status, (answer.status, answer.body[:300])
    assert answer.content_type == "application/json", answer.content_type
    body = answer.json()
    assert body["code"] == code, body
    assert body["detail"]
    return body


# --- unknown paths, methods, slashes ---------------------------------------------


@live
@pytest.mark.parametrize(
    ("method", "where"),
    [
        ("GET", "/api/nothing-here/"),
        ("POST", "/api/nothing-here/"),
        ("GET", "/api/uploads/1/2/3/"),
        ("DELETE", "/api/nothing-here"),
        ("GET", "/api/"),
        ("GET", "/api"),
    ],
)
def test_an_unknown_api_path_is_404_not_found_in_json(server, backend, method, where):
    assert_refusal(http_call(server, method, where, token=backend.alice_token), 404, "not_found")


@live
@pytest.mark.parametrize(
    ("method", "where"),
    [
        ("PUT", "/api/uploads/"),
        ("PATCH", "/api/uploads/"),
        ("PUT", "/api/uploads/00000000-0000-0000-0000-000000000000/"),
    ],
)
def test_a_wrong_method_is_405_method_not_allowed_in_json(server, backend, method, where):
    answer = http_call(server, method, where, body=b"{}", token=backend.alice_token)
    assert_refusal(answer, 405, "method_not_allowed")


@live
def test_a_path_without_its_trailing_slash_is_answered_as_if_it_had_it(server, backend):
    created = http_call(
        server, "POST", "/api/uploads", body=b'{"filename": "no-slash.bin", "size": 10}', token=backend.alice_token
    )
    assert created.status == 201, created.body
    upload_id = created.json()["id"]

    listed = http_call(server, "GET", "/api/uploads", token=backend.alice_token)
    assert listed.status == 200
    assert upload_id in [upload["id"] for upload in listed.json()]

    detail = http_call(server, "GET", f"/api/uploads/{upload_id}", token=backend.alice_token)
    assert (detail.status, detail.json()["id"]) == (200, upload_id)

    deleted = http_call(server, "DELETE", f"/api/uploads/{upload_id}", token=backend.alice_token)
    assert deleted.status == 204
    assert (
        http_call(server, "GET", f"/api/uploads/{upload_id}/", token=backend.alice_token).json()["status"]
        == "cancelled"
    )


# --- bodies ----------------------------------------------------------------------


@live
@pytest.mark.parametrize(
    "body",
    [DEEP_JSON, b'{"filename": "a.bin", "size": 1', b"\xff\xfe not utf-8", b'{"size": NaN, "filename": "a"}'],
    ids=["nested-1000-deep", "truncated", "not-utf-8", "nan"],
)
def test_an_unparsable_json_body_is_400_invalid(server, backend, body):
    answer = http_call(server, "POST", "/api/uploads/", body=body, token=backend.alice_token)
    assert_refusal(answer, 400, "invalid")


@live
def test_a_body_over_the_limit_is_413_request_too_large_in_json(server, backend):
    body = json.dumps({"filename": "x" * (1024 * 1024), "size": 1}).encode()
    answer = http_call(server, "POST", "/api/uploads/", body=body, token=backend.alice_token)
    assert_refusal(answer, 413, "request_too_large")


def test_a_body_over_djangos_own_limit_is_413_request_too_large(alice_client, settings):
    # Settings keep Django's limit equal to the transport's; set apart, Django's refusal is a 413 too, not a 500.
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = json.dumps({"filename": "x" * 2000, "size": 1})
    answer = alice_client.post("/api/uploads/", body, content_type="application/json")
    assert (answer.status_code, answer.json()["code"]) == (413, "request_too_large")


def test_json_nested_1000_deep_is_400_invalid_in_process(alice_client):
    answer = alice_client.post("/api/uploads/", DEEP_JSON, content_type="application/json")
    assert (answer.status_code, answer.json()["code"]) == (400, "invalid")


# --- Host --------------------------------------------------------------------------


@live
@pytest.mark.parametrize("where", ["/api/uploads/", "/api/nothing-here/", "/api/uploads"])
def test_a_bad_host_is_400_bad_host_in_json(server, backend, where):
    answer = http_call(server, "GET", where, token=backend.alice_token, headers={"Host": "evil.example"})
    assert_refusal(answer, 400, "bad_host")


# --- security headers -----------------------------------------------------------------

# What SecurityMiddleware adds to every answer (HSTS only over HTTPS, when configured).
SECURITY_HEADERS = ("X-Content-Type-Options", "Referrer-Policy", "Cross-Origin-Opener-Policy")


def security_headers(headers) -> dict:
    return {name: headers.get(name) for name in (*SECURITY_HEADERS, "Strict-Transport-Security")}


@pytest.mark.parametrize(
    ("where", "host", "status", "code"),
    [
        ("/api/uploads/", "evil.example", 400, "bad_host"),
        ("/api/nothing-here/", "testserver", 404, "not_found"),
        ("/api/nothing-here", "testserver", 404, "not_found"),
    ],
)
def test_the_edge_refusals_carry_the_security_headers_of_every_other_answer(db, settings, where, host, status, code):
    settings.SECURE_HSTS_SECONDS = 3600
    client = Client()
    page = client.get("/", secure=True)

    refused = client.get(where, secure=True, headers={"host": host})

    assert (refused.status_code, refused.json()["code"]) == (status, code)
    assert security_headers(refused.headers) == security_headers(page.headers)
    assert security_headers(refused.headers) == {
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Strict-Transport-Security": "max-age=3600",
    }


def test_a_bad_host_is_still_a_json_refusal_when_the_https_redirect_reads_it_first(db, settings):
    settings.SECURE_SSL_REDIRECT = True

    refused = Client().get("/api/uploads/", headers={"host": "evil.example"})
    redirected = Client().get("/api/uploads/")

    # Never a redirect to the host the client named.
    assert (refused.status_code, refused["Content-Type"]) == (400, "application/json")
    assert refused.json()["code"] == "bad_host"
    assert (redirected.status_code, redirected["Location"]) == (301, "https://testserver/api/uploads/")


@live
def test_the_servers_edge_refusals_carry_the_same_security_headers_as_its_other_answers(server, backend):
    answered = http_call(server, "GET", "/api/uploads/", token=backend.alice_token)
    assert answered.status == 200
    expected = {name: answered.headers[name] for name in SECURITY_HEADERS}
    assert None not in expected.values()

    refusals = [
        http_call(server, "GET", "/api/uploads/", token=backend.alice_token, headers={"Host": "evil.example"}),
        http_call(server, "GET", "/api/nothing-here/", token=backend.alice_token),
    ]

    assert [answer.status for answer in refusals] == [400, 404]
    assert [{name: answer.headers[name] for name in SECURITY_HEADERS} for answer in refusals] == [expected, expected]


@live
def test_pages_outside_the_api_keep_djangos_html_answers(server):
    bad_host = http_call(server, "GET", "/", headers={"Host": "evil.example"})
    assert bad_host.status == 400
    assert bad_host.content_type.startswith("text/html")

    missing = http_call(server, "GET", "/no-such-page/")
    assert missing.status == 404
    assert missing.content_type.startswith("text/html")

    redirected = http_call(server, "GET", "/accounts/login")
    assert redirected.status == 301  # APPEND_SLASH, as Django does it for pages
    assert redirected.headers["Location"] == "/accounts/login/"


# --- outages and faults ------------------------------------------------------------


@live
def test_an_unreachable_database_is_503_unavailable_with_retry_after(backend, tmp_path):
    if backend.postgres:
        unreachable = f"postgres://postgres@127.0.0.1:{free_port()}/ddx_ha_nowhere"  # nothing listens there
    else:
        unreachable = f"sqlite:///{tmp_path / 'no-such-folder' / 'db.sqlite3'}"  # cannot be opened
    # A short pool wait (PostgreSQL): the refusal comes once the wait for a connection runs out.
    with LiveServer(
        tmp_path / "outage", database_url=unreachable, redis_url=backend.redis_url, DIRECTDRIVEX_DB_POOL_TIMEOUT=1
    ) as server:
        server.start()
        for method, where, body in [("GET", "/api/uploads/", None), ("POST", "/api/uploads/", b"{}")]:
            answer = http_call(server, method, where, body=body, token=backend.alice_token)
            refused = assert_refusal(answer, 503, "unavailable")
            assert int(answer.headers["Retry-After"]) == refused["retry_after"] > 0
        # The process is not broken by it: what needs no database still answers.
        assert http_call(server, "GET", "/api/nothing-here/").status == 404


@pytest.mark.local_storage  # the fault is a file planted where the local layout has a folder
def test_an_unknown_fault_is_a_json_500_internal_error_with_a_log_line(alice_client, storage_dir, caplog):
    created = alice_client.post("/api/uploads/", {"filename": "a.bin", "size": 10}, format="json")
    assert created.status_code == 201
    # A real fault: the partial-files folder is a plain file, so deleting the upload's bytes fails.
    storage_dir.mkdir(parents=True, exist_ok=True)
    (storage_dir / "partial").write_bytes(b"")
    with caplog.at_level(logging.ERROR, logger="uploads.api_errors"):
        answer = alice_client.delete(f"/api/uploads/{created.json()['id']}/")
    assert answer.status_code == 500
    assert answer["Content-Type"] == "application/json"
    assert answer.json()["code"] == "internal_error"
    (record,) = [r for r in caplog.records if r.name == "uploads.api_errors"]
    assert record.exc_info is not None and record.exc_info[0] is NotADirectoryError


# Errors raised outside a DRF view go through Django's error handlers. This
# module is also the URLconf of the next tests: the project's URLs plus one
# plain Django view on an /api/ path and one on a page path, each needing a
# channel layer whose Redis is not there.


def needs_the_channel_layer(request):
    layer = RedisChannelLayer(hosts=[{"address": f"redis://127.0.0.1:{free_port()}/0"}])
    async_to_sync(layer.send)("ddx-test-channel", {"type": "ping"})


urlpatterns = [
    path("api/outage/", needs_the_channel_layer),
    path("page-outage/", needs_the_channel_layer),
    path("", include("directdrivex.urls")),
]
handler400 = "uploads.api_errors.bad_request"
handler403 = "uploads.api_errors.permission_denied"
handler404 = "uploads.api_errors.page_not_found"
handler500 = "uploads.api_errors.server_error"


@pytest.mark.urls(__name__)
def test_a_channel_layer_outage_outside_drf_is_503_unavailable_on_api_paths_only(db):
    client = Client(raise_request_exception=False)
    answer = client.get("/api/outage/")
    assert (answer.status_code, answer["Content-Type"]) == (503, "application/json")
    assert answer.json()["code"] == "unavailable"
    assert int(answer["Retry-After"]) == answer.json()["retry_after"]

    page = client.get("/page-outage/")
    assert page.status_code == 500
    assert page["Content-Type"].startswith("text/html")


@pytest.mark.urls(__name__)
def test_an_unknown_api_path_is_json_404_in_process(db):
    answer = Client().get("/api/not-here/")
    assert (answer.status_code, answer.json()["code"]) == (404, "not_found")
