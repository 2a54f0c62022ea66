"""Every fused kernel compiles to a Hopper (sm_90) cubin, even on a CPU-only machine, and the
kernel the launcher would run for each shape keeps within its registers (scripts/compile_check.py):
the representative sweep with this environment's Triton, the benchmark suite's cases with the
oldest supported one. The sweep runs in its own process group, and its worker processes end with
it, however it ends (issue #19: a timed-out run once left two workers compiling)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "compile_check.py"
# A folder holding the oldest supported Triton (pip install --target DIR triton==3.6.0): .ci/run sets it.
OLDEST = os.environ.get("FASTRNN_OLDEST_TRITON")


def sweep_env(extra_path: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    return env


def run_in_own_group(argv, env=None, timeout=None) -> subprocess.CompletedProcess:
    """``subprocess.run`` in a new session; at the timeout the whole process group is killed (the
    command and everything it started), then TimeoutExpired is raised."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def run_sweep(which: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    return run_in_own_group([sys.executable, str(SCRIPT), which], env=sweep_env(extra_path), timeout=2400)


def session_members(sid: int) -> list[int]:
    """The live processes (zombies aside) of session ``sid``, from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def has_nvidia_backend(triton_dir: Path) -> bool:
    return (triton_dir / "backends" / "nvidia" / "bin" / "ptxas").exists()


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


@needs_proc
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_sweep_workers_end_with_the_sweep(how):
    """Killed while its workers compile (SIGTERM: the sweep ends them; SIGKILL: the kernel does, as
    each worker asked), the sweep leaves no process behind."""
    pytest.importorskip("triton")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--ci", "--workers", "2"], env=sweep_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert wait_for(lambda: len(session_members(proc.pid)) >= 3, 180), "the sweep never started 2 workers"
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(60)
        assert wait_for(lambda: not session_members(proc.pid), 20), f"left running: {session_members(proc.pid)}"
    finally:
        for pid in session_members(proc.pid):
            os.kill(pid, signal.SIGKILL)


@needs_proc
def test_a_timed_out_run_kills_its_whole_group():
    argv = ["bash", "-c", f"sleep {SLEEPER} & sleep {SLEEPER} & wait"]
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_own_group(argv, timeout=2)
    assert time.monotonic() - start < 30
    assert wait_for(lambda: not sleepers(), 10), "a child outlived the timeout"


SLEEPER = "293.17"  # an odd duration: the timeout test's children, told apart from anything else


def sleepers() -> list[int]:
    """Processes running ``sleep SLEEPER`` (what the timeout test starts)."""
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == f"sleep\x00{SLEEPER}\x00".encode():
                out.append(int(entry.name))
        except OSError:
            continue
    return out


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    triton = pytest.importorskip("triton")
    if not has_nvidia_backend(Path(triton.__file__).parent):
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    r = run_sweep("--ci")  # the representative sweep
    assert r.returncode == 0 and "compile check: PASS" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    assert f"triton {triton.__version__}:" in r.stdout


@pytest.mark.slow
@pytest.mark.skipif(not OLDEST, reason="FASTRNN_OLDEST_TRITON (a folder with Triton 3.6) is not set")
def test_kernels_compile_with_the_oldest_supported_triton():
    assert has_nvidia_backend(Path(OLDEST) / "triton"), f"no Triton with an NVIDIA backend in {OLDEST}"
    r = run_sweep("--suite", OLDEST)  # what the benchmark suite launches (its compiler is slower)
    assert r.returncode == 0 and "compile check: PASS" in r.stdout, r.stdout[-4000:] + r.stderr[-4000:]
    assert "triton 3.6.0:" in r.stdout
