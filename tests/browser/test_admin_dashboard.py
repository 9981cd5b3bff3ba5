"""The operations dashboard in a real browser: it follows the deployment by itself, and its release button works."""

import re

import pytest
from playwright.sync_api import expect

from tests.conftest import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def make_stuck_slots(server, username: str, count: int) -> list[int]:
    """``count`` download slots of ``username`` whose lease ran out 40 s ago, made in the server's database."""
    out = server.manage(
        "shell",
        "-c",
        "from datetime import timedelta;"
        "from django.contrib.auth.models import User;"
        "from django.utils import timezone;"
        "from uploads.models import Slot;"
        "from uploads.services.slots import slot_admit;"
        f"user = User.objects.get(username={username!r});"
        "then = timezone.now() - timedelta(seconds=100);"
        f"print('SLOTS', *[slot_admit(Slot.Kind.DOWNLOAD, user, now=then).pk for _ in range({count})])",
    )
    return [int(pk) for pk in next(line for line in out.splitlines() if line.startswith("SLOTS ")).split()[1:]]


@pytest.fixture
def operator_page(context, live):
    """A superuser, signed in through the admin's login form, on the operations dashboard."""
    live.manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User;"
        "User.objects.filter(username='operator').exists() or "
        f"User.objects.create_superuser('operator', 'operator@example.com', {PASSWORD!r})",
    )
    page = context.new_page()
    page.goto(f"{live.url}/admin/login/?next=/admin/")
    page.get_by_label("Username").fill("operator")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{live.url}/admin/")
    page.get_by_role("link", name="Operations dashboard").click()
    page.wait_for_url(f"{live.url}/admin/uploads/slot/dashboard/")
    return page


def test_a_slot_freed_elsewhere_leaves_the_stuck_list_without_a_reload(operator_page, live):
    [slot] = make_stuck_slots(live, "alice", 1)
    stuck_row = operator_page.locator(f'#dashboard-stuck tr[data-slot-id="{slot}"]')
    # Made after the page loaded: the dashboard finds it by itself.
    expect(stuck_row).to_be_visible(timeout=10_000)
    expect(operator_page.locator("#dashboard-live")).to_have_text(re.compile("Updating live"))
    loads = []
    operator_page.on("load", lambda _page: loads.append(1))

    live.manage("slots", "reset", "--user", "alice")  # another operator, from a shell

    expect(stuck_row).to_have_count(0, timeout=10_000)
    expect(operator_page.locator(f'#dashboard-releases tr[data-slot-id="{slot}"]')).to_have_attribute(
        "data-reason", "reset"
    )
    expect(operator_page.locator("#dashboard-stuck")).to_contain_text("No stuck slots.")
    assert loads == []  # no reload happened


def test_the_release_button_frees_a_stuck_slot_and_keeps_the_keyboard_in_place_between_refreshes(operator_page, live):
    first, second = make_stuck_slots(live, "alice", 2)
    button = operator_page.locator(f"#release-slot-{first}")
    expect(button).to_be_visible(timeout=10_000)
    button.focus()
    # Two refreshes later the section was replaced (its "stuck for" changes every second), and the
    # keyboard user's focus is still on the same button.
    operator_page.wait_for_timeout(4_500)
    expect(operator_page.locator(f"#release-slot-{first}")).to_be_focused()

    operator_page.keyboard.press("Enter")

    operator_page.wait_for_url(f"{live.url}/admin/uploads/slot/dashboard/")
    expect(operator_page.locator(".messagelist")).to_contain_text("Released 1 slot(s).")
    expect(operator_page.locator(f'#dashboard-stuck tr[data-slot-id="{first}"]')).to_have_count(0)
    expect(operator_page.locator(f'#dashboard-stuck tr[data-slot-id="{second}"]')).to_have_count(1)
    live.manage("slots", "reset", "--user", "alice")
