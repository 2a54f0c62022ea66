"""The GPU session: the checks that need a GPU, in parts that each fit one device command.

Each part's steps take at most 7 minutes on a fresh machine (a device command may run 10).

    bash scripts/gpu_session.sh 1                    # part 1, results under $OUT (else runs/gpu-session/)
    bash scripts/gpu_session.sh 2                    # part 2
    python scripts/gpu_session.py --plan             # each part's steps, kernels and minutes (no GPU needed)
    python scripts/gpu_session.py --part 1 --smoke   # part 1 on CPU tensors under the interpreter (CI)
    python scripts/gpu_session.py --precompile DIR   # both parts' kernels compiled here (no GPU) into DIR

Part 1: versions; the warm-up: every kernel parts 1 and 2 launch, compiled in parallel processes
into TRITON_CACHE_DIR (``.triton-cache/`` in the checkout, git-ignored, for the next command to carry);
one parity row per cell x dtype (TF32, fp32 IEEE, bf16, fp16) on a small and a suite shape against
float64, cuDNN's own error beside it; the barrier stress; the Elman suite cells against cuDNN
(``benchmarks/run_suite.py``); the cache, packed into ``$OUT/triton-cache.tgz`` where it grew.
Part 2: the LSTM and GRU suite cells against cuDNN; the full parity sweep (``scripts/gpu_check.py``:
parity, extremes, variants, ecosystem), with compute-sanitizer (``scripts/sanitize.sh``) beside it.

Each step runs under its own timeout in its own process group (killed whole at its timeout or at the
part's deadline), its output appended to ``$OUT/partN.log`` as it comes and its results to
``$OUT/partN.md`` when it ends: a hang is a finding, not a lost session. The part ends with a summary
(step, status, seconds, timeout, kernels compiled during the step) and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
PART_LIMIT_S = 420  # each part's steps: 7 minutes
DEADLINE_S = 540  # no step runs past this: the device command (10 minutes) ends with results
CACHE_PIECE = 15 * 2**20  # $OUT brings back files of 16 MiB at most
PARITY_SHAPES, PARITY_DTYPES = ("odd1", "suite2"), ("tf32", "fp32", "bf16", "fp16")
SWEEP_SECTIONS = ("parity", "extremes", "variants", "ecosystem")


@dataclass
class Step:
    name: str
    argv: list  # run from the repository's root
    timeout_s: float  # its own limit
    estimate: Callable = lambda model: 0.0  # the plan's seconds on the GPU machine, from the model
    kernels: Callable = list  # the compile sweep's cases it launches (the warm-up compiles them first)
    env: dict = field(default_factory=dict)  # added to the environment (None: removed)
    along: str = ""  # runs at the same time as the step of this name (correctness checks only)


def me(*args) -> list:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def check_argv(smoke: bool, *args) -> list:
    return [sys.executable, str(SCRIPTS / "gpu_check.py"), *(["--smoke"] if smoke else []), *args]


def cells(gated: bool = False) -> list[str]:
    """The registry's cells (``gated``: those with more than one gate)."""
    from fastrnn.cells import CELLS

    return [name for name, cell in CELLS.items() if cell.gates > 1 or not gated]


def install_step(smoke: bool) -> Step:
    argv = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."]
    return Step("install", ["true"] if smoke else argv, 120, lambda m: m.INSTALL_S)


def suite_step(cell: str, smoke: bool, out: Path) -> Step:
    """The benchmark suite's cells of ``cell`` against cuDNN (``--smoke``: tiny ones against torch's
    CPU module)."""
    argv = (me("--step", "smoke-suite", "--cell", cell) if smoke else
            [sys.executable, str(REPO / "benchmarks" / "run_suite.py"), "--cell", cell,
             "--json", str(out / f"suite-{cell}.json")])
    return Step(f"suite-{cell}", argv, 150, lambda m: m.START_S + 32 * m.SUITE_CELL_S, lambda: suite_cases(cell))


