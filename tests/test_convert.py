"""fastrnn.convert: torch's RNN / LSTM / GRU inside a model become fastrnn's, with the same parameters,
configuration, hooks and results."""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import fastrnn
from fastrnn import CELLS

from .conftest import TOL, rel_err

# what each cell can be built with beyond the common arguments, to convert that too
EXTRA = {"rnn": {"nonlinearity": "relu"}, "lstm": {"proj_size": 3}}


def torch_rnn(cell, dtype=torch.float64, **kwargs):
    """The cell's torch module: 2 layers, both directions, batch first, its extra arguments."""
    arguments = dict(num_layers=2, bidirectional=True, batch_first=True, **EXTRA.get(cell.name, {}))
    return cell.torch_module(4, 5, **{**arguments, **kwargs}, dtype=dtype)


class Tagger(nn.Module):
    """A model someone else wrote: ``x (B, T, 4)`` -> scores ``(B, T, 2)``."""

    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.head = nn.LazyLinear(2, dtype=torch.float64)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


@pytest.mark.parametrize("cell", CELLS.values(), ids=CELLS)
@pytest.mark.parametrize("bias", [True, False])
def test_the_same_parameters_and_configuration(cell, bias):
    rnn = torch_rnn(cell, bias=bias).eval()
    names = [name for name, _ in rnn.named_parameters()]
    params, state = list(rnn.parameters()), rnn.state_dict()
    new = fastrnn.convert(rnn)
    assert type(new) is cell.module and not new.training
    assert [name for name, _ in new.named_parameters()] == names
    assert all(a is b for a, b in zip(new.parameters(), params, strict=True))
    assert list(new.state_dict()) == list(state)
    assert all(new.state_dict()[k].data_ptr() == v.data_ptr() for k, v in state.items())
    assert all(w is getattr(new, name) for w, name in zip(new._flat_weights, new._flat_weights_names,
                                                           strict=True))
    for key in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                "bidirectional", "proj_size"):
        assert getattr(new, key) == getattr(rnn, key), key
    assert getattr(new, "nonlinearity", None) == getattr(rnn, "nonlinearity", None)


@pytest.mark.parametrize("cell", CELLS.values(), ids=CELLS)
def test_outputs_gradients_and_an_earlier_optimizer_match(cell):
    """float64 on the CPU: the converted model against a copy of the original, before and after a
    step of optimizers built before the conversion."""
    torch.manual_seed(0)
    model = Tagger(torch_rnn(cell))
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    model(x)  # the lazy head takes its shape
    reference = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, reference)]
    assert fastrnn.convert(model) is model and type(model.rnn) is cell.module
    for step in range(2):
        outputs = [m(x) for m in (model, reference)]
        assert rel_err(outputs[0], outputs[1]) <= TOL[torch.float64], step
        for out, optimizer in zip(outputs, optimizers):
            optimizer.zero_grad()
            out.pow(2).sum().backward()
        for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert rel_err(a.grad, b.grad) <= TOL[torch.float64], (step, name)
        for optimizer in optimizers:
            optimizer.step()


def test_containers_and_a_shared_module():
    """Through Sequential, ModuleList and ModuleDict; one torch module registered three times (twice
    in the same list) becomes one fastrnn module registered three times."""
    shared, gru = nn.LSTM(4, 5), nn.GRU(5, 5)
    model = nn.ModuleDict({"encoder": nn.Sequential(shared, nn.Identity()),
                           "stack": nn.ModuleList([shared, gru, shared])})
    count = len(list(model.parameters()))
    assert fastrnn.convert(model) is model
    lstm = model["encoder"][0]
    assert type(lstm) is fastrnn.LSTM and type(model["stack"][1]) is fastrnn.GRU
    assert model["stack"][0] is lstm and model["stack"][2] is lstm
    assert len(list(model.parameters())) == count
    assert lstm.weight_ih_l0 is shared.weight_ih_l0


