"""The LSTM recurrence, forward and backward, gate order i, f, g, o (as ``torch.nn.LSTM``).

    z_t = x_proj[t] + h_{t-1} @ w_hh.T    (B, 4H), x_proj with both biases added (one product outside)
    i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of z_t;  c_t = f c_{t-1} + i g;  h_t = o tanh(c_t)

One kernel each way, in the tiled form of the Elman kernels (``kernels/elman.py``): programs own
``(BLOCK_B, BLOCK_N)`` tiles of hidden units and all four gates of them, so the gate nonlinearities
and the cell state stay in the program; each step reads the whole ``h_{t-1}`` of its batch rows back
from ``y`` and multiplies it by its four ``BLOCK_N``-row blocks of ``w_hh`` (on chip for the whole
sequence with ``W_RESIDENT``, else streamed), then the programs of a batch block meet at the grid
barrier (``SYNC``; else one launch per step). With ``BLOCK_N >= H`` one program holds all of
``w_hh``: the ``resident`` variant of the small sizes. The launch, barrier and configuration are
those of every cell (``launch.py``, ``common.py``, ``config.py``).

Besides every step, the forward writes the final states the op returns: ``h_n``, each sequence's h
at its last step (so no torch launch copies it out of ``y``), and the cell state it carried.
Saved for the backward: ``y``, ``c`` and the gates after their nonlinearities, stored only where a
backward will read them (``SAVE``: not in an inference call, which keeps and writes ``y`` alone, as
cuDNN's inference forward does). The backward writes
the pre-activation gradient ``d_gates (T, B, 4H)`` (= dx_proj) and ``dc0``; ``dw_hh``, ``dh0`` are
one product each over all steps, done by the caller (``fastrnn/lstm.py``).
"""

import torch
import triton
import triton.language as tl

from ..sequence import acc_dtype

from .common import (carried_product, grid_barrier, is_last_step, previous_step_masks, sequence_lengths, sigmoid,
                     source_chunks, split_k_product, state_cut, tanh, walk_step, weight_chunks)
from .config import GATED_VARIANTS, dtype_flags, gated_tile_kwargs, ladder
from .gates import gate_weights, load_gate, start_state, store_gate
from .launch import (carried_state, final_output, find_kept, gradient_operand, h0_product, on_device,
                     resets_operand, run_sequence)
from .operands import expect_operands, expect_sequence, expect_tensors

CELL = dict(gates=4, cell="lstm", variants=GATED_VARIANTS)  # what pick_configs asks of the cell


@triton.jit
def _gate_products(z_i, z_f, z_g, z_o, src_ptr, m_rows, o_b, o_n, B, H, K, stride_b, w_hh_ptr, stride_w,
                   b_wi, b_wf, b_wg, b_wo, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, W_RESIDENT: tl.constexpr):
    """Each gate's ``z += h_{t-1} @ w_hh[gate rows of o_n].T``: one read of ``h_{t-1}`` (``src``, a
    (B, K) step the other programs wrote) per chunk for the four products."""
    CHUNK: tl.constexpr = BLOCK_K // SPLIT_K
    if W_RESIDENT:
        b_h = source_chunks(src_ptr, 0, o_b, m_rows, B, K, stride_b, SPLIT_K, CHUNK)
        z_i += split_k_product(b_h, b_wi, PRECISION)
        z_f += split_k_product(b_h, b_wf, PRECISION)
        z_g += split_k_product(b_h, b_wg, PRECISION)
        z_o += split_k_product(b_h, b_wo, PRECISION)
    else:
        for k0 in range(0, K, BLOCK_K):
            b_h = source_chunks(src_ptr, k0, o_b, m_rows, B, K, stride_b, SPLIT_K, CHUNK)
            z_i += split_k_product(b_h, gate_weights(w_hh_ptr, 0, k0, o_n, H, K, stride_w, SPLIT_K, CHUNK),
                                   PRECISION)
            z_f += split_k_product(b_h, gate_weights(w_hh_ptr, 1, k0, o_n, H, K, stride_w, SPLIT_K, CHUNK),
                                   PRECISION)
            z_g += split_k_product(b_h, gate_weights(w_hh_ptr, 2, k0, o_n, H, K, stride_w, SPLIT_K, CHUNK),
                                   PRECISION)
            z_o += split_k_product(b_h, gate_weights(w_hh_ptr, 3, k0, o_n, H, K, stride_w, SPLIT_K, CHUNK),
                                   PRECISION)
    return z_i, z_f, z_g, z_o


