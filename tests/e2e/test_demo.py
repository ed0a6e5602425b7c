"""The first run (``scripts/demo.sh``, docs/first-run.md) without a browser, on free ports.

* ``--check`` does everything a first-time user would see and do: Label Studio 1.23.2, the backend and the trainer
  up; a project of synthetic scenes; the model connected (interactive, webhook); predictions retrieved and present
  for every task; corrections submitted through the API; the trainer publishes a version; the backend serves it
  and Label Studio reports it. It exits 0 and leaves no process behind.
* Ctrl-C (SIGINT to the terminal's foreground process group) stops everything the interactive demo started.
* ``scripts/demo.sh stop`` ends what a demo left when its controller was killed (here while it was starting things)
  without a chance to clean up.

"Left behind" is checked independently of the demo's own bookkeeping: every process the demo starts carries
``SSP_SAM_DEMO_DIR=<its folder>`` in its environment, and the test scans /proc for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.labelstudio_headless import ROOT, free_port, port_is_free
from tests.e2e.ls_harness import require_ls_venv

pytestmark = pytest.mark.e2e
READY = "Ctrl-C here"


@pytest.fixture(scope="module")
def ls_venv():
    require_ls_venv()


def demo_env(demo_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEMO_", "SSP_SAM_DEMO"))}
    env.update({"DEMO_PYTHON": sys.executable, "DEMO_DIR": str(demo_dir), "DEMO_LS_PORT": str(free_port()),
                "DEMO_BACKEND_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", **extra})
    return env


def marked(work: Path) -> list[str]:
    """The processes whose environment carries the demo's marker for ``work``: "pid command"."""
    marker = f"SSP_SAM_DEMO_DIR={work}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")[:120].decode(errors="replace")
                found.append(f"{entry.name} {command}")
        except OSError:
            continue
    return found


def assert_nothing_left(work: Path, env: dict) -> None:
    deadline = time.monotonic() + 10        # a process may take a moment to disappear from /proc after its kill
    while marked(work) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marked(work) == [], "processes the demo started are still alive"
    assert port_is_free(int(env["DEMO_LS_PORT"])) and port_is_free(int(env["DEMO_BACKEND_PORT"]))
    assert not (work / "demo.pid").exists()


def start_interactive(demo_dir: Path, env: dict) -> tuple[subprocess.Popen, Path]:
    """``scripts/demo.sh`` as a user starts it in a terminal (its own process group, as a shell's foreground job);
    returns once it printed its instructions."""
    log = demo_dir / "demo.out"
    demo_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    t0 = time.monotonic()
    deadline = t0 + 240
    while READY not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGINT) if proc.poll() is None else None
            pytest.fail(f"the demo did not become ready (exit {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    print(f"demo.sh ready in {time.monotonic() - t0:.1f} s")
    return proc, log


def test_check_runs_the_whole_loop_and_leaves_nothing_running(ls_venv, tmp_path):
    env = demo_env(tmp_path)
    t0 = time.monotonic()
    r = subprocess.run(["bash", "scripts/demo.sh", "--check"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    out = r.stdout + r.stderr
    print(out[-2500:])
    print(f"demo.sh --check: {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, out[-4000:]
    for step in ("tasks pre-annotated", "submitted corrections", "queued the 3 corrections", "the trainer published",
                 "Label Studio reports it", "--check passed", "stopped"):
        assert step in out, step
    assert_nothing_left(tmp_path / "check", env)


def test_ctrl_c_stops_everything(ls_venv, tmp_path):
    env = demo_env(tmp_path, DEMO_TASKS="2")
    proc, log = start_interactive(tmp_path, env)
    assert len(marked(tmp_path)) >= 3, marked(tmp_path)        # Label Studio, the backend, the trainer
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)                           # what the terminal does on Ctrl-C
    assert proc.wait(300) == 0, log.read_text()[-3000:]          # a hang guard, not a time bound
    print(f"stopped {time.monotonic() - t0:.1f} s after Ctrl-C")
    assert "stopped" in log.read_text()
    assert_nothing_left(tmp_path, env)


def test_stop_ends_what_a_killed_demo_left(ls_venv, tmp_path):
    """The controller killed while it starts things (no time to clean up): ``scripts/demo.sh stop`` finds what it
    left by the marker."""
    env = demo_env(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    with open(tmp_path / "demo.out", "wb") as out:
        proc = subprocess.Popen(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 120
    while len(marked(tmp_path)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)                                          # Label Studio, the backend, the trainer started
    started = marked(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)                            # no chance to clean up: its children live on
    proc.wait(10)
    assert len(started) >= 3, (started, (tmp_path / "demo.out").read_text()[-2000:])
    assert marked(tmp_path), "the children should have outlived the killed controller"
    r = subprocess.run(["bash", "scripts/demo.sh", "stop"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "leftover" in r.stdout, (r.stdout, started)
    assert_nothing_left(tmp_path, env)
