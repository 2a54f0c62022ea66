"""Memory safety of the fused kernels: every access inside its buffers, every buffer read with its
own strides. Under the interpreter every load and store is checked against the launch's buffers
(``FASTRNN_CHECK_BOUNDS=1``, set by conftest; fastrnn/kernels/bounds.py), so an out-of-bounds access
is an IndexError here instead of a corrupted heap (and, on a GPU, another allocation overwritten)."""

import os

import pytest
import torch

import fastrnn
from fastrnn.elman import elman_bwd_torch, elman_fwd_torch
from fastrnn.gru import gru_bwd_torch, gru_fwd_torch
from fastrnn.kernels import Config, elman_bwd, elman_fwd, gru_bwd, gru_fwd, lstm_bwd, lstm_fwd
from fastrnn.kernels.launch import gradient_operand
from fastrnn.lstm import lstm_bwd_torch, lstm_fwd_torch

from .conftest import rel_err

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the checks run the kernels under the Triton interpreter")


def test_bounds_check_catches_a_load_and_a_store_past_the_end():
    """The negative control: a kernel that reads or writes one element too many fails loudly."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy(src_ptr, dst_ptr, n, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(dst_ptr + o, tl.load(src_ptr + o, mask=o < n + EXTRA), mask=o < n)
        tl.store(dst_ptr + o, tl.zeros([BLOCK], tl.float32), mask=o < n + EXTRA)

    src, dst = torch.randn(4), torch.empty(4)
    copy[(1,)](src, dst, 4, EXTRA=0, BLOCK=8)
    assert torch.equal(dst, torch.zeros(4))
    with pytest.raises(Exception, match="out-of-bounds load at .* past the end of src_ptr"):
        copy[(1,)](src, dst, 4, EXTRA=1, BLOCK=8)


def odd_strides(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of ``t`` whose size-1 dimensions have a stride far larger than the tensor (PyTorch calls
    it contiguous all the same, and ``.contiguous()`` keeps it): a kernel that indexes some buffer with
    such a stride reaches outside it."""
    if t is None:
        return None
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(1_000_003 if size == 1 else step)
        step *= size if size != 1 else 1
    out = torch.empty_strided(t.shape, tuple(reversed(strides)), dtype=t.dtype)
    assert out.is_contiguous()
    return out.copy_(t)


SHAPES = [(4, 1, 5), (1, 3, 5), (3, 2, 1), (1, 1, 1)]  # (T, B, H): a batch, a step, a unit of one
CONFIGS = [None, Config("stepwise", 16, 16, 16)]  # the interpreter's own, and one launch per step


