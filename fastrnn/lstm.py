"""The LSTM recurrence over a whole sequence, gate order i, f, g, o as ``torch.nn.LSTM``:

    y, h_n, c_n = lstm_recurrence(x_proj, h0, c0, w_hh, w_hr=None, reverse=False, lengths=None)

``x_proj (T, B, 4H)`` is the input projection with both biases added (``x @ w_ih.T + b_ih + b_hh``,
one product for all steps); ``h0 (B, P)``, ``c0 (B, H)`` or None (zeros); ``w_hh (4H, P)``;
``w_hr (P, H)`` the projection (``proj_size = P``) or None (then P = H). Each step:
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (x_proj[t] + h_{t-1} @ w_hh.T)
    c_t = f * c_{t-1} + i * g;    h_t = (o * tanh(c_t)) @ w_hr.T   (or o * tanh(c_t))
Returns every ``h_t`` as ``y (T, B, P)`` and the final states ``h_n (B, P)``, ``c_n (B, H)``.
``reverse`` and ``lengths`` as in ``fastrnn.recurrence``: past each sequence's end ``y`` is zero and the
state is carried unchanged. Backends as in ``fastrnn.backend``.
"""

from __future__ import annotations

from typing import Optional

import torch

from torch.nn import functional as F
from torch import nn

from .backend import backend_on, loop, requested_backend
from .module import FusedRNNBase, bias_sum
from .op import (Differentiable, loop_flops, own_precision, register_flop_formula, save_for_derivatives,
                 saved_for_backward, transposed, with_defaults)
from .sequence import (Walk, acc_dtype, add_at, add_final, as_dtype, at_step, carried_copy, check_operands,
                       checked_steps, cut_after, cut_steps, edge_step, enters, final_state, final_steps, huge_pages,
                       previous_states, shifted, sigmoid_backward, step_rows, sum_with_previous, tanh_backward, to_acc,
                       valid_steps)

# --------------------------------------------------------------------------------------------------
# The reference: a plain loop over time, autograd gives the backward
# --------------------------------------------------------------------------------------------------


