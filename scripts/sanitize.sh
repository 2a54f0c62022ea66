#!/usr/bin/env bash
# compute-sanitizer over every cell's fused forward and backward, grid barrier included
# (scripts/sanitize_payload.py: the Elman op in each variant, the LSTM and GRU on two shapes each), on
# a CUDA GPU. memcheck (with PyTorch's caching allocator off, so an overrun past a tensor is caught),
# racecheck and synccheck run at once, one process each:
#   bash scripts/sanitize.sh [ARGS]   -> each tool's summary line; non-zero exit on any error
# (ARGS go to the payload; PYTHON names the interpreter, python3 if unset.)
set -uo pipefail
cd "$(dirname "$0")/.."
logs=$(mktemp -d)
tools=(memcheck racecheck synccheck)
for tool in "${tools[@]}"; do
  uncached=()  # torch may read the variable's mere presence: set it for memcheck alone
  [ "$tool" = memcheck ] && uncached=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  env "${uncached[@]}" compute-sanitizer --tool "$tool" "${PYTHON:-python3}" scripts/sanitize_payload.py "$@" >"$logs/$tool" 2>&1 &
done
wait
status=0
for tool in "${tools[@]}"; do
  echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitized run' "$logs/$tool" | tr '\n' ' ')"
  if ! grep -q 'sanitized run finished' "$logs/$tool" || ! grep -qE '(ERROR|RACECHECK) SUMMARY: 0 ' "$logs/$tool"; then
    status=1
    tail -n 40 "$logs/$tool"
  fi
done
rm -rf "$logs"
echo "sanitize: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
