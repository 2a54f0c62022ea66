"""fastrnn's CPU path against torch's modules, in interleaved rounds in one process (issue #24).

    python benchmarks/cpu_table.py [--rounds 50] [--cells rnn,lstm,gru] [--out table.md] [--quick]

Every cell (rnn, lstm, gru), fp32, suite shapes B32 T256 I256 H256 and B32 T35 I28 H512, fwd (under
no_grad) and fwd+bwd. Per case, torch's module and fastrnn's run on the same inputs and weights (one
seed), alternating round by round (the order turned round each round); a round's time for one of
them is the median of as many calls as fill ``--min-round-ms``. Prints a markdown table: per case
the medians over rounds of torch's and fastrnn's times, the median over rounds of the per-round
ratio torch time / fastrnn time, and that ratio's range over the rounds. The defaults take about
3 minutes on an idle 2-core machine (a round of all 24 runs is about 3 s there); ``--quick`` (3
rounds, one call per round) is a smoke run of well under a minute.
Measure on an idle machine: on a busy one torch's threads wait for each other (both sides slow
down by 10x or more and the ratios mean little)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.report import machine_line, markdown_table  # noqa: E402
from benchmarks.suite import CELLS, CPU_SHAPES, MODES, make_case, shape_label  # noqa: E402
from benchmarks.timing import interleaved_rounds, ratio_summary, wall_clock_ms  # noqa: E402

COLUMNS = ("cell", "shape", "mode", "torch ms", "fastrnn ms", "ratio", "ratio range")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="interleaved rounds per case (default 50)")
    parser.add_argument("--min-round-ms", type=float, default=50.0,
                        help="a round times each provider for at least this long, median of its calls (default 50)")
    parser.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells (default all)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch"],
                        help="FASTRNN_BACKEND: auto, what a user's module runs on the CPU, or torch, the "
                             "PyTorch twins of the kernels (default auto)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, one call per round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.min_round_ms = 3, 0.0
    return args


def measure_case(cell: str, shape: tuple, mode: str, rounds: int, min_round_ms: float) -> dict:
    """Torch's module and fastrnn's on one case in interleaved rounds -> ``ratio_summary``'s medians."""
    runs = {provider: make_case(provider, shape, torch.float32, mode, "cpu", cell) for provider in ("torch", "fastrnn")}
    calls = {provider: calls_per_round(run, min_round_ms) for provider, run in runs.items()}
    times = interleaved_rounds({provider: lambda p=provider: wall_clock_ms(runs[p], calls[p]) for provider in runs},
                               rounds)
    return ratio_summary(times["torch"], times["fastrnn"])


def calls_per_round(run, min_round_ms: float) -> int:
    """How many calls of ``run`` fill ``min_round_ms`` (at least one), from a warm-up call."""
    run()  # first call: allocations and oneDNN's set-up stay out
    return max(1, round(min_round_ms / max(wall_clock_ms(run), 1e-3)))


def table_row(cell: str, shape: tuple, mode: str, summary: dict) -> tuple:
    return (cell, shape_label(shape), "fwd+bwd" if mode == "fwdbwd" else mode, f"{summary['baseline_ms']:.2f}",
            f"{summary['fastrnn_ms']:.2f}", f"{summary['ratio']:.2f}x",
            f"{summary['ratio_min']:.2f}-{summary['ratio_max']:.2f}x")


def heading(args: argparse.Namespace, seconds: float) -> str:
    """What the table is, where and how it was measured."""
    command = shlex.join(["python", "benchmarks/cpu_table.py", *sys.argv[1:]])
    return (f"{machine_line('cpu')}, {os.cpu_count()} cores; fp32; FASTRNN_BACKEND={args.backend}; "
            f"ratio = torch time / fastrnn time "
            f"(median and range over {args.rounds} interleaved rounds); `{command}`, {date.today()}, "
            f"{seconds:.0f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["FASTRNN_BACKEND"] = args.backend  # auto: what a user's module runs on the CPU
    cells = args.cells.split(",")
    unknown = sorted(set(cells) - set(CELLS))
    if unknown:
        print(f"unknown cells {unknown}: choose from {', '.join(CELLS)}", file=sys.stderr)
        return 2
    start, rows = time.perf_counter(), []
    for cell in cells:
        for shape in CPU_SHAPES.values():
            for mode in MODES:
                rows.append(table_row(cell, shape, mode, measure_case(cell, shape, mode, args.rounds,
                                                                      args.min_round_ms)))
                print("# " + " | ".join(rows[-1]), file=sys.stderr, flush=True)
    text = heading(args, time.perf_counter() - start) + "\n\n" + markdown_table(COLUMNS, rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
