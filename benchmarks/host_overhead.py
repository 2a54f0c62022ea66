"""Host time of a warm forward call on the fused path, per layer and direction, with every kernel
launch replaced by a no-op (issue #24): what Python adds on top of Triton's own launch cost.

    python benchmarks/host_overhead.py [--rounds 30] [--calls 100]

Runs on a CPU: the fused path (``FASTRNN_BACKEND=triton``) takes its GPU route through the launch
machinery (the configuration is chosen once and kept, ``kernels/launch.py``), while the kernels
themselves, Triton's argument binding included, are not run. Tiny shapes (B=2, T=8, I=H=16), fp32,
one layer and direction, no h0, so the arithmetic around the launch is negligible. Beside it, in
interleaved rounds (this machine's speed drifts by 2x from minute to minute), torch's own module
computing the same tiny call on the CPU: what a user pays per call there, for scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors may take the fused path (never run here)
os.environ["FASTRNN_BACKEND"] = "triton"

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastrnn  # noqa: E402
import fastrnn.kernels.launch as launch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import interleaved_rounds, wall_clock_ms  # noqa: E402


def no_launches() -> None:
    """Every ``kernel[grid](...)`` does nothing; the launch path takes its GPU route."""
    for kind in (JITFunction, InterpretedFunction):  # (the interpreter's stand-in for the JIT)
        kind.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    launch.INTERPRETED = False
    launch.fits_gpu = lambda plans, device: True
    launch.resident_capacity = lambda *args, **kwargs: float("inf")


def warm_call(cell: str, provider: str, mode: str):
    """A warm forward of a one-layer, one-direction module of ``provider`` ("fastrnn" or "torch") on
    tiny shapes: ``mode`` "fwd" under no_grad, or "train", building its autograd graph."""
    torch.manual_seed(0)
    module = (fastrnn.CELLS[cell].module if provider == "fastrnn" else fastrnn.CELLS[cell].torch_module)(16, 16)
    x = torch.randn(8, 2, 16, requires_grad=mode == "train")

    def call():
        with torch.enable_grad() if mode == "train" else torch.no_grad():
            module(x)

    for _ in range(20):  # warm: plans kept, caches filled
        call()
    return call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=100, help="calls per round (default 100)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    no_launches()
    print(f"host time of a warm call, one layer and direction (B=2 T=8 I=H=16, fp32), fastrnn's kernels not "
          f"run, torch's module computing (torch {torch.__version__}, {os.cpu_count()} cores, 1 thread); µs, "
          f"median over {args.rounds} interleaved rounds of the median of {args.calls} calls (best round)\n")
    print("| cell | mode | fastrnn µs | torch's module µs |\n|---|---|---|---|")
    for cell in fastrnn.CELLS:
        for mode in ("fwd", "train"):
            calls = {p: warm_call(cell, p, mode) for p in ("fastrnn", "torch")}
            times = interleaved_rounds({p: lambda p=p: wall_clock_ms(calls[p], args.calls) * 1000 for p in calls},
                                       args.rounds)
            ours, theirs = (f"{statistics.median(times[p]):.1f} ({min(times[p]):.1f})" for p in ("fastrnn", "torch"))
            print(f"| {cell} | {'forward (no_grad)' if mode == 'fwd' else 'forward with autograd'} | {ours} | "
                  f"{theirs} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
