"""How a recurrence kernel runs over a sequence, for every cell: the variants of ``config.py``.

- ``resident``: one launch; no program waits on another.
- ``tiled``: one launch whose programs meet at a grid barrier after each step. A barrier is only safe
  if every program of the grid is on the GPU at once, so the launch is cooperative: the driver
  schedules the whole grid together or refuses it (it never leaves programs spinning for others that
  cannot start because other work holds the SMs). Before that, the compiled kernel's occupancy
  (registers, shared memory, warps) times the SM count read at run time must cover the grid. Where
  either says no, the sequence runs ``stepwise`` instead, with a warning.
- ``stepwise``: the same kernel once per step, without the barrier: always safe, slower.

A tiled kernel's last runtime arguments are ``sync_ptr, step_begin, n_steps`` (its arrival counters
and the steps this launch runs) and it takes a ``SYNC`` constexpr: ``tiled_arguments`` adds them.

Which configuration runs: ``config.pick_configs`` lists candidates in order of preference and
``choose`` takes the first whose compiled kernel fits (``fits_gpu``: local memory, shared memory,
co-residency), so a tiled kernel that spills registers with this machine's compiler is never
launched, whatever its ptxas version.
``scripts/compile_check.py`` walks the same ladder with its own measure, compiling for sm_90 on a CPU.

What a warm call does on the host: the choice is kept per launch (``PLANS``, whatever T), and the
built launch per signature of the tensors its call was given (``KEPT``: shapes, strides, dtypes,
devices, alignment; ``find_kept``); a call whose tensors match puts them into the kept arguments and
launches, building nothing and checking nothing (a launcher checks its operands where their
signature is not kept yet, so every launch kept has passed them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import os
import threading

import torch

from ..backend import device_type, environ
from ..sequence import acc_dtype, carried_copy
from . import config

logger = logging.getLogger("fastrnn")

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# sm_90 (H100, H200) per-SM limits, from NVIDIA's occupancy calculator (cuda_occupancy.h)
REGS_PER_SM, REG_UNIT, SUB_PARTITIONS = 65536, 256, 4  # registers allocated per warp in 256s
MAX_WARPS_PER_SM, MAX_PROGRAMS_PER_SM = 64, 32
SHARED_PER_SM, SHARED_PER_PROGRAM, SHARED_RESERVED, SHARED_UNIT = 233472, 232448, 1024, 128


def run_sequence(build, ladder, T: int, device, phases=({},), *, found, operands) -> None:
    """Run a cell's kernel over all T steps with the first of the configurations ``ladder()`` gives
    (in order of preference: ``config.pick_configs``) whose compiled kernel fits the GPU;
    ``build(config)`` gives its ``(kernel, grid, args, kwargs)``. A kernel whose step has parts that
    all programs must finish before the next starts (an LSTM's projection) meets at a barrier between
    them when tiled; stepwise, it is launched once per part, each with its ``phases`` entry added to
    its constexprs.

    The choice (and whether the driver takes the tiled grid cooperatively) is made at a launch's first
    call and kept (``PLANS``); the built launch is kept too (``kept_launch``), per key (``found``: the
    key and its kept launch, or None, from ``find_kept``): a warm call puts its tensors
    (``operands(config)``: those ``build(config)`` passes, None where absent) into it and launches,
    and asks ``ladder`` nothing. Under the interpreter, one call at a time: Triton's interpreter patches
    ``triton.language`` for each launch, which another thread's launch would find patched."""
    if INTERPRETED:
        with _INTERPRETER:
            return _run_sequence(build, ladder, T, device, phases, found, operands)
    return _run_sequence(build, ladder, T, device, phases, found, operands)


_INTERPRETER = threading.Lock()  # held by a launch under the interpreter


def _run_sequence(build, ladder, T: int, device, phases, found, operands) -> None:
    plan, (kernel, grid, args, kwargs) = kept_launch(build, ladder, device, phases, found, operands)
    if plan.config.variant == "resident":
        kernel[grid](*args, **kwargs)
        return
    sync = arrival_counters(grid[0], device)
    if plan.config.variant == "tiled" and plan.cooperative is not False:
        coop_args, coop_kwargs = tiled_arguments(args, kwargs, sync, 0, T, cooperative=True)
        plan.cooperative = _launch_cooperative(kernel, grid, coop_args, coop_kwargs, device, plan.cooperative)
        if plan.cooperative:
            return
    for s in range(T):
        for phase in phases:
            step_args, step_kwargs = tiled_arguments(args, kwargs, sync, s, 1, cooperative=False)
            kernel[grid](*step_args, **step_kwargs, **phase)


class Plan:
    """What a launch runs: its configuration, and whether the driver takes its tiled grid
    cooperatively (None until its first tiled launch tells)."""

    def __init__(self, config) -> None:
        self.config, self.cooperative = config, None


PLANS: dict = {}  # launch key (``launch_key``) -> Plan, the oldest first
KEPT: dict = {}  # (launcher's key, device, flags, tensors' signature) -> Kept, the oldest first
MAX_KEPT = 4096  # entries of each (a server seeing many shapes and lengths: the oldest go)


def forget() -> None:
    """Drop every kept plan and launch (tests start from none)."""
    PLANS.clear()
    KEPT.clear()


def kept_plan(build, configs, device, phases=({},)):
    """``(plan, launch)``: the kept plan of this launch and its ``(kernel, grid, args, kwargs)``, or
    at its first call the ``choose`` of ``configs``, kept."""
    first = build(configs[0])
    key = launch_key(configs, first, device)
    plan = PLANS.get(key)
    if plan is None:
        chosen, launch = choose(build, configs, lambda plans: fits_gpu(plans, device), phases, first)
        plan = keep(PLANS, key, Plan(chosen))
        return plan, launch
    return plan, (first if plan.config == configs[0] else build(plan.config))


def find_kept(launcher, device, given, check) -> tuple:
    """``(key, the launch kept for it or None)``, looked up once per call. The key: ``launcher`` (what
    ``build`` and ``ladder`` read besides the tensors: the launcher's name, flags and given
    configuration), the device, the forced variant (``FASTRNN_VARIANT``), the precision of fp32
    products on a GPU (``config.dtype_flags`` reads it into the constexprs) and the signature of the
    tensors the call was ``given``: everything ``pick_configs`` and the launch read. (Not of the
    buffers the launcher makes from them, outputs and scratch: fresh, so aligned, and shaped and
    typed by the given ones.) At a key not kept (a launch's first call, or one whose operands differ
    from every kept one's), ``check(*given)`` first: the launcher's checks of its operands, which a
    kept key has passed (the signature holds each one's shape, dtype and device). Where an operand has
    no signature (not a tensor, or one without data), ``check(*given)`` names it if it can."""
    tf32 = device_type(device) == "cuda" and config.fp32_uses_tf32()
    try:
        key = (launcher, device, tf32, environ("FASTRNN_VARIANT"), signature(given))
    except (AttributeError, RuntimeError):
        check(*given)
        raise
    kept = KEPT.get(key)
    if kept is None:
        check(*given)
    return key, kept


def kept_launch(build, ladder, device, phases, found, operands):
    """``(plan, launch)`` as ``kept_plan`` gives them for the candidates ``ladder()``, the launch
    rebound from the one kept for the key (``found``: the key and that launch, or None, as
    ``find_kept`` looked them up), which holds everything ``pick_configs`` reads, so a kept launch's
    candidates would be the same: they are asked for at a miss only. (Code that changes the
    candidates otherwise, patching ``pick_configs`` or its constants, calls ``forget()``.)"""
    key, kept = found
    if kept is not None:
        return kept.plan, kept.launch(operands(kept.plan.config), build)
    plan, launch = kept_plan(build, ladder(), device, phases)
    keep(KEPT, key, Kept(plan, launch, operands(plan.config)))
    return plan, launch


def keep(cache: dict, key, value):
    """``cache[key] = value``, the oldest entry dropped first where ``cache`` holds MAX_KEPT."""
    if len(cache) >= MAX_KEPT:
        try:
            cache.pop(next(iter(cache)), None)
        except (RuntimeError, StopIteration):  # another thread changed it meanwhile
            pass
    cache[key] = value
    return value


def signature(tensors) -> tuple:
    """What a launch reads of its tensors besides their data, and what its checks read: shape,
    strides, dtype, device, and whether the pointer is 16-byte aligned (Triton compiles aligned
    pointers apart); None for an absent one."""
    return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)
                  for t in tensors])


