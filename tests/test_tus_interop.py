"""Real tus clients against /api/tus/: tus-js-client (Node) and tuspy, interrupted mid-upload, resumed, verified.

The client tests upload a file of random bytes through a TCP fault proxy
(tests/support/tcp_proxy.py) that stops forwarding after STALL_AT bytes, so
the interruption always lands inside a PATCH body, at a known place. Then
either the connection is cut or the server process is killed (kill -9) and
restarted on the same port (with a short slot lease, which must run out
before another writer gets in); the client resumes from the offset the
server answers (HEAD, > 0) and the finished upload's sha256, as the API
reports it and as its content downloads, is the file's. One of them goes
through nginx with deploy/nginx.conf.template, which must stream the body.

The last section runs two server processes behind nginx (the deploy
template, least_conn: no stickiness) and needs PostgreSQL and Redis (it is
skipped on SQLite and the in-memory channel layer): a PATCH held on one
process is taken over by a request on the other, a HEAD answers an offset
that no longer moves, and the per-user slot limit holds across processes
and transports.

tus-js-client comes from tests/interop/package-lock.json, installed with
``npm ci`` into a cache folder outside the repository, keyed by the lock
file. Without node, npm or nginx the tests that need them are skipped, except
under CI=true, where they fail.
"""

import base64
import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from tusclient import client as tus_client
from tusclient.exceptions import TusCommunicationError
from websockets.sync.client import connect as websocket_connect

from tests.support.files import write_random
from tests.support.live_backend import Answer, Backend, http_call, live_backend
from tests.support.live_server import ROOT, LiveServer
from tests.support.nginx import Nginx, nginx_binary
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
FILE_SIZE = 32 * MiB
# Where the proxy stops forwarding (client-to-server bytes, request headers included): inside the
# third PATCH of 4 MiB, the second of 8 MiB, and a third of the way into a whole-file PATCH.
STALL_AT = 10 * MiB
# What the requests before the stall spend on headers, at most: what arrived of the body is >= STALL_AT - this.
HEADER_BYTES = 8 * 1024
LEASE_SECONDS = 5
# budgets.TAKEOVER_SECONDS: how long a request waits for an earlier holder to let go before 423.
TAKEOVER_SECONDS = 5
TUS_HEADERS = {"Tus-Resumable": "1.0.0"}
INTEROP = ROOT / "tests" / "interop"
NPM_FILES = ("package.json", "package-lock.json")
CLIENT_TIMEOUT = 90
# Retries that outlast a restart and a dead holder's lease (ms); tus-js-client starts over after progress.
RETRY_DELAYS = [250, 500, 1000, 1000, 2000, 2000, 2000, 3000, 3000, 3000, 5000]


# --- tools ---------------------------------------------------------------------------------


def missing(reason: str):
    """CI must run these tests: there a missing tool fails them, elsewhere it skips them."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the tus interop tests must run)", pytrace=False)
    pytest.skip(reason)


def interop_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "directdrivex-tests" / "interop"


def npm_install(cache: Path) -> Path:
    """tests/interop installed with ``npm ci`` into ``cache/<hash of the npm files>``; an installed one is reused.

    Installed into a folder of its own first, then renamed into place, under a
    lock: a run that is interrupted or races another leaves no half-installed tree.
    """
    key = hashlib.sha256(b"".join((INTEROP / name).read_bytes() for name in NPM_FILES)).hexdigest()[:16]
    installed = cache / key
    if (installed / "node_modules").is_dir():
        return installed
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (installed / "node_modules").is_dir():
            return installed
        staging = cache / f"{key}.installing-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name in NPM_FILES:
            shutil.copyfile(INTEROP / name, staging / name)
        done = subprocess.run(
            [shutil.which("npm"), "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=staging, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        if done.returncode:
            shutil.rmtree(staging, ignore_errors=True)
            pytest.fail(f"npm ci for tests/interop failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
        shutil.rmtree(installed, ignore_errors=True)
        staging.rename(installed)
    return installed


@pytest.fixture(scope="session")
def tus_js(tmp_path_factory) -> Path:
    """A folder with tus_upload.mjs next to a node_modules holding tus-js-client (Node resolves imports from there)."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            missing(f"{tool} is not installed (Node 20 and npm run tus-js-client)")
    installed = npm_install(interop_cache())
    folder = tmp_path_factory.mktemp("tus-js")
    shutil.copyfile(INTEROP / "tus_upload.mjs", folder / "tus_upload.mjs")
    (folder / "node_modules").symlink_to(installed / "node_modules", target_is_directory=True)
    return folder


