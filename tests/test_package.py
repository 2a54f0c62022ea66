"""The package as installed: fastrnn.kernels is a subpackage, and there is no top-level `kernels`."""

import importlib.util
import os
import subprocess
import sys

import pytest

import fastrnn
import fastrnn.kernels


def test_kernels_is_a_subpackage_of_fastrnn():
    assert fastrnn.kernels.__name__ == "fastrnn.kernels"
    assert callable(fastrnn.kernels.recurrence_fwd) and callable(fastrnn.kernels.recurrence_bwd)


def test_no_top_level_kernels_module():
    # run from a neutral directory: the repository root would put its own folder on sys.path
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('kernels') is not None)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert subprocess.run([sys.executable, "-c", code], cwd="/", env=env).returncode == 0


def test_public_api():
    assert set(fastrnn.__all__) >= {"RNN", "recurrence", "recurrence_reference"}
    assert importlib.util.find_spec("fastrnn.scratch") is not None


def test_plain_install_maps_kernels_under_fastrnn(tmp_path):
    """`pip install .` (a wheel, not editable): fastrnn/kernels/*.py inside, no top-level kernels/."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(root)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("fastrnn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("elman", "lstm", "gru", "gates", "common", "config", "launch", "__init__"):
        assert f"fastrnn/kernels/{module}.py" in names
    assert not [n for n in names if n.startswith("kernels/")]


def test_import_leaves_dynamo_unimported():
    """``import fastrnn`` does not import ``torch._dynamo`` (about a second; ``torch`` alone does not
    either): only a compile that reaches ``op.run_eagerly`` does."""
    code = ("import sys, torch; before = 'torch._dynamo' in sys.modules; import fastrnn; "
            "print(before, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.mark.parametrize("first", ["fastrnn", "the flop counter"])
def test_the_flop_counter_counts_the_ops_imported_before_or_after(first):
    """The ops' flop formulas are registered whichever is imported first, fastrnn or the counter."""
    imports = ["import fastrnn", "from torch.utils.flop_counter import FlopCounterMode"]
    code = "\n".join([*(imports if first == "fastrnn" else imports[::-1]),
                      "import torch",
                      "x, w = torch.randn(5, 3, 16), torch.randn(16, 4)",
                      "with FlopCounterMode(display=False) as counter:",
                      "    fastrnn.CELLS['lstm'].recurrence(x, None, None, w)",
                      "print(counter.get_total_flops())"])
    env = {**os.environ, "FASTRNN_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert int(out) == 2 * 5 * 3 * 16 * 4


def test_import_works_where_the_flop_counter_cannot_be_imported():
    """The flop formulas are registered at import; a flop counter that fails to import (a broken
    Triton) leaves ``import fastrnn`` and the modules working, with nothing registered."""
    code = ("import sys; sys.modules['torch.utils.flop_counter'] = None; import torch, fastrnn; "
            "print(fastrnn.LSTM(4, 5)(torch.randn(3, 2, 4))[0].shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "torch.Size([3, 2, 5])"
