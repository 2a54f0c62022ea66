"""The GRU recurrence, forward and backward, gate order r, z, n (as ``torch.nn.GRU``).

    hh = h_{t-1} @ w_hh.T (B, 3H);  r = sigmoid(x_r + hh_r);  z = sigmoid(x_z + hh_z)
    hn = hh_n + b_hn;  n = tanh(x_n + r hn);  h_t = (1 - z) n + z h_{t-1}

``x_proj (T, B, 3H)`` holds ``x @ w_ih.T + b_ih + (b_hr, b_hz, 0)``: ``b_hn`` is scaled by r, so it
stays out. The same tiled form as ``lstm.py``: programs own units and all three gates of them, read
``h_{t-1}`` back from ``y`` for the product and keep their own units' ``h_{t-1}`` in registers.

Saved for the backward: ``y`` and ``gates (T, B, 4H)`` = r, z, n, hn, stored only where a backward
will read them (``SAVE``: not in an inference call, which keeps and writes ``y`` alone, as cuDNN's
inference forward does). The backward writes
``d_x (T, B, 3H)`` (= dx_proj: dr, dz, dn before their nonlinearities) and the part of dh0 that
flows through z. The product that carries the gradient a step back needs ``d_hh = (dr, dz, dn r)``
of the step before, all units: the programs exchange it through a two-step ring buffer.
"""

import torch
import triton
import triton.language as tl

from ..sequence import acc_dtype

from .common import (carried_product, grid_barrier, is_last_step, previous_step_masks, sequence_lengths, sigmoid,
                     source_chunks, split_k_product, state_cut, tanh, walk_step, weight_chunks)
from .config import GATED_VARIANTS, dtype_flags, gated_tile_kwargs, ladder
from .gates import gate_weights, load_gate, start_state, store_gate
from .launch import (carried_state, find_kept, gradient_operand, h0_product, on_device, resets_operand,
                     run_sequence)
from .operands import expect_operands, expect_sequence

CELL = dict(gates=3, cell="gru", variants=GATED_VARIANTS)  # what pick_configs asks of the cell


@triton.jit
def _gate_products(hh_r, hh_z, hh_n, src_ptr, m_rows, o_b, o_n, B, H, stride_b, w_hh_ptr, stride_w,
                   b_wr, b_wz, b_wn, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, W_RESIDENT: tl.constexpr):
    """Each gate's ``hh += h_{t-1} @ w_hh[gate rows of o_n].T``, one read of ``h_{t-1}`` a chunk."""
    CHUNK: tl.constexpr = BLOCK_K // SPLIT_K
    if W_RESIDENT:
        b_h = source_chunks(src_ptr, 0, o_b, m_rows, B, H, stride_b, SPLIT_K, CHUNK)
        hh_r += split_k_product(b_h, b_wr, PRECISION)
        hh_z += split_k_product(b_h, b_wz, PRECISION)
        hh_n += split_k_product(b_h, b_wn, PRECISION)
    else:
        for k0 in range(0, H, BLOCK_K):
            b_h = source_chunks(src_ptr, k0, o_b, m_rows, B, H, stride_b, SPLIT_K, CHUNK)
            hh_r += split_k_product(b_h, gate_weights(w_hh_ptr, 0, k0, o_n, H, H, stride_w, SPLIT_K, CHUNK),
                                    PRECISION)
            hh_z += split_k_product(b_h, gate_weights(w_hh_ptr, 1, k0, o_n, H, H, stride_w, SPLIT_K, CHUNK),
                                    PRECISION)
            hh_n += split_k_product(b_h, gate_weights(w_hh_ptr, 2, k0, o_n, H, H, stride_w, SPLIT_K, CHUNK),
                                    PRECISION)
    return hh_r, hh_z, hh_n