@triton.jit
def _input_gates(x_ptr, h0_proj_ptr, o_b, o_n, H, stride_b, stride_h0b, m_bn, m_first, HAS_H0: tl.constexpr,
                 ACC_DTYPE: tl.constexpr):
    """The step's ``x_proj`` of the four gates, plus ``h0 @ w_hh.T`` (made once by the caller)
    where a sequence starts: each (BLOCK_B, BLOCK_N)."""
    z_i = load_gate(x_ptr, 0, o_b, o_n, H, stride_b, m_bn, ACC_DTYPE)
    z_f = load_gate(x_ptr, 1, o_b, o_n, H, stride_b, m_bn, ACC_DTYPE)
    z_g = load_gate(x_ptr, 2, o_b, o_n, H, stride_b, m_bn, ACC_DTYPE)
    z_o = load_gate(x_ptr, 3, o_b, o_n, H, stride_b, m_bn, ACC_DTYPE)
    if HAS_H0:
        m_h0 = m_bn & m_first
        z_i += load_gate(h0_proj_ptr, 0, o_b, o_n, H, stride_h0b, m_h0, ACC_DTYPE)
        z_f += load_gate(h0_proj_ptr, 1, o_b, o_n, H, stride_h0b, m_h0, ACC_DTYPE)
        z_g += load_gate(h0_proj_ptr, 2, o_b, o_n, H, stride_h0b, m_h0, ACC_DTYPE)
        z_o += load_gate(h0_proj_ptr, 3, o_b, o_n, H, stride_h0b, m_h0, ACC_DTYPE)
    return z_i, z_f, z_g, z_o


@triton.jit
def _store_gates(ptr, i, f, g, o, valid, o_b, o_n, H, stride_b, m_bn):
    """The four gates of one step, zero past each sequence's end."""
    store_gate(ptr, 0, tl.where(valid, i, 0.0), o_b, o_n, H, stride_b, m_bn)
    store_gate(ptr, 1, tl.where(valid, f, 0.0), o_b, o_n, H, stride_b, m_bn)
    store_gate(ptr, 2, tl.where(valid, g, 0.0), o_b, o_n, H, stride_b, m_bn)
    store_gate(ptr, 3, tl.where(valid, o, 0.0), o_b, o_n, H, stride_b, m_bn)


@triton.jit
def _project(m_ptr, w_hr_ptr, o_b, o_p, valid, B, H, P, stride_mb, stride_hr, ACC_DTYPE: tl.constexpr,
             PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr,
             BLOCK_KP: tl.constexpr):
    """``m @ w_hr.T`` for the projection's columns ``o_p``: ``m (B, H)`` is one step that all
    programs wrote; (BLOCK_B, BLOCK_P), zero past each sequence's end."""
    acc = tl.zeros([BLOCK_B, BLOCK_P], dtype=ACC_DTYPE)
    acc = carried_product(acc, m_ptr, valid, o_b, o_p, B, H, P, stride_mb, w_hr_ptr, 1, stride_hr, 0.0,
                          PRECISION, BLOCK_KP, 1, False)
    return tl.where(valid, acc, 0.0)


@triton.jit
def _store_h(y_ptr, h_n_ptr, b_h, m_last, o_b, o_x, B, N, stride_yb, stride_hnb):
    """h_t (BLOCK_B, BLOCK_X), columns ``o_x`` of N, into its step of y, and into h_n where ``m_last``:
    at each sequence's last step."""
    m_bx = (o_b[:, None] < B) & (o_x[None, :] < N)
    tl.store(y_ptr + o_b[:, None] * stride_yb + o_x[None, :], b_h.to(y_ptr.dtype.element_ty), mask=m_bx)
    tl.store(h_n_ptr + o_b[:, None] * stride_hnb + o_x[None, :], b_h.to(h_n_ptr.dtype.element_ty),
             mask=m_bx & m_last)