def _operands(T, B, H, G, P, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return dict(x=rand(T, B, G * H), h0=rand(B, P), c0=rand(B, H), w_hh=rand(G * H, P, scale=0.4),
                w_hr=rand(P, H, scale=0.4) if P != H else None, b_hn=rand(H), lengths=lengths,
                dy=rand(T, B, P), dh_n=rand(B, P), dc_n=rand(B, H))


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "stepwise"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_elman_kernels_with_size_one_dimensions_of_any_stride(shape, config, reverse, one_thread):
    T, B, H = shape
    o = _operands(T, B, H, 1, H)
    x, h0, w, lens, dy, dh_n = (odd_strides(o[k]) for k in ("x", "h0", "w_hh", "lengths", "dy", "dh_n"))
    y, h_n = elman_fwd(x, h0, w, "tanh", reverse, lens, config=config)
    _assert_same([y, h_n], elman_fwd_torch(o["x"], o["h0"], o["w_hh"], "tanh", reverse, o["lengths"]))
    d = elman_bwd(dy, dh_n, odd_strides(y), w, "tanh", reverse, lens, config=config)
    _assert_same([d], [elman_bwd_torch(o["dy"], o["dh_n"], y, o["w_hh"], "tanh", reverse, o["lengths"])])


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "stepwise"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("proj", [False, True])
def test_lstm_kernels_with_size_one_dimensions_of_any_stride(shape, config, proj, one_thread):
    T, B, H = shape
    P = max(1, H - 1) if proj and H > 1 else H
    if proj and P == H:
        pytest.skip("a projection needs proj_size < hidden_size")
    o = _operands(T, B, H, 4, P)
    args = [odd_strides(o[k]) for k in ("x", "h0", "c0", "w_hh", "w_hr")]
    for reverse in (False, True):
        lens = odd_strides(o["lengths"])
        fused = lstm_fwd(*args, reverse, lens, config=config)
        want = lstm_fwd_torch(o["x"], o["h0"], o["c0"], o["w_hh"], o["w_hr"], reverse, o["lengths"])
        _assert_same(fused, want)
        y, c, gates = (odd_strides(t) for t in fused[:3])  # (fused[3:]: h_n, c_n)
        grads = lstm_bwd(*(odd_strides(o[k]) for k in ("dy", "dh_n", "dc_n")), y, c, gates, args[1], args[2],
                         args[3], args[4], reverse, lens, config=config)
        _assert_same(grads, lstm_bwd_torch(o["dy"], o["dh_n"], o["dc_n"], *want[:3], o["h0"], o["c0"], o["w_hh"],
                                           o["w_hr"], reverse, o["lengths"]))


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "stepwise"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gru_kernels_with_size_one_dimensions_of_any_stride(shape, config, one_thread):
    T, B, H = shape
    o = _operands(T, B, H, 3, H)
    x, h0, w, b_hn = (odd_strides(o[k]) for k in ("x", "h0", "w_hh", "b_hn"))
    for reverse in (False, True):
        lens = odd_strides(o["lengths"])
        fused = gru_fwd(x, h0, w, b_hn, reverse, lens, config=config)
        want = gru_fwd_torch(o["x"], o["h0"], o["w_hh"], o["b_hn"], reverse, o["lengths"])
        _assert_same(fused, want)
        y, gates = (odd_strides(t) for t in fused[:-1])  # (fused[-1]: h_n)
        grads = gru_bwd(odd_strides(o["dy"]), odd_strides(o["dh_n"]), y, gates, h0, w, reverse, lens, config=config)
        _assert_same(grads, gru_bwd_torch(o["dy"], o["dh_n"], *want[:-1], o["h0"], o["w_hh"], reverse,
                                          o["lengths"]))


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "stepwise"])
@pytest.mark.parametrize("cell", ["lstm", "lstm-proj", "gru"])
def test_an_inference_forward_writes_only_what_it_returns(cell, config, one_thread):
    """A gated forward launcher called with ``save=False`` stores no c and no gates (it is handed
    x_proj in their place: left as it was) and returns them empty; its output and final states are a
    saving call's, bit for bit. Each direction, with and without lengths and h0, at sizes of one."""
    for T, B, H in SHAPES + [(5, 3, 6)]:
        P = H - 1 if cell == "lstm-proj" and H > 1 else H
        o = _operands(T, B, H, 3 if cell == "gru" else 4, P)
        operands = ([o["x"], o["h0"], o["w_hh"], o["b_hn"]] if cell == "gru" else
                    [o["x"], o["h0"], o["c0"], o["w_hh"], o["w_hr"]])
        launcher, saved_steps = (gru_fwd, 1) if cell == "gru" else (lstm_fwd, 2)  # (c and the gates)
        for reverse, lens, h0 in [(False, None, True), (True, o["lengths"], True), (True, None, False)]:
            args = [odd_strides(t) if h0 or t is not o["h0"] else None for t in operands]
            x_before = args[0].clone()
            want = launcher(*args, reverse, lens, config=config)
            got = launcher(*args, reverse, lens, config=config, save=False)
            assert torch.equal(args[0], x_before)
            for k, (a, b) in enumerate(zip(got, want)):
                if 1 <= k <= saved_steps:
                    assert a.shape == (0, *b.shape[1:]) and a.dtype == b.dtype
                else:
                    assert torch.equal(a, b), (T, B, H, reverse, k)


