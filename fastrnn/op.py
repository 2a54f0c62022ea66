"""What turns a cell's pair of custom ops (forward, backward) into one differentiable op: the rules
every cell's op shares.

A cell writes its forward and backward loops as plain functions, makes each a custom op (so that
torch.compile keeps it in its graph and fake tensors get shapes), and writes each one's autograd
formula. ``Differentiable`` then makes the op callable three ways with the same formulas behind
each: eager calls through an old-style ``autograd.Function`` (torch binds no arguments for it: a few
microseconds a call), which runs the op's function itself on plain tensors (the dispatcher's round
trip through a custom op costs about 25 µs of host time) and the op otherwise; an eager call that
records no graph (no_grad, or no input requiring grad, and no forward-mode AD) the same without the
Function (about 6 µs less), and with the op's ``inference`` keywords (the gated cells' ``save=False``:
nothing kept that only a backward reads); torch.func transforms (grad of grad, jacrev, vmap, jvp)
through a new-style one with a vmap rule; torch.compile through the custom op with the formula
registered on it (the ``inference`` keywords where it records no graph), but under a torch.func
transform or forward-mode AD through the Functions, outside Dynamo's graph (``run_eagerly``: Dynamo
traces neither through them); ``torch.jit.trace`` through the custom op in every grad mode (one graph
whether traced with grad or, as its check does, without; a graph that ``torch.jit.save`` can write,
which a Function's is not).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.autograd import forward_ad


class Differentiable:
    """``op`` (a custom op running ``impl``), differentiable by ``backward`` (and ``jvp``) after
    ``setup_context`` (which keeps its tensors with ``save_for_derivatives``, for forward mode too where
    it may come), the same way in eager mode, under torch.func transforms and under torch.compile.
    Where ``jvp`` runs inside a further forward level it refuses (``unnested``), naming the module
    ``cell`` (``RNN``, ``LSTM``, ``GRU``): forward over forward, or, for a backward op's
    (``of_backward``), a third derivative."""

    def __init__(self, name: str, op, impl, setup_context, backward, jvp=None, *, cell: str, of_backward=False,
                 inference=None):
        def setup(ctx, inputs, output, forward_mode=True):
            ctx.forward_mode = forward_mode
            setup_context(ctx, inputs, output)
            if forward_mode and getattr(jvp, "reads_outputs_like", False):
                save_outputs_like(ctx, output)

        def forward(ctx, *inputs):
            direct = not torch.compiler.is_compiling() and self.direct(inputs)  # (Dynamo: the op, in its graph)
            output = impl(*inputs) if direct else op(*inputs)  # (fake tensors: the op's fake runs)
            setup(ctx, inputs, output, forward_ad._current_level >= 0)  # (jvp only where dual tensors may come)
            return output

        formulas = dict(backward=staticmethod(backward))
        if jvp is not None:
            formulas["jvp"] = staticmethod(unnested(jvp, cell, of_backward))
        self.op, self.impl = op, impl
        self.direct = runs_directly if not of_backward else upstream_unbatched  # (may the impl run directly)
        self.inference = inference or {}  # the keywords of a call that records no graph (save=False)
        self.eager = type(name, (torch.autograd.Function,), dict(forward=staticmethod(forward), **formulas))
        self.transformable = type(name + "ForTransforms", (torch.autograd.Function,), dict(
            forward=staticmethod(impl_through(op, impl)), setup_context=staticmethod(setup), **formulas,
            vmap=staticmethod(lambda info, in_dims, *args: vmap_by_loop(self.transformable.apply, info, in_dims,
                                                                        *args))))
        op.register_autograd(backward, setup_context=setup_context)

    def __call__(self, *args):
        if transforms_active():
            return run_eagerly(self.transformable.apply, *args)
        if torch.compiler.is_compiling():  # Dynamo keeps the custom op in its graph
            if forward_ad._current_level >= 0:  # (there, dual tensors would lose their tangents)
                return run_eagerly(self.eager.apply, *args)
            return self.op(*args, **self.keywords(args))
        if not differentiated(args):  # no graph to record (inference, no_grad): no Function either
            return self.impl(*args, **self.inference) if self.direct(args) else self.op(*args, **self.keywords(args))
        if _tracing():  # torch.jit.trace records the op as it does under no_grad (its check traces there)
            return self.op(*args)
        return self.eager.apply(*args)

    def keywords(self, args) -> dict:
        """The ``inference`` keywords where the call records no graph, and none where it may: recording
        one, or traced or exported into a graph kept to run again (``torch.jit.trace``, ``torch.export``,
        ``make_fx`` and every other dispatch mode), which may run with grad. (A compiled graph is
        guarded on grad mode and ``requires_grad``.)"""
        if differentiated(args) or _tracing() or exporting():
            return {}
        return self.inference if torch.compiler.is_compiling() or not _dispatch_modes() else {}


def exporting() -> bool:
    """``torch.compiler.is_exporting()``, read from the flag it returns: torch 2.11's Dynamo answers
    the call itself with True in every compiled graph, which then kept what an inference call needs
    not (torch 2.13 reads the flag)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    return torch.compiler.is_exporting() if flag is None else flag


