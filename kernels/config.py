"""Which kernel variant and block sizes a shape gets. One place, cached per shape and device.

- ``resident``: one program per batch block holds all of ``w_hh`` (small H); no program waits.
- ``tiled``: hidden units split over programs, a grid barrier per step, one launch per sequence.
  Every program of the grid must be resident at once, so the grid is kept to one program per SM
  (and the launch is cooperative: ``launch.py``). ``block_k >= H`` means each program's rows of
  ``w_hh`` stay on chip (``W_RESIDENT``).
- ``stepwise``: the tiled kernel launched once per step (no barrier): for shapes whose grid cannot
  be resident at once (very large B and H), or whose tiled candidates spill. Slow, always correct.

``pick_configs`` gives the candidates in order of preference; the launcher takes the first whose
compiled kernel fits the GPU.

Under ``TRITON_INTERPRET=1`` (tensors on the CPU) programs run one after another, so a barrier
between programs would never be passed: there ``tiled`` keeps one program per batch block.
``FASTRNN_VARIANT=resident|tiled|stepwise`` forces a variant (for tests and experiments).
"""

import functools
import logging
import os
from dataclasses import dataclass

import torch
import triton

from ..sequence import acc_dtype

logger = logging.getLogger("fastrnn")

VARIANTS = ("resident", "tiled", "stepwise")  # every variant; a cell's launchers say which it has
GATED_VARIANTS = ("tiled", "stepwise")  # the LSTM's and GRU's: a program owns all gates of its units


def fp32_uses_tf32() -> bool:
    """Whether fp32 products run in TF32, by the flag cuDNN's RNN itself follows:
    ``torch.backends.cudnn.rnn.fp32_precision`` ("tf32" or "ieee"; "none" defers to cuDNN's, then
    to torch's ``fp32_precision``), or on a torch without those settings ``cudnn.allow_tf32``. (Reading
    ``allow_tf32`` raises once a program has set any ``fp32_precision``.)"""
    for read in _precision_readers():
        precision = read()
        if precision in ("tf32", "ieee"):
            return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


@functools.cache
def _precision_readers() -> tuple:
    """Readers of ``cudnn.rnn``'s, ``cudnn``'s and torch's ``fp32_precision`` (those this torch has),
    in that order: the getter those settings call, where it gives what they give (a few µs less per
    call), else the settings themselves."""
    backends = torch.backends
    owners = [o for o in (getattr(backends.cudnn, "rnn", None), backends.cudnn, backends)
              if o is not None and hasattr(o, "fp32_precision")]
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    names = (("cuda", "rnn"), ("cuda", "all"), ("generic", "all"))
    try:
        same = getter is not None and len(owners) == 3 and all(getter(*n) == o.fp32_precision
                                                               for n, o in zip(names, owners))
        if same:
            return tuple(functools.partial(getter, *n) for n in names)
    except Exception:  # (a name this torch does not know, or a getter otherwise unlike the settings)
        pass
    return tuple(functools.partial(getattr, o, "fp32_precision") for o in owners)


