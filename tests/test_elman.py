"""The fused recurrence (Triton; the interpreter on CPU) against the plain PyTorch loop.

Outputs and all gradients, on odd shapes, every dtype with its tolerance, both nonlinearities,
reverse, ragged lengths, every kernel variant; outputs poisoned with NaN before each run so an
element a kernel never wrote fails; float64 gradcheck."""

import itertools
import os

import pytest
import torch

from fastrnn.kernels import Config, elman_bwd, elman_fwd
from fastrnn.elman import elman_fwd_op, recurrence_reference

from .conftest import TOL, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1, 1), (2, 3, 16), (63, 17, 130), (63, 3, 100), (2, 17, 1), (1, 3, 130), (63, 1, 16)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FLAGS = list(itertools.product(["tanh", "relu"], [False, True], [False, True]))


def make_inputs(T, B, H, seed, lengths=False, h0=True):
    g = torch.Generator().manual_seed(seed)
    x_proj = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    w_hh = torch.randn(H, H, generator=g, dtype=torch.float64) / max(H, 1) ** 0.5
    h_0 = torch.randn(B, H, generator=g, dtype=torch.float64) if h0 else None
    lens = torch.randint(1, T + 1, (B,), generator=g) if lengths else None
    if lens is not None and B > 0:
        lens[0] = T  # one sequence runs to the end
    return x_proj, h_0, w_hh, lens


def forward_backward(fn, x_proj, h0, w_hh, nonlinearity, reverse, lengths, dy, dh_n, dtype):
    """y, h_n and the gradients of (x_proj, h0, w_hh) for upstream gradients dy, dh_n."""
    leaves = [t.to(DEVICE, dtype).detach().requires_grad_() if t is not None else None
              for t in (x_proj, h0, w_hh)]
    y, h_n = fn(*leaves, nonlinearity, reverse, lengths)
    torch.autograd.backward([y, h_n], [dy.to(DEVICE, dtype), dh_n.to(DEVICE, dtype)])
    return [y, h_n] + [t.grad if t is not None else None for t in leaves]


def check_against_reference(T, B, H, dtype, nonlinearity, reverse, lengths, seed=0, h0=True,
                            backend="triton"):
    x_proj, h_0, w_hh, lens = make_inputs(T, B, H, seed, lengths, h0)
    g = torch.Generator().manual_seed(seed + 1000)
    dy = torch.randn(T, B, H, generator=g, dtype=torch.float64)
    dh_n = torch.randn(B, H, generator=g, dtype=torch.float64)
    args = (x_proj, h_0, w_hh, nonlinearity, reverse, lens, dy, dh_n)
    ref64 = forward_backward(recurrence_reference, *args, torch.float64)
    fused = forward_backward(lambda *a: elman_fwd_op(*a, backend), *args, dtype)
    names = ["y", "h_n", "dx_proj", "dh0", "dw_hh"]
    bound = TOL[dtype]
    if dtype != torch.float64:
        # within the dtype's bound, or no worse than 3x the PyTorch loop run in the same dtype (a sum
        # that cancels, like a (1, 1) dw_hh, has a relative error no bound on the dtype can cover)
        ref_low = forward_backward(recurrence_reference, *args, dtype)
    for i, (name, a, b) in enumerate(zip(names, fused, ref64)):
        if b is None:
            assert a is None
            continue
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        if name == "dw_hh" and H < 16 and dtype in (torch.bfloat16, torch.float16):
            continue  # a (1, 1) dw_hh is one sum of B*T products: its relative error is cancellation
        err = rel_err(a, b)
        limit = bound if dtype == torch.float64 else max(bound, 3 * rel_err(ref_low[i], b))
        assert err <= limit, f"{name}: relative error {err:.2e} > {limit:.2e}"


