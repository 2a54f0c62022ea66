"""kernels/launch.py: the grid barrier (wrap-safe, with several programs per group, run concurrently
under the interpreter), the cooperative launch and its fallback to one launch per step, occupancy."""

import importlib
import logging
import math
import os

import pytest
import torch
import triton
import triton.language as tl  # noqa: F401 - the jit'd stand-in barrier below needs it in scope

import fastrnn.kernels.launch as launch
from fastrnn.kernels import Config, elman_bwd, elman_fwd

from .interpreter_threads import check_supported, concurrent_programs

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_why_not = None if INTERPRETED else "runs kernels under the Triton interpreter"
threaded = pytest.mark.skipif((_why_not or check_supported()) is not None,
                              reason=f"concurrent interpreter: {_why_not or check_supported()}")


def operands(T, B, H, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, B, H, generator=g) * 0.5).to(dtype)
    h0 = (torch.randn(B, H, generator=g) * 0.5).to(dtype)
    w = (torch.randn(H, H, generator=g) / H ** 0.5).to(dtype)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    dy, dh_n = torch.randn(T, B, H, generator=g).to(dtype), torch.randn(B, H, generator=g).to(dtype)
    return x, h0, w, lens, dy, dh_n


def fwd_bwd(x, h0, w, lens, dy, dh_n, config):
    y, h_n = elman_fwd(x, h0, w, "tanh", False, lens, config=config)
    return y, elman_bwd(dy, dh_n, y, w, "tanh", False, lens, config=config), h_n


@pytest.fixture
def counters(monkeypatch):
    """The barrier counters each launch gets, started at the value the test sets."""
    made, start = [], {"value": 0}

    def arrival_counters(n, device):
        made.append(torch.full((n,), start["value"], dtype=torch.int32, device=device))
        return made[-1]

    monkeypatch.setattr(launch, "arrival_counters", arrival_counters)
    return made, start


@pytest.mark.skipif(not INTERPRETED, reason="interpreter only")
@pytest.mark.parametrize("start", [0, -2**31], ids=["0", "0x80000000"])
@pytest.mark.parametrize("T", [1, 6, 7])
def test_barrier_counter_wraps_safely(counters, poison, start, T):
    """Each barrier adds 2^31 modulo 2^32, so the counter crosses the int32 wrap point at every step;
    started at 0x80000000 (where a counter that grows lands after 2^31 arrivals: the old barrier
    waited for ever there) it still lets every step through, and ends where the flips say."""
    made, value = counters
    value["value"] = start
    x, h0, w, lens, dy, dh_n = operands(T, 5, 24)
    want = fwd_bwd(x, h0, w, lens, dy, dh_n, Config("stepwise", 16, 32, 32))
    got = fwd_bwd(x, h0, w, lens, dy, dh_n, Config("tiled", 16, 32, 32))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    flipped = start ^ (-2**31 if T % 2 else 0)  # one flip per barrier, one barrier per step
    assert [c.tolist() for c in made[-2:]] == [[flipped], [flipped]]


@threaded
@pytest.mark.parametrize("T,B,H,block_n,block_k,dtype", [
    (5, 20, 40, 16, 16, torch.float32),  # 3 programs per group, 2 groups, w_hh streamed
    (4, 19, 100, 16, 128, torch.float64),  # 7 programs per group, w_hh on chip
    (4, 17, 128, 16, 128, torch.bfloat16),  # 8 programs per group
    (3, 4, 32, 16, 32, torch.float32),  # 2 programs
])
@pytest.mark.parametrize("start", [0, -2**31], ids=["0", "0x80000000"])
def test_tiled_with_many_programs_per_group(T, B, H, block_n, block_k, dtype, start, counters, poison):
    """The tiled kernels' programs run concurrently, one thread each, and meet at the barrier: the
    result is bitwise the stepwise one (same blocks, one launch per step, no barrier). A barrier that
    did not wait would let programs read a step the others have not written (NaN, from poison)."""
    counters[1]["value"] = start
    args = operands(T, B, H, dtype)
    want = fwd_bwd(*args, Config("stepwise", 16, block_n, block_k))
    with concurrent_programs(timeout_s=120, delay=lambda idx: 0.02 if idx[1] == 1 else 0.0):
        got = fwd_bwd(*args, Config("tiled", 16, block_n, block_k))
    assert triton.cdiv(H, block_n) >= 2
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def gated_cell(cell, T, B, H, P, dtype, seed=0):
    """(forward, backward) of a gated cell's launchers, as functions of a Config, on random operands."""
    from fastrnn.kernels import gru_bwd, gru_fwd, lstm_bwd, lstm_fwd
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    G = 4 if cell == "lstm" else 3
    x, h0, c0 = rand(T, B, G * H), rand(B, P or H), rand(B, H)
    w_hh, w_hr, b_hn = rand(G * H, P or H, scale=(P or H) ** -0.5), rand(P, H, scale=H ** -0.5), rand(H)
    dy, dh_n, dc_n = rand(T, B, P or H), rand(B, P or H), rand(B, H)
    w_hr = w_hr if P else None
    if cell == "lstm":
        def fwd(cfg):
            return lstm_fwd(x, h0, c0, w_hh, w_hr, True, lens, config=cfg)

        def bwd(y, c, gates, cfg):
            return lstm_bwd(dy, dh_n, dc_n, y, c, gates, h0, c0, w_hh, w_hr, True, lens, config=cfg)
    else:
        def fwd(cfg):
            return gru_fwd(x, h0, w_hh, b_hn, False, lens, config=cfg)

        def bwd(y, gates, cfg):
            return gru_bwd(dy, dh_n, y, gates, h0, w_hh, False, lens, config=cfg)
    return fwd, bwd


