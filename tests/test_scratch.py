"""The textbook scratch RNN: each behaviour the lesson teaches, pinned."""

import math
import random

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fastrnn import scratch
from fastrnn.scratch import (RNNModelScratch, Vocab, get_params, grad_clipping, init_rnn_state,
                             one_hot, predict, rnn, seq_data_iter_random, seq_data_iter_sequential)

TEXT = ("the time traveller for so it will be convenient to speak of him was expounding a recondite "
        "matter to us his grey eyes shone and twinkled and his usually pale face was flushed and "
        "animated the fire burned brightly and the soft radiance of the incandescent lights ") * 6


def test_vocab_round_trip_and_unknown():
    vocab = Vocab(TEXT)
    assert vocab.idx_to_token[0] == "<unk>" and vocab["<unk>"] == 0
    assert len(vocab) == len(set(TEXT)) + 1
    assert vocab.to_tokens(vocab[list("time")]) == list("time")
    assert vocab["#"] == vocab.unk  # never seen
    assert vocab.idx_to_token[1] == " "  # most frequent first
    again = Vocab.from_state_dict(vocab.state_dict())
    assert again.idx_to_token == vocab.idx_to_token and again.token_to_idx == vocab.token_to_idx


def test_one_hot_layout_is_time_batch_vocab():
    X = torch.tensor([[0, 1, 2], [3, 4, 0]])  # (batch 2, time 3)
    out = one_hot(X, 5)
    assert out.shape == (3, 2, 5) and out.dtype == torch.float32
    for b in range(2):
        for t in range(3):
            assert out[t, b].argmax() == X[b, t] and out[t, b].sum() == 1


def test_params_and_state():
    params = get_params(10, 6, "cpu")
    shapes = [tuple(p.shape) for p in params]
    assert shapes == [(10, 6), (6, 6), (6,), (6, 10), (10,)]
    assert all(p.requires_grad for p in params)
    assert params[2].abs().sum() == 0 and params[4].abs().sum() == 0  # biases start at zero
    big = get_params(200, 300, "cpu")[1]
    assert 0.008 < big.std().item() < 0.012  # normal * 0.01
    state = init_rnn_state(4, 6, "cpu")
    assert isinstance(state, tuple) and len(state) == 1 and state[0].shape == (4, 6)


def test_rnn_applies_tanh_and_concatenates_outputs():
    torch.manual_seed(0)
    V, H, B, T = 7, 5, 3, 4
    params = [p.detach() * 300 for p in get_params(V, H, "cpu")]  # large: tanh must saturate
    inputs = one_hot(torch.randint(0, V, (B, T)), V)
    outputs, (H_T,) = rnn(inputs, init_rnn_state(B, H, "cpu"), params)
    assert outputs.shape == (T * B, V)
    assert H_T.abs().max() <= 1.0  # a hidden update without the nonlinearity would leave [-1, 1]
    # the same step by hand, without the loop
    W_xh, W_hh, b_h, W_hq, b_q = params
    h = torch.zeros(B, H)
    for t in range(T):
        h = torch.tanh(inputs[t] @ W_xh + h @ W_hh + b_h)
        torch.testing.assert_close(outputs[t * B:(t + 1) * B], h @ W_hq + b_q)
    torch.testing.assert_close(H_T, h)


def test_outputs_keep_the_graph():
    """Outputs built with torch.tensor(list_of_tensors) would cut the graph: ours carry gradients."""
    net = RNNModelScratch(6, 4, "cpu")
    y, _ = net(torch.randint(0, 6, (2, 3)), net.begin_state(2, "cpu"))
    y.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.params[:2] + net.params[3:4])


def test_scratch_matches_torch_nn_rnn():
    """The oracle and torch.nn.RNN compute the same function with the same weights."""
    torch.manual_seed(1)
    V, H = 9, 5
    net = RNNModelScratch(V, H, "cpu")
    W_xh, W_hh, b_h, _, _ = net.params
    layer = nn.RNN(V, H)
    with torch.no_grad():
        layer.weight_ih_l0.copy_(W_xh.T)
        layer.weight_hh_l0.copy_(W_hh.T)
        layer.bias_ih_l0.copy_(b_h)
        layer.bias_hh_l0.zero_()
    X = torch.randint(0, V, (3, 6))
    _, (H_scratch,) = net(X, net.begin_state(3, "cpu"))
    _, h_n = layer(one_hot(X, V))
    torch.testing.assert_close(H_scratch, h_n[0])


