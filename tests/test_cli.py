"""The `fastrnn` command as a user runs it: a real process (`python -m fastrnn`), its exit code,
stdout and stderr; small runs on a slice of the default corpus."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from fastrnn.charlm import TrainConfig, default_corpus, train
from fastrnn.charlm.cli import parsers

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--hidden", "16", "--seq-len", "8", "--batch-size", "4", "--max-chars", "20000",
        "--eval-every", "10", "--ckpt-every", "10", "--no-progress"]


def fastrnn(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-m", "fastrnn", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def start_fastrnn(*args):
    """``fastrnn ARGS`` started, not waited for."""
    return subprocess.Popen([sys.executable, "-m", "fastrnn", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, p, seconds=60):
    """Poll ``condition`` until it holds, while the command ``p`` runs."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and p.poll() is None:
        if condition():
            return
        time.sleep(0.02)
    if not condition():
        p.kill()
        pytest.fail(f"waited in vain; the command printed {p.communicate(timeout=60)}")


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
    """A finished 30-step run and what the command printed (with OMP_NUM_THREADS=2 set, which
    --threads, default 1, overrides)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    r = fastrnn("train", "--out", run, "--steps", 30, *TINY, env={**os.environ, "OMP_NUM_THREADS": "2"})
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


def test_train_names_its_text_and_threads_first(trained):
    first = trained[1].splitlines()[0]
    digest = hashlib.sha256(default_corpus(20_000).encode()).hexdigest()[:12]
    assert re.fullmatch(rf"text: 20000 characters of .+\*\.py \(sha256 {digest}\), vocabulary \d+; "
                        r"1 CPU thread", first), first


def test_resume_of_a_finished_run_says_so_and_reports_its_perplexity(trained):
    run, stdout = trained
    r = fastrnn("train", "--out", run, "--resume")
    assert r.returncode == 0, r.stderr
    assert "nothing to train" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == stdout.strip().splitlines()[-1]
    assert metrics_steps(run) == [10, 20, 30]


@pytest.mark.slow
def test_resume_of_a_finished_run_reports_the_saved_figure_without_evaluating(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    ckpt = torch.load(run / "checkpoint.pt")
    assert ckpt["heldout"]["step"] == 30
    ckpt["heldout"]["perplexity"] = 123.0  # a figure no evaluation gives
    torch.save(ckpt, run / "checkpoint.pt")
    r = fastrnn("train", "--out", run, "--resume")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "perplexity 123.0000 (held-out, step 30)"


@pytest.mark.parametrize("args,message", [
    (["train", "--dropout", 1.5, "--layers", 2], "--dropout must be a number in [0, 1), got 1.5"),
    (["train", "--lr", -1], "--lr must be a number > 0, got -1.0"),
    (["train", "--clip", 0], "--clip must be a number > 0, got 0.0"),
    (["train", "--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["sample", "{run}", "--prefix", "x", "--temperature", -1],
     "--temperature must be a number >= 0, got -1.0"),
], ids=["dropout", "lr", "clip", "lr-not-a-number", "temperature"])
def test_a_bad_value_is_one_line_and_exit_code_2(trained, tmp_path, args, message):
    """Issue #19's cases through the real command (tests/test_charlm.py checks every value)."""
    args = [str(a).format(run=trained[0]) for a in args]
    out = ["--out", tmp_path / "run"] if args[0] == "train" else []
    err = one_error_line(fastrnn(*args, *out))
    assert err == f"fastrnn: error: {message}\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
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


@pytest.mark.slow
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
    p = start_fastrnn(*command)
    wait_for((run / "metrics.jsonl").exists, p)
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert f"`fastrnn train --out {run} --resume` continues it" in stderr
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