@triton.jit(do_not_specialize=["T", "step_begin", "n_steps"])
def gru_fwd_kernel(
    x_proj_ptr,  # (T, B, 3H) input projection plus b_ih and b_hr, b_hz
    h_state_ptr,  # (B, H) out, ACC_DTYPE: the state after a launch, read by the next (stepwise)
    h0_ptr,  # (B, H) the first state (unused unless HAS_H0: zeros)
    h0_proj_ptr,  # (B, 3H) h0 @ w_hh.T in the accumulator's precision (unused unless HAS_H0)
    w_hh_ptr,  # (3H, H)
    b_hn_ptr,  # (H,) (unused unless HAS_B_HN)
    lengths_ptr,  # (B,) int64 (unused unless HAS_LENGTHS)
    resets_ptr,  # (T, B) bool: a new sequence starts at step t of row b (unused unless HAS_RESETS)
    y_ptr,  # (T, B, H) out: every h_t; also where h_{t-1} is read back from
    gates_ptr,  # (T, B, 4H) out: r, z, n, hn (unused unless SAVE)
    T, B, H,
    stride_xt, stride_xb, stride_h0b, stride_hpb,  # x_proj, h0, h0_proj
    stride_yt, stride_yb, stride_sb,  # y, h_state
    stride_gt, stride_gb,  # gates
    stride_w, stride_rt, stride_rb,
    sync_ptr, step_begin, n_steps,
    REVERSE: tl.constexpr, HAS_H0: tl.constexpr, HAS_B_HN: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_RESETS: tl.constexpr, SAVE: tl.constexpr,  # SAVE: store the gates (a backward reads them)
    SYNC: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, FAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    W_RESIDENT: tl.constexpr,  # BLOCK_K >= H: this program's rows of w_hh stay on chip all along
):
    """Grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_N)): program (i, j) owns units j of batch rows i."""
    pid_b, pid_n = tl.program_id(0), tl.program_id(1)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_bn = (o_b[:, None] < B) & (o_n[None, :] < H)
    b_len = sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B, HAS_LENGTHS)  # (BLOCK_B, 1)
    CHUNK: tl.constexpr = BLOCK_K // SPLIT_K
    if W_RESIDENT:
        b_wr = gate_weights(w_hh_ptr, 0, 0, o_n, H, H, stride_w, SPLIT_K, CHUNK)
        b_wz = gate_weights(w_hh_ptr, 1, 0, o_n, H, H, stride_w, SPLIT_K, CHUNK)
        b_wn = gate_weights(w_hh_ptr, 2, 0, o_n, H, H, stride_w, SPLIT_K, CHUNK)
    else:
        b_wr, b_wz, b_wn = 0.0, 0.0, 0.0  # unused: _gate_products streams w_hh
    b_hn_bias = tl.zeros([1, BLOCK_N], dtype=ACC_DTYPE)
    if HAS_B_HN:
        b_hn_bias += tl.load(b_hn_ptr + o_n[None, :], mask=o_n[None, :] < H, other=0.0).to(ACC_DTYPE)
    # this program's units of h_{t-1} stay in registers, in ACC_DTYPE also between the launches of
    # the stepwise variant (h_state); past a sequence's end the state is carried unchanged, so h0 is
    # still there at a reverse walk's first step
    b_h = start_state(h_state_ptr, h0_ptr, o_b, o_n, stride_sb, stride_h0b, m_bn, step_begin, HAS_H0, ACC_DTYPE)
    p_bn = o_b[:, None] * stride_yb + o_n[None, :]  # this program's units in a step of y

    for s in range(step_begin, step_begin + n_steps):
        t, t_prev, m_prev, m_first = walk_step(s, T, b_len, REVERSE)
        cut = state_cut(resets_ptr, t, t_prev, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS)
        m_prev, m_first = m_prev & ~cut, m_first & ~cut  # a new sequence starts from zero
        b_h = tl.where(cut, 0.0, b_h)
        hh_r = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC_DTYPE)
        hh_z = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC_DTYPE)
        hh_n = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC_DTYPE) + b_hn_bias
        if HAS_H0:  # at a sequence's first step h_{t-1} is h0, whose product the caller made once
            m_h0 = m_bn & m_first
            hh_r += load_gate(h0_proj_ptr, 0, o_b, o_n, H, stride_hpb, m_h0, ACC_DTYPE)
            hh_z += load_gate(h0_proj_ptr, 1, o_b, o_n, H, stride_hpb, m_h0, ACC_DTYPE)
            hh_n += load_gate(h0_proj_ptr, 2, o_b, o_n, H, stride_hpb, m_h0, ACC_DTYPE)
        hh_r, hh_z, hh_n = _gate_products(hh_r, hh_z, hh_n, y_ptr + t_prev * stride_yt, m_prev, o_b, o_n,
                                          B, H, stride_yb, w_hh_ptr, stride_w, b_wr, b_wz, b_wn, PRECISION,
                                          BLOCK_K, SPLIT_K, W_RESIDENT)
        p_x = x_proj_ptr + t * stride_xt
        r = sigmoid(load_gate(p_x, 0, o_b, o_n, H, stride_xb, m_bn, ACC_DTYPE) + hh_r, FAST)
        z = sigmoid(load_gate(p_x, 1, o_b, o_n, H, stride_xb, m_bn, ACC_DTYPE) + hh_z, FAST)
        n = tanh(load_gate(p_x, 2, o_b, o_n, H, stride_xb, m_bn, ACC_DTYPE) + r * hh_n, FAST)
        valid = t < b_len  # (BLOCK_B, 1): zero past each sequence's end, the state carried along
        b_h_new = (1.0 - z) * n + z * b_h
        b_h = tl.where(valid, b_h_new, b_h)
        tl.store(y_ptr + t * stride_yt + p_bn, tl.where(valid, b_h_new, 0.0).to(y_ptr.dtype.element_ty),
                 mask=m_bn)
        if SAVE:
            p_g = gates_ptr + t * stride_gt
            store_gate(p_g, 0, tl.where(valid, r, 0.0), o_b, o_n, H, stride_gb, m_bn)
            store_gate(p_g, 1, tl.where(valid, z, 0.0), o_b, o_n, H, stride_gb, m_bn)
            store_gate(p_g, 2, tl.where(valid, n, 0.0), o_b, o_n, H, stride_gb, m_bn)
            store_gate(p_g, 3, tl.where(valid, hh_n, 0.0), o_b, o_n, H, stride_gb, m_bn)
        if SYNC:
            grid_barrier(sync_ptr + pid_b, pid_n, tl.num_programs(1))
    tl.store(h_state_ptr + o_b[:, None] * stride_sb + o_n[None, :], b_h, mask=m_bn)