def test_lstm_with_projection_at_batch_one(monkeypatch):
    """The report's case: a projected LSTM, unbatched batch_first input, so every step's (1, P) block
    keeps the stride of the (B, T, P) layout; the fused backward wrote past a (2, 1, P) buffer."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, dtype=torch.float64)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTRNN_BACKEND", backend)
        torch.manual_seed(1)
        m = fastrnn.LSTM(2, 3, proj_size=2, batch_first=True).double()
        xb = x.clone().requires_grad_()
        y, _ = m(xb)
        (torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y) * y).sum().backward()
        results[backend] = [y, xb.grad] + [p.grad for p in m.parameters()]
    _assert_same(results["triton"], results["torch"])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_initial_states_of_any_layout(cell, monkeypatch):
    """An initial state that is a transposed view (rows not contiguous) is read as a state, not as its
    memory: the kernels keep the carried state in a buffer of their own, laid out (B, H)."""
    torch.manual_seed(0)
    module = fastrnn.CELLS[cell].module(3, 5, dtype=torch.float64)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    h = torch.randn(1, 5, 6, dtype=torch.float64).transpose(1, 2)  # (1, B, H), a view with stride (., 1, B)
    hx = (h, torch.randn(1, 5, 6, dtype=torch.float64).transpose(1, 2)) if cell == "lstm" else h
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("FASTRNN_BACKEND", backend)
        y, state = module(x, hx)
        results[backend] = [y, *(state if cell == "lstm" else (state,))]
    _assert_same(results["triton"], results["torch"])


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "stepwise"])
@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_lengths_outside_the_sequence_stay_inside_the_buffers(cell, config, one_thread):
    """Lengths a GPU takes unchecked (no host sync) that lie outside [1, T], here 0 and T + 2: every
    launcher, forward and backward, walks as if they were clamped into [0, T] and reads and writes
    nothing outside its buffers."""
    T, B, H = 3, 3, 5
    G = {"elman": 1, "lstm": 4, "gru": 3}[cell]
    o = _operands(T, B, H, G, H)
    bad, clamped = torch.tensor([0, T + 2, 2]), torch.tensor([0, T, 2])
    for reverse in (False, True):
        got, want = (_launch_both_ways(cell, o, reverse, lens, config) for lens in (bad, clamped))
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def _launch_both_ways(cell, o, reverse, lens, config):
    """The cell's forward launcher's outputs, then its backward's."""
    if cell == "elman":
        y, h_n = elman_fwd(o["x"], o["h0"], o["w_hh"], "tanh", reverse, lens, config=config)
        return y, h_n, elman_bwd(o["dy"], o["dh_n"], y, o["w_hh"], "tanh", reverse, lens, config=config)
    if cell == "lstm":
        fwd = lstm_fwd(o["x"], o["h0"], o["c0"], o["w_hh"], None, reverse, lens, config=config)
        return (*fwd, *lstm_bwd(o["dy"], o["dh_n"], o["dc_n"], *fwd[:3], o["h0"], o["c0"], o["w_hh"], None, reverse,
                                lens, config=config))
    fwd = gru_fwd(o["x"], o["h0"], o["w_hh"], o["b_hn"], reverse, lens, config=config)
    return (*fwd, *gru_bwd(o["dy"], o["dh_n"], *fwd[:2], o["h0"], o["w_hh"], reverse, lens, config=config))


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "stepwise"])
@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_a_gradient_none_reached_is_read_nowhere(cell, config, one_thread):
    """A backward launcher given None for the output's or a final state's gradient (what autograd
    hands for a y, h_n or c_n the loss did not use) reads nothing in its place: no zeros to fill
    first. It returns what a zero gradient gives, each direction, with and without lengths, the LSTM's
    also with a projection; so does its PyTorch twin."""
    T, B, H = 4, 3, 5
    G, P = {"elman": 1, "lstm": 4, "gru": 3}[cell], H - 1 if cell == "lstm" else H
    for o in [_operands(T, B, H, G, H)] + ([_operands(T, B, H, G, P, seed=1)] if cell == "lstm" else []):
        finals = ("dh_n", "dc_n") if cell == "lstm" else ("dh_n",)
        absent = [(k,) for k in ("dy", *finals)] + ([finals] if len(finals) > 1 else [])  # each, both finals
        for reverse, lens in [(False, None), (True, None), (False, o["lengths"]), (True, o["lengths"])]:
            for left_out in absent:
                zeros = {k: torch.zeros_like(o[k]) if k in left_out else o[k] for k in ("dy", *finals)}
                nones = {k: None if k in left_out else o[k] for k in ("dy", *finals)}
                want = _backward(cell, o, zeros, reverse, lens, config)
                got = _backward(cell, o, nones, reverse, lens, config)
                assert all(torch.equal(a, b) for a, b in zip(got, want)), (left_out, reverse, lens)
                _assert_same(_backward(cell, o, nones, reverse, lens, config, twin=True), want)