class NodeUpload:
    """tests/interop/tus_upload.mjs running: its JSON lines as they come (see the script), then how it ended."""

    def __init__(
        self, folder: Path, server: LiveServer, endpoint: str, token: str, source: Path, *, chunk_size=None, sha256=None
    ):
        self.server = server  # whose log a failure shows
        command = [
            shutil.which("node"), str(folder / "tus_upload.mjs"), "--endpoint", endpoint, "--token", token,
            "--retry-delays", ",".join(map(str, RETRY_DELAYS)),
        ]  # fmt: skip
        if chunk_size:
            command += ["--chunk-size", str(chunk_size)]
        if sha256:
            command += ["--sha256", sha256]
        # stderr to a file: a pipe nobody reads while the client runs could fill up and block it.
        self.errors = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(
            [*command, str(source)], cwd=folder, stdout=subprocess.PIPE, stderr=self.errors, text=True
        )
        self.events: list[dict] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "output", "line": line}
            with self.changed:
                self.events.append(event)
                self.changed.notify_all()

    def first(self, name: str, timeout: float = 30) -> dict:
        with self.changed:
            found = self.changed.wait_for(
                lambda: any(e["event"] == name for e in self.events) or self.process.poll() is not None, timeout
            )
            matching = [e for e in self.events if e["event"] == name]
        if not (found and matching):
            pytest.fail(f"tus-js-client never said {name!r}\n{self.diagnosis()}")
        return matching[0]

    def finish(self, timeout: float = CLIENT_TIMEOUT) -> dict:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"tus-js-client did not finish within {timeout}s\n{self.diagnosis()}")
        self.reader.join(10)
        result = self.events[-1] if self.events else {}
        if result.get("event") != "success":
            pytest.fail(f"tus-js-client did not succeed\n{self.diagnosis()}")
        return result

    def diagnosis(self) -> str:
        self.errors.seek(0)
        events = "\n".join(json.dumps(event) for event in self.events)
        return f"its output:\n{events}\n{self.errors.read()}\nserver log:\n{log_tail(self.server)}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process.stdout.close()
        self.errors.close()


# --- the server and what it says --------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    with live_backend(tmp_path_factory, "tusinterop") as backend:
        yield backend


