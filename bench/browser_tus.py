"""Issue 13 in Chromium: the upload page against tus-js-client's browser build uploading to a stock @tus/server.

    .venv/bin/python bench/browser_tus.py                          # 1 GiB, 3 interleaved rounds
    .venv/bin/python bench/browser_tus.py --size 67108864 --rounds 1   # a 64 MiB smoke run
    .venv/bin/python bench/browser_tus.py --json browser-tus.json --file /tmp/bench-1g.bin --keep-file

One headless Debian Chromium (/usr/bin/chromium, Playwright's sync API, the flags of
tests/support/browser.py), one file of random bytes, and in each round, one after the other:

* page: the project's upload page. The server is started as bench/browser_e2e.py starts it
  (tests/support/live_server.py: ``manage.py migrate``, ``bootstrap_admin``, ``serve`` with DEBUG=1, a
  SQLite file or a scratch PostgreSQL database, Redis when REDIS_URL is set); the browser signs in once
  through the login form, and each round opens /upload/ in a new tab, waits until the page is ready,
  chooses the file (``set_input_files`` on ``#file-input``) and waits until the API
  (``GET /api/uploads/?status=complete``, with the same user's token, polled from this script) lists it
  complete. Time: from just before the file is chosen to the server's ``msg=upload.completed`` log line
  (sha256 verified, file in place). Whatever transport the page uses is what is measured; the JSON says
  which (the server's ``writer ready`` lines: ``transport=tus`` or WebSocket).
* tus_js: tus-js-client's browser build (``dist/tus.min.js`` of the npm package pinned by
  bench/tus/package-lock.json, installed into --tus-cache as bench/upload.py installs it) in a tiny page
  served from this script on another port, uploading in its defaults (chunkSize Infinity: one PATCH whose
  body is the File; no retries) to a stock @tus/server 2 with @tus/file-store (bench/tus/server.mjs, which
  fsyncs the finished file once; --tus-no-fsync leaves that out). The tus server answers CORS for any
  origin by default, so the page's requests are cross-origin (two preflights per upload). Time: from just
  before the file is chosen to the server's ``tus durable`` log line.

Figures per round: MB/s (10^6 bytes/s) over that wall clock, and the browser's CPU seconds per GiB
summed over every Chromium process (utime + stime from /proc, sampled every --sample seconds so that a
process that exits mid-round still counts up to its last sample), split by process type (browser,
renderer, utility, ...), over the same window. Also each server's CPU per GiB. Each tab is opened
before and closed after its window, so only one page is alive while a round is measured.

It prints the medians and the ratios page / tus_js (MB/s: target >= 1.0x; browser CPU per GiB: target
<= 1.2x), then a JSON summary (also written to --json). Exit status 0 when every round completed.
"""

import argparse
import contextlib
import http.server
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.browser_e2e import admin_password, code_version, descendants, machine, sign_in  # noqa: E402
from bench.upload import (  # noqa: E402
    DEFAULT_TUS_CACHE,
    LOG_TIME,
    LOGFMT_TIME,
    GiB,
    MiB,
    mib,
    out,
    stop_process,
    tus_install,
    wait_for_port,
)
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.support.files import write_random  # noqa: E402
from tests.support.live_server import LiveServer, free_port, postgres_database, proc_cpu_seconds  # noqa: E402

KINDS = ("page", "tus_js")
TARGET_MB_S_RATIO = 1.0  # page MB/s / tus-js-client -> @tus/server MB/s, at least
TARGET_CPU_RATIO = 1.2  # page browser CPU per GiB / tus-js-client's, at most
# No byte landing on the server for this long means the upload is stuck: fail instead of waiting forever.
STALL_SECONDS = 120
POLL_SECONDS = 0.25
# How often the page itself is asked whether it gave up (a round trip into the renderer: rare, both pages).
PAGE_CHECK_SECONDS = 5.0
PROGRESS_EVERY = 10.0

