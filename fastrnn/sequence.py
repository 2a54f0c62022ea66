"""What every cell's op does with a sequence the same way: lengths, the first and last step of each
sequence, the precision of sums, operand checks, and the CPU buffers of the twins.

A walk over ``T`` steps runs ascending, or descending with ``reverse``; with ``lengths (B,)``
sequence ``b`` takes only its steps ``t < lengths[b]``. Tensors are time-major: ``(T, B, N)``.
"""

from __future__ import annotations

import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what every path computes in


def check_floating(name: str, x: torch.Tensor) -> None:
    """``x`` is in one of ``FLOATS``: a TypeError naming it (a twin would drop a complex input's
    imaginary part or round an integer one; a kernel would read garbage)."""
    if x.dtype not in FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of states and sums: fp64 for fp64, else fp32 (as the kernels accumulate)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(dtype: torch.dtype, *tensors):
    """The operands in ``dtype`` (None stays None): a module's weights and state in its input
    projection's dtype, which autocast may have lowered."""
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]


def carried_copy(initial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A contiguous copy of ``initial`` in ``dtype``: a state carried in a buffer of its own (a twin's)
    or returned as a final state where no step ran (a launcher's), laid out as the kernels' buffers
    and the ops' fake outputs are (``.to(copy=True)`` alone would keep a column-major h0's layout)."""
    return initial.to(dtype, copy=True, memory_format=torch.contiguous_format)


def edge_step(T: int, last: bool, lengths: torch.Tensor | None, device) -> torch.Tensor | int:
    """Index (in time order) of each sequence's first or last step: one int, or (B,) with lengths.
    The state h_n is read at the last step a direction takes (``last = not reverse``); h0 enters at
    the first one it takes (``last = reverse``)."""
    if not last:
        return 0
    if lengths is None:
        return T - 1
    return (lengths - 1).to(device)


def one_step(step) -> bool:
    """Whether ``step`` (from ``edge_step``) is one step for every sequence: an int (a SymInt where a
    graph is compiled for dynamic shapes), not a tensor of one per sequence."""
    return not isinstance(step, torch.Tensor)


def at_step(x: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
    """``x[step[b], b]`` for each b: (T, B, N) -> (B, N)."""
    if one_step(step):
        return x.select(0, step)  # (x[step] would fix a SymInt step to its value: a graph per length)
    return x[step, torch.arange(x.shape[1], device=x.device)]


def final_state(state: torch.Tensor, x: torch.Tensor, reverse: bool, lengths: torch.Tensor | None):
    """A gated op's final state ``(B, N)`` from the one its loop carried (``state``, in the accumulator's
    precision, its own tensor): that tensor itself where ``x`` (T, B, N), the steps it was stored into,
    has its precision; else ``x`` at each sequence's last step, copied (fp16/bf16: exactly as stored,
    as torch's modules return ``output[-1]``), or where ``x`` holds no steps (not saved: ``save=False``)
    ``state`` rounded as they were stored."""
    if state.dtype == x.dtype:
        return state
    return last_step(x, reverse, lengths) if x.shape[0] > 0 else state.to(x.dtype)


def last_step(x: torch.Tensor, reverse: bool, lengths: torch.Tensor | None) -> torch.Tensor:
    """``x (T, B, N)`` at the last step each sequence's walk takes, copied: ``(B, N)``, the final state
    where ``x`` holds every step's."""
    step = edge_step(x.shape[0], not reverse, lengths, x.device)
    if one_step(step):
        return torch.select_copy(x, 0, step)  # (one op: no view made, then cloned)
    return at_step(x, step)  # (indexing by a tensor copies already)


def step_rows(x: torch.Tensor, step: torch.Tensor | int):
    """The index of each sequence's row ``step`` (from ``edge_step``) in ``x (T, B, ...)``."""
    return step if one_step(step) else (step, torch.arange(x.shape[1], device=x.device))


def add_at(x: torch.Tensor, step, v: torch.Tensor | None) -> torch.Tensor:
    """``x`` (T, B, N) with ``v`` (B, N) added at ``x[step[b], b]`` (``step`` from ``edge_step``);
    out of place. ``v`` None (a final state's gradient that none reached): ``x`` itself."""
    if v is None:
        return x
    B = x.shape[1]
    if one_step(step):
        step = torch.full((B,), step, dtype=torch.int64, device=x.device)
    return x.index_put((step, torch.arange(B, device=x.device)), v, accumulate=True)


def final_steps(T: int, last: torch.Tensor | int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """(T, B, 1) in ``dtype``: 1 at the step each sequence's final state was read at (``last`` from
    ``edge_step``), else 0; None where every sequence ends at the same step (``last`` one int)."""
    if one_step(last):
        return None
    return (torch.arange(T, device=device)[:, None] == last[None, :]).to(dtype).unsqueeze(-1)


def add_final(x: torch.Tensor, final: torch.Tensor | None, t: int, last: torch.Tensor | int,
              at_final: torch.Tensor | None) -> None:
    """In place, at step ``t`` of a backward walk: ``x (B, N) += final (B, N)`` for the sequences
    whose final state was read at ``t`` (``last``, ``at_final = final_steps(...)``); nothing where
    ``final`` is None (no gradient reached the final state)."""
    if final is None:
        return
    if at_final is None:
        if t == last:
            x += final
    else:
        x.addcmul_(final, at_final[t])


def valid_steps(T: int, lengths: torch.Tensor | None, device) -> torch.Tensor | None:
    """(T, B, 1) bool mask of the steps each sequence takes, or None for full sequences."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device)  # (a list too, as the ops take)
    return (torch.arange(T, device=device)[:, None] < lengths[None, :]).unsqueeze(-1)


def shifted(x: torch.Tensor, later: bool, cut: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` moved one step along time, zero at the edge: ``out[t] = x[t + 1]`` if ``later`` else
    ``x[t - 1]``; and zero where ``cut (T, B, 1)`` is True. (T, B, N) -> (T, B, N)."""
    edge = torch.zeros_like(x[:1])
    out = torch.cat((x[1:], edge)) if later else torch.cat((edge, x[:-1]))
    return out if cut is None else out.masked_fill(cut, 0)


def cut_steps(resets: torch.Tensor | None, reverse: bool) -> torch.Tensor | None:
    """``(T, B, 1)`` bool: whether the state entering step t (along the walk) is cut to zero, because
    a new sequence starts there: ``resets (T, B)`` at t walking forward; at t + 1 walking in reverse
    (where t ends a sequence); never at a reverse walk's first step T - 1. None without resets."""
    if resets is None:
        return None
    return (shifted(resets, later=True) if reverse else resets).unsqueeze(-1)


def cut_after(cut: torch.Tensor | None, reverse: bool) -> torch.Tensor | None:
    """``(T, B, 1)``: whether the state leaving step t is cut before the step that takes it next (the
    backward passes no gradient back across it), from ``cut_steps``."""
    return None if cut is None else shifted(cut, later=not reverse)


def enters(x: torch.Tensor, cut: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """``x (B, N)``, the gradient of an initial state, zero in the rows where that state never entered:
    a reset at the walk's first step (resets and lengths are never given together)."""
    return x if cut is None else x.masked_fill(cut[-1 if reverse else 0], 0)


def previous_states(y: torch.Tensor, h0: torch.Tensor | None, reverse: bool,
                    lengths: torch.Tensor | None, cut: torch.Tensor | None = None) -> torch.Tensor:
    """``h_{t-1}`` of every step t, (T, B, N): ``y`` one step back along the walk, ``h0`` (or zeros)
    at each sequence's first step, zeros where the state was ``cut`` (``cut_steps``). ``y`` must be zero
    past each sequence's end (a reverse walk's first step ``lengths[b] - 1`` then reads zeros before h0
    is put there)."""
    h_prev = shifted(y, later=reverse, cut=cut)
    if h0 is not None:
        first = edge_step(y.shape[0], reverse, lengths, y.device)
        h_prev = h_prev.index_put(_rows_index(y, first), enters(h0, cut, reverse))
    return h_prev


def sum_with_previous(d: torch.Tensor, y: torch.Tensor, h0: torch.Tensor | None,
                      d_first: torch.Tensor, reverse: bool, cut: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_t d[t].T @ h_{t-1}``, (N, P), for ``d (T, B, N)`` zero past each sequence's end and
    ``d_first (B, N)`` its rows at each sequence's first step: ``h_{t-1}`` is ``y (T, B, P)`` one step
    back along the walk (zero past each end, so a reverse walk's first step ``lengths[b] - 1`` reads
    zeros there, and zero where the state was ``cut``), plus ``h0`` at each first step; without
    building ``h_{t-1}`` for every step."""
    N, P = d.shape[2], y.shape[2]
    if cut is not None:
        d, d_first = d.masked_fill(cut, 0), enters(d_first, cut, reverse)
    d_, y_ = (d[:-1], y[1:]) if reverse else (d[1:], y[:-1])
    out = d_.reshape(-1, N).T @ y_.reshape(-1, P)
    return out if h0 is None else torch.addmm(out, d_first.T, h0)


def _rows_index(x: torch.Tensor, step):
    B = x.shape[1]
    if one_step(step):
        step = torch.full((B,), step, dtype=torch.int64, device=x.device)
    return (step, torch.arange(B, device=x.device))


def check_operands(x_proj: torch.Tensor, **operands: torch.Tensor | None) -> None:
    """x_proj is floating point (``check_floating``), and each operand given (None skipped) has its
    dtype and device."""
    check_floating("x_proj", x_proj)
    dtype, device = x_proj.dtype, x_proj.device
    for name, t in operands.items():
        if t is None:
            continue
        if t.dtype != dtype:
            raise RuntimeError(f"{name} dtype ({t.dtype}) does not match input dtype ({dtype})")
        if t.device != device:
            raise RuntimeError(f"Input and {name} tensors are not at the same device, found input "
                               f"tensor at {device} and {name} tensor at {t.device}")


def checked_steps(lengths, resets, T: int, B: int, device: torch.device):
    """An op's ``lengths`` (``lengths_on_device``) and ``resets (T, B)`` bool on the input's device,
    checked; never both."""
    if lengths is not None and resets is not None:
        raise ValueError("lengths and resets cannot be given together (packed sequences do not reset)")
    if lengths is not None:
        lengths = lengths_on_device(lengths, T, B, device)
    if resets is not None:
        check_resets(resets, (T, B), device)
    return lengths, resets


def check_resets(resets, shape: tuple, device: torch.device) -> None:
    """``resets`` must be a bool tensor of ``shape`` on ``device``: a ValueError or TypeError naming it."""
    if not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool:
        kind = resets.dtype if isinstance(resets, torch.Tensor) else type(resets).__name__
        raise TypeError(f"resets must be a bool tensor, got {kind}")
    if resets.shape != shape:
        raise ValueError(f"resets must have shape {tuple(shape)}, got {tuple(resets.shape)}")
    if resets.device != device:
        raise ValueError(f"resets must be on the input's device ({device}), found {resets.device}")


def lengths_on_device(lengths, T: int, B: int, device: torch.device) -> torch.Tensor:
    """``lengths (B,)`` as contiguous int64 on ``device``. Host lengths (a CPU tensor or a list) are
    checked to lie in [1, T] and moved once; a tensor already on an accelerator ``device`` is taken
    unchecked, without a host sync."""
    on_device = isinstance(lengths, torch.Tensor) and lengths.device.type != "cpu"
    if on_device and lengths.device != device:
        raise RuntimeError(f"lengths must be on the CPU or on the input's device ({device}), "
                           f"found {lengths.device}")
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=lengths.device if on_device else "cpu")
    if lengths.shape != (B,):
        raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
    if not on_device and B > 0 and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in [1, {T}]")
    return lengths.to(device).contiguous()  # a slice's stride would be ignored by the kernels


# --------------------------------------------------------------------------------------------------
# CPU buffers of the twins
# --------------------------------------------------------------------------------------------------


def _load_madvise():
    """libc's ``madvise`` (Linux), or None."""
    try:
        import ctypes
        import sys
        if not sys.platform.startswith("linux"):
            return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        return madvise
    except (ImportError, OSError, AttributeError):
        return None


_madvise = _load_madvise()
_MADV_HUGEPAGE, _PAGE, _HUGE_MIN = 14, 4096, 4 << 20


def huge_pages(t: torch.Tensor) -> torch.Tensor:
    """``t``, a large buffer fresh from the CPU allocator and not yet written, with Linux asked to back
    it with 2 MiB pages (MADV_HUGEPAGE, where transparent huge pages are set to ``madvise``): the first
    write to each 4 KiB page of fresh memory is a page fault, and for the outputs of a whole sequence
    those cost as much as the step products. Advice only: values are untouched, and it is skipped
    where it cannot apply."""
    if _madvise is None or t.device.type != "cpu":
        return t
    storage = t.untyped_storage()
    if storage.nbytes() >= _HUGE_MIN:
        start = -(-storage.data_ptr() // _PAGE) * _PAGE  # the whole pages inside the buffer
        end = (storage.data_ptr() + storage.nbytes()) // _PAGE * _PAGE
        _madvise(start, end - start, _MADV_HUGEPAGE)  # failure is harmless: the pages stay small
    return t


def to_acc(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``t.to(acc)``, into a buffer backed by huge pages when it is a copy."""
    if t.dtype == acc:
        return t
    return huge_pages(torch.empty(t.shape, dtype=acc, device=t.device)).copy_(t)


sigmoid_backward = torch.ops.aten.sigmoid_backward.grad_input  # (dy, y, out): dy * y * (1 - y)
tanh_backward = torch.ops.aten.tanh_backward.grad_input  # (dy, y, out): dy * (1 - y^2)


class Walk:
    """One direction's walk over ``T`` steps, for the loops of a second derivative: its order, the
    valid steps (``valid_steps``), the cuts (``cut_steps``), each row's first and last step."""

    def __init__(self, T: int, lengths: torch.Tensor | None, resets: torch.Tensor | None, reverse: bool,
                 device) -> None:
        self.T, self.reverse, self.lengths = T, reverse, lengths
        self.valid = valid_steps(T, lengths, device)  # (T, B, 1) or None
        self.cut = cut_steps(resets, reverse)  # (T, B, 1) or None
        self.first = edge_step(T, reverse, lengths, device)
        self.last = edge_step(T, not reverse, lengths, device)
        self.order = range(T - 1, -1, -1) if reverse else range(T)

    def masked(self, x: torch.Tensor, t: int | None = None) -> torch.Tensor:
        """``x`` (all steps, or step ``t``) zero past each sequence's end."""
        if self.valid is None:
            return x
        return x.masked_fill(~(self.valid if t is None else self.valid[t]), 0)

    def linked(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """``x`` (B, N), what the previous step passes into step t, zero where the state was cut."""
        return x if self.cut is None else x.masked_fill(self.cut[t], 0)

    def at(self, step, t: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N) in the rows whose ``step`` (``first`` or ``last``) is t, zero elsewhere."""
        if one_step(step):
            return x if step == t else torch.zeros_like(x)
        return x.masked_fill((step != t)[:, None], 0)

    def carried_back(self, u: torch.Tensor, at_last: torch.Tensor | None, decay: torch.Tensor) -> torch.Tensor:
        """``x_t = u_t + x_{t_next} decay_{t_next}`` (+ ``at_last`` (B, N), if any, at the last step), walking
        back: a first backward's elementwise carry (the LSTM's dc through f, the GRU's dh through z)
        at every step, zero past each end and nothing across a cut. (T, B, N)."""
        xs, carry = [None] * self.T, torch.zeros_like(u[0])
        for t in reversed(self.order):
            x = u[t] + carry if at_last is None else u[t] + carry + self.at(self.last, t, at_last)
            xs[t] = self.masked(x, t)
            passed = xs[t] * decay[t] if self.valid is None else torch.where(self.valid[t], xs[t] * decay[t], carry)
            carry = self.linked(passed, t)
        return torch.stack(xs)
