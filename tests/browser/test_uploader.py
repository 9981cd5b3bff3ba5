"""The upload page in a real browser against a real server: upload, pause/resume, server restart, reload, refusals.

The page sends each file over tus (docs/tus.md): HEAD /api/tus/<id> for the
server's offset, then one PATCH whose body is the rest of the file. Mid-upload
moments are made exact with SIGSTOP on the server (it stops reading, and the
browser's PATCH stalls once the socket buffers are full), not with timing:
freeze, act, thaw. Refusals the server cannot be made to give on cue are
answered in its place with Playwright's ``page.route``. Every test uploads its
own name (a hard link of one 200 MiB file), so no test resumes another test's
upload by its fingerprint.
"""

import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import MAX_FILE_SIZE, sign_in
from tests.support import stored
from tests.support.files import file_sha256, write_random
from tests.support.live_backend import http_call

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MiB = 1024 * 1024
BIG_SIZE = 200 * MiB
UPLOAD_TIMEOUT_MS = 120_000
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot-upload.png"


@dataclass(frozen=True)
class LocalFile:
    path: Path
    sha256: str
    size: int


def random_file(path: Path, size: int) -> LocalFile:
    return LocalFile(path, write_random(path, size), size)


@pytest.fixture(scope="module")
def big_original(tmp_path_factory) -> LocalFile:
    return random_file(tmp_path_factory.mktemp("big") / "original.bin", BIG_SIZE)


@pytest.fixture
def big_file(big_original, tmp_path, request) -> LocalFile:
    """The 200 MiB file under a name of this test's own (a hard link: no copy, another fingerprint)."""
    path = tmp_path / f"{request.node.name}.bin"
    os.link(big_original.path, path)
    return LocalFile(path, big_original.sha256, big_original.size)


def row_of(page, local: LocalFile):
    return page.locator("#upload-list li.upload", has_text=local.path.name)


def wait_offset_above(page, local: LocalFile, offset: int) -> None:
    """Until the file's row has sent more than ``offset`` bytes (the server's offset plus the PATCH's progress)."""
    page.wait_for_function(
        "([name, offset]) => [...document.querySelectorAll('#upload-list li.upload')].some("
        "  (row) => row.textContent.includes(name) && Number(row.dataset.offset) > offset)",
        arg=[local.path.name, offset],
        timeout=UPLOAD_TIMEOUT_MS,
    )


def choose_files(page, action, *paths: Path) -> None:
    """Open the page's file chooser with ``action`` (a click, a key) and choose ``paths`` in it."""
    # A listener from the start turns Chromium's file chooser interception on before the action;
    # expect_file_chooser alone turns it on lazily, and a fast key press can open the chooser first.
    page.on("filechooser", lambda chooser: None)
    page.evaluate("0")  # a round trip: the interception is on
    with page.expect_file_chooser() as chooser:
        action()
    chooser.value.set_files([str(path) for path in paths])


def api_upload(server, backend, upload_id: str) -> dict:
    return http_call(server, "GET", f"/api/uploads/{upload_id}/", token=backend.alice_token).json()


class TusTraffic:
    """The requests a page sends and the WebSockets it opens, from now on, to tell what went over tus."""

    def __init__(self, page):
        self.requests = []
        self.websockets = []
        page.on("request", lambda request: self.requests.append(request))
        page.on("websocket", lambda socket: self.websockets.append(urlsplit(socket.url).path))

    def tus(self, method: str, upload_id: str | None = None) -> list:
        """The page's ``method`` requests under /api/tus/ (for ``upload_id`` only, if given), in the order sent."""
        return [
            request
            for request in self.requests
            if request.method == method
            and urlsplit(request.url).path.startswith("/api/tus/")
            and (upload_id is None or urlsplit(request.url).path == f"/api/tus/{upload_id}")
        ]

    def heads_answered(self, upload_id: str) -> list[int]:
        """The Upload-Offset of every HEAD the server answered 200, in order."""
        answers = (request.response() for request in self.tus("HEAD", upload_id))
        return [int(answer.headers["upload-offset"]) for answer in answers if answer and answer.status == 200]


def stored_file_with(server, local: LocalFile) -> bool:
    """Whether the server's storage (folder or bucket prefix) holds a finished file with exactly these bytes."""
    return any(stored.finished_sha256(key, server) == local.sha256 for key in stored.finished_keys(server))