@dataclass(frozen=True)
class Config:
    variant: str
    block_b: int
    block_n: int  # hidden units per program (all of H for ``resident``)
    block_k: int  # reduction chunk of the tiled kernels
    num_warps: int = 4
    split_k: int = 1  # the tiled product's reduction cut into this many chunks, a warp's each
    # Software pipelining of the tiled kernels' K loop made them spill registers on sm_90 (static
    # count, scripts/compile_check.py); the persistent kernels run one program per SM anyway.
    num_stages: int = 1


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """The GPU's number of SMs (read once per device)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_configs(B: int, H: int, dtype: torch.dtype, device: torch.device, gates: int = 1,
                 cell: str = "elman", variants: tuple[str, ...] = VARIANTS) -> tuple[Config, ...]:
    """The candidate configurations for ``B`` sequences of ``H`` units of ``cell``, with ``gates``
    gates per unit (Elman 1, GRU 3, LSTM 4) and kernels for ``variants``, in order of preference. The
    launcher (``launch.run_sequence``) runs the first whose compiled kernel fits the GPU (at most
    ``launch.MAX_STACK`` bytes of local memory per thread, shared memory within a program's limit, a
    tiled grid resident at once); the last, the smallest stepwise tile, runs regardless. What fits is
    the compiler's to say (ptxas versions differ), so it is measured, not modelled:
    ``scripts/compile_check.py`` walks the same ladder for every shape of its sweep."""
    forced = os.environ.get("FASTRNN_VARIANT", "")
    if forced and forced not in VARIANTS:
        raise ValueError(f"FASTRNN_VARIANT must be one of {', '.join(VARIANTS)}; got {forced!r}")
    if forced and forced not in variants:
        raise ValueError(f"FASTRNN_VARIANT={forced}: the {cell} cell has no {forced} variant; its variants "
                         f"are {', '.join(variants)}")
    device = device if isinstance(device, torch.device) else torch.device(device)
    tf32 = dtype == torch.float32 and device.type == "cuda" and fp32_uses_tf32()
    return candidate_configs(B, H, dtype, device, forced, gates, tf32)


def ladder(given, B: int, H: int, like: torch.Tensor, **cell) -> tuple[Config, ...]:
    """A launcher's candidates: ``(given,)`` where it was given a configuration (of a variant the cell
    has: a ValueError else), else ``pick_configs`` for ``like``'s dtype and device (``cell``: its
    ``gates``, ``cell`` and ``variants``)."""
    if not given:
        return pick_configs(B, H, like.dtype, like.device, **cell)
    variants = cell.get("variants", VARIANTS)
    if given.variant not in variants:
        raise ValueError(f"config: the {cell.get('cell', 'elman')} cell has no {given.variant!r} variant; its "
                         f"variants are {', '.join(variants)}")
    return (given,)


def pick_config(B: int, H: int, dtype: torch.dtype, device: torch.device, gates: int = 1) -> Config:
    """The preferred configuration (the first of ``pick_configs``)."""
    return pick_configs(B, H, dtype, device, gates)[0]


# Shared memory a tiled program may fill with its w_hh rows and the (BLOCK_B, K) read of the carried
# state (an H100 program may have 227 KB; the rest stays for the products' staging and reductions).
RESIDENT_W_BYTES = 192 * 1024


@functools.lru_cache(maxsize=1024)
def candidate_configs(B: int, H: int, dtype: torch.dtype, device: torch.device, forced: str, gates: int = 1,
                  tf32: bool = True) -> tuple[Config, ...]:
    configs = _candidates(B, H, dtype, device, forced, gates, tf32)
    logger.debug("fastrnn: B=%d H=%d gates=%d %s on %s -> %s", B, H, gates, dtype, device, configs)
    return configs


def _candidates(B: int, H: int, dtype: torch.dtype, device: torch.device, forced: str, gates: int,
                tf32: bool) -> tuple[Config, ...]:
    block_h = max(16, triton.next_power_of_2(H))
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_k = 128 if itemsize == 2 else 64  # a streamed chunk of the reduction
    if device.type != "cuda":
        return (_interpreter_config(block_h, block_k, forced, gates),)
    # all of w_hh.T in one program, h in registers (Elman only): fp32 with 3xTF32 products and fp64
    # take more registers per product
    resident_limit = {8: 32, 4: 128, 2: 256}[itemsize] if gates == 1 else 0
    resident = Config("resident", 16, block_h, block_h, num_warps=4 if block_h <= 64 else 8, num_stages=3)
    if forced == "resident":
        return (resident,)
    ladder = [resident] if not forced and block_h <= resident_limit else []
    if forced != "stepwise":
        ladder += _tiled_ladder(B, H, block_h, block_k, itemsize, gates, sm_count(device))
    # the last resorts: no barrier, so no limit on the grid; the smallest tile last
    ladder += [_tiled("stepwise", 16 if B <= 16 else 32, 32, block_h, block_k, itemsize, gates, w_resident=False),
               Config("stepwise", 16, 16, min(32 if itemsize < 8 else 16, block_h), num_warps=4)]
    return tuple(dict.fromkeys(ladder))


def _tiled_ladder(B: int, H: int, block_h: int, block_k: int, itemsize: int, gates: int,
                  n_sm: int) -> list[Config]:
    """The tiled candidates: the widest batch block B needs (up to 64 rows), 16, 32 or 64 hidden
    units per program, then narrower batch blocks; each grid at most one program per SM; each tile
    with w_hh on chip where its shared memory allows, then streamed."""
    block_b = 16 if B <= 16 else (32 if B <= 32 else 64)
    tiles = [(block_b, n) for n in (16, 32, 64) if n <= block_h] + [(b, 16) for b in (32, 16) if b < block_b]
    ladder = []
    for b, n in tiles:
        if triton.cdiv(B, b) * triton.cdiv(H, n) <= n_sm:
            ladder += [_tiled("tiled", b, n, block_h, block_k, itemsize, gates, w_resident=True),
                       _tiled("tiled", b, n, block_h, block_k, itemsize, gates, w_resident=False)]
    return [c for c in ladder if c is not None]


def _tiled(variant: str, block_b: int, block_n: int, block_h: int, block_k: int, itemsize: int,
           gates: int, w_resident: bool) -> Config | None:
    """A tiled configuration: w_hh on chip (BLOCK_K covers H; None where the products' operands,
    the forward's (BLOCK_B + gates x BLOCK_N) x H and the backward's (BLOCK_B + BLOCK_N) x gates x H,
    rounded up to powers of two, exceed RESIDENT_W_BYTES), or streamed in BLOCK_K chunks; the
    reduction cut over the warps (SPLIT_K) while each chunk keeps 16 or more and the chunks'
    (BLOCK_B, BLOCK_N) sums stay small (16 KB of fp32)."""
    block_n = min(block_n, block_h)
    if w_resident:
        k_bwd = triton.next_power_of_2(gates * block_h)
        operands = max((block_b + gates * block_n) * block_h, (block_b + block_n) * k_bwd) * itemsize
        if operands > RESIDENT_W_BYTES:
            return None
        block_k = block_h
    block_k = min(block_k, block_h)
    num_warps = 8 if block_b * block_n >= 1024 or block_b * block_k >= 16384 else 4
    split_k = max(1, min(num_warps, block_k // 16, 4096 // (block_b * block_n)))
    return Config(variant, block_b, block_n, block_k, num_warps=num_warps, split_k=split_k)


def gated_tile_kwargs(config: Config, H: int, K: int) -> dict:
    """The block constexprs of a gated cell's tiled kernel whose product reduces over K (H in the
    forward; all gates' H in the backward): ``config.block_k`` chunks H, and where it covers H,
    w_hh stays on chip, all K of it. Every chunk a product reduces over (BLOCK_K // SPLIT_K) keeps
    16 or more, as ``tl.dot`` requires: a K below 16 (H = 1, a proj_size below 16) is padded, masked."""
    resident = config.block_k >= H
    block_k = max(16, triton.next_power_of_2(K)) if resident else config.block_k
    return dict(BLOCK_B=config.block_b, BLOCK_N=config.block_n, SPLIT_K=max(1, min(config.split_k, block_k // 16)),
                BLOCK_K=block_k, W_RESIDENT=resident, num_warps=config.num_warps, num_stages=config.num_stages)


# Triton's largest block (TRITON_MAX_TENSOR_NUMEL): the interpreter refuses any bigger tensor.
MAX_NUMEL = 1 << 20


def _interpreter_config(block_h: int, block_k: int, forced: str, gates: int = 1) -> Config:
    """The configuration for CPU tensors under ``TRITON_INTERPRET=1``. Its programs run one after
    another, so no program may wait on another: one program covers all of H per batch block. Every
    block stays within MAX_NUMEL; the largest is the (BLOCK_K, BLOCK_N) tile of w_hh. ``resident``
    (BLOCK_K = H) where that fits, else ``tiled`` with a K loop."""
    if forced == "stepwise":
        return Config("stepwise", 16, 16, 16)
    fits = gates * block_h * block_h <= MAX_NUMEL  # the backward's (gates x H, H) block of w_hh
    if gates == 1 and (forced == "resident" or (not forced and fits)):
        return Config("resident", 16, block_h, block_h)
    return Config("tiled", 16, block_h, block_h if fits else min(block_k, MAX_NUMEL // block_h))


def dtype_flags(dtype: torch.dtype, device: torch.device, fast: bool = False) -> dict:
    """Accumulator dtype and tl.dot precision: fp32 products use TF32 exactly when cuDNN's RNN does
    (``fp32_uses_tf32``), and else 3xTF32
    (fp32's precision from the tensor cores). With ``fast``, FAST: the hardware's approximate tanh
    on the paths whose products are TF32, bf16 or fp16 anyway."""
    import triton.language as tl

    acc = tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32
    tf32 = dtype == torch.float32 and device.type == "cuda" and fp32_uses_tf32()
    flags = {"ACC_DTYPE": acc, "PRECISION": "tf32" if tf32 else "tf32x3"}
    if fast:
        flags["FAST"] = tf32 or dtype in (torch.float16, torch.bfloat16)
    return flags
