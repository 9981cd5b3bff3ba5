"""Real tus clients in Chromium against a real server: tus-js-client's browser build and Uppy's Tus plugin.

The clients are the npm packages pinned by tests/interop_browser/package-lock.json,
installed with ``npm ci`` into a cache outside the repository
(~/.cache/directdrivex-tests/interop-browser/<hash of package.json and the lock
file>, reused while those are unchanged) and loaded unmodified by
tests/interop_browser/tus_clients.html.

The page comes from an origin of the test's own (a tiny static HTTP server on
127.0.0.1, another port), and the server runs with DIRECTDRIVEX_CORS_ORIGINS
set to that origin. So the clients do what they do on a site that embeds them:
a token in ``Authorization: Token …``, a CORS preflight before every tus
request (answered by the tus consumer), and the answers' Location and
Upload-Offset read through Access-Control-Expose-Headers. Serving the page
from the server's own origin (``page.route``) would have left that whole path
untested; the same-origin path (session cookie and X-CSRFToken) is the upload
page's own, tested in test_uploader.py.

Each test uploads a random file with the client's defaults (one PATCH whose
body is the File itself), kills the server (kill -9) once some bytes of it are
durable, starts it again on the same port, and lets the client's own retries
finish the upload: a HEAD for the offset, then one PATCH from there. The upload
is slowed down in the browser (DevTools network throttling, which Chromium
applies to request bodies too) so that the kill lands mid-way; the throttle is
lifted after the kill. The server's slot lease is 5 s, so retries that cover
about 30 s outlast a restart and the lease the killed process left behind.
"""

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.browser.conftest import MAX_FILE_SIZE, _unavailable
from tests.support.files import write_random
from tests.support.live_backend import http_call
from tests.support.live_server import ROOT, LiveServer

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MiB = 1024 * 1024
INTEROP = ROOT / "tests" / "interop_browser"
PAGE = "tus_clients.html"
# What the page loads from node_modules (its <script> tags), and nothing else is served.
LIBRARIES = ("tus-js-client/dist/tus.min.js", "uppy/dist/uppy.min.js")

FILE_SIZE = 40 * MiB + 12345  # not a multiple of anything the server or the client counts in
LEASE_SECONDS = 5
# Bytes per second while the first PATCH runs: about 5 s for the file, so the kill lands mid-way.
THROTTLE = 8 * MiB
# Kill once this much is durable on the server (commits every 32 MiB or 1 s).
KILL_AFTER = 4 * MiB
# The clients' retry delays (ms): about 30 s in all, longer than a restart on a busy machine plus
# the killed process's lease (a HEAD before it runs out waits up to 5 s, then is answered 423).
RETRY_DELAYS = [0, 500, 1000, 1000, 1000, 2000, 2000, 2000, 3000, 3000, 3000, 3000, 5000, 5000]
UPLOAD_TIMEOUT = 60


# --- the clients, from npm ----------------------------------------------------------------


def npm_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "directdrivex-tests" / "interop-browser"


