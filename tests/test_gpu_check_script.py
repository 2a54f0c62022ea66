"""The GPU proof script stays runnable: its --smoke mode runs every section on the CPU interpreter."""

import os
import subprocess

import pytest
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
SECTIONS = ("rnn parity", "lstm parity", "gru parity", "lstm-proj parity", "barrier", "extremes", "variants",
            "ecosystem")


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "r.md")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = (tmp_path / "r.md").read_text()
    for section in SECTIONS:
        assert f"{section}: PASS" in text
    assert "FAIL" not in text
    assert "autocast torch.bfloat16: fastrnn returns torch.bfloat16" in text


def test_gpu_check_picks_sections_shapes_and_dtypes(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--sections", "parity", "--kinds", "gru",
                        "--shapes", "smoke2", "--dtypes", "fp32"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith("gru parity: PASS")
    assert [line for line in r.stdout.splitlines() if line.startswith("| 2 | 3 | 2 | 1 | fp32 |")]
