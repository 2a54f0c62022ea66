"""The Elman cell: ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``, act tanh or relu.

    y, h_n = recurrence(x_proj, h0, w_hh, nonlinearity="tanh", reverse=False, lengths=None)

``x_proj (T, B, H)`` is the input projection with both biases already added
(``x @ w_ih.T + b_ih + b_hh``, one matrix product for all steps); ``h0 (B, H)`` or None (zeros);
``w_hh (H, H)``. Returns every hidden state ``y (T, B, H)`` and the final state ``h_n (B, H)``:
    h_t = act(x_proj[t] + h_{t-1} @ w_hh.T)
``reverse`` walks time backwards (the reverse direction of a bidirectional layer). ``lengths (B,)``
gives each sequence's length for packed input: sequence ``b`` updates only while ``t < lengths[b]``,
``y`` is zero past its end and ``h_n[b]`` is its last valid state. Lengths on the CPU are checked
(each in [1, T]) and copied to x_proj's device once; lengths already there are taken as they are
(checking them would make the host wait for the GPU).

In this file, as in every cell's: the readable reference (a plain loop, autograd gives its
backward), the PyTorch twins of the kernels' loops (the CPU path), the custom ops with their
autograd formulas, the functional op, and the module ``fastrnn.RNN``. The kernels are
``fastrnn.kernels.elman``; the backend is picked by ``fastrnn.backend``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .backend import backend_on, loop, requested_backend
from .module import FusedRNNBase, bias_sum
from .op import Differentiable, loop_flops, own_precision, register_flop_formula, save_for_derivatives, with_defaults
from .sequence import (add_at, add_final, as_dtype, at_step, check_operands, checked_steps, cut_after, cut_steps,
                       edge_step, enters, final_steps, previous_states, shifted, valid_steps)

NONLINEARITIES = ("tanh", "relu")


# --------------------------------------------------------------------------------------------------
# The reference: a plain loop over time (the CPU path)
# --------------------------------------------------------------------------------------------------


def recurrence_reference(x_proj: torch.Tensor, h0: torch.Tensor | None, w_hh: torch.Tensor,
                         nonlinearity: str = "tanh", reverse: bool = False,
                         lengths: torch.Tensor | None = None,
                         resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence one step at a time in PyTorch; autograd provides the backward. Where a new
    sequence starts (``resets``), the state entering the step is zero."""
    T, B, H = x_proj.shape
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    h = h0 if h0 is not None else x_proj.new_zeros(B, H)
    valid = valid_steps(T, lengths, x_proj.device)  # (T, B, 1): step t is part of sequence b
    cut = cut_steps(resets, reverse)  # (T, B, 1): a new sequence starts, from zero
    ys: list[torch.Tensor | None] = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if cut is not None:
            h = torch.where(cut[t], torch.zeros_like(h), h)
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


def elman_fwd_torch(x_proj, h0, w_hh, activation="tanh", reverse=False, lengths=None, resets=None):
    """The forward launcher's twin in PyTorch: ``y (T, B, H)`` and ``h_n (B, H)``, no autograd graph."""
    T, B, H = x_proj.shape
    act_ = torch.Tensor.tanh_ if activation == "tanh" else torch.Tensor.relu_
    y = x_proj.contiguous().clone()  # y[t] starts as x_proj[t] and becomes h_t in place
    h = h0 if h0 is not None else x_proj.new_zeros(B, H)
    w_t = w_hh.t()
    valid, cut = valid_steps(T, lengths, y.device), cut_steps(resets, reverse)
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if cut is not None:
            h = h.masked_fill(cut[t], 0.0)  # a new sequence starts from zero
        h_new = act_(y[t].addmm_(h, w_t))
        if valid is None:
            h = h_new
        else:
            h = torch.where(valid[t], h_new, h)
            h_new.masked_fill_(~valid[t], 0.0)  # zero past each sequence's end
    return y, h if valid is not None and T > 0 else h.clone()  # (else a step of y, or h0)


