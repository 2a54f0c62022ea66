"""The forward every fastrnn module shares: ``FusedRNNBase``, a thin shell over the cells' ops.

``torch.nn.RNNBase`` gives the constructor checks, parameter names (``weight_ih_l0``, ...,
``_reverse``), shapes, init and ``state_dict`` layout, so each module and its torch twin load each
other's weights. ``forward`` validates the input as the torch modules do, projects the input of
each layer for all steps with one matrix product, and hands every layer and direction to the
cell's op (``_run_direction``). (The modules subclass ``RNNBase`` and not ``nn.RNN`` / ``nn.LSTM`` /
``nn.GRU``, so ``torch.compile`` does not treat them as cuDNN RNNs and break the graph.)

Inside ``forward`` the state is a tuple of parts, each ``(layers * directions, B, N)``: ``(h,)`` for
RNN and GRU, ``(h, c)`` for LSTM; ``_public_state`` turns it into what the torch module returns.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence

from .backend import memo, torch_module_runs
from .export import in_onnx_export, onnx_forward
from .op import outside_graph, run_eagerly
from .sequence import check_resets


class FusedRNNBase(nn.RNNBase):
    """A cell says how one layer and direction runs (``_run_direction``) and what its state looks
    like (``_state_sizes``, ``_state_parts``, ``_public_state``: one part ``h`` unless it says more)."""

    def _lowered_by_cpu_autocast(self, packed: bool) -> bool:
        """Whether the CPU's autocast lowers torch's module's precision (RNN; LSTM, not on packed input)."""
        return True

    def flatten_parameters(self) -> None:
        """Accepted for compatibility; the fused path needs no flat cuDNN weight buffer."""

    @property
    def _name(self) -> str:  # RNN, LSTM or GRU, as the torch modules name themselves in errors
        return self.mode.split("_")[0]

    def _state_sizes(self):
        return (self.hidden_size,)

    def _state_parts(self, hx):
        return (hx,)

    def _public_state(self, parts):
        return parts[0]

    def forward(self, input: Tensor | PackedSequence, hx=None, resets: Tensor | None = None):
        """``input (T, B, I)`` (``(B, T, I)`` with batch_first; ``(T, I)`` unbatched; or packed) and
        the state as the torch module takes it -> ``output (T, B, directions * P)`` and the state.

        ``resets`` (bool, ``(T, B)``, ``(B, T)`` with batch_first, ``(T,)`` unbatched): True at step t
        of row b starts a new, independent sequence there. The result equals running the module on
        each such segment separately: the state entering a segment is zero, except the first
        segment's (forward direction, unless a reset is at step 0) and the last one's (reverse
        direction), which take ``hx``. (Pass
        it by name; it is not keyword-only because torch's TorchScript exporter passes every default
        by position.)"""
        if torch.compiler.is_compiling() and outside_graph():  # as Dynamo runs torch's modules: eagerly
            return run_eagerly(FusedRNNBase.forward, self, input, hx, resets)  # (this forward: not a subclass's)
        if in_onnx_export():  # the fused ops have no ONNX form: see fastrnn/export.py
            if resets is not None:
                raise ValueError("resets: ONNX's recurrent operators cannot reset inside a sequence")
            if not isinstance(input, PackedSequence):  # (torch's forward checks packed input itself)
                self._prepare(input, hx)  # the eager checks, so a bad state fails the export too
            return onnx_forward(self, input, hx)
        data = input.data if isinstance(input, PackedSequence) else input
        if torch_module_runs(data, resets) or self._only_torchs_module_takes(data, resets):
            if isinstance(input, PackedSequence):
                _check_batch_sizes(input.data, input.batch_sizes)  # a clear error where torch's would not be
            from .cells import cell_of  # (the registry imports the modules)

            return cell_of(self).torch_module.forward(self, input, hx)
        if (data.is_cpu and not self._lowered_by_cpu_autocast(data is not input)
                and torch.is_autocast_enabled("cpu")):
            return self._outside_cpu_autocast(input, hx, resets)
        if resets is None and data is input and torch._C._get_tracing_state():  # (torch.jit.trace records)
            return self._traced(input, hx)
        return self._fused(input, hx, resets)

    def _traced(self, input: Tensor, hx):
        """``_fused`` under ``torch.jit.trace``, without its TracerWarnings: the checks compare sizes in
        Python, as true of any input as of the traced one (the graph runs any T and B), where torch's
        module warns of nothing. (Packed input and resets keep theirs: their lengths are kept.)"""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return self._fused(input, hx, None)

    def _only_torchs_module_takes(self, data, resets) -> bool:
        """Whether only torch's module computes this call (beside a plain CPU call, where it is as fast
        as it gets): an input that is no tensor but takes part through ``__torch_function__`` (torch's
        module hands its op to it), or weights that are ExpandedWeights (per-sample gradients,
        ``call_for_per_sample_grads``: torch decomposes its module's op for them). Not with resets."""
        if isinstance(data, Tensor) and type(self._parameters.get("weight_ih_l0")).__name__ != "ExpandedWeight":
            return False
        if resets is not None:
            raise NotImplementedError(f"{self._name}: resets with an input that is no tensor or with "
                                      "ExpandedWeights (per-sample gradients): only torch's module takes these")
        return True

    def _outside_cpu_autocast(self, input, hx, resets):
        """As torch's module where the CPU's autocast leaves it alone: with autocast off, fp32 weights
        take a bf16 or fp16 input and state in fp32 (as autocast's products inside torch's do), and the
        results come in the dtype torch's state carries: the last part of hx's (the LSTM's c0), or else
        the input's."""
        data = input.data if isinstance(input, PackedSequence) else input
        lower = self._parameter("weight_ih_l0").dtype == torch.float32
        state = hx[-1] if isinstance(hx, (tuple, list)) and hx else hx
        result = state.dtype if isinstance(state, Tensor) else data.dtype

        def raised(t):  # (a tensor or packed sequence in bf16 or fp16: in fp32, where the weights are)
            values = t.data if isinstance(t, PackedSequence) else t
            low = isinstance(values, Tensor) and values.dtype in (torch.bfloat16, torch.float16)
            return t.to(torch.float32) if lower and low else t

        if isinstance(hx, (tuple, list)):
            parts = [raised(s) for s in hx]
            hx = hx._make(parts) if hasattr(hx, "_make") else type(hx)(parts)  # (a namedtuple too)
        elif hx is not None:
            hx = raised(hx)
        with torch.autocast("cpu", enabled=False):
            output, final = self._fused(raised(input), hx, resets)
        return output.to(result), self._map_state(final, lambda s: s.to(result))

    def _fused(self, input: Tensor | PackedSequence, hx, resets: Tensor | None):
        """``forward`` on the fused ops (the kernels, or their PyTorch twins)."""
        x, state, packing, batched = self._prepare(input, hx)  # (T, B, I), parts (L * D, B, N)
        resets = self._time_major_resets(resets, input, x, batched)  # (T, B) or None
        output, state = self._run_layers(x, state, packing, resets)
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
            self._check_args(data, hx, batch_sizes)
            x, lengths, rows = _unpack(data, batch_sizes)  # (T, B, I), (B,), (sum(lengths),)
            packing, batched = (lengths, rows, batch_sizes, sorted_indices, unsorted_indices), True
        else:
            if input.dim() not in (2, 3):
                instead = "tensor instead" if self._name == "RNN" else "instead"  # torch's own words
                raise ValueError(f"{self._name}: Expected input to be 2D or 3D, got {input.dim()}D {instead}")
            batched, batch_dim = input.dim() == 3, 0 if self.batch_first else 1
            if hx is not None:
                self._check_state_rank(hx, batched)
            if not batched:
                input = input.unsqueeze(batch_dim)
                hx = self._map_state(hx, lambda s: s.unsqueeze(1)) if hx is not None else None
            self._check_args(input, hx, None)
            x, packing = (input.transpose(0, 1) if self.batch_first else input), None
        state = self._state_parts(hx) if hx is not None else None
        self._check_state_matches(x, hx, state)
        if x.size(0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")  # torch: RNN for all
        return x, state, packing, batched

    def _time_major_resets(self, resets, input, x: Tensor, batched: bool) -> Tensor | None:
        """``resets`` checked against the input and laid out ``(T, B)`` (a view)."""
        if resets is None:
            return None
        if isinstance(input, PackedSequence):
            raise ValueError("resets cannot be given with a PackedSequence: packed sequences already start and "
                             "end where their lengths say (give one padded tensor with resets instead)")
        T, B = x.shape[:2]
        shape = (T, B) if not self.batch_first else (B, T)
        check_resets(resets, shape if batched else (T,), x.device)
        if not batched:
            return resets.unsqueeze(1)
        return resets.t() if self.batch_first else resets

    def _check_state_rank(self, hx, batched: bool) -> None:
        want = 3 if batched else 2
        parts, kind = self._state_parts(hx), "batched 3-D" if batched else "unbatched 2-D"
        if all(s.dim() == want for s in parts):
            return
        if len(parts) == 1:
            raise RuntimeError(f"For {kind} input, hx should also be {want}-D but got {parts[0].dim()}-D tensor")
        raise RuntimeError(f"For {kind} input, hx and cx should also be {want}-D but got "
                           f"({parts[0].dim()}-D, {parts[1].dim()}-D) tensors")

    def _check_state_matches(self, x: Tensor, hx, state) -> None:
        """Refuse what the torch modules refuse deeper down: parameters on another device than the
        input, a state of another count, dtype or device."""
        w = self._parameters.get("weight_ih_l0")  # (a reparametrised one: F.linear refuses it, in its words)
        if w is not None and w.device != x.device:
            raise RuntimeError("Input and parameter tensors are not at the same device, found input tensor at "
                               f"{x.device} and parameter tensor at {w.device}")
        if isinstance(hx, (tuple, list)) and len(hx) != len(self._state_sizes()):
            raise RuntimeError(f"{self._name.lower()} expects {_count(len(self._state_sizes()))} hidden states")
        for s in state or ():
            if s.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
                raise RuntimeError(f"{self._name} hx dtype ({s.dtype}) does not match input dtype "
                                   f"({x.dtype})")
            if s.device != x.device:
                raise RuntimeError("Input and hidden tensors are not at the same device, found input "
                                   f"tensor at {x.device} and hidden tensor at {s.device}")

    def _check_args(self, input: Tensor, hx, batch_sizes) -> None:
        """torch's own checks of the input, and of the state where one is given."""
        if hx is None:
            self.check_input(input, batch_sizes)
        else:
            self.check_forward_args(input, hx, batch_sizes)

    def _map_state(self, hx, fn):
        return self._public_state(tuple(fn(s) for s in self._state_parts(hx)))

    # --- the layers ---

    def _run_layers(self, x: Tensor, state, packing, resets: Tensor | None = None):
        """Every layer and direction: ``x (T, B, I)`` -> ``(T, B, D * P)`` and the final state's parts;
        every layer resets where ``resets (T, B)`` says."""
        D = 2 if self.bidirectional else 1
        lengths = packing[0] if packing is not None else None
        finals = []
        layer_input = x  # (T, B, I), then (T, B, D * P)
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(D):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                start = tuple(s[layer * D + direction] for s in state) if state is not None else None
                y, final = self._run_direction(layer_input, suffix, start, direction == 1, lengths, resets)
                outputs.append(y)
                finals.append(final)
            layer_input = outputs[0] if D == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = _dropout(layer_input, self.dropout, packing)
        return layer_input, tuple(_stacked(parts) for parts in zip(*finals))

    def _weights(self, suffix: str, projection: bool = False):
        """``[w_ih, w_hh, b_ih, b_hh]`` (and ``w_hr`` where ``projection``) of one layer and direction
        (biases None without bias), in one dtype as torch's products require (``_refuse_mixed_dtypes``). (A
        parameter is read from ``_parameters``, as ``getattr`` finds it; a weight that is no longer a
        parameter there, reparametrised or set as a plain tensor, through ``getattr``.)"""
        names = _weight_names(suffix, self.bias, projection)
        weights = [self._parameter(name) if name else None for name in names]
        dtype = weights[0].dtype
        for w in weights:
            if w is not None and w.dtype != dtype:
                self._refuse_mixed_dtypes(names, weights)
        return weights

    def _refuse_mixed_dtypes(self, names, weights) -> None:
        """Weights of several dtypes: a RuntimeError naming one, unless autocast lowers them all to its
        own (on for their device; it leaves float64 as it is)."""
        if all(w.dtype != torch.float64 and torch.is_autocast_enabled(w.device.type) for w in weights if w is not None):
            return
        name, w = next((n, w) for n, w in zip(names, weights) if w is not None and w.dtype != weights[0].dtype)
        raise RuntimeError(f"{self._name}: {name} is {w.dtype}, {names[0]} {weights[0].dtype}: a module's "
                           "weights share one dtype (module.to(dtype) converts them all)")

    def _parameter(self, name: str) -> Tensor:
        p = self._parameters.get(name)
        return p if p is not None else getattr(self, name)


class SumOfBiases(torch.autograd.Function):
    """``b_ih + b_hh``, whose gradient reaches each bias as a tensor of its own. (Autograd's sum hands
    one tensor to both; compiled by inductor, both ``.grad`` then share it, and clipping or
    accumulating gradients in place hits it twice.)"""

    @staticmethod
    def forward(b_ih: Tensor, b_hh: Tensor) -> Tensor:
        return b_ih + b_hh

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, grad.clone()


def bias_sum(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    """The two biases of a layer as the one its input projection adds (None without bias). Eager
    autograd gives each bias a gradient of its own anyway: the Function only runs under compile."""
    if b_ih is None:
        return None
    return SumOfBiases.apply(b_ih, b_hh) if torch.compiler.is_compiling() else b_ih + b_hh


def _stacked(parts) -> Tensor:
    """A final state's part ``(L * D, B, N)`` from each layer and direction's ``(B, N)``: stacked, or,
    for one layer and direction, the op's own tensor given its leading dimension in place (no copy,
    and no view either: as torch's module returns it, so ``detach_()`` works). A view, a tensor not
    contiguous, a zero-size batch's state (the given one, or the reference loop's, which autograd may
    have saved: tanh's output) and a compiled call are stacked."""
    part = parts[0]
    if (torch.compiler.is_compiling() or len(parts) > 1 or part._is_view() or not part.is_contiguous()
            or part.numel() == 0):
        return torch.stack(parts)
    return part.unsqueeze_(0)


@memo  # (a few distinct suffixes; built once, not at every layer of every call)
def _weight_names(suffix: str, bias: bool, projection: bool) -> tuple:
    """The names of ``(w_ih, w_hh, b_ih, b_hh)`` (and ``w_hr`` where ``projection``) for ``suffix``
    (``_l0``, ``_l1_reverse``, ...), the biases' "" without bias."""
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh") + (("weight_hr",) if projection else ())
    return tuple(name + suffix if bias or name.startswith("weight") else "" for name in names)


def _count(n: int) -> str:
    return {1: "one", 2: "two"}.get(n, str(n))


def _dropout(x: Tensor, p: float, packing) -> Tensor:
    """Dropout between layers, drawn as torch draws it: over ``x (T, B, N)``, or for packed input over
    its packed rows only (the same random numbers for the same seed)."""
    if packing is None:
        return F.dropout(x, p, training=True)
    rows = packing[1]
    T, B, N = x.shape
    packed = F.dropout(x.reshape(T * B, N).index_select(0, rows), p, training=True)
    return x.new_zeros(T * B, N).index_copy(0, rows, packed).view(T, B, N)


def _check_batch_sizes(data: Tensor, batch_sizes: Tensor) -> None:
    """A packed batch layout torch.nn.RNN would choke on gets a clear error instead."""
    if batch_sizes.dtype != torch.int64 or batch_sizes.dim() != 1:
        raise TypeError(f"packed input: batch_sizes must be a 1-D int64 tensor, got "
                        f"{batch_sizes.dtype} of shape {tuple(batch_sizes.shape)}")
    if batch_sizes.numel() == 0:  # (torch's module: an IndexError too)
        raise IndexError("packed input: batch_sizes is empty (no time step)")
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
    return x.view(T, B, data.size(-1)), lengths, rows


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``; to a GPU from pinned memory, without blocking the host."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
