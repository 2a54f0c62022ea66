"""The training loop: a Trainer steps through the batches, logs, evaluates on the held-out text and
writes checkpoints; ``train`` sets a run up (processes, threads, run folder, Ctrl-C) and runs it."""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .. import scratch
from ..scratch import grad_clipping
from .config import TrainConfig, UsageError, check_config, default_lr, resolve_device
from .corpus import batches, describe, load_data, text_record
from .model import build_model
from .run_folder import (append_metrics, check_resumable, load_model_state, plot_curve, prepare_out,
                         read_checkpoint, refuse_existing_run, rng_state, save_checkpoint, set_rng_state, to_cpu)


class Interrupted(Exception):
    """Ctrl-C stopped training at the end of a step, and a checkpoint was written there."""

    def __init__(self, step: int, out: Path) -> None:
        super().__init__(f"interrupted at step {step}, checkpoint written to {out / 'checkpoint.pt'}")
        self.step, self.out = step, out


class StopOnCtrlC:
    """Inside ``with``, a first Ctrl-C (SIGINT) sets ``requested``, for the loop to stop at the end of
    its step (or of the current batch of an evaluation); a second one interrupts at once. Only where
    enabled, in the main thread, and where SIGINT has a Python handler (not where it is ignored, as
    in a background job)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = (enabled and threading.current_thread() is threading.main_thread()
                        and signal.getsignal(signal.SIGINT) not in (None, signal.SIG_IGN))
        self.requested, self.previous = False, None

    def __enter__(self) -> StopOnCtrlC:
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)


@contextlib.contextmanager
def cpu_threads(threads: int):
    """torch's intra-op CPU threads set to ``threads`` inside (0: left as torch set them), restored
    after. The thread count decides how the CPU's sums are split, so the figures depend on it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def heldout_rows(num_tokens: int, cfg: TrainConfig) -> int:
    """Sequences per held-out batch: up to 8 (and --batch-size), fewer where the held-out text is too
    short for that many rows of --seq-len (after an offset of up to --seq-len tokens, and the one
    token the targets run ahead)."""
    return min(cfg.batch_size, 8, (num_tokens - cfg.seq_len - 1) // cfg.seq_len)


def evaluate(model, corpus: list[int], cfg: TrainConfig, device, stop: StopOnCtrlC | None = None):
    """Perplexity on the held-out token ids ``corpus``: sequential batches of ``heldout_rows``
    sequences, the state carried from batch to batch. None if ``stop`` was requested before the end."""
    model.eval()
    total, count, state = 0.0, 0, None
    with torch.no_grad():
        for X, Y in scratch.seq_data_iter_sequential(corpus, heldout_rows(len(corpus), cfg), cfg.seq_len,
                                                     rng=random.Random(0)):
            if stop is not None and stop.requested:
                break
            if state is None:
                state = model.begin_state(X.shape[0], device)
            logits, state = model(X.to(device), state)  # (T * B, V)
            y = Y.T.reshape(-1).to(device)  # (T * B,), time-major as the logits
            total += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            count += y.numel()
    model.train()
    if stop is not None and stop.requested:
        return None
    return math.exp(total / count) if count else float("nan")


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The learning rate of step ``step`` (0, 1, ...) as a fraction of --lr: 1 throughout, or half a
    cosine period, from 1 at the first step down towards 0 at the last of cfg.steps."""
    if cfg.lr_schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * step / cfg.steps))


class Trainer:
    """One run's model, optimizer and data, and where it stands: step, epoch, batch, the state carried
    from batch to batch, the last held-out figure, and a metrics row whose held-out evaluation a
    Ctrl-C cut short (``unlogged``: the next call of ``run`` evaluates and logs it first)."""

    def __init__(self, cfg: TrainConfig, checkpoint: dict | None, device, rank: int, world: int) -> None:
        self.cfg, self.device, self.rank, self.world, self.out = cfg, device, rank, world, Path(cfg.out)
        text, self.vocab, self.train_ids, self.heldout_ids = load_data(cfg, checkpoint)
        self.text_saved = text_record(text, cfg.text)
        self.text_line = describe(text, cfg.text, self.text_saved["sha256"])
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, len(self.vocab), cfg.hidden, cfg.layers, cfg.dropout,
                                 cfg.cell).to(device)
        self.lr = cfg.lr if cfg.lr is not None else default_lr(cfg.optimizer)
        optimizer = torch.optim.SGD if cfg.optimizer == "sgd" else torch.optim.Adam
        self.optimizer = optimizer(self.model.parameters(), lr=self.lr)
        self.step, self.epoch, self.batch_in_epoch, self.state = 0, 0, 0, None
        self.heldout, self.unlogged = None, None
        self.window = [0.0, 0]  # the loss summed over the steps since the last metrics row, and their count
        if checkpoint is not None:
            self.restore(checkpoint)
        self.ddp_model = self.model
        if world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        local_batch = cfg.batch_size // world
        self.rows = slice(rank * local_batch, (rank + 1) * local_batch)  # this process's sequences
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.bf16)
        self.epoch_batches = self.batches()
        if not self.epoch_batches:
            raise UsageError("the text is too short for one batch; lower --batch-size or --seq-len")

    def batches(self):
        cfg = self.cfg
        return batches(self.train_ids, cfg.batch_size, cfg.seq_len, cfg.partition, self.epoch, cfg.seed)

    def restore(self, checkpoint: dict) -> None:
        if len(checkpoint["state"]) != self.world:
            raise UsageError(f"{self.out} was trained by {len(checkpoint['state'])} processes; "
                             f"resume it with as many, not {self.world}")
        load_model_state(self.model, checkpoint["model"], self.out)
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.step, self.epoch = checkpoint["step"], checkpoint["epoch"]
        self.batch_in_epoch = checkpoint["batch_in_epoch"]
        self.heldout, self.unlogged = checkpoint.get("heldout"), checkpoint.get("unlogged")
        self.window = list(checkpoint.get("window", self.window))
        state = checkpoint["state"][self.rank]  # a tensor, a tuple of them (LSTM, scratch) or None
        if isinstance(state, tuple):
            self.state = tuple(s.to(self.device) for s in state)
        else:
            self.state = state.to(self.device) if state is not None else None
        set_rng_state(checkpoint["rng"])

    def save(self) -> None:
        """Write the checkpoint (process 0), with every process's carried state."""
        states = [self.state]
        if self.world > 1:
            states = [None] * self.world
            torch.distributed.all_gather_object(states, self.state)
        if self.rank == 0:
            save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                             "vocab": self.vocab.state_dict(), "step": self.step, "epoch": self.epoch,
                             "batch_in_epoch": self.batch_in_epoch, "state": to_cpu(states),
                             "rng": rng_state(), "config": asdict(self.cfg), "heldout": self.heldout,
                             "unlogged": self.unlogged, "text": self.text_saved, "window": self.window},
                            self.out)

    def stop(self) -> None:
        """Ctrl-C: write a checkpoint at this step and raise Interrupted."""
        self.save()
        raise Interrupted(self.step, self.out)

    def train_step(self) -> float:
        """One optimizer step on the next batch; returns its mean loss."""
        if self.batch_in_epoch >= len(self.epoch_batches):
            self.epoch, self.batch_in_epoch, self.state = self.epoch + 1, 0, None
            self.epoch_batches = self.batches()
        X, Y = self.epoch_batches[self.batch_in_epoch]  # (B, T) each
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
            group["lr"] = self.lr * lr_factor(self.cfg, self.step)
        self.optimizer.step()
        self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
        return float(loss.detach())

    def run(self, stop: StopOnCtrlC, progress) -> dict:
        """Train up to cfg.steps: the last metrics row logged, and this call's steps, tokens and seconds."""
        cfg, tokens_per_step = self.cfg, self.cfg.batch_size * self.cfg.seq_len
        first_step, start = self.step, time.perf_counter()
        last = self.log_row(self.unlogged, True, stop, progress) if self.unlogged is not None else {}
        window_start, timed_steps = time.perf_counter(), 0  # (a resumed window's earlier steps: not timed here)
        while self.step < cfg.steps:
            loss = self.train_step()
            self.window, timed_steps = [self.window[0] + loss, self.window[1] + 1], timed_steps + 1
            due = self.step % cfg.eval_every == 0 or self.step == cfg.steps  # a held-out evaluation
            if due or self.step % cfg.log_every == 0:
                elapsed = time.perf_counter() - window_start
                row = {"step": self.step, "train_perplexity": math.exp(self.window[0] / self.window[1]),
                       "tokens_per_s": timed_steps * tokens_per_step / max(elapsed, 1e-9)}
                self.window = [0.0, 0]
                last = self.log_row(row, due, stop, progress)
                window_start, timed_steps = time.perf_counter(), 0
            if progress is not None:
                progress.update(1)
            if stop.requested:
                self.stop()
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
        steps = self.step - first_step
        return {**last, "run_steps": steps, "run_tokens": steps * tokens_per_step,
                "run_seconds": time.perf_counter() - start}

    def log_row(self, row: dict, evaluate_now: bool, stop: StopOnCtrlC, progress) -> dict:
        """Append ``row`` to metrics.jsonl (process 0), with the held-out perplexity where
        ``evaluate_now``. A Ctrl-C during that evaluation leaves the row ``unlogged`` and stops."""
        if evaluate_now:
            perplexity = evaluate(self.model, self.heldout_ids, self.cfg, self.device, stop)
            if perplexity is None:
                self.unlogged = row
                self.stop()
            row = {**row, "heldout_perplexity": perplexity}
            self.heldout = {"step": row["step"], "perplexity": perplexity}
        self.unlogged = None
        if self.rank == 0:
            append_metrics(self.out, row)
        if progress is not None:
            progress.set_postfix(ppl=f"{row['train_perplexity']:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
        return row

    def heldout_perplexity(self, stop: StopOnCtrlC) -> float:
        """The held-out perplexity at this step: the saved figure where the checkpoint has it."""
        if self.heldout is not None and self.heldout["step"] == self.step:
            return self.heldout["perplexity"]
        perplexity = evaluate(self.model, self.heldout_ids, self.cfg, self.device, stop)
        if perplexity is None:
            self.stop()
        return perplexity


def distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def setup_processes(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    """(device, rank, world size): this process's device, one GPU per process under torchrun."""
    device = resolve_device(cfg.device)
    if cfg.bf16 and device.type != "cuda":
        raise UsageError(f"--bf16 is CUDA autocast; this run is on {device.type}")
    rank, world = distributed()
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    return device, rank, world


def start(cfg: TrainConfig, log) -> Trainer:
    """Check the run folder, then build the run: new, or from its checkpoint."""
    device, rank, world = setup_processes(cfg)
    out = Path(cfg.out)
    checkpoint = read_checkpoint(out) if cfg.resume else None
    if checkpoint is not None:
        check_resumable(checkpoint["config"], asdict(cfg), out, checkpoint.get("text") is not None)
    elif not cfg.force:
        refuse_existing_run(out)
    trainer = Trainer(cfg, checkpoint, device, rank, world)
    if world > 1:
        torch.distributed.barrier()  # every process has looked at OUT before process 0 changes it
    if rank == 0:
        prepare_out(out, cfg.resume, trainer.step)
        threads = f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}"
        log(f"text: {trainer.text_line}, vocabulary {len(trainer.vocab)}; {threads}")
    return trainer


def train(cfg: TrainConfig, log=print) -> dict:
    """Train; returns the last metrics logged, with this call's ``run_steps``, ``run_tokens`` and
    ``run_seconds``. Writes checkpoint.pt, metrics.jsonl and curve.png in cfg.out. In one process,
    Ctrl-C stops at the end of the current step (or evaluation batch), writes a checkpoint there and
    raises Interrupted. Runs on ``cfg.threads`` CPU threads (torch's setting is restored after)."""
    check_config(cfg)
    with cpu_threads(cfg.threads):
        trainer = start(cfg, log)
        with StopOnCtrlC(enabled=trainer.world == 1) as stop:
            if trainer.step >= cfg.steps and trainer.unlogged is None:
                log(f"{cfg.out} is at step {trainer.step} already: nothing to train (a larger --steps "
                    "trains on)")
                return {"step": trainer.step, "run_steps": 0,
                        "heldout_perplexity": trainer.heldout_perplexity(stop)}
            progress = progress_bar(cfg, trainer.step) if trainer.rank == 0 and cfg.progress else None
            try:
                result = trainer.run(stop, progress)
            finally:
                if progress is not None:
                    progress.close()
    if trainer.rank == 0:
        plot_curve(trainer.out / "metrics.jsonl", trainer.out / "curve.png", log)
    if trainer.world > 1:
        torch.distributed.barrier()
    return result


def progress_bar(cfg: TrainConfig, step: int):
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model}", unit="step",
                dynamic_ncols=True, file=sys.stderr)
