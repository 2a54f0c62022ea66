"""The GPU proof: the fused path on CUDA against a float64 reference, plus the checks that need a GPU.

    python scripts/gpu_check.py [--out results.md] [--quick]
    python scripts/gpu_check.py --sections parity --kinds rnn,gru --shapes odd1,suite2 --dtypes tf32,bf16
    python scripts/gpu_check.py --smoke        # tiny shapes on CPU under TRITON_INTERPRET=1 (CI runs this)

Sections (each prints a markdown table or list and a PASS/FAIL line; the exit status is non-zero on
any FAIL; ``--sections`` picks some, in this order):
1. parity: each kind (``rnn``, ``lstm``, ``gru`` from the registry, and ``lstm-proj``: the LSTM with
   proj_size = H // 2) on the published shapes and a few odd ones, fp64 / fp32 (IEEE and TF32) /
   bf16 / fp16: outputs, final states and every gradient against float64 (the same module on the
   torch path), max relative error (norm-wise) and the worst quantity, with cuDNN's own error in
   that dtype beside it (torch's CPU module with ``--smoke``).
2. barrier: the tiled variant forced, many programs meeting at one grid barrier, a long sequence:
   20 runs bitwise identical (forward and backward), then 20 more with a second stream kept busy.
3. extremes: T*B*H past 2**31 (T=70000, B=128, H=256, bf16) checked on a slice against the loop;
   T=100000 forward and backward finite and matching; H=8192 through the fallback path.
4. variants: every kernel variant forced on one shape.
5. ecosystem: torch.compile(fullgraph=True) against eager, opcheck per dtype (operands on the device
   under test), autocast (bf16, fp16: fastrnn returns its input projection's dtype, the autocast
   dtype, and is compared with what torch.nn.RNN returns, which cuDNN computes in fp16 either way),
   bitwise repeatability, packed and resets forward and backward of every module under
   ``torch.cuda.set_sync_debug_mode("error")`` (no host sync), a forward with resets captured in a
   CUDA graph and replayed, double backward on the fused path against the torch path.
Sanitizers: ``bash scripts/sanitize.sh`` runs compute-sanitizer over the kernels. The whole GPU
session, in parts that fit one device command each: ``scripts/gpu_session.sh``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

if __name__ == "__main__" and "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastrnn's kernels are imported
    os.environ["FASTRNN_BACKEND"] = "triton"

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.cells import CELLS  # noqa: E402
from fastrnn.elman import recurrence_reference  # noqa: E402

# (B, T, I, H), by name
SHAPES = {"suite1": (32, 35, 28, 512), "suite2": (32, 256, 256, 256), "suite3": (64, 512, 512, 512),
          "suite4": (128, 1024, 1024, 1024), "suite5": (16, 1024, 2048, 2048), "suite6": (256, 256, 256, 256),
          "suite7": (1, 4096, 512, 512), "suite8": (8, 2048, 128, 128),
          "odd1": (17, 63, 5, 130), "odd2": (3, 9, 7, 1000), "odd3": (300, 5, 9, 64), "odd4": (1, 2, 3, 1),
          "smoke1": (3, 5, 4, 20), "smoke2": (2, 3, 2, 1)}
SUITE = [name for name in SHAPES if name.startswith("suite")]
ODD = [name for name in SHAPES if name.startswith("odd")]
SMOKE = ["smoke1", "smoke2"]
QUICK = ODD + ["suite1", "suite2", "suite8"]
TOL = {"fp64": 1e-9, "fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2, "fp16": 1e-2}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = [*CELLS, "lstm-proj"]  # lstm-proj: the LSTM cell with proj_size = H // 2
SECTIONS = ("parity", "barrier", "extremes", "variants", "ecosystem")
# the barrier section's shape (B, T, I, H) and repeats: B = 16 is one group of H / 16 programs
BARRIER = {"gpu": ((16, 2048, 64, 2048), 20), "smoke": ((3, 6, 4, 20), 2)}


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double().to(a.device)
    n = b.norm().item()
    return (a - b).norm().item() / (n if n > 0 else 1.0)


def cell_of_kind(kind: str):
    """``(registry cell, module kwargs)`` of a kind: ``lstm-proj`` is the LSTM with proj_size."""
    return (CELLS["lstm"], "proj") if kind == "lstm-proj" else (CELLS[kind], None)


def build(kind: str, I: int, H: int, dtype, device, fused: bool = True):
    """The fastrnn module of ``kind`` (``fused=False``: torch's own) in ``dtype`` on ``device``."""
    cell, proj = cell_of_kind(kind)
    kw = dict(proj_size=H // 2) if proj else {}
    cls = cell.module if fused else cell.torch_module
    return cls(I, H, dtype=dtype, device=device, **kw)


def quantities(kind: str, mod) -> list[str]:
    """The names of what ``run_cell`` returns for ``mod``, a module of ``kind``, in order."""
    state = cell_of_kind(kind)[0].state
    return ["y", *(f"{s}_n" for s in state), "dx", *(f"d{s}0" for s in state),
            *(f"d{name}" for name, _ in mod.named_parameters())]


def run_cell(mod, ref, x, hx, dtype=torch.float64):
    """Outputs, final states and all gradients of ``mod`` with ``ref``'s weights, in ``dtype``."""
    mod.load_state_dict({k: v.to(dtype) for k, v in ref.state_dict().items()})
    x = x.to(dtype).requires_grad_()
    hx = [h.to(dtype).requires_grad_() for h in hx]
    y, h_n = mod(x, tuple(hx) if len(hx) == 2 else hx[0])
    h_n = list(h_n) if isinstance(h_n, tuple) else [h_n]
    g = torch.Generator(device=x.device).manual_seed(1)
    loss = (y.float() * torch.randn(y.shape, generator=g, device=x.device)).sum() + sum(h.float().sum() for h in h_n)
    grads = torch.autograd.grad(loss, [x, *hx, *mod.parameters()])
    return [y, *h_n, *grads]


def set_tf32(on: bool) -> None:
    """fp32 products in TF32 or IEEE, for cuDNN and (by the same flag) fastrnn."""
    torch.backends.cudnn.allow_tf32 = on


def parity(kind: str, shapes, dtypes, device, lines) -> bool:
    """``kind`` per dtype against the float64 oracle (the same module on the torch path), with
    cuDNN's own error in that dtype beside it (torch's CPU module off CUDA): outputs, final states,
    every gradient (input, initial states, all parameters); the max relative error and where."""
    ok = True
    lines += [f"| {kind} B | T | I | H | dtype | fastrnn max rel err | worst | torch max rel err | status |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in shapes:
        B, T, I, H = SHAPES[name]
        if kind == "lstm-proj" and H < 2:
            continue  # proj_size must be below hidden_size
        ref, x64, hx64, want = oracle(kind, B, T, I, H, device)
        for dname in dtypes:
            row, good = parity_row(kind, ref, x64, hx64, want, dname, device)
            ok &= good
            lines.append(f"| {B} | {T} | {I} | {H} | {row} | {'ok' if good else 'FAIL'} |")
    set_tf32(True)
    return ok


def oracle(kind: str, B: int, T: int, I: int, H: int, device):
    """``(torch module in float64, x, initial states, the float64 results)``: the results of the
    fastrnn module on the torch path (the plain loop), from seed 0."""
    torch.manual_seed(0)
    ref = build(kind, I, H, torch.float64, device, fused=False)
    x64 = torch.randn(T, B, I, dtype=torch.float64, device=device)
    widths = [getattr(ref, "proj_size", 0) or H, H][:len(cell_of_kind(kind)[0].state)]  # h0 (and c0)
    hx64 = [torch.randn(1, B, w, dtype=torch.float64, device=device) for w in widths]
    os.environ["FASTRNN_BACKEND"] = "torch"
    want = run_cell(build(kind, I, H, torch.float64, device), ref, x64, hx64)
    os.environ["FASTRNN_BACKEND"] = "triton"
    return ref, x64, hx64, want


def parity_row(kind, ref, x64, hx64, want, dname: str, device) -> tuple[str, bool]:
    """One dtype's row cells ``dtype | fastrnn err | worst | torch err`` and whether it passes."""
    dtype = DTYPES[dname]
    set_tf32(dname == "tf32")
    H = ref.hidden_size
    mod = build(kind, ref.input_size, H, dtype, device)
    got = run_cell(mod, ref, x64, hx64, dtype)
    errs = [rel(g, w) for g, w in zip(got, want)]
    worst = max(range(len(errs)), key=lambda i: errs[i])
    torch_err = float("nan")
    if dname != "fp64":
        try:
            torch_err = max(rel(g, w) for g, w in zip(
                run_cell(build(kind, ref.input_size, H, dtype, device, fused=False), ref, x64, hx64, dtype), want))
        except RuntimeError:  # a dtype torch's CPU module does not take
            pass
    good = errs[worst] <= TOL[dname] and all(bool(torch.isfinite(g).all()) for g in got)
    return f"{dname} | {errs[worst]:.1e} | {quantities(kind, mod)[worst]} | {torch_err:.1e}", good


def barrier(device, lines, smoke=False) -> bool:
    """Per cell, the tiled variant forced on one batch block of H / 16 programs that meet at a grid
    barrier after every step of a long sequence: the first run against the float64 torch path,
    then forward and backward repeated, bitwise identical each time, and again while a second
    stream keeps the GPU busy (a thread of CPU matrix products off CUDA). Any fallback from the
    cooperative tiled launch (the launcher's warnings) is reported and fails the row."""
    (B, T, I, H), repeats = BARRIER["smoke" if smoke else "gpu"]
    ok = True
    for kind in CELLS:
        os.environ["FASTRNN_VARIANT"] = "tiled"
        with launcher_warnings() as warned:
            first, err = barrier_first_run(kind, B, T, I, H, device)
            start = time.perf_counter()
            same = [repeat_equal(kind, first, device) for _ in range(repeats)]
            with busy_second_stream(device, seconds=time.perf_counter() - start):
                busy = [repeat_equal(kind, first, device) for _ in range(repeats)]
        os.environ.pop("FASTRNN_VARIANT", None)
        good = all(same) and all(busy) and err < TOL["tf32"] and not warned
        ok &= good
        lines.append(f"- barrier {kind} B={B} T={T} H={H} fp32 tiled: rel err vs fp64 {err:.1e}; "
                     f"{sum(same)}/{repeats} bitwise identical, {sum(busy)}/{repeats} with a second stream busy"
                     f"{'; fell back: ' + warned[0] if warned else ''}: {'ok' if good else 'FAIL'}")
    return ok


def barrier_first_run(kind: str, B: int, T: int, I: int, H: int, device):
    """The first run of the barrier section (inputs, module and results kept for the repeats) and its
    error against the float64 oracle."""
    torch.manual_seed(5)
    ref = build(kind, I, H, torch.float64, device, fused=False)
    x = torch.randn(T, B, I, dtype=torch.float64, device=device)
    hx = [torch.randn(1, B, H, dtype=torch.float64, device=device) for _ in cell_of_kind(kind)[0].state]
    os.environ["FASTRNN_BACKEND"] = "torch"
    want = run_cell(build(kind, I, H, torch.float64, device), ref, x, hx)
    os.environ["FASTRNN_BACKEND"] = "triton"
    mod = build(kind, I, H, torch.float32, device)
    got = run_cell(mod, ref, x, hx, torch.float32)
    first = dict(mod=mod, ref=ref, x=x, hx=hx, got=got)
    return first, max(rel(g, w) for g, w in zip(got, want))


def repeat_equal(kind: str, first: dict, device) -> bool:
    """Whether one more forward and backward gives bitwise the first run's results."""
    again = run_cell(first["mod"], first["ref"], first["x"], first["hx"], torch.float32)
    synchronize(device)
    return all(torch.equal(a, b) for a, b in zip(again, first["got"]))


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _Collect(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record):
        self.into.append(record.getMessage()[:160])


class launcher_warnings:
    """``with launcher_warnings() as warned:`` collects the fastrnn logger's warnings (a launch that
    fell back from its cooperative tiled launch to one launch per step says so there)."""

    def __enter__(self) -> list:
        self.warned = []
        self.handler = _Collect(self.warned)
        logging.getLogger("fastrnn").addHandler(self.handler)
        return self.warned

    def __exit__(self, *exc):
        logging.getLogger("fastrnn").removeHandler(self.handler)


class busy_second_stream:
    """``with busy_second_stream(device, seconds):`` keeps the GPU busy with matrix products on a
    second stream for about ``seconds`` (queued up front; waited for on exit); off CUDA, a thread
    doing CPU matrix products for as long as the block runs."""

    def __init__(self, device, seconds: float):
        self.cuda, self.seconds = torch.device(device).type == "cuda", seconds

    def __enter__(self):
        a = torch.randn(8192, 8192, device="cuda") if self.cuda else torch.randn(256, 256)
        if not self.cuda:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=lambda: [a @ a for _ in iter(self.stop.is_set, True)])
            self.thread.start()
            return self
        self.stream = torch.cuda.Stream()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(3):
            a @ a
        torch.cuda.synchronize()
        n = int(self.seconds / max((time.perf_counter() - start) / 3, 1e-6)) + 1  # a few hundred at most
        with torch.cuda.stream(self.stream):
            for _ in range(n):
                a @ a
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.stream.synchronize()
        else:
            self.stop.set()
            self.thread.join()


def extremes(device, lines, smoke=False) -> bool:
    ok = True
    # (a) T*B*H past 2**31: 70000 * 128 * 256 = 2.29e9 elements, bf16
    T, B, H = (7, 3, 16) if smoke else (70000, 128, 256)
    torch.manual_seed(1)
    w = torch.randn(H, H, device=device, dtype=torch.bfloat16) / H ** 0.5
    x_proj = torch.randn(T, B, H, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        y, h_n = fastrnn.recurrence(x_proj, None, w)
        # the loop on the last rows only, from the fused state 16 steps before the end
        k = min(16, T - 1)
        y_ref, _ = recurrence_reference(x_proj[-k:].double(), y[-k - 1].double(), w.double())
    err = rel(y[-k:], y_ref)
    good = err < 5e-2 and bool(torch.isfinite(y[-1]).all())
    ok &= good
    lines.append(f"- T*B*H = {T * B * H:.3e} elements (bf16): last {k} steps vs loop rel err {err:.1e}: "
                 f"{'ok' if good else 'FAIL'}")
    del x_proj, y
    # (b) T = 100000 forward and backward
    T, B, H = (50, 2, 8) if smoke else (100000, 4, 64)
    x_proj = torch.randn(T, B, H, device=device, dtype=torch.float32, requires_grad=True)
    w = (torch.randn(H, H, device=device) / H ** 0.5).requires_grad_()
    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    t0 = time.perf_counter()
    y, h_n = fastrnn.recurrence(x_proj, None, w)
    y.sum().backward()
    finite = bool(torch.isfinite(x_proj.grad).all() and torch.isfinite(w.grad).all())
    mem = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    k = min(200, T - 1)
    y_ref, _ = recurrence_reference(x_proj.detach()[-k:].double(), y[-k - 1].detach().double(),
                                    w.detach().double())
    err = rel(y[-k:], y_ref)
    good = finite and err < 1e-2
    ok &= good
    lines.append(f"- T={T} B={B} H={H} fp32 fwd+bwd: finite grads {finite}, last {k} steps rel err "
                 f"{err:.1e}, peak {mem:.0f} MiB, {time.perf_counter() - t0:.2f} s: {'ok' if good else 'FAIL'}")
    # (c) H = 8192: past what fits on chip
    T, B, H = (3, 2, 40) if smoke else (8, 4, 8192)
    x_proj = torch.randn(T, B, H, device=device)
    w = torch.randn(H, H, device=device) / H ** 0.5
    with torch.no_grad():
        y, _ = fastrnn.recurrence(x_proj, None, w)
        y_ref, _ = recurrence_reference(x_proj.double(), None, w.double())
    err = rel(y, y_ref)
    good = err < 1e-2
    ok &= good
    lines.append(f"- H={H} (T={T}, B={B}) fp32: rel err {err:.1e}: {'ok' if good else 'FAIL'}")
    return ok


def variants(device, lines, smoke=False) -> bool:
    ok = True
    for variant in ("resident", "tiled", "stepwise"):
        os.environ["FASTRNN_VARIANT"] = variant
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(2)
            H = 64 if variant == "resident" else (40 if smoke else 200)
            x = torch.randn(9 if smoke else 33, 19, H, device=device, dtype=dtype, requires_grad=True)
            w = (torch.randn(H, H, device=device) / H ** 0.5).to(dtype).requires_grad_()
            y, h_n = fastrnn.recurrence(x, None, w)
            y.float().sum().backward()
            y_ref, _ = recurrence_reference(x.detach().double(), None, w.detach().double())
            err = rel(y, y_ref)
            good = err < (1e-2 if dtype == torch.float32 else 5e-2) and bool(torch.isfinite(w.grad).all())
            ok &= good
            lines.append(f"- variant {variant} {dtype}: rel err {err:.1e}: {'ok' if good else 'FAIL'}")
    os.environ.pop("FASTRNN_VARIANT", None)
    return ok


def ecosystem(device, lines, smoke=False) -> bool:
    """torch.compile fullgraph, opcheck, autocast and determinism on the fused path."""
    from fastrnn.elman import elman_fwd_op

    ok = True
    torch.manual_seed(3)
    model = fastrnn.RNN(16, 32, 2, bidirectional=True).to(device)
    x = torch.randn(12, 4, 16, device=device, requires_grad=True)

    def grads(m):
        y, h = m(x)
        return [y, h, *torch.autograd.grad(y.square().sum() + h.sum(), [x, *model.parameters()])]

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if smoke else "inductor")
    errs = [rel(a, b) for a, b in zip(grads(compiled), grads(model))]
    good = max(errs) < 1e-5
    ok &= good
    lines.append(f"- torch.compile(fullgraph=True) vs eager: max rel err {max(errs):.1e}: {'ok' if good else 'FAIL'}")
    every = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    for dtype in every[:2] if smoke else every:
        xp = torch.randn(5, 3, 24, device=device, dtype=dtype, requires_grad=True)
        h0 = torch.randn(3, 24, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(24, 24, device=device) / 5).to(dtype).requires_grad_()
        lengths = torch.tensor([5, 2, 4], device=device)  # on the device under test, as the op requires
        try:
            torch.library.opcheck(elman_fwd_op, (xp, h0, w, "tanh", True, lengths, "triton"))
            lines.append(f"- opcheck fastrnn::elman_fwd {dtype}: ok")
        except Exception as e:  # noqa: BLE001 - reported, then the run fails
            ok = False
            lines.append(f"- opcheck fastrnn::elman_fwd {dtype}: FAIL {type(e).__name__}: {e}")
    ok &= autocast_rows(model, x, device, lines)
    a, b = grads(model), grads(model)
    good = all(torch.equal(u, v) for u, v in zip(a, b))
    ok &= good
    lines.append(f"- bitwise repeatable forward and backward: {'ok' if good else 'FAIL'}")
    ok &= no_host_sync(device, lines)
    ok &= double_backward(device, lines)
    return ok


def no_host_sync(device, lines) -> bool:
    """A packed forward and backward of each module, and a padded one with resets, make the host wait
    for the GPU nowhere; a warm forward with resets replays from a CUDA graph as it runs eagerly."""
    from torch.nn.utils.rnn import pack_padded_sequence

    ok = True
    lengths = torch.tensor([9, 4, 7, 1])
    for name in ("RNN", "LSTM", "GRU"):
        mod = getattr(fastrnn, name)(8, 16, 2, bidirectional=True).to(device)
        x = torch.randn(9, 4, 8, device=device, requires_grad=True)
        packed = pack_padded_sequence(x.detach(), lengths, enforce_sorted=False)  # made before the check, once
        resets = torch.rand(9, 4, device=device) < 0.2
        for what, run in (("packed", lambda: mod(packed)[0].data), ("resets", lambda: mod(x, resets=resets)[0])):
            run().sum().backward()  # compiles the kernels first
            good, why = without_sync(device, lambda: run().sum().backward())
            ok &= good
            lines.append(f"- {name} {what} forward+backward without a host sync: {'ok' if good else 'FAIL'}{why}")
        if device == "cuda":
            good, why = graph_replay_matches(mod, x.detach(), resets)
            ok &= good
            lines.append(f"- {name} forward with resets captured in a CUDA graph, replayed: "
                         f"{'ok' if good else 'FAIL'}{why}")
    return ok


def without_sync(device, run) -> tuple[bool, str]:
    """``run()`` under ``torch.cuda.set_sync_debug_mode("error")`` on a GPU: ``(no sync, why not)``."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        run()
        return True, ""
    except RuntimeError as e:  # raised by the sync debug mode at the synchronising call
        return False, f" ({str(e).splitlines()[0][:120]})"
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")


def graph_replay_matches(mod, x, resets) -> tuple[bool, str]:
    """A warm forward captured in a CUDA graph (on a side stream, as torch.cuda.graph does) and
    replayed on new input equals the eager call on it, bit for bit."""
    try:
        static_x = x.clone()
        with torch.no_grad():
            mod(static_x, resets=resets)  # warm
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y, _ = mod(static_x, resets=resets)
            static_x.copy_(torch.randn_like(x))
            graph.replay()
            want, _ = mod(static_x, resets=resets)
        torch.cuda.synchronize()
        return bool(torch.equal(static_y, want)), ""
    except Exception as e:  # noqa: BLE001 - whatever the capture raises is a finding, the check goes on
        return False, f" ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"


def double_backward(device, lines) -> bool:
    """Double backward of fastrnn.RNN on the fused path against the torch path, float64."""
    torch.manual_seed(4)
    results = []
    for backend in ("torch", "triton"):
        os.environ["FASTRNN_BACKEND"] = backend
        torch.manual_seed(4)
        rnn = fastrnn.RNN(5, 6, 2, bidirectional=True, dtype=torch.float64, device=device)
        x = torch.randn(7, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
        y, h_n = rnn(x)
        (gx,) = torch.autograd.grad(y.square().sum() + h_n.sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), [x, *rnn.parameters()]))
    err = max(rel(a, b) for a, b in zip(*results))
    good = err < 1e-9
    lines.append(f"- double backward (gradient penalty) fused vs torch path, fp64: rel err {err:.1e}: "
                 f"{'ok' if good else 'FAIL'}")
    return good


def autocast_rows(model, x, device, lines) -> bool:
    """Under autocast (bf16, fp16) fastrnn returns its input projection's dtype (``F.linear``'s under
    autocast: the autocast dtype) and is compared with what torch.nn.RNN really returns: cuDNN's RNN
    runs in fp16 under CUDA autocast whatever its dtype (on the CPU, torch's own choice)."""
    ok = True
    device_type = torch.device(device).type
    for dtype in (torch.bfloat16, torch.float16) if device_type == "cuda" else (torch.bfloat16,):
        ref = nn.RNN(16, 32, 2, bidirectional=True).to(device)
        ref.load_state_dict(model.state_dict())
        with torch.autocast(device_type, dtype=dtype):
            (y1, _), (y2, h2) = ref(x), model(x)
            expected = F.linear(x, ref.weight_ih_l0).dtype
        err = rel(y2, y1)
        good = y2.dtype == h2.dtype == expected and err < 3e-2
        ok &= good
        lines.append(f"- autocast {dtype}: fastrnn returns {y2.dtype} (its input projection's: {expected}), "
                     f"torch.nn.RNN {y1.dtype}; rel err vs torch {err:.1e}: {'ok' if good else 'FAIL'}")
    return ok



# What the sections launch, as the compile sweep's cases (scripts/compile_check.py): ``(kind,
# direction, B, H, dtype name, flags)``, fp32 being TF32 wherever a section keeps torch's default.
# scripts/gpu_session.py compiles them ahead of the runs.
NO_STATE = dict(h0=False, lengths=False, reverse=False)
WITH_STATE = dict(h0=True, lengths=False, reverse=False)


def both_ways(kind: str, B: int, H: int, dtype_name: str, flags: dict) -> list[tuple]:
    return [(kind, direction, B, H, dtype_name, flags) for direction in ("fwd", "bwd")]


def kernel_cases(sections, kinds=KINDS, shapes=ODD + SUITE, dtypes=tuple(DTYPES)) -> list[tuple]:
    """The kernels ``sections`` launch on a GPU (parity with ``kinds``, ``shapes``, ``dtypes``)."""
    cases = []
    if "parity" in sections:
        cases += [c for kind in kinds for name in shapes for dname in dtypes
                  if not (kind == "lstm-proj" and SHAPES[name][3] < 2)
                  for c in both_ways(kind, SHAPES[name][0], SHAPES[name][3], dname, WITH_STATE)]
    if "barrier" in sections:
        (B, _, _, H), _ = BARRIER["gpu"]
        cases += [c for kind in CELLS for c in both_ways(kind, B, H, "tf32", dict(WITH_STATE, variant="tiled"))]
    if "extremes" in sections:
        cases += [("rnn", "fwd", 128, 256, "bf16", NO_STATE), *both_ways("rnn", 4, 64, "tf32", NO_STATE),
                  ("rnn", "fwd", 4, 8192, "tf32", NO_STATE)]
    if "variants" in sections:
        cases += [c for variant, H in (("resident", 64), ("tiled", 200), ("stepwise", 200))
                  for dname in ("tf32", "bf16")
                  for c in both_ways("rnn", 19, H, dname, dict(NO_STATE, variant=variant))]
    if "ecosystem" in sections:
        cases += ecosystem_cases()
    return cases


def ecosystem_cases() -> list[tuple]:
    """The ecosystem section's kernels: the two-layer bidirectional RNN (compile, autocast, bitwise),
    opcheck's op, the packed modules, the modules with resets and the double backward."""
    both = [dict(NO_STATE, reverse=r) for r in (False, True)]
    packed = [dict(NO_STATE, lengths=True, reverse=r) for r in (False, True)]
    cases = [c for f in both for c in both_ways("rnn", 4, 32, "tf32", f)]
    cases += [("rnn", "fwd", 4, 32, dname, f) for dname in ("bf16", "fp16") for f in both]  # autocast
    cases += [c for dname in ("tf32", "bf16", "fp16", "fp64")
              for c in both_ways("rnn", 3, 24, dname, dict(h0=True, lengths=True, reverse=True))]  # opcheck
    cases += [c for kind in CELLS for f in packed for c in both_ways(kind, 4, 16, "tf32", f)]
    cases += [c for kind in CELLS for r in (False, True)  # the resets calls and their graph capture
              for c in both_ways(kind, 4, 16, "tf32", dict(NO_STATE, reverse=r, resets=True))]
    return cases + [c for f in both for c in both_ways("rnn", 3, 6, "fp64", f)]  # double backward


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="also write the report here (markdown)")
    p.add_argument("--quick", action="store_true", help="parity on the odd shapes and suite shapes 1, 2, 8 only")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"some of {','.join(SECTIONS)}")
    p.add_argument("--kinds", default=",".join(KINDS), help="the parity section's cells")
    p.add_argument("--shapes", default=None, help=f"the parity section's shapes, of {','.join(SHAPES)}")
    p.add_argument("--dtypes", default=None, help=f"the parity section's dtypes, of {','.join(DTYPES)}")
    args = p.parse_args(argv)
    args.sections, args.kinds = args.sections.split(","), args.kinds.split(",")
    default_shapes = SMOKE if args.smoke else (QUICK if args.quick else ODD + SUITE)
    args.shapes = args.shapes.split(",") if args.shapes else default_shapes
    args.dtypes = args.dtypes.split(",") if args.dtypes else (["fp64", "fp32", "bf16"] if args.smoke else list(DTYPES))
    for name, given, known in (("section", args.sections, SECTIONS), ("kind", args.kinds, KINDS),
                               ("shape", args.shapes, SHAPES), ("dtype", args.dtypes, DTYPES)):
        if set(given) - set(known):
            p.error(f"unknown {name}: {', '.join(sorted(set(given) - set(known)))}")
    return args


def run_sections(args, device, lines) -> dict:
    """``{section name: passed}`` of the sections asked for, their reports appended to ``lines``."""
    results = {}
    if "parity" in args.sections:
        for kind in args.kinds:
            results[f"{kind} parity"] = parity(kind, args.shapes, args.dtypes, device, lines)
            lines.append("")
    if "barrier" in args.sections:
        results["barrier"] = barrier(device, lines, smoke=args.smoke)
    if "extremes" in args.sections:
        results["extremes"] = extremes(device, lines, smoke=args.smoke)
    if "variants" in args.sections:
        results["variants"] = variants(device, lines, smoke=args.smoke)
    if "ecosystem" in args.sections:
        results["ecosystem"] = ecosystem(device, lines, smoke=args.smoke)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (or --smoke)")
        return 1
    os.environ["FASTRNN_BACKEND"] = "triton"
    lines = [f"# fastrnn GPU check on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}",
             f"torch {torch.__version__}", ""]
    results = run_sections(args, device, lines)
    lines.append("")
    lines += [f"{k}: {'PASS' if v else 'FAIL'}" for k, v in results.items()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