@threaded
@pytest.mark.parametrize("cell,P,block_k", [("lstm", 0, 64), ("lstm", 0, 16), ("lstm", 20, 64), ("gru", 0, 64),
                                            ("gru", 0, 16)], ids=["lstm", "lstm-streamed", "lstm-proj", "gru",
                                                                  "gru-streamed"])
def test_gated_cells_with_many_programs_per_group(cell, P, block_k, poison):
    """LSTM (with and without a projection, whose step meets at a second barrier) and GRU: tiled
    with 3 programs per group, run concurrently, bitwise the stepwise result."""
    fwd, bwd = gated_cell(cell, 4, 5, 40, P, torch.float32)
    stepwise, tiled = Config("stepwise", 16, 16, block_k), Config("tiled", 16, 16, block_k)
    want = fwd(stepwise)
    saved = 3 if cell == "lstm" else 2  # (y, c, gates) or (y, gates); then the final states
    want_grads = bwd(*want[:saved], stepwise)
    with concurrent_programs(timeout_s=120, delay=lambda idx: 0.02 if idx[1] == 1 else 0.0):
        got = fwd(tiled)
        got_grads = bwd(*got[:saved], tiled)
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        assert torch.equal(a, b)


@threaded
def test_concurrent_interpreter_catches_a_barrier_that_does_not_wait(monkeypatch, poison):
    """The harness above can fail: with a barrier that returns at once, programs read unwritten steps."""
    from fastrnn.kernels.elman import fwd_tiled_kernel

    @triton.jit
    def no_barrier(sync_ptr, rank, n_programs):
        pass

    x, h0, w, lens, _, _ = operands(4, 5, 48)
    want = elman_fwd(x, h0, w, "tanh", False, lens, config=Config("stepwise", 16, 16, 16))
    monkeypatch.setitem(fwd_tiled_kernel.fn.__globals__, "grid_barrier", no_barrier)
    with concurrent_programs(timeout_s=60, delay=lambda idx: math.inf if idx[1] == 2 else 0.0):
        got = elman_fwd(x, h0, w, "tanh", False, lens, config=Config("tiled", 16, 16, 16))
    assert not torch.equal(got[0], want[0])


class Recorder:
    """Stands in for a Triton kernel: records each launch's grid and keyword arguments, and can
    refuse cooperative launches the way the CUDA driver does."""

    def __init__(self, kernel, refuse=None):
        self.kernel, self.refuse, self.launches = kernel, refuse, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, kwargs))
            if kwargs.get("launch_cooperative_grid") and self.refuse is not None:
                raise self.refuse
            return self.kernel[grid](*args, **kwargs)
        return run

    def warmup(self, *args, **kwargs):
        return self.kernel.warmup(*args, **kwargs)


def tiled_via(recorder, monkeypatch):
    fwd = importlib.import_module("fastrnn.kernels.elman")  # the module, not the function
    real = fwd.fwd_launch

    def fwd_launch(*args):
        kernel, grid, a, kw = real(*args)
        recorder.kernel = kernel
        return recorder, grid, a, kw

    monkeypatch.setattr(fwd, "fwd_launch", fwd_launch)


def test_tiled_launch_is_cooperative(monkeypatch):
    rec = Recorder(None)
    tiled_via(rec, monkeypatch)
    x, h0, w, lens, _, _ = operands(5, 3, 24)
    elman_fwd(x, h0, w, config=Config("tiled", 16, 32, 32))
    assert len(rec.launches) == 1
    assert rec.launches[0][1]["launch_cooperative_grid"] is True and rec.launches[0][1]["SYNC"] is True


