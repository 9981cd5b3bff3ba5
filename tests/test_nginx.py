"""nginx for real: Debian's nginx with deploy/nginx.conf.template (the documented one) in front of live servers.

One deployment for the module: two `manage.py serve` processes, as
production runs several, with SECURE_PROXY_SSL_HEADER on, as production
sets it, and nginx on a free port of 127.0.0.1 in plain HTTP (so nginx's
X-Forwarded-Proto is ``http``). On PostgreSQL + Redis when the suite runs on
them. Without nginx installed the module is skipped, except under CI=true,
where it fails: CI installs nginx (.ci/run).
"""

import contextlib
import hashlib
import http.client
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import websockets

from tests.support import seaweedfs
from tests.support.files import file_sha256, write_random
from tests.support.live_backend import Backend, http_call, live_backend
from tests.support.live_server import ROOT, LiveServer
from tests.support.nginx import TEMPLATE, Nginx, nginx_binary, render
from tests.support.tcp_proxy import TcpProxy
from tests.test_downloads_live import finished_upload

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
UPLOAD_SIZE = 64 * MiB
MAX_REQUEST_BYTES = 1 * MiB
ACCEL_REDIRECT = "/_protected/"
# What the server says about a download (spec: "HTTP API"; Django's security middleware).
SERVER_DOWNLOAD_HEADERS = [
    "Content-Type", "Content-Length", "Content-Disposition", "Accept-Ranges", "ETag", "Last-Modified",
    "Cache-Control", "X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy", "Cross-Origin-Opener-Policy",
]  # fmt: skip
CLIENT_TIMEOUT = 300
WS_TIMEOUT = 20


@dataclass(frozen=True)
class Deployment:
    backend: Backend
    servers: list[LiveServer]
    nginx: Nginx


@pytest.fixture(scope="module")
def nginx_installed():
    if nginx_binary() is None:
        reason = "nginx is not installed (apt-get install nginx; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: under CI the nginx tests must run", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def deployment(nginx_installed, tmp_path_factory):
    with live_backend(tmp_path_factory, "nginx") as backend, contextlib.ExitStack() as cleanup:
        first = LiveServer(
            tmp_path_factory.mktemp("nginx-server-a"),
            database_url=backend.database_url,
            redis_url=backend.redis_url,
            SECURE_PROXY_SSL_HEADER="1",
            DIRECTDRIVEX_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES),
            DIRECTDRIVEX_ACCEL_REDIRECT=ACCEL_REDIRECT,
            # The folder: nginx's local location aliases it (the s3 location has s3_deployment, below).
            DIRECTDRIVEX_STORAGE_BACKEND="local",
        )
        servers = [first, first.sibling(tmp_path_factory.mktemp("nginx-server-b"))]
        for server in servers:
            cleanup.callback(server.stop)
            server.start()
        static_root = tmp_path_factory.mktemp("nginx-static")
        (static_root / "hello.txt").write_bytes(b"static bytes\n")
        nginx = Nginx(
            tmp_path_factory.mktemp("nginx"),
            servers,
            static_root=static_root,
            accel_redirect=ACCEL_REDIRECT,
            max_request_bytes=MAX_REQUEST_BYTES,
        )
        cleanup.callback(nginx.stop)
        nginx.start()
        yield Deployment(backend, servers, nginx)


@pytest.fixture(scope="module")
def streaming_nginx(deployment, tmp_path_factory) -> Nginx:
    """A second nginx, in front of a process of the same deployment without DIRECTDRIVEX_ACCEL_REDIRECT:
    that server streams downloads itself, through nginx."""
    with contextlib.ExitStack() as cleanup:
        server = deployment.servers[0].sibling(
            tmp_path_factory.mktemp("nginx-server-c"), DIRECTDRIVEX_ACCEL_REDIRECT=""
        )
        cleanup.callback(server.stop)
        server.start()
        nginx = Nginx(
            tmp_path_factory.mktemp("nginx-streaming"),
            [server],
            static_root=deployment.nginx.values["static_root"],
            # Not the server's prefix: were it still answering with X-Accel-Redirect, nothing would serve it.
            accel_redirect="/_no_accel_redirect_here/",
            max_request_bytes=MAX_REQUEST_BYTES,
        )
        cleanup.callback(nginx.stop)
        nginx.start()
        yield nginx


