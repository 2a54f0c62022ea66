"""The GRU recurrence over a whole sequence, gate order r, z, n as ``torch.nn.GRU``:

    y, h_n = gru_recurrence(x_proj, h0, w_hh, b_hn=None, reverse=False, lengths=None)

``x_proj (T, B, 3H)`` is the input projection of all steps, ``x @ w_ih.T + b_ih + (b_hr, b_hz, 0)``:
``b_hn (H,)`` (or None, zeros) is scaled by r, so it cannot be folded in and is an argument of its own.
``h0 (B, H)`` or None (zeros); ``w_hh (3H, H)``. Each step:
    hh_r, hh_z, hh_n = h_{t-1} @ w_hh.T;  r = sigmoid(x_r + hh_r);  z = sigmoid(x_z + hh_z)
    n = tanh(x_n + r * (hh_n + b_hn));  h_t = (1 - z) * n + z * h_{t-1}
Returns every ``h_t`` as ``y (T, B, H)`` and the final state ``h_n (B, H)``. ``reverse`` and
``lengths`` as in ``fastrnn.recurrence``. Backends as in ``fastrnn.backend``.
"""

from __future__ import annotations

from typing import Optional

import torch

from torch.nn import functional as F

from .backend import backend_on, loop, requested_backend
from .module import FusedRNNBase, bias_sum
from .op import (Differentiable, loop_flops, own_precision, register_flop_formula, runs_directly,
                 save_for_derivatives, saved_for_backward, transforms_active, transposed, with_defaults)
from .sequence import (Walk, acc_dtype, add_at, add_final, as_dtype, at_step, carried_copy, check_operands,
                       checked_steps, cut_after, cut_steps, edge_step, enters, final_state, final_steps, huge_pages,
                       previous_states, shifted, sigmoid_backward, step_rows, sum_with_previous, tanh_backward, to_acc,
                       valid_steps)

# --------------------------------------------------------------------------------------------------
# The reference: a plain loop over time, autograd gives the backward
# --------------------------------------------------------------------------------------------------


