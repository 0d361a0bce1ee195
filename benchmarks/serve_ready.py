"""How long ``tfbackend serve`` takes from launch to answering ``/health``, and the CPU time it spent by then.

Run from the repository root: ``python3 benchmarks/serve_ready.py [--runs 3] [-- SERVE FLAGS...]``. The
first run may convert the default model (once per cache); pass ``--runs`` > 1 to see warm starts. The CPU
seconds (user + system, of the server process) tell what a busy machine inflates: on an idle machine the
wall time approaches them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_to_ready(serve_flags: list[str]) -> tuple[float, float]:
    port = free_port()
    command = [sys.executable, "-m", "tfbackend", "serve", "--port", str(port), *serve_flags]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}: {' '.join(command)}")
            if time.perf_counter() - start > TIMEOUT_S:
                raise RuntimeError("the server did not become ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - start, cpu_seconds(process.pid)
            except OSError:
                time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("serve_flags", nargs="*", help="flags for tfbackend serve (after --)")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for run in range(args.runs):
        wall, cpu = time_to_ready(args.serve_flags)
        print(f"run {run + 1}: ready after {wall:.1f} s (the server used {cpu:.1f} CPU s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
