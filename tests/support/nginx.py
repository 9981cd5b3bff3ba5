"""Debian's nginx in a subprocess, in front of live servers, configured by deploy/nginx.conf.template.

The site file is the template docs/deployment.md shows, rendered with this
run's values (``render``); only the main context around it is the harness's
own: no daemon, its pid file, logs and temp folders in the work folder, so a
run never touches /etc/nginx, /var/log or port 80. Its access log records
each request's status and upstream address (``-`` when nginx answered
itself), so a test can tell what reached the application.
"""

import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.live_server import ROOT, LiveServer, free_port

log = logging.getLogger(__name__)

TEMPLATE = ROOT / "deploy" / "nginx.conf.template"
PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)(?P<before>.*?)\{\{ (?P<name>\w+) \}\}", re.MULTILINE)
# $ddx_loggable_uri: the site's own masked URI (deploy/nginx.conf.template), query string included,
# which the tests match on (it tells requests of one test apart).
ACCESS_LOG_FORMAT = "$request_method $ddx_loggable_uri $status $upstream_addr"


def nginx_binary() -> str | None:
    """Debian installs nginx in /usr/sbin, which is not on every user's PATH."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def render(template: str, values: dict[str, str | list[str]]) -> str:
    """Fill each ``{{ name }}`` of the template; a list becomes one line per item at the placeholder's indent.

    Every placeholder must have a value and every value a placeholder, so the
    template and its callers cannot drift apart silently.
    """
    used = set()

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in values:
            raise KeyError(f"{TEMPLATE.name}: no value for {{{{ {name} }}}}")
        used.add(name)
        value = values[name]
        if isinstance(value, list):
            value = ("\n" + match["indent"]).join(value)
        return match["indent"] + match["before"] + value

    rendered = PLACEHOLDER.sub(fill, template)
    unused = set(values) - used
    if unused:
        raise KeyError(f"{TEMPLATE.name} has no placeholder for {sorted(unused)}")
    return rendered


def main_context(workdir: Path, site: Path) -> str:
    """The nginx.conf around the site file: what /etc/nginx/nginx.conf does on Debian, in the work folder."""
    # A root master drops its workers to `user` (nobody by default), who could not read the
    # pytest temp folders (mode 0700): keep them as the user running the tests.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    temp = {name: workdir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(exist_ok=True)
    return f"""\
daemon off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} info;
{user}
events {{ worker_connections 256; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    log_format ddx '{ACCESS_LOG_FORMAT}';
    # The site file names its own access log ({{{{ access_log }}}}).
    access_log off;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {site};
}}
"""


class Nginx:
    """nginx on 127.0.0.1:<free port> in front of ``upstreams`` (started or not), serving their storage.

    ``s3_endpoint``: the S3 server the s3 location proxies presigned GETs to (the servers' s3 backend's).
    """

    def __init__(
        self,
        workdir: Path,
        upstreams: list[LiveServer],
        *,
        static_root: Path,
        accel_redirect: str = "/_protected/",
        max_request_bytes: int = 1024 * 1024,
        s3_endpoint: str = "http://127.0.0.1:9",
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.values = {
            "upstream_servers": [f"server 127.0.0.1:{server.port};" for server in upstreams],
            "listen": f"listen 127.0.0.1:{self.port};",
            "server_name": "127.0.0.1",
            "max_request_bytes": str(max_request_bytes),
            "static_root": str(static_root),
            "accel_redirect": accel_redirect,
            "storage_dir": str(upstreams[0].storage),
            # The s3 location's store (DIRECTDRIVEX_S3_ENDPOINT_URL); on local storage nothing is sent there.
            "s3_endpoint": s3_endpoint,
            # The tests' own format (main_context): what the assertions parse.
            "access_log": f"{self.workdir / 'access.log'} ddx",
        }
        self.site_path = self.workdir / "directdrivex.conf"
        self.config_path = self.workdir / "nginx.conf"
        self.error_log_path = self.workdir / "error.log"
        self.access_log_path = self.workdir / "access.log"
        self.process: subprocess.Popen | None = None

    def write_config(self) -> None:
        self.site_path.write_text(render(TEMPLATE.read_text(), self.values))
        self.config_path.write_text(main_context(self.workdir, self.site_path))

    def command(self, *args: str) -> list[str]:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        # -e: the error log before the configuration is read (the default, /var/log/nginx, may be unwritable).
        return [binary, "-p", str(self.workdir), "-c", str(self.config_path), "-e", str(self.error_log_path), *args]

    def start(self, timeout: float = 15) -> None:
        self.write_config()
        checked = subprocess.run(self.command("-t", "-q"), capture_output=True, text=True, timeout=timeout)
        if checked.returncode:
            raise RuntimeError(f"nginx -t refused the configuration:\n{checked.stderr}\n{self.site_path.read_text()}")
        # Its own session, so that a stuck master and its workers can be killed together at teardown.
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.error_log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen within {timeout}s:\n{self.error_log()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # fast shutdown: the master stops its workers
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("nginx %s did not stop on SIGTERM: killing its process group", self.process.pid)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def error_log(self) -> str:
        return self.error_log_path.read_text(errors="replace") if self.error_log_path.exists() else "(no error log)"

    def access_log(self) -> list[list[str]]:
        """One ``[method, uri, status, upstream address]`` per request nginx has finished."""
        if not self.access_log_path.exists():
            return []
        return [line.split(" ", 3) for line in self.access_log_path.read_text().splitlines()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
