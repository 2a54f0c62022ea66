"""The tables the benchmarks print: markdown rows, the machine line, and the one ratio table that
ends ``pytest benchmarks`` (built from pytest-benchmark's results, see ``conftest.py``)."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

RATIO_COLUMNS = ("case", "baseline", "baseline ms", "fastrnn ms", "ratio")


def markdown_table(columns, rows) -> str:
    """``columns`` (names) and ``rows`` (sequences of cells, already formatted) as a markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_line(device: str) -> str:
    """Where a table was measured: the device, torch's version and its CPU threads."""
    if device == "cuda":
        where = f"{torch.cuda.get_device_name()}, cuDNN {torch.backends.cudnn.version()}"
    else:
        where = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    return f"{where}, torch {torch.__version__}"


def ratio_rows(benchmarks) -> list[tuple]:
    """One row per (case, baseline) from pytest-benchmark's results: ``(case, baseline, baseline
    ms, fastrnn ms, baseline / fastrnn)``, medians, in the order the cases ran. A result belongs to
    a case by ``extra_info["case"]`` and says who ran it by ``extra_info["provider"]`` (``fastrnn``
    or a baseline); a case without fastrnn's result gives no row."""
    cases: dict[str, dict[str, float]] = {}
    for bench in benchmarks:
        info = bench["extra_info"]
        if "case" in info and "provider" in info:
            cases.setdefault(info["case"], {})[info["provider"]] = bench["median"] * 1000
    rows = []
    for case, ms in cases.items():
        if "fastrnn" not in ms:
            continue
        for baseline, baseline_ms in ms.items():
            if baseline != "fastrnn":
                rows.append((case, baseline, baseline_ms, ms["fastrnn"], baseline_ms / ms["fastrnn"]))
    return rows


def ratio_table(rows) -> str:
    """``ratio_rows`` as markdown."""
    return markdown_table(RATIO_COLUMNS, [(case, baseline, f"{base:.2f}", f"{ours:.2f}", f"{ratio:.2f}x")
                                          for case, baseline, base, ours, ratio in rows])
