"""fastrnn in the PyTorch stack: torch.compile without graph breaks, custom-op checks, meta tensors,
autocast, determinism, module hygiene (copy, pickle, save, .to, DDP, functional_call), and
torch.jit.trace."""

import copy
import io
import os
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fastrnn
from fastrnn import RNN
from fastrnn.elman import elman_bwd_op, elman_fwd_op
from fastrnn.op import runs_directly

BOTH = pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)


def _grads(module, x, h0):
    y, h_n = module(x, h0)
    loss = y.pow(2).sum() + h_n.sum()
    return [y, h_n, *torch.autograd.grad(loss, [x, h0, *module.parameters()])]


@pytest.mark.parametrize("backend,compile_backend", [("torch", "inductor"), ("torch", "aot_eager"),
                                                     ("triton", "aot_eager")], indirect=["backend"])
def test_compile_fullgraph_matches_eager(backend, compile_backend):
    torch.manual_seed(0)
    model = RNN(5, 8, 2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 6, 5, requires_grad=True)
    h0 = torch.randn(4, 3, 8, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    got, want = _grads(compiled, x, h0), _grads(model, x, h0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compile_has_no_graph_break():
    rnn = RNN(4, 6)
    explanation = torch._dynamo.explain(lambda x: rnn(x)[0].sum())(torch.randn(5, 2, 4))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_modules_compile_once_each():
    """Each compiled module compiles once, whatever is compiled beside it: the names of its weights,
    kept per layer (``backend.memo``), are a constant to Dynamo, not a dict it guards on (a module's
    first call compiled twice, and compiling another module, which adds names, made both again)."""
    from torch._dynamo.testing import CompileCounter

    x = torch.randn(5, 2, 3)
    counts = {"gru": CompileCounter(), "lstm": CompileCounter()}
    gru = torch.compile(fastrnn.GRU(3, 4), backend=counts["gru"], fullgraph=True)
    lstm = torch.compile(fastrnn.LSTM(3, 4, 3, bias=False, bidirectional=True, proj_size=2), backend=counts["lstm"],
                         fullgraph=True)
    for _ in range(2):
        gru(x), lstm(x), gru(x)
    assert {name: c.frame_count for name, c in counts.items()} == {"gru": 1, "lstm": 1}


class RecordedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@BOTH
@pytest.mark.parametrize("cell", list(fastrnn.CELLS))
def test_jit_trace_checks_saves_and_trains_as_torchs_module(backend, cell):
    """``torch.jit.trace`` with its defaults (its check traces again under no_grad and must find the
    same graph) of a module recording autograd's graph; saved with ``torch.jit.save`` and loaded, the
    graph gives torch's module's output, gradients and second derivatives on a fresh input."""
    torch.manual_seed(0)
    model = fastrnn.CELLS[cell].module(4, 5, 2, bidirectional=True, dtype=torch.float64)
    theirs = fastrnn.CELLS[cell].torch_module(4, 5, 2, bidirectional=True, dtype=torch.float64)
    theirs.load_state_dict(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # (Python values the graph fixes)
        traced = torch.jit.trace(model, torch.randn(3, 2, 4, dtype=torch.float64))
    saved = io.BytesIO()
    torch.jit.save(traced, saved)
    saved.seek(0)
    loaded = torch.jit.load(saved)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    results = []
    for run in (loaded, theirs):
        params = list(run.parameters())
        y, state = run(x)
        h_n = state[0] if isinstance(state, tuple) else state
        grads = torch.autograd.grad(y.square().sum() + h_n.square().sum(), [x, *params], create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), params[1])  # (w_hh of layer 0)
        results.append((y, h_n, *grads, *second))
    torch.testing.assert_close(results[0], results[1], rtol=1e-10, atol=1e-10)


@BOTH
def test_the_dispatcher_sees_the_op_whenever_it_is_watched(backend):
    """An eager call on plain tensors runs the op's function itself (no dispatcher round trip); a
    dispatch mode (profilers, torch.export's tracing), fake or meta tensors and subclasses see the
    custom op."""
    x, w = torch.randn(4, 2, 3), torch.randn(3, 3)
    assert runs_directly((x, None, w, "tanh")) and runs_directly((x, nn.Parameter(w)))
    assert not runs_directly((x.to("meta"), w)) and not runs_directly((x.as_subclass(Subclass), w))
    with FakeTensorMode():
        assert not runs_directly((torch.randn(4, 2, 3), w))
    with RecordedOps() as recorded:
        assert not runs_directly((x, w))
        y, _ = RNN(3, 3)(x)
    assert "fastrnn.elman_fwd.default" in recorded.names and y.shape == (4, 2, 3)
    with torch.profiler.profile() as profile:
        assert not runs_directly((x, w))
        RNN(3, 3)(x)
    assert "fastrnn::elman_fwd" in {event.name for event in profile.events()}


class Subclass(torch.Tensor):
    pass


@BOTH
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reverse,with_lengths", [(False, False), (True, True)])
def test_opcheck(backend, dtype, reverse, with_lengths):
    torch.manual_seed(1)
    T, B, H = 4, 3, 5
    x = torch.randn(T, B, H, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, H, dtype=dtype, requires_grad=True)
    w = (torch.randn(H, H, dtype=dtype) / H ** 0.5).requires_grad_()
    lengths = torch.tensor([4, 2, 3]) if with_lengths else None
    torch.library.opcheck(elman_fwd_op, (x, h0, w, "tanh", reverse, lengths, backend))
    y = torch.randn(T, B, H, dtype=dtype).tanh()
    torch.library.opcheck(elman_bwd_op, (torch.randn_like(y), torch.randn(B, H, dtype=dtype), y, w.detach(),
                                              "tanh", reverse, lengths, backend))


def test_meta_device_construction_and_forward():
    ours = RNN(7, 9, 2, bidirectional=True, device="meta")
    ref = nn.RNN(7, 9, 2, bidirectional=True, device="meta")
    x = torch.randn(5, 3, 7, device="meta")
    (y1, h1), (y2, h2) = ref(x), ours(x)
    assert y2.device.type == "meta" and y2.shape == y1.shape and h2.shape == h1.shape
    assert y2.dtype == y1.dtype


def test_fake_tensor_mode_gives_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        model = RNN(4, 6, batch_first=True)
        y, h = model(torch.randn(2, 9, 4))
    assert y.shape == (2, 9, 6) and h.shape == (1, 2, 6)


def flops(fn, *inputs, backward: bool) -> int:
    """What ``FlopCounterMode`` counts for ``fn(*inputs)`` (float64 leaves), and its backward."""
    from torch.utils.flop_counter import FlopCounterMode

    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    with FlopCounterMode(display=False) as counter:
        outputs = fn(*leaves)
        if backward:
            sum(o.sum() for o in outputs).backward()
    return counter.get_total_flops()


@BOTH
@pytest.mark.parametrize("cell,proj_size", [("rnn", 0), ("lstm", 0), ("lstm", 2), ("gru", 0)])
def test_flop_counter_counts_the_loops_products_as_the_reference_does(backend, cell, proj_size):
    """FlopCounterMode (MFU's source) counts the fused ops' products inside the loop: with an initial
    state given, the op forward, and forward and backward, count what the reference loop's aten
    products count. (The projected LSTM's backward makes ``d_gates @ w_hh`` once more, outside the
    loop, for w_hr's gradient.)"""
    torch.manual_seed(0)
    T, B, H, P = 5, 3, 4, proj_size
    entry, R = fastrnn.CELLS[cell], proj_size or H
    x_proj, w_hh, h0 = torch.randn(T, B, entry.gates * H), torch.randn(entry.gates * H, R), torch.randn(B, R)
    inputs = ((x_proj, h0, torch.randn(B, H), w_hh, torch.randn(P, H) if P else None) if cell == "lstm"
              else (x_proj, h0, w_hh))
    assert flops(entry.recurrence, *inputs, backward=False) == flops(entry.reference, *inputs, backward=False) > 0
    outside = 2 * T * B * 4 * H * P
    assert flops(entry.recurrence, *inputs, backward=True) == flops(entry.reference, *inputs, backward=True) + outside


@BOTH
def test_flop_counter_counts_a_module_as_torchs(backend):
    """A training step's count for fastrnn's modules, an initial state given, is torch's for its Elman
    and GRU (which torch's CPU path runs as aten's products, step by step, as FlopCounterMode counts
    them)."""
    torch.manual_seed(0)
    x, h0 = torch.randn(6, 3, 4), torch.randn(4, 3, 5)
    for cell in ("rnn", "gru"):
        ours = fastrnn.CELLS[cell].module(4, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
        theirs = fastrnn.CELLS[cell].torch_module(4, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
        counts = [flops(lambda x, h0: (m(x, h0)[0],), x, h0, backward=True) for m in (ours, theirs)]
        assert counts[0] == counts[1] > 0, cell


@BOTH
def test_cpu_autocast_behaves_as_torch(backend):
    torch.manual_seed(2)
    ref = nn.RNN(6, 8, 2)
    ours = RNN(6, 8, 2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, h1 = ref(x)
        y2, h2 = ours(x)
    assert y2.dtype == y1.dtype and h2.dtype == h1.dtype
    torch.testing.assert_close(y2.float(), y1.float(), rtol=3e-2, atol=3e-2)
    y2.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell,proj_size,compiled", [("lstm", 0, False), ("lstm", 3, False), ("lstm", 3, True),
                                                     ("gru", 0, False), ("gru", 0, True)])
def test_cpu_autocast_gives_torchs_dtypes_for_every_cell(backend, cell, proj_size, compiled):
    """Under the CPU's bf16 autocast torch's LSTM returns bf16 (but with a projection c_n in fp32: its
    CPU path carries c in c0's dtype there) and its GRU, on none of the CPU autocast's lists, fp32
    (its products inside in bf16): ours gives the same dtypes, eager and compiled, and results within
    bf16's tolerance (before, the twins' GRU returned bf16 there, and the projected LSTM's c_n)."""
    torch.manual_seed(2)
    kwargs = dict(proj_size=proj_size) if proj_size else {}
    ref = fastrnn.CELLS[cell].torch_module(6, 8, 2, bidirectional=True, **kwargs)
    ours = fastrnn.CELLS[cell].module(6, 8, 2, bidirectional=True, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 6)
    run = torch.compile(ours, backend="aot_eager") if compiled else ours
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y1, h1), (y2, h2) = ref(x), run(x)
    states = list(zip(h1, h2)) if cell == "lstm" else [(h1, h2)]
    assert y2.dtype == y1.dtype and all(a.dtype == b.dtype for a, b in states)
    for a, b in [(y1, y2), *states]:
        torch.testing.assert_close(b.float(), a.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("packed,x_dtype,h_dtype", [
    (False, torch.bfloat16, None), (False, torch.float32, torch.bfloat16), (False, torch.bfloat16, torch.float32),
    (True, torch.float32, None), (True, torch.bfloat16, torch.float32)])
def test_cpu_autocast_takes_what_torchs_modules_take(backend, cell, packed, x_dtype, h_dtype):
    """A bf16 input (a Linear's under autocast: a CRNN), a bf16 state, a packed batch: under the CPU's
    autocast each cell takes what torch's takes and returns its dtypes, values within bf16's tolerance,
    and the gradients' dtypes (the GRU refused a bf16 input or state; the packed LSTM returned bf16
    where torch's, which autocast leaves alone there, returns the state's dtype)."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(4)
    ref, ours = fastrnn.CELLS[cell].torch_module(5, 6), fastrnn.CELLS[cell].module(5, 6)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5, dtype=x_dtype, requires_grad=True)
    h = torch.randn(1, 3, 6, dtype=h_dtype) if h_dtype is not None else None
    hx = (h, torch.randn(1, 3, 6, dtype=h_dtype)) if cell == "lstm" and h is not None else h
    results = []
    for module in (ref, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, state = module(pack_padded_sequence(x, torch.tensor([4, 3, 1])) if packed else x, hx)
        y = y.data if packed else y
        parts = state if isinstance(state, tuple) else (state,)
        grads = torch.autograd.grad(y.float().sum(), [x, *module.parameters()])
        results.append([y, *parts, *grads])
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("backend", ["auto", "torch"], indirect=True)
def test_cpu_autocast_left_alone_follows_c0_takes_a_namedtuple_and_refuses_float64(backend):
    """Where autocast leaves torch's module alone (a packed LSTM, the GRU): its results take c0's dtype,
    a namedtuple state works, and a float64 module refuses a bf16 input, as torch's do."""
    from collections import namedtuple

    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(5)
    ref, ours = nn.LSTM(3, 4), fastrnn.LSTM(3, 4)
    ours.load_state_dict(ref.state_dict())
    packed = pack_padded_sequence(torch.randn(5, 2, 3, dtype=torch.bfloat16), torch.tensor([5, 3]))
    State = namedtuple("State", "h c")
    for h_dtype, c_dtype in [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]:
        hx = State(torch.randn(1, 2, 4, dtype=h_dtype), torch.randn(1, 2, 4, dtype=c_dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            (y1, (h1, c1)), (y2, (h2, c2)) = ref(packed, hx), ours(packed, hx)
        assert y1.data.dtype == y2.data.dtype == c_dtype and h1.dtype == h2.dtype and c1.dtype == c2.dtype
        torch.testing.assert_close(y2.data.float(), y1.data.float(), rtol=3e-2, atol=3e-2)
    for module in (nn.GRU(3, 4).double(), fastrnn.GRU(3, 4).double()):
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises((RuntimeError, ValueError), match="dtype"):
            module(torch.randn(5, 2, 3, dtype=torch.bfloat16))


@BOTH
def test_deterministic_mode_and_bitwise_repeatability(backend):
    torch.use_deterministic_algorithms(True)
    try:
        model = RNN(4, 16, 2, bidirectional=True)
        x = torch.randn(7, 5, 4, requires_grad=True)
        h0 = torch.randn(4, 5, 16, requires_grad=True)
        a, b = _grads(model, x, h0), _grads(model, x, h0)
    finally:
        torch.use_deterministic_algorithms(False)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_module_hygiene(tmp_path):
    torch.manual_seed(3)
    model = RNN(3, 5, 2, dropout=0.1)
    x = torch.randn(4, 2, 3)
    model.eval()
    want = model(x)[0]
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x)[0], want)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x)[0], want)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    fresh = RNN(3, 5, 2, dropout=0.1).eval()
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    torch.testing.assert_close(fresh(x)[0], want)
    d = copy.deepcopy(model).to(torch.float64)
    assert d.weight_hh_l0.dtype == torch.float64 and d(x.double())[0].dtype == torch.float64
    assert copy.deepcopy(model).half().weight_ih_l0.dtype == torch.float16
    b = copy.deepcopy(model).bfloat16()
    assert b(x.bfloat16())[0].dtype == torch.bfloat16
    model.share_memory()
    assert all(p.is_shared() for p in model.parameters())
    params = {n: p * 2 for n, p in model.named_parameters()}
    out = torch.func.functional_call(model, params, (x,))[0]
    ref = nn.RNN(3, 5, 2).eval()
    ref.load_state_dict({n: p * 2 for n, p in model.state_dict().items()})
    torch.testing.assert_close(out, ref(x)[0])


def test_distributed_data_parallel_wrap(tmp_path):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path}/pg")
    try:
        model = RNN(3, 4)
        ddp = nn.parallel.DistributedDataParallel(model)
        y, h = ddp(torch.randn(5, 2, 3))
        y.sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    finally:
        dist.destroy_process_group()


