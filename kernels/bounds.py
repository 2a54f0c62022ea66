"""Checked memory accesses under the Triton interpreter: ``FASTRNN_CHECK_BOUNDS=1`` with
``TRITON_INTERPRET=1`` (the tests set both).

Every load, store and atomic a kernel makes is checked, element by element where its mask is on,
to lie inside one of the buffers its launch was given (the storages of its tensor arguments). One
that does not raises ``IndexError`` naming the kernel, the address and the nearest buffer, so an
out-of-bounds access fails loudly, where unchecked it would read garbage or corrupt the heap (and
on a GPU read or write another allocation).
"""

from __future__ import annotations

import numpy as np
from triton.runtime import interpreter

_buffers: list[tuple[int, int, str]] = []  # (first byte, one past the last, argument) of the launch
_kernel: list[str] = [""]
_installed: list[bool] = []


def check_bounds() -> None:
    """Install the checks into the interpreter (once)."""
    if _installed:
        return
    _installed.append(True)
    executor, builder = interpreter.GridExecutor, interpreter.interpreter_builder
    init_args, restore_args = executor._init_args_hst, executor._restore_args_dev

    def watched_init(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        names = self.arg_names
        named = list(zip(names, args_hst)) + list(kwargs_hst.items())
        _buffers[:] = [_extent(name, t) for name, t in named if hasattr(t, "untyped_storage")]
        _kernel[0] = getattr(self.fn, "__name__", "kernel")
        return args_hst, kwargs_hst

    def watched_restore(self, *args):
        _buffers.clear()
        return restore_args(self, *args)

    executor._init_args_hst, executor._restore_args_dev = watched_init, watched_restore
    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def checked_load(ptrs, mask, other, cache_policy, is_volatile):
        _check(ptrs, mask, "load")
        return load(ptrs, mask, other, cache_policy, is_volatile)

    def checked_store(ptrs, value, mask, cache_policy):
        _check(ptrs, mask, "store")
        return store(ptrs, value, mask, cache_policy)

    def checked_rmw(op, ptr, val, mask, sem, scope):
        _check(ptr, mask, "atomic")
        return rmw(op, ptr, val, mask, sem, scope)

    def checked_cas(ptr, cmp, val, sem, scope):
        _check(ptr, None, "atomic")
        return cas(ptr, cmp, val, sem, scope)

    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = checked_rmw, checked_cas


def _extent(name: str, t) -> tuple[int, int, str]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes(), name


def _check(ptrs, mask, what: str) -> None:
    """Raise IndexError unless every address of ``ptrs`` whose ``mask`` is on lies in a buffer."""
    if not _buffers:  # not inside a launch (or a launch without tensors)
        return
    addresses = np.asarray(ptrs.data, dtype=np.uint64)
    if mask is not None:
        addresses = addresses[np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)]
    addresses = addresses.reshape(-1)
    if addresses.size == 0:
        return
    size = np.uint64(max(1, ptrs.get_element_ty().primitive_bitwidth // 8))
    inside = np.zeros(addresses.shape, dtype=bool)
    for first, end, _ in _buffers:
        inside |= (addresses >= np.uint64(first)) & (addresses + size <= np.uint64(end))
    if inside.all():
        return
    bad = int(addresses[~inside][0])
    first, end, name = min(_buffers, key=lambda b: min(abs(bad - b[0]), abs(bad - b[1])))
    where = f"{bad - end} bytes past the end of" if bad >= end else f"{first - bad} bytes before"
    raise IndexError(f"{_kernel[0]}: out-of-bounds {what} at 0x{bad:x}, {where} {name} "
                     f"([0x{first:x}, 0x{end:x}))")