def npm_install() -> Path:
    """tests/interop_browser installed with ``npm ci`` into ``<cache>/<hash of package.json and the lock file>``.

    An installed one is reused. A new one is installed into a folder of its own
    and renamed into place, so an interrupted or concurrent run never leaves or
    sees half a tree.
    """
    npm = shutil.which("npm")
    if npm is None:
        _unavailable("npm is missing (Node.js 20+ with npm): the tus clients come from npm packages")
    sources = [INTEROP / "package.json", INTEROP / "package-lock.json"]
    key = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]
    cache = npm_cache()
    installed = cache / key
    if all((installed / "node_modules" / library).is_file() for library in LIBRARIES):
        return installed
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{key}.installing-", dir=cache))
    try:
        for path in sources:
            shutil.copyfile(path, staging / path.name)
        done = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=staging, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode:
            pytest.fail(f"npm ci for tests/interop_browser failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
        missing = [library for library in LIBRARIES if not (staging / "node_modules" / library).is_file()]
        assert not missing, f"npm ci installed no {missing}"
        shutil.rmtree(installed, ignore_errors=True)  # a broken earlier one
        with contextlib.suppress(OSError):  # a concurrent run got there first: its tree is the same
            staging.rename(installed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return installed


class _PageHandler(BaseHTTPRequestHandler):
    """GET of the test page and of the libraries it loads; 404 for anything else."""

    files: dict[str, Path] = {}

    def do_GET(self):
        path = self.files.get(urlsplit(self.path).path)
        if path is None:
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        content_type = "text/html" if path.suffix == ".html" else "text/javascript"
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@dataclass
class PageOrigin:
    """The static server of the page: another origin than DirectDriveX's (another port)."""

    httpd: ThreadingHTTPServer

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"


@pytest.fixture(scope="module")
def page_origin():
    home = npm_install()
    files = {"/": INTEROP / PAGE, f"/{PAGE}": INTEROP / PAGE}
    files |= {f"/node_modules/{library}": home / "node_modules" / library for library in LIBRARIES}
    handler = type("PageHandler", (_PageHandler,), {"files": files})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield PageOrigin(httpd)
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.fixture(scope="module")
def server(page_origin, backend, tmp_path_factory):
    """The module's server (overrides conftest's): the page's origin may call it, slot leases are 5 s."""
    live = LiveServer(
        tmp_path_factory.mktemp("tus-clients-server"),
        database_url=backend.database_url,
        redis_url=backend.redis_url,
        DIRECTDRIVEX_MAX_FILE_SIZE=MAX_FILE_SIZE,
        DIRECTDRIVEX_CORS_ORIGINS=page_origin.url,
        DIRECTDRIVEX_SLOT_LEASE_SECONDS=LEASE_SECONDS,
    )
    live.start()
    yield live
    live.stop()


# --- one upload -----------------------------------------------------------------------------


@dataclass
class TusRequest:
    method: str
    url: str
    upload_offset: int | None
    outcome: str = "pending"  # the status, or the network error


@dataclass
class Traffic:
    """Every tus request the page made (CORS preflights are not shown to Playwright), in order."""

    requests: list[TusRequest] = field(default_factory=list)

    def watch(self, page) -> None:
        seen: dict[object, TusRequest] = {}

        def on_request(request):
            if "/api/tus/" not in request.url:
                return
            offset = request.headers.get("upload-offset")
            seen[request] = entry = TusRequest(request.method, request.url, int(offset) if offset else None)
            self.requests.append(entry)

        def on_finished(request):
            if request in seen:
                response = request.response()
                seen[request].outcome = str(response.status) if response else "no response"

        def on_failed(request):
            if request in seen:
                seen[request].outcome = f"failed: {request.failure}"

        page.on("request", on_request)
        page.on("requestfinished", on_finished)
        page.on("requestfailed", on_failed)

    def patches(self) -> list[TusRequest]:
        return [request for request in self.requests if request.method == "PATCH"]

    def upload_id(self) -> str | None:
        patches = self.patches()
        return patches[0].url.rstrip("/").rsplit("/", 1)[-1] if patches else None

    def __str__(self) -> str:
        return "\n".join(f"  {r.method} {r.url} Upload-Offset={r.upload_offset} -> {r.outcome}" for r in self.requests)


def throttle_uploads(cdp, bytes_per_second: int | None) -> None:
    """DevTools network throttling of the page (request bodies included); None lifts it."""
    rate = -1 if bytes_per_second is None else bytes_per_second
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": rate},
    )


def durable_offset(live: LiveServer, token: str, upload_id: str) -> int:
    answer = http_call(live, "GET", f"/api/uploads/{upload_id}/", token=token, timeout=10)
    assert answer.status == 200, (answer.status, answer.body)
    return answer.json()["offset"]


def page_state(page) -> dict:
    return page.evaluate("() => ({...window.ddx})")


def upload_interrupted_and_resumed(client: str, context, live: LiveServer, page_origin, backend, tmp_path):
    """``client`` uploads a random file from the page; the server is killed mid-way and restarted.

    Returns the upload's id and the tus requests made, once the client says it finished.
    """
    path = tmp_path / f"{client}-{os.getpid()}.bin"
    sha256 = write_random(path, FILE_SIZE)
    page = context.new_page()
    traffic = Traffic()
    traffic.watch(page)
    page.goto(f"{page_origin.url}/{PAGE}")
    page.wait_for_function("() => window.tus && window.tus.isSupported && window.Uppy && window.Uppy.Tus")
    page.locator("#file").set_input_files(str(path))
    cdp = context.new_cdp_session(page)
    cdp.send("Network.enable")
    throttle_uploads(cdp, THROTTLE)

    page.evaluate(
        "(options) => window.ddxStart(options)",
        {
            "client": client,
            "endpoint": f"{live.url}/api/tus/",
            "token": backend.alice_token,
            "retryDelays": RETRY_DELAYS,
        },
    )
    # Mid-way: some bytes durable on the server, the file not all sent.
    deadline = time.monotonic() + 30
    durable = 0
    while durable < KILL_AFTER:
        assert time.monotonic() < deadline, f"no {KILL_AFTER} bytes durable in 30 s:\n{traffic}\n{page_state(page)}"
        state = page_state(page)
        assert state["state"] == "uploading", f"{client} ended before the interruption: {state}\n{traffic}"
        if upload_id := traffic.upload_id():
            durable = durable_offset(live, backend.alice_token, upload_id)
        page.wait_for_timeout(100)
    live.kill()
    assert durable < FILE_SIZE
    throttle_uploads(cdp, None)
    page.wait_for_timeout(500)  # the client meets the dead server before it is back
    live.restart()

    page.wait_for_function("() => window.ddx.state !== 'uploading'", timeout=UPLOAD_TIMEOUT * 1000, polling=200)
    state = page_state(page)
    assert state["state"] == "complete", f"{client} failed: {state}\n{traffic}"

    upload_id = traffic.upload_id()
    assert state["url"].rstrip("/").endswith(f"/api/tus/{upload_id}"), (state["url"], upload_id)
    detail = http_call(live, "GET", f"/api/uploads/{upload_id}/", token=backend.alice_token).json()
    assert (detail["status"], detail["offset"], detail["size"]) == ("complete", FILE_SIZE, FILE_SIZE), detail
    assert detail["sha256"] == sha256, "the server's sha256 is not the file's"
    assert detail["filename"] == path.name

    # The client's defaults: a POST without a body, then PATCHes of the rest of the file each.
    creations = [request for request in traffic.requests if request.method == "POST"]
    assert len(creations) == 1 and creations[0].outcome == "201", traffic
    patches = traffic.patches()
    assert patches[0].upload_offset == 0, traffic
    assert patches[-1].outcome == "204", traffic
    # One PATCH took the rest of the file, from where the server had it durable, not from 0.
    resumed = [patch for patch in patches[1:] if patch.outcome == "204"]
    assert len(resumed) == 1 and resumed[0].upload_offset >= durable > 0, (
        f"the resumed PATCH did not start from the durable offset {durable}:\n{traffic}"
    )
    # It learnt where to go on from HEAD, not by starting over.
    assert any(request.method == "HEAD" and request.outcome == "200" for request in traffic.requests), traffic
    return upload_id, traffic


def test_tus_js_client_resumes_after_the_server_is_killed_and_the_sha256_is_the_files(
    context, live, page_origin, backend, tmp_path
):
    upload_interrupted_and_resumed("tus-js-client", context, live, page_origin, backend, tmp_path)


def test_uppy_tus_resumes_after_the_server_is_killed_and_the_sha256_is_the_files(
    context, live, page_origin, backend, tmp_path
):
    upload_interrupted_and_resumed("uppy", context, live, page_origin, backend, tmp_path)
