"""Network faults between client and server, through the TCP fault proxy: detected, slots released, resumed exactly.

The proxy sits where the network does, between a real client and a server
process: a stall longer than the idle timeout, a cut after a random number of
bytes, a reset at a random moment, a bandwidth cap, and a storm of 50 clients
all reconnecting at once after their connections were reset together. The
server must notice each (an idle connection is closed and its slot released
while the client still waits), and every upload must end byte-identical.
"""

import asyncio
import logging
import random
import time

import pytest

from ddxclient.uploader import Uploader
from tests.faults.cluster import Client, MiB, source, verify_upload, wait_for
from tests.faults.conftest import scaled
from tests.faults.tally import TALLY
from tests.support.tcp_proxy import TcpProxy

log = logging.getLogger(__name__)

IDLE_SECONDS = 3
SIZE = 12 * MiB
STORM_CLIENTS = 50
STORM_RESETS = scaled(2, 5)


def slots_of(cluster, upload_id) -> int:
    (count,) = cluster.query(
        "SELECT count(*) FROM uploads_slot WHERE upload_id = %s AND released_at IS NULL", upload_id
    )[0]
    return count


def started(cluster, client: Client, fraction: float) -> tuple:
    """The client's upload row once its durable offset passed ``fraction`` of the file."""
    want = int(client.src.size * fraction)
    return wait_for(
        lambda: (row := cluster.upload_row(client.src.path.name)) and row.offset >= want and row,
        f"{client.src.path.name} at {want}",
        120,
    )


def finish(cluster, host, client: Client) -> None:
    assert client.wait() == 0, client.output()
    verify_upload(cluster, host, cluster.backend.alice_token, client.upload_id, client.src)
    assert cluster.settle_slots() == []
    assert cluster.internal_errors() == []


@pytest.fixture
def link(cluster, tmp_path):
    """A host with a short idle timeout, and a TCP proxy in front of it that the client goes through."""
    deployment = cluster(DIRECTDRIVEX_IDLE_SECONDS=IDLE_SECONDS)
    host = deployment.host("a")
    # A tus upload keeps its slot between PATCHes for the next one (parked, under its lease): when the stall
    # catches it there, no connection is open to time out, and the lease runs out instead — the reaper frees it.
    deployment.start_reaper()
    with TcpProxy("127.0.0.1", host.port) as proxy:
        proxy.limit(4 * MiB)  # an upload lasts a few seconds: the faults land in its middle
        yield deployment, host, proxy


@pytest.mark.parametrize("transport", ["ws", "tus"])
def test_a_stall_longer_than_the_idle_timeout_frees_the_slot_and_the_client_resumes(link, transport, tmp_path):
    deployment, host, proxy = link
    # Twice the size, stalled in its first 40 %: on s3 the durable offset moves a part (8 MiB) at a time, and
    # the stall must catch the upload with much left to send, not as it completes.
    src = source(tmp_path, f"stall-{transport}.bin", 2 * SIZE)
    client = Client(transport, proxy.via(host.url), deployment.backend.alice_token, src, tmp_path / "client.log")
    try:
        row = started(deployment, client, random.uniform(0.1, 0.4))
        proxy.stall()
        TALLY.fault("network stall longer than the idle timeout")
        stalled_at = time.monotonic()
        # The server gives up on the silent connection by itself and frees the slot, while the client still waits:
        # within the idle timeout, or a lease and a reaper pass for a slot parked between two PATCHes.
        wait_for(lambda: slots_of(deployment, row.id) == 0, "the idle connection's slot to be released", 30)
        log.info("slot released %.1f s into the stall", time.monotonic() - stalled_at)
        assert time.monotonic() - stalled_at >= IDLE_SECONDS - 0.5
        assert deployment.upload_row(src.path.name).status == "uploading"  # freed by the timeout, not by the end
        assert client.alive()
        proxy.restore()
    finally:
        proxy.restore()
    finish(deployment, host, client)


@pytest.mark.parametrize("transport", ["ws", "tus"])
def test_a_connection_cut_after_a_random_number_of_bytes_resumes_byte_identical(link, transport, tmp_path):
    deployment, host, proxy = link
    src = source(tmp_path, f"cut-{transport}.bin", SIZE)
    cut_after = random.randint(64 * 1024, SIZE // 2)
    proxy.stall_after(cut_after)  # every byte past this many waits: the cut comes at exactly that byte
    client = Client(transport, proxy.via(host.url), deployment.backend.alice_token, src, tmp_path / "client.log")
    wait_for(lambda: proxy.state == "stalled", f"{cut_after} bytes to pass", 60)
    proxy.reset()
    proxy.restore()
    TALLY.fault("connection cut after N bytes")
    log.info("cut after %d bytes", cut_after)
    finish(deployment, host, client)


@pytest.mark.parametrize("transport", ["ws", "tus"])
def test_resets_at_random_moments_under_a_bandwidth_cap_resume_byte_identical(link, transport, tmp_path):
    deployment, host, proxy = link
    proxy.limit(2 * MiB)  # a slow link throughout
    TALLY.fault("bandwidth cap (2 MiB/s) for a whole upload")
    src = source(tmp_path, f"reset-{transport}.bin", 6 * MiB)
    client = Client(transport, proxy.via(host.url), deployment.backend.alice_token, src, tmp_path / "client.log")
    for fraction in sorted(random.uniform(0.05, 0.8) for _ in range(scaled(2, 4))):
        started(deployment, client, fraction)
        proxy.reset()
        TALLY.fault("connection reset (RST) mid-upload")
    finish(deployment, host, client)


def test_a_storm_of_50_clients_reconnecting_at_once_all_complete_and_release_every_slot(cluster, tmp_path):
    deployment = cluster(DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS=STORM_CLIENTS, DIRECTDRIVEX_USER_UPLOAD_SLOTS=10)
    hosts = [deployment.host("a"), deployment.host("b")]
    tokens = [deployment.backend.alice_token] + [deployment.user(f"storm{n}") for n in range(1, 5)]
    proxies = [TcpProxy("127.0.0.1", host.port) for host in hosts]
    sources = [source(tmp_path, f"storm-{i}.bin", 512 * 1024 + i) for i in range(STORM_CLIENTS)]

    async def storm():
        uploaders = [
            Uploader(proxies[i % 2].via(hosts[i % 2].url), tokens[i % len(tokens)], progress=False, max_retries=200)
            for i in range(STORM_CLIENTS)
        ]
        tasks = [asyncio.ensure_future(u.upload(str(src.path))) for u, src in zip(uploaders, sources, strict=True)]
        for _ in range(STORM_RESETS):
            await asyncio.sleep(random.uniform(0.5, 2.0))
            for proxy in proxies:
                proxy.reset()  # every client's connection at once: they all come back together
            TALLY.fault("reconnect storm: 50 clients' connections reset at once")
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 600)

    try:
        for proxy in proxies:
            proxy.limit(8 * MiB)  # 25 MiB in all: the resets land while most are still sending
        results = asyncio.run(storm())
        reconnections = sum(proxy.accepted for proxy in proxies)
    finally:
        for proxy in proxies:
            proxy.close()
    outcomes = zip(sources, results, strict=True)
    failures = [(src.path.name, result) for src, result in outcomes if isinstance(result, BaseException)]
    assert failures == []
    assert reconnections > STORM_CLIENTS, reconnections  # they did reconnect
    for i, (src, result) in enumerate(zip(sources, results, strict=True)):
        verify_upload(deployment, hosts[0], tokens[i % len(tokens)], result["id"], src)
    assert deployment.settle_slots() == []
    assert deployment.internal_errors() == []
