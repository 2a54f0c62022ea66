"""The one functional op of fastrnn: the Elman recurrence over a whole sequence.

    y, h_n = recurrence(x_proj, h0, w_hh, nonlinearity="tanh", reverse=False, lengths=None)

``x_proj (T, B, H)`` is the input projection with both biases already added
(``x @ w_ih.T + b_ih + b_hh``, one matrix product for all steps); ``h0 (B, H)`` or None (zeros);
``w_hh (H, H)``. Returns every hidden state ``y (T, B, H)`` and the final state ``h_n (B, H)``:
    h_t = act(x_proj[t] + h_{t-1} @ w_hh.T)
``reverse`` walks time backwards (the reverse direction of a bidirectional layer). ``lengths (B,)``
(int64, on the CPU) gives each sequence's length for packed input: sequence ``b`` updates only while
``t < lengths[b]``, ``y`` is zero past its end and ``h_n[b]`` is its last valid state.

Backends (``FASTRNN_BACKEND``): ``torch``, the plain PyTorch loop below; ``triton``, the fused
kernels of ``fastrnn.kernels`` (on CPU tensors only under ``TRITON_INTERPRET=1``); ``auto`` (default),
``triton`` for CUDA tensors and ``torch`` otherwise.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "torch")
NONLINEARITIES = ("tanh", "relu")


def get_backend(device: torch.device) -> str:
    """The backend a tensor on ``device`` runs on, from ``FASTRNN_BACKEND``."""
    backend = os.environ.get("FASTRNN_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"FASTRNN_BACKEND must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("FASTRNN_BACKEND=triton but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"FASTRNN_BACKEND=triton on {device.type} tensors needs "
                               "TRITON_INTERPRET=1 (set before importing fastrnn), or CUDA tensors")
    return backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# The reference: a plain loop over time (the CPU path)
# --------------------------------------------------------------------------------------------------


def recurrence_reference(x_proj: torch.Tensor, h0: torch.Tensor | None, w_hh: torch.Tensor,
                         nonlinearity: str = "tanh", reverse: bool = False,
                         lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time in PyTorch; autograd provides the backward."""
    T, B, H = x_proj.shape
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    h = h0 if h0 is not None else x_proj.new_zeros(B, H)
    valid = _valid_steps(T, lengths, x_proj.device)  # (T, B, 1): step t is part of sequence b
    ys: list[torch.Tensor | None] = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h_new = act(torch.addmm(x_proj[t], h, w_hh.t()))  # (B, H)
        if lengths is None:
            h = ys[t] = h_new
        else:
            h = torch.where(valid[t], h_new, h)
            ys[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
    y = torch.stack(ys) if T > 0 else x_proj.new_empty(0, B, H)
    return y, h


# --------------------------------------------------------------------------------------------------
# The loops as the kernels run them: the forward writes every h_t, the backward every d_pre[t];
# the Triton launchers in fastrnn.kernels and, below, their PyTorch twins (the CPU path)
# --------------------------------------------------------------------------------------------------


def _edge_step(T: int, last: bool, lengths: torch.Tensor | None, device) -> torch.Tensor | int:
    """Index (in time order) of each sequence's first or last step: one int, or (B,) with lengths.
    The state h_n is read at the last step a direction takes (``last = not reverse``); h0 enters at
    the first one it takes (``last = reverse``)."""
    if not last:
        return 0
    if lengths is None:
        return T - 1
    return (lengths - 1).to(device)


def _at_step(x: torch.Tensor, step: torch.Tensor | int) -> torch.Tensor:
    """``x[step[b], b]`` for each b: (T, B, H) -> (B, H)."""
    if isinstance(step, int):
        return x[step]
    return x[step, torch.arange(x.shape[1], device=x.device)]


def recurrence_fwd_torch(x_proj, h0, w_hh, activation="tanh", reverse=False, lengths=None):
    """The forward launcher's twin in PyTorch: ``y (T, B, H)``, no autograd graph."""
    T, B, H = x_proj.shape
    act_ = torch.Tensor.tanh_ if activation == "tanh" else torch.Tensor.relu_
    y = x_proj.contiguous().clone()  # y[t] starts as x_proj[t] and becomes h_t in place
    h = h0 if h0 is not None else x_proj.new_zeros(B, H)
    w_t = w_hh.t()
    valid = _valid_steps(T, lengths, y.device)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h_new = act_(y[t].addmm_(h, w_t))
        if valid is None:
            h = h_new
        else:
            h = torch.where(valid[t], h_new, h)
            h_new.masked_fill_(~valid[t], 0.0)  # zero past each sequence's end
    return y


def recurrence_bwd_torch(dy, dh_n, y, w_hh, activation="tanh", reverse=False, lengths=None):
    """The backward launcher's twin in PyTorch: ``d_pre (T, B, H)``, walking time in reverse."""
    T, B, H = y.shape
    d_pre = torch.empty_like(y)
    valid = _valid_steps(T, lengths, y.device)
    last = _edge_step(T, not reverse, lengths, y.device)
    d = None  # d_pre of the step processed last: it feeds g through w_hh
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        g = dy[t].clone() if d is None else torch.addmm(dy[t], d, w_hh)
        if isinstance(last, int):
            if t == last:
                g += dh_n
        else:
            g += dh_n * (last == t)[:, None]
        d = d_pre[t]
        if activation == "tanh":
            torch.mul(g, 1 - y[t] * y[t], out=d)
        else:
            torch.mul(g, y[t] > 0, out=d)
        if valid is not None:
            d.masked_fill_(~valid[t], 0.0)
    return d_pre


def _valid_steps(T, lengths, device):
    """(T, B, 1) bool mask of the steps each sequence takes, or None for full sequences."""
    if lengths is None:
        return None
    return (torch.arange(T)[:, None] < lengths.cpu()[None, :]).to(device).unsqueeze(-1)


# --------------------------------------------------------------------------------------------------
# The custom ops and their autograd formula
# --------------------------------------------------------------------------------------------------

# The recurrence is registered as two PyTorch custom ops, so that torch.compile keeps it in one graph
# (no graph break), fake/meta tensors get shapes without running a kernel, and autograd pairs them.
# Their loops are the Triton kernels, or their PyTorch twins above on the ``torch`` backend; the
# products over all steps are single matrix products (cuBLAS on GPU). Only ``y``, ``h0`` and
# ``w_hh`` are saved: ``y`` gives every ``h_{t-1}`` and the activation's derivative (1 - y**2).


@torch.library.custom_op("fastrnn::recurrence_fwd", mutates_args=())
def recurrence_fwd_op(x_proj: torch.Tensor, h0: Optional[torch.Tensor], w_hh: torch.Tensor,
                      nonlinearity: str, reverse: bool, lengths: Optional[torch.Tensor],
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ``y (T, B, H)``, ``h_n (B, H)``."""
    if backend == "triton":
        from fastrnn.kernels import recurrence_fwd as fwd
    else:
        fwd = recurrence_fwd_torch
    lengths_dev = lengths.to(x_proj.device) if lengths is not None else None
    y = fwd(x_proj, h0, w_hh, nonlinearity, reverse, lengths_dev)
    h_n = _at_step(y, _edge_step(y.shape[0], not reverse, lengths_dev, y.device)).clone()
    return y, h_n


@recurrence_fwd_op.register_fake
def _(x_proj, h0, w_hh, nonlinearity, reverse, lengths, backend):
    return torch.empty_like(x_proj, memory_format=torch.contiguous_format), x_proj.new_empty(x_proj.shape[1:])


@torch.library.custom_op("fastrnn::recurrence_bwd", mutates_args=())
def recurrence_bwd_op(dy: torch.Tensor, dh_n: torch.Tensor, y: torch.Tensor, w_hh: torch.Tensor,
                      nonlinearity: str, reverse: bool, lengths: Optional[torch.Tensor],
                      backend: str) -> torch.Tensor:
    """-> ``d_pre (T, B, H)``, the gradient of the pre-activations."""
    if backend == "triton":
        from fastrnn.kernels import recurrence_bwd as bwd
    else:
        bwd = recurrence_bwd_torch
    lengths_dev = lengths.to(y.device) if lengths is not None else None
    return bwd(dy, dh_n, y, w_hh, nonlinearity, reverse, lengths_dev)


@recurrence_bwd_op.register_fake
def _(dy, dh_n, y, w_hh, nonlinearity, reverse, lengths, backend):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x_proj, h0, w_hh, nonlinearity, reverse, lengths, backend = inputs
    ctx.save_for_backward(output[0], h0, w_hh, lengths)
    ctx.nonlinearity, ctx.reverse, ctx.backend = nonlinearity, reverse, backend


def _backward(ctx, dy, dh_n):
    y, h0, w_hh, lengths = ctx.saved_tensors
    T, _, H = y.shape
    dy = torch.zeros_like(y) if dy is None else dy.contiguous()
    dh_n = torch.zeros_like(y[0]) if dh_n is None else dh_n.contiguous()
    d_pre = recurrence_bwd_op(dy, dh_n, y, w_hh, ctx.nonlinearity, ctx.reverse, lengths, ctx.backend)

    lengths_dev = lengths.to(y.device) if lengths is not None else None
    d_first = _at_step(d_pre, _edge_step(T, ctx.reverse, lengths_dev, y.device))  # (B, H)
    dh0 = d_first @ w_hh if h0 is not None and ctx.needs_input_grad[1] else None
    dw_hh = None
    if ctx.needs_input_grad[2]:
        # dw_hh = sum_t d_pre[t].T @ h_{t-1}: h_{t-1} = y[t -+ 1], or h0 at the first step
        d_mid, h_mid = (d_pre[:-1], y[1:]) if ctx.reverse else (d_pre[1:], y[:-1])
        dw_hh = d_mid.reshape(-1, H).T @ h_mid.reshape(-1, H)  # (H, H)
        if h0 is not None:
            dw_hh = dw_hh + d_first.T @ h0
    dx_proj = d_pre if ctx.needs_input_grad[0] else None
    return dx_proj, dh0, dw_hh, None, None, None, None


recurrence_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------


def recurrence(x_proj: torch.Tensor, h0: torch.Tensor | None, w_hh: torch.Tensor,
               nonlinearity: str = "tanh", reverse: bool = False,
               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``y (T, B, H), h_n (B, H)`` of the Elman recurrence; see the module docstring."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    if x_proj.dim() != 3:
        raise ValueError(f"x_proj must be 3-D (T, B, H), got {x_proj.dim()}-D")
    T, B, H = x_proj.shape
    if tuple(w_hh.shape) != (H, H):
        raise RuntimeError(f"w_hh must be ({H}, {H}), got {tuple(w_hh.shape)}")
    if h0 is not None and tuple(h0.shape) != (B, H):
        raise RuntimeError(f"Expected hidden size ({B}, {H}), got {list(h0.shape)}")
    for name, t in (("w_hh", w_hh), ("h0", h0)):
        if t is None:
            continue
        if t.dtype != x_proj.dtype:
            raise RuntimeError(f"{name} dtype ({t.dtype}) does not match input dtype ({x_proj.dtype})")
        if t.device != x_proj.device:
            raise RuntimeError(f"Input and {name} tensors are not at the same device, found input "
                               f"tensor at {x_proj.device} and {name} tensor at {t.device}")
    if lengths is not None:
        lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape ({B},), got {tuple(lengths.shape)}")
        if B > 0 and (int(lengths.min()) < 1 or int(lengths.max()) > T):
            raise ValueError(f"lengths must lie in [1, {T}]")
    if T == 0 or B == 0:
        return recurrence_reference(x_proj, h0, w_hh, nonlinearity, reverse, lengths)
    backend = "torch" if x_proj.device.type == "meta" else get_backend(x_proj.device)
    return recurrence_fwd_op(x_proj, h0, w_hh, nonlinearity, reverse, lengths, backend)
