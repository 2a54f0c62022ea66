"""Which path a call runs on, chosen once for every cell: ``FASTRNN_BACKEND=auto|triton|torch``.

``torch``: the cells' PyTorch twins of the kernels' loops (the CPU path); ``triton``: the fused
kernels of ``fastrnn.kernels`` (on CPU tensors only under ``TRITON_INTERPRET=1``); ``auto`` (the
default): ``triton`` for CUDA tensors, ``torch`` otherwise, where a module's plain fp32/fp64 call on
the CPU (no resets, not compiled) runs torch's own module instead (``torch_module_runs``): the same
results as the twins within the tests' tolerances, at torch's speed on the CPU. A cell's op is given
the backend as named (``requested_backend``), ``auto`` included, and picks its loop for the tensors
it runs on (``backend_on``): a traced or exported graph runs on whatever device it is given.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from typing import Callable

import torch

from .op import own_precision

BACKENDS = ("auto", "triton", "torch")


def environ(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, read at every call (users and tests change it between
    calls), without the KeyError that ``os.environ`` raises and catches inside for every unset name
    (0.9 µs against 0.2, and every op call reads ``FASTRNN_BACKEND`` and ``FASTRNN_VARIANT``, unset
    in most programs) and without encoding the name again: the names fastrnn reads are encoded once,
    at import (``_ENCODED``). Another name, or an ``os.environ`` that is not CPython's mapping over
    encoded names: its ``get``."""
    env = os.environ
    try:
        value = env._data.get(_ENCODED[name])
    except (KeyError, AttributeError):
        return env.get(name, default)
    return default if value is None else env.decodevalue(value)


# The names read at every call, each as os.environ keys it (a dict filled at import: one that grew
# under torch.compile would make Dynamo guard on it and compile again)
_ENCODED = {name: os.environ.encodekey(name) for name in ("FASTRNN_BACKEND", "FASTRNN_VARIANT", "TRITON_INTERPRET")
            if hasattr(os.environ, "encodekey")}


def memo(fn):
    """``fn`` with its result kept per arguments, for functions of a few distinct arguments asked at
    every call. (A dict of its own, not ``functools.cache``: Dynamo warns at every such cache it
    traces, as it cannot tell whether the cache goes stale. Dynamo takes its result as a constant
    rather than reading the dict, whose every new entry would make it compile again.)"""
    results = {}

    def cached(*args):
        try:
            return results[args]
        except KeyError:
            value = results[args] = fn(*args)
            return value

    cached = functools.update_wrapper(cached, fn)
    cached._dynamo_marked_constant = True  # torch.compiler.assume_constant_result's mark (which imports Dynamo)
    return cached


def requested_backend() -> str:
    """``FASTRNN_BACKEND`` as given (``auto`` when unset or empty), checked."""
    backend = environ("FASTRNN_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"FASTRNN_BACKEND must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


def get_backend(device: torch.device) -> str:
    """The backend a tensor on ``device`` runs on, from ``FASTRNN_BACKEND``."""
    if device_type(device) == "meta":  # shapes only: the twins' fake implementations
        return "torch"
    return backend_on(requested_backend(), device)


def backend_on(backend: str, device: torch.device) -> str:
    """The loop an op called with ``backend`` runs on tensors on ``device``. The ops are given the
    backend as ``FASTRNN_BACKEND`` names it (``requested_backend``), ``auto`` included, which a traced
    or exported graph keeps: picked here, for the tensors a call is given, a graph traced on a GPU
    runs on the CPU's twins and one exported on the CPU on the GPU's kernels. ``auto``: the kernels on
    CUDA where triton imports, else the twins; ``triton``: the kernels where they can run (CUDA, or
    the interpreter), else an error; any other, the twins."""
    kind = device_type(device)
    if backend == "auto":
        return "triton" if kind == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("FASTRNN_BACKEND=triton but triton is not installed")
        if kind != "cuda" and environ("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(f"the triton backend (FASTRNN_BACKEND=triton, or a graph traced with it) on {kind} "
                               "tensors needs TRITON_INTERPRET=1 (set before importing fastrnn), or CUDA tensors")
    return backend


def torch_module_runs(x: torch.Tensor, resets) -> bool:
    """Whether a module's call on ``x`` runs torch's own module: under ``auto``, for fp32/fp64 CPU
    tensors (complex ones too, which only torch's module computes), without resets, outside
    torch.compile (which keeps the fused ops in its graph). (A GPU tensor is told by its flag,
    without reading the environment.)"""
    return (x.is_cpu and resets is None and x.dtype in _TORCH_MODULE_DTYPES
            and requested_backend() == "auto" and not torch.compiler.is_compiling())


_TORCH_MODULE_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


@memo
def device_type(device: torch.device) -> str:
    """``device.type``, kept per device (``torch.device.type`` makes a new string at every read: 0.4 to
    0.7 µs, where the lookup here is 0.2, and every call reads it twice)."""
    return device.type


@memo
def triton_available() -> bool:
    """Whether triton imports (asked once: a module's every call asks)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def loop(backend: str, kernels: str, name: str, twin: Callable) -> Callable:
    """The loop a custom op runs: the launcher ``fastrnn.kernels.<kernels>.<name>`` on ``triton``,
    else ``twin``, its PyTorch twin (imported on first use: triton is optional); with autocast off,
    as the op decides its precision itself."""
    if backend == "triton":
        with _IMPORTING:  # (threads' first calls: one imports the kernels while the others wait)
            launchers = importlib.import_module(f"fastrnn.kernels.{kernels}")
        return own_precision(getattr(launchers, name))
    return own_precision(twin)


# Held while a loop imports its kernels: threads whose first calls run different cells at once would
# each import the package ``fastrnn.kernels``, half-initialised by the other ("partially initialized
# module", a deadlock on its import lock).
_IMPORTING = threading.Lock()