def lstm_reference(x_proj: torch.Tensor, h0: torch.Tensor | None, c0: torch.Tensor | None,
                   w_hh: torch.Tensor, w_hr: torch.Tensor | None = None, reverse: bool = False,
                   lengths: torch.Tensor | None = None, resets: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LSTM one step at a time in PyTorch: ``y (T, B, P), h_n (B, P), c_n (B, H)``; where a new
    sequence starts (``resets``), the states entering the step are zero."""
    T, B, G = x_proj.shape
    H, P = G // 4, w_hh.shape[1]
    h = h0 if h0 is not None else x_proj.new_zeros(B, P)
    c = c0 if c0 is not None else x_proj.new_zeros(B, H)
    valid = valid_steps(T, lengths, x_proj.device)  # (T, B, 1): step t is part of sequence b
    cut = cut_steps(resets, reverse)  # (T, B, 1): a new sequence starts, from zero
    ys: list[torch.Tensor | None] = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if cut is not None:
            h, c = torch.where(cut[t], torch.zeros_like(h), h), torch.where(cut[t], torch.zeros_like(c), c)
        z_i, z_f, z_g, z_o = torch.addmm(x_proj[t], h, w_hh.t()).chunk(4, 1)  # (B, 4H) -> 4 x (B, H)
        c_new = torch.sigmoid(z_f) * c + torch.sigmoid(z_i) * torch.tanh(z_g)
        h_new = torch.sigmoid(z_o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()  # (B, H) -> (B, P)
        if lengths is None:
            h, c, ys[t] = h_new, c_new, h_new
        else:
            h = torch.where(valid[t], h_new, h)
            c = torch.where(valid[t], c_new, c)
            ys[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
    y = torch.stack(ys) if T > 0 else x_proj.new_empty(0, B, P)
    return y, h, c


# --------------------------------------------------------------------------------------------------
# The loops as the kernels run them (their PyTorch twins, the CPU path): the forward writes every
# h_t, c_t and gate, the backward every gate gradient; states and sums in fp32 for fp16/bf16
# --------------------------------------------------------------------------------------------------


def lstm_fwd_torch(x_proj, h0, c0, w_hh, w_hr=None, reverse=False, lengths=None, resets=None, save=True):
    """The forward launcher's twin: ``y (T, B, P)``, ``c (T, B, H)`` and ``gates (T, B, 4H)`` (i, f, g,
    o after their nonlinearity; without ``save`` both empty, ``(0, B, .)``), all zero past each
    sequence's end, the final h ``(B, P)`` in y's dtype and the final cell state ``(B, H)`` in the
    accumulator's precision; no autograd graph.

    In fp32/fp64 each step writes straight into its slices of the outputs (the product into
    ``gates[t]``, whose gates then take their nonlinearity in place), with no temporary per step;
    fp16/bf16 steps run in fp32 buffers and are copied out; without ``save`` every step works in the
    same few buffers (``_lstm_buffers``)."""
    T, B, G = x_proj.shape
    H, P, acc = G // 4, w_hh.shape[1], acc_dtype(x_proj.dtype)
    direct = x_proj.dtype == acc  # the outputs are the working buffers
    y, c, gates, z_all, c_steps = _lstm_buffers(x_proj, P, acc, direct, save)
    w_hh_t = w_hh.to(acc).t().contiguous()  # (P, 4H): the faster layout for the product
    w_hr_t = w_hr.to(acc).t().contiguous() if w_hr is not None else None
    valid = valid_steps(T, lengths, x_proj.device)
    if valid is None:  # the states are the previous step's outputs, or h0, c0 (read only)
        h = h0.to(acc) if h0 is not None else x_proj.new_zeros(B, P, dtype=acc)
        c_prev = c0.to(acc) if c0 is not None else x_proj.new_zeros(B, H, dtype=acc)
    else:  # the states are carried past each sequence's end, in buffers of their own
        invalid = ~valid
        h = carried_copy(h0, acc) if h0 is not None else x_proj.new_zeros(B, P, dtype=acc)
        c_prev = carried_copy(c0, acc) if c0 is not None else x_proj.new_zeros(B, H, dtype=acc)
    tanh_c = x_proj.new_empty(B, H, dtype=acc)  # tanh(c_t), then m_t = o * tanh(c_t) with w_hr
    # every step's views, made at once: z (B, 4H) and its parts, h_t
    zs, sig_if, tanh_g, sig_o = (z_all.unbind(0), z_all[..., :2 * H].unbind(0),
                                 z_all[..., 2 * H:3 * H].unbind(0), z_all[..., 3 * H:].unbind(0))
    i_s, f_s = z_all[..., :H].unbind(0), z_all[..., H:2 * H].unbind(0)
    xs, ys, saved = x_proj.unbind(0), y.unbind(0), list(zip(c.unbind(0), gates.unbind(0))) if save else None
    cut = cut_steps(resets, reverse)  # resets come without lengths: the states are outputs' views
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if cut is not None:  # a new sequence starts from zero
            h, c_prev = h.masked_fill(cut[t], 0.0), c_prev.masked_fill(cut[t], 0.0)
        z, c_t = zs[t], c_steps[t]
        h_t = ys[t] if direct else x_proj.new_empty(B, P, dtype=acc)
        torch.addmm(xs[t] if direct else xs[t].to(acc), h, w_hh_t, out=z)  # (B, 4H), becomes (i, f, g, o)
        sig_if[t].sigmoid_()
        g = tanh_g[t].tanh_()
        o = sig_o[t].sigmoid_()
        torch.mul(f_s[t], c_prev, out=c_t).addcmul_(i_s[t], g)  # c_t = f * c_{t-1} + i * g
        torch.tanh(c_t, out=tanh_c)
        if w_hr_t is None:
            torch.mul(o, tanh_c, out=h_t)
        else:
            torch.mm(tanh_c.mul_(o), w_hr_t, out=h_t)  # (B, H) -> (B, P)
        if valid is None:
            h, c_prev = h_t, c_t
        else:
            torch.where(valid[t], h_t, h, out=h)
            torch.where(valid[t], c_t, c_prev, out=c_prev)
        if not direct:
            ys[t].copy_(h_t)
        if saved and not direct:
            saved[t][0].copy_(c_t)
            saved[t][1].copy_(z)
        if valid is not None:
            for out in (ys[t], *(saved[t] if saved else ())):
                out.masked_fill_(invalid[t], 0.0)  # zero past each sequence's end
    # the final states: where they are steps of y and c (or h0, c0), copies
    h_n = h.clone() if direct and valid is None else h.to(x_proj.dtype)
    c_n = c_prev.clone() if direct and valid is None else c_prev  # (else one of its own, or what the op rounds)
    return y, c, gates, h_n, c_n


def _lstm_buffers(x_proj, P: int, acc, direct: bool, save: bool):
    """The twin's outputs ``y (T, B, P)``, ``c`` and ``gates`` (with no steps without ``save``), and
    where each step works: ``z_all (T, B, 4H)``, its pre-activations, then gates (the gates' own
    steps where they are saved in the accumulator's dtype, else one (B, 4H) buffer for every step),
    and ``c_steps``, each step's c_t in the accumulator's dtype (c's own steps likewise, else two
    (B, H) buffers taking turns)."""
    T, B, G = x_proj.shape
    y = huge_pages(x_proj.new_empty(T, B, P))
    c, gates = (huge_pages(x_proj.new_empty(T if save else 0, B, n)) for n in (G // 4, G))
    if save and direct:
        return y, c, gates, gates, c.unbind(0)
    turns = x_proj.new_empty(2, B, G // 4, dtype=acc)
    return y, c, gates, x_proj.new_empty(1, B, G, dtype=acc).expand(T, B, G), [turns[t % 2] for t in range(T)]


def _step_factors(k, gates, c, c0, acc, reverse, lengths, resets):
    """The factors of the LSTM's gate gradients that do not depend on the recurrence, for all steps
    at once, written into ``k (T, B, 4H)``:
        k = ([g i (1-i)], [c_{t-1} f (1-f)], [i (1-g^2)], [tanh(c) o (1-o)])
    -> ``f (T, B, H)`` the forget gate, ``a = o (1 - tanh(c)^2)`` (dc_t's share of dm_t) and the
    cut steps (``cut_steps``). Past each sequence's end every gate is zero, and so are these."""
    T, _, G = gates.shape
    H = G // 4
    gates_a, c_a = to_acc(gates, acc), to_acc(c, acc)
    i, f, g, o = (gates_a[..., n * H:(n + 1) * H] for n in range(4))
    k_i, k_f, k_g, k_o = (k[..., n * H:(n + 1) * H] for n in range(4))
    sigmoid_backward(g, i, grad_input=k_i)
    # c_{t-1} f (1 - f): c one step back along the walk, c0 (or zeros) at each sequence's first step;
    # a reverse walk's first step lengths[b] - 1 reads c[lengths[b]] = 0 before c0 is put there
    if reverse:
        sigmoid_backward(c_a[1:], f[:-1], grad_input=k_f[:-1])
    else:
        sigmoid_backward(c_a[:-1], f[1:], grad_input=k_f[1:])
    edge = T - 1 if reverse else 0
    if c0 is None:
        k_f[edge].zero_()
    else:
        c0_a = c0.to(acc)
        sigmoid_backward(c0_a, f[edge], grad_input=k_f[edge])
        if lengths is not None and reverse:
            first = step_rows(k, edge_step(T, reverse, lengths, gates.device))
            k_f[first] = torch.ops.aten.sigmoid_backward(c0_a, f[first])
    cut = cut_steps(resets, reverse)  # (T, B, 1): the states entering step t are zero
    if cut is not None:
        k_f.masked_fill_(cut, 0.0)  # c_{t-1} = 0 there
    tanh_backward(i, g, grad_input=k_g)
    a = torch.tanh(c_a, out=huge_pages(torch.empty_like(c_a)))
    sigmoid_backward(a, o, grad_input=k_o)
    tanh_backward(o, a, grad_input=a)  # a = o (1 - tanh(c)^2): dc_t's share of dm_t
    return f, a, cut


def lstm_bwd_torch(dy, dh_n, dc_n, y, c, gates, h0, c0, w_hh, w_hr=None, reverse=False, lengths=None,
                   resets=None, dc_src=None, dz_src=None):
    """The backward launcher's twin, walking time in reverse: ``d_gates (T, B, 4H)``, the gradient of
    the pre-activations (zero past each end), and ``dc0 (B, H)`` (of the zero state without c0). Reads
    neither ``y`` nor ``h0`` (the launcher's signature has them). ``dc_src (T, B, H)`` and ``dz_src
    (T, B, 4H)``, where given, are added to each step's dc and pre-activation gradient.

    Every factor of the gate gradients that does not depend on the recurrence is computed for all
    steps at once (``_step_factors``); a step is then its product, ``dc = dc_carry + dm * a[t]``,
    two in-place products on ``d_gates[t]`` and ``dc_carry = dc * f``."""
    T, B, G = gates.shape
    H = G // 4
    dy = dy if dy is not None else gates.new_zeros(T, B, w_hh.shape[1])  # (None: no gradient reached y)
    acc = acc_dtype(gates.dtype)
    direct = gates.dtype == acc  # d_gates is the working buffer
    w_hh = w_hh.to(acc)
    w_hr = w_hr.to(acc) if w_hr is not None else None
    d_gates = huge_pages(torch.empty_like(gates))
    k = d_gates if direct else huge_pages(torch.empty(gates.shape, dtype=acc, device=gates.device))
    f, a, cut = _step_factors(k, gates, c, c0, acc, reverse, lengths, resets)
    k_o = k[..., 3 * H:]
    valid = valid_steps(T, lengths, gates.device)
    last = edge_step(T, not reverse, lengths, gates.device)
    dh_n, dc_n = [g.to(acc) if g is not None else None for g in (dh_n, dc_n)]  # (None: no gradient reached it)
    at_last = final_steps(T, last, acc, gates.device)  # (T, B, 1) or None: where h_n, c_n were read
    dh = dy.new_empty(B, dy.shape[2], dtype=acc)  # (B, P)
    dm = dh if w_hr is None else dh.new_empty(B, H)
    dc = dh.new_empty(B, H)
    dc_carry = dh.new_zeros(B, H)  # dc_{t_next} * f_{t_next}
    # every step's views, made at once
    ks, k_ifg, k_os = k.unbind(0), k[..., :3 * H].unflatten(-1, (3, H)).unbind(0), k_o.unbind(0)
    dys, a_s, f_s = dy.unbind(0), a.unbind(0), f.unbind(0)
    dc_b = dc[:, None]  # (B, 1, H): dc for the three gates i, f, g at once
    cut_next = cut_after(cut, reverse)  # no gradient back across a cut
    d = None  # d_gates of the step processed last: it feeds dh through w_hh
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        dy_t = dys[t] if direct else dys[t].to(acc)
        if cut_next is not None and d is not None:
            d = d.masked_fill(cut_next[t], 0.0)
            dc_carry.masked_fill_(cut_next[t], 0.0)
        if d is None:
            dh.copy_(dy_t)
        else:
            torch.addmm(dy_t, d, w_hh, out=dh)  # (B, P)
        add_final(dh, dh_n, t, last, at_last)
        if w_hr is not None:
            torch.mm(dh, w_hr, out=dm)  # (B, P) -> (B, H)
        torch.addcmul(dc_carry, dm, a_s[t], out=dc)
        add_final(dc, dc_n, t, last, at_last)
        if dc_src is not None:
            dc += dc_src[t]
        k_ifg[t].mul_(dc_b)  # (B, 3, H)
        k_os[t].mul_(dm)
        d = ks[t]  # (B, 4H)
        if dz_src is not None:
            d.add_(dz_src[t] if valid is None else dz_src[t].masked_fill(~valid[t], 0.0))
        if valid is None:
            torch.mul(dc, f_s[t], out=dc_carry)
        else:
            torch.where(valid[t], dc * f_s[t], dc_carry, out=dc_carry)
    if not direct:
        d_gates.copy_(k)
    dc0 = enters(dc_carry, cut, reverse)  # dc f at the first step: c0's gradient (the zero state's without c0)
    return d_gates, dc0.to(gates.dtype)


# --------------------------------------------------------------------------------------------------
# The custom ops and their autograd formula
# --------------------------------------------------------------------------------------------------

# As fastrnn::elman_fwd/_bwd: two custom ops paired by one autograd formula. The loops run in the
# launchers; every product over all steps (dw_hh, dh0, dw_hr) is one matrix product here. Saved: y, c
# and gates (which give h_{t-1}, c_{t-1}, tanh(c_t) and every gate's derivative), h0, c0 and weights.


def lstm_forward(x_proj: torch.Tensor, h0: Optional[torch.Tensor], c0: Optional[torch.Tensor],
                 w_hh: torch.Tensor, w_hr: Optional[torch.Tensor], reverse: bool,
                 lengths: Optional[torch.Tensor], backend: str, resets: Optional[torch.Tensor] = None,
                 save: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward op: -> ``y (T, B, P)``, ``c (T, B, H)``, ``gates (T, B, 4H)``, ``h_n (B, P)``,
    ``c_n (B, H)``; ``lengths`` on x_proj's device. Without ``save`` (a call no backward follows) ``c``
    and ``gates`` are empty, ``(0, B, H)`` and ``(0, B, 4H)``."""
    y, c, gates, h_n, c_state = loop(backend_on(backend, x_proj.device), "lstm", "lstm_fwd", lstm_fwd_torch)(
        x_proj, h0, c0, w_hh, w_hr, reverse, lengths, resets, save)
    return y, c, gates, h_n, final_state(c_state, c, reverse, lengths)


lstm_fwd_op = torch.library.custom_op("fastrnn::lstm_fwd", lstm_forward, mutates_args=())


@lstm_fwd_op.register_fake
def _(x_proj, h0, c0, w_hh, w_hr, reverse, lengths, backend, resets=None, save=True):
    T, B, G = x_proj.shape
    H, P, steps = G // 4, w_hh.shape[1], T if save else 0
    return (x_proj.new_empty(T, B, P), x_proj.new_empty(steps, B, H), x_proj.new_empty(steps, B, G),
            x_proj.new_empty(B, P), x_proj.new_empty(B, H))


# FlopCounterMode's count: h_{t-1} W_hh^T (and the projection, m_t W_hr^T) at each of T steps
register_flop_formula(lstm_fwd_op, lambda x_proj, h0, c0, w_hh, w_hr, *_, **__: loop_flops(*x_proj[:2], w_hh, w_hr))


def lstm_backward(dy: Optional[torch.Tensor], dh_n: Optional[torch.Tensor], dc_n: Optional[torch.Tensor],
                y: torch.Tensor, c: torch.Tensor, gates: torch.Tensor, h0: Optional[torch.Tensor],
                c0: Optional[torch.Tensor], w_hh: torch.Tensor, w_hr: Optional[torch.Tensor],
                reverse: bool, lengths: Optional[torch.Tensor], backend: str, resets: Optional[torch.Tensor] = None,
                dc_src: Optional[torch.Tensor] = None, dz_src: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward op: -> ``d_gates (T, B, 4H)``, the gradient of the pre-activations, and ``dc0 (B, H)``
    (``dy``, ``dh_n`` or ``dc_n`` None: no gradient reached it). ``dc_src
    (T, B, H)`` and ``dz_src (T, B, 4H)``: gradients that reach every c_t and pre-activation directly
    (only a second derivative has them); those run on the PyTorch twin."""
    args = (dy, dh_n, dc_n, y, c, gates, h0, c0, w_hh, w_hr, reverse, lengths, resets)
    if dc_src is None and dz_src is None:
        return loop(backend_on(backend, gates.device), "lstm", "lstm_bwd", lstm_bwd_torch)(*args)
    return loop("torch", "lstm", "lstm_bwd", lstm_bwd_torch)(*args, dc_src=dc_src, dz_src=dz_src)


lstm_bwd_op = torch.library.custom_op("fastrnn::lstm_bwd", lstm_backward, mutates_args=())


@lstm_bwd_op.register_fake
def _(dy, dh_n, dc_n, y, c, gates, h0, c0, w_hh, w_hr, reverse, lengths, backend, resets=None, dc_src=None,
      dz_src=None):
    return gates.new_empty(gates.shape), c.new_empty(c.shape[1:])


# FlopCounterMode's count: d_gates_t W_hh at T - 1 steps (dh0's product comes after, outside) and dh_t W_hr at T
register_flop_formula(lstm_bwd_op, lambda dy, dh_n, dc_n, y, c, gates, h0, c0, w_hh, w_hr, *_, **__:
                      loop_flops(y[0] - 1, y[1], w_hh) + loop_flops(y[0], y[1], w_hr))


def _setup_context(ctx, inputs, output):
    x_proj, h0, c0, w_hh, w_hr, reverse, lengths, backend, resets, save = with_defaults(inputs, 10)
    saved_for_backward(save, "lstm_fwd")
    y, c, gates = output[:3]
    save_for_derivatives(ctx, y, c, gates, h0, c0, w_hh, w_hr, lengths, resets)
    ctx.reverse, ctx.backend = reverse, backend
    ctx.set_materialize_grads(False)  # c's and the gates' gradients stay None unless a second derivative has them


@own_precision
def _backward(ctx, dy, d_c, d_act, dh_n, dc_n):
    """The gradients of x_proj, h0, c0, w_hh and w_hr from those of y, h_n and c_n (and of c and the
    gate activations, which only a second derivative gives)."""
    y, c, gates, h0, c0, w_hh, w_hr, lengths, resets = ctx.saved_tensors
    T, reverse = y.shape[0], ctx.reverse
    dz_src = d_act * gate_slopes(gates) if d_act is not None else None
    d_gates, dc0 = LSTM_BWD(dy, dh_n, dc_n, y, c, gates, h0, c0, w_hh, w_hr, reverse, lengths, ctx.backend, resets,
                            d_c, dz_src)
    need_x, need_h0, need_c0, need_w_hh, need_w_hr = ctx.needs_input_grad[:5]
    cut = cut_steps(resets, reverse)
    d_first = at_step(d_gates, edge_step(T, reverse, lengths, y.device))  # (B, 4H)
    dh0 = enters(d_first, cut, reverse) @ w_hh if h0 is not None and need_h0 else None
    dw_hh = sum_with_previous(d_gates, y, h0, d_first, reverse, cut) if need_w_hh else None  # (4H, P)
    dw_hr = None
    if w_hr is not None and need_w_hr:  # sum_t dh_t.T @ m_t, (P, H)
        dh = _hidden_gradients(dy, dh_n, d_gates, w_hh, reverse, lengths, cut)
        dw_hr = torch.tensordot(dh, gates.chunk(4, 2)[3] * c.tanh(), ([0, 1], [0, 1]))  # (legacy vmap: no flatten)
    dx_proj = d_gates if need_x else None
    dc0 = dc0 if c0 is not None and need_c0 else None
    return dx_proj, dh0, dc0, dw_hh, dw_hr, *[None] * (len(ctx.needs_input_grad) - 5)  # (the flags')


def gate_slopes(gates: torch.Tensor) -> torch.Tensor:
    """Each gate's derivative from its activation: i (1-i), f (1-f), 1-g^2, o (1-o); (T, B, 4H)."""
    i, f, g, o = gates.chunk(4, -1)
    return torch.cat((i * (1 - i), f * (1 - f), 1 - g * g, o * (1 - o)), -1)


def _hidden_gradients(dy, dh_n, d_gates, w_hh, reverse, lengths, cut):
    """``dh_t = dy[t] + d_gates[t_next] @ w_hh (+ dh_n at the last step)`` for all steps at once,
    (T, B, P), nothing across a cut; out of place throughout (vmap takes it)."""
    dh = shifted(d_gates @ w_hh, later=not reverse, cut=cut_after(cut, reverse))
    dh = dy + dh if dy is not None else dh
    return add_at(dh, edge_step(dh.shape[0], not reverse, lengths, dh.device), dh_n)


# The backward's own derivative (double backward: gradient penalties, MAML, Hessian-vector products).
# The backward is linear in (dy, dh_n, dc_n): walking back, dh_t = dy_t + dz_{t_next} W, dm_t = dh_t R,
# dc_t = dm_t a_t + dc_{t_next} f_{t_next}, dz_t = (dc k_i, dc k_f, dc k_g, dm k_o), with a = o (1 -
# tanh^2 c) and k the gates' factors (``_factors``). For upstream gradients E of dz and e0 of dc0 its
# adjoint walks forward in time (``_adjoint``): E~_t = E_t + H^_prev W^T, C^_t = sum_ifg E~ k + P_t f_t
# with P_t = C^_prev (e0 at the first step), M^_t = E~_o k_o + C^_t a_t, H^_t = M^_t R^T. Then d(dy) = H^,
# d(dh_n), d(dc_n) are their last rows; the weights' gradients are products over all steps, and the
# gates', c's and c0's are elementwise in E~, C^, P with the first backward's dc and dm
# (``_second_order``). Resets cut the same links both ways.


def _setup_context_bwd(ctx, inputs, output):
    dy, dh_n, dc_n, y, c, gates, h0, c0, w_hh, w_hr, reverse, lengths, backend, resets, dc_src, dz_src = \
        with_defaults(inputs, 16)
    save_for_derivatives(ctx, dy, dh_n, dc_n, c, gates, c0, w_hh, w_hr, lengths, resets, output[0], dc_src)
    ctx.reverse, ctx.has_dz_src = reverse, dz_src is not None


@own_precision
def _backward_of_backward(ctx, E, e0):
    """The backward's gradients from those of d_gates (``E``) and dc0 (``e0``). A backward given
    sources (a second derivative's) is linear in them too: dc_src's gradient is C^, dz_src's E~; the
    sources' share of dc takes part in the second-order terms (so reverse mode differentiates any
    number of times)."""
    dy, dh_n, dc_n, c, gates, c0, w_hh, w_hr, lengths, resets, d_gates, dc_src = ctx.saved_tensors
    walk = Walk(c.shape[0], lengths, resets, ctx.reverse, c.device)
    E = walk.masked(torch.zeros_like(d_gates) if E is None else E)
    e0 = enters(torch.zeros_like(c[0]) if e0 is None else e0, walk.cut, walk.reverse)
    dh = _hidden_gradients(dy, dh_n, d_gates, w_hh, walk.reverse, lengths, walk.cut)  # (T, B, P)
    dm = dh @ w_hr if w_hr is not None else dh  # (T, B, H)
    k, a, c_prev = _factors(c, gates, c0, walk)
    f = gates.chunk(4, -1)[1]
    dc = walk.carried_back(dm * a if dc_src is None else dm * a + dc_src, dc_n, f)  # the first backward's dc
    E_, C, M, H_, P = _adjoint(E, e0, k, a, f, w_hh, w_hr, walk)
    d_act, d_c, d_c0 = _second_order(E_, C, M, P, dc, dm, c, gates, c_prev, walk)
    steps = ([0, 1], [0, 1])  # (sums over (T, B); legacy vmap, is_grads_batched's, batches no flatten)
    d_w_hh = torch.tensordot(d_gates, shifted(H_, later=walk.reverse, cut=walk.cut), steps)
    d_w_hr = torch.tensordot(dh, M, steps) if w_hr is not None else None
    d_dh_n = at_step(H_, walk.last) if dh_n is not None else None  # (None given: none to return)
    d_dc_n = at_step(C, walk.last) if dc_n is not None else None
    d_dc_src, d_dz_src = C if dc_src is not None else None, E_ if ctx.has_dz_src else None
    return (H_ if dy is not None else None, d_dh_n, d_dc_n, None, d_c, d_act, None,
            d_c0 if c0 is not None else None, d_w_hh, d_w_hr, None, None, None, None, d_dc_src, d_dz_src)


def _factors(c, gates, c0, walk):
    """The backward's factors: k = (g i(1-i), c_{t-1} f(1-f), i(1-g^2), tanh(c) o(1-o)) (T, B, 4H),
    a = o (1 - tanh(c)^2) and c_{t-1} (T, B, H), zero past each end."""
    i, f, g, o = gates.chunk(4, -1)
    c_prev = walk.masked(previous_states(c, c0, walk.reverse, walk.lengths, walk.cut))
    tc = c.tanh()
    k = torch.cat((g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tc * o * (1 - o)), -1)
    return k, o * (1 - tc * tc), c_prev


def _adjoint(E, e0, k, a, f, w_hh, w_hr, walk, S=None):
    """The backward's adjoint, walking forward: ``E~`` (T, B, 4H), ``C^``, ``M^`` (T, B, H), ``H^`` (T, B, P)
    and ``P`` (T, B, H), the gradient each step's c takes from the step before (see above); ``S``
    (T, B, P), if given, added to each H^ (the forward's tangent through w_hr: ``_jvp``)."""
    H = k.shape[-1] // 4
    outs = [None] * walk.T
    C_prev, H_prev = torch.zeros_like(a[0]), E.new_zeros(E.shape[1], w_hh.shape[1])
    for t in walk.order:
        E_t = walk.masked(E[t] + walk.linked(H_prev, t) @ w_hh.T, t)  # (B, 4H)
        P_t = walk.linked(C_prev, t) + walk.at(walk.first, t, e0)
        C_t = walk.masked((E_t[:, :3 * H] * k[t, :, :3 * H]).reshape(-1, 3, H).sum(1) + P_t * f[t], t)
        M_t = walk.masked(E_t[:, 3 * H:] * k[t, :, 3 * H:] + C_t * a[t], t)
        H_t = M_t @ w_hr.T if w_hr is not None else M_t
        H_t = H_t + S[t] if S is not None else H_t
        outs[t] = (E_t, C_t, M_t, H_t, P_t)
        C_prev, H_prev = C_t, H_t
    return tuple(torch.stack(parts) for parts in zip(*outs))


def _second_order(E_, C, M, P, dc, dm, c, gates, c_prev, walk):
    """The gradients of the gate activations (T, B, 4H), of c (T, B, H) and of c0 (B, H) that the
    backward's adjoint takes through the factors k, a and the carried f."""
    i, f, g, o = gates.chunk(4, -1)
    Ei, Ef, Eg, Eo = E_.chunk(4, -1)
    tc = c.tanh()
    d_act = torch.cat((dc * (Ei * g * (1 - 2 * i) + Eg * (1 - g * g)),
                       dc * (Ef * c_prev * (1 - 2 * f) + P),
                       dc * i * (Ei * (1 - i) - 2 * Eg * g),
                       dm * (Eo * tc * (1 - 2 * o) + C * (1 - tc * tc))), -1)
    Q = Ef * dc * f * (1 - f)  # the gradient of c_{t-1} through k_f
    d_c = dm * o * (1 - tc * tc) * (Eo * (1 - o) - 2 * C * tc)
    d_c = walk.masked(d_c + shifted(Q, later=not walk.reverse, cut=cut_after(walk.cut, walk.reverse)))
    d_c0 = enters(at_step(Q, walk.first), walk.cut, walk.reverse)
    return walk.masked(d_act), d_c, d_c0


# Forward mode (torch.func.jvp, jacfwd, dual tensors; over the backward, for torch.func.hessian, the
# backward op's jvp is its own backward transposed: ``op.transposed``). The forward's tangent is the linear recurrence
# the backward's adjoint walks (``_adjoint``: it is the transpose of the backward's): the tangents of
# the pre-activations E~ (given E, x_proj's tangent plus h_{t-1} dW_hh^T, and dh0 W_hh^T at each first
# step), of c (C^, dc0 entering as P), of o tanh(c) (M^) and of h (H^, plus o tanh(c) dW_hr^T).


@own_precision
def _jvp(ctx, dx, dh0, dc0, dw_hh, dw_hr, *_):
    """The tangents of y, c, the gate activations, h_n and c_n from those of the inputs."""
    y, c, gates, h0, c0, w_hh, w_hr, lengths, resets = ctx.saved_tensors
    walk = Walk(c.shape[0], lengths, resets, ctx.reverse, c.device)
    E = dx if dx is not None else torch.zeros_like(gates)  # (T, B, 4H)
    if dw_hh is not None:
        E = E + previous_states(y, h0, walk.reverse, lengths, walk.cut) @ dw_hh.T
    if dh0 is not None:
        E = add_at(E, walk.first, enters(dh0, walk.cut, walk.reverse) @ w_hh.T)
    S = walk.masked(gates.chunk(4, -1)[3] * c.tanh()) @ dw_hr.T if dw_hr is not None else None  # (T, B, P)
    e0 = enters(dc0 if dc0 is not None else torch.zeros_like(c[0]), walk.cut, walk.reverse)
    k, a, _ = _factors(c, gates, c0, walk)
    E_, C, _, H_, _ = _adjoint(walk.masked(E), e0, k, a, gates.chunk(4, -1)[1], w_hh, w_hr, walk, S)
    return H_, C, gate_slopes(gates) * E_, at_step(H_, walk.last), at_step(C, walk.last)


LSTM_OP = Differentiable("LSTM", lstm_fwd_op, lstm_forward, _setup_context, _backward, _jvp,
                         inference={"save": False}, cell="LSTM")
LSTM_BWD = Differentiable("LSTMBackward", lstm_bwd_op, lstm_backward, _setup_context_bwd, _backward_of_backward,
                          transposed(_backward_of_backward, "LSTM"), cell="LSTM", of_backward=True)


# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------


def lstm_recurrence(x_proj: torch.Tensor, h0: torch.Tensor | None, c0: torch.Tensor | None,
                    w_hh: torch.Tensor, w_hr: torch.Tensor | None = None, reverse: bool = False,
                    lengths: torch.Tensor | None = None, resets: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y (T, B, P), h_n (B, P), c_n (B, H)`` of the LSTM recurrence; see the module docstring."""
    if x_proj.dim() != 3:
        raise ValueError(f"x_proj must be 3-D (T, B, 4H), got {x_proj.dim()}-D")
    T, B, G = x_proj.shape
    if G % 4 != 0:
        raise ValueError(f"x_proj's last dimension must be 4 * hidden_size (gates i, f, g, o), got {G}")
    H = G // 4
    if w_hr is not None and (w_hr.dim() != 2 or w_hr.shape[1] != H):
        raise RuntimeError(f"w_hr must be (proj_size, {H}), got {tuple(w_hr.shape)}")
    P = w_hr.shape[0] if w_hr is not None else H
    if w_hh.shape != (G, P):
        raise RuntimeError(f"w_hh must be ({G}, {P}), got {tuple(w_hh.shape)}")
    if h0 is not None and h0.shape != (B, P):
        raise RuntimeError(f"Expected hidden[0] size ({B}, {P}), got {list(h0.shape)}")
    if c0 is not None and c0.shape != (B, H):
        raise RuntimeError(f"Expected hidden[1] size ({B}, {H}), got {list(c0.shape)}")
    check_operands(x_proj, w_hh=w_hh, w_hr=w_hr, h0=h0, c0=c0)
    lengths, resets = checked_steps(lengths, resets, T, B, x_proj.device)
    if T == 0 or B == 0:
        return lstm_reference(x_proj, h0, c0, w_hh, w_hr, reverse, lengths, resets)
    backend = requested_backend()  # (as named: the op picks its loop for the tensors it is given)
    y, _, _, h_n, c_n = LSTM_OP(x_proj, h0, c0, w_hh, w_hr, reverse, lengths, backend, resets)
    return y, h_n, c_n


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class LSTM(FusedRNNBase):
    """LSTM, gate order i, f, g, o, with ``proj_size`` as ``torch.nn.LSTM``; same arguments, shapes
    and results: ``forward(input, (h0, c0)) -> output, (h_n, c_n)``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__("LSTM", *args, **kwargs)

    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def _lowered_by_cpu_autocast(self, packed: bool) -> bool:
        return not packed  # (on packed input torch's results take the state's dtype: as the GRU's)

    def _state_sizes(self):
        return (self.proj_size or self.hidden_size, self.hidden_size)

    def _state_parts(self, hx):
        return (hx[0], hx[1])

    def _public_state(self, parts):
        return (parts[0], parts[1])

    def _run_direction(self, x, suffix, start, reverse, lengths, resets):
        w_ih, w_hh, b_ih, b_hh, *w_hr = self._weights(suffix, projection=self.proj_size > 0)
        x_proj = F.linear(x, w_ih, bias_sum(b_ih, b_hh))  # (T, B, 4H)
        w_hr = w_hr[0] if w_hr else None
        h0, c0 = start if start else (None, None)
        c0_dtype = c0.dtype if c0 is not None else x.dtype
        w_hh, w_hr, h0, c0 = as_dtype(x_proj.dtype, w_hh, w_hr, h0, c0)
        y, h_n, c_n = lstm_recurrence(x_proj, h0, c0, w_hh, w_hr, reverse, lengths, resets)
        if w_hr is not None and x.is_cpu and torch.is_autocast_enabled("cpu"):  # as torch's, whose CPU path
            c_n = c_n.to(torch.promote_types(c0_dtype, c_n.dtype))  # with a projection carries c in c0's dtype
        return y, (h_n, c_n)