def outside_graph() -> bool:
    """Whether a compiled call runs outside Dynamo's graph (``run_eagerly``): under a torch.func
    transform or forward-mode AD, which Dynamo traces through neither the cells' Functions (the
    custom ops' included: under ``jvp`` it gave a wrong tangent) nor torch's modules."""
    return transforms_active() or forward_ad._current_level >= 0


def run_eagerly(fn, *args):
    """``fn(*args)``, where Dynamo is tracing outside its graph (as it runs torch's modules: a graph
    break, the whole frame eager under a transform)."""
    if not torch.compiler.is_compiling():
        return fn(*args)
    from .eagerly import call  # (a compile has imported Dynamo; fastrnn's import does not)

    return call(fn, *args)


def impl_through(op, impl):
    """A function with ``impl``'s signature (torch.func binds its defaults) that calls ``op``."""
    @functools.wraps(impl)
    def forward(*args, **kwargs):
        return op(*args, **kwargs)

    return forward


def differentiated(inputs) -> bool:
    """Whether autograd must see a call: grad mode on and a tensor that requires grad, or forward-mode
    AD (dual tensors) active."""
    if forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    for a in inputs:  # (a loop, not any() over a generator: see runs_directly)
        if isinstance(a, Tensor) and a.requires_grad:
            return True
    return False


def runs_directly(inputs) -> bool:
    """Whether an eager call may run the op's function directly: plain tensors on a real device, and
    nothing that watches the dispatcher (fake or meta tensors, tensor subclasses, dispatch or
    function modes such as torch.export's tracing or FlopCounterMode, the TorchScript tracer, the
    profiler, whose trace then names the op), which must see the custom op."""
    if _dispatch_modes() or _function_modes() or _tracing() or _profiling():
        return False
    for a in inputs:  # (a loop, not all() over a generator: a microsecond less on every call)
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or a.is_meta):
            return False
    return True


def upstream_unbatched(inputs) -> bool:
    """``runs_directly`` for a backward op, whose first inputs are the upstream gradients (and last
    ones, in a second derivative, the gradients that reach its steps directly: the LSTM's and GRU's
    sources), unless one is batched by torch's legacy vmap (``autograd.grad(...,
    is_grads_batched=True)``, ``jacobian(vectorize=True)``), which knows no Function's vmap rule:
    there the custom op, which the dispatcher's fallback runs once per element."""
    return not _legacy_batched(*inputs[:3], *inputs[-2:]) and runs_directly(inputs)


def _legacy_batched(*inputs) -> bool:
    """Whether a tensor among ``inputs`` is batched by torch's legacy vmap."""
    for t in inputs:
        if isinstance(t, Tensor) and _is_legacy_batched(t):
            return True
    return False


