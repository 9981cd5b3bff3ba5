"""The services under the servers fail: Redis restarts, PostgreSQL restarts, the object store is cut.

Live uploads over both transports are running on two hosts when it happens.
Each must complete after resume with exactly the client's bytes, and no upload
may ever be marked complete with wrong bytes (every completion is compared with
the client's sha256 and read back from storage).
"""

import contextlib
import logging
import time

import pytest

from tests.faults.cluster import Client, Cluster, MiB, Site, Storage, source, verify_upload, wait_for
from tests.faults.services import PrivatePostgres, PrivateRedis
from tests.faults.tally import TALLY
from tests.support.live_backend import Backend
from tests.support.live_server import LiveServer, postgres_database
from tests.support.tcp_proxy import TcpProxy

log = logging.getLogger(__name__)


def progress(cluster: Cluster, clients: list[Client], fraction: float) -> None:
    """Wait until every client's upload has a durable offset of at least ``fraction`` of its size."""

    def there():
        rows = dict(cluster.query('SELECT original_filename, "offset" FROM uploads_upload'))
        return all(rows.get(c.src.path.name, 0) >= c.src.size * fraction for c in clients)

    wait_for(there, f"every upload at {fraction:.0%}", 120)


@contextlib.contextmanager
def slow_links(cluster: Cluster, rate: int):
    """A rate-limited TCP proxy in front of each host: uploads last long enough for a fault to land mid-way."""
    with contextlib.ExitStack() as stack:
        links = [stack.enter_context(TcpProxy("127.0.0.1", host.port)) for host in cluster.hosts.values()]
        for link in links:
            link.limit(rate)
        yield links


def spread(cluster: Cluster, links, token: str, count: int, size: int, tmp_path, label: str) -> list[Client]:
    """``count`` clients, WebSocket and tus in turn, over the hosts in turn (each through its slow link)."""
    hosts = list(cluster.hosts.values())
    return [
        Client(("ws", "tus")[i % 2], links[i % len(links)].via(hosts[i % len(hosts)].url), token,
               source(tmp_path, f"{label}-{i}.bin", size + i), tmp_path / f"{label}-{i}.log")
        for i in range(count)
    ]  # fmt: skip


def run_to_the_end(cluster: Cluster, clients: list[Client], token: str) -> None:
    codes = [c.wait() for c in clients]
    assert codes == [0] * len(clients), "\n\n".join(c.output() for c in clients)
    for client in clients:
        verify_upload(cluster, next(iter(cluster.hosts.values())), token, client.upload_id, client.src)
    # No upload anywhere is complete with other bytes than its client's.
    rows = cluster.query("SELECT original_filename, sha256 FROM uploads_upload WHERE status = 'complete'")
    mine = {c.src.path.name: c.src.sha256 for c in clients}
    assert all(sha == mine[name] for name, sha in rows if name in mine), rows
    TALLY.check("no upload complete with wrong bytes")
    assert cluster.settle_slots() == []


def test_a_redis_restart_under_five_live_uploads_on_two_hosts_loses_none(site, tmp_path):
    with PrivateRedis(tmp_path / "redis") as redis:
        backend = Backend(site.backend.database_url, redis.url, site.backend.alice_token)
        # Six uploads of one user at once: more than the default per-user limit (5) lets live together.
        where = Site(backend, site.storage, site.storage_dir, site.prefix)
        deployment = Cluster(tmp_path / "cluster", where, DIRECTDRIVEX_USER_UPLOAD_SLOTS=10)
        try:
            for name in ("a", "b"):
                deployment.host(name)
            # Three uploads share each link: about 1 MiB/s, 12 s each.
            with slow_links(deployment, 3 * MiB) as links:
                clients = spread(deployment, links, backend.alice_token, 6, 12 * MiB, tmp_path, "redis")
                progress(deployment, clients, 0.05)
                live = sum(c.alive() for c in clients)
                redis.restart()
                TALLY.fault(f"Redis restart under {live} live uploads")
                assert live == len(clients), [c.output() for c in clients]
                run_to_the_end(deployment, clients, backend.alice_token)
            assert deployment.internal_errors() == []
        finally:
            deployment.close()


def test_a_postgresql_restart_mid_upload_loses_nothing(site, tmp_path):
    """The database the hosts share restarts (pg_ctl restart -m fast) while uploads stream into both hosts."""
    storage_dir = tmp_path / "storage"  # a database of its own: its files must not mix with the module's
    with PrivatePostgres() as server, postgres_database(server.url, "restart") as database_url:
        setup = LiveServer(tmp_path / "setup", database_url=database_url)
        setup.migrate()
        backend = Backend(database_url, site.backend.redis_url, setup.create_user("alice"))
        prefix = f"{site.prefix}pg-restart/"
        deployment = Cluster(tmp_path / "cluster", Site(backend, site.storage, storage_dir, prefix))
        try:
            for name in ("a", "b"):
                deployment.host(name)
            with slow_links(deployment, 4 * MiB) as links:
                clients = spread(deployment, links, backend.alice_token, 2, 12 * MiB, tmp_path, "pg")
                progress(deployment, clients, 0.2)
                started = time.monotonic()
                server.restart()
                TALLY.fault("PostgreSQL restart mid-upload")
                log.info("PostgreSQL restarted in %.1f s", time.monotonic() - started)
                run_to_the_end(deployment, clients, backend.alice_token)
            code, report = deployment.fsck()
            assert code == 0, report
        finally:
            deployment.close()


@pytest.mark.parametrize("site", ["s3"], indirect=True)
def test_the_object_store_cut_mid_upload_then_restored_loses_nothing(site, tmp_path):
    """Every host's connection to the bucket goes through one proxy, which is cut for a few seconds."""
    with TcpProxy("127.0.0.1", int(site.storage.endpoint.rsplit(":", 1)[1])) as store:
        through = Storage("s3", store.via(site.storage.endpoint), site.storage.bucket)
        deployment = Cluster(tmp_path / "cluster", Site(site.backend, through, site.storage_dir, site.prefix))
        try:
            for name in ("a", "b"):
                deployment.host(name)
            with slow_links(deployment, 6 * MiB) as links:
                clients = spread(deployment, links, site.backend.alice_token, 3, 20 * MiB, tmp_path, "store")
                progress(deployment, clients, 0.15)
                store.cut()
                TALLY.fault("object store cut mid-upload")
                time.sleep(4)
                assert all(c.alive() for c in clients), [c.output() for c in clients]
                store.restore()
                run_to_the_end(deployment, clients, site.backend.alice_token)
            assert deployment.internal_errors() == []
        finally:
            deployment.close()
