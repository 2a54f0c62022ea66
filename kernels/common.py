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
def tanh_exact(z):
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
def tanh(z, FAST: tl.constexpr):
    """tanh of fp32 (or fp64) ``z``. With FAST, on the bf16 / fp16 / TF32 paths, the hardware's
    ``tanh.approx.f32`` (one MUFU instruction; about 2^-11 relative error, inside those paths'
    tolerances); the interpreter runs no PTX, so it keeps the exact formula there."""
    if FAST and not INTERPRETED:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [z.to(tl.float32)],
                                      dtype=tl.float32, is_pure=True, pack=1)
    else:
        t = tanh_exact(z)
    return t


@triton.jit
def sigmoid(z, FAST: tl.constexpr):
    """1 / (1 + e^-z); with FAST, 0.5 tanh(z / 2) + 0.5 on the hardware tanh."""
    if FAST:
        s = 0.5 * tanh(0.5 * z, FAST) + 0.5
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
    return s


@triton.jit
def activation(z, ACTIVATION: tl.constexpr, FAST: tl.constexpr):
    """h = tanh(z) or relu(z)."""
    if ACTIVATION == 0:
        h = tanh(z, FAST)
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
    """``a @ b`` on the tensor cores, accumulated in fp32 (fp64 for fp64): (M, K) x (K, N), or
    batched (S, M, K) x (S, K, N). fp32 products use PRECISION: "tf32", or "tf32x3" (three TF32
    products that together carry fp32's precision) when TF32 is off."""
    if a.dtype == tl.float64:
        c = tl.dot(a, b)
    elif INTERPRETED:  # its tl.dot reads 16-bit floats as integers (Triton 3.9): widen them
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def weight_block(w_ptr, o_k, o_n, stride_wk, stride_wn, K, N):
    """Block ``W[k, n]`` of a (K, N) matrix addressed through strides, zero outside (w_hh.T is w_hh
    with its strides swapped), shape (len(o_k), len(o_n)); ``o_k``, ``o_n`` int64, so the offsets
    stay exact past 2^31 elements."""
    return tl.load(w_ptr + o_k[:, None] * stride_wk + o_n[None, :] * stride_wn,
                   mask=(o_k[:, None] < K) & (o_n[None, :] < N), other=0.0)


@triton.jit
def weight_chunks(w_ptr, k0, o_n, stride_wk, stride_wn, K, N, SPLIT_K: tl.constexpr,
                  CHUNK: tl.constexpr):
    """``W[k0 + s * CHUNK + c, o_n]`` as (SPLIT_K, CHUNK, BLOCK_N): a block of rows of W cut into
    SPLIT_K chunks of the reduction, zero outside the (K, N) matrix."""
    o_k = k0 + (tl.arange(0, SPLIT_K)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, :, None]).to(tl.int64)
    o_n3 = o_n[None, None, :]
    return tl.load(w_ptr + o_k * stride_wk + o_n3 * stride_wn, mask=(o_k < K) & (o_n3 < N), other=0.0)


@triton.jit
def source_chunks(src_ptr, k0, o_b, m_rows, B, K, stride_b, SPLIT_K: tl.constexpr,
                  CHUNK: tl.constexpr):
    """``src[o_b, k0 + s * CHUNK + c]`` as (SPLIT_K, BLOCK_B, CHUNK), zero outside (B, K) and in the
    rows outside ``m_rows (BLOCK_B, 1)``. ``src`` is one step that other programs wrote, so it is
    read through L2 (``.cg``), never from this SM's L1."""
    o_k = k0 + (tl.arange(0, SPLIT_K)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]).to(tl.int64)
    rows = o_b[None, :, None]
    return tl.load(src_ptr + rows * stride_b + o_k, mask=(rows < B) & m_rows[None] & (o_k < K),
                   other=0.0, cache_modifier=".cg")


@triton.jit
def split_k_product(a, b, PRECISION: tl.constexpr):
    """sum_s a[s] @ b[s]: (SPLIT_K, M, C) x (SPLIT_K, C, N) -> (M, N). The batched product puts the
    warps on the chunks, so each warp runs a chain of C / 16 tensor-core steps, not K / 16, and the
    chunks' sums meet in one reduction."""
    return tl.sum(matmul(a.to(b.dtype), b, PRECISION), axis=0)


@triton.jit
def carried_product(acc, src_ptr, m_rows, o_b, o_n, B, K, N, stride_b, w_ptr, stride_wk, stride_wn,
                    b_w_all, PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                    W_RESIDENT: tl.constexpr):
    """``acc + src[o_b, :K] @ W[:K, o_n]``, (BLOCK_B, BLOCK_N): the product that carries one step to
    the next in the tiled kernels (``src`` is a step the other programs wrote). W is on chip
    (``b_w_all``, all of K as (SPLIT_K, BLOCK_K / SPLIT_K, BLOCK_N), with W_RESIDENT) or streamed from
    ``w_ptr`` in BLOCK_K rows at a time."""
    CHUNK: tl.constexpr = BLOCK_K // SPLIT_K
    if W_RESIDENT:
        b_src = source_chunks(src_ptr, 0, o_b, m_rows, B, K, stride_b, SPLIT_K, CHUNK)
        acc += split_k_product(b_src, b_w_all, PRECISION).to(acc.dtype)
    else:
        for k0 in range(0, K, BLOCK_K):
            b_src = source_chunks(src_ptr, k0, o_b, m_rows, B, K, stride_b, SPLIT_K, CHUNK)
            b_w = weight_chunks(w_ptr, k0, o_n, stride_wk, stride_wn, K, N, SPLIT_K, CHUNK)
            acc += split_k_product(b_src, b_w, PRECISION).to(acc.dtype)
    return acc