_PLAIN = (Tensor, torch.nn.Parameter)
# (0.16 µs a tensor; where this torch lacks it, its dispatch keys read, 0.8 µs)
_is_legacy_batched = getattr(torch._C._functorch, "is_legacy_batchedtensor",
                             lambda t: "Batched" in str(torch._C._dispatch_keys(t)))
_dispatch_modes, _function_modes = torch._C._len_torch_dispatch_stack, torch._C._is_torch_function_mode_enabled
_tracing, _profiling = torch._C._get_tracing_state, torch._C._autograd._profiler_enabled

# Whether autocast is on for any device (one call; where this torch lacks it, CUDA's or the CPU's).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled",
                        lambda: torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu"))

# Whether a torch.func transform (grad, vmap, jvp, ...) is running; where this torch cannot tell,
# always (the transformable Function serves every call).
transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def vmap_by_loop(fn, info, in_dims, *args):
    """A vmap rule for the cells' ops (torch.func.jacrev, vmap of grad): ``fn`` once per batch
    element, outputs stacked along dim 0."""
    def element(i):
        return [a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)]

    outs = [fn(*element(i)) for i in range(info.batch_size)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs), 0
    return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])


def own_precision(fn):
    """``fn`` with autocast off: an op decides the precision of its own products. (Under the caller's
    autocast, ``h0 @ w_hh.T`` in fp32 would become a bf16 product.)"""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not _any_autocast():
            return fn(*args, **kwargs)  # (the usual case: no context to enter)
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return run


def saved_for_backward(save, op: str) -> None:
    """Raise where a forward that kept nothing for a backward (``save=False``, an inference call's) is
    recorded for one. (``save`` None: left out, so the default, True.)"""
    if save is False:
        raise RuntimeError(f"fastrnn::{op} called with save=False keeps nothing for a backward, yet an input "
                           "requires grad: call it with save=True where a gradient is wanted")


def save_for_derivatives(ctx, *tensors) -> None:
    """``ctx.save_for_backward(*tensors)``, and ``save_for_forward`` the same where forward mode may come
    (``Differentiable`` sets ``ctx.forward_mode``): one list for both rules."""
    ctx.save_for_backward(*tensors)
    if getattr(ctx, "forward_mode", False):
        ctx.save_for_forward(*tensors)


def unnested(jvp, cell: str, of_backward: bool):
    """``jvp``, refusing (``refuse_nested``) where it runs inside a further forward level: forward over
    forward through fastrnn.``cell``, a third derivative where ``jvp`` is a backward op's."""
    if of_backward:
        what = f"a third derivative through fastrnn.{cell} by forward mode over forward mode (jvp of jvp of grad)"
    else:
        what = (f"forward mode over forward mode through fastrnn.{cell} (jvp of jvp, jacfwd of jacfwd: take "
                "torch.func.hessian, or jacrev of jacrev)")

    @functools.wraps(jvp)
    def checked(ctx, *tangents):
        refuse_nested(what)
        return jvp(ctx, *tangents)

    return checked


def refuse_nested(what: str, under_grad: bool = False) -> None:
    """Raise ``NotImplementedError`` naming ``what`` where a forward-mode rule runs inside another
    torch.func forward level (jvp of jvp, jacfwd of jacfwd), or, ``under_grad``, inside a reverse one:
    the ops such a rule runs, torch hides from that level (forward grad is off inside a rule; an
    ``autograd.grad`` inside one is a constant to it), so its derivative would silently be wrong."""
    kinds = [level.key() for level in _functorch_levels() or ()]  # (the level running the rule included)
    if kinds.count(_JVP) > 1 or (under_grad and _GRAD in kinds):
        raise NotImplementedError(f"{what} is not supported")


_functorch_levels = getattr(torch._C._functorch, "get_interpreter_stack", lambda: None)
_JVP, _GRAD = torch._C._functorch.TransformType.Jvp, torch._C._functorch.TransformType.Grad


