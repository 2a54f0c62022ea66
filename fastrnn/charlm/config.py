"""A training run's configuration and the checks of every value in it.

Every value the command takes is checked here, before anything runs, so that a bad one is reported
as one line (``UsageError``) rather than as a traceback from deep inside torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..cells import CELLS

MODELS = ("fastrnn", "torch", "scratch")
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")
PARTITIONS = ("sequential", "random")
SEED_RANGE = (0, 2**64 - 1)  # what torch.manual_seed takes


class UsageError(Exception):
    """A bad argument or input: reported as one line, no traceback."""


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
    threads: int = 1
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


RESUMABLE = {"steps", "device", "threads", "ckpt_every", "eval_every", "log_every", "progress", "out",
             "resume", "force"}
"""The options that may differ from the checkpoint's on --resume; every other one shapes the model,
the data or the optimisation, and must match. (``--text`` may name the run's text where it is now:
the text itself must be the same, which its fingerprint checks: ``run_folder.check_resumable``.)"""

RESUMABLE_FLAGS = ("--steps, --device, --threads, --ckpt-every, --eval-every, --log-every and --no-progress "
                   "(and --text, naming the same text where it is now)")

POSITIVE = ("steps", "hidden", "layers", "seq_len", "batch_size", "max_chars", "ckpt_every",
            "eval_every", "log_every")


def flag(name: str) -> str:
    """The command-line flag of a TrainConfig field: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


def default_lr(optimizer: str) -> float:
    return 1.0 if optimizer == "sgd" else 2e-3


def check_config(cfg: TrainConfig) -> None:
    """Every value of ``cfg`` in its range, or a UsageError naming the flag."""
    for name in POSITIVE:
        check_int(flag(name), getattr(cfg, name), low=1)
    check_int("--threads", cfg.threads, low=0)
    check_int("--seed", cfg.seed, *SEED_RANGE)
    if cfg.min_freq < 0:
        raise UsageError(f"--min-freq must be >= 0, got {cfg.min_freq}")
    for name, allowed in (("model", MODELS), ("cell", tuple(CELLS)), ("optimizer", OPTIMIZERS),
                          ("lr_schedule", LR_SCHEDULES), ("partition", PARTITIONS)):
        value = getattr(cfg, name)
        if value not in allowed:
            raise UsageError(f"unknown {flag(name)} {value!r} (choose from {', '.join(allowed)})")
    check_float("--dropout", cfg.dropout, low=0.0, high=1.0)
    if cfg.lr is not None:
        check_float("--lr", cfg.lr, low=0.0, low_open=True)
    check_float("--clip", cfg.clip, low=0.0, low_open=True)
    check_device_name(cfg.device)
    if cfg.model == "scratch" and cfg.layers != 1:
        raise UsageError("--model scratch has one layer; use --layers 1")
    if cfg.model == "scratch" and cfg.cell != "rnn":
        raise UsageError("--model scratch is the textbook Elman RNN; use --cell rnn")
    check_resume_or_force(cfg.resume, cfg.force)


def check_resume_or_force(resume: bool, force: bool) -> None:
    if resume and force:
        raise UsageError("--resume continues the run in --out and --force overwrites it: give one")


def check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    """``low <= value`` (and ``<= high`` where given)."""
    if value < low or (high is not None and value > high):
        if low == 1 and high is None:
            raise UsageError(f"{name} must be positive, got {value}")
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise UsageError(f"{name} must be an integer {bound}, got {value}")


def check_float(name: str, value: float, low: float, high: float | None = None,
                low_open: bool = False) -> None:
    """A finite ``value`` in ``[low, high)``, or above ``low`` where ``low_open``."""
    too_low = value <= low if low_open else value < low
    if not math.isfinite(value) or too_low or (high is not None and value >= high):
        if high is not None:
            bound = f"in {'(' if low_open else '['}{low:g}, {high:g})"
        else:
            bound = f"{'>' if low_open else '>='} {low:g}"
        raise UsageError(f"{name} must be a number {bound}, got {value}")


def check_device_name(name: str) -> None:
    """``auto``, ``cpu`` or ``cuda[:N]`` as a string; whether it is here is resolve_device's."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r} (try auto, cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"device {name!r}: the CPU is one device; use cpu")


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names, checked to be on this machine."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cpu") if device.type == "cpu" else device
