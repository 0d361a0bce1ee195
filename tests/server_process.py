"""``tfbackend serve`` as a real process for end-to-end tests: start, wait for /health, read /metrics, stop."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

STARTUP_TIMEOUT_S = 180
# How conftest.py's shared default-model server is started.
SERVER_MODEL = "smollm2"
SERVER_API_KEY = "test-key"
SERVER_MAX_MODEL_LEN = 512


@dataclass
class Server:
    url: str
    model_dir: Path
    process: subprocess.Popen
    log: IO[str]

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (summed over label sets not pinned by ``labels``)."""
        text = httpx.get(f"{self.url}/metrics").text
        total, found = 0.0, False
        for line in text.splitlines():
            match = re.match(rf"^{re.escape(name)}(?:{{(.*)}})? (\S+)$", line)
            if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
                total, found = total + float(match.group(2)), True
        assert found or labels, f"{name} missing from /metrics"
        return total

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Poll /metrics until no KV block is held; the engine thread updates it right after each step."""
        deadline = time.monotonic() + timeout
        while self.metric("tfbackend:kv_cache_blocks_used") != 0:
            assert time.monotonic() < deadline, "KV blocks still in use"
            time.sleep(0.1)

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(model_dir: Path, *flags: str) -> Iterator[Server]:
    """Run ``tfbackend serve model_dir`` on CPU (float32) with ``flags``; stop it (SIGTERM) afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "tfbackend", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--dtype", "float32", *flags]
    # A file, not a pipe: nobody reads the pipe while tests run, and a full pipe would block the server.
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        server = Server(f"http://127.0.0.1:{port}", model_dir, process, log)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not come up (exit code {process.poll()}):\n"
                                       f"{server.log_text()[-4000:]}")
                try:
                    if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            yield server
        finally:
            stop(process)


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
