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
    params = [torch.randn_like(p) * 3 for p in get_params(V, H, "cpu")]  # large, biases too: tanh saturates
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


def library_model(net: RNNModelScratch, layer: nn.RNN) -> scratch.RNNModel:
    """``layer`` around the scratch net's weights: ``W_xh (V, H)`` is ``weight_ih_l0`` transposed,
    ``W_hh`` ``weight_hh_l0`` transposed, ``b_h`` split at random into ``bias_ih_l0 + bias_hh_l0``;
    the output layer is ``W_hq``, ``b_q``."""
    W_xh, W_hh, b_h, W_hq, b_q = net.params
    model = scratch.RNNModel(layer, net.vocab_size)
    with torch.no_grad():
        split = torch.randn_like(b_h)
        for name, value in [("rnn.weight_ih_l0", W_xh.T), ("rnn.weight_hh_l0", W_hh.T),
                            ("rnn.bias_ih_l0", b_h - split), ("rnn.bias_hh_l0", split),
                            ("linear.weight", W_hq.T), ("linear.bias", b_q)]:
            model.get_parameter(name).copy_(value)
    return model


@pytest.mark.parametrize("library,backend", [("torch", "auto"), ("fastrnn", "auto"), ("fastrnn", "torch"),
                                             ("fastrnn", "triton")], indirect=["backend"])
def test_scratch_matches_the_library_rnn(library, backend):
    """The lesson and ``torch.nn.RNN`` / ``fastrnn.RNN`` compute the same function with the same
    weights, random and non-zero (biases too): every step's outputs, the final state, and every
    parameter's gradient."""
    import fastrnn

    torch.manual_seed(1)
    V, H, B, T = 9, 5, 3, 4
    net = RNNModelScratch(V, H, "cpu")
    with torch.no_grad():
        for p in net.params:
            p.copy_(torch.randn_like(p))
    model = library_model(net, (fastrnn.RNN if library == "fastrnn" else nn.RNN)(V, H))
    X = torch.randint(0, V, (B, T))
    y_scratch, (h_scratch,) = net(X, net.begin_state(B, "cpu"))
    y_library, h_library = model(X, model.begin_state(B, "cpu"))
    torch.testing.assert_close(y_library, y_scratch)  # (T * B, V), time-major
    torch.testing.assert_close(h_library[0], h_scratch)
    (y_scratch ** 2).sum().backward()
    (y_library ** 2).sum().backward()
    W_xh, W_hh, b_h, W_hq, b_q = (p.grad for p in net.params)
    rnn_layer, linear = model.rnn, model.linear
    for library_grad, scratch_grad in [(rnn_layer.weight_ih_l0.grad.T, W_xh), (rnn_layer.weight_hh_l0.grad.T, W_hh),
                                       (rnn_layer.bias_ih_l0.grad, b_h), (rnn_layer.bias_hh_l0.grad, b_h),
                                       (linear.weight.grad.T, W_hq), (linear.bias.grad, b_q)]:
        torch.testing.assert_close(library_grad, scratch_grad)


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


def greedy_by_hand(net, vocab: Vocab, prefix: str, num_preds: int) -> str:
    """The prefix through the net as one sequence, then greedy steps, each prediction fed back."""
    with torch.no_grad():
        y, state = net(torch.tensor([vocab[list(prefix)]]), net.begin_state(1, "cpu"))  # (len(prefix), V)
        tokens = []
        for _ in range(num_preds):
            tokens.append(int(y[-1].argmax()))
            y, state = net(torch.tensor([[tokens[-1]]]), state)
    return prefix + "".join(vocab.to_tokens(tokens))


def test_predict_warms_up_on_the_prefix_then_predicts_greedily():
    torch.manual_seed(3)
    vocab = Vocab(TEXT)
    net = RNNModelScratch(len(vocab), 16, "cpu")
    with torch.no_grad():
        for p in net.params:
            p.copy_(torch.randn_like(p))  # large enough that the state decides the predictions
    out = predict("time ", 10, net, vocab, "cpu")
    assert out == greedy_by_hand(net, vocab, "time ", 10)
    # the warm-up matters here: the last character alone predicts something else
    assert out[len("time "):] != greedy_by_hand(net, vocab, " ", 10)[1:]
    with pytest.raises(ValueError):
        predict("", 3, net, vocab, "cpu")


@pytest.mark.parametrize("use_random_iter", [False, True])
def test_sequential_training_carries_the_state_random_starts_afresh(use_random_iter):
    """Sequential partitioning: each batch starts from the state the previous one ended in; random
    partitioning: each from zeros."""
    torch.manual_seed(5)
    vocab = Vocab(TEXT)
    corpus = vocab[list(TEXT)]
    given, returned = [], []

    class Recording(RNNModelScratch):
        def __call__(self, X, state):
            given.append(state[0].detach().clone())
            y, state = super().__call__(X, state)
            returned.append(state[0].detach().clone())
            return y, state

    net = Recording(len(vocab), 8, "cpu")
    iterator = seq_data_iter_random if use_random_iter else seq_data_iter_sequential
    batches = list(iterator(corpus, 2, 5, rng=random.Random(0)))[:4]
    scratch.train_epoch(net, batches, nn.CrossEntropyLoss(), torch.optim.SGD(net.params, lr=0.1), "cpu",
                        use_random_iter)
    assert len(given) == 4 and all(state.abs().sum() > 0 for state in returned)
    assert torch.equal(given[0], torch.zeros(2, 8))
    for before, after in zip(returned, given[1:]):
        assert torch.equal(after, torch.zeros(2, 8) if use_random_iter else before)


def test_data_iterators_partition_the_corpus():
    corpus = list(range(35))
    seen = []
    for X, Y in seq_data_iter_sequential(corpus, batch_size=2, num_steps=5, rng=random.Random(0)):
        assert X.shape == Y.shape == (2, 5)
        assert torch.equal(Y[:, :-1], X[:, 1:])  # Y is X shifted by one
        seen.append(X)
    for a, b in zip(seen, seen[1:]):  # sequential: each row continues where it stopped
        assert torch.equal(b[:, 0], a[:, -1] + 1)
    for seed in range(20):  # random: from one random offset, subsequences that never overlap
        tokens, starts = [], set()
        for X, Y in seq_data_iter_random(list(range(103)), batch_size=2, num_steps=5, rng=random.Random(seed)):
            assert X.shape == (2, 5) and torch.equal(Y, X + 1)
            tokens += X.flatten().tolist()
            starts.update(X[:, 0].tolist())
        assert len(tokens) == len(set(tokens)) >= 80
        assert len({start % 5 for start in starts}) == 1  # one grid of num_steps, shuffled
    # each epoch starts at a random offset: sequential anywhere in [0, num_steps], random in [0, num_steps)
    firsts = {next(seq_data_iter_sequential(corpus, 2, 5, rng=random.Random(seed)))[0][0, 0].item()
              for seed in range(60)}
    grids = {next(seq_data_iter_random(corpus, 2, 5, rng=random.Random(seed)))[0][0, 0].item() % 5
             for seed in range(60)}
    assert firsts == set(range(6)) and grids == set(range(5))


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
