"""Every fused kernel compiles to a Hopper (sm_90) cubin, even on a CPU-only machine, and the
kernel the launcher would run for each shape keeps within its registers (tests/compile_check.py):
the representative sweep with this environment's Triton, the benchmark suite's cases with the
oldest supported one."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_check.py")
# A folder holding the oldest supported Triton (pip install --target DIR triton==3.6.0): .ci/run sets it.
OLDEST = os.environ.get("FASTRNN_OLDEST_TRITON")


def run_sweep(which: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(SCRIPT), which], capture_output=True, text=True, env=env,
                          timeout=2400)


def has_nvidia_backend(triton_dir: Path) -> bool:
    return (triton_dir / "backends" / "nvidia" / "bin" / "ptxas").exists()


def test_kernels_compile_for_sm90_without_spills():
    triton = pytest.importorskip("triton")
    if not has_nvidia_backend(Path(triton.__file__).parent):
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    r = run_sweep("--ci")  # the representative sweep
    assert r.returncode == 0 and "compile check: PASS" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"triton {triton.__version__}:" in r.stdout


@pytest.mark.skipif(not OLDEST, reason="FASTRNN_OLDEST_TRITON (a folder with Triton 3.6) is not set")
def test_kernels_compile_with_the_oldest_supported_triton():
    assert has_nvidia_backend(Path(OLDEST) / "triton"), f"no Triton with an NVIDIA backend in {OLDEST}"
    r = run_sweep("--suite", OLDEST)  # what the benchmark suite launches (its compiler is slower)
    assert r.returncode == 0 and "compile check: PASS" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    assert "triton 3.6.0:" in r.stdout
