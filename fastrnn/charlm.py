"""The character language model: corpus, model, training loop, checkpoints, sampling.

The same loop trains fastrnn's modules (``--cell rnn|lstm|gru``), their torch twins or the textbook
scratch model, so they can be compared. Runs on a laptop CPU with no download (the default corpus is the Python standard
library's own source) and on several GPUs under ``torchrun`` (DistributedDataParallel).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import sysconfig
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import scratch
from .rnn import GRU, LSTM, RNN
from .scratch import Vocab, grad_clipping


class UsageError(Exception):
    """A bad argument or input: reported as one line, no traceback."""


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def default_corpus(max_chars: int = 2_000_000) -> str:
    """The running interpreter's standard library source: its top-level ``*.py`` files in name
    order, up to ``max_chars``. Exists wherever Python does, so no download."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    if not corpus:
        raise UsageError(f"no Python source found under {stdlib} for the default corpus; use --text FILE")
    return corpus


def load_corpus(path: str | None, max_chars: int) -> str:
    if path is None:
        return default_corpus(max_chars)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path} as UTF-8 text: {e}") from None
    if not text.strip():
        raise UsageError(f"text file is empty: {path}")
    return text[:max_chars]


def batches(corpus: list[int], batch_size: int, seq_len: int, partition: str, epoch: int, seed: int):
    """The batches of one epoch, the same for the same (seed, epoch) on every run and rank."""
    rng = random.Random(seed * 1_000_003 + epoch)
    fn = scratch.seq_data_iter_random if partition == "random" else scratch.seq_data_iter_sequential
    return list(fn(corpus, batch_size, seq_len, rng=rng))


# --------------------------------------------------------------------------------------------------
# Models: (B, T) indices in, (T * B, V) logits and a state out
# --------------------------------------------------------------------------------------------------


class ScratchLM(nn.Module):
    """The textbook model (``scratch.rnn``) with its five tensors registered as parameters."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.vocab_size, self.num_hiddens = vocab_size, hidden
        names = ["W_xh", "W_hh", "b_h", "W_hq", "b_q"]
        for name, p in zip(names, scratch.get_params(vocab_size, hidden, "cpu")):
            self.register_parameter(name, nn.Parameter(p.detach()))

    def forward(self, X, state):
        params = [self.W_xh, self.W_hh, self.b_h, self.W_hq, self.b_q]
        return scratch.rnn(scratch.one_hot(X, self.vocab_size).to(self.W_xh.dtype), state, params)

    def begin_state(self, batch_size: int, device):
        return scratch.init_rnn_state(batch_size, self.num_hiddens, device)


LAYERS = {"fastrnn": {"rnn": RNN, "lstm": LSTM, "gru": GRU},
          "torch": {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}}


def build_model(kind: str, vocab_size: int, hidden: int, layers: int, dropout: float,
                cell: str = "rnn") -> nn.Module:
    if kind == "scratch":
        if layers != 1:
            raise UsageError("--model scratch has one layer; use --layers 1")
        if cell != "rnn":
            raise UsageError("--model scratch is the textbook Elman RNN; use --cell rnn")
        return ScratchLM(vocab_size, hidden)
    layer = LAYERS[kind][cell](vocab_size, hidden, layers, dropout=dropout if layers > 1 else 0.0)
    return scratch.RNNModel(layer, vocab_size)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    text: str | None = None
    out: str = "runs/charlm"
    model: str = "fastrnn"
    cell: str = "rnn"
    steps: int = 4000
    hidden: int = 256
    layers: int = 1
    dropout: float = 0.0
    seq_len: int = 32
    batch_size: int = 32
    lr: float | None = None
    optimizer: str = "sgd"
    lr_schedule: str = "cosine"
    clip: float = 1.0
    partition: str = "sequential"
    device: str = "auto"
    bf16: bool = False
    seed: int = 0
    max_chars: int = 2_000_000
    min_freq: int = 5
    ckpt_every: int = 100
    eval_every: int = 500
    log_every: int = 10
    resume: bool = False
    force: bool = False
    progress: bool = True


RESUMABLE = {"steps", "device", "ckpt_every", "eval_every", "log_every", "progress", "out", "resume", "force"}
"""The options that may differ from the checkpoint's on --resume; every other one shapes the model,
the data or the optimisation, and must match."""

RESUMABLE_FLAGS = "--steps, --device, --ckpt-every, --eval-every, --log-every and --no-progress"


class Interrupted(Exception):
    """Ctrl-C stopped training at the end of a step, and a checkpoint was written there."""

    def __init__(self, step: int, out: Path) -> None:
        super().__init__(f"interrupted at step {step}, checkpoint written to {out / 'checkpoint.pt'}")
        self.step, self.out = step, out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (try cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for but CUDA is not available here")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported; use cpu or cuda")
    return device


def _check_config(cfg: TrainConfig) -> None:
    for name in ("steps", "hidden", "layers", "seq_len", "batch_size", "ckpt_every", "eval_every",
                 "log_every"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.model not in ("fastrnn", "torch", "scratch"):
        raise UsageError(f"unknown --model {cfg.model!r}")
    if cfg.cell not in ("rnn", "lstm", "gru"):
        raise UsageError(f"unknown --cell {cfg.cell!r}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise UsageError(f"unknown --lr-schedule {cfg.lr_schedule!r}")
    if cfg.optimizer not in ("sgd", "adam"):
        raise UsageError(f"unknown --optimizer {cfg.optimizer!r}")
    if cfg.resume and cfg.force:
        raise UsageError("--resume continues the run in --out and --force overwrites it: give one")


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _setup_processes(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    """(device, rank, world size): this process's device, one GPU per process under torchrun."""
    device = resolve_device(cfg.device)
    if cfg.bf16 and device.type != "cuda":
        raise UsageError(f"--bf16 is CUDA autocast; this run is on {device.type}")
    rank, world = _distributed()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    return device, rank, world