def expect_complete(page, server, backend, local: LocalFile) -> str:
    """The row shows 100 % and the server's sha256, which is the file's; the server stored those bytes."""
    row = row_of(page, local)
    expect(row).to_have_attribute("data-status", "complete", timeout=UPLOAD_TIMEOUT_MS)
    expect(row.locator(".upload-status")).to_have_text("Complete · 100 %")
    expect(row.locator(".upload-sha256 code")).to_have_text(local.sha256)
    upload_id = row.get_attribute("data-upload-id")
    upload = api_upload(server, backend, upload_id)
    # The page declares no sha256: the server stores the digest of what it received.
    assert (upload["status"], upload["offset"], upload["sha256"]) == ("complete", local.size, local.sha256)
    assert stored_file_with(server, local)
    return upload_id


def throttle(network, upload_bytes_per_second: int | None) -> None:
    """Limit what the browser sends per second (Chrome DevTools' network emulation); None: no limit."""
    network.send(
        "Network.emulateNetworkConditions",
        {
            "offline": False,
            "latency": 0,
            "downloadThroughput": -1,
            "uploadThroughput": upload_bytes_per_second or -1,
        },
    )


def test_two_files_reach_100_percent_with_the_servers_sha256(page, live, backend, big_file, tmp_path):
    small = random_file(tmp_path / "small.bin", 3 * MiB + 123)
    network = page.context.new_cdp_session(page)
    throttle(network, 32 * MiB)  # long enough to read the speed and ETA
    page.locator("#file-input").set_input_files([str(big_file.path), str(small.path)])

    rate = row_of(page, big_file).locator(".upload-rate")
    expect(rate).to_have_text(re.compile(r"[0-9.]+ (KiB|MiB)/s · about [0-9].* left"))
    wait_offset_above(page, big_file, 16 * MiB)
    live.signal(signal.SIGSTOP)
    try:
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        live.signal(signal.SIGCONT)
    throttle(network, None)

    expect_complete(page, live, backend, big_file)
    expect_complete(page, live, backend, small)
    expect(page.locator("#total-progress")).to_have_attribute("value", "100")
    expect(page.locator("#total-status")).to_contain_text("2 of 2 files complete")


def wait_durable_above_zero(server, backend, upload_id: str) -> int:
    """Until the server has made some bytes of the upload durable (it commits every 32 MiB or 1 s)."""
    deadline = time.monotonic() + UPLOAD_TIMEOUT_MS / 1000
    while (offset := api_upload(server, backend, upload_id)["offset"]) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert offset > 0
    return offset


def test_pause_stops_the_upload_and_resume_continues_from_the_servers_offset(page, live, backend, big_file):
    traffic = TusTraffic(page)
    page.locator("#file-input").set_input_files(str(big_file.path))
    row = row_of(page, big_file)
    wait_offset_above(page, big_file, 8 * MiB)
    upload_id = row.get_attribute("data-upload-id")
    wait_durable_above_zero(live, backend, upload_id)
    live.signal(signal.SIGSTOP)
    try:
        row.locator("button[data-action='pause']").click()  # aborts the PATCH
    finally:
        live.signal(signal.SIGCONT)
    expect(row).to_have_attribute("data-status", "paused")
    upload = api_upload(live, backend, upload_id)
    assert upload["status"] == "uploading" and 0 < upload["offset"] < big_file.size
    assert len(traffic.tus("PATCH", upload_id)) == 1

    row.locator("button[data-action='resume']").click()
    expect_complete(page, live, backend, big_file)
    # Resume asked the server where it stands (HEAD: the aborted PATCH's bytes that arrived are
    # kept) and sent the rest from there, not the whole file again.
    first, resumed = traffic.tus("PATCH", upload_id)
    [resumed_from] = traffic.heads_answered(upload_id)
    assert first.headers["upload-offset"] == "0"
    assert resumed.headers["upload-offset"] == str(resumed_from)
    assert upload["offset"] <= resumed_from < big_file.size
    assert resumed.response().status == 204
    assert resumed.response().headers["upload-offset"] == str(big_file.size)


def expect_resumed_from_the_servers_offset(traffic: TusTraffic, upload_id: str, size: int) -> int:
    """The upload's last PATCH started where the HEAD before it said the server stood, and completed it."""
    patches = traffic.tus("PATCH", upload_id)
    assert len(patches) >= 2 and patches[0].headers["upload-offset"] == "0"
    resumed_from = traffic.heads_answered(upload_id)[-1]
    assert patches[-1].headers["upload-offset"] == str(resumed_from)
    assert patches[-1].response().headers["upload-offset"] == str(size)
    return resumed_from


