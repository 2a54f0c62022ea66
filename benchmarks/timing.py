"""How the benchmarks time: one pytest-benchmark case (``timed``), and providers in interleaved
rounds in one process (``interleaved_rounds``) for the tables of ``run_suite.py`` and ``cpu_table.py``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(benchmark, run, sync: bool, warmup_rounds: int = 2, **info) -> None:
    """Time ``run`` with pytest-benchmark in 10 rounds after a warm-up call and ``warmup_rounds``
    more (``sync``: wait for the GPU inside the timing); ``info`` goes to ``benchmark.extra_info``
    (``case`` and ``provider`` put the result in the ratio table, see ``conftest.py``)."""
    benchmark.extra_info.update(info)

    def step():
        out = run()
        if sync:
            torch.cuda.synchronize()
        return out

    run()  # warm-up: compilation and cuDNN plans stay out of the timing
    if sync:
        torch.cuda.synchronize()
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=warmup_rounds)


def interleaved_rounds(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each measure (a callable returning one timing in ms) once per round, the providers one after
    the other, their order turned round every round so none always runs first -> ``{name: [ms per round]}``."""
    times: dict[str, list[float]] = {name: [] for name in measures}
    names = list(measures)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(measures[name]())
    return times


def wall_clock_ms(run: Callable[[], object], calls: int = 1) -> float:
    """The median wall-clock time of ``calls`` calls of ``run`` (CPU work), in ms."""
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def ratio_summary(baseline: list[float], ours: list[float]) -> dict[str, float]:
    """Medians of two providers' per-round times and of their per-round ratio ``baseline / ours``,
    with the ratio's range over the rounds."""
    ratios = [b / o for b, o in zip(baseline, ours)]
    return {"baseline_ms": statistics.median(baseline), "fastrnn_ms": statistics.median(ours),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