def transposed(backward, cell: str):
    """A backward op's ``jvp`` from its own ``backward`` (the backward of the backward, linear in the
    upstream gradients ``u`` of the op's outputs: ``J^T u``): the tangent ``J t`` is the gradient in u
    of ``<J^T u, t>`` (the double-vjp trick), taken by autograd through ``backward`` itself, at u = 0,
    with its graph where grad mode records (so the gradient of a Hessian-vector product taken on dual
    tensors, a third derivative, is right). It reads the shapes of the op's outputs
    (``save_outputs_like``). Inside a torch.func reverse level it refuses (``refuse_nested``): a third
    derivative of ``cell`` whose ops torch would hide from that level. (Autograd runs it for a
    gradient's tangent inside ``forward_ad.dual_level``, where a backward given sources, a loss that
    read c, the gates or a tangent, is transposed as any other.)"""
    def jvp(ctx, *tangents):
        refuse_nested(f"a third derivative through fastrnn.{cell} (forward mode over a second derivative)",
                      under_grad=True)
        recorded = torch.is_grad_enabled()  # (then the tangent keeps its graph, for a third derivative)
        with torch.enable_grad():
            u = [torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
                 for shape, dtype, device in ctx.outputs_like]
            grads = backward(ctx, *u)
            terms = [(g * t).sum() for g, t in zip(grads, tangents) if g is not None and t is not None]
            d = [None] * len(u)
            if terms:
                d = torch.autograd.grad(sum(terms), u, allow_unused=True, create_graph=recorded)
        return tuple(torch.zeros_like(x) if dx is None else dx for dx, x in zip(d, u))

    jvp.reads_outputs_like = True  # (Differentiable keeps them where forward mode may come)
    return jvp


def save_outputs_like(ctx, output) -> None:
    """The shape, dtype and device of each of an op's outputs, for ``transposed``."""
    ctx.outputs_like = [(o.shape, o.dtype, o.device) for o in output]


def with_defaults(inputs, n: int) -> tuple:
    """A custom op's ``inputs`` padded with None to ``n``: the trailing optional arguments a call left
    out (setup_context sees only those given)."""
    return (*inputs, *(None,) * (n - len(inputs)))


def register_flop_formula(op, formula) -> None:
    """``formula(*arguments)`` (an op's arguments as it was called, each tensor as its shape) is the
    count of the op's floating-point operations that ``torch.utils.flop_counter.FlopCounterMode``
    reports (what MFU figures are made of), as it counts aten's matrix products. (torch's own RNN
    modules count only their products that run as aten's: none of the LSTM's on the CPU, none of
    cuDNN's.) Registered at import, before any FlopCounterMode is made (each copies the registry):
    the flop counter imports Triton, about 0.13 s of ``import fastrnn`` (so Triton's settings read at
    its import, ``TRITON_INTERPRET`` among them, are to be set before ``import fastrnn``). Where it
    cannot be imported, nothing is registered: nobody can count then."""
    flop_counter = importable_flop_counter()
    if flop_counter is None:
        return
    packet = getattr(getattr(torch.ops, op._namespace), op._name)  # (torch.ops.fastrnn.<name>)
    if packet not in flop_counter.flop_registry:  # (a formula registered before stays)
        flop_counter.register_flop_formula(packet)(
            lambda *arguments, out_shape=None, **keywords: formula(*arguments, **keywords))


@functools.cache
def importable_flop_counter():
    """``torch.utils.flop_counter``, or None where it fails to import (tried once: a broken Triton
    fails it with more than ImportError)."""
    try:
        from torch.utils import flop_counter
    except Exception:
        return None
    return flop_counter


def loop_flops(steps: int, rows: int, *weights) -> int:
    """The products of a loop of ``steps`` over ``rows`` rows with each of ``weights`` (shapes, None
    where absent): a ``(rows, K) x (K, N)`` product a step and weight, ``2 rows K N`` each."""
    return 2 * max(steps, 0) * rows * sum(math.prod(w) for w in weights if w is not None)
