"""pick_config: the variant and block sizes per shape; tiled grids always fit the GPU at once."""

import pytest
import torch
import triton

import fastrnn.kernels.config as config


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(config, "_sm_count", lambda device: 132)
    config._pick_config.cache_clear()
    yield torch.device("cuda")
    config._pick_config.cache_clear()


@pytest.mark.parametrize("B", [1, 8, 16, 32, 64, 128, 256, 1000, 5000])
@pytest.mark.parametrize("H", [1, 100, 128, 256, 512, 1024, 2048, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_tiled_grids_are_resident_at_once(fake_gpu, B, H, dtype):
    cfg = config._pick_config(B, H, dtype, fake_gpu, "")
    assert cfg.block_b >= 16 and cfg.block_n >= 16 and cfg.block_k >= 16  # tl.dot needs 16
    if cfg.variant == "resident":
        assert cfg.block_n >= H  # one program covers the whole hidden state
    elif cfg.variant == "tiled":
        programs = triton.cdiv(B, cfg.block_b) * triton.cdiv(H, cfg.block_n)
        assert programs <= 132, "a grid barrier among more programs than SMs can deadlock"
        if cfg.block_k >= H:  # w_hh rows resident: both dot operands fit the shared memory budget
            itemsize = torch.empty((), dtype=dtype).element_size()
            assert (cfg.block_b + cfg.block_n) * cfg.block_k * itemsize <= config.RESIDENT_W_BYTES
    else:
        assert cfg.variant == "stepwise"
        # only where nothing tiled fits: the widest tile (64 sequences by 64 units) is too many programs
        widest_b = 16 if B <= 16 else (32 if B <= 32 else 64)
        assert triton.cdiv(B, widest_b) * triton.cdiv(H, min(64, triton.next_power_of_2(H))) > 132


def test_small_hidden_sizes_stay_resident(fake_gpu):
    assert config._pick_config(8, 128, torch.float32, fake_gpu, "").variant == "resident"
    assert config._pick_config(32, 256, torch.bfloat16, fake_gpu, "").variant == "resident"
    assert config._pick_config(32, 256, torch.float32, fake_gpu, "").variant == "tiled"


def test_interpreter_configs_never_wait_across_programs():
    cpu = torch.device("cpu")
    assert config._pick_config(17, 130, torch.float32, cpu, "").variant == "resident"
    tiled = config._pick_config(17, 130, torch.float32, cpu, "tiled")
    assert tiled.variant == "tiled" and tiled.block_n >= 130  # one program per batch block
    assert config._pick_config(17, 130, torch.float32, cpu, "stepwise").variant == "stepwise"


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
