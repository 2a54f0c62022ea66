"""fastrnn's modules inside a user's training step, eager and under torch.compile: gradients each in
a storage of their own, clipping and gradient accumulation as with eager torch."""

import pytest
import torch
from torch import nn

import fastrnn

CELLS = list(fastrnn.CELLS)


class Tagger(nn.Module):
    """A user's model: an embedding, two recurrent layers, a head."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.rnn = fastrnn.CELLS[cell].module(6, 8, 2, bidirectional=True)
        self.head = nn.Linear(16, 11)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


def _model(cell: str) -> Tagger:
    torch.manual_seed(0)
    return Tagger(cell).double()


def _loss(model, tokens):
    return nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())


def _storages(model):
    """(first byte, one past the last) of every parameter's gradient."""
    spans = []
    for p in model.parameters():
        s = p.grad.untyped_storage()
        spans.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    return spans


def _assert_disjoint(spans):
    spans = sorted(spans)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, "two parameters' gradients share storage"


def _step(model, tokens, accumulate: int, clip: float | None):
    """``accumulate`` backward passes, then clipping: the gradients as an optimizer would see them."""
    model.zero_grad(set_to_none=True)
    for _ in range(accumulate):
        _loss(model, tokens).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return [p.grad.clone() for p in model.parameters()]


TOKENS = torch.randint(0, 11, (7, 3), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", CELLS)
def test_eager_gradients_have_storages_of_their_own(cell, backend):
    model = _model(cell)
    _loss(model, TOKENS).backward()
    _assert_disjoint(_storages(model))


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", CELLS)
def test_compiled_step_with_clipping_and_accumulation_matches_eager(cell, backend):
    """Compiled by inductor, the sum of the two biases once handed one tensor to both ``.grad``: clipping
    then scaled it twice and accumulation added it three times."""
    if backend == "triton" and cell != "lstm":
        pytest.skip("one cell on the interpreter is enough here; all run on the torch backend")
    eager, compiled = _model(cell), _model(cell)
    compiled.compile()
    _assert_steps_match(compiled, eager, rtol=1e-10)


def _assert_steps_match(model, reference, rtol: float) -> None:
    """Steps of ``model`` (alone, two accumulated, clipped, both) give ``reference``'s gradients, each
    in a storage of its own."""
    for accumulate, clip in ((1, None), (2, None), (1, 1e-3), (2, 1e-3)):
        want = _step(reference, TOKENS, accumulate, clip)
        got = _step(model, TOKENS, accumulate, clip)
        _assert_disjoint(_storages(model))
        for (name, _), a, b in zip(model.named_parameters(), got, want):
            torch.testing.assert_close(a, b, rtol=rtol, atol=1e-12, msg=f"{name} (x{accumulate}, clip {clip})")


class TorchTagger(nn.Module):
    """The same model as a user writes it, against torch's own module (``nn.RNN``, ``nn.LSTM``,
    ``nn.GRU``), looked up when built: swapping ``torch.nn.<Cell>`` for fastrnn's changes it."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.rnn = getattr(nn, fastrnn.CELLS[cell].torch_module.__name__)(6, 8, 2, bidirectional=True)
        self.head = nn.Linear(16, 11)

    def forward(self, tokens):
        return self.head(self.rnn(self.embed(tokens))[0])


@pytest.mark.parametrize("cell", [pytest.param(c, marks=[] if c == "lstm" else pytest.mark.slow) for c in CELLS])
def test_swapped_in_and_compiled_trains_as_torchs_module(cell, monkeypatch):
    """A user's model with ``torch.nn.<Cell> = fastrnn.<Cell>`` and ``model.compile()``: each step's
    gradients, accumulated and clipped, are torch's own module's, eager."""
    torch.manual_seed(0)
    want_model = TorchTagger(cell).double()
    monkeypatch.setattr(nn, fastrnn.CELLS[cell].torch_module.__name__, fastrnn.CELLS[cell].module)
    ours = TorchTagger(cell).double()
    assert type(ours.rnn) is fastrnn.CELLS[cell].module
    ours.load_state_dict(want_model.state_dict())
    ours.compile()
    _assert_steps_match(ours, want_model, rtol=1e-9)


@pytest.mark.parametrize("cell", CELLS)
def test_results_the_loss_does_not_read_get_no_gradient_made(cell, monkeypatch):
    """A training step whose loss reads only the output makes no zero gradient for the final states:
    each layer and direction's backward launch is handed None for them (where zeros would be one more
    fill launched each). A loss that also reads h_n hands its gradient over (and the LSTM's c_n's
    stays None); one on h_n alone hands the top layer None for its output's."""
    import importlib

    from fastrnn.backend import loop

    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    kernels = importlib.import_module(f"fastrnn.kernels.{fastrnn.CELLS[cell].kernels}")
    name = f"{fastrnn.CELLS[cell].kernels}_bwd"
    real, grads = getattr(kernels, name), []  # (dy, dh_n[, dc_n]) of each launch, the top layer's first
    monkeypatch.setattr(kernels, name, lambda *args, **kwargs: grads.append(args[:3 if cell == "lstm" else 2])
                        or real(*args, **kwargs))
    loop.cache_clear()  # (it keeps the launcher it found)
    try:
        model = _model(cell)
        _loss(model, TOKENS).backward()
        assert len(grads) == 4 and all(g is None for given in grads for g in given[1:])
        assert all(given[0] is not None for given in grads)
        for reads_output in (True, False):
            grads.clear()
            output, state = model.rnn(model.embed(TOKENS))
            h_n = state[0] if cell == "lstm" else state
            (h_n.square().sum() + (output.sum() if reads_output else 0)).backward()
            assert len(grads) == 4 and all(given[1] is not None for given in grads)
            assert cell != "lstm" or all(given[2] is None for given in grads)
            assert [given[0] is not None for given in grads] == [reads_output] * 2 + [True] * 2
    finally:
        loop.cache_clear()


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("cell", CELLS)
def test_a_batch_first_bidirectional_gradient_is_read_where_it_lies(cell, backend):
    """The output's gradient reaches each direction's backward of a batch-first, bidirectional model
    as a view with contiguous rows (its direction's half, batch-major): the fused backward reads it
    there, no copy of it made; the gradients are torch's."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    ours = fastrnn.CELLS[cell].module(3, 4, 2, batch_first=True, bidirectional=True).double()
    theirs = fastrnn.CELLS[cell].torch_module(3, 4, 2, batch_first=True, bidirectional=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 5, 8, dtype=torch.float64)
    with profile(activities=[ProfilerActivity.CPU]) as run:
        got = torch.autograd.grad((ours(x)[0] * w).sum(), [x, *ours.parameters()])
    want = torch.autograd.grad((theirs(x)[0] * w).sum(), [x, *theirs.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    nodes = [e for e in run.events() if e.name in ("ElmanBackward", "LSTMBackward", "GRUBackward")]
    assert len(nodes) == 4  # two layers, two directions

    def copies(event):
        return (event.name == "aten::clone") + sum(copies(child) for child in event.cpu_children)

    assert sum(copies(node) for node in nodes) == 0
