"""Saving, loading and exporting as torch users do: torch.save of a whole model and torch.load with
its default weights_only=True; torch.onnx.export run by onnxruntime on the CPU against eager."""

import io
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn

import fastrnn
from fastrnn import RNN
from fastrnn.scratch import RNNModel


class Tagger(nn.Module):
    """A user's own model around fastrnn.RNN, as in pytorch/examples' word_language_model."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = RNN(3, 5, 2, dropout=0.1)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def test_whole_model_loads_with_weights_only():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 3)
    for model in (RNN(3, 5, 2, bidirectional=True).eval(), Tagger().eval()):
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        # the user allowlists their own classes (and torch's) as torch asks; fastrnn's are allowlisted
        with torch.serialization.safe_globals([Tagger, nn.Linear]):
            loaded = torch.load(buf)  # weights_only=True, torch's default
        assert type(loaded) is type(model)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def _onnx_run(path, *inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


def _assert_matches(got, want):
    for g, w in zip(got, want):
        w = w.detach().numpy()
        assert g.shape == w.shape
        assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w)


CASES = {
    "tanh": dict(),
    "relu, 2 layers, bidirectional, batch_first": dict(nonlinearity="relu", num_layers=2,
                                                       bidirectional=True, batch_first=True),
    "tanh, 2 layers, bidirectional, no bias": dict(num_layers=2, bidirectional=True, bias=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_onnx_export_runs_in_onnxruntime_with_dynamic_length_and_batch(tmp_path, case):
    kw = CASES[case]
    torch.manual_seed(0)
    rnn = RNN(4, 8, **kw).eval()
    states = (2 if kw.get("bidirectional") else 1) * kw.get("num_layers", 1)
    t_dim, b_dim = (1, 0) if kw.get("batch_first") else (0, 1)

    def inputs(T, B):
        x = torch.randn(B, T, 4) if kw.get("batch_first") else torch.randn(T, B, 4)
        return x, torch.randn(states, B, 8)

    T, B = torch.export.Dim("T"), torch.export.Dim("B")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(rnn, inputs(5, 3), tmp_path / "rnn.onnx",
                          dynamic_shapes=({t_dim: T, b_dim: B}, {1: B}))
    ops = {node.op_type for node in onnx.load(tmp_path / "rnn.onnx").graph.node}
    assert "RNN" in ops  # ONNX's own operator, one node per layer
    for shape in ((5, 3), (11, 2), (1, 1)):
        x, h0 = inputs(*shape)
        with torch.no_grad():
            _assert_matches(_onnx_run(tmp_path / "rnn.onnx", x, h0), rnn(x, h0))


def test_onnx_export_of_a_char_lm_without_h0_and_unbatched(tmp_path):
    torch.manual_seed(0)
    lm = RNNModel(RNN(10, 16), 10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(lm, (torch.randint(0, 10, (2, 7)), lm.begin_state(2, "cpu")),
                          tmp_path / "lm.onnx", dynamic_shapes=({1: torch.export.Dim("T")}, None))
        rnn = RNN(4, 8, bidirectional=True).eval()
        torch.onnx.export(rnn, (torch.randn(5, 4),), tmp_path / "unbatched.onnx",
                          dynamic_shapes=({0: torch.export.Dim("T")},))
    X, state = torch.randint(0, 10, (2, 12)), torch.randn(1, 2, 16)
    x = torch.randn(9, 4)
    with torch.no_grad():
        _assert_matches(_onnx_run(tmp_path / "lm.onnx", X, state), lm(X, state))
        _assert_matches(_onnx_run(tmp_path / "unbatched.onnx", x), rnn(x))


def test_torchscript_onnx_exporter_exports_as_torch_nn_rnn(tmp_path):
    torch.manual_seed(0)
    rnn = RNN(4, 8, 2, nonlinearity="relu", bidirectional=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(rnn, (torch.randn(5, 3, 4),), tmp_path / "rnn.onnx", dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "T"}})
    x = torch.randn(8, 3, 4)
    with torch.no_grad():
        _assert_matches(_onnx_run(tmp_path / "rnn.onnx", x), rnn(x))


@pytest.mark.parametrize("cell", list(fastrnn.CELLS))
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_export_after_the_drop_in_swap(tmp_path, monkeypatch, cell, exporter):
    """``torch.nn.LSTM = fastrnn.LSTM`` (the drop-in way), then a model built and exported as torch
    users do: the export falls back on torch's own module, captured when fastrnn was imported, and
    does not recurse into fastrnn's."""
    entry = fastrnn.CELLS[cell]
    monkeypatch.setattr(nn, entry.torch_module.__name__, entry.module)
    torch.manual_seed(0)
    model = getattr(nn, entry.torch_module.__name__)(4, 6, 2, bidirectional=True).eval()
    assert isinstance(model, entry.module)
    x = torch.randn(5, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), tmp_path / "m.onnx", dynamo=exporter == "dynamo")
    with torch.no_grad():
        want = model(x)
    got = _onnx_run(tmp_path / "m.onnx", x)
    _assert_matches(got[:1], want[:1])


@pytest.mark.parametrize("cell", list(fastrnn.CELLS))
def test_onnx_export_refuses_a_wrongly_shaped_state(tmp_path, cell):
    """As eager fastrnn and torch's own export do: the eager checks run on the export path too."""
    entry = fastrnn.CELLS[cell]
    model = entry.module(4, 6).eval()
    h = torch.zeros(1, 2, 6)  # the batch is 3
    hx = (h, torch.zeros(1, 3, 6)) if cell == "lstm" else h
    with warnings.catch_warnings(), pytest.raises(Exception, match="[Ee]xpected hidden"):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(5, 3, 4), hx), tmp_path / "m.onnx")
