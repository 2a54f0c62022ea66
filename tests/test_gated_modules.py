"""fastrnn.LSTM and fastrnn.GRU against torch.nn.LSTM and torch.nn.GRU: construction, parameters,
state_dict, forward (layers, bias, batch_first, bidirectional, proj_size, packed, unbatched),
gradients, dropout, errors, torch.compile.

The parity tests run on both paths: ``torch`` (the PyTorch twins of the kernels) and ``triton`` (the
fused kernels, under the interpreter when there is no GPU)."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import fastrnn

from .conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")
BOTH = pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
F64 = torch.float64
CELLS = {"lstm": (nn.LSTM, fastrnn.LSTM), "gru": (nn.GRU, fastrnn.GRU)}


def pair(cell, *args, dtype=F64, seed=0, **kwargs):
    """The torch module and ours with the same weights (ours loads the torch module's state_dict)."""
    torch.manual_seed(seed)
    theirs_cls, ours_cls = CELLS[cell]
    ref = theirs_cls(*args, dtype=dtype, **kwargs)
    ours = ours_cls(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def state_parts(h):
    return list(h) if isinstance(h, tuple) else [h]


def random_state(cell, ref, B, batched=True):
    """A random (h0, c0) for LSTM, h0 for GRU, shaped as ``ref`` takes it; requires grad."""
    D = 2 if ref.bidirectional else 1
    lead = (ref.num_layers * D, B) if batched else (ref.num_layers * D,)
    h = torch.randn(*lead, ref.proj_size or ref.hidden_size, dtype=F64, requires_grad=True)
    if cell == "gru":
        return h
    return h, torch.randn(*lead, ref.hidden_size, dtype=F64, requires_grad=True)


def run_both(ref, ours, x, hx=None):
    """Outputs, final states and gradients of the input, the state and every parameter."""
    results = []
    for mod in (ref, ours):
        leaves = [t for t in [x, *state_parts(hx)] if isinstance(t, torch.Tensor) and t.requires_grad]
        y, h_n = mod(x, hx)
        y_data = y.data if hasattr(y, "batch_sizes") else y
        loss = (y_data.sin() * 1.7).sum() + sum((s * s).sum() * (k + 1) for k, s in enumerate(state_parts(h_n)))
        grads = torch.autograd.grad(loss, leaves + list(mod.parameters()))
        results.append((y_data, state_parts(h_n), grads))
    return results


def assert_same(results, tol=1e-9):
    (y1, h1, g1), (y2, h2, g2) = results
    assert y2.shape == y1.shape and y2.dtype == y1.dtype
    assert rel_err(y2, y1) <= tol
    assert len(h1) == len(h2) and all(a.shape == b.shape and rel_err(b, a) <= tol for a, b in zip(h1, h2))
    assert len(g1) == len(g2) and all(rel_err(b, a) <= tol for a, b in zip(g1, g2))


# (cell, num_layers, bias, batch_first, bidirectional, proj_size): every option on and off, each in
# a layered and a one-layer case, on both cells
CASES = [("lstm", 2, True, False, True, 0), ("lstm", 1, False, True, False, 0), ("lstm", 2, True, True, False, 3),
         ("lstm", 1, True, False, True, 4), ("lstm", 2, False, False, True, 2),
         ("gru", 2, True, False, True, 0), ("gru", 1, False, True, False, 0), ("gru", 2, False, True, True, 0),
         ("gru", 1, True, False, False, 0)]


@BOTH
@pytest.mark.parametrize("cell,num_layers,bias,batch_first,bidirectional,proj_size", CASES)
def test_matches_torch_float64(backend, cell, num_layers, bias, batch_first, bidirectional, proj_size):
    extra = dict(proj_size=proj_size) if proj_size else {}
    ref, ours = pair(cell, 5, 7, num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                     **extra)
    x = torch.randn((3, 6, 5) if batch_first else (6, 3, 5), dtype=F64, requires_grad=True)
    assert_same(run_both(ref, ours, x, random_state(cell, ref, 3)))
    assert_same(run_both(ref, ours, x))  # no initial state: zeros


@BOTH
@pytest.mark.parametrize("cell,proj_size", [("lstm", 0), ("lstm", 2), ("gru", 0)])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence(backend, cell, proj_size, enforce_sorted):
    extra = dict(proj_size=proj_size) if proj_size else {}
    ref, ours = pair(cell, 4, 6, 2, bidirectional=True, **extra)
    lengths = torch.tensor([5, 3, 3, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 4])
    x = torch.randn(5, 4, 4, dtype=F64, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    assert_same(run_both(ref, ours, packed, random_state(cell, ref, 4)))
    y1, y2 = ref(packed)[0], ours(packed)[0]
    assert isinstance(y2, type(y1)) and torch.equal(y2.batch_sizes, y1.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(y2, name), getattr(y1, name)
        assert (a is None and b is None) or torch.equal(a, b)


@BOTH
@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_without_state_from_pack_sequence(backend, cell):
    ref, ours = pair(cell, 3, 4)
    packed = pack_sequence([torch.randn(n, 3, dtype=F64) for n in (4, 1, 3)], enforce_sorted=False)
    assert_same(run_both(ref, ours, packed))


@BOTH
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(backend, cell, batch_first):
    ref, ours = pair(cell, 3, 5, 2, batch_first=batch_first, bidirectional=True)
    x = torch.randn(7, 3, dtype=F64, requires_grad=True)
    for hx in (None, random_state(cell, ref, None, batched=False)):
        results = run_both(ref, ours, x, hx)
        assert results[1][0].shape == (7, 10)
        assert_same(results)


@BOTH
@pytest.mark.parametrize("cell", list(CELLS))
def test_float32_close_to_float64(backend, cell):
    ref64, _ = pair(cell, 16, 32, 2)
    ours32 = CELLS[cell][1](16, 32, 2)
    ours32.load_state_dict({k: v.float() for k, v in ref64.state_dict().items()})
    x = torch.randn(20, 5, 16, dtype=F64)
    (y64, h64), (y32, h32) = ref64(x), ours32(x.float())
    assert y32.dtype == torch.float32
    assert rel_err(y32, y64) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(state_parts(h32), state_parts(h64)))


@pytest.mark.parametrize("cell", list(CELLS))
def test_gradcheck_float64(cell):
    torch.manual_seed(5)
    extra = dict(proj_size=2) if cell == "lstm" else {}
    ours = CELLS[cell][1](3, 4, 2, bidirectional=True, dtype=F64, **extra)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    names = [n for n, _ in ours.named_parameters()]

    def f(x, *weights):
        y, h_n = torch.func.functional_call(ours, dict(zip(names, weights)), (x,))
        return (y, *state_parts(h_n))

    assert torch.autograd.gradcheck(f, (x, *[p.detach().requires_grad_() for p in ours.parameters()]))


@BOTH
@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_between_layers_in_training_only(backend, cell):
    torch.manual_seed(0)
    ours = CELLS[cell][1](4, 8, 3, dropout=0.5, dtype=F64)
    x = torch.randn(5, 2, 4, dtype=F64)
    torch.manual_seed(1)
    a = ours(x)[0]
    torch.manual_seed(2)
    b = ours(x)[0]
    assert not torch.equal(a, b)  # training: dropout masks differ
    ours.eval()
    ref = CELLS[cell][0](4, 8, 3, dropout=0.5, dtype=F64).eval()
    ref.load_state_dict(ours.state_dict())
    assert rel_err(ours(x)[0], ref(x)[0]) <= 1e-9  # eval: no dropout, equal to torch


@pytest.mark.parametrize("cell", list(CELLS))
def test_constructor_parameters_init_and_state_dict(cell):
    theirs_cls, ours_cls = CELLS[cell]
    extra = dict(proj_size=3) if cell == "lstm" else {}
    for args, kwargs in (((6, 5), {}), ((6, 5, 2, True, True, 0.1, True), extra), ((6, 5), dict(num_layers=2, **extra))):
        torch.manual_seed(3)
        ref = theirs_cls(*args, **kwargs)
        torch.manual_seed(3)
        ours = ours_cls(*args, **kwargs)
        names = [n for n, _ in ref.named_parameters()]
        assert [n for n, _ in ours.named_parameters()] == names
        for (_, a), (_, b) in zip(ref.named_parameters(), ours.named_parameters()):
            assert torch.equal(a, b)  # the same init, drawn in the same order
        ours.load_state_dict(ref.state_dict())
        ref.load_state_dict(ours.state_dict())
    ours.flatten_parameters()  # accepted


CONSTRUCTOR_ERRORS = [
    dict(dropout=1.5), dict(num_layers=0), dict(hidden_size=0), dict(bias=1), dict(hidden_size=2.5),
    dict(proj_size=-1), dict(proj_size=5), dict(proj_size=2), dict(nonlinearity="tanh"), dict(bogus=1),
]


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("kwargs", CONSTRUCTOR_ERRORS, ids=str)
def test_constructor_errors_match_torch(cell, kwargs):
    theirs_cls, ours_cls = CELLS[cell]
    args = {"input_size": 4, "hidden_size": 5, **kwargs}
    try:
        theirs_cls(**args)
    except Exception as e:  # noqa: BLE001 - what torch raises is what we must raise
        with pytest.raises(type(e)) as mine:
            ours_cls(**args)
        assert str(mine.value) == str(e)
    else:
        ours_cls(**args)  # accepted by torch: accepted by us


def lstm_state(L, B, P, H, dtype=torch.float32, device="cpu"):
    return torch.zeros(L, B, P, dtype=dtype, device=device), torch.zeros(L, B, H, dtype=dtype, device=device)


FORWARD_ERRORS = {  # (cell) -> name -> (make args, exception type)
    "lstm": {
        "rank 4": (lambda: (torch.randn(5, 2, 4, 1),), ValueError),
        "feature size": (lambda: (torch.randn(5, 2, 5),), RuntimeError),
        "h0 shape": (lambda: (torch.randn(5, 2, 4), lstm_state(2, 3, 3, 3)), RuntimeError),
        "c0 shape": (lambda: (torch.randn(5, 2, 4), (torch.zeros(2, 2, 3), torch.zeros(2, 2, 4))), RuntimeError),
        "state rank batched": (lambda: (torch.randn(5, 2, 4), (torch.zeros(2, 3), torch.zeros(2, 3))), RuntimeError),
        "state rank unbatched": (lambda: (torch.randn(5, 4), lstm_state(2, 1, 3, 3)), RuntimeError),
        "input dtype": (lambda: (torch.randn(5, 2, 4, dtype=F64),), ValueError),
        "state dtype": (lambda: (torch.randn(5, 2, 4), lstm_state(2, 2, 3, 3, dtype=F64)), RuntimeError),
        "zero steps": (lambda: (torch.randn(0, 2, 4),), RuntimeError),
        "input device": (lambda: (torch.randn(5, 2, 4, device="meta"),), RuntimeError),
        "three states": (lambda: (torch.randn(5, 2, 4), lstm_state(2, 2, 3, 3) + (torch.zeros(2, 2, 3),)),
                         RuntimeError),
        "one state": (lambda: (torch.randn(5, 2, 4), lstm_state(2, 2, 3, 3)[:1]), IndexError),
        "a tensor for the state": (lambda: (torch.randn(5, 2, 4), torch.zeros(2, 2, 3)), RuntimeError),
    },
    "gru": {
        "rank 4": (lambda: (torch.randn(5, 2, 4, 1),), ValueError),
        "feature size": (lambda: (torch.randn(5, 2, 5),), RuntimeError),
        "h0 shape": (lambda: (torch.randn(5, 2, 4), torch.zeros(2, 3, 3)), RuntimeError),
        "h0 rank batched": (lambda: (torch.randn(5, 2, 4), torch.zeros(2, 3)), RuntimeError),
        "h0 rank unbatched": (lambda: (torch.randn(5, 4), torch.zeros(2, 1, 3)), RuntimeError),
        "input dtype": (lambda: (torch.randn(5, 2, 4, dtype=F64),), ValueError),
        "h0 dtype": (lambda: (torch.randn(5, 2, 4), torch.zeros(2, 2, 3, dtype=F64)), RuntimeError),
        "zero steps": (lambda: (torch.randn(0, 2, 4),), RuntimeError),
        "input device": (lambda: (torch.randn(5, 2, 4, device="meta"),), RuntimeError),
    },
}


@BOTH
@pytest.mark.parametrize("cell,case", [(c, k) for c, cases in FORWARD_ERRORS.items() for k in cases])
def test_forward_errors_match_torch(backend, cell, case):
    """The same exception, and torch's own words where torch words it itself (a wrong state dtype
    reaches torch's kernels, whose message says nothing of the state: ours names it)."""
    make, exc = FORWARD_ERRORS[cell][case]
    torch.manual_seed(0)
    theirs_cls, ours_cls = CELLS[cell]
    ref, ours = theirs_cls(4, 3, 2), ours_cls(4, 3, 2)
    with pytest.raises(exc) as theirs:
        ref(*make())
    with pytest.raises(exc) as mine:
        ours(*make())
    if case not in ("state dtype", "h0 dtype"):
        assert str(mine.value) == str(theirs.value)


@pytest.mark.parametrize("cell", list(CELLS))
def test_compile_fullgraph_matches_eager(cell):
    torch.manual_seed(4)
    extra = dict(proj_size=3) if cell == "lstm" else {}
    model = CELLS[cell][1](6, 5, 2, bidirectional=True, **extra)
    x = torch.randn(7, 3, 6, requires_grad=True)

    def outputs(m):
        y, h = m(x)
        loss = y.square().sum() + sum(s.sum() for s in state_parts(h))
        return [y, *state_parts(h), *torch.autograd.grad(loss, [x, *model.parameters()])]

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for a, b in zip(outputs(compiled), outputs(model)):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("cell", list(CELLS))
def test_whole_model_loads_with_weights_only(cell, tmp_path):
    model = CELLS[cell][1](3, 4, 2)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt")  # weights_only=True, torch's default
    x = torch.randn(5, 2, 3)
    assert type(loaded) is type(model) and torch.equal(loaded(x)[0], model(x)[0])


@BOTH
@pytest.mark.parametrize("cell,kwargs", [("lstm", {}), ("lstm", dict(proj_size=2, bidirectional=True)),
                                         ("gru", {}), ("gru", dict(num_layers=2, bidirectional=True))])
def test_third_derivatives_by_reverse_mode_are_torchs(backend, cell, kwargs):
    """Reverse mode three times over (the gradient of a gradient penalty's gradient), and
    ``torch.autograd.functional.hvp``, which differentiates the double backward once more: torch's
    module's, to float64 rounding, with an initial state (the backward given a second derivative's
    sources is linear in them too; before, both were a NotImplementedError)."""
    theirs, ours = pair(cell, 3, 4, **kwargs)
    torch.manual_seed(1)
    x = torch.randn(5, 2, 3, dtype=F64)
    state = tuple(torch.randn(p.shape, dtype=F64) for p in state_parts(theirs(x)[1]))
    hx = state if cell == "lstm" else state[0]

    def third(module):
        x_ = x.clone().requires_grad_()
        y, _ = module(x_, hx)
        (g,) = torch.autograd.grad(y.sin().sum(), x_, create_graph=True)
        gg = torch.autograd.grad((g * g).sum(), [x_, *module.parameters()], create_graph=True)
        return torch.autograd.grad(sum(t.cos().sum() for t in gg), [x_, *module.parameters()])

    def hvp(module):
        return torch.autograd.functional.hvp(lambda x: module(x, hx)[0].pow(3).sum(), x, torch.ones_like(x))[1]

    torch.testing.assert_close(third(ours), third(theirs), rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(hvp(ours), hvp(theirs), rtol=1e-9, atol=1e-11)


@BOTH
@pytest.mark.parametrize("cell", list(CELLS))
def test_gradient_of_a_tangent_as_torchs_module(backend, cell):
    """The gradient of a loss of a forward-mode tangent (reverse over forward, a second derivative):
    torch's module's, taken outside the dual level, by torch.func, and inside the dual level, where
    autograd takes that gradient's own tangent too (the transposed backward given sources: before, a
    NotImplementedError)."""
    from torch.autograd import forward_ad

    theirs, ours = pair(cell, 3, 4)
    x, dx = torch.randn(5, 2, 3, dtype=F64), torch.randn(5, 2, 3, dtype=F64)

    def grads(module, inside=False):
        with forward_ad.dual_level():
            tangent = forward_ad.unpack_dual(module(forward_ad.make_dual(x, dx))[0]).tangent
            if inside:
                return torch.autograd.grad(tangent.pow(2).sum(), module.weight_hh_l0)[0]
        return torch.autograd.grad(tangent.pow(2).sum(), module.weight_hh_l0)[0]

    def by_func(module):
        def loss(w):
            y = lambda x: torch.func.functional_call(module, {"weight_hh_l0": w}, (x,), strict=False)[0]
            return torch.func.jvp(y, (x,), (dx,))[1].pow(2).sum()

        return torch.func.grad(loss)(module.weight_hh_l0.detach())

    torch.testing.assert_close(grads(ours), grads(theirs), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(by_func(ours), by_func(theirs), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(ours, inside=True), grads(theirs, inside=True), rtol=1e-9, atol=1e-12)


@BOTH
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("packed", [False, True])
def test_dropout_draws_as_torch_draws(backend, cell, packed):
    """In training, the same seed gives the same run as the torch module: the dropout masks between
    layers are drawn over the same tensor (for packed input, its packed rows)."""
    entry = fastrnn.CELLS[cell]
    torch.manual_seed(0)
    ref = entry.torch_module(4, 5, 3, dropout=0.4, bidirectional=True, dtype=F64)
    ours = entry.module(4, 5, 3, dropout=0.4, bidirectional=True, dtype=F64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 4, dtype=F64)
    if packed:
        x = pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)
    outputs = []
    for module in (ref, ours):
        torch.manual_seed(7)
        y, state = module(x)
        outputs.append((y.data if packed else y, state[0] if cell == "lstm" else state))
    assert rel_err(outputs[1][0], outputs[0][0]) <= 1e-9
    assert rel_err(outputs[1][1], outputs[0][1]) <= 1e-9


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell,proj_size", [("rnn", 0), ("lstm", 0), ("lstm", 2), ("gru", 0)])
def test_gradcheck_with_batched_gradients(backend, cell, proj_size):
    """vmap over the backward by torch's legacy vmap (gradcheck's check_batched_grad, as PyTorch's own
    module tests run it; ``jacobian(vectorize=True)``): torch's module's Jacobian on every path (before,
    the twins and the kernels' launchers ran on batched tensors and raised; on ``auto`` torch's own
    module ran, as it does on the CPU)."""
    torch.manual_seed(0)
    kwargs = dict(proj_size=proj_size) if proj_size else {}
    ours = fastrnn.CELLS[cell].module(3, 4, 2 if backend != "triton" else 1, dtype=F64, **kwargs)
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, ours.num_layers, dtype=F64, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ours(x)[0], (x,), check_batched_grad=True)
    jacobians = [torch.autograd.functional.jacobian(lambda x: m(x)[0], x, vectorize=True) for m in (ours, theirs)]
    torch.testing.assert_close(*jacobians, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell,proj_size", [("rnn", 0), ("lstm", 0), ("lstm", 2), ("gru", 0)])
def test_second_derivatives_of_batched_vectors_are_torchs(backend, cell, proj_size):
    """A second derivative by torch's legacy vmap: Hessian-vector products of several vectors at once
    (``autograd.grad(..., is_grads_batched=True)`` on a first gradient made with ``create_graph``;
    ``gradgradcheck``'s check_batched_grad, as PyTorch's own module tests run it), in the input and
    every weight, as torch's module's (before, the LSTM's and GRU's second derivatives flattened
    batched tensors, which that vmap cannot, and the LSTM's sources ran on its twin batched)."""
    torch.manual_seed(0)
    kwargs = dict(proj_size=proj_size) if proj_size else {}
    ours = fastrnn.CELLS[cell].module(3, 4, dtype=F64, **kwargs)
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, dtype=F64, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    products = []
    for module in (ours, theirs):
        wrt = (x, *module.parameters())
        y, state = module(x)
        first = torch.autograd.grad((y * y.detach().cos()).sum(), wrt, create_graph=True)
        torch.manual_seed(1)
        vectors = [torch.randn(4, *g.shape, dtype=F64) for g in first]
        products.append(torch.autograd.grad(first, wrt, vectors, is_grads_batched=True, allow_unused=True))
    for got, want in zip(*products):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    products = []  # a first gradient in x alone, of a loss on y: its backward's sources batched, no upstream
    for module in (ours, theirs):
        (first,) = torch.autograd.grad(module(x)[0].sum(), x, create_graph=True)
        torch.manual_seed(2)
        products.append(torch.autograd.grad(first, x, torch.randn(4, *first.shape, dtype=F64),
                                            is_grads_batched=True))
    torch.testing.assert_close(*products, rtol=1e-9, atol=1e-12)
    if backend == "torch":
        x = torch.randn(2, 1, 3, dtype=F64, requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda x, *w: torch.func.functional_call(
            ours, dict(zip(dict(ours.named_parameters()), w)), (x,))[0], (x, *ours.parameters()),
            check_batched_grad=True)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("how", ["parametrize", "plain tensor"])
def test_reparametrised_weights_are_read(backend, cell, how):
    """A weight that is no longer a parameter of the module (``torch.nn.utils.parametrize``, or set
    as a plain tensor as old-style weight norm does) is read where ``getattr`` finds it, as torch's
    module reads it: the same outputs and gradients."""
    from torch.nn.utils import parametrize

    class Scaled(nn.Module):
        def forward(self, w):
            return 0.5 * w

    torch.manual_seed(0)
    ours = fastrnn.CELLS[cell].module(3, 4, dtype=torch.float64)
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    for m in (ours, theirs):
        if how == "parametrize":
            parametrize.register_parametrization(m, "weight_hh_l0", Scaled())
        else:
            w = m.weight_hh_l0.detach() * 0.5
            del m.weight_hh_l0
            m.weight_hh_l0 = w
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    got, want = ours(x)[0], theirs(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(*(torch.autograd.grad(y.sum(), x)[0] for y in (got, want)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_final_state_detaches_in_place(backend, cell, layers):
    """Truncated backpropagation through time detaches the carried state in place (``h.detach_()``),
    as with torch's module: the final state is a tensor of its own, never a view."""
    torch.manual_seed(0)
    module = fastrnn.CELLS[cell].module(3, 4, layers)
    x = torch.randn(5, 2, 3)
    state = module(x)[1]
    for part in state if isinstance(state, tuple) else (state,):
        assert part._base is None
        part.detach_()
        assert not part.requires_grad


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layers", [1, 2])
def test_one_layers_final_state_is_not_copied(backend, cell, layers):
    """One layer and direction returns the op's own final state, given its leading dimension in place:
    no stack (a copy, a GPU launch per part); more are stacked. Either way the state is apart from
    what the backward reads: changed in place after the forward, the gradients are torch's."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    ours = fastrnn.CELLS[cell].module(3, 4, layers)
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, layers)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as run:
        y, state = ours(x)
    stacks = sum(e.name == "aten::stack" for e in run.events())
    assert stacks == (0 if layers == 1 else (2 if cell == "lstm" else 1))
    for part in state if isinstance(state, tuple) else (state,):
        assert part.shape[0] == layers
        part.zero_()
    got = torch.autograd.grad(y.sum(), [x, *ours.parameters()])
    want = torch.autograd.grad(theirs(x)[0].sum(), [x, *theirs.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_final_state_is_contiguous_whatever_the_given_states_layout(backend, cell):
    """A packed call given a column-major state returns its final state contiguous, as torch's module
    does, and so does the op (whose fake outputs say so): the twins carry a contiguous copy of h0 (and
    c0) where lengths keep one apart from the outputs."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from fastrnn.gru import gru_forward
    from fastrnn.lstm import lstm_forward

    torch.manual_seed(0)
    ours = fastrnn.CELLS[cell].module(3, 4).double()
    theirs = fastrnn.CELLS[cell].torch_module(3, 4).double()
    theirs.load_state_dict(ours.state_dict())
    x = pack_padded_sequence(torch.randn(5, 3, 3, dtype=torch.float64), torch.tensor([5, 3, 2]))
    parts = [torch.randn(4, 3, dtype=torch.float64).t().unsqueeze(0) for _ in range(2 if cell == "lstm" else 1)]
    hx = tuple(parts) if cell == "lstm" else parts[0]
    got, want = ours(x, hx)[1], theirs(x, hx)[1]
    for a, b in zip(*((s if isinstance(s, tuple) else (s,)) for s in (got, want))):
        assert a.is_contiguous() and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if cell != "rnn":
        T, B, H, G = 5, 3, 4, 4 if cell == "lstm" else 3
        x_proj, w = torch.randn(T, B, G * H), torch.randn(G * H, H)
        h0, lengths = torch.randn(H, B).t(), torch.tensor([5, 3, 2])
        finals = (lstm_forward(x_proj, h0, h0.clone().t().contiguous().t(), w, None, False, lengths, backend)[3:]
                  if cell == "lstm" else gru_forward(x_proj, h0, w, None, False, lengths, backend)[2:])
        assert all(f.is_contiguous() for f in finals)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_a_zero_size_batch_trains_as_torchs(backend, cell, batch_first):
    """A batch of no sequences (a data loader's last, a filter's leftover): empty outputs and final
    state, and zero gradients, as torch's module gives (the Elman module's backward raised: its final
    state, the reference loop's tanh output, was given its leading dimension in place)."""
    ours = fastrnn.CELLS[cell].module(3, 4, batch_first=batch_first)
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, batch_first=batch_first)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn((0, 5, 3) if batch_first else (5, 0, 3), requires_grad=True)
    grads = []
    for module in (ours, theirs):
        y, state = module(x)
        parts = state if isinstance(state, tuple) else (state,)
        grads.append(torch.autograd.grad(y.sum() + sum(p.sum() for p in parts), [x, *module.parameters()]))
        assert y.shape == (x.shape[0], x.shape[1], 4) and all(p.shape == (1, 0, 4) for p in parts)
    torch.testing.assert_close(*grads, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell,weight", [(cell, weight) for cell in ("rnn", "lstm", "gru")
                                         for weight in ("weight_hh_l0", "bias_hh_l0", "weight_hr_l0")
                                         if cell == "lstm" or weight != "weight_hr_l0"])
def test_weights_of_mixed_dtypes_are_refused_as_torchs(backend, cell, weight):
    """A weight whose dtype differs from the others' (``p.data = p.data.float()`` on a float64 module)
    is a RuntimeError naming it, as torch's module refuses it, never silently cast; under the CPU's
    autocast too, which leaves float64 as it is."""
    module = fastrnn.CELLS[cell].module(3, 4, **({"proj_size": 2} if weight == "weight_hr_l0" else {})).double()
    getattr(module, weight).data = getattr(module, weight).data.float()
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with pytest.raises(RuntimeError, match=weight if backend != "auto" else "dtype"):
                module(torch.randn(5, 2, 3, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("steps", ["whole", "lengths", "resets"])
@pytest.mark.parametrize("reverse", [False, True])
def test_final_state_is_the_last_stored_step(backend, dtype, steps, reverse):
    """A gated op's final states are its outputs at each sequence's last step, bit for bit, as torch's
    modules return ``output[-1]``: taken from the state the loop carried where that has the outputs'
    precision (fp32), from the stored step otherwise (bf16, stored rounded), each a tensor of its own."""
    from fastrnn.gru import gru_forward
    from fastrnn.lstm import lstm_forward
    from fastrnn.sequence import at_step, edge_step

    torch.manual_seed(0)
    T, B, H = 6, 3, 16
    lengths = torch.tensor([6, 2, 4]) if steps == "lengths" else None
    resets = torch.rand(T, B) < 0.3 if steps == "resets" else None
    last = edge_step(T, not reverse, lengths, "cpu")
    for G, forward in ((4, lstm_forward), (3, gru_forward)):
        x, w = torch.randn(T, B, G * H, dtype=dtype), (torch.randn(G * H, H) * 0.3).to(dtype)
        h0 = torch.randn(B, H, dtype=dtype)
        if G == 4:
            y, c, _, h_n, c_n = forward(x, h0, h0.clone(), w, None, reverse, lengths, backend, resets)
            pairs = ((y, h_n), (c, c_n))
        else:
            y, _, h_n = forward(x, h0, w, None, reverse, lengths, backend, resets)
            pairs = ((y, h_n),)
        for steps_, final in pairs:
            assert final.dtype == dtype and final._base is None
            assert torch.equal(final, at_step(steps_, last))
            assert final.data_ptr() not in (t.data_ptr() for t in (x, h0, y, steps_))


def gated_forward(cell, T, B, H, P, dtype, steps, reverse, backend, save):
    """The cell's forward op on fresh random operands, with ``save``: ``(x_proj, outputs)``."""
    from fastrnn.gru import gru_forward
    from fastrnn.lstm import lstm_forward

    torch.manual_seed(0)
    G = 4 if cell == "lstm" else 3
    lengths = torch.tensor([T, 2, T - 2])[:B] if steps == "lengths" else None
    resets = torch.rand(T, B) < 0.3 if steps == "resets" else None
    x, w = torch.randn(T, B, G * H, dtype=dtype), (torch.randn(G * H, P) * 0.3).to(dtype)
    h0 = torch.randn(B, P, dtype=dtype)
    if cell == "lstm":
        w_hr = (torch.randn(P, H) * 0.3).to(dtype) if P != H else None
        return x, lstm_forward(x, h0, torch.randn(B, H, dtype=dtype), w, w_hr, reverse, lengths, backend, resets,
                               save=save)
    return x, gru_forward(x, h0, w, torch.randn(H, dtype=dtype), reverse, lengths, backend, resets, save=save)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("steps", ["whole", "lengths", "resets"])
@pytest.mark.parametrize("reverse", [False, True])
def test_an_inference_forward_returns_what_a_training_one_does(backend, dtype, steps, reverse, poison):
    """A gated forward op called with ``save=False`` (what a call that records no graph passes) returns
    the output and final states a saving call does, bit for bit, with ``c`` and the gates empty
    ``(0, B, .)``, and writes nothing where they would have gone (the kernels' stand-in pointer is
    x_proj's). The LSTM's fp16/bf16 c_n is then its carried state rounded to nearest, as a GPU stores
    c; the interpreter truncates what it stores, so there the two may differ by one unit in the last
    place."""
    T, B, H = 6, 3, 16
    for cell, P in (("lstm", H), ("lstm", 8), ("gru", H)):
        x, saved = gated_forward(cell, T, B, H, P, dtype, steps, reverse, backend, save=True)
        x_kept, (x_again, kept) = x.clone(), gated_forward(cell, T, B, H, P, dtype, steps, reverse, backend, False)
        assert torch.equal(x_again, x_kept)  # (the same operands; and none written through)
        for s, k in zip(saved, kept):
            if s.dim() == 3 and s is not saved[0]:  # c, the gates
                assert k.shape == (0, *s.shape[1:]) and k.dtype == s.dtype
            elif cell == "lstm" and s is saved[-1] and dtype == torch.bfloat16 and backend == "triton":
                ulp = s.float().abs().clamp_min(1e-30) * 2.0 ** -7
                assert ((k.float() - s.float()).abs() <= ulp).all() and not k.isnan().any()
            else:
                assert torch.equal(k, s), (cell, P)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_an_inference_forward_keeps_only_its_output_and_states(backend, cell):
    """Under no_grad a gated module's forward keeps what torch's inference forward keeps, the output and
    the final states, and nothing that only a backward reads (c and the gates, five and four times
    the output's size). The fused path makes no buffer larger than the output at all. Recording a
    graph, the same call keeps c and the gates (the measure sees them)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    T, B, I, H = 16, 4, 8, 32
    model, x = fastrnn.CELLS[cell].module(I, H), torch.randn(T, B, I)
    kept = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as run:
            y, _ = model(x)
        op = next(e for e in run.events() if e.name == f"fastrnn::{cell}_fwd")
        inside = [e.self_cpu_memory_usage for e in run.events() if e.self_cpu_memory_usage > 0
                  and op.time_range.start <= e.time_range.start and e.time_range.end <= op.time_range.end]
        kept[grad] = op.cpu_memory_usage
        if backend == "triton" and not grad:
            assert max(inside) <= y.nbytes
    states = 3 * B * H * 4 + 64  # (h_n, c_n, the CPU's grid barrier counter)
    assert y.nbytes <= kept[False] <= y.nbytes + states
    assert kept[True] >= y.nbytes * (6 if cell == "lstm" else 5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compiled_inference_forward_saves_nothing(cell):
    """Compiled, a gated module's forward calls its op with ``save=False`` where it records no graph,
    and saves as eager does where it records one (the graph is traced whole in both); the results
    are eager's."""
    torch.manual_seed(0)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append([n.kwargs.get("save", True) for n in gm.graph.nodes
                       if n.op == "call_function" and "fastrnn" in str(n.target)])
        return gm.forward

    model, x = fastrnn.CELLS[cell].module(4, 8), torch.randn(5, 3, 4)
    compiled = torch.compile(model, backend=keep_graph, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x), model(x)
    y, _ = compiled(x)
    y.sum().backward()
    assert graphs == [[False], [True]]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_graph_traced_or_exported_under_no_grad_still_trains(cell, monkeypatch):
    """A module traced (``torch.jit.trace``, ``make_fx``) or exported (``torch.export``, strict or not)
    under no_grad keeps a graph that may run with grad later: its op saves, as a call recording a
    graph does, and the graph trains as torch's module does."""
    from functools import partial

    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.setenv("FASTRNN_BACKEND", "torch")  # (the twins: torch's own module is not a custom op)
    torch.manual_seed(0)
    model, x = fastrnn.CELLS[cell].module(4, 8), torch.randn(5, 3, 4)
    theirs = fastrnn.CELLS[cell].torch_module(4, 8)
    theirs.load_state_dict(model.state_dict())
    want = torch.autograd.grad(theirs(x)[0].sum(), theirs.weight_hh_l0)[0]
    params = dict(model.named_parameters())
    with torch.no_grad():
        graphs = [torch.jit.trace(model, x, check_trace=False),
                  *(torch.export.export(model, (x,), strict=strict).module() for strict in (False, True)),
                  partial(make_fx(lambda p, x: torch.func.functional_call(model, p, (x,)))(params, x), params)]
    for graph in graphs:
        got = torch.autograd.grad(graph(x)[0].sum(), model.weight_hh_l0)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell,proj_size", [("rnn", 0), ("lstm", 0), ("lstm", 3), ("gru", 0)])
def test_compiled_for_dynamic_shapes_trains(backend, cell, proj_size):
    """Compiled for dynamic shapes (``dynamic=True``: T and B are symbols), a bidirectional module's
    forward and backward give eager's results at three lengths from one graph, the loss reading y and
    the final state (a final step is then a SymInt, neither taken for a tensor of steps nor fixed to
    its value: ``sequence.one_step``, ``at_step``)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    kwargs = dict(proj_size=proj_size) if proj_size else {}
    model = fastrnn.CELLS[cell].module(4, 8, bidirectional=True, **kwargs)
    graphs = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=graphs, dynamic=True, fullgraph=True)
    compiles = []  # the backend's calls after each length (a first compile may restart its analysis)
    for T, B in ((5, 2), (7, 3), (9, 2)):
        x = torch.randn(T, B, 4)
        results = []
        for run in (model, compiled):
            y, state = run(x)
            h_n = state[0] if isinstance(state, tuple) else state
            results.append((y, *torch.autograd.grad(y.sum() + (h_n * h_n).sum(), list(model.parameters()))))
        torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)
        compiles.append(graphs.frame_count)
    assert compiles[0] >= 1 and compiles[-1] == compiles[0]  # no graph for a new length


def test_a_forward_that_saves_nothing_cannot_be_differentiated():
    """The op called with ``save=False`` on an input that requires grad is a clear error, not a
    backward reading empty buffers."""
    from fastrnn.lstm import lstm_fwd_op

    x = torch.randn(4, 2, 12, requires_grad=True)
    with pytest.raises(RuntimeError, match="save=False"):
        lstm_fwd_op(x, None, None, torch.randn(12, 3), None, False, None, "torch", None, save=False)


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_compile_traces_no_cache_dynamo_warns_about(backend, cell):
    """What a module's call asks at every call and keeps (device types, weight names, whether triton
    imports) is kept in plain dicts: Dynamo warns at every ``functools`` cache it traces."""
    import warnings

    torch.manual_seed(0)
    model = fastrnn.CELLS[cell].module(4, 6, 2, bidirectional=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(model, fullgraph=True, backend="eager")(torch.randn(5, 2, 4))
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message)[:200] for w in caught]


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_a_call_on_fake_tensors_keeps_nothing_for_real_ones(cell, monkeypatch):
    """What a module keeps between calls (the GRU's bias mask per hidden size and device) is never made
    from fake tensors: a real call after a call under FakeTensorMode computes as a first call does."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("FASTRNN_BACKEND", "torch")  # (not torch's own module, which keeps nothing)
    torch.manual_seed(0)
    with FakeTensorMode():  # a module and input made fake, as torch.export and shape propagation do
        fastrnn.CELLS[cell].module(4, 6)(torch.randn(5, 3, 4))
    model, theirs = fastrnn.CELLS[cell].module(4, 6), fastrnn.CELLS[cell].torch_module(4, 6)
    theirs.load_state_dict(model.state_dict())
    x = torch.randn(5, 3, 4)
    y, _ = model(x)
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, theirs(x)[0], rtol=1e-5, atol=1e-6)
