"""The published benchmark suite (see ../shared/PERF.md) and the callables it times.

Shared by the pytest-benchmark cases (``test_recurrence.py``), the one-process GPU table
(``run_suite.py``) and the CPU table (``cpu_table.py``), so all time exactly the same work."""

from __future__ import annotations

import torch
from torch import nn

import fastrnn

# (B, T, I, H): the eight published shapes
SHAPES = {
    1: (32, 35, 28, 512),
    2: (32, 256, 256, 256),
    3: (64, 512, 512, 512),
    4: (128, 1024, 1024, 1024),
    5: (16, 1024, 2048, 2048),
    6: (256, 256, 256, 256),
    7: (1, 4096, 512, 512),
    8: (8, 2048, 128, 128),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "fwdbwd")
PROVIDERS = ("fastrnn", "cudnn", "scratch")
# (B, T, I, H): the CPU comparison's shapes, suite shapes #2 and #1
CPU_SHAPES = {"cpu-small": SHAPES[2], "cpu-textbook": SHAPES[1]}
# fastrnn's output against cuDNN's, norm-wise relative: each is off float64 by up to its dtype's error
# (fp32: TF32 products in both, 1e-2 each; bf16 5e-2 each, as scripts/gpu_check.py holds them)
AGREEMENT = {"fp32": 2e-2, "bf16": 1e-1}


CELLS = {name: (cell.torch_module, cell.module) for name, cell in fastrnn.CELLS.items()}


def make_case(provider: str, shape: tuple, dtype: torch.dtype, mode: str, device: str = "cuda",
              cell: str = "rnn"):
    """A zero-argument callable that runs one forward (under no_grad) or forward + backward of one
    layer of ``cell`` (rnn, lstm or gru) from a random initial state. ``provider``: ``fastrnn``,
    ``cudnn`` (torch's own module; ``torch`` is the same, the name used on a CPU) or ``scratch``.
    Every provider gets the same weights and inputs (one seed)."""
    B, T, I, H = shape
    torch.manual_seed(0)
    torch_cls, fastrnn_cls = CELLS[cell]
    ref = torch_cls(I, H, device=device, dtype=dtype)
    x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=mode == "fwdbwd")
    h0 = torch.randn(1, B, H, device=device, dtype=dtype, requires_grad=mode == "fwdbwd")
    hx = (h0, torch.randn_like(h0).requires_grad_(mode == "fwdbwd")) if cell == "lstm" else h0
    if provider in ("cudnn", "torch"):
        module = ref
    elif provider == "fastrnn":
        module = fastrnn_cls(I, H, device=device, dtype=dtype)
        module.load_state_dict(ref.state_dict())
    elif provider == "scratch" and cell == "rnn":
        module = ScratchLoop(ref)
    else:
        raise ValueError(f"no {provider} provider of {cell}")

    if mode == "fwd":
        def run():
            with torch.no_grad():
                return module(x, hx)
    else:
        def run():
            y, _ = module(x, hx)
            y.sum().backward()
            return y
    return run


def disagreement(results: dict) -> float:
    """fastrnn's results against cuDNN's, the largest norm-wise relative difference of the output and
    (a fwd run's) final states (``results``: what a call of each provider's ``make_case`` callable
    returned, by provider): a timed call that computes something else shows here."""
    got, want = (_flat(results[provider]) for provider in ("fastrnn", "cudnn"))
    return max(((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
               for a, b in zip(got, want))


def _flat(out) -> list:
    """The tensors of a module's result, ``y`` or ``(y, h_n)`` or ``(y, (h_n, c_n))``, in order."""
    if isinstance(out, torch.Tensor):
        return [out.detach()]
    return [t for part in out for t in _flat(part)]


class ScratchLoop(nn.Module):
    """The textbook loop on the same weights: a Python loop of one matrix product per step."""

    def __init__(self, ref: nn.RNN) -> None:
        super().__init__()
        self.ref = ref

    def forward(self, x, h0):
        r = self.ref
        h, ys = h0[0], []
        x_proj = x @ r.weight_ih_l0.T + r.bias_ih_l0 + r.bias_hh_l0
        for t in range(x.shape[0]):
            h = torch.tanh(x_proj[t] + h @ r.weight_hh_l0.T)
            ys.append(h)
        return torch.stack(ys), h[None]


def shape_label(shape) -> str:
    """``(B, T, I, H)`` as ``B32 T256 I256 H256``."""
    return " ".join(f"{k}{v}" for k, v in zip("BTIH", shape))


def flops_per_step(shape) -> float:
    B, T, I, H = shape
    return 2.0 * B * H * H
