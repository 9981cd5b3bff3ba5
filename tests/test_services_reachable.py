"""CI's second run really uses its services: PostgreSQL as the database and Redis as the channel layer.

Each test runs only when its URL is set (.ci/run sets both for the second run)
and then fails, never skips, if the service cannot be reached, so a green run
on "PostgreSQL + Redis" cannot quietly be a run on SQLite and memory.
"""

import asyncio
import os
import uuid

import dj_database_url
import pytest
from channels.layers import get_channel_layer
from channels_redis.core import RedisChannelLayer
from django.db import connection

DATABASE_URL = os.environ.get("DATABASE_URL", "")
REDIS_URL = os.environ.get("REDIS_URL", "")
IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.mark.skipif(not DATABASE_URL, reason="DATABASE_URL is not set: the tests run on SQLite")
@pytest.mark.django_db
def test_database_url_is_the_database_the_tests_use():
    assert connection.settings_dict["ENGINE"] == dj_database_url.parse(DATABASE_URL)["ENGINE"]
    if IN_CI:
        assert connection.vendor == "postgresql", "CI's DATABASE_URL run must be on PostgreSQL"
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


@pytest.mark.skipif(not REDIS_URL, reason="REDIS_URL is not set: the tests use the in-memory channel layer")
async def test_redis_channel_layer_round_trips_a_message():
    layer = get_channel_layer()
    assert isinstance(layer, RedisChannelLayer)
    channel = await layer.new_channel()
    nonce = uuid.uuid4().hex
    await layer.send(channel, {"type": "ci.ping", "nonce": nonce})
    message = await asyncio.wait_for(layer.receive(channel), timeout=10)
    assert message == {"type": "ci.ping", "nonce": nonce}