def suite_cases(cell: str) -> list[tuple]:
    """What ``benchmarks/run_suite.py --cell CELL`` launches: every shape, fp32 (TF32, torch's
    default) and bf16, forward and backward, from given initial states; a gated cell's fwd rows
    (under no_grad) its inference forward, which stores no c and no gates."""
    from benchmarks.suite import SHAPES

    flags = dict(h0=True, lengths=False, reverse=False)
    runs = [("fwd", flags), ("bwd", flags)] + ([("fwd", dict(flags, save=False))] if cell in cells(gated=True) else [])
    return [(cell, d, B, H, n, f) for B, _, _, H in SHAPES.values() for n in ("tf32", "bf16") for d, f in runs]


def part_one(smoke: bool, out: Path) -> list[Step]:
    """Versions, the warm-up (both parts' kernels), parity rows, the barrier stress, the Elman suite."""
    shapes, dtypes = (("smoke1",), ("fp32", "bf16")) if smoke else (PARITY_SHAPES, PARITY_DTYPES)
    import gpu_check

    return [
        install_step(smoke),
        Step("versions", me("--step", "versions"), 60, lambda m: m.START_S),
        Step("warm-up", me("--step", "warm-up", "--parts", "1,2", *(["--smoke"] if smoke else [])), 300,
             lambda m: m.warm_up_s(part_kernels(1) + part_kernels(2)), env={"TRITON_INTERPRET": None}),
        Step("parity", check_argv(smoke, "--sections", "parity", "--kinds", ",".join(cells()), "--shapes",
                                 ",".join(shapes), "--dtypes", ",".join(dtypes)), 90,
             lambda m: m.parity_s(cells(), shapes, dtypes),
             lambda: gpu_check.kernel_cases(["parity"], cells(), shapes, dtypes)),
        Step("barrier", check_argv(smoke, "--sections", "barrier"), 90, lambda m: m.START_S + 3 * m.BARRIER_CELL_S,
             lambda: gpu_check.kernel_cases(["barrier"])),
        suite_step("rnn", smoke, out),
        Step("pack-cache", me("--step", "pack-cache", "--out", str(out)), 60, lambda m: m.PACK_S),
    ]


def part_two(smoke: bool, out: Path) -> list[Step]:
    """The LSTM and GRU suites, then the full parity sweep with the sanitizers beside it."""
    import gpu_check
    import sanitize_payload

    return [
        install_step(smoke),
        Step("versions", me("--step", "versions"), 60, lambda m: m.START_S),
        Step("warm-up", me("--step", "warm-up", "--parts", "2", *(["--smoke"] if smoke else [])), 240,
             lambda m: m.warm_up_s(part_kernels(2), cached=True), env={"TRITON_INTERPRET": None}),
        *(suite_step(cell, smoke, out) for cell in cells(gated=True)),
        Step("sweep", check_argv(smoke, "--sections", ",".join(SWEEP_SECTIONS)), 330, Model.sweep_s,
             lambda: gpu_check.kernel_cases(SWEEP_SECTIONS)),
        Step("sanitize", ["bash", str(SCRIPTS / "sanitize.sh")], 330, lambda m: m.SANITIZE_S,
             sanitize_payload.kernel_cases, along="sweep"),
    ]


PARTS = {1: part_one, 2: part_two}


def part_kernels(part: int) -> list[tuple]:
    """The compile sweep's cases of every kernel a part's steps launch."""
    return [case for step in PARTS[part](False, Path("out")) for case in step.kernels()]


