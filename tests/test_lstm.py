"""The LSTM op (``fastrnn::lstm_fwd`` / ``lstm_bwd``) against the plain autograd loop, and the loop
against ``torch.nn.LSTM``.

Outputs y, h_n, c_n and every gradient (x_proj, h0, c0, w_hh, w_hr) on odd shapes and projection
sizes, in every dtype with its tolerance, reverse x lengths x h0 x c0, with every tensor the launchers
allocate poisoned with NaN first; float64 gradcheck; opcheck; fake and meta tensors; bitwise
repeatability; the public function's errors."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastrnn.lstm import lstm_bwd_op, lstm_fwd_op, lstm_recurrence, lstm_reference

from .conftest import DEVICE, TOL, assert_matches_reference, forward_backward, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")
BACKENDS = ["torch", "triton"]
PATHS = [("torch", None), ("triton", None), ("triton", "stepwise")]  # (backend, forced variant)
PATH_IDS = ["torch", "triton", "triton-stepwise"]
BOUND = {**TOL, torch.float64: 1e-9}
# (T, B, H, P): P is proj_size, 0 for none
SHAPES = [(1, 1, 1, 0), (2, 3, 16, 7), (63, 17, 130, 0), (63, 3, 100, 99), (2, 17, 1, 0),
          (1, 3, 130, 1), (63, 1, 16, 0), (17, 5, 33, 7)]
SHAPE_IDS = [f"T{t}-B{b}-H{h}-P{p}" for t, b, h, p in SHAPES]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
# The interpreter runs the fused kernels slowly: there the largest shape in float32 only.
CASES = [(backend, *shape, dtype) for backend in BACKENDS for shape in SHAPES for dtype in DTYPES
         if backend == "torch" or shape[0] * shape[1] * shape[2] < 10000 or dtype == torch.float32]
CASE_IDS = [f"{c[0]}-{'-'.join(map(str, c[1:-1]))}-{c[-1]}" for c in CASES]
FLAGS = list(itertools.product([False, True], repeat=4))  # reverse, lengths, h0, c0
FLAG_IDS = ["-".join(name for name, on in zip(("rev", "len", "h0", "c0"), f) if on) or "plain" for f in FLAGS]
NAMES = ["y", "h_n", "c_n", "dx_proj", "dh0", "dc0", "dw_hh", "dw_hr"]


def make_inputs(T, B, H, P, seed, lengths=False, h0=True, c0=True):
    """x_proj (T, B, 4H), h0 (B, P), c0 (B, H), w_hh (4H, P), w_hr (P, H) or None, lengths (B,)."""
    g = torch.Generator().manual_seed(seed)
    P_h = P or H  # the width of h
    x_proj = torch.randn(T, B, 4 * H, generator=g, dtype=torch.float64)
    w_hh = torch.randn(4 * H, P_h, generator=g, dtype=torch.float64) / P_h ** 0.5
    w_hr = torch.randn(P, H, generator=g, dtype=torch.float64) / H ** 0.5 if P else None
    h_0 = torch.randn(B, P_h, generator=g, dtype=torch.float64) if h0 else None
    c_0 = torch.randn(B, H, generator=g, dtype=torch.float64) if c0 else None
    lens = torch.randint(1, T + 1, (B,), generator=g) if lengths else None
    if lens is not None:
        lens[0] = T  # one sequence runs to the end
    return [x_proj, h_0, c_0, w_hh, w_hr], lens


def op(reverse, lengths, backend):
    """The custom op as a function of (x_proj, h0, c0, w_hh, w_hr) -> (y, h_n, c_n)."""
    lens = lengths.to(DEVICE) if lengths is not None else None

    def run(*inputs):
        y, _, _, h_n, c_n = lstm_fwd_op(*inputs, reverse, lens, backend)
        return y, h_n, c_n
    return run


def check_against_reference(T, B, H, P, dtype, reverse, lengths, h0=True, c0=True, seed=0,
                            backend="torch"):
    inputs, lens = make_inputs(T, B, H, P, seed, lengths, h0, c0)
    g = torch.Generator().manual_seed(seed + 1000)
    upstream = [torch.randn(T, B, P or H, generator=g, dtype=torch.float64),
                torch.randn(B, P or H, generator=g, dtype=torch.float64),
                torch.randn(B, H, generator=g, dtype=torch.float64)]

    def reference(*a):
        return lstm_reference(*a, reverse, lens)
    ref64 = forward_backward(reference, inputs, upstream, torch.float64)
    fused = forward_backward(op(reverse, lens, backend), inputs, upstream, dtype)
    ref_low = forward_backward(reference, inputs, upstream, dtype) if dtype != torch.float64 else None
    assert_matches_reference(NAMES, fused, ref64, ref_low, dtype, BOUND[dtype])


@pytest.mark.parametrize("backend,T,B,H,P,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("reverse,lengths", [(False, False), (True, True)], ids=["fwd-full", "rev-len"])
def test_op_matches_reference(backend, T, B, H, P, dtype, reverse, lengths, poison_all):
    check_against_reference(T, B, H, P, dtype, reverse, lengths, backend=backend)


@pytest.mark.parametrize("backend,variant", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("P", [0, 5])
@pytest.mark.parametrize("reverse,lengths,h0,c0", FLAGS, ids=FLAG_IDS)
def test_every_flag(backend, variant, P, reverse, lengths, h0, c0, poison_all, monkeypatch):
    """Every flag on every path: the kernels as they run by default (one launch) and stepwise, where
    each launch carries on from the state the one before stored (the first from c0 or zeros)."""
    if variant:
        monkeypatch.setenv("FASTRNN_VARIANT", variant)
    check_against_reference(9, 6, 11, P, torch.float64, reverse, lengths, h0, c0, seed=1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("P", [0, 2])
@pytest.mark.parametrize("reverse,lengths", [(False, False), (True, True)])
def test_gradcheck_float64(backend, P, reverse, lengths):
    inputs, lens = make_inputs(4, 3, 3, P, seed=2, lengths=lengths)
    leaves = [t.to(DEVICE).requires_grad_() for t in inputs if t is not None]
    assert torch.autograd.gradcheck(lambda *a: lstm_recurrence(*a, reverse=reverse, lengths=lens), leaves,
                                    fast_mode=backend == "triton")  # the interpreter is slow


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_launchers_write_every_element(backend, reverse, poison_all):
    """Through the ops to the launchers: every output written, zeros past each end, h_n and c_n the
    last valid states; without c0, dc0 is the zero initial state's gradient (as with c0 = 0 given)."""
    inputs, lens = make_inputs(6, 5, 9, 4, seed=3, lengths=True, c0=False)
    x_proj, h0, c0, w_hh, w_hr = (t.float().to(DEVICE) if t is not None else None for t in inputs)
    lens = lens.to(DEVICE)
    y, c, gates, h_n, c_n = lstm_fwd_op(x_proj.requires_grad_(), h0, c0, w_hh, w_hr, reverse, lens, backend)
    past_end = (torch.arange(6)[:, None] >= lens.cpu()[None, :]).to(DEVICE)  # (T, B)
    for out in (y, c, gates):
        assert not torch.isnan(out).any() and (out[past_end] == 0).all()
    last = (lens - 1) if not reverse else torch.zeros_like(lens)
    batch = torch.arange(5, device=DEVICE)
    assert torch.equal(h_n, y[last, batch]) and torch.equal(c_n, c[last, batch])
    upstream = [torch.randn_like(t) for t in (y, h_n, c_n)]
    d_gates, dc0 = lstm_bwd_op(*upstream, y.detach(), c, gates, h0, c0, w_hh, w_hr, reverse, lens, backend)
    assert not torch.isnan(d_gates).any() and (d_gates[past_end] == 0).all()
    assert d_gates.abs().sum() > 0 and not torch.isnan(dc0).any() and dc0.abs().sum() > 0
    _, dc0_of_zeros = lstm_bwd_op(*upstream, y.detach(), c, gates, h0, torch.zeros_like(c_n), w_hh, w_hr, reverse,
                                  lens, backend)
    assert torch.equal(dc0, dc0_of_zeros)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,P,reverse,lengths", [(torch.float32, 0, False, False),
                                                     (torch.float64, 2, True, True)],
                         ids=["fp32-plain", "fp64-proj-rev-len"])
