"""Bad input refused as torch.nn.RNN refuses it; odd but valid input answered as it answers it;
huge offsets, long sequences, and property-based parity on random configurations."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fastrnn import RNN, recurrence, recurrence_reference
from fastrnn.elman import elman_fwd_op

from .conftest import rel_err

BOTH = pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
F64 = torch.float64

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pair(*args, nonlinearity="tanh", seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = nn.RNN(*args, nonlinearity=nonlinearity, dtype=F64, **kwargs)
    ours = RNN(*args, nonlinearity=nonlinearity, dtype=F64, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def same(ours, ref, *inputs):
    (y1, h1), (y2, h2) = ref(*inputs), ours(*inputs)
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9, equal_nan=True)
    torch.testing.assert_close(h2, h1, rtol=1e-9, atol=1e-9, equal_nan=True)
    return y2, h2


# ---------------------------------------------------------------------------------------------
# Accepted input: the same result as torch.nn.RNN
# ---------------------------------------------------------------------------------------------

@BOTH
def test_nan_and_inf_inputs(backend):
    ref, ours = pair(3, 4)
    x = torch.randn(6, 3, 3, dtype=F64)
    x[1, 0, 0], x[3, 2, 1], x[4, 1, 2] = float("nan"), float("inf"), -float("inf")
    y, _ = same(ours, ref, x)
    assert torch.isnan(y[1, 0]).all()  # the NaN spreads through sequence 0 only
    assert not torch.isnan(y[:, 1]).any() and not torch.isnan(y[:, 2]).any()


@BOTH
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_huge_values_and_relu_blow_up(backend, nonlinearity):
    ref, ours = pair(3, 4, nonlinearity=nonlinearity)
    with torch.no_grad():
        for m in (ref, ours):
            m.weight_hh_l0.mul_(1e3)
    x = torch.randn(20, 2, 3, dtype=F64) * 1e30
    y, _ = same(ours, ref, x)
    if nonlinearity == "relu":
        assert y.abs().max() > 1e40  # relu lets the state grow far past the inputs' 1e30


@BOTH
def test_single_step_and_non_contiguous_expanded_inputs(backend):
    ref, ours = pair(4, 5, 2, bidirectional=True)
    same(ours, ref, torch.randn(1, 3, 4, dtype=F64))
    x_t = torch.randn(3, 7, 4, dtype=F64).transpose(0, 1)  # (7, 3, 4), not contiguous
    assert not x_t.is_contiguous()
    h_exp = torch.randn(1, 1, 5, dtype=F64).expand(4, 3, 5)  # stride 0 along two dims
    h_t = torch.randn(3, 4, 5, dtype=F64).transpose(0, 1)
    same(ours, ref, x_t, h_exp)
    same(ours, ref, x_t, h_t)
    x_slice = torch.randn(7, 3, 8, dtype=F64)[..., ::2]  # stride 2 in the feature dim
    same(ours, ref, x_slice)


@BOTH
def test_batch_first_with_expanded_input(backend):
    ref, ours = pair(4, 5, batch_first=True)
    same(ours, ref, torch.randn(1, 6, 4, dtype=F64).expand(3, 6, 4))


# ---------------------------------------------------------------------------------------------
# Refused input: the same kind of error, a message naming the problem, before any kernel runs
# ---------------------------------------------------------------------------------------------

@BOTH
@pytest.mark.parametrize("case,exc,words", [
    ("increasing", RuntimeError, "non-increasing"),
    ("rows", RuntimeError, "rows"),
    ("float", TypeError, "int64"),
    ("empty", IndexError, "empty"),  # (torch's module: an IndexError)
])
def test_bad_packed_layout(backend, case, exc, words):
    ours = RNN(2, 3)
    packed = {
        "increasing": PackedSequence(torch.randn(3, 2), torch.tensor([1, 2])),
        "rows": PackedSequence(torch.randn(4, 2), torch.tensor([2, 1])),
        "float": PackedSequence(torch.randn(3, 2), torch.tensor([2.0, 1.0])),
        "empty": PackedSequence(torch.randn(0, 2), torch.tensor([], dtype=torch.int64)),
    }[case]
    with pytest.raises(exc, match=words):
        ours(packed)


@BOTH
def test_a_packed_batch_of_no_rows_gives_torchs_empty_results(backend):
    """``batch_sizes=[0]`` (one step, no sequence in it): torch's module returns empty results; ours
    raised from a reshape of zero elements."""
    import fastrnn

    packed = PackedSequence(torch.randn(0, 3), torch.tensor([0]))
    for cell in fastrnn.CELLS.values():
        theirs, ours = cell.torch_module(3, 4), cell.module(3, 4)
        ours.load_state_dict(theirs.state_dict())
        (y1, s1), (y2, s2) = theirs(packed), ours(packed)
        assert y2.data.shape == y1.data.shape and torch.equal(y2.batch_sizes, y1.batch_sizes)
        assert [t.shape for t in pytree.tree_leaves(s2)] == [t.shape for t in pytree.tree_leaves(s1)]


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.int64, torch.complex128])
def test_the_ops_refuse_what_they_cannot_compute(backend, dtype):
    """Integer or complex operands: a TypeError naming the dtype on every path (before, the twins
    returned the LSTM's and GRU's in int64, the GRU's all zeros, or dropped the imaginary part)."""
    import fastrnn

    x = torch.ones(3, 2, 12, dtype=dtype)
    calls = {"rnn": lambda: fastrnn.recurrence(x[..., :4], None, torch.ones(4, 4, dtype=dtype)),
             "lstm": lambda: fastrnn.lstm_recurrence(x, None, None, torch.ones(12, 3, dtype=dtype)),
             "gru": lambda: fastrnn.gru_recurrence(x[..., :9], None, torch.ones(9, 3, dtype=dtype))}
    for cell, call in calls.items():
        with pytest.raises(TypeError, match=f"x_proj must be float16, bfloat16, float32 or float64, got {dtype}"):
            call()


def test_the_references_take_lengths_as_the_ops_do():
    """A list of lengths, which the ops take, the references take too (they raised AttributeError)."""
    import fastrnn

    torch.manual_seed(0)
    for cell in fastrnn.CELLS.values():
        x, w = torch.randn(3, 2, 4 * cell.gates, dtype=F64), torch.randn(4 * cell.gates, 4, dtype=F64)
        args = (x, None, None, w) if cell.name == "lstm" else (x, None, w)
        torch.testing.assert_close(cell.reference(*args, lengths=[3, 2])[0],
                                   cell.recurrence(*args, lengths=torch.tensor([3, 2]))[0])


@pytest.mark.parametrize("backend", ["auto", "torch"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_complex_modules_on_the_cpu(backend, cell):
    """torch's modules compute complex128 on the CPU: an ``auto`` call runs torch's module (the same
    results); a path that cannot (the twins, resets) refuses with a TypeError, never drops the
    imaginary part."""
    import fastrnn

    torch.manual_seed(0)
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, dtype=torch.complex128)
    ours = fastrnn.CELLS[cell].module(3, 4, dtype=torch.complex128)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.complex128)
    if backend == "auto":
        assert torch.equal(ours(x)[0], theirs(x)[0])
    with pytest.raises(TypeError, match="got torch.complex128"):
        ours(x, resets=torch.zeros(5, 2, dtype=torch.bool))


@BOTH
def test_refusals_happen_before_any_kernel(backend, monkeypatch):
    import fastrnn.elman as ops

    def boom(*args, **kwargs):
        raise AssertionError("a kernel ran on bad input")

    monkeypatch.setattr(ops, "elman_fwd_op", boom)
    ours = RNN(4, 3, 2)
    bad = [(torch.randn(5, 2, 5),), (torch.randn(5, 2, 4), torch.zeros(2, 3, 3)),
           (torch.randn(5, 2, 4, dtype=F64),), (torch.randn(5, 2, 4), torch.zeros(2, 2, 3, dtype=F64)),
           (torch.randn(0, 2, 4),), (torch.randn(5, 2, 4, 1),)]
    for args in bad:
        with pytest.raises((RuntimeError, ValueError)):
            ours(*args)


def test_op_level_errors():
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match="nonlinearity"):
        recurrence(x, None, torch.randn(4, 4), "gelu")
    with pytest.raises(RuntimeError, match="w_hh"):
        recurrence(x, None, torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="hidden size"):
        recurrence(x, torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(RuntimeError, match="dtype"):
        recurrence(x, None, torch.randn(4, 4, dtype=F64))
    with pytest.raises(RuntimeError, match="same device"):
        recurrence(x, torch.randn(2, 4, device="meta"), torch.randn(4, 4))
    with pytest.raises(ValueError, match="lengths"):
        recurrence(x, None, torch.randn(4, 4), lengths=torch.tensor([4, 1]))


# ---------------------------------------------------------------------------------------------
# Large offsets and long sequences
# ---------------------------------------------------------------------------------------------

def _strided(T, B, H, stride_t, dtype=torch.bfloat16):
    """A (T, B, H) view whose steps lie stride_t elements apart: offsets past 2**31 with only the
    touched pages of a large virtual allocation ever materialised."""
    storage = torch.empty((T - 1) * stride_t + B * H, dtype=dtype)
    return torch.as_strided(storage, (T, B, H), (stride_t, H, 1))


@pytest.mark.parametrize("kernel", ["fwd_resident", "fwd_tiled", "fwd_tiled_streamed", "bwd_resident",
                                    "bwd_tiled", "bwd_tiled_streamed"])
def test_index_arithmetic_past_2_31(kernel):
    """Each kernel addresses t * stride_t > 2**31 elements correctly (interpreter on CPU; the
    compiled kernels compute the same offsets in int64)."""
    from fastrnn.kernels.config import dtype_flags
    from fastrnn.kernels.elman import bwd_resident_kernel, bwd_tiled_kernel
    from fastrnn.kernels.elman import fwd_resident_kernel, fwd_tiled_kernel
    from fastrnn.elman import elman_bwd_torch

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this check addresses host memory under the interpreter")
    T, B, H, stride_t = 3, 2, 16, 2**31 + 64
    flags = dict(ACTIVATION=0, REVERSE=False, HAS_LENGTHS=False, HAS_RESETS=False, **dtype_flags(torch.bfloat16, torch.device("cpu")))
    fast = dict(FAST=True)  # the forward's activation (the interpreter keeps the exact formula)
    torch.manual_seed(0)
    a, out = _strided(T, B, H, stride_t), _strided(T, B, H, stride_t)
    a.copy_(torch.randn(T, B, H))
    out.fill_(float("nan"))
    w = (torch.randn(H, H) / 4).bfloat16()
    if kernel.startswith("fwd"):
        h_n = torch.full((B, H), float("nan"), dtype=torch.bfloat16)  # (B, H): h at the last step
        if kernel == "fwd_resident":
            fwd_resident_kernel[(1,)](a, a, w, a, a, out, h_n, T, B, H, stride_t, H, stride_t, H, H, 0, H, 0, 0,
                                       HAS_H0=False, BLOCK_B=16, BLOCK_H=16, **flags, **fast)
        else:
            fwd_tiled_kernel[(1, 1)](a, a, w, a, a, out, h_n, T, B, H, stride_t, H, stride_t, H, H, 0, H, 0, 0,
                                      torch.zeros(1, dtype=torch.int32), 0, T, HAS_H0=False, SYNC=True,
                                      SPLIT_K=1, BLOCK_B=16, BLOCK_N=16, **fast,
                                      BLOCK_K=16, W_RESIDENT=not kernel.endswith("streamed"), **flags)
        want, _ = recurrence_reference(a.double(), None, w.double())
        assert torch.equal(h_n, out[T - 1])
    else:
        y = _strided(T, B, H, stride_t)
        y.copy_(torch.randn(T, B, H).tanh())
        dh_n = torch.randn(B, H).bfloat16()
        if kernel == "bwd_resident":
            bwd_resident_kernel[(1,)](a, dh_n, y, w, a, a, out, T, B, H, stride_t, H, stride_t, H, stride_t, H, H, H, 0, 0,
                                       HAS_DY=True, HAS_DH_N=True, BLOCK_B=16, BLOCK_H=16, **flags)
        else:
            bwd_tiled_kernel[(1, 1)](a, dh_n, y, w, a, a, out, T, B, H, stride_t, H, stride_t, H, stride_t, H, H, H, 0, 0,
                                      torch.zeros(1, dtype=torch.int32), 0, T, HAS_DY=True, HAS_DH_N=True, SYNC=True,
                                      BLOCK_B=16, BLOCK_N=16, BLOCK_K=16, SPLIT_K=1,
                                      W_RESIDENT=not kernel.endswith("streamed"), **flags)
        want = elman_bwd_torch(a.double(), dh_n.double(), y.double(), w.double())
    assert not torch.isnan(out).any()
    assert rel_err(out, want) < 2e-2


class HostSyncs(TorchDispatchMode):
    """Records what would make the host wait for the GPU, with the 'meta' device standing in for
    it: a value read back (item, nonzero, boolean-mask indexing) and each host-to-device copy."""

    READS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
             "aten::equal", "aten::unique_consecutive", "aten::_unique2"}

    def __init__(self):
        super().__init__()
        self.reads, self.copies = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        name = func._schema.name
        if any(t.device.type == "meta" for t in tensors):
            masks = [t for t in tensors if t.dtype == torch.bool and name.startswith("aten::index")]
            if name in self.READS or masks:
                self.reads.append(name)
        out = func(*args, **kwargs)
        if name in ("aten::_to_copy", "aten::copy_") and any(t.device.type == "cpu" for t in tensors) \
                and any(t.device.type == "meta" for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)):
            self.copies += 1
        return out


