"""pytest-benchmark cases: ``pytest benchmarks --benchmark-only``.

On CUDA: the 32 published cells (8 shapes x fp32/bf16 x fwd/fwdbwd) for fastrnn, cuDNN
(``torch.nn.RNN``) and the scratch loop, and the same cells for the LSTM and GRU (fastrnn against
``torch.nn.LSTM``/``GRU``). Without a GPU they skip, and a small CPU group times fastrnn's CPU path
against the torch modules instead (suite shapes #2 and #1, fp32, every cell, fwd and fwd+bwd: a few
minutes on an idle 2-core machine). The run ends with one table of baseline / fastrnn ratios
(``conftest.py``)."""

import pytest
import torch

from .suite import CELLS, CPU_SHAPES, DTYPES, MODES, PROVIDERS, SHAPES, make_case, shape_label
from .timing import timed

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU: the published suite times GPU kernels")


@needs_cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("cell", list(CELLS))
def test_suite(benchmark, cell, shape_id, dtype, mode, provider):
    """One provider on one published cell, on the GPU."""
    shape = SHAPES[shape_id]
    if provider == "scratch" and (cell != "rnn" or shape[1] * shape[0] > 32 * 1024):
        pytest.skip("the scratch loop is the Elman cell, timed where it finishes in reasonable time")
    benchmark.group = f"{cell} #{shape_id} {shape_label(shape)} {dtype} {mode}"
    run = make_case(provider, shape, DTYPES[dtype], mode, cell=cell)
    timed(benchmark, run, True, device=torch.cuda.get_device_name(), dtype=dtype, mode=mode,
          shape=dict(zip("BTIH", shape)), provider=provider, cell=cell, case=benchmark.group)


@pytest.mark.parametrize("provider", ["fastrnn", "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CPU_SHAPES))
@pytest.mark.parametrize("cell", list(CELLS))
def test_cpu(benchmark, cell, name, mode, provider, monkeypatch):
    """fastrnn's CPU path or torch's module on one CPU case (same weights and inputs)."""
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    shape = CPU_SHAPES[name]
    benchmark.group = f"{cell} {shape_label(shape)} fp32 {mode}"
    run = make_case(provider, shape, torch.float32, mode, "cpu", cell)
    timed(benchmark, run, False, warmup_rounds=0, device="cpu", dtype="fp32", mode=mode,
          shape=dict(zip("BTIH", shape)), provider=provider, cell=cell, case=benchmark.group)