@pytest.fixture(scope="module")
def server_process(backend, tmp_path_factory):
    server = LiveServer(
        tmp_path_factory.mktemp("tus-interop-server"),
        database_url=backend.database_url,
        redis_url=backend.redis_url,
        DIRECTDRIVEX_SLOT_LEASE_SECONDS=str(LEASE_SECONDS),
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(server_process) -> LiveServer:
    """The module's server, running (a test that killed it and failed before restarting leaves it dead)."""
    if server_process.process is None or server_process.process.poll() is not None:
        server_process.restart()
    return server_process


@pytest.fixture
def proxy(server):
    with TcpProxy("127.0.0.1", server.port) as proxy:
        yield proxy


@pytest.fixture
def source(tmp_path) -> tuple[Path, str]:
    path = tmp_path / "interop.bin"
    return path, write_random(path, FILE_SIZE)


def upload_id_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def upload_row(server, token: str, upload_id: str) -> dict:
    answer = http_call(server, "GET", f"/api/uploads/{upload_id}/", token=token)
    assert answer.status == 200, answer.body
    return answer.json()


def wait_until(condition, what: str, timeout: float = 15, interval: float = 0.05, explain=None):
    """``condition()``'s first true value; a failure after ``timeout`` says what was awaited (and ``explain()``)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}" + (f"\n{explain()}" if explain else ""))
        time.sleep(interval)
    return value


def log_tail(server: LiveServer, lines: int = 40) -> str:
    """The end of a server's log, for failure messages."""
    return "\n".join(server.log_path.read_text(errors="replace").splitlines()[-lines:])


def stalled_with_bytes_durable(proxy: TcpProxy, server, token: str, upload_id: str) -> int:
    """Once the proxy stopped at STALL_AT, the durable offset that holds every body byte that got through.

    The writer commits a slow stream within a second (docs/protocol.md), so
    every byte the proxy forwarded is durable soon: returns that offset.
    """

    def explain() -> str:
        row = upload_row(server, token, upload_id)
        return f"proxy {proxy.state} after {proxy.forwarded} bytes; upload {row}; server log:\n{log_tail(server)}"

    wait_until(lambda: proxy.state == "stalled", "the proxy to stall", explain=explain)
    return wait_until(
        lambda: (offset := upload_row(server, token, upload_id)["offset"]) >= STALL_AT - HEADER_BYTES and offset,
        f"the bytes before the stall (>= {STALL_AT - HEADER_BYTES}) to be durable",
        explain=explain,
    )


def content_sha256(server, token: str, upload_id: str) -> str:
    """The sha256 of GET /api/uploads/<id>/content, read in blocks."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("GET", f"/api/uploads/{upload_id}/content", headers={"Authorization": f"Token {token}"})
        response = connection.getresponse()
        assert response.status == 200, response.read()[:500]
        digest = hashlib.sha256()
        while block := response.read(MiB):
            digest.update(block)
        return digest.hexdigest()
    finally:
        connection.close()


def assert_complete(server, token: str, upload_id: str, sha256: str) -> None:
    row = upload_row(server, token, upload_id)
    assert (row["status"], row["offset"], row["sha256"]) == ("complete", FILE_SIZE, sha256)
    assert content_sha256(server, token, upload_id) == sha256


def kill_and_restart(server: LiveServer, proxy: TcpProxy) -> None:
    """kill -9 while the client's PATCH is held in the proxy; the client sees its connection reset; a new process."""
    server.kill()
    proxy.cut()
    proxy.restore()
    server.restart()


# --- tus-js-client in Node ------------------------------------------------------------------

CHUNKINGS = [pytest.param(None, id="one-patch"), pytest.param(4 * MiB, id="4MiB-chunks")]


def assert_resumed_from_the_servers_offset(result: dict, durable_before: int) -> None:
    """The client retried, asked the server where to go on (HEAD, > 0), and sent its next PATCH from there."""
    assert result["attempts"] >= 2 and result["retries"][0]["status"] == 0, result  # a network error, retried
    resumed_at = result["head_offsets"][0]
    # Every byte that was durable before the interruption is still there; nothing past the stall is.
    assert durable_before <= resumed_at <= STALL_AT, result
    assert resumed_at in result["patch_offsets"][1:], result


def cut_connection(_server: LiveServer, proxy: TcpProxy) -> None:
    proxy.cut()
    proxy.restore()


INTERRUPTIONS = [
    pytest.param(cut_connection, id="connection-cut"),
    pytest.param(kill_and_restart, id="server-killed-and-restarted"),
]


@pytest.mark.parametrize("interrupt", INTERRUPTIONS)
@pytest.mark.parametrize("chunk_size", CHUNKINGS)
def test_tus_js_client_resumes_after_an_interruption_mid_patch(
    tus_js, server, proxy, backend, source, chunk_size, interrupt
):
    """The connection cut by the proxy, or the server killed (kill -9) and restarted, mid-PATCH."""
    path, sha256 = source
    token = backend.alice_token
    proxy.stall_after(STALL_AT)
    with NodeUpload(
        tus_js, server, proxy.via(server.url) + "/api/tus/", token, path, chunk_size=chunk_size, sha256=sha256
    ) as client:
        upload_id = upload_id_of(client.first("url")["url"])
        durable_before = stalled_with_bytes_durable(proxy, server, token, upload_id)

        interrupt(server, proxy)
        result = client.finish()

    assert_resumed_from_the_servers_offset(result, durable_before)
    assert_complete(server, token, upload_id, sha256)


@pytest.fixture(scope="module")
def nginx_in_front(server_process, tmp_path_factory) -> Nginx:
    """nginx with the deploy template in front of the module's server."""
    if nginx_binary() is None:
        missing("nginx is not installed (apt-get install nginx)")
    nginx = Nginx(tmp_path_factory.mktemp("tus-nginx-one"), [server_process], static_root=tmp_path_factory.mktemp("s"))
    try:
        nginx.start()
        yield nginx
    finally:
        nginx.stop()


def test_tus_js_client_through_nginx_streams_its_one_patch_and_resumes_after_a_cut(
    tus_js, server, nginx_in_front, backend, source
):
    """The deploy template lets a whole-file PATCH through, streamed: the server has the bytes before the body ends."""
    path, sha256 = source
    token = backend.alice_token
    with TcpProxy("127.0.0.1", nginx_in_front.port) as proxy:
        proxy.stall_after(STALL_AT)
        with NodeUpload(
            tus_js, server, proxy.via(nginx_in_front.url) + "/api/tus/", token, path, sha256=sha256
        ) as client:
            upload_id = upload_id_of(client.first("url")["url"])
            durable_before = stalled_with_bytes_durable(proxy, server, token, upload_id)

            proxy.cut()
            proxy.restore()
            result = client.finish()

    assert_resumed_from_the_servers_offset(result, durable_before)
    assert_complete(nginx_in_front, token, upload_id, sha256)


# --- tuspy ------------------------------------------------------------------------------------

TUSPY_CHUNK = 8 * MiB


def tuspy_uploader(endpoint: str, token: str, path: Path, **options):
    client = tus_client.TusClient(endpoint, headers={"Authorization": f"Token {token}"})
    return client.uploader(file_path=str(path), chunk_size=TUSPY_CHUNK, **options)


def tuspy_resume(endpoint: str, token: str, path: Path, url: str, timeout: float) -> tuple:
    """A new Uploader at the stored URL, as a tuspy user resumes: its HEAD may find the upload locked (423)
    while a dead process's lease runs out; then it tries again. Returns the uploader and the statuses seen."""
    refusals = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            return tuspy_uploader(endpoint, token, path, url=url), refusals
        except TusCommunicationError as refused:
            refusals.append(refused.status_code)
            if refused.status_code not in (None, 423) or time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.mark.parametrize("interruption", ["cut", "kill"])
def test_tuspy_resumes_at_the_stored_url_from_the_servers_offset(server, proxy, backend, source, interruption):
    path, sha256 = source
    token = backend.alice_token
    endpoint = proxy.via(server.url) + "/api/tus/"
    first = tuspy_uploader(endpoint, token, path, metadata={"filename": path.name, "sha256": sha256})
    proxy.stall_after(STALL_AT)
    with ThreadPoolExecutor(1) as pool:
        uploading = pool.submit(first.upload)
        try:
            upload_id = upload_id_of(wait_until(lambda: first.url, "tuspy to create the upload"))
            durable_before = stalled_with_bytes_durable(proxy, server, token, upload_id)

            if interruption == "kill":
                kill_and_restart(server, proxy)
            else:
                proxy.cut()
                proxy.restore()
            # tuspy without retries (its default) stops at the broken PATCH: TusUploadFailed.
            with pytest.raises(TusCommunicationError):
                uploading.result(30)
        finally:
            if not uploading.done():
                proxy.cut()  # requests has no timeout: a failed test must not leave it waiting on a stalled proxy
    assert first.offset < FILE_SIZE

    resumed, refusals = tuspy_resume(endpoint, token, path, first.url, timeout=LEASE_SECONDS + 3 * TAKEOVER_SECONDS)
    assert durable_before <= resumed.offset <= STALL_AT
    assert set(refusals) <= {423}, refusals
    resumed.upload()

    assert resumed.offset == FILE_SIZE
    assert_complete(server, token, upload_id, sha256)


# --- two processes behind nginx ----------------------------------------------------------------

CLUSTER_USER_SLOTS = 2


@dataclass(frozen=True)
class Cluster:
    backend: Backend
    servers: list[LiveServer]
    nginx: Nginx
    carol_token: str


@pytest.fixture(scope="module")
def cluster(backend, tmp_path_factory):
    if not (backend.postgres and backend.redis_url):
        pytest.skip(
            "two server processes need PostgreSQL and a shared channel layer (Redis) to hand an upload over: "
            "set DATABASE_URL and REDIS_URL (CI's PostgreSQL stage runs these)"
        )
    if nginx_binary() is None:
        missing("nginx is not installed (apt-get install nginx)")
    with contextlib.ExitStack() as cleanup:
        first = LiveServer(
            tmp_path_factory.mktemp("tus-cluster-a"),
            database_url=backend.database_url,
            redis_url=backend.redis_url,
            SECURE_PROXY_SSL_HEADER="1",
            DIRECTDRIVEX_SLOT_LEASE_SECONDS=str(LEASE_SECONDS),
            DIRECTDRIVEX_USER_UPLOAD_SLOTS=str(CLUSTER_USER_SLOTS),
        )
        servers = [first, first.sibling(tmp_path_factory.mktemp("tus-cluster-b"))]
        for server in servers:
            cleanup.callback(server.stop)
            server.start()
        nginx = Nginx(tmp_path_factory.mktemp("tus-nginx"), servers, static_root=tmp_path_factory.mktemp("static"))
        cleanup.callback(nginx.stop)
        nginx.start()
        yield Cluster(backend, servers, nginx, carol_token=first.create_user("carol"))


def log_has(server: LiveServer, text: str) -> bool:
    return text in server.log_path.read_text(errors="replace")


def the_one_that_logged(servers: list[LiveServer], text: str) -> LiveServer:
    """The server process whose log says ``text`` (a writer admitted, a request answered)."""
    (found,) = wait_until(lambda: [server for server in servers if log_has(server, text)], f"a log line {text!r}")
    return found


def tus_create(target, token: str, filename: str, size: int) -> Answer:
    metadata = "filename " + base64.b64encode(filename.encode()).decode()
    return http_call(
        target, "POST", "/api/tus/", token=token,
        headers={**TUS_HEADERS, "Upload-Length": str(size), "Upload-Metadata": metadata},
    )  # fmt: skip


def tus_head(target, token: str, upload_id: str) -> Answer:
    return http_call(target, "HEAD", f"/api/tus/{upload_id}", token=token, headers=TUS_HEADERS)


def tus_patch(target, token: str, upload_id: str, offset: int, body: bytes) -> Answer:
    headers = {**TUS_HEADERS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)}
    return http_call(target, "PATCH", f"/api/tus/{upload_id}", body=body, token=token, headers=headers)


