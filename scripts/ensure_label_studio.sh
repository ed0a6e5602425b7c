#!/usr/bin/env bash
# Install label-studio==1.23.2 into its own virtual environment (default: .venv-ls at the repository root).
# Idempotent: does nothing when the environment already has that version. Used by tests/e2e.
# Usage: scripts/ensure_label_studio.sh [VENV_DIR]
set -euo pipefail
LS_VERSION="${LS_VERSION:-1.23.2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${LS_VENV:-$ROOT/.venv-ls}}"
PY="${PYTHON:-python3}"

if [ -x "$VENV/bin/label-studio" ] && "$VENV/bin/python" - "$LS_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(0 if version("label-studio") == sys.argv[1] else 1)
PY
then
  echo "label-studio $LS_VERSION already installed in $VENV"
  exit 0
fi

echo "installing label-studio==$LS_VERSION into $VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "label-studio==$LS_VERSION"
"$VENV/bin/python" -c "import label_studio" 
echo "label-studio $LS_VERSION installed in $VENV"
