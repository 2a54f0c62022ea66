"""Fused Triton kernels for the recurrences of fastrnn (installed as ``fastrnn.kernels``).

Elman: ``recurrence_fwd`` writes every hidden state, ``recurrence_bwd`` the pre-activation gradient.
LSTM: ``lstm_fwd`` / ``lstm_bwd``; GRU: ``gru_fwd`` / ``gru_bwd``. The autograd Functions that pair
them live in ``fastrnn.ops``, ``fastrnn.lstm`` and ``fastrnn.gru``; the launch machinery every cell
shares (variants, cooperative launch, grid barrier, configuration) in ``launch.py``, ``common.py`` and
``config.py``.
"""

from .config import Config, pick_config, pick_configs
from .gru import gru_bwd, gru_fwd
from .lstm import lstm_bwd, lstm_fwd
from .recurrence_bwd import recurrence_bwd
from .recurrence_fwd import recurrence_fwd

__all__ = ["Config", "pick_config", "pick_configs", "recurrence_fwd", "recurrence_bwd", "lstm_fwd", "lstm_bwd",
           "gru_fwd", "gru_bwd"]
