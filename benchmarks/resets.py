"""Resets inside a sequence (issue #23): fastrnn against what RL code does today.

``resets (T, B)`` bool, time-major: ``resets[t, b]`` True means row b starts a new, independent
sequence at step t (the state entering step t is zero, ``hx`` included at t = 0). Three providers
give the same outputs, final state and gradients:

- ``fastrnn``: ``module(x, hx, resets=resets)``, the reset inside the fused loop;
- ``loop``: the common PPO-LSTM pattern, torch's module stepped one time step at a time with the
  state multiplied by ``(1 - reset)`` before each step;
- ``packed``: every row split into its segments, all segments through torch's module as one packed
  batch (``pack_sequence(..., enforce_sorted=False)``), the outputs scattered back to ``(T, B, H)``.
  The segments' boundaries are found once outside the timing (a rollout finds them anew each time,
  so this flatters the baseline); the split, the pack and the scatter are timed.

Shapes: torchrl's reset benchmark (B=128, T=128, H=256, 3 % resets; its input size defaults to 64,
``benchmarks/bench_gru_reset_backends.py`` in pytorch/rl) on CUDA, a small one on CPU."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_sequence

import fastrnn

RESETS_CELLS = ("gru", "lstm")
RESETS_PROVIDERS = ("fastrnn", "loop", "packed")
RESET_RATE = 0.03
# (B, T, I, H) per device
RESETS_SHAPES = {"cuda": (128, 128, 64, 256), "cpu": (16, 64, 64, 64)}
AGREE_SHAPE = (5, 9, 3, 4)  # (B, T, I, H): the float64 agreement check
AGREE_RATE = 0.3


@functools.cache
def resets_missing(cell: str) -> str | None:
    """Why fastrnn's ``cell`` cannot run with resets yet, or None once a tiny forward with
    ``resets=`` runs (the keyword alone is not enough while the feature is being built)."""
    module = fastrnn.CELLS[cell].module
    if "resets" not in inspect.signature(module.forward).parameters:
        return f"fastrnn.{module.__name__}.forward does not take resets= yet (issue #23)"
    try:
        module(2, 3)(torch.zeros(4, 2, 2), resets=torch.tensor([[False, True]] * 4))
    except Exception as error:  # noqa: BLE001 - any failure means: not there yet
        return (f"fastrnn.{module.__name__}.forward takes resets= but a tiny forward with it fails "
                f"({type(error).__name__}: {error}): issue #23 is not finished")
    return None


def draw_resets(T: int, B: int, rate: float, device="cpu", seed: int = 0) -> Tensor:
    """``(T, B)`` bool, each step a reset with probability ``rate`` (seeded, the same on every device)."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(T, B, generator=generator) < rate).to(device)


# --- the three providers: (module, x, hx, resets or plan) -> (output (T, B, H), final state) ---

def forward_fastrnn(module, x: Tensor, hx, resets: Tensor):
    """fastrnn's module with the resets inside its loop."""
    return module(x, hx, resets=resets)


def forward_step_loop(module, x: Tensor, hx, resets: Tensor):
    """torch's module one step at a time, the state times ``(1 - reset)`` before each step."""
    keep = (~resets).to(x.dtype).unsqueeze(-1)  # (T, B, 1)
    state, outputs = hx, []
    for t in range(x.shape[0]):
        state = masked_state(state, keep[t])
        y, state = module(x[t:t + 1], state)
        outputs.append(y)
    return torch.cat(outputs), state


def masked_state(state, keep: Tensor):
    """``h * keep`` (and ``c * keep``) for ``keep (B, 1)``."""
    if isinstance(state, tuple):
        return tuple(s * keep for s in state)
    return state * keep


@dataclass
class SegmentPlan:
    """Where each row's segments lie: segment s is row ``rows[s]`` from step ``starts[s]`` for
    ``lengths[s]`` steps, starting from zero where ``from_zero[s]`` (else from ``hx``); ``last[b]``
    is row b's last segment. Built once from ``resets`` on the host."""
    rows: list[int]
    starts: list[int]
    lengths: list[int]
    from_zero: Tensor  # (S,) bool, on the inputs' device
    row_index: Tensor  # (S,) int64, on the inputs' device
    start_index: Tensor  # (S,) int64, on the inputs' device
    last: Tensor  # (B,) int64, on the inputs' device


def segment_plan(resets: Tensor) -> SegmentPlan:
    """The segments of every row of ``resets (T, B)``, row by row."""
    flags = resets.cpu().tolist()  # T lists of B bools
    T, B = resets.shape
    rows, starts, lengths, from_zero, last = [], [], [], [], []
    for b in range(B):
        cuts = [0] + [t for t in range(1, T) if flags[t][b]] + [T]
        for begin, end in pairwise(cuts):
            rows.append(b), starts.append(begin), lengths.append(end - begin)
            from_zero.append(begin > 0 or flags[0][b])
        last.append(len(rows) - 1)
    device = resets.device
    return SegmentPlan(rows, starts, lengths, torch.tensor(from_zero, device=device),
                       torch.tensor(rows, device=device), torch.tensor(starts, device=device),
                       torch.tensor(last, device=device))


def forward_segments_packed(module, x: Tensor, hx, plan: SegmentPlan):
    """Every segment through torch's module as one packed batch, scattered back to ``(T, B, H)``."""
    segments = [x[start:start + length, row] for row, start, length in zip(plan.rows, plan.starts, plan.lengths)]
    packed = pack_sequence(segments, enforce_sorted=False)
    output, state = module(packed, segment_state(hx, plan))
    T, B = x.shape[:2]
    y = output.data.index_select(0, packed_order(output, plan, B))
    final = tuple(s.index_select(1, plan.last) for s in state) if isinstance(state, tuple) \
        else state.index_select(1, plan.last)
    return y.view(T, B, -1), final