class Kept:
    """A launch as built at its key's first call, its tensors left out: the place of each tensor
    argument (they come first, as every launcher passes them) among the call's ``operands``. A warm
    call with tensors of the same signature puts them in: its integers (shapes, strides, T) and
    constexprs are the same. (Where two operands were one tensor, an argument is none of them, or a
    tensor comes after another argument, each call builds its launch.)"""

    def __init__(self, plan, launch, operands) -> None:
        self.plan = plan
        self.kernel, self.grid, args, self.kwargs = launch
        places = {id(t): i for i, t in enumerate(operands) if t is not None}
        n = sum(isinstance(a, torch.Tensor) for a in args)
        distinct = len(places) == sum(t is not None for t in operands)
        self.slots = None  # each tensor argument's index among the operands, where rebindable
        if distinct and all(isinstance(a, torch.Tensor) and id(a) in places for a in args[:n]):
            self.slots = tuple(places[id(a)] for a in args[:n])
            self.take, self.rest = _gather(self.slots), tuple(args[n:])  # (no tensor kept alive)

    def launch(self, operands, build):
        """``(kernel, grid, args, kwargs)`` with this call's ``operands``."""
        if self.slots is None:
            return build(self.plan.config)
        return self.kernel, self.grid, (*self.take(operands), *self.rest), self.kwargs