@triton.jit
def walk_step(s, T, b_len, DESCENDING: tl.constexpr):
    """Step ``s`` of a walk over time, ascending or (DESCENDING) from T - 1 down: its time ``t``
    (int64), the time it came from, ``t_prev = t -+ 1``, and per sequence of the block
    (``b_len (BLOCK_B, 1)``) whether ``t_prev`` is one of its steps (``m_prev``) or else ``t`` is
    where it starts (``m_first``: its initial state enters there)."""
    if DESCENDING:
        t = (T - 1 - s).to(tl.int64)
        t_prev = t + 1
    else:
        t = s + tl.zeros([], tl.int64)
        t_prev = t - 1
    m_prev, m_first = previous_step_masks(t_prev, b_len)
    return t, t_prev, m_prev, m_first


@triton.jit
def previous_step_masks(t_prev, b_len):
    """(BLOCK_B, 1) masks: ``t_prev`` is one of each sequence's steps, or it is not."""
    t_prev_b = t_prev + tl.zeros_like(b_len)  # a tensor, so the masks stay tensors of bool
    return (t_prev_b >= 0) & (t_prev_b < b_len), (t_prev_b < 0) | (t_prev_b >= b_len)


@triton.jit
def is_last_step(t, b_len, REVERSE: tl.constexpr):
    """(BLOCK_B, 1): ``t`` is the step each sequence's walk takes last, after which its final state
    ``h_n`` is read: t = 0 walking in reverse, else its last step (``b_len`` from ``sequence_lengths``;
    step 0 for a length of 0, which a GPU's unchecked lengths may hold: every row's h_n is written)."""
    if REVERSE:
        t_last = tl.zeros_like(b_len)
    else:
        t_last = tl.maximum(b_len - 1, 0)
    return t == t_last


@triton.jit
def sequence_lengths(lengths_ptr, o_b, B, T, BLOCK_B: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """(BLOCK_B, 1) int64: the length of each sequence of the block; T for all without lengths. Lengths
    are clamped into [0, T]: on a GPU they are taken unchecked (no host sync), and a length past T
    would have a walk read steps outside y."""
    if HAS_LENGTHS:
        n = tl.load(lengths_ptr + o_b[:, None], mask=o_b[:, None] < B, other=0)
        n = tl.minimum(tl.maximum(n, 0), T)
    else:
        n = tl.zeros([BLOCK_B, 1], dtype=tl.int64) + T
    return n


@triton.jit
def grid_barrier(sync_ptr, rank, n_programs):
    """Wait until all ``n_programs`` programs of a group have arrived; the stores each made before it
    are then visible to all (release on arrival, acquire while polling). Every program of the group
    must be resident at once: the launcher launches the grid cooperatively.

    The scheme of CUDA's cooperative groups (and of PyTorch inductor's grid barrier): the group's
    int32 counter starts at 0; the program of ``rank`` 0 adds 2^31 - (n - 1), every other program
    adds 1. Each barrier so adds exactly 2^31 (modulo 2^32), and the counter's top bit flips when,
    and only when, the last program arrives; each program waits until the top bit differs from what
    it was just before its own arrival. After every barrier the counter is 0 or 0x80000000 again:
    nothing grows with the number of steps, so nothing can wrap into a wrong answer. No program can
    arrive at the next barrier and flip the bit back before all have arrived there too, so none misses
    the flip it waits for. The arithmetic is unsigned, so nothing overflows in a debug build."""
    tl.debug_barrier()  # every thread of this program has stored its part of the step
    n = n_programs.to(tl.uint32)
    arrival = tl.where(rank == 0, 0x80000000 - (n - 1), 1).to(tl.uint32)
    before = tl.atomic_add(sync_ptr, arrival.to(tl.int32, bitcast=True), sem="release", scope="gpu")
    now = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    while (before ^ now).to(tl.uint32, bitcast=True) < 0x80000000:  # the top bit has not flipped yet
        now = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()  # no thread of this program reads the others' stores before the flip


@triton.jit
def as_int64(x):
    """``x`` as int64, a scalar argument or a constexpr alike (Triton makes an argument equal to 1 a
    constexpr), so that offsets built from it stay exact past 2^31."""
    return x + tl.zeros([], tl.int64)


@triton.jit
def state_cut(resets_ptr, t, t_other, o_b, B, T, stride_rt, stride_rb, BLOCK_B: tl.constexpr,
              HAS_RESETS: tl.constexpr):
    """(BLOCK_B, 1) bool: whether the state passed between steps ``t`` and ``t_other`` (neighbours
    on the walk, either order) is cut, because a new sequence starts at the later of the two
    (``resets (T, B)`` True there). A cut state is zero: the forward starts afresh, the backward
    passes no gradient across. Always False without HAS_RESETS, or past either end of time."""
    if HAS_RESETS:
        r = tl.maximum(t, t_other) + tl.zeros([BLOCK_B, 1], dtype=tl.int64)  # a tensor: masks stay bool tensors
        flags = tl.load(resets_ptr + r * stride_rt + o_b[:, None] * stride_rb,
                        mask=(o_b[:, None] < B) & (r < T) & (r >= 0), other=0)
        cut = flags != 0
    else:
        cut = tl.zeros([BLOCK_B, 1], dtype=tl.int1)
    return cut
