"""Shared test set-up. Without a GPU the fused kernels run under the Triton interpreter, which must be
switched on before triton compiles anything, so it is set here, before any test imports fastrnn."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Relative-error bounds that follow the arithmetic (see README: tolerances).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere makes it NaN, which fails every `<=`."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


@pytest.fixture
def backend(request, monkeypatch):
    """Run a test on the path named by the parameter (``torch`` or ``triton``)."""
    name = getattr(request, "param", "torch")
    monkeypatch.setenv("FASTRNN_BACKEND", name)
    return name


@pytest.fixture
def poison(monkeypatch):
    """Every tensor the kernels' launchers allocate with empty_like starts as NaN, so an element a
    kernel forgets to write shows up as NaN."""
    real = torch.empty_like

    def nan_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", nan_like)
    return nan_like
