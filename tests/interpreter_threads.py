"""Run every program of an interpreted Triton grid in its own thread (TRITON_INTERPRET=1 only).

    with concurrent_programs(timeout_s=120):
        kernel[grid](...)          # programs run concurrently; a grid barrier among them works

How (Triton 3.6.0 and 3.9.0, both checked): the interpreter keeps the program id in one attribute,
``interpreter_builder.grid_idx`` (module global ``triton.runtime.interpreter.interpreter_builder``),
set by ``set_grid_idx(x, y, z)`` just before ``GridExecutor.__call__`` runs ``self.fn(**args)`` once
per program, in a triple loop. Here, for the duration of the ``with`` block:

1. ``interpreter_builder.__class__`` becomes a subclass whose ``grid_idx`` is a thread-local property
   (so ``tl.program_id`` / ``device_print`` in each thread see that thread's id), and whose atomics
   (``create_atomic_rmw`` / ``create_atomic_cas``) first check an abort flag and then yield the GIL
   (``time.sleep(0)``), so a program spinning at a barrier hands the interpreter to the others.
2. ``GridExecutor.__init__`` wraps ``self.fn`` in a spawner: each call (one per program, made by the
   unchanged grid loop, right after ``set_grid_idx``) starts a thread that takes the id the main
   thread has just set and runs the kernel; the call for the last program joins all threads (with a
   deadline), so the grid loop, the argument copy-back and the language-patch restore all happen
   after every program finished, as before. The first exception of any program is re-raised (the
   grid loop then wraps it as usual); on an exception or the deadline the others are aborted at their
   next atomic (a program blocked at a barrier always gets there).

Everything else the interpreter does is per call (numpy arrays local to the program) or holds the
GIL for the whole operation (``_interpreter.load/store/atomic_rmw/atomic_cas`` are C++ functions
that never release it, so each is atomic with respect to the other threads). Nested @jit calls
re-run ``_patch_lang`` from the threads: it re-sets module attributes to equivalent wrappers only.

Private internals used (``check_supported()`` says whether they are there; skip the test if not):
``triton.runtime.interpreter.{interpreter_builder, InterpreterBuilder, GridExecutor}``,
``InterpreterBuilder.{set_grid_idx, grid_idx, grid_dim, create_atomic_rmw, create_atomic_cas}``,
``GridExecutor.__init__`` setting ``self.fn`` and ``GridExecutor.__call__`` calling
``set_grid_idx`` then ``self.fn(**args)`` per program, ``inspect.getfullargspec(self.fn)``,
``inspect.getcallargs(self.fn, ...)`` and ``_patch_lang(self.fn)`` (reads ``fn.__globals__``).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import threading
import time


class ProgramsAborted(RuntimeError):
    """Raised inside a program's thread when another program failed or the deadline passed."""


def _is_abort(e: BaseException) -> bool:
    """Nested @jit calls re-wrap errors (InterpreterError(repr(e)) from e): follow the causes."""
    while e is not None:
        if isinstance(e, ProgramsAborted):
            return True
        e = e.__cause__
    return False


def _interp():
    from triton.runtime import interpreter
    return interpreter


def check_supported() -> str | None:
    """None when this Triton's interpreter has the internals used here, else the reason (to skip)."""
    try:
        it = _interp()
        builder, builder_cls, executor = it.interpreter_builder, it.InterpreterBuilder, it.GridExecutor
    except (ImportError, AttributeError) as e:
        return f"triton interpreter internals missing: {e}"
    for name in ("set_grid_idx", "create_atomic_rmw", "create_atomic_cas", "create_get_program_id"):
        if not hasattr(builder_cls, name):
            return f"InterpreterBuilder.{name} missing"
    if type(builder) is not builder_cls:
        return "interpreter_builder is not a plain InterpreterBuilder"
    try:
        init_src = inspect.getsource(executor.__init__)
        call_src = inspect.getsource(executor.__call__)
    except (OSError, TypeError) as e:
        return f"cannot read GridExecutor source: {e}"
    if "self.fn = fn" not in init_src:
        return "GridExecutor.__init__ no longer sets self.fn"
    loop = call_src.find("set_grid_idx(")
    if loop < 0 or "self.fn(**args)" not in call_src[loop:]:
        return "GridExecutor.__call__ no longer runs set_grid_idx + self.fn(**args) per program"
    return None


