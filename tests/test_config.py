"""pick_config: the variant and block sizes per shape; tiled grids always fit the GPU at once."""

import pytest
import torch
import triton

import fastrnn.kernels.config as config


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(config, "sm_count", lambda device: 132)
    config.candidate_configs.cache_clear()
    yield torch.device("cuda")
    config.candidate_configs.cache_clear()


@pytest.mark.parametrize("B", [1, 8, 16, 32, 64, 128, 256, 1000, 5000])
@pytest.mark.parametrize("H", [1, 100, 128, 256, 512, 1024, 2048, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("gates", [1, 3, 4])
def test_every_candidate_is_launchable(fake_gpu, B, H, dtype, gates):
    """Every candidate of the ladder: blocks tl.dot can take, a tiled grid of at most one program per
    SM, w_hh on chip only where both products' operands fit the shared-memory budget; it ends with
    the smallest stepwise tile, which always launches."""
    ladder = config.candidate_configs(B, H, dtype, fake_gpu, "", gates)
    itemsize = torch.empty((), dtype=dtype).element_size()
    block_h = max(16, triton.next_power_of_2(H))
    for cfg in ladder:
        assert cfg.block_b >= 16 and cfg.block_n >= 16 and cfg.block_k >= 16  # tl.dot needs 16
        if cfg.variant == "resident":
            assert gates == 1 and cfg.block_n >= H  # one program covers the whole hidden state
        elif cfg.variant == "tiled":
            programs = triton.cdiv(B, cfg.block_b) * triton.cdiv(H, cfg.block_n)
            assert programs <= 132, "a grid barrier among more programs than SMs can deadlock"
            if cfg.block_k >= H:
                k_bwd = triton.next_power_of_2(gates * block_h)
                need = max((cfg.block_b + gates * cfg.block_n) * block_h, (cfg.block_b + cfg.block_n) * k_bwd)
                assert need * itemsize <= config.RESIDENT_W_BYTES
    assert ladder[-1].variant == "stepwise" and ladder[-1].block_b == ladder[-1].block_n == 16
    assert ladder[-1].num_warps == 4 and ladder[-1].split_k == 1
    assert len(set(ladder)) == len(ladder)
    # the fewest programs: the widest batch block B needs by 64 units
    fewest = triton.cdiv(B, 16 if B <= 16 else (32 if B <= 32 else 64)) * triton.cdiv(H, min(64, block_h))
    assert any(c.variant == "tiled" for c in ladder) == (fewest <= 132)


def test_small_hidden_sizes_stay_resident(fake_gpu):
    def first(B, H, dtype):
        return config.candidate_configs(B, H, dtype, fake_gpu, "")[0]

    assert first(8, 128, torch.float32).variant == "resident"
    assert first(32, 256, torch.bfloat16).variant == "resident"
    assert first(32, 256, torch.float32).variant == "tiled"


def test_interpreter_configs_never_wait_across_programs():
    cpu = torch.device("cpu")
    def only(forced):
        (cfg,) = config.candidate_configs(17, 130, torch.float32, cpu, forced)  # one candidate: no compiler
        return cfg

    assert only("").variant == "resident"
    assert only("tiled").variant == "tiled" and only("tiled").block_n >= 130  # one program per batch block
    assert only("stepwise").variant == "stepwise"


def test_forced_variant_and_bad_value(monkeypatch):
    monkeypatch.setenv("FASTRNN_VARIANT", "stepwise")
    assert config.pick_config(4, 32, torch.float32, "cpu").variant == "stepwise"
    monkeypatch.setenv("FASTRNN_VARIANT", "fastest")
    with pytest.raises(ValueError, match="FASTRNN_VARIANT"):
        config.pick_config(4, 32, torch.float32, "cpu")


def test_choice_is_logged(caplog, monkeypatch):
    monkeypatch.delenv("FASTRNN_VARIANT", raising=False)
    with caplog.at_level("DEBUG", logger="fastrnn"):
        config.pick_config(4, 32, torch.float32, "cpu")
    assert "resident" in caplog.text


def _gated_launch(cell, direction, B, H, P, cfg):
    """The launch of a gated cell's launcher for ``cfg``, on meta tensors (as the compile sweep
    builds it)."""
    import importlib

    kernels = importlib.import_module(f"fastrnn.kernels.{cell}")
    return kernels.meta_launch(direction, B, H, torch.float32, cfg, True, True, True, P)


@pytest.mark.parametrize("cell,H,P", [("gru", 1, 1), ("gru", 15, 15), ("lstm", 1, 1), ("lstm", 7, 7),
                                      ("lstm", 17, 8), ("lstm", 64, 32), ("lstm", 100, 1), ("lstm", 200, 40)])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("B", [1, 33])
def test_gated_launches_give_tl_dot_chunks_of_16(fake_gpu, cell, H, P, direction, B):
    """Every candidate a gated launcher can be handed reduces in chunks of 16 or more (BLOCK_K //
    SPLIT_K, and the projection's BLOCK_KP), as tl.dot requires on a GPU; the interpreter does not
    check it, so this is where a hidden or projection size below 16 would be caught on CPU."""
    for cfg in config.candidate_configs(B, H, torch.float32, fake_gpu, "", 4 if cell == "lstm" else 3):
        kwargs = _gated_launch(cell, direction, B, H, P, cfg)[3]
        assert kwargs["BLOCK_K"] // kwargs["SPLIT_K"] >= 16, (cfg, kwargs)
        assert kwargs["BLOCK_B"] >= 16 and kwargs["BLOCK_N"] >= 16
        if kwargs.get("PROJ"):
            assert kwargs["BLOCK_KP"] >= 16 and kwargs["BLOCK_P"] >= 16
