"""The GPU proof: the fused path on CUDA against a float64 reference, plus the checks that need a GPU.

    python tests/gpu_check.py [--out results.md] [--quick]
    python tests/gpu_check.py --smoke        # tiny shapes on CPU under TRITON_INTERPRET=1 (CI runs this)

Sections (each prints a markdown table and a PASS/FAIL line; the exit status is non-zero on any FAIL):
1. parity: every published shape and a few odd ones, fp64 / fp32 (IEEE and TF32) / bf16 / fp16,
   ``fastrnn.RNN`` outputs, h_n and every gradient against ``recurrence_reference``-based float64
   modules, max relative error (norm-wise) per quantity; outputs poisoned with NaN first.
2. extremes: T*B*H past 2**31 (T=70000, B=128, H=256, bf16) checked on a slice against the loop;
   T=100000 forward and backward finite and matching; H=8192 through the fallback path.
3. variants: every kernel variant forced on one shape.
4. ecosystem: torch.compile(fullgraph=True) against eager, opcheck per dtype, CUDA autocast
   (bf16, fp16) against torch.nn.RNN under autocast, bitwise repeatability, packed forward and
   backward of every module under ``torch.cuda.set_sync_debug_mode("error")`` (no host sync),
   double backward on the fused path against the torch path.
5. LSTM and GRU parity: ``fastrnn.LSTM`` / ``fastrnn.GRU`` per dtype against float64, every output
   and gradient, with cuDNN's own error in the same dtype beside it.
Sanitizers: ``bash tests/sanitize.sh`` runs compute-sanitizer memcheck and racecheck over the kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["FASTRNN_BACKEND"] = "triton"

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fastrnn  # noqa: E402
from fastrnn.ops import recurrence_reference  # noqa: E402

SUITE = [(32, 35, 28, 512), (32, 256, 256, 256), (64, 512, 512, 512), (128, 1024, 1024, 1024),
         (16, 1024, 2048, 2048), (256, 256, 256, 256), (1, 4096, 512, 512), (8, 2048, 128, 128)]
ODD = [(17, 63, 5, 130), (3, 9, 7, 1000), (300, 5, 9, 64), (1, 2, 3, 1)]
SMOKE = [(3, 5, 4, 20), (2, 3, 2, 1)]
TOL = {"fp64": 1e-9, "fp32": 1e-4, "tf32": 1e-2, "bf16": 5e-2, "fp16": 1e-2}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16}


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    n = b.norm().item()
    return (a - b).norm().item() / (n if n > 0 else 1.0)


def parity(shapes, dtypes, device, lines) -> bool:
    ok = True
    lines.append("| B | T | I | H | dtype | y | h_n | dx | dh0 | dW_ih | dW_hh | db | status |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for B, T, I, H in shapes:
        torch.manual_seed(0)
        ref = nn.RNN(I, H, dtype=torch.float64, device=device)
        x64 = torch.randn(T, B, I, dtype=torch.float64, device=device)
        h64 = torch.randn(1, B, H, dtype=torch.float64, device=device)
        dy = torch.randn(T, B, H, dtype=torch.float64, device=device)
        os.environ["FASTRNN_BACKEND"] = "torch"  # the float64 oracle: the plain loop
        want = run(fastrnn.RNN(I, H, dtype=torch.float64, device=device), ref, x64, h64, dy)
        os.environ["FASTRNN_BACKEND"] = "triton"
        for name in dtypes:
            dtype = DTYPES[name]
            torch.backends.cudnn.allow_tf32 = name == "tf32"
            mod = fastrnn.RNN(I, H, dtype=dtype, device=device)
            got = run(mod, ref, x64.to(dtype), h64.to(dtype), dy.to(dtype))
            errs = [rel(g, w) for g, w in zip(got, want)]
            good = all(e <= TOL[name] for e in errs) and all(torch.isfinite(g).all() for g in got)
            ok &= good
            lines.append(f"| {B} | {T} | {I} | {H} | {name} | " + " | ".join(f"{e:.1e}" for e in errs)
                         + f" | {'ok' if good else 'FAIL'} |")
    torch.backends.cudnn.allow_tf32 = True
    return ok


def run(mod, ref, x, h0, dy):
    mod.load_state_dict({k: v.to(mod.weight_hh_l0.dtype) for k, v in ref.state_dict().items()})
    x, h0 = x.clone().requires_grad_(), h0.clone().requires_grad_()
    y, h_n = mod(x, h0)
    (y * dy).sum().add(h_n.float().sum()).backward()
    b = mod.bias_ih_l0.grad
    return [y, h_n, x.grad, h0.grad, mod.weight_ih_l0.grad, mod.weight_hh_l0.grad, b]


GATED = {"lstm": (nn.LSTM, "LSTM"), "lstm-proj": (nn.LSTM, "LSTM"), "gru": (nn.GRU, "GRU")}  # lstm-proj: P = H // 2


def gated_parity(cell, shapes, dtypes, device, lines) -> bool:
    """fastrnn.LSTM / GRU (fused) per dtype against the float64 oracle (the same module on the
    torch path), with cuDNN's own error in that dtype beside it: outputs, final states, every
    gradient (input, initial states, all parameters), max relative error over them."""
    torch_cls, name = GATED[cell]
    ok = True
    lines += [f"| {cell} B | T | I | H | dtype | fastrnn max rel err | cuDNN max rel err | status |",
              "|---|---|---|---|---|---|---|---|"]
    for B, T, I, H in shapes:
        if cell == "lstm-proj" and H < 2:
            continue  # proj_size must be below hidden_size
        torch.manual_seed(0)
        kw = dict(proj_size=H // 2) if cell == "lstm-proj" else {}  # reductions over P < 16 too
        ref = torch_cls(I, H, dtype=torch.float64, device=device, **kw)
        x64 = torch.randn(T, B, I, dtype=torch.float64, device=device)
        widths = [kw.get("proj_size", H), H][:1 if cell == "gru" else 2]  # h0 (and c0)
        hx64 = [torch.randn(1, B, w, dtype=torch.float64, device=device) for w in widths]
        os.environ["FASTRNN_BACKEND"] = "torch"
        want = run_cell(getattr(fastrnn, name)(I, H, dtype=torch.float64, device=device, **kw), ref, x64, hx64)
        os.environ["FASTRNN_BACKEND"] = "triton"
        for dname in dtypes:
            dtype = DTYPES[dname]
            torch.backends.cudnn.allow_tf32 = dname == "tf32"
            got = run_cell(getattr(fastrnn, name)(I, H, dtype=dtype, device=device, **kw), ref, x64, hx64, dtype)
            cudnn = run_cell(torch_cls(I, H, dtype=dtype, device=device, **kw), ref, x64, hx64, dtype) \
                if device == "cuda" and dname != "fp64" else None
            err = max(rel(g, w) for g, w in zip(got, want))
            cudnn_err = max(rel(g, w) for g, w in zip(cudnn, want)) if cudnn else float("nan")
            good = err <= TOL[dname] and all(torch.isfinite(g).all() for g in got)
            ok &= good
            lines.append(f"| {B} | {T} | {I} | {H} | {dname} | {err:.1e} | {cudnn_err:.1e} | {'ok' if good else 'FAIL'} |")
    torch.backends.cudnn.allow_tf32 = True
    return ok


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
    from fastrnn.ops import recurrence_fwd_op

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
    for dtype in (torch.float32, torch.bfloat16) if smoke else (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        xp = torch.randn(5, 3, 24, device=device, dtype=dtype, requires_grad=True)
        h0 = torch.randn(3, 24, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(24, 24, device=device) / 5).to(dtype).requires_grad_()
        try:
            torch.library.opcheck(recurrence_fwd_op, (xp, h0, w, "tanh", True, torch.tensor([5, 2, 4]), "triton"))
            lines.append(f"- opcheck fastrnn::recurrence_fwd {dtype}: ok")
        except Exception as e:  # noqa: BLE001 - reported, then the run fails
            ok = False
            lines.append(f"- opcheck fastrnn::recurrence_fwd {dtype}: FAIL {type(e).__name__}: {e}")
    if device == "cuda":
        for dtype in (torch.bfloat16, torch.float16):
            ref = nn.RNN(16, 32, 2, bidirectional=True).to(device)
            ref.load_state_dict(model.state_dict())
            with torch.autocast("cuda", dtype=dtype):
                (y1, h1), (y2, h2) = ref(x), model(x)
            good = y1.dtype == y2.dtype and h1.dtype == h2.dtype and rel(y2, y1) < 3e-2
            ok &= good
            lines.append(f"- autocast {dtype}: dtypes {y2.dtype}/{y1.dtype}, rel err vs cuDNN {rel(y2, y1):.1e}: "
                         f"{'ok' if good else 'FAIL'}")
    a, b = grads(model), grads(model)
    good = all(torch.equal(u, v) for u, v in zip(a, b))
    ok &= good
    lines.append(f"- bitwise repeatable forward and backward: {'ok' if good else 'FAIL'}")
    ok &= no_host_sync(device, lines)
    ok &= double_backward(device, lines)
    return ok


def no_host_sync(device, lines) -> bool:
    """A packed forward and backward of each module makes the host wait for the GPU nowhere."""
    from torch.nn.utils.rnn import pack_padded_sequence

    ok = True
    lengths = torch.tensor([9, 4, 7, 1])
    for name in ("RNN", "LSTM", "GRU"):
        mod = getattr(fastrnn, name)(8, 16, 2, bidirectional=True).to(device)
        x = torch.randn(9, 4, 8, device=device, requires_grad=True)
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)  # made before the check
        mod(packed)  # compiles the kernels first
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            out, _ = mod(packed)
            out.data.sum().backward()
            good, why = True, ""
        except RuntimeError as e:  # raised by the sync debug mode at the synchronising call
            good, why = False, f" ({str(e).splitlines()[0][:120]})"
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        ok &= good
        lines.append(f"- {name} packed forward+backward without a host sync: {'ok' if good else 'FAIL'}{why}")
    return ok


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="odd shapes and shapes 1, 2, 8 only")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU (or --smoke)")
        return 1
    os.environ["FASTRNN_BACKEND"] = "triton"
    lines = [f"# fastrnn GPU check on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (interpreter)'}",
             f"torch {torch.__version__}", ""]
    shapes = SMOKE if args.smoke else (ODD + [SUITE[i] for i in (0, 1, 7)] if args.quick else ODD + SUITE)
    dtypes = ["fp64", "fp32", "bf16"] if args.smoke else list(DTYPES)
    results = {"parity": parity(shapes, dtypes, device, lines)}
    lines.append("")
    gated_shapes = SMOKE if args.smoke else (ODD + [SUITE[i] for i in (0, 1, 7)] if args.quick else ODD + SUITE)
    for cell in GATED:
        results[f"{cell} parity"] = gated_parity(cell, gated_shapes, dtypes, device, lines)
        lines.append("")
    results["extremes"] = extremes(device, lines, smoke=args.smoke)
    results["variants"] = variants(device, lines, smoke=args.smoke)
    results["ecosystem"] = ecosystem(device, lines, smoke=args.smoke)
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