def test_upload_resumes_by_itself_after_the_server_is_killed_and_restarted(page, live, backend, big_file):
    traffic = TusTraffic(page)
    page.locator("#file-input").set_input_files(str(big_file.path))
    row = row_of(page, big_file)
    wait_offset_above(page, big_file, 8 * MiB)
    live.signal(signal.SIGSTOP)  # mid-upload for sure, then a crash
    live.kill()
    expect(row).to_have_attribute("data-status", "retrying")
    live.restart()
    upload_id = expect_complete(page, live, backend, big_file)
    assert upload_id == row.get_attribute("data-upload-id")
    expect_resumed_from_the_servers_offset(traffic, upload_id, big_file.size)


def test_upload_continues_from_the_servers_offset_after_the_server_is_stopped_and_started_again(
    page, live, backend, big_file
):
    traffic = TusTraffic(page)
    # The browser sends at most 8 MiB/s, so that the server, which reads on for a while after it was
    # told to stop (docs/tus.md), stops before it has the whole file.
    network = page.context.new_cdp_session(page)
    throttle(network, 8 * MiB)
    page.locator("#file-input").set_input_files(str(big_file.path))
    row = row_of(page, big_file)
    wait_offset_above(page, big_file, 8 * MiB)
    upload_id = row.get_attribute("data-upload-id")
    live.stop()  # SIGTERM, as a deployment stops a process
    expect(row).to_have_attribute("data-status", "retrying")
    throttle(network, None)
    live.restart()
    assert expect_complete(page, live, backend, big_file) == upload_id
    # The stopped server made the bytes that had arrived durable: the page did not start over.
    assert expect_resumed_from_the_servers_offset(traffic, upload_id, big_file.size) > 0


def test_a_patch_cut_off_by_the_network_is_retried_from_the_servers_offset(page, live, backend, tmp_path):
    traffic = TusTraffic(page)
    page.route("**/api/tus/*", lambda route: route.abort("connectionreset"), times=1)  # the first PATCH
    local = random_file(tmp_path / "cut-off.bin", 6 * MiB + 1)
    page.locator("#file-input").set_input_files(str(local.path))
    upload_id = expect_complete(page, live, backend, local)
    cut, resumed = traffic.tus("PATCH", upload_id)
    assert cut.failure is not None
    assert traffic.heads_answered(upload_id) == [0]  # asked again before sending again
    assert resumed.headers["upload-offset"] == "0"


def test_after_a_reload_the_unfinished_upload_is_listed_and_the_same_file_continues_from_the_servers_offset(
    page, live, backend, big_file
):
    # Chosen by a click, so the page has a user gesture: Chromium then asks before unloading it.
    choose_files(page, page.locator("#choose-files").click, big_file.path)
    row = row_of(page, big_file)
    wait_offset_above(page, big_file, 0)
    upload_id = row.get_attribute("data-upload-id")
    deadline = time.monotonic() + UPLOAD_TIMEOUT_MS / 1000
    while api_upload(live, backend, upload_id)["offset"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the server has made some bytes durable

    # Leave the page while the server is frozen mid-upload, then open it again: a reload. Not
    # location.reload(): Chromium keeps the old page (and its upload) running until the new one has
    # arrived from the server, so a thawed server could finish the upload first. about:blank needs no
    # server, so the old page and its PATCH are gone before the server runs again.
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.accept()))
    live.signal(signal.SIGSTOP)
    try:
        with page.expect_event("dialog"):
            page.evaluate("setTimeout(() => { location.href = 'about:blank'; }, 0)")
        page.wait_for_url("about:blank")
    finally:
        live.signal(signal.SIGCONT)
    assert dialogs == ["beforeunload"]
    traffic = TusTraffic(page)
    page.goto(f"{live.url}/upload/")

    listed = page.locator(f"#unfinished-list li[data-upload-id='{upload_id}']")
    expect(listed).to_contain_text(f"{big_file.path.name} is unfinished at")
    listed_offset = int(listed.get_attribute("data-offset"))
    assert 0 < listed_offset < big_file.size

    # Every offset the new row shows once it knows where it stands, from its first render on.
    page.evaluate(
        """() => {
        window.seenOffsets = [];
        new MutationObserver((changes) => {
          for (const change of changes) {
            const row = change.target;
            if (row.dataset?.status && row.dataset.status !== 'checking') {
              window.seenOffsets.push(Number(row.dataset.offset));
            }
          }
        }).observe(document.querySelector('#upload-list'),
                   {subtree: true, attributes: true, attributeFilter: ['data-offset', 'data-status']});
      }"""
    )
    page.locator("#file-input").set_input_files(str(big_file.path))
    resumed = row_of(page, big_file)
    expect(resumed).to_have_attribute("data-upload-id", upload_id)
    # The server's offset when the file was chosen: at least the listed one (the server may have made
    # the last bytes of the old connection durable after the new page listed the upload).
    expect(resumed).to_have_attribute("data-resumed-from", re.compile(r"[0-9]+"))
    assert int(resumed.get_attribute("data-resumed-from")) >= listed_offset
    expect(listed).to_have_count(0)
    expect_complete(page, live, backend, big_file)
    seen = page.evaluate("window.seenOffsets")
    assert seen and min(seen) >= listed_offset > 0
    # The new page asked the server (HEAD) and sent only the rest of the file, in one PATCH.
    [resumed_from] = traffic.heads_answered(upload_id)
    [patch] = traffic.tus("PATCH", upload_id)
    assert patch.headers["upload-offset"] == str(resumed_from)
    assert resumed.get_attribute("data-resumed-from") == str(resumed_from)
    assert resumed_from >= listed_offset


