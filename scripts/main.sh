#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv on first use, then runs `ra compare` (the speed table and a
# short paired quality comparison of baseline and RA; tiny sizes on a CPU, real sizes with CUDA).
# Arguments go to `ra compare`, e.g. `bash scripts/main.sh --steps 60 --out runs/quick`; a first argument that is
# another command runs that instead (`bash scripts/main.sh bench --arms ra_fast`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
  exec ra compare "$@"
fi
exec ra "$@"