@BOTH
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_per_sample_gradients_by_expanded_weights_are_torchs(backend, cell):
    """``call_for_per_sample_grads`` (ExpandedWeights, PyTorch's module tests' per-sample gradients):
    torch decomposes its module's op for them, so the call runs torch's module, on every backend,
    and each parameter's ``grad_sample`` is torch's."""
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    torch.manual_seed(0)
    theirs = fastrnn.CELLS[cell].torch_module(2, 3, batch_first=True, dtype=torch.float64)
    ours = fastrnn.CELLS[cell].module(2, 3, batch_first=True, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 5, 2, dtype=torch.float64)
    for module in (ours, theirs):
        call_for_per_sample_grads(module, batch_size=4, batch_first=True)(x)[0].pow(2).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad_sample, q.grad_sample, rtol=1e-12, atol=1e-12, msg=name)
    for p in ours.parameters():
        p.grad_sample = None  # (ExpandedWeights refuses to add to those of an earlier call)
    with pytest.raises(NotImplementedError, match="resets with .* ExpandedWeights"):
        call_for_per_sample_grads(ours, batch_size=4, batch_first=True)(x, resets=torch.zeros(4, 5, dtype=bool))


class Boxed:
    """No tensor, yet takes part in torch's functions through ``__torch_function__``, as PyTorch's
    test_overrides' ``Wrapper`` (whose RNN test this mirrors): unboxed, called, boxed again."""

    def __init__(self, t):
        self.t = t

    def __getattr__(self, name):
        value = getattr(self.t, name)
        if callable(value) and not isinstance(value, torch.device):
            method = getattr(torch.Tensor, name)
            return lambda *args, **kwargs: self.__torch_function__(method, (Boxed,), (self, *args), kwargs)
        return _box(value)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        unbox = lambda a: a.t if isinstance(a, Boxed) else a  # noqa: E731
        return _box(func(*pytree.tree_map(unbox, args), **pytree.tree_map(unbox, kwargs or {})))


def _box(value):
    return pytree.tree_map(lambda v: Boxed(v) if isinstance(v, torch.Tensor) else v, value)


@BOTH
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_an_input_that_takes_part_through_torch_function_as_torchs(backend, cell):
    """An input that is no tensor but has ``__torch_function__`` (torch's module hands its op to it):
    torch's module's results, in the input's own kind."""
    torch.manual_seed(0)
    theirs = fastrnn.CELLS[cell].torch_module(2, 3, 2)
    ours = fastrnn.CELLS[cell].module(2, 3, 2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 5, 2)
    got, want = ours(Boxed(x))[0], theirs(Boxed(x))[0]
    assert isinstance(got, Boxed)
    torch.testing.assert_close(got.t, want.t, rtol=0, atol=0)