class Model:
    """The plan's model of a part's steps on the GPU machine. Compile seconds per kernel are measured
    here (``scripts/compile_seconds.json``, by ``--precompile``, Triton 3.6); the rest are assumptions
    until a session measures them (each part's summary gives every step's seconds)."""

    PROCESSES = 16  # the GPU machine's cores: the warm-up's processes
    CPU_SPEED = 1.0  # its cores against the ones the compile seconds were measured on (assumed equal)
    START_S = 8  # a Python process: torch and fastrnn imported, CUDA initialised
    INSTALL_S, PACK_S = 15, 15  # pip install --no-build-isolation --no-deps -e .; the cache's tar.gz (200 MB)
    LAUNCHERS_S = 15  # the warm-up's kernel launchers (a C module per signature, about 1 s each), cold
    HIT_S = 0.05  # a kernel found in the cache: loaded, its resources remembered (0.01 CPU s measured here)
    ROW_S = 0.4  # a parity row: fused and cuDNN forward and backward in one dtype, the errors
    ORACLE_S, STEP_MS = 0.5, 0.5  # a float64 oracle (the torch path): its start, per time step
    SUITE_CELL_S = 1.5  # a suite cell: 3 rounds of do_bench (50 ms) for cuDNN and fastrnn, peak memory
    BARRIER_CELL_S = 4  # a cell of the barrier stress: its oracle, 41 runs of 2048 steps
    EXTREMES_S, VARIANTS_S, ECOSYSTEM_S = 30, 10, 60  # ecosystem: torch.compile's inductor mostly
    SANITIZE_S = 120  # three compute-sanitizer processes at once, each starting slowly

    def __init__(self, timings: dict):
        self.timings, self.unmeasured = timings.get("cases", {}), set()

    def case_s(self, case, cached: bool = False) -> float:
        """Seconds to compile (``cached``: to find) a case's kernels on one of this machine's cores."""
        from warm_cache import case_label

        label = case_label(case)
        entry = self.timings.get(label)
        if entry is None:
            self.unmeasured.add(label)
            entry = self.like(case)
        if cached:
            return entry.get("cached_seconds", self.HIT_S * entry.get("kernels", 1))
        return entry.get("seconds", 0.0) or self.like(case)["seconds"]

    def like(self, case) -> dict:
        """The median of the measured cases of the same cell, direction and dtype (else of all)."""
        import statistics

        cell, direction, _, _, dtype_name, _ = case
        same = [e for label, e in self.timings.items() if "seconds" in e
                and label.split()[:2] == [cell, direction] and label.split()[4] == dtype_name]
        pool = same or [e for e in self.timings.values() if "seconds" in e] or [{"seconds": 3.0}]
        return {"seconds": statistics.median(e["seconds"] for e in pool), "kernels": 1}

    def compile_s(self, cases, cached: bool = False) -> float:
        """The warm-up's compiling: its cases spread over PROCESSES (longest first)."""
        return makespan([self.case_s(c, cached) / self.CPU_SPEED for c in cases], self.PROCESSES)

    def warm_up_s(self, cases, cached: bool = False) -> float:
        from warm_cache import unique_cases

        return self.START_S + self.compile_s(unique_cases(cases), cached) + (0 if cached else self.LAUNCHERS_S)

    def parity_s(self, kinds, shapes, dtypes) -> float:
        import gpu_check

        oracles = sum(self.ORACLE_S + gpu_check.SHAPES[s][1] * self.STEP_MS / 1000 for s in shapes) * len(kinds)
        return self.START_S + oracles + len(kinds) * len(shapes) * len(dtypes) * self.ROW_S

    def sweep_s(self) -> float:
        import gpu_check

        parity = self.parity_s(gpu_check.KINDS, gpu_check.ODD + gpu_check.SUITE, gpu_check.DTYPES)
        return parity + self.EXTREMES_S + self.VARIANTS_S + self.ECOSYSTEM_S


def makespan(seconds, processes: int) -> float:
    """When the last of ``seconds`` of work ends on ``processes`` workers, longest first."""
    loads = [0.0] * processes
    for s in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += s
    return max(loads)


TIMINGS = SCRIPTS / "compile_seconds.json"


def part_seconds(steps, estimates) -> float:
    """A part's seconds: steps one after another, those run along another counting as the longer."""
    groups: dict[str, float] = {}
    for step, s in zip(steps, estimates):
        key = step.along or step.name
        groups[key] = max(groups.get(key, 0.0), s)
    return sum(groups.values())


