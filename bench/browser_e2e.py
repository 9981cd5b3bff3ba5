"""Issue 7's "done when" in Chromium: sign in, upload a multi-GB file, reload half-way, resume, download it back.

    .venv/bin/python bench/browser_e2e.py                        # the reference case: 3,624,892,618 bytes
    .venv/bin/python bench/browser_e2e.py --size 314572800       # 300 MiB: the same steps in under a minute
    .venv/bin/python bench/browser_e2e.py --json e2e.json --keep # figures as JSON; keep the folder to look at
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/ddx REDIS_URL=redis://127.0.0.1:6379/15 \\
        .venv/bin/python bench/browser_e2e.py                    # PostgreSQL (scratch database) + Redis

What a newcomer does after ``make run``, scripted:

1. The server is started the way ``make run`` starts it: ``manage.py migrate``, ``manage.py
   bootstrap_admin`` (whose printed password is the one used to sign in) and ``manage.py serve`` with
   DEBUG=1 (tests/support/live_server.py: a SQLite file, or a scratch PostgreSQL database, in a
   temporary folder with its own storage).
2. Headless Debian Chromium (/usr/bin/chromium, driven by Playwright's sync API) signs in through the
   login form and chooses the file with the page's own "Choose files" button (a click: the page has a
   user gesture, so Chromium asks before leaving it while the upload runs).
3. The moment the page shows more than half acknowledged, the page reloads itself (``location.reload()``
   from a MutationObserver in the page, so no round trip to the script delays it; the beforeunload
   warning must appear and is accepted). The reloaded page must list the unfinished upload; the same
   file is chosen again, and the row must continue the same upload from the server's offset (above 0,
   and never showing less).
4. When the row says complete with the server's sha256 (which must be the original's), the original is
   deleted (its sha256 was computed while it was written, so it is not needed again: this keeps the run
   at about three times the file size on disk), and the file is downloaded back from the My files page's
   ``a.download`` link (``page.expect_download``, ``download.save_as``); the saved file's size and sha256
   must be the original's.

Why a real reload with the server running, where tests/browser/test_uploader.py freezes the server
(SIGSTOP) and leaves through about:blank: Chromium keeps the old page, and its upload, running until the
reloaded page's response arrives, and that test's 200 MiB file could finish in that moment. Half a
multi-GB file takes tens of seconds to send, so that cannot happen here (the old page sends a few more
MiB at most), and the point of this script is the user's own reload: the old page's WebSocket closes
while the server is writing, and the new page must cope with whatever the server has made durable by
then, and with the old connection's writer still letting go of the upload.

Figures: upload MB/s before the reload (from choosing the file to the reload, by the page's clock) and
after it (from choosing it again to complete), the offset it resumed from, download MB/s (from the click
to Chromium's finished download; the copy to the destination is not counted), the server's RSS growth
over its RSS after sign-in (VmRSS sampled from /proc every 0.25 s), Chromium's PSS (all its processes,
every second), and the total time (including writing the file). MB/s are 10^6 bytes/s. Exit status 0
on PASS, 1 on FAIL. Needs about 3x --size free on disk (4x with --keep).
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.upload import MiB, mib, out  # noqa: E402
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.support.files import file_sha256, write_random  # noqa: E402
from tests.support.live_server import LiveServer, postgres_database, proc_status  # noqa: E402

REFERENCE_SIZE = 3_624_892_618
# No acknowledged byte for this long means the upload is stuck: fail instead of waiting forever.
STALL_SECONDS = 120
PROGRESS_EVERY = 10.0

# The state of the upload list's row for the file ``name`` (tests/browser/test_uploader.py reads the same
# attributes), with the page's clock: the page's own times are used for rates, because a round trip to a
# page that is busy uploading can take seconds on a small machine.
ROW_STATE = """(name) => {
  const row = [...document.querySelectorAll('#upload-list li.upload')]
    .find((row) => row.querySelector('.upload-name')?.textContent === name);
  if (!row) return null;
  return {
    status: row.dataset.status,
    offset: Number(row.dataset.offset),
    uploadId: row.dataset.uploadId ?? null,
    resumedFrom: row.dataset.resumedFrom === undefined ? null : Number(row.dataset.resumedFrom),
    message: row.querySelector('.upload-message')?.textContent ?? '',
    sha256: row.querySelector('.upload-sha256 code')?.textContent ?? null,
    at: Date.now(),
  };
}"""

# Reload the moment the row shows more than ``half`` acknowledged, from inside the page (no round trip to
# wait for), leaving the offset and time of the reload in sessionStorage for after it.
RELOAD_PAST_HALF = f"""([name, half]) => {{
  const observer = new MutationObserver(() => {{
    const state = ({ROW_STATE})(name);
    if (state && state.offset > half) {{
      observer.disconnect();
      sessionStorage.setItem('e2e-reload', JSON.stringify(state));
      location.reload();
    }}
  }});
  observer.observe(document.querySelector('#upload-list'),
                   {{subtree: true, childList: true, attributes: true, attributeFilter: ['data-offset']}});
}}"""

# True (the state left before the reload, and when the new page was ready) once the reloaded page is ready.
RELOADED = """() => performance.getEntriesByType('navigation')[0]?.type === 'reload'
  && document.querySelector("#uploader[data-ready='true']") !== null
  && sessionStorage.getItem('e2e-reload') !== null
  && {...JSON.parse(sessionStorage.getItem('e2e-reload')), readyAt: Date.now()}"""

# The row's state once it continues an upload (or started another one, or failed).
RESUMED = f"""([name, uploadId]) => {{
  const state = ({ROW_STATE})(name);
  const decided = state && (state.resumedFrom !== null || (state.uploadId !== null && state.uploadId !== uploadId)
                            || ['failed', 'cancelled'].includes(state.status));
  return decided ? state : null;
}}"""

# The row's state once the server acknowledged a byte past ``offset`` (or the row finished).
ACKED_PAST = f"""([name, offset]) => {{
  const state = ({ROW_STATE})(name);
  return state && (state.offset > offset || ['complete', 'failed', 'cancelled'].includes(state.status)) ? state : null;
}}"""

# The row's state once it is finished, one way or the other.
FINISHED = f"""(name) => {{
  const state = ({ROW_STATE})(name);
  return state && ['complete', 'failed', 'cancelled'].includes(state.status) ? state : null;
}}"""

# Every (status, offset) the upload list shows from now on, to prove the resumed row never starts at 0.
WATCH_ROWS = """() => {
  window.e2eSeen = [];
  new MutationObserver((changes) => {
    for (const change of changes) {
      const row = change.target;
      if (row.dataset?.status && row.dataset.status !== 'checking') {
        window.e2eSeen.push([row.dataset.status, Number(row.dataset.offset)]);
      }
    }
  }).observe(document.querySelector('#upload-list'),
             {subtree: true, attributes: true, attributeFilter: ['data-offset', 'data-status']});
}"""


class Failure(Exception):
    """A step of the end-to-end check did not do what issue 7 says it must."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failure(message)


