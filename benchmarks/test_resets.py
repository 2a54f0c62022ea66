"""Resets inside a sequence (issue #23): ``pytest benchmarks/test_resets.py``.

Two plain tests (they run without ``--benchmark-only``): the two torch baselines agree in float64,
and fastrnn with ``resets=`` agrees with them (skipped until fastrnn's modules take ``resets``).
And the benchmark group: GRU and LSTM, fp32 and bf16, fwd and fwd+bwd, fastrnn against the
per-step ``(1 - done)`` loop and the packed segments (``resets.py``), B128 T128 I64 H256 with 3 %
resets on CUDA, B16 T64 I64 H64 on CPU; skipped as a whole until fastrnn takes ``resets``."""

import pytest
import torch

from .resets import (
    RESET_RATE,
    RESETS_CELLS,
    RESETS_PROVIDERS,
    RESETS_SHAPES,
    make_resets_case,
    resets_disagreement,
    resets_missing,
)
from .suite import DTYPES, MODES, shape_label
from .timing import timed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BOUND = 1e-10  # float64


def skip_without_resets(cell: str) -> None:
    """Skip the calling test, saying why, while fastrnn's ``cell`` cannot run with resets."""
    reason = resets_missing(cell)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("cell", RESETS_CELLS)
def test_torch_baselines_agree(cell):
    """The packed segments give the per-step loop's output, final state and gradients."""
    errors = resets_disagreement(cell, providers=("packed",))
    assert errors["packed"] <= BOUND, errors


@pytest.mark.parametrize("cell", RESETS_CELLS)
def test_fastrnn_resets_agree(cell):
    """fastrnn with ``resets=`` gives the loop's and the packed segments' outputs and gradients."""
    skip_without_resets(cell)
    errors = resets_disagreement(cell)
    assert all(error <= BOUND for error in errors.values()), errors


@pytest.mark.parametrize("provider", RESETS_PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cell", RESETS_CELLS)
def test_resets(benchmark, cell, dtype, mode, provider, monkeypatch):
    """One provider on one case; the group's three providers share weights, inputs and resets."""
    skip_without_resets(cell)
    if DEVICE == "cpu":
        monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    shape = RESETS_SHAPES[DEVICE]
    benchmark.group = f"{cell} resets {RESET_RATE:.0%} {shape_label(shape)} {dtype} {mode}"
    run = make_resets_case(provider, shape, DTYPES[dtype], mode, DEVICE, cell)
    timed(benchmark, run, DEVICE == "cuda", warmup_rounds=2 if DEVICE == "cuda" else 0, device=DEVICE,
          dtype=dtype, mode=mode, shape=dict(zip("BTIH", shape)), reset_rate=RESET_RATE, provider=provider,
          cell=cell, case=benchmark.group)
