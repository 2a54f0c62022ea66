"""Run the published suite in one process and print the README table.

    python benchmarks/run_suite.py [--cell rnn|lstm|gru|all] [--rounds 3] [--png speedups.png] [--json results.json]

Each cell is timed for cuDNN (``torch.nn.RNN``, ``LSTM`` or ``GRU``) and fastrnn in interleaved
rounds (cuDNN against itself varies 0.8-1.2x between back-to-back timings), median of ``triton.testing.do_bench`` per
round, then the median over rounds. Prints ``| B | T | H | dtype | mode | cuDNN ms | fastrnn ms |
speedup |``, the geometric mean and the worst cell, and peak memory of fwd+bwd for both."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.suite import CELLS, DTYPES, MODES, SHAPES, make_case  # noqa: E402


def peak_memory_mb(run) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", default=",".join(map(str, SHAPES)))
    p.add_argument("--cell", default="rnn", choices=[*CELLS, "all"], help="the published table is rnn's")
    p.add_argument("--png", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("run_suite.py times CUDA kernels: no GPU here")
        return 1
    import triton
    from triton.testing import do_bench

    rows = []
    cells = list(CELLS) if args.cell == "all" else [args.cell]
    for cell, shape_id in ((c, s) for c in cells for s in map(int, args.shapes.split(","))):
        shape = SHAPES[shape_id]
        for dtype in DTYPES:
            for mode in MODES:
                runs = {prov: make_case(prov, shape, DTYPES[dtype], mode, cell=cell)
                        for prov in ("cudnn", "fastrnn")}
                times = {prov: [] for prov in runs}
                for _ in range(args.rounds):
                    for prov, run in runs.items():
                        times[prov].append(do_bench(run, warmup=5, rep=50, return_mode="median"))
                row = dict(cell=cell, id=shape_id, B=shape[0], T=shape[1], I=shape[2], H=shape[3], dtype=dtype,
                           mode=mode, cudnn_ms=statistics.median(times["cudnn"]),
                           fastrnn_ms=statistics.median(times["fastrnn"]))
                row["speedup"] = row["cudnn_ms"] / row["fastrnn_ms"]
                if mode == "fwdbwd":
                    row["cudnn_mb"] = peak_memory_mb(runs["cudnn"])
                    row["fastrnn_mb"] = peak_memory_mb(runs["fastrnn"])
                rows.append(row)
                print(f"# {row}", file=sys.stderr, flush=True)

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
        if "cudnn_mb" in r and r["fastrnn_mb"] > r["cudnn_mb"]:
            print(f"memory: {r['cell']} #{r['id']} {r['dtype']} fwd+bwd fastrnn {r['fastrnn_mb']:.0f} MB > "
                  f"cuDNN {r['cudnn_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.png:
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
        fig.savefig(args.png, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
