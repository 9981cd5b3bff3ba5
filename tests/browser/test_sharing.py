"""Share links in a real browser: the owner shares and copies a link, a visitor downloads, the owner revokes.

The visitor is a fresh browser context: no session, no cookie of the owner's.
The file is uploaded on the upload page as the owner would, so its bytes are
the server's own (either storage backend) and its sha256 the server computed.
"""

import time
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import report_csp_violations
from tests.browser.test_uploader import expect_complete, random_file
from tests.support.files import file_sha256

pytestmark = [pytest.mark.browser, pytest.mark.slow]

MiB = 1024 * 1024


@pytest.fixture
def visitor(chromium, csp_violations):
    """A browser context of someone who was given a link: never signed in. Its CSP violations fail the test too."""
    context = chromium.new_context()
    report_csp_violations(context, csp_violations)
    yield context
    context.close()


def uploaded(page, live, backend, tmp_path, name: str, size: int):
    """A file of ``size`` random bytes uploaded on the upload page; its LocalFile and upload id."""
    local = random_file(tmp_path / name, size)
    page.locator("#file-input").set_input_files(str(local.path))
    return local, expect_complete(page, live, backend, local)


def share(page, live, upload_id: str, name: str, *, days: str, max_downloads: str = "", password: str = ""):
    """Fill and send the file's share form on My files; the new link's list item (the newest)."""
    page.goto(f"{live.url}/files/")
    shares = page.locator(f'tr[data-shares-of="{upload_id}"]')
    details = shares.locator("details.shares")
    if details.get_attribute("open") is None:
        shares.locator("summary").click()
    form = shares.locator("form.share-form")
    form.get_by_label("Expires after (days)").fill(days)
    form.get_by_label("Most downloads").fill(max_downloads)
    form.get_by_label("Password").fill(password)
    form.get_by_role("button", name=f"Share {name}").click()
    page.wait_for_url(f"{live.url}/files/")
    expect(page.locator("li.message-success")).to_contain_text(f"Shared {name}.")
    return page.locator(f'tr[data-shares-of="{upload_id}"] li.share-link').first


def downloads_shown(page, link_id: str, expected: str, timeout: float = 15) -> None:
    """Reload My files until the link's download count reads ``expected`` (counted once the last byte went out)."""
    deadline = time.monotonic() + timeout
    cell = page.locator(f"#share-{link_id} .share-downloads")
    while True:
        page.reload()
        if cell.text_content().strip() == expected or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    expect(cell).to_have_text(expected)


def test_a_shared_file_downloads_for_a_visitor_until_the_owner_revokes_the_link(
    page, context, visitor, live, backend, tmp_path
):
    local, upload_id = uploaded(page, live, backend, tmp_path, "shared-report.bin", 3 * MiB + 321)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)

    link = share(page, live, upload_id, local.path.name, days="2", max_downloads="3")

    url = link.locator("input.share-url").input_value()
    assert urlsplit(url).path.startswith("/s/") and url.startswith(live.url)
    expect(page.locator("li.message-success")).to_contain_text(url)
    expect(link.locator(".share-downloads")).to_have_text("0 of 3")
    expect(link.locator(".share-state")).to_have_text("Active")
    link_id = link.get_attribute("data-share-id")

    # Copy link: the clipboard holds the URL, and a live region says so.
    link.get_by_role("button", name=f"Copy link to {local.path.name}").click()
    expect(page.locator("#share-copy-status")).to_have_text("Copied the link.")
    assert page.evaluate("() => navigator.clipboard.readText()") == url

    # The visitor: name, size and sha256, then the file itself, byte for byte.
    visit = visitor.new_page()
    opened = visit.goto(url)
    assert opened.status == 200
    expect(visit.locator("h2.file-name")).to_have_text(local.path.name)
    expect(visit.locator("data.size")).to_have_attribute("value", str(local.size))
    expect(visit.locator("code.sha256")).to_have_text(local.sha256)
    with visit.expect_download() as download_info:
        visit.get_by_role("link", name="Download").click()
    download = download_info.value
    saved = tmp_path / "downloaded.bin"
    download.save_as(saved)
    assert download.failure() is None
    assert download.suggested_filename == local.path.name
    assert file_sha256(saved) == local.sha256

    downloads_shown(page, link_id, "1 of 3")

    page.locator(f"#share-{link_id}").get_by_role("button", name=f"Revoke this link to {local.path.name}").click()
    page.wait_for_url(f"{live.url}/files/")
    expect(page.locator("li.message-success")).to_have_text(
        f"Revoked the link to {local.path.name}; it no longer opens."
    )
    expect(page.locator(f"#share-{link_id} .share-state")).to_have_text("Revoked")

    gone = visit.reload()
    assert gone.status == 404
    expect(visit.locator("h1")).to_have_text("This link does not work")


def test_a_link_with_a_password_shows_the_file_only_after_the_right_password(page, visitor, live, backend, tmp_path):
    local, upload_id = uploaded(page, live, backend, tmp_path, "with-password.bin", 1 * MiB + 5)

    link = share(page, live, upload_id, local.path.name, days="1", password="open sesame")

    expect(link.locator(".share-password")).to_have_text("Required")
    url = link.locator("input.share-url").input_value()
    visit = visitor.new_page()
    visit.goto(url)
    expect(visit.locator("form.share-password")).to_be_visible()
    expect(visit.locator("h2.file-name")).to_have_count(0)

    visit.get_by_label("Password").fill("open says me")
    visit.get_by_role("button", name="Unlock").click()
    expect(visit.get_by_role("alert")).to_have_text("That is not the password of this link.")
    expect(visit.locator("code.sha256")).to_have_count(0)

    visit.get_by_label("Password").fill("open sesame")
    visit.get_by_role("button", name="Unlock").click()
    expect(visit.locator("h2.file-name")).to_have_text(local.path.name)
    expect(visit.locator("code.sha256")).to_have_text(local.sha256)
