"""The character language model: the application built on fastrnn, and the ``fastrnn`` command.

    config.py       a run's configuration and the checks of every value
    corpus.py       the text (by default the standard library's source), its split and batches
    model.py        the models one loop trains: fastrnn's cells, torch's twins, the scratch RNN
    training.py     the training loop, the held-out evaluation, Ctrl-C
    run_folder.py   checkpoint.pt, metrics.jsonl, curve.png and --resume
    sampling.py     text from a trained run
    cli.py          ``fastrnn train`` and ``fastrnn sample``

The library never imports this package: ``import fastrnn`` stays free of it.
"""

from .config import TrainConfig, UsageError
from .corpus import default_corpus
from .sampling import load_for_sampling, sample
from .training import Interrupted, train

__all__ = ["Interrupted", "TrainConfig", "UsageError", "default_corpus", "load_for_sampling", "sample",
           "train"]