# Counts the bytes the page's scripts read from Blobs and Files (what File.slice + arrayBuffer did).
COUNT_BYTES_READ_IN_JS = """() => {
  window.bytesReadInJs = 0;
  for (const name of ["arrayBuffer", "bytes", "text", "stream"]) {
    const original = Blob.prototype[name];
    if (!original) continue;
    Blob.prototype[name] = function (...args) {
      window.bytesReadInJs += this.size;
      return original.apply(this, args);
    };
  }
  for (const name of ["readAsArrayBuffer", "readAsBinaryString", "readAsDataURL", "readAsText"]) {
    const original = FileReader.prototype[name];
    FileReader.prototype[name] = function (blob, ...args) {
      window.bytesReadInJs += blob.size;
      return original.call(this, blob, ...args);
    };
  }
}"""


def test_the_file_goes_as_one_tus_patch_whose_body_javascript_never_reads(page, live, backend, tmp_path):
    traffic = TusTraffic(page)
    page.evaluate(COUNT_BYTES_READ_IN_JS)
    local = random_file(tmp_path / "over-tus.bin", 40 * MiB + 5)
    page.locator("#file-input").set_input_files(str(local.path))
    upload_id = expect_complete(page, live, backend, local)

    [patch] = traffic.tus("PATCH")
    assert urlsplit(patch.url).path == f"/api/tus/{upload_id}"
    headers = patch.headers
    assert headers["content-type"] == "application/offset+octet-stream"
    assert headers["upload-offset"] == "0"
    assert headers["tus-resumable"] == "1.0.0"
    assert headers["x-csrftoken"]
    answer = patch.response()
    assert (answer.status, answer.headers["upload-offset"]) == (204, str(local.size))
    assert traffic.tus("HEAD") == []  # a new upload starts at 0: nothing to ask
    assert not [path for path in traffic.websockets if path.startswith("/ws/uploads/")]
    # Only the fingerprint's first MiB went through JavaScript; the browser read the body itself.
    assert page.evaluate("window.bytesReadInJs") <= MiB


def refuse_first_patch(page, status: int, code: str, headers: dict[str, str] | None = None) -> None:
    """Answer the page's next request under /api/tus/ (a new upload's first PATCH) in the server's place."""
    body = json.dumps({"code": code, "detail": f"{code} (answered by the test)"})
    headers = {"Tus-Resumable": "1.0.0", **(headers or {})}
    page.route(
        "**/api/tus/*",
        lambda route: route.fulfill(status=status, headers=headers, content_type="application/json", body=body),
        times=1,
    )


def test_an_offset_mismatch_asks_the_server_again_and_continues(page, live, backend, tmp_path):
    traffic = TusTraffic(page)
    refuse_first_patch(page, 409, "offset_mismatch", {"Upload-Offset": "0"})
    local = random_file(tmp_path / "mismatch.bin", 5 * MiB + 3)
    page.locator("#file-input").set_input_files(str(local.path))
    upload_id = expect_complete(page, live, backend, local)
    refused, sent = traffic.tus("PATCH", upload_id)
    assert refused.response().status == 409
    assert traffic.heads_answered(upload_id) == [0]
    assert sent.headers["upload-offset"] == "0"