@triton.jit(do_not_specialize=["T", "step_begin", "n_steps"])
def gru_bwd_kernel(
    dy_ptr,  # (T, B, H) gradient of y (unused unless HAS_DY: none reached it)
    dh_n_ptr,  # (B, H) gradient of h_n (unused unless HAS_DH_N)
    y_ptr,  # (T, B, H) every h_t
    gates_ptr,  # (T, B, 4H) r, z, n, hn
    h0_ptr,  # (B, H) (unused unless HAS_H0)
    w_hh_ptr,  # (3H, H)
    lengths_ptr,  # (B,) int64 (unused unless HAS_LENGTHS)
    resets_ptr,  # (T, B) bool (unused unless HAS_RESETS)
    d_x_ptr,  # (T, B, 3H) out: dr, dz, dn (the gradient of x_proj)
    d_hh_ptr,  # (2, B, 3H) scratch: dr, dz, dn * r of the last two steps, read back by all programs
    dh_carry_ptr,  # (B, H) out, ACC_DTYPE: dh * z carried to the step before (from zero; read by the next launch)
    T, B, H,
    stride_dyt, stride_dyb, stride_hnb,  # dy, dh_n
    stride_yt, stride_yb, stride_h0b,  # y, h0
    stride_gt, stride_gb,  # gates
    stride_xt, stride_xb,  # d_x
    stride_ht, stride_hb, stride_dcb,  # d_hh, dh_carry
    stride_w, stride_rt, stride_rb,
    sync_ptr, step_begin, n_steps,
    REVERSE: tl.constexpr, HAS_H0: tl.constexpr, HAS_DY: tl.constexpr, HAS_DH_N: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, SYNC: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    W_RESIDENT: tl.constexpr,  # BLOCK_K >= 3H: this program's columns of w_hh stay on chip all along
):
    """Walking time in reverse: dh = dy[t] + dh_{t_next} z_{t_next} + d_hh[t_next] @ w_hh (+ dh_n
    where h_n was read), then dn = dh (1 - z) tanh'(n), dz = dh (h_{t-1} - n) sigmoid'(z),
    dr = dn hn sigmoid'(r)."""
    pid_b, pid_n = tl.program_id(0), tl.program_id(1)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_bn = (o_b[:, None] < B) & (o_n[None, :] < H)
    b_len = sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B, HAS_LENGTHS)  # (BLOCK_B, 1)
    p_y = o_b[:, None] * stride_yb + o_n[None, :]  # this program's units in a step of y
    if HAS_DH_N:
        b_dh_n = tl.load(dh_n_ptr + o_b[:, None] * stride_hnb + o_n[None, :], mask=m_bn, other=0.0).to(ACC_DTYPE)
    b_dh_carry = start_state(dh_carry_ptr, dh_carry_ptr, o_b, o_n, stride_dcb, stride_dcb, m_bn, step_begin, False,
                             ACC_DTYPE)  # zero at the walk's start
    if W_RESIDENT:  # w_hh[:, o_n], all 3H rows, loaded once
        b_w_all = weight_chunks(w_hh_ptr, 0, o_n, stride_w, 1, 3 * H, H, SPLIT_K, BLOCK_K // SPLIT_K)
    else:
        b_w_all = 0.0

    for s in range(step_begin, step_begin + n_steps):
        # the step the backward came from consumed h_t (t_next); h_{t-1} is y[t_prev], or h0 first
        t, t_next, m_next, _ = walk_step(s, T, b_len, not REVERSE)
        m_prev, m_first = previous_step_masks(2 * t - t_next, b_len)
        # no gradient crosses a cut: from t_next into h_t, or from t into the step before
        m_next = m_next & ~state_cut(resets_ptr, t, t_next, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS)
        cut_prev = state_cut(resets_ptr, t, 2 * t - t_next, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS)
        m_prev, m_first = m_prev & ~cut_prev, m_first & ~cut_prev
        b_dh = b_dh_carry
        if HAS_DY:
            b_dh += tl.load(dy_ptr + t * stride_dyt + o_b[:, None] * stride_dyb + o_n[None, :], mask=m_bn,
                            other=0.0).to(ACC_DTYPE)
        if HAS_DH_N:  # h_n is the state after the step the forward's walk took last
            b_dh += tl.where(is_last_step(t, b_len, REVERSE), b_dh_n, 0.0)
        b_dh = carried_product(b_dh, d_hh_ptr + (t_next % 2) * stride_ht, m_next, o_b, o_n, B, 3 * H, H,
                               stride_hb, w_hh_ptr, stride_w, 1, b_w_all, PRECISION, BLOCK_K, SPLIT_K,
                               W_RESIDENT)
        p_g = gates_ptr + t * stride_gt
        r = load_gate(p_g, 0, o_b, o_n, H, stride_gb, m_bn, ACC_DTYPE)
        z = load_gate(p_g, 1, o_b, o_n, H, stride_gb, m_bn, ACC_DTYPE)
        n = load_gate(p_g, 2, o_b, o_n, H, stride_gb, m_bn, ACC_DTYPE)
        hn = load_gate(p_g, 3, o_b, o_n, H, stride_gb, m_bn, ACC_DTYPE)
        b_h_prev = tl.load(y_ptr + (2 * t - t_next) * stride_yt + p_y, mask=m_bn & m_prev,
                           other=0.0).to(ACC_DTYPE)
        if HAS_H0:
            b_h_prev += tl.load(h0_ptr + o_b[:, None] * stride_h0b + o_n[None, :], mask=m_bn & m_first,
                                other=0.0).to(ACC_DTYPE)
        valid = t < b_len
        dn = tl.where(valid, b_dh * (1.0 - z) * (1.0 - n * n), 0.0)
        dz = tl.where(valid, b_dh * (b_h_prev - n) * z * (1.0 - z), 0.0)
        dr = tl.where(valid, dn * hn * r * (1.0 - r), 0.0)
        p_dx = d_x_ptr + t * stride_xt
        store_gate(p_dx, 0, dr, o_b, o_n, H, stride_xb, m_bn)
        store_gate(p_dx, 1, dz, o_b, o_n, H, stride_xb, m_bn)
        store_gate(p_dx, 2, dn, o_b, o_n, H, stride_xb, m_bn)
        p_hh = d_hh_ptr + (t % 2) * stride_ht
        store_gate(p_hh, 0, dr, o_b, o_n, H, stride_hb, m_bn)
        store_gate(p_hh, 1, dz, o_b, o_n, H, stride_hb, m_bn)
        store_gate(p_hh, 2, dn * r, o_b, o_n, H, stride_hb, m_bn)
        b_dh_carry = tl.where(cut_prev, 0.0, tl.where(valid, b_dh * z, b_dh_carry))
        if SYNC:
            grid_barrier(sync_ptr + pid_b, pid_n, tl.num_programs(1))
    tl.store(dh_carry_ptr + o_b[:, None] * stride_dcb + o_n[None, :], b_dh_carry.to(dh_carry_ptr.dtype.element_ty),
             mask=m_bn)


def gru_fwd(x_proj, h0, w_hh, b_hn=None, reverse=False, lengths=None, resets=None, save=True, config=None):
    """Launch the GRU forward. ``x_proj (T, B, 3H)``, ``h0 (B, H)`` or None, ``w_hh (3H, H)``,
    ``b_hn (H,)`` or None, ``lengths (B,)`` integer or ``resets (T, B)`` bool on the device or None.
    Returns ``y (T, B, H)`` and ``gates (T, B, 4H)`` (r, z, n, hn), zero past each sequence's end, and
    ``h_state (B, H)``, each sequence's final state as the kernel carried it: in the accumulator's
    precision (y's own for fp32 and fp64). Without ``save`` (no backward will read them) ``gates``
    come back empty, ``(0, B, 4H)``: neither allocated nor written."""
    found = find_kept(("gru_fwd", reverse, config, save), x_proj.device, (x_proj, h0, w_hh, b_hn, lengths, resets),
                      check_fwd)  # (checked where not kept yet)
    T, B, G = x_proj.shape
    H = G // 3
    y, gates = x_proj.new_empty(T, B, H), x_proj.new_empty(T if save else 0, B, 4 * H)
    h_state = carried_state(h0, x_proj, B, H, runs=T > 0 and B > 0)  # (B, H): the kernel writes it
    if T == 0 or B == 0:
        return y, gates, h_state
    x_proj, w_hh = x_proj.contiguous(), w_hh.contiguous()
    h0, b_hn, lengths = [t if t is None else t.contiguous() for t in (h0, b_hn, lengths)]
    resets = resets_operand(resets, x_proj.dtype)
    with on_device(x_proj):
        tensors = (x_proj, h0, h0_product(h0, w_hh), h_state, w_hh, b_hn, lengths, resets, y, gates if save else None)
        run_sequence(lambda cfg: gru_fwd_launch(*tensors, reverse, cfg), lambda: ladder(config, B, H, x_proj, **CELL),
                     T, x_proj.device, found=found, operands=lambda cfg: tensors)
    return y, gates, h_state


def gru_fwd_launch(x_proj, h0, h0_proj, h_state, w_hh, b_hn, lengths, resets, y, gates, reverse, config):
    """``(kernel, grid, args, kwargs)`` of the GRU forward for ``config``: operands with a contiguous
    last dimension, ``h0 (B, H)`` and ``h0_proj (B, 3H)`` ``h0 @ w_hh.T`` (``h0_product``) or both None,
    ``h_state (B, H)`` the final state in the accumulator's precision (written; ``carried_state``),
    ``gates`` None where not stored (an inference call)."""
    T, B, G = x_proj.shape
    H = G // 3
    has_h0, save = h0_proj is not None, gates is not None
    h0, h0_proj = (h0, h0_proj) if has_h0 else (h_state, x_proj)  # (read if has_h0)
    gates = gates if save else x_proj  # (written if save)
    resets = resets_operand(resets, x_proj.dtype)
    args = (x_proj, h_state, h0, h0_proj, w_hh, b_hn if b_hn is not None else y,
            lengths if lengths is not None else x_proj, resets if resets is not None else x_proj, y, gates, T, B, H,
            x_proj.stride(0), x_proj.stride(1), h0.stride(0), h0_proj.stride(0), y.stride(0), y.stride(1),
            h_state.stride(0),
            gates.stride(0), gates.stride(1), w_hh.stride(0), *(resets.stride() if resets is not None else (0, 0)))
    kwargs = dict(REVERSE=reverse, HAS_H0=has_h0, HAS_B_HN=b_hn is not None,
                  HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None, SAVE=save,
                  **gated_tile_kwargs(config, H, H), **dtype_flags(x_proj.dtype, x_proj.device, fast=True))
    return gru_fwd_kernel, (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_n)), args, kwargs