def segment_state(hx, plan: SegmentPlan):
    """Each segment's initial state, ``(1, S, H)``: its row's ``hx`` for a row's first segment, else zero."""
    def per_segment(h):
        return h.index_select(1, plan.row_index).masked_fill(plan.from_zero[None, :, None], 0)

    return tuple(per_segment(h) for h in hx) if isinstance(hx, tuple) else per_segment(hx)


def packed_order(output, plan: SegmentPlan, B: int) -> Tensor:
    """For each ``(t, b)`` in time-major order, the row of ``output.data`` that holds it."""
    batch_sizes = output.batch_sizes
    step = torch.repeat_interleave(torch.arange(len(batch_sizes)), batch_sizes)  # k of each packed row
    first = torch.cumsum(batch_sizes, 0) - batch_sizes  # packed row where step k begins
    rank = torch.arange(int(batch_sizes.sum())) - first[step]  # place among the segments still running
    device = output.data.device
    segment = output.sorted_indices.index_select(0, rank.to(device))
    target = (plan.start_index.index_select(0, segment) + step.to(device)) * B + plan.row_index.index_select(0, segment)
    return torch.empty_like(target).index_copy_(0, target, torch.arange(len(target), device=device))


# --- the cases the benchmarks time ---

def make_resets_case(provider: str, shape: tuple, dtype: torch.dtype, mode: str, device: str, cell: str,
                     rate: float = RESET_RATE):
    """A zero-argument callable running ``provider`` on ``cell`` over ``shape (B, T, I, H)`` with
    ``rate`` resets: one forward (under no_grad) or forward + backward. Every provider gets the same
    weights, inputs and resets (one seed)."""
    B, T, I, H = shape
    torch.manual_seed(0)
    ref = fastrnn.CELLS[cell].torch_module(I, H, device=device, dtype=dtype)
    grad = mode == "fwdbwd"
    x = torch.randn(T, B, I, device=device, dtype=dtype, requires_grad=grad)
    hx = random_state(cell, B, H, device, dtype, grad)
    resets = draw_resets(T, B, rate, device)
    forward, module, flags = provider_forward(provider, cell, ref, resets)

    def run():
        with torch.set_grad_enabled(grad):
            y, _ = forward(module, x, hx, flags)
            if grad:
                y.sum().backward()
        return y
    return run


def random_state(cell: str, B: int, H: int, device, dtype, grad: bool):
    """A random initial state of ``cell``: ``h0 (1, B, H)``, or ``(h0, c0)`` for the LSTM."""
    parts = [torch.randn(1, B, H, device=device, dtype=dtype, requires_grad=grad)
             for _ in fastrnn.CELLS[cell].state]
    return tuple(parts) if len(parts) > 1 else parts[0]


def provider_forward(provider: str, cell: str, ref, resets: Tensor):
    """``(forward, module, resets or plan)`` of ``provider``, on the weights of ``ref``, torch's
    module of ``cell``."""
    if provider == "loop":
        return forward_step_loop, ref, resets
    if provider == "packed":
        return forward_segments_packed, ref, segment_plan(resets)
    if provider == "fastrnn":
        module = fastrnn.CELLS[cell].module(ref.input_size, ref.hidden_size, device=resets.device,
                                            dtype=ref.weight_hh_l0.dtype)
        module.load_state_dict(ref.state_dict())
        return forward_fastrnn, module, resets
    raise ValueError(f"no {provider} provider of resets: {', '.join(RESETS_PROVIDERS)}")


# --- the agreement check: all three the same in float64 ---

def resets_disagreement(cell: str, providers=RESETS_PROVIDERS, shape=AGREE_SHAPE, rate=AGREE_RATE,
                        seed: int = 0) -> dict[str, float]:
    """The largest relative error of each provider against the ``loop``, over the output, the final
    state and the gradients of input, initial state and weights, in float64 on the CPU."""
    B, T, I, H = shape
    torch.manual_seed(seed)
    ref = fastrnn.CELLS[cell].torch_module(I, H, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = random_state(cell, B, H, "cpu", torch.float64, False)
    resets = draw_resets(T, B, rate, seed=seed)
    resets[:, 0] = False  # row 0: one segment, from hx
    resets[0, 1] = True  # row 1: from zero at the first step
    results = {p: outputs_and_gradients(p, cell, ref, x, hx, resets) for p in ("loop", *providers)}
    return {p: max(relative_error(a, b) for a, b in zip(results[p], results["loop"]))
            for p in providers if p != "loop"}


def outputs_and_gradients(provider: str, cell: str, ref, x: Tensor, hx, resets: Tensor) -> list[Tensor]:
    """The output, final state and gradients (input, initial state, every weight) of ``provider``
    under a random weighting of output and final state."""
    forward, module, flags = provider_forward(provider, cell, ref, resets)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    starts = [h.detach().clone().requires_grad_() for h in (hx if isinstance(hx, tuple) else (hx,))]
    y, state = forward(module, x, tuple(starts) if len(starts) > 1 else starts[0], flags)
    finals = list(state) if isinstance(state, tuple) else [state]
    weighting = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=weighting, dtype=t.dtype)).sum() for t in [y, *finals])
    loss.backward()
    params = [p.grad for _, p in sorted(module.named_parameters())]
    return [y, *finals, x.grad, *(h.grad for h in starts), *params]


def relative_error(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` in float64 (NaN anywhere gives NaN)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
