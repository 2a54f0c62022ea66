"""Compile every fused kernel exactly as a launch compiles it, for Hopper (sm_90), without a GPU.

    python scripts/compile_check.py           # the whole sweep (hours on 2 cores); last line "compile check: PASS|FAIL"
    python scripts/compile_check.py --ci      # its representative part (minutes): what CI runs
    python scripts/compile_check.py --suite   # only what the benchmark suite launches
    python scripts/compile_check.py --table   # also the published suite's figures, as a markdown table

For each shape the launchers can be asked about (B from 1 to 4096, H from 1 to 8192, multiples of 16
and not), each dtype (fp32 with IEEE and with TF32 products, bf16, fp16, fp64), forward and backward,
with and without h0 / lengths / reverse, the launchers' own ``*_launch`` functions build the kernel,
grid and arguments (on meta tensors) and the JIT's own binder specialises and compiles them
(``kernel.warmup`` with the driver swapped for an sm_90 target: pointer and integer divisibility,
B == 1 or H == 1 as constants, do_not_specialize, num_warps, num_stages, the cooperative flag).

It walks each case's candidates (``config.pick_configs``) as the launcher does (``launch.choose``):
a candidate whose kernel has more local memory than ``launch.MAX_STACK`` (64 bytes per thread: more
is register pressure, re-read at every step), more shared memory than an H100 program may have
(227 KB) or, tiled, a grid the GPU cannot hold at once (occupancy x 132 SMs) is passed over for the
next. The run fails where the kernel that would be launched has any of these or a compile error.
Local-memory accesses inside a loop (the step loop) are counted from the SASS and reported. Registers
and stack are read from the cubin with the wheel's cuobjdump. It cannot run the kernels: that is
scripts/gpu_check.py, on a GPU.

The cells come from the registry (``fastrnn.cells.CELLS``: name, gates, kernels module), plus
"lstm-proj", the LSTM cell with a projection (P = H // 2). The sweep's worker processes end with it,
whatever ends it: an error, SIGTERM or SIGINT (``worker_pool`` ends them), or the sweep's own death
(each worker asks the kernel to kill it when its parent goes: ``end_with_parent``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import importlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (decided when the kernels are imported)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns while the default is implicit

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

import fastrnn.kernels.config as config  # noqa: E402
from fastrnn.cells import CELLS  # noqa: E402
from fastrnn.kernels.launch import MAX_STACK, choose, launch_plans, programs_per_sm  # noqa: E402

TARGET, N_SM = GPUTarget("cuda", 90, 32), 132
MAX_SHARED = 232448  # bytes of shared memory one H100 program may use
SWEEP_B = (1, 2, 3, 8, 16, 17, 32, 33, 64, 100, 128, 256, 1000, 1024, 4096)
SWEEP_H = (1, 2, 15, 16, 17, 32, 64, 100, 128, 130, 200, 256, 257, 500, 512, 640, 1000, 1024, 1500,
           2048, 3000, 4096, 8192)
SUITE = {1: (32, 512), 2: (32, 256), 3: (64, 512), 4: (128, 1024), 5: (16, 2048), 6: (256, 256),
         7: (1, 512), 8: (8, 128)}
DTYPES = {"fp32": (torch.float32, "tf32x3"), "tf32": (torch.float32, "tf32"), "bf16": (torch.bfloat16, None),
          "fp16": (torch.float16, None), "fp64": (torch.float64, None)}
ALL_ON = dict(h0=True, lengths=True, reverse=True)
ALL_OFF = dict(h0=False, lengths=False, reverse=False)
RESETS = (dict(h0=True, lengths=False, reverse=True, resets=True),  # resets come without lengths
          dict(h0=False, lengths=False, reverse=False, resets=True))
INFERENCE = dict(ALL_OFF, save=False)  # a gated forward that records no graph: no c, no gates stored


class _CompileOnlyDriver:
    """Enough of a driver for ``JITFunction.warmup``: a target, a device key, a stream."""

    def __init__(self, target):
        self.target, self.device = target, f"compile-only:{target.arch}"

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def __getattr__(self, name):
        raise RuntimeError(f"the compile path asked the driver for {name!r}")


@contextlib.contextmanager
def compile_only(target=TARGET):
    saved = driver._active  # driver.active would look for a GPU
    driver.set_active(_CompileOnlyDriver(target))
    try:
        yield
    finally:
        driver._active = saved


def case_kinds() -> dict[str, tuple]:
    """``{kind: (gates, kernels module)}``: each registered cell, and "lstm-proj", the LSTM cell with
    a projection (P = H // 2)."""
    kinds = {name: (cell.gates, importlib.import_module(f"fastrnn.kernels.{cell.kernels}"))
             for name, cell in CELLS.items()}
    kinds["lstm-proj"] = kinds["lstm"]
    return kinds


KINDS = case_kinds()
GATED = tuple(kind for kind, (gates, _) in KINDS.items() if gates > 1)


def ladder(cell: str, B: int, H: int, dtype_name: str, forced: str = ""):
    """The candidates ``pick_configs`` gives this case on an H100, in order of preference
    (``forced``: the variant FASTRNN_VARIANT forces, if any)."""
    _fake_h100()
    dtype, precision = DTYPES[dtype_name]
    return config.candidate_configs(B, H, dtype, torch.device("cuda"), forced, KINDS[cell][0], precision == "tf32")


def case_ladder(case):
    """The ladder of a case ``(cell, direction, B, H, dtype_name, flags)``: ``flags["variant"]``,
    where given, is the variant forced (h0, lengths and reverse are the launch's flags)."""
    cell, _, B, H, dtype_name, flags = case
    return ladder(cell, B, H, dtype_name, flags.get("variant", ""))


def operands(cell: str, direction: str, B: int, H: int, dtype, flags: dict, cfg):
    """``(kernel, grid, args, kwargs)`` of one launcher on meta tensors, as the launchers build it
    (each cell's kernels' ``meta_launch``)."""
    kernels = KINDS[cell][1]
    P = (H // 2 or 1) if cell == "lstm-proj" else None
    save = {"save": flags["save"]} if "save" in flags else {}  # (the gated forwards')
    return kernels.meta_launch(direction, B, H, dtype, cfg, flags["h0"], flags["lengths"], flags["reverse"], P,
                               flags.get("resets", False), **save)


def builder(cell: str, direction: str, B: int, H: int, dtype_name: str, flags: dict):
    """``build(config) -> (kernel, grid, args, kwargs)`` of the case's launcher (as ``run_sequence``
    takes it), with the products' precision of ``dtype_name`` and its activations (on meta tensors
    the launchers would take IEEE fp32 and the exact tanh)."""
    dtype, precision = DTYPES[dtype_name]

    def build(cfg):
        kernel, grid, args, kwargs = operands(cell, direction, B, H, dtype, flags, cfg)
        if precision:  # and the hardware tanh, which the launchers take with TF32 products
            kwargs = {**kwargs, "PRECISION": precision, **({"FAST": precision == "tf32"} if "FAST" in kwargs else {})}
        return kernel, grid, args, kwargs
    return build


def phases(cell: str):
    return ({"PHASE": 1}, {"PHASE": 2}) if cell == "lstm-proj" else ({},)


def specialisation_key(cell, direction, B, H, dtype_name, flags):
    """What the JIT's binder sees of a case: cases with the same key compile to the same kernels."""
    return (cell, direction, case_ladder((cell, direction, B, H, dtype_name, flags)), dtype_name,
            tuple(sorted(flags.items())), B == 1, H == 1, H % 16 == 0, (B * H) % 16 == 0)


def resource_usage(compiled) -> tuple[int, int, int]:
    """(registers per thread, stack bytes per thread, local-memory accesses inside a loop) of a
    compiled kernel, read from its cubin (a spill inside the step loop costs every step); once per
    cubin, remembered in Triton's cache folder (``fastrnn-resources/``), so that a kernel found in
    the cache costs no cuobjdump."""
    cubin = compiled.asm["cubin"]
    memo = Path(triton.knobs.cache.dir) / "fastrnn-resources" / f"{hashlib.sha256(cubin).hexdigest()}.json"
    if memo.exists():
        return tuple(json.loads(memo.read_text()))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    fields = dict(tok.split(":", 1) for tok in usage.split() if tok.startswith(("REG:", "STACK:")))
    found = int(fields["REG"]), int(fields["STACK"]), spills_in_loops(sass)
    memo.parent.mkdir(parents=True, exist_ok=True)
    partial = memo.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(found))
    os.replace(partial, memo)  # whole or not at all, whoever else writes it
    return found


def spills_in_loops(sass: str) -> int:
    """How many local-memory loads and stores (LDL, STL) lie inside a loop: between a backward
    branch and its target."""
    addressed = [(int(m.group(1), 16), line) for line in sass.splitlines()
                 if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/", line))]
    loops = [(int(m.group(1), 16), at) for at, line in addressed
             if (m := re.search(r"\bBRA\b.*?0x([0-9a-f]+)", line)) and int(m.group(1), 16) < at]
    return sum(1 for at, line in addressed if re.search(r"\b(LDL|STL)\b", line)
               and any(start <= at <= end for start, end in loops))


def compile_row(row: dict, plan, after_compile=None) -> bool:
    """Compile one planned kernel ``(variant, kernel, grid, args, kwargs)`` for sm_90 and fill
    ``row`` with its registers, stack, step-loop spills, shared memory, compile seconds and
    problems (or its error); whether it fits. ``after_compile(compiled)``, if given, is called on it."""
    variant, kernel, grid, args, kwargs = plan
    start = time.perf_counter()
    try:
        with compile_only():
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
        row["seconds"] = time.perf_counter() - start
        row["regs"], row["stack"], row["loop_spills"] = resource_usage(compiled)
        row["shared"] = compiled.metadata.shared
        if after_compile:
            after_compile(compiled)
    except Exception as e:  # noqa: BLE001 - reported
        row.setdefault("seconds", time.perf_counter() - start)
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        return False
    row["problems"] = problems(row, variant, grid)
    return not row["problems"]


def check_case(case, after_compile=None) -> list[dict]:
    """Walk the case's ladder as the launcher does (``launch.choose``), compiling each candidate's
    kernels until one fits; a row per compiled kernel (``compile_row``), the launched ones marked,
    with what is wrong with a launched one (a rejected one is the ladder working, not a failure)."""
    _fake_h100()
    rows = []

    def fits(plans) -> bool:
        ok = True
        for plan in plans:
            row = dict(case=case, variant=plan[0], cfg=current[0], launched=False, error="")
            rows.append(row)
            ok &= compile_row(row, plan, after_compile)
        return ok

    current = [None]
    build = builder(*case)

    def build_and_note(cfg):
        current[0] = cfg
        return build(cfg)

    try:
        configs = case_ladder(case)
        chosen, launch_ = choose(build_and_note, configs, fits, phases(case[0]))
        if not any(row["cfg"] is chosen for row in rows):  # the last resort, taken unchecked
            fits(launch_plans(chosen, launch_, phases(case[0])))
    except Exception as e:  # noqa: BLE001 - reported as a failure
        return [dict(case=case, variant="?", cfg=None, launched=True, error=f"{type(e).__name__}: {e}"[:300])]
    for row in rows:
        if row["cfg"] is chosen:
            row["launched"] = True
            row["error"] = row["error"] or "; ".join(row.get("problems", []))
    return rows


def problems(row, variant: str, grid) -> list[str]:
    """What ``launch.fits_gpu`` would refuse in a compiled kernel, from its cubin."""
    out = []
    if row["stack"] > MAX_STACK:
        out.append(f"{row['stack']} B of stack ({row['loop_spills']} accesses in the step loop)")
    if row["shared"] > MAX_SHARED:
        out.append(f"{row['shared']} B of shared memory")
    room = programs_per_sm(row["regs"], row["cfg"].num_warps, row["shared"]) * N_SM
    if room == 0 or (variant == "tiled" and math.prod(grid) > room):
        out.append(f"{math.prod(grid)} programs, room for {room}")
    return out


def _fake_h100():
    """The SM count the ladders read: an H100's."""
    config.sm_count = lambda device: N_SM


def sweep_cases():
    """The Elman cell on every shape of the sweep, the gated cells on a coarser one, with h0, lengths
    and reverse all on; all off, and with resets, on the suite's shapes, and the gated cells'
    inference forward there. One case per distinct compiled kernel."""
    _fake_h100()
    cases, seen = [], set()
    shapes = [(cell, B, H, ALL_ON) for cell in KINDS if cell not in GATED for B in SWEEP_B for H in SWEEP_H]
    shapes += [(cell, B, H, ALL_ON) for cell in GATED for B in SWEEP_B[::2] for H in SWEEP_H[::2]]
    shapes += [(cell, B, H, flags) for cell in KINDS for B, H in SUITE.values() for flags in (ALL_OFF, *RESETS)]
    shapes += [(cell, B, H, INFERENCE) for cell in GATED for B, H in SUITE.values()]
    for (cell, B, H, flags), direction, dtype_name in itertools.product(shapes, ("fwd", "bwd"), DTYPES):
        key = specialisation_key(cell, direction, B, H, dtype_name, flags)
        if key not in seen and (direction == "fwd" or "save" not in flags):
            seen.add(key)
            cases.append((cell, direction, B, H, dtype_name, flags))
    return cases


def representative_cases(cases):
    """The CI sweep: of every group of cases that share a cell, direction, dtype (fp16 aside: it
    compiles as bf16), variant and whether w_hh stays on chip, the configuration that holds the most
    per thread (the whole tile over the warps), the one with the largest accumulator per thread
    (where spills come first) and the case with the smallest hidden size below 32 (where a
    product's reduction, H or lstm-proj's H // 2, falls below tl.dot's 16), plus what the
    benchmark suite launches. The whole sweep takes hours on two cores; this one minutes."""
    groups: dict[tuple, dict] = {}
    smallest: dict[tuple, tuple] = {}
    for case in cases:
        cell, direction, B, H, dtype_name, flags = case
        if dtype_name == "fp16":  # compiles as bf16 does, within two registers wherever compared here
            continue
        cfg = ladder(cell, B, H, dtype_name)[0]
        group = (cell, direction, dtype_name, cfg.variant, cfg.block_k >= H)
        groups.setdefault(group, {}).setdefault(cfg, case)
        if H < 32 and (group not in smallest or H < smallest[group][3]):  # K = H, or P = H // 2
            smallest[group] = case
    picked = list(smallest.values())  # one case per group, so no two alike
    for by_cfg in groups.values():
        def tile(c):
            return c.block_b * c.block_n * c.block_k / c.num_warps

        def accumulator(c):
            return c.block_b * c.block_n / c.num_warps

        top = [max(by_cfg, key=tile), max(by_cfg, key=accumulator)]
        picked += [by_cfg[c] for c in dict.fromkeys(top) if by_cfg[c] not in picked]
    picked += [c for c in cases if c[5].get("resets") and (c[2], c[3]) == SUITE[2] and c[4] in ("tf32", "bf16", "fp64")
               and c not in picked]  # every kernel with resets, at one suite shape (fp64 reads them as int32)
    published = {(cell, B, H, dtype_name, ()) for cell in KINDS for B, H in SUITE.values()
                 for dtype_name in ("tf32", "bf16")}  # what the benchmark suite launches
    return picked + [c for c in cases if c not in picked and
                     (c[0], c[2], c[3], c[4], tuple(k for k, v in c[5].items() if v)) in published]


def suite_table(rows) -> list[str]:
    """The published suite's figures: the kernel each cell launches (its cooperative launch where tiled);
    where the backward's configuration differs from the forward's, both, "fwd / bwd". The forward of
    the suite's fwd+bwd and, under no_grad, of its fwd (the gated cells' stores no c and no gates)."""
    launched = {(*r["case"][:5], r["case"][5].get("save", True)): r for r in rows if r["launched"]}
    lines = ["| cell | # | B | H | dtype | variant | blocks (B, N, K), split | warps | fwd regs/stack/smem KB | "
             "no_grad fwd | bwd regs/stack/smem KB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell, (number, (B, H)), dtype_name in itertools.product(CELLS, SUITE.items(),
                                                                 ("tf32", "bf16")):
        fwd, bwd = launched[(cell, "fwd", B, H, dtype_name, True)], launched[(cell, "bwd", B, H, dtype_name, True)]
        inference = launched.get((cell, "fwd", B, H, dtype_name, False), fwd)

        def blocks(c):
            return f"{c.block_b}, {c.block_n}, {c.block_k}, {c.split_k}"
        cfgs = [fwd["cfg"], bwd["cfg"]] if fwd["cfg"] != bwd["cfg"] else [fwd["cfg"]]
        cells = [f"{r['regs']}/{r['stack']}/{r['shared'] // 1024}" for r in (fwd, inference, bwd)]
        if inference["cfg"] != fwd["cfg"]:  # (a candidate the saving forward passed over)
            cells[1] += f" ({blocks(inference['cfg'])}; {inference['cfg'].num_warps})"
        lines.append(f"| {cell} | {number} | {B} | {H} | {dtype_name} | {' / '.join(c.variant for c in cfgs)} | "
                     f"{' / '.join(blocks(c) for c in cfgs)} | {' / '.join(str(c.num_warps) for c in cfgs)} | "
                     f"{' | '.join(cells)} |")
    return lines


def end_with_parent() -> None:
    """A worker's initializer: the kernel kills this process when the process that started it ends,
    however it ends (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def worker_pool(workers: int, initializer=end_with_parent, initargs=()):
    """A process pool whose workers end with the block, however it is left (an exception, or SIGTERM
    and SIGINT, which raise SystemExit and KeyboardInterrupt here), and with this process if it is
    killed outright (``initializer`` must call ``end_with_parent``)."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    pool = ProcessPoolExecutor(workers, initializer=initializer, initargs=initargs)
    try:
        yield pool
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for process in multiprocessing.active_children():
            process.kill()
            process.join(5)
        signal.signal(signal.SIGTERM, previous)


def suite_cases() -> list[tuple]:
    """What the benchmark suite launches: every cell, shape, TF32 and bf16, forward and backward, and
    the gated cells' inference forward (its fwd runs under no_grad)."""
    return [(cell, d, B, H, n, flags) for cell in CELLS for B, H in SUITE.values() for n in ("tf32", "bf16")
            for d, flags in (("fwd", ALL_OFF), ("bwd", ALL_OFF), *((("fwd", INFERENCE),) if cell in GATED else ()))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the suite's figures")
    parser.add_argument("--ci", action="store_true",
                        help="the representative sweep CI runs (see representative_cases), not all of it")
    parser.add_argument("--suite", action="store_true", help="only the cases the benchmark suite launches")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    opts = parser.parse_args()
    start = time.time()
    suite = suite_cases()
    cases = suite if opts.suite else sweep_cases()
    if opts.ci:
        cases = representative_cases(cases)
    with worker_pool(opts.workers) as pool:
        rows = [r for rs in pool.map(check_case, cases, chunksize=4) for r in rs]
        suite_rows = ([r for rs in pool.map(check_case, suite) for r in rs] if opts.table and not opts.suite
                      else rows)
    launched = [r for r in rows if r["launched"]]
    bad = [r for r in launched if r["error"]]
    for r in bad:
        print(f"FAIL {r['case']} {r['variant']} {r.get('cfg')}: {r['error']}")
    rejected = {repr(r["case"]) for r in rows if not r["launched"]}
    ok = [r for r in launched if "regs" in r]
    in_loop = [r for r in ok if r["loop_spills"]]
    most_stack = max((r["stack"] for r in in_loop), default=0)
    most_spills = max((r["loop_spills"] for r in in_loop), default=0)
    print(f"{len(in_loop)} launched kernels access local memory in their step loop (at most "
          f"{most_stack} B of it, {most_spills} accesses)")
    kind = "suite" if opts.suite else ("representative" if opts.ci else "whole")
    print(f"triton {triton.__version__}: {kind} sweep, {len(cases)} cases, "
          f"{len(rows)} kernels compiled for sm_90 in {time.time() - start:.0f} s; {len(rejected)} cases "
          f"launch a later candidate than their first; launched kernels: most registers "
          f"{max(r['regs'] for r in ok)}, most stack {max(r['stack'] for r in ok)} B, most shared memory "
          f"{max(r['shared'] for r in ok) // 1024} KB")
    if opts.table:
        print("\n".join(suite_table(suite_rows)))
    print("compile check:", "FAIL" if bad else "PASS")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
