"""Device helpers of the gated cells: a gate is a block of H columns of a ``(., B, G x H)`` tensor
(x_proj, gates, their gradients) or of H rows of ``w_hh (G x H, K)``; gate ``k`` of unit ``n`` sits
at ``k * H + n``. Generic over the gate count: a cell calls them once per gate.
"""

import triton
import triton.language as tl

from .common import as_int64, weight_chunks


@triton.jit
def load_gate(ptr, gate, o_b, o_n, H, stride_b, mask, ACC_DTYPE: tl.constexpr):
    """Gate ``gate`` of one step of a (., B, G x H) tensor, rows ``o_b`` (int64) and units ``o_n``:
    (BLOCK_B, BLOCK_N) in ACC_DTYPE, zero where ``mask`` is off."""
    return tl.load(ptr + o_b[:, None] * stride_b + as_int64(H) * gate + o_n[None, :], mask=mask,
                   other=0.0).to(ACC_DTYPE)


@triton.jit
def store_gate(ptr, gate, value, o_b, o_n, H, stride_b, mask):
    """``value`` (BLOCK_B, BLOCK_N) into gate ``gate`` of one step of a (., B, G x H) tensor."""
    tl.store(ptr + o_b[:, None] * stride_b + as_int64(H) * gate + o_n[None, :],
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def gate_weights(w_hh_ptr, gate, k0, o_n, H, K, stride_w, SPLIT_K: tl.constexpr, CHUNK: tl.constexpr):
    """Rows ``k0 ...`` of ``w_hh.T`` (K of them) for the units ``o_n`` of one gate, from
    ``w_hh (G x H, K)``: (SPLIT_K, CHUNK, BLOCK_N)."""
    return weight_chunks(w_hh_ptr + as_int64(H) * gate * stride_w, k0, o_n, 1, stride_w, K, H, SPLIT_K, CHUNK)


@triton.jit
def start_state(state_ptr, first_ptr, o_b, o_n, stride_sb, stride_fb, m_bn, step_begin, HAS_FIRST: tl.constexpr,
                ACC_DTYPE: tl.constexpr):
    """What a launch carries from its start, rows ``o_b`` and units ``o_n`` of a (B, H) state (or
    carried gradient): (BLOCK_B, BLOCK_N) in ACC_DTYPE. The walk's first launch (``step_begin`` 0)
    starts from ``first`` (h0, c0) where HAS_FIRST, else from zeros; a later one (stepwise) from what
    the launch before stored at ``state``. (So no torch launch fills ``state`` before the kernel.)"""
    later = tl.zeros_like(o_b[:, None]) + step_begin > 0  # (BLOCK_B, 1): a tensor, so masks stay tensors of bool
    b_state = tl.load(state_ptr + o_b[:, None] * stride_sb + o_n[None, :], mask=m_bn & later, other=0.0)
    b_state = b_state.to(ACC_DTYPE)
    if HAS_FIRST:
        b_first = tl.load(first_ptr + o_b[:, None] * stride_fb + o_n[None, :], mask=m_bn & ~later, other=0.0)
        b_state = tl.where(later, b_state, b_first.to(ACC_DTYPE))
    return b_state