@pytest.mark.parametrize("T,B,H", SHAPES, ids=[f"T{t}-B{b}-H{h}" for t, b, h in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("nonlinearity,reverse,lengths", FLAGS,
                         ids=[f"{a}-{'rev' if r else 'fwd'}-{'len' if l else 'full'}" for a, r, l in FLAGS])
def test_fused_matches_reference(T, B, H, dtype, nonlinearity, reverse, lengths, poison):
    check_against_reference(T, B, H, dtype, nonlinearity, reverse, lengths)


@pytest.mark.parametrize("variant", ["tiled", "stepwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nonlinearity,reverse,lengths", FLAGS[::3])
def test_every_kernel_variant(variant, dtype, nonlinearity, reverse, lengths, poison, monkeypatch):
    monkeypatch.setenv("FASTRNN_VARIANT", variant)
    check_against_reference(9, 19, 40, dtype, nonlinearity, reverse, lengths, seed=1)


@pytest.mark.parametrize("T,B,H", SHAPES[:4], ids=[f"T{t}-B{b}-H{h}" for t, b, h in SHAPES[:4]])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nonlinearity,reverse,lengths", FLAGS[::2])
def test_torch_twins_match_reference(T, B, H, dtype, nonlinearity, reverse, lengths):
    """The CPU path's forward/backward loops (the kernels' PyTorch twins) against the autograd loop."""
    check_against_reference(T, B, H, dtype, nonlinearity, reverse, lengths, backend="torch")


@pytest.mark.parametrize("lengths", [False, True])
def test_without_h0(lengths, poison):
    check_against_reference(5, 4, 24, torch.float64, "tanh", True, lengths, h0=False)


@pytest.mark.parametrize("reverse,lengths", [(False, False), (True, True)])
def test_gradcheck_float64(reverse, lengths):
    x_proj, h0, w_hh, lens = make_inputs(4, 3, 5, seed=2, lengths=lengths)
    inputs = [t.to(DEVICE).detach().requires_grad_() for t in (x_proj, h0, w_hh)]
    assert torch.autograd.gradcheck(
        lambda x, h, w: elman_fwd_op(x, h, w, "tanh", reverse, lens, "triton"), inputs)


@pytest.mark.parametrize("variant", ["resident", "tiled", "stepwise"])
def test_launchers_write_every_element(variant, poison, monkeypatch):
    """Straight through the launchers, every y and d_pre element written, zeros past each end, h_n
    each sequence's last h."""
    monkeypatch.setenv("FASTRNN_VARIANT", variant)
    x_proj, h0, w_hh, lens = make_inputs(6, 5, 33, seed=3, lengths=True)
    x_proj, h0, w_hh = (t.float().to(DEVICE) for t in (x_proj, h0, w_hh))
    y, h_n = elman_fwd(x_proj, h0, w_hh, "tanh", False, lens.to(DEVICE))
    assert not torch.isnan(y).any()
    assert torch.equal(h_n, y[(lens - 1).to(DEVICE), torch.arange(5, device=DEVICE)])  # each last step
    past_end = torch.arange(6)[:, None] >= lens[None, :]
    assert (y[past_end.to(DEVICE)] == 0).all()
    d_pre = elman_bwd(torch.randn_like(y), torch.randn_like(h0), y, w_hh, "tanh", False, lens.to(DEVICE))
    assert not torch.isnan(d_pre).any() and (d_pre[past_end.to(DEVICE)] == 0).all()


def test_explicit_config_and_tf32_flag():
    x_proj, h0, w_hh, _ = make_inputs(3, 2, 16, seed=4)
    x_proj, h0, w_hh = (t.float().to(DEVICE) for t in (x_proj, h0, w_hh))
    a = elman_fwd(x_proj, h0, w_hh, config=Config("resident", 16, 16, 16))
    b = elman_fwd(x_proj, h0, w_hh, config=Config("stepwise", 16, 16, 16))
    torch.testing.assert_close(a, b)


def test_bitwise_deterministic():
    x_proj, h0, w_hh, lens = make_inputs(7, 5, 20, seed=5, lengths=True)
    runs = [forward_backward(lambda *a: elman_fwd_op(*a, "triton"), x_proj, h0, w_hh, "tanh", False, lens,
                             torch.ones(7, 5, 20, dtype=torch.float64), torch.ones(5, 20, dtype=torch.float64),
                             torch.float32) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_launcher_rejects_bad_operands():
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="w_hh"):
        elman_fwd(x, None, torch.randn(4, 5))
    with pytest.raises(ValueError, match="h0"):
        elman_fwd(x, torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(TypeError, match="dtype"):
        elman_fwd(x, None, torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="FASTRNN_VARIANT"):
        os.environ["FASTRNN_VARIANT"] = "bogus"
        try:
            elman_fwd(x, None, torch.randn(4, 4))
        finally:
            del os.environ["FASTRNN_VARIANT"]


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's tensor-size limit")
@pytest.mark.parametrize("H", [257, 1024])
def test_interpreter_float64_at_large_hidden_sizes(H):
    """Under the interpreter every block stays within Triton's 2^20-element limit at any H: float64,
    H up to 1024, reverse with lengths, outputs and every gradient against the loop."""
    check_against_reference(2, 3, H, torch.float64, "tanh", True, True, seed=7)
