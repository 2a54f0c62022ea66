"""Compile the GPU session's kernels ahead of its runs, into Triton's cache (``TRITON_CACHE_DIR``).

Used by ``scripts/gpu_session.py``: its warm-up step on the GPU machine, and ``--precompile DIR`` on
a machine without a GPU. Each kernel is compiled exactly as ``scripts/compile_check.py`` compiles it
(the launcher's own ladder, on meta tensors, for sm_90 through the compile-only driver), in parallel
processes; on a GPU each compiled kernel's launcher (a small C module Triton builds per signature)
is built too. Nothing here needs a GPU.

Triton finds a kernel in its cache by a key made of: Triton's version and the hashes of its own
sources and of its libtriton.so (a different file for each Python version), the kernel's source and
specialisation, the compile options, the target (cuda, 90) and the ptxas version, and the
cache-invalidating environment variables that are set (TRITON_DEFAULT_FP_FUSION among them, which
``compile_check`` sets). ``fingerprint()`` lists these parts, so that two machines can tell whether a
cache made on one can serve the other. A cache records absolute paths (each kernel's group file
lists its files): ``relocate`` points them at the folder the cache now lies in.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent


def case_label(case) -> str:
    """``rnn fwd B=32 H=256 tf32 h0+lengths variant=tiled``: a case, readably and as a dict key (a
    gated forward that stores nothing for a backward: ``no-save``)."""
    cell, direction, B, H, dtype_name, flags = case
    on = "+".join(k for k in ("h0", "lengths", "reverse") if flags.get(k)) or "-"
    variant = f" variant={flags['variant']}" if flags.get("variant") else ""
    saved = " no-save" if flags.get("save") is False else ""
    return f"{cell} {direction} B={B} H={H} {dtype_name} {on}{variant}{saved}"


def launch_key(case) -> tuple:
    """What the JIT sees of a case's first candidate (kernel, grid, constexprs, argument dtypes and
    integer specialisation), with its ladder: cases with the same key compile the same kernels."""
    import torch

    import compile_check

    ladder = compile_check.case_ladder(case)
    kernel, grid, args, kwargs = compile_check.builder(*case)(ladder[0])
    spec = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else (a == 1, a % 16 == 0) if isinstance(a, int)
                 else repr(a) for a in args)
    return getattr(kernel, "__name__", repr(kernel)), ladder, grid, spec, tuple(sorted(map(repr, kwargs.items())))


def unique_cases(cases) -> list[tuple]:
    """``cases`` without those that compile the same kernels as an earlier one."""
    seen, out = set(), []
    for case in cases:
        key = launch_key(case)
        if key not in seen:
            seen.add(key)
            out.append(case)
    return out


def heaviest_first(cases, timings: dict | None = None) -> list[tuple]:
    """``cases`` in the order a pool should take them so that the last ends soonest: the longest
    first, by the measured compile seconds of ``timings`` (``compile_seconds.json``'s cases), else by
    a guess from the work a kernel's products hold (gates x H / 100 seconds, doubled in fp64)."""
    import compile_check

    timings = timings or {}

    def seconds(case):
        cell, _, _, H, dtype_name, _ = case
        guess = compile_check.KINDS[cell][0] * H / 100 * (2 if dtype_name == "fp64" else 1)
        return timings.get(case_label(case), {}).get("seconds", guess)

    return sorted(cases, key=seconds, reverse=True)


class HitCounter:
    """Counts Triton's compilations in this process (``knobs.compilation.listener``): found in the
    cache or compiled."""

    def __init__(self):
        self.hits = self.misses = 0

    def __call__(self, *, cache_hit: bool, **_):
        if cache_hit:
            self.hits += 1
        else:
            self.misses += 1


COUNTER = HitCounter()


def worker_setup(libtriton: str | None = None) -> None:
    """Each compile process: ends with its parent, counts cache hits, and (``libtriton``) keys its
    kernels as the Triton whose libtriton.so that is would."""
    import compile_check
    from triton import knobs

    compile_check.end_with_parent()
    knobs.compilation.listener = COUNTER
    if libtriton:
        key_as_if(libtriton)


def warm_case(case) -> dict:
    """Compile one case's kernels (``compile_check.check_case``), and on a GPU their launchers:
    ``{label, seconds, kernels, hits, misses, launchers, error}``."""
    import compile_check

    start, cpu, hits, misses = time.perf_counter(), cpu_seconds(), COUNTER.hits, COUNTER.misses
    launchers = []
    rows = compile_check.check_case(case, after_compile=lambda compiled: launchers.append(build_launcher(compiled)))
    errors = [r["error"] for r in rows if r["launched"] and r["error"]]
    return dict(label=case_label(case), seconds=time.perf_counter() - start, cpu_seconds=cpu_seconds() - cpu,
                kernels=len(rows),
                hits=COUNTER.hits - hits, misses=COUNTER.misses - misses, launchers=sum(launchers),
                error=errors[0] if errors else "")


def cpu_seconds() -> float:
    """CPU seconds this process and its finished children (ptxas, cuobjdump) have used: a compile's
    cost on a core of its own, whatever else this machine runs."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def build_launcher(compiled) -> bool:
    """Build (or find in the cache) a compiled kernel's launcher, where a CUDA driver is there."""
    if os.environ.get("FASTRNN_WARM_LAUNCHERS") != "1":
        return False
    try:
        from triton.backends.nvidia.driver import CudaLauncher

        CudaLauncher(compiled.src, compiled.metadata)
        return True
    except Exception:  # noqa: BLE001 - the launch builds it then, as it always does
        return False


def compile_cases(cases, workers: int, libtriton: str | None = None, on_result=None) -> list[dict]:
    """Warm every case in ``workers`` processes (each ending with this one); one dict per case, in
    order, each handed to ``on_result`` as soon as it and those before it are done."""
    import compile_check

    results = []
    with compile_check.worker_pool(workers, initializer=worker_setup, initargs=(libtriton,)) as pool:
        for result in pool.map(warm_case, cases, chunksize=1):
            results.append(result)
            if on_result:
                on_result(result)
    return results


def groups(cache_dir) -> list[Path]:
    """The kernels in a Triton cache folder: one group file each."""
    return sorted(Path(cache_dir).glob("*/__grp__*.json"))


def relocate(cache_dir) -> int:
    """Point each kernel's group file at the files beside it (a cache made or unpacked elsewhere
    names another folder); how many were rewritten."""
    moved = 0
    for group in groups(cache_dir):
        data = json.loads(group.read_text())
        paths = data.get("child_paths", {})
        here = {name: str(group.parent / Path(path).name) for name, path in paths.items()}
        if here != paths:
            group.write_text(json.dumps({**data, "child_paths": here}))
            moved += 1
    return moved


def unpack_pieces(cache_dir) -> int:
    """Unpack ``triton-cache.tgz`` (or its pieces ``.00``, ``.01``, ...: a part's packed cache,
    carried as it came back) found in the cache folder into it, and remove them; how many files."""
    import io
    import tarfile

    pieces = sorted(Path(cache_dir).glob("triton-cache.tgz*"))
    if not pieces:
        return 0
    with tarfile.open(fileobj=io.BytesIO(b"".join(p.read_bytes() for p in pieces)), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # (Python 3.12 warns without)
        tar.extractall(cache_dir, members=members, **safe)
    for piece in pieces:
        piece.unlink()
    return sum(m.isfile() for m in members)


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def libtriton_path() -> Path:
    import triton

    return Path(triton.__file__).parent / "_C" / "libtriton.so"


def triton_key_as(libtriton: str | None = None) -> str:
    """Triton's own part of every cache key, as a Triton whose libtriton.so is ``libtriton`` (the
    same Triton built for another Python) would make it: that file hashed where ours is."""
    from triton.runtime import cache

    key = cache.triton_key()
    if not libtriton:
        return key
    ours, theirs = sha256(libtriton_path()), sha256(libtriton)
    if theirs in key:
        return key
    if ours not in key:
        raise RuntimeError("this Triton's cache key does not hash its libtriton.so: --libtriton cannot apply")
    return key.replace(ours, theirs)


def key_as_if(libtriton: str) -> None:
    """Key this process's kernels as the Triton whose libtriton.so is ``libtriton`` would."""
    from triton.runtime import cache

    key = triton_key_as(libtriton)
    cache.triton_key = lambda: key


def fingerprint(libtriton: str | None = None) -> dict:
    """The parts of Triton's cache key that differ between machines (see the module's doc)."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.nvidia.compiler import get_ptxas_version

    key = triton_key_as(libtriton)
    return dict(triton=triton.__version__, python=platform.python_version(),
                triton_key=hashlib.sha256(key.encode()).hexdigest()[:16],
                libtriton=sha256(libtriton or libtriton_path())[:16], ptxas=ptxas_version(get_ptxas_version),
                env=get_cache_invalidating_env_vars())


def ptxas_version(get_ptxas_version) -> str:
    """Which ptxas compiles for sm_90 and its version, e.g. ``ptxas V12.8.93``."""
    import re

    try:
        text = str(get_ptxas_version(90))
    except TypeError:  # older Tritons take no architecture
        text = str(get_ptxas_version())
    version = re.search(r"V\d+\.\d+\.\d+", text)
    return f"{text.split(':')[0].strip()} {version.group(0) if version else text.strip()[:60]}"


def compare_fingerprints(cache_dir, mine: dict) -> str:
    """Whether the cache folder's recorded fingerprint (from ``--precompile``) matches this machine's."""
    recorded = Path(cache_dir) / "fingerprint.json"
    if not recorded.exists():
        return "no fingerprint recorded with the cache"
    theirs = json.loads(recorded.read_text())
    differ = [k for k in ("triton", "triton_key", "libtriton", "ptxas", "env") if theirs.get(k) != mine.get(k)]
    return "matches this machine's" if not differ else "differs in " + ", ".join(
        f"{k} ({theirs.get(k)} there, {mine.get(k)} here)" for k in differ)


def record_timings(results, path: Path, workers: int) -> None:
    """Merge compile seconds per case into ``path`` (JSON): ``seconds`` (CPU seconds, where
    measured: ``cpu_seconds``) where something compiled, ``cached_seconds`` where all was found in
    the cache."""
    import triton

    data = json.loads(path.read_text()) if path.exists() else {"cases": {}}
    data.update(triton=triton.__version__, python=platform.python_version(), processes=workers,
                machine=f"{platform.machine()}, {os.cpu_count()} cores", measured=time.strftime("%Y-%m-%d"))
    for r in results:
        entry = data["cases"].setdefault(r["label"], {})
        entry["kernels"] = r["kernels"]
        entry["seconds" if r["misses"] else "cached_seconds"] = round(r.get("cpu_seconds", r["seconds"]), 2)
        if r["misses"]:
            entry["wall_seconds"] = round(r["seconds"], 2)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def summarise(results, seconds: float, workers: int, before: int, after: int) -> str:
    """The warm-up's (or precompile's) one-line account."""
    kernels, misses = sum(r["kernels"] for r in results), sum(r["misses"] for r in results)
    bad = [r for r in results if r["error"]]
    return (f"{len(results)} cases, {kernels} kernels: {misses} compiled, {kernels - misses} found in the cache "
            f"(cache folder {before} -> {after} kernels), {sum(r['launchers'] for r in results)} launchers, "
            f"{seconds:.0f} s in {workers} processes; {len(bad)} launched kernels failed to compile"
            + "".join(f"\nFAIL {r['label']}: {r['error']}" for r in bad))


if __name__ == "__main__":
    sys.exit("run scripts/gpu_session.py (--precompile DIR, or a part's warm-up step)")