def plan(processes: int, listing: bool) -> int:
    """Print each part's steps, kernels and estimated minutes; non-zero where a part's steps take
    more than 7 minutes."""
    import json

    from warm_cache import case_label, unique_cases

    timings = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    model = Model(timings)
    model.PROCESSES = processes
    print(plan_header(timings, model))
    ok = True
    for part, build in PARTS.items():
        steps = build(False, Path("$OUT"))
        estimates = [step.estimate(model) for step in steps]
        total = part_seconds(steps, estimates)
        ok &= total <= PART_LIMIT_S
        print(f"\nPart {part}: {total / 60:.1f} min of {PART_LIMIT_S / 60:.0f} "
              f"({'OK' if total <= PART_LIMIT_S else 'OVER'}){' with part 1 cache carried' if part == 2 else ''}")
        print("| step | kernels launched | est s | timeout s |\n|---|---|---|---|")
        for step, s in zip(steps, estimates):
            along = f" (along {step.along})" if step.along else ""
            ok &= s <= step.timeout_s
            print(f"| {step.name}{along} | {len(unique_cases(step.kernels())) or ''} | {s:.0f} | {step.timeout_s:.0f}"
                  f"{'' if s <= step.timeout_s else ' (OVER)'} |")
        print(warm_up_note(part, model, steps, estimates))
        if listing:
            print("\n".join(f"  {case_label(c)}" for c in unique_cases(part_kernels(part))))
    if model.unmeasured:
        print(f"\n{len(model.unmeasured)} cases have no measured compile seconds: the median of their cell, "
              f"direction and dtype stands in (--precompile measures them)")
    print(f"\nplan: {'every part within' if ok else 'a part over'} {PART_LIMIT_S / 60:.0f} minutes")
    return 0 if ok else 1


def plan_header(timings: dict, model: Model) -> str:
    measured = (f"measured with Triton {timings['triton']}, Python {timings['python']}, {timings['machine']}, "
                f"{timings['processes']} processes ({timings['measured']}), {len(timings['cases'])} cases"
                if timings else "not measured (no scripts/compile_seconds.json): 3 s a kernel assumed")
    return (f"GPU session plan. Compile seconds: {measured}. Assumed on the GPU machine: {model.PROCESSES} "
            f"compile processes, its cores {model.CPU_SPEED:g}x these. Run steps: the Model's figures "
            f"(scripts/gpu_session.py), assumptions until a session's summary measures them.")


def warm_up_note(part: int, model: Model, steps, estimates) -> str:
    """What the part's warm-up compiles, and for part 2 what it costs without part 1's cache."""
    from warm_cache import unique_cases

    if part == 1:
        cases = unique_cases(part_kernels(1) + part_kernels(2))
        one_core = sum(model.case_s(c) for c in cases)
        cells = {}
        for c in cases:
            cells[c[0]] = cells.get(c[0], 0) + 1
        return (f"warm-up: the kernels of parts 1 and 2, {len(cases)} cases ("
                + ", ".join(f"{k} {v}" for k, v in cells.items()) + f"), {one_core:.0f} s on one core, "
                f"{model.compile_s(cases):.0f} s over {model.PROCESSES} processes")
    cold = model.warm_up_s(part_kernels(2))
    warm = estimates[[s.name for s in steps].index("warm-up")]
    total = part_seconds(steps, estimates) - warm + cold
    return (f"without part 1's cache (a fresh machine, nothing carried) its warm-up compiles them: "
            f"{cold:.0f} s, the part {total / 60:.1f} min")


CACHE_ENV = {"TRITON_DEFAULT_FP_FUSION": "1",  # as compile_check sets it: part of Triton's cache key
             "TRITON_STORE_BINARY_ONLY": "1"}  # a cache of cubins (and sources), no IR: smaller to carry


