"""Run a real Label Studio 1.23.2 headless on 127.0.0.1 (docs/label-studio.md): used by the e2e test and by
scripts/capture_ls_webhooks.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("LS_VENV", ROOT / ".venv-ls"))
TOKEN = "ci0123456789abcdef0123456789abcdef012345"          # legacy token, applied when the user is created
USER, PASSWORD = "ci@example.com", "ci-password-123"
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><TextArea name="prompt" toName="image" editable="true" '
                'rows="1" placeholder="describe the object"/><BrushLabels name="tag" toName="image">'
                '<Label value="object"/></BrushLabels></View>')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: process exited with {proc.returncode}\n{tail(log)}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} not ready after {timeout} s\n{tail(log)}")


def stop(proc: subprocess.Popen | None) -> None:
    """Stop a process started with ``start_new_session=True`` (its own process group) by its id."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def ensure_ls_venv() -> tuple[bool, str]:
    """Install label-studio==1.23.2 into LS_VENV unless present (scripts/ensure_label_studio.sh)."""
    script = ROOT / "scripts" / "ensure_label_studio.sh"
    try:
        r = subprocess.run(["bash", str(script), str(LS_VENV)], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    ok = r.returncode == 0 and (LS_VENV / "bin" / "label-studio").exists()
    return ok, (r.stderr or r.stdout)[-800:]


def ls_env(data_dir: Path, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": USER,
        "LABEL_STUDIO_PASSWORD": PASSWORD,
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",   # "Authorization: Token" works (also for the backend)
        "ML_BLOCK_LOCAL_IP": "false",                      # an ML backend on 127.0.0.1
        "SSRF_PROTECTION_ENABLED": "false",                # webhooks to 127.0.0.1 (incl. the auto-created one)
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
        "LABEL_STUDIO_HOST": f"http://127.0.0.1:{port}",
    })
    return env


def template_db() -> Path | None:
    """A pre-migrated empty LS database (made once with ``label-studio version``): LS then starts in ~3 s, not ~28 s."""
    tdir = LS_VENV / "e2e-template"
    db = tdir / "label_studio.sqlite3"
    if db.exists():
        return db
    tdir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([str(LS_VENV / "bin" / "label-studio"), "version"], env=ls_env(tdir, 8080), cwd=str(tdir),
                       capture_output=True, text=True, timeout=300)
    return db if r.returncode == 0 and db.exists() else None


def start_label_studio(workdir: Path) -> tuple[subprocess.Popen, str, Path]:
    """Start LS on a free port with a fresh data dir under ``workdir``; returns (process, base URL, log path)."""
    port = free_port()
    data = workdir / "ls-data"
    data.mkdir(parents=True, exist_ok=True)
    template = template_db()
    if template is not None:
        shutil.copy(template, data / "label_studio.sqlite3")
    log = workdir / "ls.log"
    proc = subprocess.Popen(
        [str(LS_VENV / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
         "--port", str(port)],
        env=ls_env(data, port), cwd=str(workdir), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log
