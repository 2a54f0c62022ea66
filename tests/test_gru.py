"""The GRU op (``fastrnn::gru_fwd`` / ``gru_bwd``) against the plain autograd loop, and the loop
against ``torch.nn.GRU``.

Outputs y, h_n and every gradient (x_proj, h0, w_hh, b_hn) on odd shapes, in every dtype with its
tolerance, reverse x lengths x h0 x b_hn, with every tensor the launchers allocate poisoned with NaN
first; float64 gradcheck; opcheck; fake and meta tensors; bitwise repeatability; the public
function's errors."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastrnn.gru import gru_bwd_op, gru_fwd_op, gru_recurrence, gru_reference

from .conftest import DEVICE, TOL, assert_matches_reference, forward_backward, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = ["torch", "triton"]
PATHS = [("torch", None), ("triton", None), ("triton", "stepwise")]  # (backend, forced variant)
PATH_IDS = ["torch", "triton", "triton-stepwise"]
BOUND = {**TOL, torch.float64: 1e-9}
SHAPES = [(1, 1, 1), (2, 3, 16), (63, 17, 130), (63, 3, 100), (2, 17, 1), (1, 3, 130), (63, 1, 16),
          (17, 5, 33)]
SHAPE_IDS = [f"T{t}-B{b}-H{h}" for t, b, h in SHAPES]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# The interpreter runs the fused kernels slowly: there the largest shape in float32 only.
CASES = [(backend, *shape, dtype) for backend in BACKENDS for shape in SHAPES for dtype in DTYPES
         if backend == "torch" or shape[0] * shape[1] * shape[2] < 10000 or dtype == torch.float32]
CASE_IDS = [f"{c[0]}-{'-'.join(map(str, c[1:-1]))}-{c[-1]}" for c in CASES]
FLAGS = list(itertools.product([False, True], repeat=4))  # reverse, lengths, h0, b_hn
FLAG_IDS = ["-".join(name for name, on in zip(("rev", "len", "h0", "b_hn"), f) if on) or "plain"
            for f in FLAGS]
NAMES = ["y", "h_n", "dx_proj", "dh0", "dw_hh", "db_hn"]


def make_inputs(T, B, H, seed, lengths=False, h0=True, b_hn=True):
    """x_proj (T, B, 3H), h0 (B, H), w_hh (3H, H), b_hn (H,) or None, lengths (B,) or None."""
    g = torch.Generator().manual_seed(seed)
    x_proj = torch.randn(T, B, 3 * H, generator=g, dtype=torch.float64)
    w_hh = torch.randn(3 * H, H, generator=g, dtype=torch.float64) / H ** 0.5
    h_0 = torch.randn(B, H, generator=g, dtype=torch.float64) if h0 else None
    b = torch.randn(H, generator=g, dtype=torch.float64) if b_hn else None
    lens = torch.randint(1, T + 1, (B,), generator=g) if lengths else None
    if lens is not None:
        lens[0] = T  # one sequence runs to the end
    return [x_proj, h_0, w_hh, b], lens


def op(reverse, lengths, backend):
    """The custom op as a function of (x_proj, h0, w_hh, b_hn) -> (y, h_n)."""
    lens = lengths.to(DEVICE) if lengths is not None else None

    def run(*inputs):
        y, _, h_n = gru_fwd_op(*inputs, reverse, lens, backend)
        return y, h_n
    return run


def check_against_reference(T, B, H, dtype, reverse, lengths, h0=True, b_hn=True, seed=0, backend="torch"):
    inputs, lens = make_inputs(T, B, H, seed, lengths, h0, b_hn)
    g = torch.Generator().manual_seed(seed + 1000)
    upstream = [torch.randn(T, B, H, generator=g, dtype=torch.float64),
                torch.randn(B, H, generator=g, dtype=torch.float64)]

    def reference(*a):
        return gru_reference(*a, reverse, lens)
    ref64 = forward_backward(reference, inputs, upstream, torch.float64)
    fused = forward_backward(op(reverse, lens, backend), inputs, upstream, dtype)
    ref_low = forward_backward(reference, inputs, upstream, dtype) if dtype != torch.float64 else None
    assert_matches_reference(NAMES, fused, ref64, ref_low, dtype, BOUND[dtype])


@pytest.mark.parametrize("backend,T,B,H,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("reverse,lengths", [(False, False), (True, True)], ids=["fwd-full", "rev-len"])
def test_op_matches_reference(backend, T, B, H, dtype, reverse, lengths, poison_all):
    check_against_reference(T, B, H, dtype, reverse, lengths, backend=backend)


@pytest.mark.parametrize("backend,variant", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("reverse,lengths,h0,b_hn", FLAGS, ids=FLAG_IDS)
def test_every_flag(backend, variant, reverse, lengths, h0, b_hn, poison_all, monkeypatch):
    """Every flag on every path: the kernels as they run by default (one launch) and stepwise, where
    each launch carries on from the state the one before stored (the first from h0 or zeros)."""
    if variant:
        monkeypatch.setenv("FASTRNN_VARIANT", variant)
    check_against_reference(9, 6, 11, torch.float64, reverse, lengths, h0, b_hn, seed=1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("reverse,lengths", [(False, False), (True, True)])
def test_gradcheck_float64(backend, reverse, lengths):
    inputs, lens = make_inputs(4, 3, 3, seed=2, lengths=lengths)
    leaves = [t.to(DEVICE).requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: gru_recurrence(*a, reverse=reverse, lengths=lens), leaves,
                                    fast_mode=backend == "triton")  # the interpreter is slow


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_launchers_write_every_element(backend, reverse, poison_all):
    """Through the ops to the launchers: every output written, zeros past each end, h_n the last
    valid state; gates are not differentiable."""
    inputs, lens = make_inputs(6, 5, 9, seed=3, lengths=True)
    x_proj, h0, w_hh, b_hn = (t.float().to(DEVICE) for t in inputs)
    lens = lens.to(DEVICE)
    y, gates, h_n = gru_fwd_op(x_proj.requires_grad_(), h0, w_hh, b_hn, reverse, lens, backend)
    past_end = (torch.arange(6)[:, None] >= lens.cpu()[None, :]).to(DEVICE)  # (T, B)
    for out in (y, gates):
        assert not torch.isnan(out).any() and (out[past_end] == 0).all()
    last = (lens - 1) if not reverse else torch.zeros_like(lens)
    assert torch.equal(h_n, y[last, torch.arange(5, device=DEVICE)])
    d_x, dh0_local = gru_bwd_op(torch.randn_like(y), torch.randn_like(h_n), y.detach(), gates, h0, w_hh,
                                reverse, lens, backend)
    assert not torch.isnan(d_x).any() and (d_x[past_end] == 0).all() and d_x.abs().sum() > 0
    assert not torch.isnan(dh0_local).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,b_hn,reverse,lengths", [(torch.float32, False, False, False),
                                                        (torch.float64, True, True, True)],
                         ids=["fp32-plain", "fp64-b_hn-rev-len"])
def test_opcheck(backend, dtype, b_hn, reverse, lengths):
    inputs, lens = make_inputs(4, 3, 5, seed=4, lengths=lengths, b_hn=b_hn)
    inputs = [t.to(DEVICE, dtype) if t is not None else None for t in inputs]
    lens = lens.to(DEVICE) if lens is not None else None
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    torch.library.opcheck(gru_fwd_op, (*leaves, reverse, lens, backend))
    y, gates, h_n = gru_fwd_op(*inputs, reverse, lens, backend)
    _, h0, w_hh, _ = inputs
    upstream = [torch.randn_like(t) for t in (y, h_n)]
    torch.library.opcheck(gru_bwd_op, (*upstream, y, gates, h0, w_hh, reverse, lens, backend))


def test_fake_and_meta_tensors_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(device, lengths=None):
        x = torch.randn(3, 2, 3 * 6, dtype=torch.bfloat16, device=device)
        w_hh, b_hn = (torch.randn(s, dtype=torch.bfloat16, device=device) for s in ((18, 6), (6,)))
        return gru_recurrence(x, None, w_hh, b_hn, lengths=lengths)
    with FakeTensorMode():
        fake = run("cpu")  # (host lengths are read, so only meta tensors take them)
    for outputs in (fake, run("meta"), run("meta", [3, 1])):
        assert [tuple(t.shape) for t in outputs] == [(3, 2, 6), (2, 6)]
        assert all(t.dtype == torch.bfloat16 for t in outputs)
    assert run("meta")[0].device.type == "meta"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_repeatable(backend):
    inputs, lens = make_inputs(7, 5, 20, seed=5, lengths=True)
    upstream = [torch.ones(7, 5, 20, dtype=torch.float64), torch.ones(5, 20, dtype=torch.float64)]
    runs = [forward_backward(op(True, lens, backend), inputs, upstream, torch.float32) for _ in range(2)]
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("packed", [False, True])
def test_reference_matches_torch_gru(packed):
    """gru_reference driven with a torch.nn.GRU's weights (b_hr, b_hz folded into x_proj, b_hn on its
    own), both directions of a bidirectional layer (with packed input: ragged, unsorted lengths),
    equals torch.nn.GRU: outputs and every gradient."""
    torch.manual_seed(6)
    T, B, I, H = 7, 4, 5, 6
    gru = nn.GRU(I, H, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, B, H, dtype=torch.float64)
    lens = torch.tensor([5, T, 1, 4]) if packed else None
    if packed:
        out, h_n = gru(pack_padded_sequence(x, lens, enforce_sorted=False), h0)
        out = pad_packed_sequence(out, total_length=T)[0]
    else:
        out, h_n = gru(x, h0)
    directions = []
    for d, sfx in enumerate(["_l0", "_l0_reverse"]):
        w = {name: getattr(gru, name + sfx) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        b_rz0 = torch.cat((w["bias_hh"][:2 * H], w["bias_hh"].new_zeros(H)))  # (b_hr, b_hz, 0)
        x_proj = F.linear(x, w["weight_ih"], w["bias_ih"] + b_rz0)  # (T, B, 3H)
        directions.append(gru_reference(x_proj, h0[d], w["weight_hh"], w["bias_hh"][2 * H:], d == 1, lens))
    ys, hs = zip(*directions)
    ours, theirs = [torch.cat(ys, -1), torch.stack(hs)], [out, h_n]
    upstream = [torch.randn_like(t) for t in theirs]
    leaves = [x, *gru.parameters()]
    for a, b in zip(torch.autograd.grad(ours, leaves, upstream) + tuple(ours),
                    torch.autograd.grad(theirs, leaves, upstream) + tuple(theirs)):
        assert rel_err(a, b) <= 1e-9


def test_public_function_reads_host_lengths_and_empty_inputs():
    inputs, lens = make_inputs(5, 3, 4, seed=7, lengths=True)
    want = gru_reference(*inputs, True, lens)
    got = gru_recurrence(*inputs, reverse=True, lengths=lens.tolist())
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12
    x, h0, w_hh, b_hn = make_inputs(0, 3, 4, seed=7)[0]
    y, h_n = gru_recurrence(x, h0, w_hh, b_hn)
    assert y.shape == (0, 3, 4) and torch.equal(h_n, h0)
    y, h_n = gru_recurrence(torch.randn(5, 0, 12), None, torch.randn(12, 4))
    assert y.shape == (5, 0, 4) and h_n.shape == (0, 4)


def valid_arguments():
    """Arguments gru_recurrence takes: H = 4."""
    return dict(x_proj=torch.randn(3, 2, 12), h0=None, w_hh=torch.randn(12, 4), b_hn=None, lengths=None)


BAD = {  # what is wrong: (the arguments changed, the error, what its message names)
    "x_proj 2-D": (dict(x_proj=torch.randn(3, 12)), ValueError, "3-D"),
    "x_proj not 3H": (dict(x_proj=torch.randn(3, 2, 13)), ValueError, "3 \\* hidden_size"),
    "w_hh shape": (dict(w_hh=torch.randn(12, 5)), RuntimeError, "w_hh must be \\(12, 4\\)"),
    "b_hn shape": (dict(b_hn=torch.randn(12)), RuntimeError, "b_hn must be \\(4,\\)"),
    "h0 shape": (dict(h0=torch.randn(3, 4)), RuntimeError, "hidden size \\(2, 4\\)"),
    "b_hn dtype": (dict(b_hn=torch.randn(4, dtype=torch.float64)), RuntimeError, "b_hn dtype"),
    "w_hh dtype": (dict(w_hh=torch.randn(12, 4, dtype=torch.float64)), RuntimeError, "w_hh dtype"),
    "h0 device": (dict(h0=torch.randn(2, 4, device="meta")), RuntimeError, "h0 tensors are not at the same"),
    "lengths shape": (dict(lengths=torch.tensor([3])), ValueError, "lengths must have shape"),
    "lengths past T": (dict(lengths=torch.tensor([4, 1])), ValueError, "lie in \\[1, 3\\]"),
    "lengths device": (dict(lengths=torch.tensor([3, 1], device="meta")), RuntimeError, "lengths must be on"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_public_function_errors(case):
    changes, error, match = BAD[case]
    gru_recurrence(**valid_arguments())  # the error comes from the change alone
    with pytest.raises(error, match=match):
        gru_recurrence(**{**valid_arguments(), **changes})


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's tensor-size limit")
def test_interpreter_float64_past_the_resident_block():
    """H = 600: all gates' w_hh block (3 x 1024 x 1024) is past the interpreter's 2^20 elements, so
    the fused kernels stream w_hh in K chunks there; float64 against the loop."""
    check_against_reference(2, 2, 600, torch.float64, True, True, backend="triton")
