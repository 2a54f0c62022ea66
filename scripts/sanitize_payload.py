"""What compute-sanitizer watches (``scripts/sanitize.sh`` runs it under memcheck, racecheck and
synccheck): every cell's fused forward and backward, the grid barrier included, fp32 and bf16.

    python scripts/sanitize_payload.py           # on a CUDA GPU; last line "sanitized run finished"
    python scripts/sanitize_payload.py --smoke   # tiny shapes, fp32, on CPU tensors under TRITON_INTERPRET=1

- The Elman op (``fastrnn.recurrence``) with each variant forced (resident at H = 64, tiled and
  stepwise at H = 300), plain and reversed with ragged lengths.
- Each gated cell of the registry on two shapes (H = 64 and H = 300; the LSTM's second with
  proj_size = H // 2), as a module: one direction from given initial states, and bidirectional over
  a packed batch of ragged lengths.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastrnn's kernels are imported

import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.cells import CELLS  # noqa: E402

B, T = 19, 6
SMOKE_B, SMOKE_T = 3, 4
ELMAN_VARIANTS = (("resident", 64), ("tiled", 300), ("stepwise", 300))  # (variant forced, H)
GATED_H = (64, 300)
DTYPES = {"tf32": torch.float32, "bf16": torch.bfloat16}  # fp32 with torch's default TF32


def gated_shapes(cell: str, smoke: bool = False) -> list[tuple[int, int]]:
    """``[(H, proj_size)]`` of a gated cell: the LSTM's second shape has a projection."""
    hs = (20, 40) if smoke else GATED_H
    return [(hs[0], 0), (hs[1], hs[1] // 2 if cell == "lstm" else 0)]


def ragged_lengths(batch: int, steps: int) -> torch.Tensor:
    return torch.tensor([steps, steps // 2] + [steps - 1] * (batch - 2))


def run_elman(device, dtype, smoke: bool) -> None:
    batch, steps = (SMOKE_B, SMOKE_T) if smoke else (B, T)
    for variant, H in ELMAN_VARIANTS:
        os.environ["FASTRNN_VARIANT"] = variant
        H = 20 if smoke else H
        x = torch.randn(steps, batch, H, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(H, H, device=device) / H ** 0.5).to(dtype).requires_grad_()
        for reverse, lengths in ((False, None), (True, ragged_lengths(batch, steps).to(device))):
            y, h = fastrnn.recurrence(x, None, w, reverse=reverse, lengths=lengths)
            (y.float().sum() + h.float().sum()).backward()
    os.environ.pop("FASTRNN_VARIANT", None)


def run_gated(cell: str, device, dtype, smoke: bool) -> None:
    batch, steps = (SMOKE_B, SMOKE_T) if smoke else (B, T)
    for H, proj in gated_shapes(cell, smoke):
        kw = dict(proj_size=proj) if proj else {}
        one = CELLS[cell].module(8, H, device=device, dtype=dtype, **kw)
        x = torch.randn(steps, batch, 8, device=device, dtype=dtype, requires_grad=True)
        hx = [torch.randn(1, batch, w, device=device, dtype=dtype) for w in [proj or H, H][:len(CELLS[cell].state)]]
        y, _ = one(x, tuple(hx) if len(hx) == 2 else hx[0])
        y.float().sum().backward()
        two = CELLS[cell].module(8, H, bidirectional=True, device=device, dtype=dtype, **kw)
        packed = pack_padded_sequence(x, ragged_lengths(batch, steps), enforce_sorted=False)
        out, _ = two(packed)
        out.data.float().sum().backward()


def kernel_cases() -> list[tuple]:
    """What this payload launches on a GPU, as the compile sweep's cases (scripts/compile_check.py)."""
    cases = []
    for dname in DTYPES:
        for variant, H in ELMAN_VARIANTS:
            cases += [("rnn", d, B, H, dname, dict(h0=False, lengths=r, reverse=r, variant=variant))
                      for r in (False, True) for d in ("fwd", "bwd")]
        for cell in (name for name, c in CELLS.items() if c.gates > 1):
            for H, proj in gated_shapes(cell):
                kind = "lstm-proj" if proj else cell
                flags = [dict(h0=True, lengths=False, reverse=False)]
                flags += [dict(h0=False, lengths=True, reverse=r) for r in (False, True)]
                cases += [(kind, d, B, H, dname, f) for f in flags for d in ("fwd", "bwd")]
    return cases


def main() -> int:
    smoke = "--smoke" in sys.argv
    device = "cpu" if smoke else "cuda"
    os.environ["FASTRNN_BACKEND"] = "triton"
    torch.manual_seed(0)
    for dtype in [torch.float32] if smoke else DTYPES.values():
        run_elman(device, dtype, smoke)
        for cell in (name for name, c in CELLS.items() if c.gates > 1):
            run_gated(cell, device, dtype, smoke)
    if device == "cuda":
        torch.cuda.synchronize()
    print("sanitized run finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
