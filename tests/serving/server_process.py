"""``ssp-sam serve`` (gunicorn) as a subprocess on a free 127.0.0.1 port, for the tests that need the real HTTP server:
slow clients, oversize bodies, load. Always stopped (SIGTERM to its process group) when the ``with`` block ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        return [int(p) for p in open(path).read().split()]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_server(tmp_path: Path, root: Path = ROOT, **env: str):
    """Start ``ssp-sam serve`` with the given environment on top of a clean one; yield a :class:`Server` once
    ``/health`` answers. ``root``: the checkout whose code is served (benchmarks compare two versions)."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO")}
    full.update({"PORT": str(port), "HOST": "127.0.0.1", "WORKERS": "1", "MODEL_DIR": str(tmp_path / "md"),
                 "SSP_SAM_VARIANT": "tiny", "LOG_LEVEL": "INFO"})
    if Path(root) != ROOT:
        full["PYTHONPATH"] = str(root)
    full.update(env)
    log = tmp_path / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve"], cwd=str(root), env=full,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(port, proc, log)
    try:
        _wait_until_healthy(server)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_until_healthy(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert server.proc.poll() is None, server.log_text()
        try:
            if requests.get(server.base + "/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the server did not start:\n" + server.log_text()
        time.sleep(0.2)
