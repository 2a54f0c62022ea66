"""Fused Triton kernels for the Elman recurrence (installed as ``fastrnn.kernels``).

``recurrence_fwd`` writes every hidden state; ``recurrence_bwd`` the pre-activation gradient.
The autograd Function that pairs them lives in ``fastrnn.ops``.
"""

from .config import Config, pick_config
from .recurrence_bwd import recurrence_bwd
from .recurrence_fwd import recurrence_fwd

__all__ = ["Config", "pick_config", "recurrence_fwd", "recurrence_bwd"]