def mb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6 if seconds > 0 else 0.0


# --- the file -------------------------------------------------------------------------


def write_random_file(path: Path, size: int) -> str:
    """``size`` bytes of os.urandom, hashed while written (the file is never read back); returns the sha256."""
    started = time.monotonic()
    sha256 = write_random(path, size)
    out(f"wrote {path.name}: {size:,} random bytes in {time.monotonic() - started:.1f} s, sha256 {sha256}")
    return sha256


# --- the server -----------------------------------------------------------------------


def descendants(root: int) -> list[int]:
    """Every live process below ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def browser_pss() -> int:
    """Proportional set size (bytes) of this script's Chromium processes together: shared pages counted once."""
    total = 0
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError, StopIteration):
            if not Path(f"/proc/{pid}/comm").read_text().startswith("chrom"):
                continue  # the server, Playwright's driver
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
            total += int(next(line for line in rollup if line.startswith("Pss:")).split()[1]) * 1024
    return total


class RssSampler(threading.Thread):
    """The server's VmRSS every ``interval`` seconds, and Chromium's PSS every fourth time, tagged by phase."""

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.phase = "start"
        self.samples: list[tuple[str, int]] = []
        self.browser: list[tuple[str, int]] = []
        # Once a second: (seconds, phase, server VmRSS MiB, Chromium PSS MiB), for the JSON.
        self.timeline: list[tuple[float, str, float, float]] = []
        self.stopping = threading.Event()

    def run(self):
        started = time.monotonic()
        while not self.stopping.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.samples.append((self.phase, proc_status(self.pid)["VmRSS"]))
            if len(self.samples) % 4 == 1:
                pss = browser_pss()
                self.browser.append((self.phase, pss))
                seconds = round(time.monotonic() - started, 1)
                self.timeline.append((seconds, self.phase, round(self.samples[-1][1] / MiB, 1), round(pss / MiB, 1)))
            self.stopping.wait(self.interval)

    def latest(self) -> int:
        return proc_status(self.pid)["VmRSS"]

    def peak(self, *phases: str) -> int:
        return max((rss for phase, rss in self.samples if phase in phases), default=0)

    def browser_peak(self, *phases: str) -> int:
        return max((pss for phase, pss in self.browser if phase in phases), default=0)

    def stop(self):
        self.stopping.set()
        self.join()