def test_opcheck(backend, dtype, P, reverse, lengths):
    inputs, lens = make_inputs(4, 3, 5, P, seed=4, lengths=lengths)
    inputs = [t.to(DEVICE, dtype) if t is not None else None for t in inputs]
    lens = lens.to(DEVICE) if lens is not None else None
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    torch.library.opcheck(lstm_fwd_op, (*leaves, reverse, lens, backend))
    y, c, gates, h_n, c_n = lstm_fwd_op(*inputs, reverse, lens, backend)
    upstream = [torch.randn_like(t) for t in (y, h_n, c_n)]
    _, h0, c0, w_hh, w_hr = inputs
    torch.library.opcheck(lstm_bwd_op, (*upstream, y, c, gates, h0, c0, w_hh, w_hr, reverse, lens, backend))


def test_fake_and_meta_tensors_give_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run(device, lengths=None):
        x = torch.randn(3, 2, 4 * 6, dtype=torch.bfloat16, device=device)
        w_hh, w_hr = (torch.randn(s, dtype=torch.bfloat16, device=device) for s in ((24, 5), (5, 6)))
        return lstm_recurrence(x, None, None, w_hh, w_hr, lengths=lengths)
    with FakeTensorMode():
        fake = run("cpu")  # (host lengths are read, so only meta tensors take them)
    for outputs in (fake, run("meta"), run("meta", [3, 1])):
        assert [tuple(t.shape) for t in outputs] == [(3, 2, 5), (2, 5), (2, 6)]
        assert all(t.dtype == torch.bfloat16 for t in outputs)
    assert run("meta")[0].device.type == "meta"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_repeatable(backend):
    inputs, lens = make_inputs(7, 5, 20, 6, seed=5, lengths=True)
    upstream = [torch.ones(7, 5, 6, dtype=torch.float64), torch.ones(5, 6, dtype=torch.float64),
                torch.ones(5, 20, dtype=torch.float64)]
    runs = [forward_backward(op(True, lens, backend), inputs, upstream, torch.float32) for _ in range(2)]
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("proj_size", [0, 3])
@pytest.mark.parametrize("packed", [False, True])
def test_reference_matches_torch_lstm(proj_size, packed):
    """lstm_reference driven with a torch.nn.LSTM's weights, both directions of a bidirectional layer
    (with packed input: ragged, unsorted lengths), equals torch.nn.LSTM: outputs and every gradient."""
    torch.manual_seed(6)
    T, B, I, H = 7, 4, 5, 6
    P = proj_size or H
    lstm = nn.LSTM(I, H, proj_size=proj_size, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0, c0 = torch.randn(2, B, P, dtype=torch.float64), torch.randn(2, B, H, dtype=torch.float64)
    lens = torch.tensor([5, T, 1, 4]) if packed else None
    if packed:
        out, (h_n, c_n) = lstm(pack_padded_sequence(x, lens, enforce_sorted=False), (h0, c0))
        out = pad_packed_sequence(out, total_length=T)[0]
    else:
        out, (h_n, c_n) = lstm(x, (h0, c0))
    directions = []
    for d, sfx in enumerate(["_l0", "_l0_reverse"]):
        w = {name: getattr(lstm, name + sfx) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        x_proj = F.linear(x, w["weight_ih"], w["bias_ih"] + w["bias_hh"])  # (T, B, 4H)
        w_hr = getattr(lstm, "weight_hr" + sfx) if proj_size else None
        directions.append(lstm_reference(x_proj, h0[d], c0[d], w["weight_hh"], w_hr, d == 1, lens))
    ys, hs, cs = zip(*directions)
    ours = [torch.cat(ys, -1), torch.stack(hs), torch.stack(cs)]
    theirs = [out, h_n, c_n]
    upstream = [torch.randn_like(t) for t in theirs]
    leaves = [x, *lstm.parameters()]
    for a, b in zip(torch.autograd.grad(ours, leaves, upstream) + tuple(ours),
                    torch.autograd.grad(theirs, leaves, upstream) + tuple(theirs)):
        assert rel_err(a, b) <= 1e-9


def test_public_function_reads_host_lengths_and_empty_inputs():
    inputs, lens = make_inputs(5, 3, 4, 0, seed=7, lengths=True)
    want = lstm_reference(*inputs, True, lens)
    got = lstm_recurrence(*inputs, reverse=True, lengths=lens.tolist())
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12
    x, h0, c0, w_hh, _ = make_inputs(0, 3, 4, 0, seed=7)[0]
    y, h_n, c_n = lstm_recurrence(x, h0, c0, w_hh)
    assert y.shape == (0, 3, 4) and torch.equal(h_n, h0) and torch.equal(c_n, c0)
    y, h_n, c_n = lstm_recurrence(torch.randn(5, 0, 16), None, None, torch.randn(16, 4))
    assert y.shape == (5, 0, 4) and h_n.shape == (0, 4) and c_n.shape == (0, 4)


def test_launcher_final_states_without_steps_and_past_unchecked_lengths(poison_all):
    """The forward launcher's ``h_n`` and final cell state: a walk with no step returns h0 and c0
    copied (zeros where absent); lengths outside [1, T] (a GPU's are not checked) are clamped into
    [0, T], so no access leaves the buffers (the interpreter checks every one) and each row's h_n is
    written: y at the step its walk takes last (step 0 for a length of 0, where y is zero)."""
    from fastrnn.kernels import lstm_fwd
    inputs, _ = make_inputs(4, 3, 16, 0, seed=5)
    x_proj, h0, c0, w_hh, _ = (t.float().to(DEVICE) if t is not None else None for t in inputs)
    _, _, _, h_n, c_state = lstm_fwd(x_proj[:0], h0, c0, w_hh)
    assert torch.equal(h_n, h0) and torch.equal(c_state, c0) and h_n.data_ptr() != h0.data_ptr()
    _, _, _, h_n, c_state = lstm_fwd(x_proj[:0], None, None, w_hh)
    assert (h_n == 0).all() and (c_state == 0).all()
    lens = torch.tensor([0, 6, 2], device=DEVICE)
    for reverse in (False, True):
        y, c, _, h_n, c_state = lstm_fwd(x_proj, h0, c0, w_hh, None, reverse, lens)
        assert torch.equal(y, lstm_fwd(x_proj, h0, c0, w_hh, None, reverse, lens.clamp(0, 4))[0])
        last = torch.zeros(3, dtype=torch.int64) if reverse else torch.tensor([0, 3, 1])
        assert torch.equal(h_n, y[last.to(DEVICE), torch.arange(3, device=DEVICE)])
        assert (y[:, 0] == 0).all() and torch.equal(c_state[0], c0[0])  # a length of 0: no step


def valid_arguments():
    """Arguments lstm_recurrence takes: H = 4, no projection."""
    return dict(x_proj=torch.randn(3, 2, 16), h0=None, c0=None, w_hh=torch.randn(16, 4), w_hr=None,
                lengths=None)


BAD = {  # what is wrong: (the arguments changed, the error, what its message names)
    "x_proj 2-D": (dict(x_proj=torch.randn(3, 16)), ValueError, "3-D"),
    "x_proj not 4H": (dict(x_proj=torch.randn(3, 2, 15)), ValueError, "4 \\* hidden_size"),
    "w_hh shape": (dict(w_hh=torch.randn(16, 5)), RuntimeError, "w_hh must be \\(16, 4\\)"),
    "w_hh not (4H, P)": (dict(w_hr=torch.randn(2, 4)), RuntimeError, "w_hh must be \\(16, 2\\)"),
    "w_hr shape": (dict(w_hh=torch.randn(16, 2), w_hr=torch.randn(2, 5)), RuntimeError, "w_hr must be"),
    "h0 shape": (dict(h0=torch.randn(2, 3)), RuntimeError, "hidden\\[0\\] size \\(2, 4\\)"),
    "c0 shape": (dict(c0=torch.randn(3, 4)), RuntimeError, "hidden\\[1\\] size \\(2, 4\\)"),
    "c0 dtype": (dict(c0=torch.randn(2, 4, dtype=torch.float64)), RuntimeError, "c0 dtype"),
    "w_hr dtype": (dict(w_hh=torch.randn(16, 2), w_hr=torch.randn(2, 4, dtype=torch.float64)), RuntimeError,
                   "w_hr dtype"),
    "h0 device": (dict(h0=torch.randn(2, 4, device="meta")), RuntimeError, "h0 tensors are not at the same"),
    "lengths shape": (dict(lengths=torch.tensor([3])), ValueError, "lengths must have shape"),
    "lengths past T": (dict(lengths=torch.tensor([4, 1])), ValueError, "lie in \\[1, 3\\]"),
    "lengths zero": (dict(lengths=[3, 0]), ValueError, "lie in \\[1, 3\\]"),
    "lengths device": (dict(lengths=torch.tensor([3, 1], device="meta")), RuntimeError, "lengths must be on"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_public_function_errors(case):
    changes, error, match = BAD[case]
    lstm_recurrence(**valid_arguments())  # the error comes from the change alone
    with pytest.raises(error, match=match):
        lstm_recurrence(**{**valid_arguments(), **changes})


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's tensor-size limit")
def test_interpreter_float64_past_the_resident_block():
    """H = 513: all gates' w_hh block (4 x 1024 x 1024) is past the interpreter's 2^20 elements, so
    the fused kernels stream w_hh in K chunks there; float64 against the loop."""
    check_against_reference(2, 2, 513, 0, torch.float64, True, True, backend="triton")
