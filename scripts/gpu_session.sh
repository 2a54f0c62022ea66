#!/usr/bin/env bash
# The GPU session, one part per device command (scripts/gpu_session.py says what each part runs):
#   bash scripts/gpu_session.sh 1 [options]   # results under $OUT (else runs/gpu-session/); exit 1 on a failure
#   bash scripts/gpu_session.sh 2 [options]   # carry .triton-cache/ from part 1 (or its $OUT/triton-cache.tgz)
# The Triton cache is .triton-cache/ in the checkout (git-ignored) unless TRITON_CACHE_DIR names another;
# the driver sets the rest of each step's environment.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: bash scripts/gpu_session.sh PART [options of scripts/gpu_session.py]}"
shift
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"
exec python3 scripts/gpu_session.py --part "$part" --out "${OUT:-runs/gpu-session}" "$@"