def _laid_out(g: torch.Tensor, how: str) -> torch.Tensor:
    """The values of ``g (..., N)`` in another layout with contiguous rows: as a batch-first output's
    gradient arrives (``(T, B, N)`` with strides ``(N, T * N, 1)``), as the second half of a wider one
    (a bidirectional layer's reverse direction; the first half holds other data), or, where every row
    is one row, expanded from it (stride 0)."""
    if how == "batch_first":
        return g.transpose(0, 1).contiguous().transpose(0, 1)
    if how == "half":
        wide = torch.randn(*g.shape[:-1], 2 * g.shape[-1], dtype=g.dtype)
        return wide.narrow(-1, g.shape[-1], g.shape[-1]).copy_(g)
    return g.flatten(0, -2)[0].expand(g.shape)


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "stepwise"])
@pytest.mark.parametrize("cell", ["elman", "lstm", "gru"])
def test_gradients_are_read_with_their_row_strides(cell, config, one_thread):
    """A backward launcher reads a gradient whose rows are contiguous where it lies (a batch-first
    model's, a bidirectional layer's half, one expanded over steps), no copy made: the result is the
    one its contiguous copy gives, bit for bit, each direction, with and without lengths; so does the
    twin."""
    T, B, H = 4, 3, 5
    G, P = {"elman": 1, "lstm": 4, "gru": 3}[cell], H - 1 if cell == "lstm" else H
    for o in [_operands(T, B, H, G, H)] + ([_operands(T, B, H, G, P, seed=1)] if cell == "lstm" else []):
        finals = ("dh_n", "dc_n") if cell == "lstm" else ("dh_n",)
        for reverse, lens in [(False, None), (True, None), (True, o["lengths"])]:
            for how in ("batch_first", "half", "expanded"):
                dense = {k: _laid_out(o[k], "expanded") if how == "expanded" else o[k] for k in ("dy", *finals)}
                strided = {k: _laid_out(dense[k], how if k == "dy" else "half") for k in dense}
                assert not strided["dy"].is_contiguous() and strided["dy"].stride(-1) == 1
                assert all(gradient_operand(g, g.dtype) is g for g in strided.values())  # (no copy)
                want = _backward(cell, o, {k: g.contiguous() for k, g in dense.items()}, reverse, lens, config)
                got = _backward(cell, o, strided, reverse, lens, config)
                assert all(torch.equal(a, b) for a, b in zip(got, want)), (how, reverse, lens)
                _assert_same(_backward(cell, o, strided, reverse, lens, config, twin=True), want)


def _backward(cell, o, grads, reverse, lens, config, twin=False):
    """The cell's backward launcher (or its PyTorch twin) on the forward's outputs, with the gradients
    ``grads`` of y and the final states."""
    if cell == "elman":
        y, _ = elman_fwd_torch(o["x"], o["h0"], o["w_hh"], "tanh", reverse, lens)
        run, kwargs = (elman_bwd_torch, {}) if twin else (elman_bwd, dict(config=config))
        return [run(grads["dy"], grads["dh_n"], y, o["w_hh"], "tanh", reverse, lens, **kwargs)]
    if cell == "lstm":
        fwd = lstm_fwd_torch(o["x"], o["h0"], o["c0"], o["w_hh"], o["w_hr"], reverse, lens)
        run, kwargs = (lstm_bwd_torch, {}) if twin else (lstm_bwd, dict(config=config))
        return run(grads["dy"], grads["dh_n"], grads["dc_n"], *fwd[:3], o["h0"], o["c0"], o["w_hh"], o["w_hr"], reverse,
                   lens, **kwargs)
    fwd = gru_fwd_torch(o["x"], o["h0"], o["w_hh"], o["b_hn"], reverse, lens)
    run, kwargs = (gru_bwd_torch, {}) if twin else (gru_bwd, dict(config=config))
    return run(grads["dy"], grads["dh_n"], *fwd[:2], o["h0"], o["w_hh"], reverse, lens, **kwargs)
