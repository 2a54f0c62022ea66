"""pytest-benchmark cases: ``pytest benchmarks --benchmark-only``.

On CUDA: the 32 published cells (8 shapes x fp32/bf16 x fwd/fwdbwd) for fastrnn, cuDNN
(``torch.nn.RNN``) and the scratch loop. Without a GPU they skip, and a small CPU group times
fastrnn's CPU path against ``torch.nn.RNN`` instead."""

import pytest
import torch

from .suite import DTYPES, MODES, PROVIDERS, SHAPES, make_case

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
def test_suite(benchmark, shape_id, dtype, mode, provider):
    shape = SHAPES[shape_id]
    if provider == "scratch" and shape[1] * shape[0] > 32 * 1024:
        pytest.skip("the scratch loop is only timed where it finishes in reasonable time")
    benchmark.group = f"#{shape_id} B{shape[0]} T{shape[1]} I{shape[2]} H{shape[3]} {dtype} {mode}"
    run = make_case(provider, shape, DTYPES[dtype], mode)
    _timed(benchmark, run, True, device=torch.cuda.get_device_name(), dtype=dtype, mode=mode,
           shape=dict(zip("BTIH", shape)), provider=provider)


CPU_SHAPES = {"cpu-small": (32, 256, 256, 256), "cpu-textbook": (32, 35, 28, 512)}


@pytest.mark.parametrize("provider", ["fastrnn", "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CPU_SHAPES))
def test_cpu(benchmark, name, mode, provider, monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "torch")
    shape = CPU_SHAPES[name]
    benchmark.group = f"{name} B{shape[0]} T{shape[1]} I{shape[2]} H{shape[3]} fp32 {mode}"
    run = make_case("cudnn" if provider == "torch" else "fastrnn", shape, torch.float32, mode, "cpu")
    _timed(benchmark, run, False, device="cpu", dtype="fp32", mode=mode, shape=dict(zip("BTIH", shape)),
           provider=provider)
