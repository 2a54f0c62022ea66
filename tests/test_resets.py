"""Resets inside a sequence (``forward(input, hx, resets=...)``): the result equals running the torch
module separately on each segment of each row, outputs, final states and every gradient, on both
backends; no resets is bit for bit the plain call; bad ``resets`` are clear errors."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

from .conftest import rel_err

BOTH = pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
F64 = torch.float64
CELLS = list(fastrnn.CELLS)


def segments(resets_row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each segment of one row: a segment starts at step 0 or at a reset."""
    T = resets_row.numel()
    starts = [0] + [t for t in range(1, T) if resets_row[t]]
    return list(zip(starts, starts[1:] + [T]))


def per_segment(module, x, hx, resets, cell):
    """The definition: ``module`` (torch's own) run on every segment of every row. The segment that
    starts at step 0 without a reset there takes hx for the forward directions, the one that ends at
    T - 1 takes it for the reverse directions; every other initial state is zero. Returns the output
    (T, B, D * H) and the final state as the module returns it (forward from after T - 1, reverse
    from after step 0)."""
    L, D = module.num_layers, 2 if module.bidirectional else 1
    parts = hx if cell == "lstm" else (hx,)
    T, B = x.shape[:2]
    ys, finals = [], []
    for b in range(B):
        row_y, first_state, last_state = [], None, None
        for start, end in segments(resets[:, b]):
            state = []
            for part in parts:
                s = part[:, b:b + 1].clone() if part is not None else None
                s = torch.zeros(L * D, 1, part.shape[-1], dtype=x.dtype) if s is None else s
                for layer in range(L):
                    for d in range(D):
                        takes = (start == 0 and not resets[0, b]) if d == 0 else end == T
                        if not takes:
                            s[layer * D + d] = 0
                state.append(s)
            y, final = module(x[start:end, b:b + 1], tuple(state) if cell == "lstm" else state[0])
            row_y.append(y)
            final = final if cell == "lstm" else (final,)
            first_state = first_state or final
            last_state = final
        ys.append(torch.cat(row_y))
        # the forward directions' final state is the last segment's, the reverse ones' the first's
        fin = [torch.stack([(last if i % D == 0 else first)[i] for i in range(L * D)])
               for last, first in zip(last_state, first_state)]
        finals.append(fin)
    y = torch.cat(ys, 1)
    state = tuple(torch.cat([f[k] for f in finals], 1) for k in range(len(parts)))
    return y, state if cell == "lstm" else state[0]


def _pair(cell, **kwargs):
    entry = fastrnn.CELLS[cell]
    torch.manual_seed(0)
    ref = entry.torch_module(3, 4, 2, bidirectional=True, dtype=F64, **kwargs)
    ours = entry.module(3, 4, 2, bidirectional=True, dtype=F64, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _state(cell, B, ref):
    P = ref.proj_size or ref.hidden_size
    h = torch.randn(4, B, P, dtype=F64)
    return (h, torch.randn(4, B, ref.hidden_size, dtype=F64)) if cell == "lstm" else h


def _flat(out):
    y, state = out
    return [y, *(state if isinstance(state, tuple) else (state,))]


@BOTH
@pytest.mark.parametrize("cell,proj", [("rnn", 0), ("lstm", 0), ("lstm", 2), ("gru", 0)])
def test_resets_equal_running_each_segment(backend, cell, proj, one_thread):
    T, B = 7, 4
    ref, ours = _pair(cell, **({"proj_size": proj} if proj else {}))
    x = torch.randn(T, B, 3, dtype=F64)
    hx = _state(cell, B, ref)
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[3, 0] = resets[0, 1] = resets[1, 2] = resets[5, 2] = resets[6, 2] = True  # row 3: none
    upstream = [torch.randn_like(t) for t in _flat(ours(x, hx))]

    def run(module, fn):
        leaves = [x.clone().requires_grad_()] + [s.clone().requires_grad_() for s in _flat((None, hx))[1:]]
        out = _flat(fn(module, leaves[0], tuple(leaves[1:]) if cell == "lstm" else leaves[1]))
        torch.autograd.backward(out, upstream)
        return out + [t.grad for t in leaves] + [p.grad for p in module.parameters()]

    want = run(ref, lambda m, x, h: per_segment(m, x, h, resets, cell))
    got = run(ours, lambda m, x, h: m(x, h, resets=resets))
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) <= 1e-9, i


