"""What only a GPU would hit, reached without one: the CUDA-only branches of the launchers and the
configuration (a ``torch.device("cuda")`` needs no GPU; meta tensors; the interpreter with the
stepwise variant forced in bf16). Select them with ``-k test_gpu_path``."""

import os

import pytest
import torch

import fastrnn
import fastrnn.kernels.config as config
from fastrnn.gru import gru_fwd_torch
from fastrnn.kernels import Config, elman_fwd, gru_bwd, gru_fwd, lstm_bwd, lstm_fwd
from fastrnn.kernels.launch import h0_product
from fastrnn.lstm import lstm_fwd_torch
from fastrnn.sequence import lengths_on_device

from .conftest import rel_err

CUDA = torch.device("cuda")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the kernels under the Triton interpreter")


@pytest.fixture
def fake_gpu(monkeypatch):
    """An H100's SM count without one (read only by the configuration)."""
    monkeypatch.setattr(config, "sm_count", lambda device: 132)
    return CUDA


@pytest.fixture
def precision_flags():
    """Restore torch's TF32 flags after a test that sets them."""
    cudnn = torch.backends.cudnn
    saved = [(owner, owner.fp32_precision) for owner in (cudnn.rnn, cudnn, torch.backends)]
    yield
    for owner, value in reversed(saved):
        owner.fp32_precision = value


@pytest.mark.parametrize("precision,tl_precision", [("ieee", "tf32x3"), ("tf32", "tf32")])
def test_gpu_path_follows_cudnn_rnn_fp32_precision(fake_gpu, precision_flags, precision, tl_precision):
    """Once a program sets ``torch.backends.cudnn.rnn.fp32_precision``, reading the legacy
    ``cudnn.allow_tf32`` raises: every fp32 call on CUDA crashed. The products now follow the RNN flag."""
    torch.backends.cudnn.rnn.fp32_precision = precision
    assert config.dtype_flags(torch.float32, CUDA)["PRECISION"] == tl_precision
    assert config.pick_configs(32, 256, torch.float32, CUDA)  # the ladder is built without raising
    assert config.fp32_uses_tf32() == (precision == "tf32")


def test_gpu_path_fp32_precision_none_defers_to_cudnn(precision_flags):
    torch.backends.cudnn.rnn.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "ieee"
    assert not config.fp32_uses_tf32()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gpu_path_variant_a_cell_lacks_is_a_clear_error(fake_gpu, monkeypatch, cell):
    """``FASTRNN_VARIANT=resident`` launched the gated kernels without their barrier arguments (a
    TypeError inside the launch); a variant a cell does not have is a ValueError naming both."""
    monkeypatch.setenv("FASTRNN_VARIANT", "resident")
    gates = fastrnn.CELLS[cell].gates
    with pytest.raises(ValueError, match=f"the {cell} cell has no resident variant; its variants are tiled, stepwise"):
        config.pick_configs(8, 64, torch.float32, CUDA, gates=gates, cell=cell, variants=config.GATED_VARIANTS)
    assert config.pick_configs(8, 64, torch.float32, CUDA)[0].variant == "resident"  # Elman has it


@interpreted
def test_gpu_path_variant_a_cell_lacks_through_the_module(monkeypatch):
    monkeypatch.setenv("FASTRNN_BACKEND", "triton")
    monkeypatch.setenv("FASTRNN_VARIANT", "resident")
    with pytest.raises(ValueError, match="the lstm cell has no resident variant"):
        fastrnn.LSTM(3, 4)(torch.randn(2, 1, 3))


def _strided_rows(rows: int, cols: int, row_stride: int, dtype=torch.bfloat16) -> torch.Tensor:
    """A (rows, cols) matrix whose rows lie ``row_stride`` elements apart: offsets past 2^31 with only
    the touched pages of a large virtual allocation ever materialised."""
    storage = torch.empty((rows - 1) * row_stride + cols, dtype=dtype)
    return torch.as_strided(storage, (rows, cols), (row_stride, 1))