def test_a_busy_upload_waits_for_retry_after_with_a_message_and_then_continues(page, live, backend, tmp_path):
    refuse_first_patch(page, 423, "busy", {"Retry-After": "2"})
    local = random_file(tmp_path / "busy.bin", 5 * MiB + 3)
    page.locator("#file-input").set_input_files(str(local.path))
    row = row_of(page, local)
    expect(row).to_have_attribute("data-status", "waiting")
    expect(row.locator(".upload-message")).to_have_text(
        re.compile(r"An earlier connection still holds this upload .*; retrying in 2 s\.")
    )
    expect_complete(page, live, backend, local)
    expect(row.locator(".upload-message")).to_have_text("")


def test_a_checksum_mismatch_fails_the_upload_with_a_message(page, live, backend, tmp_path):
    refuse_first_patch(page, 460, "checksum_mismatch")
    local = random_file(tmp_path / "mismatched.bin", 1 * MiB)
    page.locator("#file-input").set_input_files(str(local.path))
    row = row_of(page, local)
    expect(row).to_have_attribute("data-status", "failed")
    expect(row.locator(".upload-message")).to_have_text(
        "The bytes the server received do not match this file (checksum mismatch); the upload failed. Upload it again."
    )
    expect(row.locator("button[data-action='resume']")).to_be_hidden()
    http_call(live, "DELETE", f"/api/uploads/{row.get_attribute('data-upload-id')}/", token=backend.alice_token)


def test_an_upload_cancelled_elsewhere_while_paused_says_so_on_resume(page, live, backend, big_file):
    page.locator("#file-input").set_input_files(str(big_file.path))
    row = row_of(page, big_file)
    wait_offset_above(page, big_file, 4 * MiB)
    live.signal(signal.SIGSTOP)
    try:
        row.locator("button[data-action='pause']").click()
    finally:
        live.signal(signal.SIGCONT)
    expect(row).to_have_attribute("data-status", "paused")
    upload_id = row.get_attribute("data-upload-id")
    assert http_call(live, "DELETE", f"/api/uploads/{upload_id}/", token=backend.alice_token).status == 204

    row.locator("button[data-action='resume']").click()  # HEAD: 410 Gone; the API says why
    expect(row).to_have_attribute("data-status", "failed")
    expect(row.locator(".upload-message")).to_have_text(
        "This upload was cancelled elsewhere (another tab, My files or a script); its bytes were removed. "
        "Choose the file again to start over."
    )


def test_cancel_after_confirmation_cancels_the_upload_on_the_server(page, live, backend, big_file):
    # What earlier tests left unfinished (on s3 also a killed server's unrecorded multipart upload,
    # which the reaper aborts later) is theirs: this upload must leave nothing.
    before = set(stored.part_keys(live))
    page.locator("#file-input").set_input_files(str(big_file.path))
    row = row_of(page, big_file)
    wait_offset_above(page, big_file, 4 * MiB)
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    live.signal(signal.SIGSTOP)
    try:
        row.locator("button[data-action='cancel']").click()
    finally:
        live.signal(signal.SIGCONT)
    assert dialogs and big_file.path.name in dialogs[0]
    expect(row).to_have_attribute("data-status", "cancelled")
    upload_id = row.get_attribute("data-upload-id")
    page.wait_for_function(
        "async (id) => (await (await fetch(`/api/uploads/${id}/`)).json()).status === 'cancelled'",
        arg=upload_id,
    )
    # The connection that held the part lets go of it as it ends, maybe just after the DELETE answered.
    deadline = time.monotonic() + 30
    while set(stored.part_keys(live)) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(stored.part_keys(live)) - before


def test_a_finished_upload_downloads_from_my_files_byte_identical_under_its_own_name(page, live, backend, tmp_path):
    # A non-ASCII name: the browser must take it from Content-Disposition's filename*.
    local = random_file(tmp_path / "Résumé 2026 ✓.bin", 24 * MiB + 7)
    page.locator("#file-input").set_input_files(str(local.path))
    expect_complete(page, live, backend, local)

    page.goto(f"{live.url}/files/")
    link = page.locator("a.download", has_text=local.path.name)
    with page.expect_download() as download_info:
        link.click()
    download = download_info.value
    saved = tmp_path / "downloaded.bin"
    download.save_as(saved)

    assert download.failure() is None
    assert download.suggested_filename == local.path.name
    assert saved.stat().st_size == local.size
    assert file_sha256(saved) == local.sha256


