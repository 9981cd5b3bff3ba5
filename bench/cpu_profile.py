"""Where the server's CPU goes during one upload: per-thread user/system CPU, and optionally py-spy, strace or perf.

    .venv/bin/python bench/cpu_profile.py --file /tmp/bench-1g.bin                  # per-thread CPU only
    .venv/bin/python bench/cpu_profile.py --file F --chunk-size 4194304 --window 33554432
    .venv/bin/python bench/cpu_profile.py --file F --py-spy .venv/bin/py-spy [--py-spy-args --gil]
    .venv/bin/python bench/cpu_profile.py --file F --strace    # syscall counts (slows the upload: no MB/s then)
    .venv/bin/python bench/cpu_profile.py --file F --perf      # native + kernel symbols (perf record -g)

One upload of ``--file`` (made with --size if missing) by the reference client
into ``manage.py serve`` (tests/support/live_server.py, as bench/upload.py),
with DIRECTDRIVEX_CHUNK_SIZE / DIRECTDRIVEX_WINDOW from the options. Before and
after the upload it reads every thread's utime / stime from /proc, so the CPU
splits into the event-loop thread (Twisted, autobahn, Channels, the consumer)
and the other threads (writer: sha256 + pwrite + fsync; the database thread),
each into user and system time. With py-spy the threads are named and the
samples summed per thread and per function (self and inclusive); with
strace, syscall counts per thread are divided by the number of frames and of
write batches (a quarter window each). Output: a text report on stdout and
``--json``. MB/s are 10^6 bytes/s, timed like bench/upload.py from the
server's ``writer ready`` to ``upload.completed`` log lines.
"""

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.upload import UPLOAD_COMPLETE, GiB, MiB, children_cpu, log_seconds, make_file, out  # noqa: E402
from tests.support.live_server import LiveServer, proc_cpu_seconds  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PY_SPY_THREAD = re.compile(r"^thread \((\d+)\): ([^;]*);?")
STRACE_LINE = re.compile(r"^\s*(\d+)\s+(?:\d+\s+)?(\w+)\s*$")  # strace -c -U calls,errors,name


def thread_times(pid: int) -> dict[int, tuple[float, ...]]:
    """{tid: (user s, system s, minor faults, voluntary, involuntary context switches)} for every live thread."""
    times = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line)
            times[int(task.name)] = (
                int(fields[11]) / TICK,
                int(fields[12]) / TICK,
                int(fields[7]),
                int(status["voluntary_ctxt_switches"]),
                int(status["nonvoluntary_ctxt_switches"]),
            )
    return times


def thread_deltas(before: dict, after: dict) -> dict[int, tuple[float, ...]]:
    zero = (0, 0, 0, 0, 0)
    deltas = {tid: tuple(a - b for a, b in zip(now, before.get(tid, zero), strict=True)) for tid, now in after.items()}
    return {tid: delta for tid, delta in deltas.items() if delta[0] + delta[1] > 0}


class Recorder:
    """One profiler attached to the server for the length of the upload."""

    def __init__(self, command: list[str] | None):
        self.process = None
        if command:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(1.5)  # attaching to every thread takes a moment

    def stop(self) -> None:
        if self.process:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def py_spy_summary(raw: Path, names: dict[int, str], top: int) -> dict:
    """Samples per thread; per thread the functions with most self and most inclusive samples."""
    per_thread: collections.Counter = collections.Counter()
    own: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        match = PY_SPY_THREAD.match(stack)
        if not match or not count.isdigit():
            continue
        tid, name = int(match.group(1)), match.group(2)
        names.setdefault(tid, name)
        label = f"{name} ({tid})"
        lines = [frame for frame in stack[match.end() :].split(";") if frame]
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in lines]
        samples = int(count)
        per_thread[label] += samples
        if lines:
            own[label][lines[-1]] += samples  # with its line: which C call inside a Python function
        for frame in set(frames):
            inclusive[label][frame] += samples
    return {
        label: {
            "samples": samples,
            "self": own[label].most_common(top),
            "inclusive": inclusive[label].most_common(top),
        }
        for label, samples in per_thread.most_common()
    }


def strace_summary(path: Path) -> dict[str, int]:
    calls = {}
    for line in path.read_text(errors="replace").splitlines():
        match = STRACE_LINE.match(line)
        if match and match.group(2) != "total":
            calls[match.group(2)] = int(match.group(1))
    return calls