def elman_bwd_torch(dy, dh_n, y, w_hh, activation="tanh", reverse=False, lengths=None, resets=None):
    """The backward launcher's twin in PyTorch: ``d_pre (T, B, H)``, walking time in reverse (``dy`` or
    ``dh_n`` None: no gradient reached y, or h_n)."""
    T, B, H = y.shape
    dy = dy if dy is not None else torch.zeros_like(y)
    d_pre = torch.empty_like(y)
    valid = valid_steps(T, lengths, y.device)
    cut_next = cut_after(cut_steps(resets, reverse), reverse)  # no gradient back across a cut
    last = edge_step(T, not reverse, lengths, y.device)
    at_last = final_steps(T, last, y.dtype, y.device)  # (T, B, 1) or None: where h_n was read
    d = None  # d_pre of the step processed last: it feeds g through w_hh
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        if d is not None and cut_next is not None:
            d = d.masked_fill(cut_next[t], 0.0)
        g = dy[t].clone() if d is None else torch.addmm(dy[t], d, w_hh)
        add_final(g, dh_n, t, last, at_last)
        d = d_pre[t]
        if activation == "tanh":
            torch.mul(g, 1 - y[t] * y[t], out=d)
        else:
            torch.mul(g, y[t] > 0, out=d)
        if valid is not None:
            d.masked_fill_(~valid[t], 0.0)
    return d_pre


# --------------------------------------------------------------------------------------------------
# The custom ops and their autograd formula
# --------------------------------------------------------------------------------------------------

# The recurrence is registered as two PyTorch custom ops, so that torch.compile keeps it in one graph
# (no graph break), fake/meta tensors get shapes without running a kernel, and autograd pairs them.
# Their loops are the Triton kernels, or their PyTorch twins above on the ``torch`` backend; the
# products over all steps are single matrix products (cuBLAS on GPU). Only ``y``, ``h0`` and
# ``w_hh`` are saved: ``y`` gives every ``h_{t-1}`` and the activation's derivative (1 - y**2).


