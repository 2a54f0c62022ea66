"""``fastrnn.RNN``, ``fastrnn.LSTM``, ``fastrnn.GRU``: drop-ins for the torch modules of the same names
whose time loops are ``fastrnn.recurrence``, ``fastrnn.lstm_recurrence`` and ``fastrnn.gru_recurrence``.

The modules are thin shells. ``torch.nn.RNNBase`` gives the constructor checks, parameter names
(``weight_ih_l0``, ..., ``_reverse``), shapes, init and ``state_dict`` layout, so each module and its
torch twin load each other's weights; the torch modules' own ``check_forward_args`` and
``permute_hidden`` check and reorder the state. ``forward`` (one, in ``FusedRNNBase``) validates the
input as the torch modules do, projects the input of each layer for all steps with one matrix
product, and hands every layer and direction to the cell's recurrence. (They subclass ``RNNBase``
and not ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, so ``torch.compile`` does not treat them as cuDNN RNNs
and break the graph.)

Inside ``forward`` the state is a tuple of parts, each ``(layers * directions, B, N)``: ``(h,)`` for
RNN and GRU, ``(h, c)`` for LSTM; ``_public_state`` turns it into what the torch module returns.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from .export import onnx_forward
from .gru import gru_recurrence
from .lstm import lstm_recurrence
from .ops import recurrence


class FusedRNNBase(nn.RNNBase):
    """The forward every fastrnn module shares; a cell says how one layer and direction runs
    (``_run_direction``) and what its state looks like (``_state_sizes``, ``_public_state``)."""

    def flatten_parameters(self) -> None:
        """Accepted for compatibility; the fused path needs no flat cuDNN weight buffer."""

    @property
    def _name(self) -> str:  # RNN, LSTM or GRU, as the torch modules name themselves in errors
        return self.mode.split("_")[0]

    def forward(self, input: Tensor | PackedSequence, hx=None):
        """``input (T, B, I)`` (``(B, T, I)`` with batch_first; ``(T, I)`` unbatched; or packed) and
        the state as the torch module takes it -> ``output (T, B, directions * P)`` and the state."""
        if torch.onnx.is_in_onnx_export():  # the fused ops have no ONNX form: see fastrnn/export.py
            return onnx_forward(self, input, hx)
        x, state, packing, batched = self._prepare(input, hx)  # (T, B, I), parts (L * D, B, N)
        output, state = self._run_layers(x, state, packing[0] if packing else None)
        if packing is not None:
            lengths, rows, batch_sizes, sorted_indices, unsorted_indices = packing
            output = PackedSequence(output.flatten(0, 1).index_select(0, rows), batch_sizes,
                                    sorted_indices, unsorted_indices)
            return output, self.permute_hidden(self._public_state(state), unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            state = tuple(s.squeeze(1) for s in state)
        return output, self._public_state(state)

    # --- checks, as the torch modules make them, and the layout the layers take ---

    def _prepare(self, input, hx):
        """Checked input as ``(T, B, I)``, the state's parts (or None), the packing (lengths, packed
        rows, batch_sizes, sorted and unsorted indices; None if not packed) and whether batched."""
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            _check_batch_sizes(data, batch_sizes)
            if hx is not None:
                hx = self.permute_hidden(hx, sorted_indices)
            self.check_forward_args(data, hx if hx is not None else self._zeros(data, int(batch_sizes[0])),
                                    batch_sizes)
            x, lengths, rows = _unpack(data, batch_sizes)  # (T, B, I), (B,), (sum(lengths),)
            packing, batched = (lengths, rows, batch_sizes, sorted_indices, unsorted_indices), True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{self._name}: Expected input to be 2D or 3D, got {input.dim()}D tensor "
                                 "instead")
            batched, batch_dim = input.dim() == 3, 0 if self.batch_first else 1
            if hx is not None:
                self._check_state_rank(hx, batched)
            if not batched:
                input = input.unsqueeze(batch_dim)
                hx = self._map_state(hx, lambda s: s.unsqueeze(1)) if hx is not None else None
            self.check_forward_args(input, hx if hx is not None else self._zeros(input, input.size(batch_dim)),
                                    None)
            x, packing = (input.transpose(0, 1) if self.batch_first else input), None
        state = self._state_parts(hx) if hx is not None else None
        self._check_state_matches(x, state)
        if x.size(0) == 0:
            raise RuntimeError(f"Expected sequence length to be larger than 0 in {self._name}")
        return x, state, packing, batched

    def _check_state_rank(self, hx, batched: bool) -> None:
        want = 3 if batched else 2
        parts, kind = self._state_parts(hx), "batched 3-D" if batched else "unbatched 2-D"
        if all(s.dim() == want for s in parts):
            return
        if len(parts) == 1:
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {parts[0].dim()}-D tensor")
        raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                           f"({parts[0].dim()}-D, {parts[1].dim()}-D) tensors")

    def _check_state_matches(self, x: Tensor, state) -> None:
        """Refuse what the torch modules refuse deeper down: a state of another dtype or device."""
        for s in state or ():
            if s.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
                raise RuntimeError(f"{self._name} hx dtype ({s.dtype}) does not match input dtype "
                                   f"({x.dtype})")
            if s.device != x.device:
                raise RuntimeError("Input and hidden tensors are not at the same device, found input "
                                   f"tensor at {x.device} and hidden tensor at {s.device}")

    def _zeros(self, x: Tensor, batch: int):
        """A zero state for shape checks only (its values are never used)."""
        D = 2 if self.bidirectional else 1
        return self._public_state(tuple(x.new_zeros(()).expand(self.num_layers * D, batch, n)
                                        for n in self._state_sizes()))

    def _map_state(self, hx, fn):
        return self._public_state(tuple(fn(s) for s in self._state_parts(hx)))

    # --- the layers ---

    def _run_layers(self, x: Tensor, state, lengths: Tensor | None):
        """Every layer and direction: ``x (T, B, I)`` -> ``(T, B, D * P)`` and the final state's parts."""
        D = 2 if self.bidirectional else 1
        finals = []
        layer_input = x  # (T, B, I), then (T, B, D * P)
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(D):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                start = tuple(s[layer * D + direction] for s in state) if state is not None else None
                y, final = self._run_direction(layer_input, suffix, start, direction == 1, lengths)
                outputs.append(y)
                finals.append(final)
            layer_input = outputs[0] if D == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        return layer_input, tuple(torch.stack(parts) for parts in zip(*finals))

    def _weights(self, suffix: str):
        """``(w_ih, w_hh, b_ih, b_hh)`` of one layer and direction (biases None without bias)."""
        names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        return tuple(getattr(self, n + suffix) if self.bias or n.startswith("weight") else None
                     for n in names)