@triton.jit(do_not_specialize=["T", "step_begin", "n_steps"])
def lstm_fwd_kernel(
    x_proj_ptr,  # (T, B, 4H) input projection plus both biases
    h0_proj_ptr,  # (B, 4H) h0 @ w_hh.T in the accumulator's precision (unused unless HAS_H0)
    c0_ptr,  # (B, H) the first cell state (unused unless HAS_C0: zeros)
    c_state_ptr,  # (B, H) out, ACC_DTYPE: the cell state after a launch, read by the next (stepwise)
    w_hh_ptr,  # (4H, P)
    w_hr_ptr,  # (P, H) the projection (unused unless PROJ)
    lengths_ptr,  # (B,) int64 (unused unless HAS_LENGTHS)
    resets_ptr,  # (T, B) bool: a new sequence starts at step t of row b (unused unless HAS_RESETS)
    y_ptr,  # (T, B, P) out: every h_t; also where h_{t-1} is read back from
    c_ptr,  # (T, B, H) out: every c_t (unused unless SAVE)
    gates_ptr,  # (T, B, 4H) out: i, f, g, o after their nonlinearities (unused unless SAVE)
    h_n_ptr,  # (B, P) out: h at each sequence's last step
    m_ptr,  # (2, B, H) scratch: o tanh(c) of the last two steps, all units (unused unless PROJ)
    T, B, H, P,  # P: the width of h, proj_size or H
    stride_xt, stride_xb, stride_h0b,  # x_proj, h0_proj
    stride_yt, stride_yb, stride_hnb,  # y, h_n
    stride_ct, stride_cb, stride_c0b, stride_sb,  # c, c0, c_state
    stride_gt, stride_gb,  # gates
    stride_mt, stride_mb,  # m
    stride_w, stride_hr, stride_rt, stride_rb,
    sync_ptr, step_begin, n_steps,
    REVERSE: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr, HAS_LENGTHS: tl.constexpr,
    HAS_RESETS: tl.constexpr, SAVE: tl.constexpr,  # SAVE: store c and the gates (a backward reads them)
    SYNC: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, FAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    W_RESIDENT: tl.constexpr,  # BLOCK_K >= P: this program's rows of w_hh stay on chip all along
    PROJ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_KP: tl.constexpr,
    PHASE: tl.constexpr = 0,  # with PROJ, one launch a part of the step: 1 the gates, 2 the projection
):
    """Grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_N)): program (i, j) owns units j of batch rows i, and with
    PROJ the projection's columns j of them (BLOCK_P each), after a barrier."""
    pid_b, pid_n = tl.program_id(0), tl.program_id(1)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_bn = (o_b[:, None] < B) & (o_n[None, :] < H)
    p_c = o_b[:, None] * stride_cb + o_n[None, :]  # this program's units in a step of c
    p_m = o_b[:, None] * stride_mb + o_n[None, :]  # ... of m
    b_len = sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B, HAS_LENGTHS)  # (BLOCK_B, 1)
    CHUNK: tl.constexpr = BLOCK_K // SPLIT_K
    if W_RESIDENT:  # the four gates' w_hh.T columns of this program, (SPLIT_K, CHUNK, BLOCK_N) each
        b_wi = gate_weights(w_hh_ptr, 0, 0, o_n, H, P, stride_w, SPLIT_K, CHUNK)
        b_wf = gate_weights(w_hh_ptr, 1, 0, o_n, H, P, stride_w, SPLIT_K, CHUNK)
        b_wg = gate_weights(w_hh_ptr, 2, 0, o_n, H, P, stride_w, SPLIT_K, CHUNK)
        b_wo = gate_weights(w_hh_ptr, 3, 0, o_n, H, P, stride_w, SPLIT_K, CHUNK)
    else:
        b_wi, b_wf, b_wg, b_wo = 0.0, 0.0, 0.0, 0.0  # unused: _gate_products streams w_hh
    # the cell state of this program's units stays in registers, in ACC_DTYPE also between the
    # launches of the stepwise variant (c_state); past a sequence's end it is carried unchanged, so
    # c0 is still there at a reverse walk's first step
    b_c = start_state(c_state_ptr, c0_ptr, o_b, o_n, stride_sb, stride_c0b, m_bn, step_begin, HAS_C0, ACC_DTYPE)

    for s in range(step_begin, step_begin + n_steps):
        t, t_prev, m_prev, m_first = walk_step(s, T, b_len, REVERSE)
        cut = state_cut(resets_ptr, t, t_prev, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS)
        m_prev, m_first = m_prev & ~cut, m_first & ~cut  # a new sequence starts from zero
        valid = t < b_len  # (BLOCK_B, 1): zero past each sequence's end, the state carried along
        m_last = is_last_step(t, b_len, REVERSE)  # (BLOCK_B, 1): h_t is h_n
        if PHASE != 2:
            b_c = tl.where(cut, 0.0, b_c)
            z_i, z_f, z_g, z_o = _input_gates(x_proj_ptr + t * stride_xt, h0_proj_ptr, o_b, o_n, H, stride_xb,
                                              stride_h0b, m_bn, m_first, HAS_H0, ACC_DTYPE)
            z_i, z_f, z_g, z_o = _gate_products(z_i, z_f, z_g, z_o, y_ptr + t_prev * stride_yt, m_prev, o_b,
                                                o_n, B, H, P, stride_yb, w_hh_ptr, stride_w, b_wi, b_wf,
                                                b_wg, b_wo, PRECISION, BLOCK_K, SPLIT_K, W_RESIDENT)
            i, f, g, o = sigmoid(z_i, FAST), sigmoid(z_f, FAST), tanh(z_g, FAST), sigmoid(z_o, FAST)
            b_c_new = f * b_c + i * g
            b_c = tl.where(valid, b_c_new, b_c)
            b_m = tl.where(valid, o * tanh(b_c_new, FAST), 0.0)  # h_t, or what the projection takes
            if SAVE:
                tl.store(c_ptr + t * stride_ct + p_c, tl.where(valid, b_c_new, 0.0).to(c_ptr.dtype.element_ty),
                         mask=m_bn)
                _store_gates(gates_ptr + t * stride_gt, i, f, g, o, valid, o_b, o_n, H, stride_gb, m_bn)
            if PROJ:
                tl.store(m_ptr + (t % 2) * stride_mt + p_m, b_m.to(m_ptr.dtype.element_ty), mask=m_bn)
            else:
                _store_h(y_ptr + t * stride_yt, h_n_ptr, b_m, m_last, o_b, o_n, B, H, stride_yb, stride_hnb)
        if PROJ:
            if PHASE == 0:  # every program's m_t is written before any program projects it
                grid_barrier(sync_ptr + pid_b, pid_n, tl.num_programs(1))
            if PHASE != 1:
                o_p = (pid_n * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
                b_h = _project(m_ptr + (t % 2) * stride_mt, w_hr_ptr, o_b, o_p, valid, B, H, P, stride_mb, stride_hr,
                               ACC_DTYPE, PRECISION, BLOCK_B, BLOCK_P, BLOCK_KP)
                _store_h(y_ptr + t * stride_yt, h_n_ptr, b_h, m_last, o_b, o_p, B, P, stride_yb, stride_hnb)
        if SYNC:
            grid_barrier(sync_ptr + pid_b, pid_n, tl.num_programs(1))
    if PHASE != 2:
        tl.store(c_state_ptr + o_b[:, None] * stride_sb + o_n[None, :], b_c, mask=m_bn)


@triton.jit
def _grad_into_cell(dh_ptr, dh_n_ptr, d_gates_ptr, m_next, m_last, o_b, o_x, B, H, N, stride_dyb, stride_hnb,
                    stride_dgb, w_hh_ptr, stride_w, b_w_all, HAS_DY: tl.constexpr, HAS_DH_N: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_X: tl.constexpr,
                    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, W_RESIDENT: tl.constexpr):
    """``dh_t`` for the columns ``o_x`` of h (N of them): ``dy[t]`` (at ``dh_ptr``, if HAS_DY), plus
    ``dh_n`` where h_n was read (if HAS_DH_N), plus ``d_gates[t_next] @ w_hh`` (the gates' (B, 4H)
    step the other programs wrote): (BLOCK_B, BLOCK_X)."""
    m_bx = (o_b[:, None] < B) & (o_x[None, :] < N)
    if HAS_DY:
        b_dh = tl.load(dh_ptr + o_b[:, None] * stride_dyb + o_x[None, :], mask=m_bx, other=0.0).to(ACC_DTYPE)
    else:
        b_dh = tl.zeros([BLOCK_B, BLOCK_X], dtype=ACC_DTYPE)
    if HAS_DH_N:
        b_dh += tl.load(dh_n_ptr + o_b[:, None] * stride_hnb + o_x[None, :], mask=m_bx & m_last,
                        other=0.0).to(ACC_DTYPE)
    return carried_product(b_dh, d_gates_ptr, m_next, o_b, o_x, B, 4 * H, N, stride_dgb, w_hh_ptr, stride_w, 1,
                           b_w_all, PRECISION, BLOCK_K, SPLIT_K, W_RESIDENT)


@triton.jit(do_not_specialize=["T", "step_begin", "n_steps"])
def lstm_bwd_kernel(
    dy_ptr,  # (T, B, P) gradient of y (unused unless HAS_DY: none reached it)
    dh_n_ptr,  # (B, P) gradient of h_n (unused unless HAS_DH_N)
    dc_n_ptr,  # (B, H) gradient of c_n (unused unless HAS_DC_N)
    c_ptr,  # (T, B, H) every c_t
    gates_ptr,  # (T, B, 4H) i, f, g, o
    c0_ptr,  # (B, H) (unused unless HAS_C0)
    w_hh_ptr,  # (4H, P)
    w_hr_ptr,  # (P, H) (unused unless PROJ)
    lengths_ptr,  # (B,) int64 (unused unless HAS_LENGTHS)
    resets_ptr,  # (T, B) bool (unused unless HAS_RESETS)
    d_gates_ptr,  # (T, B, 4H) out: gradient of the pre-activations; d_gates[t_next] is read back
    dc_carry_ptr,  # (B, H) out: dc * f carried to the step before (from zero; read by the next launch; dc0 at the end)
    dh_buf_ptr,  # (2, B, P) scratch: dh of the last two steps, all columns (unused unless PROJ)
    T, B, H, P,
    stride_dyt, stride_dyb, stride_hnb,  # dy, dh_n
    stride_ct, stride_cb, stride_cnb, stride_c0b,  # c, dc_n, c0
    stride_gt, stride_gb,  # gates
    stride_dgt, stride_dgb, stride_dcb,  # d_gates, dc_carry
    stride_bt, stride_bb,  # dh_buf
    stride_w, stride_hr, stride_rt, stride_rb,
    sync_ptr, step_begin, n_steps,
    REVERSE: tl.constexpr, HAS_C0: tl.constexpr, HAS_DY: tl.constexpr, HAS_DH_N: tl.constexpr,
    HAS_DC_N: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, SYNC: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    W_RESIDENT: tl.constexpr,  # BLOCK_K >= 4H: this program's columns of w_hh stay on chip all along
    PROJ: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_KP: tl.constexpr,
    PHASE: tl.constexpr = 0,  # with PROJ, one launch a part of the step: 1 dh, 2 the gates
):
    """Walking time in reverse: dh = dy[t] + d_gates[t_next] @ w_hh (+ dh_n where h_n was read),
    dm = dh @ w_hr (dh itself without PROJ), dc = dm o tanh'(c_t) + dc_{t_next} f_{t_next} (+ dc_n),
    then the four gates' gradients."""
    pid_b, pid_n = tl.program_id(0), tl.program_id(1)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_bn = (o_b[:, None] < B) & (o_n[None, :] < H)
    b_len = sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B, HAS_LENGTHS)  # (BLOCK_B, 1)
    if HAS_DC_N:
        b_dc_n = tl.load(dc_n_ptr + o_b[:, None] * stride_cnb + o_n[None, :], mask=m_bn, other=0.0).to(ACC_DTYPE)
    else:
        b_dc_n = 0.0  # (not read)
    b_dc_carry = start_state(dc_carry_ptr, dc_carry_ptr, o_b, o_n, stride_dcb, stride_dcb, m_bn, step_begin, False,
                             ACC_DTYPE)  # zero at the walk's start
    if W_RESIDENT and not PROJ:  # w_hh[:, o_n], all 4H rows, loaded once
        b_w_all = weight_chunks(w_hh_ptr, 0, o_n, stride_w, 1, 4 * H, H, SPLIT_K, BLOCK_K // SPLIT_K)
    else:
        b_w_all = 0.0

    for s in range(step_begin, step_begin + n_steps):
        # the backward walks the forward's steps last to first: the step it came from is the one
        # that consumed h_t (t_next); c_{t-1} is c[t_prev], or c0 at each sequence's first step
        t, t_next, m_next, _ = walk_step(s, T, b_len, not REVERSE)
        # no gradient crosses a cut: from t_next into h_t and c_t, or from t into the step before
        m_next = m_next & ~state_cut(resets_ptr, t, t_next, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS)
        cut_prev = state_cut(resets_ptr, t, 2 * t - t_next, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS)
        m_last = is_last_step(t, b_len, REVERSE)  # h_n, c_n are the states after step t
        p_dnext = d_gates_ptr + t_next * stride_dgt
        if PROJ:
            if PHASE != 2:  # dh of this program's columns of h, for all programs to read
                o_p = (pid_n * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
                b_dh = _grad_into_cell(dy_ptr + t * stride_dyt, dh_n_ptr, p_dnext, m_next, m_last, o_b, o_p, B, H,
                                       P, stride_dyb, stride_hnb, stride_dgb, w_hh_ptr, stride_w, 0.0, HAS_DY,
                                       HAS_DH_N, ACC_DTYPE, PRECISION, BLOCK_B, BLOCK_P, BLOCK_KP, 1, False)
                tl.store(dh_buf_ptr + (t % 2) * stride_bt + o_b[:, None] * stride_bb + o_p[None, :],
                         b_dh.to(dh_buf_ptr.dtype.element_ty), mask=(o_b[:, None] < B) & (o_p[None, :] < P))
            if PHASE == 0:
                grid_barrier(sync_ptr + pid_b, pid_n, tl.num_programs(1))
            b_dm = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC_DTYPE)  # dh @ w_hr for this program's units
            b_dm = carried_product(b_dm, dh_buf_ptr + (t % 2) * stride_bt, b_len >= 0, o_b, o_n, B, P, H,
                                   stride_bb, w_hr_ptr, stride_hr, 1, 0.0, PRECISION, BLOCK_KP, 1, False)
        else:
            b_dm = _grad_into_cell(dy_ptr + t * stride_dyt, dh_n_ptr, p_dnext, m_next, m_last, o_b, o_n, B, H,
                                   H, stride_dyb, stride_hnb, stride_dgb, w_hh_ptr, stride_w, b_w_all, HAS_DY,
                                   HAS_DH_N, ACC_DTYPE, PRECISION, BLOCK_B, BLOCK_N, BLOCK_K, SPLIT_K, W_RESIDENT)
        if PHASE != 1:
            b_dc_carry = _cell_grads(d_gates_ptr + t * stride_dgt, gates_ptr + t * stride_gt, c_ptr, c0_ptr, t,
                                     t_next, cut_prev, b_dm, b_dc_carry, b_dc_n, m_last, b_len, o_b, o_n, H,
                                     stride_ct, stride_cb, stride_c0b, stride_gb, stride_dgb, m_bn, HAS_C0, HAS_DC_N,
                                     ACC_DTYPE)
        if SYNC:
            grid_barrier(sync_ptr + pid_b, pid_n, tl.num_programs(1))
    if PHASE != 1:
        tl.store(dc_carry_ptr + o_b[:, None] * stride_dcb + o_n[None, :], b_dc_carry.to(dc_carry_ptr.dtype.element_ty),
                 mask=m_bn)


@triton.jit
def _cell_grads(d_gates_ptr, gates_ptr, c_ptr, c0_ptr, t, t_next, cut_prev, b_dm, b_dc_carry, b_dc_n, m_last, b_len,
                o_b, o_n, H, stride_ct, stride_cb, stride_c0b, stride_gb, stride_dgb, m_bn, HAS_C0: tl.constexpr,
                HAS_DC_N: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One step's gate gradients from ``dm`` (the gradient of o tanh(c_t)) and the carried
    ``dc_{t_next} f_{t_next}`` (plus ``dc_n`` where c_n was read, if HAS_DC_N); stores them (zero past
    each sequence's end) and returns the carry for the step before (zero where the state entering t
    was ``cut_prev``: c_{t-1} is zero there)."""
    p_bn = o_b[:, None] * stride_cb + o_n[None, :]  # this program's units in a step of c
    i = load_gate(gates_ptr, 0, o_b, o_n, H, stride_gb, m_bn, ACC_DTYPE)
    f = load_gate(gates_ptr, 1, o_b, o_n, H, stride_gb, m_bn, ACC_DTYPE)
    g = load_gate(gates_ptr, 2, o_b, o_n, H, stride_gb, m_bn, ACC_DTYPE)
    o = load_gate(gates_ptr, 3, o_b, o_n, H, stride_gb, m_bn, ACC_DTYPE)
    b_c = tl.load(c_ptr + t * stride_ct + p_bn, mask=m_bn, other=0.0).to(ACC_DTYPE)
    m_prev, m_first = previous_step_masks(2 * t - t_next, b_len)  # c_{t-1}: c[t_prev], or c0 first
    m_prev, m_first = m_prev & ~cut_prev, m_first & ~cut_prev
    b_c_prev = tl.load(c_ptr + (2 * t - t_next) * stride_ct + p_bn, mask=m_bn & m_prev, other=0.0)
    b_c_prev = b_c_prev.to(ACC_DTYPE)
    if HAS_C0:
        b_c_prev += tl.load(c0_ptr + o_b[:, None] * stride_c0b + o_n[None, :], mask=m_bn & m_first,
                            other=0.0).to(ACC_DTYPE)
    tanh_c = tanh(b_c, False)
    b_dc = b_dm * o * (1.0 - tanh_c * tanh_c) + b_dc_carry
    if HAS_DC_N:
        b_dc += tl.where(m_last, b_dc_n, 0.0)
    valid = t < b_len
    _store_gates(d_gates_ptr, b_dc * g * i * (1.0 - i), b_dc * b_c_prev * f * (1.0 - f),
                 b_dc * i * (1.0 - g * g), b_dm * tanh_c * o * (1.0 - o), valid, o_b, o_n, H, stride_dgb, m_bn)
    return tl.where(cut_prev, 0.0, tl.where(valid, b_dc * f, b_dc_carry))


def lstm_fwd(x_proj, h0, c0, w_hh, w_hr=None, reverse=False, lengths=None, resets=None, save=True, config=None):
    """Launch the LSTM forward. ``x_proj (T, B, 4H)``, ``h0 (B, P)``, ``c0 (B, H)`` or None,
    ``w_hh (4H, P)``, ``w_hr (P, H)`` (proj_size P) or None (P = H), ``lengths (B,)`` integer or
    ``resets (T, B)`` bool on the device or None. Returns ``y (T, B, P)``, ``c (T, B, H)`` and
    ``gates (T, B, 4H)``, zero past each sequence's end, ``h_n (B, P)``, each sequence's final h (as y
    holds it at its last step), and ``c_state (B, H)``, each sequence's final cell state as the kernel
    carried it: in the accumulator's precision (c's own for fp32 and fp64). Without ``save`` (no
    backward will read them) ``c`` and ``gates`` come back empty, ``(0, B, H)`` and ``(0, B, 4H)``:
    neither allocated nor written."""
    found = find_kept(("lstm_fwd", reverse, config, save), x_proj.device,
                      (x_proj, h0, c0, w_hh, w_hr, lengths, resets), check_fwd)  # (checked where not kept yet)
    T, B, G = x_proj.shape
    H, P = G // 4, w_hh.shape[1]
    kept_steps = T if save else 0
    y, c, gates = x_proj.new_empty(T, B, P), x_proj.new_empty(kept_steps, B, H), x_proj.new_empty(kept_steps, B, G)
    runs = T > 0 and B > 0
    h_n, c_state = final_output(h0, x_proj, B, P, runs), carried_state(c0, x_proj, B, H, runs)  # (kernel-written)
    if not runs:
        return y, c, gates, h_n, c_state
    x_proj, w_hh = x_proj.contiguous(), w_hh.contiguous()
    h0, c0, w_hr, lengths = [t if t is None else t.contiguous() for t in (h0, c0, w_hr, lengths)]
    resets = resets_operand(resets, x_proj.dtype)
    m = y.new_empty(2, B, H) if w_hr is not None else None  # the projection's input, all units
    saved = (c, gates) if save else (None, None)
    with on_device(x_proj):
        tensors = (x_proj, h0_product(h0, w_hh), c0, c_state, w_hh, w_hr, lengths, resets, y, *saved, h_n, m)
        run_sequence(lambda cfg: lstm_fwd_launch(*tensors[:-1], reverse, cfg, m),
                     lambda: ladder(config, B, H, x_proj, **CELL), T, x_proj.device, _phases(w_hr), found=found,
                     operands=lambda cfg: tensors)
    return y, c, gates, h_n, c_state


def lstm_fwd_launch(x_proj, h0_proj, c0, c_state, w_hh, w_hr, lengths, resets, y, c, gates, h_n, reverse, config,
                    m=None):
    """``(kernel, grid, args, kwargs)`` of the LSTM forward for ``config``: operands with a contiguous
    last dimension, ``h0_proj (B, 4H)`` ``h0 @ w_hh.T`` (``h0_product``) or None, ``c0 (B, H)`` or None,
    ``c_state (B, H)`` the final cell state in the accumulator's precision (written; ``carried_state``),
    ``c`` and ``gates`` None where not stored (an inference call),
    ``h_n (B, P)`` the final h (written at each sequence's last step),
    ``m (2, B, H)`` the projection's scratch (made here if not given)."""
    T, B, G = x_proj.shape
    H, P = G // 4, w_hh.shape[1]
    has_h0, h0_proj = h0_proj is not None, h0_proj if h0_proj is not None else x_proj  # (read if has_h0)
    save = c is not None  # (else x_proj stands in for c and the gates: never written)
    c, gates = (c, gates) if save else (x_proj, x_proj)
    resets = resets_operand(resets, x_proj.dtype)
    if m is None:  # the projection's input, all units (y stands in without a projection: never read)
        m = y.new_empty(2, B, H) if w_hr is not None else y
    args = (x_proj, h0_proj, c0 if c0 is not None else c_state, c_state, w_hh, w_hr if w_hr is not None else w_hh,
            lengths if lengths is not None else x_proj, resets if resets is not None else x_proj, y, c, gates, h_n,
            m, T, B, H, P, x_proj.stride(0), x_proj.stride(1), h0_proj.stride(0), y.stride(0), y.stride(1),
            h_n.stride(0),
            c.stride(0), c.stride(1), c0.stride(0) if c0 is not None else 0, c_state.stride(0), gates.stride(0),
            gates.stride(1), m.stride(0), m.stride(1),
            w_hh.stride(0), w_hr.stride(0) if w_hr is not None else 0,
            *(resets.stride() if resets is not None else (0, 0)))
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_n))
    kwargs = dict(REVERSE=reverse, HAS_H0=has_h0, HAS_C0=c0 is not None, HAS_LENGTHS=lengths is not None,
                  HAS_RESETS=resets is not None, SAVE=save,
                  **gated_tile_kwargs(config, P, P), **_projection_blocks(w_hr, P, grid[1], config),
                  **dtype_flags(x_proj.dtype, x_proj.device, fast=True))
    return lstm_fwd_kernel, grid, args, kwargs