def gru_bwd(dy, dh_n, y, gates, h0, w_hh, reverse=False, lengths=None, resets=None, config=None):
    """Launch the GRU backward (``dy`` or ``dh_n`` None: no gradient reached y, or h_n). Returns ``d_x
    (T, B, 3H)`` (zero past each sequence's end) and ``dh0_local (B, H)``, the gradient of h0 through z
    (the caller adds its path through w_hh)."""
    found = find_kept(("gru_bwd", reverse, config), y.device, (dy, dh_n, y, gates, h0, w_hh, lengths, resets),
                   check_bwd)
    T, B, H = y.shape
    d_x = y.new_empty(T, B, 3 * H)
    dh_carry = carried_state(None, y, B, H, runs=T > 0 and B > 0)  # dh * z, from zero; dh0's local part at the end
    if T == 0 or B == 0:
        return d_x, dh_carry.to(y.dtype)
    y, gates, w_hh = y.contiguous(), gates.contiguous(), w_hh.contiguous()
    dy, dh_n = gradient_operand(dy, y.dtype), gradient_operand(dh_n, y.dtype)  # (rows contiguous)
    h0, lengths = [t if t is None else t.contiguous() for t in (h0, lengths)]
    d_hh = y.new_empty(2, B, 3 * H)  # ring buffer: each step reads the one before's, all units
    resets = resets_operand(resets, y.dtype)
    tensors = (dy, dh_n, y, gates, h0, w_hh, lengths, resets, d_x, d_hh, dh_carry)
    with on_device(y):
        run_sequence(lambda cfg: gru_bwd_launch(*tensors, reverse, cfg), lambda: ladder(config, B, H, y, **CELL), T,
                     y.device, found=found, operands=lambda cfg: tensors)
    return d_x, dh_carry.to(y.dtype)