def gru_reference(x_proj: torch.Tensor, h0: torch.Tensor | None, w_hh: torch.Tensor,
                  b_hn: torch.Tensor | None = None, reverse: bool = False, lengths: torch.Tensor | None = None,
                  resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The GRU one step at a time in PyTorch: ``y (T, B, H), h_n (B, H)``; where a new sequence starts
    (``resets``), the state entering the step is zero."""
    T, B, G = x_proj.shape
    H = G // 3
    h = h0 if h0 is not None else x_proj.new_zeros(B, H)
    valid = valid_steps(T, lengths, x_proj.device)  # (T, B, 1): step t is part of sequence b
    cut = cut_steps(resets, reverse)  # (T, B, 1): a new sequence starts, from zero
    ys: list[torch.Tensor | None] = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if cut is not None:
            h = torch.where(cut[t], torch.zeros_like(h), h)
        x_r, x_z, x_n = x_proj[t].chunk(3, 1)  # (B, 3H) -> 3 x (B, H)
        hh_r, hh_z, hh_n = (h @ w_hh.t()).chunk(3, 1)
        if b_hn is not None:
            hh_n = hh_n + b_hn
        r, z = torch.sigmoid(x_r + hh_r), torch.sigmoid(x_z + hh_z)
        n = torch.tanh(x_n + r * hh_n)
        h_new = (1 - z) * n + z * h
        if lengths is None:
            h = ys[t] = h_new
        else:
            h = torch.where(valid[t], h_new, h)
            ys[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
    y = torch.stack(ys) if T > 0 else x_proj.new_empty(0, B, H)
    return y, h


# --------------------------------------------------------------------------------------------------
# The loops as the kernels run them (their PyTorch twins, the CPU path): the forward writes every h_t
# and gate, the backward every gate gradient; states and sums in fp32 for fp16/bf16
# --------------------------------------------------------------------------------------------------


def gru_fwd_torch(x_proj, h0, w_hh, b_hn=None, reverse=False, lengths=None, resets=None, save=True):
    """The forward launcher's twin: ``y (T, B, H)`` and ``gates (T, B, 4H)`` (r, z, n and
    ``hn = hh_n + b_hn``; without ``save`` empty, ``(0, B, 4H)``), both zero past each sequence's end,
    and the final state ``(B, H)`` in the accumulator's precision; no autograd graph.

    In fp32/fp64 each step writes straight into its slices of the outputs; fp16/bf16 steps run in
    fp32 buffers and are copied out; without ``save`` every step's gates go to one buffer."""
    T, B, G = x_proj.shape
    H, acc = G // 3, acc_dtype(x_proj.dtype)
    y, gates = huge_pages(x_proj.new_empty(T, B, H)), huge_pages(x_proj.new_empty(T if save else 0, B, 4 * H))
    direct = x_proj.dtype == acc  # the outputs are the working buffers
    w_hh_t = w_hh.to(acc).t().contiguous()  # (H, 3H): the faster layout for the product
    b_hn = b_hn.to(acc) if b_hn is not None else None
    valid = valid_steps(T, lengths, x_proj.device)
    if valid is None:  # the state is the previous step's output, or h0 (read only)
        h = h0.to(acc) if h0 is not None else x_proj.new_zeros(B, H, dtype=acc)
    else:  # the state is carried past each sequence's end, in a buffer of its own
        invalid = ~valid
        h = carried_copy(h0, acc) if h0 is not None else x_proj.new_zeros(B, H, dtype=acc)
    hh = x_proj.new_empty(B, G, dtype=acc)  # h_{t-1} @ w_hh.T: (hh_r, hh_z, hh_n)
    hh_rz, hh_n = hh[:, :2 * H], hh[:, 2 * H:]
    # every step's views, made at once
    g_all = gates if direct and save else x_proj.new_empty(1, B, 4 * H, dtype=acc).expand(T, B, 4 * H)
    gs, rzs, rs, zs = (g_all.unbind(0), g_all[..., :2 * H].unbind(0), g_all[..., :H].unbind(0),
                       g_all[..., H:2 * H].unbind(0))
    ns, hns = g_all[..., 2 * H:3 * H].unbind(0), g_all[..., 3 * H:].unbind(0)
    x_rzs, x_ns, ys = x_proj[..., :2 * H].unbind(0), x_proj[..., 2 * H:].unbind(0), y.unbind(0)
    cut = cut_steps(resets, reverse)  # resets come without lengths: the state is an output's view
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        if cut is not None:
            h = h.masked_fill(cut[t], 0.0)  # a new sequence starts from zero
        torch.mm(h, w_hh_t, out=hh)
        h_t = ys[t] if direct else x_proj.new_empty(B, H, dtype=acc)
        x_rz, x_n = (x_rzs[t], x_ns[t]) if direct else (x_rzs[t].to(acc), x_ns[t].to(acc))
        torch.add(x_rz, hh_rz, out=rzs[t]).sigmoid_()  # r, z
        hn = hns[t]
        if b_hn is None:
            hn.copy_(hh_n)
        else:
            torch.add(hh_n, b_hn, out=hn)
        n = torch.addcmul(x_n, rs[t], hn, out=ns[t]).tanh_()
        torch.lerp(n, h, zs[t], out=h_t)  # (1 - z) * n + z * h_{t-1}
        if valid is None:
            h = h_t
        else:
            torch.where(valid[t], h_t, h, out=h)
        if not direct:
            ys[t].copy_(h_t)
        if save and not direct:
            gates[t].copy_(gs[t])
        if valid is not None:
            for out in (ys[t], *((gates[t],) if save else ())):
                out.masked_fill_(invalid[t], 0.0)  # zero past each sequence's end
    h_n = h.clone() if direct and valid is None else h  # (there h is a step of y, or h0)
    return y, gates, h_n


