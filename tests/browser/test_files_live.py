"""Live progress in a real browser: an upload written elsewhere (a script) moves My files and the upload page."""

import asyncio
import os
import threading
from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.test_live_server import create_upload, receive, upload_detail, wait_for, ws_connect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MiB = 1024 * 1024
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshot-files.png"


def send_in_a_thread(server, ws_url: str, data: bytes, upto: int) -> threading.Thread:
    """A script's upload of data[:upto], on its own event loop (Playwright's runs in this thread)."""

    async def send():
        async with ws_connect(server, ws_url) as ws:
            ready = await receive(ws)
            sent = acked = ready["offset"]
            while acked < upto:
                while sent < upto and sent + ready["chunk_size"] - acked <= ready["window"]:
                    await ws.send(data[sent : sent + ready["chunk_size"]])
                    sent += ready["chunk_size"]
                acked = (await receive(ws))["offset"]
            await asyncio.sleep(2)  # the writer's next commit (at most 1 s away) publishes the offset

    thread = threading.Thread(target=lambda: asyncio.run(send()), daemon=True)
    thread.start()
    return thread


def test_an_upload_written_by_a_script_moves_its_row_live(page, live, backend):
    data = os.urandom(8 * MiB)
    upload = create_upload(live, backend.alice_token, "from-a-script.bin", data)
    page.goto(f"{live.url}/files/")
    row = page.locator(f'tr[data-upload-id="{upload["id"]}"]')
    expect(row).to_have_attribute("data-offset", "0")
    expect(page.locator("table.files")).to_have_attribute("data-live", "true")

    writer = send_in_a_thread(live, upload["ws_url"], data, 4 * MiB)
    # The page learns the durable offset through /ws/progress/, without a reload.
    expect(row).to_have_attribute("data-offset", str(4 * MiB), timeout=15_000)
    expect(row.locator(".progress-text")).to_contain_text("50 %")
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    writer.join(30)

    durable = wait_for(lambda: upload_detail(live, backend.alice_token, upload["id"])["offset"], "the offset", 10)
    assert durable == 4 * MiB


def test_the_upload_page_follows_an_upload_started_elsewhere_after_it_loaded(page, live, backend):
    expect(page.locator("#uploader")).to_have_attribute("data-live", "true")
    data = os.urandom(8 * MiB)
    upload = create_upload(live, backend.alice_token, "from-another-program.bin", data)

    writer = send_in_a_thread(live, upload["ws_url"], data, 4 * MiB)
    # No reload: the page hears of it through /ws/progress/ and names it through the API.
    entry = page.locator(f'#unfinished-list li[data-upload-id="{upload["id"]}"]')
    expect(entry).to_have_attribute("data-offset", str(4 * MiB), timeout=15_000)
    expect(entry).to_have_attribute("data-elsewhere", "true")
    expect(entry).to_contain_text("from-another-program.bin is being uploaded in another tab or program: 50 %")
    writer.join(30)
    # Once events stop, it is an unfinished upload that this page could continue.
    expect(entry).to_have_attribute("data-elsewhere", "false", timeout=10_000)
    expect(entry).to_contain_text("is unfinished at 50 %")
