"""Under TRITON_INTERPRET=1: triton.language patched once per kernel launch, not again at every call
of a nested ``@triton.jit`` function (the cells' gates, loads and products). Tests only.

    patch_each_language_once()   # once, before the first launch (tests/conftest.py)

Why: the interpreter runs a launch with ``triton.language`` patched to its numpy versions
(``GridExecutor.__call__``: ``_patch_lang(kernel)``, restored at the end), and each call of a
nested jit function patches it again (``InterpretedFunction.__call__``: ``_patch_lang(fn)``), every
builtin of ``tl``, ``tl.math`` and ``tl.tensor`` re-wrapped, thousands of ``setattr`` a call. The
kernels call their helpers inside the time loop, so that was half of a launch's time here (an
LSTM's forward and backward on T=6, B=3, H=5: the profile's ``_patch_lang`` took 1.0 s of 1.9 s).
While a launch holds the language patched, a nested call whose function sees only language modules
the launch (or an earlier nested call of it) patched patches nothing: what it would set is what is
set. A function that sees another one (``triton.language.core`` where the kernel had only
``triton.language``), or none (which the interpreter refuses), patches as before, and only then is
that module recorded as patched (a launch's programs may run in threads). Results, and errors, are
those of the interpreter as it is.

Private internals used (``supported()`` says whether they are there, as checked on Triton 3.6.0 and
3.9.0; otherwise nothing is changed and the interpreter runs as it is):
``triton.runtime.interpreter.{_patch_lang, _LangPatchScope}``, ``_patch_lang(fn)`` returning the
scope that ``GridExecutor.__call__`` restores at a launch's end and that
``InterpretedFunction.__call__`` drops, and which language modules it patches: those of
``fn.__globals__`` that are ``triton.language`` or ``triton.language.core``.
"""
from __future__ import annotations

import inspect
import threading
import weakref


def supported() -> bool:
    from triton.runtime import interpreter

    if not (hasattr(interpreter, "_patch_lang") and hasattr(interpreter, "_LangPatchScope")):
        return False
    try:
        launch = inspect.getsource(interpreter.GridExecutor.__call__)
        nested = inspect.getsource(interpreter.InterpretedFunction.__call__)
    except (OSError, TypeError):  # (installed without its sources)
        return False
    return ("_patch_lang(self.fn)" in launch and ".restore()" in launch
            and "_patch_lang(self.fn)" in nested and ".restore()" not in nested)


def patch_each_language_once() -> bool:
    """Install the once-per-launch patching (the interpreter's own ``_patch_lang`` kept as its
    ``original``); False (and nothing changed) where this Triton's interpreter is not the one
    described above. Installing it twice changes nothing."""
    from triton.runtime import interpreter

    if getattr(interpreter._patch_lang, "once_per_launch", False):
        return True
    if not supported():
        return False
    import triton.language as tl

    patch, languages = interpreter._patch_lang, (tl, tl.core)
    seen = weakref.WeakKeyDictionary()  # function -> the ids of the language modules its globals hold
    patched: list = []  # the ids patched by the launch running now: [set()] during a launch
    lock = threading.Lock()  # (a launch's programs may run in threads: tests/interpreter_threads.py)

    def languages_of(fn) -> frozenset:
        found = seen.get(fn)
        if found is None:
            found = frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in languages)
            seen[fn] = found
        return found

    def patch_once(fn):
        wanted = languages_of(fn)
        with lock:
            nested = bool(patched)
            if nested and wanted and wanted <= patched[0]:
                return interpreter._LangPatchScope()  # all it sees is patched: nothing to do
        scope = patch(fn)  # (a function that sees no language module fails here, as it would)
        with lock:
            if nested:  # it saw a language module the launch had not patched: patched from now on
                if patched:
                    patched[0] |= wanted
                return scope
            patched.append(set(wanted))
        return LaunchScope(scope, patched, lock)

    patch_once.once_per_launch, patch_once.original = True, patch
    interpreter._patch_lang = patch_once
    return True


class LaunchScope:
    """A launch's patch scope: its restore (at the launch's end) also ends the launch's record."""

    def __init__(self, scope, patched: list, lock) -> None:
        self.scope, self.patched, self.lock = scope, patched, lock

    def restore(self) -> None:
        with self.lock:
            self.patched.clear()
        self.scope.restore()
