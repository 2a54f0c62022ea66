"""The character RNN from scratch, as the textbook teaches it: the same function as ``fastrnn.RNN``
and ``torch.nn.RNN`` given the same weights (``tests/test_scratch.py`` holds them equal).

Everything is explicit: one-hot inputs, the five parameters ``W_xh, W_hh, b_h, W_hq, b_q``, the hidden
state as a tuple, a Python loop over time steps, greedy prediction after a warm-up over a prefix,
gradient clipping by global norm, and training with sequential partitioning (the state carried from
batch to batch, detached from the graph at each: truncated BPTT) or random partitioning (every batch
starts from a fresh state), reported as perplexity.

Shapes: ``X`` is ``(batch, time)`` token indices; ``inputs`` after one-hot is ``(time, batch, vocab)``;
the hidden state ``H`` is ``(batch, hidden)``; ``rnn`` returns outputs ``(time * batch, vocab)``.
"""

from __future__ import annotations

import collections
import math
import random
import time
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

# --------------------------------------------------------------------------------------------------
# Vocabulary and one-hot encoding
# --------------------------------------------------------------------------------------------------


class Vocab:
    """Character (or word) vocabulary: ``idx_to_token`` and ``token_to_idx``; index 0 is ``<unk>``.

    Tokens are ordered by descending frequency, ties broken by the token itself, so that the same text
    always gives the same vocabulary.
    """

    unk_token = "<unk>"

    def __init__(self, tokens: Iterable[str] = (), min_freq: int = 0,
                 reserved_tokens: Sequence[str] = ()) -> None:
        counter = collections.Counter(tokens)
        self.token_freqs = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
        self.idx_to_token = [self.unk_token, *reserved_tokens]
        self.token_to_idx = {tok: idx for idx, tok in enumerate(self.idx_to_token)}
        for token, freq in self.token_freqs:
            if freq < min_freq:
                break
            if token not in self.token_to_idx:
                self.token_to_idx[token] = len(self.idx_to_token)
                self.idx_to_token.append(token)

    def __len__(self) -> int:
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        """Index of a token (``unk`` if unknown), or a list of indices for a list of tokens."""
        if isinstance(tokens, (list, tuple)):
            return [self[t] for t in tokens]
        return self.token_to_idx.get(tokens, self.unk)

    def to_tokens(self, indices):
        if isinstance(indices, (list, tuple)):
            return [self.idx_to_token[int(i)] for i in indices]
        return self.idx_to_token[int(indices)]

    @property
    def unk(self) -> int:
        return 0

    def state_dict(self) -> dict:
        return {"idx_to_token": list(self.idx_to_token)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Vocab":
        vocab = cls()
        vocab.idx_to_token = list(state["idx_to_token"])
        vocab.token_to_idx = {tok: idx for idx, tok in enumerate(vocab.idx_to_token)}
        return vocab


def one_hot(X: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``(batch, time)`` indices -> ``(time, batch, vocab)`` float one-hot vectors, time first."""
    return F.one_hot(X.T.long(), vocab_size).float()


# --------------------------------------------------------------------------------------------------
# The model: parameters, state, the loop over time
# --------------------------------------------------------------------------------------------------


def get_params(vocab_size: int, num_hiddens: int, device) -> list[torch.Tensor]:
    """``[W_xh (V, H), W_hh (H, H), b_h (H,), W_hq (H, V), b_q (V,)]``: normal * 0.01, zero biases."""
    num_inputs = num_outputs = vocab_size

    def normal(shape):
        return torch.randn(size=shape, device=device) * 0.01

    W_xh = normal((num_inputs, num_hiddens))
    W_hh = normal((num_hiddens, num_hiddens))
    b_h = torch.zeros(num_hiddens, device=device)
    W_hq = normal((num_hiddens, num_outputs))
    b_q = torch.zeros(num_outputs, device=device)
    params = [W_xh, W_hh, b_h, W_hq, b_q]
    for param in params:
        param.requires_grad_(True)
    return params


def init_rnn_state(batch_size: int, num_hiddens: int, device) -> tuple[torch.Tensor]:
    """The hidden state as a tuple (one tensor here; an LSTM would carry two)."""
    return (torch.zeros((batch_size, num_hiddens), device=device),)


def rnn(inputs: torch.Tensor, state: tuple[torch.Tensor], params: Sequence[torch.Tensor]):
    """``inputs (T, B, V)`` -> ``(outputs (T * B, V), (H (B, hidden),))``.

    ``H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h)`` and ``Y_t = H_t W_hq + b_q``, one step at a time.
    """
    W_xh, W_hh, b_h, W_hq, b_q = params
    (H,) = state
    outputs = []
    for X in inputs:  # X: (B, V), one time step
        H = torch.tanh(torch.mm(X, W_xh) + torch.mm(H, W_hh) + b_h)
        Y = torch.mm(H, W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H,)


class RNNModelScratch:
    """An RNN built from explicit parameters and functions: ``net(X, state)`` with ``X (B, T)``."""

    def __init__(self, vocab_size: int, num_hiddens: int, device,
                 get_params: Callable = get_params, init_state: Callable = init_rnn_state,
                 forward_fn: Callable = rnn) -> None:
        self.vocab_size, self.num_hiddens = vocab_size, num_hiddens
        self.params = get_params(vocab_size, num_hiddens, device)
        self.init_state, self.forward_fn = init_state, forward_fn

    def __call__(self, X: torch.Tensor, state):
        X = one_hot(X, self.vocab_size)  # (T, B, V)
        return self.forward_fn(X, state, self.params)

    def begin_state(self, batch_size: int, device):
        return self.init_state(batch_size, self.num_hiddens, device)

    def parameters(self):
        return iter(self.params)


# --------------------------------------------------------------------------------------------------
# Prediction and gradient clipping
# --------------------------------------------------------------------------------------------------


def predict(prefix: str, num_preds: int, net, vocab: Vocab, device) -> str:
    """Warm up on ``prefix`` (state carried, outputs ignored), then predict ``num_preds`` tokens
    greedily, each fed back as the next input. Returns ``prefix`` followed by the predictions (a
    predicted ``<unk>``, index 0, is written as the five characters ``<unk>``)."""
    if not prefix:
        raise ValueError("predict needs a non-empty prefix to warm up on")
    state = net.begin_state(batch_size=1, device=device)
    outputs = [vocab[prefix[0]]]

    def get_input():
        return torch.tensor([outputs[-1]], device=device).reshape((1, 1))

    with torch.no_grad():
        for y in prefix[1:]:  # warm-up: only the state matters
            _, state = net(get_input(), state)
            outputs.append(vocab[y])
        for _ in range(num_preds):  # greedy prediction
            y, state = net(get_input(), state)
            outputs.append(int(y.argmax(dim=1).reshape(1)))
    # The prefix is returned as given (an unknown character stays itself, not "<unk>").
    return prefix + "".join(vocab.idx_to_token[i] for i in outputs[len(prefix):])


def grad_clipping(net, theta: float) -> float:
    """Scale all gradients by ``min(1, theta / ||g||)``, ``||g||`` the global L2 norm over every
    parameter; works for ``RNNModelScratch`` and any ``nn.Module``. Returns the norm before clipping."""
    params = [p for p in net.parameters() if p.requires_grad and p.grad is not None]
    if not params:
        return 0.0
    norm = torch.sqrt(sum(torch.sum(p.grad.double() ** 2) for p in params))
    if norm > theta:
        for param in params:
            param.grad.mul_(theta / norm)
    return float(norm)


# --------------------------------------------------------------------------------------------------
# Data: sequential and random partitioning of a token corpus
# --------------------------------------------------------------------------------------------------


def seq_data_iter_random(corpus: Sequence[int], batch_size: int, num_steps: int,
                         rng: random.Random | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random partitioning: from a random offset, the corpus is cut into subsequences of ``num_steps``
    tokens (none overlapping), which are shuffled: the rows of a batch, and neighbouring batches, are
    in general not adjacent in the corpus, so every batch starts from a fresh state."""
    rng = rng or random
    corpus = corpus[rng.randint(0, num_steps - 1):]
    num_subseqs = (len(corpus) - 1) // num_steps
    initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
    rng.shuffle(initial_indices)
    num_batches = num_subseqs // batch_size
    for i in range(0, batch_size * num_batches, batch_size):
        starts = initial_indices[i:i + batch_size]
        X = [corpus[j:j + num_steps] for j in starts]
        Y = [corpus[j + 1:j + 1 + num_steps] for j in starts]
        yield torch.tensor(X), torch.tensor(Y)


def seq_data_iter_sequential(corpus: Sequence[int], batch_size: int, num_steps: int,
                             rng: random.Random | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential partitioning: row ``b`` of batch ``i + 1`` continues row ``b`` of batch ``i``."""
    rng = rng or random
    offset = rng.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = torch.tensor(corpus[offset:offset + num_tokens])
    Ys = torch.tensor(corpus[offset + 1:offset + 1 + num_tokens])
    Xs, Ys = Xs.reshape(batch_size, -1), Ys.reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield Xs[:, i:i + num_steps], Ys[:, i:i + num_steps]


def sgd(params: Iterable[torch.Tensor], lr: float, batch_size: int) -> None:
    """Minibatch stochastic gradient descent, in place."""
    with torch.no_grad():
        for param in params:
            param -= lr * param.grad / batch_size
            param.grad.zero_()


def detach_state(state):
    """Cut the graph at the batch boundary (truncated BPTT): a tensor, or a tuple of them."""
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)
    return state.detach()


def train_epoch(net, train_iter, loss, updater, device, use_random_iter: bool,
                clip_theta: float = 1.0) -> tuple[float, float]:
    """One epoch; returns ``(perplexity, tokens per second)``.

    Sequential partitioning carries the state across batches, detached from the graph at each batch;
    random partitioning starts every batch from a fresh state. ``loss`` is a mean-reduced criterion,
    e.g. ``nn.CrossEntropyLoss()``; ``updater`` is a ``torch.optim.Optimizer`` or ``f(batch_size)``.
    """
    state, start = None, time.perf_counter()
    total_loss, total_tokens = 0.0, 0
    for X, Y in train_iter:
        if state is None or use_random_iter:
            state = net.begin_state(batch_size=X.shape[0], device=device)
        else:
            state = detach_state(state)
        y = Y.T.reshape(-1)  # time-major, matching the outputs of rnn: (T * B,)
        X, y = X.to(device), y.to(device)
        y_hat, state = net(X, state)
        l = loss(y_hat, y.long()).mean()
        if isinstance(updater, torch.optim.Optimizer):
            updater.zero_grad()
            l.backward()
            grad_clipping(net, clip_theta)
            updater.step()
        else:
            l.backward()
            grad_clipping(net, clip_theta)
            updater(batch_size=1)  # the loss is already a mean
        total_loss += float(l.detach()) * y.numel()
        total_tokens += y.numel()
    elapsed = time.perf_counter() - start
    if total_tokens == 0:
        raise ValueError("the corpus is too short for one batch of this batch size and length")
    return math.exp(total_loss / total_tokens), total_tokens / max(elapsed, 1e-9)


def perplexity(net, data_iter, device) -> float:
    """exp of the mean cross-entropy per token over ``data_iter``, without training. The state is
    carried from batch to batch: ``data_iter`` is sequential partitioning's
    (``seq_data_iter_sequential``), whose rows continue from one batch to the next."""
    total_loss, total_tokens, state = 0.0, 0, None
    with torch.no_grad():
        for X, Y in data_iter:
            if state is None:
                state = net.begin_state(batch_size=X.shape[0], device=device)
            y_hat, state = net(X.to(device), state)
            y = Y.T.reshape(-1).to(device)
            total_loss += float(F.cross_entropy(y_hat, y.long(), reduction="sum"))
            total_tokens += y.numel()
    return math.exp(total_loss / max(total_tokens, 1))


class RNNModel(nn.Module):
    """The same model around a library recurrent layer (``torch.nn.RNN``/``LSTM``/``GRU`` or fastrnn's
    twins of them)."""

    def __init__(self, rnn_layer: nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.rnn, self.vocab_size = rnn_layer, vocab_size
        self.num_hiddens = rnn_layer.hidden_size
        self.num_directions = 2 if rnn_layer.bidirectional else 1
        self.linear = nn.Linear(self.num_hiddens * self.num_directions, vocab_size)

    def forward(self, X: torch.Tensor, state: torch.Tensor):
        inputs = one_hot(X, self.vocab_size).to(self.linear.weight.dtype)  # (T, B, V)
        Y, state = self.rnn(inputs, state)  # (T, B, H * directions)
        return self.linear(Y.reshape(-1, Y.shape[-1])), state

    def begin_state(self, batch_size: int, device):
        """Zeros: ``(layers * directions, B, H)``, or the LSTM's tuple of two such tensors."""
        h = torch.zeros(self.num_directions * self.rnn.num_layers, batch_size, self.num_hiddens,
                        device=device, dtype=self.linear.weight.dtype)
        return (h, torch.zeros_like(h)) if self.rnn.mode == "LSTM" else h
