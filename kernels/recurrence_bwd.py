"""Backward recurrence: the gradient of the pre-activations, ``d_pre (T, B, H)``, in one launch.

With ``z_t = x_proj[t] + h_{t-1} @ w_hh.T`` and ``h_t = act(z_t)``, walking time in reverse:
    g_t      = dy[t] + [t is where h_n was read] * dh_n + d_pre[t_next] @ w_hh     (B, H)
    d_pre[t] = g_t * act'(h_t)                     (zero where the sequence has ended)
``t_next`` is the step that consumed ``h_t``: ``t + 1`` (``t - 1`` when ``REVERSE``).
Everything else is one cuBLAS product over all steps, done by the caller:
``dx_proj = d_pre``, ``dw_hh = sum_t d_pre[t].T @ h_{t-1}``, ``dh0 = d_pre[first step] @ w_hh``.
No atomics: the result is bitwise the same run to run.

The two kernels mirror the forward ones: ``_bwd_resident_kernel`` keeps ``w_hh`` and the running
``d_pre`` on chip (small H); ``_bwd_tiled_kernel`` reads ``d_pre[t_next]`` back from memory, with a
grid barrier per step (``SYNC``) or one step per launch, and its columns of ``w_hh`` on chip
(``W_RESIDENT``) or streamed through L2.
"""

import torch
import triton
import triton.language as tl

from .common import (activation_grad, carried_product, grid_barrier, matmul, sequence_lengths, walk_step,
                     weight_block, weight_chunks)
from .config import dtype_flags, pick_configs
from .launch import run_sequence
from .recurrence_fwd import check_operands


