#!/usr/bin/env bash
# Create (once) and activate the project's virtual environment in .venv, CPU build of torch pinned.
# Sourced by scripts/main.sh and scripts/test.sh; idempotent and quiet when already set up.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.ra-installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment at $VENV" >&2
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ ! -f "$stamp" ] || [ "$ROOT/requirements-cpu.txt" -nt "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  echo "[env] installing requirements (torch==2.13.0 CPU build, triton, test tools)" >&2
  python -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-cpu.txt"
  python -m pip install -q --disable-pip-version-check --no-deps -e "$ROOT"
  touch "$stamp"
fi