# Checkpoints and the run folder


def read_checkpoint(out: str | Path) -> dict:
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        raise UsageError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def resume_config(out: str, given: dict) -> TrainConfig:
    """The configuration saved in OUT/checkpoint.pt with ``given`` (the options set on the command
    line) applied; an option outside RESUMABLE that differs from the saved one is a UsageError."""
    saved = read_checkpoint(out)["config"]
    _check_resumable(saved, given, Path(out))
    known = {f.name for f in fields(TrainConfig)}
    this_call = {"resume": True, "force": False, "progress": True}  # never taken from the checkpoint
    return TrainConfig(**{k: v for k, v in {**saved, **this_call, **given}.items() if k in known})


def _check_resumable(saved: dict, given: dict, out: Path) -> None:
    differ = [k for k, v in given.items() if k not in RESUMABLE and k in saved and v != saved[k]]
    if differ:
        def flags(config):
            return ", ".join(f"--{k.replace('_', '-')} {config[k]}" for k in differ)

        raise UsageError(f"--resume: the run in {out} has {flags(saved)}, not {flags(given)}; "
                         f"only {RESUMABLE_FLAGS} may change on resume")


def _refuse_existing_run(out: Path) -> None:
    for name in ("checkpoint.pt", "metrics.jsonl"):
        if (out / name).exists():
            raise UsageError(f"{out} already holds a run ({name}): --resume continues it, --force "
                             "overwrites it, --out DIR trains elsewhere")


def _prepare_out(out: Path, resume: bool, step: int) -> None:
    """A new run starts from an empty run folder; a resumed one keeps the metrics rows up to its
    checkpoint's step, so that the steps it trains again are not logged twice."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    if not resume:
        for name in ("checkpoint.pt", "metrics.jsonl", "curve.png"):
            (out / name).unlink(missing_ok=True)
    elif metrics.exists():
        rows = [line for line in metrics.read_text().splitlines() if line.strip()]
        metrics.write_text("".join(r + "\n" for r in rows if json.loads(r)["step"] <= step))


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader sees the old checkpoint or the new one, never half of one


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(o) for o in obj)
    return obj


# The run


def evaluate(model, corpus: list[int], cfg: TrainConfig, device) -> float:
    """Perplexity on held-out tokens, sequential batches, state carried."""
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for X, Y in scratch.seq_data_iter_sequential(corpus, min(cfg.batch_size, 8), cfg.seq_len,
                                                     rng=random.Random(0)):
            if state is None:
                state = model.begin_state(X.shape[0], device)
            logits, state = model(X.to(device), state)
            y = Y.T.reshape(-1).to(device)
            total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            count += y.numel()
    model.train()
    return math.exp(total / count) if count else float("nan")


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0, 1, ...) as a fraction of --lr: 1 throughout, or half a
    cosine period, from 1 at the first step down towards 0 at the last of cfg.steps."""
    if cfg.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


def _load_data(cfg: TrainConfig, checkpoint: dict | None) -> tuple[Vocab, list[int], list[int]]:
    """The vocabulary and the token ids of the first 90 % of the text (training) and the rest."""
    text = load_corpus(cfg.text, cfg.max_chars)
    split = int(len(text) * 0.9)
    if split < cfg.seq_len * 2 + 2 or len(text) - split < cfg.seq_len + 2:
        raise UsageError(f"the text ({len(text)} characters) is too short for --seq-len {cfg.seq_len}")
    vocab = Vocab(text, min_freq=cfg.min_freq)
    if checkpoint is not None and checkpoint["vocab"]["idx_to_token"] != vocab.idx_to_token:
        raise UsageError(f"{Path(cfg.out) / 'checkpoint.pt'} was trained on a text with another vocabulary")
    return vocab, vocab[list(text[:split])], vocab[list(text[split:])]


