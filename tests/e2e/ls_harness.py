"""The tests' Label Studio: a real LS 1.23.2 headless on a free port with a fresh data dir, started by the shared
``scripts/labelstudio_headless.py`` (also used by the demo and scripts/capture_ls_webhooks.py) with the CI user."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts.labelstudio_headless import (LS_VENV, ROOT, Login, RunningLabelStudio, StartError, browser_session,
                                          ensure_ls_venv, free_port, start_label_studio as _start, stop, tail,
                                          wait_http)

__all__ = ["LS_VENV", "ROOT", "StartError", "ensure_ls_venv", "free_port", "stop", "tail", "wait_http", "TOKEN", "USER",
           "PASSWORD", "CI_LOGIN", "LABEL_CONFIG", "start_label_studio", "personal_access_token",
           "require_ls_venv"]

TOKEN = "ci0123456789abcdef0123456789abcdef012345"          # legacy token, applied when the user is created
USER, PASSWORD = "ci@example.com", "ci-password-123"
CI_LOGIN = Login(USER, PASSWORD, TOKEN)
LABEL_CONFIG = ('<View><Image name="image" value="$image"/><TextArea name="prompt" toName="image" editable="true" '
                'rows="1" placeholder="describe the object"/><BrushLabels name="tag" toName="image">'
                '<Label value="object"/></BrushLabels></View>')


def require_ls_venv() -> None:
    """Install Label Studio into .venv-ls if needed; when that cannot be done the test fails under CI (where it must
    run) and is skipped elsewhere, with the reason."""
    ok, msg = ensure_ls_venv()
    if not ok:
        msg = f"cannot create the Label Studio environment (.venv-ls): {msg}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def start_label_studio(workdir: Path) -> RunningLabelStudio:
    """Start LS on a free port with a fresh data dir under ``workdir``; returns (process, base URL, log path)."""
    return _start(workdir, CI_LOGIN)


def personal_access_token(url: str) -> str:
    """A personal access token (a JWT refresh token) of the CI user: logged in like a browser, ``POST /api/token/``."""
    s = browser_session(url, CI_LOGIN)
    r = s.post(url + "/api/token/", headers={"X-CSRFToken": s.cookies.get("csrftoken"), "Referer": url + "/"},
               timeout=10)
    if r.status_code not in (200, 201):
        raise RuntimeError(f"POST /api/token/ answered HTTP {r.status_code}: {r.text[:300]}")
    body = r.json()
    return body.get("token") or body.get("refresh")