def _gather(indices: tuple):
    """``operands -> tuple(operands[i] for i in indices)``, at C speed."""
    if len(indices) == 1:
        return lambda operands: (operands[indices[0]],)
    return operator.itemgetter(*indices) if indices else (lambda operands: ())


def launch_key(configs, launch, device) -> tuple:
    """What a launch's choice depends on: the candidates, the device, the grid, the constexprs and
    every argument but the tensors' data and the sequence length T (the kernels' first int argument,
    never specialised)."""
    kernel, grid, args, kwargs = launch
    shape, length_seen = [], False
    for a in args:
        if isinstance(a, torch.Tensor):  # (Triton compiles 16-byte aligned pointers apart)
            shape.append((a.dtype, a.stride(), a.data_ptr() % 16 == 0))
        elif type(a) is int and not length_seen:
            length_seen = True
        else:
            shape.append(a)
    return configs, str(device), id(kernel), grid, tuple(sorted(kwargs.items())), tuple(shape)


def choose(build, configs, fits, phases=({},), first=None):
    """``(config, build(config))`` for the first of ``configs`` whose compiled kernels ``fits``
    accepts (``fits(plans)``, plans from ``launch_plans``); the last runs regardless, and under the
    interpreter the first (nothing is compiled there). ``first``: ``build(configs[0])``, if made."""
    for i, candidate in enumerate(configs):
        launch = first if i == 0 and first is not None else build(candidate)
        if INTERPRETED or i == len(configs) - 1 or fits(launch_plans(candidate, launch, phases)):
            return candidate, launch
        logger.info("fastrnn: %s does not fit the GPU (local memory, shared memory or co-residency); "
                    "trying %s", candidate, configs[i + 1])
    raise ValueError("no configuration to choose from")


def launch_plans(candidate, launch, phases=({},)) -> list[tuple]:
    """``[(variant, kernel, grid, args, kwargs)]``: each distinct kernel the run compiles first; for a
    tiled configuration its cooperative launch (the stepwise fallback compiles only if needed)."""
    kernel, grid, args, kwargs = launch
    if candidate.variant == "resident":
        return [(candidate.variant, kernel, grid, args, kwargs)]
    sync = arrival_counters(grid[0], args[0].device)  # the operands' device (meta in compile checks)
    cooperative = candidate.variant == "tiled"
    a, kw = tiled_arguments(args, kwargs, sync, 0, 2, cooperative)
    return [(candidate.variant, kernel, grid, a, {**kw, **phase}) for phase in ([{}] if cooperative else phases)]


# Local memory per thread a launched kernel may use: 64 bytes, a few words ptxas parks there (seen
# with registers to spare, and at the smallest tiles of the gated cells), which stay in L1. Register
# pressure shows as hundreds of bytes re-read at every step: such a candidate is passed over.
MAX_STACK = 64
_VERDICTS: dict = {}  # id(compiled kernel) -> (compiled kernel, whether it fits)


def fits_gpu(plans, device) -> bool:
    """Whether each planned kernel, compiled for this GPU, keeps within MAX_STACK of local memory,
    loads (its shared memory within a program's limit) and, tiled, has every program of its grid
    resident at once."""
    for variant, kernel, grid, args, kwargs in plans:
        compiled = kernel.warmup(*args, grid=grid, **kwargs)
        if id(compiled) not in _VERDICTS:
            _VERDICTS[id(compiled)] = (compiled, compiled_fits(compiled, variant, grid, device))
        if not _VERDICTS[id(compiled)][1]:
            return False
    return True