def step_env(step: Step, smoke: bool, cache: Path) -> dict:
    """The environment of a step: the Triton cache (``CACHE_ENV`` the same in every step and in
    ``--precompile``, so that they share it), unbuffered output, ``PYTHON`` this interpreter; with
    ``smoke`` the interpreter and the fused path on CPU tensors."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRITON_CACHE_DIR": str(cache), **CACHE_ENV,
           "PYTHON": sys.executable}  # (the interpreter scripts/sanitize.sh runs its payload with)
    if smoke:
        env.update(TRITON_INTERPRET="1", FASTRNN_BACKEND="triton")
    for key, value in step.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class Running:
    """A step started in its own process group, its output teed line by line into the part's log
    (prefixed with its name) and kept for its report."""

    def __init__(self, step: Step, env: dict, log, lock, timeout_s: float):
        self.step, self.start, self.timeout_s, self.lines = step, time.monotonic(), timeout_s, []
        self.proc = subprocess.Popen(step.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, errors="replace", start_new_session=True)
        self.threads = [threading.Thread(target=self.tee, args=(stream, log, lock, keep), daemon=True)
                        for stream, keep in ((self.proc.stdout, True), (self.proc.stderr, False))]
        for t in self.threads:
            t.start()
        self.status = ""

    def tee(self, stream, log, lock, keep: bool) -> None:
        for line in stream:
            with lock:
                log.write(f"[{self.step.name}] {line}")
                log.flush()
            if keep:
                self.lines.append(line.rstrip("\n"))

    def poll(self) -> bool:
        """Whether it has ended (ended now, at its timeout, with its whole process group)."""
        if self.status:
            return True
        if self.proc.poll() is not None:
            self.status = "PASS" if self.proc.returncode == 0 else f"FAIL (exit {self.proc.returncode})"
            self.kill()  # anything it left running in its group
        elif time.monotonic() - self.start > self.timeout_s:
            self.kill()
            self.status = f"TIMEOUT ({self.timeout_s:.0f} s)"
        if self.status:
            self.seconds = time.monotonic() - self.start
            for t in self.threads:
                t.join(5)
        return bool(self.status)

    def kill(self) -> None:
        """SIGTERM to its process group, SIGKILL to whatever of it is left 5 s later."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def batches(steps) -> list[list[Step]]:
    """The steps in order, each with those that run along it."""
    out = []
    for step in steps:
        if step.along and out and out[-1][0].name == step.along:
            out[-1].append(step)
        else:
            out.append([step])
    return out


def run_part(part: int, out: Path, smoke: bool, deadline_s: float, cache: Path) -> int:
    """Run a part's steps (each batch after the last), reporting each as it ends; 0 if all passed."""
    from warm_cache import groups, relocate, unpack_pieces

    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    steps, start, lock, results = PARTS[part](smoke, out), time.monotonic(), threading.Lock(), []
    unpacked, relocated = unpack_pieces(cache), relocate(cache)  # a cache carried packed, or made elsewhere
    at_start = len(groups(cache))
    with open(out / f"part{part}.md", "a") as report, open(out / f"part{part}.log", "a") as log:
        report.write(f"# GPU session part {part}{' (smoke)' if smoke else ''}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                     f"Triton cache {cache}: {at_start} kernels at the start"
                     f"{f' ({unpacked} files unpacked from triton-cache.tgz)' if unpacked else ''}"
                     f"{f', {relocated} pointed at this folder' if relocated else ''}\n\n")
        for batch in batches(steps):
            left = deadline_s - (time.monotonic() - start)
            if left < 10:
                results += [(s.name, "SKIPPED (the part's deadline)", 0.0, s.timeout_s, 0) for s in batch]
                continue
            before = len(groups(cache))
            running = [Running(s, {**step_env(s, smoke, cache), "GPU_SESSION_CACHE_AT_START": str(at_start)},
                               log, lock, min(s.timeout_s, left)) for s in batch]
            while not all([r.poll() for r in running]):
                time.sleep(0.2)
            compiled = len(groups(cache)) - before
            for r in running:
                results.append((r.step.name, r.status, r.seconds, r.timeout_s, compiled))
                report.write(f"## {r.step.name}: {r.status} in {r.seconds:.0f} s (timeout {r.timeout_s:.0f} s; "
                             f"kernels compiled during it{' and along it' if len(batch) > 1 else ''}: {compiled})\n"
                             + "\n".join(r.lines) + "\n\n")
                report.flush()
                print(f"{r.step.name}: {r.status} in {r.seconds:.0f} s", flush=True)
        summary = summary_lines(part, results, time.monotonic() - start, out)
        report.write("\n".join(summary) + "\n")
    print("\n".join(summary))
    return 0 if all(status == "PASS" for _, status, *_ in results) else 1


def summary_lines(part: int, results, seconds: float, out: Path) -> list[str]:
    bad = [name for name, status, *_ in results if status != "PASS"]
    lines = [f"## Summary of part {part}", "| step | status | s | timeout s | kernels compiled |",
             "|---|---|---|---|---|"]
    lines += [f"| {name} | {status} | {s:.0f} | {t:.0f} | {k} |" for name, status, s, t, k in results]
    lines.append(f"part {part}: {'PASS' if not bad else 'FAIL (' + ', '.join(bad) + ')'} in {seconds:.0f} s "
                 f"(limit {PART_LIMIT_S} s); results {out}/part{part}.md, output {out}/part{part}.log")
    return lines