# The tiny page for tus-js-client: the file input starts one upload in tus-js-client's defaults.
TUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tus-js-client</title>
<script src="/tus.min.js"></script></head>
<body>
<input type="file" id="file" aria-label="File to upload">
<p id="state" data-state="idle"></p>
<script>
const endpoint = new URLSearchParams(location.search).get('endpoint');
const state = document.getElementById('state');
document.getElementById('file').addEventListener('change', (event) => {
  const file = event.target.files[0];
  state.dataset.state = 'uploading';
  const upload = new tus.Upload(file, {
    endpoint,
    metadata: { filename: file.name, filetype: file.type },
    retryDelays: null,  // a benchmark fails loudly instead of retrying its way to a number
    onError(error) { state.dataset.state = 'failed'; state.textContent = String(error); },
    onSuccess() { state.dataset.state = 'complete'; state.dataset.url = upload.url; },
  });
  upload.start();
});
window.benchReady = typeof tus !== 'undefined' && tus.isSupported;
</script>
</body></html>
"""

# The upload page's own word, if it gave up on the file (tests/browser read the same attributes).
PAGE_FAILURE = """(name) => {
  const row = [...document.querySelectorAll('#upload-list li.upload')]
    .find((row) => row.querySelector('.upload-name')?.textContent === name);
  if (!row || !['failed', 'cancelled'].includes(row.dataset.status)) return null;
  return `${row.dataset.status}: ${row.querySelector('.upload-message')?.textContent ?? ''}`;
}"""
TUS_PAGE_FAILURE = """() => {
  const state = document.getElementById('state');
  return state.dataset.state === 'failed' ? state.textContent : null;
}"""


class Failure(Exception):
    """A round did not complete."""


# --- Chromium's CPU ------------------------------------------------------------------------


def chromium_processes() -> dict[int, tuple[str, float]]:
    """This script's Chromium processes: pid -> (process type, utime + stime seconds)."""
    found = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if not Path(f"/proc/{pid}/comm").read_text().startswith("chrom"):
                continue  # the servers, Playwright's driver
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            # Chromium rewrites its argv into one space-separated string: split on both.
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
            kind = next((arg.decode()[len("--type=") :] for arg in cmdline if arg.startswith(b"--type=")), "browser")
            if kind == "utility":
                sub = next((arg.decode() for arg in cmdline if arg.startswith(b"--utility-sub-type=")), "")
                kind = "utility:" + sub.rsplit(".", 1)[-1] if sub else kind
            found[pid] = (kind, (int(fields[11]) + int(fields[12])) / ticks)
    return found