@dataclass(frozen=True)
class Uploaded:
    client: subprocess.CompletedProcess
    source: Path
    sha256: str


@pytest.fixture(scope="module")
def uploaded(deployment, tmp_path_factory) -> Uploaded:
    """A random file uploaded through nginx by the reference client (a subprocess, as a user runs it)."""
    source = tmp_path_factory.mktemp("nginx-upload") / "through-nginx.bin"
    sha256 = write_random(source, UPLOAD_SIZE)
    client = subprocess.run(
        [sys.executable, "-m", "ddxclient", "upload", str(source), "--server", deployment.nginx.url,
         "--token", deployment.backend.alice_token, "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=CLIENT_TIMEOUT,
    )  # fmt: skip
    return Uploaded(client, source, sha256)


@pytest.fixture(scope="module")
def completed(deployment, uploaded) -> dict:
    """The finished upload's row as the API lists it."""
    assert uploaded.client.returncode == 0, f"{uploaded.client.stderr}\n{deployment.nginx.error_log()}"
    listed = http_call(deployment.nginx, "GET", "/api/uploads/", token=deployment.backend.alice_token).json()
    (upload,) = [upload for upload in listed if upload["filename"] == uploaded.source.name]
    return upload


def create_upload(deployment: Deployment, filename: str, size: int = 10) -> dict:
    body = json.dumps({"filename": filename, "size": size}).encode()
    answer = http_call(deployment.nginx, "POST", "/api/uploads/", body=body, token=deployment.backend.alice_token)
    assert answer.status == 201, answer.body
    return answer.json()


def proxied(deployment: Deployment, method: str, uri_prefix: str, timeout: float = 10) -> list[list[str]]:
    """nginx's access log lines for these requests: [method, uri, status, upstream address].

    nginx logs a request after its answer has gone out, so the line may lag the answer a little.
    """
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in deployment.nginx.access_log() if line[0] == method and line[1].startswith(uri_prefix)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.01)


def established_to(ports: set[int]) -> int:
    """Open TCP connections (this host, IPv4) to any of these ports, from /proc/net/tcp."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _slot, _local, remote, state, *_rest = line.split()
        count += state == "01" and int(remote.rsplit(":", 1)[1], 16) in ports  # 01: ESTABLISHED
    return count


def wait_for(condition, what: str, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


async def handshake(deployment: Deployment, path: str, origin: str | None, **headers: str) -> int | dict:
    """Through nginx: the first message of an admitted WebSocket, or the handshake's HTTP refusal status."""
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{deployment.nginx.port}{path}",
            origin=origin,
            additional_headers=headers,
            open_timeout=WS_TIMEOUT,
            compression=None,
        ) as ws:
            return json.loads(await ws.recv())
    except websockets.InvalidStatus as refused:
        return refused.response.status_code


# --- the configuration -------------------------------------------------------------------


def test_the_nginx_configuration_in_the_deployment_docs_is_the_tested_template():
    docs = (ROOT / "docs" / "deployment.md").read_text()
    blocks = re.findall(r"^```nginx\n(.*?)^```$", docs, re.MULTILINE | re.DOTALL)
    assert TEMPLATE.read_text() in blocks


def test_rendering_fills_every_placeholder_and_refuses_a_missing_or_unknown_value():
    template = "upstream u {\n    {{ servers }}\n}\nlisten {{ port }};\n"

    rendered = render(template, {"servers": ["server a;", "server b;"], "port": "80"})

    assert rendered == "upstream u {\n    server a;\n    server b;\n}\nlisten 80;\n"
    with pytest.raises(KeyError, match="port"):
        render(template, {"servers": []})
    with pytest.raises(KeyError, match="other"):
        render(template, {"servers": [], "port": "80", "other": "x"})


