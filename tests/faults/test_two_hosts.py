"""Two server processes sharing PostgreSQL, Redis and storage: uploads move between them, limits hold across them.

Each host is a ``manage.py serve`` of its own (its own spool folder on s3);
nothing but the database, Redis and the storage is shared, as on two machines.
A load balancer that moves a client to the other host is a TCP proxy whose
target changes while the client's connection is reset: the client resumes on
the other host from the offset the database holds.
"""

import logging
import random
import threading
import time
from collections import Counter

import pytest

from tests.faults.cluster import Client, MiB, download_sha256, source, verify_upload, wait_for
from tests.faults.conftest import scaled
from tests.faults.tally import TALLY
from tests.support.tcp_proxy import TcpProxy

log = logging.getLogger(__name__)

SWITCHES = scaled(3, 8)
SIZE = scaled(16, 48) * MiB


@pytest.mark.parametrize("transport", ["ws", "tus"])
def test_an_upload_moved_between_hosts_at_random_offsets_resumes_on_each_and_completes(cluster, transport, tmp_path):
    deployment = cluster()
    a, b = deployment.host("a"), deployment.host("b")
    src = source(tmp_path, f"moving-{transport}.bin", SIZE)
    rng = random.Random()
    targets = sorted(rng.sample(range(SIZE // 10, SIZE * 9 // 10), SWITCHES))
    with TcpProxy("127.0.0.1", a.port) as balancer:
        balancer.limit(4 * MiB)
        client = Client(transport, balancer.via(a.url), deployment.backend.alice_token, src, tmp_path / "client.log")
        try:
            on = a
            for target in targets:
                wait_for(
                    lambda t=target: deployment.offset_of(src.path.name) >= t or not client.alive(),
                    f"offset {target}",
                    120,
                )
                assert client.alive(), client.output()
                on = b if on is a else a
                balancer.retarget(on.port)
                balancer.reset()  # the client's connection drops; its next one reaches the other host
                TALLY.fault("moved to the other host mid-upload")
                log.info("moved to %s at offset %d", on.url, deployment.offset_of(src.path.name))
            assert client.wait() == 0, client.output()
        finally:
            client.kill()
    verify_upload(deployment, a, deployment.backend.alice_token, client.upload_id, src)
    # Both hosts wrote part of it: the resume really happened on the other process.
    assert deployment.writers_of(client.upload_id) == {"a", "b"}
    assert deployment.settle_slots() == []
    assert deployment.internal_errors() == []


GLOBAL_SLOTS, USER_SLOTS = 3, 2


def test_global_and_per_user_limits_hold_with_clients_spread_over_both_hosts(cluster, tmp_path):
    deployment = cluster(DIRECTDRIVEX_GLOBAL_UPLOAD_SLOTS=GLOBAL_SLOTS, DIRECTDRIVEX_USER_UPLOAD_SLOTS=USER_SLOTS)
    hosts = [deployment.host("a"), deployment.host("b")]
    tokens = {"alice": deployment.backend.alice_token}
    tokens.update({name: deployment.user(name) for name in ("bob", "carol")})
    per_user = scaled(3, 5)
    seen_total, seen_user, stop = [], Counter(), threading.Event()

    def sample():
        # What the database holds, ten times a second, for as long as the clients run.
        while not stop.is_set():
            rows = deployment.query(
                "SELECT u.username, count(*) FROM uploads_slot s JOIN auth_user u ON u.id = s.user_id "
                "WHERE s.released_at IS NULL AND s.kind = 'upload' GROUP BY u.username"
            )
            seen_total.append(sum(n for _name, n in rows))
            for name, n in rows:
                seen_user[name] = max(seen_user[name], n)
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients, proxies = [], []
    try:
        for index in range(per_user * len(tokens)):
            name = list(tokens)[index % len(tokens)]
            host = hosts[index % 2]
            proxy = TcpProxy("127.0.0.1", host.port)
            proxy.limit(2 * MiB)  # each upload lasts a few seconds: they overlap
            proxies.append(proxy)
            src = source(tmp_path, f"limits-{index}.bin", 4 * MiB + index)
            transport = ("ws", "tus")[index % 2 if index < 2 else (index // 2) % 2]
            clients.append(Client(transport, proxy.via(host.url), tokens[name], src, tmp_path / f"c{index}.log"))
        codes = [client.wait() for client in clients]
    finally:
        stop.set()
        sampler.join(5)
        for client in clients:
            client.kill()
        for proxy in proxies:
            proxy.close()
    assert codes == [0] * len(clients), "\n\n".join(c.output() for c in clients)
    TALLY.check("global and per-user slot limits across hosts", len(seen_total))
    assert max(seen_total) <= GLOBAL_SLOTS, seen_total
    assert max(seen_user.values()) <= USER_SLOTS, seen_user
    # The limits were reached, not merely respected by a light load.
    assert max(seen_total) == GLOBAL_SLOTS, seen_total
    for client in clients:
        token = tokens[list(tokens)[clients.index(client) % len(tokens)]]
        verify_upload(deployment, hosts[0], token, client.upload_id, client.src)
    assert deployment.settle_slots() == []
    assert deployment.internal_errors() == []


def test_two_hosts_behind_nginx_serve_every_upload_and_download(cluster, tmp_path):
    """nginx balances over both hosts; a finished file downloads whole through nginx, whichever host answers."""
    deployment = cluster()
    a, _b = deployment.host("a"), deployment.host("b")
    nginx = deployment.behind_nginx()
    sources = [source(tmp_path, f"nginx-{i}.bin", 2 * MiB + i) for i in range(4)]
    clients = [
        Client(("ws", "tus")[i % 2], nginx.url, deployment.backend.alice_token, src, tmp_path / f"n{i}.log")
        for i, src in enumerate(sources)
    ]
    codes = [c.wait() for c in clients]
    assert codes == [0] * len(clients), "\n\n".join(c.output() for c in clients)
    for client in clients:
        verify_upload(deployment, a, deployment.backend.alice_token, client.upload_id, client.src)
        path = f"/api/uploads/{client.upload_id}/content"
        assert download_sha256(nginx.url, path, deployment.backend.alice_token) == (200, client.src.sha256)
    used = {entry[3] for entry in nginx.access_log() if entry[3] != "-"}
    assert len(used) == 2, nginx.access_log()  # both upstreams answered
    started = time.monotonic()
    assert deployment.settle_slots() == [], time.monotonic() - started
    assert deployment.internal_errors() == []
