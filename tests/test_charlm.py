"""The character LM (``fastrnn.charlm``) and the `fastrnn` command, on CPU, in this process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrnn.charlm import Interrupted, TrainConfig, default_corpus, train
from fastrnn.charlm.cli import main
from fastrnn.charlm.config import UsageError
from fastrnn.charlm.corpus import stdlib_sources
from fastrnn.charlm.training import Trainer
from fastrnn.scratch import Vocab

SMALL = dict(steps=60, hidden=32, seq_len=16, batch_size=8, max_chars=60_000, log_every=10,
             eval_every=30, ckpt_every=20, progress=False)


def test_default_corpus_is_the_stdlib_and_deterministic():
    a, b = default_corpus(50_000), default_corpus(50_000)
    assert a == b and len(a) == 50_000 and "def " in a
    names = [path.name for path in stdlib_sources()]
    assert names == sorted(names) and "abc.py" in names
    assert not any(name.startswith("_sysconfigdata") for name in names)  # the build's, not Python's


@pytest.mark.parametrize("model", ["fastrnn", "torch", "scratch"])
def test_short_run_lowers_perplexity_well_below_vocab_size(tmp_path, model):
    cfg = TrainConfig(out=str(tmp_path), model=model, **{**SMALL, "steps": 150})
    last = train(cfg, log=lambda *_: None)
    vocab_size = len(Vocab.from_state_dict(torch.load(tmp_path / "checkpoint.pt", weights_only=False)["vocab"]))
    assert last["heldout_perplexity"] < vocab_size / 4, (last, vocab_size)
    assert last["tokens_per_s"] > 0
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 15


def stop_at(monkeypatch, step, how):
    """Stop training at the end of ``step``: by Ctrl-C (SIGINT: the loop writes a checkpoint there
    and raises Interrupted) or as a killed process would (no checkpoint written at that step)."""
    real = Trainer.train_step

    def train_step(self):
        loss = real(self)
        if self.step == step and how == "ctrl-c":
            signal.raise_signal(signal.SIGINT)
        elif self.step == step:
            raise RuntimeError("killed")
        return loss

    monkeypatch.setattr(Trainer, "train_step", train_step)


def assert_resume_is_exact(tmp_path, monkeypatch, base, step, how):
    train(TrainConfig(out=str(tmp_path / "full"), **base))
    stop_at(monkeypatch, step, how)
    with pytest.raises(Interrupted if how == "ctrl-c" else RuntimeError):
        train(TrainConfig(out=str(tmp_path / "cut"), **base))
    monkeypatch.undo()
    train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **base))
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert full["step"] == cut["step"] == 60
    for k, v in full["model"].items():
        assert torch.equal(v, cut["model"][k]), k
    rows, full_rows = ([json.loads(r) for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
                       for run in ("cut", "full"))
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]  # none twice
    for key in ("train_perplexity", "heldout_perplexity"):  # the row after the cut averages its steps
        assert [r.get(key) for r in rows] == [r.get(key) for r in full_rows], key  # before it too


@pytest.mark.parametrize("partition,model,ckpt_every,step", [("sequential", "fastrnn", 20, 35),
                                                               ("random", "scratch", 20, 35),
                                                               ("sequential", "fastrnn", 15, 25)])
def test_resume_after_a_kill_reaches_the_same_parameters_bit_for_bit(tmp_path, monkeypatch, partition,
                                                                      model, ckpt_every, step):
    base = dict(SMALL, partition=partition, model=model, layers=1, dropout=0.0, ckpt_every=ckpt_every)
    # killed at step 35: checkpoint at 20, metrics rows up to 30, which the resumed run writes again;
    # killed at 25 with checkpoints every 15: resumed at 15, in the middle of the row for step 20
    assert_resume_is_exact(tmp_path, monkeypatch, base, step, "kill")


def test_resume_after_ctrl_c_with_dropout_is_exact_too(tmp_path, monkeypatch):
    assert_resume_is_exact(tmp_path, monkeypatch, dict(SMALL, layers=2, dropout=0.3), 33, "ctrl-c")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gated_cells_train_resume_exactly_and_sample(tmp_path, monkeypatch, capsys, cell):
    """``--cell lstm|gru``: the run learns, resumes after Ctrl-C to the same parameters bit for bit
    (the LSTM's carried state is a tuple), and ``fastrnn sample`` rebuilds the cell from the checkpoint."""
    base = dict(SMALL, cell=cell, layers=2, dropout=0.1)
    last = train(TrainConfig(out=str(tmp_path / "full"), **base), log=lambda *_: None)
    assert last["heldout_perplexity"] < 50  # from about the vocabulary size (95) at step 0
    stop_at(monkeypatch, 33, "ctrl-c")
    with pytest.raises(Interrupted):
        train(TrainConfig(out=str(tmp_path / "cut"), **base), log=lambda *_: None)
    monkeypatch.undo()
    train(TrainConfig(out=str(tmp_path / "cut"), resume=True, **base), log=lambda *_: None)
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert "rnn.weight_hh_l1" in full and all(torch.equal(full[k], cut[k]) for k in full)
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "full"), "--prefix", "def ", "--num-chars", "20", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_scratch_model_is_the_elman_cell_only(tmp_path, capsys):
    assert main(["train", "--model", "scratch", "--cell", "lstm", "--out", str(tmp_path), "--steps", "1"]) == 2
    assert "--cell rnn" in capsys.readouterr().err


