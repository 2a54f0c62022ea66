"""The Elman recurrence, forward and backward, each in one launch.

Forward: ``h_t = act(x_proj[t] + h_{t-1} @ w_hh.T)`` for every step. ``x_proj (T, B, H)`` already
holds ``x_t @ w_ih.T + b_ih + b_hh`` (one cuBLAS product outside); the kernels write every hidden
state ``y (T, B, H)``, and ``h_n (B, H)``, each sequence's h at its last step (so no torch launch
copies it out of ``y``).

Backward: the gradient of the pre-activations, ``d_pre (T, B, H)``, walking time in reverse:
    g_t      = dy[t] + [t is where h_n was read] * dh_n + d_pre[t_next] @ w_hh     (B, H)
    d_pre[t] = g_t * act'(h_t)                     (zero where the sequence has ended)
``t_next`` is the step that consumed ``h_t``: ``t + 1`` (``t - 1`` when ``REVERSE``). Everything else
is one cuBLAS product over all steps, done by the caller: ``dx_proj = d_pre``,
``dw_hh = sum_t d_pre[t].T @ h_{t-1}``, ``dh0 = d_pre[first step] @ w_hh``. No atomics: the result
is bitwise the same run to run.

Two kernels each way, picked by ``config.pick_configs``:
- ``*_resident_kernel``: one program per batch block holds all of ``w_hh`` and its rows of the
  carried state on chip for the whole sequence. No program waits on another. For small H.
- ``*_tiled_kernel``: programs own ``(BLOCK_B, BLOCK_N)`` tiles; each step reads the whole carried
  state of its batch rows back from memory (``y[t_prev]``, ``d_pre[t_next]``) and multiplies it by
  its ``BLOCK_N`` rows of ``w_hh`` (on chip for the whole sequence with ``W_RESIDENT``, else
  streamed through L2 in a K loop). With ``SYNC`` the programs of a batch block meet at a grid
  barrier after each step (one launch for the sequence); without it the launcher runs one step per
  launch. At a sequence's first step the caller's ``h0 @ w_hh.T`` (one GEMM) stands in for
  ``h_{t-1}``.

Packed sequences: with ``HAS_LENGTHS``, sequence ``b`` only updates while ``t < lengths[b]``; ``y`` is
zero past its end. ``REVERSE`` walks time backwards (the reverse direction of a bidirectional layer):
sequence ``b`` then starts from ``h0`` at ``t = lengths[b] - 1``. Every tensor is read with its own
strides (the last dimension contiguous).
"""

import torch
import triton
import triton.language as tl

from ..sequence import acc_dtype

from .common import (activation, activation_grad, carried_product, grid_barrier, is_last_step, matmul,
                     sequence_lengths, state_cut, walk_step, weight_block, weight_chunks)
from .config import dtype_flags, ladder
from .launch import (final_output, find_kept, gradient_operand, h0_product, on_device, resets_operand,
                     run_sequence)
from .operands import expect_operands, expect_sequence


