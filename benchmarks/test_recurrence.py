"""pytest-benchmark cases: ``pytest benchmarks --benchmark-only``.

On CUDA: the 32 published cells (8 shapes x fp32/bf16 x fwd/fwdbwd) for fastrnn, cuDNN
(``torch.nn.RNN``) and the scratch loop, and the same cells for the LSTM and GRU (fastrnn against
``torch.nn.LSTM``/``GRU``). Without a GPU they skip, and a small CPU group times fastrnn's CPU path
against the torch modules instead."""

import pytest
import torch

from .suite import CELLS, DTYPES, MODES, PROVIDERS, SHAPES, make_case

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU: the published suite times GPU kernels")


def _timed(benchmark, run, sync, **info):
    benchmark.extra_info.update(info)

    def step():
        out = run()
        if sync:
            torch.cuda.synchronize()
        return out

    run()  # warm-up: compilation and cuDNN plans stay out of the timing
    if sync:
        torch.cuda.synchronize()
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)


@needs_cuda
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("cell", list(CELLS))
def test_suite(benchmark, cell, shape_id, dtype, mode, provider):
    shape = SHAPES[shape_id]
    if provider == "scratch" and (cell != "rnn" or shape[1] * shape[0] > 32 * 1024):
        pytest.skip("the scratch loop is the Elman cell, timed where it finishes in reasonable time")
    benchmark.group = f"{cell} #{shape_id} B{shape[0]} T{shape[1]} I{shape[2]} H{shape[3]} {dtype} {mode}"
    run = make_case(provider, shape, DTYPES[dtype], mode, cell=cell)
    _timed(benchmark, run, True, device=torch.cuda.get_device_name(), dtype=dtype, mode=mode,
           shape=dict(zip("BTIH", shape)), provider=provider, cell=cell)


CPU_SHAPES = {"cpu-small": (32, 256, 256, 256), "cpu-textbook": (32, 35, 28, 512)}


@pytest.mark.parametrize("provider", ["fastrnn", "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CPU_SHAPES))
@pytest.mark.parametrize("cell", list(CELLS))
def test_cpu(benchmark, cell, name, mode, provider, monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    shape = CPU_SHAPES[name]
    benchmark.group = f"{cell} {name} B{shape[0]} T{shape[1]} I{shape[2]} H{shape[3]} fp32 {mode}"
    run = make_case("cudnn" if provider == "torch" else "fastrnn", shape, torch.float32, mode, "cpu", cell)
    _timed(benchmark, run, False, device="cpu", dtype="fp32", mode=mode, shape=dict(zip("BTIH", shape)),
           provider=provider, cell=cell)
