"""fastrnn: the Elman RNN with its time recurrence in fused Triton kernels, a drop-in for torch.nn.RNN."""

from .ops import recurrence, recurrence_reference
from .rnn import RNN

__all__ = ["RNN", "recurrence", "recurrence_reference"]
__version__ = "0.1.0"