@triton.jit(do_not_specialize=["T"])
def fwd_resident_kernel(
    x_proj_ptr,  # (T, B, H) input projection plus both biases
    h0_ptr,  # (B, H) initial state (unused unless HAS_H0)
    w_hh_ptr,  # (H, H) recurrent weights
    lengths_ptr,  # (B,) int64 sequence lengths (unused unless HAS_LENGTHS)
    resets_ptr,  # (T, B) bool: a new sequence starts at step t of row b (unused unless HAS_RESETS)
    y_ptr,  # (T, B, H) out: every hidden state
    h_n_ptr,  # (B, H) out: h at each sequence's last step
    T, B, H,
    stride_xt, stride_xb, stride_yt, stride_yb, stride_hnb, stride_h0b, stride_w, stride_rt, stride_rb,
    ACTIVATION: tl.constexpr, REVERSE: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    FAST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program per block of BLOCK_B sequences; BLOCK_H >= H covers the whole hidden state."""
    pid_b = tl.program_id(0)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_h = tl.arange(0, BLOCK_H).to(tl.int64)
    m_bh = (o_b[:, None] < B) & (o_h[None, :] < H)

    # w_hh.T on chip for the whole sequence: b_wt[k, n] = w_hh[n, k], (BLOCK_H, BLOCK_H)
    b_wt = weight_block(w_hh_ptr, o_h, o_h, 1, stride_w, H, H)
    b_len = sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B, HAS_LENGTHS)  # (BLOCK_B, 1)
    # the state h stays in registers between steps, (BLOCK_B, BLOCK_H), in ACC_DTYPE
    if HAS_H0:
        b_h = tl.load(h0_ptr + o_b[:, None] * stride_h0b + o_h[None, :], mask=m_bh, other=0.0)
        b_h = b_h.to(ACC_DTYPE)
    else:
        b_h = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC_DTYPE)

    p_x = x_proj_ptr + o_b[:, None] * stride_xb + o_h[None, :]
    p_y = y_ptr + o_b[:, None] * stride_yb + o_h[None, :]
    p_h_n = h_n_ptr + o_b[:, None] * stride_hnb + o_h[None, :]
    if REVERSE:
        b_x_next = tl.load(p_x + tl.full([], T - 1, tl.int64) * stride_xt, mask=m_bh, other=0.0)
    else:
        b_x_next = tl.load(p_x, mask=m_bh, other=0.0)
    for s in range(0, T):
        if REVERSE:
            t = (T - 1 - s).to(tl.int64)
            t_next = tl.maximum(t - 1, 0)  # clamped: the last prefetch rereads a valid row
            t_prev = t + 1
        else:
            t = tl.full([], s, tl.int64)
            t_next = tl.minimum(t + 1, T - 1)
            t_prev = t - 1
        b_h = tl.where(state_cut(resets_ptr, t, t_prev, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS),
                       0.0, b_h)  # a new sequence starts from zero
        b_x = b_x_next.to(ACC_DTYPE)
        # prefetch x_proj of the next step: its load overlaps this step's dependent chain
        b_x_next = tl.load(p_x + t_next * stride_xt, mask=m_bh, other=0.0)
        b_z = b_x + matmul(b_h.to(b_wt.dtype), b_wt, PRECISION).to(ACC_DTYPE)
        b_h_new = activation(b_z, ACTIVATION, FAST)
        m_valid = t < b_len  # (BLOCK_B, 1): this sequence has not ended
        b_h = tl.where(m_valid, b_h_new, b_h)
        b_y = tl.where(m_valid, b_h_new, 0.0).to(y_ptr.dtype.element_ty)
        tl.store(p_y + t * stride_yt, b_y, mask=m_bh)
        tl.store(p_h_n, b_y, mask=m_bh & is_last_step(t, b_len, REVERSE))


@triton.jit(do_not_specialize=["T", "step_begin", "n_steps"])
def fwd_tiled_kernel(
    x_proj_ptr,  # (T, B, H)
    h0_proj_ptr,  # (B, H) h0 @ w_hh.T (fp32), added at each sequence's first step (unless HAS_H0 off)
    w_hh_ptr,  # (H, H)
    lengths_ptr,  # (B,) int64 (unused unless HAS_LENGTHS)
    resets_ptr,  # (T, B) bool (unused unless HAS_RESETS)
    y_ptr,  # (T, B, H) out; also where h_{t-1} is read back from
    h_n_ptr,  # (B, H) out: h at each sequence's last step
    T, B, H,
    stride_xt, stride_xb, stride_yt, stride_yb, stride_hnb, stride_h0b, stride_w, stride_rt, stride_rb,
    sync_ptr,  # (num batch blocks,) int32 arrival counters (unused unless SYNC)
    step_begin, n_steps,  # this launch runs steps [step_begin, step_begin + n_steps)
    ACTIVATION: tl.constexpr, REVERSE: tl.constexpr, HAS_H0: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr, SYNC: tl.constexpr, ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, FAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    W_RESIDENT: tl.constexpr,  # BLOCK_K >= H: this program's rows of w_hh stay on chip all along
):
    """Grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_N)): program (i, j) writes y[:, i-th rows, j-th cols]."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_bn = (o_b[:, None] < B) & (o_n[None, :] < H)
    b_len = sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B, HAS_LENGTHS)  # (BLOCK_B, 1)
    if W_RESIDENT:  # w_hh.T columns of this program, loaded once: b_wt_all[k, n] = w_hh[n, k]
        b_wt_all = weight_chunks(w_hh_ptr, 0, o_n, 1, stride_w, H, H, SPLIT_K, BLOCK_K // SPLIT_K)
    else:
        b_wt_all = 0.0  # unused: carried_product streams w_hh

    for s in range(step_begin, step_begin + n_steps):
        # h_{t-1} comes from y[t_prev] where that step was valid for the sequence; at a sequence's
        # first step it is h0, whose product h0 @ w_hh.T the caller computed once (h0_proj)
        t, t_prev, m_prev, m_first = walk_step(s, T, b_len, REVERSE)
        cut = state_cut(resets_ptr, t, t_prev, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS)
        m_prev, m_first = m_prev & ~cut, m_first & ~cut  # a new sequence starts from zero
        b_z = tl.load(x_proj_ptr + t * stride_xt + o_b[:, None] * stride_xb + o_n[None, :],
                      mask=m_bn, other=0.0).to(ACC_DTYPE)
        if HAS_H0:
            b_z += tl.load(h0_proj_ptr + o_b[:, None] * stride_h0b + o_n[None, :],
                           mask=m_bn & m_first, other=0.0).to(ACC_DTYPE)
        b_z = carried_product(b_z, y_ptr + t_prev * stride_yt, m_prev, o_b, o_n, B, H, H, stride_yb,
                              w_hh_ptr, 1, stride_w, b_wt_all, PRECISION, BLOCK_K, SPLIT_K, W_RESIDENT)
        b_h_new = activation(b_z, ACTIVATION, FAST)
        b_y = tl.where(t < b_len, b_h_new, 0.0).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + t * stride_yt + o_b[:, None] * stride_yb + o_n[None, :], b_y, mask=m_bn)
        tl.store(h_n_ptr + o_b[:, None] * stride_hnb + o_n[None, :], b_y,
                 mask=m_bn & is_last_step(t, b_len, REVERSE))
        if SYNC:
            grid_barrier(sync_ptr + pid_b, pid_n, tl.num_programs(1))