def step_versions() -> int:
    """The machine: GPU, driver, Python, torch, CUDA, cuDNN, Triton, fastrnn, cores, the Triton cache."""
    import platform

    import torch
    import triton

    import fastrnn
    import warm_cache

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                          "--format=csv,noheader"], capture_output=True, text=True) if which("nvidia-smi") else None
    print(f"- GPU: {smi.stdout.strip() if smi and smi.returncode == 0 else 'none (nvidia-smi absent or failing)'}")
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    print(f"- Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
          f"cuDNN {cudnn}), "
          f"triton {triton.__version__}, fastrnn {fastrnn.__version__} from {Path(fastrnn.__file__).parent}")
    print(f"- {os.cpu_count()} CPU cores; {platform.platform()}")
    print(f"- building: {build_tools()}")
    cache = os.environ.get("TRITON_CACHE_DIR", "")
    try:
        mine = warm_cache.fingerprint()
        print(f"- Triton cache {cache}: {len(warm_cache.groups(cache)) if cache else '?'} kernels; this machine's "
              f"key parts {mine}; the cache's: {warm_cache.compare_fingerprints(cache, mine) if cache else '-'}")
    except Exception as e:  # noqa: BLE001 - a Triton without the NVIDIA backend
        print(f"- Triton cache {cache}: no fingerprint ({type(e).__name__}: {e})")
    return 0


def build_tools() -> str:
    """What the install and Triton's first launch build with: setuptools (the editable install needs 70.1
    or newer, or an older one with ``wheel``), Python's headers and a C compiler (Triton compiles its
    launcher in C at its first launch)."""
    import importlib.util
    import sysconfig

    try:
        from importlib.metadata import version

        setuptools = version("setuptools")
    except Exception:  # noqa: BLE001 - not installed
        setuptools = "absent"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    compilers = [c for c in ("cc", "gcc", "clang") if which(c)]
    return (f"setuptools {setuptools}, wheel {'present' if importlib.util.find_spec('wheel') else 'absent'}, "
            f"{headers} {'present' if headers.exists() else 'ABSENT'}, C compiler {', '.join(compilers) or 'NONE'}")