@BOTH
@pytest.mark.parametrize("cell", CELLS)
def test_no_resets_is_the_plain_call_bit_for_bit(backend, cell):
    _, ours = _pair(cell)
    x = torch.randn(5, 3, 3, dtype=F64, requires_grad=True)
    plain = _flat(ours(x))
    none = _flat(ours(x, resets=torch.zeros(5, 3, dtype=torch.bool)))
    assert all(torch.equal(a, b) for a, b in zip(plain, none))


@pytest.mark.parametrize("cell", CELLS)
def test_batch_first_and_unbatched_layouts(cell):
    _, ours = _pair(cell)
    x = torch.randn(6, 2, 3, dtype=F64)
    resets = torch.tensor([[0, 0], [0, 1], [0, 0], [1, 0], [0, 0], [0, 1]], dtype=torch.bool)
    want = ours(x, resets=resets)[0]
    ours.batch_first = True
    assert torch.equal(ours(x.transpose(0, 1), resets=resets.t())[0], want.transpose(0, 1))
    ours.batch_first = False
    assert rel_err(ours(x[:, 1], resets=resets[:, 1])[0], want[:, 1]) <= 1e-12  # (a batch of 1: other sums)


@pytest.mark.parametrize("cell", CELLS)
def test_bad_resets_are_clear_errors(cell):
    _, ours = _pair(cell)
    x = torch.randn(5, 3, 3, dtype=F64)
    with pytest.raises(TypeError, match="resets"):
        ours(x, resets=torch.zeros(5, 3))
    with pytest.raises(ValueError, match="resets must have shape \\(5, 3\\)"):
        ours(x, resets=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="resets"):
        ours(x, resets=torch.zeros(5, 3, dtype=torch.bool, device="meta"))
    packed = pack_padded_sequence(x, torch.tensor([5, 3, 2]))
    with pytest.raises(ValueError, match="resets cannot be given with a PackedSequence"):
        ours(packed, resets=torch.zeros(5, 3, dtype=torch.bool))


@pytest.mark.parametrize("cell", CELLS)
def test_resets_compile_fullgraph(cell):
    _, ours = _pair(cell)
    x = torch.randn(5, 3, 3, dtype=F64)
    resets = torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) < 0.3
    want = ours(x, resets=resets)[0]
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, resets=resets)[0], want)


@pytest.mark.parametrize("cell,proj", [("rnn", 0), ("lstm", 0), ("lstm", 2), ("gru", 0)])
@pytest.mark.parametrize("variant", ["resident", "tiled", "stepwise"])
def test_resets_in_every_kernel_variant(cell, proj, variant, monkeypatch, one_thread):
    """The fused kernels, each variant forced (the stepwise one launched once per step), against the
    PyTorch twins (the test above holds those to the definition), outputs and gradients."""
    if cell != "rnn" and variant == "resident":
        pytest.skip("the gated cells have no resident variant")
    _, ours = _pair(cell, **({"proj_size": proj} if proj else {}))
    x = torch.randn(6, 3, 3, dtype=F64)
    resets = torch.tensor([[0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    upstream = [torch.randn_like(t) for t in _flat(ours(x))]
    results = []
    for backend, forced in (("torch", ""), ("triton", variant)):
        monkeypatch.setenv("FASTRNN_BACKEND", backend)
        monkeypatch.setenv("FASTRNN_VARIANT", forced)
        ours.zero_grad()
        xi = x.clone().requires_grad_()
        out = _flat(ours(xi, resets=resets))
        torch.autograd.backward(out, upstream)
        results.append(out + [xi.grad] + [p.grad.clone() for p in ours.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        assert rel_err(a, b) <= 1e-9, i
