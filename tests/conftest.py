"""Shared test set-up. Without a GPU the fused kernels run under the Triton interpreter, which must be
switched on before triton compiles anything, so it is set here, before any test imports fastrnn."""

import os
import signal

import torch

# A test run started in the background by a non-interactive shell (`pytest ... &`, nohup) inherits
# SIGINT ignored, and so would every command it starts: the Ctrl-C tests (tests/test_cli.py,
# tests/test_charlm.py) need it delivered, as in a terminal. (A handled signal goes back to its
# default in a started command; an ignored one stays ignored.)
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # every load and store of an interpreted kernel is checked to lie inside its launch's buffers
    # (fastrnn/kernels/bounds.py): an out-of-bounds access is an IndexError, not a corrupted heap
    os.environ.setdefault("FASTRNN_CHECK_BOUNDS", "1")
if os.environ.get("TRITON_INTERPRET") == "1":  # the language patched once a launch, not at every
    from .interpreter_speed import patch_each_language_once  # nested call: 2x faster, same results

    patch_each_language_once()

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Relative-error bounds that follow the arithmetic (see README: tolerances).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere makes it NaN, which fails every `<=`."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


@pytest.fixture(autouse=True)
def fresh_launch_plans():
    """Every test starts without the launch plans earlier tests kept (fastrnn/kernels/launch.py)."""
    import sys

    launch = sys.modules.get("fastrnn.kernels.launch")
    if launch is not None:
        launch.forget()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with nothing compiled: no test meets Dynamo's recompile limit (8 frames of
    one code object, ``FusedRNNBase.forward`` compiled by earlier tests) or a guard another left."""
    import sys

    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()


@pytest.fixture
def backend(request, monkeypatch):
    """Run a test on the path named by the parameter (``torch`` or ``triton``)."""
    name = getattr(request, "param", "torch")
    monkeypatch.setenv("FASTRNN_BACKEND", name)
    return name


@pytest.fixture
def poison(monkeypatch):
    """Every tensor the kernels' launchers and the twins allocate with ``torch.empty_like`` or
    ``Tensor.new_empty`` starts as NaN, so an element a kernel forgets to write shows up as NaN."""
    real, real_new = torch.empty_like, torch.Tensor.new_empty

    def nan_like(t, *args, **kwargs):
        out = real(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def nan_new_empty(self, *args, **kwargs):
        out = real_new(self, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", nan_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", nan_new_empty)
    return nan_like


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small tensors: they gain nothing from threads, and on a
    shared 2-core CPU threads that wait for each other make a run up to 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def poison_all(poison):
    """``poison`` (the name the gated cells' tests use)."""


def forward_backward(fn, inputs, upstream, dtype, device=DEVICE):
    """``fn``'s outputs for ``inputs`` (None where absent) cast to ``dtype`` on ``device``, then the
    gradient of each input for the ``upstream`` gradients of those outputs."""
    leaves = [t.to(device, dtype).detach().requires_grad_() if t is not None else None for t in inputs]
    outputs = fn(*leaves)
    torch.autograd.backward(outputs, [u.to(device, dtype) for u in upstream])
    return [*outputs] + [t.grad if t is not None else None for t in leaves]


def assert_matches_reference(names, fused, ref64, ref_low, dtype, bound):
    """Each of ``fused`` (outputs, then gradients) against the float64 reference ``ref64``: same dtype
    and shape, finite, and within ``bound``, or below float64 no worse than 3x the reference run in
    ``dtype`` (``ref_low``), since a sum that cancels, like a (4, 1) dw_hh, has a relative error no
    bound on the dtype covers. None where the reference has None."""
    for i, (name, a, b) in enumerate(zip(names, fused, ref64)):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err = rel_err(a, b)
        limit = bound if dtype == torch.float64 else max(bound, 3 * rel_err(ref_low[i], b))
        assert err <= limit, f"{name}: relative error {err:.2e} > {limit:.2e}"


# The long sweeps. Of each of these parametrized tests README's default command runs every n-th case
# (the first included, the rest spread over the parameters); `pytest -m slow` runs the others. Whole
# tests that only the long run takes are marked `@pytest.mark.slow` where they stand.
SAMPLED = {
    "test_elman.py::test_fused_matches_reference": 24,
    "test_elman.py::test_every_kernel_variant": 6,
    "test_elman.py::test_torch_twins_match_reference": 6,
    "test_lstm.py::test_op_matches_reference": 9,
    "test_lstm.py::test_every_flag": 7,
    "test_lstm.py::test_gradcheck_float64": 4,
    "test_gru.py::test_op_matches_reference": 9,
    "test_gru.py::test_every_flag": 5,
    "test_gru.py::test_gradcheck_float64": 2,
    "test_launch.py::test_tiled_with_many_programs_per_group": 8,
    "test_launch.py::test_gated_cells_with_many_programs_per_group": 5,
    "test_double_backward.py::test_gradgradcheck_op": 8,
    "test_double_backward.py::test_gradgradcheck_gated_op": 6,
    "test_double_backward.py::test_gradgradcheck_gated_module_layers_bidirectional_packed": 6,
    "test_double_backward.py::test_forward_mode_gradcheck": 3,
    "test_double_backward.py::test_gated_forward_mode_gradcheck": 5,
    "test_double_backward.py::test_gated_forward_over_reverse": 7,
    "test_double_backward.py::test_gated_hessian_as_torchs_module": 2,
    "test_gated_modules.py::test_matches_torch_float64": 6,
    "test_gated_modules.py::test_packed_sequence": 6,
    "test_gated_modules.py::test_unbatched_input": 4,
    "test_training_step.py::test_compiled_step_with_clipping_and_accumulation_matches_eager": 4,
    "test_rnn.py::test_matches_torch_float64": 4,
    "test_resets.py::test_resets_in_every_kernel_variant": 2,
    "test_resets.py::test_resets_compile_fullgraph": 3,
    "test_cli.py::test_a_bad_value_is_one_line_and_exit_code_2": 3,
    "test_readme.py::test_readme_python_block_runs_on_its_own": 4,
    "test_elman.py::test_gradcheck_float64": 2,
    "test_rnn.py::test_gradcheck_float64": 2,
    "test_lstm.py::test_opcheck": 2,
    "test_gru.py::test_opcheck": 2,
    "test_double_backward.py::test_gradgradcheck_module_layers_bidirectional_packed": 2,
    "test_ecosystem.py::test_compile_fullgraph_matches_eager": 3,
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark all but every n-th case of each ``SAMPLED`` test slow (before ``-m`` deselects)."""
    import collections

    seen = collections.Counter()
    for item in items:
        key = f"{item.path.name}::{getattr(item, 'originalname', item.name)}"
        every = SAMPLED.get(key)
        if every:
            if seen[key] % every:
                item.add_marker(pytest.mark.slow)
            seen[key] += 1