def lstm_bwd(dy, dh_n, dc_n, y, c, gates, h0, c0, w_hh, w_hr=None, reverse=False, lengths=None, resets=None,
             config=None):
    """Launch the LSTM backward (``dy``, ``dh_n`` or ``dc_n`` None: no gradient reached it). Returns
    ``d_gates (T, B, 4H)`` (zero past each sequence's end) and ``dc0 (B, H)``, the gradient of the initial
    cell state (c0's, or the zero state's without c0: no launch to zero it). ``y`` and ``h0`` are not read
    (the autograd formula's products use them)."""
    found = find_kept(("lstm_bwd", reverse, config, dh_n is dc_n is not None), gates.device,  # (aliased: cloned)
                   (dy, dh_n, dc_n, c, gates, c0, w_hh, w_hr, lengths, resets), check_bwd)
    T, B, G = gates.shape
    H, P = G // 4, w_hh.shape[1]
    d_gates = gates.new_empty(T, B, G)
    dc_carry = carried_state(None, gates, B, H, runs=T > 0 and B > 0)  # dc * f, from zero; dc0 at the end
    if T == 0 or B == 0:
        return d_gates, dc_carry.to(gates.dtype)
    dy, dh_n, dc_n = (gradient_operand(g, gates.dtype) for g in (dy, dh_n, dc_n))  # (rows contiguous)
    if dc_n is dh_n is not None:  # (one gradient for both, as autograd hands a sum h_n + c_n's): apart
        dc_n = dc_n.clone()
    c, gates, w_hh = c.contiguous(), gates.contiguous(), w_hh.contiguous()
    c0, w_hr, lengths = [t if t is None else t.contiguous() for t in (c0, w_hr, lengths)]
    dh_buf = gates.new_empty(2, B, P) if w_hr is not None else c  # dh of all columns (with PROJ; else unused)
    resets = resets_operand(resets, gates.dtype)
    tensors = (dy, dh_n, dc_n, c, gates, c0, w_hh, w_hr, lengths, resets, d_gates, dc_carry, dh_buf)
    operands = tensors if w_hr is not None else tensors[:-1] + (None,)  # (dh_buf is c without a projection)
    with on_device(gates):
        run_sequence(lambda cfg: lstm_bwd_launch(*tensors, reverse, cfg), lambda: ladder(config, B, H, gates, **CELL),
                     T, gates.device, _phases(w_hr), found=found, operands=lambda cfg: operands)
    return d_gates, dc_carry.to(gates.dtype)