@triton.jit(do_not_specialize=["T"])
def bwd_resident_kernel(
    dy_ptr,  # (T, B, H) gradient of the outputs y (unused unless HAS_DY: none reached y)
    dh_n_ptr,  # (B, H) gradient of h_n (unused unless HAS_DH_N: none reached it)
    y_ptr,  # (T, B, H) the forward's hidden states
    w_hh_ptr,  # (H, H)
    lengths_ptr,  # (B,) int64 (unused unless HAS_LENGTHS)
    resets_ptr,  # (T, B) bool (unused unless HAS_RESETS)
    d_pre_ptr,  # (T, B, H) out: gradient of the pre-activations z
    T, B, H,
    stride_dyt, stride_dyb, stride_yt, stride_yb, stride_dt, stride_db, stride_hnb, stride_w, stride_rt,
    stride_rb,
    ACTIVATION: tl.constexpr, REVERSE: tl.constexpr, HAS_DY: tl.constexpr, HAS_DH_N: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One program per block of BLOCK_B sequences; BLOCK_H >= H."""
    pid_b = tl.program_id(0)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_h = tl.arange(0, BLOCK_H).to(tl.int64)
    m_bh = (o_b[:, None] < B) & (o_h[None, :] < H)

    # w_hh on chip, (BLOCK_H, BLOCK_H): g[:, n] gets d[:, k] * w_hh[k, n]
    b_w = weight_block(w_hh_ptr, o_h, o_h, stride_w, 1, H, H)
    b_len = sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B, HAS_LENGTHS)  # (BLOCK_B, 1)
    if HAS_DH_N:
        b_dh_n = tl.load(dh_n_ptr + o_b[:, None] * stride_hnb + o_h[None, :], mask=m_bh,
                         other=0.0).to(ACC_DTYPE)
    b_d = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC_DTYPE)  # d_pre of the step processed last

    p_dy = dy_ptr + o_b[:, None] * stride_dyb + o_h[None, :]
    p_y = y_ptr + o_b[:, None] * stride_yb + o_h[None, :]
    p_d = d_pre_ptr + o_b[:, None] * stride_db + o_h[None, :]
    if REVERSE:
        t_first = tl.full([], 0, tl.int64)
    else:
        t_first = tl.full([], T - 1, tl.int64)
    if HAS_DY:
        b_dy_next = tl.load(p_dy + t_first * stride_dyt, mask=m_bh, other=0.0)
    else:
        b_dy_next = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC_DTYPE)
    b_y_next = tl.load(p_y + t_first * stride_yt, mask=m_bh, other=0.0)
    for s in range(0, T):
        if REVERSE:
            t = tl.full([], s, tl.int64)
            t_next = tl.minimum(t + 1, T - 1)  # clamped: the last prefetch rereads a valid row
            t_from = t - 1  # the step that consumed h_t, processed just before
        else:
            t = (T - 1 - s).to(tl.int64)
            t_next = tl.maximum(t - 1, 0)
            t_from = t + 1
        b_g = b_dy_next.to(ACC_DTYPE)
        b_y = b_y_next.to(ACC_DTYPE)
        # prefetch dy and y of the next step: their loads overlap this step's dependent chain
        if HAS_DY:
            b_dy_next = tl.load(p_dy + t_next * stride_dyt, mask=m_bh, other=0.0)
        b_y_next = tl.load(p_y + t_next * stride_yt, mask=m_bh, other=0.0)
        if HAS_DH_N:  # h_n is the state after the step the forward's walk took last
            b_g += tl.where(is_last_step(t, b_len, REVERSE), b_dh_n, 0.0)
        # no gradient crosses a cut: h_t did not reach the step that consumed it there
        b_d = tl.where(state_cut(resets_ptr, t, t_from, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS),
                       0.0, b_d)
        b_g += matmul(b_d.to(b_w.dtype), b_w, PRECISION).to(ACC_DTYPE)
        b_d = tl.where(t < b_len, b_g * activation_grad(b_y, ACTIVATION), 0.0)
        tl.store(p_d + t * stride_dt, b_d.to(d_pre_ptr.dtype.element_ty), mask=m_bh)


@triton.jit(do_not_specialize=["T", "step_begin", "n_steps"])
def bwd_tiled_kernel(
    dy_ptr,  # (T, B, H) (unused unless HAS_DY)
    dh_n_ptr,  # (B, H) (unused unless HAS_DH_N)
    y_ptr,  # (T, B, H)
    w_hh_ptr,  # (H, H)
    lengths_ptr,  # (B,) int64 (unused unless HAS_LENGTHS)
    resets_ptr,  # (T, B) bool (unused unless HAS_RESETS)
    d_pre_ptr,  # (T, B, H) out; also where d_pre[t_next] is read back from
    T, B, H,
    stride_dyt, stride_dyb, stride_yt, stride_yb, stride_dt, stride_db, stride_hnb, stride_w, stride_rt,
    stride_rb,
    sync_ptr,  # (num batch blocks,) int32 arrival counters (unused unless SYNC)
    step_begin, n_steps,  # this launch runs backward steps [step_begin, step_begin + n_steps)
    ACTIVATION: tl.constexpr, REVERSE: tl.constexpr, HAS_DY: tl.constexpr, HAS_DH_N: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_RESETS: tl.constexpr,
    SYNC: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    W_RESIDENT: tl.constexpr,  # BLOCK_K >= H: this program's columns of w_hh stay on chip all along
):
    """Grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_N)): program (i, j) writes d_pre[:, i-th rows, j-th cols]."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    o_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    o_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_bn = (o_b[:, None] < B) & (o_n[None, :] < H)
    b_len = sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B, HAS_LENGTHS)  # (BLOCK_B, 1)
    if HAS_DH_N:
        b_dh_n = tl.load(dh_n_ptr + o_b[:, None] * stride_hnb + o_n[None, :], mask=m_bn,
                         other=0.0).to(ACC_DTYPE)
    if W_RESIDENT:  # w_hh columns of this program, loaded once: (BLOCK_K, BLOCK_N)
        b_w_all = weight_chunks(w_hh_ptr, 0, o_n, stride_w, 1, H, H, SPLIT_K, BLOCK_K // SPLIT_K)
    else:
        b_w_all = 0.0  # unused: carried_product streams w_hh

    for s in range(step_begin, step_begin + n_steps):
        # walking the forward's steps last to first, from t_next, the step that consumed h_t
        t, t_next, m_next, _ = walk_step(s, T, b_len, not REVERSE)
        m_next = m_next & ~state_cut(resets_ptr, t, t_next, o_b, B, T, stride_rt, stride_rb, BLOCK_B, HAS_RESETS)
        if HAS_DY:
            b_g = tl.load(dy_ptr + t * stride_dyt + o_b[:, None] * stride_dyb + o_n[None, :], mask=m_bn,
                          other=0.0).to(ACC_DTYPE)
        else:
            b_g = tl.zeros([BLOCK_B, BLOCK_N], dtype=ACC_DTYPE)
        if HAS_DH_N:  # h_n is the state after the step the forward's walk took last
            b_g += tl.where(is_last_step(t, b_len, REVERSE), b_dh_n, 0.0)
        b_g = carried_product(b_g, d_pre_ptr + t_next * stride_dt, m_next, o_b, o_n, B, H, H, stride_db,
                              w_hh_ptr, stride_w, 1, b_w_all, PRECISION, BLOCK_K, SPLIT_K, W_RESIDENT)
        b_y = tl.load(y_ptr + t * stride_yt + o_b[:, None] * stride_yb + o_n[None, :], mask=m_bn,
                      other=0.0).to(ACC_DTYPE)
        b_d_new = tl.where(t < b_len, b_g * activation_grad(b_y, ACTIVATION), 0.0)
        tl.store(d_pre_ptr + t * stride_dt + o_b[:, None] * stride_db + o_n[None, :],
                 b_d_new.to(d_pre_ptr.dtype.element_ty), mask=m_bn)
        if SYNC:
            grid_barrier(sync_ptr + pid_b, pid_n, tl.num_programs(1))


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def elman_fwd(x_proj, h0, w_hh, activation: str = "tanh", reverse: bool = False, lengths=None, resets=None,
              config=None):
    """Launch the forward recurrence. ``x_proj (T, B, H)``, ``h0 (B, H)`` or None, ``w_hh (H, H)``,
    ``lengths (B,)`` integer or ``resets (T, B)`` bool on the same device or None. Returns
    ``y (T, B, H)`` and ``h_n (B, H)``, each sequence's final state (y at its last step), in x_proj's
    dtype."""
    found = find_kept(("elman_fwd", activation, reverse, config), x_proj.device, (x_proj, h0, w_hh, lengths, resets),
                   lambda *given: check_fwd(*given, activation))  # (checked where not kept yet)
    T, B, H = x_proj.shape
    x_proj, w_hh = x_proj.contiguous(), w_hh.contiguous()
    h0, lengths = [t if t is None else t.contiguous() for t in (h0, lengths)]
    y, h_n = x_proj.new_empty(T, B, H), final_output(h0, x_proj, B, H, runs=T > 0 and B > 0)
    if T == 0 or B == 0:
        return y, h_n
    resets = resets_operand(resets, x_proj.dtype)
    made = []  # h0 @ w_hh.T, the tiled kernels' alone: made once, if one runs

    def operands(cfg):  # the tensors fwd_launch passes for cfg
        if h0 is None or cfg.variant == "resident":
            return x_proj, h0, None, w_hh, lengths, resets, y, h_n
        if not made:
            made.append(h0_product(h0, w_hh))
        return x_proj, h0, made[0], w_hh, lengths, resets, y, h_n

    with on_device(x_proj):  # launch on the tensors' GPU, not the current one
        run_sequence(lambda cfg: fwd_launch(*operands(cfg), activation, reverse, cfg),
                     lambda: ladder(config, B, H, x_proj), T, x_proj.device, found=found, operands=operands)
    return y, h_n


def fwd_launch(x_proj, h0, h0_proj, w_hh, lengths, resets, y, h_n, activation, reverse, config):
    """``(kernel, grid, args, kwargs)`` of the forward for ``config`` (operands with a contiguous
    last dimension; ``h0_proj``, ``h0 @ w_hh.T`` from ``h0_product``, for the tiled kernel); what
    ``run_sequence`` launches and ``scripts/compile_check.py`` compiles."""
    T, B, H = x_proj.shape
    resets = resets_operand(resets, x_proj.dtype)
    kwargs = dict(ACTIVATION=0 if activation == "tanh" else 1, REVERSE=reverse, HAS_H0=h0 is not None,
                  HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None, num_warps=config.num_warps,
                  num_stages=config.num_stages, **dtype_flags(x_proj.dtype, x_proj.device, fast=True))
    optional = (lengths if lengths is not None else x_proj, resets if resets is not None else x_proj)
    strides = (x_proj.stride(0), x_proj.stride(1), y.stride(0), y.stride(1), h_n.stride(0))
    resets_strides = resets.stride() if resets is not None else (0, 0)
    if config.variant == "resident":
        h0_arg = h0 if h0 is not None else x_proj  # never read unless HAS_H0
        args = (x_proj, h0_arg, w_hh, *optional, y, h_n, T, B, H, *strides, h0.stride(0) if h0 is not None else 0,
                w_hh.stride(0), *resets_strides)
        kwargs.update(BLOCK_B=config.block_b, BLOCK_H=config.block_n)
        return fwd_resident_kernel, (triton.cdiv(B, config.block_b),), args, kwargs
    args = (x_proj, h0_proj if h0 is not None else x_proj, w_hh, *optional, y, h_n, T, B, H, *strides,
            h0_proj.stride(0) if h0 is not None else 0, w_hh.stride(0), *resets_strides)
    kwargs.update(BLOCK_B=config.block_b, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  SPLIT_K=config.split_k, W_RESIDENT=config.block_k >= H)
    return fwd_tiled_kernel, (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_n)), args, kwargs


