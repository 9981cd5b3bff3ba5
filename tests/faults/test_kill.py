"""kill -9 of a serving process: at random byte offsets of running uploads, and at each step of finalization.

A crash must lose nothing the server acknowledged as durable, and block nobody
for more than one lease: the client resumes (on the other host, or on the one
restarted) from the server's offset, the upload completes with the client's
sha256, and one lease later no slot is held by the dead process.
"""

import logging
import random
import time

import pytest

from tests.faults.cluster import LEASE_SECONDS, REAPER_INTERVAL, Client, MiB, pid_alive, source, verify_upload, wait_for
from tests.faults.conftest import FULL, scaled
from tests.faults.crashpoint import STEPS
from tests.faults.tally import TALLY
from tests.support.tcp_proxy import TcpProxy

log = logging.getLogger(__name__)

# Per test: uploads running at once, kills spread over them, each upload's size. A bandwidth cap in
# front of nginx makes an upload last long enough to be killed in its middle, at an offset drawn at random.
UPLOADS = scaled(2, 3)
KILLS = scaled(3, 10)
SIZE = scaled(24, 64) * MiB
RATE = 6 * MiB


def holder_pid(cluster, upload_id) -> int | None:
    rows = cluster.query(
        "SELECT holder_process FROM uploads_slot WHERE upload_id = %s AND released_at IS NULL AND holder_process <> ''",
        upload_id,
    )
    return int(rows[0][0].rpartition(":")[2]) if rows else None


@pytest.mark.parametrize("transport", ["ws", "tus"])
def test_kill_9_of_the_serving_host_at_random_offsets_loses_nothing_and_holds_no_slot_past_a_lease(
    cluster, transport, tmp_path
):
    deployment = cluster()
    hosts = {name: deployment.host(name) for name in ("a", "b")}
    deployment.start_reaper()
    nginx = deployment.behind_nginx()
    rng = random.Random()
    sources = [source(tmp_path, f"kill-{transport}-{i}.bin", SIZE) for i in range(UPLOADS)]
    kills, dead, checks = [], set(), []
    with TcpProxy("127.0.0.1", nginx.port) as link:
        link.limit(RATE)
        clients = [
            Client(transport, link.via(nginx.url), deployment.backend.alice_token, src, tmp_path / f"client-{i}.log")
            for i, src in enumerate(sources)
        ]
        # Each upload's kills at byte offsets drawn at random (sorted: an upload moves forward), in its first
        # three quarters so that it is still running when its offset comes.
        plans = {client: [] for client in clients}
        for _ in range(KILLS):
            plans[rng.choice(clients)].append(rng.randint(SIZE // 20, SIZE * 3 // 4))
        for targets in plans.values():
            targets.sort()
        try:
            while any(plans.values()):
                assert any(c.alive() for c in clients if plans[c]), [c.output() for c in clients]
                for client, targets in plans.items():
                    row = deployment.upload_row(client.src.path.name) if targets else None
                    if row is None or row.offset < targets[0]:
                        continue
                    if row.status != "uploading":
                        # It went past its planned offsets while the loop restarted another host: done early.
                        log.info("%s completed before %d planned kills", client.src.path.name, len(targets))
                        targets.clear()
                        continue
                    pid = holder_pid(deployment, row.id)
                    victim = next((h for h in hosts.values() if h.process.poll() is None and h.pid == pid), None)
                    if victim is None:
                        continue  # between writers (a takeover under way): its next holder is killed
                    victim.kill()
                    targets.pop(0)
                    dead.add(pid)
                    kills.append((client.src.path.name, row.offset))
                    checks.append((pid, time.monotonic() + LEASE_SECONDS + 3 * REAPER_INTERVAL + 5))
                    TALLY.fault("kill -9 of the serving host mid-upload")
                    log.info(
                        "kill %d: %s (pid %d) at durable offset %d of %s",
                        len(kills),
                        victim.url,
                        pid,
                        row.offset,
                        row.id,
                    )
                    victim.restart()  # a process manager restarts it; nginx meanwhile sends clients to the other
                # One lease (and a reaper pass) after each crash, the dead process holds nothing.
                while checks and checks[0][1] < time.monotonic():
                    pid, _ = checks.pop(0)
                    assert deployment.settle_slots(dead={pid}, timeout=0) == [], f"pid {pid} still holds slots"
                time.sleep(0.05)
            codes = [c.wait() for c in clients]
        finally:
            for c in clients:
                c.kill()
    assert codes == [0] * len(clients), "\n\n".join(c.output() for c in clients)
    # Nearly every planned kill happened: only an upload that outran the restart of another host skips its last.
    assert len(kills) >= KILLS - UPLOADS, kills
    for c in clients:
        verify_upload(deployment, hosts["a"], deployment.backend.alice_token, c.upload_id, c.src)
    assert deployment.settle_slots(dead=dead) == []
    assert deployment.settle_slots() == []
    assert not any(pid_alive(pid) for pid in dead)
    deployment.fsck_mends()  # what the kills left unread in storage, --repair deletes; nothing else may be found
    assert deployment.internal_errors() == []


# Reduced: each step once on each backend, over one transport; full: both transports.
CRASH_CASES = [
    (step, transport)
    for index, step in enumerate(STEPS)
    for transport in (("ws", "tus") if FULL else (("ws", "tus")[index % 2],))
]


@pytest.mark.parametrize(("step", "transport"), CRASH_CASES)
def test_kill_9_at_each_finalize_step_then_the_upload_completes_on_resume(cluster, step, transport, tmp_path):
    deployment = cluster()
    flag = tmp_path / "crashed"
    host = deployment.host(
        "a", python_args=("-m", "tests.faults.crashpoint"), DDX_CRASH_AT=step, DDX_CRASH_FLAG=str(flag)
    )
    deployment.start_reaper()
    src = source(tmp_path, f"crash-{step}-{transport}.bin", 6 * MiB + 12345)
    client = Client(transport, host.url, deployment.backend.alice_token, src, tmp_path / "client.log")
    try:
        wait_for(lambda: host.process.poll() is not None, f"the host to crash at {step}", 60)
        assert flag.read_text() == step
        TALLY.fault(f"kill -9 at finalize: {step}")
        row = deployment.upload_row(src.path.name)
        # What the crash left: the row still says uploading (the completion was never committed).
        assert row.status == "uploading", row
        # One lease (and a reaper pass) later the dead holder's slot is gone; then what fsck makes of the
        # crash before anyone resumes: whatever it finds, --repair must mend.
        assert deployment.settle_slots(dead={host.pid}) == []
        found_code, found = deployment.fsck()
        if found_code:
            TALLY.check("fsck --repair mends what a crash at a finalize step left")
            repaired_code, repaired = deployment.fsck(repair=True)
            assert repaired_code == 0, repaired
        log.info("fsck after a crash %s: %s", step, deployment.findings(found) if found_code else "nothing")
        started = time.monotonic()
        host.restart()
        assert client.wait() == 0, client.output()
        resumed_after = time.monotonic() - started
    finally:
        client.kill()
    verify_upload(deployment, host, deployment.backend.alice_token, client.upload_id, src)
    assert resumed_after < LEASE_SECONDS + 30, resumed_after
    assert deployment.settle_slots() == []
    deployment.fsck_mends()  # what the kills left unread in storage, --repair deletes; nothing else may be found
    assert deployment.internal_errors() == []