@pytest.mark.slow
def test_ctrl_c_during_a_held_out_evaluation_stops_it_and_resume_logs_that_row(tmp_path):
    """The evaluation checks for Ctrl-C between batches: the run stops at once with a checkpoint
    whose metrics row waits for its held-out figure, which --resume evaluates and logs first."""
    run = tmp_path / "run"
    # a long evaluation (60000 held-out characters, 4 sequences of 8 a batch) after short steps
    p = start_fastrnn("train", "--out", run, "--steps", 4, "--hidden", 8, "--seq-len", 8, "--batch-size",
                      4, "--max-chars", 600_000, "--log-every", 1, "--eval-every", 2, "--no-progress")
    wait_for((run / "metrics.jsonl").exists, p)  # step 1 logged; step 2 trains, then evaluates
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert stderr == (f"fastrnn: interrupted at step 2, checkpoint written to {run / 'checkpoint.pt'}; "
                      f"`fastrnn train --out {run} --resume` continues it\n")
    ckpt = torch.load(run / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["unlogged"]["step"] == 2 and ckpt["heldout"] is None
    assert metrics_steps(run) == [1]
    r = fastrnn("train", "--out", run, "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["step"] for row in rows if "heldout_perplexity" in row] == [2, 4]


def test_ctrl_c_before_training_names_the_run_folder_too(tmp_path):
    """A Ctrl-C outside the loop (here while the text is read) says how to resume, with --out."""
    fifo, run = tmp_path / "text.fifo", tmp_path / "run"
    os.mkfifo(fifo)
    p = start_fastrnn("train", "--text", fifo, "--out", run, "--no-progress")

    writers = []

    def command_reads_the_pipe():  # only then does this end open without blocking (else ENXIO)
        try:
            writers.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return True
        except OSError:
            return False

    wait_for(command_reads_the_pipe, p)  # it now waits in read() for text that never comes
    for _ in range(5):  # (a SIGINT landing after Python's last check, before read() blocks, is seen
        p.send_signal(signal.SIGINT)  # only at the next one: as a user would, press Ctrl-C again)
        try:
            p.wait(timeout=20)
            break
        except subprocess.TimeoutExpired:
            continue
    _, stderr = p.communicate(timeout=60)
    os.close(writers[0])
    assert p.returncode == 130, stderr
    assert stderr == (f"fastrnn: interrupted; `fastrnn train --out {run} --resume` continues from the "
                      "last checkpoint, if any\n")


@pytest.mark.slow
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


def test_a_reader_that_stops_ends_the_command_with_one_line(trained):
    """``fastrnn sample ... | head -c 0``: no traceback, exit code 141 (as SIGPIPE's)."""
    run, _ = trained
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (stdout buffered, as usual)
    p = subprocess.Popen([sys.executable, "-m", "fastrnn", "sample", str(run), "--prefix", "a", "--num-chars", "5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    p.stdout.close()  # no reader: the command's first write fails
    p.wait(timeout=120)
    r = subprocess.CompletedProcess(p.args, p.returncode, "", p.stderr.read())
    assert "nothing reads the output any more" in one_error_line(r, code=141)


def test_default_sample_is_drawn_and_greedy_is_one_flag_away(trained):
    run, _ = trained
    common = ["sample", run, "--prefix", "def ", "--num-chars", 300]
    drawn = fastrnn(*common, "--seed", 0).stdout
    greedy = fastrnn(*common, "--temperature", 0).stdout  # this small model's greedy text: all spaces
    assert drawn != greedy and len(drawn) == len(greedy) == len("def ") + 300 + 1
    assert longest_run(drawn) < 20


def test_readme_lists_every_option_of_both_commands():
    readme = (ROOT / "README.md").read_text()
    _, commands = parsers()
    for name, parser in commands.items():
        for action in parser._actions:  # argparse keeps no public list of a parser's options
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in readme, f"fastrnn {name} {option} is not in README"
    assert "`fastrnn --version`" in readme


def test_readme_install_command_gives_the_curve_and_figures_name_the_defaults():
    readme = " ".join((ROOT / "README.md").read_text().split())
    extras = re.search(r'pip install -e "\.\[([\w,]+)\]" && fastrnn train', readme)[1].split(",")
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11 on; the rest of the tests run on 3.10)
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("matplotlib") for extra in extras for dep in optional[extra])
    d = TrainConfig()
    stamp = (f"--steps {d.steps} --hidden {d.hidden} --layers {d.layers} --seq-len {d.seq_len} "
             f"--batch-size {d.batch_size} --optimizer {d.optimizer} --lr-schedule {d.lr_schedule} "
             f"--clip {d.clip} --threads {d.threads} --max-chars {d.max_chars} --seed {d.seed}")
    assert stamp in readme  # README's figures were measured with today's defaults