def api_create(target, token: str, filename: str, size: int) -> Answer:
    body = json.dumps({"filename": filename, "size": size}).encode()
    return http_call(target, "POST", "/api/uploads/", body=body, token=token)


class HeldPatch:
    """A tus PATCH written by hand through nginx: its headers and as much of the body as the test sends, when it
    sends it. The connection stays open in between, as a client's whose network went quiet mid-body."""

    def __init__(self, nginx: Nginx, token: str, upload_id: str, offset: int, length: int):
        self.sock = socket.create_connection(("127.0.0.1", nginx.port), timeout=30)
        head = (
            f"PATCH /api/tus/{upload_id} HTTP/1.1\r\nHost: 127.0.0.1:{nginx.port}\r\n"
            f"Authorization: Token {token}\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
        )
        self.sock.sendall(head.encode())

    def send(self, data: bytes) -> bool:
        """False once the other side no longer takes bytes."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.sock.close()


def created_through_nginx(cluster: Cluster, token: str, path: Path) -> tuple[Path, str, bytes, str]:
    """A file of FILE_SIZE random bytes at ``path`` and its tus upload, created through nginx."""
    sha256 = write_random(path, FILE_SIZE)
    created = tus_create(cluster.nginx, token, path.name, FILE_SIZE)
    assert created.status == 201, created.body
    return path, sha256, path.read_bytes(), upload_id_of(created.headers["Location"])


def tus_upload_rest(cluster: Cluster, token: str, path: Path, upload_id: str) -> int:
    """tuspy, resuming at the upload's URL through nginx: returns the offset its HEAD answered; uploads the rest."""
    uploader = tuspy_uploader(
        cluster.nginx.url + "/api/tus/", token, path, url=f"{cluster.nginx.url}/api/tus/{upload_id}"
    )
    resumed_at = uploader.offset
    uploader.upload()
    return resumed_at


