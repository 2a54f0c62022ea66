"""Which kernel variant and block sizes a shape gets. One place, cached per shape and device.

- ``resident``: one program per batch block holds all of ``w_hh`` (small H); no program waits.
- ``tiled``: hidden units split over programs, a grid barrier per step, one launch per sequence.
  Every program of the grid must be resident at once, so the grid is kept to one program per SM.
  ``block_k >= H`` means each program's rows of ``w_hh`` stay on chip (``W_RESIDENT``).
- ``stepwise``: the tiled kernel launched once per step (no barrier): for shapes whose grid cannot
  be resident at once (very large B and H). Slow, always correct.

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

logger = logging.getLogger("fastrnn")

VARIANTS = ("resident", "tiled", "stepwise")


@dataclass(frozen=True)
class Config:
    variant: str
    block_b: int
    block_n: int  # hidden units per program (all of H for ``resident``)
    block_k: int  # reduction chunk of the tiled kernels
    num_warps: int = 4
    # Software pipelining of the tiled kernels' K loop made them spill registers on sm_90 (static
    # count, tests/compile_check.py); the persistent kernels run one program per SM anyway.
    num_stages: int = 1


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(B: int, H: int, dtype: torch.dtype, device: torch.device) -> Config:
    forced = os.environ.get("FASTRNN_VARIANT", "")
    if forced and forced not in VARIANTS:
        raise ValueError(f"FASTRNN_VARIANT must be one of {', '.join(VARIANTS)}; got {forced!r}")
    config = _pick_config(B, H, dtype, torch.device(device), forced)
    logger.debug("fastrnn: B=%d H=%d %s on %s -> %s", B, H, dtype, device, config)
    return config


@functools.lru_cache(maxsize=256)
def _pick_config(B: int, H: int, dtype: torch.dtype, device: torch.device, forced: str) -> Config:
    block_h = max(16, triton.next_power_of_2(H))
    block_b = 16
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_k = 16 if dtype == torch.float64 else (64 if itemsize >= 4 else 128)

    if device.type != "cuda":  # the interpreter: programs of one batch block must not wait on others
        if forced == "stepwise":
            return Config("stepwise", block_b, 16, 16)
        if forced == "tiled":
            return Config("tiled", block_b, block_h, min(block_k, block_h))
        return Config("resident", block_b, block_h, block_h)

    resident_limit = {8: 32, 4: 128, 2: 256}.get(itemsize, 128)
    if forced == "resident" or (not forced and block_h <= resident_limit):
        return Config("resident", block_b, block_h, block_h, num_warps=4 if block_h <= 128 else 8,
                      num_stages=3)

    n_sm = _sm_count(device)
    block_n_choices = (16,) if dtype == torch.float64 else (16, 32, 64, 128)
    if forced != "stepwise":
        for block_b in (min(64, max(16, triton.next_power_of_2(B))), 128):
            n_b = triton.cdiv(B, block_b)
            for block_n in block_n_choices:
                if block_n > block_h:
                    break
                if n_b * triton.cdiv(H, block_n) <= n_sm:
                    # Each program keeps its BLOCK_N rows of w_hh on chip (BLOCK_K = H) where the
                    # (BLOCK_B, H) tile of h_{t-1} still fits without spilling, else it streams
                    # w_hh through L2 in a K loop. 8 warps for the big tiles: 4 spill registers
                    # on sm_90 (both measured statically with tests/compile_check.py).
                    # tl.dot stages both operands in shared memory: (BLOCK_B + BLOCK_N) x H of them
                    w_resident = (dtype != torch.float64 and block_b <= 32
                                  and block_b * block_h <= (32768 if block_b == 16 else 16384)
                                  and (block_b + block_n) * block_h * itemsize <= 160 * 1024)
                    big = block_b >= 64 or (w_resident and block_b * block_h >= 16384)
                    return Config("tiled", block_b, block_n, block_h if w_resident else min(block_k, block_h),
                                  num_warps=8 if big else 4)
    logger.debug("fastrnn: B=%d H=%d does not fit %d resident programs: one launch per step", B, H, n_sm)
    return Config("stepwise", 64, min(64, block_h), min(32 if dtype != torch.float64 else 16, block_h),
                  num_warps=8)


def dtype_flags(dtype: torch.dtype, device: torch.device) -> dict:
    """Accumulator dtype and tl.dot precision: fp32 products use TF32 exactly when
    ``torch.backends.cudnn.allow_tf32`` is on, as ``torch.nn.RNN`` (cuDNN) does."""
    import triton.language as tl

    acc = tl.float64 if dtype == torch.float64 else tl.float32
    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return {"ACC_DTYPE": acc, "PRECISION": "tf32" if tf32 else "ieee"}
