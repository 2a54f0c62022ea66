"""The text a model learns: the default corpus, the held-out split, the vocabulary and the batches."""

from __future__ import annotations

import hashlib
import random
import sysconfig
from pathlib import Path

from .. import scratch
from ..scratch import Vocab
from .config import TrainConfig, UsageError

HELDOUT_FRACTION = 0.1


def stdlib_sources() -> list[Path]:
    """The running interpreter's top-level standard library modules (``*.py``) in name order, less
    the build's generated ``_sysconfigdata*`` (its paths, flags and date differ from one build of the
    same Python to the next)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [path for path in sorted(stdlib.glob("*.py")) if not path.name.startswith("_sysconfigdata")]


def default_corpus(max_chars: int = 2_000_000) -> str:
    """The standard library's source (``stdlib_sources``) joined, up to ``max_chars`` characters.
    Exists wherever Python does, so no download."""
    parts, total = [], 0
    for path in stdlib_sources():
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
        stdlib = sysconfig.get_paths()["stdlib"]
        raise UsageError(f"no Python source found under {stdlib} for the default corpus; use --text FILE")
    return corpus


def load_corpus(path: str | None, max_chars: int) -> str:
    """The first ``max_chars`` characters of the UTF-8 file ``path``, or of the default corpus."""
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


def fingerprint(text: str) -> str:
    """The text's sha256: a resumed run checks that it reads the text it was trained on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe(text: str, path: str | None, digest: str) -> str:
    """One line naming the text, its length and its fingerprint ``digest``, to tell whether two runs
    read the same."""
    source = path if path is not None else str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")
    return f"{len(text)} characters of {source} (sha256 {digest[:12]})"


def text_record(text: str, path: str | None) -> dict:
    """What a checkpoint keeps of its text: where it was (absolute) and its fingerprint."""
    return {"path": str(Path(path).resolve()) if path is not None else None, "sha256": fingerprint(text)}


def check_same_text(checkpoint: dict, text: str, path: str | None, out: Path) -> None:
    """A resumed run reads the text it was trained on, wherever it is now. (A checkpoint written
    before fastrnn kept the fingerprint resumes on the same --text only: ``check_resumable``.)"""
    saved = checkpoint.get("text")
    if saved is None:
        return
    digest = fingerprint(text)
    if saved["sha256"] != digest:
        source = path if path is not None else "the default corpus"
        raise UsageError(f"--resume: {source} is not the text the run in {out} was trained on (sha256 "
                         f"{digest[:12]}, the run's {saved['sha256'][:12]})")


def load_data(cfg: TrainConfig, checkpoint: dict | None = None) -> tuple[str, Vocab, list[int], list[int]]:
    """The text, its vocabulary, and the token ids of its first 90 % (training) and of the rest
    (held out). A resumed run's (``checkpoint``) must be the text it was trained on, and so its
    vocabulary the checkpoint's."""
    text = load_corpus(cfg.text, cfg.max_chars)
    if checkpoint is not None:
        check_same_text(checkpoint, text, cfg.text, Path(cfg.out))
    split = int(len(text) * (1 - HELDOUT_FRACTION))
    if split < cfg.seq_len * 2 + 2 or len(text) - split < cfg.seq_len * 2 + 1:  # (the held-out: one row)
        raise UsageError(f"the text ({len(text)} characters) is too short for --seq-len {cfg.seq_len}")
    vocab = Vocab(text, min_freq=cfg.min_freq)
    if checkpoint is not None and checkpoint["vocab"]["idx_to_token"] != vocab.idx_to_token:
        raise UsageError(f"{Path(cfg.out) / 'checkpoint.pt'} was trained on a text with another vocabulary")
    return text, vocab, vocab[list(text[:split])], vocab[list(text[split:])]


def batches(corpus: list[int], batch_size: int, seq_len: int, partition: str, epoch: int, seed: int):
    """The (X, Y) batches of one epoch, each (batch_size, seq_len) token ids, Y one step ahead of X;
    the same for the same (seed, epoch) on every run and rank."""
    rng = random.Random(seed * 1_000_003 + epoch)
    fn = scratch.seq_data_iter_random if partition == "random" else scratch.seq_data_iter_sequential
    return list(fn(corpus, batch_size, seq_len, rng=rng))
