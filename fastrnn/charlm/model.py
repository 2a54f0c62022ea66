"""The models the one training loop trains: (B, T) token ids in, (T * B, V) logits and a state out.

``--model fastrnn`` takes a cell from fastrnn's registry (``fastrnn.cells.CELLS``), ``--model torch``
the torch module it replaces, either inside ``scratch.RNNModel`` (one-hot inputs, the recurrent
layer, a linear output layer); ``--model scratch`` is the textbook Elman RNN itself.
"""

from __future__ import annotations

from torch import nn

from .. import scratch
from ..cells import CELLS

LAYERS = {"fastrnn": {name: cell.module for name, cell in CELLS.items()},
          "torch": {name: cell.torch_module for name, cell in CELLS.items()}}
"""The recurrent layer of each --model (but scratch) and --cell."""


class ScratchLM(nn.Module):
    """The textbook model (``scratch.rnn``) with its five tensors registered as parameters."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.vocab_size, self.num_hiddens = vocab_size, hidden
        names = ["W_xh", "W_hh", "b_h", "W_hq", "b_q"]
        for name, p in zip(names, scratch.get_params(vocab_size, hidden, "cpu")):
            self.register_parameter(name, nn.Parameter(p.detach()))

    def forward(self, X, state):
        """X: (B, T) token ids; state: a tuple of one (B, hidden). Returns (T * B, V) logits, state."""
        params = [self.W_xh, self.W_hh, self.b_h, self.W_hq, self.b_q]
        return scratch.rnn(scratch.one_hot(X, self.vocab_size).to(self.W_xh.dtype), state, params)

    def begin_state(self, batch_size: int, device):
        return scratch.init_rnn_state(batch_size, self.num_hiddens, device)


def build_model(kind: str, vocab_size: int, hidden: int, layers: int, dropout: float,
                cell: str = "rnn") -> nn.Module:
    """A fresh model, initialised from torch's global generator; dropout only between layers."""
    if kind == "scratch":  # one layer, the Elman cell (check_config refuses other values)
        return ScratchLM(vocab_size, hidden)
    layer = LAYERS[kind][cell](vocab_size, hidden, layers, dropout=dropout if layers > 1 else 0.0)
    return scratch.RNNModel(layer, vocab_size)