def check_fwd(x_proj, h0, c0, w_hh, w_hr, lengths, resets) -> None:
    """What the forward kernel relies on (``operands.expect_operands``)."""
    _, B, H = expect_sequence("x_proj", x_proj, gates=4)
    P = _projected_size(w_hr, H)
    expect_operands("x_proj", x_proj, lengths, resets, w_hh=(w_hh, (4 * H, P)), w_hr=(w_hr, (P, H)),
                    h0=(h0, (B, P)), c0=(c0, (B, H)))


def check_bwd(dy, dh_n, dc_n, c, gates, c0, w_hh, w_hr, lengths, resets) -> None:
    """What the backward kernel relies on (``dy``, ``dh_n``, ``dc_n`` in any float dtype: the
    launcher converts them)."""
    T, B, H = expect_sequence("gates", gates, gates=4)
    P = _projected_size(w_hr, H)
    expect_operands("gates", gates, lengths, resets, converted=("dy", "dh_n", "dc_n"), dy=(dy, (T, B, P)),
                    dh_n=(dh_n, (B, P)), dc_n=(dc_n, (B, H)), c=(c, (T, B, H)), c0=(c0, (B, H)),
                    w_hh=(w_hh, (4 * H, P)), w_hr=(w_hr, (P, H)))


def _projected_size(w_hr, H: int) -> int:
    """P, the size of h: ``w_hr (P, H)``'s rows, or H without a projection."""
    if w_hr is None:
        return H
    expect_tensors(w_hr=w_hr)
    if w_hr.dim() != 2:
        raise ValueError(f"w_hr must be (P, {H}), got shape {tuple(w_hr.shape)}")
    return w_hr.shape[0]


