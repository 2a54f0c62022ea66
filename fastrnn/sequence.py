"""What every cell's op does with a sequence the same way: lengths, the first and last step of each
sequence, the precision of sums, operand checks, and the CPU buffers of the twins.

A walk over ``T`` steps runs ascending, or descending with ``reverse``; with ``lengths (B,)``
sequence ``b`` takes only its steps ``t < lengths[b]``. Tensors are time-major: ``(T, B, N)``.
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of states and sums: fp64 for fp64, else fp32 (as the kernels accumulate)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(dtype: torch.dtype, *tensors):
    """The operands in ``dtype`` (None stays None): a module's weights and state in its input
    projection's dtype, which autocast may have lowered."""
    return tuple(t.to(dtype) if t is not None and t.dtype != dtype else t for t in tensors)


def edge_step(T: int, last: bool, lengths: torch.Tensor | None, device) -> torch.Tensor | int:
    """Index (in time order) of each sequence's first or last step: one int, or (B,) with lengths.
    The state h_n is read at the last step a direction takes (``last = not reverse``); h0 enters at
    the first one it takes (``last = reverse``)."""
    if not last:
        return 0
    if lengths is None:
        return T - 1
    return (lengths - 1).to(device)


def at_step(x: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
    """``x[step[b], b]`` for each b: (T, B, N) -> (B, N)."""
    if isinstance(step, int):
        return x[step]
    return x[step, torch.arange(x.shape[1], device=x.device)]


def step_rows(x: torch.Tensor, step: torch.Tensor | int):
    """The index of each sequence's row ``step`` (from ``edge_step``) in ``x (T, B, ...)``."""
    return step if isinstance(step, int) else (step, torch.arange(x.shape[1], device=x.device))


def add_at(x: torch.Tensor, step, v: torch.Tensor) -> torch.Tensor:
    """``x`` (T, B, N) with ``v`` (B, N) added at ``x[step[b], b]`` (``step`` from ``edge_step``);
    out of place."""
    B = x.shape[1]
    if isinstance(step, int):
        step = torch.full((B,), step, dtype=torch.int64, device=x.device)
    return x.index_put((step, torch.arange(B, device=x.device)), v, accumulate=True)


def valid_steps(T: int, lengths: torch.Tensor | None, device) -> torch.Tensor | None:
    """(T, B, 1) bool mask of the steps each sequence takes, or None for full sequences."""
    if lengths is None:
        return None
    lengths = lengths.to(device)
    return (torch.arange(T, device=device)[:, None] < lengths[None, :]).unsqueeze(-1)


def shifted(x: torch.Tensor, later: bool) -> torch.Tensor:
    """``x`` moved one step along time, zero at the edge: ``out[t] = x[t + 1]`` if ``later`` else
    ``x[t - 1]``. (T, B, N) -> (T, B, N)."""
    edge = torch.zeros_like(x[:1])
    return torch.cat((x[1:], edge)) if later else torch.cat((edge, x[:-1]))


def previous_states(y: torch.Tensor, h0: torch.Tensor | None, reverse: bool,
                    lengths: torch.Tensor | None) -> torch.Tensor:
    """``h_{t-1}`` of every step t, (T, B, N): ``y`` one step back along the walk, ``h0`` (or zeros)
    at each sequence's first step. ``y`` must be zero past each sequence's end (a reverse walk's
    first step ``lengths[b] - 1`` then reads zeros before h0 is put there)."""
    h_prev = shifted(y, later=reverse)
    if h0 is not None:
        first = edge_step(y.shape[0], reverse, lengths, y.device)
        h_prev = h_prev.index_put(_rows_index(y, first), h0)
    return h_prev


def sum_with_previous(d: torch.Tensor, y: torch.Tensor, h0: torch.Tensor | None,
                      d_first: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``sum_t d[t].T @ h_{t-1}``, (N, P), for ``d (T, B, N)`` zero past each sequence's end and
    ``d_first (B, N)`` its rows at each sequence's first step: ``h_{t-1}`` is ``y (T, B, P)`` one step
    back along the walk (zero past each end, so a reverse walk's first step ``lengths[b] - 1`` reads
    zeros there), plus ``h0`` at each first step; without building ``h_{t-1}`` for every step."""
    N, P = d.shape[2], y.shape[2]
    d_, y_ = (d[:-1], y[1:]) if reverse else (d[1:], y[:-1])
    out = d_.reshape(-1, N).T @ y_.reshape(-1, P)
    return out if h0 is None else torch.addmm(out, d_first.T, h0)


def _rows_index(x: torch.Tensor, step):
    B = x.shape[1]
    if isinstance(step, int):
        step = torch.full((B,), step, dtype=torch.int64, device=x.device)
    return (step, torch.arange(B, device=x.device))


def check_operands(x_proj: torch.Tensor, **operands: torch.Tensor | None) -> None:
    """Each operand given (None skipped) has x_proj's dtype and device."""
    for name, t in operands.items():
        if t is None:
            continue
        if t.dtype != x_proj.dtype:
            raise RuntimeError(f"{name} dtype ({t.dtype}) does not match input dtype ({x_proj.dtype})")
        if t.device != x_proj.device:
            raise RuntimeError(f"Input and {name} tensors are not at the same device, found input "
                               f"tensor at {x_proj.device} and {name} tensor at {t.device}")


def lengths_on_device(lengths, T: int, B: int, device: torch.device) -> torch.Tensor:
    """``lengths (B,)`` as contiguous int64 on ``device``. Host lengths (a CPU tensor or a list) are
    checked to lie in [1, T] and moved once; a tensor already on an accelerator ``device`` is taken
    unchecked, without a host sync."""
    on_device = isinstance(lengths, torch.Tensor) and lengths.device.type != "cpu"
    if on_device and lengths.device != device:
        raise RuntimeError(f"lengths must be on the CPU or on the input's device ({device}), "
                           f"found {lengths.device}")
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=lengths.device if on_device else "cpu")
    if tuple(lengths.shape) != (B,):
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
