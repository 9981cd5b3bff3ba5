"""SIGSTOP a writer past its lease, let the other host take the upload over, SIGCONT: the stale writer lands nothing.

A frozen process is the hard case of fencing: it holds a connection, a lease
that ran out and bytes it has not written yet, and it wakes up believing it
still owns the upload. Everything it does after waking must be refused by the
database (its generation is stale) before it reaches storage.

On a folder the frozen writer still holds its part file's lock, so the other
host waits (busy) until it wakes and lets go; on s3 the other host takes over at
once and the stale writer wakes either in the middle of the new writer's upload
or after it completed. Either way the finished bytes must be exactly the
client's, with no part, tail or multipart upload left behind.
"""

import logging
import signal
import time

import pytest

from tests.faults.cluster import LEASE_SECONDS, Client, MiB, source, verify_upload, wait_for
from tests.faults.tally import TALLY
from tests.support.tcp_proxy import TcpProxy
from tests.test_live_server import freeze

log = logging.getLogger(__name__)

SIZE = 24 * MiB


@pytest.mark.parametrize("transport", ["ws", "tus"])
def test_a_writer_frozen_past_its_lease_and_woken_after_a_takeover_lands_no_byte(cluster, transport, tmp_path):
    deployment = cluster()
    a, b = deployment.host("a"), deployment.host("b")
    deployment.start_reaper()
    src = source(tmp_path, f"frozen-{transport}.bin", SIZE)
    # On s3, WebSocket wakes the stale writer while the new one still uploads; tus, after it completed.
    wake_after_completion = deployment.storage.kind == "s3" and transport == "tus"
    with TcpProxy("127.0.0.1", a.port) as balancer:
        balancer.limit(4 * MiB)
        client = Client(transport, balancer.via(a.url), deployment.backend.alice_token, src, tmp_path / "client.log")
        try:
            wait_for(lambda: deployment.offset_of(src.path.name) >= SIZE // 4, "a quarter durable", 120)
            frozen_at = freeze(a, deployment.backend.database_url)
            offset_at_freeze = deployment.offset_of(src.path.name)
            TALLY.fault("SIGSTOP of the writer past its lease, SIGCONT after a takeover")
            balancer.retarget(b.port)
            balancer.reset()  # the client reconnects, to the other host
            time.sleep(max(0.0, frozen_at + LEASE_SECONDS + 1 - time.monotonic()))
            if deployment.storage.kind == "s3":
                # B takes over at once (the lease ran out): wait until it wrote past the frozen writer's offset.
                if wake_after_completion:
                    assert client.wait() == 0, client.output()
                else:
                    wait_for(lambda: deployment.offset_of(src.path.name) > offset_at_freeze, "B to write", 60)
            a.signal(signal.SIGCONT)
            log.info("woke the stale writer %s, %s", a.url, "after completion" if wake_after_completion else "mid-way")
            assert client.wait() == 0, client.output()
        finally:
            a.signal(signal.SIGCONT)
            client.kill()
    time.sleep(2)  # what the woken writer would still do, it has done by now
    verify_upload(deployment, b, deployment.backend.alice_token, client.upload_id, src)
    # No part file, tail object or multipart upload: nothing the stale writer sent is stored anywhere.
    assert deployment.leftovers() == [], (deployment.leftovers(), deployment.upload_rows())
    assert sorted(deployment.finished_digests().elements()).count(src.sha256) == 1
    assert a.process.poll() is None  # the woken process is alive and serving
    assert deployment.settle_slots() == []
    code, report = deployment.fsck()
    assert code == 0, report
    # Frozen in the middle of its close (a PATCH's body had just ended), a writer wakes past the close's budget
    # and says so at ERROR: the freeze explains that line, nothing else may appear.
    assert deployment.internal_errors(explained=("writer close ran out of time",)) == []