def lstm_bwd_launch(dy, dh_n, dc_n, c, gates, c0, w_hh, w_hr, lengths, resets, d_gates, dc_carry, dh_buf,
                    reverse, config):
    """``(kernel, grid, args, kwargs)`` of the LSTM backward for ``config``: operands with a contiguous
    last dimension, ``dc_carry (B, H)`` in the accumulator's precision (written), ``dh_buf (2, B, P)``
    scratch (with a projection)."""
    T, B, G = gates.shape
    H, P = G // 4, w_hh.shape[1]
    resets = resets_operand(resets, gates.dtype)
    args = (dy if dy is not None else c, dh_n if dh_n is not None else c, dc_n if dc_n is not None else c, c, gates,
            c0 if c0 is not None else c, w_hh, w_hr if w_hr is not None else w_hh,
            lengths if lengths is not None else c, resets if resets is not None else c, d_gates, dc_carry, dh_buf,
            T, B, H, P,
            *((dy.stride(0), dy.stride(1)) if dy is not None else (0, 0)), dh_n.stride(0) if dh_n is not None else 0,
            c.stride(0), c.stride(1),
            dc_n.stride(0) if dc_n is not None else 0,
            c0.stride(0) if c0 is not None else 0, gates.stride(0), gates.stride(1), d_gates.stride(0),
            d_gates.stride(1), dc_carry.stride(0), dh_buf.stride(0), dh_buf.stride(1), w_hh.stride(0),
            w_hr.stride(0) if w_hr is not None else 0, *(resets.stride() if resets is not None else (0, 0)))
    grid = (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_n))
    kwargs = dict(REVERSE=reverse, HAS_C0=c0 is not None, HAS_DY=dy is not None, HAS_DH_N=dh_n is not None,
                  HAS_DC_N=dc_n is not None, HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None,
                  **gated_tile_kwargs(config, H, 4 * H), **_projection_blocks(w_hr, P, grid[1], config),
                  **dtype_flags(gates.dtype, gates.device))
    return lstm_bwd_kernel, grid, args, kwargs