def elman_forward(x_proj: torch.Tensor, h0: Optional[torch.Tensor], w_hh: torch.Tensor, nonlinearity: str,
                  reverse: bool, lengths: Optional[torch.Tensor], backend: str,
                  resets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward op: -> ``y (T, B, H)``, ``h_n (B, H)``."""
    fwd = loop(backend_on(backend, x_proj.device), "elman", "elman_fwd", elman_fwd_torch)
    return fwd(x_proj, h0, w_hh, nonlinearity, reverse, lengths, resets)


elman_fwd_op = torch.library.custom_op("fastrnn::elman_fwd", elman_forward, mutates_args=())


@elman_fwd_op.register_fake
def _(x_proj, h0, w_hh, nonlinearity, reverse, lengths, backend, resets=None):
    return torch.empty_like(x_proj, memory_format=torch.contiguous_format), x_proj.new_empty(x_proj.shape[1:])


# FlopCounterMode's count: h_{t-1} W_hh^T at each of T steps
register_flop_formula(elman_fwd_op, lambda x_proj, h0, w_hh, *_, **__: loop_flops(*x_proj[:2], w_hh))


def elman_backward(dy: Optional[torch.Tensor], dh_n: Optional[torch.Tensor], y: torch.Tensor, w_hh: torch.Tensor,
                   nonlinearity: str, reverse: bool, lengths: Optional[torch.Tensor], backend: str,
                   resets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The backward op: -> ``d_pre (T, B, H)``, the gradient of the pre-activations (``dy`` or ``dh_n``
    None: y, or h_n, had no gradient)."""
    bwd = loop(backend_on(backend, y.device), "elman", "elman_bwd", elman_bwd_torch)
    return bwd(dy, dh_n, y, w_hh, nonlinearity, reverse, lengths, resets)


elman_bwd_op = torch.library.custom_op("fastrnn::elman_bwd", elman_backward, mutates_args=())


@elman_bwd_op.register_fake
def _(dy, dh_n, y, w_hh, nonlinearity, reverse, lengths, backend, resets=None):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


# FlopCounterMode's count: d_pre_t W_hh at T - 1 steps (dh0's product comes after, outside)
register_flop_formula(elman_bwd_op, lambda dy, dh_n, y, w_hh, *_, **__: loop_flops(y[0] - 1, y[1], w_hh))


def _setup_context(ctx, inputs, output):
    x_proj, h0, w_hh, nonlinearity, reverse, lengths, backend, resets = with_defaults(inputs, 8)
    save_for_derivatives(ctx, output[0], h0, w_hh, lengths, resets)
    ctx.nonlinearity, ctx.reverse, ctx.backend = nonlinearity, reverse, backend
    ctx.set_materialize_grads(False)  # h_n's gradient stays None where the loss did not read it: no zeros made


@own_precision
def _backward(ctx, dy, dh_n):
    y, h0, w_hh, lengths, resets = ctx.saved_tensors
    T, _, H = y.shape
    d_pre = ELMAN_BWD(dy, dh_n, y, w_hh, ctx.nonlinearity, ctx.reverse, lengths, ctx.backend, resets)
    cut = cut_steps(resets, ctx.reverse)  # (T, B, 1): the state entering step t is zero, or None
    d_first = enters(at_step(d_pre, edge_step(T, ctx.reverse, lengths, y.device)), cut, ctx.reverse)  # (B, H)
    dh0 = d_first @ w_hh if h0 is not None and ctx.needs_input_grad[1] else None
    dw_hh = None
    if ctx.needs_input_grad[2]:
        # dw_hh = sum_t d_pre[t].T @ h_{t-1}: h_{t-1} = y[t -+ 1] (zero where cut), or h0 at the first step
        d_in = d_pre if cut is None else d_pre.masked_fill(cut, 0.0)
        d_mid, h_mid = (d_in[:-1], y[1:]) if ctx.reverse else (d_in[1:], y[:-1])
        dw_hh = d_mid.reshape(-1, H).T @ h_mid.reshape(-1, H)  # (H, H)
        if h0 is not None:
            dw_hh = dw_hh + d_first.T @ h0
    dx_proj = d_pre if ctx.needs_input_grad[0] else None
    return dx_proj, dh0, dw_hh, None, None, None, None, None


# The backward's own derivative (double backward: gradient penalties, Hessian-vector products).
# The backward is linear in (dy, dh_n): with a_t = act'(y_t) and t_next the step that consumed h_t,
#     g_t = dy[t] + [t last] dh_n + d[t_next] @ w_hh,    d[t] = a_t * g_t.
# For an upstream gradient e of d, its adjoint runs the other way in time through w_hh.T:
#     G_t = a_t * (e[t] + G[t_prev] @ w_hh.T)       (G = dL/dg: the same backward op, reversed)
# and then dL/d(dy) = G, dL/d(dh_n) = G at the last step, dL/dw_hh = sum_t d[t_next].T @ G[t],
# dL/dy[t] = (e[t] + G[t_prev] @ w_hh.T) * g_t * da_t/dy_t (-2 y for tanh, 0 for relu).
# Resets cut the same links in every one of these recurrences: the op walking the other way with the
# same ``resets`` cuts exactly where the forward did.


def _setup_context_bwd(ctx, inputs, output):
    dy, dh_n, y, w_hh, nonlinearity, reverse, lengths, backend, resets = with_defaults(inputs, 9)
    save_for_derivatives(ctx, dy, dh_n, y, w_hh, lengths, resets, output)
    ctx.nonlinearity, ctx.reverse, ctx.backend = nonlinearity, reverse, backend


@own_precision
def _backward_of_backward(ctx, e):
    dy, dh_n, y, w_hh, lengths, resets, d_pre = ctx.saved_tensors
    T, B, H = y.shape
    reverse = ctx.reverse  # the forward's direction; the backward walked the other way
    G = ELMAN_BWD(e.contiguous(), None, y, w_hh.t(), ctx.nonlinearity, not reverse, lengths, ctx.backend,
                  resets)  # (T, B, H) = dL/dg
    cut = cut_steps(resets, reverse)
    last = edge_step(T, not reverse, lengths, y.device)
    d_dy = G if ctx.needs_input_grad[0] else None
    d_dh_n = at_step(G, last) if ctx.needs_input_grad[1] else None
    d_w = None
    if ctx.needs_input_grad[3]:  # g_t holds d[t_next] @ w_hh: t_next = t + 1 (t - 1 with reverse), if not cut
        G_in = G if cut is None else G.masked_fill(cut_after(cut, reverse), 0.0)
        d_next, G_now = (d_pre[:-1], G_in[1:]) if reverse else (d_pre[1:], G_in[:-1])
        d_w = d_next.reshape(-1, H).T @ G_now.reshape(-1, H)  # (H, H)
    d_y = None
    if ctx.needs_input_grad[2] and ctx.nonlinearity == "tanh":
        D = e + shifted(G, later=reverse, cut=cut) @ w_hh.T  # dL/dd, (T, B, H)
        g = _backward_g(dy, dh_n, d_pre, w_hh, reverse, lengths, cut)
        d_y = D * g * (-2.0 * y)  # zero past each sequence's end, where y is zero
    return d_dy, d_dh_n, d_y, d_w, None, None, None, None, None


def _backward_g(dy, dh_n, d_pre, w_hh, reverse, lengths, cut):
    """The backward's ``g_t = dy[t] + [t last] dh_n + d_pre[t_next] @ w_hh``, all steps at once."""
    T, B, _ = d_pre.shape
    g = shifted(d_pre, later=not reverse, cut=cut_after(cut, reverse)) @ w_hh
    g = dy + g if dy is not None else g
    return add_at(g, edge_step(T, not reverse, lengths, d_pre.device), dh_n)


# Forward-mode derivatives (torch.func.jvp, jacfwd, hessian). The tangent of the forward is the
# same linear recurrence as G above, fed with e_t = dx[t] + h_{t-1} @ dw.T (+ dh0 @ w_hh.T at each
# sequence's first step). The tangent of the backward, with s_t = g_t * da_t (da: the tangent of
# act'(y_t)), is s + u, where u is the backward op run on dy' + s[t_next] @ w_hh + d[t_next] @ dw.


@own_precision
def _jvp(ctx, dx, dh0, dw, *_):
    y, h0, w_hh, lengths, resets = ctx.saved_tensors
    T, B, _ = y.shape
    cut = cut_steps(resets, ctx.reverse)
    e = dx if dx is not None else torch.zeros_like(y)
    if dw is not None:
        e = e + previous_states(y, h0, ctx.reverse, lengths, cut) @ dw.T
    if dh0 is not None:
        e = add_at(e, edge_step(T, ctx.reverse, lengths, y.device), enters(dh0, cut, ctx.reverse) @ w_hh.T)
    dy = ELMAN_BWD(e.contiguous(), None, y, w_hh.t(), ctx.nonlinearity, not ctx.reverse, lengths, ctx.backend,
                   resets)
    return dy, at_step(dy, edge_step(T, not ctx.reverse, lengths, y.device))


@own_precision
def _jvp_of_backward(ctx, d_dy, d_dh_n, d_y, d_w, *_):
    dy, dh_n, y, w_hh, lengths, resets, d_pre = ctx.saved_tensors
    reverse = ctx.reverse
    cut = cut_steps(resets, reverse)
    cut_next = cut_after(cut, reverse)
    s = torch.zeros_like(y)
    if d_y is not None and ctx.nonlinearity == "tanh":  # relu's act' is flat: no tangent
        s = _backward_g(dy, dh_n, d_pre, w_hh, reverse, lengths, cut) * (-2.0 * y * d_y)
    e = (d_dy if d_dy is not None else torch.zeros_like(y)) + shifted(s, later=not reverse, cut=cut_next) @ w_hh
    if d_w is not None:
        e = e + shifted(d_pre, later=not reverse, cut=cut_next) @ d_w
    d_dh_n = d_dh_n.contiguous() if d_dh_n is not None else None
    u = ELMAN_BWD(e.contiguous(), d_dh_n, y, w_hh, ctx.nonlinearity, reverse, lengths, ctx.backend,
                  resets)
    return u + s


ELMAN = Differentiable("Elman", elman_fwd_op, elman_forward, _setup_context, _backward, _jvp, cell="RNN")
ELMAN_BWD = Differentiable("ElmanBackward", elman_bwd_op, elman_backward, _setup_context_bwd, _backward_of_backward,
                           _jvp_of_backward, cell="RNN", of_backward=True)


# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------


def recurrence(x_proj: torch.Tensor, h0: torch.Tensor | None, w_hh: torch.Tensor,
               nonlinearity: str = "tanh", reverse: bool = False, lengths: torch.Tensor | None = None,
               resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``y (T, B, H), h_n (B, H)`` of the Elman recurrence; see the module docstring."""
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    if x_proj.dim() != 3:
        raise ValueError(f"x_proj must be 3-D (T, B, H), got {x_proj.dim()}-D")
    T, B, H = x_proj.shape
    if w_hh.shape != (H, H):
        raise RuntimeError(f"w_hh must be ({H}, {H}), got {tuple(w_hh.shape)}")
    if h0 is not None and h0.shape != (B, H):
        raise RuntimeError(f"Expected hidden size ({B}, {H}), got {list(h0.shape)}")
    check_operands(x_proj, w_hh=w_hh, h0=h0)
    lengths, resets = checked_steps(lengths, resets, T, B, x_proj.device)
    if T == 0 or B == 0:
        return recurrence_reference(x_proj, h0, w_hh, nonlinearity, reverse, lengths, resets)
    backend = requested_backend()  # (as named: the op picks its loop for the tensors it is given)
    return ELMAN(x_proj, h0, w_hh, nonlinearity, reverse, lengths, backend, resets)


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


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

    def _run_direction(self, x, suffix, start, reverse, lengths, resets):
        w_ih, w_hh, b_ih, b_hh = self._weights(suffix)
        x_proj = F.linear(x, w_ih, bias_sum(b_ih, b_hh))  # (T, B, H): all steps at once
        w_hh, h0 = as_dtype(x_proj.dtype, w_hh, start[0] if start else None)  # autocast
        y, h_n = recurrence(x_proj, h0, w_hh, self.nonlinearity, reverse, lengths, resets)
        return y, (h_n,)