@pytest.mark.parametrize("retry", ["HEAD", "PATCH"])
def test_a_patch_held_on_one_process_is_taken_over_by_a_retry_on_the_other_within_seconds(cluster, tmp_path, retry):
    """A tus client retries with a HEAD (tus-js-client, tuspy) or straight with a PATCH at the offset it knows."""
    token = cluster.backend.alice_token
    path, sha256, data, upload_id = created_through_nginx(cluster, token, tmp_path / "takeover.bin")
    # The client's network goes quiet 8 MiB into the body: the process that reads it still holds the upload.
    held = HeldPatch(cluster.nginx, token, upload_id, 0, FILE_SIZE)
    try:
        held.send(data[: 8 * MiB])
        holder = the_one_that_logged(cluster.servers, f"writer ready upload={upload_id}")
        wait_until(lambda: upload_row(cluster.nginx, token, upload_id)["offset"] == 8 * MiB, "the 8 MiB to be durable")

        # The client retries on a new connection; nginx (least_conn) sends it to the other process.
        started = time.monotonic()
        if retry == "HEAD":
            answer = tus_head(cluster.nginx, token, upload_id)
            assert (answer.status, answer.headers["Upload-Offset"]) == (200, str(8 * MiB)), answer.body
        else:
            answer = tus_patch(cluster.nginx, token, upload_id, 8 * MiB, data[8 * MiB :])
            assert (answer.status, answer.headers["Upload-Offset"]) == (204, str(FILE_SIZE)), answer.body
        took = time.monotonic() - started

        answered_by = the_one_that_logged(cluster.servers, f'"{retry} /api/tus/{upload_id}" {answer.status}')
        assert answered_by is not holder
        if retry == "HEAD":
            # The holder was asked through the channel layer and let go: no waiting out its budget (423) or lease.
            assert took < TAKEOVER_SECONDS, took
            assert tus_upload_rest(cluster, token, path, upload_id) == 8 * MiB
        else:
            assert took < TAKEOVER_SECONDS + 10, took  # the takeover, then 24 MiB through nginx
    finally:
        held.close()

    assert_complete(cluster.nginx, token, upload_id, sha256)