def test_too_large_and_quota_refusals_are_shown_as_messages(page, context, live, tmp_path):
    too_large = tmp_path / "too-large.bin"
    with open(too_large, "wb") as handle:
        handle.truncate(MAX_FILE_SIZE + 1)  # sparse: no disk, no memory
    page.locator("#file-input").set_input_files(str(too_large))
    row = page.locator("#upload-list li.upload", has_text="too-large.bin")
    expect(row).to_have_attribute("data-status", "failed")
    expect(row.locator(".upload-message")).to_have_text(
        "too-large.bin is 256 MiB; the largest file this server accepts is 256 MiB."
    )

    bob = sign_in(context, live, "bob")
    two_mib = random_file(tmp_path / "two.bin", 2 * MiB)
    bob.locator("#file-input").set_input_files(str(two_mib.path))
    row = row_of(bob, two_mib)
    expect(row).to_have_attribute("data-status", "failed")
    expect(row.locator(".upload-message")).to_have_text(
        "Not enough space: two.bin needs 2.0 MiB, but only 1.0 MiB of your 1.0 MiB quota is free. "
        "Delete some files to make room."
    )


def test_slots_exhausted_is_shown_with_the_wait_and_posts_no_extra_upload(page, live, backend, tmp_path):
    taken = []
    for number in range(5):  # alice's five upload slots (DIRECTDRIVEX_USER_UPLOAD_SLOTS), held by a script
        body = json.dumps({"filename": f"script-{number}.bin", "size": 1}).encode()
        answer = http_call(live, "POST", "/api/uploads/", body=body, token=backend.alice_token)
        assert answer.status == 201
        taken.append(answer.json()["id"])
    try:
        waiting = random_file(tmp_path / "waiting.bin", 1 * MiB)
        page.locator("#file-input").set_input_files(str(waiting.path))
        row = row_of(page, waiting)
        expect(row).to_have_attribute("data-status", "waiting")
        expect(row.locator(".upload-message")).to_have_text(
            re.compile(r"All your upload slots are in use; starting in [0-9]+ s\.")
        )
        assert row.get_attribute("data-upload-id") is None
        page.on("dialog", lambda dialog: dialog.accept())
        row.locator("button[data-action='cancel']").click()
        expect(row).to_have_attribute("data-status", "cancelled")
    finally:
        for upload_id in taken:
            http_call(live, "DELETE", f"/api/uploads/{upload_id}/", token=backend.alice_token)
    unfinished = http_call(live, "GET", "/api/uploads/?status=uploading", token=backend.alice_token).json()
    assert [upload["filename"] for upload in unfinished] == []


def tab_to(page, selector: str) -> None:
    """Press Tab until ``selector`` has the focus, as a keyboard user would."""
    for _ in range(40):
        if page.evaluate("(selector) => document.activeElement?.matches(selector)", selector):
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {selector}")


def test_picker_and_buttons_work_with_the_keyboard_alone(page, live, backend, big_file):
    tab_to(page, "#choose-files")
    choose_files(page, lambda: page.keyboard.press("Enter"), big_file.path)
    row = row_of(page, big_file)
    wait_offset_above(page, big_file, 4 * MiB)

    live.signal(signal.SIGSTOP)
    try:
        tab_to(page, "#upload-list button[data-action='pause']")
        page.keyboard.press("Enter")
    finally:
        live.signal(signal.SIGCONT)
    expect(row).to_have_attribute("data-status", "paused")

    tab_to(page, "#upload-list button[data-action='resume']")
    page.keyboard.press("Space")
    expect_complete(page, live, backend, big_file)


def test_speed_and_eta_are_moving_averages_with_a_two_second_half_life(page):
    # The page's own module, fed a rate step from 10 to 20 MiB/s at explicit times (ms).
    speed, eta = page.evaluate(
        """async () => {
        const { Meter } = await import('/static/uploads/js/progress.js');
        const meter = new Meter();
        const MiB = 1024 * 1024, total = 1000 * MiB;
        meter.update(0, total, 0);
        meter.update(10 * MiB, total, 1000);  // 10 MiB/s
        const { speed, eta } = meter.update(10 * MiB + 40 * MiB, total, 3000);  // 20 MiB/s for one half-life
        return [speed / MiB, eta];
      }"""
    )
    assert speed == pytest.approx(15)  # halfway from 10 to 20 after one half-life
    assert eta == pytest.approx(99 + 0.5 * ((950 / 15) - 99))  # 990 MiB at 10 MiB/s, then halfway to 950/15
