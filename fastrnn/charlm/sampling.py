"""Text from a trained run: warm the model up on a prefix, then draw one character at a time."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ..scratch import Vocab
from .config import SEED_RANGE, UsageError, check_float, check_int
from .model import build_model
from .run_folder import load_model_state, read_checkpoint


def load_for_sampling(run_dir: str, device):
    """The model of the run in ``run_dir`` (from its checkpoint), in eval mode on ``device``, and
    its vocabulary."""
    ckpt = read_checkpoint(run_dir, keys=("model", "vocab", "config"))
    cfg = ckpt["config"]
    vocab = Vocab.from_state_dict(ckpt["vocab"])
    model = build_model(cfg["model"], len(vocab), cfg["hidden"], cfg["layers"], cfg["dropout"],
                        cfg.get("cell", "rnn"))
    load_model_state(model, ckpt["model"], run_dir)
    return model.to(device).eval(), vocab


def check_sample_options(prefix: str, num_chars: int, temperature: float, seed: int | None) -> None:
    if not prefix:
        raise UsageError("--prefix must not be empty: the model warms up on it")
    check_int("--num-chars", num_chars, low=0)
    check_float("--temperature", temperature, low=0.0)
    if seed is not None:
        check_int("--seed", seed, *SEED_RANGE)


def sample(model, vocab: Vocab, prefix: str, num_chars: int, temperature: float, device,
           seed: int | None = None) -> str:
    """``prefix`` and ``num_chars`` characters after it: greedy at temperature 0 (or one so small that
    logits / temperature overflow), else each drawn from softmax(logits / temperature); ``seed``
    makes the draw repeatable."""
    check_sample_options(prefix, num_chars, temperature, seed)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    state = model.begin_state(1, device)
    out = []
    with torch.no_grad():
        logits, state = model(torch.tensor([vocab[list(prefix)]], device=device), state)  # (T, V)
        for _ in range(num_chars):
            last = logits[-1].float().cpu()
            scaled = last / temperature if temperature > 0 else None
            if scaled is None or not torch.isfinite(scaled).all():  # 0, or so small it overflows
                idx = int(last.argmax())
            else:
                idx = int(torch.multinomial(F.softmax(scaled, -1), 1, generator=gen))
            out.append(vocab.idx_to_token[idx] if idx != vocab.unk else "?")
            logits, state = model(torch.tensor([[idx]], device=device), state)
    return prefix + "".join(out)