def _projection_blocks(w_hr, P: int, n_programs: int, config) -> dict:
    """With a projection, each of a batch block's ``n_programs`` programs takes BLOCK_P of its P
    columns, the reductions streamed BLOCK_KP rows at a time."""
    if w_hr is None:
        return dict(PROJ=False, BLOCK_P=16, BLOCK_KP=16)
    block_p = max(16, triton.next_power_of_2(triton.cdiv(P, n_programs)))
    return dict(PROJ=True, BLOCK_P=block_p, BLOCK_KP=min(config.block_k, 64))


def _phases(w_hr):
    """One launch per step runs the two parts of a projected step as two launches."""
    return ({"PHASE": 1}, {"PHASE": 2}) if w_hr is not None else ({},)


def meta_launch(direction: str, B: int, H: int, dtype, config, h0: bool, lengths: bool, reverse: bool, P=None,
                resets: bool = False, save: bool = True):
    """``(kernel, grid, args, kwargs)`` of the forward or backward on meta tensors (T = 2: T is never
    specialised), as the launchers build it, with a projection where ``P`` is given and below H:
    what the compile sweep compiles. ``h0`` stands for both initial states and, in the backward, both
    final states' gradients; the backward leaves out dy with h0 and without lengths (a loss on the
    final states alone). The forward without ``save``: an inference call's (no c, no gates)."""
    T, P = 2, P or H
    acc = acc_dtype(dtype)

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    lens = empty(B, dt=torch.int64) if lengths else None
    cuts = empty(T, B, dt=torch.bool) if resets else None
    w_hh, w_hr, gates = empty(4 * H, P), (empty(P, H) if P != H else None), empty(T, B, 4 * H)
    if direction == "fwd":
        return lstm_fwd_launch(empty(T, B, 4 * H), empty(B, 4 * H, dt=acc) if h0 else None,
                               empty(B, H) if h0 else None, empty(B, H, dt=acc), w_hh, w_hr,
                               lens, cuts, empty(T, B, P), *((empty(T, B, H), gates) if save else (None, None)),
                               empty(B, P), reverse, config)
    dy = empty(T, B, P) if lengths or not h0 else None
    dh_n, dc_n, c0 = (empty(B, P), empty(B, H), empty(B, H)) if h0 else (None, None, None)
    return lstm_bwd_launch(dy, dh_n, dc_n, empty(T, B, H), gates, c0, w_hh, w_hr, lens, cuts, empty(T, B, 4 * H),
                           empty(B, H, dt=acc), empty(2, B, P), reverse, config)