@interpreted
@pytest.mark.parametrize("cell,direction", [("lstm", "fwd"), ("lstm", "bwd"), ("gru", "fwd"), ("gru", "bwd")])
def test_gpu_path_weight_offsets_past_2_31(cell, direction, one_thread):
    """A gated cell's weight rows ``gate * H + n`` are addressed in int64: with w_hh's rows 2^26
    elements apart, every gate past the first lies beyond 2^31 (an H of 23,000 reaches it for real)."""
    G, T, B, H = fastrnn.CELLS[cell].gates, 3, 2, 16
    torch.manual_seed(0)
    w = (torch.randn(G * H, H) * 0.3).bfloat16()
    w_far = _strided_rows(G * H, H, 2**26 + 16)
    w_far.copy_(w)
    for cfg in (Config("tiled", 16, 16, 16), Config("tiled", 16, 16, 64)):  # w_hh streamed, and on chip
        want, got = _run_gated(cell, direction, T, B, H, w, cfg), _run_gated(cell, direction, T, B, H, w_far, cfg)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def _run_gated(cell, direction, T, B, H, w, cfg):
    """The launcher's outputs for fixed random operands and weights ``w`` (any strides: the launcher
    builders are called directly, so nothing is copied into a contiguous layout)."""
    import importlib

    kernels = importlib.import_module(f"fastrnn.kernels.{cell}")
    g = torch.Generator().manual_seed(1)
    G = fastrnn.CELLS[cell].gates

    def rand(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype)
    x, h0 = rand(T, B, G * H), rand(B, H)
    state = rand(B, H, dtype=torch.float32)
    y, gates = torch.empty(T, B, H, dtype=torch.bfloat16), torch.empty(T, B, 4 * H, dtype=torch.bfloat16)
    if cell == "lstm":
        c, h_n = torch.empty(T, B, H, dtype=torch.bfloat16), torch.empty(B, H, dtype=torch.bfloat16)
        if direction == "fwd":
            build = kernels.lstm_fwd_launch(x, h0_product(h0, w), rand(B, H), state, w, None, None, None, y, c, gates,
                                            h_n, False, cfg)
            outputs = (y, c, gates, h_n)
        else:
            d_gates = torch.empty(T, B, 4 * H, dtype=torch.bfloat16)
            build = kernels.lstm_bwd_launch(rand(T, B, H), rand(B, H), rand(B, H), rand(T, B, H), rand(T, B, 4 * H),
                                            h0, w, None, None, None, d_gates, state, y, False, cfg)
            outputs = (d_gates, state)
    elif direction == "fwd":
        build = kernels.gru_fwd_launch(x, h0, h0_product(h0, w), state, w, rand(H), None, None, y, gates, False, cfg)
        outputs = (y, gates)
    else:
        d_x, d_hh = torch.empty(T, B, 3 * H, dtype=torch.bfloat16), torch.empty(2, B, 3 * H, dtype=torch.bfloat16)
        build = kernels.gru_bwd_launch(rand(T, B, H), rand(B, H), rand(T, B, H), rand(T, B, 4 * H), h0, w, None,
                                       None, d_x, d_hh, state, False, cfg)
        outputs = (d_x, state)
    kernel, grid, args, kwargs = build
    kernel[grid](*args, torch.zeros(grid[0], dtype=torch.int32), 0, T, SYNC=False, **kwargs)
    return [o.clone() for o in outputs]


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
def test_gpu_path_lengths_with_a_stride(backend):
    """Lengths that are a slice of another tensor are read element by element, not as if
    contiguous; lengths already on the device are made contiguous without a host sync."""
    torch.manual_seed(0)
    x, w = torch.randn(6, 3, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64) * 0.4
    sliced = torch.tensor([3, 99, 6, 99, 2, 99])[::2]
    assert not sliced.is_contiguous()
    want = fastrnn.recurrence(x, None, w, lengths=torch.tensor([3, 6, 2]))
    got = fastrnn.recurrence(x, None, w, lengths=sliced)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    on_device = torch.empty(6, dtype=torch.int64, device="meta")[::2]
    assert lengths_on_device(on_device, 6, 3, torch.device("meta")).is_contiguous()


@interpreted
def test_gpu_path_lengths_with_a_stride_at_the_launcher():
    torch.manual_seed(0)
    x, w = torch.randn(6, 3, 5, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64) * 0.4
    lengths = torch.tensor([3, 99, 6, 99, 2, 99])[::2]
    got, want = elman_fwd(x, None, w, lengths=lengths), elman_fwd(x, None, w, lengths=lengths.contiguous())
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("backend", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_gpu_path_autocast_does_not_reach_the_ops_products(backend, cell, monkeypatch):
    """Under the caller's autocast, the ops' own products (``h0 @ w_hh.T``, the backward's sums) keep
    the precision the op chose: the same bits as without autocast (CPU autocast stands in for CUDA's)."""
    if cell == "rnn":
        monkeypatch.setenv("FASTRNN_VARIANT", "tiled")  # the variant with an h0 product
    entry = fastrnn.CELLS[cell]
    torch.manual_seed(0)
    T, B, H, G = 4, 3, 8, entry.gates
    x, h0, w = torch.randn(T, B, G * H), torch.randn(B, H), torch.randn(G * H, H) * 0.3
    args = (x, h0, h0, w) if cell == "lstm" else (x, h0, w)
    runs = []
    for autocast in (False, True):
        leaves = [a.clone().requires_grad_() for a in args]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = entry.recurrence(*leaves)[0]
            y.backward(torch.ones_like(y))
        runs.append([y] + [a.grad for a in leaves])
    for a, b in zip(*runs):
        assert a.dtype == torch.float32 and torch.equal(a, b)


@interpreted
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gpu_path_stepwise_carries_the_state_in_fp32(cell, one_thread):
    """When the driver refuses a cooperative launch, the sequence runs stepwise: the LSTM's c, the
    GRU's h and their backward carries stay in fp32 between launches as within one, so bf16 results
    are the same bits as the one-launch variant's (they drifted with T when reloaded from bf16)."""
    torch.manual_seed(0)
    T, B, H = 10, 4, 16
    G = fastrnn.CELLS[cell].gates
    x, w, h0 = (torch.randn(T, B, G * H).bfloat16(), (torch.randn(G * H, H) * 0.3).bfloat16(),
                torch.randn(B, H).bfloat16())
    dy, dh_n = torch.randn(T, B, H).bfloat16(), torch.randn(B, H).bfloat16()
    runs = []
    for cfg in (None, Config("stepwise", 16, 16, 16)):
        if cell == "lstm":
            fwd = lstm_fwd(x, h0, h0, w, config=cfg)
            bwd = lstm_bwd(dy, dh_n, dh_n, *fwd[:3], h0, h0, w, config=cfg)  # (fwd[3:]: h_n, c_n)
        else:
            fwd = gru_fwd(x, h0, w, None, config=cfg)
            bwd = gru_bwd(dy, dh_n, *fwd[:-1], h0, w, config=cfg)  # (fwd[-1]: h_n)
        runs.append(fwd + bwd)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    twin = lstm_fwd_torch(x.double(), h0.double(), h0.double(), w.double()) if cell == "lstm" else \
        gru_fwd_torch(x.double(), h0.double(), w.double())
    assert rel_err(runs[1][0], twin[0]) < 2e-2