# --- through nginx -----------------------------------------------------------------------


def test_a_64_mib_upload_through_nginx_with_the_reference_client_completes_with_the_right_sha256(
    deployment, uploaded, completed
):
    assert uploaded.client.returncode == 0, f"{uploaded.client.stdout}\n{uploaded.client.stderr}"
    assert (completed["status"], completed["offset"], completed["sha256"]) == ("complete", UPLOAD_SIZE, uploaded.sha256)
    stored = [
        path for path in (deployment.servers[0].storage / "files").iterdir() if path.stat().st_size == UPLOAD_SIZE
    ]
    assert [file_sha256(path) for path in stored] == [uploaded.sha256]
    # The bytes went over a WebSocket that nginx upgraded (101) and proxied to a server.
    upgrades = proxied(deployment, "GET", f"/ws/uploads/{completed['id']}/")
    assert upgrades and all(status == "101" and upstream != "-" for _m, _u, status, upstream in upgrades)
    # The stored file is only reachable through the application: nginx's internal location refuses clients.
    assert http_call(deployment.nginx, "GET", f"{ACCEL_REDIRECT}{stored[0].name}").status == 404


def test_api_calls_through_nginx_get_the_servers_json_answers_and_refusals(deployment):
    created = create_upload(deployment, "api-through-nginx.bin")
    assert (created["status"], created["offset"], created["size"]) == ("uploading", 0, 10)

    detail = http_call(deployment.nginx, "GET", f"/api/uploads/{created['id']}/", token=deployment.backend.alice_token)
    assert detail.status == 200 and detail.content_type == "application/json"
    assert detail.json()["id"] == created["id"]
    missing = http_call(deployment.nginx, "GET", "/api/nothing/", token=deployment.backend.alice_token)
    assert (missing.status, missing.json()["code"]) == (404, "not_found")
    # The server's own refusals pass unchanged: nginx's error pages are for its own errors only.
    huge = json.dumps({"filename": "huge.bin", "size": 2**60}).encode()
    too_big = http_call(deployment.nginx, "POST", "/api/uploads/?huge", body=huge, token=deployment.backend.alice_token)
    assert (too_big.status, too_big.json()["code"]) == (413, "file_too_large")
    # These answers came from a server, not from nginx.
    for method, uri in [
        ("GET", f"/api/uploads/{created['id']}/"),
        ("GET", "/api/nothing/"),
        ("POST", "/api/uploads/?huge"),
    ]:
        assert [upstream != "-" for *_rest, upstream in proxied(deployment, method, uri)] == [True]


def test_a_body_over_client_max_body_size_is_refused_by_nginx_with_the_apis_413(deployment):
    body = json.dumps({"filename": "x" * MAX_REQUEST_BYTES, "size": 10}).encode()

    answer = http_call(
        deployment.nginx, "POST", "/api/uploads/?too-large", body=body, token=deployment.backend.alice_token
    )

    assert answer.status == 413 and answer.content_type == "application/json"
    assert answer.json()["code"] == "request_too_large"
    # nginx refused it itself: no server saw the request.
    assert [line[2:] for line in proxied(deployment, "POST", "/api/uploads/?too-large")] == [["413", "-"]]


