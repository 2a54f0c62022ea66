"""The ``fastrnn`` command: ``fastrnn train`` and ``fastrnn sample``.

    fastrnn train                       # a small char-LM on the stdlib source, on CPU in minutes
    fastrnn sample runs/charlm --prefix "def " --num-chars 200

Exit codes: 0 done, 2 a usage error (one line on stderr), 130 interrupted by Ctrl-C, 141 stdout closed
(a pipe's reader gone).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import fields

from .. import __version__
from ..cells import CELLS
from .config import (LR_SCHEDULES, MODELS, OPTIMIZERS, PARTITIONS, RESUMABLE_FLAGS, TrainConfig,
                     UsageError, check_int, resolve_device)
from .run_folder import resume_config
from .sampling import check_sample_options, load_for_sampling, sample
from .training import Interrupted, cpu_threads, train

CONFIG_FIELDS = {f.name for f in fields(TrainConfig)}


class Parser(argparse.ArgumentParser):
    """argparse, with a bad value (``--lr abc``, ``--model foo``) reported as one line; a misspelt
    flag or command, or a missing argument, still gets the command's usage."""

    def error(self, message: str):
        if message.startswith("argument ") and not message.startswith("argument command"):
            self.exit(2, f"fastrnn: error: {message}\n")
        super().error(message)


def train_parser(sub) -> argparse.ArgumentParser:
    """``fastrnn train``. Every option defaults to None, "not given", so that ``--resume`` can tell
    the options set on the command line from the run's saved ones; help shows the real defaults."""
    d = TrainConfig()
    t = sub.add_parser("train", help="train a character language model",
                       description="Train a character language model. Exit codes: 0 done, 2 a usage "
                       "error, 130 interrupted (Ctrl-C writes a checkpoint that --resume continues).")

    def opt(flag: str, help: str, default=None, **kw) -> None:
        default = getattr(d, flag[2:].replace("-", "_")) if default is None else default
        t.add_argument(flag, default=None, help=f"{help} (default: {default})", **kw)

    opt("--text", "UTF-8 text file", "the Python standard library's source", metavar="FILE")
    opt("--out", "run folder: checkpoint.pt, metrics.jsonl, curve.png", metavar="DIR")
    opt("--model", "which implementation the same loop trains", choices=MODELS)
    opt("--cell", "the recurrent cell: Elman RNN, LSTM or GRU", choices=list(CELLS))
    opt("--steps", "optimizer steps in all (may change on --resume)", type=int)
    opt("--hidden", "hidden units", type=int)
    opt("--layers", "recurrent layers", type=int)
    opt("--dropout", "dropout between layers, in [0, 1)", type=float)
    opt("--seq-len", "time steps per sequence (truncated BPTT)", type=int)
    opt("--batch-size", "sequences per batch, over all processes", type=int)
    opt("--lr", "learning rate, > 0", "1.0 for sgd, 2e-3 for adam", type=float)
    opt("--optimizer", "optimizer", choices=OPTIMIZERS)
    opt("--lr-schedule", "learning rate: constant, or a cosine from --lr to 0 over --steps",
        choices=LR_SCHEDULES)
    opt("--clip", "gradient clipping by global norm, > 0", type=float)
    opt("--partition", "batches of adjacent (state carried) or random sequences", choices=PARTITIONS)
    opt("--device", "auto, cpu, cuda or cuda:N")
    opt("--threads", "torch's CPU threads; 0 leaves torch's own choice (one per core)", type=int)
    opt("--seed", "seed of the initialisation and the batches", type=int)
    opt("--max-chars", "characters of the text used", type=int)
    opt("--min-freq", "characters seen fewer times in the text share one token, <unk>, which samples "
        "show as ?; 0 keeps every character", type=int)
    opt("--ckpt-every", "steps between checkpoints", type=int)
    opt("--eval-every", "steps between held-out evaluations", type=int)
    opt("--log-every", "steps between rows of metrics.jsonl", type=int)
    t.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (CUDA only)")
    t.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --out with its saved configuration; only "
                        f"{RESUMABLE_FLAGS} may change")
    t.add_argument("--force", action="store_true", default=None,
                   help="overwrite the run already in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    return t


def sample_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("sample", help="generate text from a trained run",
                       description="Generate text from the checkpoint of a trained run.")
    s.add_argument("run_dir", help="the --out folder of a `fastrnn train` run")
    s.add_argument("--prefix", required=True, help="text the model warms up on; the sample continues it")
    s.add_argument("--num-chars", type=int, default=200, help="characters to generate (default: 200)")
    s.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature, >= 0: 1 draws from the model's own distribution, 0 is "
                        "greedy (default: %(default)s)")
    s.add_argument("--seed", type=int, default=None, help="seed of the sampling (default: none)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    s.add_argument("--threads", type=int, default=1,
                   help="torch's CPU threads; 0 leaves torch's own choice (default: %(default)s)")
    return s


def parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = Parser(prog="fastrnn", description="Character-level RNN language model.")
    p.add_argument("--version", action="version", version=f"fastrnn {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    return p, {"train": train_parser(sub), "sample": sample_parser(sub)}


def resume_command(out) -> str:
    return f"`fastrnn train --out {shlex.quote(str(out))} --resume`"


def run_train(args: argparse.Namespace) -> None:
    given = {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS and v is not None}
    if args.no_progress:
        given["progress"] = False
    cfg = resume_config(given.get("out", TrainConfig.out), given) if args.resume else TrainConfig(**given)
    result = train(cfg)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    if result["run_steps"]:
        tokens, seconds = result["run_tokens"], result["run_seconds"]
        print(f"tokens/s {tokens / seconds:.0f} (whole run: {result['run_steps']} steps, {tokens} tokens "
              f"in {seconds:.1f} s)")
    print(f"perplexity {result['heldout_perplexity']:.4f} (held-out, step {result['step']})")


def run_sample(args: argparse.Namespace) -> None:
    check_sample_options(args.prefix, args.num_chars, args.temperature, args.seed)
    check_int("--threads", args.threads, low=0)
    device = resolve_device(args.device)
    with cpu_threads(args.threads):
        model, vocab = load_for_sampling(args.run_dir, device)
        print(sample(model, vocab, args.prefix, args.num_chars, args.temperature, device, args.seed))


def main(argv: list[str] | None = None) -> int:
    parser, commands = parsers()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the command's own usage, not the top-level one
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        run_train(args) if args.command == "train" else run_sample(args)
        sys.stdout.flush()  # (here, so that a reader gone is this command's BrokenPipeError, not Python's at exit)
    except UsageError as e:
        print(f"fastrnn: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"fastrnn: {e}; {resume_command(e.out)} continues it", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print(f"fastrnn: interrupted{resume_hint(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`fastrnn sample ... | head -c 100`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes it at exit)
        print(f"fastrnn: stopped: nothing reads the output any more{resume_hint(args)}", file=sys.stderr)
        return 141  # as a shell reports a process that SIGPIPE ended
    return 0


def resume_hint(args: argparse.Namespace) -> str:
    """For ``train`` stopped outside the training loop's own Ctrl-C: how to go on."""
    if args.command != "train":
        return ""
    out = args.out if args.out is not None else TrainConfig.out
    return f"; {resume_command(out)} continues from the last checkpoint, if any"


if __name__ == "__main__":
    sys.exit(main())
