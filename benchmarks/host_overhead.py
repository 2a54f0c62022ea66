"""Host time of a warm forward call on the fused path, per layer and direction, with every kernel
launch replaced by a no-op (issue #24): what Python adds on top of Triton's own launch cost.

    python benchmarks/host_overhead.py [--calls 2000]

Runs on a CPU: the fused path (``FASTRNN_BACKEND=triton``) takes its GPU route through the launch
machinery (the configuration is chosen once and kept, ``kernels/launch.py``), while the kernels
themselves, Triton's argument binding included, are not run. Tiny shapes (B=2, T=8, I=H=16), fp32,
one layer and direction, no h0, so the arithmetic around the launch is negligible; the median over
``--calls`` warm calls, per cell.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors may take the fused path (never run here)
os.environ["FASTRNN_BACKEND"] = "triton"

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastrnn  # noqa: E402
import fastrnn.kernels.launch as launch  # noqa: E402


def no_launches() -> None:
    """Every ``kernel[grid](...)`` does nothing; the launch path takes its GPU route."""
    for kind in (JITFunction, InterpretedFunction):  # (the interpreter's stand-in for the JIT)
        kind.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    launch.INTERPRETED = False
    launch.fits_gpu = lambda plans, device: True
    launch.resident_capacity = lambda *args, **kwargs: float("inf")


def per_call_us(cell: str, calls: int, mode: str) -> float:
    """Median microseconds of one warm forward (``mode`` "fwd", under no_grad) or forward with its
    autograd graph ("train") of a one-layer, one-direction module."""
    torch.manual_seed(0)
    module = fastrnn.CELLS[cell].module(16, 16)
    x = torch.randn(8, 2, 16, requires_grad=mode == "train")
    grad = torch.enable_grad() if mode == "train" else torch.no_grad()
    with grad:
        for _ in range(20):  # warm: plans kept, caches filled
            module(x)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    no_launches()
    print(f"host time of a warm call, one layer and direction, kernels not run (torch {torch.__version__}, "
          f"{os.cpu_count()} cores, 1 thread); median of {args.calls} calls\n")
    print("| cell | forward (no_grad) µs | forward with autograd µs |\n|---|---|---|")
    for cell in fastrnn.CELLS:
        print(f"| {cell} | {per_call_us(cell, args.calls, 'fwd'):.1f} | {per_call_us(cell, args.calls, 'train'):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