def admin_password(bootstrap_output: str) -> tuple[str, str]:
    """Username and password from bootstrap_admin's once-only message (what make run prints)."""
    fields = {}
    for line in bootstrap_output.splitlines():
        key, _, value = line.strip().partition(": ")
        if key in ("username", "password"):
            fields[key] = value.strip()
    check(set(fields) == {"username", "password"}, f"bootstrap_admin printed no credentials:\n{bootstrap_output}")
    return fields["username"], fields["password"]


# --- the page -------------------------------------------------------------------------


def choose_file(page, path: Path) -> None:
    """Click the page's "Choose files" button and pick ``path`` in the file chooser, as a user does."""
    # A listener from the start turns Chromium's file chooser interception on before the click
    # (tests/browser/test_uploader.py: expect_file_chooser alone turns it on lazily).
    page.on("filechooser", lambda chooser: None)
    page.evaluate("0")
    with page.expect_file_chooser() as chooser:
        page.locator("#choose-files").click()
    chooser.value.set_files(str(path))


def wait_in_page(page, predicate: str, arg, name: str, label: str):
    """The first truthy value of ``predicate(arg)``, polled inside the page (so across its reload too).

    Every PROGRESS_EVERY seconds it prints the file's row and fails when the row says failed or
    cancelled, or when no acknowledged byte has moved for STALL_SECONDS.
    """
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    last_offset, last_move = None, time.monotonic()
    while True:
        try:
            handle = page.wait_for_function(predicate, arg=arg, polling=100, timeout=PROGRESS_EVERY * 1000)
            return handle.json_value()
        except PlaywrightTimeoutError:
            pass
        except PlaywrightError as error:
            if "destroyed" not in str(error) and "navigat" not in str(error):
                raise  # only a page going away in the middle of a poll is expected
        try:
            state = page.evaluate(ROW_STATE, name)
        except PlaywrightError:
            state = None  # between two documents
        now = time.monotonic()
        if state is not None:
            check(
                state["status"] not in ("failed", "cancelled"),
                f"{label}: the row says {state['status']}: {state['message']!r}",
            )
            if state["offset"] != last_offset:
                last_offset, last_move = state["offset"], now
            out(f"  {label}: {state['status']}, {state['offset']:,} bytes acknowledged")
        check(now - last_move < STALL_SECONDS, f"{label}: nothing moved for {STALL_SECONDS} s (last state {state})")


def sign_in(page, server: LiveServer, username: str, password: str) -> None:
    page.goto(f"{server.url}/accounts/login/?next=/upload/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{server.url}/upload/")
    page.locator("#uploader[data-ready='true']").wait_for()


# --- the run --------------------------------------------------------------------------