class _Spawner:
    """Stands in for GridExecutor.fn: one thread per call, joined at the last program."""

    def __init__(self, fn, state, timeout_s, delay):
        self._fn, self._state, self._timeout_s, self._delay = fn, state, timeout_s, delay
        self.__signature__ = inspect.signature(fn)  # for getfullargspec / getcallargs
        self.__globals__ = fn.__globals__  # for _patch_lang
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__annotations__ = getattr(fn, "__annotations__", {})
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._all_started = threading.Event()

    def __call__(self, **args):
        it, state = _interp(), self._state
        builder = it.interpreter_builder
        idx = builder.grid_idx  # the main thread's, just set by the grid loop
        total = builder.grid_dim[0] * builder.grid_dim[1] * builder.grid_dim[2]

        pause = self._delay(idx) if self._delay is not None else 0.0

        def program():
            state.local.grid_idx = idx
            try:
                if pause == math.inf:  # held back until every other program has finished
                    self._all_started.wait()
                    for other in self._threads:
                        if other is not threading.current_thread():
                            other.join()
                elif pause:
                    time.sleep(pause)
                self._fn(**args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                self._errors.append(e)
                state.abort.set()

        t = threading.Thread(target=program, name=f"triton-program-{idx}", daemon=True)
        self._threads.append(t)
        t.start()
        if len(self._threads) == total:
            self._all_started.set()
            self._join()

    def _join(self):
        deadline = time.monotonic() + self._timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        timed_out = any(t.is_alive() for t in self._threads)
        if timed_out:
            self._state.abort.set()  # blocked programs raise at their next atomic
            for t in self._threads:
                t.join(10.0)
        self._state.abort.clear()
        real = [e for e in self._errors if not _is_abort(e)]
        if real:
            raise real[0]
        if timed_out:
            stuck = [t.name for t in self._threads if t.is_alive()]
            raise TimeoutError(f"programs did not finish in {self._timeout_s} s (deadlock?); "
                               f"still running after abort: {stuck}")
        if self._errors:
            raise self._errors[0]


@contextlib.contextmanager
def concurrent_programs(timeout_s: float = 120.0, yield_on_atomic: bool = True, delay=None):
    """Within the block, interpreted launches run their programs concurrently (see module doc).

    ``delay``: optional ``f((x, y, z)) -> seconds`` a program sleeps before it starts; ``math.inf``
    holds it back until every other program has finished. Holding one program back makes a barrier
    that does not wait fail deterministically (its peers read data that is not written yet), and one
    that waits deadlock (the timeout then reports it)."""
    reason = check_supported()
    if reason is not None:
        raise RuntimeError(reason)
    it = _interp()
    builder = it.interpreter_builder
    base_cls, executor_cls = type(builder), it.GridExecutor
    state = threading.local()
    shared = type("State", (), {})()
    shared.local, shared.abort = state, threading.Event()
    main_idx = builder.__dict__.get("grid_idx")

    def _get_idx(self):
        v = getattr(shared.local, "grid_idx", None)
        return v if v is not None else self.__dict__.get("grid_idx")

    def _set_idx(self, value):
        shared.local.grid_idx = value

    def _guard(self):
        if shared.abort.is_set():
            raise ProgramsAborted("another program failed or the deadline passed")

    def create_atomic_rmw(self, *a, **k):
        _guard(self)
        r = base_cls.create_atomic_rmw(self, *a, **k)
        if yield_on_atomic:
            time.sleep(0)  # let the other programs run while this one polls
        return r

    def create_atomic_cas(self, *a, **k):
        _guard(self)
        r = base_cls.create_atomic_cas(self, *a, **k)
        if yield_on_atomic:
            time.sleep(0)
        return r

    threaded_cls = type("ThreadedInterpreterBuilder", (base_cls,), {
        "grid_idx": property(_get_idx, _set_idx),
        "create_atomic_rmw": create_atomic_rmw,
        "create_atomic_cas": create_atomic_cas,
    })
    orig_init = executor_cls.__init__

    def init(self, fn, *a, **k):
        orig_init(self, fn, *a, **k)
        self.fn = _Spawner(self.fn, shared, timeout_s, delay)

    builder.__class__ = threaded_cls
    executor_cls.__init__ = init
    try:
        yield
    finally:
        executor_cls.__init__ = orig_init
        builder.__class__ = base_cls
        if main_idx is not None:
            builder.__dict__["grid_idx"] = main_idx
