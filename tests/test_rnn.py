"""fastrnn.RNN against torch.nn.RNN: construction, parameters, forward, gradients, errors.

The parity tests run on both paths: ``torch`` (the plain loop) and ``triton`` (the fused kernels,
under the interpreter when there is no GPU)."""

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence, pad_packed_sequence

from fastrnn import RNN

from .conftest import rel_err

BOTH = pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
F64 = torch.float64


def pair(*args, dtype=F64, seed=0, **kwargs):
    """A torch.nn.RNN and a fastrnn.RNN with the same weights."""
    torch.manual_seed(seed)
    ref = nn.RNN(*args, dtype=dtype, **kwargs)
    ours = RNN(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def run_both(ref, ours, x, hx=None):
    """Outputs, h_n and gradients of every input and parameter, for both modules."""
    results = []
    for mod in (ref, ours):
        inputs = [t for t in (x, hx) if isinstance(t, torch.Tensor) and t.requires_grad]
        y, h_n = mod(x, hx)
        y_data = y.data if hasattr(y, "batch_sizes") else y
        loss = (y_data.sin() * 1.7).sum() + (h_n * h_n).sum()
        grads = torch.autograd.grad(loss, inputs + list(mod.parameters()))
        results.append((y, h_n, grads))
    return results


@BOTH
@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional,nonlinearity",
                         list(itertools.product([1, 2], [True, False], [False, True], [False, True],
                                                ["tanh", "relu"])))
def test_matches_torch_float64(backend, num_layers, bias, batch_first, bidirectional, nonlinearity):
    ref, ours = pair(5, 7, num_layers, nonlinearity=nonlinearity, bias=bias, batch_first=batch_first,
                     bidirectional=bidirectional)
    shape = (3, 6, 5) if batch_first else (6, 3, 5)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    h0 = torch.randn(num_layers * (2 if bidirectional else 1), 3, 7, dtype=F64, requires_grad=True)
    (y1, h1, g1), (y2, h2, g2) = run_both(ref, ours, x, h0)
    assert y2.shape == y1.shape and h2.shape == h1.shape and y2.dtype == F64
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h2, h1, rtol=1e-9, atol=1e-9)
    assert len(g1) == len(g2)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@BOTH
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence(backend, bidirectional, enforce_sorted):
    ref, ours = pair(4, 6, 2, bidirectional=bidirectional)
    lengths = torch.tensor([5, 3, 3, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 4])
    x = torch.randn(5, 4, 4, dtype=F64, requires_grad=True)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    h0 = torch.randn(2 * (2 if bidirectional else 1), 4, 6, dtype=F64, requires_grad=True)
    (y1, h1, g1), (y2, h2, g2) = run_both(ref, ours, packed, h0)
    assert isinstance(y2, type(y1))
    assert torch.equal(y2.batch_sizes, y1.batch_sizes)
    for name in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(y2, name), getattr(y1, name)
        assert (a is None and b is None) or torch.equal(a, b)
    torch.testing.assert_close(y2.data, y1.data, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h2, h1, rtol=1e-9, atol=1e-9)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    padded, lens = pad_packed_sequence(y2)
    assert torch.equal(lens, lengths)


@BOTH
def test_packed_without_hx_and_from_pack_sequence(backend):
    ref, ours = pair(3, 4)
    seqs = [torch.randn(n, 3, dtype=F64) for n in (4, 1, 3)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    (y1, h1), (y2, h2) = ref(packed), ours(packed)
    torch.testing.assert_close(y2.data, y1.data, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h2, h1, rtol=1e-9, atol=1e-9)


@BOTH
@pytest.mark.parametrize("batch_first", [False, True])
def test_unbatched_input(backend, batch_first):
    ref, ours = pair(3, 5, 2, batch_first=batch_first, bidirectional=True)
    x = torch.randn(7, 3, dtype=F64)
    h0 = torch.randn(4, 5, dtype=F64)
    for args in ((x,), (x, h0)):
        (y1, h1), (y2, h2) = ref(*args), ours(*args)
        assert y2.shape == y1.shape == (7, 10) and h2.shape == h1.shape == (4, 5)
        torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(h2, h1, rtol=1e-9, atol=1e-9)


@BOTH
def test_gradcheck_float64(backend):
    torch.manual_seed(5)
    ours = RNN(3, 4, 2, bidirectional=True, dtype=F64)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=F64, requires_grad=True)
    params = list(ours.parameters())

    def f(x, h0, *weights):
        named = dict(zip([n for n, _ in ours.named_parameters()], weights))
        y, h_n = torch.func.functional_call(ours, named, (x, h0))
        return y, h_n

    # through the interpreter, gradcheck's fast mode (a random projection of the Jacobian: a few
    # evaluations instead of one per input element); every gradient of the fused path equals torch's
    # at 1e-9 in test_matches_torch_float64, and the fused op gets the full check in test_elman
    assert torch.autograd.gradcheck(f, (x, h0, *[p.detach().requires_grad_() for p in params]),
                                    fast_mode=backend == "triton")


