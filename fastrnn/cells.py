"""The registry of cells: the one place that lists them.

Each entry says what a cell is (its gates and state), which torch module it replaces, and where its
parts live: the module, the functional op and its readable reference. The modules, ONNX export, the
command line's choices, the benchmarks and the compile sweep read it; adding a cell means its own
files (``fastrnn/<cell>.py``, ``kernels/<cell>.py``, ``tests/test_<cell>.py``) and one entry here.

The torch classes are captured when fastrnn is imported, so code that swaps them afterwards
(``torch.nn.LSTM = fastrnn.LSTM``, the drop-in way) still finds torch's own here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import elman, gru, lstm


@dataclass(frozen=True)
class Cell:
    name: str  # "rnn", "lstm", "gru": the command line's and the benchmarks' name
    module: type  # the fastrnn module, e.g. fastrnn.LSTM
    torch_module: type  # the torch module it replaces, as it was when fastrnn was imported
    gates: int  # rows of w_hh per hidden unit: Elman 1, LSTM 4 (i, f, g, o), GRU 3 (r, z, n)
    state: tuple[str, ...]  # the state's parts: ("h",) or ("h", "c")
    recurrence: Callable  # the functional op: one layer and direction over a whole sequence
    reference: Callable  # its readable loop, the oracle the op is tested against
    kernels: str  # the module of its Triton launchers, under fastrnn.kernels


CELLS: dict[str, Cell] = {
    "rnn": Cell("rnn", elman.RNN, nn.RNN, 1, ("h",), elman.recurrence, elman.recurrence_reference,
                "elman"),
    "lstm": Cell("lstm", lstm.LSTM, nn.LSTM, 4, ("h", "c"), lstm.lstm_recurrence, lstm.lstm_reference,
                 "lstm"),
    "gru": Cell("gru", gru.GRU, nn.GRU, 3, ("h",), gru.gru_recurrence, gru.gru_reference, "gru"),
}


def cell_of(module) -> Cell:
    """The cell of a fastrnn or torch module (an instance or a class)."""
    cls = module if isinstance(module, type) else type(module)
    for cell in CELLS.values():
        if issubclass(cls, (cell.module, cell.torch_module)):
            return cell
    raise TypeError(f"{cls.__name__} is not one of fastrnn's cells ({', '.join(CELLS)})")
