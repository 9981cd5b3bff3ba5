"""The Content-Security-Policy in a real browser: the pages and the admin work under it, and it blocks what it should.

The `context` fixture (conftest) fails any browser test whose pages violate
the policy; the first test here shows that this check sees a violation.
"""

import pytest
from playwright.sync_api import expect

from tests.conftest import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The pages a signed-in operator reaches, the admin's forms with their scripts included.
PAGES = [
    "/",
    "/upload/",
    "/files/",
    "/admin/",
    "/admin/uploads/slot/dashboard/",
    "/admin/uploads/slot/",
    "/admin/uploads/upload/",
    "/admin/auth/user/",
    "/admin/auth/user/add/",
    "/admin/password_change/",
]

OPEN_WEBSOCKET = """(url) => new Promise((resolve) => {
  let socket;
  try {
    socket = new WebSocket(url);
  } catch (error) {
    resolve(`thrown: ${error.name}`);
    return;
  }
  socket.onopen = () => { socket.close(); resolve("open"); };
  socket.onerror = () => resolve("error");
})"""


def test_the_check_sees_an_inline_script_and_an_inline_style_added_to_a_page(page, csp_violations):
    ran = page.evaluate(
        """() => {
          window.inlineScriptRan = false;
          const script = document.createElement("script");
          script.textContent = "window.inlineScriptRan = true;";
          document.body.append(script);
          document.body.setAttribute("style", "background: red");
          return window.inlineScriptRan;
        }"""
    )
    page.wait_for_function("() => true")  # a round trip: the violation events have been delivered

    assert ran is False
    events = [text for text in csp_violations if text.startswith("event: ")]
    assert any(text.startswith("event: script-src-elem blocked inline") for text in events), csp_violations
    assert any(text.startswith("event: style-src-attr blocked inline") for text in events), csp_violations
    assert any(text.startswith("console: ") for text in csp_violations), csp_violations
    csp_violations.clear()  # provoked on purpose: not a failure of this test


def test_the_pages_and_the_admin_load_under_the_policy(context, live):
    live.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User;"
        "User.objects.filter(username='csp-operator').exists() or "
        f"User.objects.create_superuser('csp-operator', 'csp-operator@example.com', {PASSWORD!r})",
    )
    page = context.new_page()
    login = page.goto(f"{live.url}/admin/login/?next=/admin/")
    assert "script-src 'self'" in login.headers["content-security-policy"]
    page.get_by_label("Username").fill("csp-operator")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{live.url}/admin/")

    for path in PAGES:
        response = page.goto(f"{live.url}{path}", wait_until="networkidle")
        assert response.status == 200, path
        assert "default-src 'self'" in response.headers["content-security-policy"], path
    # The dashboard's module script ran: it says so once it polls.
    page.goto(f"{live.url}/admin/uploads/slot/dashboard/")
    expect(page.locator("#dashboard-live")).to_contain_text("Updating live", timeout=10_000)
    # Violations, if any, fail this test in the `context` fixture.


def test_websockets_to_the_pages_own_origin_are_allowed_and_to_another_origin_blocked(page, live, csp_violations):
    own = page.evaluate(OPEN_WEBSOCKET, f"ws://127.0.0.1:{live.port}/ws/progress/")
    assert own == "open"
    assert csp_violations == []

    # The same server under another name is another origin: connect-src 'self' refuses it.
    elsewhere = f"ws://localhost:{live.port}/ws/progress/"
    other = page.evaluate(OPEN_WEBSOCKET, elsewhere)
    page.wait_for_function("() => true")

    assert other in ("error", "thrown: SecurityError")
    assert any(text.startswith(f"event: connect-src blocked {elsewhere}") for text in csp_violations), csp_violations
    csp_violations.clear()  # provoked on purpose