def elman_bwd(dy, dh_n, y, w_hh, activation: str = "tanh", reverse: bool = False, lengths=None, resets=None,
              config=None):
    """Launch the backward recurrence. ``dy, y (T, B, H)``, ``dh_n (B, H)`` (``dy`` or ``dh_n`` None: no
    gradient reached y, or h_n), ``w_hh (H, H)``, ``lengths (B,)`` integer or ``resets (T, B)`` bool, or
    None. Returns ``d_pre (T, B, H)`` in y's dtype."""
    found = find_kept(("elman_bwd", activation, reverse, config), y.device, (dy, dh_n, y, w_hh, lengths, resets),
                   lambda *given: check_bwd(*given, activation))
    T, B, H = y.shape
    y, w_hh = y.contiguous(), w_hh.contiguous()
    dy, dh_n = gradient_operand(dy, y.dtype), gradient_operand(dh_n, y.dtype)  # (rows contiguous)
    lengths = lengths.contiguous() if lengths is not None else None
    d_pre = y.new_empty(T, B, H)
    if T == 0 or B == 0:
        return d_pre
    resets = resets_operand(resets, y.dtype)
    tensors = (dy, dh_n, y, w_hh, lengths, resets, d_pre)
    with on_device(y):  # launch on the tensors' GPU, not the current one
        run_sequence(lambda cfg: bwd_launch(*tensors, activation, reverse, cfg), lambda: ladder(config, B, H, y), T,
                     y.device, found=found, operands=lambda cfg: tensors)
    return d_pre


