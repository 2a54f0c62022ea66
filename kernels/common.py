"""Device helpers shared by the forward and backward recurrence kernels.

Nothing here touches memory except ``grid_barrier``; everything works both compiled for a GPU and
under ``TRITON_INTERPRET=1`` (where a grid's programs run one after another).
"""

import os

import triton
import triton.language as tl

# The interpreter's tl.dot reads 16-bit float operands as integers (Triton 3.9): widen them there.
INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

# Activation codes, passed to the kernels as a constexpr.
TANH: tl.constexpr = tl.constexpr(0)
RELU: tl.constexpr = tl.constexpr(1)


@triton.jit
def tanh(z):
    """tanh without libdevice (which the interpreter lacks): sign(z) (1 - e) / (1 + e), e = exp(-2|z|),
    with a Taylor series near 0 where 1 - e would cancel. Exact at +-inf, NaN in, NaN out."""
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    z2 = z * z
    near = a * (1.0 + z2 * (-1.0 / 3.0 + z2 * (2.0 / 15.0 + z2 * (-17.0 / 315.0 + z2 * (
        62.0 / 2835.0 + z2 * (-1382.0 / 155925.0))))))
    t = tl.where(a < 0.125, near, far)
    return tl.where(z < 0, -t, t)


@triton.jit
def activation(z, ACTIVATION: tl.constexpr):
    """h = tanh(z) or relu(z)."""
    if ACTIVATION == 0:
        h = tanh(z)
    else:
        h = tl.maximum(z, 0.0)
    return h


@triton.jit
def activation_grad(h, ACTIVATION: tl.constexpr):
    """d h / d z written with the output h: 1 - h^2 for tanh, [h > 0] for relu."""
    if ACTIVATION == 0:
        g = 1.0 - h * h
    else:
        g = tl.where(h > 0, 1.0, 0.0).to(h.dtype)
    return g


@triton.jit
def matmul(a, b, PRECISION: tl.constexpr):
    """(M, K) @ (K, N) -> (M, N) accumulated in fp32 (fp64 for fp64 operands).

    tl.dot for every dtype but float64, which not every Triton can feed to tl.dot: there, multiply
    and reduce (fp64 is the exact-parity path, not a fast one)."""
    if a.dtype == tl.float64:
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif INTERPRETED:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def weight_block(w_ptr, o_k, o_n, stride_wk, stride_wn, H):
    """Block ``W[k, n]`` of an (H, H) matrix addressed through strides, zero outside: (w_hh.T with
    strides (1, H), w_hh with (H, 1)), shape (len(o_k), len(o_n))."""
    return tl.load(w_ptr + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn,
                   mask=(o_k[:, None] < H) & (o_n[None, :] < H), other=0.0)


@triton.jit
def carried_product(acc, src_ptr, m_rows, o_b, o_n, B, H, stride_b, w_ptr, stride_wk, stride_wn,
                    b_w_all, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, W_RESIDENT: tl.constexpr):
    """``acc + src[o_b, :] @ W[:, o_n]``, (BLOCK_B, BLOCK_N): the product that carries one step to the
    next in the tiled kernels. ``src_ptr`` points at one step of a (T, B, H) tensor that the other
    programs wrote, so it is read through L2 (``.cg``); rows outside ``m_rows (BLOCK_B, 1)`` read as
    zero. W is on chip (``b_w_all``, all of K, with W_RESIDENT) or streamed from ``w_ptr`` in
    BLOCK_K chunks."""
    if W_RESIDENT:
        o_k = tl.arange(0, BLOCK_K).to(tl.int64)
        b_src = tl.load(src_ptr + o_b[:, None] * stride_b + o_k[None, :],
                        mask=(o_b[:, None] < B) & (o_k[None, :] < H) & m_rows, other=0.0,
                        cache_modifier=".cg")
        acc += matmul(b_src.to(b_w_all.dtype), b_w_all, PRECISION).to(acc.dtype)
    else:
        for k in range(0, H, BLOCK_K):
            o_k = k + tl.arange(0, BLOCK_K).to(tl.int64)
            b_src = tl.load(src_ptr + o_b[:, None] * stride_b + o_k[None, :],
                            mask=(o_b[:, None] < B) & (o_k[None, :] < H) & m_rows, other=0.0,
                            cache_modifier=".cg")
            b_w = weight_block(w_ptr, o_k, o_n, stride_wk, stride_wn, H)  # (BLOCK_K, BLOCK_N)
            acc += matmul(b_src.to(b_w.dtype), b_w, PRECISION).to(acc.dtype)
    return acc


@triton.jit
def sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """(BLOCK_B, 1) int64: the length of each sequence of the block; T for all without lengths."""
    if HAS_LENGTHS:
        n = tl.load(lengths_ptr + o_b[:, None], mask=o_b[:, None] < B, other=0)
    else:
        n = tl.zeros([BLOCK_B, 1], dtype=tl.int64) + T
    return n


@triton.jit
def grid_barrier(sync_ptr, target):
    """Wait until ``target`` arrivals were counted at ``sync_ptr`` (this program's included).

    The counter only grows: at step s each of the n programs of a group adds one, and waits for
    (s + 1) * n. Every program of the group must be resident at once (the launcher ensures it)."""
    tl.debug_barrier()  # all threads of this program have stored their part of the step
    tl.atomic_add(sync_ptr, 1, sem="release")
    while tl.atomic_add(sync_ptr, 0, sem="acquire") < target:
        pass
