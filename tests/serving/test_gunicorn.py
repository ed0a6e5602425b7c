"""Production entry point: ``ssp-sam serve`` runs gunicorn, which starts, answers, and loads nothing in the master."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gunicorn_serves_health_and_setup(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABEL_STUDIO")}
    env.update({"PORT": str(port), "HOST": "127.0.0.1", "WORKERS": "2", "THREADS": "2",
                "MODEL_DIR": str(tmp_path / "md"), "SSP_SAM_VARIANT": "tiny", "LOG_LEVEL": "INFO"})
    log = tmp_path / "gunicorn.log"
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve"], cwd=str(ROOT), env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                r = requests.get(base + "/health", timeout=1)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        body = r.json()
        assert body["status"] == "UP" and body["model_loaded"] is False
        r = requests.post(base + "/setup", json={"project": "1.1", "hostname": "http://ls:8080",
                                                 "access_token": "tok123456"}, timeout=5)
        assert r.status_code == 200 and r.json() == {"model_version": "tiny-random"}
        # /setup reached one worker; the connection is shared with the other through MODEL_DIR
        assert (tmp_path / "md" / "ls_connection.json").exists()
        r = requests.get(base + "/metrics", timeout=5)
        assert r.status_code == 200 and "serving" in r.json()
        assert "Booting worker" in log.read_text()
        # nothing loaded torch: not the master (no --preload), not the workers (no prediction yet)
        pids = [proc.pid] + [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
        assert len(pids) == 3
        for pid in pids:
            assert "libtorch" not in open(f"/proc/{pid}/maps").read(), pid
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
