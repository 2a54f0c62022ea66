"""fastrnn: recurrent networks (Elman RNN, LSTM, GRU) whose time recurrence runs in fused Triton
kernels; drop-ins for torch.nn.RNN, torch.nn.LSTM and torch.nn.GRU."""

import torch as _torch

from .gru import gru_recurrence, gru_reference
from .lstm import lstm_recurrence, lstm_reference
from .ops import recurrence, recurrence_reference
from .rnn import GRU, LSTM, RNN

# A whole pickled model holding fastrnn's modules loads with torch.load's default weights_only=True.
_torch.serialization.add_safe_globals([RNN, LSTM, GRU])

__all__ = ["RNN", "LSTM", "GRU", "recurrence", "recurrence_reference", "lstm_recurrence",
           "lstm_reference", "gru_recurrence", "gru_reference"]
__version__ = "0.1.0"
