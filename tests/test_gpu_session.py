"""The GPU session driver (scripts/gpu_session.py) stays runnable without a GPU: its plan keeps every
part within 7 minutes, part 1 runs end to end on CPU tensors under the interpreter (--smoke), a step
past its timeout is killed with all it started, and a cache made elsewhere is pointed at its folder."""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
SESSION = SCRIPTS / "gpu_session.py"
PART_ONE_STEPS = ("install", "versions", "warm-up", "parity", "barrier", "suite-rnn", "pack-cache")


@pytest.fixture(scope="module")
def scripts_on_path():
    sys.path.insert(0, str(SCRIPTS))
    yield
    sys.path.remove(str(SCRIPTS))


def test_plan_keeps_each_part_within_seven_minutes():
    pytest.importorskip("triton")
    r = subprocess.run([sys.executable, str(SESSION), "--plan"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parts = re.finditer(r"^Part (\d): ([\d.]+) min of 7", r.stdout, re.M)
    minutes = {int(m.group(1)): float(m.group(2)) for m in parts}
    assert set(minutes) == {1, 2}, r.stdout
    assert all(0 < m <= 7 for m in minutes.values()), minutes
    assert "warm-up: the kernels of parts 1 and 2" in r.stdout
    assert "plan: every part within 7 minutes" in r.stdout


@pytest.mark.slow
def test_part_one_smoke(tmp_path):
    """Part 1 end to end on the CPU: every step passes, results and log written under --out."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_CACHE_DIR")}
    start = time.monotonic()
    r = subprocess.run([sys.executable, str(SESSION), "--part", "1", "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=400)
    report = (tmp_path / "part1.md").read_text() if (tmp_path / "part1.md").exists() else ""
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + report[-3000:]
    for step in PART_ONE_STEPS:
        assert re.search(rf"^## {step}: PASS in \d+ s", report, re.M), f"{step}\n{report[-3000:]}"
    assert "part 1: PASS" in r.stdout and "| barrier | PASS |" in r.stdout
    assert "rnn parity: PASS" in report and "barrier: PASS" in report
    assert "| rnn | 1 | 2 | 5 | 8 | fp32 | fwd |" in report  # the suite's table, on tiny shapes
    assert (tmp_path / "part1.log").read_text().startswith("[")  # each line prefixed with its step
    print(f"part 1 --smoke: {time.monotonic() - start:.0f} s")


def test_a_step_past_its_timeout_is_killed_with_its_children(tmp_path, scripts_on_path):
    import gpu_session

    step = gpu_session.Step("sleeper", ["bash", "-c", "echo started; sleep 291.3 & sleep 291.3 & wait"], 1)
    with open(tmp_path / "log", "w") as log:
        running = gpu_session.Running(step, dict(os.environ), log, threading.Lock(), step.timeout_s)
        while not running.poll():
            time.sleep(0.1)
    assert running.status.startswith("TIMEOUT") and running.lines == ["started"]
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and read(p / "cmdline") == b"sleep\x00291.3\x00"]
    assert "[sleeper] started" in (tmp_path / "log").read_text()


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def test_a_cache_made_elsewhere_is_pointed_at_its_folder(tmp_path, scripts_on_path):
    import warm_cache

    entry = tmp_path / "KEY"
    entry.mkdir()
    group = entry / "__grp__k.json"
    group.write_text(json.dumps({"child_paths": {"k.cubin": "/elsewhere/.triton-cache/KEY/k.cubin"}}))
    assert warm_cache.relocate(tmp_path) == 1
    assert json.loads(group.read_text())["child_paths"] == {"k.cubin": str(entry / "k.cubin")}
    assert warm_cache.relocate(tmp_path) == 0


def test_a_packed_cache_unpacks_as_it_was(tmp_path, scripts_on_path, monkeypatch):
    import gpu_session
    import warm_cache

    cache, carried = tmp_path / "cache", tmp_path / "carried"
    (cache / "KEY").mkdir(parents=True)
    files = {"KEY/k.cubin": os.urandom(3000), "KEY/__grp__k.json": b"{}", "fingerprint.json": b"{}"}
    for name, data in files.items():
        (cache / name).write_bytes(data)
    monkeypatch.setattr(gpu_session, "CACHE_PIECE", 1000)  # several pieces
    names, _ = gpu_session.pack(cache, carried)
    assert len(names) > 1 and names[0] == "triton-cache.tgz.00"
    assert warm_cache.unpack_pieces(carried) == len(files)
    assert {n: (carried / n).read_bytes() for n in files} == files
    assert not list(carried.glob("triton-cache.tgz*"))


def test_the_parts_steps_run_in_order_with_the_sanitizers_along_the_sweep(scripts_on_path):
    import gpu_session

    names = [[s.name for s in batch] for batch in gpu_session.batches(gpu_session.part_two(False, Path("out")))]
    assert names[-1] == ["sweep", "sanitize"] and names[0] == ["install"]
    assert [s.name for s in gpu_session.part_one(False, Path("out"))] == list(PART_ONE_STEPS)


@pytest.mark.parametrize("errors", [0, 2])
def test_sanitize_script_reads_each_tools_summary(tmp_path, errors):
    """scripts/sanitize.sh runs the three tools and fails on any error (a stand-in compute-sanitizer
    that only reports)."""
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f"#!/bin/sh\necho sanitized run finished\necho '========= ERROR SUMMARY: {errors} errors'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(SCRIPTS / "sanitize.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert (r.returncode == 0) == (errors == 0), r.stdout + r.stderr
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"{tool}: sanitized run finished ========= ERROR SUMMARY: {errors} errors" in r.stdout
    assert r.stdout.strip().endswith("sanitize: PASS" if errors == 0 else "sanitize: FAIL")


@pytest.mark.slow
def test_sanitize_payload_smoke():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(SCRIPTS / "sanitize_payload.py"), "--smoke"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith("sanitized run finished")
