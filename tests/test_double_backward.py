"""Second derivatives through the recurrence (create_graph=True, then backward again) on both backends:
gradgradcheck in float64, a gradient-penalty training step against torch.nn.RNN, torch.func."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import RNN, recurrence, recurrence_reference
from fastrnn.elman import elman_fwd_op

F64 = torch.float64
BOTH = pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
# torch before 2.13 (2.11: the GPU machine's) differentiates wrong a torch.func transform compiled around
# a graph break with aot_eager: jacrev of torch's own nn.RNN through functional_call is off by 0.98 there
# (exact in eager and on 2.13), so these comparisons say nothing about fastrnn on such a torch
TORCH_COMPILES_TRANSFORMS = pytest.mark.xfail(tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 13),
                                              reason="torch < 2.13 compiles torch.func transforms wrong", strict=False)
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


# --- the gated cells: the same, through fastrnn.LSTM and fastrnn.GRU ---

GATED_CASES = {  # name -> (cell, proj_size, reverse, lengths, resets)
    "lstm": ("lstm", 0, False, None, None),
    "lstm-proj-reverse-lengths": ("lstm", 2, True, torch.tensor([3, 1]), None),
    "lstm-resets": ("lstm", 0, False, None, torch.tensor([[0, 0], [1, 0], [0, 1]], dtype=torch.bool)),
    "gru": ("gru", 0, False, None, None),
    "gru-reverse-lengths": ("gru", 0, True, torch.tensor([3, 1]), None),
    "gru-resets-reverse": ("gru", 0, True, None, torch.tensor([[0, 1], [1, 0], [0, 0]], dtype=torch.bool)),
}


def gated_inputs(cell, proj_size, T=3, B=2, H=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    G, P = (4 if cell == "lstm" else 3), proj_size or H
    x = torch.randn(T, B, G * H, generator=g, dtype=F64, requires_grad=True)
    w = (torch.randn(G * H, P, generator=g, dtype=F64) / H ** 0.5).requires_grad_()
    h = torch.randn(B, P, generator=g, dtype=F64, requires_grad=True)
    extra = [torch.randn(B if cell == "lstm" else 1, H, generator=g, dtype=F64)[0 if cell == "gru" else slice(None)]
             .detach().requires_grad_()]  # c0 (B, H), or the GRU's b_hn (H,)
    if proj_size:
        extra.append((torch.randn(P, H, generator=g, dtype=F64) / H ** 0.5).requires_grad_())
    return [x, h, w, *extra]


@BOTH
@pytest.mark.parametrize("case", list(GATED_CASES))
def test_gradgradcheck_gated_op(backend, case):
    """Analytic second derivatives of the LSTM and GRU ops (the backward op's own formula) against
    finite differences, with projection, reverse, ragged lengths and resets."""
    cell, proj_size, reverse, lengths, resets = GATED_CASES[case]
    inputs = gated_inputs(cell, proj_size)

    def f(x, h, w, extra, *w_hr):
        if cell == "lstm":
            return fastrnn.lstm_recurrence(x, h, extra, w, *(w_hr or (None,)), reverse, lengths, resets)
        return fastrnn.gru_recurrence(x, h, w, extra, reverse, lengths, resets)

    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=backend == "triton")


@BOTH
@pytest.mark.parametrize("cell,proj_size", [("lstm", 0), ("lstm", 2), ("gru", 0)])
def test_gradgradcheck_gated_module_layers_bidirectional_packed(backend, cell, proj_size):
    torch.manual_seed(0)
    kwargs = dict(proj_size=proj_size) if proj_size else {}
    module = fastrnn.CELLS[cell].module(2, 3, num_layers=2, bidirectional=True, dtype=F64, **kwargs)
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    w = module.weight_hh_l1_reverse

    def f(x, w_hh):
        params = dict(module.named_parameters(), weight_hh_l1_reverse=w_hh)
        out, state = torch.func.functional_call(module, params, (pack_padded_sequence(x, torch.tensor([3, 2])),))
        return (out.data, *state) if cell == "lstm" else (out.data, state)

    assert torch.autograd.gradgradcheck(f, [x, w.detach().clone().requires_grad_()], fast_mode=backend == "triton")


@BOTH
@pytest.mark.parametrize("reads", ["output", "h_n"])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_penalty_on_one_result_alone_matches_torch(cell, reads, backend):
    """A WGAN-GP style step (the penalty on the input gradient's norm) equals torch's own module's;
    its losses read one result alone, the output or h_n, so no gradient of the other reaches either
    backward (None down to the kernels: the final states', or the top layer's output's)."""
    entry = fastrnn.CELLS[cell]
    torch.manual_seed(0)
    ref = entry.torch_module(3, 4, 2, bidirectional=True, dtype=F64)
    ours = entry.module(3, 4, 2, bidirectional=True, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64)
    grads = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        y, state = model(xi)
        if reads == "h_n":
            y = state[0] if cell == "lstm" else state
        (g,) = torch.autograd.grad(y.pow(2).sum(), xi, create_graph=True)
        (y.sum() + (g.norm() - 1) ** 2).backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@BOTH
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_forward_mode_under_no_grad(backend, cell):
    """A call that records no graph skips the autograd Function, but not under forward-mode AD: dual
    tensors under ``no_grad`` still get their tangents (what ``torch.func.jvp`` gives), never a result
    without its tangent."""
    from torch.autograd import forward_ad

    torch.manual_seed(0)
    module = fastrnn.CELLS[cell].module(3, 4, dtype=F64)
    x, dx = torch.randn(5, 2, 3, dtype=F64), torch.randn(5, 2, 3, dtype=F64)
    with torch.no_grad():
        y = module(x)[0]
        assert y.grad_fn is None and not y.requires_grad
        with forward_ad.dual_level():
            tangent = forward_ad.unpack_dual(module(forward_ad.make_dual(x, dx))[0]).tangent
    want = torch.func.jvp(lambda x: module(x)[0], (x,), (dx,))[1]
    assert tangent is not None
    torch.testing.assert_close(tangent, want, rtol=1e-9, atol=1e-9)



def _dual_tangent(y_of, w):
    """The tangent of ``y_of(w)`` along ones, by forward-mode AD on dual tensors."""
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        return forward_ad.unpack_dual(y_of(forward_ad.make_dual(w, torch.ones_like(w)))).tangent


TRANSFORMS = {  # a derivative of y(w) each way torch.func and forward-mode AD take one
    "grad": lambda y, w: torch.func.grad(lambda w: y(w).pow(2).sum())(w),
    "jacrev": lambda y, w: torch.func.jacrev(y)(w),
    "grad of grad": lambda y, w: torch.func.grad(lambda w: torch.func.grad(lambda w: y(w).pow(3).sum())(w)
                                                 .pow(2).sum())(w),
    "jvp": lambda y, w: torch.func.jvp(y, (w,), (torch.ones_like(w),))[1],
    "dual tensors": _dual_tangent,
}


@pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@TORCH_COMPILES_TRANSFORMS
def test_func_transforms_compiled_as_in_eager(backend, cell):
    """Inside ``torch.compile``, torch.func transforms and forward-mode AD give torch's module's
    results, as in eager mode: Dynamo traces neither the cells' Functions nor torch's modules through
    them, so there the module runs outside its graph, as torch's does (before, the custom op in the
    graph raised under grad and gave a wrong tangent under jvp)."""
    torch.manual_seed(0)
    ours = fastrnn.CELLS[cell].module(3, 4, dtype=F64)
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    params = {name: p.detach() for name, p in ours.named_parameters()}
    x, w = torch.randn(5, 2, 3, dtype=F64), params["weight_hh_l0"]

    def y_of(module):
        return lambda w: torch.func.functional_call(module, {**params, "weight_hh_l0": w}, (x,))[0]

    for name, transform in TRANSFORMS.items():
        torch._dynamo.reset()
        compiled = torch.compile(lambda: transform(y_of(ours), w), backend="aot_eager")
        torch.testing.assert_close(compiled(), transform(y_of(theirs), w), rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend", ["auto", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@TORCH_COMPILES_TRANSFORMS
def test_vjp_in_the_initial_state_compiled_as_in_eager(backend, cell):
    """``torch.func.vjp`` in h0, its pullback called inside ``torch.compile``: Dynamo compiles the
    backward's frames one by one, and a frame it compiles takes the custom op into its graph (before,
    the eager Function's frame ran the kernel's launcher under Dynamo: the interpreter raised)."""
    torch.manual_seed(0)
    ours = fastrnn.CELLS[cell].module(3, 4, dtype=F64)
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    x, h0, dy = torch.randn(5, 2, 3, dtype=F64), torch.randn(1, 2, 4, dtype=F64), torch.randn(5, 2, 4, dtype=F64)

    def pullback(module):
        def y(h):
            return module(x, (h, torch.zeros_like(h)) if cell == "lstm" else h)[0]

        return lambda: torch.func.vjp(y, h0)[1](dy)[0]

    got = torch.compile(pullback(ours), backend="aot_eager")()
    torch.testing.assert_close(got, pullback(theirs)(), rtol=1e-9, atol=1e-9)


def test_a_subclass_compiled_under_forward_mode_runs_its_forward_once():
    """A subclass's forward around ours, compiled and called on dual tensors: ours runs outside the
    graph, not the subclass's again (its input was doubled twice)."""
    from torch.autograd import forward_ad

    class Doubled(fastrnn.LSTM):
        def forward(self, input, hx=None):
            return super().forward(input * 2, hx)

    torch.manual_seed(0)
    ours, theirs = Doubled(3, 4, dtype=F64), nn.LSTM(3, 4, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    x, dx = torch.randn(5, 2, 3, dtype=F64), torch.randn(5, 2, 3, dtype=F64)

    def y_and_tangent(run):
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(run(forward_ad.make_dual(x, dx))[0])

    want = y_and_tangent(lambda x: theirs(x * 2))
    got = y_and_tangent(torch.compile(ours, backend="aot_eager"))
    torch.testing.assert_close((got.primal, got.tangent), (want.primal, want.tangent), rtol=1e-9, atol=1e-9)


@BOTH
@TORCH_COMPILES_TRANSFORMS
def test_the_op_under_func_transforms_compiled_as_in_eager(backend):
    """The functional op inside ``torch.compile``: each transform of its reference's result (before,
    jvp's tangent was wrong)."""
    x, w, h = (t.detach() for t in small_inputs(T=4, seed=5))
    for name, transform in TRANSFORMS.items():
        torch._dynamo.reset()
        got = torch.compile(lambda: transform(lambda w: recurrence(x, h, w, "tanh")[0], w), backend="aot_eager")()
        want = transform(lambda w: recurrence_reference(x, h, w, "tanh")[0], w)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=name)


GATED_FLAGS = list(itertools.product(["lstm", "lstm-proj", "gru", "gru-bias"], [False, True],
                                     ["whole", "lengths", "resets"]))


def gated_op_inputs(case, seed=6, T=4, B=3, H=3):
    """A gated op's inputs in float64 requiring grad, and the function of them calling ``op`` (the op's
    Function, or the reference), for ``case`` (cell, with a projection or b_hn)."""
    g = torch.Generator().manual_seed(seed)
    cell, P = case.split("-")[0], 2 if case == "lstm-proj" else H

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_()

    if cell == "lstm":
        inputs = [rand(T, B, 4 * H), rand(B, P), rand(B, H), rand(4 * H, P, scale=0.5)]
        inputs += [rand(P, H, scale=0.5)] if case == "lstm-proj" else []
        return inputs, lambda op, *a: lambda x, h, c, w, *r: op(x, h, c, w, *(r or [None]), *a)
    inputs = [rand(T, B, 3 * H), rand(B, H), rand(3 * H, H, scale=0.5)] + ([rand(H)] if case == "gru-bias" else [])
    return inputs, lambda op, *a: lambda x, h, w, *b: op(x, h, w, *(b or [None]), *a)


def gated_case(case, steps, seed=6):
    """Inputs, the function of them calling an op (``gated_op_inputs``), lengths or resets, and the
    cell's (recurrence, reference, op's Function)."""
    from fastrnn.gru import GRU_OP, gru_recurrence, gru_reference
    from fastrnn.lstm import LSTM_OP, lstm_recurrence, lstm_reference

    torch.manual_seed(seed)
    inputs, call = gated_op_inputs(case, seed)
    T, B = inputs[0].shape[:2]
    lengths = torch.tensor([T, 2, 3]) if steps == "lengths" else None
    resets = torch.rand(T, B) < 0.3 if steps == "resets" else None
    ops = (lstm_recurrence, lstm_reference, LSTM_OP) if case.startswith("lstm") else \
        (gru_recurrence, gru_reference, GRU_OP)
    return inputs, call, lengths, resets, ops


@BOTH
@pytest.mark.parametrize("case,reverse,steps", GATED_FLAGS, ids=["-".join(map(str, f)) for f in GATED_FLAGS])
def test_gated_forward_mode(backend, case, reverse, steps):
    """The LSTM's and GRU's forward mode: ``torch.func.jvp`` of the recurrence equals the reference's
    (float64, random tangents of every input)."""
    inputs, call, lengths, resets, ops = gated_case(case, steps)
    primals = tuple(t.detach() for t in inputs)
    tangents = tuple(torch.randn_like(t) for t in primals)
    got, want = (torch.func.jvp(call(fn, reverse, lengths, resets), primals, tangents)[1] for fn in ops[:2])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@BOTH
@pytest.mark.parametrize("case,reverse,steps", GATED_FLAGS, ids=["-".join(map(str, f)) for f in GATED_FLAGS])
def test_gated_forward_mode_gradcheck(backend, case, reverse, steps):
    """The op's tangents of all its outputs (c and the gates too, which a backward reads) agree with
    finite differences (``gradcheck``)."""
    from fastrnn.backend import get_backend

    inputs, call, lengths, resets, ops = gated_case(case, steps, seed=7)
    op = call(ops[2], reverse, lengths, get_backend(inputs[0].device), resets)
    assert torch.autograd.gradcheck(op, inputs, check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False, fast_mode=backend == "triton")


@BOTH
@pytest.mark.parametrize("case,reverse,steps", GATED_FLAGS, ids=["-".join(map(str, f)) for f in GATED_FLAGS])
def test_gated_forward_over_reverse(backend, case, reverse, steps):
    """Forward mode over the LSTM's and GRU's backward (what ``torch.func.hessian`` takes): the
    recurrence's against finite differences of its reverse mode (``gradgradcheck``, float64)."""
    inputs, call, lengths, resets, ops = gated_case(case, steps, seed=8)
    assert torch.autograd.gradgradcheck(call(ops[0], reverse, lengths, resets), inputs, check_fwd_over_rev=True,
                                        check_rev_over_rev=False, check_undefined_grad=False,
                                        fast_mode=backend == "triton")


@BOTH
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gated_hessian_as_torchs_module(backend, cell):
    """``torch.func.hessian`` (jacfwd of jacrev) of a loss of the module's weights is torch's module's;
    then the module's Jacobian by forward mode is its Jacobian by reverse mode: nothing made inside a
    transform is kept (the GRU kept a mask made there, which crashed a later transform)."""
    torch.manual_seed(0)
    ours = fastrnn.CELLS[cell].module(3, 4, dtype=F64)
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, dtype=F64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, dtype=F64)
    params = {name: p.detach() for name, p in ours.named_parameters()}

    def y_of(module):
        return lambda w: torch.func.functional_call(module, {**params, "weight_hh_l0": w}, (x,))[0]

    w = params["weight_hh_l0"]
    got, want = (torch.func.hessian(lambda w: y_of(m)(w).pow(3).sum())(w) for m in (ours, theirs))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    jacobians = [jacobian(y_of(ours))(w) for jacobian in (torch.func.jacfwd, torch.func.jacrev)]
    torch.testing.assert_close(*jacobians, rtol=1e-9, atol=1e-9)


ORDERS = {  # derivatives of a scalar loss of w: (how, whether every cell has it; else refused for the gated ones)
    "hessian": (lambda f: torch.func.hessian(f), True),
    "jacrev of jacfwd": (lambda f: torch.func.jacrev(torch.func.jacfwd(f)), True),
    "jacrev of jacrev": (lambda f: torch.func.jacrev(torch.func.jacrev(f)), True),
    "jacfwd of jacfwd": (lambda f: torch.func.jacfwd(torch.func.jacfwd(f)), False),
    "jacfwd of hessian": (lambda f: torch.func.jacfwd(torch.func.hessian(f)), False),
    "jacrev of hessian": (lambda f: torch.func.jacrev(torch.func.hessian(f)), "rnn"),
    "jacrev of jacrev of jacrev": (lambda f: torch.func.jacrev(torch.func.jacrev(torch.func.jacrev(f))), True),
}


def outputs_of_w(cell: str, scale: float = 1.0):
    """A float64 problem in ``w_hh`` alone for ``cell`` (3 steps, 2 rows, H=2, no initial state):
    ``(w, ours, reference)``, each of the last two ``w -> y`` of the cell's op and of its reference."""
    torch.manual_seed(0)
    entry = fastrnn.CELLS[cell]
    x, w = torch.randn(3, 2, 2 * entry.gates, dtype=F64), torch.randn(2 * entry.gates, 2, dtype=F64) * scale
    states = (None,) * len(entry.state)  # (h0, and c0 for the LSTM)
    return w, *(lambda w, fn=fn: fn(x, *states, w)[0] for fn in (entry.recurrence, entry.reference))


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_gradient_of_a_hessian_vector_product_on_dual_tensors(backend, cell):
    """A third derivative by reverse over (forward over reverse): the Hessian-vector product as the
    tangent of a gradient taken inside ``forward_ad.dual_level``, then its gradient, the reference's
    (before, the gated cells' tangent had no graph: the gradient was silently wrong, off by 6e-5 and
    2e-3)."""
    from torch.autograd import forward_ad

    w, *outputs = outputs_of_w(cell, scale=0.5)

    def third(y_of):
        w_ = w.clone().requires_grad_()
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(w_, torch.ones_like(w))
            (g,) = torch.autograd.grad(y_of(dual).pow(3).sum(), dual, create_graph=True)
            hvp = forward_ad.unpack_dual(g).tangent
        return torch.autograd.grad(hvp.pow(2).sum(), w_)[0]

    torch.testing.assert_close(*(third(y_of) for y_of in outputs), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch"], indirect=True)  # (the rules are the same on every backend)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_every_order_of_derivative_is_right_or_refused(backend, cell):
    """Second and third derivatives through the op, each way torch.func composes them: the reference's
    (float64), or a NotImplementedError where a rule would be invisible to an outer level (forward over
    forward; the gated cells' third derivatives), never a silently wrong result (jacfwd of jacfwd gave
    one through every cell, as did the gated cells' third derivatives by forward mode)."""
    w, ours, reference = outputs_of_w(cell)
    loss_ours, loss_ref = (lambda w, y=y: y(w).pow(3).sum() for y in (ours, reference))
    for name, (order, everywhere) in ORDERS.items():
        want = order(loss_ref)(w)
        if everywhere is True or everywhere == cell:
            torch.testing.assert_close(order(loss_ours)(w), want, rtol=1e-9, atol=1e-12, msg=name)
        else:
            with pytest.raises(NotImplementedError, match=rf"fastrnn\.{cell.upper()}"):
                order(loss_ours)(w)
