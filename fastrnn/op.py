"""What turns a cell's pair of custom ops (forward, backward) into one differentiable op: the rules
every cell's op shares.
"""

from __future__ import annotations

import functools

import torch


def vmap_by_loop(fn, info, in_dims, *args):
    """A vmap rule for the cells' autograd.Functions (torch.func.jacrev, vmap of grad): ``fn`` once
    per batch element, outputs stacked along dim 0."""
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
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return run


def with_defaults(inputs, n: int) -> tuple:
    """A custom op's ``inputs`` padded with None to ``n``: the trailing optional arguments a call left
    out (setup_context sees only those given)."""
    return (*inputs, *(None,) * (n - len(inputs)))