def test_a_head_on_one_process_while_the_other_still_reads_a_patch_answers_an_offset_that_stays(cluster, tmp_path):
    token = cluster.backend.alice_token
    path, sha256, data, upload_id = created_through_nginx(cluster, token, tmp_path / "stable-head.bin")
    held = HeldPatch(cluster.nginx, token, upload_id, 0, FILE_SIZE)
    sent = 4 * MiB
    held.send(data[:sent])
    holder = the_one_that_logged(cluster.servers, f"writer ready upload={upload_id}")
    # The client keeps sending, slowly, on the PATCH's connection: the holder is still reading.
    stop = threading.Event()

    def trickle():
        nonlocal sent
        while not stop.is_set() and sent < FILE_SIZE // 2 and held.send(data[sent : sent + 64 * 1024]):
            sent += 64 * 1024
            time.sleep(0.02)

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        time.sleep(0.5)
        first = tus_head(cluster.nginx, token, upload_id)
        assert first.status == 200, first.body
        offset = int(first.headers["Upload-Offset"])
        assert the_one_that_logged(cluster.servers, f'"HEAD /api/tus/{upload_id}" 200') is not holder
        assert 4 * MiB <= offset <= sent

        # More of the body keeps arriving at the first process for longer than a commit interval.
        time.sleep(2)
        again = [tus_head(server, token, upload_id) for server in cluster.servers]
        assert [(answer.status, answer.headers["Upload-Offset"]) for answer in again] == [(200, str(offset))] * 2
        assert upload_row(cluster.nginx, token, upload_id)["offset"] == offset
    finally:
        stop.set()
        sender.join(10)
        held.close()

    assert tus_upload_rest(cluster, token, path, upload_id) == offset
    assert_complete(cluster.nginx, token, upload_id, sha256)