def bwd_launch(dy, dh_n, y, w_hh, lengths, resets, d_pre, activation, reverse, config):
    """``(kernel, grid, args, kwargs)`` of the backward for ``config`` (operands with a contiguous
    last dimension); what ``run_sequence`` launches and ``scripts/compile_check.py`` compiles."""
    T, B, H = y.shape
    resets = resets_operand(resets, y.dtype)
    kwargs = dict(ACTIVATION=0 if activation == "tanh" else 1, REVERSE=reverse, HAS_DY=dy is not None,
                  HAS_DH_N=dh_n is not None, HAS_LENGTHS=lengths is not None, HAS_RESETS=resets is not None,
                  num_warps=config.num_warps, num_stages=config.num_stages, **dtype_flags(y.dtype, y.device))
    optional = (lengths if lengths is not None else y, resets if resets is not None else y)
    dy_strides = (dy.stride(0), dy.stride(1)) if dy is not None else (0, 0)
    args = (dy if dy is not None else y, dh_n if dh_n is not None else y, y, w_hh, *optional, d_pre, T, B, H,
            *dy_strides, y.stride(0), y.stride(1), d_pre.stride(0), d_pre.stride(1),
            dh_n.stride(0) if dh_n is not None else 0, w_hh.stride(0),
            *(resets.stride() if resets is not None else (0, 0)))
    if config.variant == "resident":
        kwargs.update(BLOCK_B=config.block_b, BLOCK_H=config.block_n)
        return bwd_resident_kernel, (triton.cdiv(B, config.block_b),), args, kwargs
    kwargs.update(BLOCK_B=config.block_b, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  SPLIT_K=config.split_k, W_RESIDENT=config.block_k >= H)
    return bwd_tiled_kernel, (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_n)), args, kwargs


