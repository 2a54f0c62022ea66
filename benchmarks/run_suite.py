"""Run the published suite in one process and print the README table.

    python benchmarks/run_suite.py [--cell rnn|lstm|gru|all] [--rounds 3] [--png speedups.png] [--json results.json]
    python benchmarks/run_suite.py --resets [--rounds 3] [--json results.json]

Each cell is timed for cuDNN (``torch.nn.RNN``, ``LSTM`` or ``GRU``) and fastrnn in interleaved
rounds (cuDNN against itself varies 0.8-1.2x between back-to-back timings), median of ``triton.testing.do_bench`` per
round, then the median over rounds. Prints ``| B | T | H | dtype | mode | cuDNN ms | fastrnn ms |
speedup |``, the geometric mean and the worst cell, peak memory of both (where fastrnn takes more)
and how far fastrnn's output is from cuDNN's (``benchmarks.suite.disagreement``, every row: a timed
kernel that computes something else is not a result).

``--resets`` (issue #23) times instead the GRU and LSTM with 3 % resets inside the sequence
(B128 T128 I64 H256, fp32 and bf16, fwd and fwd+bwd): fastrnn with ``resets=`` against torch's module
stepped one step at a time with ``(1 - done)`` masking (``loop``) and against every segment packed
through it (``packed``), see ``resets.py``; the aim is 10x over the loop and 3x over packed."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import markdown_table  # noqa: E402
from benchmarks.resets import (  # noqa: E402
    RESET_RATE,
    RESETS_CELLS,
    RESETS_PROVIDERS,
    RESETS_SHAPES,
    make_resets_case,
    resets_missing,
)
from benchmarks.suite import AGREEMENT, CELLS, DTYPES, MODES, SHAPES, disagreement, make_case  # noqa: E402
from benchmarks.timing import interleaved_rounds  # noqa: E402

RESETS_AIM = {"loop": 10.0, "packed": 3.0}  # fastrnn's speedup aimed at over each baseline


def peak_memory(run) -> tuple:
    """``(MB, result)``: the memory one call of ``run`` takes at its peak, and what it returned."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", default=",".join(map(str, SHAPES)))
    p.add_argument("--cell", default="rnn", choices=[*CELLS, "all"], help="the published table is rnn's")
    p.add_argument("--png", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--resets", action="store_true", help="the resets benchmark (issue #23) instead of the suite")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("run_suite.py times CUDA kernels: no GPU here")
        return 1
    return resets_table(args) if args.resets else suite_table(args)


def bench_ms(run) -> float:
    """One ``triton.testing.do_bench`` median of ``run``, in ms."""
    from triton.testing import do_bench

    return do_bench(run, warmup=5, rep=50, return_mode="median")


def suite_table(args) -> int:
    """The published suite's table (see the module's docstring)."""
    cells = list(CELLS) if args.cell == "all" else [args.cell]
    rows = [suite_row(cell, shape_id, dtype, mode, args.rounds)
            for cell in cells for shape_id in map(int, args.shapes.split(",")) for dtype in DTYPES for mode in MODES]
    print_suite_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.png:
        save_speedup_plot(rows, args.png)
    return 0


def suite_row(cell: str, shape_id: int, dtype: str, mode: str, rounds: int) -> dict:
    """One cell of the suite, cuDNN and fastrnn in interleaved rounds, each one's peak memory and how far
    fastrnn's results are from cuDNN's."""
    shape = SHAPES[shape_id]
    runs = {prov: make_case(prov, shape, DTYPES[dtype], mode, cell=cell) for prov in ("cudnn", "fastrnn")}
    times = interleaved_rounds({prov: lambda run=run: bench_ms(run) for prov, run in runs.items()}, rounds)
    row = dict(cell=cell, id=shape_id, B=shape[0], T=shape[1], I=shape[2], H=shape[3], dtype=dtype,
               mode=mode, cudnn_ms=statistics.median(times["cudnn"]), fastrnn_ms=statistics.median(times["fastrnn"]))
    row["speedup"] = row["cudnn_ms"] / row["fastrnn_ms"]
    results = {}  # (what the calls measured for memory returned: no further call for the check)
    for prov, run in runs.items():
        row[f"{prov}_mb"], results[prov] = peak_memory(run)
    row["rel_err"] = disagreement(results)
    print(f"# {row}", file=sys.stderr, flush=True)
    return row


def print_suite_table(rows) -> None:
    """The README table, the geometric mean, the worst cell and where fastrnn takes more memory."""
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"cuDNN {torch.backends.cudnn.version()}; fp32 with TF32 = {torch.backends.cudnn.allow_tf32}")
    print("| cell | # | B | T | H | dtype | mode | cuDNN ms | fastrnn ms | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cell']} | {r['id']} | {r['B']} | {r['T']} | {r['H']} | {r['dtype']} | {r['mode']} | "
              f"{r['cudnn_ms']:.3f} | {r['fastrnn_ms']:.3f} | {r['speedup']:.2f}x |")
    geomean = math.exp(sum(math.log(r["speedup"]) for r in rows) / len(rows))
    worst = min(rows, key=lambda r: r["speedup"])
    print(f"\ngeometric-mean speedup {geomean:.2f}x over {len(rows)} cells; worst "
          f"{worst['cell']} #{worst['id']} {worst['dtype']} {worst['mode']} {worst['speedup']:.2f}x")
    for r in rows:
        if r["fastrnn_mb"] > r["cudnn_mb"]:
            print(f"memory: {r['cell']} #{r['id']} {r['dtype']} {r['mode']} fastrnn {r['fastrnn_mb']:.0f} MB > "
                  f"cuDNN {r['cudnn_mb']:.0f} MB")
    off = [f"{r['cell']} #{r['id']} {r['dtype']} {r['mode']} {r['rel_err']:.1e}" for r in rows
           if not r["rel_err"] <= AGREEMENT[r["dtype"]]]
    print(f"outputs against cuDNN's: max rel err {max(r['rel_err'] for r in rows):.1e}; "
          + (f"OVER {AGREEMENT}: " + ", ".join(off) if off else f"every row within {AGREEMENT}"))


def save_speedup_plot(rows, path: str) -> None:
    """A bar per cell of the speedup over cuDNN, log scale, to ``path`` (png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4))
    labels = [f"{r['cell']} #{r['id']} {r['dtype']}\n{r['mode']}" for r in rows]
    ax.bar(range(len(rows)), [r["speedup"] for r in rows])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("speedup over cuDNN"), ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def resets_table(args) -> int:
    """fastrnn with resets against the loop and the packed segments (see the module's docstring)."""
    missing = [reason for reason in map(resets_missing, RESETS_CELLS) if reason is not None]
    if missing:
        print("resets benchmark skipped: " + "; ".join(missing))
        return 1
    shape = RESETS_SHAPES["cuda"]
    rows = [resets_row(cell, dtype, mode, shape, args.rounds) for cell in RESETS_CELLS for dtype in DTYPES
            for mode in MODES]
    print_resets_table(rows, shape)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def resets_row(cell: str, dtype: str, mode: str, shape: tuple, rounds: int) -> dict:
    """One resets case, the three providers in interleaved rounds: medians and fastrnn's speedups."""
    runs = {prov: make_resets_case(prov, shape, DTYPES[dtype], mode, "cuda", cell) for prov in RESETS_PROVIDERS}
    times = interleaved_rounds({prov: lambda run=run: bench_ms(run) for prov, run in runs.items()}, rounds)
    ms = {prov: statistics.median(t) for prov, t in times.items()}
    row = dict(cell=cell, dtype=dtype, mode=mode, **{f"{prov}_ms": v for prov, v in ms.items()},
               **{f"vs_{prov}": ms[prov] / ms["fastrnn"] for prov in RESETS_AIM})
    print(f"# {row}", file=sys.stderr, flush=True)
    return row


def print_resets_table(rows, shape) -> None:
    """The resets table and the cells short of the aims."""
    B, T, I, H = shape
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
          f"B={B} T={T} I={I} H={H}, {RESET_RATE:.0%} resets; fp32 with TF32 = {torch.backends.cudnn.allow_tf32}")
    columns = ("cell", "dtype", "mode", "loop ms", "packed ms", "fastrnn ms", "vs loop", "vs packed")
    print(markdown_table(columns, [(r["cell"], r["dtype"], r["mode"], f"{r['loop_ms']:.3f}", f"{r['packed_ms']:.3f}",
                                    f"{r['fastrnn_ms']:.3f}", f"{r['vs_loop']:.1f}x", f"{r['vs_packed']:.1f}x")
                                   for r in rows]))
    for r in rows:
        for baseline, aim in RESETS_AIM.items():
            if r[f"vs_{baseline}"] < aim:
                print(f"short of the aim: {r['cell']} {r['dtype']} {r['mode']} {r[f'vs_{baseline}']:.1f}x over "
                      f"{baseline} (aim {aim:.0f}x)")


if __name__ == "__main__":
    sys.exit(main())