def _step_factors(k, y, gates, h0, acc, reverse, lengths, resets, gates_src):
    """The factors of the GRU's gradients that do not depend on the recurrence, for all steps at
    once, written into ``k (T, B, 3H)``: ``(dn r * [hn (1-r)], dh * [(h_{t-1} - n) z (1-z)],
    dh * [(1-z) (1-n^2)])`` -> the gates ``r, z (T, B, H)``, the valid steps and the cut steps (each
    (T, B, 1) or None) and the second derivative's source terms (``_source_terms``, or None)."""
    T, _, H = y.shape
    gates_a = to_acc(gates, acc)
    r, z, n, hn = (gates_a[..., m * H:(m + 1) * H] for m in range(4))
    k_r, k_z, k_n = (k[..., m * H:(m + 1) * H] for m in range(3))
    torch.addcmul(hn, hn, r, value=-1, out=k_r)  # hn (1 - r)
    # h_{t-1} - n: y one step back along the walk, h0 (or zeros) at each sequence's first step; a
    # reverse walk's first step lengths[b] - 1 reads y[lengths[b]] = 0 before h0 is put there
    if reverse:
        torch.sub(y[1:], n[:-1], out=k_z[:-1])  # (y promoted to acc)
    else:
        torch.sub(y[:-1], n[1:], out=k_z[1:])
    edge = T - 1 if reverse else 0
    h0_a = h0.to(acc) if h0 is not None else None
    if h0 is None:
        torch.neg(n[edge], out=k_z[edge])
    else:
        torch.sub(h0_a, n[edge], out=k_z[edge])
        if lengths is not None and reverse:
            first = step_rows(k, edge_step(T, reverse, lengths, y.device))
            k_z[first] = h0_a - n[first]
    cut = cut_steps(resets, reverse)  # (T, B, 1): the state entering step t is zero
    if cut is not None:
        k_z.copy_(torch.where(cut, -n, k_z))  # h_{t-1} - n with h_{t-1} = 0
    sigmoid_backward(k_z, z, grad_input=k_z)
    tanh_backward(torch.sub(z.new_ones(()), z, out=k_n), n, grad_input=k_n)  # (1 - z) (1 - n^2)
    valid = valid_steps(T, lengths, y.device)
    src = _source_terms(gates_src, gates_a, valid) if gates_src is not None else None
    if valid is not None:
        k_n.masked_fill_(~valid, 0.0)  # past each end r, z, n, hn are zero, so are k_r, k_z; k_n is not
    return r, z, valid, cut, src


def gru_bwd_torch(dy, dh_n, y, gates, h0, w_hh, reverse=False, lengths=None, resets=None, gates_src=None):
    """The backward launcher's twin, walking time in reverse: ``d_x (T, B, 3H)``, the gradient of
    x_proj (zero past each end), and ``dh0_local (B, H)``, the gradient h0 gets through z (the caller
    adds its path through w_hh). ``gates_src (T, B, 4H)``, where given, is the gradient that reaches
    the gate activations r, z, n, hn directly (a second derivative's).

    The factors of the gradients that do not depend on the recurrence are computed for all steps at
    once (``_step_factors``); a step is then its product, a few in-place products on ``d_x[t]`` and
    the copy of ``d_hh[t] = (dr, dz, dn r)``, which feeds dh through w_hh."""
    T, B, H = y.shape
    dy = dy if dy is not None else torch.zeros_like(y)  # (None: no gradient reached y)
    acc = acc_dtype(y.dtype)
    direct = y.dtype == acc  # d_x is the working buffer
    w_hh = w_hh.to(acc)
    d_x = huge_pages(y.new_empty(T, B, 3 * H))
    k = d_x if direct else huge_pages(torch.empty(T, B, 3 * H, dtype=acc, device=y.device))
    r, z, valid, cut, src = _step_factors(k, y, gates, h0, acc, reverse, lengths, resets, gates_src)
    k_r, k_n = k[..., :H], k[..., 2 * H:]
    last = edge_step(T, not reverse, lengths, y.device)
    dh_n = dh_n.to(acc) if dh_n is not None else None  # (None: no gradient reached h_n)
    at_last = final_steps(T, last, acc, y.device)  # (T, B, 1) or None: where h_n was read
    dh, dh_other = y.new_empty(B, H, dtype=acc), y.new_empty(B, H, dtype=acc)
    d_hh = y.new_empty(B, 3 * H, dtype=acc)  # (dr, dz, dn r) of the step processed last
    d_hh_rz, d_hh_n = d_hh[:, :2 * H], d_hh[:, 2 * H:]
    carried = valid is not None or cut is not None  # dh * z kept in a buffer of its own
    dh_carry = dh.new_zeros(B, H) if carried else None  # dh_{t_next} * z_{t_next}
    cut_next = cut_after(cut, reverse)  # no gradient back across a cut
    # every step's views, made at once
    k_rzs, k_rs = k[..., :2 * H].unbind(0), k_r.unbind(0)
    k_zns, k_ns = k[..., H:].unflatten(-1, (2, H)).unbind(0), k_n.unbind(0)
    dys, rs, zs = dy.unbind(0), r.unbind(0), z.unbind(0)
    t_next = None
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        dy_t = dys[t] if direct else dys[t].to(acc)
        dh, dh_other = dh_other, dh
        if cut_next is not None and t_next is not None:
            dh_carry.masked_fill_(cut_next[t], 0.0)
            d_hh.masked_fill_(cut_next[t], 0.0)
        if carried:
            torch.add(dy_t, dh_carry, out=dh)
        elif t_next is None:
            dh.copy_(dy_t)
        else:
            torch.addcmul(dy_t, dh_other, zs[t_next], out=dh)
        if t_next is not None:
            dh.addmm_(d_hh, w_hh)  # (B, H)
        add_final(dh, dh_n, t, last, at_last)
        k_zns[t].mul_(dh[:, None])  # (B, 2, H): dz, dn
        if src is not None:
            k_zns[t].add_(src[t, :, H:3 * H].unflatten(-1, (2, H)))
        torch.mul(k_ns[t], rs[t], out=d_hh_n)  # dn r
        k_rs[t].mul_(d_hh_n)  # dr
        if src is not None:
            k_rs[t].add_(src[t, :, :H])
            d_hh_n.add_(src[t, :, 3 * H:])
        d_hh_rz.copy_(k_rzs[t])
        if valid is not None:
            torch.where(valid[t], dh * zs[t], dh_carry, out=dh_carry)
        elif carried:
            torch.mul(dh, zs[t], out=dh_carry)
        t_next = t
    if not carried:
        dh_carry = dh * zs[t_next]
    if not direct:
        d_x.copy_(k)
    return d_x, enters(dh_carry, cut, reverse).to(y.dtype)  # dh at each first step times z there