def check_fwd(x_proj, h0, w_hh, lengths, resets, activation) -> None:
    """What the forward kernels rely on (``operands.expect_operands``)."""
    check_activation(activation)
    _, B, H = expect_sequence("x_proj", x_proj)
    expect_operands("x_proj", x_proj, lengths, resets, w_hh=(w_hh, (H, H)), h0=(h0, (B, H)))


def check_bwd(dy, dh_n, y, w_hh, lengths, resets, activation) -> None:
    """What the backward kernels rely on (``dy``, ``dh_n`` in any float dtype: the launcher converts them)."""
    check_activation(activation)
    T, B, H = expect_sequence("y", y)
    expect_operands("y", y, lengths, resets, converted=("dy", "dh_n"), dy=(dy, (T, B, H)), dh_n=(dh_n, (B, H)),
                    w_hh=(w_hh, (H, H)))


def check_activation(activation: str) -> None:
    """The kernels' two activations (any other would run as relu)."""
    if activation not in ("tanh", "relu"):
        raise ValueError(f"activation must be 'tanh' or 'relu', got {activation!r}")


def meta_launch(direction: str, B: int, H: int, dtype, config, h0: bool, lengths: bool, reverse: bool, P=None,
                resets: bool = False):
    """``(kernel, grid, args, kwargs)`` of the forward or backward on meta tensors (T = 2: T is never
    specialised), as the launcher builds it: what the compile sweep compiles. ``h0`` stands for the
    initial state and, in the backward, the final state's gradient; the backward leaves out dy with h0
    and without lengths (a loss on h_n alone). (``P`` is the LSTM's.)"""
    T = 2

    def empty(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")

    lens = empty(B, dt=torch.int64) if lengths else None
    cuts = empty(T, B, dt=torch.bool) if resets else None
    if direction == "fwd":
        h0_, h0_proj = (empty(B, H), empty(B, H, dt=acc_dtype(dtype))) if h0 else (None, None)
        return fwd_launch(empty(T, B, H), h0_, h0_proj, empty(H, H), lens, cuts, empty(T, B, H), empty(B, H), "tanh",
                          reverse, config)
    return bwd_launch(empty(T, B, H) if lengths or not h0 else None, empty(B, H) if h0 else None, empty(T, B, H),
                      empty(H, H), lens, cuts, empty(T, B, H), "tanh", reverse, config)
