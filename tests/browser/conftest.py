"""Browser tests: Playwright's Python API driving Debian's Chromium against a real Daphne server.

The server is `manage.py serve` in a subprocess (tests.support.live_server)
with DEBUG on, so that it serves the page's static ES modules as `make run`
does. The browser is /usr/bin/chromium (`.ci/run` installs it; `playwright
install` cannot download browsers here and is not needed: the pip package's
driver drives the system browser). Under CI=true a missing browser or
Playwright fails the tests; elsewhere they are skipped with the reason.

Every browser context reports the Content-Security-Policy violations of its
pages, and a test whose pages had any fails: a future inline script, style or
handler, or a connection the policy does not allow, is caught wherever a
browser test happens to load it.
"""

import os

import pytest

from tests.conftest import PASSWORD
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.live_backend import live_backend
from tests.support.live_server import LiveServer

MiB = 1024 * 1024
# Small enough that a too-large refusal needs no huge file, large enough for the 200 MiB upload.
MAX_FILE_SIZE = 256 * MiB
# bob's quota (a UserQuota row): a 2 MiB file does not fit.
BOB_QUOTA = 1 * MiB


def _unavailable(reason: str):
    """CI must run the browser tests: there a missing browser is a failure, elsewhere a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: browser tests must run)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    """The launched headless Chromium, for one module.

    Not for the session: Playwright's sync API keeps its event loop running
    until it is stopped, and pytest-asyncio cannot run the async tests of
    later modules beside a running loop.
    """
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing: pip install -r requirements.txt")
    playwright = sync_playwright().start()
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """The module's database with alice and bob (password PASSWORD); bob has a 1 MiB quota."""
    with live_backend(tmp_path_factory, "browser") as backend:
        setup = LiveServer(
            tmp_path_factory.mktemp("browser-users"), database_url=backend.database_url, redis_url=backend.redis_url
        )
        setup.manage(
            "shell",
            "-c",
            "from django.contrib.auth.models import User;"
            "from uploads.models import UserQuota;"
            f"alice = User.objects.get(username='alice'); alice.set_password({PASSWORD!r}); alice.save();"
            f"bob = User.objects.create_user('bob', password={PASSWORD!r});"
            f"UserQuota.objects.create(user=bob, max_bytes={BOB_QUOTA})",
        )
        yield backend


@pytest.fixture(scope="module")
def server(backend, tmp_path_factory):
    """One Daphne server for the module (a test may kill and restart it on the same port)."""
    live = LiveServer(
        tmp_path_factory.mktemp("browser-server"),
        database_url=backend.database_url,
        redis_url=backend.redis_url,
        DEBUG=1,
        DIRECTDRIVEX_MAX_FILE_SIZE=MAX_FILE_SIZE,
    )
    live.start()
    yield live
    live.stop()


@pytest.fixture
def live(server):
    """The module's server, running (a test before may have stopped it)."""
    if server.process is None or server.process.poll() is not None:
        server.restart()
    return server


# Runs in every document before its own scripts (Playwright's init scripts are not subject to the
# page's CSP) and hands each violation event to the test.
REPORT_CSP_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  window.ddxCspViolation(
    `${event.effectiveDirective} blocked ${event.blockedURI || "inline"} on ${event.documentURI}`
    + ` (${event.sourceFile || "?"}:${event.lineNumber})`
  );
});
"""


def report_csp_violations(context, violations: list[str]) -> None:
    """Append every CSP violation of ``context``'s pages to ``violations``: the event, and Chromium's console line."""

    def console(message):
        if "Content Security Policy" in message.text:
            violations.append(f"console: {message.text}")

    context.expose_function("ddxCspViolation", lambda text: violations.append(f"event: {text}"))
    context.add_init_script(REPORT_CSP_VIOLATIONS)
    context.on("console", console)


def sign_in(context, server: LiveServer, username: str):
    """A page of ``context`` signed in through the login form, on the upload page."""
    page = context.new_page()
    page.goto(f"{server.url}/accounts/login/?next=/upload/")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{server.url}/upload/")
    page.locator("#uploader[data-ready='true']").wait_for()
    return page


@pytest.fixture
def csp_violations():
    """The CSP violations of the test's browser context so far (a test that provokes one clears it)."""
    return []


@pytest.fixture
def context(chromium, csp_violations):
    context = chromium.new_context()
    report_csp_violations(context, csp_violations)
    yield context
    context.close()
    assert not csp_violations, "the pages violated their Content-Security-Policy:\n" + "\n".join(csp_violations)


@pytest.fixture
def page(context, live):
    """alice, signed in, on the upload page."""
    return sign_in(context, live, "alice")
