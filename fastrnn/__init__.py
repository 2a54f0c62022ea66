"""fastrnn: recurrent networks (Elman RNN, LSTM, GRU) whose time recurrence runs in fused Triton
kernels; drop-ins for torch.nn.RNN, torch.nn.LSTM and torch.nn.GRU."""

import torch as _torch

from .cells import CELLS, Cell
from .conversion import convert
from .elman import RNN, recurrence, recurrence_reference
from .gru import GRU, gru_recurrence, gru_reference
from .lstm import LSTM, lstm_recurrence, lstm_reference

# A whole pickled model holding fastrnn's modules loads with torch.load's default weights_only=True.
_torch.serialization.add_safe_globals([cell.module for cell in CELLS.values()])

__all__ = ["RNN", "LSTM", "GRU", "CELLS", "Cell", "recurrence", "recurrence_reference", "lstm_recurrence",
           "lstm_reference", "gru_recurrence", "gru_reference", "convert"]
__version__ = "0.1.0"
