"""Where fastrnn runs a call outside Dynamo's graph, as Dynamo runs torch's own RNN modules (see
``op.run_eagerly``). A module of its own, imported by the first compile that reaches it:
``torch._dynamo.disable`` imports Dynamo, which at ``import fastrnn`` would cost every user a second."""

import torch


@torch._dynamo.disable
def call(fn, *args):
    """``fn(*args)``, never traced."""
    return fn(*args)