@pytest.mark.parametrize("theta", [0.5, 1e6])
def test_grad_clipping_projects_onto_the_ball(theta):
    torch.manual_seed(2)
    net = RNNModelScratch(6, 8, "cpu")
    y, _ = net(torch.randint(0, 6, (4, 5)), net.begin_state(4, "cpu"))
    (y ** 2).sum().mul(100).backward()
    before = [p.grad.clone() for p in net.params]
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in before))
    assert grad_clipping(net, theta) == pytest.approx(norm)
    after = math.sqrt(sum(float((p.grad ** 2).sum()) for p in net.params))
    if norm > theta:
        assert after == pytest.approx(theta, rel=1e-6)
        for g0, p in zip(before, net.params):  # same direction
            torch.testing.assert_close(p.grad, g0 * theta / norm)
    else:
        for g0, p in zip(before, net.params):
            assert torch.equal(p.grad, g0)


def test_grad_clipping_on_an_nn_module():
    lin = nn.Linear(4, 3)
    lin(torch.randn(5, 4)).pow(2).sum().mul(50).backward()
    grad_clipping(lin, 0.1)
    total = math.sqrt(sum(float((p.grad ** 2).sum()) for p in lin.parameters()))
    assert total == pytest.approx(0.1, rel=1e-6)


def test_predict_returns_prefix_plus_num_preds_and_warms_up():
    torch.manual_seed(3)
    vocab = Vocab(TEXT)
    net = RNNModelScratch(len(vocab), 16, "cpu")
    out = predict("time ", 10, net, vocab, "cpu")
    assert out.startswith("time ") and len(out) == len("time ") + 10
    with pytest.raises(ValueError):
        predict("", 3, net, vocab, "cpu")


def test_data_iterators_partition_the_corpus():
    corpus = list(range(35))
    seen = []
    for X, Y in seq_data_iter_sequential(corpus, batch_size=2, num_steps=5, rng=random.Random(0)):
        assert X.shape == Y.shape == (2, 5)
        assert torch.equal(Y[:, :-1], X[:, 1:])  # Y is X shifted by one
        seen.append(X)
    for a, b in zip(seen, seen[1:]):  # sequential: each row continues where it stopped
        assert torch.equal(b[:, 0], a[:, -1] + 1)
    starts = set()
    for X, Y in seq_data_iter_random(corpus, batch_size=2, num_steps=5, rng=random.Random(0)):
        assert torch.equal(Y, X + 1)
        starts.update(X[:, 0].tolist())
    assert len(starts) >= 4


def test_zero_output_layer_has_perplexity_equal_to_vocab_size():
    vocab = Vocab(TEXT)
    corpus = vocab[list(TEXT)]
    net = RNNModelScratch(len(vocab), 8, "cpu")
    with torch.no_grad():
        net.params[3].zero_()
        net.params[4].zero_()
    it = seq_data_iter_sequential(corpus, 4, 10, rng=random.Random(0))
    assert scratch.perplexity(net, it, "cpu") == pytest.approx(len(vocab), rel=1e-5)


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_training_lowers_perplexity_well_below_vocab_size(use_random_iter):
    torch.manual_seed(4)
    rng = random.Random(4)
    vocab = Vocab(TEXT)
    corpus = vocab[list(TEXT)]
    net = RNNModelScratch(len(vocab), 64, "cpu")
    updater = lambda batch_size: scratch.sgd(net.params, 1.0, batch_size)  # noqa: E731
    loss = nn.CrossEntropyLoss()  # called with the tensors, not constructed with them
    ppl = None
    steps = 0
    while steps < 300:
        it = list((seq_data_iter_random if use_random_iter else seq_data_iter_sequential)(
            corpus, 16, 12, rng=rng))
        ppl, speed = scratch.train_epoch(net, it, loss, updater, "cpu", use_random_iter)
        steps += len(it)
        assert speed > 0
    assert ppl < len(vocab) / 3, f"perplexity {ppl:.2f} after {steps} steps, vocab {len(vocab)}"


def test_sequential_training_detaches_state_between_batches():
    """Truncated BPTT: a second backward must not reach into the previous batch's graph."""
    vocab = Vocab(TEXT)
    corpus = vocab[list(TEXT)]
    net = RNNModelScratch(len(vocab), 8, "cpu")
    it = list(seq_data_iter_sequential(corpus, 2, 5, rng=random.Random(0)))[:3]
    opt = torch.optim.SGD(net.params, lr=0.1)
    ppl, _ = scratch.train_epoch(net, it, nn.CrossEntropyLoss(), opt, "cpu", use_random_iter=False)
    assert math.isfinite(ppl)


def test_cross_entropy_mean_is_per_token():
    logits = torch.zeros(6, 4)
    assert float(F.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 0, 1]))) == pytest.approx(math.log(4))