def run(args, workdir: Path, figures: dict) -> None:
    size = args.size
    name = f"e2e-{size}.bin"
    original = workdir / name
    started = time.monotonic()
    figures["sha256"] = sha256 = write_random_file(original, size)

    with contextlib.ExitStack() as stack:
        database_url = None
        if os.environ.get("DATABASE_URL", "").startswith("postgres"):
            database_url = stack.enter_context(postgres_database(os.environ["DATABASE_URL"], "e2e"))
        figures["backend"] = "postgresql" if database_url else "sqlite"
        figures["channel_layer"] = "redis" if os.environ.get("REDIS_URL") else "in-memory"
        server = LiveServer(
            workdir / "server", database_url=database_url, redis_url=os.environ.get("REDIS_URL"), DEBUG=1
        )
        # make run's steps: migrate, bootstrap_admin (prints the password once), serve.
        server.migrate()
        username, password = admin_password(server.manage("bootstrap_admin", "--base-url", server.url))
        server.start()
        stack.callback(server.stop)
        out(f"server {server.url} (pid {server.pid}, {figures['backend']}, {figures['channel_layer']} channel layer)")
        sampler = RssSampler(server.pid)
        sampler.start()
        stack.callback(sampler.stop)

        from playwright.sync_api import sync_playwright

        playwright = stack.enter_context(sync_playwright())
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, downloads_path=str(workdir / "artifacts")
        )
        stack.callback(browser.close)
        context = browser.new_context(accept_downloads=True)
        page = context.new_page()
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.accept()))

        sign_in(page, server, username, password)
        figures["rss_after_sign_in"] = baseline = sampler.latest()
        browser_at_sign_in = browser_pss()
        out(f"signed in as {username}; server RSS {mib(baseline)}")

        # --- upload until past half, then reload ---
        sampler.phase = "upload"
        page.evaluate(RELOAD_PAST_HALF, [name, size // 2])
        chosen = time.time()
        choose_file(page, original)
        reloaded = wait_in_page(page, RELOADED, None, name, "upload, until half-way")
        upload_id, offset_at_reload = reloaded["uploadId"], reloaded["offset"]
        reload_at = reloaded["at"] / 1000
        check(upload_id is not None, "the row had no upload id")
        figures["upload_before_reload"] = {
            "bytes": offset_at_reload,
            "seconds": reload_at - chosen,
            "mb_s": mb_s(offset_at_reload, reload_at - chosen),
        }
        figures["reload_seconds"] = reloaded["readyAt"] / 1000 - reload_at
        out(
            f"reloaded at {offset_at_reload:,} bytes acknowledged ({figures['upload_before_reload']['mb_s']:.1f} MB/s);"
            f" the new page was ready {figures['reload_seconds']:.2f} s later"
        )

        # --- the reloaded page lists the upload as unfinished ---
        sampler.phase = "resume"
        check(dialogs == ["beforeunload"], f"leaving the page while uploading should warn once; dialogs: {dialogs}")
        listed = page.locator(f"#unfinished-list li[data-upload-id='{upload_id}']")
        listed.wait_for()
        listed_offset = int(listed.get_attribute("data-offset"))
        listed_text = listed.inner_text()
        check(0 < listed_offset < size, f"the unfinished upload is listed at offset {listed_offset}")
        figures["listed_text"] = listed_text
        if f"{name} is being uploaded in another tab or program" in listed_text:
            # The old page's writer publishes its last durable offset as it lets go, after the new page
            # loaded: the page cannot tell that from another tab, and says so for a few seconds.
            figures["notes"].append(f"right after the reload the page listed its own upload as: {listed_text!r}")
        else:
            check(f"{name} is unfinished at" in listed_text, f"unexpected unfinished entry: {listed_text!r}")
        out(f"listed: {listed_text!r}")

        # --- choose the same file again: it must continue the same upload from the server's offset ---
        page.evaluate(WATCH_ROWS)
        resumed_at = time.time()
        choose_file(page, original)
        state = wait_in_page(page, RESUMED, [name, upload_id], name, "resume")
        check(state["status"] not in ("failed", "cancelled"), f"resume: {state['status']}: {state['message']!r}")
        check(state["uploadId"] == upload_id, f"a new upload {state['uploadId']} was started instead of {upload_id}")
        resumed_from = state["resumedFrom"]
        check(resumed_from > 0, "the upload restarted from 0")
        check(resumed_from >= listed_offset, f"resumed from {resumed_from}, below the listed {listed_offset}")
        out(f"resumed {upload_id} from {resumed_from:,} bytes ({resumed_from / size:.1%})")

        # The server re-hashes the part file's prefix before it says "ready": this is the wait for that.
        first_ack = wait_in_page(page, ACKED_PAST, [name, resumed_from], name, "resume")
        state = wait_in_page(page, FINISHED, name, name, "upload, after the reload")
        check(state["status"] == "complete", f"the upload ended {state['status']}: {state['message']!r}")
        completed_at = state["at"] / 1000
        seen = page.evaluate("window.e2eSeen")
        lowest = min((offset for _status, offset in seen), default=None)
        check(lowest is not None and lowest >= resumed_from, f"after resuming the row showed offset {lowest}")
        check(state["sha256"] == sha256, f"the server's sha256 {state['sha256']} is not the original's {sha256}")
        figures["resume"] = {
            "upload_id": upload_id,
            "offset_at_reload": offset_at_reload,
            "listed_offset": listed_offset,
            "resumed_from": resumed_from,
            "sent_during_reload": resumed_from - offset_at_reload,
            "lowest_offset_shown": lowest,
            "statuses_shown": sorted({status for status, _offset in seen}),
        }
        figures["upload_after_reload"] = {
            "bytes": size - resumed_from,
            "seconds": completed_at - resumed_at,
            "mb_s": mb_s(size - resumed_from, completed_at - resumed_at),
            "seconds_to_first_ack": first_ack["at"] / 1000 - resumed_at,
            "mb_s_from_first_ack": mb_s(size - first_ack["offset"], completed_at - first_ack["at"] / 1000),
        }
        figures["server_rss_growth_upload"] = sampler.peak("upload", "resume") - baseline
        out(f"complete at {figures['upload_after_reload']['mb_s']:.1f} MB/s after the reload; sha256 matches")
        if not args.keep:
            original.unlink()  # its sha256 is known; this keeps the peak disk use at ~3x the file

        # --- download it back from My files ---
        page.goto(f"{server.url}/files/")
        link = page.locator("a.download", has_text=name)
        sampler.phase = "download"
        rss_before_download = sampler.latest()
        download_started = time.monotonic()
        with page.expect_download() as download_info:
            link.click()
        download = download_info.value
        download.path()  # returns once Chromium has the whole file
        download_seconds = time.monotonic() - download_started
        sampler.phase = "after"
        check(download.failure() is None, f"the download failed: {download.failure()}")
        check(download.suggested_filename == name, f"downloaded as {download.suggested_filename!r}")
        saved = workdir / "downloaded.bin"
        download.save_as(saved)
        download.delete()  # Playwright's own copy
        saved_size = saved.stat().st_size
        saved_sha256 = file_sha256(saved)
        figures["download"] = {
            "bytes": saved_size,
            "seconds": download_seconds,
            "mb_s": mb_s(saved_size, download_seconds),
            "sha256": saved_sha256,
        }
        figures["server_rss_growth_download"] = sampler.peak("download") - rss_before_download
        figures["server_rss_growth_total"] = sampler.peak("upload", "resume", "download", "after") - baseline
        figures["server_vmhwm"] = proc_status(server.pid)["VmHWM"]
        figures["browser_pss"] = {
            "after_sign_in": browser_at_sign_in,
            "peak_before_reload": sampler.browser_peak("upload"),
            "peak_after_reload": sampler.browser_peak("resume"),
            "peak_download": sampler.browser_peak("download"),
        }
        figures["timeline"] = sampler.timeline
        out(f"downloaded {saved_size:,} bytes at {figures['download']['mb_s']:.1f} MB/s, sha256 {saved_sha256}")
        check(saved_size == size, f"downloaded {saved_size} bytes, not {size}")
        check(saved_sha256 == sha256, "the downloaded bytes differ from the original")
    figures["total_seconds"] = time.monotonic() - started
    figures["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]


def code_version() -> str:
    """The commit the server ran, with "+changes" when the work tree differs from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def machine() -> dict:
    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {
        "nproc": os.cpu_count(),
        "ram_gib": round(int(memory.split()[1]) * 1024 / 2**30, 1),
        "python": platform.python_version(),
        # Anything else running on the machine shares its cores with the server and the browser.
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "chromium": CHROMIUM.resolve().as_posix(),
    }


def report(figures: dict) -> None:
    out()
    out(f"{figures['result']}  size {figures['size']:,} bytes, {figures.get('backend', '?')}, code {figures['code']}")
    if "upload_before_reload" in figures:
        out(f"  upload before reload   {figures['upload_before_reload']['mb_s']:7.1f} MB/s")
    if "resume" in figures:
        resume = figures["resume"]
        share = resume["resumed_from"] / figures["size"]
        out(
            f"  resumed from           {resume['resumed_from']:,} bytes ({share:.1%}; "
            f"the page had {resume['offset_at_reload']:,} acknowledged when it reloaded)"
        )
        after = figures["upload_after_reload"]
        out(
            f"  upload after reload    {after['mb_s']:7.1f} MB/s (first ack {after['seconds_to_first_ack']:.1f} s "
            f"after choosing again; {after['mb_s_from_first_ack']:.1f} MB/s from there)"
        )
    if "download" in figures:
        out(f"  download               {figures['download']['mb_s']:7.1f} MB/s")
        out(
            f"  server RSS growth      upload {mib(figures['server_rss_growth_upload'])}, "
            f"download {mib(figures['server_rss_growth_download'])}, "
            f"overall {mib(figures['server_rss_growth_total'])} (over {mib(figures['rss_after_sign_in'])})"
        )
    if "browser_pss" in figures:
        browser = figures["browser_pss"]
        out(
            f"  Chromium PSS           after sign-in {mib(browser['after_sign_in'])}, "
            f"peak uploading {mib(browser['peak_before_reload'])} before the reload, "
            f"{mib(browser['peak_after_reload'])} after it; peak download {mib(browser['peak_download'])}"
        )
    if "total_seconds" in figures:
        out(f"  total                  {figures['total_seconds']:.1f} s")
    for note in figures["notes"]:
        out(f"  note: {note}")
    if figures.get("failure"):
        out(f"  failure: {figures['failure']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=REFERENCE_SIZE, help=f"bytes (default {REFERENCE_SIZE:,})")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (file, download, server)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--workdir", type=Path, help="parent of the working folder (default: the temp folder)")
    args = parser.parse_args()
    if args.size < 4 * MiB:
        parser.error("--size must be at least 4 MiB: the reload happens half-way through an upload in progress")
    if not CHROMIUM.exists():
        parser.error(f"{CHROMIUM} is missing: apt-get install chromium")

    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    # Original + the server's copy + Chromium's download + the saved copy, less the original once it is
    # uploaded (unless --keep), plus room for the database and logs.
    needed = args.size * (4 if args.keep else 3) + 512 * MiB
    free = shutil.disk_usage(parent).free
    if free < needed:
        parser.error(f"{parent} has {mib(free)} free; this run needs about {mib(needed)}")

    workdir = Path(tempfile.mkdtemp(prefix="ddx-e2e-", dir=parent))
    figures = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code": code_version(),
        "size": args.size,
        "workdir": str(workdir),
        "notes": [],
    }
    out(f"working in {workdir}")
    try:
        run(args, workdir, figures)
        figures["result"] = "PASS"
    except Exception as error:  # a bench script: any error is a FAIL with its reason, then the figures so far
        figures["result"] = "FAIL"
        figures["failure"] = f"{type(error).__name__}: {error}"
        if not isinstance(error, Failure):
            traceback.print_exc()
        log = workdir / "server" / "server.log"
        if log.exists():
            out("last lines of the server log:")
            out("\n".join(log.read_text(errors="replace").splitlines()[-20:]))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["result"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