class _Trainer:
    """One run's model, optimizer and data, and where it stands: step, epoch, batch, carried state."""

    def __init__(self, cfg: TrainConfig, checkpoint: dict | None, device, rank: int, world: int) -> None:
        self.cfg, self.device, self.rank, self.world, self.out = cfg, device, rank, world, Path(cfg.out)
        self.vocab, self.train_ids, self.heldout_ids = _load_data(cfg, checkpoint)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, len(self.vocab), cfg.hidden, cfg.layers, cfg.dropout,
                                 cfg.cell).to(device)
        lr = cfg.lr if cfg.lr is not None else (1.0 if cfg.optimizer == "sgd" else 2e-3)
        optimizer = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam
        self.optimizer, self.lr = optimizer(self.model.parameters(), lr=lr), lr
        self.step, self.epoch, self.batch_in_epoch, self.state = 0, 0, 0, None
        if checkpoint is not None:
            self._restore(checkpoint)
        self.ddp_model = self.model
        if world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        local_batch = cfg.batch_size // world
        self.rows = slice(rank * local_batch, (rank + 1) * local_batch)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16)
        self.epoch_batches = self._batches()
        if not self.epoch_batches:
            raise UsageError("the text is too short for one batch; lower --batch-size or --seq-len")

    def _batches(self):
        cfg = self.cfg
        return batches(self.train_ids, cfg.batch_size, cfg.seq_len, cfg.partition, self.epoch, cfg.seed)

    def _restore(self, checkpoint: dict) -> None:
        if len(checkpoint["state"]) != self.world:
            raise UsageError(f"{self.out} was trained by {len(checkpoint['state'])} processes; "
                             f"resume it with as many, not {self.world}")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step, self.epoch = checkpoint["step"], checkpoint["epoch"]
        self.batch_in_epoch = checkpoint["batch_in_epoch"]
        state = checkpoint["state"][self.rank]  # a tensor, a tuple of them (scratch) or None
        if isinstance(state, tuple):
            self.state = tuple(s.to(self.device) for s in state)
        else:
            self.state = state.to(self.device) if state is not None else None
        _set_rng_state(checkpoint["rng"])

    def save(self) -> None:
        states = [self.state]
        if self.world > 1:
            states = [None] * self.world
            torch.distributed.all_gather_object(states, self.state)
        if self.rank == 0:
            _atomic_save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                          "vocab": self.vocab.state_dict(), "step": self.step, "epoch": self.epoch,
                          "batch_in_epoch": self.batch_in_epoch, "state": _cpu(states),
                          "rng": _rng_state(), "config": asdict(self.cfg)}, self.out / "checkpoint.pt")

    def train_step(self) -> float:
        """One optimizer step on the next batch; returns its mean loss."""
        if self.batch_in_epoch >= len(self.epoch_batches):
            self.epoch, self.batch_in_epoch, self.state = self.epoch + 1, 0, None
            self.epoch_batches = self._batches()
        X, Y = self.epoch_batches[self.batch_in_epoch]
        X, Y = X[self.rows].to(self.device), Y[self.rows].to(self.device)
        if self.state is None or self.cfg.partition == "random":
            self.state = self.model.begin_state(X.shape[0], self.device)
        else:
            self.state = scratch.detach_state(self.state)  # truncated BPTT
        with self.autocast:
            logits, self.state = self.ddp_model(X, self.state)
            loss = F.cross_entropy(logits.float(), Y.T.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_clipping(self.model, self.cfg.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * _lr_factor(self.cfg, self.step)
        self.optimizer.step()
        self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
        return float(loss.detach())

    def run(self, stop: _StopOnCtrlC, progress) -> dict:
        """Train up to cfg.steps: the last metrics logged, and this call's steps, tokens and seconds."""
        cfg, tokens_per_step = self.cfg, self.cfg.batch_size * self.cfg.seq_len
        first_step, start = self.step, time.perf_counter()
        window_loss, window_steps, window_start, last = 0.0, 0, start, {}
        while self.step < cfg.steps:
            window_loss, window_steps = window_loss + self.train_step(), window_steps + 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                elapsed = time.perf_counter() - window_start
                last = {"step": self.step, "train_perplexity": math.exp(window_loss / window_steps),
                        "tokens_per_s": window_steps * tokens_per_step / max(elapsed, 1e-9)}
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    last["heldout_perplexity"] = evaluate(self.model, self.heldout_ids, cfg, self.device)
                self._log(last, progress)
                window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if progress is not None:
                progress.update(1)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps or stop.requested:
                self.save()
            if stop.requested:
                raise Interrupted(self.step, self.out)
        steps = self.step - first_step
        return {**last, "run_steps": steps, "run_tokens": steps * tokens_per_step,
                "run_seconds": time.perf_counter() - start}

    def _log(self, metrics: dict, progress) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if progress is not None:
            progress.set_postfix(ppl=f"{metrics['train_perplexity']:.2f}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}")


class _StopOnCtrlC:
    """Inside ``with``, a first Ctrl-C (SIGINT) sets ``requested``, for the loop to stop at the end of
    its step; a second one interrupts at once. Only where enabled, in the main thread, and where
    SIGINT has a Python handler (not where it is ignored, as in a background job)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = (enabled and threading.current_thread() is threading.main_thread()
                        and signal.getsignal(signal.SIGINT) not in (None, signal.SIG_IGN))
        self.requested, self.previous = False, None

    def __enter__(self) -> _StopOnCtrlC:
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


def train(cfg: TrainConfig, log=print) -> dict:
    """Train; returns the last metrics logged, with this call's ``run_steps``, ``run_tokens`` and
    ``run_seconds``. Writes checkpoint.pt, metrics.jsonl and curve.png in cfg.out. In one process,
    Ctrl-C stops at the end of the current step, writes a checkpoint there and raises Interrupted."""
    _check_config(cfg)
    device, rank, world = _setup_processes(cfg)
    out = Path(cfg.out)
    checkpoint = read_checkpoint(out) if cfg.resume else None
    if checkpoint is not None:
        _check_resumable(checkpoint["config"], asdict(cfg), out)
    elif not cfg.force:
        _refuse_existing_run(out)
    trainer = _Trainer(cfg, checkpoint, device, rank, world)
    if world > 1:
        torch.distributed.barrier()  # every process has looked at OUT before process 0 changes it
    if rank == 0:
        _prepare_out(out, cfg.resume, trainer.step)
    if trainer.step >= cfg.steps:
        log(f"{out} is at step {trainer.step} already: nothing to train (a larger --steps trains on)")
        return {"step": trainer.step, "run_steps": 0,
                "heldout_perplexity": evaluate(trainer.model, trainer.heldout_ids, cfg, device)}
    progress = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=trainer.step, desc=f"train {cfg.model}", unit="step",
                        dynamic_ncols=True, file=sys.stderr)
    try:
        with _StopOnCtrlC(enabled=world == 1) as stop:
            result = trainer.run(stop, progress)
    finally:
        if progress is not None:
            progress.close()
    if rank == 0:
        plot_curve(out / "metrics.jsonl", out / "curve.png", log)
    if world > 1:
        torch.distributed.barrier()
    return result


def plot_curve(metrics_file: Path, png: Path, log=print) -> bool:
    """Perplexity against step as a PNG; without matplotlib, a one-line notice."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("notice: matplotlib is not installed, so no curve.png (pip install matplotlib)")
        return False
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["train_perplexity"] for r in rows], label="train")
    held = [r for r in rows if "heldout_perplexity" in r]
    ax.plot([r["step"] for r in held], [r["heldout_perplexity"] for r in held], "o-", label="held-out")
    ax.set_xlabel("step"), ax.set_ylabel("perplexity"), ax.set_yscale("log"), ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def load_for_sampling(run_dir: str, device):
    ckpt = read_checkpoint(run_dir)
    cfg = ckpt["config"]
    vocab = Vocab.from_state_dict(ckpt["vocab"])
    model = build_model(cfg["model"], len(vocab), cfg["hidden"], cfg["layers"], cfg["dropout"],
                        cfg.get("cell", "rnn"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), vocab


def sample(model, vocab: Vocab, prefix: str, num_chars: int, temperature: float, device,
           seed: int | None = None) -> str:
    """Warm up over ``prefix``, then ``num_chars`` characters: greedy at temperature 0, else drawn
    from softmax(logits / temperature)."""
    if not prefix:
        raise UsageError("--prefix must not be empty: the model warms up on it")
    if num_chars < 0:
        raise UsageError("--num-chars must be >= 0")
    if temperature < 0:
        raise UsageError("--temperature must be >= 0")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    state = model.begin_state(1, device)
    out = []
    with torch.no_grad():
        logits, state = model(torch.tensor([vocab[list(prefix)]], device=device), state)
        for _ in range(num_chars):
            last = logits[-1].float().cpu()
            if temperature == 0:
                idx = int(last.argmax())
            else:
                idx = int(torch.multinomial(F.softmax(last / temperature, -1), 1, generator=gen))
            out.append(vocab.idx_to_token[idx] if idx != vocab.unk else "?")
            logits, state = model(torch.tensor([[idx]], device=device), state)
    return prefix + "".join(out)