def test_a_root_rnn_gives_a_new_module_and_the_original_is_left_as_it_was():
    rnn = nn.RNN(4, 5, nonlinearity="relu")
    new = fastrnn.convert(rnn)
    assert type(new) is fastrnn.RNN and new.nonlinearity == "relu"
    assert type(rnn) is nn.RNN and new is not rnn
    new.weight_hh_l0 = nn.Parameter(torch.zeros(5, 5))  # the two hold their parameters apart
    assert rnn.weight_hh_l0 is not new.weight_hh_l0 and rnn._flat_weights[1] is rnn.weight_hh_l0


def test_converting_twice_changes_nothing():
    model = nn.Sequential(nn.LSTM(4, 5), nn.GRU(5, 5))
    fastrnn.convert(model)
    children = list(model)
    assert fastrnn.convert(model) is model and list(model) == children
    assert all(a is b for a, b in zip(model, children))
    assert fastrnn.convert(children[0]) is children[0]


def test_subclasses_are_left_alone():
    """A subclass may rely on torch's forward, parametrized or not."""

    class Encoder(nn.LSTM):
        def forward(self, x):
            return super().forward(x)[0]

    parametrized = Encoder(4, 5)
    parametrizations.orthogonal(parametrized, "weight_hh_l0")  # its class: ParametrizedEncoder
    model = nn.Sequential(Encoder(4, 5), parametrized)
    fastrnn.convert(model)
    assert type(model[0]) is Encoder and model[1] is parametrized


class Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("cell", CELLS.values(), ids=CELLS)
def test_parametrized_modules_are_converted_with_their_parametrizations(cell):
    """``torch.nn.utils.parametrize`` gives a module a class of its own (``ParametrizedLSTM``, over
    ``nn.LSTM``). Converted, it is fastrnn's under the very same parametrization modules: the same
    state_dict, outputs and gradients as a copy of the torch module through two optimizer steps
    (spectral norm's buffers included); removing the parametrizations leaves fastrnn's class;
    converted back, torch's parametrized module again. (Spectral norm
    without its power iteration: torch's module evaluates a parametrized weight twice or more a
    call, fastrnn's own paths once, so a power-iteration step a call is where the two part.)"""
    torch.manual_seed(0)
    rnn = torch_rnn(cell)
    parametrizations.weight_norm(rnn, "weight_hh_l0")
    parametrizations.spectral_norm(rnn, "weight_ih_l1", n_power_iterations=3).parametrizations.weight_ih_l1.eval()
    parametrize.register_parametrization(rnn, "bias_hh_l0", Doubled())
    reference, x = copy.deepcopy(rnn), torch.randn(3, 6, 4, dtype=torch.float64)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (rnn, reference)]
    new = fastrnn.convert(rnn)
    assert type(new).__bases__ == (cell.module,) and parametrize.type_before_parametrizations(new) is cell.module
    assert new.parametrizations is rnn.parametrizations
    assert list(new.state_dict()) == list(reference.state_dict())
    for step in range(2):
        outputs = [m(x)[0] for m in (new, reference)]
        assert rel_err(outputs[0], outputs[1]) <= TOL[torch.float64], step
        for out, optimizer in zip(outputs, optimizers):
            optimizer.zero_grad()
            out.pow(2).sum().backward()
            optimizer.step()
        for (name, a), b in zip(new.state_dict().items(), reference.state_dict().values(), strict=True):
            assert rel_err(a, b) <= TOL[torch.float64], (step, name)
    back = fastrnn.convert(new, to="torch").eval()
    assert parametrize.type_before_parametrizations(back) is cell.torch_module
    assert rel_err(back(x)[0], reference.eval()(x)[0]) <= TOL[torch.float64]
    for name in ("weight_hh_l0", "weight_ih_l1", "bias_hh_l0"):
        parametrize.remove_parametrizations(new, name)
    assert type(new) is cell.module and rel_err(new(x)[0], reference(x)[0]) <= TOL[torch.float64]