class BrowserCpu(threading.Thread):
    """Chromium's CPU over a window: per process, its last sample minus its first (0 for one born inside)."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval = interval
        self.first = chromium_processes()
        self.last = dict(self.first)
        self.stopping = threading.Event()
        self.start()

    def run(self):
        while not self.stopping.wait(self.interval):
            self.last.update(chromium_processes())

    def stop(self) -> dict[str, float]:
        self.stopping.set()
        self.join()
        self.last.update(chromium_processes())
        by_kind: dict[str, float] = {}
        for pid, (kind, seconds) in self.last.items():
            before = self.first.get(pid, (kind, 0.0))[1]
            by_kind[kind] = by_kind.get(kind, 0.0) + seconds - before
        return by_kind


# --- logs, API -----------------------------------------------------------------------------


def log_lines(path: Path, since: int) -> list[str]:
    with open(path, "rb") as handle:
        handle.seek(since)
        return handle.read().decode(errors="replace").splitlines()


def log_epoch(line: str) -> float | None:
    """A log line's time as seconds since the epoch: the server's logfmt (UTC), or Python logging's (local)."""
    if match := LOGFMT_TIME.match(line):
        return datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC).timestamp()
    if match := LOG_TIME.match(line):
        return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def api(server: LiveServer, token: str, method: str, path: str):
    request = urllib.request.Request(
        server.url + path, method=method, headers={"Authorization": f"Token {token}", "Accept": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else None


def dir_size(folder: Path) -> int:
    total = 0
    for entry in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            if entry.is_file():
                total += entry.stat().st_size
    return total


# --- the tiny page's server ----------------------------------------------------------------


def serve_tus_page(script: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    """TUS_PAGE at / and tus-js-client's browser build at /tus.min.js, on 127.0.0.1, in a thread."""
    files = {
        "/": (TUS_PAGE.encode(), "text/html; charset=utf-8"),
        "/tus.min.js": (script.read_bytes(), "text/javascript"),
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, content_type = files.get(self.path.split("?", 1)[0], (b"not found", "text/plain"))
            self.send_response(200 if self.path.split("?", 1)[0] in files else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = free_port()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, port


# --- one round of each ---------------------------------------------------------------------


def wait_until(done, landed, page, failure_script: str, failure_arg, label: str, size: int):
    """Poll ``done()`` every POLL_SECONDS until it returns something; fail on a stall or the page's failure."""
    last_landed, last_move, last_check, last_print = -1, time.monotonic(), time.monotonic(), time.monotonic()
    while True:
        if (result := done()) is not None:
            return result
        now = time.monotonic()
        current = landed()
        if current != last_landed:
            last_landed, last_move = current, now
        if now - last_move > STALL_SECONDS:
            raise Failure(f"{label}: no byte landed for {STALL_SECONDS} s ({current:,} of {size:,})")
        if now - last_check > PAGE_CHECK_SECONDS:
            last_check = now
            if message := page.evaluate(failure_script, failure_arg):
                raise Failure(f"{label}: the page says {message}")
        if now - last_print > PROGRESS_EVERY:
            last_print = now
            out(f"  {label}: {current:,} of {size:,} bytes on the server")
        time.sleep(POLL_SECONDS)


def round_page(ctx: dict, source: Path, size: int, sha256: str, interval: float) -> dict:
    server, token, context = ctx["server"], ctx["token"], ctx["context"]
    name = source.name
    page = context.new_page()
    try:
        page.goto(f"{server.url}/upload/")
        page.locator("#uploader[data-ready='true']").wait_for()
        time.sleep(ctx["settle"])
        log_start = server.log_path.stat().st_size
        server_cpu = proc_cpu_seconds(server.pid)
        cpu = BrowserCpu(interval)
        started = time.time()
        page.set_input_files("#file-input", str(source))

        def complete():
            for upload in api(server, token, "GET", "/api/uploads/?status=complete&limit=10"):
                if upload["filename"] == name:
                    return upload
            return None

        def landed():
            return dir_size(server.storage)

        upload = wait_until(complete, landed, page, PAGE_FAILURE, name, "page", size)
        detected = time.time()
        by_kind = cpu.stop()
        server_cpu = proc_cpu_seconds(server.pid) - server_cpu
    finally:
        page.close()
    lines = log_lines(server.log_path, log_start)
    ended = next(
        (log_epoch(line) for line in lines if "msg=upload.completed" in line and f"upload={upload['id']}" in line),
        None,
    )
    if ended is None:
        raise Failure(f"page: no msg=upload.completed for {upload['id']} in {server.log_path}")
    if upload["size"] != size or upload["sha256"] != sha256:
        raise Failure(f"page: the server has {upload['size']} bytes, sha256 {upload['sha256']}; expected {sha256}")
    writers = [line for line in lines if "writer ready" in line]
    api(server, token, "DELETE", f"/api/uploads/{upload['id']}/")  # room for the next round
    return figures(
        size,
        ended - started,
        detected - started,
        by_kind,
        server_cpu,
        transport="tus" if all("transport=tus" in line for line in writers) else "websocket",
        writer_sessions=len(writers),
    )


def round_tus_js(ctx: dict, source: Path, size: int, interval: float) -> dict:
    tus_server, log_path, folder = ctx["tus_server"], ctx["tus_log"], ctx["tus_dir"]
    page = ctx["context"].new_page()
    try:
        endpoint = quote(f"http://127.0.0.1:{ctx['tus_port']}/files/", safe="")
        page.goto(f"http://127.0.0.1:{ctx['page_port']}/?endpoint={endpoint}")
        page.wait_for_function("window.benchReady === true")
        time.sleep(ctx["settle"])
        log_start = log_path.stat().st_size
        server_cpu = proc_cpu_seconds(tus_server.pid)
        cpu = BrowserCpu(interval)
        started = time.time()
        page.set_input_files("#file", str(source))

        def durable():
            found = [line for line in log_lines(log_path, log_start) if "tus durable" in line]
            return found[0] if found else None

        line = wait_until(durable, lambda: dir_size(folder), page, TUS_PAGE_FAILURE, None, "tus_js", size)
        detected = time.time()
        by_kind = cpu.stop()
        server_cpu = proc_cpu_seconds(tus_server.pid) - server_cpu
        # The page hears the 204 a moment after the fsync; its own word that it finished.
        page.wait_for_function("document.getElementById('state').dataset.state !== 'uploading'", timeout=60_000)
        state = page.evaluate("document.getElementById('state').dataset.state")
    finally:
        page.close()
    if state != "complete":
        raise Failure(f"tus_js: the page ended {state}")
    stored = [path for path in folder.iterdir() if path.suffix != ".json"]
    if [path.stat().st_size for path in stored] != [size]:
        raise Failure(f"tus_js: expected one file of {size} bytes in {folder}, found {stored}")
    for path in folder.iterdir():
        path.unlink()
    return figures(size, log_epoch(line) - started, detected - started, by_kind, server_cpu)


def figures(size: int, seconds: float, detected: float, by_kind: dict, server_cpu: float, **extra) -> dict:
    gib = size / GiB
    browser = sum(by_kind.values())
    return {
        "seconds": seconds,
        "mb_s": size / seconds / 1e6,
        "seconds_to_seen_complete": detected,
        "browser_cpu_s": browser,
        "browser_cpu_per_gib": browser / gib,
        "browser_cpu_per_gib_by_process": {kind: value / gib for kind, value in sorted(by_kind.items())},
        "server_cpu_per_gib": server_cpu / gib,
        **extra,
    }


# --- the run -------------------------------------------------------------------------------


def run(args, workdir: Path, summary: dict, rounds: list[dict]) -> None:
    """Every round's figures are appended to ``rounds`` as it ends (a failed run keeps the finished ones)."""
    size = args.size
    kinds = [kind for kind in KINDS if kind in (args.only or KINDS)]
    with contextlib.ExitStack() as stack:
        source = args.file or workdir / f"browser-tus-{size}.bin"
        started = time.monotonic()
        if source.exists() and source.stat().st_size == size and args.sha256:
            sha256 = args.sha256
            out(f"reusing {source} (sha256 given)")
        else:
            if source.exists():
                raise SystemExit(f"{source} exists: give its --sha256 to reuse it (and the right --size)")
            sha256 = write_random(source, size)
            out(f"wrote {source}: {size:,} random bytes in {time.monotonic() - started:.1f} s, sha256 {sha256}")
            if not args.keep_file:
                stack.callback(source.unlink, missing_ok=True)
        summary["sha256"] = sha256
        ctx: dict = {"settle": args.settle}

        if "page" in kinds:
            database_url = None
            if os.environ.get("DATABASE_URL", "").startswith("postgres"):
                database_url = stack.enter_context(postgres_database(os.environ["DATABASE_URL"], "btus"))
            summary["backend"] = "postgresql" if database_url else "sqlite"
            summary["channel_layer"] = "redis" if os.environ.get("REDIS_URL") else "in-memory"
            server = LiveServer(
                workdir / "server", database_url=database_url, redis_url=os.environ.get("REDIS_URL"), DEBUG=1
            )
            server.migrate()
            username, password = admin_password(server.manage("bootstrap_admin", "--base-url", server.url))
            code = (
                "from django.contrib.auth.models import User;"
                "from rest_framework.authtoken.models import Token;"
                f"print('TOKEN', Token.objects.get_or_create(user=User.objects.get(username={username!r}))[0].key)"
            )
            token = next(
                line.split()[1] for line in server.manage("shell", "-c", code).splitlines() if line.startswith("TOKEN ")
            )
            server.start()
            stack.callback(server.stop)
            ctx.update(server=server, token=token)
            out(f"DirectDriveX {server.url} (pid {server.pid}, {summary['backend']}, {summary['channel_layer']})")

        if "tus_js" in kinds:
            home = tus_install(args.tus_cache)
            script = home / "node_modules" / "tus-js-client" / "dist" / "tus.min.js"
            version = json.loads((home / "node_modules" / "tus-js-client" / "package.json").read_text())["version"]
            server_version = json.loads((home / "node_modules" / "@tus" / "server" / "package.json").read_text())
            summary["tus_js_client"], summary["tus_server"] = version, server_version["version"]
            folder = workdir / "tus"
            folder.mkdir()
            tus_port = free_port()
            tus_log = workdir / "tus.log"
            with open(tus_log, "ab") as log:
                tus_server = subprocess.Popen(
                    ["node", "server.mjs", "--port", str(tus_port), "--dir", str(folder),
                     *(["--no-fsync"] if args.tus_no_fsync else [])],
                    cwd=home, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            stack.callback(stop_process, tus_server)
            wait_for_port(tus_port, tus_server)
            httpd, page_port = serve_tus_page(script)
            stack.callback(httpd.shutdown)
            ctx.update(tus_server=tus_server, tus_port=tus_port, tus_log=tus_log, tus_dir=folder, page_port=page_port)
            out(f"@tus/server {summary['tus_server']} on :{tus_port}, tus-js-client {version} page on :{page_port}")

        from playwright.sync_api import sync_playwright

        playwright = stack.enter_context(sync_playwright())
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        stack.callback(browser.close)
        summary["chromium"] = browser.version
        context = ctx["context"] = browser.new_context()
        if "page" in kinds:
            page = context.new_page()
            sign_in(page, ctx["server"], username, password)
            page.close()
            out(f"signed in as {username}")

        for number in range(1, args.rounds + 1):
            result: dict = {}
            for kind in kinds:
                out(f"round {number}: {kind} (load {os.getloadavg()[0]:.2f}) ...")
                if kind == "page":
                    result[kind] = round_page(ctx, source, size, sha256, args.sample)
                else:
                    result[kind] = round_tus_js(ctx, source, size, args.sample)
                figures_ = result[kind]
                out(
                    f"round {number}: {kind} {figures_['mb_s']:.1f} MB/s in {figures_['seconds']:.2f} s, "
                    f"browser CPU {figures_['browser_cpu_per_gib']:.2f} s/GiB"
                    + (f" (page transport: {figures_['transport']})" if kind == "page" else "")
                )
            rounds.append(result)


def report(rounds: list[dict], summary: dict) -> None:
    kinds = [kind for kind in KINDS if kind in rounds[0]]

    def median(kind, key):
        return statistics.median(r[kind][key] for r in rounds)

    out()
    out(
        f"=== summary: {summary['size']:,} bytes ({summary['size'] / GiB:.2f} GiB), "
        f"median of {len(rounds)} round(s) ==="
    )
    for kind in kinds:
        label = "upload page" if kind == "page" else "tus-js-client -> @tus/server"
        processes = {}
        for process in rounds[0][kind]["browser_cpu_per_gib_by_process"]:
            processes[process] = statistics.median(
                r[kind]["browser_cpu_per_gib_by_process"].get(process, 0.0) for r in rounds
            )
        summary[kind] = {
            "mb_s": median(kind, "mb_s"),
            "seconds": median(kind, "seconds"),
            "browser_cpu_per_gib": median(kind, "browser_cpu_per_gib"),
            "browser_cpu_per_gib_by_process": processes,
            "server_cpu_per_gib": median(kind, "server_cpu_per_gib"),
        }
        if kind == "page":
            summary[kind]["transport"] = sorted({r[kind]["transport"] for r in rounds})
            summary[kind]["writer_sessions"] = median(kind, "writer_sessions")
        split = ", ".join(f"{process} {value:.2f}" for process, value in processes.items() if value >= 0.005)
        out(
            f"{kind:6} {summary[kind]['mb_s']:8.1f} MB/s  {summary[kind]['seconds']:7.2f} s  "
            f"browser CPU {summary[kind]['browser_cpu_per_gib']:5.2f} s/GiB ({split})  "
            f"server CPU {summary[kind]['server_cpu_per_gib']:5.2f} s/GiB  [{label}]"
        )
    if len(kinds) == 2:
        mb_ratio = statistics.median(r["page"]["mb_s"] / r["tus_js"]["mb_s"] for r in rounds)
        cpu_ratio = statistics.median(
            r["page"]["browser_cpu_per_gib"] / max(r["tus_js"]["browser_cpu_per_gib"], 1e-9) for r in rounds
        )
        summary["ratio_mb_s"], summary["ratio_browser_cpu"] = mb_ratio, cpu_ratio
        summary["targets"] = {
            "mb_s_ratio_at_least": TARGET_MB_S_RATIO,
            "browser_cpu_ratio_at_most": TARGET_CPU_RATIO,
            "mb_s_pass": mb_ratio >= TARGET_MB_S_RATIO,
            "browser_cpu_pass": cpu_ratio <= TARGET_CPU_RATIO,
        }
        out()
        out(
            f"target page MB/s / tus-js-client->@tus/server MB/s >= {TARGET_MB_S_RATIO:.1f}x: {mb_ratio:.2f}x "
            f"{'PASS' if mb_ratio >= TARGET_MB_S_RATIO else 'MISS'}"
        )
        out(
            f"target page browser CPU per GiB / tus-js-client's <= {TARGET_CPU_RATIO:.1f}x: {cpu_ratio:.2f}x "
            f"{'PASS' if cpu_ratio <= TARGET_CPU_RATIO else 'MISS'}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=GiB, help="bytes (default 1 GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    parser.add_argument("--only", choices=KINDS, action="append", help="run only these (repeatable)")
    parser.add_argument("--file", type=Path, help="use this file (made if missing; reused only with --sha256)")
    parser.add_argument("--sha256", help="the sha256 of an existing --file (printed by the run that made it)")
    parser.add_argument("--keep-file", action="store_true", help="keep the generated file for the next run")
    parser.add_argument("--workdir", type=Path, help="parent of the working folder (default: the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (server logs, tus log)")
    parser.add_argument("--sample", type=float, default=0.5, help="Chromium CPU sampling interval, s (default 0.5)")
    parser.add_argument("--settle", type=float, default=1.0, help="idle seconds after a page is ready (default 1)")
    parser.add_argument(
        "--tus-cache", type=Path, default=DEFAULT_TUS_CACHE, help=f"where bench/tus is installed ({DEFAULT_TUS_CACHE})"
    )
    parser.add_argument("--tus-no-fsync", action="store_true", help="@tus/server skips its one fsync at the end")
    parser.add_argument("--json", type=Path, help="also write the JSON summary here")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        parser.error(f"{CHROMIUM} is missing: apt-get install chromium")
    kinds = args.only or KINDS
    if "tus_js" in kinds and not (shutil.which("node") and shutil.which("npm")):
        parser.error("the tus_js peer needs node and npm on PATH (--only page runs without them)")

    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    needed = args.size * 2 + 512 * MiB  # the file and one server's copy at a time (each round's copy is removed)
    if (free := shutil.disk_usage(parent).free) < needed:
        parser.error(f"{parent} has {mib(free)} free; this run needs about {mib(needed)}")
    workdir = Path(tempfile.mkdtemp(prefix="ddx-browser-tus-", dir=parent))
    summary: dict = {
        "bench": "browser_tus",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code": code_version(),
        "size": args.size,
    }
    out(f"DirectDriveX browser tus benchmark, {summary['date']}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    out(f"working in {workdir}")
    # SIGTERM (a timeout in a wrapper) must still stop the servers and Chromium: make it an exception.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rounds: list[dict] = []
    try:
        run(args, workdir, summary, rounds)
        summary["result"] = "PASS"
    except Exception as error:  # a bench script: report the reason, then whatever was measured
        summary["result"] = "FAIL"
        summary["failure"] = f"{type(error).__name__}: {error}"
        if not isinstance(error, Failure):
            traceback.print_exc()
        for log in (workdir / "server" / "server.log", workdir / "tus.log"):
            if log.exists():
                out(f"last lines of {log.name}:")
                out("\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]
    if rounds:
        report(rounds, summary)
    summary["all_rounds"] = rounds
    text = json.dumps(summary, indent=2, default=str)
    out()
    out(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if summary["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
