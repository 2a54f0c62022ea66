"""The character language model: corpus, model, training loop, checkpoints, sampling.

The same loop trains ``fastrnn.RNN``, ``torch.nn.RNN`` or the textbook scratch model, so the three
can be compared. Runs on a laptop CPU with no download (the default corpus is the Python standard
library's own source) and on several GPUs under ``torchrun`` (DistributedDataParallel).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import scratch
from .rnn import RNN
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


def build_model(kind: str, vocab_size: int, hidden: int, layers: int, dropout: float) -> nn.Module:
    if kind == "scratch":
        if layers != 1:
            raise UsageError("--model scratch has one layer; use --layers 1")
        return ScratchLM(vocab_size, hidden)
    layer_cls = {"fastrnn": RNN, "torch": nn.RNN}[kind]
    layer = layer_cls(vocab_size, hidden, layers, dropout=dropout if layers > 1 else 0.0)
    return scratch.RNNModel(layer, vocab_size)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    text: str | None = None
    out: str = "runs/charlm"
    model: str = "fastrnn"
    steps: int = 4000
    hidden: int = 256
    layers: int = 1
    dropout: float = 0.0
    seq_len: int = 32
    batch_size: int = 32
    lr: float | None = None
    optimizer: str = "sgd"
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
    progress: bool = True


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


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


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


def train(cfg: TrainConfig, log=print) -> dict:
    """Train; returns the final metrics. Writes checkpoints, metrics.jsonl and curve.png in cfg.out."""
    if cfg.steps <= 0:
        raise UsageError(f"--steps must be positive, got {cfg.steps}")
    if cfg.model not in ("fastrnn", "torch", "scratch"):
        raise UsageError(f"unknown --model {cfg.model!r}")
    device = resolve_device(cfg.device)
    rank, world = _distributed()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"

    text = load_corpus(cfg.text, cfg.max_chars)
    split = int(len(text) * 0.9)
    if split < cfg.seq_len * 2 + 2 or len(text) - split < cfg.seq_len + 2:
        raise UsageError(f"the text ({len(text)} characters) is too short for --seq-len {cfg.seq_len}")
    checkpoint = None
    if cfg.resume:
        if not ckpt_path.exists():
            raise UsageError(f"--resume: no checkpoint at {ckpt_path}")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        vocab = Vocab.from_state_dict(checkpoint["vocab"])
        if vocab.idx_to_token != Vocab(text, min_freq=cfg.min_freq).idx_to_token:
            raise UsageError(f"{ckpt_path} was trained on a text with another vocabulary")
    else:
        vocab = Vocab(text, min_freq=cfg.min_freq)
    train_ids, heldout_ids = vocab[list(text[:split])], vocab[list(text[split:])]

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(vocab), cfg.hidden, cfg.layers, cfg.dropout).to(device)
    lr = cfg.lr if cfg.lr is not None else (1.0 if cfg.optimizer == "sgd" else 2e-3)
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    elif cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise UsageError(f"unknown --optimizer {cfg.optimizer!r}")
    step, state, epoch, batch_in_epoch = 0, None, 0, 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, epoch, batch_in_epoch = checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"]
        state = checkpoint["state"][rank] if checkpoint["state"] is not None else None
        if state is not None:
            state = tuple(s.to(device) for s in state) if isinstance(state, tuple) else state.to(device)
        _set_rng_state(checkpoint["rng"])
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    local_batch = cfg.batch_size // world
    rows = slice(rank * local_batch, (rank + 1) * local_batch)
    metrics_file = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and metrics_file.exists():
            metrics_file.unlink()
    progress = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", unit="step",
                        dynamic_ncols=True, file=sys.stderr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")

    def save():
        states = [state]
        if world > 1:
            states = [None] * world
            torch.distributed.all_gather_object(states, state)
        if rank == 0:
            _atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "vocab": vocab.state_dict(), "step": step, "epoch": epoch,
                          "batch_in_epoch": batch_in_epoch, "state": _cpu(states), "rng": _rng_state(),
                          "config": asdict(cfg)}, ckpt_path)

    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    epoch_batches = batches(train_ids, cfg.batch_size, cfg.seq_len, cfg.partition, epoch, cfg.seed)
    if not epoch_batches:
        raise UsageError("the text is too short for one batch; lower --batch-size or --seq-len")
    last = {}
    while step < cfg.steps:
        if batch_in_epoch >= len(epoch_batches):
            epoch, batch_in_epoch, state = epoch + 1, 0, None
            epoch_batches = batches(train_ids, cfg.batch_size, cfg.seq_len, cfg.partition, epoch, cfg.seed)
        X, Y = epoch_batches[batch_in_epoch]
        X, Y = X[rows].to(device), Y[rows].to(device)
        if state is None or cfg.partition == "random":
            state = model.begin_state(X.shape[0], device)
        else:
            state = scratch.detach_state(state)  # truncated BPTT
        with autocast:
            logits, state = ddp_model(X, state)
            loss = F.cross_entropy(logits.float(), Y.T.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_clipping(model, cfg.clip)
        optimizer.step()
        step, batch_in_epoch = step + 1, batch_in_epoch + 1
        window_loss += float(loss.detach()) * Y.numel()
        window_tokens += Y.numel() * world

        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            ppl = math.exp(window_loss * world / max(window_tokens, 1))
            last = {"step": step, "train_perplexity": ppl, "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last["heldout_perplexity"] = evaluate(model, heldout_ids, cfg, device)
            if rank == 0:
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(last) + "\n")
                if progress is not None:
                    progress.set_postfix(ppl=f"{ppl:.2f}", tok_s=f"{last['tokens_per_s']:.0f}")
            window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
        if progress is not None:
            progress.update(1)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save()
    if progress is not None:
        progress.close()
    if rank == 0:
        plot_curve(metrics_file, out / "curve.png", log)
    if world > 1:
        torch.distributed.barrier()
    return last


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(o) for o in obj)
    return obj


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
    path = Path(run_dir) / "checkpoint.pt"
    if not path.exists():
        raise UsageError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = ckpt["config"]
    vocab = Vocab.from_state_dict(ckpt["vocab"])
    model = build_model(cfg["model"], len(vocab), cfg["hidden"], cfg["layers"], cfg["dropout"])
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