def which(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


def smoke_cases() -> list[tuple]:
    """The smoke test's warm-up: two tiny kernels, to run the warm-up's machinery."""
    return [("rnn", d, 3, 20, "tf32", dict(h0=True, lengths=False, reverse=False)) for d in ("fwd", "bwd")]


def step_warm_up(parts: list[int], smoke: bool, workers: int, libtriton: str | None = None) -> int:
    """Compile every kernel of ``parts`` (the smoke test: two tiny ones) into TRITON_CACHE_DIR, in
    ``workers`` processes, the longest first; on a GPU their launchers too. Exit 1 if a launched
    kernel fails to compile."""
    import json

    import warm_cache

    if not has_nvidia_backend():
        print("- warm-up: this Triton has no NVIDIA backend to compile with: skipped")
        return 0
    cache = os.environ["TRITON_CACHE_DIR"]
    moved = warm_cache.relocate(cache)
    cases = warm_cache.unique_cases(smoke_cases() if smoke else [c for p in parts for c in part_kernels(p)])
    cases = warm_cache.heaviest_first(cases, json.loads(TIMINGS.read_text())["cases"] if TIMINGS.exists() else {})
    before, start = len(warm_cache.groups(cache)), time.perf_counter()
    os.environ["FASTRNN_WARM_LAUNCHERS"] = "1" if cuda_driver_present() else "0"
    results = warm_cache.compile_cases(cases, workers, libtriton)
    after = len(warm_cache.groups(cache))
    print(f"- warm-up of parts {','.join(map(str, parts))}{' (smoke)' if smoke else ''}: "
          + warm_cache.summarise(results, time.perf_counter() - start, workers, before, after)
          + (f"; {moved} cache entries pointed at this folder" if moved else ""))
    return 1 if any(r["error"] for r in results) else 0


def has_nvidia_backend() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def cuda_driver_present() -> bool:
    import ctypes.util

    return ctypes.util.find_library("cuda") is not None and which("nvidia-smi")


SMOKE_SUITE = {1: (2, 5, 3, 8), 2: (3, 4, 2, 16)}  # (B, T, I, H): tiny shapes for the CPU interpreter


def step_smoke_suite(cell: str) -> int:
    """run_suite.py's table on tiny shapes on the CPU: fastrnn (the interpreter) against torch's CPU
    module, the same callables (``benchmarks.suite.make_case``), median of 3 wall-clock runs."""
    import statistics

    import torch

    from benchmarks.suite import AGREEMENT, MODES, disagreement, make_case

    print("| cell | # | B | T | H | dtype | mode | torch ms | fastrnn ms | speedup | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ok = True
    for number, shape in SMOKE_SUITE.items():
        for mode in MODES:
            runs = {provider: make_case(provider, shape, torch.float32, mode, device="cpu", cell=cell)
                    for provider in ("cudnn", "fastrnn")}  # "cudnn" is torch's own module, here on the CPU
            ms = {provider: statistics.median(timed(run) for _ in range(3)) for provider, run in runs.items()}
            err = disagreement({provider: run() for provider, run in runs.items()})
            ok &= err <= AGREEMENT["fp32"]
            B, T, _, H = shape
            print(f"| {cell} | {number} | {B} | {T} | {H} | fp32 | {mode} | {ms['cudnn']:.2f} | {ms['fastrnn']:.2f} | "
                  f"{ms['cudnn'] / ms['fastrnn']:.2f}x | {err:.1e} |")
    return 0 if ok else 1


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000


def step_pack_cache(out: Path) -> int:
    """Pack the Triton cache into ``out`` if this part compiled anything, for the next part to carry."""
    from warm_cache import groups

    cache = Path(os.environ["TRITON_CACHE_DIR"])
    at_start, now = int(os.environ.get("GPU_SESSION_CACHE_AT_START", "0")), len(groups(cache))
    if now == at_start:
        print(f"- Triton cache unchanged ({now} kernels): nothing packed; carry the same .triton-cache again")
        return 0
    names, size = pack(cache, out)
    print(f"- Triton cache: {now} kernels ({now - at_start} new), {size / 2**20:.1f} MiB packed into "
          f"{', '.join(names)}: put them in .triton-cache/ and carry it (the next part unpacks them)")
    return 0


def pack(cache: Path, dest: Path) -> tuple[list[str], int]:
    """``cache`` as ``dest/triton-cache.tgz`` (in pieces of 15 MiB, ``.00``, ``.01``, ..., when larger:
    $OUT brings back files of 16 MiB at most): the names and the packed bytes. Each kernel's
    ``.source`` (its first IR, a quarter of the cache, which a cache hit does not read) stays out."""
    import io
    import tarfile

    def keep(info):
        return None if info.name.endswith(".source") else info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for entry in sorted(cache.iterdir()):
            if not entry.name.startswith("triton-cache.tgz"):
                tar.add(entry, arcname=entry.name, filter=keep)
    data = buffer.getvalue()
    pieces = [data[i:i + CACHE_PIECE] for i in range(0, len(data), CACHE_PIECE)]
    names = ["triton-cache.tgz"] if len(pieces) == 1 else [f"triton-cache.tgz.{i:02d}" for i in range(len(pieces))]
    dest.mkdir(parents=True, exist_ok=True)
    for name, piece in zip(names, pieces):
        (dest / name).write_bytes(piece)
    return names, len(data)


def precompile(cache: Path, parts: list[int], workers: int, libtriton: str | None, timings: Path | None,
               unmeasured: bool = False) -> int:
    """Compile the parts' kernels here (no GPU) into ``cache``, record this machine's cache-key
    fingerprint beside them (``fingerprint.json``; with ``libtriton``, the keys are those of the
    Triton whose libtriton.so that is) and, with ``timings``, each case's compile seconds as they come
    (``unmeasured``: only the cases without cold seconds there)."""
    import json

    cache.mkdir(parents=True, exist_ok=True)
    os.environ.update(TRITON_CACHE_DIR=str(cache.resolve()), **CACHE_ENV)
    os.environ.pop("TRITON_INTERPRET", None)
    import warm_cache

    cases = warm_cache.unique_cases([c for p in parts for c in part_kernels(p)])
    known = json.loads(TIMINGS.read_text())["cases"] if TIMINGS.exists() else {}
    if unmeasured and timings and timings.exists():
        measured = json.loads(timings.read_text())["cases"]
        cases = [c for c in cases if "seconds" not in measured.get(warm_cache.case_label(c), {})]
    cases = warm_cache.heaviest_first(cases, known)
    before, start = len(warm_cache.groups(cache)), time.perf_counter()
    (cache / "fingerprint.json").write_text(json.dumps(warm_cache.fingerprint(libtriton), indent=1) + "\n")
    record = (lambda r: warm_cache.record_timings([r], timings, workers)) if timings else None
    results = warm_cache.compile_cases(cases, workers, libtriton, on_result=record)
    after = len(warm_cache.groups(cache))
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    print(f"precompile of parts {','.join(map(str, parts))} into {cache}: "
          + warm_cache.summarise(results, time.perf_counter() - start, workers, before, after)
          + f"; the folder holds {size / 2**20:.1f} MiB")
    return 1 if any(r["error"] for r in results) else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--part", type=int, choices=sorted(PARTS), help="run a part's steps")
    what.add_argument("--plan", action="store_true", help="each part's steps, kernels and estimated minutes")
    what.add_argument("--precompile", type=Path, metavar="DIR", help="compile the parts' kernels into DIR, here")
    what.add_argument("--pack-cache", type=Path, nargs=2, metavar=("CACHE", "DEST"),
                      help="pack a Triton cache folder into DEST/triton-cache.tgz* (to carry; parts unpack it)")
    what.add_argument("--step", choices=("versions", "warm-up", "smoke-suite", "pack-cache"),
                      help="one of a part's own steps (the driver runs them)")
    p.add_argument("--smoke", action="store_true", help="CPU tensors under the interpreter, tiny shapes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "runs" / "gpu-session"))
    p.add_argument("--cache", type=Path, default=None, help="the Triton cache (default TRITON_CACHE_DIR, "
                   "else .triton-cache in the checkout; with --smoke, OUT/smoke-triton-cache)")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="no step runs past this many seconds")
    p.add_argument("--parts", default="1,2", help="the parts whose kernels --precompile and the warm-up compile")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--processes", type=int, default=Model.PROCESSES, help="the plan's compile processes")
    p.add_argument("--list", action="store_true", help="with --plan, every kernel case")
    p.add_argument("--libtriton", default=None, help="with --precompile, key the kernels as the Triton whose "
                   "libtriton.so this is would (the GPU machine's Python build of the same Triton)")
    p.add_argument("--timings", type=Path, default=None, help="with --precompile, record compile seconds here")
    p.add_argument("--unmeasured", action="store_true",
                   help="with --precompile and --timings, only the cases without compile seconds there")
    p.add_argument("--cell", default="rnn", help="smoke-suite's cell")
    return p.parse_args(argv)


def default_cache(args) -> Path:
    if args.cache:
        return args.cache.resolve()
    if args.smoke:
        return (args.out / "smoke-triton-cache").resolve()
    return Path(os.environ.get("TRITON_CACHE_DIR") or REPO / ".triton-cache").resolve()


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = [int(p) for p in args.parts.split(",")]
    if args.plan:
        return plan(args.processes, args.list)
    if args.pack_cache:
        names, size = pack(args.pack_cache[0], args.pack_cache[1])
        print(f"{args.pack_cache[0]}: {size / 2**20:.1f} MiB packed into {', '.join(names)} in {args.pack_cache[1]}")
        return 0
    if args.precompile:
        return precompile(args.precompile, parts, args.workers, args.libtriton, args.timings, args.unmeasured)
    if args.step == "versions":
        return step_versions()
    if args.step == "warm-up":
        return step_warm_up(parts, args.smoke, min(args.workers, 2) if args.smoke else args.workers)
    if args.step == "smoke-suite":
        return step_smoke_suite(args.cell)
    if args.step == "pack-cache":
        return step_pack_cache(args.out)
    return run_part(args.part, args.out.resolve(), args.smoke, args.deadline, default_cache(args))


if __name__ == "__main__":
    sys.path.append(str(REPO))  # benchmarks/ (fastrnn itself is installed)
    sys.exit(main())
