"""Fused Triton kernels for the recurrences of fastrnn (installed as ``fastrnn.kernels``).

One file per cell, forward and backward together: ``elman.py`` (``elman_fwd`` writes every hidden
state, ``elman_bwd`` the pre-activation gradient), ``lstm.py`` (``lstm_fwd`` / ``lstm_bwd``) and
``gru.py`` (``gru_fwd`` / ``gru_bwd``). What the cells share: ``common.py`` (arithmetic, products,
the walk over time, the grid barrier), ``gates.py`` (a gated cell's per-gate loads, stores and
weights), ``config.py`` (variants and block sizes), ``launch.py`` (how a kernel runs over a
sequence) and ``operands.py`` (what every launcher checks of its operands). The ops that pair the
launchers live in ``fastrnn.elman``, ``fastrnn.lstm``, ``fastrnn.gru``.
"""

import os

from .config import Config, pick_config, pick_configs
from .elman import elman_bwd, elman_fwd
from .gru import gru_bwd, gru_fwd
from .lstm import lstm_bwd, lstm_fwd

if os.environ.get("TRITON_INTERPRET", "0") == "1" and os.environ.get("FASTRNN_CHECK_BOUNDS", "0") == "1":
    from .bounds import check_bounds

    check_bounds()

recurrence_fwd, recurrence_bwd = elman_fwd, elman_bwd  # the Elman launchers' earlier names

__all__ = ["Config", "pick_config", "pick_configs", "elman_fwd", "elman_bwd", "lstm_fwd", "lstm_bwd",
           "gru_fwd", "gru_bwd", "recurrence_fwd", "recurrence_bwd"]
