"""What every launcher checks of the tensors it is given: the shapes, dtypes and devices its kernels
rely on. A kernel reads each tensor through the shape, strides and dtype its launch was built for,
so a wrong one would read garbage or out of bounds: a clear error instead. Each cell's launchers call
``expect_operands`` where a launch's key is not kept yet (``launch.find_kept``): a warm call, whose
operands have the signature of ones that passed, checks nothing.
"""

from __future__ import annotations

import torch

from ..sequence import FLOATS, check_floating

INTEGERS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)  # what lengths may be


def expect_sequence(name: str, x: torch.Tensor, gates: int = 1) -> tuple[int, int, int]:
    """``(T, B, N)`` of ``x``, a ``(T, B, gates * N)`` tensor named ``name`` in one of ``FLOATS``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[2] % gates != 0:
        units = f"{gates}H" if gates > 1 else "H"
        raise ValueError(f"{name} must be (T, B, {units}), got shape {tuple(x.shape)}")
    check_floating(name, x)
    T, B, G = x.shape
    return T, B, G // gates


def expect_operands(name: str, x: torch.Tensor, lengths=None, resets=None, converted=(), **operands) -> None:
    """Each of ``operands`` (``w_hh=(tensor or None, shape)``, ...) of its shape, in ``x``'s dtype
    (those ``converted`` by the launcher itself: any of ``FLOATS``) and on its device; ``lengths
    (B,)`` integer and ``resets (T, B)`` bool there, never both. ``x (T, B, ...)`` is named ``name``."""
    expect_tensors(lengths=lengths, resets=resets, **{other: t for other, (t, _) in operands.items()})
    T, B = x.shape[:2]
    dtype, device = x.dtype, x.device
    for other, (t, shape) in operands.items():
        if t is None:
            continue
        if t.shape != shape:
            raise ValueError(f"{other} must be {tuple(shape)} for {name} {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != dtype and not (other in converted and t.dtype in FLOATS):
            raise TypeError(f"{other} dtype {t.dtype} does not match {name} dtype {dtype}")
        if t.device != device:
            raise ValueError(f"{other} is on {t.device} but {name} is on {device}")
    if lengths is not None:
        if lengths.shape != (B,) or lengths.dtype not in INTEGERS or lengths.device != device:
            raise ValueError(f"lengths must be an integer ({B},) tensor on {device}, got "
                             f"{lengths.dtype} {tuple(lengths.shape)} on {lengths.device}")
    if resets is not None:
        if resets.shape != (T, B) or resets.dtype != torch.bool or resets.device != device:
            raise ValueError(f"resets must be a bool ({T}, {B}) tensor on {device}, got "
                             f"{resets.dtype} {tuple(resets.shape)} on {resets.device}")
        if lengths is not None:
            raise ValueError("lengths and resets cannot be given together")


def expect_tensors(**named) -> None:
    """Each of ``named`` a tensor or None."""
    for name, t in named.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
