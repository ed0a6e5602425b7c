#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment in .venv: pinned requirements + this project, editable.
# Idempotent: re-running after a requirements change installs only what changed.
# Usage: scripts/setup.sh [--dev]    (--dev adds the test tools of requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
req=requirements.txt
[[ "${1:-}" == "--dev" ]] && req=requirements-dev.txt
stamp=.venv/.installed-$(cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16)-$(basename "$req" .txt)
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if [[ ! -f "$stamp" ]]; then
  echo "[setup] installing $req (torch comes from the local wheel cache; first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$req"
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$stamp"
fi