def compiled_fits(compiled, variant: str, grid, device) -> bool:
    from triton.runtime.errors import OutOfResources

    try:
        compiled._init_handles()  # loads it: fails on too much shared memory
    except OutOfResources:
        return False
    if compiled.n_spills * 4 > MAX_STACK:  # n_spills: local memory in 4-byte words
        return False
    per_sm = programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared)
    return per_sm > 0 and (variant != "tiled" or math.prod(grid) <= per_sm * config.sm_count(torch.device(device)))


def resets_operand(resets: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``resets (T, B)`` as the kernels read it: the bool tensor itself, or in fp64 a copy as int32.
    (Triton 3.6 sizes an fp64 product's operands by the narrowest type in what feeds them, masks
    included: a mask from an 8-bit load asks for an fp64 MMA it does not have, and the kernel fails to
    compile.)"""
    if resets is None or dtype != torch.float64:
        return resets
    return resets.to(torch.int32)


def gradient_operand(g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A gradient ``g`` as a backward kernel reads it: in ``dtype``, each row (its last dimension)
    contiguous and its other strides as they are. So a batch-first model's ``dy`` (``(T, B, H)`` with
    strides ``(H, T * H, 1)``) and the half of a bidirectional layer's that is its direction's are
    read where they lie; a copy only where a row is not contiguous (a gradient expanded from a sum,
    stride 0). None stays None (no gradient reached it)."""
    if g is None:
        return None
    g = g.to(dtype)
    return g if g.stride(-1) == 1 or g.size(-1) <= 1 else g.contiguous()


def h0_product(h0: torch.Tensor | None, w_hh: torch.Tensor) -> torch.Tensor | None:
    """``h0 @ w_hh.T`` (B, G x H) in the accumulator's precision, once per call: what stands for
    ``h_{t-1} @ w_hh.T`` at each sequence's first step in the tiled kernels. None without h0."""
    if h0 is None:
        return None
    acc = acc_dtype(h0.dtype)
    return (h0.to(acc) @ w_hh.to(acc).T).contiguous()


def carried_state(initial: torch.Tensor | None, like: torch.Tensor, B: int, N: int, runs: bool) -> torch.Tensor:
    """The state a gated kernel carries and writes, ``(B, N)`` in the accumulator's precision. Where
    the kernel ``runs``, a buffer left as allocated: its first launch starts from ``initial`` (or zeros)
    itself, so no torch launch fills it; a later launch (stepwise) from what the one before wrote.
    Where it does not run (no step or no row), the final state is ``initial`` (whatever its layout),
    copied, or zeros."""
    return final_output(initial, like, B, N, runs, dtype=acc_dtype(like.dtype))


def final_output(initial: torch.Tensor | None, like: torch.Tensor, B: int, N: int, runs: bool,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """A final state the kernel stores at each sequence's last step, ``(B, N)`` in ``dtype`` (``like``'s
    where not given: as the steps of the output it is one of): a buffer left as allocated where the
    kernel ``runs``; else (no step or no row) ``initial`` (whatever its layout) copied, or zeros."""
    dtype = dtype or like.dtype
    if runs:
        return like.new_empty(B, N, dtype=dtype)
    if initial is None:
        return like.new_zeros(B, N, dtype=dtype)
    return carried_copy(initial, dtype)


COUNTERS: dict = {}  # device index -> int32 arrival counters of its default stream, reused launch after launch


def arrival_counters(n_groups: int, device) -> torch.Tensor:
    """The grid barrier's int32 counter of each group of programs that meet: 0 (or 0x80000000). On a
    GPU one buffer per device serves every launch on its default stream (after each barrier a counter
    is back at 0 or 0x80000000, which the barrier starts from alike; launches on one stream never
    overlap). Other streams, CUDA graph capture and torch.compile's graph warm-ups among them (which
    allocate from a graph's private pool), get fresh zeros each launch."""
    device = torch.device(device)
    if device_type(device) != "cuda":
        return torch.zeros(n_groups, dtype=torch.int32, device=device)
    key = device.index if device.index is not None else torch.cuda.current_device()
    if not on_default_stream(key):
        return torch.zeros(n_groups, dtype=torch.int32, device=device)
    counters = COUNTERS.get(key)
    if counters is None or counters.numel() < n_groups:
        counters = COUNTERS[key] = torch.zeros(max(n_groups, 64), dtype=torch.int32, device=device)
    return counters[:n_groups]


def on_default_stream(index: int) -> bool:
    """Whether GPU ``index``'s current stream is its default stream: the streams' ``(id, device,
    type)`` compared, as ``torch.cuda.Stream`` compares them, without making two Stream objects in
    Python at every launch (where this torch lacks the getters, through those objects)."""
    current, default = _STREAM_GETTERS
    if current is None or default is None:
        return torch.cuda.current_stream(index) == torch.cuda.default_stream(index)
    return current(index) == default(index)


_STREAM_GETTERS = (getattr(torch._C, "_cuda_getCurrentStream", None), getattr(torch._C, "_cuda_getDefaultStream", None))


def on_device(t: torch.Tensor):
    """The context a kernel launches in: on ``t``'s GPU (``torch.cuda.device_of``: a kernel launches on
    the current GPU, which must be the tensors'); none where that GPU is the current one already, or
    ``t`` is not on a GPU (entering and leaving ``device_of`` runs some 20 lines of torch's Python).
    Called after the launcher has made a tensor on that GPU: torch's CUDA 12 builds may report a GPU
    as current before its context is (``torch.cuda.set_device`` of an unused GPU), and making a
    tensor there switches the context too, as entering ``device_of`` would have."""
    if not t.is_cuda or t.get_device() == torch.cuda.current_device():
        return _NO_CONTEXT
    return torch.cuda.device_of(t)


_NO_CONTEXT = contextlib.nullcontext()


def tiled_arguments(args, kwargs, sync, step_begin: int, n_steps: int, cooperative: bool):
    """The arguments of one tiled launch running steps [step_begin, step_begin + n_steps): with a
    grid barrier and a cooperative launch, or one step without."""
    kwargs = dict(kwargs, SYNC=cooperative)
    if cooperative:
        kwargs["launch_cooperative_grid"] = True
    return (*args, sync, step_begin, n_steps), kwargs


def _launch_cooperative(kernel, grid, args, kwargs, device, known=None) -> bool:
    """Launch the grid cooperatively; False, launching nothing, where it cannot be resident at once
    (checked unless ``known``: an earlier launch of the same plan went through)."""
    n_programs = math.prod(grid)
    capacity = math.inf if known else resident_capacity(kernel, grid, args, kwargs, device)
    if n_programs > capacity:
        logger.warning("fastrnn: %d programs cannot be resident at once (room for %d): one launch per "
                       "step instead", n_programs, capacity)
        return False
    try:
        kernel[grid](*args, **kwargs)
    except RuntimeError as e:  # CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: "... cooperative launch"
        if "cooperative" not in str(e):
            raise
        logger.warning("fastrnn: the driver refused a cooperative launch of %d programs (%s): one "
                       "launch per step instead", n_programs, e)
        return False
    return True


def resident_capacity(kernel, grid, args, kwargs, device) -> float:
    """How many programs of the compiled kernel the GPU holds at once (infinite under the
    interpreter, where programs run one after another and the configuration keeps them apart)."""
    if INTERPRETED:
        return math.inf
    compiled = kernel.warmup(*args, grid=grid, **kwargs)  # compiles, or finds the launch's cache entry
    compiled._init_handles()  # loads it: n_regs is known from here on
    per_sm = programs_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared)
    return per_sm * config.sm_count(torch.device(device))


def programs_per_sm(n_regs: int, num_warps: int, shared: int) -> int:
    """Programs of one kernel an sm_90 SM holds at once (0: it cannot launch), by the rules of
    NVIDIA's occupancy calculator: registers go per warp in units of 256 within four sub-partitions,
    at most 64 warps and 32 programs, and shared memory plus 1 KB reserved per program."""
    if n_regs > 255 or num_warps > 32 or shared > SHARED_PER_PROGRAM:
        return 0
    regs_per_warp = -(-max(n_regs, 1) * 32 // REG_UNIT) * REG_UNIT
    if regs_per_warp * -(-num_warps // SUB_PARTITIONS) * SUB_PARTITIONS > REGS_PER_SM:
        return 0
    warps_by_regs = (REGS_PER_SM // SUB_PARTITIONS // regs_per_warp) * SUB_PARTITIONS
    shared_per_program = -(-(shared + SHARED_RESERVED) // SHARED_UNIT) * SHARED_UNIT
    return min(warps_by_regs // num_warps, MAX_WARPS_PER_SM // num_warps, MAX_PROGRAMS_PER_SM,
               SHARED_PER_SM // shared_per_program)
