#!/usr/bin/env bash
# compute-sanitizer over the fused forward and backward (grid barrier included), on a CUDA GPU:
#   bash tests/sanitize.sh            -> prints each tool's summary line; non-zero exit on any error
set -uo pipefail
cd "$(dirname "$0")/.."
script=$(mktemp --suffix=.py)
cat > "$script" <<'PY'
import os, torch, fastrnn
os.environ["FASTRNN_BACKEND"] = "triton"
for variant in ("resident", "tiled", "stepwise"):
    os.environ["FASTRNN_VARIANT"] = variant
    for dtype in (torch.float32, torch.bfloat16):
        H = 64 if variant == "resident" else 300
        x = torch.randn(6, 19, H, device="cuda", dtype=dtype, requires_grad=True)
        w = (torch.randn(H, H, device="cuda") / H ** 0.5).to(dtype).requires_grad_()
        for reverse, lengths in ((False, None), (True, torch.tensor([6, 3] + [5] * 17))):
            y, h = fastrnn.recurrence(x, None, w, reverse=reverse, lengths=lengths)
            (y.float().sum() + h.float().sum()).backward()
torch.cuda.synchronize()
print("sanitized run finished")
PY
status=0
for tool in memcheck racecheck; do
  out=$(compute-sanitizer --tool "$tool" python "$script" 2>&1)
  echo "$tool: $(echo "$out" | grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitized run' | tr '\n' ' ')"
  echo "$out" | grep -qE '(ERROR|RACECHECK) SUMMARY: 0 ' || status=1
done
rm -f "$script"
exit $status
