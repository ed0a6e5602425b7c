"""Run a real Label Studio 1.23.2 headless on 127.0.0.1 (docs/label-studio.md, "Running LS headless").

The one place that knows how: the end-to-end tests (``tests/e2e/ls_harness.py``), the demo (``scripts/demo.py``) and
``scripts/capture_ls_webhooks.py`` import it. It covers the install check (``scripts/ensure_label_studio.sh``), the
environment of the first start (the first user and its legacy token, ML backends and webhooks on 127.0.0.1), a
pre-migrated template database, and starting, waiting for and stopping processes by process group.

A development tool, not part of the product: nothing in ``backend`` or ``ssp_sam`` imports it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import requests

ROOT = Path(__file__).resolve().parents[1]
LS_VENV = Path(os.environ.get("LS_VENV", ROOT / ".venv-ls"))
DB_NAME = "label_studio.sqlite3"


class StartError(RuntimeError):
    """A process did not come up (it exited, or did not answer in time); the message ends with its log's tail."""


@dataclass(frozen=True)
class Login:
    """The first user, created by Label Studio at its first start with this legacy API token."""

    email: str
    password: str
    token: str


class RunningLabelStudio(NamedTuple):
    proc: subprocess.Popen
    url: str
    log: Path


# ---------------------------------------------------------------------------------------------------------------------
# ports, logs, waits, process groups
# ---------------------------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``port`` now (SO_REUSEADDR, as servers bind: connections of a server that
    just stopped, in TIME_WAIT, do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Poll ``url`` until it answers 200; fail early when ``proc`` exits, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartError(f"{url}: the process exited with {proc.returncode}; log {log}:\n{tail(log)}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise StartError(f"{url} did not answer within {timeout:.0f} s; log {log}:\n{tail(log)}")


def start_process(cmd: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own session (so its own process group: ``stop`` ends it with every child), output to
    ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen | None, grace_s: float = 15) -> None:
    """Stop a process started in its own process group (``start_process``, ``start_new_session=True``) with all its
    children: SIGTERM to the group, SIGKILL to what is left after ``grace_s``."""
    if proc is None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        if wait_group(proc, wait_s):
            break
    proc.poll()


def wait_group(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until ``proc`` exited and no process of its group is left; whether that happened within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None and not group_alive(proc.pid):
            return True
        time.sleep(0.1)
    return False


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Label Studio
# ---------------------------------------------------------------------------------------------------------------------

def ensure_ls_venv(venv: Path = LS_VENV) -> tuple[bool, str]:
    """Install label-studio==1.23.2 into ``venv`` unless present (scripts/ensure_label_studio.sh); (ok, message)."""
    script = ROOT / "scripts" / "ensure_label_studio.sh"
    try:
        r = subprocess.run(["bash", str(script), str(venv)], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    ok = r.returncode == 0 and (venv / "bin" / "label-studio").exists()
    return ok, (r.stderr or r.stdout)[-800:]


def ls_env(data_dir: Path, port: int, login: Login) -> dict:
    """The environment of ``label-studio start``: at the first start in ``data_dir`` LS creates ``login``'s user with
    its legacy token (legacy tokens are off for a new organisation unless enabled then)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "DJANGO"))}
    env.update({
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
        "LABEL_STUDIO_USERNAME": login.email,
        "LABEL_STUDIO_PASSWORD": login.password,
        "LABEL_STUDIO_USER_TOKEN": login.token,
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


def template_db(venv: Path = LS_VENV) -> Path | None:
    """A pre-migrated empty LS database (made once with ``label-studio version``, no user in it): LS then starts in
    ~3 s, not ~28 s."""
    tdir = venv / "e2e-template"
    db = tdir / DB_NAME
    if db.exists():
        return db
    tdir.mkdir(parents=True, exist_ok=True)
    nobody = Login("template@example.com", "unused-password", "")
    r = subprocess.run([str(venv / "bin" / "label-studio"), "version"], env=ls_env(tdir, 8080, nobody),
                       cwd=str(tdir), capture_output=True, text=True, timeout=300)
    return db if r.returncode == 0 and db.exists() else None


def start_label_studio(workdir: Path, login: Login, port: int | None = None, data_dir: Path | None = None,
                       venv: Path = LS_VENV) -> RunningLabelStudio:
    """Start LS on 127.0.0.1:``port`` (a free one by default) with its data in ``data_dir`` (default
    ``workdir/ls-data``), logging to ``workdir/ls.log``. A data dir without a database gets the template's; one with a
    database is reused as it is (its user and token are those of its first start). Does not wait: see
    ``wait_http(url + "/health", ...)``."""
    port = port or free_port()
    data = data_dir or workdir / "ls-data"
    data.mkdir(parents=True, exist_ok=True)
    template = template_db(venv)
    if template is not None and not (data / DB_NAME).exists():
        shutil.copy(template, data / DB_NAME)
    log = workdir / "ls.log"
    cmd = [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
           "--port", str(port)]
    proc = start_process(cmd, ls_env(data, port, login), workdir, log)
    return RunningLabelStudio(proc, f"http://127.0.0.1:{port}", log)


def browser_session(url: str, login: Login) -> requests.Session:
    """Log in like a browser (the CSRF cookie, then the login form): a session with LS's session cookie."""
    s = requests.Session()
    s.get(url + "/user/login/", timeout=10)
    r = s.post(url + "/user/login/", data={"email": login.email, "password": login.password,
                                          "csrfmiddlewaretoken": s.cookies.get("csrftoken")},
               headers={"Referer": url + "/user/login/"}, timeout=10)
    if r.status_code not in (200, 302) or "sessionid" not in s.cookies:
        raise RuntimeError(f"cannot log in to {url} as {login.email}: HTTP {r.status_code}")
    return s