@BOTH
def test_float32_close_to_float64(backend):
    ref64, _ = pair(16, 32, 2)
    ours32 = RNN(16, 32, 2)
    ours32.load_state_dict({k: v.float() for k, v in ref64.state_dict().items()})
    x = torch.randn(20, 5, 16, dtype=F64)
    y64, h64 = ref64(x)
    y32, h32 = ours32(x.float())
    assert y32.dtype == torch.float32
    assert rel_err(y32, y64) < 1e-5 and rel_err(h32, h64) < 1e-5


@BOTH
def test_dropout_between_layers_in_training_only(backend):
    torch.manual_seed(0)
    ours = RNN(4, 8, 3, dropout=0.5, dtype=F64)
    ref = nn.RNN(4, 8, 3, dropout=0.5, dtype=F64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 4, dtype=F64)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-9, atol=1e-9)
    ours.train()
    a, b = ours(x)[0], ours(x)[0]
    assert not torch.allclose(a, b)  # two dropout masks
    # the first layer's input is never dropped: a 1-layer model with dropout is deterministic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = RNN(4, 8, 1, dropout=0.5, dtype=F64).train()
    torch.testing.assert_close(one(x)[0], one(x)[0])


@BOTH
def test_zero_batch(backend):
    ref, ours = pair(3, 4, 2)
    x = torch.randn(5, 0, 3, dtype=F64)
    (y1, h1), (y2, h2) = ref(x), ours(x)
    assert y2.shape == y1.shape and h2.shape == h1.shape


def test_constructor_signature_parameters_and_init():
    torch.manual_seed(0)
    ours = RNN(10, 20, num_layers=2, bidirectional=True, bias=True)
    ref = nn.RNN(10, 20, num_layers=2, bidirectional=True, bias=True)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert p.shape == q.shape and p.dtype == q.dtype, n
    values = torch.cat([p.detach().flatten() for p in ours.parameters()])
    bound = 1 / 20 ** 0.5  # uniform(-1/sqrt(H), 1/sqrt(H)) for every parameter
    assert values.abs().max() <= bound and values.abs().max() > 0.98 * bound
    assert abs(values.std().item() - bound / 3 ** 0.5) < 0.05 * bound
    assert repr(ours).replace("RNN", "X") == repr(ref).replace("RNN", "X")
    assert RNN(3, 4, bias=False).bias is False and len(list(RNN(3, 4, bias=False).parameters())) == 2
    positional = RNN(3, 4, 2, "relu", False, True, 0.0, True)
    assert (positional.nonlinearity, positional.bias, positional.batch_first, positional.bidirectional) \
        == ("relu", False, True, True)
    assert RNN(3, 4, dtype=torch.float64).weight_hh_l0.dtype == torch.float64
    ours.flatten_parameters()


