"""The upload page view: signed-in only, the limits the uploader reads, no inline script."""

import re

from django.test import Client


def test_upload_page_sends_an_anonymous_visitor_to_sign_in(db):
    response = Client().get("/upload/")
    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/upload/"


def test_upload_page_renders_the_per_user_slot_limit_and_largest_file_for_the_uploader(alice, limits):
    limits(user_upload_slots=3, max_file_size=12345)
    client = Client()
    client.force_login(alice)
    response = client.get("/upload/")
    html = response.content.decode()
    assert response.status_code == 200
    assert 'data-slot-limit="3"' in html
    assert 'data-max-file-size="12345"' in html
    assert 'data-api-url="/api/uploads/"' in html
    assert 'data-tus-url="/api/tus/"' in html  # where the page sends the bytes (tus 1.0)
    # CSP-friendly: every script is an external module, none inline.
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, re.S)
    assert scripts and all(body.strip() == "" for body in scripts)
    assert '<script type="module" src="/static/uploads/js/main.js">' in html
