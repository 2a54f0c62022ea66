"""tests/interpreter_speed.py: with the language patched once a launch, the interpreter computes what
it computes as it is, and leaves the language as it found it."""

import os

import pytest
import torch

import fastrnn

from .interpreter_speed import patch_each_language_once

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's")


def module_results(cell: str) -> list:
    """Outputs, final states and every gradient of a 2-layer bidirectional module on the fused path
    (each kernel's nested calls: gates, loads, products)."""
    torch.manual_seed(0)
    module = fastrnn.CELLS[cell].module(4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 4, requires_grad=True)
    output, state = module(x)
    state = state if isinstance(state, tuple) else (state,)
    (output.pow(2).sum() + sum(s.sum() for s in state)).backward()
    return [output, *state, x.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("cell", list(fastrnn.CELLS))
def test_the_interpreters_own_results_and_language(cell, monkeypatch):
    import triton.language as tl
    from triton.runtime import interpreter

    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    assert patch_each_language_once()  # (conftest installed it: this Triton's interpreter is supported)
    builtins = {name: getattr(tl, name) for name in ("load", "store", "dot", "sum", "where", "exp")}
    fast = module_results(cell)
    assert all(getattr(tl, name) is builtin for name, builtin in builtins.items())  # restored
    monkeypatch.setattr(interpreter, "_patch_lang", interpreter._patch_lang.original)
    as_it_is = module_results(cell)
    assert all(torch.equal(a, b) for a, b in zip(fast, as_it_is, strict=True))
