"""Host time of a warm call on the fused path, with every kernel launch replaced by a no-op (issue
#24): what Python adds on top of Triton's own launch cost, per layer and direction.

    python benchmarks/host_overhead.py [--rounds 60] [--calls 200] [--cuda]

Runs on a CPU: the fused path (``FASTRNN_BACKEND=triton``) takes its GPU route through the launch
machinery (the configuration chosen once and kept, the launch kept and rebound, ``kernels/launch.py``),
while the kernels themselves, Triton's argument binding included, are not run. Tiny shapes (B=2,
T=8, I=H=16), fp32, so the arithmetic around the launch is negligible. With ``--cuda`` (a GPU):
the same calls on CUDA tensors, every kernel launched (Triton's own launch cost in every figure,
torch's module running cuDNN), the rounds synchronised: at these shapes the host is the bottleneck,
so a call's time is its host time. Per cell, in interleaved rounds (this machine's speed drifts by
2x from minute to minute), the best and the median round:

- the module, one layer and direction, forward under ``no_grad`` and forward recording autograd's
  graph (what a training step's forward pays);
- each further layer and direction: (a 2-layer bidirectional module - the one-layer module) / 3;
- the cell's functional op (``fastrnn.CELLS[cell].recurrence``) on a projected input, ``no_grad``;
- the forward launcher alone (``fastrnn.kernels.<cell>``): checks, buffers, the kept launch;
- torch's own module computing the same one-layer call on the CPU, for scale.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import sys
import time

CUDA = "--cuda" in sys.argv[1:]  # (read before torch and triton are imported: they read the environment)
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors may take the fused path (never run here)
os.environ["FASTRNN_BACKEND"] = "triton"

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastrnn  # noqa: E402
import fastrnn.kernels.launch as launch  # noqa: E402

B, T, I, H = 2, 8, 16, 16
DEVICE = "cuda" if CUDA else "cpu"


def no_launches() -> None:
    """Every ``kernel[grid](...)`` does nothing; the launch path takes its GPU route."""
    for kind in (JITFunction, InterpretedFunction):  # (the interpreter's stand-in for the JIT)
        kind.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    launch.INTERPRETED = False
    launch.fits_gpu = lambda plans, device: True
    launch.resident_capacity = lambda *args, **kwargs: float("inf")


def warm_call(cell: str, provider: str, mode: str, layers: int = 1, bidirectional: bool = False):
    """A forward of a module of ``provider`` ("fastrnn" or "torch") on tiny shapes: ``mode`` "fwd"
    under no_grad, or "train", recording autograd's graph."""
    torch.manual_seed(0)
    kind = fastrnn.CELLS[cell].module if provider == "fastrnn" else fastrnn.CELLS[cell].torch_module
    module = kind(I, H, layers, bidirectional=bidirectional, device=DEVICE)
    x = torch.randn(T, B, I, device=DEVICE, requires_grad=mode == "train")

    def call():
        with torch.enable_grad() if mode == "train" else torch.no_grad():
            module(x)

    return call


def op_call(cell: str):
    """The cell's functional op and its forward launcher on a projected input ``(T, B, gates x H)``."""
    gates = fastrnn.CELLS[cell].gates
    x_proj, w_hh = torch.randn(T, B, gates * H, device=DEVICE), torch.randn(gates * H, H, device=DEVICE)
    recurrence = fastrnn.CELLS[cell].recurrence
    launcher = getattr(importlib.import_module(f"fastrnn.kernels.{fastrnn.CELLS[cell].kernels}"),
                       f"{fastrnn.CELLS[cell].kernels}_fwd")
    gated = (None,) if cell == "lstm" else ()  # (the LSTM's launcher takes c0 after h0)

    def op():
        with torch.no_grad():
            recurrence(x_proj, None, *gated, w_hh)

    return op, lambda: launcher(x_proj, None, *gated, w_hh)


def best_and_median(calls: dict, rounds: int, n: int) -> dict:
    """``{name: (best, median)}`` in µs per call: the mean of ``n`` calls, per interleaved round."""
    for call in calls.values():
        for _ in range(20):  # warm: plans and launches kept, caches filled
            call()
    times = {name: [] for name in calls}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                start = time.perf_counter()
                for _ in range(n):
                    calls[name]()
                if CUDA:
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - start) / n * 1e6)
    finally:
        gc.enable()
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--calls", type=int, default=200, help="calls per round (default 200)")
    parser.add_argument("--cuda", action="store_true", help="on the GPU, every kernel launched")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if CUDA and not torch.cuda.is_available():
        parser.error("--cuda: no GPU here")
    if CUDA:
        where = f"on {torch.cuda.get_device_name()}, every kernel launched, torch's module running cuDNN"
    else:
        no_launches()
        where = "fastrnn's kernels not run, torch's module computing on the CPU"
    print(f"host time of a warm call (B={B} T={T} I=H={H}, fp32), {where} (torch {torch.__version__}, "
          f"{os.cpu_count()} cores, 1 thread); µs per call, best round (median round) of {args.rounds} "
          f"interleaved rounds of {args.calls} calls\n")
    print("| cell | module fwd (no_grad) | module fwd (autograd) | each further layer & direction | "
          "functional op | launcher | torch's module fwd (no_grad) |\n|---|---|---|---|---|---|---|")
    for cell in fastrnn.CELLS:
        op, launcher = op_call(cell)
        calls = {"fwd": warm_call(cell, "fastrnn", "fwd"), "train": warm_call(cell, "fastrnn", "train"),
                 "deep": warm_call(cell, "fastrnn", "fwd", layers=2, bidirectional=True), "op": op,
                 "launcher": launcher, "torch": warm_call(cell, "torch", "fwd")}
        t = best_and_median(calls, args.rounds, args.calls)
        t["deep"] = tuple((deep - one) / 3 for deep, one in zip(t["deep"], t["fwd"]))
        row = " | ".join(f"{t[k][0]:.1f} ({t[k][1]:.1f})" for k in ("fwd", "train", "deep", "op", "launcher", "torch"))
        print(f"| {cell} | {row} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