def check_fwd(x_proj, h0, w_hh, b_hn, lengths, resets) -> None:
    """What the forward kernel relies on (``operands.expect_operands``)."""
    _, B, H = expect_sequence("x_proj", x_proj, gates=3)
    expect_operands("x_proj", x_proj, lengths, resets, w_hh=(w_hh, (3 * H, H)), h0=(h0, (B, H)), b_hn=(b_hn, (H,)))


def check_bwd(dy, dh_n, y, gates, h0, w_hh, lengths, resets) -> None:
    """What the backward kernel relies on (``dy``, ``dh_n`` in any float dtype: the launcher converts them)."""
    T, B, H = expect_sequence("y", y)
    expect_operands("y", y, lengths, resets, converted=("dy", "dh_n"), dy=(dy, (T, B, H)), dh_n=(dh_n, (B, H)),
                    gates=(gates, (T, B, 4 * H)), h0=(h0, (B, H)), w_hh=(w_hh, (3 * H, H)))


def gru_bwd_launch(dy, dh_n, y, gates, h0, w_hh, lengths, resets, d_x, d_hh, dh_carry, reverse, config):
    """``(kernel, grid, args, kwargs)`` of the GRU backward for ``config``: operands with a contiguous
    last dimension, ``d_hh (2, B, 3H)`` scratch, ``dh_carry (B, H)`` in the accumulator's precision
    (written)."""
    T, B, H = y.shape
    resets = resets_operand(resets, y.dtype)
    args = (dy if dy is not None else y, dh_n if dh_n is not None else y, y, gates, h0 if h0 is not None else y,
            w_hh, lengths if lengths is not None else y, resets if resets is not None else y, d_x, d_hh, dh_carry,
            T, B, H, *((dy.stride(0), dy.stride(1)) if dy is not None else (0, 0)),
            dh_n.stride(0) if dh_n is not None else 0, y.stride(0), y.stride(1),
            h0.stride(0) if h0 is not None else 0, gates.stride(0), gates.stride(1), d_x.stride(0), d_x.stride(1),
            d_hh.stride(0), d_hh.stride(1), dh_carry.stride(0), w_hh.stride(0),
            *(resets.stride() if resets is not None else (0, 0)))
    kwargs = dict(REVERSE=reverse, HAS_H0=h0 is not None, HAS_DY=dy is not None, HAS_DH_N=dh_n is not None,
                  HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None,
                  **gated_tile_kwargs(config, H, 3 * H), **dtype_flags(y.dtype, y.device))
    return gru_bwd_kernel, (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_n)), args, kwargs


