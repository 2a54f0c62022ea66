"""Host time of a warm call on the fused path, with every kernel launch replaced by a no-op (issue
#24): what Python adds on top of Triton's own launch cost, per layer and direction.

    python benchmarks/host_overhead.py [--rounds 60] [--calls 200] [--cuda] [--against REV]

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
- the cell's functional op (``fastrnn.CELLS[cell].recurrence``) on a projected input that requires
  no grad (so no graph is recorded; each call is the op alone, as the launcher's, without entering
  ``no_grad``, which costs about 2 µs a call here);
- the forward launcher alone (``fastrnn.kernels.<cell>``): checks, buffers, the kept launch;
- torch's own module computing the same one-layer call on the CPU, for scale.

``--against REV`` adds the same figures for fastrnn as it was at git revision REV, imported beside
this one and timed in the same rounds: a change's effect measured without the drift between two
processes.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CUDA = "--cuda" in sys.argv[1:]  # (read before torch and triton are imported: they read the environment)
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors may take the fused path (never run here)
os.environ["FASTRNN_BACKEND"] = "triton"

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fastrnn  # noqa: E402

B, T, I, H = 2, 8, 16, 16
DEVICE = "cuda" if CUDA else "cpu"


def no_launches(*packages) -> None:
    """Every ``kernel[grid](...)`` does nothing; the launch path of each of ``packages`` (fastrnn and
    a baseline) takes its GPU route. Denormal floats are flushed to zero: an output no kernel wrote
    holds whatever its memory held, and denormals there made a further layer's input projection
    (a real CPU matmul here) 20 µs slower, which a GPU never pays."""
    torch.set_flush_denormal(True)
    for kind in (JITFunction, InterpretedFunction):  # (the interpreter's stand-in for the JIT)
        kind.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    for package in packages:
        kept = importlib.import_module(f"{package.__name__}.kernels.launch")
        kept.INTERPRETED = False
        kept.fits_gpu = lambda plans, device: True
        kept.resident_capacity = lambda *args, **kwargs: float("inf")


def baseline(rev: str):
    """fastrnn as it was at git revision ``rev``, imported beside this one as ``fastrnn_baseline``:
    its ``fastrnn/`` and ``kernels/`` unpacked into a temporary folder (``kernels/`` as the package's
    ``kernels``, as setuptools maps it), its custom ops renamed into a namespace of their own (torch
    registers each op name once)."""
    name, root = "fastrnn_baseline", Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar", rev, "fastrnn", "kernels"],
                             capture_output=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="fastrnn-baseline-"))
    atexit.register(shutil.rmtree, folder, True)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # (Python 3.12 warns without)
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(folder, **safe)
    (folder / "kernels").rename(folder / "fastrnn" / "kernels")
    (folder / "fastrnn").rename(folder / name)
    for source in (folder / name).rglob("*.py"):
        text = source.read_text()
        source.write_text(text.replace('"fastrnn::', f'"{name}::').replace('f"fastrnn.kernels.', f'f"{name}.kernels.'))
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def warm_call(cell: str, provider: str, mode: str, layers: int = 1, bidirectional: bool = False, package=fastrnn):
    """A forward of a module of ``provider`` ("fastrnn" or "torch") on tiny shapes: ``mode`` "fwd"
    under no_grad, or "train", recording autograd's graph; fastrnn's from ``package``."""
    torch.manual_seed(0)
    kind = package.CELLS[cell].module if provider == "fastrnn" else fastrnn.CELLS[cell].torch_module
    module = kind(I, H, layers, bidirectional=bidirectional, device=DEVICE)
    x = torch.randn(T, B, I, device=DEVICE, requires_grad=mode == "train")

    def call():
        with torch.enable_grad() if mode == "train" else torch.no_grad():
            module(x)

    return call


def op_call(cell: str, package=fastrnn):
    """The cell's functional op and its forward launcher on a projected input ``(T, B, gates x H)``."""
    gates, kernels = package.CELLS[cell].gates, package.CELLS[cell].kernels
    x_proj, w_hh = torch.randn(T, B, gates * H, device=DEVICE), torch.randn(gates * H, H, device=DEVICE)
    recurrence = package.CELLS[cell].recurrence
    launcher = getattr(importlib.import_module(f"{package.__name__}.kernels.{kernels}"), f"{kernels}_fwd")
    gated = (None,) if cell == "lstm" else ()  # (the LSTM's launcher takes c0 after h0)
    return lambda: recurrence(x_proj, None, *gated, w_hh), lambda: launcher(x_proj, None, *gated, w_hh)


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
    parser.add_argument("--against", metavar="REV", help="also fastrnn as at git revision REV, in the same rounds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if CUDA and not torch.cuda.is_available():
        parser.error("--cuda: no GPU here")
    versions = {"now": fastrnn, **({args.against: baseline(args.against)} if args.against else {})}
    if CUDA:
        where = f"on {torch.cuda.get_device_name()}, every kernel launched, torch's module running cuDNN"
    else:
        no_launches(*versions.values())
        where = "fastrnn's kernels not run, torch's module computing on the CPU"
    print(f"host time of a warm call (B={B} T={T} I=H={H}, fp32), {where} (torch {torch.__version__}, "
          f"{os.cpu_count()} cores, 1 thread); µs per call, best round (median round) of {args.rounds} "
          f"interleaved rounds of {args.calls} calls\n")
    version = "version | " if args.against else ""
    print(f"| cell | {version}module fwd (no_grad) | module fwd (autograd) | each further layer & direction | "
          f"functional op | launcher | torch's module fwd (no_grad) |\n|---|---|---|---|---|---|---|"
          + ("---|" if args.against else ""))
    for cell in fastrnn.CELLS:
        calls = {("torch", "torch"): warm_call(cell, "torch", "fwd")}
        for tag, package in versions.items():
            calls.update({(tag, what): call for what, call in cell_calls(cell, package).items()})
        t = best_and_median(calls, args.rounds, args.calls)
        for tag in versions:
            mine = {what: t[(tag, what)] for what in ("fwd", "train", "deep", "op", "launcher")}
            mine["deep"] = tuple((deep - one) / 3 for deep, one in zip(mine["deep"], mine["fwd"]))
            mine["torch"] = t[("torch", "torch")]
            row = " | ".join(f"{mine[k][0]:.1f} ({mine[k][1]:.1f})"
                             for k in ("fwd", "train", "deep", "op", "launcher", "torch"))
            print(f"| {cell} | " + (f"{tag} | " if args.against else "") + f"{row} |")
    return 0


def cell_calls(cell: str, package) -> dict:
    """The calls timed for ``cell`` with fastrnn from ``package``, by the table's column."""
    op, launcher = op_call(cell, package)
    return {"fwd": warm_call(cell, "fastrnn", "fwd", package=package),
            "train": warm_call(cell, "fastrnn", "train", package=package),
            "deep": warm_call(cell, "fastrnn", "fwd", layers=2, bidirectional=True, package=package), "op": op,
            "launcher": launcher}


if __name__ == "__main__":
    sys.exit(main())
