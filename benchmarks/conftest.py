"""``pytest benchmarks``: the run ends with one table, per case the baseline's time (torch's module,
cuDNN, the scratch loop, the per-step reset loop...), fastrnn's, and their ratio (baseline time /
fastrnn time). Without a GPU that table replaces pytest-benchmark's wide one-table-per-group output
(``--benchmark-json`` still records every statistic); on a GPU the wide tables come first.

Each benchmark joins the table through ``benchmark.extra_info``: ``case`` (what was run, the same
for every provider of one case) and ``provider`` (``fastrnn`` or the baseline's name)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.report import machine_line, ratio_rows, ratio_table

RATIO_ROWS = pytest.StashKey[list]()


@pytest.hookimpl(wrapper=True, optionalhook=True)  # a pytest-benchmark hook
def pytest_benchmark_group_stats(config, benchmarks, group_by):
    """Keep the ratio table's rows; without a GPU, drop the wide tables of the cases it shows."""
    groups = yield
    measured_now = [bench for bench in benchmarks if bench.get("path") is None]  # not --benchmark-compare's
    config.stash[RATIO_ROWS] = ratio_rows(measured_now)
    if torch.cuda.is_available():
        return groups
    return [(name, group) for name, group in groups if not all(in_ratio_table(bench) for bench in group)]


def in_ratio_table(bench) -> bool:
    """Whether a pytest-benchmark result carries what the ratio table needs."""
    return "case" in bench["extra_info"] and "provider" in bench["extra_info"]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_terminal_summary(terminalreporter):
    """Print the ratio table last, after pytest-benchmark's output and the short test summary."""
    result = yield
    rows = terminalreporter.config.stash.get(RATIO_ROWS, [])
    if rows:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        terminalreporter.write_sep("-", "baseline time / fastrnn time (medians)")
        terminalreporter.write_line(machine_line(device))
        terminalreporter.write_line(ratio_table(rows))
        if device == "cpu":
            terminalreporter.write_line("Providers timed one after the other, not interleaved; for figures to "
                                        "publish use python benchmarks/cpu_table.py on an idle machine.")
    return result