def meta_launch(direction: str, B: int, H: int, dtype, config, h0: bool, lengths: bool, reverse: bool, P=None,
                resets: bool = False, save: bool = True):
    """``(kernel, grid, args, kwargs)`` of the forward or backward on meta tensors (T = 2: T is never
    specialised), as the launchers build it: what the compile sweep compiles. ``h0`` stands for the
    initial state and, in the backward, the final state's gradient; the backward leaves out dy with h0
    and without lengths (a loss on h_n alone). (``P`` is the LSTM's.) The forward without ``save``: an
    inference call's (no gates)."""
    T = 2
    acc = acc_dtype(dtype)

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    lens = empty(B, dt=torch.int64) if lengths else None
    cuts = empty(T, B, dt=torch.bool) if resets else None
    w_hh, gates = empty(3 * H, H), empty(T, B, 4 * H)
    if direction == "fwd":
        return gru_fwd_launch(empty(T, B, 3 * H), empty(B, H) if h0 else None, empty(B, 3 * H, dt=acc) if h0 else None,
                              empty(B, H, dt=acc), w_hh, empty(H), lens, cuts, empty(T, B, H), gates if save else None,
                              reverse, config)
    dh_n, h0_ = (empty(B, H), empty(B, H)) if h0 else (None, None)
    dy = empty(T, B, H) if lengths or not h0 else None  # (a loss on h_n alone)
    return gru_bwd_launch(dy, dh_n, empty(T, B, H), gates, h0_, w_hh, lens, cuts, empty(T, B, 3 * H),
                          empty(2, B, 3 * H), empty(B, H, dt=acc), reverse, config)
