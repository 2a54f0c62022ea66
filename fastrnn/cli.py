"""The ``fastrnn`` command: ``fastrnn train`` and ``fastrnn sample``.

    fastrnn train                       # a small char-LM on the stdlib source, on CPU in minutes
    fastrnn sample runs/charlm --prefix "def " --num-chars 200
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .charlm import TrainConfig, UsageError, load_for_sampling, resolve_device, sample, train


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastrnn", description="Character-level RNN language model.")
    sub = p.add_subparsers(dest="command", required=True)
    d = TrainConfig()
    t = sub.add_parser("train", help="train a character language model")
    t.add_argument("--text", default=None, help="UTF-8 text file (default: the Python stdlib source)")
    t.add_argument("--out", default=d.out, help="run directory (checkpoint, metrics, curve)")
    t.add_argument("--model", choices=["fastrnn", "torch", "scratch"], default=d.model)
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--hidden", type=int, default=d.hidden)
    t.add_argument("--layers", type=int, default=d.layers)
    t.add_argument("--dropout", type=float, default=d.dropout)
    t.add_argument("--seq-len", type=int, default=d.seq_len)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=None, help="default: 1.0 for sgd, 2e-3 for adam")
    t.add_argument("--optimizer", choices=["sgd", "adam"], default=d.optimizer)
    t.add_argument("--clip", type=float, default=d.clip, help="gradient clipping by global norm")
    t.add_argument("--partition", choices=["sequential", "random"], default=d.partition)
    t.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--max-chars", type=int, default=d.max_chars)
    t.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    t.add_argument("--eval-every", type=int, default=d.eval_every)
    t.add_argument("--log-every", type=int, default=d.log_every)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    s = sub.add_parser("sample", help="generate text from a trained run")
    s.add_argument("run_dir")
    s.add_argument("--prefix", required=True)
    s.add_argument("--num-chars", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            for name in ("steps", "hidden", "layers", "seq_len", "batch_size", "ckpt_every",
                         "eval_every", "log_every"):
                if getattr(args, name) <= 0:
                    raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
            names = {f.name for f in fields(TrainConfig)}
            cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names},
                              progress=not args.no_progress)
            last = train(cfg)
            import torch.distributed as dist

            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"tokens/s {last['tokens_per_s']:.0f}")
                print(f"perplexity {last['heldout_perplexity']:.4f}")
        else:
            device = resolve_device(args.device)
            model, vocab = load_for_sampling(args.run_dir, device)
            print(sample(model, vocab, args.prefix, args.num_chars, args.temperature, device, args.seed))
    except UsageError as e:
        print(f"fastrnn: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
