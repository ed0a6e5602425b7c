#!/usr/bin/env bash
# Run the backend with gunicorn on 127.0.0.1:${PORT:-9090} (demo model by default).
# Creates .venv on first use. Every setting comes from the environment (docs/backend.md), e.g.
#   LABEL_STUDIO_URL=http://127.0.0.1:8080 LABEL_STUDIO_API_KEY=... scripts/run.sh
# Task images served from this machine or the local network (not through LS) need MEDIA_ALLOW_PRIVATE_NETWORKS=true.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/setup.sh        # creates/updates .venv from the pinned requirements (a no-op when up to date)

export HOST="${HOST:-127.0.0.1}"
export PORT="${PORT:-9090}"
export MODEL_DIR="${MODEL_DIR:-$ROOT/model_dir}"
export SSP_SAM_VARIANT="${SSP_SAM_VARIANT:-demo}"
export WORKERS="${WORKERS:-1}"
export THREADS="${THREADS:-8}"
export LOG_LEVEL="${LOG_LEVEL:-INFO}"
mkdir -p "$MODEL_DIR"

.venv/bin/ssp-sam serve --check >/dev/null   # fail fast on a bad configuration
exec .venv/bin/ssp-sam serve
