"""Download throughput and memory: Daphne streaming a finished upload, nginx via X-Accel-Redirect, nginx static.

    .venv/bin/python bench/download.py                      # 1 GiB, SQLite, 3 interleaved rounds
    .venv/bin/python bench/download.py --size 3624892618    # the reference 3.38 GB case

One file of random bytes is uploaded once (the reference client against a live
server), then, in interleaved rounds, downloaded with curl (to /dev/null) from:

* direct: ``GET /api/uploads/<id>/content`` answered by Daphne itself (uploads/downloads.py: 1 MiB
  blocks, a download slot, HTTP backpressure);
* accel: the same URL through nginx (deploy/nginx.conf.template, via tests/support/nginx.py) in front of
  a server with DIRECTDRIVEX_ACCEL_REDIRECT: the server checks and answers X-Accel-Redirect, nginx sends
  the bytes (sendfile);
* static: nginx serving the same file as a plain static file: the physical anchor;
* link: the same file through a share link, ``GET /s/<token>/download`` without credentials, answered
  by Daphne (issue 15): the owner's download path plus the link's lookup and accounting;
* zip: ``GET /files/zip/?id=<id>`` with a session, a ZIP of the file streamed by zipstream-ng (STORED,
  ZIP64 past 4 GiB): what assembling the archive costs over sending the file.

For each: MB/s (10^6 bytes/s, curl's own figure), server CPU seconds per GiB (Daphne's process; nginx's
master and workers for accel and static, plus Daphne's for accel) and the Daphne server's RSS growth
(VmHWM during the download minus idle). Targets (issue 7): accel >= 0.9x static; direct >= 0.25x static
with Daphne growth <= 32 MiB. Issue 15: link and zip >= 0.9x direct, each with growth <= 32 MiB.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.upload import GiB, MiB, make_file, mib, out  # noqa: E402
from tests.support.live_backend import http_call  # noqa: E402
from tests.support.live_server import LiveServer, proc_cpu_seconds, proc_status  # noqa: E402
from tests.support.nginx import Nginx, nginx_binary  # noqa: E402

TARGET_ACCEL = 0.9
TARGET_DIRECT = 0.25
TARGET_GROWTH = 32 * MiB
TARGET_LINK = 0.9
TARGET_ZIP = 0.9


def nginx_cpu(nginx: Nginx) -> float:
    """CPU seconds of nginx's master and workers."""
    pids = [nginx.process.pid]
    children = subprocess.run(["pgrep", "-P", str(nginx.process.pid)], capture_output=True, text=True).stdout
    pids += [int(pid) for pid in children.split()]
    return sum(proc_cpu_seconds(pid) for pid in pids)


