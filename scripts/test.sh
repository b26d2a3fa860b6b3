#!/usr/bin/env bash
# The test command: sets up .venv on first use, then runs the CPU test suite (GPU-marked tests are skipped
# without CUDA; Triton kernels run under TRITON_INTERPRET=1, set in tests/conftest.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q -n "${RA_TEST_WORKERS:-2}" -p no:cacheprovider "$@"
