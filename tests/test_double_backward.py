"""Second derivatives through the recurrence (create_graph=True, then backward again) on both backends:
gradgradcheck in float64, a gradient-penalty training step against torch.nn.RNN, torch.func."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fastrnn import RNN, recurrence, recurrence_reference
from fastrnn.elman import elman_fwd_op

F64 = torch.float64
BOTH = pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
FLAGS = list(itertools.product(["tanh", "relu"], [False, True], [False, True], [False, True]))


def small_inputs(T=3, B=2, H=3, seed=0, h0=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, H, generator=g, dtype=F64, requires_grad=True)
    w = (torch.randn(H, H, generator=g, dtype=F64) / H ** 0.5).requires_grad_()
    h = torch.randn(B, H, generator=g, dtype=F64, requires_grad=True) if h0 else None
    return x, w, h


@BOTH
@pytest.mark.parametrize("nonlinearity,reverse,lengths,h0", FLAGS,
                         ids=["-".join(map(str, f)) for f in FLAGS])
def test_gradgradcheck_op(backend, nonlinearity, reverse, lengths, h0):
    x, w, h = small_inputs(h0=h0)
    lens = torch.tensor([3, 2]) if lengths else None
    inputs = [x, w] + ([h] if h0 else [])

    def f(x, w, *h):
        return elman_fwd_op(x, h[0] if h else None, w, nonlinearity, reverse, lens, backend)

    # the interpreter runs each kernel slowly: a random projection of the Jacobians there
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=backend == "triton")


@BOTH
def test_gradgradcheck_module_layers_bidirectional_packed(backend):
    torch.manual_seed(0)
    rnn = RNN(2, 3, num_layers=2, bidirectional=True, dtype=F64)
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    w = rnn.weight_hh_l1_reverse

    def f(x, h0, w_hh):
        params = dict(rnn.named_parameters(), weight_hh_l1_reverse=w_hh)
        packed = pack_padded_sequence(x, torch.tensor([3, 2]))
        out, h_n = torch.func.functional_call(rnn, params, (packed, h0))
        return out.data, h_n

    assert torch.autograd.gradgradcheck(f, [x, h0, w.detach().clone().requires_grad_()],
                                        fast_mode=backend == "triton")


def gradient_penalty_step(model, x, h0):
    """One WGAN-GP-style step: score + (||d score / d x|| - 1)^2, then SGD. Returns the loss."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = x.clone().requires_grad_()
    out, h_n = model(x, h0)
    score = out.tanh().sum() + h_n.pow(2).sum()
    (dx,) = torch.autograd.grad(score, x, create_graph=True)
    loss = score + 10.0 * (dx.norm() - 1.0) ** 2
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


@BOTH
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_gradient_penalty_step_matches_torch(backend, nonlinearity):
    torch.manual_seed(1)
    ref = nn.RNN(3, 4, num_layers=2, nonlinearity=nonlinearity, bidirectional=True, dtype=F64)
    ours = RNN(3, 4, num_layers=2, nonlinearity=nonlinearity, bidirectional=True, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    x, h0 = torch.randn(5, 2, 3, dtype=F64), torch.randn(4, 2, 4, dtype=F64)
    for _ in range(2):
        loss_ref, loss = gradient_penalty_step(ref, x, h0), gradient_penalty_step(ours, x, h0)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-9, atol=1e-9)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9, msg=name)


@BOTH
@pytest.mark.parametrize("reverse", [False, True])
def test_func_grad_of_grad_and_jacobian_of_gradient(backend, reverse):
    x, w, h = (t.detach() for t in small_inputs(seed=3))

    def loss(fn):
        def f(x, w):
            y, h_n = fn(x, h, w, "tanh", reverse)
            return (y ** 3).sum() + (h_n * x[0]).sum()
        return f

    for argnum in (0, 1):
        outer = [torch.func.grad(lambda *a: torch.func.grad(loss(fn), argnum)(*a).pow(2).sum(), argnum)
                 for fn in (recurrence, recurrence_reference)]
        torch.testing.assert_close(outer[0](x, w), outer[1](x, w), rtol=1e-9, atol=1e-9)
    for hessian in (torch.func.hessian, lambda f, i: torch.func.jacrev(torch.func.jacrev(f, i), i)):
        hess = [hessian(loss(fn), 1)(x, w) for fn in (recurrence, recurrence_reference)]
        torch.testing.assert_close(hess[0], hess[1], rtol=1e-9, atol=1e-9)  # (H, H, H, H)


@BOTH
@pytest.mark.parametrize("nonlinearity,reverse,lengths,h0", FLAGS[::3],
                         ids=["-".join(map(str, f)) for f in FLAGS[::3]])
def test_forward_mode_gradcheck(backend, nonlinearity, reverse, lengths, h0):
    """jvp of the op and of its backward (forward-over-reverse) against finite differences."""
    x, w, h = small_inputs(seed=4, h0=h0)
    lens = torch.tensor([2, 3]) if lengths else None
    inputs = [x, w] + ([h] if h0 else [])

    def f(x, w, *h):
        return recurrence(x, h[0] if h else None, w, nonlinearity, reverse, lens)

    fast = backend == "triton"
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_backward_ad=False, fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True, check_rev_over_rev=False,
                                        check_undefined_grad=False,
                                        fast_mode=fast)