def test_a_request_body_streams_through_nginx_to_a_server_before_it_has_all_arrived(deployment):
    body = json.dumps({"filename": "streamed.bin", "size": 10}).encode()
    head = (
        f"POST /api/uploads/ HTTP/1.1\r\nHost: 127.0.0.1:{deployment.nginx.port}\r\n"
        f"Authorization: Token {deployment.backend.alice_token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    upstream_ports = {server.port for server in deployment.servers}
    wait_for(lambda: not established_to(upstream_ports), "earlier connections to the servers to end")
    with socket.create_connection(("127.0.0.1", deployment.nginx.port), timeout=30) as client:
        client.sendall(head + body[:10])
        # proxy_request_buffering off: nginx connects to a server with the body still on its way
        # (buffering, it would wait for the whole body first, spooling a large one to disk).
        wait_for(lambda: established_to(upstream_ports), "nginx to open a connection to a server")
        client.sendall(body[10:])
        response = http.client.HTTPResponse(client)
        response.begin()
        assert response.status == 201, response.read()
        assert json.loads(response.read())["filename"] == "streamed.bin"


def test_static_files_are_served_by_nginx(deployment):
    answer = http_call(deployment.nginx, "GET", "/static/hello.txt")

    assert (answer.status, answer.body) == (200, b"static bytes\n")
    assert [line[2:] for line in proxied(deployment, "GET", "/static/hello.txt")] == [["200", "-"]]


async def test_the_websocket_origin_check_sees_nginxs_host_and_scheme(deployment):
    path = create_upload(deployment, "origin-through-nginx.bin")["ws_url"]
    public = deployment.nginx.url  # http://127.0.0.1:<nginx port>, what a browser on the page sends

    ready = await handshake(deployment, path, public)
    assert isinstance(ready, dict) and ready["type"] == "ready", ready
    # Another port is another origin: the server's own address is not the public one.
    assert await handshake(deployment, path, deployment.servers[0].url) == 403
    assert await handshake(deployment, path, "https://evil.example") == 403
    # nginx overwrites a client's X-Forwarded-Proto with its own scheme (http here), so a client
    # cannot make the server believe it came over TLS.
    assert (
        await handshake(
            deployment, path, f"https://127.0.0.1:{deployment.nginx.port}", **{"X-Forwarded-Proto": "https"}
        )
        == 403
    )


# --- downloads: the server checks, nginx sends the bytes (X-Accel-Redirect) -----------------


def download(deployment: Deployment, upload: dict, query: str = "", **headers: str):
    uri = f"/api/uploads/{upload['id']}/content{query}"
    return http_call(deployment.nginx, "GET", uri, token=deployment.backend.alice_token, headers=headers)


def test_a_download_through_nginx_is_the_whole_file_sent_by_nginx_with_the_servers_headers(
    deployment, uploaded, completed
):
    answer = download(deployment, completed, "?whole")

    assert answer.status == 200
    assert hashlib.sha256(answer.body).hexdigest() == uploaded.sha256
    assert answer.headers["Content-Length"] == str(UPLOAD_SIZE)
    # The server's headers survive the redirect: its strong ETag, not nginx's mtime-size one, and
    # the rest as the server itself answers a HEAD (which nginx passes through unchanged).
    assert answer.headers["ETag"] == f'"{uploaded.sha256}"'
    head = http_call(
        deployment.nginx, "HEAD", f"/api/uploads/{completed['id']}/content", token=deployment.backend.alice_token
    )
    assert head.status == 200
    for name in SERVER_DOWNLOAD_HEADERS:
        assert (name, answer.headers[name]) == (name, head.headers[name])
    # nginx acted on the redirect (a client never sees it) after a server answered the request.
    assert "X-Accel-Redirect" not in answer.headers
    ((_method, _uri, status, upstream),) = proxied(deployment, "GET", f"/api/uploads/{completed['id']}/content?whole")
    assert status == "200" and upstream != "-"


def test_a_range_through_nginx_is_a_206_with_the_files_bytes(deployment, uploaded, completed):
    first = UPLOAD_SIZE - 3 * MiB - 7
    last = first + MiB + 10
    expected = uploaded.source.read_bytes()[first : last + 1]

    answer = download(deployment, completed, Range=f"bytes={first}-{last}")

    assert answer.status == 206
    assert answer.headers["Content-Range"] == f"bytes {first}-{last}/{UPLOAD_SIZE}"
    assert answer.headers["Content-Length"] == str(MiB + 11)
    assert answer.body == expected
    assert answer.headers["ETag"] == f'"{uploaded.sha256}"'

    suffix = download(deployment, completed, Range="bytes=-100")
    assert (suffix.status, suffix.body) == (206, uploaded.source.read_bytes()[-100:])


def test_if_range_through_nginx_is_judged_by_the_servers_validators(deployment, uploaded, completed):
    matching = download(deployment, completed, Range="bytes=0-0", **{"If-Range": f'"{uploaded.sha256}"'})
    assert (matching.status, matching.body) == (206, uploaded.source.read_bytes()[:1])
    last_modified = matching.headers["Last-Modified"]
    by_date = download(deployment, completed, Range="bytes=1-2", **{"If-Range": last_modified})
    assert (by_date.status, by_date.body) == (206, uploaded.source.read_bytes()[1:3])

    stale = download(deployment, completed, Range="bytes=0-0", **{"If-Range": '"0123abcd"'})
    assert stale.status == 200
    assert hashlib.sha256(stale.body).hexdigest() == uploaded.sha256


def test_ranges_through_nginx_are_refused_or_ignored_as_the_server_would(deployment, uploaded, completed):
    past_the_end = download(deployment, completed, Range=f"bytes={UPLOAD_SIZE}-")
    assert past_the_end.status == 416
    assert past_the_end.headers["Content-Range"] == f"bytes */{UPLOAD_SIZE}"
    assert past_the_end.content_type == "application/json"
    assert past_the_end.json()["code"] == "range_not_satisfiable"

    several = download(deployment, completed, Range="bytes=0-0,5-9")
    assert several.status == 200
    assert hashlib.sha256(several.body).hexdigest() == uploaded.sha256


def test_if_none_match_through_nginx_is_a_304_from_the_server(deployment, uploaded, completed):
    answer = download(deployment, completed, **{"If-None-Match": f'"{uploaded.sha256}"'})

    assert (answer.status, answer.body) == (304, b"")
    assert answer.headers["ETag"] == f'"{uploaded.sha256}"'


def test_a_download_the_server_streams_itself_comes_through_nginx_byte_identical(
    deployment, streaming_nginx, uploaded, completed
):
    uri = f"/api/uploads/{completed['id']}/content"
    token = deployment.backend.alice_token

    whole = http_call(streaming_nginx, "GET", uri, token=token)
    assert whole.status == 200
    assert hashlib.sha256(whole.body).hexdigest() == uploaded.sha256
    assert whole.headers["ETag"] == f'"{uploaded.sha256}"'

    part = http_call(streaming_nginx, "GET", uri, token=token, headers={"Range": "bytes=1000-1999"})
    assert (part.status, part.headers["Content-Range"]) == (206, f"bytes 1000-1999/{UPLOAD_SIZE}")
    assert part.body == uploaded.source.read_bytes()[1000:2000]


# --- share links through nginx ---------------------------------------------------------------------


def share_through(nginx: Nginx, token: str, upload_id: str, **body) -> tuple[str, int]:
    """A new share link of the upload, made through ``nginx``: its path (/s/<token>) and id."""
    answer = http_call(nginx, "POST", f"/api/uploads/{upload_id}/shares/", body=json.dumps(body).encode(), token=token)
    assert answer.status == 201, answer.body
    return "/s/" + answer.json()["url"].rsplit("/s/", 1)[1], answer.json()["id"]


def test_a_share_link_through_nginx_is_sent_by_nginx_and_its_token_is_in_no_log(deployment, uploaded, completed):
    token = deployment.backend.alice_token
    path, link_id = share_through(deployment.nginx, token, completed["id"], max_downloads=5)

    page = http_call(deployment.nginx, "GET", path)
    assert page.status == 200 and uploaded.sha256.encode() in page.body
    whole = http_call(deployment.nginx, "GET", path + "/download")
    assert whole.status == 200 and hashlib.sha256(whole.body).hexdigest() == uploaded.sha256
    assert whole.headers["Referrer-Policy"] == "no-referrer"
    assert whole.headers["ETag"] == f'"{uploaded.sha256}"' and "X-Accel-Redirect" not in whole.headers
    first = UPLOAD_SIZE - MiB
    tail = http_call(deployment.nginx, "GET", path + "/download", headers={"Range": f"bytes={first}-"})
    assert tail.status == 206 and tail.body == uploaded.source.read_bytes()[first:]

    # nginx sent both bodies; the server counted them as it handed them over: the whole file and
    # the range that reached the last byte, two downloads.
    # A range past the end is nginx's 416, and counts nothing.
    past = http_call(deployment.nginx, "GET", path + "/download", headers={"Range": f"bytes={UPLOAD_SIZE}-"})
    assert past.status == 416
    listed = http_call(deployment.nginx, "GET", f"/api/uploads/{completed['id']}/shares/", token=token).json()
    (link,) = [link for link in listed if link["id"] == link_id]
    assert (link["downloads"], link["bytes_sent"]) == (2, UPLOAD_SIZE + MiB)

    served = [line for line in deployment.nginx.access_log() if line[1].startswith("/s/")]
    assert {line[1] for line in served} == {"/s/[token]", "/s/[token]/download"}
    secret = path.removeprefix("/s/")
    assert secret not in deployment.nginx.access_log_path.read_text()
    for server in deployment.servers:
        assert secret not in server.log_path.read_text()


# --- downloads on the s3 backend: nginx proxies a short-lived presigned GET --------------------------

S3_FILE_SIZE = 24 * MiB + 5


class RecordingProxy(TcpProxy):
    """The s3 deployment's way to the store: it keeps every byte sent to the store, so tests can read the requests.

    The servers and nginx both use its address as the store's endpoint, so the
    host the URLs are signed for is the host nginx sends.
    """

    def __init__(self, host: str, port: int):
        self.sent = bytearray()
        super().__init__(host, port)

    def _take(self, data: bytes, *, outbound: bool) -> bytes:
        piece = super()._take(data, outbound=outbound)
        if outbound:
            self.sent += piece
        return piece

    def presigned_gets(self) -> list[dict[str, str]]:
        """The presigned GETs the store received, each as its request line and headers (lowercase names)."""
        requests = []
        for head in bytes(self.sent).split(b"\r\n\r\n"):
            line, *fields = head.decode("latin-1").split("\r\n")
            if line.partition("GET ")[2].split(" ")[0].find("X-Amz-Signature=") > 0:
                requests.append({"": line, **{k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}})
        return requests


@dataclass(frozen=True)
class S3Deployment:
    backend: Backend
    server: LiveServer
    nginx: Nginx
    store: RecordingProxy
    upload_id: str
    data: bytes


@pytest.fixture(scope="module")
def s3_deployment(nginx_installed, s3_server, tmp_path_factory) -> S3Deployment:
    """A server on the s3 backend (its own prefix on the session's SeaweedFS) behind nginx, with a finished file."""
    endpoint, bucket = s3_server
    with live_backend(tmp_path_factory, "nginx-s3") as backend, contextlib.ExitStack() as cleanup:
        store = cleanup.enter_context(RecordingProxy(*urlsplit(endpoint).netloc.split(":")))
        store_url = store.via(endpoint)
        server = LiveServer(
            tmp_path_factory.mktemp("nginx-s3-server"),
            database_url=backend.database_url,
            redis_url=backend.redis_url,
            SECURE_PROXY_SSL_HEADER="1",
            DIRECTDRIVEX_ACCEL_REDIRECT=ACCEL_REDIRECT,
            DIRECTDRIVEX_STORAGE_BACKEND="s3",
            DIRECTDRIVEX_S3_ENDPOINT_URL=store_url,
            DIRECTDRIVEX_S3_BUCKET=bucket,
            DIRECTDRIVEX_S3_PREFIX=f"t/{uuid.uuid4().hex}/",
            DIRECTDRIVEX_S3_REGION=seaweedfs.REGION,
            DIRECTDRIVEX_SPOOL_DIR=str(tmp_path_factory.mktemp("nginx-s3-spool")),
            AWS_ACCESS_KEY_ID=seaweedfs.ACCESS_KEY_ID,
            AWS_SECRET_ACCESS_KEY=seaweedfs.SECRET_ACCESS_KEY,
        )
        cleanup.callback(server.stop)
        server.start()
        nginx = Nginx(
            tmp_path_factory.mktemp("nginx-s3"),
            [server],
            static_root=tmp_path_factory.mktemp("nginx-s3-static"),
            accel_redirect=ACCEL_REDIRECT,
            s3_endpoint=store_url,
        )
        cleanup.callback(nginx.stop)
        nginx.start()
        upload_id, _sha256 = finished_upload(server, S3_FILE_SIZE, "on-s3.bin")
        # The bytes tests/test_downloads_live.py's finished_upload writes: a repeated random block.
        block = random.Random(S3_FILE_SIZE).randbytes(4 * MiB)
        data = (block * (S3_FILE_SIZE // len(block) + 1))[:S3_FILE_SIZE]
        assert hashlib.sha256(data).hexdigest() == _sha256
        yield S3Deployment(backend, server, nginx, store, upload_id, data)


def s3_download(s3: S3Deployment, method: str = "GET", **headers: str):
    uri = f"/api/uploads/{s3.upload_id}/content"
    return http_call(s3.nginx, method, uri, token=s3.backend.alice_token, headers=headers)


def test_on_s3_a_download_through_nginx_is_the_whole_object_with_the_servers_headers(s3_deployment):
    s3 = s3_deployment
    sha256 = hashlib.sha256(s3.data).hexdigest()

    answer = s3_download(s3)
    head = s3_download(s3, "HEAD")

    assert answer.status == 200
    assert hashlib.sha256(answer.body).hexdigest() == sha256
    assert answer.headers["Content-Length"] == str(S3_FILE_SIZE)
    assert answer.headers["ETag"] == f'"{sha256}"'
    for name in SERVER_DOWNLOAD_HEADERS:
        assert (name, answer.headers.get_all(name)) == (name, head.headers.get_all(name))
    # Nothing of the store's own shows: not its ETag (an MD5), not its request ids or owner.
    assert not [name for name in answer.headers if name.lower().startswith(("x-amz", "seaweed"))]
    assert "X-Accel-Redirect" not in answer.headers


def test_on_s3_ranges_and_if_range_through_nginx_are_the_servers_decisions(s3_deployment):
    s3 = s3_deployment
    sha256 = hashlib.sha256(s3.data).hexdigest()
    first, last = S3_FILE_SIZE - 3 * MiB - 7, S3_FILE_SIZE - 2 * MiB + 3

    ranged = s3_download(s3, Range=f"bytes={first}-{last}", **{"If-Range": f'"{sha256}"'})
    suffix = s3_download(s3, Range="bytes=-100")
    by_date = s3_download(s3, Range="bytes=1-2", **{"If-Range": ranged.headers["Last-Modified"]})
    stale = s3_download(s3, Range="bytes=0-0", **{"If-Range": '"0123abcd"'})
    several = s3_download(s3, Range="bytes=0-0,5-9")
    past_the_end = s3_download(s3, Range=f"bytes={S3_FILE_SIZE}-")

    assert ranged.status == 206
    assert ranged.headers["Content-Range"] == f"bytes {first}-{last}/{S3_FILE_SIZE}"
    assert ranged.headers["Content-Length"] == str(last - first + 1)
    assert ranged.body == s3.data[first : last + 1]
    assert ranged.headers["ETag"] == f'"{sha256}"'
    assert (suffix.status, suffix.body) == (206, s3.data[-100:])
    assert (by_date.status, by_date.body) == (206, s3.data[1:3])
    assert stale.status == 200 and hashlib.sha256(stale.body).hexdigest() == sha256
    assert several.status == 200 and len(several.body) == S3_FILE_SIZE
    assert (past_the_end.status, past_the_end.json()["code"]) == (416, "range_not_satisfiable")
    assert past_the_end.headers["Content-Range"] == f"bytes */{S3_FILE_SIZE}"


def test_on_s3_the_store_sees_a_short_lived_signed_get_and_nothing_of_the_clients_request(s3_deployment):
    s3 = s3_deployment
    s3.store.sent.clear()

    answer = s3_download(s3, Range="bytes=5-9", Cookie="sessionid=not-for-the-store")
    direct = http_call(s3.server, "GET", f"/api/uploads/{s3.upload_id}/content", token=s3.backend.alice_token).headers[
        "X-Accel-Redirect"
    ]

    assert (answer.status, answer.body) == (206, s3.data[5:10])
    (request,) = s3.store.presigned_gets()
    assert request["range"] == "bytes=5-9"
    assert request["host"] == urlsplit(s3.server.env["DIRECTDRIVEX_S3_ENDPOINT_URL"]).netloc
    # The client sent a token and a cookie: neither reaches the store (nor does anything else of its request).
    assert sorted(request) == ["", "connection", "host", "range"]
    query = parse_qs(urlsplit(direct).query)
    assert query["X-Amz-Expires"] == ["300"]
    signed_at = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - signed_at).total_seconds()) < 60
    assert query["X-Amz-SignedHeaders"] == ["host"]
    # The bucket stays private: the same object without the signature is refused.
    object_path = "/" + urlsplit(direct).path.split("/", 5)[5]
    unsigned = http.client.HTTPConnection(*s3.store.address, timeout=10)
    try:
        unsigned.request("GET", object_path)
        assert unsigned.getresponse().status == 403
    finally:
        unsigned.close()
    # internal: a client asking for the location itself gets nginx's 404, and the store sees nothing.
    s3.store.sent.clear()
    assert http_call(s3.nginx, "GET", direct).status == 404
    assert s3.store.presigned_gets() == []


def test_on_s3_an_object_deleted_after_the_servers_check_is_the_apis_404_not_the_stores_xml(s3_deployment):
    s3 = s3_deployment
    upload_id, _sha256 = finished_upload(s3.server, 10, "deleted-on-s3.bin")
    redirect = http_call(s3.server, "GET", f"/api/uploads/{upload_id}/content", token=s3.backend.alice_token).headers[
        "X-Accel-Redirect"
    ]
    client = seaweedfs.s3_client(s3.server.env["DIRECTDRIVEX_S3_ENDPOINT_URL"])
    # Gone behind the server's back (its row still says complete): the store answers 404 to nginx.
    client.delete_object(Bucket=s3.server.env["DIRECTDRIVEX_S3_BUCKET"], Key=urlsplit(redirect).path.split("/", 6)[6])
    answer = http_call(s3.nginx, "GET", f"/api/uploads/{upload_id}/content", token=s3.backend.alice_token)

    assert (answer.status, answer.content_type) == (404, "application/json")
    assert answer.json()["code"] == "not_found"


def test_on_s3_a_share_link_through_nginx_is_the_object_from_the_store(s3_deployment):
    s3 = s3_deployment
    path, _link_id = share_through(s3.nginx, s3.backend.alice_token, s3.upload_id)
    whole = http_call(s3.nginx, "GET", path + "/download")
    assert whole.status == 200 and whole.body == s3.data
    part = http_call(s3.nginx, "GET", path + "/download", headers={"Range": "bytes=100-199"})
    assert (part.status, part.body) == (206, s3.data[100:200])
