#!/usr/bin/env bash
# The test suite, from a fresh clone: sets up .venv, then runs every test (unit, golden parity, demo-model bars,
# distributed training on 2 CPU processes, PostgreSQL datastore, and the end-to-end test against a real
# Label Studio 1.23.2, which installs itself into .venv-ls on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export SSP_SAM_GOLDEN_DIR=${SSP_SAM_GOLDEN_DIR:-$(cd .. && pwd)/shared/golden}
exec .venv/bin/python -m pytest -q -rs "$@"