@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
def test_packed_forward_backward_never_waits_for_the_device(layers, bidirectional):
    """Packed input: lengths and row indices are computed on the host and copied once per forward,
    however many layers and directions; nothing reads a device value back (the GPU path is
    checked the same way with torch.cuda.set_sync_debug_mode in scripts/gpu_check.py)."""
    rnn = RNN(3, 4, layers, bidirectional=bidirectional, device="meta")
    x, lengths = torch.randn(6, 3, 3), torch.tensor([2, 6, 4])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    on_meta = PackedSequence(packed.data.to("meta").requires_grad_(), packed.batch_sizes,
                             packed.sorted_indices.to("meta"), packed.unsorted_indices.to("meta"))
    hx = torch.randn(layers * (2 if bidirectional else 1), 3, 4, device="meta", requires_grad=True)
    with HostSyncs() as syncs:
        out, h_n = rnn(on_meta, hx)
        (out.data.sum() + h_n.sum()).backward()
    assert out.data.shape == (12, 4 * (2 if bidirectional else 1)) and out.data.device.type == "meta"
    assert syncs.reads == []
    assert syncs.copies <= 2  # the lengths (B,) and the packed rows' indices


@pytest.mark.slow
@BOTH
def test_long_sequence_forward_backward(backend):
    """T = 100000 on the CPU path (T = 2000 through the slow interpreter), finite gradients, the
    last steps matching the loop."""
    T = 100_000 if backend == "torch" else 2_000
    torch.manual_seed(0)
    x = torch.randn(T, 2, 8, requires_grad=True)
    w = (torch.randn(8, 8) / 8 ** 0.5).requires_grad_()
    y, h_n = recurrence(x, None, w)
    (y.sum() + h_n.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
    k = 300  # the last steps against the loop, restarted from the fused state
    want, _ = recurrence_reference(x.detach()[-k:].double(), y[-k - 1].detach().double(), w.detach().double())
    assert rel_err(y[-k:], want) < 1e-5


def test_saved_memory_is_linear_in_T():
    def saved_bytes(T):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        x = torch.randn(T, 4, 16, requires_grad=True)
        w = torch.randn(16, 16, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            elman_fwd_op(x, None, w, "tanh", False, None, "torch")
        return sum(total)

    small, big = saved_bytes(1000), saved_bytes(4000)
    assert big <= 4 * small + 4096  # y (T, B, H) and w_hh: nothing grows faster than T
    assert small >= 1000 * 4 * 16 * 4  # y itself is saved


# ---------------------------------------------------------------------------------------------
# Property-based: random configurations
# ---------------------------------------------------------------------------------------------

configs = st.fixed_dictionaries({
    "layers": st.integers(1, 3), "bidirectional": st.booleans(), "batch_first": st.booleans(),
    "bias": st.booleans(), "nonlinearity": st.sampled_from(["tanh", "relu"]),
    "T": st.integers(1, 9), "B": st.integers(1, 5), "I": st.integers(1, 6), "H": st.integers(1, 12),
    "packed": st.booleans(), "with_h0": st.booleans(), "seed": st.integers(0, 2**16),
})


@pytest.mark.slow
@given(cfg=configs)
def test_property_module_matches_torch_on_cpu(cfg):
    os.environ["FASTRNN_BACKEND"] = "torch"
    try:
        _module_matches(cfg)
    finally:
        del os.environ["FASTRNN_BACKEND"]


def _module_matches(cfg):
    D = 2 if cfg["bidirectional"] else 1
    ref, ours = pair(cfg["I"], cfg["H"], cfg["layers"], nonlinearity=cfg["nonlinearity"], bias=cfg["bias"],
                     batch_first=cfg["batch_first"], bidirectional=cfg["bidirectional"], seed=cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    T, B = cfg["T"], cfg["B"]
    x = torch.randn(T, B, cfg["I"], generator=g, dtype=F64)
    h0 = torch.randn(cfg["layers"] * D, B, cfg["H"], generator=g, dtype=F64) if cfg["with_h0"] else None
    if cfg["packed"]:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
    else:
        inp = x.transpose(0, 1) if cfg["batch_first"] else x
    (y1, h1), (y2, h2) = ref(inp, h0), ours(inp, h0)
    y1 = y1.data if cfg["packed"] else y1
    y2 = y2.data if cfg["packed"] else y2
    torch.testing.assert_close(y2, y1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(h2, h1, rtol=1e-9, atol=1e-9)


op_configs = st.fixed_dictionaries({
    "T": st.integers(1, 12), "B": st.integers(1, 20), "H": st.integers(1, 40),
    "dtype": st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    "nonlinearity": st.sampled_from(["tanh", "relu"]), "reverse": st.booleans(),
    "lengths": st.booleans(), "with_h0": st.booleans(), "seed": st.integers(0, 2**16),
})


@pytest.mark.slow
@given(cfg=op_configs)
def test_property_fused_op_matches_reference(cfg):
    """The fused op (interpreter on CPU) against the loop, outputs and gradients."""
    from .test_elman import check_against_reference

    check_against_reference(cfg["T"], cfg["B"], cfg["H"], cfg["dtype"], cfg["nonlinearity"], cfg["reverse"],
                            cfg["lengths"], seed=cfg["seed"], h0=cfg["with_h0"])
