"""Compile every fused kernel for Hopper (sm_90) without a GPU and report its register use.

    python tests/compile_check.py            # the suite's configs on a 132-SM H100, and every flag set

Triton's NVIDIA backend and ptxas ship in the triton wheel, so the kernels are compiled all the way
to a cubin here, on a CPU-only machine; cuobjdump reads each cubin's registers and stack (spills).
A kernel that fails to compile, spills more than 64 bytes of stack per thread, or asks for more
shared memory than an H100 SM has (227 KB), fails the run.
It cannot run the kernels: that is tests/gpu_check.py, on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fastrnn.kernels.config as config  # noqa: E402
from fastrnn.kernels.recurrence_bwd import _bwd_resident_kernel, _bwd_tiled_kernel  # noqa: E402
from fastrnn.kernels.recurrence_fwd import _fwd_resident_kernel, _fwd_tiled_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_STACK = 64
MAX_SHARED = 232448  # bytes of shared memory one H100 program may use
SUITE = {1: (32, 512), 2: (32, 256), 3: (64, 512), 4: (128, 1024), 5: (16, 2048), 6: (256, 256),
         7: (1, 512), 8: (8, 128)}
TL = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
POINTERS = {"lengths_ptr": "*i64", "sync_ptr": "*i32"}


def compile_one(kernel, dtype, cfg, H=None, **flags):
    """Compile ``kernel`` for sm_90 (hidden size ``H`` decides W_RESIDENT for the tiled kernels);
    returns (registers, stack bytes, shared-memory bytes)."""
    ptr = "*" + TL[dtype]
    constexprs = dict(ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32,
                      PRECISION="tf32" if dtype == torch.float32 else "ieee", **flags)
    if cfg.variant == "resident":
        constexprs.update(BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_n)
    else:
        constexprs.update(BLOCK_B=cfg.block_b, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                          SYNC=cfg.variant == "tiled")
        constexprs.setdefault("W_RESIDENT", cfg.block_k >= H)
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, ptr)
        else:
            signature[name] = "i32"
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET,
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return (*resource_usage(compiled.asm["cubin"]), compiled.metadata.shared)


def resource_usage(cubin: bytes) -> tuple[int, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(tok.split(":") for tok in out.split() if tok.startswith(("REG:", "STACK:")))
    return int(fields["REG"]), int(fields["STACK"])


def kernels_for(cfg):
    if cfg.variant == "resident":
        return [("fwd", _fwd_resident_kernel, {"HAS_H0": True}), ("bwd", _bwd_resident_kernel, {})]
    return [("fwd", _fwd_tiled_kernel, {"HAS_H0": True}), ("bwd", _bwd_tiled_kernel, {})]


def main() -> int:
    config._sm_count = lambda device: 132  # an H100
    ok = True
    print("| # | B | H | dtype | variant | blocks (B, N, K) | warps | fwd regs/stack/smem KB | bwd regs/stack/smem KB |")
    print("|---|---|---|---|---|---|---|---|---|")
    cases = [(f"#{k}", B, H, dt) for k, (B, H) in SUITE.items() for dt in (torch.float32, torch.bfloat16)]
    cases += [("odd", 17, 130, dt) for dt in (torch.float16, torch.float64)]
    cases += [("big", 4096, 8192, torch.float32)]
    for name, B, H, dtype in cases:
        cfg = config._pick_config(B, H, dtype, torch.device("cuda"), "")
        usage = []
        for _, kernel, extra in kernels_for(cfg):
            try:
                regs, stack, shared = compile_one(kernel, dtype, cfg, H, ACTIVATION=0, REVERSE=False,
                                                  HAS_LENGTHS=False, **extra)
            except Exception as e:  # noqa: BLE001 - reported, then the run fails
                ok = False
                usage.append(f"FAIL {type(e).__name__}: {str(e)[:300]}")
                continue
            ok &= stack <= MAX_STACK and shared <= MAX_SHARED
            usage.append(f"{regs}/{stack}/{shared // 1024}")
        print(f"| {name} | {B} | {H} | {TL[dtype]} | {cfg.variant} | {cfg.block_b}, {cfg.block_n}, "
              f"{cfg.block_k} | {cfg.num_warps} | {usage[0]} | {usage[1]} |")
    # every constexpr flag combination compiles (small blocks; w_hh resident and streamed)
    for variant, H in (("resident", 32), ("tiled", 32), ("tiled", 100)):
        cfg = config.Config(variant, 16, 32, 32)
        for act in (0, 1):
            for reverse in (False, True):
                for lengths in (False, True):
                    for _, kernel, extra in kernels_for(cfg):
                        extra = {k: False for k in extra}  # HAS_H0 off here; on above
                        try:
                            compile_one(kernel, torch.float32, cfg, H, ACTIVATION=act, REVERSE=reverse,
                                        HAS_LENGTHS=lengths, **extra)
                        except Exception as e:  # noqa: BLE001
                            ok = False
                            print(f"FAIL {variant} H={H} act={act} reverse={reverse} lengths={lengths}: "
                                  f"{str(e)[:500]}")
    print("compile check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