def perf_summary(data: Path, top: int) -> list[str]:
    done = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym", "-g", "none",
         "--percent-limit", "0.5"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.strip() and not line.startswith("#")]
    return lines[:top]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, required=True, help="the file to upload (made with --size if missing)")
    parser.add_argument("--size", type=int, default=GiB, help="bytes, when --file must be made (default 1 GiB)")
    parser.add_argument("--chunk-size", type=int, help="DIRECTDRIVEX_CHUNK_SIZE for the server (default: settings)")
    parser.add_argument("--window", type=int, help="DIRECTDRIVEX_WINDOW for the server (default: settings)")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--py-spy", metavar="PATH", help="record the server with this py-spy binary (--threads)")
    parser.add_argument("--py-spy-args", default="", help="extra py-spy record options, e.g. '--gil' or '--idle'")
    parser.add_argument("--strace", action="store_true", help="count syscalls per thread (strace -c -f)")
    parser.add_argument("--perf", action="store_true", help="perf record -g the server (cpu-clock)")
    parser.add_argument("--top", type=int, default=25, help="functions or symbols listed per thread")
    parser.add_argument("--workdir", type=Path, help="keep the server's folder, log and profiles here")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    if not args.file.exists():
        make_file(args.file, args.size)
    size = args.file.stat().st_size
    settings = dict(item.split("=", 1) for item in args.server_env)
    if args.chunk_size:
        settings["DIRECTDRIVEX_CHUNK_SIZE"] = str(args.chunk_size)
    if args.window:
        settings["DIRECTDRIVEX_WINDOW"] = str(args.window)
    chunk = int(settings.get("DIRECTDRIVEX_CHUNK_SIZE", MiB))
    window = int(settings.get("DIRECTDRIVEX_WINDOW", 8 * MiB))

    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ddx-profile-")))
        workdir.mkdir(parents=True, exist_ok=True)
        server = LiveServer(workdir / "server", redis_url=os.environ.get("REDIS_URL"), **settings)
        server.migrate()
        token = server.create_user("alice")
        server.start()
        stack.callback(server.stop)
        time.sleep(1)
        pid = server.pid
        command = None
        raw, trace, perf_data = workdir / "py-spy.raw", workdir / "strace.txt", workdir / "perf.data"
        if args.py_spy:
            command = [args.py_spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--threads",
                       *args.py_spy_args.split(), "--output", str(raw)]  # fmt: skip
        elif args.strace:
            command = ["strace", "-c", "-f", "-S", "calls", "-U", "calls,errors,name", "-p", str(pid),
                       "-o", str(trace)]  # fmt: skip
        elif args.perf:
            command = ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid), "-o", str(perf_data)]
        recorder = Recorder(command)
        before, cpu_before, client_before = thread_times(pid), proc_cpu_seconds(pid), children_cpu()
        done = subprocess.run(
            [sys.executable, "-m", "ddxclient", "upload", str(args.file), "--server", server.url, "--token", token,
             "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        after, cpu = thread_times(pid), proc_cpu_seconds(pid) - cpu_before
        client_cpu = children_cpu() - client_before
        recorder.stop()
        if done.returncode:
            raise SystemExit(f"client exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        seconds = log_seconds(server.log_path, "writer ready", UPLOAD_COMPLETE)
        gib = size / GiB
        deltas = thread_deltas(before, after)
        figures: dict = {
            "size": size,
            "chunk_size": chunk,
            "window": window,
            "seconds": seconds,
            "mb_s": size / seconds / 1e6,
            "cpu_per_gib": cpu / gib,
            "client_cpu_per_gib": client_cpu / gib,
            "profiler": "py-spy" if args.py_spy else "strace" if args.strace else "perf" if args.perf else None,
            "threads": {},
        }
        names = {pid: "MainThread"}
        if args.py_spy:
            figures["py_spy"] = py_spy_summary(raw, names, args.top)
        for tid, (user, system, faults, voluntary, involuntary) in sorted(
            deltas.items(), key=lambda item: -item[1][0] - item[1][1]
        ):
            figures["threads"][f"{names.get(tid, 'thread')} ({tid})"] = {
                "user_per_gib": user / gib,
                "system_per_gib": system / gib,
                "minor_faults_per_gib": faults / gib,
                "voluntary_switches_per_gib": voluntary / gib,
                "involuntary_switches_per_gib": involuntary / gib,
            }
        figures["exited_threads_per_gib"] = (cpu - sum(delta[0] + delta[1] for delta in deltas.values())) / gib
        if args.strace:
            figures["syscalls"] = strace_summary(trace)
        if args.perf:
            figures["perf"] = perf_summary(perf_data, args.top * 2)

        frames, batches = size / chunk, size / max(chunk, window // 4)
        out(f"{size} bytes, chunk {chunk}, window {window}: {figures['mb_s']:.1f} MB/s in {seconds:.2f} s"
            f"{' (profiler attached: slower than without)' if figures['profiler'] else ''}")  # fmt: skip
        out(f"server CPU {figures['cpu_per_gib']:.2f} s/GiB, client CPU {figures['client_cpu_per_gib']:.2f} s/GiB")
        out("  per GiB:                         user s  system s  minor faults  switches: voluntary  involuntary")
        for label, thread in figures["threads"].items():
            out(f"  {label:32} {thread['user_per_gib']:6.2f}  {thread['system_per_gib']:8.2f}"
                f"  {thread['minor_faults_per_gib']:12.0f}  {thread['voluntary_switches_per_gib']:19.0f}"
                f"  {thread['involuntary_switches_per_gib']:11.0f}")  # fmt: skip
        out(f"  {'threads that exited':32} {figures['exited_threads_per_gib']:5.2f} s/GiB")
        if args.py_spy:
            for label, summary in figures["py_spy"].items():
                out(f"\npy-spy {label}: {summary['samples']} samples")
                out("  self:      " + "\n             ".join(f"{n:6} {f}" for f, n in summary["self"]))
                out("  inclusive: " + "\n             ".join(f"{n:6} {f}" for f, n in summary["inclusive"]))
        if args.strace:
            out(f"\nsyscalls ({frames:.0f} frames, {batches:.0f} write batches):")
            for name, count in sorted(figures["syscalls"].items(), key=lambda item: -item[1]):
                out(f"  {name:20} {count:9}  {count / frames:7.2f}/frame  {count / batches:7.2f}/batch")
        if args.perf:
            out("\nperf (self, by shared object and symbol):")
            for line in figures["perf"]:
                out("  " + line.strip())
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
