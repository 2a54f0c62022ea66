"""``fastrnn.RNN``: a drop-in for ``torch.nn.RNN`` whose time loop is ``fastrnn.recurrence``.

The module is a thin shell. ``torch.nn.RNNBase`` gives the constructor checks, parameter names
(``weight_ih_l0``, ..., ``_reverse``), shapes, init and ``state_dict`` layout, so both modules load
each other's weights. ``forward`` validates the input as ``torch.nn.RNN`` does, projects the input of
each layer for all steps with one matrix product, and hands every layer and direction to ``recurrence``.
(It subclasses ``RNNBase`` and not ``nn.RNN`` itself, so ``torch.compile`` does not treat it as a
cuDNN RNN and break the graph.)
"""

from __future__ import annotations


import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from .ops import recurrence


class RNN(nn.RNNBase):
    """Elman RNN, ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``; same arguments, shapes
    and results as ``torch.nn.RNN``."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None,
                 **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"RNN got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        if nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(mode, input_size, hidden_size, num_layers=num_layers, bias=bias,
                         batch_first=batch_first, dropout=dropout, bidirectional=bidirectional,
                         device=device, dtype=dtype)

    def flatten_parameters(self) -> None:
        """Accepted for compatibility; the fused path needs no flat cuDNN weight buffer."""

    def _layer_weights(self, layer: int, direction: int):
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        w_ih = getattr(self, "weight_ih" + suffix)
        w_hh = getattr(self, "weight_hh" + suffix)
        b = getattr(self, "bias_ih" + suffix) + getattr(self, "bias_hh" + suffix) if self.bias else None
        return w_ih, w_hh, b

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None):
        """``input (T, B, I)`` (``(B, T, I)`` with batch_first; ``(T, I)`` unbatched; or packed),
        ``hx (layers * directions, B, H)`` -> ``output (T, B, directions * H), h_n``."""
        num_directions = 2 if self.bidirectional else 1
        is_packed = isinstance(input, PackedSequence)
        lengths = None
        if is_packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            _check_batch_sizes(data, batch_sizes)
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(data, hx if hx is not None else self._zeros(data, int(batch_sizes[0])),
                                    batch_sizes)
            x, lengths, valid = _unpack(data, batch_sizes)  # (T, B, I), (B,), (T, B)
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                input = input.unsqueeze(batch_dim)
                if hx is not None:
                    if hx.dim() != 2:
                        raise RuntimeError(
                            f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
                    hx = hx.unsqueeze(1)
            elif hx is not None and hx.dim() != 3:
                raise RuntimeError(
                    f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
            B = input.size(batch_dim)
            self.check_forward_args(input, hx if hx is not None else self._zeros(input, B), None)
            x = input.transpose(0, 1) if self.batch_first else input  # (T, B, I)
        self._check_input_matches(x, hx)
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

        h_n = []
        layer_input = x  # (T, B, I), then (T, B, directions * H)
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(num_directions):
                w_ih, w_hh, b = self._layer_weights(layer, direction)
                h0 = hx[layer * num_directions + direction] if hx is not None else None
                x_proj = F.linear(layer_input, w_ih, b)  # (T, B, H): all steps in one product
                if x_proj.dtype != w_hh.dtype:  # autocast ran the product in low precision
                    w_hh = w_hh.to(x_proj.dtype)
                    h0 = h0.to(x_proj.dtype) if h0 is not None else None
                y, h_last = recurrence(x_proj, h0, w_hh, self.nonlinearity, reverse=direction == 1,
                                       lengths=lengths)
                outputs.append(y)
                h_n.append(h_last)
            layer_input = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output, h_n = layer_input, torch.stack(h_n)  # (T, B, D * H), (L * D, B, H)

        if is_packed:
            output = PackedSequence(output[valid], batch_sizes, sorted_indices,
                                    unsorted_indices)
            return output, self.permute_hidden(h_n, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not is_batched:
            output, h_n = output.squeeze(0 if self.batch_first else 1), h_n.squeeze(1)
        return output, h_n

    def _zeros(self, x: Tensor, batch: int) -> Tensor:
        """A zero hx for shape checks only (its values are never used)."""
        num_directions = 2 if self.bidirectional else 1
        return x.new_zeros(()).expand(self.num_layers * num_directions, batch, self.hidden_size)

    def _check_input_matches(self, x: Tensor, hx: Tensor | None) -> None:
        """Refuse what torch.nn.RNN refuses deeper down: hx of another dtype or device."""
        if hx is None:
            return
        if hx.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise RuntimeError(f"RNN hx dtype ({hx.dtype}) does not match input dtype ({x.dtype})")
        if hx.device != x.device:
            raise RuntimeError("Input and hidden tensors are not at the same device, found input "
                               f"tensor at {x.device} and hidden tensor at {hx.device}")


def _check_batch_sizes(data: Tensor, batch_sizes: Tensor) -> None:
    """A packed batch layout torch.nn.RNN would choke on gets a clear error instead."""
    if batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1 or batch_sizes.numel() == 0:
        raise TypeError(f"packed input: batch_sizes must be a non-empty 1-D int64 tensor, got "
                        f"{batch_sizes.dtype} of shape {tuple(batch_sizes.shape)}")
    batch_sizes = batch_sizes.cpu()
    if (batch_sizes[1:] > batch_sizes[:-1]).any() or int(batch_sizes.min()) < 0:
        raise RuntimeError(f"packed input: batch_sizes must be non-increasing and >= 0 (sequences "
                           f"sorted by decreasing length), got {batch_sizes.tolist()}")
    if data.dim() >= 1 and int(batch_sizes.sum()) != data.size(0):
        raise RuntimeError(f"packed input: batch_sizes sum to {int(batch_sizes.sum())} but data has "
                           f"{data.size(0)} rows")


def _unpack(data: Tensor, batch_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Packed ``data (sum(lengths), I)`` -> padded ``(T, B, I)`` (zeros past each end), lengths (B,),
    and the (T, B) mask of valid steps on data's device, whose row-major order is the packed order."""
    batch_sizes = batch_sizes.cpu()
    T, B = batch_sizes.numel(), int(batch_sizes[0])
    lengths = (batch_sizes[:, None] > torch.arange(B)[None, :]).sum(0)  # (B,): steps of sequence b
    valid = (torch.arange(T)[:, None] < lengths[None, :]).to(data.device)  # (T, B)
    x = data.new_zeros(T, B, data.size(-1))
    x[valid] = data
    return x, lengths, valid