def test_cli_train_then_sample(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--steps", "30", "--hidden", "32", "--seq-len", "16",
                 "--batch-size", "8", "--max-chars", "40000", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("perplexity ") and float(lines[-1].split()[1]) > 1
    assert (out / "checkpoint.pt").exists() and not (out / "checkpoint.pt.tmp").exists()
    for temperature in ("0", "0.8"):
        assert main(["sample", str(out), "--prefix", "import ", "--num-chars", "25",
                     "--temperature", temperature, "--seed", "1"]) == 0
        text = capsys.readouterr().out.rstrip("\n")
        assert text.startswith("import ") and len(text) == len("import ") + 25


def test_python_dash_m_fastrnn_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastrnn", "sample", str(tmp_path), "--prefix", "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint" in r.stderr and "Traceback" not in r.stderr


BAD = {  # argv, a fragment of the one line on stderr; {run} is a trained run, {file} a plain file
    "missing file": (["train", "--text", "/nonexistent/file.txt"], "not found"),
    "empty file": (["train", "--text", "{empty}"], "empty"),
    "a folder as text": (["train", "--text", "{tmp}"], "cannot read"),
    "unknown device": (["train", "--device", "tpu9"], "device"),
    "empty device": (["train", "--device", ""], "device"),
    "meta device": (["train", "--device", "meta"], "not supported"),
    "second cpu": (["train", "--device", "cpu:1"], "the CPU is one device"),
    "cuda absent": (["train", "--device", "cuda:7"], "CUDA"),
    "bf16 on the cpu": (["train", "--bf16", "--device", "cpu"], "--bf16 is CUDA autocast"),
    "zero steps": (["train", "--steps", "0"], "--steps must be positive"),
    "zero hidden": (["train", "--hidden", "0"], "--hidden must be positive"),
    "zero layers": (["train", "--layers", "0"], "--layers must be positive"),
    "zero seq-len": (["train", "--seq-len", "0"], "--seq-len must be positive"),
    "zero batch": (["train", "--batch-size", "0"], "--batch-size must be positive"),
    "zero max-chars": (["train", "--max-chars", "0"], "--max-chars must be positive"),
    "negative ckpt-every": (["train", "--ckpt-every", "-5"], "--ckpt-every must be positive"),
    "zero eval-every": (["train", "--eval-every", "0"], "--eval-every must be positive"),
    "zero log-every": (["train", "--log-every", "0"], "--log-every must be positive"),
    "dropout 1.5": (["train", "--dropout", "1.5", "--layers", "2"], "--dropout must be a number in [0, 1)"),
    "dropout 1": (["train", "--dropout", "1", "--layers", "2"], "--dropout must be a number in [0, 1)"),
    "negative dropout": (["train", "--dropout", "-0.1"], "--dropout"),
    "negative lr": (["train", "--lr", "-1"], "--lr must be a number > 0"),
    "zero lr": (["train", "--lr", "0"], "--lr must be a number > 0"),
    "nan lr": (["train", "--lr", "nan"], "--lr must be a number > 0, got nan"),
    "lr not a number": (["train", "--lr", "abc"], "argument --lr: invalid float value"),
    "zero clip": (["train", "--clip", "0"], "--clip must be a number > 0"),
    "infinite clip": (["train", "--clip", "inf"], "--clip"),
    "negative threads": (["train", "--threads", "-1"], "--threads must be an integer >= 0"),
    "negative seed": (["train", "--seed", "-1"], "--seed must be an integer from 0 to"),
    "seed past 64 bits": (["train", "--seed", str(2**64)], "--seed"),
    "unknown model": (["train", "--model", "jax"], "argument --model: invalid choice"),
    "unknown cell": (["train", "--cell", "mgu"], "argument --cell: invalid choice"),
    "resume and force": (["train", "--resume", "--force"], "give one"),
    "out is a file": (["train", "--out", "{empty}"], "is a file"),
    "scratch with two layers": (["train", "--model", "scratch", "--layers", "2"], "--layers 1"),
    "empty prefix": (["sample", "{run}", "--prefix", ""], "prefix"),
    "negative num-chars": (["sample", "{run}", "--prefix", "a", "--num-chars", "-1"],
                           "--num-chars must be an integer >= 0"),
    "negative temperature": (["sample", "{run}", "--prefix", "a", "--temperature", "-1"],
                             "--temperature must be a number >= 0"),
    "nan temperature": (["sample", "{run}", "--prefix", "a", "--temperature", "nan"], "--temperature"),
    "negative sample seed": (["sample", "{run}", "--prefix", "a", "--seed", "-3"], "--seed"),
    "negative sample threads": (["sample", "{run}", "--prefix", "a", "--threads", "-1"], "--threads"),
    "sample device": (["sample", "{run}", "--prefix", "a", "--device", "tpu9"], "device"),
    "no checkpoint": (["sample", "{tmp}", "--prefix", "a"], "no checkpoint"),
    "not a checkpoint": (["sample", "{junk}", "--prefix", "a"], "cannot read"),
    "not fastrnn's checkpoint": (["sample", "{tensor}", "--prefix", "a"], "not a fastrnn checkpoint"),
    "resume not fastrnn's": (["train", "--out", "{tensor}", "--resume"], "not a fastrnn checkpoint"),
    "a model its config does not fit": (["sample", "{misfit}", "--prefix", "a"], "does not fit its configuration"),
    "negative min-freq": (["train", "--min-freq", "-1"], "--min-freq must be >= 0"),
    "too short to hold one out": (["train", "--text", "{short}", "--batch-size", "1"], "too short"),
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    train(TrainConfig(out=str(run), steps=2, hidden=8, seq_len=8, batch_size=4, max_chars=20_000,
                      progress=False), log=lambda *_: None)
    return run


def exit_code(argv) -> int:
    """``fastrnn ARGV``'s exit code, in this process (argparse's own errors exit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_give_one_clear_line(tmp_path, capsys, tiny_run, case):
    """Every value of ``fastrnn train`` and ``fastrnn sample`` is checked: one line, exit code 2.
    (tests/test_cli.py runs the issue's cases through the real command.)"""
    if case == "cuda absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    junk, tensor, misfit = tmp_path / "junk", tmp_path / "tensor", tmp_path / "misfit"
    for folder in (junk, tensor, misfit):
        folder.mkdir()
    (junk / "checkpoint.pt").write_text("not a checkpoint")
    torch.save(torch.zeros(3), tensor / "checkpoint.pt")
    checkpoint = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    torch.save({**checkpoint, "config": {**checkpoint["config"], "hidden": 9}}, misfit / "checkpoint.pt")
    short = tmp_path / "short.txt"  # 360 characters to train on, 40 held out: too few for --seq-len 32
    short.write_text("abcdefghij" * 40)
    argv = [a.format(empty=empty, run=tiny_run, tmp=tmp_path, junk=junk, tensor=tensor, misfit=misfit,
                     short=short) for a in BAD[case][0]]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "x")]
    if argv[0] == "train":
        argv += ["--no-progress"]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastrnn: error: "), err
    assert BAD[case][1] in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_sampling_needs_only_the_model_vocabulary_and_configuration(tiny_run, tmp_path, capsys):
    """A checkpoint slimmed for serving (no optimizer, data position or generators) still samples."""
    checkpoint = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    (tmp_path / "slim").mkdir()
    torch.save({k: checkpoint[k] for k in ("model", "vocab", "config")}, tmp_path / "slim" / "checkpoint.pt")
    for run in (tiny_run, tmp_path / "slim"):
        assert main(["sample", str(run), "--prefix", "def ", "--num-chars", "20", "--seed", "1"]) == 0
    full, slim = capsys.readouterr().out.splitlines()
    assert full == slim and len(full) == 24


def test_a_tiny_temperature_is_greedy_rather_than_an_error(tiny_run, capsys):
    args = ["sample", str(tiny_run), "--prefix", "def ", "--num-chars", "30"]
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert main([*args, "--temperature", "1e-45", "--seed", "0"]) == 0  # logits / 1e-45 overflow
    assert capsys.readouterr().out == greedy


def test_the_library_never_imports_the_application():
    """``import fastrnn`` and its modules leave ``fastrnn.charlm`` (the app) out; only
    ``python -m fastrnn`` (fastrnn/__main__.py) reaches it."""
    root = Path(__file__).resolve().parent.parent
    library = [p for p in [*(root / "fastrnn").glob("*.py"), *(root / "kernels").rglob("*.py")]
               if p.name != "__main__.py"]
    assert len(library) > 5
    for path in library:
        assert "charlm" not in path.read_text(), path
    code = ("import sys, pkgutil, importlib, fastrnn, fastrnn.kernels\n"
            "for m in pkgutil.iter_modules(fastrnn.__path__):\n"
            "    if m.name not in ('charlm', '__main__'): importlib.import_module('fastrnn.' + m.name)\n"
            "print(sorted(n for n in sys.modules if 'charlm' in n))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]


def test_resume_on_another_text_is_refused(tmp_path, capsys):
    """Another text in the run's file is refused by its sha256; a checkpoint written before fastrnn
    kept the sha256 is checked as then: the same --text, and the text's vocabulary."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("abcabcabc " * 400)
    b.write_text("xyzxyzxyz " * 400)
    common = ["--out", str(tmp_path / "run"), "--hidden", "8", "--seq-len", "8", "--batch-size", "4",
              "--no-progress", "--steps", "3"]
    assert main(["train", "--text", str(a), *common]) == 0
    original = a.read_text()
    a.write_text(b.read_text())  # the same file, another text
    assert main(["train", "--text", str(a), "--resume", *common]) == 2
    assert "a.txt is not the text the run in" in capsys.readouterr().err
    checkpoint_file = tmp_path / "run" / "checkpoint.pt"
    checkpoint = torch.load(checkpoint_file, weights_only=True)
    torch.save({k: v for k, v in checkpoint.items() if k not in ("text", "window")}, checkpoint_file)  # an older one
    assert main(["train", "--text", str(a), "--resume", *common]) == 2
    assert "another vocabulary" in capsys.readouterr().err
    a.write_text(original)
    b.write_text(original)  # the same text, at another path: then refused
    assert main(["train", "--text", str(b), "--resume", *common]) == 2
    assert "b.txt" in capsys.readouterr().err


def test_every_eval_every_step_is_evaluated_whatever_log_every(tmp_path):
    """A row with the held-out perplexity every --eval-every steps and at the end, and a row every
    --log-every steps, even where neither divides the other."""
    train(TrainConfig(out=str(tmp_path), **{**SMALL, "steps": 20, "hidden": 8, "log_every": 3, "eval_every": 4}),
          log=lambda *_: None)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4, 6, 8, 9, 12, 15, 16, 18, 20]
    assert [r["step"] for r in rows if "heldout_perplexity" in r] == [4, 8, 12, 16, 20]


def test_a_short_held_out_text_is_evaluated_in_fewer_rows(tmp_path):
    """100 held-out characters hold 5 rows of --seq-len 16, not 8: the perplexity is a number (it was
    NaN, which strict JSON readers refuse)."""
    text = tmp_path / "t.txt"
    text.write_text(("the quick brown fox jumps over the lazy dog. " * 30)[:1000])
    last = train(TrainConfig(out=str(tmp_path / "run"), text=str(text), **{**SMALL, "steps": 4, "hidden": 8}),
                 log=lambda *_: None)
    assert 1 < last["heldout_perplexity"] < 100
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_resume_finds_its_text_from_any_folder_and_refuses_another(tmp_path, monkeypatch, capsys):
    """The checkpoint keeps the text's absolute path and sha256: a run trained on a relative --text
    resumes from another folder; --text may say where the same text is now, never name another one;
    repeating a default (--lr 1.0 for sgd) is no conflict; a half-written metrics row is dropped."""
    text = "the quick brown fox jumps over the lazy dog. " * 60
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.txt").write_text(text)
    monkeypatch.chdir(tmp_path / "a")
    assert main(["train", "--text", "t.txt", "--out", "run", "--steps", "2", "--hidden", "8", "--seq-len", "8",
                 "--batch-size", "4", "--log-every", "1", "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    resume = ["train", "--out", "a/run", "--resume", "--no-progress", "--steps"]
    assert main([*resume, "3", "--lr", "1.0"]) == 0
    with pytest.raises(UsageError, match=r"has --text \S*t\.txt, not --text None;"):  # (the API's: the default corpus)
        train(TrainConfig(out="a/run", resume=True, steps=3, hidden=8, seq_len=8, batch_size=4, progress=False))
    (tmp_path / "a" / "t.txt").rename(tmp_path / "moved.txt")
    capsys.readouterr()
    assert main([*resume, "4"]) == 2
    assert "--text FILE names where it is now" in capsys.readouterr().err
    (tmp_path / "other.txt").write_text(text[::-1])  # the same characters: the same vocabulary
    assert main([*resume, "4", "--text", "other.txt"]) == 2
    assert "other.txt is not the text the run in a/run was trained on" in capsys.readouterr().err
    with open(tmp_path / "a" / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train_perpl')  # as a run killed while writing leaves it
    assert main([*resume, "4", "--text", "moved.txt"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert torch.load(tmp_path / "a" / "run" / "checkpoint.pt", weights_only=True)["step"] == 4


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo, DDP) on the same global batch as one process."""
    args = ["train", "--steps", "8", "--hidden", "16", "--seq-len", "8", "--batch-size", "8",
            "--max-chars", "30000", "--no-progress", "--ckpt-every", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FASTRNN_BACKEND", None)
    one = subprocess.run([sys.executable, "-m", "fastrnn", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", "-m", "fastrnn", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("perplexity") == 1  # one rank reports
    p1 = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)["model"]
    p2 = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["model"]
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k], rtol=1e-4, atol=1e-5)
