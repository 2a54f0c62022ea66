"""The modules as a server uses them: first calls under ``torch.inference_mode``, several threads'
first calls at once, and traced or exported graphs run where they are loaded; each as torch's modules
behave."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastrnn
import fastrnn.gru
from fastrnn import CELLS
from fastrnn.elman import elman_fwd_op

BOTH = pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
T, B, I, H = 4, 2, 3, 5


def twins(cell: str, dtype=torch.float32):
    """torch's module and fastrnn's, with the same random weights."""
    torch.manual_seed(0)
    ref = CELLS[cell].torch_module(I, H, dtype=dtype)
    ours = CELLS[cell].module(I, H, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@BOTH
@pytest.mark.parametrize("cell", list(CELLS))
def test_a_first_call_under_inference_mode_leaves_later_graphs_as_torchs(backend, cell, monkeypatch):
    """A warm-up or validation call under ``torch.inference_mode`` first, then a training call: what
    the first call keeps (the GRU's mask of the gates r and z) must not be an inference tensor, which
    the later call's backward could not save."""
    monkeypatch.setattr(fastrnn.gru, "_R_AND_Z", {}, raising=False)  # (nothing kept from earlier tests)
    ref, ours = twins(cell)
    x = torch.randn(T, B, I)
    with torch.inference_mode():
        served, _ = ours(x)
    assert served.is_inference() and not served.requires_grad
    y, _ = ours(x.requires_grad_())
    y_ref, _ = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    (g,), (g_ref,) = torch.autograd.grad(y.sum(), x), torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


FIRST_CALLS_AT_ONCE = """
    import importlib, sys, threading
    from fastrnn.backend import loop

    names = [("elman", "elman_fwd"), ("lstm", "lstm_fwd"), ("gru", "gru_fwd")] * 2
    for round in range(5):  # (without the lock, a round failed 1 time in 2 to 3 on a 2-core CPU)
        for name in [m for m in sys.modules if m.startswith("fastrnn.kernels")]:
            del sys.modules[name]  # every round a first import
        loop.cache_clear()
        go, errors = threading.Barrier(len(names)), []

        def first(kernels, name):
            go.wait()
            try:
                loop("triton", kernels, name, None)
            except Exception as e:
                errors.append(f"{kernels}: {type(e).__name__}: {e}")

        threads = [threading.Thread(target=first, args=n) for n in names]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not errors, errors
    print("imported")
"""


def test_threads_first_calls_of_every_cell_at_once_import_the_kernels():
    """Threads of a server whose first calls run different cells at once on the fused path each import
    their kernels (``fastrnn.backend.loop``): one at a time, not a "partially initialized module" or
    an import deadlock in some."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FIRST_CALLS_AT_ONCE)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "imported" in result.stdout, result.stderr[-2000:]


def test_threads_launching_at_once_under_the_interpreter(backend="triton"):
    """Under the interpreter (the CPU's ``triton`` backend) launches from several threads take turns:
    Triton's interpreter patches ``triton.language`` for each launch."""
    import threading

    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is off (a GPU machine's run)")
    modules = [twins(cell) for cell in CELLS] * 2
    x, errors = torch.randn(2, 1, I), []
    go = threading.Barrier(len(modules))

    def serve(ref, ours):
        go.wait()
        try:
            with torch.no_grad():
                torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
        except Exception as e:
            errors.append(f"{type(ours).__name__}: {type(e).__name__}: {e}")

    with pytest.MonkeyPatch.context() as m:
        m.setenv("FASTRNN_BACKEND", backend)
        threads = [threading.Thread(target=serve, args=pair) for pair in modules]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert not errors, errors


@pytest.mark.parametrize("cell", list(CELLS))
def test_a_graph_traced_or_exported_under_auto_runs_on_the_backend_where_it_runs(cell, monkeypatch):
    """Under ``auto`` the ops record ``auto``, which each call resolves for its tensors' device: a graph
    traced on a GPU runs on a CPU (the twins), one exported on a CPU runs the kernels on a GPU. (bf16:
    a call ``auto`` gives the fused ops on the CPU too.)"""
    monkeypatch.delenv("FASTRNN_BACKEND", raising=False)
    ref, ours = twins(cell, torch.bfloat16)
    x = torch.randn(T, B, I, dtype=torch.bfloat16)
    with torch.no_grad():
        traced = torch.jit.trace(ours, (x,), check_trace=False)
        expected = ours(x)[0]
    recorded = [line for line in traced.code.splitlines() if "ops.fastrnn" in line]
    assert recorded and all('"auto"' in line for line in recorded), recorded
    exported = torch.export.export(ours, (x,))
    ops = [n for n in exported.graph.nodes if "fastrnn" in str(n.target)]
    assert ops and all("auto" in n.args for n in ops), [n.args for n in ops]
    for backend in ("torch", "triton"):  # (what a run elsewhere may pick: the graph follows)
        monkeypatch.setenv("FASTRNN_BACKEND", backend)
        with torch.no_grad():
            torch.testing.assert_close(traced(x)[0], expected, rtol=0, atol=0)
            torch.testing.assert_close(exported.module()(x)[0], expected, rtol=0, atol=0)
    monkeypatch.delenv("FASTRNN_BACKEND")
    elsewhere = x.to("meta")  # (another device: the graphs keep none, the GRU's bias mask included)
    for graph in (traced, exported.module()):
        assert graph.to("meta")(elsewhere)[0].shape == expected.shape


def test_the_triton_backend_where_its_kernels_cannot_run_is_refused_by_name(monkeypatch):
    """An op given ``triton`` (by ``FASTRNN_BACKEND``, or a graph traced with it on a GPU) on CPU
    tensors without the interpreter: a RuntimeError that says so, not Triton's own failure."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x_proj, w_hh = torch.randn(T, B, H), torch.randn(H, H)
    with pytest.raises(RuntimeError, match="triton backend .* on cpu tensors needs TRITON_INTERPRET=1"):
        elman_fwd_op(x_proj, None, w_hh, "tanh", False, None, "triton")
    y, h_n = elman_fwd_op(x_proj, None, w_hh, "tanh", False, None, "auto")  # auto: the twin on the CPU
    y_ref, h_ref = elman_fwd_op(x_proj, None, w_hh, "tanh", False, None, "torch")
    assert torch.equal(y, y_ref) and torch.equal(h_n, h_ref)


@BOTH
@pytest.mark.parametrize("cell", list(CELLS))
def test_tracing_warns_of_nothing_and_the_graph_runs_any_length_and_batch(backend, cell):
    """``torch.jit.trace`` of a module, as torch's traces without a TracerWarning: the checks' Python
    comparisons of sizes hold for any input, and the graph runs other lengths and batches as torch's
    module computes them."""
    torch.manual_seed(0)
    ref = CELLS[cell].torch_module(I, H, num_layers=2, bidirectional=True, batch_first=True)
    ours = CELLS[cell].module(I, H, num_layers=2, bidirectional=True, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(ours, (torch.randn(B, T, I),))
    for shape in [(3, 6, I), (1, 1, I)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(traced(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