def test_hooks_attributes_and_training_mode_come_along():
    """Hooks in the same dictionaries (a handle taken before still removes its hook), attributes and
    buffers set on the module, and each module's own training mode."""
    model = Tagger(nn.GRU(4, 5, batch_first=True, dtype=torch.float64)).train()
    model.rnn.eval()
    model.rnn.tag = "encoder"
    model.rnn.register_buffer("steps", torch.zeros((), dtype=torch.long))
    calls = []

    def count_steps(module, args):
        module.steps.add_(1)

    handle = model.rnn.register_forward_hook(lambda module, args, out: calls.append(type(module)))
    model.rnn.register_forward_pre_hook(count_steps)
    fastrnn.convert(model)
    model(torch.randn(2, 3, 4, dtype=torch.float64))
    assert calls == [fastrnn.GRU] and int(model.rnn.steps) == 1
    assert model.training and not model.rnn.training and model.rnn.tag == "encoder"
    assert "steps" in model.rnn.state_dict()
    handle.remove()
    model(torch.randn(2, 3, 4, dtype=torch.float64))
    assert calls == [fastrnn.GRU]


def test_weight_norm_hooks_keep_working():
    """torch.nn.utils.weight_norm computes a weight in a pre-hook from parameters of its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, but still in use
        rnn, reference = (nn.utils.weight_norm(nn.LSTM(4, 5, dtype=torch.float64), "weight_hh_l0")
                          for _ in range(2))
    reference.load_state_dict(rnn.state_dict())  # (a deepcopy is refused: the weight is computed)
    new = fastrnn.convert(rnn)
    with torch.no_grad():
        new.weight_hh_l0_g.mul_(2)
        reference.weight_hh_l0_g.mul_(2)
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    assert rel_err(new(x)[0], reference(x)[0]) <= TOL[torch.float64]


def test_device_and_dtype_are_kept_without_warnings_or_random_numbers():
    """The parameters stay where they were (here on meta, in float16); building the fastrnn module
    neither repeats the torch module's warnings nor draws from the random stream."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lstm = nn.LSTM(4, 5, dropout=0.5, device="meta", dtype=torch.float16)  # dropout with 1 layer
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = fastrnn.convert(lstm)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in new.parameters())


@pytest.mark.parametrize("cell", CELLS.values(), ids=CELLS)
def test_converted_back_is_torchs_module_again(cell):
    """``convert(model, to="torch")`` undoes ``convert(model)``: torch's class, the same Parameter
    objects and torch's very results; so code that picks modules by class sees it again
    (``torch.fx.symbolic_trace`` keeps it as a leaf, which traced fastrnn's forward and failed)."""
    torch.manual_seed(0)
    model = Tagger(torch_rnn(cell))
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    want, params = model(x), list(model.parameters())
    fastrnn.convert(model)
    assert fastrnn.convert(model, to="torch") is model and type(model.rnn) is cell.torch_module
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert torch.equal(model(x), want)
    assert torch.equal(torch.fx.symbolic_trace(model)(x), want)
    with pytest.raises(ValueError, match="to must be 'fastrnn' or 'torch'"):
        fastrnn.convert(model, to="cudnn")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_quantize_dynamic_after_converting_back(cell):
    """``quantize_dynamic`` maps modules by their exact class: fastrnn's it leaves in float; converted
    back, one is quantized as torch's module with its weights is."""
    quantization = pytest.importorskip("torch.ao.quantization")

    torch.manual_seed(0)
    ours = CELLS[cell].module(4, 5)
    theirs = CELLS[cell].torch_module(4, 5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 2, 4)
    with warnings.catch_warnings():  # (torch.ao.quantization's deprecation)
        warnings.simplefilter("ignore")
        left = quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(ours)), {nn.LSTM, nn.GRU})
        got = quantization.quantize_dynamic(nn.Sequential(fastrnn.convert(ours, to="torch")), {nn.LSTM, nn.GRU})
        want = quantization.quantize_dynamic(nn.Sequential(theirs), {nn.LSTM, nn.GRU})
    assert type(left[0]) is CELLS[cell].module
    assert type(got[0]) is type(want[0]) and type(want[0]).__module__.startswith("torch.ao.nn.quantized")
    assert torch.equal(got(x)[0], want(x)[0])