@triton.jit(do_not_specialize=["T"])
def _bwd_resident_kernel(
    dy_ptr,  # (T, B, H) gradient of the outputs y
    dh_n_ptr,  # (B, H) gradient of h_n
    y_ptr,  # (T, B, H) the forward's hidden states
    w_hh_ptr,  # (H, H)
    lengths_ptr,  # (B,) int64 (unused unless HAS_LENGTHS)
    d_pre_ptr,  # (T, B, H) out: gradient of the pre-activations z
    T, B, H,
    stride_t, stride_b,  # shared by dy, y and d_pre; the last dim is contiguous
    stride_hnb, stride_w,
    ACTIVATION: tl.constexpr, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
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
    if REVERSE:
        t_last = tl.zeros([BLOCK_B, 1], dtype=tl.int64)  # h_n is the state after t = 0
    else:
        t_last = b_len - 1  # h_n is the state after each sequence's last step
    b_dh_n = tl.load(dh_n_ptr + o_b[:, None] * stride_hnb + o_h[None, :], mask=m_bh,
                     other=0.0).to(ACC_DTYPE)
    b_d = tl.zeros([BLOCK_B, BLOCK_H], dtype=ACC_DTYPE)  # d_pre of the step processed last

    p_off = o_b[:, None] * stride_b + o_h[None, :]
    if REVERSE:
        t_first = tl.full([], 0, tl.int64)
    else:
        t_first = tl.full([], T - 1, tl.int64)
    b_dy_next = tl.load(dy_ptr + t_first * stride_t + p_off, mask=m_bh, other=0.0)
    b_y_next = tl.load(y_ptr + t_first * stride_t + p_off, mask=m_bh, other=0.0)
    for s in range(0, T):
        if REVERSE:
            t = tl.full([], s, tl.int64)
            t_next = tl.minimum(t + 1, T - 1)  # clamped: the last prefetch rereads a valid row
        else:
            t = (T - 1 - s).to(tl.int64)
            t_next = tl.maximum(t - 1, 0)
        b_g = b_dy_next.to(ACC_DTYPE)
        b_y = b_y_next.to(ACC_DTYPE)
        # prefetch dy and y of the next step: their loads overlap this step's dependent chain
        b_dy_next = tl.load(dy_ptr + t_next * stride_t + p_off, mask=m_bh, other=0.0)
        b_y_next = tl.load(y_ptr + t_next * stride_t + p_off, mask=m_bh, other=0.0)
        b_g += tl.where(t == t_last, b_dh_n, 0.0)
        b_g += matmul(b_d.to(b_w.dtype), b_w, PRECISION).to(ACC_DTYPE)
        b_d = tl.where(t < b_len, b_g * activation_grad(b_y, ACTIVATION), 0.0)
        tl.store(d_pre_ptr + t * stride_t + p_off, b_d.to(d_pre_ptr.dtype.element_ty), mask=m_bh)


@triton.jit(do_not_specialize=["T", "step_begin", "n_steps"])
def _bwd_tiled_kernel(
    dy_ptr,  # (T, B, H)
    dh_n_ptr,  # (B, H)
    y_ptr,  # (T, B, H)
    w_hh_ptr,  # (H, H)
    lengths_ptr,  # (B,) int64 (unused unless HAS_LENGTHS)
    d_pre_ptr,  # (T, B, H) out; also where d_pre[t_next] is read back from
    T, B, H,
    stride_t, stride_b, stride_hnb, stride_w,
    sync_ptr,  # (num batch blocks,) int32 arrival counters (unused unless SYNC)
    step_begin, n_steps,  # this launch runs backward steps [step_begin, step_begin + n_steps)
    ACTIVATION: tl.constexpr, REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr,
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
    if REVERSE:
        t_last = tl.zeros([BLOCK_B, 1], dtype=tl.int64)
    else:
        t_last = b_len - 1
    p_bn = o_b[:, None] * stride_b + o_n[None, :]
    b_dh_n = tl.load(dh_n_ptr + o_b[:, None] * stride_hnb + o_n[None, :], mask=m_bn,
                     other=0.0).to(ACC_DTYPE)
    if W_RESIDENT:  # w_hh columns of this program, loaded once: (BLOCK_K, BLOCK_N)
        b_w_all = weight_chunks(w_hh_ptr, 0, o_n, stride_w, 1, H, H, SPLIT_K, BLOCK_K // SPLIT_K)
    else:
        b_w_all = 0.0  # unused: carried_product streams w_hh

    for s in range(step_begin, step_begin + n_steps):
        # walking the forward's steps last to first, from t_next, the step that consumed h_t
        t, t_next, m_next, _ = walk_step(s, T, b_len, not REVERSE)
        b_g = tl.load(dy_ptr + t * stride_t + p_bn, mask=m_bn, other=0.0).to(ACC_DTYPE)
        b_g += tl.where(t == t_last, b_dh_n, 0.0)
        b_g = carried_product(b_g, d_pre_ptr + t_next * stride_t, m_next, o_b, o_n, B, H, H, stride_b,
                              w_hh_ptr, stride_w, 1, b_w_all, PRECISION, BLOCK_K, SPLIT_K, W_RESIDENT)
        b_y = tl.load(y_ptr + t * stride_t + p_bn, mask=m_bn, other=0.0).to(ACC_DTYPE)
        b_d_new = tl.where(t < b_len, b_g * activation_grad(b_y, ACTIVATION), 0.0)
        tl.store(d_pre_ptr + t * stride_t + p_bn, b_d_new.to(d_pre_ptr.dtype.element_ty), mask=m_bn)
        if SYNC:
            grid_barrier(sync_ptr + pid_b, pid_n, tl.num_programs(1))


def recurrence_bwd(dy, dh_n, y, w_hh, activation: str = "tanh", reverse: bool = False,
                   lengths=None, config=None):
    """Launch the backward recurrence. ``dy, y (T, B, H)``, ``dh_n (B, H)``, ``w_hh (H, H)``,
    ``lengths (B,)`` int64 or None. Returns ``d_pre (T, B, H)`` in y's dtype."""
    T, B, H = y.shape
    check_operands(y, dh_n, w_hh, lengths)
    if dy.shape != y.shape:
        raise ValueError(f"dy must have y's shape {tuple(y.shape)}, got {tuple(dy.shape)}")
    dy, dh_n = dy.to(y.dtype).contiguous(), dh_n.to(y.dtype).contiguous()
    y, w_hh = y.contiguous(), w_hh.contiguous()
    d_pre = torch.empty_like(y)
    if T == 0 or B == 0:
        return d_pre
    configs = (config,) if config else pick_configs(B, H, y.dtype, y.device)
    with torch.cuda.device_of(y):  # launch on the tensors' GPU, not the current one
        run_sequence(lambda cfg: bwd_launch(dy, dh_n, y, w_hh, lengths, d_pre, activation, reverse, cfg),
                     configs, T, y.device)
    return d_pre


def bwd_launch(dy, dh_n, y, w_hh, lengths, d_pre, activation, reverse, config):
    """``(kernel, grid, args, kwargs)`` of the backward for ``config`` (contiguous operands); what
    ``run_sequence`` launches and ``tests/compile_check.py`` compiles."""
    T, B, H = y.shape
    kwargs = dict(ACTIVATION=0 if activation == "tanh" else 1, REVERSE=reverse,
                  HAS_LENGTHS=lengths is not None, num_warps=config.num_warps,
                  num_stages=config.num_stages, **dtype_flags(y.dtype, y.device))
    len_arg = lengths if lengths is not None else y  # never read unless HAS_LENGTHS
    args = (dy, dh_n, y, w_hh, len_arg, d_pre, T, B, H, y.stride(0), y.stride(1), dh_n.stride(0),
            w_hh.stride(0))
    if config.variant == "resident":
        kwargs.update(BLOCK_B=config.block_b, BLOCK_H=config.block_n)
        return _bwd_resident_kernel, (triton.cdiv(B, config.block_b),), args, kwargs
    kwargs.update(BLOCK_B=config.block_b, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                  SPLIT_K=config.split_k, W_RESIDENT=config.block_k >= H)
    return _bwd_tiled_kernel, (triton.cdiv(B, config.block_b), triton.cdiv(H, config.block_n)), args, kwargs
