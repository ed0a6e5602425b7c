#!/usr/bin/env bash
# The first run (docs/first-run.md): Label Studio 1.23.2 on 127.0.0.1:${DEMO_LS_PORT:-8080}, the backend with the
# demo model on 127.0.0.1:${DEMO_BACKEND_PORT:-9090} and the trainer, a project of synthetic scenes pre-annotated by
# the model. Ctrl-C stops everything it started.
#   scripts/demo.sh [--fresh]    start (--fresh: forget the previous demo's data in ./demo_data first)
#   scripts/demo.sh --check      the whole loop without a browser, then stop; exit 0 when it worked (CI)
#   scripts/demo.sh stop         stop a demo running in another terminal
# DEMO_PYTHON: the Python with this project's requirements (default: .venv, created by scripts/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${DEMO_PYTHON:-}"
if [[ -z "$PY" ]]; then
  scripts/setup.sh          # creates/updates .venv (a no-op when up to date)
  PY=.venv/bin/python
fi
if [[ "${1:-}" != "stop" ]]; then
  scripts/ensure_label_studio.sh "${LS_VENV:-$ROOT/.venv-ls}"   # installs Label Studio 1.23.2 once (about 1 GB)
fi
# exec: the Python controller takes this process's place, so Ctrl-C and `kill` reach it directly; it runs Label
# Studio, the backend and the trainer each in its own process group and stops all of them on the way out.
exec "$PY" -m scripts.demo "$@"