def test_the_per_user_slot_limit_holds_across_processes_and_transports(cluster):
    token = cluster.carol_token
    a, b = cluster.servers
    targets = {"a": a, "b": b, "nginx": cluster.nginx}
    created = []

    def refused_everywhere(label: str):
        for name, target in targets.items():
            for transport, create in (("tus", tus_create), ("websocket", api_create)):
                answer = create(target, token, f"{label}-{transport}-{name}.bin", MiB)
                assert (answer.status, answer.json()["code"]) == (429, "user_slots_exhausted"), (name, transport)
                assert int(answer.headers["Retry-After"]) >= 1
                if transport == "tus":
                    assert answer.headers["Tus-Resumable"] == "1.0.0"

    try:
        # Four creations at once on both processes and both transports: two slots, two winners.
        racers = [(tus_create, a), (tus_create, b), (api_create, a), (api_create, b)]
        with ThreadPoolExecutor(len(racers)) as pool:
            answers = list(pool.map(lambda r: r[0](r[1], token, "race.bin", MiB), racers))
        assert sorted(answer.status for answer in answers) == [201, 201, 429, 429], [a.body for a in answers]
        for answer in answers:
            if answer.status == 201:
                created.append(
                    upload_id_of(answer.headers["Location"]) if "Location" in answer.headers else answer.json()["id"]
                )
            else:
                assert answer.json()["code"] == "user_slots_exhausted"
        for upload_id in created:
            delete = http_call(cluster.nginx, "DELETE", f"/api/uploads/{upload_id}/", token=token)
            assert delete.status == 204, delete.body
        created.clear()

        # A WebSocket upload writing on process a and a tus upload parked between PATCHes on process b.
        over_websocket = api_create(a, token, "websocket.bin", 4 * MiB).json()
        created.append(over_websocket["id"])
        over_tus = tus_create(b, token, "tus.bin", 4 * MiB)
        assert over_tus.status == 201, over_tus.body
        tus_id = upload_id_of(over_tus.headers["Location"])
        created.append(tus_id)
        patched = tus_patch(b, token, tus_id, 0, b"t" * MiB)
        assert (patched.status, patched.headers["Upload-Offset"]) == (204, str(MiB)), patched.body
        with websocket_connect(f"ws://127.0.0.1:{a.port}{over_websocket['ws_url']}", compression=None) as ws:
            ready = json.loads(ws.recv(10))
            assert ready["type"] == "ready", ready
            ws.send(b"w" * ready["chunk_size"])
            assert json.loads(ws.recv(10))["type"] == "ack"

            refused_everywhere("third")

            # The tus upload's last PATCH completes it and frees its slot: one more fits, and no more.
            rest = tus_patch(b, token, tus_id, MiB, b"t" * (3 * MiB))
            assert rest.status == 204, rest.body
            another = tus_create(cluster.nginx, token, "another.bin", MiB)
            assert another.status == 201, another.body
            created.append(upload_id_of(another.headers["Location"]))
            refused_everywhere("fourth")
    finally:
        for upload_id in created:
            http_call(cluster.nginx, "DELETE", f"/api/uploads/{upload_id}/", token=token)
