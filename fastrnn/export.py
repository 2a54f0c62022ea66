"""ONNX export of fastrnn's modules: ``fastrnn.RNN`` as ONNX's own ``RNN`` operator.

The fused custom ops have no ONNX form, so under ``torch.onnx.export`` ``RNN.forward`` hands its
whole forward to ``onnx_forward``:

- the default exporter (``torch.export`` based, ``dynamo=True``): one ONNX ``RNN`` node per layer,
  both directions in one node, emitted with ``torch.onnx.ops.symbolic_multi_out``; the sequence
  length (and batch) may be dynamic;
- the TorchScript exporter (``dynamo=False``), PackedSequence input, or a torch without
  ``torch.onnx.ops``: ``torch.nn.RNN``'s own forward on the same weights, so the model exports
  exactly as ``torch.nn.RNN`` does.

``fastrnn.LSTM`` and ``fastrnn.GRU`` export through ``torch.nn.LSTM``'s and ``torch.nn.GRU``'s own
forward on the same weights, exactly as those modules do.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from .op import exporting


def in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without its two imports on every eager call."""
    if torch.compiler.is_compiling():  # (Dynamo knows the public function, and skips the flags' modules)
        return torch.onnx.is_in_onnx_export()
    flags = _exporter_flags()
    if flags is None:
        return torch.onnx.is_in_onnx_export()
    torchscript, dynamo = flags
    return torchscript.in_onnx_export or dynamo._is_onnx_exporting


@functools.cache
def _exporter_flags():
    """The exporters' flags where this torch keeps them (where ``is_in_onnx_export`` reads them), or
    None: then the public function is asked."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return None
    return GLOBALS, _flags


def onnx_forward(rnn: nn.RNNBase, input: Tensor | PackedSequence, hx):
    """What the module's forward returns, in operators the ONNX exporters translate."""
    from .cells import cell_of  # (the registry imports the modules, which import this file)

    torch_forward = cell_of(rnn).torch_module.forward  # torch's own, even after a swap
    use_rnn_nodes = (rnn.mode.startswith("RNN_") and exporting()
                     and hasattr(torch.onnx, "ops") and not isinstance(input, PackedSequence))
    if not use_rnn_nodes:
        return torch_forward(rnn, input, hx)
    batched = input.dim() == 3
    if not batched:
        input = input.unsqueeze(0 if rnn.batch_first else 1)
        hx = hx.unsqueeze(1) if hx is not None else None
    x = input.transpose(0, 1) if rnn.batch_first else input  # (T, B, I)
    directions = 2 if rnn.bidirectional else 1
    h_n = []
    for layer in range(rnn.num_layers):
        h0 = hx[layer * directions:(layer + 1) * directions] if hx is not None else None
        x, h_last = _rnn_node(rnn, layer, x, h0)  # (T, B, D * H), (D, B, H)
        h_n.append(h_last)
        if rnn.dropout > 0 and rnn.training and layer < rnn.num_layers - 1:
            x = F.dropout(x, rnn.dropout, training=True)
    output, h_n = (x.transpose(0, 1) if rnn.batch_first else x), torch.cat(h_n)
    if not batched:
        output, h_n = output.squeeze(0 if rnn.batch_first else 1), h_n.squeeze(1)
    return output, h_n


def _rnn_node(rnn: nn.RNNBase, layer: int, x: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """One layer, all its directions, as one ONNX ``RNN`` node: ``x (T, B, I)``, ``h0 (D, B, H)``
    or None -> ``(T, B, D * H)``, ``(D, B, H)``."""
    suffixes = ["", "_reverse"] if rnn.bidirectional else [""]

    def stacked(name: str) -> Tensor:  # weight_ih_l0 and weight_ih_l0_reverse -> (D, H, I), ...
        return torch.stack([getattr(rnn, f"{name}_l{layer}{suffix}") for suffix in suffixes])

    w, r = stacked("weight_ih"), stacked("weight_hh")
    b = torch.cat([stacked("bias_ih"), stacked("bias_hh")], -1) if rnn.bias else None  # (D, 2H)
    T, B, H, D = x.shape[0], x.shape[1], rnn.hidden_size, len(suffixes)
    y, h_n = torch.onnx.ops.symbolic_multi_out(
        "RNN", [x, w, r, b, None, h0],
        {"activations": [rnn.nonlinearity.capitalize()] * D, "hidden_size": H,
         "direction": "bidirectional" if D == 2 else "forward"},
        dtypes=[x.dtype, x.dtype], shapes=[[T, D, B, H], [D, B, H]])
    return y.transpose(1, 2).reshape(T, B, D * H), h_n  # ONNX's Y is (T, D, B, H)