@pytest.mark.parametrize("why", ["occupancy", "driver"])
def test_grid_that_cannot_be_resident_falls_back_to_stepwise(monkeypatch, caplog, why):
    refusal = RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
    rec = Recorder(None, refuse=refusal if why == "driver" else None)
    tiled_via(rec, monkeypatch)
    if why == "occupancy":
        monkeypatch.setattr(launch, "resident_capacity", lambda *a: 0)
    x, h0, w, lens, _, _ = operands(5, 3, 24)
    want = elman_fwd(x, h0, w, "tanh", False, lens, config=Config("stepwise", 16, 32, 32))
    rec.launches.clear()
    with caplog.at_level(logging.WARNING, logger="fastrnn"):
        got = elman_fwd(x, h0, w, "tanh", False, lens, config=Config("tiled", 16, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert "one launch per step" in caplog.text
    stepwise = [kw for _, kw in rec.launches if not kw["SYNC"]]
    assert len(stepwise) == 5 and not any("launch_cooperative_grid" in kw for kw in stepwise)


def test_other_launch_errors_are_not_swallowed(monkeypatch):
    rec = Recorder(None, refuse=RuntimeError("Triton Error [CUDA]: an illegal memory access"))
    tiled_via(rec, monkeypatch)
    x, h0, w, lens, _, _ = operands(3, 3, 24)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        elman_fwd(x, h0, w, config=Config("tiled", 16, 32, 32))


@pytest.mark.parametrize("n_regs,num_warps,shared,expected", [
    (70, 8, 139264, 1),  # resident bf16 H=256: shared memory bound
    (72, 8, 20480, 3),  # 2304 registers a warp: 7 warps per sub-partition, 28 / 8
    (128, 4, 0, 4), (32, 4, 0, 16), (16, 1, 0, 32), (40, 4, 2048, 12), (64, 4, 114688, 2),
    (0, 4, 232448, 1), (0, 4, 232449, 0), (255, 16, 0, 0), (256, 4, 0, 0),
])
def test_programs_per_sm(n_regs, num_warps, shared, expected):
    """sm_90 occupancy by the rules of NVIDIA's occupancy calculator (cuda_occupancy.h)."""
    assert launch.programs_per_sm(n_regs, num_warps, shared) == expected


def test_choose_takes_the_first_candidate_that_fits_and_the_last_regardless(monkeypatch):
    """launch.choose walks pick_configs' ladder: a candidate whose kernels do not fit is passed over;
    the last runs even unchecked; under the interpreter the first (nothing is compiled there)."""
    monkeypatch.setattr(launch, "INTERPRETED", False)
    configs = (Config("tiled", 16, 16, 64), Config("tiled", 16, 32, 64), Config("stepwise", 16, 16, 32))
    built, asked = [], []

    def build(cfg):
        built.append(cfg)
        return "kernel", (1, 2), (torch.empty(1),), {}

    def fits(plans):
        asked.append(plans[0][0])
        return len(asked) == 2  # the second fits

    assert launch.choose(build, configs, fits)[0] == configs[1] and built == list(configs[:2])
    assert launch.choose(build, configs, lambda plans: False)[0] == configs[2]  # the last regardless
    monkeypatch.setattr(launch, "INTERPRETED", True)
    assert launch.choose(build, configs, lambda plans: pytest.fail("nothing compiles"))[0] == configs[0]


class Compiled:
    """Stands in for a compiled Triton kernel: what launch.compiled_fits reads of one."""

    def __init__(self, n_regs=64, n_spills=0, num_warps=4, shared=0, loads=True):
        from triton.runtime.errors import OutOfResources

        self.n_regs, self.n_spills, self._loads, self._error = n_regs, n_spills, loads, OutOfResources
        self.metadata = type("Metadata", (), dict(num_warps=num_warps, shared=shared))()

    def _init_handles(self):
        if not self._loads:
            raise self._error(300000, 232448, "shared memory")


@pytest.mark.parametrize("compiled,variant,grid,fits", [
    (Compiled(), "tiled", (2, 60), True),
    (Compiled(n_spills=16), "tiled", (2, 60), True),  # 64 bytes of local memory: a few parked words
    (Compiled(n_spills=17), "tiled", (2, 60), False),  # more: register pressure, paid at every step
    (Compiled(n_spills=17), "stepwise", (200, 60), False),
    (Compiled(n_spills=16), "resident", (4,), True),
    (Compiled(n_spills=17), "resident", (4,), False),
    (Compiled(loads=False), "resident", (4,), False),  # too much shared memory
    (Compiled(n_regs=255, num_warps=8), "tiled", (2, 60), True),  # one program per SM: 120 fit 132 SMs
    (Compiled(n_regs=255, num_warps=8), "tiled", (2, 70), False),  # 140 programs do not
    (Compiled(n_regs=255, num_warps=8), "stepwise", (20, 70), True),  # stepwise: no limit on the grid
])
def test_compiled_kernel_fits(monkeypatch, compiled, variant, grid, fits):
    monkeypatch.setattr(launch.config, "sm_count", lambda device: 132)
    assert launch.compiled_fits(compiled, variant, grid, "cuda") is fits


def _counting_calls(monkeypatch, module, name: str) -> list:
    """Count the calls of ``module.name`` (a launch builder, ``choose``, ``kept_plan``): one entry each."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _kept_launch(build, ladder, device, name, tensors):
    """``launch.kept_launch`` of a launch whose call was given ``tensors`` (and passes them), checking nothing."""
    found = launch.find_kept(name, device, tensors, lambda *given: None)
    return launch.kept_launch(build, ladder, device, ({},), found, lambda cfg: tensors)


def test_warm_call_keeps_its_plan(monkeypatch):
    """The first call at a shape chooses its configuration (compiling and checking candidates on a
    GPU); later calls, whatever their length, launch the kept plan without choosing again."""
    chosen = _counting_calls(monkeypatch, launch, "choose")
    torch.manual_seed(0)
    w = torch.randn(8, 8, dtype=torch.float64) * 0.3
    for T in (5, 9, 5):
        elman_fwd(torch.randn(T, 3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64), w)
    assert len(chosen) == 1
    elman_fwd(torch.randn(5, 4, 8, dtype=torch.float64), None, w)  # another batch: another plan
    assert len(chosen) == 2


HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten._to_copy")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_warm_call_never_reads_the_device(monkeypatch, cell):
    """A warm forward and backward on the fused path's GPU route (launches made no-ops, so it runs
    on CPU tensors) reads nothing back to the host: no ``.item()``, no data-dependent shape, no copy
    between devices: what a CUDA graph capture and ``set_sync_debug_mode("error")`` need. With and
    without resets, every layer and direction. (A copy of a CPU tensor to the CPU dispatches nothing:
    ``scripts/gpu_check.py`` runs the same calls under the sync debug mode on a GPU.)"""
    import fastrnn
    import fastrnn.op
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    class Recorded(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(str(func))
            return func(*args, **(kwargs or {}))

    for kind in (JITFunction, InterpretedFunction):
        monkeypatch.setattr(kind, "__getitem__", lambda self, grid: (lambda *args, **kwargs: None))
    monkeypatch.setattr(launch, "INTERPRETED", False)
    monkeypatch.setattr(launch, "fits_gpu", lambda plans, device: True)
    monkeypatch.setattr(launch, "resident_capacity", lambda *args, **kwargs: math.inf)
    monkeypatch.setattr(fastrnn.op, "runs_directly", lambda inputs: True)  # the mode sees the launchers' ops
    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    torch.manual_seed(0)
    module = fastrnn.CELLS[cell].module(8, 8, 2, bidirectional=True)
    x = torch.randn(5, 3, 8, requires_grad=True)
    for resets in (None, torch.rand(5, 3) < 0.3):
        for _ in range(2):  # cold, then warm
            module(x, resets=resets)[0].sum().backward()
        names = []
        with Recorded():
            module(x, resets=resets)[0].sum().backward()
        assert names and not [n for n in names if n.startswith(HOST_READS)], names


def test_h0_product_only_for_the_tiled_kernels(monkeypatch):
    """The Elman forward makes ``h0 @ w_hh.T`` (the tiled kernels' first-step operand) once per call
    when the configuration that runs is tiled or stepwise, never when it is resident; all agree."""
    import fastrnn.kernels.config as kernel_config
    import fastrnn.kernels.elman as kernels_elman

    calls = []
    monkeypatch.setattr(kernels_elman, "h0_product", lambda h0, w: calls.append(1) or launch.h0_product(h0, w))
    x, h0, w, *_ = operands(6, 3, 8, dtype=torch.float64)
    ys = []
    for variant, made in (("resident", 0), ("tiled", 1), ("stepwise", 1)):  # (interpreted: the first runs)
        ladder = (Config(variant, 16, 16, 16), *(Config(v, 16, 16, 16) for v in ("resident", "tiled") if v != variant))
        monkeypatch.setattr(kernel_config, "pick_configs", lambda *args, **kwargs: ladder)
        launch.forget()  # (another ladder for the same shape: as on another machine)
        calls.clear()
        ys.append(elman_fwd(x, h0, w))
        assert len(calls) == made, variant
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ys[2], ys[0], rtol=1e-12, atol=1e-12)


def test_launch_key_leaves_out_the_length_and_the_data():
    x = torch.randn(5, 3, 8)
    configs = (Config("tiled", 16, 16, 16),)
    key = launch.launch_key(configs, ("k", (1, 1), (x, None, 5, 3, 8, 24, 8), {"A": 1}), "cpu")
    other = launch.launch_key(configs, ("k", (1, 1), (x + 1, None, 9, 3, 8, 24, 8), {"A": 1}), "cpu")
    assert key == other
    assert key != launch.launch_key(configs, ("k", (1, 1), (x, None, 5, 4, 8, 24, 8), {"A": 1}), "cpu")


@pytest.mark.parametrize("streams", ["torch._C's getters", "torch.cuda's Stream objects"])
def test_arrival_counters_are_kept_per_device_on_its_default_stream(monkeypatch, streams):
    """One counter buffer per device, reused launch after launch on its default stream; fresh zeros on
    any other stream (graph capture, torch.compile's graph warm-ups). Run here on the CPU with a
    stand-in for torch.cuda's streams: the getters torch._C has on a CUDA build (their ``(id, device,
    type)``), or where those are missing, the Stream objects of torch.cuda."""
    default, side = (0, 0, 1), (3, 0, 1)
    current, asked = [default], []

    def ask(stream):  # each call a tuple of its own, as torch's getters give them
        return lambda index: asked.append(index) or tuple(list(stream()))

    if streams == "torch._C's getters":
        monkeypatch.setattr(launch, "_STREAM_GETTERS", (ask(lambda: current[0]), ask(lambda: default)))
        monkeypatch.setattr(torch.cuda, "current_stream", None)  # (not asked)
    else:
        monkeypatch.setattr(launch, "_STREAM_GETTERS", (None, None))
        monkeypatch.setattr(torch.cuda, "current_stream", ask(lambda: current[0]))
        monkeypatch.setattr(torch.cuda, "default_stream", ask(lambda: default))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, device=None, **k: real_zeros(*a, **k))
    monkeypatch.setattr(launch, "COUNTERS", {})
    cuda = torch.device("cuda", 0)
    a, b = launch.arrival_counters(4, cuda), launch.arrival_counters(2, cuda)
    assert a.data_ptr() == b.data_ptr() and a.numel() == 4 and b.numel() == 2 and not a.any()
    current[0] = side
    fresh = launch.arrival_counters(4, cuda)
    assert fresh.data_ptr() != a.data_ptr() and not fresh.any() and len(launch.COUNTERS) == 1
    assert asked == [0] * 6  # each stream asked of the device's index


def test_a_launch_enters_its_tensors_gpu_only_where_that_is_not_the_current_one(monkeypatch):
    """A kernel launches on the current GPU: a launcher enters its tensors' GPU (``device_of``) where
    another one is current, and nothing where theirs is current or they are not on a GPU. Run here on
    the CPU with a stand-in for a GPU tensor."""
    class OnGPU:
        is_cuda = True

        def __init__(self, index):
            self.index = index

        def get_device(self):
            return self.index

    for current, other in ((1, 0), (0, 1)):
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        entered = launch.on_device(OnGPU(other))
        assert isinstance(entered, torch.cuda.device_of) and entered.idx == other
        assert launch.on_device(OnGPU(current)) is launch._NO_CONTEXT
    assert launch.on_device(torch.zeros(1)) is launch._NO_CONTEXT
    with launch.on_device(torch.zeros(1)), launch.on_device(torch.zeros(1)):  # (one context serves every call)
        pass


@pytest.mark.skipif(not INTERPRETED, reason="runs kernels under the Triton interpreter")
@pytest.mark.parametrize("variant", ["resident", "tiled", "stepwise"])
def test_warm_call_rebinds_the_kept_launch(monkeypatch, variant):
    """A warm call with tensors of the same signature builds nothing: it puts its own tensors into the
    launch kept at the first call, and computes exactly what a first call computes; another length,
    layout or optional operand is another launch, built once."""
    import fastrnn.kernels.elman as kernels_elman

    built = _counting_calls(monkeypatch, kernels_elman, "fwd_launch")
    config = Config(variant, 16, 16, 16)
    calls = [operands(6, 3, 8, dtype=torch.float64, seed=s) for s in range(3)] + [operands(9, 3, 8, torch.float64, 3)]
    got = [elman_fwd(x, h0, w, "tanh", False, None, config=config) for x, h0, w, *_ in calls]
    assert len(built) == 2  # the first call at T=6, and at T=9; the other two T=6 calls rebound it
    for (x, h0, w, *_), y in zip(calls, got):
        launch.forget()
        torch.testing.assert_close(y, elman_fwd(x, h0, w, "tanh", False, None, config=config), rtol=0, atol=0)
    x, h0, w, lens, *_ = calls[0]
    resets = torch.rand(3, 6) < 0.3  # (B, T): read through the strides of its transpose
    for args in ((None, None), (lens, None), (None, resets.t()), (None, resets.t().contiguous())):
        before = len(built)
        for _ in range(2):
            elman_fwd(x, h0 if args[0] is None else None, w, "tanh", False, *args, config=config)
        assert len(built) == before + 1  # another signature: built once, then rebound


def test_kept_launch_holds_no_tensor():
    """What a kept launch keeps of its first call: no tensor (a model's activations are freed)."""
    import gc
    import weakref

    x, h0, w, *_ = operands(6, 3, 8, dtype=torch.float64)
    y, h_n = elman_fwd(x, h0, w)
    refs = [weakref.ref(t) for t in (x, h0, w, y, h_n)]
    del x, h0, w, y, h_n
    gc.collect()
    assert launch.KEPT and all(r() is None for r in refs)


def test_operands_that_alias_at_the_first_call_are_never_rebound():
    """Where two operands were one tensor when a launch was first built, its places cannot be told
    apart: such a launch is built at every call, and a later call with two tensors launches each."""
    kernel = object()
    a, b, c = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)

    def build(cfg):
        return kernel, (1,), (first, second, 7), {}

    configs = (Config("resident", 16, 16, 16),)
    first = second = a
    cpu = torch.device("cpu")
    _kept_launch(build, lambda: configs, cpu, "alias", (first, second))
    first, second = b, c
    _, (_, _, got, _) = _kept_launch(build, lambda: configs, cpu, "alias", (first, second))
    assert got[0] is b and got[1] is c and got[2] == 7


def test_kept_launches_are_bounded(monkeypatch):
    """Every new length T is a new kept launch (its integers differ), every new batch size a new plan;
    past MAX_KEPT the oldest of each goes, and a launch whose plan went is planned again."""
    monkeypatch.setattr(launch, "MAX_KEPT", 2)
    chosen = _counting_calls(monkeypatch, launch, "choose")
    w = torch.randn(8, 8, dtype=torch.float64) * 0.3
    for T, B in ((3, 2), (4, 3), (5, 4), (3, 2), (6, 4)):
        x = torch.randn(T, B, 8, dtype=torch.float64)
        y, _ = elman_fwd(x, None, w)
        assert len(launch.KEPT) <= 2 and len(launch.PLANS) <= 2
        torch.testing.assert_close(y[-1], torch.tanh(x[-1] + y[-2] @ w.T), rtol=1e-12, atol=1e-12)
    # B=2's plan and launch were the oldest when B=4 came: planned again; B=4's plan was still kept
    assert len(chosen) == 4


@pytest.mark.skipif(not INTERPRETED, reason="runs kernels under the Triton interpreter")
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_every_launch_of_a_module_is_kept_whole(monkeypatch, cell):
    """Every launch a module's forward and backward make (with and without h0, packed, with resets,
    a loss on both final states, LSTM with and without a projection) is kept with its tensors'
    places, and a second round of the same calls builds nothing: no launch is built again at every
    call because two of its operands were one tensor."""
    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    builds = _counting_calls(monkeypatch, launch, "kept_plan")
    calls = _module_calls(cell)
    calls()
    first = len(builds)
    calls()
    assert first and len(builds) == first  # the second round: every launch rebound
    assert all(kept.slots is not None for kept in launch.KEPT.values())


def _module_calls(cell: str):
    """A round of a module's forward and backward calls (bidirectional; with and without h0, packed,
    with resets, a loss on both final states; the LSTM with and without a projection)."""
    import fastrnn
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    modules = [fastrnn.CELLS[cell].module(4, 5, bidirectional=True, **extra)
               for extra in (({}, {"proj_size": 3}) if cell == "lstm" else ({},))]
    x = torch.randn(6, 3, 4, requires_grad=True)
    resets = torch.rand(6, 3) < 0.3

    def loss(output, state):
        data = output.data if hasattr(output, "batch_sizes") else output
        return data.sum() + sum(s.sum() for s in (state if isinstance(state, tuple) else (state,)))

    def calls():
        for module in modules:
            hx = module(x)[1]
            for inputs in ((x,), (x, hx), (pack_padded_sequence(x, torch.tensor([6, 4, 2])),)):
                loss(*module(*inputs)).backward()
            loss(*module(x, resets=resets)).backward()

    return calls


@pytest.mark.skipif(not INTERPRETED, reason="runs kernels under the Triton interpreter")
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_a_rebound_launch_is_the_one_its_call_would_build(monkeypatch, cell):
    """A kept launch is found by the tensors its call was given (``find_kept``) and rebound with the
    call's tensors, the buffers the launcher made included: at every warm call of a module's forward
    and backward it equals the launch built afresh for that call (kernel, grid, constexprs, each
    tensor in its place, every integer)."""
    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    compared, rebind = [], launch.Kept.launch

    def rebound_and_compared(self, operands, build):
        got, fresh = rebind(self, operands, build), build(self.plan.config)
        assert got[0] is fresh[0] and got[1] == fresh[1] and got[3] == fresh[3] and len(got[2]) == len(fresh[2])
        for a, b in zip(got[2], fresh[2]):
            assert a is b if isinstance(b, torch.Tensor) else (type(a) is type(b) and a == b)
        compared.append(1)
        return got

    monkeypatch.setattr(launch.Kept, "launch", rebound_and_compared)
    calls = _module_calls(cell)
    calls()
    calls()
    assert len(compared) >= len(launch.KEPT)


def test_a_kept_launch_asks_for_no_candidates(monkeypatch):
    """The candidates (``pick_configs``, several on a GPU) are asked for at a launch's first call only;
    a warm call finds its kept launch by what they depend on: another forced variant
    (``FASTRNN_VARIANT``) or another given configuration is another launch."""
    monkeypatch.setattr(launch, "fits_gpu", lambda plans, device: True)
    monkeypatch.delenv("FASTRNN_VARIANT", raising=False)
    x, built, asked = torch.zeros(2, 3), [], []

    def build(cfg):
        built.append(cfg)
        return "kernel", (1,), (x,), {"BLOCK": cfg.block_n}

    def ladder():
        asked.append(1)
        return Config("resident", 16, 16, 16), Config("tiled", 16, 16, 16)

    cpu = torch.device("cpu")
    for _ in range(3):
        _kept_launch(build, ladder, cpu, "ladder", (x,))
    assert len(built) == len(asked) == 1
    monkeypatch.setenv("FASTRNN_VARIANT", "tiled")
    _kept_launch(build, ladder, cpu, "ladder", (x,))
    assert len(built) == len(asked) == 2
    _kept_launch(build, ladder, cpu, ("ladder", Config("tiled", 8, 8, 8)), (x,))
    assert len(built) == len(asked) == 3


@pytest.mark.skipif(not INTERPRETED, reason="runs kernels under the Triton interpreter")
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_warm_module_call_asks_for_no_candidates(monkeypatch, cell):
    """A module's warm forward and backward ask ``pick_configs`` nothing; a forced variant set between
    calls is followed (the launch built again with it)."""
    import fastrnn
    import fastrnn.kernels.config as kernel_config

    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    monkeypatch.delenv("FASTRNN_VARIANT", raising=False)
    picked = _counting_calls(monkeypatch, kernel_config, "pick_configs")
    module = fastrnn.CELLS[cell].module(4, 8)
    x = torch.randn(5, 2, 4, requires_grad=True)
    module(x)[0].sum().backward()
    first = len(picked)
    module(x)[0].sum().backward()
    assert first == 2 and len(picked) == first  # (the forward's and the backward's, once)
    monkeypatch.setenv("FASTRNN_VARIANT", "stepwise")
    variants = _counting_calls(monkeypatch, launch, "kept_plan")
    module(x)[0].sum().backward()
    assert len(picked) == first + 2 and len(variants) == 2


def test_kept_launch_follows_the_fp32_precision_flag(monkeypatch):
    """The constexprs of an fp32 launch on a GPU follow ``cudnn.rnn.fp32_precision`` as it is at each
    call (``dtype_flags``): a flag turned between two calls of one signature builds the launch again,
    even where the ladder is one configuration (forced, or given)."""
    import fastrnn.kernels.config as kernel_config

    tf32 = [True]
    monkeypatch.setattr(kernel_config, "fp32_uses_tf32", lambda: tf32[0])
    monkeypatch.setattr(launch, "fits_gpu", lambda plans, device: True)
    x, built = torch.zeros(2, 3), []

    def build(cfg):
        built.append(kernel_config.fp32_uses_tf32())
        return "kernel", (1,), (x,), {"PRECISION": "tf32" if built[-1] else "tf32x3"}

    configs, cuda = (Config("resident", 16, 16, 16),), torch.device("cuda", 0)
    launches = []
    for flag in (True, True, False, False, True):
        tf32[0] = flag
        launches.append(_kept_launch(build, lambda: configs, cuda, "fp32", (x,))[1][3])
    assert [kw["PRECISION"] for kw in launches] == ["tf32", "tf32", "tf32x3", "tf32x3", "tf32"]
    assert built == [True, False]  # each flag's launch built once


@pytest.mark.skipif(not INTERPRETED, reason="runs kernels under the Triton interpreter")
def test_one_gradient_for_both_lstm_states_keeps_the_launch_whole(monkeypatch):
    """A loss on ``h_n + c_n`` hands the LSTM backward one gradient tensor for both final states; the
    launcher gives them operands of their own, so its launch is still kept whole and rebound."""
    from fastrnn.lstm import lstm_recurrence

    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    torch.manual_seed(0)
    x, w = torch.randn(5, 2, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    for _ in range(2):
        y, h_n, c_n = lstm_recurrence(x, None, None, w)
        (y.sum() + ((h_n + c_n) ** 2).sum()).backward()
    assert len(launch.KEPT) == 2 and all(kept.slots is not None for kept in launch.KEPT.values())


LAUNCHERS = ["elman_fwd", "elman_bwd", "gru_fwd", "gru_bwd", "lstm_fwd", "lstm_bwd"]

# Per launcher: the operand the others are measured against, those it converts itself (any float
# dtype), and those it takes but does not read.
ROLES = {"elman_fwd": ("x_proj", (), ()), "elman_bwd": ("y", ("dy", "dh_n"), ()),
         "gru_fwd": ("x_proj", (), ()), "gru_bwd": ("y", ("dy", "dh_n"), ()),
         "lstm_fwd": ("x_proj", (), ()), "lstm_bwd": ("gates", ("dy", "dh_n", "dc_n"), ("y", "h0"))}


def _launcher_calls(T=4, B=2, H=8, P=4):
    """Each launcher of ``fastrnn.kernels`` and operands it takes, by keyword in its order (the LSTM's
    with a projection to P)."""
    import fastrnn.kernels as kernels

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    return {
        "elman_fwd": (kernels.elman_fwd, dict(x_proj=r(T, B, H), h0=r(B, H), w_hh=r(H, H))),
        "elman_bwd": (kernels.elman_bwd, dict(dy=r(T, B, H), dh_n=r(B, H), y=r(T, B, H), w_hh=r(H, H))),
        "gru_fwd": (kernels.gru_fwd, dict(x_proj=r(T, B, 3 * H), h0=r(B, H), w_hh=r(3 * H, H), b_hn=r(H))),
        "gru_bwd": (kernels.gru_bwd, dict(dy=r(T, B, H), dh_n=r(B, H), y=r(T, B, H), gates=r(T, B, 4 * H),
                                          h0=r(B, H), w_hh=r(3 * H, H))),
        "lstm_fwd": (kernels.lstm_fwd, dict(x_proj=r(T, B, 4 * H), h0=r(B, P), c0=r(B, H), w_hh=r(4 * H, P),
                                            w_hr=r(P, H))),
        "lstm_bwd": (kernels.lstm_bwd, dict(dy=r(T, B, P), dh_n=r(B, P), dc_n=r(B, H), y=r(T, B, P), c=r(T, B, H),
                                            gates=r(T, B, 4 * H), h0=r(B, P), c0=r(B, H), w_hh=r(4 * H, P),
                                            w_hr=r(P, H))),
    }


def _bad_operands(name: str, operands: dict) -> list:
    """``(operand named in the error, bad operands, error)`` for each way one operand can be wrong:
    every operand the launcher reads of another shape, on another device, in another dtype (where
    it does not convert it), not a tensor; bad lengths and resets."""
    first, converted, unread = ROLES[name]
    T, B = operands[first].shape[:2]
    cases = [("lengths", dict(lengths=torch.full((B,), float(T))), ValueError),
             ("lengths", dict(lengths=[T] * B), TypeError),
             ("resets", dict(resets=torch.zeros(T + 1, B, dtype=torch.bool)), ValueError),
             ("resets", dict(resets=torch.zeros(T, B, dtype=torch.bool), lengths=torch.full((B,), T)), ValueError)]
    for operand, t in operands.items():
        if operand in unread:
            continue
        cases += [(operand, {operand: t[..., :-1]}, ValueError),
                  (operand, {operand: torch.empty_like(t, device="meta")}, ValueError)]
        if operand != first:  # (the one whose device the launcher reads first: a tensor)
            cases.append((operand, {operand: t.tolist()}, TypeError))
        if operand not in converted and operand != first:
            cases.append((operand, {operand: t.double()}, TypeError))
    return cases


@pytest.mark.skipif(not INTERPRETED, reason="runs kernels under the Triton interpreter")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_refuse_bad_operands(name):
    """Every launcher of ``fastrnn.kernels`` refuses an operand of the wrong shape, dtype, device or
    type, bad lengths or resets, with an error naming it (a kernel would read garbage or out of
    bounds), also right after a warm call that kept the launch of the good ones; operands the
    launcher converts (a backward's gradients) may come in another float dtype."""
    launcher, operands = _launcher_calls()[name]
    good = launcher(**operands)
    for operand, bad, error in _bad_operands(name, operands):
        launcher(**operands)  # (kept: the bad call below differs from it in one operand)
        with pytest.raises(error, match=operand):
            launcher(**{**operands, **bad})
    for operand in ROLES[name][1]:
        converted = launcher(**{**operands, operand: operands[operand].double()})
        torch.testing.assert_close(converted, good, rtol=1e-6, atol=1e-6)
    if name.startswith("elman"):
        with pytest.raises(ValueError, match="activation"):
            launcher(**operands, activation="sigmoid")


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_refuse_a_configuration_of_a_variant_the_cell_lacks(name):
    """A configuration given to a launcher names one of its cell's variants: the gated cells have no
    resident kernel (whose launch takes other arguments), and no cell a variant of another name; a
    ValueError naming it, before anything is launched."""
    launcher, operands = _launcher_calls()[name]
    lacking = ["fused"] + (["resident"] if not name.startswith("elman") else [])
    for variant in lacking:
        with pytest.raises(ValueError, match=f"no '{variant}' variant"):
            launcher(**operands, config=Config(variant, 16, 16, 16))


@pytest.mark.skipif(not INTERPRETED, reason="runs kernels under the Triton interpreter")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launchers_check_only_where_the_launch_is_not_kept(monkeypatch, name):
    """A launcher checks its operands where their signature is not kept yet: a warm call with the
    same shapes, dtypes and devices checks nothing; another length is checked once."""
    import importlib

    module = importlib.import_module(f"fastrnn.kernels.{name.split('_')[0]}")
    check = f"check_{name.split('_')[1]}"
    checks = _counting_calls(monkeypatch, module, check)
    launcher, operands = _launcher_calls()[name]
    for _ in range(3):
        launcher(**operands)
    assert len(checks) == 1
    for _ in range(2):
        launcher(**_launcher_calls(T=6)[name][1])
    assert len(checks) == 2


@pytest.mark.skipif(not INTERPRETED, reason="runs kernels under the Triton interpreter")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_a_launch_is_kept_by_the_tensors_its_call_was_given(monkeypatch, name):
    """The key of a kept launch holds the signature of every tensor the call was given that the
    launcher reads, in order, and none of the buffers it makes (outputs, scratch, carried state:
    those follow from the given ones)."""
    signed, real = [], launch.signature
    monkeypatch.setattr(launch, "signature", lambda tensors: signed.append(tensors) or real(tensors))
    launcher, operands = _launcher_calls()[name]
    outputs = launcher(**operands)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    assert len(signed) == 1
    given = [t for t in signed[0] if t is not None]  # (lengths and resets: None here)
    assert [t.data_ptr() for t in given] == [t.data_ptr() for k, t in operands.items() if k not in ROLES[name][2]]
    assert not {t.data_ptr() for t in given} & {t.data_ptr() for t in outputs}


@pytest.mark.skipif(not INTERPRETED, reason="runs kernels under the Triton interpreter")
@pytest.mark.parametrize("name", LAUNCHERS)
def test_an_optional_operand_left_out_or_given_is_another_launch(name):
    """A call that leaves out an optional operand (h0, c0, b_hn, w_hr, the output's or a final state's
    gradient, lengths, resets) which the kept launch had, or gives one it did not have, computes what a first
    call computes."""
    launcher, operands = _launcher_calls(P=8)[name]  # (P = H: the LSTM without w_hr too)
    T, B = operands[ROLES[name][0]].shape[:2]
    steps = {"lengths": torch.tensor([T, 2]), "resets": torch.tensor([[False, True]] * T)}
    optional = [k for k in ("h0", "c0", "b_hn", "w_hr", "dy", "dh_n", "dc_n")
                if k in operands and k not in ROLES[name][2]]
    for operand in optional + list(steps):
        given = {**operands, operand: operands.get(operand, steps.get(operand))}
        without = {**operands, operand: None}
        for first, then in ((given, without), (without, given)):
            launch.forget()
            launcher(**first)
            warm = launcher(**then)
            launch.forget()
            torch.testing.assert_close(warm, launcher(**then), rtol=0, atol=0)


def test_a_misaligned_operand_is_another_launch():
    """Triton compiles 16-byte aligned pointers apart: an operand 4 bytes past a boundary, of the
    same shape and strides as a kept one's, is another kept launch, computing the same."""
    x, h0, w, *_ = operands(6, 3, 8)
    y = elman_fwd(x, h0, w)
    kept = len(launch.KEPT)
    shifted = torch.empty(x.numel() + 1)[1:].view(6, 3, 8).copy_(x)  # (4 bytes into its storage)
    assert shifted.data_ptr() % 16 != 0 and shifted.stride() == x.stride()
    torch.testing.assert_close(elman_fwd(shifted, h0, w), y, rtol=0, atol=0)
    assert len(launch.KEPT) == kept + 1