def curl(url: str, token: str | None, cookie: str | None = None) -> float:
    """Download ``url`` to /dev/null; returns bytes/s as curl measured them."""
    command = ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{speed_download}", url]
    if token:
        command[1:1] = ["-H", f"Authorization: Token {token}"]
    if cookie:
        command[1:1] = ["-H", f"Cookie: {cookie}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    return float(done.stdout)


def measure(
    kind: str,
    url: str,
    token: str | None,
    size: int,
    daphne: LiveServer,
    nginx: Nginx | None,
    cookie: str | None = None,
) -> dict:
    idle = proc_status(daphne.pid)["VmRSS"]
    cpu_before = daphne.cpu_seconds() + (nginx_cpu(nginx) if nginx else 0.0)
    speed = curl(url, token, cookie)
    cpu = daphne.cpu_seconds() + (nginx_cpu(nginx) if nginx else 0.0) - cpu_before
    peak = proc_status(daphne.pid)["VmHWM"]
    figures = {"mb_s": speed / 1e6, "cpu_per_gib": cpu / (size / GiB), "daphne_growth": max(0, peak - idle)}
    out(f"  {kind:7} {figures['mb_s']:7.1f} MB/s  server CPU {figures['cpu_per_gib']:.2f} s/GiB  "
        f"Daphne growth {mib(figures['daphne_growth'])}")  # fmt: skip
    return figures


def share_link(server: LiveServer, token: str, upload_id: str) -> str:
    """A share link of the upload without limits: its path, /s/<token>."""
    answer = http_call(server, "POST", f"/api/uploads/{upload_id}/shares/", body=b"{}", token=token)
    return "/s/" + answer.json()["url"].rsplit("/s/", 1)[1]


def upload_once(server: LiveServer, token: str, source: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ddxclient", "upload", str(source), "--server", server.url, "--token", token, "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=True,
    )  # fmt: skip
    # "complete <id> <size> bytes sha256 <hex>"
    return done.stdout.split()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=GiB, help="bytes (default 1 GiB)")
    parser.add_argument("--file", type=Path, help="use (or create) this file")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if nginx_binary() is None:
        raise SystemExit("nginx is not installed (apt-get install nginx)")

    out(f"DirectDriveX download benchmark, {datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ddx-download-")))
        source = args.file or workdir / "download.bin"
        if not source.exists():
            make_file(source, args.size)
        size = source.stat().st_size
        direct = stack.enter_context(LiveServer(workdir / "direct"))
        direct.migrate()
        token = direct.create_user("bench")
        direct.start()
        accel = stack.enter_context(direct.sibling(workdir / "accel", DIRECTDRIVEX_ACCEL_REDIRECT="/_protected/"))
        accel.start()
        upload_id = upload_once(direct, token, source)
        static_root = workdir / "static"
        static_root.mkdir()
        [stored] = (direct.storage / "files").iterdir()
        os.link(stored, static_root / "file.bin")  # the very same bytes, served as a static file
        nginx = stack.enter_context(Nginx(workdir / "nginx", [accel], static_root=static_root))
        nginx.start()

        content = f"/api/uploads/{upload_id}/content"
        link = share_link(direct, token, upload_id)
        session = direct.session_cookie("bench")
        runs = {"direct": [], "accel": [], "static": [], "link": [], "zip": []}
        for round_ in range(1, args.rounds + 1):
            out(f"round {round_} (load {os.getloadavg()[0]:.2f})")
            runs["direct"].append(measure("direct", direct.url + content, token, size, direct, None))
            runs["accel"].append(measure("accel", nginx.url + content, token, size, accel, nginx))
            runs["static"].append(measure("static", nginx.url + "/static/file.bin", None, size, accel, nginx))
            runs["link"].append(measure("link", direct.url + link + "/download", None, size, direct, None))
            zip_url = f"{direct.url}/files/zip/?id={upload_id}"
            runs["zip"].append(measure("zip", zip_url, None, size, direct, None, cookie=session))
            time.sleep(0.5)

    summary = {
        kind: {key: statistics.median(run[key] for run in rows) for key in rows[0]} for kind, rows in runs.items()
    }
    out(f"\n=== summary: {size} bytes ({size / GiB:.2f} GiB), median of {args.rounds} round(s) ===")
    for kind, figures in summary.items():
        out(f"{kind:7} {figures['mb_s']:7.1f} MB/s  server CPU {figures['cpu_per_gib']:.2f} s/GiB  "
            f"Daphne growth {mib(figures['daphne_growth'])}")  # fmt: skip
    static = summary["static"]["mb_s"]
    accel_ratio, direct_ratio = summary["accel"]["mb_s"] / static, summary["direct"]["mb_s"] / static
    growth = max(run["daphne_growth"] for run in runs["direct"])
    out(f"target accel >= {TARGET_ACCEL}x static: {accel_ratio:.2f}x "
        f"{'PASS' if accel_ratio >= TARGET_ACCEL else 'MISS'}")  # fmt: skip
    out(f"target direct >= {TARGET_DIRECT}x static: {direct_ratio:.2f}x "
        f"{'PASS' if direct_ratio >= TARGET_DIRECT else 'MISS'}")  # fmt: skip
    out(f"target Daphne growth (direct, worst round) <= {mib(TARGET_GROWTH)}: {mib(growth)} "
        f"{'PASS' if growth <= TARGET_GROWTH else 'MISS'}")  # fmt: skip
    direct_speed = summary["direct"]["mb_s"]
    for kind, target in (("link", TARGET_LINK), ("zip", TARGET_ZIP)):
        ratio = summary[kind]["mb_s"] / direct_speed
        worst = max(run["daphne_growth"] for run in runs[kind])
        out(f"target {kind} >= {target}x direct: {ratio:.2f}x {'PASS' if ratio >= target else 'MISS'}; "
            f"growth (worst round) {mib(worst)} {'PASS' if worst <= TARGET_GROWTH else 'MISS'}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"size": size, "runs": runs, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
