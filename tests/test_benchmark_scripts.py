"""The benchmarks run as README says, on a CPU: smoke runs of ``pytest benchmarks``, ``cpu_table.py``
and ``host_overhead.py`` (a benchmark that no longer starts is found here, not by the next person
who wants its figures). They check that each runs and prints its table, never a time."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_pytest_benchmarks_runs_every_case_once():
    out = run("-m", "pytest", "benchmarks", "-q", "--benchmark-disable", "-p", "no:cacheprovider")
    assert " passed" in out and "failed" not in out and "error" not in out


def test_cpu_table_prints_every_case():
    out = run("benchmarks/cpu_table.py", "--quick", "--cells", "rnn")
    rows = [line for line in out.splitlines() if line.startswith("| rnn |")]
    assert len(rows) == 4, out  # two shapes x fwd, fwd+bwd


def test_host_overhead_prints_every_cell():
    out = run("benchmarks/host_overhead.py", "--rounds", "1", "--calls", "2")
    rows = [line for line in out.splitlines() if line.startswith(("| rnn |", "| lstm |", "| gru |"))]
    assert len(rows) == 3 and all(row.count("|") == 8 for row in rows), out


def test_host_overhead_against_a_revision():
    """``--against REV``: the revision's fastrnn imported beside this one, a row for each per cell."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    out = run("benchmarks/host_overhead.py", "--rounds", "1", "--calls", "2", "--against", "HEAD")
    rows = [line for line in out.splitlines() if line.startswith(("| rnn |", "| lstm |", "| gru |"))]
    assert len(rows) == 6 and all(row.count("|") == 9 for row in rows), out
    assert [row.split("|")[2].strip() for row in rows] == ["now", "HEAD"] * 3, out
