"""The `fastrnn` command as a user runs it: a real process (`python -m fastrnn`), its exit code,
stdout and stderr; small runs on a slice of the default corpus."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from fastrnn.charlm import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--hidden", "16", "--seq-len", "8", "--batch-size", "4", "--max-chars", "20000",
        "--eval-every", "10", "--ckpt-every", "10", "--no-progress"]


def fastrnn(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fastrnn", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(r, code=2):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("fastrnn: ") and "Traceback" not in r.stderr
    return r.stderr


def metrics_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return torch.load(run / "checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 30-step run and what the command printed."""
    run = tmp_path_factory.mktemp("cli") / "run"
    r = fastrnn("train", "--out", run, "--steps", 30, *TINY)
    assert r.returncode == 0, r.stderr
    return run, r.stdout


def test_train_reports_the_whole_runs_throughput_and_draws_the_curve(trained):
    run, stdout = trained
    throughput, perplexity = stdout.strip().splitlines()[-2:]
    m = re.fullmatch(r"tokens/s (\d+) \(whole run: 30 steps, (\d+) tokens in ([\d.]+) s\)", throughput)
    assert m, throughput
    tokens_per_s, tokens, seconds = int(m[1]), int(m[2]), float(m[3])
    assert tokens == 30 * 4 * 8
    slowest, fastest = tokens / (seconds + 0.05), tokens / max(seconds - 0.05, 1e-9)  # 0.1 s printed
    assert slowest - 1 <= tokens_per_s <= fastest + 1  # the whole run's tokens over its seconds
    assert re.fullmatch(r"perplexity [\d.]+ \(held-out, step 30\)", perplexity)
    assert (run / "curve.png").stat().st_size > 1000
    assert metrics_steps(run) == [10, 20, 30]


def test_resume_of_a_finished_run_says_so_and_reports_its_perplexity(trained):
    run, stdout = trained
    r = fastrnn("train", "--out", run, "--resume")
    assert r.returncode == 0, r.stderr
    assert "nothing to train" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == stdout.strip().splitlines()[-1]
    assert metrics_steps(run) == [10, 20, 30]


def test_resume_takes_the_saved_configuration_and_refuses_a_conflicting_flag(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    err = one_error_line(fastrnn("train", "--out", run, "--resume", "--hidden", 32, "--seq-len", 8))
    assert "--hidden 16, not --hidden 32" in err and "--steps" in err  # what may change is listed
    r = fastrnn("train", "--out", run, "--resume", "--steps", 40)  # no other flag repeated
    assert r.returncode == 0, r.stderr
    assert "whole run: 10 steps" in r.stdout
    ckpt = torch.load(run / "checkpoint.pt")
    assert ckpt["step"] == 40 and ckpt["config"]["hidden"] == 16
    assert metrics_steps(run) == [10, 20, 30, 40]


def test_a_second_run_into_the_same_folder_needs_force(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    err = one_error_line(fastrnn("train", "--out", run, "--steps", 10, *TINY))
    assert "already holds a run" in err and "--resume" in err and "--force" in err
    assert metrics_steps(run) == [10, 20, 30]  # untouched
    r = fastrnn("train", "--out", run, "--steps", 10, "--force", *TINY)
    assert r.returncode == 0, r.stderr
    assert metrics_steps(run) == [10] and torch.load(run / "checkpoint.pt")["step"] == 10


def test_ctrl_c_writes_a_checkpoint_and_resume_goes_on_exactly(tmp_path):
    run = tmp_path / "run"
    args = ["--lr-schedule", "constant", *TINY, "--ckpt-every", 1000, "--log-every", 5]
    command = ["train", "--out", run, "--steps", 100_000, *args]
    p = subprocess.Popen([sys.executable, "-m", "fastrnn", *map(str, command)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr and "--resume" in stderr
    step = torch.load(run / "checkpoint.pt")["step"]
    assert 5 <= step < 100_000 and f"interrupted at step {step}" in stderr
    r = fastrnn("train", "--out", run, "--resume", "--steps", step + 12)
    assert r.returncode == 0, r.stderr
    steps = metrics_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == step + 12  # no row twice
    reference = TrainConfig(out=str(tmp_path / "reference"), steps=step + 12, lr_schedule="constant",
                            hidden=16, seq_len=8, batch_size=4, max_chars=20000, progress=False)
    train(reference, log=lambda *_: None)
    want, got = weights(tmp_path / "reference"), weights(run)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_help_shows_defaults_version_and_a_misspelt_flag_gets_trains_usage():
    r = fastrnn("train", "--help")
    assert r.returncode == 0
    help_of = {block.split()[0]: " ".join(block.split()) for block in re.split(r"\n  (?=-)", r.stdout)}
    d = TrainConfig()
    for flag, value in (("--steps", d.steps), ("--hidden", d.hidden), ("--lr-schedule", d.lr_schedule)):
        assert help_of[flag].endswith(f"(default: {value})"), help_of[flag]
    r = fastrnn("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fastrnn {version('fastrnn')}"
    r = fastrnn("train", "--hiden", 64)
    assert r.returncode == 2 and r.stderr.startswith("usage: fastrnn train ")
    assert r.stderr.strip().splitlines()[-1] == "fastrnn train: error: unrecognized arguments: --hiden 64"


def longest_run(text):
    return max(len(m.group()) for m in re.finditer(r"(.)\1*", text, re.S))


def test_default_sample_is_drawn_and_greedy_is_one_flag_away(trained):
    run, _ = trained
    common = ["sample", run, "--prefix", "def ", "--num-chars", 300]
    drawn = fastrnn(*common, "--seed", 0).stdout
    greedy = fastrnn(*common, "--temperature", 0).stdout  # this small model's greedy text: all spaces
    assert drawn != greedy and len(drawn) == len(greedy) == len("def ") + 300 + 1
    assert longest_run(drawn) < 20


def test_readme_install_command_gives_the_curve_and_figures_name_the_defaults():
    readme = " ".join((ROOT / "README.md").read_text().split())
    extras = re.search(r'pip install -e "\.\[([\w,]+)\]" && fastrnn train', readme)[1].split(",")
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for extra in extras for dep in optional[extra])
    d = TrainConfig()
    stamp = (f"--steps {d.steps} --hidden {d.hidden} --layers {d.layers} --seq-len {d.seq_len} "
             f"--batch-size {d.batch_size} --optimizer {d.optimizer} --lr-schedule {d.lr_schedule} "
             f"--clip {d.clip} --max-chars {d.max_chars} --seed {d.seed}")
    assert stamp in readme  # README's figures were measured with today's defaults
