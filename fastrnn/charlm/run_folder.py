"""The run folder (``--out``): ``checkpoint.pt``, ``metrics.jsonl``, ``curve.png``; and ``--resume``.

A checkpoint holds everything a run needs to go on as if never stopped: the model and optimizer,
the vocabulary, where the data stands (step, epoch, batch) and the state carried between batches
(one per process), the random generators, the configuration, and the last held-out figure.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import fields
from pathlib import Path

import torch

from .config import (RESUMABLE, RESUMABLE_FLAGS, TrainConfig, UsageError, check_resume_or_force, default_lr,
                     flag)

RUN_FILES = ("checkpoint.pt", "metrics.jsonl", "curve.png")


CHECKPOINT_KEYS = ("model", "optimizer", "vocab", "step", "epoch", "batch_in_epoch", "state", "rng", "config")
MODEL_KEYS = ("model", "hidden", "layers", "dropout")  # what the configuration must say to build the model


def read_checkpoint(out: str | Path, keys: tuple = CHECKPOINT_KEYS) -> dict:
    """OUT/checkpoint.pt, loaded on the CPU with torch.load's weights_only=True; it must hold ``keys``
    (sampling needs only the model, the vocabulary and the configuration)."""
    path = Path(out) / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        raise UsageError(f"cannot read {path} as a checkpoint: {type(e).__name__}") from None
    if not isinstance(checkpoint, dict):
        raise UsageError(f"{path} is not a fastrnn checkpoint (it holds a {type(checkpoint).__name__}, "
                         "not a dictionary)")
    missing = [k for k in keys if k not in checkpoint]
    if not missing:
        config = checkpoint["config"]
        missing = [f"config {k}" for k in MODEL_KEYS if k not in config] if isinstance(config, dict) else ["config"]
    if missing:
        raise UsageError(f"{path} is not a fastrnn checkpoint (it lacks {', '.join(missing)})")
    return checkpoint


def load_model_state(model: torch.nn.Module, state: dict, out: str | Path) -> None:
    """The checkpoint's parameters into ``model``, built from its configuration."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if lines and lines[0].startswith("Error(s) in loading state_dict"):
            lines = lines[1:]  # (the first of the reasons that follow)
        reason = lines[0] if lines else type(e).__name__
        raise UsageError(f"{Path(out) / 'checkpoint.pt'}: its model does not fit its configuration "
                         f"({reason})") from None


def save_checkpoint(checkpoint: dict, out: Path) -> None:
    """Write OUT/checkpoint.pt atomically: a reader sees the old checkpoint or the new one, never
    half of one."""
    path = out / "checkpoint.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def resume_config(out: str, given: dict) -> TrainConfig:
    """The configuration saved in OUT/checkpoint.pt with ``given`` (the options set on the command
    line) applied; an option outside RESUMABLE that differs from the saved one is a UsageError."""
    check_resume_or_force(True, given.get("force", False))
    checkpoint = read_checkpoint(out)
    saved = checkpoint["config"]
    check_resumable(saved, given, Path(out), checkpoint.get("text") is not None)
    text = (checkpoint.get("text") or {}).get("path")  # absolute: the run resumes from anywhere
    if "text" not in given and text is not None:
        if not Path(text).is_file():
            raise UsageError(f"--resume: the run's text {text} is not there any more; --text FILE names "
                             "where it is now")
        given = {**given, "text": text}
    known = {f.name for f in fields(TrainConfig)}
    this_call = {"resume": True, "force": False, "progress": True}  # never taken from the checkpoint
    return TrainConfig(**{k: v for k, v in {**saved, **this_call, **given}.items() if k in known})


def check_resumable(saved: dict, given: dict, out: Path, text_kept: bool = False) -> None:
    """Refuse any option outside RESUMABLE whose value differs from the saved run's (``--lr`` as the
    rate it stands for: unset is the optimizer's default). Where the checkpoint keeps its text's
    fingerprint (``text_kept``), ``--text`` may name another path: the text's sha256 decides
    (``corpus.check_same_text``); not the default corpus for a file, nor a file for it."""
    def value(config, k):
        if k == "lr" and config[k] is None:
            return default_lr(config.get("optimizer", saved["optimizer"]))
        if k == "text" and text_kept:
            return config[k] is None  # (a path: which one, the fingerprint checks)
        return config[k]

    differ = [k for k in given if k not in RESUMABLE and k in saved and value(given, k) != value(saved, k)]
    if differ:
        def flags(config):
            return ", ".join(f"{flag(k)} {config[k] if k != 'lr' else value(config, k)}" for k in differ)

        raise UsageError(f"--resume: the run in {out} has {flags(saved)}, not {flags(given)}; "
                         f"only {RESUMABLE_FLAGS} may change on resume")


def refuse_existing_run(out: Path) -> None:
    """A new run does not overwrite another one unless told to (--force)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    for name in RUN_FILES[:2]:
        if (out / name).exists():
            raise UsageError(f"{out} already holds a run ({name}): --resume continues it, --force "
                             "overwrites it, --out DIR trains elsewhere")


def prepare_out(out: Path, resume: bool, step: int) -> None:
    """A new run starts from an empty run folder; a resumed one keeps the metrics rows up to its
    checkpoint's step, so that the steps it trains again are not logged twice."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot make the run folder {out}: {e.strerror}") from None
    metrics = out / "metrics.jsonl"
    if not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    elif metrics.exists():
        rows = [row for row in map(metrics_row, metrics.read_text().splitlines()) if row is not None]
        metrics.write_text("".join(json.dumps(row) + "\n" for row in rows if row["step"] <= step))


def metrics_row(line: str) -> dict | None:
    """A line of metrics.jsonl as its row; None for a blank one, or one a killed run left half
    written."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def append_metrics(out: Path, row: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def rng_state() -> dict:
    """The state of every random generator a run draws from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(obj):
    """A tensor, or a list or tuple of them (nested), detached and on the CPU; anything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(o) for o in obj)
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
    rows = [row for row in map(metrics_row, metrics_file.read_text().splitlines()) if row is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["train_perplexity"] for r in rows], label="train")
    held = [r for r in rows if "heldout_perplexity" in r]
    ax.plot([r["step"] for r in held], [r["heldout_perplexity"] for r in held], "o-", label="held-out")
    ax.set_xlabel("step"), ax.set_ylabel("perplexity"), ax.set_yscale("log"), ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True