class RNN(FusedRNNBase):
    """Elman RNN, ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``; same arguments, shapes
    and results as ``torch.nn.RNN``."""

    def __init__(self, *args, **kwargs) -> None:  # torch.nn.RNN's argument handling, exactly
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self.nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self.nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self.nonlinearity == "tanh":
            mode = "RNN_TANH"
        elif self.nonlinearity == "relu":
            mode = "RNN_RELU"
        else:
            raise ValueError(f"Unknown nonlinearity '{self.nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(mode, *args, **kwargs)

    def _state_sizes(self):
        return (self.hidden_size,)

    def _state_parts(self, hx: Tensor):
        return (hx,)

    def _public_state(self, parts):
        return parts[0]

    def _run_direction(self, x, suffix, start, reverse, lengths):
        w_ih, w_hh, b_ih, b_hh = self._weights(suffix)
        x_proj = F.linear(x, w_ih, b_ih + b_hh if self.bias else None)  # (T, B, H): all steps at once
        w_hh, h0 = _as_dtype(x_proj.dtype, w_hh, start[0] if start else None)  # autocast
        y, h_n = recurrence(x_proj, h0, w_hh, self.nonlinearity, reverse=reverse, lengths=lengths)
        return y, (h_n,)


class LSTM(FusedRNNBase):
    """LSTM, gate order i, f, g, o, with ``proj_size`` as ``torch.nn.LSTM``; same arguments, shapes
    and results: ``forward(input, (h0, c0)) -> output, (h_n, c_n)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("LSTM", *args, **kwargs)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def _state_sizes(self):
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _state_parts(self, hx):
        return (hx[0], hx[1])

    def _public_state(self, parts):
        return (parts[0], parts[1])

    def _run_direction(self, x, suffix, start, reverse, lengths):
        w_ih, w_hh, b_ih, b_hh = self._weights(suffix)
        x_proj = F.linear(x, w_ih, b_ih + b_hh if self.bias else None)  # (T, B, 4H)
        w_hr = getattr(self, "weight_hr" + suffix) if self.proj_size > 0 else None
        h0, c0 = start if start else (None, None)
        w_hh, w_hr, h0, c0 = _as_dtype(x_proj.dtype, w_hh, w_hr, h0, c0)
        y, h_n, c_n = lstm_recurrence(x_proj, h0, c0, w_hh, w_hr, reverse=reverse, lengths=lengths)
        return y, (h_n, c_n)


class GRU(FusedRNNBase):
    """GRU, gate order r, z, n, ``n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))`` as
    ``torch.nn.GRU``; same arguments, shapes and results."""

    def __init__(self, *args, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    _state_sizes, _state_parts, _public_state = RNN._state_sizes, RNN._state_parts, RNN._public_state

    def _run_direction(self, x, suffix, start, reverse, lengths):
        w_ih, w_hh, b_ih, b_hh = self._weights(suffix)
        b_hn = None
        b = None
        if self.bias:  # b_hr and b_hz fold into the input projection; b_hn is scaled by r
            H = self.hidden_size
            b = b_ih + torch.cat((b_hh[:2 * H], b_hh.new_zeros(H)))
            b_hn = b_hh[2 * H:]
        x_proj = F.linear(x, w_ih, b)  # (T, B, 3H)
        w_hh, b_hn, h0 = _as_dtype(x_proj.dtype, w_hh, b_hn, start[0] if start else None)
        y, h_n = gru_recurrence(x_proj, h0, w_hh, b_hn, reverse=reverse, lengths=lengths)
        return y, (h_n,)


def _as_dtype(dtype: torch.dtype, *tensors):
    """The recurrence's operands in ``dtype``, the input projection's (autocast may have run it in
    low precision); None stays None."""
    return tuple(t.to(dtype) if t is not None and t.dtype != dtype else t for t in tensors)


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
    """Packed ``data (sum(lengths), I)`` -> padded ``(T, B, I)`` (zeros past each end), the lengths
    ``(B,)`` and the packed rows' places in the flattened ``(T * B)`` steps, both on data's device.
    Everything is computed on the host from ``batch_sizes`` and copied once, without a sync."""
    batch_sizes = batch_sizes.cpu()
    T, B = batch_sizes.numel(), int(batch_sizes[0])
    lengths = (batch_sizes[:, None] > torch.arange(B)[None, :]).sum(0)  # (B,): steps of sequence b
    valid = torch.arange(T)[:, None] < lengths[None, :]  # (T, B), row-major in the packed order
    rows = torch.arange(T * B).view(T, B)[valid]  # (sum(lengths),)
    lengths, rows = _to_device(lengths, data.device), _to_device(rows, data.device)
    x = data.new_zeros(T * B, data.size(-1)).index_copy(0, rows, data)
    return x.view(T, B, -1), lengths, rows


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to a GPU from pinned memory, without blocking the host."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