def test_state_dict_round_trips_both_ways():
    ref = nn.RNN(3, 5, 2, bidirectional=True)
    ours = RNN(3, 5, 2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    ref2 = nn.RNN(3, 5, 2, bidirectional=True)
    ref2.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(ref2.state_dict()[k], v)


CONSTRUCTOR_ERRORS = [
    (dict(dropout=1.5), ValueError), (dict(dropout=-0.1), ValueError), (dict(num_layers=0), ValueError),
    (dict(hidden_size=0), ValueError), (dict(input_size=0), ValueError),
    (dict(nonlinearity="gelu"), ValueError), (dict(bias=1), TypeError), (dict(proj_size=2), ValueError),
    (dict(hidden_size=2.5), TypeError), (dict(input_size=-1), ValueError), (dict(num_layers=1.0), TypeError),
]


@pytest.mark.parametrize("kwargs,exc", CONSTRUCTOR_ERRORS, ids=[str(k) for k, _ in CONSTRUCTOR_ERRORS])
def test_constructor_errors_match_torch(kwargs, exc):
    args = dict(input_size=4, hidden_size=3)
    args.update(kwargs)
    with pytest.raises(exc) as theirs:
        nn.RNN(**args)
    with pytest.raises(exc) as mine:
        RNN(**args)
    assert str(mine.value) == str(theirs.value)


@pytest.mark.parametrize("args,kwargs", [
    ((3, 4, 1, "tanh", True, False, 0.0, False, 0), {}),  # the ninth positional is proj_size
    ((3, 4, 2, "relu", False, True, 0.5, True), dict(dtype=F64)),
    ((3, 4), dict(num_layers=2, nonlinearity="relu", device="cpu", dtype=F64)),
    ((3, 4, 1, "tanh", True, False, 0.0, False, 0, "cpu", F64), {}),
])
def test_constructor_accepts_what_torch_accepts(args, kwargs):
    torch.manual_seed(0)
    ref = nn.RNN(*args, **kwargs)
    torch.manual_seed(0)
    ours = RNN(*args, **kwargs)
    assert ours.nonlinearity == ref.nonlinearity and ours.mode == ref.mode
    for (n1, a), (n2, b) in zip(ref.named_parameters(), ours.named_parameters(), strict=True):
        assert n1 == n2 and a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("args,kwargs", [
    ((3, 4), dict(bogus=1)), ((3, 4), dict(proj_size=0)), ((3, 4), dict(proj_size=2)),
    ((3, 4, 1, "gelu"), {}), ((3, 4, 1, "tanh", True, False, 0.0, False, 0, "cpu", F64, 7), {}),
    ((3,), {}), ((3, 4), dict(input_size=3)),
])
def test_constructor_refuses_what_torch_refuses(args, kwargs):
    with pytest.raises(Exception) as theirs:
        nn.RNN(*args, **kwargs)
    with pytest.raises(theirs.type) as mine:
        RNN(*args, **kwargs)
    assert str(mine.value).replace("fastrnn", "") == str(theirs.value).replace("torch.nn", "")


def test_dropout_warning_for_one_layer():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        RNN(3, 4, dropout=0.2)


FORWARD_ERRORS = {
    "rank 4": (lambda: (torch.randn(5, 2, 4, 1),), ValueError, "2D or 3D"),
    "rank 1": (lambda: (torch.randn(4),), ValueError, "2D or 3D"),
    "feature size": (lambda: (torch.randn(5, 2, 5),), RuntimeError, "input_size"),
    "h0 shape": (lambda: (torch.randn(5, 2, 4), torch.zeros(2, 3, 3)), RuntimeError, "hidden size"),
    "h0 rank batched": (lambda: (torch.randn(5, 2, 4), torch.zeros(2, 3)), RuntimeError, "3-D"),
    "h0 rank unbatched": (lambda: (torch.randn(5, 4), torch.zeros(2, 1, 3)), RuntimeError, "2-D"),
    "input dtype": (lambda: (torch.randn(5, 2, 4, dtype=F64),), ValueError, "dtype"),
    "integer input": (lambda: (torch.randint(0, 3, (5, 2, 4)),), ValueError, "dtype"),
    "h0 dtype": (lambda: (torch.randn(5, 2, 4), torch.zeros(2, 2, 3, dtype=F64)), RuntimeError, "dtype"),
    "h0 device": (lambda: (torch.randn(5, 2, 4), torch.zeros(2, 2, 3, device="meta")), RuntimeError,
                  "device"),
    "zero steps": (lambda: (torch.randn(0, 2, 4),), RuntimeError, "sequence length"),
    "input device": (lambda: (torch.randn(5, 2, 4, device="meta"),), RuntimeError, "parameter tensor at cpu"),
}


@BOTH
@pytest.mark.parametrize("case", list(FORWARD_ERRORS))
def test_forward_errors_match_torch(backend, case):
    make, exc, words = FORWARD_ERRORS[case]
    torch.manual_seed(0)
    ref, ours = nn.RNN(4, 3, 2), RNN(4, 3, 2)
    if case != "h0 device":  # torch.nn.RNN itself fails on meta in another way
        with pytest.raises(exc) as theirs:
            ref(*make())
    with pytest.raises(exc, match=words) as mine:
        ours(*make())
    if case not in ("h0 device", "h0 dtype"):  # (torch's kernels word those: ours names the state)
        assert str(mine.value) == str(theirs.value)  # torch's own words, exactly


@BOTH
def test_packed_with_bad_hx_batch(backend):
    ours = RNN(4, 3, 2)
    packed = pack_padded_sequence(torch.randn(5, 3, 4), torch.tensor([5, 2, 3]), enforce_sorted=False)
    with pytest.raises(RuntimeError):
        ours(packed, torch.zeros(2, 2, 3))
    with pytest.raises(RuntimeError, match="hidden size"):
        ours(packed, torch.zeros(2, 3))


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="FASTRNN_BACKEND"):
        RNN(2, 3)(torch.randn(3, 1, 2))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        RNN(2, 3)(torch.randn(3, 1, 2))


@pytest.mark.parametrize("name", ["FASTRNN_BACKEND", "FASTRNN_VARIANT", "TRITON_INTERPRET", "FASTRNN_NOT_READ"])
def test_the_environment_is_read_as_os_environ_gives_it(monkeypatch, name):
    """``backend.environ`` (the names fastrnn reads at every call encoded once, any other through
    ``os.environ.get``) reads what ``os.environ.get`` does, set, empty or unset, changed between calls;
    also where ``os.environ`` is not CPython's mapping."""
    import os

    from fastrnn.backend import environ

    for value in ("triton", "", "Torch ", None):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
        assert environ(name, "default") == os.environ.get(name, "default")
    monkeypatch.setattr(os, "environ", {name: "stepwise"})
    assert environ(name) == "stepwise" and environ("FASTRNN_UNSET", "x") == "x"


def test_auto_backend_on_cpu_is_torch(monkeypatch):
    from fastrnn.backend import get_backend

    monkeypatch.delenv("FASTRNN_BACKEND", raising=False)
    assert get_backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    assert get_backend(torch.device("cpu")) == "triton"
