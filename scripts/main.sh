#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv on first use, then runs `ra compare`
# (speed table and a short quality comparison of baseline and RA; tiny sizes on CPU, real sizes on a GPU).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
exec ra "${@:-compare}"