def _source_terms(gates_src, gates, valid):
    """The gradients of the pre-activations r, z, n from those of the activations r, z, n (and of hn
    as it is): (T, B, 4H), zero past each end."""
    src = gates_src.to(gates.dtype) * _activation_slopes(gates)
    return src if valid is None else src.masked_fill(~valid, 0.0)


def _activation_slopes(gates):
    """Each gate's derivative from its activation: r (1-r), z (1-z), 1-n^2, and 1 for hn (T, B, 4H)."""
    r, z, n, _ = gates.chunk(4, -1)
    return torch.cat((r * (1 - r), z * (1 - z), 1 - n * n, torch.ones_like(r)), -1)


# --------------------------------------------------------------------------------------------------
# The custom ops and their autograd formula
# --------------------------------------------------------------------------------------------------

# As fastrnn::elman_fwd/_bwd. Saved: y (every h_{t-1}) and gates (r, z, n, hn: every gate's
# derivative), h0 and w_hh; dw_hh, db_hn and dh0's path through w_hh are single products here.


def gru_forward(x_proj: torch.Tensor, h0: Optional[torch.Tensor], w_hh: torch.Tensor,
                b_hn: Optional[torch.Tensor], reverse: bool, lengths: Optional[torch.Tensor],
                backend: str, resets: Optional[torch.Tensor] = None, save: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward op: -> ``y (T, B, H)``, ``gates (T, B, 4H)``, ``h_n (B, H)``; ``lengths`` on
    x_proj's device. Without ``save`` (a call no backward follows) ``gates`` is empty, ``(0, B, 4H)``."""
    y, gates, state = loop(backend_on(backend, x_proj.device), "gru", "gru_fwd", gru_fwd_torch)(
        x_proj, h0, w_hh, b_hn, reverse, lengths, resets, save)
    return y, gates, final_state(state, y, reverse, lengths)


gru_fwd_op = torch.library.custom_op("fastrnn::gru_fwd", gru_forward, mutates_args=())


@gru_fwd_op.register_fake
def _(x_proj, h0, w_hh, b_hn, reverse, lengths, backend, resets=None, save=True):
    T, B, G = x_proj.shape
    H = G // 3
    return x_proj.new_empty(T, B, H), x_proj.new_empty(T if save else 0, B, 4 * H), x_proj.new_empty(B, H)


# FlopCounterMode's count: h_{t-1} W_hh^T at each of T steps
register_flop_formula(gru_fwd_op, lambda x_proj, h0, w_hh, *_, **__: loop_flops(*x_proj[:2], w_hh))


def gru_backward(dy: Optional[torch.Tensor], dh_n: Optional[torch.Tensor], y: torch.Tensor, gates: torch.Tensor,
               h0: Optional[torch.Tensor], w_hh: torch.Tensor, reverse: bool, lengths: Optional[torch.Tensor],
               backend: str, resets: Optional[torch.Tensor] = None, gates_src: Optional[torch.Tensor] = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward op: -> ``d_x (T, B, 3H)``, the gradient of x_proj, and ``dh0_local (B, H)``
    (``dy`` or ``dh_n`` None: y, or h_n, had no gradient). ``gates_src (T, B, 4H)``:
    the gradient that reaches the gate activations directly (only a second derivative has it); that
    runs on the PyTorch twin."""
    args = (dy, dh_n, y, gates, h0, w_hh, reverse, lengths, resets)
    if gates_src is None:
        return loop(backend_on(backend, y.device), "gru", "gru_bwd", gru_bwd_torch)(*args)
    return loop("torch", "gru", "gru_bwd", gru_bwd_torch)(*args, gates_src=gates_src)


gru_bwd_op = torch.library.custom_op("fastrnn::gru_bwd", gru_backward, mutates_args=())


@gru_bwd_op.register_fake
def _(dy, dh_n, y, gates, h0, w_hh, reverse, lengths, backend, resets=None, gates_src=None):
    T, B, H = y.shape
    return y.new_empty(T, B, 3 * H), y.new_empty(B, H)


# FlopCounterMode's count: d_gates_t W_hh at T - 1 steps (dh0's product comes after, outside)
register_flop_formula(gru_bwd_op, lambda dy, dh_n, y, gates, h0, w_hh, *_, **__: loop_flops(y[0] - 1, y[1], w_hh))


def _setup_context(ctx, inputs, output):
    x_proj, h0, w_hh, b_hn, reverse, lengths, backend, resets, save = with_defaults(inputs, 9)
    saved_for_backward(save, "gru_fwd")
    y, gates, _ = output
    save_for_derivatives(ctx, y, gates, h0, w_hh, lengths, resets)
    ctx.has_b_hn, ctx.reverse, ctx.backend = b_hn is not None, reverse, backend
    ctx.set_materialize_grads(False)  # the gates' gradient stays None unless a second derivative has it


@own_precision
def _backward(ctx, dy, d_act, dh_n):
    """The gradients of x_proj, h0, w_hh and b_hn from those of y and h_n (and of the gate
    activations, which only a second derivative gives)."""
    y, gates, h0, w_hh, lengths, resets = ctx.saved_tensors
    T, _, H = y.shape
    d_x, dh0_local = GRU_BWD(dy, dh_n, y, gates, h0, w_hh, ctx.reverse, lengths, ctx.backend, resets, d_act)
    need_x, need_h0, need_w_hh, need_b_hn = ctx.needs_input_grad[:4]
    cut = cut_steps(resets, ctx.reverse)
    first = edge_step(T, ctx.reverse, lengths, y.device)
    d_rz, dn_r = _hidden_parts(d_x, gates, d_act)  # d_hh = (dr, dz, dn r + d(hn)), the gradient of h W^T
    dh0 = None
    if h0 is not None and need_h0:
        d_first = torch.cat((at_step(d_rz, first), at_step(dn_r, first)), 1)
        dh0 = dh0_local + enters(d_first, cut, ctx.reverse) @ w_hh
    dw_hh = None
    if need_w_hh:  # sum_t d_hh[t].T @ h_{t-1}: (3H, H)
        dw_hh = torch.cat([sum_with_previous(d, y, h0, at_step(d, first), ctx.reverse, cut) for d in (d_rz, dn_r)])
    db_hn = dn_r.sum((0, 1)) if ctx.has_b_hn and need_b_hn else None
    dx_proj = d_x if need_x else None
    return dx_proj, dh0, dw_hh, db_hn, *[None] * (len(ctx.needs_input_grad) - 4)  # (the flags')


def _hidden_parts(d_x, gates, d_act=None):
    """The gradient of ``h_{t-1} @ w_hh.T`` as its two parts: (dr, dz) (T, B, 2H), d_x's first two
    thirds, and dn r (+ the gradient of hn where a second derivative gives one) (T, B, H)."""
    H = gates.shape[-1] // 4
    dn_r = d_x[..., 2 * H:] * gates[..., :H]
    if d_act is not None:
        dn_r = dn_r + d_act[..., 3 * H:]
    return d_x[..., :2 * H], dn_r


# The backward's own derivative (double backward). Walking back, the backward is linear in (dy, dh_n):
#     dh_t = dy_t + d_hh_{t_next} W + dh_{t_next} z_{t_next};  dn = dh k_n, dz = dh k_z, dr = dn k_r,
#     d_hh = (dr, dz, dn r),  with k_n = (1-z)(1-n^2), k_z = (h_{t-1} - n) z(1-z), k_r = hn r(1-r).
# For upstream gradients X of d_x = (dr, dz, dn) and e0 of dh0_local its adjoint walks forward in time
# (``_adjoint``): D_t = H^_prev W^T (the gradient of d_hh), R^ = X_r + D_r, Z^ = X_z + D_z,
# N^ = X_n + D_n r + R^ k_r, H^_t = Z^ k_z + N^ k_n + P_t z_t with P_t = H^_prev (e0 at the first step);
# then d(dy) = H^, d(dh_n) its last row, dW = sum_t d_hh_t^T H^_prev, and the gates', y's and h0's
# gradients are elementwise in these with the first backward's dh and dn (``_second_order``).


def _setup_context_bwd(ctx, inputs, output):
    dy, dh_n, y, gates, h0, w_hh, reverse, lengths, backend, resets, gates_src = with_defaults(inputs, 11)
    save_for_derivatives(ctx, dy, dh_n, y, gates, h0, w_hh, lengths, resets, output[0], gates_src)
    ctx.reverse = reverse


@own_precision
def _backward_of_backward(ctx, X, e0):
    """The backward's gradients from those of d_x (``X``) and dh0_local (``e0``). A backward given
    ``gates_src`` (a second derivative's) is linear in it too (``_source_gradients``), and its hn part
    joins d_hh (so reverse mode differentiates any number of times)."""
    dy, dh_n, y, gates, h0, w_hh, lengths, resets, d_x, gates_src = ctx.saved_tensors
    walk = Walk(y.shape[0], lengths, resets, ctx.reverse, y.device)
    X = walk.masked(torch.zeros_like(d_x) if X is None else X)
    e0 = enters(torch.zeros_like(y[0]) if e0 is None else e0, walk.cut, walk.reverse)
    r, z, n, hn = gates.chunk(4, -1)
    h_prev = walk.masked(previous_states(y, h0, walk.reverse, lengths, walk.cut))
    src = walk.masked(gates_src) if gates_src is not None else None  # (T, B, 4H)
    d_hh = torch.cat(_hidden_parts(d_x, gates, src), -1)  # (T, B, 3H)
    u = shifted(d_hh @ w_hh, later=not walk.reverse, cut=cut_after(walk.cut, walk.reverse))
    u = dy + u if dy is not None else u
    dh = walk.carried_back(u, dh_n, z)  # the first backward's dh at every step
    k = ((1 - z) * (1 - n * n), (h_prev - n) * z * (1 - z), hn * r * (1 - r))  # k_n, k_z, k_r
    D, R, Z, N, H_, P = _adjoint(X, e0, k, r, z, w_hh, walk)
    d_act, d_y, d_h0 = _second_order(D, R, Z, N, P, dh, d_x, gates, h_prev, walk)
    d_src = None
    if src is not None:
        d_src, d_slopes = _source_gradients(D, R, Z, N, src, gates)
        d_act = d_act + d_slopes
    d_w = torch.tensordot(d_hh, shifted(H_, later=walk.reverse, cut=walk.cut), ([0, 1], [0, 1]))  # (3H, H): legacy vmap
    d_dh_n = at_step(H_, walk.last) if dh_n is not None else None  # (None given: none to return)
    return (H_ if dy is not None else None, d_dh_n, d_y, d_act, d_h0 if h0 is not None else None, d_w, None, None, None,
            None, d_src)


def _source_gradients(D, R, Z, N, src, gates):
    """For a backward given ``src`` (gates_src, masked): its gradient, the adjoints of dr, dz, dn and of
    d_hh's n part (R^, Z^, N^, D_n) through the gates' slopes; and the gates' share through the slopes'
    own derivatives. Each (T, B, 4H), zero past each end as the adjoints are."""
    r, z, n, _ = gates.chunk(4, -1)
    H = z.shape[-1]
    adjoints = torch.cat((R, Z, N, D[..., 2 * H:]), -1)
    curvature = torch.cat((1 - 2 * r, 1 - 2 * z, -2 * n, torch.zeros_like(r)), -1)
    return adjoints * _activation_slopes(gates), adjoints * src * curvature


def _adjoint(X, e0, k, r, z, w_hh, walk):
    """The backward's adjoint, walking forward: D (T, B, 3H), R^, Z^, N^, H^ and P (T, B, H) (see above)."""
    k_n, k_z, k_r = k
    H = z.shape[-1]
    outs = [None] * walk.T
    H_prev = torch.zeros_like(z[0])
    for t in walk.order:
        linked = walk.linked(H_prev, t)
        D_t = walk.masked(linked @ w_hh.T, t)  # (B, 3H)
        R_t, Z_t = X[t, :, :H] + D_t[:, :H], X[t, :, H:2 * H] + D_t[:, H:2 * H]
        N_t = X[t, :, 2 * H:] + D_t[:, 2 * H:] * r[t] + R_t * k_r[t]
        P_t = linked + walk.at(walk.first, t, e0)
        H_t = walk.masked(Z_t * k_z[t] + N_t * k_n[t] + P_t * z[t], t)
        outs[t] = (D_t, R_t, Z_t, N_t, H_t, P_t)
        H_prev = H_t
    return tuple(torch.stack(parts) for parts in zip(*outs))


def _second_order(D, R, Z, N, P, dh, d_x, gates, h_prev, walk):
    """The gradients of the gate activations r, z, n, hn (T, B, 4H), of y (T, B, H) and of h0 (B, H)
    that the backward's adjoint takes through the factors k and the carried z."""
    r, z, n, hn = gates.chunk(4, -1)
    H = z.shape[-1]
    dn = d_x[..., 2 * H:]
    d_act = torch.cat((dn * (R * hn * (1 - 2 * r) + D[..., 2 * H:]),
                       dh * (-N * (1 - n * n) + Z * (h_prev - n) * (1 - 2 * z) + P),
                       -dh * (2 * N * n * (1 - z) + Z * z * (1 - z)),
                       R * dn * r * (1 - r)), -1)
    Q = Z * dh * z * (1 - z)  # the gradient of h_{t-1} through k_z
    d_y = walk.masked(shifted(Q, later=not walk.reverse, cut=cut_after(walk.cut, walk.reverse)))
    d_h0 = enters(at_step(Q, walk.first), walk.cut, walk.reverse)
    return walk.masked(d_act), d_y, d_h0


# Forward mode (torch.func.jvp, jacfwd, dual tensors; over the backward, for torch.func.hessian, the
# backward op's jvp is its own backward transposed: ``op.transposed``). The forward's tangent is the linear recurrence
# the backward's adjoint walks (``_adjoint``), given X, the tangents of the pre-activations from outside
# the carried state: x_proj's, plus those of h_{t-1} W^T + (0, 0, b_hn) through the weights, the bias
# and h0 (``_outside_terms``), n's scaled by r; and h0's own tangent entering as P.


@own_precision
def _jvp(ctx, dx, dh0, dw_hh, db_hn, *_):
    """The tangents of y, the gate activations (r, z, n, hn) and h_n from those of the inputs."""
    y, gates, h0, w_hh, lengths, resets = ctx.saved_tensors
    walk = Walk(y.shape[0], lengths, resets, ctx.reverse, y.device)
    r, z, n, hn = gates.chunk(4, -1)
    H = z.shape[-1]
    h_prev = walk.masked(previous_states(y, h0, walk.reverse, lengths, walk.cut))
    outside = _outside_terms(h_prev, dh0, dw_hh, db_hn, w_hh, walk)  # (T, B, 3H)
    X = torch.cat((outside[..., :2 * H], outside[..., 2 * H:] * r), -1)
    X = X + dx if dx is not None else X
    e0 = enters(dh0 if dh0 is not None else torch.zeros_like(y[0]), walk.cut, walk.reverse)
    k = ((1 - z) * (1 - n * n), (h_prev - n) * z * (1 - z), hn * r * (1 - r))  # k_n, k_z, k_r
    D, R, Z, N, H_, _ = _adjoint(walk.masked(X), e0, k, r, z, w_hh, walk)
    d_gates = torch.cat((R * r * (1 - r), Z * z * (1 - z), N * (1 - n * n), D[..., 2 * H:] + outside[..., 2 * H:]), -1)
    return H_, walk.masked(d_gates), at_step(H_, walk.last)


def _outside_terms(h_prev, dh0, dw_hh, db_hn, w_hh, walk):
    """The tangent of ``h_{t-1} @ w_hh.T + (0, 0, b_hn)`` (T, B, 3H) but for the carried state's own:
    through w_hh, b_hn and, at each first step, h0."""
    out = h_prev @ dw_hh.T if dw_hh is not None else h_prev.new_zeros(*h_prev.shape[:2], w_hh.shape[0])
    if db_hn is not None:
        out = out + torch.cat((torch.zeros_like(db_hn), torch.zeros_like(db_hn), db_hn))
    if dh0 is not None:
        out = add_at(out, walk.first, enters(dh0, walk.cut, walk.reverse) @ w_hh.T)
    return walk.masked(out)


GRU_OP = Differentiable("GRU", gru_fwd_op, gru_forward, _setup_context, _backward, _jvp,
                        inference={"save": False}, cell="GRU")
GRU_BWD = Differentiable("GRUBackward", gru_bwd_op, gru_backward, _setup_context_bwd, _backward_of_backward,
                         transposed(_backward_of_backward, "GRU"), cell="GRU", of_backward=True)


# --------------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------------


def gru_recurrence(x_proj: torch.Tensor, h0: torch.Tensor | None, w_hh: torch.Tensor,
                   b_hn: torch.Tensor | None = None, reverse: bool = False, lengths: torch.Tensor | None = None,
                   resets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``y (T, B, H), h_n (B, H)`` of the GRU recurrence; see the module docstring."""
    if x_proj.dim() != 3:
        raise ValueError(f"x_proj must be 3-D (T, B, 3H), got {x_proj.dim()}-D")
    T, B, G = x_proj.shape
    if G % 3 != 0:
        raise ValueError(f"x_proj's last dimension must be 3 * hidden_size (gates r, z, n), got {G}")
    H = G // 3
    if w_hh.shape != (G, H):
        raise RuntimeError(f"w_hh must be ({G}, {H}), got {tuple(w_hh.shape)}")
    if b_hn is not None and b_hn.shape != (H,):
        raise RuntimeError(f"b_hn must be ({H},), got {tuple(b_hn.shape)}")
    if h0 is not None and h0.shape != (B, H):
        raise RuntimeError(f"Expected hidden size ({B}, {H}), got {list(h0.shape)}")
    check_operands(x_proj, w_hh=w_hh, b_hn=b_hn, h0=h0)
    lengths, resets = checked_steps(lengths, resets, T, B, x_proj.device)
    if T == 0 or B == 0:
        return gru_reference(x_proj, h0, w_hh, b_hn, reverse, lengths, resets)
    backend = requested_backend()  # (as named: the op picks its loop for the tensors it is given)
    y, _, h_n = GRU_OP(x_proj, h0, w_hh, b_hn, reverse, lengths, backend, resets)
    return y, h_n


# --------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------


class GRU(FusedRNNBase):
    """GRU, gate order r, z, n, ``n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))`` as
    ``torch.nn.GRU``; same arguments, shapes and results."""

    def _lowered_by_cpu_autocast(self, packed: bool) -> bool:
        return False  # (its results take the state's dtype there: module._outside_cpu_autocast)

    def __init__(self, *args, **kwargs) -> None:
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    def _run_direction(self, x, suffix, start, reverse, lengths, resets):
        w_ih, w_hh, b_ih, b_hh = self._weights(suffix)
        b_hn = None
        b = None
        if self.bias:  # b_hr and b_hz fold into the input projection; b_hn is scaled by r
            H = self.hidden_size
            b = torch.where(_gates_r_and_z(H, b_ih), bias_sum(b_ih, b_hh), b_ih)  # (3H,)
            b_hn = b_hh[2 * H:]
        x_proj = F.linear(x, w_ih, b)  # (T, B, 3H)
        w_hh, b_hn, h0 = as_dtype(x_proj.dtype, w_hh, b_hn, start[0] if start else None)
        y, h_n = gru_recurrence(x_proj, h0, w_hh, b_hn, reverse, lengths, resets)
        return y, (h_n,)


def _gates_r_and_z(H: int, like: torch.Tensor) -> torch.Tensor:
    """``(3H,)`` bool on ``like``'s device, True at gates r and z: where a GRU's input projection adds
    both biases. Eager on plain tensors, one tensor per hidden size and device, made once (two
    operations less a call); compiled, under a torch.func transform, or where a mode or a tensor
    subclass watches (fake tensors, a transform's wrappers: what they make must not be kept for real
    calls), made each call from ``like`` (a traced or exported graph then keeps no device: it runs on
    any), and while a CUDA graph is captured (whose tensors hold nothing until it is replayed) not
    kept."""
    if torch.compiler.is_compiling() or transforms_active() or not runs_directly((like,)):
        return _r_and_z(H, like)
    mask = _R_AND_Z.get((H, like.device))
    if mask is None:
        mask = _r_and_z_kept(H, like)
    return mask


def _r_and_z(H: int, like: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(like, dtype=torch.bool)  # (like's device, which a graph does not keep)
    mask[2 * H:] = False
    return mask


def _r_and_z_kept(H: int, like: torch.Tensor) -> torch.Tensor:
    """``_r_and_z``, made to be kept: outside inference mode (an inference tensor, made by a first
    call under ``torch.inference_mode``, cannot be saved for the backward of a later call) and kept
    unless a CUDA graph is being captured."""
    with torch.inference_mode(False):
        mask = _r_and_z(H, like)
    if not (mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        _R_AND_Z[(H, like.device)] = mask
    return mask


_R_AND_Z: dict = {}  # (H, device) -> the kept (3H,) mask: a few hidden sizes in a program
